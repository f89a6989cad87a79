//! Arrivals waiting for company (the dispatcher's `LAABAM_ARRIVAL_LINGER`). A test binary of its
//! own: it reads the process-wide count of arrivals per Redis call, which other tests would move.

use laabam_shared::clock::now_ms;
use laabam_shared::ids::AccountId;
use laabam_shared::store::{ARRIVALS_PER_CALL, Ingest, Store, StoreConfig};
use laabam_tests::TestEnv;
use laabam_tests::deliveries::{leased_begins, quiet_endpoints};
use laabam_tests::env::invoice_paid;
use std::time::Duration;

/// Five arrivals 10 ms apart: told to wait up to 2 s for company, they share one call; sent at
/// once (the default), they do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arrivals_share_a_call_when_told_to_wait_for_company() {
    let env = TestEnv::new().await;
    let waiting = TestEnv::connect_store(&StoreConfig {
        arrival_linger: Duration::from_secs(2),
        ..env.store_config()
    })
    .await;
    assert_eq!(calls_for_five_spaced_arrivals(&waiting, "acct_waits").await, 1);
    let at_once = env.store().await;
    let calls = calls_for_five_spaced_arrivals(&at_once, "acct_at_once").await;
    assert!(
        calls > 1,
        "five arrivals 10 ms apart went in {calls} call without a linger"
    );
}

/// The calls five arrivals, each begun 10 ms after the one before, took.
async fn calls_for_five_spaced_arrivals(store: &Store, account: &str) -> u64 {
    let account = AccountId::parse(account).unwrap();
    let endpoints = quiet_endpoints(store, &account, 1).await;
    let now = now_ms();
    let (calls_before, sent_before) = (ARRIVALS_PER_CALL.get_sample_count(), ARRIVALS_PER_CALL.get_sample_sum());
    let mut arrivals = Vec::new();
    for i in 0..5 {
        let event = invoice_paid(&account, i, now + i as i64);
        let begins = leased_begins(&event, &endpoints.endpoints, i * 3, now + 30_000);
        let (store, version) = (store.clone(), endpoints.version);
        arrivals.push(tokio::spawn(async move {
            store.ingest(&event, &event.to_json(), version, &begins, now).await
        }));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for arrival in arrivals {
        let answer = arrival.await.unwrap().unwrap();
        assert!(matches!(answer, Ingest::Begun { .. }), "{answer:?}");
    }
    assert_eq!(ARRIVALS_PER_CALL.get_sample_sum() - sent_before, 5.0);
    ARRIVALS_PER_CALL.get_sample_count() - calls_before
}
