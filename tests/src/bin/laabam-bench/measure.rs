//! What a run measures: CPU seconds, peak RSS and disk writes of each process from /proc, Redis
//! memory, publish-to-receive latencies, and the report each run prints and writes.

use crate::roles::Role;
use crate::traffic::{Counters, Traffic};
use laabam_shared::clock::parse_rfc3339_ms;
use laabam_tests::{Receiver, TestEnv};
use serde_json::{Value, json};
use std::sync::OnceLock;

/// The user and system CPU seconds in a process's or thread's `stat` line.
pub(crate) fn cpu_seconds_of_stat(stat: &str) -> f64 {
    stat_ticks(stat, 11) / 100.0
}

/// A process's CPU seconds with those of the children it has waited for: a Redis forks for its
/// snapshots and append-only rewrites, work its own figure leaves out (a child still running
/// when the run ends is missed).
fn cpu_seconds_with_children(stat: &str) -> f64 {
    (stat_ticks(stat, 11) + stat_ticks(stat, 13)) / 100.0
}

/// The sum of the user and system clock ticks from the field after the name numbered `user`
/// (0 is the state): 11 for the process's own, 13 for its waited-for children's.
fn stat_ticks(stat: &str, user: usize) -> f64 {
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|t| t.parse::<f64>().ok()).unwrap_or(0.0);
    field(user) + field(user + 1)
}

/// The bytes a process has given the kernel to write to disk, with those of the children it has
/// waited for (`write_bytes` of /proc/PID/io): counted as pages turn dirty, so a page appended
/// to and synced again and again counts each time, as the disk must write it each time.
fn disk_written(pid: u32) -> u64 {
    counter_of(
        &std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default(),
        "write_bytes",
    )
}

/// The number on the line `name:…` of a listing of counters, as `/proc/PID/io` and Redis's
/// `INFO` give them; 0 when it is missing.
pub(crate) fn counter_of(listing: &str, name: &str) -> u64 {
    listing
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// CPU seconds (`cpu` of its stat line) and peak RSS of a process, from /proc.
fn proc_usage(pid: u32, cpu: fn(&str) -> f64) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kb = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    (cpu(&stat), hwm_kb * 1024)
}

fn pid_of(pattern: &str) -> Option<u32> {
    stdout_of("pgrep", &["-o", "-f", pattern]).trim().parse().ok()
}

/// What `program` printed, empty when it could not run: the services' own tools (`pgrep`,
/// `redis-cli`, `rabbitmqctl`), whose absence leaves a figure out instead of ending a run.
pub(crate) fn stdout_of(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The port of the shared Redis that `scripts/services` starts and the scenarios use unless
/// told to use one of their own (see [`use_redis`]).
const SHARED_REDIS_PORT: u16 = 6379;

/// The Redis the scenarios use, when not the shared one: its port and process.
static OWN_REDIS: OnceLock<(u16, Option<u32>)> = OnceLock::new();

/// Makes every scenario of this call use the Redis on `port`, run by `pid`, in place of the
/// shared one; set once, before the first run.
pub(crate) fn use_redis(port: u16, pid: Option<u32>) {
    OWN_REDIS.set((port, pid)).expect("the scenarios' Redis is chosen once");
}

/// The port of the Redis the scenarios use.
pub(crate) fn redis_port() -> u16 {
    OWN_REDIS.get().map_or(SHARED_REDIS_PORT, |&(port, _)| port)
}

/// A test environment whose processes and store use the scenarios' Redis.
pub(crate) async fn bench_env() -> TestEnv {
    let mut env = TestEnv::new().await;
    env.redis_url = format!("redis://127.0.0.1:{}", redis_port());
    env
}

/// A section of `INFO` from the Redis on `port` (empty when it cannot be read).
pub(crate) fn redis_info(port: u16, section: &str) -> String {
    stdout_of("redis-cli", &["-p", &port.to_string(), "info", section])
}

/// The bytes the Redis on `port` uses.
pub(crate) fn redis_memory(port: u16) -> u64 {
    counter_of(&redis_info(port, "memory"), "used_memory")
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// Publish-to-receive latencies (ms) from the envelope timestamps.
pub(crate) fn latencies(receivers: &[Receiver]) -> Vec<f64> {
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

/// What one process, or one role of this one, used over a run.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Usage {
    pub(crate) name: String,
    pub(crate) cpu: f64,
    /// Peak RSS, of our own processes (0 for the services and this process's roles).
    pub(crate) rss: u64,
    /// Bytes written to disk, by the services (0 for the rest, which write none): what a
    /// delivery costs the disks of RabbitMQ's message store and Redis's append-only file.
    pub(crate) written: u64,
}

impl Usage {
    fn new(name: &str, cpu: f64, rss: u64, written: u64) -> Self {
        Usage {
            name: name.to_owned(),
            cpu,
            rss,
            written,
        }
    }
}

pub(crate) struct Run {
    pub(crate) scenario: String,
    pub(crate) deliveries: usize,
    pub(crate) seconds: f64,
    pub(crate) lat: Vec<f64>,
    pub(crate) usage: Vec<Usage>,
    pub(crate) redis_bytes: i64,
    pub(crate) traffic: Traffic,
    /// What only this scenario reports.
    pub(crate) extra: Value,
}

impl Run {
    pub(crate) fn report(&self) -> Value {
        let rate = self.deliveries as f64 / self.seconds;
        let total_cpu: f64 = self.usage.iter().map(|u| u.cpu).sum();
        println!(
            "{}: {} deliveries in {:.2} s = {:.0} deliveries/s; latency p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms; {:.0} deliveries per CPU-second; Redis +{} KiB",
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
        for line in self.process_table() {
            println!("{line}");
        }
        println!("{}", self.traffic.line(self.deliveries));
        json!({
            "scenario": self.scenario, "deliveries": self.deliveries, "seconds": self.seconds, "deliveries_per_s": rate,
            "latency_ms": { "p50": percentile(&self.lat, 0.5), "p95": percentile(&self.lat, 0.95), "p99": percentile(&self.lat, 0.99) },
            "cpu_seconds": self.usage.iter().map(|u| (u.name.clone(), json!(u.cpu))).collect::<serde_json::Map<_, _>>(),
            "peak_rss_bytes": self.usage.iter().filter(|u| u.rss > 0).map(|u| (u.name.clone(), json!(u.rss))).collect::<serde_json::Map<_, _>>(),
            "disk_bytes_written": self.usage.iter().filter(|u| u.written > 0).map(|u| (u.name.clone(), json!(u.written))).collect::<serde_json::Map<_, _>>(),
            "deliveries_per_cpu_second": self.deliveries as f64 / total_cpu.max(0.001),
            "cpu_us_per_delivery": self.usage.iter().map(|u| (u.name.clone(), json!(self.us_per_delivery(u.cpu))))
                .chain([("all".to_owned(), json!(self.us_per_delivery(total_cpu)))])
                .collect::<serde_json::Map<_, _>>(),
            "cores_busy": total_cpu / self.seconds,
            "redis_bytes_added": self.redis_bytes,
            "per_delivery": self.traffic.per_delivery(self.deliveries),
            "extra": self.extra,
        })
    }

    fn us_per_delivery(&self, cpu_seconds: f64) -> f64 {
        cpu_seconds * 1e6 / self.deliveries.max(1) as f64
    }

    /// Each process's CPU, also per delivery, and the whole machine's, and the services' disk
    /// writes per delivery: where a delivery's cost goes, read off every run instead of worked
    /// out by hand.
    fn process_table(&self) -> Vec<String> {
        let total: f64 = self.usage.iter().map(|u| u.cpu).sum();
        let mut lines = vec![format!(
            "  {:<14} {:>10} {:>12} {:>13} {:>16}",
            "process", "CPU s", "µs/delivery", "peak RSS MiB", "disk B/delivery"
        )];
        let or_dash = |shown: Option<String>| shown.unwrap_or_else(|| "-".into());
        for u in &self.usage {
            let rss = (u.rss > 0).then(|| format!("{:.0}", u.rss as f64 / 1048576.0));
            let written = (u.written > 0).then(|| format!("{:.0}", u.written as f64 / self.deliveries.max(1) as f64));
            lines.push(format!(
                "  {:<14} {:>10.2} {:>12.1} {:>13} {:>16}",
                u.name,
                u.cpu,
                self.us_per_delivery(u.cpu),
                or_dash(rss),
                or_dash(written)
            ));
        }
        lines.push(format!(
            "  {:<14} {:>10.2} {:>12.1}   {:.2} cores busy",
            "all",
            total,
            self.us_per_delivery(total),
            total / self.seconds
        ));
        lines
    }
}

/// Samples CPU of the shared services, of this process by role (see [`crate::roles`]) and of
/// `ours` before and after a run, and the memory of the Redis the run uses.
pub(crate) struct Meter {
    rabbit: Option<u32>,
    redis: Option<u32>,
    redis_port: u16,
    start: Vec<Usage>,
    redis_mem: u64,
    counters: Counters,
}

/// What this process does besides its receivers and bare pipeline: publishing the events (or
/// whatever else the scenario does itself, which renames the row).
pub(crate) const PUBLISHER: &str = "publisher";

/// `cpu` with the [`PUBLISHER`] row named for what this process did instead, in a scenario
/// that publishes no events.
pub(crate) fn rest_named(usage: Vec<Usage>, label: &str) -> Vec<Usage> {
    usage
        .into_iter()
        .map(|u| {
            if u.name == PUBLISHER {
                Usage {
                    name: label.to_owned(),
                    ..u
                }
            } else {
                u
            }
        })
        .collect()
}

impl Meter {
    /// Against the scenarios' Redis.
    pub(crate) fn start(ours: &[(&str, u32)]) -> Self {
        let redis = OWN_REDIS.get().map_or_else(
            || pid_of(&format!("redis-server.*:{SHARED_REDIS_PORT}")),
            |&(_, pid)| pid,
        );
        Self::start_on(ours, redis_port(), redis)
    }

    /// Against the Redis on `redis_port`; without a `redis` process its CPU is not reported (a
    /// Redis under callgrind spends fifty times the CPU the same work costs).
    pub(crate) fn start_on(ours: &[(&str, u32)], redis_port: u16, redis: Option<u32>) -> Self {
        let rabbit = pid_of("beam.smp");
        // Before the CPU: asking the broker for its counters costs it some.
        let counters = Counters::read(redis_port);
        Meter {
            rabbit,
            redis,
            redis_port,
            start: Self::sample(rabbit, redis, ours),
            redis_mem: redis_memory(redis_port),
            counters,
        }
    }

    /// Each row's CPU seconds so far, with peak RSS for `ours` and disk writes for the services
    /// (0 for the rest): the services found, this process's roles and the rest of it, then `ours`.
    fn sample(rabbit: Option<u32>, redis: Option<u32>, ours: &[(&str, u32)]) -> Vec<Usage> {
        let services = [("rabbitmq", rabbit), ("redis", redis)]
            .into_iter()
            .filter_map(|(name, pid)| {
                let pid = pid?;
                Some(Usage::new(
                    name,
                    proc_usage(pid, cpu_seconds_with_children).0,
                    0,
                    disk_written(pid),
                ))
            });
        let roles = Role::ALL.map(|r| Usage::new(r.label(), r.cpu_seconds(), 0, 0));
        let rest = proc_usage(std::process::id(), cpu_seconds_of_stat).0 - roles.iter().map(|r| r.cpu).sum::<f64>();
        services
            .chain(roles)
            .chain([Usage::new(PUBLISHER, rest, 0, 0)])
            .chain(ours.iter().map(|(name, pid)| {
                let (cpu, rss) = proc_usage(*pid, cpu_seconds_of_stat);
                Usage::new(name, cpu, rss, 0)
            }))
            .collect()
    }

    /// Each row's CPU seconds and disk writes over the run, with peak RSS for `ours` (a role of
    /// this process that did nothing in the scenario is left out), the Redis memory added, and
    /// the calls counted.
    pub(crate) fn stop(&self, ours: &[(&str, u32)]) -> (Vec<Usage>, i64, Traffic) {
        let idle_role = |u: &Usage| u.cpu <= 0.0 && Role::ALL.iter().any(|r| r.label() == u.name);
        let usage = Self::sample(self.rabbit, self.redis, ours)
            .into_iter()
            .zip(&self.start)
            .map(|(after, before)| Usage {
                cpu: after.cpu - before.cpu,
                written: after.written.saturating_sub(before.written),
                ..after
            })
            .filter(|u| !idle_role(u))
            .collect();
        let redis_bytes = redis_memory(self.redis_port) as i64 - self.redis_mem as i64;
        (
            usage,
            redis_bytes,
            Counters::read(self.redis_port).since(&self.counters),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `stat` of a process named with a space and a parenthesis, 1.50 s its own and 0.25 s of
    /// children waited for.
    #[test]
    fn a_services_cpu_counts_the_children_it_waited_for_and_ours_do_not() {
        let stat = "42 (redis-server (x) 1) S 1 42 42 0 -1 4194560 10 0 0 0 120 30 20 5 20 0 5 0";
        assert_eq!(cpu_seconds_of_stat(stat), 1.5);
        assert_eq!(cpu_seconds_with_children(stat), 1.75);
    }

    #[test]
    fn the_process_table_gives_each_process_and_the_whole_its_cpu_per_delivery() {
        let run = Run {
            scenario: "t".into(),
            deliveries: 200_000,
            seconds: 20.0,
            lat: vec![],
            usage: vec![
                Usage::new("rabbitmq", 13.0, 0, 300_000_000),
                Usage::new("dispatcher", 11.0, 45 * 1048576, 0),
            ],
            redis_bytes: 0,
            traffic: Traffic::default(),
            extra: Value::Null,
        };
        let table = run.process_table();
        assert_eq!(table.len(), 4);
        let cells = |line: &str| line.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(cells(&table[1]), ["rabbitmq", "13.00", "65.0", "-", "1500"]);
        assert_eq!(cells(&table[2]), ["dispatcher", "11.00", "55.0", "45", "-"]);
        assert!(table[3].contains("24.00") && table[3].contains("120.0") && table[3].ends_with("1.20 cores busy"));
        let report = run.report();
        assert_eq!(report["cpu_us_per_delivery"]["all"], json!(120.0));
        assert_eq!(report["cores_busy"], json!(1.2));
        assert_eq!(report["disk_bytes_written"], json!({ "rabbitmq": 300_000_000 }));
    }

    #[test]
    fn disk_writes_are_read_from_write_bytes() {
        let io = "rchar: 2833730787\nwchar: 319537283\nread_bytes: 188416\nwrite_bytes: 35966976\n\
cancelled_write_bytes: 0\n";
        assert_eq!(counter_of(io, "write_bytes"), 35_966_976);
        assert_eq!(counter_of(io, "read_bytes"), 188_416);
        assert_eq!(counter_of("used_memory_rss:9\nused_memory:7\n", "used_memory"), 7);
        assert_eq!(counter_of("", "write_bytes"), 0);
    }
}
