//! Every route answers bad input with the documented error, in the one error shape; callers
//! past the API's limits (rate, slow or idle connections, connection count) are held off.

use http::Method;
use laabam_tests::own_redis::OwnRedis;
use laabam_tests::{ApiClient, TestEnv};
use redis::AsyncCommands;
use serde_json::json;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
    assert_eq!(other.get("/v1/endpoints").await.status, 200);
    // A made-up key per request does not bring a fresh budget each time: refusals spend the
    // address's, and past it guesses wait like any caller over its rate.
    let mut refused = 0;
    let mut guess_limited = None;
    for guess in 0..40 {
        let answer = api
            .with_token(&format!("lbk_made_up_{guess}"))
            .get("/v1/endpoints")
            .await;
        match answer.status {
            401 => refused += 1,
            _ => {
                guess_limited = Some(answer);
                break;
            }
        }
    }
    let guess_limited = guess_limited.expect("guesses past the address's budget are limited");
    assert_eq!(guess_limited.json["error"]["code"], "rate_limited");
    assert!(
        refused <= 12,
        "{refused} guesses refused before the limit (a budget of 10)"
    );
    // A key already accepted from the same address goes on.
    assert_eq!(other.get("/v1/endpoints").await.status, 200);
}

/// Producers are replicas behind one address: a caller sending its requests to two of them by
/// turns gets the one rate (a burst of twice it), not the rate from each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_spread_over_two_producers_gets_one_rate() {
    let mut env = TestEnv::new().await;
    let one = env.start_api_with(ADMIN, &["--api-rate-limit", "5"]).await;
    let two = env.start_api_with(ADMIN, &["--api-rate-limit", "5"]).await;
    let key = key(&one).await;
    let clients = [key.clone(), two.with_token(key.token().expect("a key"))];
    let mut admitted = [0; 2];
    let mut limited = None;
    for turn in 0..40 {
        let answer = clients[turn % 2].get("/v1/endpoints").await;
        match answer.status {
            200 => admitted[turn % 2] += 1,
            _ => {
                limited = Some(answer);
                break;
            }
        }
    }
    let limited = limited.expect("a burst past twice the rate is limited");
    assert_eq!(limited.json["error"]["code"], "rate_limited");
    assert!(limited.headers.get("retry-after").is_some());
    let total = admitted[0] + admitted[1];
    assert!(
        (10..=12).contains(&total) && admitted.iter().all(|&n| n >= 5),
        "{admitted:?} admitted by each producer: a burst of 10 for both together"
    );
    // The probes answer from the process alone: they spend nothing in Redis. (Buckets expire
    // once full again, so only new ones are looked for.)
    let pattern = format!("{}api:rate:*", env.prefix);
    let buckets = async || -> HashSet<String> { env.redis().await.keys(&pattern).await.unwrap() };
    let before = buckets().await;
    assert_eq!(one.get("/healthz").await.status, 200);
    assert_eq!(two.get("/readyz").await.status, 200);
    let after_probes = buckets().await;
    assert!(after_probes.is_subset(&before), "no bucket for the probes' address");
    assert_eq!(one.get("/v1/openapi.json").await.status, 200);
    assert_eq!(
        buckets().await.difference(&after_probes).count(),
        1,
        "the address's bucket for the API"
    );
}

/// Counting a request's rate and looking up its API key share one round trip: the key is read
/// inside the counting script, valid or not, and never on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_is_looked_up_in_the_call_that_counts_its_rate() {
    use futures_util::StreamExt;
    let redis = OwnRedis::start();
    let mut env = TestEnv::new().await;
    env.redis_url = redis.url();
    let api = env.start_api(ADMIN).await;
    let client = key(&api).await;
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let monitor = redis::Client::open(redis.url())
        .unwrap()
        .get_async_monitor()
        .await
        .unwrap();
    let heard = seen.clone();
    let listening = tokio::spawn(async move {
        let mut lines = monitor.into_on_message::<String>();
        while let Some(line) = lines.next().await {
            heard.lock().unwrap().push(line);
        }
    });
    for _ in 0..5 {
        assert_eq!(client.get("/v1/endpoints").await.status, 200);
    }
    assert_eq!(api.with_token("lbk_made_up").get("/v1/endpoints").await.status, 401);
    // Whatever Redis ran before this, the monitor has shown once it shows this.
    let _: String = redis::cmd("ECHO")
        .arg("all-seen")
        .query_async(&mut env.redis().await)
        .await
        .unwrap();
    laabam_tests::wait_until("the monitor caught up", Duration::from_secs(10), || async {
        seen.lock().unwrap().iter().any(|l| l.contains("all-seen"))
    })
    .await;
    listening.abort();
    let lookups: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains(r#""GET" ""#) && l.contains(":apikey:"))
        .cloned()
        .collect();
    let (in_script, alone): (Vec<_>, Vec<_>) = lookups.iter().partition(|l| l.contains(" lua] "));
    assert_eq!(
        in_script.len(),
        6,
        "each request's key read while counting: {lookups:#?}"
    );
    assert!(alone.is_empty(), "no second round trip to authenticate: {alone:#?}");
}

/// The API's answers are counted by method, route template and status, the limits' refusals
/// too; a made-up path adds no series of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_counted_by_route_template_and_status() {
    let mut env = TestEnv::new().await;
    let api = env.start_api_with(ADMIN, &["--api-rate-limit", "5"]).await;
    let client = key(&api).await;
    let before = env.api_metrics().await;
    let unknown = format!("/v1/endpoints/ep_{}", ulid::Ulid::new());
    for _ in 0..3 {
        assert_eq!(client.get(&unknown).await.status, 404);
    }
    let made_up = format!("/made-up-{}", ulid::Ulid::new());
    assert_eq!(client.get(&made_up).await.status, 404);
    let mut limited = false;
    for _ in 0..30 {
        limited = client.get("/v1/endpoints").await.status == 429;
        if limited {
            break;
        }
    }
    assert!(limited, "a burst past twice the rate is limited");
    let after = env.api_metrics().await;
    // Other tests in this process count too, so only growth is looked at.
    let grew = |series: &str| sample(&after, series) - sample(&before, series);
    for (series, least) in [
        (
            r#"laabam_api_requests_total{method="GET",route="/v1/endpoints/{id}",status="404"}"#,
            3.0,
        ),
        (
            r#"laabam_api_request_duration_seconds_count{route="/v1/endpoints/{id}"}"#,
            3.0,
        ),
        (
            r#"laabam_api_requests_total{method="GET",route="unmatched",status="404"}"#,
            1.0,
        ),
        (
            r#"laabam_api_requests_total{method="GET",route="/v1/endpoints",status="429"}"#,
            1.0,
        ),
    ] {
        assert!(grew(series) >= least, "{series} grew by {}, not {least}", grew(series));
    }
    assert!(!after.contains("made-up"), "a made-up path adds no series");
}

/// A series' value in a metrics text; 0 when it is not there yet.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().expect("a number"))
}

/// An account may have `--max-endpoints-per-account` endpoints, disabled ones included: ten
/// created at once leave exactly three, the rest refused with `409 limit_reached`, while another
/// account is not held back, and deleting one makes room for one. The operator may give an
/// account a bound of its own instead, and take it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_past_its_endpoint_limit_is_refused_and_others_are_not() {
    let mut env = TestEnv::new().await;
    let api = env.start_api_with(ADMIN, &["--max-endpoints-per-account", "3"]).await;
    let (id, client) = api.new_account(ADMIN, "errors").await;
    let create = || client.post("/v1/endpoints", json!({ "url": "http://127.0.0.1:9/hook" }));
    let answers = futures_util::future::join_all((0..10).map(|_| create())).await;
    let created: Vec<String> = answers
        .iter()
        .filter(|a| a.status == 201)
        .map(|a| a.json["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(created.len(), 3, "three of ten created at once");
    for refused in answers.iter().filter(|a| a.status != 201) {
        assert_eq!(refused.status, 409);
        assert_eq!(refused.json["error"]["code"], "limit_reached");
        let message = refused.json["error"]["message"].as_str().unwrap();
        assert!(message.contains("already has 3 endpoints"), "{message}");
    }
    assert_eq!(
        client.get("/v1/endpoints").await.json["data"].as_array().unwrap().len(),
        3
    );

    let other = key(&api).await;
    assert_eq!(
        other
            .post("/v1/endpoints", json!({ "url": "http://127.0.0.1:9/hook" }))
            .await
            .status,
        201
    );

    let disabled = client
        .patch(&format!("/v1/endpoints/{}", created[0]), json!({ "enabled": false }))
        .await;
    assert_eq!(disabled.status, 200);
    assert_eq!(create().await.status, 409, "a disabled endpoint still counts");
    assert_eq!(
        client.delete(&format!("/v1/endpoints/{}", created[0])).await.status,
        204
    );
    assert_eq!(create().await.status, 201, "a deleted one makes room");
    assert_eq!(create().await.status, 409);

    // The operator gives the account a bound of its own, and takes it back.
    let operator = api.with_token(ADMIN);
    let raised = operator
        .patch(&format!("/v1/accounts/{id}"), json!({ "max_endpoints": 5 }))
        .await;
    assert_eq!((raised.status, raised.json["max_endpoints"].as_u64()), (200, Some(5)));
    assert_eq!(create().await.status, 201);
    assert_eq!(create().await.status, 201);
    let refused = create().await;
    assert_eq!(refused.status, 409);
    assert!(
        refused.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already has 5 endpoints")
    );
    let lowered = operator
        .patch(&format!("/v1/accounts/{id}"), json!({ "max_endpoints": null }))
        .await;
    assert_eq!((lowered.status, lowered.json.get("max_endpoints")), (200, None));
    assert_eq!(
        create().await.status,
        409,
        "five kept, none added past the default of 3"
    );
    let zero = operator
        .patch(&format!("/v1/accounts/{id}"), json!({ "max_endpoints": 0 }))
        .await;
    assert_eq!(
        (zero.status, zero.json["error"]["field"].as_str()),
        (422, Some("max_endpoints"))
    );
    assert_eq!(
        client
            .patch(&format!("/v1/accounts/{id}"), json!({ "max_endpoints": 50 }))
            .await
            .status,
        401
    );
    // An account may be created with a bound of its own.
    let planned = operator
        .post("/v1/accounts", json!({ "name": "planned", "max_endpoints": 1 }))
        .await;
    assert_eq!((planned.status, planned.json["max_endpoints"].as_u64()), (201, Some(1)));
    let shown = operator
        .get(&format!("/v1/accounts/{}", planned.json["id"].as_str().unwrap()))
        .await;
    assert_eq!((shown.status, shown.json["max_endpoints"].as_u64()), (200, Some(1)));
}

/// The API's address as a socket address.
fn socket_of(api: &ApiClient) -> String {
    api.base.trim_start_matches("http://").to_owned()
}

/// Reads until the server closes `stream` (an end of file, or a reset when the client was still
/// writing); what it sent before, as text. Panics when it is still open after `within`.
async fn closed_by_server(stream: &mut TcpStream, within: Duration) -> String {
    let mut received = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server kept the connection open for {within:?}");
    String::from_utf8_lossy(&received).into_owned()
}

const HEALTH_REQUEST: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_send_no_request_head_in_time_are_closed() {
    let mut env = TestEnv::new().await;
    let api = env.start_api_with(ADMIN, &["--api-idle-timeout", "1s"]).await;
    let addr = socket_of(&api);
    // Says nothing at all.
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    // Drips a request's head, a header line every 100 ms, never ending it.
    let mut dripping = TcpStream::connect(&addr).await.unwrap();
    dripping
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")
        .await
        .unwrap();
    let (mut drip_read, mut drip_write) = dripping.into_split();
    let drip = tokio::spawn(async move {
        while drip_write.write_all(b"X-Slow: yes\r\n").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    // Is answered, then keeps its connection without asking again.
    let mut idle = TcpStream::connect(&addr).await.unwrap();
    idle.write_all(HEALTH_REQUEST).await.unwrap();

    let within = Duration::from_secs(20);
    assert_eq!(closed_by_server(&mut silent, within).await, "");
    let answered = closed_by_server(&mut idle, within).await;
    assert!(
        answered.starts_with("HTTP/1.1 200"),
        "answered before it idled: {answered}"
    );
    let mut drip_bytes = [0u8; 64];
    let dripped = tokio::time::timeout(within, drip_read.read(&mut drip_bytes)).await;
    assert!(
        matches!(dripped, Ok(Ok(0) | Err(_))),
        "a head dripped for 20 s still holds its connection: {dripped:?}"
    );
    drip.await.unwrap();
    // The API serves on.
    assert_eq!(api.get("/healthz").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_cap_a_client_waits_for_a_free_connection() {
    let mut env = TestEnv::new().await;
    let api = env.start_api_with(ADMIN, &["--api-max-connections", "2"]).await;
    let addr = socket_of(&api);
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut held = TcpStream::connect(&addr).await.unwrap();
        held.write_all(HEALTH_REQUEST).await.unwrap();
        let mut head = [0u8; 12];
        held.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 200", "a connection within the cap is served");
        holders.push(held);
    }
    // The kernel completes the handshake; the server does not take the connection yet.
    let mut third = TcpStream::connect(&addr).await.unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    let early = tokio::time::timeout(Duration::from_millis(500), third.read_exact(&mut head)).await;
    assert!(
        early.is_err(),
        "a third connection was served while two held the cap of two"
    );
    drop(holders.pop());
    let answered = closed_by_server(&mut third, Duration::from_secs(20)).await;
    assert!(
        answered.starts_with("HTTP/1.1 200"),
        "served once a connection closed: {answered}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_caller_sending_bodies_slowly_cannot_take_the_api_from_the_others() {
    let mut env = TestEnv::new().await;
    let api = env.start_api_with(ADMIN, &["--api-max-in-flight", "8"]).await;
    let slow = key(&api).await;
    let other = key(&api).await;
    // Eight publishes whose bodies never finish arriving: each would hold its room in flight
    // until the request time limit (30 s).
    let mut dripping = Vec::new();
    for _ in 0..8 {
        let mut stream = TcpStream::connect(socket_of(&api)).await.unwrap();
        let head = format!(
            "POST /v1/events HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{",
            slow.token().unwrap()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        dripping.push(stream);
    }
    // Their caller is held to a quarter of the room (two) ...
    laabam_tests::wait_until("the slow caller told to wait", Duration::from_secs(20), || async {
        slow.get("/v1/endpoints").await.status == 429
    })
    .await;
    // ... so everyone else is still served.
    assert_eq!(other.get("/v1/endpoints").await.status, 200);
    drop(dripping);
}
