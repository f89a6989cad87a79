//! Nobody let in: endpoint URLs cannot reach the platform's own network in any disguise, at
//! registration or at connect time, unless the operator allows it; nothing secret leaks.

use laabam_shared::clock::now_ms;
use laabam_shared::delivery::{DeliveryStatus, Outcome};
use laabam_shared::ids::{AccountId, DeliveryId};
use laabam_tests::env::{new_endpoint, payment_failed};
use laabam_tests::{ApiClient, Receiver, TestEnv, wait_finished, wait_until};
use serde_json::json;
use std::time::Duration;

const ADMIN: &str = "security-operator";

async fn account(api: &ApiClient) -> ApiClient {
    api.new_account(ADMIN, "sec").await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_refuses_internal_targets_in_every_disguise() {
    let mut env = TestEnv::new().await;
    let strict = account(&env.start_api_with(ADMIN, &["--allow-private-targets", "false"]).await).await;
    for url in [
        "http://127.0.0.1:8080/hook",
        "http://2130706433/hook",
        "http://0x7f000001/hook",
        "http://0177.0.0.1/hook",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/",
        "http://10.1.2.3/hook",
        "http://192.168.0.10/hook",
        "http://100.64.1.1/hook",
        "http://localhost:8080/hook",
        "http://0.0.0.0/hook",
    ] {
        let answer = strict.post("/v1/endpoints", json!({ "url": url })).await;
        assert_eq!(answer.status, 422, "{url}: {:?}", answer.json);
        assert_eq!(answer.json["error"]["field"], "url", "{url}");
        assert!(
            answer.json["error"]["message"]
                .as_str()
                .unwrap()
                .contains("not a public address"),
            "{url}: {:?}",
            answer.json
        );
    }

    let listed = account(
        &env.start_api_with(
            ADMIN,
            &[
                "--allow-private-targets",
                "false",
                "--allowed-targets",
                "127.0.0.0/8,fd00::/8",
            ],
        )
        .await,
    )
    .await;
    assert_eq!(
        listed
            .post("/v1/endpoints", json!({ "url": "http://127.0.0.1:9/hook" }))
            .await
            .status,
        201
    );
    assert_eq!(
        listed
            .post("/v1/endpoints", json!({ "url": "http://10.1.2.3/hook" }))
            .await
            .status,
        422
    );

    let https_only = account(&env.start_api_with(ADMIN, &["--require-https", "true"]).await).await;
    let plain = https_only
        .post("/v1/endpoints", json!({ "url": "http://example.com/hook" }))
        .await;
    assert_eq!(
        (plain.status, plain.json["error"]["field"].as_str()),
        (422, Some("url"))
    );
    assert!(
        plain.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("LAABAM_REQUIRE_HTTPS")
    );
    assert_eq!(
        https_only
            .post("/v1/endpoints", json!({ "url": "https://127.0.0.1:9/hook" }))
            .await
            .status,
        201
    );
}

async fn deliver_to(
    env: &mut TestEnv,
    url: &str,
    flags: &[&str],
) -> (
    laabam_shared::delivery::DeliveryState,
    Vec<laabam_shared::delivery::AttemptRecord>,
) {
    // Stored directly, as a record written before the guard existed would be: only the
    // connect-time check stands between it and the address.
    let ep = new_endpoint("acct_sec", url, None);
    let store = env.store().await;
    store.create_endpoint(&ep, None).await.unwrap();
    env.start_dispatcher(flags);
    let event = payment_failed(&AccountId::parse("acct_sec").unwrap(), 0, now_ms());
    env.publisher().await.publish(&event).await.unwrap();
    let id = DeliveryId::for_pair(&event.id, &ep.id);
    wait_finished(&store, &id).await;
    (
        store.delivery(&id).await.unwrap().unwrap(),
        store.attempts(&id).await.unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dispatcher_refuses_disguised_loopback_at_connect_time() {
    let mut env = TestEnv::new().await;
    let rx = Receiver::ok().await;
    let port = rx.url.split(':').nth(2).unwrap().split('/').next().unwrap().to_owned();
    let (state, attempts) = deliver_to(
        &mut env,
        &format!("http://2130706433:{port}/hook"),
        &["--allow-private-targets", "false", "--retry-max-attempts", "1"],
    )
    .await;
    assert_eq!(state.status, DeliveryStatus::Failed);
    assert_eq!(attempts[0].outcome, Outcome::ConnectError);
    assert!(
        attempts[0].error.as_deref().unwrap().contains("not a public address"),
        "{attempts:?}"
    );
    assert_eq!(rx.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_range_is_reachable_at_connect_time() {
    let mut env = TestEnv::new().await;
    let rx = Receiver::ok().await;
    let port = rx.url.split(':').nth(2).unwrap().split('/').next().unwrap().to_owned();
    let (state, _) = deliver_to(
        &mut env,
        &format!("http://0x7f000001:{port}/hook"),
        &["--allow-private-targets", "false", "--allowed-targets", "127.0.0.0/8"],
    )
    .await;
    assert_eq!(state.status, DeliveryStatus::Succeeded);
    assert_eq!(rx.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_and_keys_never_appear_in_metrics_or_errors() {
    let mut env = TestEnv::new().await;
    let api = env.start_api(ADMIN).await;
    let client = account(&api).await;
    let rx = Receiver::ok().await;
    env.start_dispatcher(&[]);
    let created = client.post("/v1/endpoints", json!({ "url": rx.url })).await;
    let secret = created.json["secret"].as_str().unwrap().to_owned();
    assert_eq!(
        client
            .post(
                "/v1/events",
                json!({ "type": "payment.failed", "data": { "payment_id": "p", "reason": "r" } })
            )
            .await
            .status,
        202
    );
    wait_until("delivered", Duration::from_secs(20), || async { rx.count() == 1 }).await;

    // Prometheus text, not JSON: read as plain text.
    let text = env.api_metrics().await;
    assert!(text.contains("laabam_dispatcher_attempts_total"));
    // They are the operator's (event volumes of every account): the public API does not serve
    // them, to callers with or without a key.
    assert_eq!(api.get("/metrics").await.status, 404);
    assert_eq!(client.get("/metrics").await.status, 404);
    for forbidden in ["whsec_", "lbk_", &secret[6..]] {
        assert!(!text.contains(forbidden), "metrics contain {forbidden}");
    }
    // Errors never echo credentials back.
    let wrong = api.with_token("lbk_wrong-key-123").get("/v1/endpoints").await;
    assert!(!wrong.json.to_string().contains("wrong-key-123"));
    let wrong_admin = api
        .with_token("not-the-operator-token")
        .post("/v1/accounts", json!({ "name": "x" }))
        .await;
    assert!(
        !wrong_admin.json.to_string().contains("not-the-operator-token")
            && !wrong_admin.json.to_string().contains(ADMIN)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_secrets_are_sealed_at_rest_and_survive_a_key_rotation() {
    use laabam_shared::sealing::SecretSealer;
    let mut env = TestEnv::new().await;
    let (old_key, new_key) = (SecretSealer::generate_key(), SecretSealer::generate_key());
    let rx = Receiver::ok().await;
    let sealed_store = env.store_sealed(Some(&old_key), None).await;
    let ep = new_endpoint("acct_sealed", &rx.url, None);
    sealed_store.create_endpoint(&ep, None).await.unwrap();
    let (redis_url, key, field) = (
        env.redis_url.clone(),
        format!("{}acct:acct_sealed:eps", env.prefix),
        ep.id.to_string(),
    );
    let raw = move || {
        let mut conn = redis::Client::open(redis_url.as_str())
            .unwrap()
            .get_connection()
            .unwrap();
        redis::Commands::hget::<_, _, String>(&mut conn, &key, &field).unwrap()
    };
    let stored = raw();
    assert!(
        stored.contains("enc:v1:") && !stored.contains("whsec_"),
        "sealed in Redis: {stored}"
    );
    assert!(
        env.store().await.get_endpoint(&ep.id).await.is_err(),
        "unreadable without the key"
    );

    // A dispatcher with the key signs with the real secret.
    env.start_dispatcher(&["--secret-key", &old_key]);
    let account = AccountId::parse("acct_sealed").unwrap();
    let publish = |n: usize| payment_failed(&account, n, now_ms());
    let publisher = env.publisher().await;
    publisher.publish(&publish(1)).await.unwrap();
    wait_until("delivered", Duration::from_secs(20), || async { rx.count() == 1 }).await;
    let req = &rx.requests()[0];
    assert!(req.verifies(&ep.secret));

    // Rotate: new key, old as previous; re-encrypt; then only the new key is needed.
    let mut flags = env.connection_flags();
    flags.extend([
        "--secret-key".into(),
        new_key.clone(),
        "--secret-key-previous".into(),
        old_key.clone(),
        "secrets".into(),
        "reencrypt".into(),
    ]);
    let out = std::process::Command::new(laabam_tests::env::binary("laabam-producer"))
        .args(&flags)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["endpoints"],
        1
    );
    let resealed = raw();
    assert_ne!(resealed, stored);
    let new_only = env.store_sealed(Some(&new_key), None).await;
    assert_eq!(new_only.get_endpoint(&ep.id).await.unwrap().unwrap().secret, ep.secret);
    env.start_dispatcher(&["--secret-key", &new_key]);
    publisher.publish(&publish(2)).await.unwrap();
    publisher.publish(&publish(3)).await.unwrap();
    wait_until("delivered after rotation", Duration::from_secs(20), || async {
        rx.count() >= 3
    })
    .await;
}
