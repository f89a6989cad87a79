//! `retry-backlog`: a million pending retries written to Redis, re-queued by the scheduler.

use crate::components::log_level;
use crate::load::events;
use crate::measure::{Meter, Run, bench_env, redis_memory, redis_port, rest_named};
use crate::scrape::{counter, histogram_quantile, scrape};
use futures_util::StreamExt;
use laabam_shared::clock::now_ms;
use laabam_shared::ids::AccountId;
use laabam_shared::topology;
use laabam_tests::ports::free_port;
use laabam_tests::{TestEnv, wait_until};
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// `n` pending retries (deliveries of n/10 events to ten endpoints each, as a failing fan-out
/// leaves them) due evenly over `spread`: the scheduler's re-queue rate and due lag, and Redis
/// bytes per pending retry.
pub(crate) async fn retry_backlog(n: usize, spread: Duration) -> Run {
    let mut env = bench_env().await;
    let store = env.store().await;
    let keys = laabam_shared::store::Keys::new(&env.prefix, 1);
    let client = redis::Client::open(env.redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let account = AccountId::parse("acct_bench").unwrap();
    let endpoints: Vec<_> = (0..10).map(|_| laabam_shared::ids::EndpointId::generate()).collect();
    let before = redis_memory(redis_port());
    // Writing the backlog takes a while: the first job comes due after it is written.
    let lead = Duration::from_secs(150);
    let start_ms = now_ms() + lead.as_millis() as i64;
    let per_event = endpoints.len();
    let body = events(1)[0].to_json();
    for chunk in (0..n / per_event).collect::<Vec<_>>().chunks(1_000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            let event = laabam_shared::ids::EventId::generate();
            pipe.set_ex(keys.event(&account, &event), &body, 3600).ignore();
            for (k, endpoint) in endpoints.iter().enumerate() {
                let delivery = laabam_shared::ids::DeliveryId::for_pair(&event, endpoint);
                let due = start_ms + (spread.as_millis() as usize * (i * per_event + k) / n) as i64;
                let job = laabam_shared::delivery::RetryJob {
                    delivery: delivery.clone(),
                    event: event.clone(),
                    endpoint: endpoint.clone(),
                    account: account.clone(),
                };
                pipe.hset_multiple(
                    keys.delivery(&delivery),
                    &[
                        ("event", event.as_str().to_owned()),
                        ("endpoint", endpoint.as_str().to_owned()),
                        ("account", account.as_str().to_owned()),
                        ("type", "invoice.paid".to_owned()),
                        ("status", "retrying".to_owned()),
                        ("attempts", "1".to_owned()),
                        ("cycle_start", "0".to_owned()),
                        ("created", start_ms.to_string()),
                        ("first_attempt", start_ms.to_string()),
                        ("next_attempt", due.to_string()),
                    ],
                )
                .ignore()
                .expire(keys.delivery(&delivery), 3600)
                .ignore()
                .zadd(keys.retry_due(0), job.encode(), due)
                .ignore();
            }
        }
        pipe.query_async::<()>(&mut conn).await.unwrap();
    }
    drop(store);
    let bytes = redis_memory(redis_port()) as i64 - before as i64;
    let job_and_event: i64 = {
        let job: i64 = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(keys.retry_due(0))
            .query_async(&mut conn)
            .await
            .unwrap();
        job / n as i64 + (body.len() as i64 + 80) / per_event as i64
    };
    println!(
        "  {n} pending retries: Redis +{} MiB, {} bytes per pending retry with its delivery state, about {job_and_event} bytes for the job and its share of the event",
        bytes / 1_048_576,
        bytes / n as i64
    );
    let port = free_port();
    let mut sflags = env.connection_flags();
    sflags.extend(["--metrics-addr".into(), format!("127.0.0.1:{port}")]);
    let scheduler = env.spawn_binary_with("laabam-retry-scheduler", &sflags, &[("RUST_LOG", &log_level())], None);
    let ours = [("scheduler", scheduler)];
    // Dispatchers take re-queued jobs as they come. Left in the queue, a million of them would
    // measure how the broker pages a queue that deep, not how fast jobs are re-queued.
    let drained = Arc::new(AtomicUsize::new(0));
    let drain = drain_retry_queue(&env, drained.clone()).await;
    let idle = Duration::from_millis((start_ms - now_ms()).max(0) as u64);
    if idle.is_zero() {
        println!("  warning: writing the backlog took longer than {lead:?}; jobs start overdue");
    }
    tokio::time::sleep(idle).await;
    let meter = Meter::start(&ours);
    let started = Instant::now();
    wait_until("every retry re-queued", Duration::from_secs(900), || async {
        counter(port, "laabam_scheduler_republished_total").await >= n as f64
    })
    .await;
    let seconds = started.elapsed().as_secs_f64();
    let (usage, _, traffic) = meter.stop(&ours);
    wait_until("every re-queued job drained", Duration::from_secs(60), || async {
        drained.load(Ordering::Relaxed) >= n
    })
    .await;
    drain.abort();
    let metrics = scrape(port).await;
    let lag_p99 = histogram_quantile(&metrics, "laabam_scheduler_due_lag_seconds", 0.99);
    println!(
        "  re-queued {n} in {seconds:.1} s from the first due time (due over {:.0} s: {:.0}/s offered): {:.0}/s; due lag p99 ≤ {lag_p99} s",
        spread.as_secs_f64(),
        n as f64 / spread.as_secs_f64(),
        n as f64 / seconds
    );
    Run {
        scenario: "retry-backlog".into(),
        deliveries: n,
        seconds,
        lat: Vec::new(),
        usage: rest_named(usage, "bench (drain)"),
        redis_bytes: bytes,
        traffic,
        extra: json!({ "bytes_per_pending_retry": bytes / n as i64, "job_and_event_share_bytes": job_and_event,
            "due_lag_p99_seconds_at_most": lag_p99 }),
    }
}

/// Consumes the retry queue without acknowledgements (as cheap for the broker as consuming
/// gets), counting the jobs.
async fn drain_retry_queue(env: &TestEnv, drained: Arc<AtomicUsize>) -> tokio::task::JoinHandle<()> {
    env.declare_topology().await;
    let conn = laabam_shared::startup::amqp_connect(&env.amqp_url, "retry-drain")
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let mut consumer = channel
        .basic_consume(
            topology::RETRY_QUEUE.into(),
            "drain".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    tokio::spawn(async move {
        let _conn = conn;
        while let Some(Ok(_)) = consumer.next().await {
            drained.fetch_add(1, Ordering::Relaxed);
        }
    })
}
