//! What the platform keeps aside instead of losing (events no queue was bound for, dead
//! letters) is sent back by `laabam-producer replay` once the cause is gone, and delivered.

use laabam_shared::envelope::Envelope;
use laabam_shared::topology;
use laabam_tests::env::sample_events;
use laabam_tests::{Receiver, TestEnv, wait_until};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::Value;
use std::time::Duration;

fn replay(env: &TestEnv, kept: &str) -> Value {
    let out = env.producer(&["replay", kept]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Events published while the dispatch queue had no binding (deleted and declared again by
/// hand, say) went to `laabam.unroutable`; replayed after the topology is declared again, each
/// is delivered once, and a second replay finds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_events_are_delivered_once_replayed() {
    let mut env = TestEnv::new().await;
    let rx = Receiver::ok().await;
    env.endpoint("acct_kept", &rx.url, None).await;
    let publisher = env.publisher().await;
    let conn = laabam_shared::startup::amqp_connect(&env.amqp_url, "laabam-test")
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .queue_unbind(
            topology::DISPATCH_QUEUE.into(),
            topology::EVENTS_EXCHANGE.into(),
            "#".into(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let events = sample_events("acct_kept", 3);
    for e in &events {
        publisher.publish(e).await.unwrap();
    }
    env.start_dispatcher(&[]);
    let replayed = replay(&env, "unroutable");
    assert_eq!(
        replayed,
        serde_json::json!({ "queue": "laabam.unroutable", "replayed": 3 })
    );
    wait_until("the replayed events delivered", Duration::from_secs(20), || async {
        rx.per_event().len() == 3
    })
    .await;
    assert_eq!(replay(&env, "unroutable")["replayed"], 0);
    let seen = rx.per_event();
    for e in &events {
        assert_eq!(seen.get(e.id.as_str()), Some(&1), "{}", e.id);
    }
}

/// A dead letter goes back to the exchange it was first published to: an event a dispatcher of
/// an earlier version could not handle is delivered, and one still poison is dead-lettered
/// again, once, with a fresh reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_go_back_where_they_came_from() {
    let mut env = TestEnv::new().await;
    let rx = Receiver::ok().await;
    env.endpoint("acct_kept", &rx.url, None).await;
    env.declare_topology().await;
    let dead = |reason: &str| {
        let mut headers = FieldTable::default();
        headers.insert(
            topology::DEAD_REASON_HEADER.into(),
            AMQPValue::LongString(reason.into()),
        );
        headers.insert(
            topology::DEAD_DETAIL_HEADER.into(),
            AMQPValue::LongString("detail".into()),
        );
        headers.insert(
            topology::ORIGINAL_EXCHANGE_HEADER.into(),
            AMQPValue::LongString(topology::EVENTS_EXCHANGE.into()),
        );
        BasicProperties::default().with_headers(headers)
    };
    let revived: &Envelope = &sample_events("acct_kept", 1)[0];
    env.plain_publish_to(
        topology::DEAD_EXCHANGE,
        &revived.event_type,
        &revived.to_json(),
        dead("unknown_type"),
    )
    .await;
    let poison = b"still not json";
    env.plain_publish_to(topology::DEAD_EXCHANGE, "invoice.created", poison, dead("old_reason"))
        .await;
    env.start_dispatcher(&[]);

    assert_eq!(replay(&env, "dead")["replayed"], 2);
    wait_until("the revived event delivered", Duration::from_secs(20), || async {
        rx.count() == 1
    })
    .await;
    assert_eq!(rx.requests()[0].header("webhook-id"), revived.id.as_str());
    let again = std::sync::Mutex::new(None);
    wait_until(
        "the poison message dead-lettered again",
        Duration::from_secs(20),
        || async {
            let got = env.get_message(topology::DEAD_QUEUE).await;
            let found = got.is_some();
            if found {
                *again.lock().unwrap() = got;
            }
            found
        },
    )
    .await;
    let again = again.into_inner().unwrap().unwrap();
    assert_eq!(again.delivery.data, poison);
    let headers = again.delivery.properties.headers().clone().unwrap_or_default();
    assert_eq!(
        headers.inner().get(topology::DEAD_REASON_HEADER),
        Some(&AMQPValue::LongString("invalid_json".into()))
    );
    assert!(
        env.get_message(topology::DEAD_QUEUE).await.is_none(),
        "dead-lettered once"
    );
}
