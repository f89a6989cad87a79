//! The producer's Prometheus metrics.

use prometheus::{
    Histogram, HistogramVec, IntCounterVec, register_histogram, register_histogram_vec, register_int_counter_vec,
};
use std::sync::LazyLock;

#[derive(Debug)]
pub struct Metrics {
    pub published: IntCounterVec,
    pub confirm_seconds: Histogram,
    pub api_requests: IntCounterVec,
    pub api_request_seconds: HistogramVec,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    published: register_int_counter_vec!(
        "laabam_producer_events_published_total",
        "Events published, by type and result (confirmed, failed, or blocked by a RabbitMQ memory or disk alarm)",
        &["event_type", "result"]
    )
    .unwrap(),
    confirm_seconds: register_histogram!(
        "laabam_producer_publish_confirm_seconds",
        "From publish to the broker's confirm",
        vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0
        ]
    )
    .unwrap(),
    api_requests: register_int_counter_vec!(
        "laabam_api_requests_total",
        "HTTP API requests answered, by method, route template and status (refusals by the API's limits included)",
        &["method", "route", "status"]
    )
    .unwrap(),
    api_request_seconds: register_histogram_vec!(
        "laabam_api_request_duration_seconds",
        "From a request's head to its answer, by route template",
        &["route"],
        vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0]
    )
    .unwrap(),
});

/// Creates every known label combination at zero (see the dispatcher's `initialize`).
pub fn initialize() {
    for spec in laabam_shared::catalog::CATALOG {
        for result in ["confirmed", "failed"] {
            METRICS.published.with_label_values(&[spec.name, result]);
        }
    }
}
