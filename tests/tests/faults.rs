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
