//! `laabam-bench <scenario>...`: measures the whole system on the real RabbitMQ and Redis.
//!
//! Scenarios: see `--help`; `baseline` is a bare pipeline (consume, sign, POST, ack; no records,
//! the machine's practical limit), `throughput` (N events, one endpoint), `fanout` (N events, ten
//! endpoints), `latency` (a fixed rate, publish to receive percentiles), `all`.
//! Prints a table and writes JSON to target/bench/. Run with `--release`.

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use futures_util::StreamExt;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use laabam_producer::Publisher;
use laabam_shared::clock::{now_ms, parse_rfc3339_ms};
use laabam_shared::envelope::Envelope;
use laabam_shared::ids::AccountId;
use laabam_shared::signing::Secret;
use laabam_shared::topology;
use laabam_tests::env::free_port;
use laabam_tests::{Receiver, Reply, TestEnv, wait_until};
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// CPU seconds and peak RSS of a process, from /proc.
fn proc_usage(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kb = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    (ticks / 100.0, hwm_kb * 1024)
}

fn pid_of(pattern: &str) -> Option<u32> {
    let out = std::process::Command::new("pgrep")
        .args(["-o", "-f", pattern])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

fn redis_memory() -> u64 {
    let out = std::process::Command::new("redis-cli")
        .args(["info", "memory"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// Publish-to-receive latencies (ms) from the envelope timestamps.
fn latencies(receivers: &[Receiver]) -> Vec<f64> {
    let mut out: Vec<f64> = receivers
        .iter()
        .flat_map(|r| r.requests())
        .filter_map(|c| {
            let ts = c.json()["timestamp"].as_str().and_then(parse_rfc3339_ms)?;
            Some((c.at_ms - ts) as f64)
        })
        .collect();
    out.sort_by(|a, b| a.partial_cmp(b).unwrap());
    out
}

fn events(n: usize) -> Vec<Envelope> {
    (0..n)
        .map(|i| {
            let data = RawValue::from_string(format!(
                r#"{{"invoice_id":"inv_{i}","payment_id":"pay_{i}","amount":{i}}}"#
            ))
            .unwrap();
            Envelope::new(
                "invoice.paid",
                AccountId::parse("acct_bench").unwrap(),
                data,
                None,
                now_ms(),
            )
            .unwrap()
        })
        .collect()
}

/// Publishes with `concurrency` tasks, each awaiting its confirms; optionally paced to `rate`/s.
async fn publish(publisher: Arc<Publisher>, events: Vec<Envelope>, concurrency: usize, rate: Option<f64>) {
    let events = Arc::new(events);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let (publisher, events) = (publisher.clone(), events.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = t;
            while i < events.len() {
                if let Some(rate) = rate {
                    let due = start + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                let mut e = events[i].clone();
                e.timestamp = laabam_shared::clock::format_rfc3339_ms(now_ms());
                publisher.publish(&e).await.expect("confirmed");
                i += concurrency;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

struct Run {
    scenario: String,
    deliveries: usize,
    seconds: f64,
    lat: Vec<f64>,
    cpu: Vec<(String, f64, u64)>,
    redis_bytes: i64,
    /// What only this scenario reports.
    extra: Value,
}

impl Run {
    fn report(&self) -> Value {
        let rate = self.deliveries as f64 / self.seconds;
        let total_cpu: f64 = self.cpu.iter().map(|c| c.1).sum();
        println!(
            "\n{}: {} deliveries in {:.2} s = {:.0} deliveries/s; latency p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms; {:.0} deliveries per CPU-second; Redis +{} KiB",
            self.scenario,
            self.deliveries,
            self.seconds,
            rate,
            percentile(&self.lat, 0.5),
            percentile(&self.lat, 0.95),
            percentile(&self.lat, 0.99),
            self.deliveries as f64 / total_cpu.max(0.001),
            self.redis_bytes / 1024
        );
        println!("  {:<14} {:>10} {:>12}", "process", "CPU s", "peak RSS MiB");
        for (name, cpu, rss) in &self.cpu {
            println!(
                "  {:<14} {:>10.2} {:>12}",
                name,
                cpu,
                if *rss > 0 {
                    format!("{:.0}", *rss as f64 / 1048576.0)
                } else {
                    "-".into()
                }
            );
        }
        json!({
            "scenario": self.scenario, "deliveries": self.deliveries, "seconds": self.seconds, "deliveries_per_s": rate,
            "latency_ms": { "p50": percentile(&self.lat, 0.5), "p95": percentile(&self.lat, 0.95), "p99": percentile(&self.lat, 0.99) },
            "cpu_seconds": self.cpu.iter().map(|(n, c, _)| (n.clone(), json!(c))).collect::<serde_json::Map<_, _>>(),
            "peak_rss_bytes": self.cpu.iter().filter(|c| c.2 > 0).map(|(n, _, r)| (n.clone(), json!(r))).collect::<serde_json::Map<_, _>>(),
            "deliveries_per_cpu_second": self.deliveries as f64 / total_cpu.max(0.001),
            "redis_bytes_added": self.redis_bytes,
            "extra": self.extra,
        })
    }
}

/// Samples CPU of the shared services and this process before and after a run.
struct Meter {
    rabbit: Option<u32>,
    redis: Option<u32>,
    start: Vec<(String, f64)>,
    redis_mem: u64,
}

impl Meter {
    fn start(ours: &[(&str, u32)]) -> Self {
        let rabbit = pid_of("beam.smp");
        let redis = pid_of("redis-server.*:6379");
        let mut start = vec![];
        for (name, pid) in [
            ("rabbitmq", rabbit),
            ("redis", redis),
            ("bench (rx+pub)", Some(std::process::id())),
        ] {
            start.push((name.to_owned(), pid.map_or(0.0, |p| proc_usage(p).0)));
        }
        for (name, pid) in ours {
            start.push((name.to_string(), proc_usage(*pid).0));
        }
        Meter {
            rabbit,
            redis,
            start,
            redis_mem: redis_memory(),
        }
    }

    fn stop(&self, ours: &[(&str, u32)]) -> (Vec<(String, f64, u64)>, i64) {
        let mut pids = vec![
            ("rabbitmq", self.rabbit),
            ("redis", self.redis),
            ("bench (rx+pub)", Some(std::process::id())),
        ];
        pids.extend(ours.iter().map(|(n, p)| (*n, Some(*p))));
        let usage = pids
            .iter()
            .zip(&self.start)
            .map(|((name, pid), (_, before))| {
                let (cpu, rss) = pid.map_or((0.0, 0), proc_usage);
                let rss = if ours.iter().any(|(n, _)| n == name) { rss } else { 0 };
                (name.to_string(), cpu - before, rss)
            })
            .collect();
        (usage, redis_memory() as i64 - self.redis_mem as i64)
    }
}

/// The components' log level: `error` unless `LAABAM_BENCH_LOG` says otherwise.
fn log_level() -> String {
    std::env::var("LAABAM_BENCH_LOG").unwrap_or_else(|_| "error".into())
}

/// What one run of the real pipeline looks like.
#[derive(Debug, Clone)]
struct Setup {
    name: String,
    events: usize,
    /// Healthy endpoints of the benchmark account, each subscribed to everything.
    endpoints: usize,
    /// Publish at this many events per second instead of as fast as possible.
    rate: Option<f64>,
    /// `--dispatch-queues` for every process.
    queues: u16,
    /// Fail the first attempt of one event in ten (by its id), once.
    failing: bool,
    /// Add an endpoint answering after this long.
    slow: Option<Duration>,
}

impl Setup {
    fn new(name: &str, events: usize, endpoints: usize) -> Self {
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

/// The dispatcher and scheduler as separate release processes, with production defaults
/// (timeouts, leases, in-flight cap) except quick retries and a per-endpoint limit fit for one
/// high-volume endpoint. Returns their pids and metrics ports.
fn spawn_components(env: &mut TestEnv, queues: u16) -> ([(&'static str, u32); 2], u16, u16) {
    let queues = queues.to_string();
    let (dispatcher_port, scheduler_port) = (free_port(), free_port());
    let mut flags = env.connection_flags();
    flags.extend(
        [
            "--retry-first-delay",
            "100ms",
            "--retry-max-delay",
            "1s",
            "--endpoint-concurrency",
            "128",
            "--allow-private-targets",
            "true",
            "--dispatch-queues",
            &queues,
        ]
        .map(String::from),
    );
    flags.extend(["--metrics-addr".into(), format!("127.0.0.1:{dispatcher_port}")]);
    let dispatcher = env.spawn_binary_with("laabam-dispatcher", &flags, &[("RUST_LOG", &log_level())], None);
    let mut sflags = env.connection_flags();
    sflags.extend(["--dispatch-queues".into(), queues, "--poll".into(), "20ms".into()]);
    sflags.extend(["--metrics-addr".into(), format!("127.0.0.1:{scheduler_port}")]);
    let scheduler = env.spawn_binary_with("laabam-retry-scheduler", &sflags, &[("RUST_LOG", &log_level())], None);
    (
        [("dispatcher", dispatcher), ("scheduler", scheduler)],
        dispatcher_port,
        scheduler_port,
    )
}

async fn publisher(env: &TestEnv, queues: u16) -> Arc<Publisher> {
    Arc::new(
        Publisher::connect(
            &env.amqp_url,
            Duration::from_secs(10),
            topology::Layout {
                dispatch_queues: queues,
            },
        )
        .await
        .expect("RabbitMQ reachable"),
    )
}

async fn pipeline(setup: &Setup) -> Run {
    let mut env = TestEnv::new().await;
    let mut receivers = Vec::new();
    for _ in 0..setup.endpoints {
        let rx = if setup.failing {
            Receiver::start(|c, before| {
                if before == 0 && fails_once(c.header("webhook-id")) {
                    Reply::Status(500)
                } else {
                    Reply::Status(200)
                }
            })
            .await
        } else {
            Receiver::ok().await
        };
        env.endpoint("acct_bench", &rx.url, None).await;
        receivers.push(rx);
    }
    let slow = if let Some(delay) = setup.slow {
        let rx = Receiver::start(move |_, _| Reply::After(delay, 200)).await;
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
    let (cpu, redis_bytes) = meter.stop(&ours);
    print_counters(
        dispatcher_port,
        &[
            "attempts_total",
            "deferred_total",
            "retries_scheduled_total",
            "per_redis_call_sum",
            "per_redis_call_count",
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
        cpu,
        redis_bytes,
        extra: json!({ "queues": setup.queues, "retried_attempts": retried, "connections": connections }),
    }
}

/// One account bursts while another publishes steadily: the quiet account's latency.
async fn noisy_neighbour(burst: usize) -> Run {
    let mut env = TestEnv::new().await;
    let noisy = Receiver::ok().await;
    let quiet = Receiver::ok().await;
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
    let (cpu, redis_bytes) = meter.stop(&ours);
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
        cpu,
        redis_bytes,
        extra: json!({ "burst_events": burst, "quiet_events": sent,
            "burst_latency_ms": { "p50": percentile(&burst_lat, 0.5), "p99": percentile(&burst_lat, 0.99) } }),
    }
}

static STOP_QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `n` pending retries (deliveries of n/10 events to ten endpoints each, as a failing fan-out
/// leaves them) due evenly over `spread`: the scheduler's re-queue rate and due lag, and Redis
/// bytes per pending retry.
async fn retry_backlog(n: usize, spread: Duration) -> Run {
    let mut env = TestEnv::new().await;
    let store = env.store().await;
    let keys = laabam_shared::store::Keys::new(&env.prefix, 1);
    let client = redis::Client::open(env.redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let account = AccountId::parse("acct_bench").unwrap();
    let endpoints: Vec<_> = (0..10).map(|_| laabam_shared::ids::EndpointId::generate()).collect();
    let before = redis_memory();
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
    let bytes = redis_memory() as i64 - before as i64;
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
    let (cpu, _) = meter.stop(&ours);
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
        cpu,
        redis_bytes: bytes,
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

/// The Redis side of deliveries alone, through the store's own calls: `n` deliveries begun
/// (events of `width` endpoints each) and then recorded as successes, 256 calls in flight. It
/// prints the CPU each call costs Redis and this process (the client), without the broker,
/// receiver and dispatcher sharing the cores, so a change to a script shows in microseconds
/// where the whole-system runs cannot tell it from noise.
async fn redis_calls(n: usize, width: usize) -> Run {
    use laabam_tests::deliveries::{Success, leased_begins, quiet_endpoints};
    const IN_FLIGHT: usize = 256;
    let env = TestEnv::new().await;
    let store = env.store().await;
    let account = AccountId::parse("acct_bench").unwrap();
    let endpoints = quiet_endpoints(&store, &account, width).await;
    let now = now_ms();
    // Arrival times as at 10,000 deliveries/s: sorted-set entries sharing a score are ordered
    // by comparing their members, so one time for all would cost Redis far more than real use.
    let arrivals: Vec<_> = events(n / width)
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let at = now + (i * width / 10) as i64;
            let begins = leased_begins(&e, &endpoints.endpoints, i * width, at + 30_000);
            let json = e.to_json();
            (e, json, begins, at)
        })
        .collect();
    let deliveries = arrivals.len() * width;
    let started = Instant::now();
    let meter = Meter::start(&[]);
    futures_util::stream::iter(&arrivals)
        .map(|(e, json, begins, at)| store.ingest(e, json, endpoints.version, begins, *at))
        .buffer_unordered(IN_FLIGHT)
        .for_each(|r| async move {
            r.unwrap();
        })
        .await;
    let (ingest_cpu, ingest_bytes) = meter.stop(&[]);
    let success = Success::at(now);
    let meter = Meter::start(&[]);
    futures_util::stream::iter(arrivals.iter().flat_map(|(_, _, begins, _)| begins))
        .map(|b| {
            let (store, record) = (&store, success.record(b));
            async move { store.record(&record).await }
        })
        .buffer_unordered(IN_FLIGHT)
        .for_each(|r| async move {
            assert!(r.unwrap().applied, "the lease is the one begun");
        })
        .await;
    let (record_cpu, record_bytes) = meter.stop(&[]);
    let seconds = started.elapsed().as_secs_f64();
    let micros = |cpu: &[(String, f64, u64)], who: &str| {
        cpu.iter().find(|c| c.0 == who).map_or(0.0, |c| c.1) * 1e6 / deliveries as f64
    };
    // The bench process is the store's client here.
    let per_delivery = |cpu: &[(String, f64, u64)]| (micros(cpu, "redis"), micros(cpu, "bench (rx+pub)"));
    let (ingest_redis, ingest_client) = per_delivery(&ingest_cpu);
    let (record_redis, record_client) = per_delivery(&record_cpu);
    println!(
        "  per delivery ({width} per event): begin {ingest_redis:.1} µs of Redis CPU, {ingest_client:.1} µs of client CPU; \
record {record_redis:.1} µs of Redis, {record_client:.1} µs of client"
    );
    let cpu = ingest_cpu
        .iter()
        .zip(&record_cpu)
        .map(|(a, b)| (a.0.replace(" (rx+pub)", " (client)"), a.1 + b.1, 0))
        .collect();
    Run {
        scenario: redis_calls_name(width),
        deliveries,
        seconds,
        lat: Vec::new(),
        cpu,
        redis_bytes: ingest_bytes + record_bytes,
        extra: json!({ "width": width, "redis_us_per_delivery": { "begin": ingest_redis, "record": record_redis },
            "client_us_per_delivery": { "begin": ingest_client, "record": record_client } }),
    }
}

fn redis_calls_name(width: usize) -> String {
    format!("redis-calls ({width} per event)")
}

async fn scrape(port: u16) -> String {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let Ok(response) = client
        .get(format!("http://127.0.0.1:{port}/metrics").parse().unwrap())
        .await
    else {
        return String::new();
    };
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    String::from_utf8_lossy(&body).into_owned()
}

async fn counter(port: u16, name: &str) -> f64 {
    scrape(port)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The upper bound of the histogram bucket holding quantile `q` (as Prometheus would bound it).
fn histogram_quantile(metrics: &str, name: &str, q: f64) -> String {
    let buckets: Vec<(String, f64)> = metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix("_bucket{le=\"")?;
            let (le, count) = rest.split_once("\"} ")?;
            Some((le.to_owned(), count.trim().parse().ok()?))
        })
        .collect();
    let total = buckets.last().map_or(0.0, |b| b.1);
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map_or("?".into(), |(le, _)| le.clone())
}

/// A process's own counts of what it did (attempts by outcome, deferrals, retries, items per
/// Redis call), so a run shows work beyond one attempt per delivery and how well calls fill.
async fn print_counters(port: u16, wanted: &[&str]) {
    for line in scrape(port).await.lines() {
        if !line.starts_with('#') && wanted.iter().any(|w| line.contains(w)) && !line.ends_with(" 0") {
            println!("  {line}");
        }
    }
}

/// The bare pipeline: one queue, consume, sign, POST, ack; no records, no retries. It consumes
/// the project's own dispatch queue, so the broker does the same routing and queueing work as
/// in `throughput` (a queue of its own would leave the dispatch queue bound too, and every
/// publish would be written to both).
async fn baseline(n: usize) -> Run {
    let env = TestEnv::new().await;
    let rx = Receiver::ok().await;
    env.declare_topology().await;
    let conn = laabam_shared::startup::amqp_connect(&env.amqp_url, "baseline")
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel.basic_qos(1024, Default::default()).await.unwrap();
    let mut consumer = channel
        .basic_consume(
            topology::DISPATCH_QUEUE.into(),
            "b".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let secret = Secret::generate();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build_http();
    let url: hyper::Uri = rx.url.parse().unwrap();
    let worker = tokio::spawn(async move {
        let sem = Arc::new(tokio::sync::Semaphore::new(1024));
        while let Some(Ok(delivery)) = consumer.next().await {
            let permit = sem.clone().acquire_owned().await.unwrap();
            let (client, url, secret) = (client.clone(), url.clone(), secret.clone());
            tokio::spawn(async move {
                let ts = now_ms() / 1000;
                let sig = secret.sign("id", ts, &delivery.data);
                let req = hyper::Request::post(url)
                    .header("content-type", "application/json")
                    .header("webhook-signature", sig)
                    .body(Full::new(Bytes::from(delivery.data.clone())))
                    .unwrap();
                let _ = client.request(req).await;
                let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                drop(permit);
            });
        }
    });
    let publisher = Arc::new(env.publisher().await);
    let meter = Meter::start(&[]);
    let started = Instant::now();
    publish(publisher, events(n), 128, None).await;
    wait_until("every delivery", Duration::from_secs(600), || async { rx.count() >= n }).await;
    let seconds = started.elapsed().as_secs_f64();
    let (cpu, redis_bytes) = meter.stop(&[]);
    worker.abort();
    let _ = conn.close(200, "done".into()).await;
    println!(
        "  receivers: {} connections accepted (keep-alive reuses the rest)",
        rx.connections()
    );
    Run {
        scenario: "baseline".into(),
        deliveries: n,
        seconds,
        lat: latencies(&[rx]),
        cpu,
        redis_bytes,
        extra: json!({}),
    }
}

/// The median of the finite values (the upper one of an even count), NaN if there is none.
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A run report's deliveries per second.
fn rate(report: &Value) -> f64 {
    report["deliveries_per_s"].as_f64().unwrap_or(f64::NAN)
}

/// The median of several runs' rate and latency percentiles, as one line and as JSON.
fn summary(name: &str, runs: &[Value]) -> Value {
    let median = |f: &dyn Fn(&Value) -> f64| median(runs.iter().map(f));
    let rate = median(&rate);
    let p50 = median(&|r| r["latency_ms"]["p50"].as_f64().unwrap_or(f64::NAN));
    let p99 = median(&|r| r["latency_ms"]["p99"].as_f64().unwrap_or(f64::NAN));
    let per_cpu = median(&|r| r["deliveries_per_cpu_second"].as_f64().unwrap_or(f64::NAN));
    println!(
        "\nSUMMARY {name}: median of {} runs: {rate:.0} deliveries/s, latency p50 {p50:.0} ms, p99 {p99:.0} ms, {per_cpu:.0} deliveries per CPU-second",
        runs.len()
    );
    json!({ "scenario": name, "runs": runs.len(), "median_deliveries_per_s": rate,
        "median_latency_ms": { "p50": p50, "p99": p99 }, "median_deliveries_per_cpu_second": per_cpu })
}

/// Two scenarios a target compares, by deliveries per second: `of` as a share of `against`.
/// They run interleaved, and this machine's speed drifts between rounds by more than the
/// margins the targets set, so both readings are printed: each round's pair (runs made at the
/// same time), and the ratio of the medians (which may pair a fast run with a slow one).
struct Comparison {
    label: &'static str,
    of: usize,
    against: usize,
}

impl Comparison {
    fn report(&self, reports: &[Vec<Value>]) -> Value {
        let (of, against) = (&reports[self.of], &reports[self.against]);
        let pairs: Vec<f64> = of.iter().zip(against).map(|(o, a)| rate(o) / rate(a)).collect();
        let median_pair = median(pairs.iter().copied());
        let of_medians = median(of.iter().map(rate)) / median(against.iter().map(rate));
        let percent = |r: f64| format!("{:.1}%", r * 100.0);
        println!(
            "\nSUMMARY {}: pairs {}; median pair {}, ratio of the medians {}",
            self.label,
            pairs.iter().map(|&r| percent(r)).collect::<Vec<_>>().join(", "),
            percent(median_pair),
            percent(of_medians)
        );
        json!({ "comparison": self.label, "pairs": pairs, "median_pair": median_pair,
            "ratio_of_medians": of_medians })
    }
}

/// One scenario of the command line.
enum Job {
    Baseline(usize),
    Pipeline(Setup),
    NoisyNeighbour(usize),
    RetryBacklog(usize, Duration),
    RedisCalls(usize, usize),
}

impl Job {
    fn name(&self) -> String {
        match self {
            Job::Baseline(_) => "baseline".into(),
            Job::Pipeline(setup) => setup.name.clone(),
            Job::NoisyNeighbour(_) => "noisy-neighbour".into(),
            Job::RetryBacklog(..) => "retry-backlog".into(),
            Job::RedisCalls(_, width) => redis_calls_name(*width),
        }
    }

    async fn run(&self) -> Run {
        match self {
            Job::Baseline(n) => baseline(*n).await,
            Job::Pipeline(setup) => pipeline(setup).await,
            Job::NoisyNeighbour(burst) => noisy_neighbour(*burst).await,
            Job::RetryBacklog(n, spread) => retry_backlog(*n, *spread).await,
            Job::RedisCalls(n, width) => redis_calls(*n, *width).await,
        }
    }
}

/// Measures the whole system on the real RabbitMQ and Redis; several scenarios in one call run
/// interleaved (one run of each, then the next round), so scenarios compared with each other see
/// the same state of this noisy machine.
#[derive(Parser)]
struct Cli {
    /// Scenarios to run (`all` for every one)
    #[arg(value_enum, default_value = "all")]
    scenarios: Vec<Scenario>,
    /// Events per run (a scenario with ten endpoints per event publishes a tenth of them)
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Events per second in `latency`
    #[arg(long, default_value_t = 3000.0)]
    rate: f64,
    /// Queues the event stream is spread over in `throughput`
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    queues: u16,
    /// Runs of each scenario; the summary gives their medians
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// How long the slow endpoint of `slow-endpoint` takes to answer: past the dispatcher's
    /// wait budget (250 ms) its deliveries are deferred at once, within it they are waited for
    #[arg(long, default_value = "5s", value_parser = laabam_shared::config::parse_duration)]
    slow_delay: Duration,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Baseline,
    Throughput,
    Fanout,
    Latency,
    Failing,
    SlowEndpoint,
    RetryBacklog,
    NoisyNeighbour,
    RedisCalls,
    All,
}

impl Scenario {
    fn name(self) -> String {
        self.to_possible_value()
            .expect("no scenario is skipped")
            .get_name()
            .to_owned()
    }
}

#[tokio::main]
async fn main() {
    let Cli {
        scenarios,
        events: n,
        rate,
        queues,
        runs,
        slow_delay,
    } = Cli::parse();
    let wanted = |s: Scenario| scenarios.iter().any(|&x| x == s || x == Scenario::All);
    let mut jobs = Vec::new();
    let mut comparisons = Vec::new();
    let baseline = wanted(Scenario::Baseline).then(|| {
        jobs.push(Job::Baseline(n));
        jobs.len() - 1
    });
    if wanted(Scenario::Throughput) {
        let plural = if queues > 1 { "s" } else { "" };
        let mut setup = Setup::new(&format!("throughput ({queues} queue{plural})"), n, 1);
        setup.queues = queues;
        if let Some(baseline) = baseline {
            comparisons.push(Comparison {
                label: "throughput / baseline",
                of: jobs.len(),
                against: baseline,
            });
        }
        jobs.push(Job::Pipeline(setup));
    }
    if wanted(Scenario::Fanout) {
        jobs.push(Job::Pipeline(Setup::new("fanout", n / 10, 10)));
    }
    if wanted(Scenario::Latency) {
        let mut setup = Setup::new(&format!("latency at {rate:.0}/s"), (rate * 30.0) as usize, 1);
        setup.rate = Some(rate);
        jobs.push(Job::Pipeline(setup));
    }
    if wanted(Scenario::Failing) {
        let mut setup = Setup::new("failing (10% fail once)", n / 10, 1);
        setup.failing = true;
        jobs.push(Job::Pipeline(setup));
    }
    if wanted(Scenario::SlowEndpoint) {
        jobs.push(Job::Pipeline(Setup::new("ten healthy endpoints", n / 10, 10)));
        let name = format!(
            "ten healthy endpoints and a {} one",
            humantime::format_duration(slow_delay)
        );
        let mut slow = Setup::new(&name, n / 10, 10);
        slow.slow = Some(slow_delay);
        comparisons.push(Comparison {
            label: "healthy deliveries/s with the slow endpoint / without",
            of: jobs.len(),
            against: jobs.len() - 1,
        });
        jobs.push(Job::Pipeline(slow));
    }
    if wanted(Scenario::NoisyNeighbour) {
        jobs.push(Job::NoisyNeighbour(n / 2));
    }
    if wanted(Scenario::RetryBacklog) {
        jobs.push(Job::RetryBacklog(1_000_000, Duration::from_secs(100)));
    }
    if wanted(Scenario::RedisCalls) {
        jobs.push(Job::RedisCalls(n / 2, 1));
        jobs.push(Job::RedisCalls(n / 2, 10));
    }
    let mut reports: Vec<Vec<Value>> = jobs.iter().map(|_| Vec::new()).collect();
    for _ in 0..runs {
        for (job, reports) in jobs.iter().zip(&mut reports) {
            reports.push(job.run().await.report());
        }
    }
    let summaries: Vec<Value> = jobs
        .iter()
        .zip(&reports)
        .map(|(job, reports)| summary(&job.name(), reports))
        .collect();
    let comparisons: Vec<Value> = comparisons.iter().map(|c| c.report(&reports)).collect();
    let all: Vec<Value> = reports.into_iter().flatten().collect();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let suffix = if queues > 1 {
        format!("-{queues}-queues")
    } else {
        String::new()
    };
    let names: Vec<String> = scenarios.iter().map(|s| s.name()).collect();
    let path = dir.join(format!("{}{suffix}.json", names.join("+")));
    let out = json!({ "summaries": summaries, "comparisons": comparisons, "runs": all });
    std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    println!("\nwrote {}", path.display());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(rates: &[f64]) -> Vec<Value> {
        rates.iter().map(|r| json!({ "deliveries_per_s": r })).collect()
    }

    /// The rounds' pairs and the medians' ratio differ when the machine's speed moves between
    /// rounds; each is read from runs of its own round.
    #[test]
    fn a_comparison_pairs_each_round_and_divides_the_medians_apart() {
        let reports = [runs(&[100.0, 200.0, 100.0]), runs(&[90.0, 150.0, 100.0])];
        let c = Comparison {
            label: "second / first",
            of: 1,
            against: 0,
        };
        let out = c.report(&reports);
        assert_eq!(out["pairs"], json!([0.9, 0.75, 1.0]));
        assert_eq!(out["median_pair"], json!(0.9));
        assert_eq!(out["ratio_of_medians"], json!(1.0));
    }

    #[test]
    fn a_median_skips_what_is_not_a_number_and_takes_the_upper_of_two() {
        assert_eq!(median([3.0, f64::NAN, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0].into_iter()), 4.0);
        assert!(median(std::iter::empty()).is_nan());
    }
}
