//! Two dispatchers and two schedulers deliver a burst with injected failures: nothing lost,
//! and every (event, endpoint) pair gets exactly the attempts its failures call for.

use laabam_shared::delivery::DeliveryStatus;
use laabam_shared::ids::AccountId;
use laabam_shared::store::DeliveryFilter;
use laabam_tests::env::{new_endpoint, publish_all, sample_events};
use laabam_tests::{Receiver, Reply, TestEnv, wait_until};
use std::time::Duration;

const EVENTS: usize = 2000;
const ENDPOINTS: usize = 4;

/// How many times endpoint `i` fails event `id` before answering 200 (0, 1 or 2).
fn injected_failures(id: &str, i: usize) -> usize {
    let h = id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    ((h >> (8 * i)) % 3) as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dispatchers_and_two_schedulers_lose_nothing_and_attempt_exactly_as_needed() {
    let mut env = TestEnv::new().await;
    let mut receivers = Vec::new();
    for i in 0..ENDPOINTS {
        let rx = Receiver::start(move |req, nth| {
            if nth < injected_failures(req.header("webhook-id"), i) {
                Reply::Status(500)
            } else {
                Reply::Status(200)
            }
        })
        .await;
        env.endpoint("acct_burst", &rx.url, None).await;
        receivers.push(rx);
    }
    for _ in 0..2 {
        env.start_dispatcher(&["--retry-max-attempts", "5", "--retry-max-delay", "200ms"]);
        env.start_scheduler(&[]);
    }
    let publisher = env.publisher().await;
    let events = sample_events("acct_burst", EVENTS);
    publish_all(&publisher, &events).await;

    let expected_requests: Vec<usize> = (0..ENDPOINTS)
        .map(|i| events.iter().map(|e| injected_failures(e.id.as_str(), i) + 1).sum())
        .collect();
    for (i, rx) in receivers.iter().enumerate() {
        wait_until(
            &format!("all attempts at endpoint {i}"),
            Duration::from_secs(120),
            || async { rx.count() >= expected_requests[i] },
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (i, rx) in receivers.iter().enumerate() {
        let per_event = rx.per_event();
        assert_eq!(per_event.len(), EVENTS, "endpoint {i} got every event");
        for e in &events {
            let expected = injected_failures(e.id.as_str(), i) + 1;
            assert_eq!(
                per_event.get(e.id.as_str()).copied(),
                Some(expected),
                "endpoint {i}, event {}",
                e.id
            );
        }
        assert_eq!(rx.count(), expected_requests[i]);
    }
    assert_eq!(
        env.store().await.retry_backlog().await.unwrap(),
        0,
        "nothing left to retry"
    );
}

/// One event to 4,100 endpoints: one arrival script (12,304 keys) begins every delivery, and
/// the attempts take turns on the in-flight bound instead of opening 4,100 requests at once.
/// Their leases last through the turns ahead of them, so the scheduler re-queues none of the
/// waiting ones: each endpoint gets exactly one request, and every delivery is listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_wider_than_the_in_flight_bound_stays_within_it_and_reaches_each_once() {
    const WIDE: usize = 4_100;
    const BOUND: usize = 64;
    let mut env = TestEnv::new().await;
    // Held long enough that the turns (WIDE / BOUND of them) outlast one lease (3 s in tests).
    let rx = Receiver::start(|_, _| Reply::After(Duration::from_millis(100), 200)).await;
    let store = env.store().await;
    let account = AccountId::parse("acct_wide").unwrap();
    for _ in 0..WIDE {
        let ep = new_endpoint(account.as_str(), &rx.url, None);
        store.create_endpoint(&ep, None).await.unwrap();
    }
    env.start_dispatcher(&["--max-in-flight", &BOUND.to_string()]);
    env.start_scheduler(&[]);
    let events = sample_events("acct_wide", 1);
    publish_all(&env.publisher().await, &events).await;

    wait_until("every endpoint's delivery", Duration::from_secs(90), || async {
        rx.count() >= WIDE
    })
    .await;
    let listed = || async {
        store
            .list_deliveries(&account, &DeliveryFilter::default(), None, WIDE + 1)
            .await
            .unwrap()
            .items
    };
    wait_until("every delivery recorded", Duration::from_secs(30), || async {
        listed().await.iter().all(|d| d.status == DeliveryStatus::Succeeded)
    })
    .await;
    assert!(
        rx.peak_concurrency() <= BOUND,
        "{} requests at once, over the bound of {BOUND}",
        rx.peak_concurrency()
    );
    assert_eq!(rx.count(), WIDE, "one request per endpoint");
    assert_eq!(listed().await.len(), WIDE);
    assert_eq!(store.retry_backlog().await.unwrap(), 0, "no lease left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_for_an_endpoint_this_dispatcher_has_not_seen_is_waited_for_not_deferred() {
    const EVENTS: usize = 150;
    let mut env = TestEnv::new().await;
    // Slow enough that every one of the endpoint's 16 slots is taken before any is released.
    let rx = Receiver::start(|_, _| Reply::After(Duration::from_millis(5), 200)).await;
    env.endpoint("acct_backlog", &rx.url, None).await;
    publish_all(&env.publisher().await, &sample_events("acct_backlog", EVENTS)).await;
    // A dispatcher starting on a backlog (a deploy, a restart) knows none of its endpoints, and
    // no scheduler runs: a delivery deferred to the retry set would never come back. A slot
    // wait of 2 s gives the first answer a grace of 250 ms, which a loaded machine still meets.
    env.start_dispatcher(&["--slot-wait", "2s"]);
    wait_until("the whole backlog delivered", Duration::from_secs(30), || async {
        rx.count() >= EVENTS
    })
    .await;
    let store = env.store().await;
    wait_until("every lease released", Duration::from_secs(10), || async {
        store.retry_backlog().await.unwrap() == 0
    })
    .await;
    assert_eq!(rx.count(), EVENTS, "one request per event");
}
