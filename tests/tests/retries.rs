//! Failed attempts are retried by backoff until they succeed or the policy gives up; each
//! endpoint's outcome is its own.

use futures_util::future::join_all;
use laabam_producer::Publisher;
use laabam_shared::clock::now_ms;
use laabam_shared::delivery::{AttemptRecord, DeliveryState, DeliveryStatus, Outcome, RetryJob};
use laabam_shared::endpoint::{Endpoint, EndpointPatch};
use laabam_shared::envelope::Envelope;
use laabam_shared::ids::{AccountId, DeliveryId};
use laabam_shared::store::{AttemptTiming, Begin, Ingest, Record, Store, Taken};
use laabam_tests::deliveries::{
    Success, begin_events, begin_events_together, first_attempt, leased_begins, quiet_endpoints,
};
use laabam_tests::env::{payment_failed, publish_all, sample_events};
use laabam_tests::{Receiver, Reply, TestEnv, wait_until};
use std::cell::Cell;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

fn invoice_paid(n: usize) -> Envelope {
    laabam_tests::env::invoice_paid(&AccountId::parse("acct_a").unwrap(), n, now_ms())
}

async fn wait_status(store: &Store, event: &Envelope, ep: &Endpoint, status: DeliveryStatus) {
    let id = DeliveryId::for_pair(&event.id, &ep.id);
    wait_until(&format!("delivery {id} {}", status.as_str()), WAIT, || async {
        store.delivery(&id).await.unwrap().is_some_and(|d| d.status == status)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_500_then_a_timeout_then_200_arrives_on_attempt_three_with_the_same_id() {
    let mut env = TestEnv::new().await;
    let rx = Receiver::start(|_, nth| match nth {
        0 => Reply::Status(500),
        1 => Reply::After(Duration::from_secs(3), 200),
        _ => Reply::Status(200),
    })
    .await;
    let ep = env.endpoint("acct_a", &rx.url, None).await;
    env.start_dispatcher(&["--http-timeout", "500ms"]);
    env.start_scheduler(&[]);
    let event = invoice_paid(1);
    env.publisher().await.publish(&event).await.unwrap();

    let store = env.store().await;
    wait_status(&store, &event, &ep, DeliveryStatus::Succeeded).await;
    let requests = rx.requests();
    assert_eq!(requests.len(), 3);
    assert!(requests.iter().all(|r| r.header("webhook-id") == event.id.as_str()));
    assert!(requests.iter().all(|r| r.body == event.to_json()));
    let attempts_header: Vec<_> = requests
        .iter()
        .map(|r| r.header("x-laabam-attempt").to_owned())
        .collect();
    assert_eq!(attempts_header, ["1", "2", "3"]);

    let delivery = DeliveryId::for_pair(&event.id, &ep.id);
    let attempts = store.attempts(&delivery).await.unwrap();
    let outcomes: Vec<_> = attempts.iter().map(|a| a.outcome).collect();
    assert_eq!(outcomes, [Outcome::Http5xx, Outcome::Timeout, Outcome::Success]);
    assert_eq!(attempts[0].status_code, Some(500));
    assert_eq!(attempts[0].response_excerpt.as_deref(), Some("answered 500"));
    assert!(attempts[1].error.as_deref().unwrap().contains("no complete response"));
    assert_eq!(attempts[2].status_code, Some(200));
    assert!(
        attempts.windows(2).all(|w| w[1].at_ms >= w[0].at_ms + 80),
        "backoff between attempts: {attempts:?}"
    );
    let state = store.delivery(&delivery).await.unwrap().unwrap();
    assert_eq!(state.attempts, 3);
    assert_eq!(state.first_attempt_ms, Some(attempts[0].at_ms));
}

/// A record from a lease that is no longer current (an attempt that outlived its lease, or no
/// lease at all) adds nothing to the state: the finished delivery keeps its outcome. Its
/// attempt is still logged, beside the one that counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_without_the_current_lease_cannot_undo_the_outcome() {
    let mut env = TestEnv::new().await;
    let rx = Receiver::ok().await;
    let ep = env.endpoint("acct_a", &rx.url, None).await;
    env.start_dispatcher(&[]);
    let event = invoice_paid(1);
    env.publisher().await.publish(&event).await.unwrap();
    let store = env.store().await;
    wait_status(&store, &event, &ep, DeliveryStatus::Succeeded).await;

    let job = RetryJob {
        delivery: DeliveryId::for_pair(&event.id, &ep.id),
        event: event.id.clone(),
        endpoint: ep.id.clone(),
        account: ep.account_id.clone(),
    };
    // The released lease is stored empty; neither an old token nor an empty one holds it.
    for lease in ["00000000deadbeef", ""] {
        let recorded = store
            .record(&Record {
                job: &job,
                lease,
                attempt: None,
                status: DeliveryStatus::Failed,
                attempts: 9,
                first_attempt_ms: None,
                next_attempt_ms: None,
                reason: Some("a late record"),
                timing: None,
            })
            .await
            .unwrap();
        assert!(!recorded.applied, "lease {lease:?} was taken as current");
    }
    let late = AttemptRecord {
        attempt: 1,
        at_ms: now_ms(),
        outcome: Outcome::Timeout,
        status_code: None,
        duration_ms: 30_000,
        error: Some("no complete response within 30s".into()),
        response_excerpt: None,
    };
    let late_record = |job| Record {
        job,
        lease: "00000000deadbeef",
        attempt: Some(&late),
        status: DeliveryStatus::Retrying,
        attempts: 1,
        first_attempt_ms: Some(late.at_ms),
        next_attempt_ms: Some(now_ms() + 60_000),
        reason: None,
        timing: Some(AttemptTiming {
            outcome: late.outcome.as_str(),
            duration_ms: late.duration_ms,
            status_code: None,
            at_ms: late.at_ms,
        }),
    };
    assert!(!store.record(&late_record(&job)).await.unwrap().applied);

    let state = store.delivery(&job.delivery).await.unwrap().unwrap();
    assert_eq!(state.status, DeliveryStatus::Succeeded);
    assert_eq!(state.attempts, 1);
    assert_eq!(state.reason, None);
    assert_eq!(state.next_attempt_ms, None);
    let log = store.attempts(&job.delivery).await.unwrap();
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(log[0].outcome, Outcome::Success);
    assert_eq!(log[1], late);

    // Attempts logged before the log moved into the state hash are read first; the newest
    // 100 are kept.
    let mut conn = redis::Client::open(env.redis_url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let legacy = serde_json::to_string(&AttemptRecord {
        outcome: Outcome::Http5xx,
        status_code: Some(500),
        ..late.clone()
    })
    .unwrap();
    let legacy_key = store.keys().legacy_attempts(&job.delivery);
    redis::cmd("RPUSH")
        .arg(&legacy_key)
        .arg(legacy)
        .exec(&mut conn)
        .unwrap();
    let log = store.attempts(&job.delivery).await.unwrap();
    let outcomes: Vec<_> = log.iter().map(|a| a.outcome).collect();
    assert_eq!(outcomes, [Outcome::Http5xx, Outcome::Success, Outcome::Timeout]);
    redis::cmd("DEL").arg(&legacy_key).exec(&mut conn).unwrap();
    for _ in 0..100 {
        store.record(&late_record(&job)).await.unwrap();
    }
    let log = store.attempts(&job.delivery).await.unwrap();
    assert_eq!(log.len(), 100);
    assert!(log.iter().all(|a| *a == late), "the oldest two were dropped");

    // A late attempt for a delivery that no longer exists does not bring it back.
    let gone = RetryJob {
        delivery: DeliveryId::for_pair(&invoice_paid(99).id, &ep.id),
        ..job.clone()
    };
    assert!(!store.record(&late_record(&gone)).await.unwrap().applied);
    assert!(store.delivery(&gone.delivery).await.unwrap().is_none());
    assert!(store.attempts(&gone.delivery).await.unwrap().is_empty());
}

/// Records made at the same moment reach Redis together (one script call carries every record
/// waiting), and each caller gets its own answer: here every third carries a stale lease, so
/// only the others move their delivery on, while every attempt is logged and counted once.
#[tokio::test]
async fn records_made_together_each_get_their_own_answer() {
    let env = TestEnv::new().await;
    let store = env.store().await;
    let account = AccountId::parse("acct_together").unwrap();
    let endpoints = quiet_endpoints(&store, &account, 4).await;
    let now = now_ms();
    let begins = begin_events(&store, &endpoints, now, 0..60).await;
    let success = Success::at(now);
    let stale = |i: usize| i.is_multiple_of(3);
    let records: Vec<Record> = begins
        .iter()
        .enumerate()
        .map(|(i, b)| Record {
            lease: if stale(i) {
                "00000000deadbeef"
            } else {
                b.lease.as_deref().unwrap()
            },
            ..success.record(b)
        })
        .collect();
    let answers = join_all(records.iter().map(|r| store.record(r))).await;

    for (i, (begin, answer)) in begins.iter().zip(answers).enumerate() {
        assert_eq!(answer.unwrap().applied, !stale(i), "record {i}");
        let state = store.delivery(&begin.job.delivery).await.unwrap().unwrap();
        let expected = if stale(i) {
            DeliveryStatus::Pending
        } else {
            DeliveryStatus::Succeeded
        };
        assert_eq!(state.status, expected, "delivery {i}");
        assert_eq!(
            store.attempts(&begin.job.delivery).await.unwrap().len(),
            1,
            "delivery {i}"
        );
    }
    for ep in &endpoints.endpoints {
        let day = store.endpoint_day(&ep.id, now).await.unwrap();
        assert_eq!(day.attempts, 60, "each of the endpoint's attempts counted once");
    }
}

/// Records of one endpoint that share a call write its statistics and health once, after them
/// all; what they leave and what each caller hears must be what one record at a time gives.
/// Records made at once reach Redis in the order made, so a model applying them one by one
/// tells what each must hear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_one_endpoint_made_together_leave_its_health_as_one_at_a_time_would() {
    let env = TestEnv::new().await;
    let store = env.store().await;
    let account = AccountId::parse("acct_one_endpoint").unwrap();
    let endpoints = quiet_endpoints(&store, &account, 1).await;
    let endpoint = &endpoints.endpoints[0].id;
    let now = now_ms();
    // Failures (F) in streaks, broken by successes (S), each attempt at its own time.
    let pattern = b"FFSFFFSSFFFFFSFSFFSSSFFFFFFSFF";
    let begins = begin_events(&store, &endpoints, now, 0..pattern.len()).await;
    let attempts: Vec<AttemptRecord> = pattern
        .iter()
        .enumerate()
        .map(|(i, kind)| {
            let (outcome, code) = if *kind == b'S' {
                (Outcome::Success, 200)
            } else {
                (Outcome::Http5xx, 503)
            };
            AttemptRecord {
                attempt: 1,
                at_ms: now + i as i64,
                outcome,
                status_code: Some(code),
                duration_ms: 40,
                error: None,
                response_excerpt: None,
            }
        })
        .collect();
    let records: Vec<Record> = begins
        .iter()
        .zip(&attempts)
        .map(|(b, a)| match a.outcome {
            Outcome::Success => first_attempt(b, a, DeliveryStatus::Succeeded, None),
            _ => first_attempt(b, a, DeliveryStatus::Retrying, Some(now + 60_000)),
        })
        .collect();
    let answers = join_all(records.iter().map(|r| store.record(r))).await;

    let mut streak = None;
    for (i, (attempt, answer)) in attempts.iter().zip(answers).enumerate() {
        streak = match attempt.outcome {
            Outcome::Success => None,
            _ => streak.or(Some(attempt.at_ms)),
        };
        assert_eq!(answer.unwrap().failing_since_ms, streak, "record {i}");
    }
    let health = store.endpoint_health(endpoint).await.unwrap();
    assert_eq!(health.failing_since_ms, streak);
    let last = attempts.last().unwrap();
    let shown = health.last_delivery.expect("a last delivery");
    assert_eq!(
        (
            shown.delivery_id.as_str(),
            shown.at_ms,
            shown.outcome.as_str(),
            shown.status_code
        ),
        (
            begins.last().unwrap().job.delivery.as_str(),
            last.at_ms,
            last.outcome.as_str(),
            last.status_code
        ),
        "the last delivery's fields all come from the last record"
    );
    let last_success = attempts.iter().rev().find(|a| a.outcome.is_success());
    assert_eq!(health.last_success_ms, last_success.map(|a| a.at_ms));

    // Every attempt counted once by its outcome, in buckets that expire.
    let day = store.endpoint_day(endpoint, now + 100).await.unwrap();
    let successes = pattern.iter().filter(|k| **k == b'S').count() as u64;
    assert_eq!(day.attempts, pattern.len() as u64);
    assert_eq!(day.counts.get(Outcome::Success.as_str()), Some(&successes));
    assert_eq!(
        day.counts.get(Outcome::Http5xx.as_str()),
        Some(&(pattern.len() as u64 - successes))
    );
    let keys = store.keys();
    let mut conn = env.redis().await;
    for bucket in [
        keys.endpoint_stats(endpoint, "5m", now / 300_000),
        keys.endpoint_stats(endpoint, "1h", now / 3_600_000),
    ] {
        let ttl: i64 = redis::cmd("TTL").arg(&bucket).query_async(&mut conn).await.unwrap();
        assert!(ttl > 3600, "{bucket} expires: TTL {ttl}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_always_failing_endpoint_ends_failed_and_its_sibling_gets_the_event_once() {
    let mut env = TestEnv::new().await;
    let failing = Receiver::start(|_, _| Reply::Status(503)).await;
    let healthy = Receiver::ok().await;
    let ep_failing = env.endpoint("acct_a", &failing.url, None).await;
    let ep_healthy = env.endpoint("acct_a", &healthy.url, None).await;
    env.start_dispatcher(&["--retry-max-attempts", "4"]);
    env.start_scheduler(&[]);
    let event = invoice_paid(2);
    env.publisher().await.publish(&event).await.unwrap();

    let store = env.store().await;
    wait_status(&store, &event, &ep_failing, DeliveryStatus::Failed).await;
    wait_status(&store, &event, &ep_healthy, DeliveryStatus::Succeeded).await;
    assert_eq!(failing.count(), 4, "every attempt of the policy, no more");
    assert_eq!(
        healthy.count(),
        1,
        "the sibling was not re-delivered by the other's retries"
    );
    let state = store
        .delivery(&DeliveryId::for_pair(&event.id, &ep_failing.id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.attempts, 4);
    assert_eq!(state.reason.as_deref(), Some("gave up after 4 attempts"));
    assert_eq!(state.next_attempt_ms, None);
    // Nothing of it remains in the retry set.
    assert_eq!(store.retry_backlog().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_disables_the_endpoint_and_stops_delivery() {
    let mut env = TestEnv::new().await;
    let gone = Receiver::start(|_, _| Reply::Status(410)).await;
    let healthy = Receiver::ok().await;
    let ep_gone = env.endpoint("acct_a", &gone.url, None).await;
    env.endpoint("acct_a", &healthy.url, None).await;
    env.start_dispatcher(&[]);
    env.start_scheduler(&[]);
    let publisher = env.publisher().await;
    let first = invoice_paid(3);
    publisher.publish(&first).await.unwrap();
    let store = env.store().await;
    wait_status(&store, &first, &ep_gone, DeliveryStatus::Failed).await;
    let ep = store.get_endpoint(&ep_gone.id).await.unwrap().unwrap();
    assert!(!ep.enabled);
    assert_eq!(ep.disabled_reason.as_deref(), Some("endpoint answered 410 Gone"));

    let second = invoice_paid(4);
    publisher.publish(&second).await.unwrap();
    wait_until("second event at the healthy endpoint", WAIT, || async {
        healthy.per_event().contains_key(second.id.as_str())
    })
    .await;
    wait_until("the healthy endpoint was told", WAIT, || async {
        healthy
            .requests()
            .iter()
            .any(|r| r.json()["type"] == "endpoint.disabled" && r.json()["data"]["endpoint_id"] == ep_gone.id.as_str())
    })
    .await;
    assert_eq!(gone.count(), 1, "no attempt after 410");
}

/// `Retry-After` in either form sets the next attempt's delay: 1 s as seconds on a 429, and on
/// a 503 an HTTP-date 2 s ahead (whole seconds, so between 1 and 2 s from the answer), where
/// backoff alone would retry after about 100 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_as_seconds_and_as_a_date() {
    let mut env = TestEnv::new().await;
    let (seconds, date) = (invoice_paid(5), invoice_paid(6));
    let date_id = date.id.to_string();
    let rx = Receiver::start(move |req, nth| match nth {
        0 if req.header("webhook-id") == date_id => Reply::RetryAfterDate(503, 2),
        0 => Reply::RetryAfter(429, 1),
        _ => Reply::Status(200),
    })
    .await;
    let ep = env.endpoint("acct_a", &rx.url, None).await;
    env.start_dispatcher(&["--retry-max-delay", "5s"]);
    env.start_scheduler(&[]);
    let publisher = env.publisher().await;
    let store = env.store().await;
    for (event, status) in [(&seconds, 429), (&date, 503)] {
        publisher.publish(event).await.unwrap();
        wait_status(&store, event, &ep, DeliveryStatus::Succeeded).await;
        let attempts = store.attempts(&DeliveryId::for_pair(&event.id, &ep.id)).await.unwrap();
        assert_eq!(attempts[0].status_code, Some(status));
        assert_eq!(attempts.len(), 2);
        let gap = attempts[1].at_ms - attempts[0].at_ms;
        assert!(
            gap >= 1000,
            "waited {gap} ms after a {status}; Retry-After asked for at least 1 s where backoff alone gives ~100 ms"
        );
    }
}

/// An endpoint of `acct_a` that takes one request at a time.
async fn serial_endpoint(store: &Store, url: &str) -> Endpoint {
    let ep = Endpoint::create(
        AccountId::parse("acct_a").unwrap(),
        laabam_shared::endpoint::NewEndpoint {
            url: url.to_owned(),
            max_concurrency: Some(1),
            ..Default::default()
        },
        now_ms(),
    )
    .unwrap();
    store.create_endpoint(&ep, None).await.unwrap();
    ep
}

/// The states of the deliveries of `events` to `ep` that have begun.
async fn states_of(store: &Store, ep: &Endpoint, events: &[Envelope]) -> Vec<DeliveryState> {
    let ids: Vec<_> = events.iter().map(|e| DeliveryId::for_pair(&e.id, &ep.id)).collect();
    store.deliveries(&ids).await.unwrap().into_iter().flatten().collect()
}

/// How many deliveries of `events` to `ep` are in `status`.
async fn counted(store: &Store, ep: &Endpoint, events: &[Envelope], status: DeliveryStatus) -> usize {
    let states = states_of(store, ep, events).await;
    states.iter().filter(|d| d.status == status).count()
}

/// Publishes `events` and, once any of their deliveries to `ep` is deferred, says how long after
/// publishing each one deferred then is due.
async fn deferrals_due(publisher: &Publisher, store: &Store, ep: &Endpoint, events: &[Envelope]) -> Vec<i64> {
    let published_ms = now_ms();
    publish_all(publisher, events).await;
    let due = Cell::new(Vec::new());
    wait_until("a delivery deferred", WAIT, || async {
        let states = states_of(store, ep, events).await;
        let deferred = states.iter().filter(|d| d.status == DeliveryStatus::Retrying);
        let due_ms: Vec<i64> = deferred.filter_map(|d| d.next_attempt_ms).collect();
        let any = !due_ms.is_empty();
        due.set(due_ms);
        any
    })
    .await;
    let after: Vec<i64> = due.take().into_iter().map(|d| d - published_ms).collect();
    println!("deferrals due {after:?} ms after their events were published");
    after
}

/// An endpoint's `max_concurrency` holds for the deployment: with two dispatchers each taking
/// its turn of the events, a serial endpoint still gets one request at a time, where each
/// dispatcher used to send it one of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serial_endpoint_gets_one_request_at_a_time_from_two_dispatchers() {
    let mut env = TestEnv::new().await;
    let slow = Receiver::start(|_, _| Reply::After(Duration::from_millis(150), 200)).await;
    let store = env.store().await;
    let ep = serial_endpoint(&store, &slow.url).await;
    env.start_scheduler(&[]);
    env.start_dispatchers_together(2, &[]).await;
    let events: Vec<_> = (0..12).map(invoice_paid).collect();
    publish_all(&env.publisher().await, &events).await;
    for e in &events {
        wait_status(&store, e, &ep, DeliveryStatus::Succeeded).await;
    }
    let requests = slow.requests();
    let span = requests[requests.len() - 1].at - requests[0].at;
    println!("12 requests of 150 ms over {span:?}");
    assert_eq!(slow.peak_concurrency(), 1, "one request at a time from both");
    assert_eq!(slow.count(), 12, "each event once");
    let places: usize = redis::AsyncCommands::zcard(&mut env.redis().await, store.keys().endpoint_requests(&ep.id))
        .await
        .unwrap();
    assert_eq!(places, 0, "every place given back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serial_endpoint_gets_one_request_at_a_time_and_deferrals_are_not_attempts() {
    let mut env = TestEnv::new().await;
    let slow = Receiver::start(|_, _| Reply::After(Duration::from_millis(150), 200)).await;
    let store = env.store().await;
    let ep = serial_endpoint(&store, &slow.url).await;
    env.start_dispatcher(&[]);
    env.start_scheduler(&[]);
    let publisher = env.publisher().await;
    let events: Vec<_> = (0..6).map(invoice_paid).collect();
    for e in &events {
        publisher.publish(e).await.unwrap();
    }
    for e in &events {
        wait_status(&store, e, &ep, DeliveryStatus::Succeeded).await;
    }
    assert_eq!(slow.peak_concurrency(), 1);
    assert_eq!(slow.count(), 6);
    for e in &events {
        let attempts = store.attempts(&DeliveryId::for_pair(&e.id, &ep.id)).await.unwrap();
        assert_eq!(attempts.len(), 1, "a deferral is not an attempt");
        assert_eq!(attempts[0].attempt, 1);
    }
}

/// Deliveries deferred for an endpoint that is disabled before they come back fail then. They
/// must stop counting as ahead of its next deferrals all the same: they did not, and once the
/// endpoint was enabled again its next deferrals were spread a slot hold further for each of
/// them (up to five minutes), though none was ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferrals_that_find_their_endpoint_disabled_do_not_delay_its_next_ones() {
    const DEFERRED: usize = 5;
    let mut env = TestEnv::new().await;
    let slow = Receiver::start(|_, _| Reply::After(Duration::from_secs(1), 200)).await;
    let store = env.store().await;
    let ep = serial_endpoint(&store, &slow.url).await;
    // A 50 ms slot wait stretches to 400 ms at most, so the 1 s endpoint is slow: a delivery
    // that finds its one slot held is deferred, not waited for.
    env.start_dispatcher(&["--slot-wait", "50ms"]);
    let publisher = env.publisher().await;
    let first: Vec<_> = (0..=DEFERRED).map(invoice_paid).collect();
    publish_all(&publisher, &first).await;
    // No scheduler yet, so the deferred deliveries stay in the retry set until it is disabled.
    wait_until("all but one deferred", WAIT, || async {
        counted(&store, &ep, &first, DeliveryStatus::Retrying).await == DEFERRED
    })
    .await;
    store.disable_endpoint(&ep.id, "by a test", now_ms()).await.unwrap();
    env.start_scheduler(&[]);
    wait_until("the deferred ones failed on the disabled endpoint", WAIT, || async {
        counted(&store, &ep, &first, DeliveryStatus::Failed).await == DEFERRED
    })
    .await;
    // The one sent before it was disabled has taught the dispatcher the endpoint's 1 s hold.
    wait_until("the one sent delivered", WAIT, || async {
        counted(&store, &ep, &first, DeliveryStatus::Succeeded).await == 1
    })
    .await;
    for d in states_of(&store, &ep, &first).await {
        if d.status != DeliveryStatus::Failed {
            continue;
        }
        let reason = d.reason.unwrap_or_default();
        assert!(reason.contains("disabled"), "failed for being disabled: {reason}");
    }

    let mut enabled = store.get_endpoint(&ep.id).await.unwrap().unwrap();
    enabled
        .apply(EndpointPatch {
            enabled: Some(true),
            ..Default::default()
        })
        .unwrap();
    store.save_endpoint(&enabled).await.unwrap();
    let next: Vec<_> = (10..12).map(invoice_paid).collect();
    // One of the two takes the slot for a second; the other is deferred, with nothing ahead
    // of it: due within the defer delay (50 ms, jittered ×1–2) of its deferral. Each of the
    // five deferrals counted as still ahead would add the endpoint's 1 s hold.
    let after = deferrals_due(&publisher, &store, &ep, &next).await;
    assert!(
        after.iter().all(|&ms| ms < 2_500),
        "due {after:?} ms after publishing: the failed deferrals still counted as ahead"
    );
    wait_until("both delivered", WAIT, || async {
        counted(&store, &ep, &next, DeliveryStatus::Succeeded).await == next.len()
    })
    .await;
    assert_eq!(
        slow.count(),
        1 + next.len(),
        "nothing sent to the endpoint while disabled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_targets_are_refused_unless_allowed() {
    let mut env = TestEnv::new().await;
    let rx = Receiver::ok().await;
    let by_ip = env.endpoint("acct_a", &rx.url, None).await;
    let by_name = env
        .endpoint("acct_a", &rx.url.replace("127.0.0.1", "localhost"), None)
        .await;
    env.start_dispatcher(&["--allow-private-targets", "false", "--retry-max-attempts", "1"]);
    let event = invoice_paid(9);
    env.publisher().await.publish(&event).await.unwrap();
    let store = env.store().await;
    for ep in [&by_ip, &by_name] {
        wait_status(&store, &event, ep, DeliveryStatus::Failed).await;
        let attempts = store.attempts(&DeliveryId::for_pair(&event.id, &ep.id)).await.unwrap();
        assert_eq!(attempts[0].outcome, Outcome::ConnectError);
        let error = attempts[0].error.as_deref().unwrap();
        assert!(error.contains("is not a public address"), "{error}");
    }
    assert_eq!(rx.count(), 0, "nothing reached the loopback receiver");
}

/// The scheduler sends a batch while the one before waits for its confirms: every due job still
/// reaches the retry queue exactly once, and every claim is released, the last batch's too,
/// once nothing more is due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_re_queues_every_due_job_once_with_batches_in_flight() {
    // Batches of 3 over 40 jobs: many rounds with a batch in flight, and a last partial one.
    re_queues_every_due_job_once(40, 0, &["--batch", "3"]).await;
}

/// A batch's publishes go out together; 300 jobs in one batch is past the size at which
/// `try_join_all` stops polling a plain list and orders the futures through a queue instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_re_queues_every_job_of_a_large_batch_once() {
    re_queues_every_due_job_once(300, 0, &["--batch", "500"]).await;
}

/// The shortest poll interval allowed (1 ms; 0 is refused at start) is shorter than the
/// shortest pause, and bounds the pause before a job due later all the same (the pause was
/// clamped to bounds the wrong way round, and the scheduler panicked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shortest_poll_interval_still_re_queues_every_due_job_once() {
    re_queues_every_due_job_once(20, 20, &["--batch", "3", "--poll", "1ms"]).await;
}

/// `due` jobs due now and `later` ones due in 1.5 s, so that a round pauses for them.
async fn re_queues_every_due_job_once(due: usize, later: usize, flags: &[&str]) {
    let mut env = TestEnv::new().await;
    let store = env.store().await;
    let jobs = encoded_jobs(due + later);
    let mut redis = make_due(&env, &store, &jobs[..due]).await;
    put_due(&mut redis, &store, &jobs[due..], now_ms() + 1_500).await;
    // A claim lease far beyond the wait: a claim left unreleased fails the test.
    env.start_scheduler(&[flags, &["--claim-lease", "10m"]].concat());
    wait_until_every_claim_released(&store, &redis).await;
    assert_queued_once(&env, jobs).await;
}

/// A retry queue that disappears under a running scheduler (deleted by hand, or a layout not
/// declared yet) loses no job: the broker returns what it cannot route, the scheduler hands
/// those claims back and sends them again once a new channel has declared the topology.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_job_the_broker_cannot_route_is_queued_once_the_topology_is_declared_again() {
    let mut env = TestEnv::new().await;
    let store = env.store().await;
    env.start_scheduler(&["--claim-lease", "10m"]);
    let conn = laabam_shared::startup::amqp_connect(&env.amqp_url, "retries-test")
        .await
        .unwrap();
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    wait_until("the scheduler declared the topology", WAIT, || async {
        let probe = conn.create_channel().await.unwrap();
        let declared = probe
            .queue_declare(
                laabam_shared::topology::RETRY_QUEUE.into(),
                passive,
                lapin::types::FieldTable::default(),
            )
            .await
            .is_ok();
        if declared {
            let _ = probe.close(200, "probed".into()).await;
        }
        declared
    })
    .await;
    conn.create_channel()
        .await
        .unwrap()
        .queue_delete(
            laabam_shared::topology::RETRY_QUEUE.into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    let _ = conn.close(200, "done".into()).await;

    let jobs = encoded_jobs(10);
    let redis = make_due(&env, &store, &jobs).await;
    wait_until_every_claim_released(&store, &redis).await;
    env.declare_topology().await;
    assert_queued_once(&env, jobs).await;
}

/// Puts encoded jobs in the first retry shard, due a second ago; returns the Redis connection.
async fn make_due(env: &TestEnv, store: &Store, jobs: &[String]) -> redis::aio::MultiplexedConnection {
    let mut redis = env.redis().await;
    put_due(&mut redis, store, jobs, now_ms() - 1_000).await;
    redis
}

/// Puts encoded jobs (any number, none included) in the first retry shard, due at `at_ms`.
async fn put_due(redis: &mut redis::aio::MultiplexedConnection, store: &Store, jobs: &[String], at_ms: i64) {
    if jobs.is_empty() {
        return;
    }
    let due: Vec<(i64, &String)> = jobs.iter().map(|job| (at_ms, job)).collect();
    let _: () = redis::AsyncCommands::zadd_multiple(redis, store.keys().retry_due(0), &due)
        .await
        .unwrap();
}

/// Waits until no job is due or claimed in the first retry shard: every job was claimed, sent
/// and its claim released.
async fn wait_until_every_claim_released(store: &Store, redis: &redis::aio::MultiplexedConnection) {
    let keys = store.keys();
    wait_until("every job claimed and every claim released", WAIT, || async {
        let mut redis = redis.clone();
        let (due, claimed): (u64, u64) = redis::pipe()
            .zcard(keys.retry_due(0))
            .zcard(keys.retry_claimed(0))
            .query_async(&mut redis)
            .await
            .unwrap();
        due + claimed == 0
    })
    .await;
}

/// Takes everything in the retry queue and asserts it is `jobs`, each once.
async fn assert_queued_once(env: &TestEnv, mut jobs: Vec<String>) {
    let mut queued = Vec::new();
    while let Some(message) = env.get_message(laabam_shared::topology::RETRY_QUEUE).await {
        queued.push(String::from_utf8(message.delivery.data).unwrap());
    }
    queued.sort();
    jobs.sort();
    assert_eq!(queued, jobs, "each job queued once");
}

/// Retry jobs of one endpoint, encoded as the scheduler queues them.
fn encoded_jobs(n: usize) -> Vec<String> {
    let account = AccountId::parse("acct_q").unwrap();
    let endpoint = laabam_shared::ids::EndpointId::generate();
    (0..n)
        .map(|_| {
            let event = laabam_shared::ids::EventId::generate();
            RetryJob {
                delivery: DeliveryId::for_pair(&event, &endpoint),
                event,
                endpoint: endpoint.clone(),
                account: account.clone(),
            }
            .encode()
        })
        .collect()
}

/// A backlog of retries coming due at once (an endpoint back after an outage) shares the
/// dispatcher with new events: a new event of another account is delivered while most of the
/// backlog still waits, not after it. Eight message slots and 5 ms a retry make the 600 take
/// most of a second, so the new event's place among them shows which went first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_due_retries_does_not_hold_back_new_events() {
    const FLOOD: usize = 600;
    let mut env = TestEnv::new().await;
    // Every first attempt fails; every retry is answered after 5 ms.
    let flooded = Receiver::start(|_, nth| {
        if nth == 0 {
            Reply::Status(500)
        } else {
            Reply::After(Duration::from_millis(5), 200)
        }
    })
    .await;
    let fresh = Receiver::ok().await;
    env.endpoint("acct_flood", &flooded.url, None).await;
    env.endpoint("acct_fresh", &fresh.url, None).await;
    env.start_dispatcher(&["--max-in-flight", "8", "--retry-first-delay", "100ms"]);
    let publisher = env.publisher().await;
    publish_all(&publisher, &sample_events("acct_flood", FLOOD)).await;
    wait_until("every first attempt failed", Duration::from_secs(60), || async {
        flooded.count() >= FLOOD
    })
    .await;
    let store = env.store().await;
    wait_until("every retry due", Duration::from_secs(30), || async {
        store.retry_backlog().await.unwrap() >= FLOOD as u64
    })
    .await;
    env.start_scheduler(&[]);
    wait_until("the retries flowing", Duration::from_secs(30), || async {
        flooded.count() >= FLOOD + 20
    })
    .await;
    publish_all(&publisher, &sample_events("acct_fresh", 1)).await;
    wait_until("the new event", Duration::from_secs(60), || async {
        fresh.count() >= 1
    })
    .await;
    let retried = flooded.count() - FLOOD;
    eprintln!("retries delivered when the new event arrived: {retried} of {FLOOD}");
    assert!(
        retried < FLOOD / 2,
        "the new event waited for {retried} of {FLOOD} retries"
    );
}

/// Two dispatchers share the retry queue, so each takes back deferrals of the other's. A slow
/// endpoint's backlog counted what a process deferred less what it took back, never below none,
/// so the counts drifted upward through an episode of deferrals, and the endpoint's deferrals
/// after it were spread as if the drift were still ahead of them. Now each counts until it is
/// due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferrals_taken_back_by_another_dispatcher_do_not_delay_the_next_ones() {
    const EVENTS: usize = 60;
    let mut env = TestEnv::new().await;
    let slow = Receiver::start(|_, _| Reply::After(Duration::from_millis(200), 200)).await;
    let store = env.store().await;
    let ep = serial_endpoint(&store, &slow.url).await;
    for _ in 0..2 {
        env.start_dispatcher(&["--slot-wait", "20ms"]);
    }
    env.start_scheduler(&[]);
    let publisher = env.publisher().await;
    let episode: Vec<_> = (0..EVENTS).map(invoice_paid).collect();
    publish_all(&publisher, &episode).await;
    wait_until("the episode delivered", Duration::from_secs(60), || async {
        counted(&store, &ep, &episode, DeliveryStatus::Succeeded).await == EVENTS
    })
    .await;
    let next: Vec<_> = (100..106).map(invoice_paid).collect();
    let after = deferrals_due(&publisher, &store, &ep, &next).await;
    // Nothing is ahead of them once the episode is over: each is due within the defer delay
    // (50 ms, jittered ×1–2) of its deferral. The drift put them 6–11 s out, a 200 ms hold for
    // each deferral counted as still ahead.
    assert!(
        after.iter().all(|&ms| ms < 2_500),
        "due {after:?} ms after publishing: deferrals of the episode still counted as ahead"
    );
}

/// An attempt's record racing a take of the same delivery, as when an attempt finishes just as
/// its lease falls due and a scheduler has claimed it: exactly one of them wins. Either the
/// record applies and the take finds the delivery finished, or the take holds a new lease and
/// the record's no longer does. A thousand races at once through two stores (two processes'
/// connections): a record whose reads a take overtook must be refused by Redis and decided again
/// (with the record's lease compare made in a read without `WATCH`, some race ends with both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_racing_a_take_of_its_delivery_never_wins_beside_it() {
    let env = TestEnv::new().await;
    let recorder = env.store().await;
    let taker = env.store().await;
    let endpoints = quiet_endpoints(&recorder, &AccountId::parse("acct_race").unwrap(), 1).await;
    let now = now_ms();
    let begins = begin_events_together(&recorder, &endpoints, now, 0..1000).await;
    // The scheduler's claim: each lease, fallen due, taken out of the retry set to be re-queued.
    let mut conn = env.redis().await;
    for b in &begins {
        let due = recorder.keys().retry_due(recorder.keys().shard_of(&b.job.delivery));
        let removed: u32 = redis::AsyncCommands::zrem(&mut conn, due, b.job.encode())
            .await
            .unwrap();
        assert_eq!(removed, 1, "the lease was in the retry set");
    }
    let success = Success::at(now);
    let races = begins.iter().enumerate().map(|(i, b)| {
        let (recorder, taker, success) = (&recorder, &taker, &success);
        async move {
            let record = success.record(b);
            let lease = format!("{:016x}", 1_000_000 + i);
            let (recorded, taken) = tokio::join!(recorder.record(&record), taker.take(&b.job, &lease, now + 60_000));
            let went = matches!(taken.unwrap(), Taken::Go { .. });
            (recorded.unwrap().applied, went)
        }
    });
    let outcomes = join_all(races).await;
    for ((applied, went), b) in outcomes.iter().zip(&begins) {
        assert!(
            applied != went,
            "{}: record applied {applied}, take went {went}",
            b.job.delivery
        );
        let state = recorder.delivery(&b.job.delivery).await.unwrap().unwrap();
        let expected = if *applied {
            DeliveryStatus::Succeeded
        } else {
            DeliveryStatus::Pending
        };
        assert_eq!(state.status, expected, "{}", b.job.delivery);
    }
}

/// Two copies of each event arriving at once through two stores, as when a message redelivered
/// after a dispatcher's connection dropped reaches another dispatcher while the first still
/// writes it: each delivery is created by exactly one of them. An arrival that read the event
/// as new must be refused by Redis if the other copy stored it first (with the event not
/// watched, some copies both create their deliveries, resetting one the other began).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_copies_of_an_event_arriving_at_once_create_each_delivery_once() {
    let env = TestEnv::new().await;
    let first = env.store().await;
    let second = env.store().await;
    let endpoints = quiet_endpoints(&first, &AccountId::parse("acct_copies").unwrap(), 2).await;
    let now = now_ms();
    let events: Vec<(Envelope, Vec<u8>, Vec<Begin>)> = (0..500)
        .map(|i| {
            let event = payment_failed(&endpoints.endpoints[0].account_id, i, now + i as i64);
            let begins = leased_begins(&event, &endpoints.endpoints, 2 * i, now + 30_000);
            let json = event.to_json();
            (event, json, begins)
        })
        .collect();
    let created = |answer: Ingest| match answer {
        Ingest::Begun { created, .. } => created,
        Ingest::Stale => panic!("the endpoints did not change"),
    };
    let arrivals = events.iter().map(|(event, json, begins)| {
        let (first, second, version) = (&first, &second, endpoints.version);
        async move {
            let (a, b) = tokio::join!(
                first.ingest(event, json, version, begins, now),
                second.ingest(event, json, version, begins, now)
            );
            (created(a.unwrap()), created(b.unwrap()))
        }
    });
    for ((a, b), (event, ..)) in join_all(arrivals).await.into_iter().zip(&events) {
        let once: Vec<bool> = a.iter().zip(&b).map(|(x, y)| x != y).collect();
        assert_eq!(once, [true, true], "{}: created {a:?} and {b:?}", event.id);
    }
}
