//! The sharded queue layout (`LAABAM_DISPATCH_QUEUES` > 1): publishers keep publishing to
//! `laabam.events`; the broker spreads events over the dispatch queues by a hash of their
//! `message_id`, and a dispatcher consumes them all. Retry jobs spread the same way over one
//! retry queue per dispatch queue. And the retry set's shards (`LAABAM_RETRY_SHARDS`): a count
//! changed, even lowered, strands no retry.

use laabam_shared::clock::now_ms;
use laabam_shared::delivery::RetryJob;
use laabam_shared::ids::{AccountId, DeliveryId, EndpointId, EventId};
use laabam_shared::store::StoreConfig;
use laabam_shared::topology::{self, Layout};
use laabam_tests::env::{publish_all, sample_events};
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

/// The depth of each of `queues`, which must exist.
async fn depths(env: &TestEnv, queues: &[String]) -> Vec<u32> {
    let mut depths = Vec::new();
    for queue in queues {
        depths.push(queue_depth(env, queue).await.expect("the queue exists"));
    }
    depths
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

    let depths = depths(&env, &layout.routed_dispatch_queues()).await;
    assert_eq!(
        depths.iter().sum::<u32>(),
        65,
        "every event is in exactly one queue: {depths:?}"
    );
    assert!(depths.iter().all(|&d| d > 0), "every queue gets a share: {depths:?}");
    assert_eq!(
        queue_depth(&env, topology::DISPATCH_QUEUE).await.unwrap(),
        0,
        "the single layout's queue gets no copies"
    );

    env.start_dispatcher(&["--dispatch-queues", "3"]);
    // On a loaded machine part of a burst can wait past the slot wait and be deferred: the
    // scheduler brings those deliveries back.
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
    wait_until("the other 29 jobs queued", Duration::from_secs(30), || async {
        depths(&env, &shards).await.iter().sum::<u32>() == 29
    })
    .await;
    let depths = depths(&env, &shards).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lowering_the_retry_shard_count_strands_no_retry() {
    retries_left_in_four_shards_drain_on_one(false).await;
}

/// A process that wrote to shards after its count was forgotten, and stopped before it could
/// announce it again, leaves retries that no announced count covers; the scheduler's sweep
/// finds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_in_shards_no_announced_count_covers_are_found_by_the_sweep() {
    retries_left_in_four_shards_drain_on_one(true).await;
}

/// Retries wait in four shards; then everything runs on one shard, with the four-shard
/// process's announcement still there or (`forgotten`) gone.
async fn retries_left_in_four_shards_drain_on_one(forgotten: bool) {
    let mut env = TestEnv::new().await;
    let rx = Receiver::failing_first_attempts(Reply::Status(500)).await;
    env.endpoint("acct_rs", &rx.url, None).await;
    // A dispatcher on four shards and no scheduler: every event's retry waits in one of them.
    let flags = env.dispatcher_flags(&["--retry-shards", "4"]);
    let four_shards = env.spawn_binary("laabam-dispatcher", &flags);
    let events = sample_events("acct_rs", 24);
    publish_all(&env.publisher().await, &events).await;
    let four = TestEnv::connect_store(&StoreConfig {
        retry_shards: 4,
        ..env.store_config()
    })
    .await;
    wait_until("a retry for every event", Duration::from_secs(30), || async {
        four.retry_backlog().await.unwrap() == 24
    })
    .await;
    let one = env.store().await;
    assert!(
        one.retry_backlog().await.unwrap() < 24,
        "some retries wait in shards a single-shard process does not use"
    );
    assert!(env.terminate(four_shards).await.success());
    if forgotten {
        let mut redis = env.redis().await;
        let _: () = redis::AsyncCommands::del(&mut redis, one.keys().retry_shard_counts())
            .await
            .unwrap();
    }

    // Everything now runs on one shard; the scheduler says it drains four.
    let metrics_port = laabam_tests::ports::free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let flags = env.scheduler_flags(&["--metrics-addr", &metrics_addr]);
    env.spawn_binary("laabam-retry-scheduler", &flags);
    env.start_dispatcher(&[]);
    wait_until(
        "the scheduler claims from four shards",
        Duration::from_secs(30),
        || async {
            tokio::net::TcpStream::connect(&metrics_addr).await.is_ok()
                && laabam_tests::api::plain_text(&format!("http://{metrics_addr}/metrics"))
                    .await
                    .contains("laabam_scheduler_retry_shards 4")
        },
    )
    .await;
    wait_until("every event retried", Duration::from_secs(30), || async {
        let seen = rx.per_event();
        events.iter().all(|e| seen.get(e.id.as_str()) == Some(&2))
    })
    .await;
    wait_until("every shard empty", Duration::from_secs(10), || async {
        four.retry_backlog().await.unwrap() == 0
    })
    .await;
    assert!(
        rx.per_event().values().all(|&n| n == 2),
        "each event failed once, then arrived once"
    );
}

#[tokio::test]
async fn another_shard_count_is_claimed_over_while_announced_or_holding_jobs() {
    let env = TestEnv::new().await;
    let one = env.store().await;
    let four = TestEnv::connect_store(&StoreConfig {
        retry_shards: 4,
        ..env.store_config()
    })
    .await;
    let now = now_ms();
    assert_eq!(one.retry_shards_to_claim(now).await.unwrap(), 1);
    four.announce_retry_shards(now).await.unwrap();
    assert_eq!(one.retry_shards_to_claim(now).await.unwrap(), 4, "announced lately");
    assert_eq!(
        four.retry_shards_to_claim(now).await.unwrap(),
        4,
        "never fewer than its own"
    );

    // Long after the announcement, a job left in an extra shard still holds it, claimed or not.
    let later = now + 3_600_000;
    let mut redis = env.redis().await;
    let _: () = redis::AsyncCommands::zadd(&mut redis, one.keys().retry_due(3), "job", now)
        .await
        .unwrap();
    assert_eq!(one.retry_shards_to_claim(later).await.unwrap(), 4, "a job waits");
    let claimed = one.claim_due(3, later, later + 1_000, 10).await.unwrap().jobs;
    assert_eq!(claimed, ["job"]);
    assert_eq!(one.retry_shards_to_claim(later).await.unwrap(), 4, "a claim is held");
    one.release_claimed(3, &claimed).await.unwrap();
    assert_eq!(one.retry_shards_to_claim(later).await.unwrap(), 1, "drained and lapsed");
    assert_eq!(
        one.retry_shards_to_claim(now).await.unwrap(),
        1,
        "the lapsed count is forgotten, not only passed over"
    );
    four.announce_retry_shards(later).await.unwrap();
    assert_eq!(one.retry_shards_to_claim(later).await.unwrap(), 4, "announced again");
}

#[tokio::test]
async fn a_sweep_announces_a_count_covering_every_shard_that_holds_jobs() {
    let env = TestEnv::new().await;
    let one = env.store().await;
    let now = now_ms();
    assert_eq!(one.sweep_retry_shards(1, now).await.unwrap(), None, "nothing anywhere");
    let mut redis = env.redis().await;
    // A job in shard 6 and a claim in shard 900, neither under any announced count.
    let _: () = redis::AsyncCommands::zadd(&mut redis, one.keys().retry_due(6), "job", now)
        .await
        .unwrap();
    let _: () = redis::AsyncCommands::zadd(&mut redis, one.keys().retry_claimed(900), "claim", now)
        .await
        .unwrap();
    assert_eq!(one.retry_shards_to_claim(now).await.unwrap(), 1, "no count covers them");
    assert_eq!(one.sweep_retry_shards(1, now).await.unwrap(), Some(901));
    assert_eq!(one.retry_shards_to_claim(now).await.unwrap(), 901, "now one does");
    assert_eq!(
        one.sweep_retry_shards(901, now).await.unwrap(),
        None,
        "nothing past what is claimed"
    );
    let _: () = redis::AsyncCommands::del(&mut redis, one.keys().retry_claimed(900))
        .await
        .unwrap();
    assert_eq!(one.sweep_retry_shards(1, now).await.unwrap(), Some(7), "the job alone");
    let _: () = redis::AsyncCommands::del(&mut redis, one.keys().retry_due(6))
        .await
        .unwrap();
    let later = now + 3_600_000;
    assert_eq!(
        one.retry_shards_to_claim(later).await.unwrap(),
        1,
        "drained, the swept counts lapse like announced ones"
    );
}

/// `laabam-producer topology` with the given layout; its exit status and JSON.
fn declare_and_retire(env: &TestEnv, dispatch_queues: u16) -> (bool, serde_json::Value, String) {
    let out = env.producer(&["--dispatch-queues", &dispatch_queues.to_string(), "topology"]);
    let json = serde_json::from_slice(&out.stdout).unwrap_or_default();
    (
        out.status.success(),
        json,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// How many messages `laabam-producer topology` reported moving out of `queue`.
fn moved_out_of(retired: &serde_json::Value, queue: &str) -> u64 {
    retired["retired"]
        .as_array()
        .expect("a list of retired queues")
        .iter()
        .filter(|r| r["queue"] == queue)
        .map(|r| r["moved"].as_u64().expect("a count"))
        .sum()
}

/// Changing `LAABAM_DISPATCH_QUEUES` strands nothing and copies nothing. Going from one queue to
/// three unbinds the single queue (else it would take a copy of every event for good) while
/// dispatchers drain what it holds; going down to two and then to one, `laabam-producer
/// topology` moves what the surplus shard queues hold back through the exchanges and deletes
/// them, refusing while a dispatcher of the former layout still consumes one. Every event
/// arrives exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_the_number_of_dispatch_queues_strands_nothing_and_copies_nothing() {
    let mut env = TestEnv::new().await;
    let rx = Receiver::ok().await;
    env.endpoint("acct_switch", &rx.url, None).await;
    let url = env.amqp_url.clone();
    let (one, two, three) = (
        Layout::default(),
        Layout { dispatch_queues: 2 },
        Layout { dispatch_queues: 3 },
    );
    let mut sent = 0;
    let mut publish = async |layout, n| {
        let publisher = laabam_producer::Publisher::connect(&url, Duration::from_secs(10), layout)
            .await
            .expect("RabbitMQ reachable");
        publish_all(&publisher, &sample_events("acct_switch", n)).await;
        sent += n;
    };

    // One queue to three.
    publish(one, 10).await;
    publish(three, 30).await;
    assert_eq!(
        queue_depth(&env, topology::DISPATCH_QUEUE).await.unwrap(),
        10,
        "no copies"
    );
    assert_eq!(
        depths(&env, &three.routed_dispatch_queues()).await.iter().sum::<u32>(),
        30
    );
    // Part of a burst can be deferred on a loaded machine: a scheduler brings those back.
    let sharded = ["--dispatch-queues", "3"];
    let flags = env.dispatcher_flags(&sharded);
    let dispatcher = env.spawn_binary("laabam-dispatcher", &flags);
    let flags = env.scheduler_flags(&sharded);
    let scheduler = env.spawn_binary("laabam-retry-scheduler", &flags);
    wait_until(
        "the events of both layouts delivered",
        Duration::from_secs(30),
        || async { rx.count() >= 40 },
    )
    .await;

    // Three to two, refused while that dispatcher still consumes the third shard.
    let (ok, _, stderr) = declare_and_retire(&env, 2);
    assert!(
        !ok && stderr.contains("laabam.dispatch.2 still has 1 consumer(s)"),
        "{stderr}"
    );
    assert!(env.terminate(dispatcher).await.success());
    assert!(env.terminate(scheduler).await.success());
    publish(three, 30).await;
    let held = depths(&env, &["laabam.dispatch.2".to_owned()]).await[0];
    assert!(held > 0, "the third shard holds some events");
    let job = RetryJob {
        event: EventId::generate(),
        endpoint: EndpointId::generate(),
        delivery: DeliveryId::for_pair(&EventId::generate(), &EndpointId::generate()),
        account: AccountId::parse("acct_switch").unwrap(),
    }
    .encode();
    env.plain_publish_to(
        topology::RETRY_EXCHANGE,
        "retry.2",
        job.as_bytes(),
        lapin::BasicProperties::default(),
    )
    .await;
    let (ok, retired, stderr) = declare_and_retire(&env, 2);
    assert!(ok, "{stderr}");
    assert_eq!(moved_out_of(&retired, "laabam.dispatch.2"), u64::from(held));
    assert!(moved_out_of(&retired, "laabam.retries.2") >= 1, "{retired}");
    assert!(queue_depth(&env, "laabam.dispatch.2").await.is_err(), "deleted");
    assert!(queue_depth(&env, "laabam.retries.2").await.is_err(), "deleted");
    let mut requeued = Vec::new();
    while let Some(message) = env.get_message(topology::RETRY_QUEUE).await {
        requeued.push(message.delivery.data);
    }
    assert!(requeued.contains(&job.into_bytes()), "the job moved to the retry queue");
    publish(two, 20).await;
    assert_eq!(
        depths(&env, &two.routed_dispatch_queues()).await.iter().sum::<u32>(),
        30 + 20,
        "the moved events and the new ones, all in the two shards left"
    );

    // Two to one: the single layout routes no more events into the shards.
    publish(one, 5).await;
    assert_eq!(queue_depth(&env, topology::DISPATCH_QUEUE).await.unwrap(), 5);
    let (ok, retired, stderr) = declare_and_retire(&env, 1);
    assert!(ok, "{stderr}");
    let moved = moved_out_of(&retired, "laabam.dispatch.0") + moved_out_of(&retired, "laabam.dispatch.1");
    assert_eq!(moved, 50);
    assert_eq!(queue_depth(&env, topology::DISPATCH_QUEUE).await.unwrap(), 55);
    env.start_dispatcher(&[]);
    env.start_scheduler(&[]);
    wait_until("every event delivered", Duration::from_secs(30), || async {
        rx.count() >= sent
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.count(), sent);
    assert!(rx.per_event().values().all(|&n| n == 1), "each event once");
}

/// Messages the broker has handed to consumers of this test's queues and not yet seen
/// acknowledged, summed over `queues`.
async fn unacknowledged(env: &TestEnv, queues: Vec<String>) -> u64 {
    let vhost = env.name.clone();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new("rabbitmqctl")
            .args(["list_queues", "-q", "-p", &vhost, "name", "messages_unacknowledged"])
            .output()
            .expect("rabbitmqctl runs");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| line.split_once('\t'))
            .filter(|(name, _)| queues.iter().any(|q| q == name))
            .map(|(_, count)| count.trim().parse::<u64>().unwrap_or(0))
            .sum()
    })
    .await
    .unwrap()
}

/// However many queues a layout has, a dispatcher holds at most about `LAABAM_MAX_IN_FLIGHT`
/// events unacknowledged: RabbitMQ applies prefetch to each consumer, so the cap is shared out
/// among the queues instead of granted to each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharded_dispatcher_buffers_no_more_events_than_its_in_flight_cap() {
    let mut env = TestEnv::new().await;
    // Every attempt hangs, and the wait budget outlasts the test, so none is judged slow (cut
    // short or deferred): once the 8 slots hold attempts, what the broker pushes stays
    // buffered and unacknowledged.
    let rx = Receiver::start(|_, _| Reply::After(Duration::from_secs(30), 200)).await;
    env.endpoint("acct_prefetch", &rx.url, None).await;
    let layout = Layout { dispatch_queues: 3 };
    let publisher = laabam_producer::Publisher::connect(&env.amqp_url, Duration::from_secs(10), layout)
        .await
        .expect("RabbitMQ reachable");
    publish_all(&publisher, &sample_events("acct_prefetch", 120)).await;
    env.start_dispatcher(&["--dispatch-queues", "3", "--max-in-flight", "8", "--slot-wait", "60s"]);
    wait_until("every slot holds an attempt", Duration::from_secs(30), || async {
        rx.count() >= 8
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = unacknowledged(&env, layout.dispatch_queues()).await;
    assert!(held > 0, "the broker pushed ahead");
    assert!(held <= 8, "{held} events unacknowledged with room for 8 in flight");
}
