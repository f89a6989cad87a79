//! `redis-calls`: the store's own Redis calls alone, without the rest of the system.

use crate::callgrind::CallgrindRedis;
use crate::load::events;
use crate::measure::{Meter, PUBLISHER, Run, Usage, bench_env, rest_named};
use futures_util::StreamExt;
use laabam_shared::clock::now_ms;
use laabam_shared::ids::AccountId;
use serde_json::json;
use std::time::Instant;

/// The Redis side of deliveries alone, through the store's own calls: `n` deliveries begun
/// (events of `width` endpoints each) and then recorded as successes, 256 calls in flight. It
/// prints the CPU each call costs Redis and this process (the client), without the broker,
/// receiver and dispatcher sharing the cores, so a change to the store's writes shows in
/// microseconds where the whole-system runs cannot tell it from noise. With `callgrind` it runs
/// against a private Redis under callgrind instead and prints the instructions Redis executed
/// per delivery (see [`crate::callgrind`]), not Redis's CPU time.
pub(crate) async fn redis_calls(n: usize, width: usize, callgrind: bool) -> Run {
    use laabam_tests::deliveries::{Success, leased_begins, quiet_endpoints};
    const IN_FLIGHT: usize = 256;
    let mut env = bench_env().await;
    let mut counted = if callgrind {
        Some(CallgrindRedis::start().await)
    } else {
        None
    };
    if let Some(redis) = &counted {
        env.redis_url = redis.url.clone();
    }
    // Redis's memory from the Redis used; its CPU only from the shared one (see `Meter::start_on`).
    let private_port = counted.as_ref().map(|redis| redis.port);
    let meter_start = || private_port.map_or_else(|| Meter::start(&[]), |port| Meter::start_on(&[], port, None));
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
    if let Some(redis) = &counted {
        redis.zero();
    }
    let meter = meter_start();
    futures_util::stream::iter(&arrivals)
        .map(|(e, json, begins, at)| store.ingest(e, json, endpoints.version, begins, *at))
        .buffer_unordered(IN_FLIGHT)
        .for_each(|r| async move {
            r.unwrap();
        })
        .await;
    let (ingest_usage, ingest_bytes, ingest_traffic) = meter.stop(&[]);
    let ingest_instructions = counted.as_mut().map(CallgrindRedis::phase);
    let success = Success::at(now);
    let meter = meter_start();
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
    let (record_usage, record_bytes, record_traffic) = meter.stop(&[]);
    let record_instructions = counted.as_mut().map(CallgrindRedis::phase);
    if let Some(redis) = counted {
        redis.stop().await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu_of = |usage: &[Usage], who: &str| usage.iter().find(|u| u.name == who).map_or(0.0, |u| u.cpu);
    let micros = |usage: &[Usage], who: &str| cpu_of(usage, who) * 1e6 / deliveries as f64;
    // The bench process is the store's client here.
    let per_delivery = |usage: &[Usage]| (micros(usage, "redis"), micros(usage, PUBLISHER));
    let (ingest_redis, ingest_client) = per_delivery(&ingest_usage);
    let (record_redis, record_client) = per_delivery(&record_usage);
    let mut extra = json!({ "width": width,
        "client_us_per_delivery": { "begin": ingest_client, "record": record_client } });
    let usage = ingest_usage
        .iter()
        .map(|u| {
            let record = record_usage.iter().find(|r| r.name == u.name);
            Usage {
                cpu: u.cpu + record.map_or(0.0, |r| r.cpu),
                written: u.written + record.map_or(0, |r| r.written),
                ..u.clone()
            }
        })
        .collect();
    if let (Some(begin), Some(record)) = (ingest_instructions, record_instructions) {
        let (begin, record) = (begin / deliveries as u64, record / deliveries as u64);
        println!(
            "  per delivery ({width} per event): begin {begin} instructions of Redis, {ingest_client:.1} µs of client CPU; \
record {record} instructions of Redis, {record_client:.1} µs of client"
        );
        extra["redis_instructions_per_delivery"] = json!({ "begin": begin, "record": record });
    } else {
        println!(
            "  per delivery ({width} per event): begin {ingest_redis:.1} µs of Redis CPU, {ingest_client:.1} µs of client CPU; \
record {record_redis:.1} µs of Redis, {record_client:.1} µs of client"
        );
        extra["redis_us_per_delivery"] = json!({ "begin": ingest_redis, "record": record_redis });
    }
    let usage = rest_named(usage, "bench (client)");
    Run {
        scenario: redis_calls_name(width),
        deliveries,
        seconds,
        lat: Vec::new(),
        usage,
        redis_bytes: ingest_bytes + record_bytes,
        traffic: ingest_traffic + record_traffic,
        extra,
    }
}

pub(crate) fn redis_calls_name(width: usize) -> String {
    format!("redis-calls ({width} per event)")
}
