//! `laabam-bench <scenario>...`: measures the whole system on the real RabbitMQ and Redis.
//!
//! Scenarios: see `--help`; `baseline` is a bare pipeline (consume, sign, POST, ack; no records,
//! the machine's practical limit), `throughput` (N events, one endpoint), `fanout` (N events, ten
//! endpoints), `latency` (a fixed rate, publish to receive percentiles), `all`.
//! Prints a table and writes JSON to target/bench/. Run with `--release`.

mod baseline;
mod callgrind;
mod components;
mod load;
mod measure;
mod pipeline;
mod redis_calls;
mod retry_backlog;
mod roles;
mod scrape;
mod summary;
mod traffic;

use baseline::{baseline, baseline_name};
use clap::{Parser, ValueEnum};
use laabam_tests::own_redis::OwnRedis;
use laabam_tests::wait_until;
use measure::Run;
use pipeline::{Setup, noisy_neighbour, pipeline};
use redis_calls::{redis_calls, redis_calls_name};
use retry_backlog::retry_backlog;
use serde_json::{Value, json};
use std::time::Duration;
use summary::{Comparison, summary};

/// One scenario of the command line.
enum Job {
    /// The bare pipeline: as fast as it goes, or paced to a rate.
    Baseline(usize, Option<f64>),
    Pipeline(Setup),
    NoisyNeighbour(usize),
    RetryBacklog(usize, Duration),
    /// Events, endpoints per event, and whether Redis runs under callgrind.
    RedisCalls(usize, usize, bool),
    /// `latency` at half the deliveries/s job `of` (`throughput`) made earlier in the same round:
    /// the scenario as the issue defines it, beside the fixed rate its target names.
    LatencyAtHalf {
        of: usize,
    },
}

/// 30 seconds' worth of events at `rate` per second.
fn latency_events(rate: f64) -> usize {
    (rate * 30.0) as usize
}

/// 30 seconds of events at `rate` per second, one endpoint each.
fn latency_setup(name: &str, rate: f64) -> Setup {
    let mut setup = Setup::new(name, latency_events(rate), 1);
    setup.rate = Some(rate);
    setup
}

/// Half the rate of job `of`'s latest run.
fn half_rate(reports: &[Vec<Value>], of: usize) -> f64 {
    reports[of].last().map_or(f64::NAN, summary::rate) / 2.0
}

impl Job {
    fn name(&self) -> String {
        match self {
            Job::Baseline(_, rate) => baseline_name(*rate),
            Job::Pipeline(setup) => setup.name.clone(),
            Job::NoisyNeighbour(_) => "noisy-neighbour".into(),
            Job::RetryBacklog(..) => "retry-backlog".into(),
            Job::RedisCalls(_, width, _) => redis_calls_name(*width),
            Job::LatencyAtHalf { .. } => "latency at half of throughput".into(),
        }
    }

    /// Runs it once; `reports` are every run so far, this round's earlier jobs included.
    async fn run(&self, reports: &[Vec<Value>]) -> Run {
        match self {
            Job::Baseline(n, rate) => baseline(*n, *rate).await,
            Job::Pipeline(setup) => pipeline(setup).await,
            Job::NoisyNeighbour(burst) => noisy_neighbour(*burst).await,
            Job::RetryBacklog(n, spread) => retry_backlog(*n, *spread).await,
            Job::RedisCalls(n, width, callgrind) => redis_calls(*n, *width, *callgrind).await,
            Job::LatencyAtHalf { of } => {
                let rate = half_rate(reports, *of);
                pipeline(&latency_setup(&format!("{} ({rate:.0}/s)", self.name()), rate)).await
            }
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
    /// Events per second in `latency`; with `throughput` in the same call, `latency` also runs at
    /// half of what `throughput` made in each round
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
    /// `redis-calls` against a private Redis under valgrind's callgrind: prints the instructions
    /// Redis executed per delivery, which barely move from run to run where its CPU time moves
    /// by a fifth; about fifty times slower, so give it a few thousand `--events`
    #[arg(long)]
    callgrind: bool,
    /// Every scenario against a Redis of this call's own, run with `deploy/compose.yaml`'s flags
    /// (append-only, fsynced every second), in place of the shared one, which does not persist
    #[arg(long)]
    redis_aof: bool,
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
        callgrind,
        redis_aof,
    } = Cli::parse();
    // Kept until the end: dropping it stops it and removes its files.
    let _own_redis = match redis_aof {
        true => Some(persisting_redis().await),
        false => None,
    };
    let wanted = |s: Scenario| scenarios.iter().any(|&x| x == s || x == Scenario::All);
    let mut jobs = Vec::new();
    let mut comparisons = Vec::new();
    let baseline = wanted(Scenario::Baseline).then(|| {
        jobs.push(Job::Baseline(n, None));
        jobs.len() - 1
    });
    let mut throughput = None;
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
        throughput = Some(jobs.len());
        jobs.push(Job::Pipeline(setup));
    }
    if wanted(Scenario::Fanout) {
        jobs.push(Job::Pipeline(Setup::new("fanout", n / 10, 10)));
    }
    if wanted(Scenario::Latency) {
        if baseline.is_some() {
            // The bare pipeline at the same rate: the host's own floor under the latency target.
            jobs.push(Job::Baseline(latency_events(rate), Some(rate)));
        }
        jobs.push(Job::Pipeline(latency_setup(&format!("latency at {rate:.0}/s"), rate)));
        if let Some(of) = throughput {
            jobs.push(Job::LatencyAtHalf { of });
        }
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
        jobs.push(Job::RedisCalls(n / 2, 1, callgrind));
        jobs.push(Job::RedisCalls(n / 2, 10, callgrind));
    }
    let mut reports: Vec<Vec<Value>> = jobs.iter().map(|_| Vec::new()).collect();
    for round in 1..=runs {
        for (i, job) in jobs.iter().enumerate() {
            // A run prints what its processes counted as it ends, before its report: the heading
            // keeps those lines under the run they belong to.
            println!("\n== {}, run {round} of {runs}", job.name());
            let report = job.run(&reports).await.report();
            reports[i].push(report);
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
    // A name per setup, so that a call with another layout or Redis keeps its own file.
    let suffix: String = [
        (queues > 1).then(|| format!("-{queues}-queues")),
        redis_aof.then(|| "-redis-aof".to_owned()),
    ]
    .into_iter()
    .flatten()
    .collect();
    let names: Vec<String> = scenarios.iter().map(|s| s.name()).collect();
    let path = dir.join(format!("{}{suffix}.json", names.join("+")));
    let out = json!({ "summaries": summaries, "comparisons": comparisons, "runs": all });
    std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    println!("\nwrote {}", path.display());
}

/// The flags `deploy/compose.yaml` runs Redis with, read from it so the bench's Redis cannot
/// drift from the deployment's.
fn production_redis_flags() -> Vec<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/compose.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let compose: serde_yaml::Value = serde_yaml::from_str(&text).expect("deploy/compose.yaml is YAML");
    let command = compose["services"]["redis"]["command"]
        .as_sequence()
        .expect("compose runs Redis with a command");
    let (program, flags) = command.split_first().expect("compose's Redis command names a program");
    assert_eq!(program.as_str(), Some("redis-server"));
    flags
        .iter()
        .map(|flag| flag.as_str().expect("compose's Redis flags are strings").to_owned())
        .collect()
}

/// Starts a Redis persisting as `deploy/compose.yaml` runs production's and makes it the
/// scenarios' Redis: the shared one runs without persistence, and the append-only file's writes
/// and rewrites cost Redis CPU.
async fn persisting_redis() -> OwnRedis {
    let flags = production_redis_flags();
    let shown = flags.join(" ");
    let redis = OwnRedis::start_with(flags);
    let client = redis::Client::open(redis.url()).expect("a Redis URL");
    wait_until("the bench's own Redis answers", Duration::from_secs(10), || async {
        client.get_multiplexed_async_connection().await.is_ok()
    })
    .await;
    measure::use_redis(redis.port(), redis.pid());
    println!("scenarios use a Redis of their own on port {}: {shown}", redis.port());
    redis
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bench_runs_redis_with_compose_s_persistence_flags() {
        let flags = production_redis_flags();
        for pair in [["--appendonly", "yes"], ["--appendfsync", "everysec"]] {
            assert!(flags.windows(2).any(|w| w == pair), "{pair:?} in {flags:?}");
        }
    }

    /// The rate comes from the run of the same round: the latest, not the first.
    #[test]
    fn latency_at_half_takes_half_of_the_latest_throughput_run() {
        let reports = vec![
            vec![json!({ "deliveries_per_s": 9000.0 })],
            vec![
                json!({ "deliveries_per_s": 8000.0 }),
                json!({ "deliveries_per_s": 6000.0 }),
            ],
        ];
        assert_eq!(half_rate(&reports, 1), 3000.0);
        assert!(half_rate(&[Vec::new()], 0).is_nan(), "no run yet: no rate");
    }
}
