//! The HTTP API against the running producer, dispatcher and retry scheduler, with the real
//! RabbitMQ and Redis and real receivers.

use laabam_shared::catalog::CATALOG;
use laabam_shared::clock::{format_rfc3339_ms, now_ms};
use laabam_shared::ids::{AccountId, EventId};
use laabam_shared::signing::Secret;
use laabam_tests::{ApiClient, Receiver, Reply, TestEnv, wait_until};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const ADMIN: &str = "test-operator-token";
const WAIT: Duration = Duration::from_secs(30);

/// An account with its own key, created the way an operator would.
async fn account(api: &ApiClient, name: &str) -> (String, ApiClient) {
    let (id, client) = api.new_account(ADMIN, name).await;
    assert!(
        client.get("/v1/api-keys").await.json[0]["prefix"]
            .as_str()
            .unwrap()
            .starts_with("lbk_")
    );
    (id, client)
}

async fn endpoint(client: &ApiClient, url: &str, events: Value) -> (String, Secret) {
    let created = client
        .post(
            "/v1/endpoints",
            json!({ "url": url, "events": events, "description": "test" }),
        )
        .await;
    assert_eq!(created.status, 201, "{:?}", created.json);
    let secret = Secret::parse(created.json["secret"].as_str().unwrap()).unwrap();
    (created.json["id"].as_str().unwrap().to_owned(), secret)
}

/// Sends a test event of `event_type` to an endpoint, waits until it was delivered, and returns
/// the event id.
async fn send_test(client: &ApiClient, endpoint_id: &str, event_type: &str) -> String {
    let sent = client
        .post(
            &format!("/v1/endpoints/{endpoint_id}/test"),
            json!({ "type": event_type }),
        )
        .await;
    assert_eq!(sent.status, 202, "{:?}", sent.json);
    let delivery = sent.json["delivery_id"].as_str().unwrap().to_owned();
    wait_until("the test event delivered", WAIT, || async {
        delivery_status(client, &delivery).await == "succeeded"
    })
    .await;
    sent.json["event_id"].as_str().unwrap().to_owned()
}

/// One endpoint's entry in a `GET /v1/endpoints` answer.
fn view_of(list: &Value, id: &str) -> Value {
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == id)
        .expect("listed")
        .clone()
}

async fn delivery_status(client: &ApiClient, id: &str) -> String {
    client.get(&format!("/v1/deliveries/{id}")).await.json["status"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_manages_endpoints_publishes_and_inspects_every_delivery() {
    let mut env = TestEnv::new().await;
    let api = env.start_api(ADMIN).await;
    env.start_dispatcher(&["--retry-max-attempts", "2"]);
    env.start_scheduler(&[]);
    let (_, alice) = account(&api, "Alice").await;
    let (_, bob) = account(&api, "Bob").await;

    let healthy = Receiver::ok().await;
    let failing_now = Arc::new(AtomicBool::new(true));
    let flag = failing_now.clone();
    let flaky = Receiver::start(move |_, _| {
        if flag.load(Ordering::SeqCst) {
            Reply::Status(500)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let (healthy_id, healthy_secret) = endpoint(&alice, &healthy.url, Value::Null).await;
    let (flaky_id, _) = endpoint(&alice, &flaky.url, json!(["invoice.paid"])).await;

    // The catalog, with schemas and examples.
    let types = alice.get("/v1/event-types").await;
    assert_eq!(types.status, 200);
    assert_eq!(types.json.as_array().unwrap().len(), CATALOG.len());
    assert_eq!(
        types.json[1]["schema"]["required"],
        json!(["invoice_id", "payment_id", "amount"])
    );

    // Publish every type over HTTP.
    let mut event_ids = Vec::new();
    for spec in CATALOG.iter().filter(|s| s.name != "endpoint.disabled") {
        let data: Value = serde_json::from_str(spec.example).unwrap();
        let published = alice
            .post("/v1/events", json!({ "type": spec.name, "data": data }))
            .await;
        assert_eq!(published.status, 202, "{:?}", published.json);
        event_ids.push(published.json["id"].as_str().unwrap().to_owned());
    }
    wait_until("every event at the healthy endpoint", WAIT, || async {
        healthy.count() == 4
    })
    .await;
    for req in healthy.requests() {
        assert!(req.verifies(&healthy_secret));
    }
    // A delivery is recorded after its response, so the last may still be in flight.
    let succeeded_path = format!("/v1/deliveries?endpoint_id={healthy_id}&status=succeeded");
    let succeeded_listing = || alice.get(&succeeded_path);
    let listed = |r: &laabam_tests::api::Answer| r.json["data"].as_array().map_or(0, Vec::len);
    wait_until("every healthy delivery recorded as succeeded", WAIT, || async {
        listed(&succeeded_listing().await) >= 4
    })
    .await;
    let succeeded = succeeded_listing().await;
    assert_eq!(listed(&succeeded), 4);

    // The failing endpoint's attempts and success rate.
    let paid_id = &event_ids[1];
    wait_until("the flaky delivery failed for good", WAIT, || async {
        let event = alice.get(&format!("/v1/events/{paid_id}")).await;
        event.json["deliveries"].as_array().is_some_and(|ds| {
            ds.iter()
                .any(|d| d["endpoint_id"] == flaky_id.as_str() && d["status"] == "failed")
        })
    })
    .await;
    let event = alice.get(&format!("/v1/events/{paid_id}")).await;
    assert_eq!(event.json["event"]["type"], "invoice.paid");
    assert_eq!(event.json["deliveries"].as_array().unwrap().len(), 2);
    let listed = alice.get("/v1/endpoints").await;
    let flaky_view = view_of(&listed.json, &flaky_id);
    assert_eq!(flaky_view["success_rate_24h"], 0.0);
    assert_eq!(flaky_view["last_delivery"]["outcome"], "http_5xx");
    assert_eq!(flaky_view["status"], "active");
    let healthy_view = view_of(&listed.json, &healthy_id);
    assert_eq!(healthy_view["success_rate_24h"], 1.0);
    let stats = alice.get(&format!("/v1/endpoints/{flaky_id}/stats")).await;
    assert_eq!(stats.json["last_24h"]["counts"]["http_5xx"], 2);
    assert_eq!(stats.json["last_1h"]["attempts"], 2);
    assert!(stats.json["last_7d"]["latency_p50_ms"].is_u64());
    let failed = alice
        .get(&format!("/v1/deliveries?endpoint_id={flaky_id}&status=failed"))
        .await;
    let failed_id = failed.json["data"][0]["id"].as_str().unwrap().to_owned();
    let detail = alice.get(&format!("/v1/deliveries/{failed_id}")).await;
    assert_eq!(detail.json["attempt_log"].as_array().unwrap().len(), 2);
    assert_eq!(detail.json["attempt_log"][0]["status_code"], 500);
    assert_eq!(detail.json["attempt_log"][0]["response_excerpt"], "answered 500");
    assert_eq!(detail.json["reason"], "gave up after 2 attempts");

    // Recover: the endpoint is fixed, and every failed delivery since then is re-sent.
    failing_now.store(false, Ordering::SeqCst);
    let since = format_rfc3339_ms(now_ms() - 3_600_000);
    let recovered = alice
        .post(&format!("/v1/endpoints/{flaky_id}/recover"), json!({ "since": since }))
        .await;
    assert_eq!(recovered.status, 202);
    assert_eq!(recovered.json["redelivered"], 1);
    wait_until("recovered delivery succeeded", WAIT, || async {
        delivery_status(&alice, &failed_id).await == "succeeded"
    })
    .await;

    // Redeliver a delivery that already succeeded: it is sent again, same webhook-id.
    let first_ok = succeeded.json["data"][0].clone();
    let redelivered = alice
        .post(
            &format!("/v1/deliveries/{}/redeliver", first_ok["id"].as_str().unwrap()),
            json!({}),
        )
        .await;
    assert_eq!(redelivered.status, 202, "{:?}", redelivered.json);
    wait_until("redelivered", WAIT, || async { healthy.count() == 5 }).await;
    assert_eq!(
        healthy.requests()[4].header("webhook-id"),
        first_ok["event_id"].as_str().unwrap()
    );

    // Rotate the secret: during the grace period both secrets verify every delivery.
    let rotated = alice
        .post(&format!("/v1/endpoints/{healthy_id}/secret/rotate"), json!({}))
        .await;
    assert_eq!(rotated.status, 200);
    let new_secret = Secret::parse(rotated.json["secret"].as_str().unwrap()).unwrap();
    assert_eq!(rotated.json["previous"][0]["secret"], healthy_secret.expose());
    let shown = alice.get(&format!("/v1/endpoints/{healthy_id}/secret")).await;
    assert_eq!(shown.json["secret"], new_secret.expose());

    // A test send reaches this endpoint only, through the real pipeline.
    let test_event = send_test(&alice, &healthy_id, "invoice.paid").await;
    let test_req = healthy
        .requests()
        .into_iter()
        .find(|r| r.header("webhook-id") == test_event.as_str())
        .unwrap();
    assert!(
        test_req.verifies(&new_secret) && test_req.verifies(&healthy_secret),
        "both secrets verify during the grace period"
    );
    assert_eq!(test_req.header("webhook-signature").split(' ').count(), 2);
    assert!(
        !flaky.per_event().contains_key(test_event.as_str()),
        "the other invoice.paid endpoint got nothing"
    );

    // Idempotent publishing: the same key answers with the first result, delivered once.
    let body = json!({ "type": "payment.failed", "data": { "payment_id": "p9", "reason": "expired_card" } });
    let idem = [("idempotency-key", "order-42")];
    let publish = || {
        alice.send(
            http::Method::POST,
            "/v1/events",
            serde_json::to_vec(&body).unwrap(),
            &idem,
        )
    };
    let first = publish().await;
    let second = publish().await;
    assert_eq!((first.status, second.status), (202, 202));
    assert_eq!(first.json["id"], second.json["id"]);
    assert_eq!(second.headers.get("idempotent-replayed").unwrap(), "true");
    let chosen = json!({ "type": "payment.failed", "id": "order-43", "data": { "payment_id": "p9", "reason": "r" } });
    assert_eq!(alice.post("/v1/events", chosen.clone()).await.json["id"], "order-43");
    assert_eq!(
        alice
            .post("/v1/events", chosen)
            .await
            .headers
            .get("idempotent-replayed")
            .unwrap(),
        "true"
    );
    let idem_event = first.json["id"].as_str().unwrap().to_owned();
    wait_until("idempotent events delivered", WAIT, || async {
        let seen = healthy.per_event();
        seen.contains_key(&idem_event) && seen.contains_key("order-43")
    })
    .await;
    assert_eq!(healthy.per_event()[&idem_event], 1);
    assert_eq!(healthy.per_event()["order-43"], 1);
    let events = alice.get("/v1/events?limit=2").await;
    assert_eq!(events.json["data"].as_array().unwrap().len(), 2);
    let rest = alice
        .get(&format!(
            "/v1/events?limit=250&cursor={}",
            events.json["next_cursor"].as_str().unwrap()
        ))
        .await;
    assert_eq!(
        rest.json["data"].as_array().unwrap().len(),
        5,
        "7 events in all, paged without overlap"
    );

    // Another account sees none of it: 404 on every route, as if nothing existed.
    let delivery = first_ok["id"].as_str().unwrap();
    for (method, path) in [
        ("GET", format!("/v1/endpoints/{healthy_id}")),
        ("PATCH", format!("/v1/endpoints/{healthy_id}")),
        ("DELETE", format!("/v1/endpoints/{healthy_id}")),
        ("GET", format!("/v1/endpoints/{healthy_id}/secret")),
        ("POST", format!("/v1/endpoints/{healthy_id}/secret/rotate")),
        ("GET", format!("/v1/endpoints/{healthy_id}/stats")),
        ("POST", format!("/v1/endpoints/{healthy_id}/test")),
        ("POST", format!("/v1/endpoints/{healthy_id}/recover")),
        ("GET", format!("/v1/events/{paid_id}")),
        ("GET", format!("/v1/deliveries/{delivery}")),
        ("POST", format!("/v1/deliveries/{delivery}/redeliver")),
        ("GET", format!("/v1/deliveries?endpoint_id={healthy_id}")),
    ] {
        let body = match method {
            "PATCH" => Some(json!({ "description": "mine now" })),
            "POST" if path.ends_with("/test") => Some(json!({ "type": "invoice.paid" })),
            "POST" if path.ends_with("/recover") => Some(json!({ "since": since })),
            "POST" => Some(json!({})),
            _ => None,
        };
        let answer = bob.call(method.parse().unwrap(), &path, body).await;
        assert_eq!(answer.status, 404, "{method} {path}: {:?}", answer.json);
        assert_eq!(answer.json["error"]["code"], "not_found");
    }
    assert_eq!(
        bob.get("/v1/endpoints").await.json,
        json!({ "data": [], "next_cursor": null })
    );
    assert_eq!(bob.get("/v1/deliveries").await.json["data"], json!([]));
    assert_eq!(bob.get("/v1/events").await.json["data"], json!([]));

    // Credentials: none, wrong, revoked.
    assert_eq!(api.get("/v1/endpoints").await.status, 401);
    assert_eq!(api.with_token("lbk_not-a-key").get("/v1/endpoints").await.status, 401);
    assert_eq!(
        api.with_token("wrong")
            .post("/v1/accounts", json!({ "name": "x" }))
            .await
            .status,
        401
    );
    assert_eq!(
        alice.post("/v1/accounts", json!({ "name": "x" })).await.status,
        401,
        "an account key is not the operator token"
    );
    let keys = bob.get("/v1/api-keys").await;
    let prefix = keys.json[0]["prefix"].as_str().unwrap().to_owned();
    assert_eq!(bob.delete(&format!("/v1/api-keys/{prefix}")).await.status, 204);
    assert_eq!(
        bob.get("/v1/endpoints").await.status,
        401,
        "a revoked key no longer works"
    );

    // Update and disable by the owner; delete.
    let patched = alice
        .patch(
            &format!("/v1/endpoints/{flaky_id}"),
            json!({ "enabled": false, "description": "paused", "events": null }),
        )
        .await;
    assert_eq!(patched.status, 200, "{:?}", patched.json);
    assert_eq!(patched.json["status"], "disabled");
    assert_eq!(patched.json["disabled_reason"], "disabled by its owner");
    assert_eq!(patched.json["events"], Value::Null);
    assert_eq!(alice.delete(&format!("/v1/endpoints/{flaky_id}")).await.status, 204);
    assert_eq!(alice.get(&format!("/v1/endpoints/{flaky_id}")).await.status, 404);
}

/// A redelivery starts a new cycle with the event's payload kept for another retention period,
/// so its retries still have something to send; once the payload is gone, the owner is told so
/// instead of getting a delivery that could never be sent.
/// The endpoint list pages like every listing: oldest first, `limit` at a time, and a cursor
/// goes on after the endpoint it names, even once that endpoint is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_list_pages_oldest_first_and_a_cursor_goes_on_past_a_deleted_endpoint() {
    let mut env = TestEnv::new().await;
    let api = env.start_api(ADMIN).await;
    let (_, alice) = account(&api, "Alice").await;
    let (_, bob) = account(&api, "Bob").await;
    let mut created = Vec::new();
    for n in 0..5 {
        created.push(
            endpoint(&alice, &format!("http://127.0.0.1:9/hook{n}"), Value::Null)
                .await
                .0,
        );
    }
    let ids = |page: &Value| -> Vec<String> {
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect()
    };

    // Oldest first to the millisecond: ids sort by their creation time, and those made within
    // one millisecond by the rest of the id.
    let all = alice.get("/v1/endpoints").await.json;
    let listed = ids(&all);
    assert!(listed.is_sorted(), "{listed:?}");
    let (mut made, mut shown) = (created.clone(), listed.clone());
    made.sort();
    shown.sort();
    assert_eq!(shown, made, "all five on the default page");
    assert_eq!(all["next_cursor"], Value::Null);

    let mut paged = Vec::new();
    let mut sizes = Vec::new();
    let mut path = "/v1/endpoints?limit=2".to_owned();
    loop {
        let page = alice.get(&path).await;
        assert_eq!(page.status, 200, "{:?}", page.json);
        sizes.push(ids(&page.json).len());
        paged.extend(ids(&page.json));
        match page.json["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/endpoints?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(sizes, [2, 2, 1]);
    assert_eq!(paged, listed);

    let first = alice.get("/v1/endpoints?limit=2").await.json;
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    assert_eq!(alice.delete(&format!("/v1/endpoints/{}", listed[1])).await.status, 204);
    let next = alice.get(&format!("/v1/endpoints?limit=2&cursor={cursor}")).await.json;
    assert_eq!(ids(&next), listed[2..4], "goes on after the deleted endpoint");

    assert_eq!(ids(&bob.get("/v1/endpoints").await.json), Vec::<String>::new());
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=251", "limit"),
        ("cursor=nonsense", "cursor"),
    ] {
        let refused = alice.get(&format!("/v1/endpoints?{query}")).await;
        assert_eq!(refused.status, 400, "{query}: {:?}", refused.json);
        assert_eq!(refused.json["error"]["field"], field, "{query}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_keeps_its_payload_and_one_whose_payload_expired_is_refused() {
    let mut env = TestEnv::new().await;
    let api = env.start_api(ADMIN).await;
    env.start_dispatcher(&[]);
    env.start_scheduler(&[]);
    let rx = Receiver::ok().await;
    let (account_id, alice) = account(&api, "Alice").await;
    let (endpoint_id, _) = endpoint(&alice, &rx.url, json!(["invoice.paid"])).await;
    let event_id = send_test(&alice, &endpoint_id, "invoice.paid").await;
    let listed = alice.get(&format!("/v1/deliveries?endpoint_id={endpoint_id}")).await;
    let delivery = listed.json["data"][0]["id"].as_str().unwrap().to_owned();

    let store = env.store().await;
    let event_key = store.keys().event(
        &AccountId::parse(&account_id).unwrap(),
        &EventId::parse(&event_id).unwrap(),
    );
    let mut redis = env.redis().await;
    let ttl = |mut conn: redis::aio::MultiplexedConnection, key: String| async move {
        redis::cmd("TTL").arg(&key).query_async::<i64>(&mut conn).await.unwrap()
    };
    let retention = ttl(redis.clone(), event_key.clone()).await;
    assert!(
        retention > 3600,
        "an event lives for the retention period: {retention} s"
    );

    // Near the end of retention, a redelivery gives the payload a new period.
    let _: () = redis::cmd("EXPIRE")
        .arg(&event_key)
        .arg(5)
        .query_async(&mut redis)
        .await
        .unwrap();
    let redelivered = alice
        .post(&format!("/v1/deliveries/{delivery}/redeliver"), json!({}))
        .await;
    assert_eq!(redelivered.status, 202, "{:?}", redelivered.json);
    wait_until("redelivered", WAIT, || async { rx.count() == 2 }).await;
    assert!(ttl(redis.clone(), event_key.clone()).await > retention - 60);

    // Without its payload, the delivery is refused with a reason, and nothing is queued.
    wait_until("the redelivery finished", WAIT, || async {
        delivery_status(&alice, &delivery).await == "succeeded"
    })
    .await;
    let _: () = redis::cmd("DEL").arg(&event_key).query_async(&mut redis).await.unwrap();
    let refused = alice
        .post(&format!("/v1/deliveries/{delivery}/redeliver"), json!({}))
        .await;
    assert_eq!(refused.status, 409, "{:?}", refused.json);
    assert!(
        refused.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("outlived retention"),
        "{:?}",
        refused.json
    );
    assert_eq!(delivery_status(&alice, &delivery).await, "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_endpoints_are_disabled_and_the_owner_is_told() {
    let mut env = TestEnv::new().await;
    let api = env.start_api(ADMIN).await;
    env.start_dispatcher(&["--disable-after", "300ms", "--retry-max-attempts", "20"]);
    env.start_scheduler(&[]);
    let (_, owner) = account(&api, "Owner").await;
    let watcher = Receiver::ok().await;
    let gone = Receiver::start(|_, _| Reply::Status(410)).await;
    let broken = Receiver::start(|_, _| Reply::Status(503)).await;
    let (watcher_id, _) = endpoint(&owner, &watcher.url, json!(["endpoint.disabled"])).await;
    let (gone_id, _) = endpoint(&owner, &gone.url, json!(["invoice.created"])).await;
    let (broken_id, _) = endpoint(&owner, &broken.url, json!(["invoice.paid"])).await;

    let created = json!({ "type": "invoice.created", "data": { "invoice_id": "i", "status": "open", "amount": 1 } });
    let paid = json!({ "type": "invoice.paid", "data": { "invoice_id": "i", "payment_id": "p", "amount": 1 } });
    assert_eq!(owner.post("/v1/events", created).await.status, 202);
    assert_eq!(owner.post("/v1/events", paid).await.status, 202);

    wait_until("both endpoints disabled", WAIT, || async {
        let list = owner.get("/v1/endpoints").await.json;
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["status"] == "disabled")
            .count()
            == 2
    })
    .await;
    let gone_view = owner.get(&format!("/v1/endpoints/{gone_id}")).await.json;
    assert_eq!(gone_view["disabled_reason"], "endpoint answered 410 Gone");
    assert!(gone_view["disabled_at"].is_string());
    let broken_view = owner.get(&format!("/v1/endpoints/{broken_id}")).await.json;
    assert!(
        broken_view["disabled_reason"]
            .as_str()
            .unwrap()
            .starts_with("no successful delivery for")
    );

    wait_until("two endpoint.disabled events at the watcher", WAIT, || async {
        watcher.count() == 2
    })
    .await;
    let mut told: Vec<String> = watcher
        .requests()
        .iter()
        .map(|r| r.json()["data"]["endpoint_id"].as_str().unwrap().to_owned())
        .collect();
    told.sort();
    let mut expected = vec![gone_id.clone(), broken_id.clone()];
    expected.sort();
    assert_eq!(told, expected);
    assert!(
        watcher
            .requests()
            .iter()
            .all(|r| r.json()["type"] == "endpoint.disabled")
    );
    assert!(!told.contains(&watcher_id));

    // No further attempts while disabled; re-enabling resumes delivery.
    let attempts_then = broken.count();
    assert_eq!(
        owner
            .patch(&format!("/v1/endpoints/{broken_id}"), json!({ "enabled": true }))
            .await
            .json["status"],
        "active"
    );
    let paid = json!({ "type": "invoice.paid", "data": { "invoice_id": "j", "payment_id": "q", "amount": 2 } });
    assert_eq!(owner.post("/v1/events", paid).await.status, 202);
    wait_until("delivery resumed after re-enabling", WAIT, || async {
        broken.count() > attempts_then
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_every_route() {
    let mut env = TestEnv::new().await;
    let api = env.start_api(ADMIN).await;
    let doc = api.get("/v1/openapi.json").await;
    assert_eq!(doc.status, 200);
    assert!(doc.json["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc.json["paths"].as_object().unwrap();
    for (path, methods) in [
        ("/v1/event-types", &["get"][..]),
        ("/v1/events", &["get", "post"]),
        ("/v1/events/{event_id}", &["get"]),
        ("/v1/endpoints", &["get", "post"]),
        ("/v1/endpoints/{endpoint_id}", &["get", "patch", "delete"]),
        ("/v1/endpoints/{endpoint_id}/secret", &["get"]),
        ("/v1/endpoints/{endpoint_id}/secret/rotate", &["post"]),
        ("/v1/endpoints/{endpoint_id}/stats", &["get"]),
        ("/v1/endpoints/{endpoint_id}/test", &["post"]),
        ("/v1/endpoints/{endpoint_id}/recover", &["post"]),
        ("/v1/deliveries", &["get"]),
        ("/v1/deliveries/{delivery_id}", &["get"]),
        ("/v1/deliveries/{delivery_id}/redeliver", &["post"]),
        ("/v1/accounts", &["post"]),
        ("/v1/accounts/{account_id}", &["get", "patch"]),
        ("/v1/accounts/{account_id}/keys", &["get", "post"]),
        ("/v1/accounts/{account_id}/keys/{prefix}", &["delete"]),
        ("/v1/api-keys", &["get"]),
        ("/v1/api-keys/{prefix}", &["delete"]),
    ] {
        let item = paths
            .get(path)
            .unwrap_or_else(|| panic!("{path} missing from the document"));
        for m in methods {
            assert!(item.get(*m).is_some(), "{m} {path} missing");
        }
    }
    assert_eq!(
        paths.len(),
        19,
        "every documented path is a route: {:?}",
        paths.keys().collect::<Vec<_>>()
    );
    assert!(doc.json["components"]["schemas"]["ErrorBody"].is_object());
    assert_eq!(api.get("/healthz").await.status, 200);
    assert_eq!(api.get("/readyz").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sends_reach_their_endpoint_whatever_it_subscribes_to() {
    let mut env = TestEnv::new().await;
    let api = env.start_api(ADMIN).await;
    env.start_dispatcher(&[]);
    let (_, owner) = account(&api, "Tester").await;
    let rx = Receiver::ok().await;
    let (id, _) = endpoint(&owner, &rx.url, json!(["invoice.paid"])).await;
    send_test(&owner, &id, "customer.created").await;
    assert_eq!(rx.requests()[0].json()["type"], "customer.created");

    assert_eq!(
        owner
            .patch(&format!("/v1/endpoints/{id}"), json!({ "enabled": false }))
            .await
            .status,
        200
    );
    let refused = owner
        .post(&format!("/v1/endpoints/{id}/test"), json!({ "type": "invoice.paid" }))
        .await;
    assert_eq!(
        (refused.status, refused.json["error"]["code"].as_str()),
        (409, Some("conflict"))
    );
}
