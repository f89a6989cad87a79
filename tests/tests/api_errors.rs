//! Every route answers bad input with the documented error, in the one error shape.

use http::Method;
use laabam_tests::{ApiClient, TestEnv};
use serde_json::json;

const ADMIN: &str = "errors-operator-token";

/// method, path, raw body, expected status, error code, field, fragment of the message.
type Case<'a> = (Method, String, String, u16, &'a str, Option<&'a str>, &'a str);

async fn key(api: &ApiClient) -> ApiClient {
    api.new_account(ADMIN, "errors").await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_bad_input_with_the_documented_error() {
    let mut env = TestEnv::new().await;
    let api = env.start_api(ADMIN).await;
    let client = key(&api).await;
    let created = client
        .post("/v1/endpoints", json!({ "url": "http://127.0.0.1:9/hook" }))
        .await;
    let ep = created.json["id"].as_str().unwrap().to_owned();

    // Bodies: (method, path, raw body, status, code, field, message fragment)
    let big = format!(
        r#"{{"type":"invoice.paid","data":{{"pad":"{}"}}}}"#,
        "x".repeat(300 * 1024)
    );
    let cases: Vec<Case> = vec![
        (
            Method::POST,
            "/v1/events".into(),
            "{oops".into(),
            400,
            "bad_request",
            None,
            "line 1 column 2",
        ),
        (
            Method::POST,
            "/v1/events".into(),
            "".into(),
            400,
            "bad_request",
            None,
            "JSON body is required",
        ),
        (
            Method::POST,
            "/v1/events".into(),
            big,
            413,
            "payload_too_large",
            None,
            "larger than",
        ),
        (
            Method::POST,
            "/v1/events".into(),
            r#"{"type":"invoice.paid","data":{"invoice_id":"i","payment_id":"p","amount":"5"}}"#.into(),
            422,
            "validation_failed",
            Some("data.amount"),
            "must be an integer",
        ),
        (
            Method::POST,
            "/v1/events".into(),
            r#"{"type":"invoice.exploded","data":{}}"#.into(),
            422,
            "validation_failed",
            Some("type"),
            "unknown event type",
        ),
        (
            Method::POST,
            "/v1/events".into(),
            r#"{"type":"invoice.paid","data":{},"extra":1}"#.into(),
            422,
            "validation_failed",
            None,
            "unknown field `extra`",
        ),
        (
            Method::POST,
            "/v1/events".into(),
            r#"{"type":7,"data":{}}"#.into(),
            422,
            "validation_failed",
            Some("type"),
            "invalid type",
        ),
        (
            Method::POST,
            "/v1/events".into(),
            r#"{"type":"payment.failed","data":{"payment_id":"p","reason":"r"},"id":"has space"}"#.into(),
            422,
            "validation_failed",
            Some("id"),
            "printable ASCII",
        ),
        (
            Method::POST,
            "/v1/endpoints".into(),
            r#"{"url":5}"#.into(),
            422,
            "validation_failed",
            Some("url"),
            "invalid type",
        ),
        (
            Method::POST,
            "/v1/endpoints".into(),
            r#"{"url":"ftp://x"}"#.into(),
            422,
            "validation_failed",
            Some("url"),
            "http:// or https://",
        ),
        (
            Method::POST,
            "/v1/endpoints".into(),
            r#"{"url":"https://example.com/","events":["nope"]}"#.into(),
            422,
            "validation_failed",
            Some("events"),
            "unknown event type",
        ),
        (
            Method::POST,
            "/v1/endpoints".into(),
            r#"{"url":"https://example.com/","rate_limit":0}"#.into(),
            422,
            "validation_failed",
            Some("rate_limit"),
            "at least 1",
        ),
        (
            Method::POST,
            "/v1/endpoints".into(),
            r#"{"url":"https://example.com/","headers":{"webhook-id":"x"}}"#.into(),
            422,
            "validation_failed",
            Some("headers"),
            "set by the platform",
        ),
        (
            Method::POST,
            "/v1/endpoints".into(),
            r#"{"url":"https://example.com/","colour":"red"}"#.into(),
            422,
            "validation_failed",
            None,
            "unknown field `colour`",
        ),
        (
            Method::PATCH,
            format!("/v1/endpoints/{ep}"),
            r#"{"rate_limit":"fast"}"#.into(),
            422,
            "validation_failed",
            Some("rate_limit"),
            "invalid type",
        ),
        (
            Method::PATCH,
            format!("/v1/endpoints/{ep}"),
            r#"{"enabled":true,"secret":"x"}"#.into(),
            422,
            "validation_failed",
            None,
            "unknown field `secret`",
        ),
        (
            Method::PATCH,
            format!("/v1/endpoints/{ep}"),
            "[".into(),
            400,
            "bad_request",
            None,
            "malformed JSON",
        ),
        (
            Method::POST,
            format!("/v1/endpoints/{ep}/test"),
            r#"{"type":"invoice.exploded"}"#.into(),
            422,
            "validation_failed",
            Some("type"),
            "unknown event type",
        ),
        (
            Method::POST,
            format!("/v1/endpoints/{ep}/test"),
            r#"{}"#.into(),
            422,
            "validation_failed",
            None,
            "missing field `type`",
        ),
        (
            Method::POST,
            format!("/v1/endpoints/{ep}/recover"),
            r#"{"since":"yesterday"}"#.into(),
            422,
            "validation_failed",
            Some("since"),
            "RFC 3339",
        ),
        (
            Method::POST,
            format!("/v1/endpoints/{ep}/recover"),
            r#"{"since":1}"#.into(),
            422,
            "validation_failed",
            Some("since"),
            "invalid type",
        ),
    ];
    for (method, path, body, status, code, field, fragment) in cases {
        let answer = client.send(method.clone(), &path, body.into_bytes(), &[]).await;
        let what = format!("{method} {path}: {:?}", answer.json);
        assert_eq!(answer.status, status, "{what}");
        assert_eq!(answer.json["error"]["code"], code, "{what}");
        assert!(
            answer.json["error"]["message"].as_str().unwrap().contains(fragment),
            "{what}"
        );
        if let Some(field) = field {
            assert_eq!(answer.json["error"]["field"], field, "{what}");
        }
    }

    // Admin routes check their bodies too.
    let admin = api.with_token(ADMIN);
    let empty_name = admin.post("/v1/accounts", json!({ "name": " " })).await;
    assert_eq!(
        (empty_name.status, empty_name.json["error"]["field"].as_str()),
        (422, Some("name"))
    );
    assert_eq!(admin.post("/v1/accounts/acct_nobody/keys", json!({})).await.status, 404);
    assert_eq!(admin.get("/v1/accounts/acct_nobody/keys").await.status, 404);
    assert_eq!(admin.delete("/v1/accounts/acct_nobody/keys/lbk_x").await.status, 404);
    assert_eq!(client.delete("/v1/api-keys/lbk_unknown").await.status, 404);
    let own = client.get("/v1/api-keys").await;
    assert_eq!(own.json.as_array().unwrap().len(), 1);
    assert!(own.json[0]["prefix"].as_str().unwrap().starts_with("lbk_"));
    assert!(
        own.json[0].get("hash").is_none() && own.json[0].get("key").is_none(),
        "listings never show keys"
    );

    // Bad ids and bad query parameters.
    for path in [
        "/v1/endpoints/ep_doesnotexist",
        "/v1/endpoints/has%20space",
        "/v1/deliveries/dlv_nope",
        "/v1/events/evt_nope",
        "/v1/deliveries?endpoint_id=ep_someone_elses",
    ] {
        let answer = client.get(path).await;
        assert_eq!(
            (answer.status, answer.json["error"]["code"].as_str()),
            (404, Some("not_found")),
            "{path}"
        );
    }
    for (path, field) in [
        ("/v1/deliveries?limit=0", Some("limit")),
        ("/v1/deliveries?limit=many", None),
        ("/v1/deliveries?status=weird", Some("status")),
        ("/v1/deliveries?since=yesterday", Some("since")),
        ("/v1/deliveries?cursor=zzz", Some("cursor")),
        ("/v1/deliveries?colour=red", None),
        ("/v1/events?limit=1000", Some("limit")),
    ] {
        let answer = client.get(path).await;
        assert_eq!(
            (answer.status, answer.json["error"]["code"].as_str()),
            (400, Some("bad_request")),
            "{path}: {:?}",
            answer.json
        );
        if let Some(field) = field {
            assert_eq!(answer.json["error"]["field"], field, "{path}");
        }
    }

    // Unknown routes and methods.
    let answer = client.get("/v1/nothing-here").await;
    assert_eq!(
        (answer.status, answer.json["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let answer = client.call(Method::PUT, "/v1/endpoints", Some(json!({}))).await;
    assert_eq!(
        (answer.status, answer.json["error"]["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
    // Redelivering a delivery that does not exist, and private targets when not allowed are
    // covered by the dispatcher; here: a well-formed but unknown delivery id.
    let answer = client
        .post(
            "/v1/deliveries/dlv_00000000000000000000000000000000/redeliver",
            json!({}),
        )
        .await;
    assert_eq!(answer.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_over_their_rate_are_told_to_slow_down_and_others_are_not() {
    let mut env = TestEnv::new().await;
    let api = env.start_api_with(ADMIN, &["--api-rate-limit", "5"]).await;
    let client = key(&api).await;
    let mut limited = None;
    for _ in 0..30 {
        let answer = client.get("/v1/event-types").await;
        if answer.status == 429 {
            limited = Some(answer);
            break;
        }
    }
    let limited = limited.expect("a burst past twice the rate is limited");
    assert_eq!(limited.json["error"]["code"], "rate_limited");
    assert!(limited.headers.get("retry-after").is_some());
    // Another credential has its own budget.
    let other = key(&api).await;
    assert_eq!(other.get("/v1/event-types").await.status, 200);
}
