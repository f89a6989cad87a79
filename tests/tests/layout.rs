//! The sharded queue layout (`LAABAM_DISPATCH_QUEUES` > 1): publishers keep publishing to
//! `laabam.events`; the broker spreads events over the dispatch queues by a hash of their
//! `message_id`, and a dispatcher consumes them all.

use laabam_shared::topology::{self, Layout};
use laabam_tests::{Receiver, TestEnv, wait_until};
use lapin::BasicProperties;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use std::time::Duration;

async fn queue_depth(env: &TestEnv, queue: &str) -> Result<u32, lapin::Error> {
    let conn = laabam_shared::startup::amqp_connect(&env.amqp_url, "layout-test").await?;
    let channel = conn.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let depth = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .map(|q| q.message_count());
    let _ = conn.close(200, "done".into()).await;
    depth
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_spread_over_sharded_queues_and_each_is_delivered_once() {
    let mut env = TestEnv::new().await;
    let rx = Receiver::ok().await;
    env.endpoint("acct_shards", &rx.url, None).await;
    let layout = Layout { dispatch_queues: 3 };
    let publisher = laabam_producer::Publisher::connect(&env.amqp_url, Duration::from_secs(10), layout)
        .await
        .expect("RabbitMQ reachable");
    let events = laabam_tests::env::sample_events("acct_shards", 60);
    laabam_tests::env::publish_all(&publisher, &events).await;
    // A plain publisher that sets no message_id: still routed (to one fixed queue).
    for i in 0..5 {
        let body = format!(
            r#"{{"id":"evt_plain_{i}","type":"customer.created","account_id":"acct_shards","data":{{"customer_id":"c{i}","name":"n","email":"e@example.com"}}}}"#
        );
        env.plain_publish("customer.created", body.as_bytes(), BasicProperties::default())
            .await;
    }

    let mut depths = Vec::new();
    for queue in layout.dispatch_queues() {
        depths.push(queue_depth(&env, &queue).await.expect("the shard queue exists"));
    }
    assert_eq!(
        depths.iter().sum::<u32>(),
        65,
        "every event is in exactly one queue: {depths:?}"
    );
    assert!(depths.iter().all(|&d| d > 0), "every queue gets a share: {depths:?}");
    assert!(
        queue_depth(&env, topology::DISPATCH_QUEUE).await.is_err(),
        "the single-queue layout is not declared"
    );

    env.start_dispatcher(&["--dispatch-queues", "3"]);
    // A new endpoint's first burst is partly deferred (nothing says yet that it answers fast):
    // the scheduler brings those deliveries back.
    env.start_scheduler(&["--dispatch-queues", "3"]);
    wait_until("all 65 events delivered", Duration::from_secs(30), || async {
        rx.count() >= 65
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.count(), 65);
    assert!(rx.per_event().values().all(|&n| n == 1), "each event once");
}
