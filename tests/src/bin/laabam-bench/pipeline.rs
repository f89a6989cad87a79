//! Scenarios through the whole system: events published, dispatched, delivered to real
//! receivers, with the scheduler retrying what fails.

use crate::components::spawn_components;
use crate::load::{events, publish, publisher};
use crate::measure::{Meter, Run, bench_env, latencies, percentile};
use crate::roles::Role;
use crate::scrape::print_counters;
use laabam_shared::clock::now_ms;
use laabam_shared::envelope::Envelope;
use laabam_shared::ids::AccountId;
use laabam_tests::{Receiver, Reply, wait_until};
use serde_json::json;
use serde_json::value::RawValue;
use std::time::{Duration, Instant};

/// What one run of the real pipeline looks like.
#[derive(Debug, Clone)]
pub(crate) struct Setup {
    pub(crate) name: String,
    pub(crate) events: usize,
    /// Healthy endpoints of the benchmark account, each subscribed to everything.
    pub(crate) endpoints: usize,
    /// Publish at this many events per second instead of as fast as possible.
    pub(crate) rate: Option<f64>,
    /// `--dispatch-queues` for every process.
    pub(crate) queues: u16,
    /// Fail the first attempt of one event in ten (by its id), once.
    pub(crate) failing: bool,
    /// Add an endpoint answering after this long.
    pub(crate) slow: Option<Duration>,
}

impl Setup {
    pub(crate) fn new(name: &str, events: usize, endpoints: usize) -> Self {
        Setup {
            name: name.into(),
            events,
            endpoints,
            rate: None,
            queues: 1,
            failing: false,
            slow: None,
        }
    }
}

/// Whether the failing scenario fails this event's first attempt.
fn fails_once(event_id: &str) -> bool {
    event_id.bytes().map(u64::from).sum::<u64>() % 10 == 0
}

pub(crate) async fn pipeline(setup: &Setup) -> Run {
    let mut env = bench_env().await;
    let mut receivers = Vec::new();
    for _ in 0..setup.endpoints {
        let rx = if setup.failing {
            Role::Receiver
                .run(Receiver::start(|c, before| {
                    if before == 0 && fails_once(c.header("webhook-id")) {
                        Reply::Status(500)
                    } else {
                        Reply::Status(200)
                    }
                }))
                .await
        } else {
            Role::Receiver.run(Receiver::ok()).await
        };
        env.endpoint("acct_bench", &rx.url, None).await;
        receivers.push(rx);
    }
    let slow = if let Some(delay) = setup.slow {
        let rx = Role::Receiver
            .run(Receiver::start(move |_, _| Reply::After(delay, 200)))
            .await;
        env.endpoint("acct_bench", &rx.url, None).await;
        Some(rx)
    } else {
        None
    };
    let (ours, dispatcher_port, scheduler_port) = spawn_components(&mut env, setup.queues);
    let publisher = publisher(&env, setup.queues).await;
    // Warm up: one event end to end.
    publisher.publish(&events(1)[0]).await.unwrap();
    wait_until("warm-up", Duration::from_secs(30), || async {
        receivers.iter().all(|r| r.count() >= 1)
    })
    .await;
    let warm: usize = receivers.iter().map(Receiver::count).sum();
    let batch = events(setup.events);
    let retried = if setup.failing {
        batch.iter().filter(|e| fails_once(e.id.as_str())).count() * setup.endpoints
    } else {
        0
    };
    let meter = Meter::start(&ours);
    let started = Instant::now();
    let concurrency = if setup.rate.is_some() { 64 } else { 128 };
    publish(publisher, batch, concurrency, setup.rate).await;
    let expected = setup.events * setup.endpoints + retried + warm;
    wait_until("every delivery", Duration::from_secs(900), || async {
        receivers.iter().map(Receiver::count).sum::<usize>() >= expected
    })
    .await;
    let seconds = started.elapsed().as_secs_f64();
    let (usage, redis_bytes, traffic) = meter.stop(&ours);
    print_counters(
        dispatcher_port,
        &[
            "attempts_total",
            "deferred_total",
            "retries_scheduled_total",
            "per_redis_call_sum",
            "per_redis_call_count",
            "messages_per_ack_sum",
            "messages_per_ack_count",
        ],
    )
    .await;
    print_counters(
        scheduler_port,
        &["republished_total", "due_lag_seconds_sum", "due_lag_seconds_count"],
    )
    .await;
    let connections: usize = receivers.iter().map(Receiver::connections).sum();
    println!("  receivers: {connections} connections accepted (keep-alive reuses the rest)");
    if let Some(slow) = &slow {
        println!("  slow endpoint: {} requests answered or in flight", slow.count());
    }
    Run {
        scenario: setup.name.clone(),
        deliveries: setup.events * setup.endpoints,
        seconds,
        lat: latencies(&receivers),
        usage,
        redis_bytes,
        traffic,
        extra: json!({ "queues": setup.queues, "retried_attempts": retried, "connections": connections }),
    }
}

/// One account bursts while another publishes steadily: the quiet account's latency.
pub(crate) async fn noisy_neighbour(burst: usize) -> Run {
    let mut env = bench_env().await;
    let noisy = Role::Receiver.run(Receiver::ok()).await;
    let quiet = Role::Receiver.run(Receiver::ok()).await;
    env.endpoint("acct_bench", &noisy.url, None).await;
    env.endpoint("acct_quiet", &quiet.url, None).await;
    let (ours, dispatcher_port, _) = spawn_components(&mut env, 1);
    let publisher = publisher(&env, 1).await;
    publisher.publish(&events(1)[0]).await.unwrap();
    wait_until("warm-up", Duration::from_secs(30), || async { noisy.count() >= 1 }).await;
    let meter = Meter::start(&ours);
    let started = Instant::now();
    let steady = {
        let publisher = publisher.clone();
        tokio::spawn(async move {
            let account = AccountId::parse("acct_quiet").unwrap();
            let mut sent = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            loop {
                tick.tick().await;
                let data =
                    RawValue::from_string(r#"{"customer_id":"c","name":"n","email":"e@example.com"}"#.into()).unwrap();
                let e = Envelope::new("customer.created", account.clone(), data, None, now_ms()).unwrap();
                publisher.publish(&e).await.expect("confirmed");
                sent += 1;
                if sent % 50 == 0 && sent >= 250 && STOP_QUIET.load(std::sync::atomic::Ordering::Relaxed) {
                    return sent;
                }
            }
        })
    };
    publish(publisher, events(burst), 128, None).await;
    wait_until("the burst delivered", Duration::from_secs(900), || async {
        noisy.count() > burst
    })
    .await;
    STOP_QUIET.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = steady.await.unwrap();
    wait_until("the quiet account's events", Duration::from_secs(60), || async {
        quiet.count() >= sent
    })
    .await;
    let seconds = started.elapsed().as_secs_f64();
    let (usage, redis_bytes, traffic) = meter.stop(&ours);
    print_counters(dispatcher_port, &["deferred_total"]).await;
    let burst_lat = latencies(std::slice::from_ref(&noisy));
    println!(
        "  noisy account: {burst} events, latency p50 {:.0} ms, p99 {:.0} ms",
        percentile(&burst_lat, 0.5),
        percentile(&burst_lat, 0.99)
    );
    Run {
        scenario: "noisy-neighbour (quiet account's latency)".into(),
        deliveries: burst + sent,
        seconds,
        lat: latencies(&[quiet]),
        usage,
        redis_bytes,
        traffic,
        extra: json!({ "burst_events": burst, "quiet_events": sent,
            "burst_latency_ms": { "p50": percentile(&burst_lat, 0.5), "p99": percentile(&burst_lat, 0.99) } }),
    }
}

static STOP_QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
