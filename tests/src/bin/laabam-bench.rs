//! `laabam-bench <scenario>`: measures the whole system on the real RabbitMQ and Redis.
//!
//! Scenarios: `baseline` (a bare pipeline: consume, sign, POST, ack; no records, no retries:
//! the machine's practical limit), `throughput` (N events, one endpoint), `fanout` (N events, ten
//! endpoints), `latency` (a fixed rate, publish to receive percentiles), `all`.
//! Prints a table and writes JSON to target/bench/. Run with `--release`.

use bytes::Bytes;
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
use laabam_tests::{Receiver, TestEnv, wait_until};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use std::sync::Arc;
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

async fn pipeline(scenario: &str, n: usize, endpoints: usize, rate: Option<f64>) -> Run {
    let mut env = TestEnv::new().await;
    let mut receivers = Vec::new();
    for _ in 0..endpoints {
        let rx = Receiver::ok().await;
        env.endpoint("acct_bench", &rx.url, None).await;
        receivers.push(rx);
    }
    // Production defaults (timeouts, leases, in-flight cap), except quick retries and a
    // per-endpoint limit fit for one high-volume endpoint.
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
            "--metrics-addr",
        ]
        .map(String::from),
    );
    let metrics_port = free_port();
    flags.push(format!("127.0.0.1:{metrics_port}"));
    let dispatcher = env.spawn_binary_with("laabam-dispatcher", &flags, &[("RUST_LOG", "error")], None);
    let mut sflags = env.scheduler_flags(&[]);
    sflags.extend(["--metrics-addr".into(), format!("127.0.0.1:{}", free_port())]);
    let scheduler = env.spawn_binary_with("laabam-retry-scheduler", &sflags, &[("RUST_LOG", "error")], None);
    let publisher = Arc::new(env.publisher().await);
    // Warm up: one event end to end.
    publisher.publish(&events(1)[0]).await.unwrap();
    wait_until("warm-up", Duration::from_secs(30), || async {
        receivers.iter().all(|r| r.count() >= 1)
    })
    .await;
    let warm: usize = receivers.iter().map(Receiver::count).sum();
    let ours = [("dispatcher", dispatcher), ("scheduler", scheduler)];
    let meter = Meter::start(&ours);
    let started = Instant::now();
    let concurrency = if rate.is_some() { 64 } else { 128 };
    publish(publisher, events(n), concurrency, rate).await;
    let expected = n * endpoints + warm;
    wait_until("every delivery", Duration::from_secs(600), || async {
        receivers.iter().map(Receiver::count).sum::<usize>() >= expected
    })
    .await;
    let seconds = started.elapsed().as_secs_f64();
    let (cpu, redis_bytes) = meter.stop(&ours);
    print_counters(metrics_port).await;
    Run {
        scenario: scenario.into(),
        deliveries: n * endpoints,
        seconds,
        lat: latencies(&receivers),
        cpu,
        redis_bytes,
    }
}

/// The dispatcher's own counts of what it did (attempts by outcome, deferrals, retries), so a
/// run shows work beyond one attempt per delivery.
async fn print_counters(port: u16) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let Ok(response) = client
        .get(format!("http://127.0.0.1:{port}/metrics").parse().unwrap())
        .await
    else {
        return;
    };
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let wanted = [
        "attempts_total",
        "deferred_total",
        "retries_scheduled_total",
        "completed_total",
    ];
    for line in String::from_utf8_lossy(&body).lines() {
        if !line.starts_with('#') && wanted.iter().any(|w| line.contains(w)) && !line.ends_with(" 0") {
            println!("  {line}");
        }
    }
}

/// The bare pipeline: one queue, consume, sign, POST, ack; no records, no retries.
async fn baseline(n: usize) -> Run {
    let env = TestEnv::new().await;
    let rx = Receiver::ok().await;
    env.declare_topology().await;
    let conn = laabam_shared::startup::amqp_connect(&env.amqp_url, "baseline")
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel.basic_qos(1024, Default::default()).await.unwrap();
    channel
        .queue_declare(
            "baseline".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            "baseline".into(),
            topology::EVENTS_EXCHANGE.into(),
            "#".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            "baseline".into(),
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
    Run {
        scenario: "baseline".into(),
        deliveries: n,
        seconds,
        lat: latencies(&[rx]),
        cpu,
        redis_bytes,
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let scenario = args.first().cloned().unwrap_or_else(|| "all".into());
    let n: usize = args
        .iter()
        .position(|a| a == "--events")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let rate: f64 = args
        .iter()
        .position(|a| a == "--rate")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000.0);
    let mut reports = Vec::new();
    let wanted = |s: &str| scenario == s || scenario == "all";
    if wanted("baseline") {
        reports.push(baseline(n).await.report());
    }
    if wanted("throughput") {
        reports.push(pipeline("throughput", n, 1, None).await.report());
    }
    if wanted("fanout") {
        reports.push(pipeline("fanout", n / 10, 10, None).await.report());
    }
    if wanted("latency") {
        reports.push(
            pipeline("latency", (rate * 15.0) as usize, 1, Some(rate))
                .await
                .report(),
        );
    }
    if reports.is_empty() {
        eprintln!("usage: laabam-bench baseline|throughput|fanout|latency|all [--events N] [--rate R]");
        std::process::exit(2);
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{scenario}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&reports).unwrap()).unwrap();
    println!("\nwrote {}", path.display());
}
