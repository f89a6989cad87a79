//! The scheduler's Prometheus metrics.

use prometheus::{Histogram, IntCounter, IntGauge, register_histogram, register_int_counter, register_int_gauge};
use std::sync::LazyLock;

#[derive(Debug)]
pub struct Metrics {
    pub republished: IntCounter,
    pub reclaimed: IntCounter,
    pub backlog: IntGauge,
    pub retry_shards: IntGauge,
    pub publishing_blocked: IntGauge,
    pub due_lag_seconds: Histogram,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    republished: register_int_counter!(
        "laabam_scheduler_republished_total",
        "Retry jobs re-published to RabbitMQ (confirmed)"
    )
    .unwrap(),
    reclaimed: register_int_counter!(
        "laabam_scheduler_reclaimed_total",
        "Claims taken over after another scheduler's lease expired"
    )
    .unwrap(),
    backlog: register_int_gauge!(
        "laabam_scheduler_backlog",
        "Retry jobs and in-flight leases waiting in the retry set"
    )
    .unwrap(),
    retry_shards: register_int_gauge!(
        "laabam_scheduler_retry_shards",
        "Retry shards claimed from: the scheduler's own count, or more while another count's shards drain"
    )
    .unwrap(),
    publishing_blocked: register_int_gauge!(
        "laabam_scheduler_publishing_blocked",
        "1 while a RabbitMQ memory or disk alarm blocks publishing and due retries wait"
    )
    .unwrap(),
    due_lag_seconds: register_histogram!(
        "laabam_scheduler_due_lag_seconds",
        "How late a batch of due jobs was claimed (the earliest due time of the batch to now)",
        vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0
        ]
    )
    .unwrap(),
});
