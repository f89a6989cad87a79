//! The sharded queue layout (`LAABAM_DISPATCH_QUEUES` > 1): publishers keep publishing to
//! `laabam.events`; the broker spreads events over the dispatch queues by a hash of their
//! `message_id`, and a dispatcher consumes them all. Retry jobs spread the same way over one
//! retry queue per dispatch queue.

use laabam_shared::clock::now_ms;
use laabam_shared::topology::{self, Layout};
use laabam_tests::{Receiver, Reply, TestEnv, wait_until};
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

/// The scheduler spreads retry jobs over the sharded layout's retry queues, and dispatchers
/// also drain the single layout's retry queue, so a job queued there before the switch is not
/// stranded. Every event's retry arrives exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_jobs_spread_over_sharded_retry_queues_and_none_queued_before_is_stranded() {
    let mut env = TestEnv::new().await;
    let rx = Receiver::failing_first_attempts(Reply::Status(500)).await;
    env.endpoint("acct_rq", &rx.url, None).await;
    let layout = Layout { dispatch_queues: 3 };
    let sharded = ["--dispatch-queues", "3"];
    // A dispatcher and no scheduler: every event's retry job waits in the due set.
    let flags = env.dispatcher_flags(&sharded);
    let first = env.spawn_binary("laabam-dispatcher", &flags);
    let publisher = laabam_producer::Publisher::connect(&env.amqp_url, Duration::from_secs(10), layout)
        .await
        .expect("RabbitMQ reachable");
    let events = laabam_tests::env::sample_events("acct_rq", 30);
    laabam_tests::env::publish_all(&publisher, &events).await;
    let store = env.store().await;
    wait_until("a retry job for every event", Duration::from_secs(30), || async {
        store.retry_backlog().await.unwrap() == 30
    })
    .await;
    assert!(env.terminate(first).await.success());

    // One job goes out as a scheduler of the single layout sent it.
    let far = now_ms() + 600_000;
    let before_switch = store.claim_due(0, far, far, 1).await.unwrap().jobs;
    env.plain_publish_to(
        topology::RETRY_EXCHANGE,
        topology::RETRY_ROUTING_KEY,
        before_switch[0].as_bytes(),
        BasicProperties::default(),
    )
    .await;
    store.release_claimed(0, &before_switch).await.unwrap();

    env.start_scheduler(&sharded);
    let shards: Vec<String> = layout.retry_queues().into_iter().skip(1).collect();
    let depths = || async {
        let mut depths = Vec::new();
        for queue in &shards {
            depths.push(queue_depth(&env, queue).await.expect("the retry shard exists"));
        }
        depths
    };
    wait_until("the other 29 jobs queued", Duration::from_secs(30), || async {
        depths().await.iter().sum::<u32>() == 29
    })
    .await;
    let depths = depths().await;
    assert_eq!(depths.len(), 3);
    assert!(
        depths.iter().all(|&d| d > 0),
        "every retry queue gets a share: {depths:?}"
    );
    assert_eq!(queue_depth(&env, topology::RETRY_QUEUE).await.unwrap(), 1);

    env.start_dispatcher(&sharded);
    wait_until("every event retried", Duration::from_secs(30), || async {
        let seen = rx.per_event();
        events.iter().all(|e| seen.get(e.id.as_str()) == Some(&2))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        rx.per_event().values().all(|&n| n == 2),
        "each event failed once, then arrived once"
    );
    for queue in shards.iter().map(String::as_str).chain([topology::RETRY_QUEUE]) {
        assert_eq!(queue_depth(&env, queue).await.unwrap(), 0, "{queue} drained");
    }
}
