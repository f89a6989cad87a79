//! Poison messages are dead-lettered with a reason and the stream goes on; a dispatcher killed
//! mid-burst loses nothing that the broker confirmed.

use laabam_producer::{PublishError, Publisher};
use laabam_shared::clock::now_ms;
use laabam_shared::delivery::DeliveryStatus;
use laabam_shared::envelope::Envelope;
use laabam_shared::ids::DeliveryId;
use laabam_shared::publish_link::LinkError;
use laabam_shared::store::Store;
use laabam_shared::topology;
use laabam_tests::env::{numbered as event, publish_all};
use laabam_tests::own_rabbit::OwnRabbit;
use laabam_tests::own_redis::OwnRedis;
use laabam_tests::report::{every_confirmed_event_arrives, fault_row, ids_of};
use laabam_tests::{ApiClient, Receiver, Reply, TestEnv, wait_until};
use lapin::BasicProperties;
use lapin::types::AMQPValue;
use serde_json::json;
use std::collections::HashMap;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_with_a_reason_and_the_stream_goes_on() {
    let mut env = TestEnv::new().await;
    let rx = Receiver::ok().await;
    env.endpoint("acct_a", &rx.url, None).await;
    env.declare_topology().await;
    env.start_dispatcher(&[]);

    let big = format!(
        r#"{{"type":"invoice.created","account_id":"acct_a","data":{{"invoice_id":"i","status":"open","amount":1,"pad":"{}"}}}}"#,
        "x".repeat(300 * 1024)
    );
    let poison: Vec<(&str, Vec<u8>, &str)> = vec![
        ("invoice.created", b"not json at all".to_vec(), "invalid_json"),
        ("invoice.created", b"[1,2,3]".to_vec(), "invalid_json"),
        ("invoice.created", b"\xff\xfe{\"type\":1}".to_vec(), "invalid_json"),
        (
            "invoice.deleted",
            br#"{"type":"invoice.deleted","account_id":"acct_a","data":{}}"#.to_vec(),
            "unknown_type",
        ),
        (
            "invoice.paid",
            br#"{"type":"invoice.paid","account_id":"acct_a","data":{"invoice_id":"i"}}"#.to_vec(),
            "invalid_payload",
        ),
        ("invoice.created", big.into_bytes(), "too_large"),
        ("invoice.created", vec![b'{'; 10 * 1024 * 1024], "too_large"),
    ];
    for (key, body, _) in &poison {
        env.plain_publish(key, body, BasicProperties::default()).await;
    }
    let good = event("acct_a", 1);
    env.publisher().await.publish(&good).await.unwrap();
    wait_until("the good event after the poison", Duration::from_secs(20), || async {
        rx.count() == 1
    })
    .await;
    assert_eq!(rx.requests()[0].header("webhook-id"), good.id.as_str());

    // Each dead letter is confirmed before its poison message is settled, but the good event
    // may arrive first: the 10 MiB one takes a while to publish.
    let collected: std::sync::Mutex<HashMap<Vec<u8>, String>> = Default::default();
    wait_until("a dead letter per poison message", Duration::from_secs(30), || async {
        while let Some(msg) = env.get_message(topology::DEAD_QUEUE).await {
            let headers = msg.delivery.properties.headers().clone().unwrap_or_default();
            let reason = match headers.inner().get(topology::DEAD_REASON_HEADER) {
                Some(AMQPValue::LongString(s)) => s.to_string(),
                other => panic!("reason header missing: {other:?}"),
            };
            assert!(headers.inner().contains_key("x-laabam-dead-detail"));
            collected.lock().unwrap().insert(msg.delivery.data, reason);
        }
        collected.lock().unwrap().len() >= poison.len()
    })
    .await;
    let reasons = collected.into_inner().unwrap();
    assert_eq!(reasons.len(), poison.len(), "one dead letter per poison message");
    for (_, body, reason) in &poison {
        assert_eq!(
            reasons.get(body).map(String::as_str),
            Some(*reason),
            "{}",
            String::from_utf8_lossy(&body[..body.len().min(60)])
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_killed_mid_burst_loses_no_confirmed_event() {
    let mut env = TestEnv::new().await;
    let rx = Receiver::start(|_, _| Reply::After(Duration::from_millis(5), 200)).await;
    env.endpoint("acct_k", &rx.url, None).await;
    let flags = env.dispatcher_flags(&["--max-in-flight", "64"]);
    let first = env.spawn_binary("laabam-dispatcher", &flags);
    env.start_scheduler(&[]);
    let publisher = env.publisher().await;
    let events: Vec<Envelope> = (0..600).map(|n| event("acct_k", n)).collect();
    publish_all(&publisher, &events).await;
    wait_until("the burst under way", Duration::from_secs(30), || async {
        rx.count() >= 100
    })
    .await;
    env.kill(first);
    let at_kill = rx.count();
    env.spawn_binary("laabam-dispatcher", &flags);

    let ids = ids_of(&events);
    every_confirmed_event_arrives(
        "SIGKILL of a dispatcher mid-burst, restarted",
        &ids,
        &rx,
        Duration::from_secs(60),
    )
    .await;
    assert!(at_kill < 600, "the kill happened mid-burst");
    for req in rx.requests() {
        assert!(events.iter().any(|e| e.id.as_str() == req.header("webhook-id")));
    }
}

/// Publishes `e` until the broker confirms it; returns how many tries it reported unconfirmed.
async fn publish_through_a_cut(publisher: &Publisher, e: &Envelope) -> usize {
    let mut unconfirmed = 0;
    while publisher.publish(e).await.is_err() {
        unconfirmed += 1;
        assert!(unconfirmed < 50, "the publisher never reconnected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    unconfirmed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_by_the_broker_are_reestablished_by_every_process() {
    let mut env = TestEnv::new().await;
    let rx = Receiver::ok().await;
    env.endpoint("acct_c", &rx.url, None).await;
    env.start_dispatcher(&[]);
    env.start_scheduler(&[]);
    let publisher = env.publisher().await;
    let before = event("acct_c", 1);
    publisher.publish(&before).await.unwrap();
    wait_until("first event", Duration::from_secs(20), || async { rx.count() == 1 }).await;

    env.cut_connections().await;

    // The publisher reports what the broker did not confirm, then reconnects by itself.
    let after = event("acct_c", 2);
    let unconfirmed = publish_through_a_cut(&publisher, &after).await;
    println!("publishes reported unconfirmed during the cut: {unconfirmed}");
    wait_until(
        "the dispatcher reconnected and delivered",
        Duration::from_secs(30),
        || async { rx.per_event().contains_key(after.id.as_str()) },
    )
    .await;
    let ids = vec![before.id.to_string(), after.id.to_string()];
    let (lost, _) = fault_row(
        "RabbitMQ closes every connection (all processes)",
        &ids,
        &rx.per_event(),
        1,
    );
    assert_eq!(lost, 0);
}

/// The scheduler has nothing to publish when the broker cuts its connection, so only a scheduler
/// that notices the cut reopens its channel before the next retry comes due; one that finds out
/// by a failed publish must not leave the claims it took to wait out their lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_due_after_a_broker_cut_goes_out_without_waiting_for_a_claim_lease() {
    let mut env = TestEnv::new().await;
    let rx = Receiver::failing_first_attempts(Reply::Status(500)).await;
    env.endpoint("acct_c", &rx.url, None).await;
    env.start_dispatcher(&[]);
    // A claim lease far beyond the wait below: a claim left to expire fails the test.
    env.start_scheduler(&["--claim-lease", "10m"]);
    let publisher = env.publisher().await;
    let retried = |e: &Envelope| rx.per_event().get(e.id.as_str()) == Some(&2);
    // One retry before the cut: the scheduler is connected and publishing.
    let before = event("acct_c", 1);
    publisher.publish(&before).await.unwrap();
    wait_until("a retry before the cut", Duration::from_secs(20), || async {
        retried(&before)
    })
    .await;

    env.cut_connections().await;
    let after = event("acct_c", 2);
    publish_through_a_cut(&publisher, &after).await;
    wait_until("a retry after the cut", Duration::from_secs(30), || async {
        retried(&after)
    })
    .await;
    // Its record, which takes its lease out of the retry set, follows the answer the receiver
    // gave (by up to the record writer's linger); a claim left behind would stay for 10 minutes.
    let store = env.store().await;
    wait_until("nothing left to retry", Duration::from_secs(10), || async {
        store.retry_backlog().await.unwrap() == 0
    })
    .await;
}

/// Starts a dispatcher (no scheduler) and publishes one event whose first attempt fails: its
/// retry job then waits in the due set for whoever claims it.
async fn one_due_retry(env: &mut TestEnv, rx: &Receiver, account: &str) -> (Store, DeliveryId) {
    let ep = env.endpoint(account, &rx.url, None).await;
    env.start_dispatcher(&[]);
    let store = env.store().await;
    let e = event(account, 1);
    env.publisher().await.publish(&e).await.unwrap();
    let delivery = DeliveryId::for_pair(&e.id, &ep.id);
    wait_until("first attempt failed", Duration::from_secs(20), || async {
        store
            .delivery(&delivery)
            .await
            .unwrap()
            .is_some_and(|d| d.status == DeliveryStatus::Retrying)
    })
    .await;
    (store, delivery)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_claimed_by_a_scheduler_that_died_is_reclaimed_and_delivered() {
    let mut env = TestEnv::new().await;
    let rx = Receiver::failing_first_attempts(Reply::Status(500)).await;
    let (store, delivery) = one_due_retry(&mut env, &rx, "acct_r").await;

    // A scheduler claims the due job, then dies before publishing it.
    let now = now_ms();
    let claimed = store.claim_due(0, now + 60_000, now + 1_000, 10).await.unwrap();
    assert_eq!(claimed.jobs.len(), 1);

    env.start_scheduler(&[]);
    wait_until("reclaimed and delivered", Duration::from_secs(20), || async {
        store
            .delivery(&delivery)
            .await
            .unwrap()
            .is_some_and(|d| d.status == DeliveryStatus::Succeeded)
    })
    .await;
    assert_eq!(rx.count(), 2);
    assert_eq!(store.retry_backlog().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_handed_back_are_claimed_again_at_once_and_released_ones_never() {
    let mut env = TestEnv::new().await;
    let rx = Receiver::start(|_, _| Reply::Status(500)).await;
    let (store, _) = one_due_retry(&mut env, &rx, "acct_h").await;

    let now = now_ms();
    let far = now + 600_000;
    let claimed = store.claim_due(0, now + 60_000, far, 10).await.unwrap();
    assert_eq!(claimed.jobs.len(), 1);
    assert!(
        store.claim_due(0, now + 60_000, far, 10).await.unwrap().jobs.is_empty(),
        "leased"
    );

    store.hand_back_claimed(0, &claimed.jobs).await.unwrap();
    let again = store.claim_due(0, now + 60_000, far, 10).await.unwrap();
    assert_eq!((again.jobs, again.reclaimed), (claimed.jobs.clone(), 1));

    store.release_claimed(0, &claimed.jobs).await.unwrap();
    store.hand_back_claimed(0, &claimed.jobs).await.unwrap();
    assert!(
        store.claim_due(0, now + 60_000, far, 10).await.unwrap().jobs.is_empty(),
        "released stays released"
    );
    assert_eq!(store.retry_backlog().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_attempts_and_loses_nothing() {
    let mut env = TestEnv::new().await;
    let rx = Receiver::start(|_, _| Reply::After(Duration::from_millis(400), 200)).await;
    env.endpoint("acct_t", &rx.url, None).await;
    let flags = env.dispatcher_flags(&["--endpoint-concurrency", "64"]);
    let first = env.spawn_binary("laabam-dispatcher", &flags);
    env.start_scheduler(&[]);
    let publisher = env.publisher().await;
    let events: Vec<Envelope> = (0..200).map(|n| event("acct_t", n)).collect();
    publish_all(&publisher, &events).await;
    wait_until("attempts in flight", Duration::from_secs(20), || async {
        rx.count() >= 10
    })
    .await;
    let status = env.terminate(first).await;
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    let at_exit = rx.count();
    env.spawn_binary("laabam-dispatcher", &flags);
    wait_until("every event delivered", Duration::from_secs(60), || async {
        let seen = rx.per_event();
        events.iter().all(|e| seen.contains_key(e.id.as_str()))
    })
    .await;
    let ids = ids_of(&events);
    let (lost, duplicates) = fault_row(
        "SIGTERM of a dispatcher under load, restarted",
        &ids,
        &rx.per_event(),
        1,
    );
    assert!(at_exit < 200, "stopped mid-stream");
    assert_eq!(
        (lost, duplicates),
        (0, 0),
        "a graceful stop finishes what it started and hands back the rest"
    );
}

/// A dispatcher whose host's clock runs 25 s behind Redis's and a scheduler whose host's runs
/// 25 s ahead: leases, due times and claims are kept by Redis's clock, so the scheduler does
/// not take the dispatcher's leases for ended while their attempts run, and each is sent as it
/// arrives, not left to its lease as too late. By the hosts' clocks,
/// with the dispatcher alone 25 s behind, each 3 s lease had ended 22 s before it was written,
/// and these 100 events to an endpoint answering in 300 ms arrived 1,760 times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_and_a_scheduler_50_s_apart_send_each_event_once() {
    let mut env = TestEnv::new().await;
    let rx = Receiver::start(|_, _| Reply::After(Duration::from_millis(300), 200)).await;
    env.endpoint("acct_apart", &rx.url, None).await;
    let metrics_addr = format!("127.0.0.1:{}", laabam_tests::ports::free_port());
    let flags = env.dispatcher_flags(&["--metrics-addr", &metrics_addr]);
    env.spawn_binary_on_clock("laabam-dispatcher", &flags, "-25s", None);
    let flags = env.scheduler_flags(&[]);
    env.spawn_binary_on_clock("laabam-retry-scheduler", &flags, "+25s", None);
    let publisher = env.publisher().await;
    let events: Vec<Envelope> = (0..100).map(|n| event("acct_apart", n)).collect();
    publish_all(&publisher, &events).await;
    wait_until("every event delivered", Duration::from_secs(60), || async {
        rx.per_event().len() == events.len()
    })
    .await;
    // A lease taken for ended is re-queued at the scheduler's next look (20 ms here), while its
    // attempt is still being answered.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ids = ids_of(&events);
    let (lost, duplicates) = fault_row(
        "a dispatcher's clock 25 s behind Redis's, a scheduler's 25 s ahead (libfaketime)",
        &ids,
        &rx.per_event(),
        1,
    );
    assert_eq!((lost, duplicates), (0, 0));
    // Each at its arrival, not once its lease had ended.
    let left = laabam_tests::api::metric(&metrics_addr, "laabam_dispatcher_attempts_left_to_lease_total").await;
    assert_eq!(left, 0.0, "attempts left to their lease");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_scheduler_killed_mid_stream_loses_no_retry() {
    let mut env = TestEnv::new().await;
    let rx = Receiver::failing_first_attempts(Reply::Status(503)).await;
    env.endpoint("acct_s", &rx.url, None).await;
    env.start_dispatcher(&[]);
    let flags = env.scheduler_flags(&["--claim-lease", "1s"]);
    let first = env.spawn_binary("laabam-retry-scheduler", &flags);
    let publisher = env.publisher().await;
    let events: Vec<Envelope> = (0..300).map(|n| event("acct_s", n)).collect();
    publish_all(&publisher, &events).await;
    wait_until("retries under way", Duration::from_secs(30), || async {
        rx.count() >= 350
    })
    .await;
    env.kill(first);
    env.spawn_binary("laabam-retry-scheduler", &flags);
    wait_until("every event delivered", Duration::from_secs(60), || async {
        let seen = rx.per_event();
        events.iter().all(|e| seen.get(e.id.as_str()).is_some_and(|n| *n >= 2))
    })
    .await;
    // Each event arrives twice by design (a 503, then the retry): count arrivals beyond that.
    let ids = ids_of(&events);
    let (lost, _) = fault_row(
        "SIGKILL of a retry scheduler mid-stream, restarted",
        &ids,
        &rx.per_event(),
        2,
    );
    assert_eq!(lost, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_killed_mid_stream_loses_no_event_it_confirmed() {
    let mut env = TestEnv::new().await;
    let (account, key) = env.account_with_key("k").await;
    let rx = Receiver::ok().await;
    env.endpoint(account.id.as_str(), &rx.url, None).await;
    env.start_dispatcher(&[]);
    // On a loaded machine part of a burst can wait past the slot wait and be deferred: the
    // scheduler brings those deliveries back.
    env.start_scheduler(&[]);
    let port = laabam_tests::ports::free_port();
    let flags = env.producer_flags(port, "127.0.0.1:0", &["--api-rate-limit", "100000"]);
    let api = ApiClient::new(&format!("http://127.0.0.1:{port}")).with_token(&key);
    let start = |env: &mut TestEnv| env.spawn_binary("laabam-producer", &flags);
    let up = || async { tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() };
    let mut producer = start(&mut env);
    wait_until("the API listens", Duration::from_secs(30), up).await;
    let mut confirmed = Vec::new();
    let mut refused = 0;
    for n in 0..300 {
        if n == 120 {
            env.kill(producer);
        }
        if n == 160 {
            producer = start(&mut env);
            wait_until("the API listens again", Duration::from_secs(30), up).await;
        }
        let body =
            serde_json::json!({ "type": "payment.failed", "data": { "payment_id": format!("p{n}"), "reason": "r" } });
        match api.try_post("/v1/events", body).await {
            Some(answer) if answer.status == 202 => confirmed.push(answer.json["id"].as_str().unwrap().to_owned()),
            _ => refused += 1,
        }
    }
    let _ = producer;
    assert!(
        refused >= 40,
        "publishes while the producer was down were refused, not confirmed"
    );
    every_confirmed_event_arrives(
        "SIGKILL of the producer (HTTP API) mid-stream, restarted",
        &confirmed,
        &rx,
        Duration::from_secs(60),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_down_for_a_while_gets_everything_by_retry() {
    let mut env = TestEnv::new().await;
    let rx = Receiver::ok().await;
    let port = rx.port();
    env.endpoint("acct_d", &rx.url, None).await;
    env.start_dispatcher(&["--retry-max-attempts", "20", "--retry-max-delay", "500ms"]);
    env.start_scheduler(&[]);
    let publisher = env.publisher().await;
    let events: Vec<Envelope> = (0..100).map(|n| event("acct_d", n)).collect();
    for e in &events[..20] {
        publisher.publish(e).await.unwrap();
    }
    wait_until("first events delivered", Duration::from_secs(20), || async {
        rx.count() == 20
    })
    .await;
    // Closed before the rest is published, so those can only arrive at the receiver that comes
    // back, by retry; one of the first twenty may arrive twice (at least once), at either.
    let before = rx.shut_down().await;
    for e in &events[20..] {
        publisher.publish(e).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let back = Receiver::start_on(port, |_, _| Reply::Status(200)).await;
    let arrivals = || {
        let mut arrivals = before.clone();
        for (id, n) in back.per_event() {
            *arrivals.entry(id).or_default() += n;
        }
        arrivals
    };
    let ids = ids_of(&events);
    wait_until("everything arrived by retry", Duration::from_secs(60), || async {
        let seen = arrivals();
        ids.iter().all(|id| seen.contains_key(id))
    })
    .await;
    let arrivals = arrivals();
    let (lost, _) = fault_row("receiver down for a while, then back", &ids, &arrivals, 1);
    assert_eq!(lost, 0);
}

/// How the broker goes down in [`a_rabbitmq_node_down_and_back_loses_no_confirmed_event`].
#[derive(Debug, Clone, Copy)]
enum NodeDown {
    /// `rabbitmqctl stop`: the node closes its connections and flushes its queues first.
    Stopped,
    /// SIGKILL of its VM: a crash, with nothing flushed first.
    Killed,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_rabbitmq_node_restart_loses_no_confirmed_event() {
    a_rabbitmq_node_down_and_back_loses_no_confirmed_event(NodeDown::Stopped).await
}

/// A crash is the harder case: the broker confirms a persistent message only once it is on
/// disk, and messages delivered but not yet acknowledged come back; so whatever a publisher saw
/// confirmed is delivered, and whatever the dispatcher or scheduler was doing is done again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rabbitmq_node_killed_mid_stream_loses_no_confirmed_event() {
    a_rabbitmq_node_down_and_back_loses_no_confirmed_event(NodeDown::Killed).await
}

async fn a_rabbitmq_node_down_and_back_loses_no_confirmed_event(down: NodeDown) {
    let rabbit = OwnRabbit::start().await;
    let mut env = TestEnv::new().await;
    env.amqp_url = rabbit.url();
    let rx = Receiver::start(|_, _| Reply::After(Duration::from_millis(25), 200)).await;
    env.endpoint("acct_r", &rx.url, None).await;
    // Two requests at a time, so the first hundred are still mostly in the queue, on disk, when
    // the node goes down.
    env.start_dispatcher(&["--max-in-flight", "2"]);
    env.start_scheduler(&[]);
    let publisher = env.publisher().await;
    let mut confirmed = Vec::new();
    let mut unconfirmed = 0;
    for n in 0..300 {
        if n == 100 {
            let waiting = rabbit.messages_ready();
            assert!(waiting > 0, "events still queued when the node goes down");
            eprintln!("{waiting} events queued when the node went down ({down:?})");
            match down {
                NodeDown::Stopped => rabbit.stop(),
                NodeDown::Killed => rabbit.kill().await,
            }
        }
        if n == 130 {
            rabbit.boot().await;
        }
        let e = event("acct_r", n);
        match publisher.publish(&e).await {
            Ok(()) => confirmed.push(e.id.to_string()),
            Err(_) => {
                unconfirmed += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert!(
        unconfirmed >= 25,
        "publishes while the node was down were reported, not confirmed"
    );
    // Generous: after a node restart, the last deliveries can wait on reclaimed claims and
    // reconnect backoff (locally up to ~25 s after the reconnect; longer under a loaded CI run).
    let fault = match down {
        NodeDown::Stopped => "RabbitMQ node stopped and restarted (own node)",
        NodeDown::Killed => "RabbitMQ node killed (SIGKILL) mid-stream and restarted (own node)",
    };
    every_confirmed_event_arrives(fault, &confirmed, &rx, Duration::from_secs(180)).await;
}

/// A node that hangs, its connections open and nothing on them answered, for 40 s: every
/// process gives its connection up after two silent heartbeats (about 20 s; see
/// `AMQP_HEARTBEAT_SECS`), so the publish waiting on it is reported unconfirmed then, before
/// the 30 s confirm limit (at RabbitMQ's own 60 s heartbeat it was held 120 s with no confirm
/// limit); reconnecting meanwhile fails at the handshake limit and goes on. Nothing the broker
/// confirmed is lost, and a retry that comes due during the freeze goes out once the node
/// answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rabbitmq_node_frozen_for_40_s_loses_no_confirmed_event() {
    let rabbit = OwnRabbit::start().await;
    let mut env = TestEnv::new().await;
    env.amqp_url = rabbit.url();
    let rx = Receiver::ok().await;
    env.endpoint("acct_f", &rx.url, None).await;
    // Another account's endpoint fails its one event's first attempt; the retry comes due
    // 2.4–3.6 s later, inside the freeze.
    let retried = event("acct_fr", 0);
    let failing = Receiver::failing_first_attempt_of(retried.id.as_str()).await;
    env.endpoint("acct_fr", &failing.url, None).await;
    env.start_dispatcher(&["--retry-first-delay", "3s", "--retry-max-delay", "3s"]);
    // A claim outlasting the test: the retry must not depend on the claim expiring.
    env.start_scheduler(&["--claim-lease", "10m"]);
    let publisher = env.publisher().await;
    let events: Vec<Envelope> = (0..200).map(|n| event("acct_f", n)).collect();
    let (before, after) = events.split_at(100);
    publish_all(&publisher, before).await;
    publisher.publish(&retried).await.unwrap();
    wait_until("the first attempt failed", Duration::from_secs(30), || async {
        failing.count() == 1
    })
    .await;

    let frozen = rabbit.freeze();
    let started = Instant::now();
    let stalled = publisher.publish(&event("acct_f", 200)).await;
    let waited = started.elapsed();
    assert!(stalled.is_err(), "a publish the broker never answered is not confirmed");
    assert!(
        waited < Duration::from_secs(26),
        "the connection given up after two silent heartbeats: {waited:?}"
    );
    tokio::time::sleep(Duration::from_secs(40).saturating_sub(started.elapsed())).await;
    assert_eq!(
        failing.count(),
        1,
        "the retry waited: nothing reaches a frozen node's consumers"
    );
    frozen.thaw();

    publish_all(&publisher, after).await;
    wait_until(
        "the retry that came due during the freeze delivered",
        Duration::from_secs(90),
        || async { failing.count() == 2 },
    )
    .await;
    let confirmed = ids_of(&events);
    every_confirmed_event_arrives(
        "RabbitMQ node frozen (SIGSTOP) for 40 s, then resumed (own node)",
        &confirmed,
        &rx,
        Duration::from_secs(120),
    )
    .await;
}

/// Redis killed mid-stream, with deliveries in flight and their records still to write, and
/// started again from its append-only file after thirty more events: a dispatcher settles a
/// message only once its deliveries are begun under leases in Redis, and a delivery whose
/// outcome could not be recorded is attempted again when its lease runs out, so whatever the
/// broker confirmed is delivered. The broker stays up, so every publish is confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_stream_loses_no_confirmed_event() {
    let mut redis = OwnRedis::start();
    let mut env = TestEnv::new().await;
    env.redis_url = redis.url();
    let rx = Receiver::start(|_, _| Reply::After(Duration::from_millis(10), 200)).await;
    env.endpoint("acct_k", &rx.url, None).await;
    env.start_dispatcher(&[]);
    env.start_scheduler(&[]);
    let publisher = env.publisher().await;
    let mut confirmed = Vec::new();
    for n in 0..300 {
        if n == 100 {
            redis.stop();
        }
        if n == 130 {
            redis.restart();
        }
        let e = event("acct_k", n);
        publisher.publish(&e).await.unwrap();
        confirmed.push(e.id.to_string());
        if (100..130).contains(&n) {
            // Redis stays down for at least a second and a half.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    every_confirmed_event_arrives(
        "Redis killed (SIGKILL) mid-stream and restarted (append-only)",
        &confirmed,
        &rx,
        Duration::from_secs(180),
    )
    .await;
}

/// A memory or disk alarm makes the broker block every connection that publishes until it
/// clears. Publishing fails at once instead of at the confirm limit: the first event, which the
/// broker blocks on, arrives when the alarm clears, as its error says it may; the next is refused
/// unsent, so publishing it again delivers it once. Deliveries go on meanwhile, even with a
/// poison message to dead-letter at the head of the queue: the dispatcher publishes dead letters
/// on a connection of their own. (With them on its consuming connection, its acknowledgements
/// went unread from the first dead letter on, and it stopped at its prefetch until the alarm
/// cleared, while consuming is what lets a backlog that raised the alarm drain.) A retry that
/// comes due meanwhile waits in the retry set, not claimed: the scheduler hands back what the
/// broker blocked and claims nothing until the alarm clears (it held its claims until the
/// confirm limit, then reconnected and claimed again, every 30 s), and it goes out after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_alarm_fails_publishing_at_once_and_never_stops_delivery() {
    let rabbit = OwnRabbit::start().await;
    let mut env = TestEnv::new().await;
    env.amqp_url = rabbit.url();
    // The first attempt of event 0 fails, so its retry comes due during the alarm.
    let events: Vec<Envelope> = (0..100).map(|n| event("acct_alarm", n)).collect();
    let rx = Receiver::failing_first_attempt_of(events[0].id.as_str()).await;
    env.endpoint("acct_alarm", &rx.url, None).await;
    let publisher = env.publisher().await;
    let api = env.start_api("alarm-operator").await;
    let (_, client) = api.new_account("alarm-operator", "alarm").await;
    let poison = b"not json at all";
    env.plain_publish("invoice.created", poison, BasicProperties::default())
        .await;
    let mut confirmed = Vec::new();
    for e in &events {
        publisher.publish(e).await.unwrap();
        confirmed.push(e.id.to_string());
    }
    rabbit.memory_alarm(true).await;

    let blocked_on = event("acct_alarm", 100);
    let refused = event("acct_alarm", 101);
    for (e, expected) in [
        (&blocked_on, LinkError::BlockedUnconfirmed),
        (&refused, LinkError::Blocked),
    ] {
        let started = Instant::now();
        let err = publisher.publish(e).await.unwrap_err();
        assert!(
            matches!(&err, PublishError::Blocked(why) if why.to_string() == expected.to_string()),
            "{err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "failed after {:?}",
            started.elapsed()
        );
    }

    // The HTTP API says the same, at once: the first may still arrive, the next was not sent.
    for expected in ["may still arrive", "nothing was sent: publish it again later"] {
        let started = Instant::now();
        let answer = client
            .post(
                "/v1/events",
                json!({ "type": "payment.failed", "data": { "payment_id": "pay_api", "reason": "card_declined" } }),
            )
            .await;
        assert_eq!(answer.status, 503, "{:?}", answer.json);
        let message = answer.json["error"]["message"].as_str().unwrap();
        assert!(message.contains(expected), "{message}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "answered after {:?}",
            started.elapsed()
        );
    }

    // Counted apart from other failures, for the alert `LaabamPublishingBlocked`: two through
    // the library and two through the API, all in this process.
    let metrics = env.api_metrics().await;
    assert!(
        metrics.contains(r#"laabam_producer_events_published_total{event_type="payment.failed",result="blocked"} 4"#),
        "{metrics}"
    );

    // Eight messages at a time: the poison message and seven events, then the rest only as
    // acknowledgements are read.
    env.start_dispatcher(&["--max-in-flight", "8"]);
    env.start_scheduler(&[]);
    wait_until(
        "the backlog delivered during the alarm",
        Duration::from_secs(20),
        || async { rx.per_event().len() == 100 },
    )
    .await;
    let keys = env.store().await.keys().clone();
    let redis = redis::Client::open(env.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // Handed back (a claim of score 0, for the next round to take at once), and not taken.
    wait_until(
        "the due retry handed back while publishing is blocked",
        Duration::from_secs(15),
        || {
            let mut redis = redis.clone();
            let claimed = keys.retry_claimed(0);
            async move {
                let claims: Vec<(String, f64)> = redis::cmd("ZRANGE")
                    .arg(&claimed)
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query_async(&mut redis)
                    .await
                    .unwrap();
                matches!(claims.as_slice(), [(_, score)] if *score == 0.0)
            }
        },
    )
    .await;
    // Shown to operators (`LaabamPublishingBlocked`), and only by this test's scheduler: the
    // others in this process never see a block.
    let scheduler_blocked = || laabam_retry_scheduler::metrics::METRICS.publishing_blocked.get();
    wait_until(
        "the scheduler shows publishing blocked",
        Duration::from_secs(15),
        || async { scheduler_blocked() == 1 },
    )
    .await;

    rabbit.memory_alarm(false).await;
    wait_until(
        "the poison message dead-lettered once the alarm cleared",
        Duration::from_secs(60),
        || async {
            env.get_message(topology::DEAD_QUEUE)
                .await
                .is_some_and(|m| m.delivery.data == poison)
        },
    )
    .await;
    confirmed.push(blocked_on.id.to_string());
    publisher.publish(&refused).await.unwrap();
    confirmed.push(refused.id.to_string());
    wait_until(
        "both events of the alarm delivered, and the retry",
        Duration::from_secs(20),
        || async {
            let seen = rx.per_event();
            seen.len() == 102 && seen.get(confirmed[0].as_str()) == Some(&2)
        },
    )
    .await;
    assert_eq!(
        scheduler_blocked(),
        0,
        "the retry went out, so publishing is no longer shown blocked"
    );
    let mut arrivals = rx.per_event();
    *arrivals.get_mut(confirmed[0].as_str()).unwrap() -= 1; // its failed first attempt
    let (lost, duplicates) = fault_row(
        "RabbitMQ memory alarm, a poison message first (own node)",
        &confirmed,
        &arrivals,
        1,
    );
    assert_eq!((lost, duplicates), (0, 0));
}
