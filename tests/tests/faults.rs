//! Poison messages are dead-lettered with a reason and the stream goes on; a dispatcher killed
//! mid-burst loses nothing that the broker confirmed.

use futures_util::future::join_all;
use laabam_shared::clock::now_ms;
use laabam_shared::envelope::Envelope;
use laabam_shared::ids::AccountId;
use laabam_shared::topology;
use laabam_tests::{Receiver, Reply, TestEnv, wait_until};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::time::Duration;

fn event(account: &str, n: usize) -> Envelope {
    let data = RawValue::from_string(format!(r#"{{"invoice_id":"inv_{n}","status":"open","amount":{n}}}"#)).unwrap();
    Envelope::new(
        "invoice.created",
        AccountId::parse(account).unwrap(),
        data,
        None,
        now_ms(),
    )
    .unwrap()
}

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
    ];
    let conn = Connection::connect(&env.amqp_url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    for (key, body, _) in &poison {
        channel
            .basic_publish(
                topology::EVENTS_EXCHANGE.into(),
                (*key).into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let good = event("acct_a", 1);
    env.publisher().await.publish(&good).await.unwrap();
    wait_until("the good event after the poison", Duration::from_secs(20), || async {
        rx.count() == 1
    })
    .await;
    assert_eq!(rx.requests()[0].header("webhook-id"), good.id.as_str());

    let mut reasons: HashMap<Vec<u8>, String> = HashMap::new();
    while reasons.len() < poison.len() {
        let msg = env
            .get_message(topology::DEAD_QUEUE)
            .await
            .expect("a dead letter per poison message");
        let headers = msg.delivery.properties.headers().clone().unwrap_or_default();
        let reason = match headers.inner().get(topology::DEAD_REASON_HEADER) {
            Some(AMQPValue::LongString(s)) => s.to_string(),
            other => panic!("reason header missing: {other:?}"),
        };
        assert!(headers.inner().contains_key("x-laabam-dead-detail"));
        reasons.insert(msg.delivery.data.clone(), reason);
    }
    for (_, body, reason) in &poison {
        assert_eq!(
            reasons.get(body).map(String::as_str),
            Some(*reason),
            "{}",
            String::from_utf8_lossy(&body[..body.len().min(60)])
        );
    }
    conn.close(200, "done".into()).await.unwrap();
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
    for chunk in events.chunks(100) {
        assert!(
            join_all(chunk.iter().map(|e| publisher.publish(e)))
                .await
                .iter()
                .all(Result::is_ok)
        );
    }
    wait_until("the burst under way", Duration::from_secs(30), || async {
        rx.count() >= 100
    })
    .await;
    env.kill(first);
    let at_kill = rx.count();
    env.spawn_binary("laabam-dispatcher", &flags);

    wait_until("every confirmed event delivered", Duration::from_secs(60), || async {
        let seen = rx.per_event();
        events.iter().all(|e| seen.contains_key(e.id.as_str()))
    })
    .await;
    let duplicates: usize = rx.per_event().values().map(|n| n - 1).sum();
    println!("killed after {at_kill} requests; 600 confirmed, 600 delivered, 0 lost, {duplicates} duplicates");
    assert!(at_kill < 600, "the kill happened mid-burst");
    for req in rx.requests() {
        assert!(events.iter().any(|e| e.id.as_str() == req.header("webhook-id")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_by_the_broker_are_reestablished_by_every_process() {
    let mut env = TestEnv::new().await;
    let rx = Receiver::ok().await;
    env.endpoint("acct_c", &rx.url, None).await;
    env.start_dispatcher(&[]);
    env.start_scheduler(&[]);
    let publisher = env.publisher().await;
    publisher.publish(&event("acct_c", 1)).await.unwrap();
    wait_until("first event", Duration::from_secs(20), || async { rx.count() == 1 }).await;

    env.cut_connections().await;

    // The publisher reports what the broker did not confirm, then reconnects by itself.
    let after = event("acct_c", 2);
    let mut unconfirmed = 0;
    while publisher.publish(&after).await.is_err() {
        unconfirmed += 1;
        assert!(unconfirmed < 50, "the publisher never reconnected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("publishes reported unconfirmed during the cut: {unconfirmed}");
    wait_until(
        "the dispatcher reconnected and delivered",
        Duration::from_secs(30),
        || async { rx.per_event().contains_key(after.id.as_str()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_claimed_by_a_scheduler_that_died_is_reclaimed_and_delivered() {
    let mut env = TestEnv::new().await;
    let rx = Receiver::start(|_, nth| {
        if nth == 0 {
            Reply::Status(500)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let ep = env.endpoint("acct_r", &rx.url, None).await;
    env.start_dispatcher(&[]);
    let store = env.store().await;
    let e = event("acct_r", 1);
    env.publisher().await.publish(&e).await.unwrap();
    let delivery = laabam_shared::ids::DeliveryId::for_pair(&e.id, &ep.id);
    wait_until("first attempt failed", Duration::from_secs(20), || async {
        store
            .delivery(&delivery)
            .await
            .unwrap()
            .is_some_and(|d| d.status == laabam_shared::delivery::DeliveryStatus::Retrying)
    })
    .await;

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
            .is_some_and(|d| d.status == laabam_shared::delivery::DeliveryStatus::Succeeded)
    })
    .await;
    assert_eq!(rx.count(), 2);
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
    for chunk in events.chunks(50) {
        assert!(
            join_all(chunk.iter().map(|e| publisher.publish(e)))
                .await
                .iter()
                .all(Result::is_ok)
        );
    }
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
    let duplicates: usize = rx.per_event().values().map(|n| n - 1).sum();
    println!("SIGTERM after {at_exit} requests; 200 confirmed, 200 delivered, 0 lost, {duplicates} duplicates");
    assert_eq!(
        duplicates, 0,
        "a graceful stop finishes what it started and hands back the rest"
    );
}
