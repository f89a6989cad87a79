//! Hostile and broken endpoints: every attempt fails with a clear, recorded error within its
//! timeout, reading a bounded amount, and nothing else is held back.

use laabam_producer::Publisher;
use laabam_shared::clock::now_ms;
use laabam_shared::delivery::{DeliveryStatus, Outcome};
use laabam_shared::ids::{AccountId, DeliveryId};
use laabam_shared::store::DeliveryFilter;
use laabam_tests::env::{payment_failed, publish_all, sample_events};
use laabam_tests::{Captured, Receiver, Reply, TestEnv, wait_finished, wait_until};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A raw TCP endpoint that reads the request head and then does `behave` with the socket.
async fn raw_endpoint<F, Fut>(behave: F) -> String
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://127.0.0.1:{}/hook", listener.local_addr().unwrap().port());
    let behave = std::sync::Arc::new(behave);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let behave = behave.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let _ = socket.read(&mut buf).await;
                behave(socket).await;
            });
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_endpoints_fail_clearly_within_the_timeout() {
    let mut env = TestEnv::new().await;
    let endless = raw_endpoint(|mut s| async move {
        let _ = s
            .write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain\r\n\r\n")
            .await;
        let chunk = vec![b'x'; 16 * 1024];
        // A body with no length that never ends: read up to the cap, then dropped.
        for _ in 0..100_000 {
            if s.write_all(&chunk).await.is_err() {
                return;
            }
        }
    })
    .await;
    let trickle = raw_endpoint(|mut s| async move {
        for b in b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-slow: " {
            if s.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let redirect = raw_endpoint(|mut s| async move {
        let _ = s
            .write_all(b"HTTP/1.1 302 Found\r\nlocation: http://127.0.0.1:1/elsewhere\r\ncontent-length: 0\r\n\r\n")
            .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    })
    .await;
    let garbage = raw_endpoint(|mut s| async move {
        let _ = s.write_all(b"SMTP READY\r\n\r\nthis is not http at all\r\n").await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    })
    .await;
    let healthy = Receiver::ok().await;
    // TLS: a certificate for another name, and one from a CA nobody trusts.
    let wrong_name = Receiver::start_tls(&["not-this-host.example"], |_, _| Reply::Status(200)).await;
    let untrusted = Receiver::start_tls(&["127.0.0.1"], |_, _| Reply::Status(200)).await;

    let mut endpoints = Vec::new();
    for url in [
        &endless,
        &trickle,
        &redirect,
        &garbage,
        &healthy.url,
        &wrong_name.url,
        &untrusted.url,
    ] {
        endpoints.push(env.endpoint("acct_hostile", url, None).await);
    }
    // The dispatcher trusts the wrong-name receiver's CA (so only the name is wrong), not the other's.
    let ca = wrong_name.ca_file.clone().unwrap();
    env.start_dispatcher(&[
        "--http-timeout",
        "1500ms",
        "--retry-max-attempts",
        "1",
        "--extra-ca-file",
        ca.to_str().unwrap(),
    ]);
    let event = payment_failed(&AccountId::parse("acct_hostile").unwrap(), 0, now_ms());
    let published = Instant::now();
    env.publisher().await.publish(&event).await.unwrap();

    let store = env.store().await;
    let expected = [
        (Outcome::Http5xx, "response body"),
        (Outcome::Timeout, "no complete response"),
        (Outcome::Http3xx, ""),
        (Outcome::InvalidResponse, ""),
        (Outcome::Success, ""),
        (Outcome::TlsError, "not valid for name"),
        (Outcome::TlsError, "invalid peer certificate"),
    ];
    for (ep, (outcome, fragment)) in endpoints.iter().zip(expected) {
        let id = DeliveryId::for_pair(&event.id, &ep.id);
        wait_finished(&store, &id).await;
        let attempts = store.attempts(&id).await.unwrap();
        assert_eq!(attempts.len(), 1);
        let a = &attempts[0];
        assert_eq!(a.outcome, outcome, "{}: {a:?}", ep.url.as_str());
        assert!(
            a.duration_ms <= 1_700,
            "{}: within the timeout, took {} ms",
            ep.url.as_str(),
            a.duration_ms
        );
        if !fragment.is_empty() {
            let said = format!(
                "{} {}",
                a.error.as_deref().unwrap_or(""),
                a.response_excerpt.as_deref().unwrap_or("")
            );
            assert!(said.contains(fragment), "{}: {said}", ep.url.as_str());
        }
        if let Some(excerpt) = &a.response_excerpt {
            assert!(excerpt.len() <= 4096, "excerpts are capped");
        }
    }
    assert_eq!(healthy.count(), 1);
    assert!(published.elapsed() < Duration::from_secs(15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_endpoints_never_hold_back_healthy_ones_nor_exceed_their_limit() {
    let mut env = TestEnv::new().await;
    let never = Receiver::start(|_, _| Reply::After(Duration::from_secs(3600), 200)).await;
    let slow = Receiver::start(|_, _| Reply::After(Duration::from_secs(9), 200)).await;
    let mut healthy = Vec::new();
    for _ in 0..10 {
        healthy.push(Receiver::ok().await);
    }
    for rx in [&never, &slow].into_iter().chain(healthy.iter()) {
        env.endpoint("acct_slow", &rx.url, None).await;
    }
    let limit = 4;
    env.start_dispatcher(&[
        "--http-timeout",
        "10s",
        "--endpoint-concurrency",
        &limit.to_string(),
        "--defer-delay",
        "200ms",
    ]);
    env.start_scheduler(&[]);
    let publisher = env.publisher().await;
    let events = sample_events("acct_slow", 200);
    let started = Instant::now();
    for e in &events {
        publisher.publish(e).await.unwrap();
    }
    for rx in &healthy {
        wait_until(
            "every healthy endpoint has every event",
            Duration::from_secs(30),
            || async { rx.per_event().len() == events.len() },
        )
        .await;
    }
    let healthy_done = started.elapsed();
    println!("200 events to 10 healthy endpoints in {healthy_done:?} beside a hung and a 9 s endpoint");
    assert!(
        healthy_done < Duration::from_secs(9),
        "healthy endpoints finished while the slow ones were still pending"
    );
    assert!(
        never.peak_concurrency() <= limit,
        "the hung endpoint held {} requests",
        never.peak_concurrency()
    );
    assert!(
        slow.peak_concurrency() <= limit,
        "the slow endpoint held {} requests",
        slow.peak_concurrency()
    );
    assert!(
        never.count() <= limit && slow.count() <= limit,
        "no more requests than the limit while they hang"
    );
}

/// An endpoint slow enough to be at its limit but quick enough to be waited for (100 ms, two
/// slots) shares every event with a fast one: the fast one gets each event at once instead of
/// at the slow one's pace. A delivery waiting for a slot waits alone, after its event's message
/// is settled; it used to hold the slots its event took at the other endpoints meanwhile, so
/// every endpoint of a fan-out went at the pace of its slowest one that was still waited for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_waited_for_does_not_set_the_pace_of_the_others() {
    const EVENTS: usize = 40;
    let mut env = TestEnv::new().await;
    let waited = Receiver::start(|_, _| Reply::After(Duration::from_millis(100), 200)).await;
    let fast = Receiver::ok().await;
    env.endpoint("acct_pace", &waited.url, None).await;
    env.endpoint("acct_pace", &fast.url, None).await;
    // Room for 32 events in hand; up to 20 deliveries (1 s of 100 ms holds over two slots) are
    // waited for before more are deferred.
    env.start_dispatcher(&[
        "--max-in-flight",
        "64",
        "--endpoint-concurrency",
        "2",
        "--slot-wait",
        "1s",
    ]);
    env.start_scheduler(&[]);
    let publisher = env.publisher().await;
    publish_all(&publisher, &sample_events("acct_pace", EVENTS)).await;
    wait_until("the fast endpoint has every event", Duration::from_secs(30), || async {
        fast.per_event().len() == EVENTS
    })
    .await;
    let paced = waited.count();
    println!("the fast endpoint had all {EVENTS} events when the 100 ms one had had {paced} requests");
    assert!(
        paced < EVENTS / 2,
        "the fast endpoint went at the slow one's pace ({paced} of its requests first)"
    );
    wait_until(
        "the waited-for endpoint has every event",
        Duration::from_secs(60),
        || async { waited.per_event().len() == EVENTS },
    )
    .await;
    assert!(waited.peak_concurrency() <= 2, "its limit held");
    assert_eq!(fast.count(), EVENTS, "each event once at the fast endpoint");
}

/// Many endpoints known to hang, each within its own limit, must not take the whole in-flight
/// room (`LAABAM_MAX_IN_FLIGHT`) from a healthy endpoint: eight of them with four slots each
/// could hold 32 requests, twice the room of 16, each until its timeout. Requests to endpoints
/// judged slow may hold only half of the room; past that their deliveries are deferred. Without
/// that share the hung endpoints' events filled the room two at a time, and the healthy
/// account's events, published after them, waited a timeout for every two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_endpoints_together_never_hold_the_room_healthy_ones_need() {
    const HUNG: usize = 8;
    const EVENTS: usize = 40;
    let mut env = TestEnv::new().await;
    let hang = |_: &Captured, _| Reply::After(Duration::from_secs(120), 200);
    let (hung, healthy) = endpoints_beside_a_healthy_one(&mut env, "acct_hung", HUNG, hang).await;
    // Every request the hung endpoints get is counted below.
    let metrics_addr = start_with_a_small_room(&mut env, "5s");
    let publisher = env.publisher().await;
    let hung_requests = || hung.iter().map(Receiver::count).sum::<usize>();
    // One event each first, so the dispatcher learns how long they take: its timeout.
    publish_all(&publisher, &sample_events("acct_hung", 1)).await;
    let store = env.store().await;
    let account = AccountId::parse("acct_hung").unwrap();
    wait_until("the first requests timed out", Duration::from_secs(30), || async {
        let page = store
            .list_deliveries(&account, &DeliveryFilter::default(), None, HUNG + 1)
            .await
            .unwrap();
        page.items.len() == HUNG && page.items.iter().all(|d| d.status == DeliveryStatus::Retrying)
    })
    .await;
    // Healthy traffic meanwhile, as on any dispatcher: the process's typical request is fast.
    publish_all(&publisher, &sample_events("acct_fine", EVENTS)).await;
    wait_until(
        "the healthy endpoint's first events",
        Duration::from_secs(30),
        || async { healthy.count() >= EVENTS },
    )
    .await;
    let before = hung_requests();
    publish_all(&publisher, &sample_events("acct_hung", EVENTS)).await;
    let took = time_healthy_events(&publisher, &healthy, EVENTS).await;
    let held = hung_requests() - before;
    println!(
        "{EVENTS} events to a healthy endpoint in {took:?} after {EVENTS} to {HUNG} hung ones, which got {held} requests"
    );
    assert!(
        took < Duration::from_secs(5),
        "the healthy endpoint waited for the hung requests' timeout"
    );
    assert!(
        held <= 8,
        "the hung endpoints held {held} requests, more than half the room"
    );
    // The gauge shows the slow room in use (other tests of this process may add to it).
    let in_use = laabam_tests::api::metric(&metrics_addr, "laabam_dispatcher_slow_room_in_use").await;
    assert!(
        in_use >= held as f64,
        "the gauge says {in_use} with {held} requests held"
    );
}

/// `n` endpoints of `account` whose receivers answer by `script`, and `acct_fine`'s healthy one
/// (see [`time_healthy_events`]).
async fn endpoints_beside_a_healthy_one(
    env: &mut TestEnv,
    account: &str,
    n: usize,
    script: impl Fn(&Captured, usize) -> Reply + Clone + Send + Sync + 'static,
) -> (Vec<Receiver>, Receiver) {
    let mut receivers = Vec::new();
    for _ in 0..n {
        let rx = Receiver::start(script.clone()).await;
        env.endpoint(account, &rx.url, None).await;
        receivers.push(rx);
    }
    let healthy = Receiver::ok().await;
    env.endpoint("acct_fine", &healthy.url, None).await;
    (receivers, healthy)
}

/// Starts a dispatcher with an in-flight room of 16 (so a slow room of 8) and 4 slots per
/// endpoint, whose requests time out after `timeout`, and answers its metrics address. No
/// scheduler: a deferred or failed delivery stays in the retry set.
fn start_with_a_small_room(env: &mut TestEnv, timeout: &str) -> String {
    let metrics_addr = format!("127.0.0.1:{}", laabam_tests::ports::free_port());
    env.start_dispatcher(&[
        "--max-in-flight",
        "16",
        "--endpoint-concurrency",
        "4",
        "--http-timeout",
        timeout,
        "--metrics-addr",
        &metrics_addr,
    ]);
    metrics_addr
}

/// Publishes `n` events to `acct_fine`'s endpoint `healthy`, behind whatever was published
/// before, and answers how long they took to arrive.
async fn time_healthy_events(publisher: &Publisher, healthy: &Receiver, n: usize) -> Duration {
    let before = healthy.count();
    let started = Instant::now();
    publish_all(publisher, &sample_events("acct_fine", n)).await;
    wait_until(
        "the healthy endpoint's later events",
        Duration::from_secs(60),
        || async { healthy.count() >= before + n },
    )
    .await;
    started.elapsed()
}

/// Endpoints that answered at once and then hang together (a shared host going down) are not
/// known to be slow when their next requests start, so the slow room does not hold them back
/// then: 8 of them × 4 slots could hold the whole room of 16 until the HTTP timeout (20 s), and
/// every event behind, the healthy account's too, waited for it. Once a request has run for the
/// wait budget it is judged again: it takes a share of the slow room, or, when that is full, is
/// cut short, recorded as a timed-out attempt and retried. Nothing is lost meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_that_hang_together_hold_the_room_no_longer_than_the_wait_budget() {
    const DOWN: usize = 8;
    const EVENTS: usize = 40;
    let mut env = TestEnv::new().await;
    let down = Arc::new(AtomicBool::new(false));
    let went_down = down.clone();
    let answer = move |_: &Captured, _| {
        if went_down.load(Ordering::Relaxed) {
            Reply::After(Duration::from_secs(120), 200)
        } else {
            Reply::Status(200)
        }
    };
    let (flaky, healthy) = endpoints_beside_a_healthy_one(&mut env, "acct_down", DOWN, answer).await;
    let metrics_addr = start_with_a_small_room(&mut env, "20s");
    let publisher = env.publisher().await;
    // Every endpoint answers at once at first: the dispatcher knows them all as fast.
    publish_all(&publisher, &sample_events("acct_down", 5)).await;
    publish_all(&publisher, &sample_events("acct_fine", EVENTS)).await;
    wait_until("the first events", Duration::from_secs(30), || async {
        flaky.iter().all(|r| r.count() >= 5) && healthy.count() >= EVENTS
    })
    .await;
    down.store(true, Ordering::Relaxed);
    publish_all(&publisher, &sample_events("acct_down", EVENTS)).await;
    let took = time_healthy_events(&publisher, &healthy, EVENTS).await;
    println!("{EVENTS} events to a healthy endpoint in {took:?} after {EVENTS} to {DOWN} endpoints that went down");
    assert!(
        took < Duration::from_secs(10),
        "the healthy endpoint waited for the hung requests' timeout"
    );
    assert!(laabam_tests::api::metric(&metrics_addr, "laabam_dispatcher_requests_cut_short_total").await >= 1.0);
    // No scheduler: every delivery of the hanging endpoints is still there, none given up, and
    // a cut request is in its delivery's log as a timed-out attempt that says why.
    let store = env.store().await;
    let account = AccountId::parse("acct_down").unwrap();
    let all = (5 + EVENTS) * DOWN;
    let page = store
        .list_deliveries(&account, &DeliveryFilter::default(), None, all + 1)
        .await
        .unwrap();
    assert_eq!(page.items.len(), all, "a delivery per event and endpoint");
    assert!(page.items.iter().all(|d| d.status != DeliveryStatus::Failed));
    let mut cut = None;
    for d in page.items.iter().filter(|d| d.status == DeliveryStatus::Retrying) {
        let attempts = store.attempts(&d.id).await.unwrap();
        cut = attempts
            .into_iter()
            .find(|a| a.error.as_deref().is_some_and(|e| e.starts_with("cut short")));
        if cut.is_some() {
            break;
        }
    }
    let cut = cut.expect("a cut attempt in a delivery's log");
    assert_eq!(cut.outcome, Outcome::Timeout);
    assert!(cut.duration_ms < 20_000, "cut at the budget, not the timeout");
}

/// A request that runs past the wait budget while the slow room has a share free takes it and
/// runs on: answered within the timeout it succeeds at its first attempt, and past it it times
/// out at the timeout, the checkpoint neither cutting it nor lengthening it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_turns_slow_with_room_to_spare_runs_on_to_its_answer_or_timeout() {
    let mut env = TestEnv::new().await;
    let patient = Receiver::start(|_, _| Reply::After(Duration::from_millis(1500), 200)).await;
    let late = Receiver::start(|_, _| Reply::After(Duration::from_secs(5), 200)).await;
    let answers = env.endpoint("acct_patient", &patient.url, None).await;
    let times_out = env.endpoint("acct_late", &late.url, None).await;
    // No scheduler: the request that timed out stays with its one attempt. Both requests
    // are judged again at the 1 s budget.
    env.start_dispatcher(&["--http-timeout", "2s", "--slot-wait", "1s"]);
    let publisher = env.publisher().await;
    let (first, second) = (sample_events("acct_patient", 1), sample_events("acct_late", 1));
    publish_all(&publisher, &first).await;
    publish_all(&publisher, &second).await;
    let store = env.store().await;
    let answered = wait_finished(&store, &DeliveryId::for_pair(&first[0].id, &answers.id)).await;
    assert_eq!(answered.status, DeliveryStatus::Succeeded);
    assert_eq!(answered.attempts, 1, "not cut short: one request, answered");
    let late_id = DeliveryId::for_pair(&second[0].id, &times_out.id);
    wait_until("the late request's attempt", Duration::from_secs(30), || async {
        store.delivery(&late_id).await.unwrap().is_some_and(|d| d.attempts == 1)
    })
    .await;
    let attempts = store.attempts(&late_id).await.unwrap();
    let attempt = attempts.first().expect("its attempt");
    assert_eq!(attempt.outcome, Outcome::Timeout);
    assert_eq!(attempt.error.as_deref(), Some("no complete response within 2s"));
    // A timer never fires early, and one lengthened by the checkpoint fires at 3 s (1 s to the
    // checkpoint, then the whole 2 s again): below 2,950 ms leaves a loaded machine's timer
    // most of a second to be late and still tells the two apart.
    assert!(
        (1_990..2_950).contains(&attempt.duration_ms),
        "timed out at the timeout, not past it: {} ms",
        attempt.duration_ms
    );
    assert_eq!((patient.count(), late.count()), (1, 1));
}
