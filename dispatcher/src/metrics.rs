//! The dispatcher's Prometheus metrics. Label sets stay bounded: event type and outcome only.

use prometheus::{
    Histogram, HistogramVec, IntCounterVec, IntGauge, register_histogram, register_histogram_vec,
    register_int_counter_vec, register_int_gauge,
};
use std::sync::LazyLock;

#[derive(Debug)]
pub struct Metrics {
    pub events_consumed: IntCounterVec,
    pub attempts: IntCounterVec,
    pub attempt_seconds: HistogramVec,
    pub deferred: IntCounterVec,
    pub completed: IntCounterVec,
    pub dead_letters: IntCounterVec,
    pub in_flight: IntGauge,
    pub endpoints_disabled: IntCounterVec,
    pub publish_to_delivered_seconds: Histogram,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
];

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    events_consumed: register_int_counter_vec!(
        "laabam_dispatcher_events_consumed_total",
        "Events taken from the event queue",
        &["event_type"]
    )
    .unwrap(),
    attempts: register_int_counter_vec!(
        "laabam_dispatcher_attempts_total",
        "Delivery attempts by event type and outcome",
        &["event_type", "outcome"]
    )
    .unwrap(),
    attempt_seconds: register_histogram_vec!(
        "laabam_dispatcher_attempt_duration_seconds",
        "Duration of one attempt",
        &["event_type"],
        LATENCY_BUCKETS.to_vec()
    )
    .unwrap(),
    deferred: register_int_counter_vec!(
        "laabam_dispatcher_deferred_total",
        "Deliveries deferred by an endpoint's concurrency limit (not attempts)",
        &["event_type"]
    )
    .unwrap(),
    completed: register_int_counter_vec!(
        "laabam_dispatcher_deliveries_completed_total",
        "Deliveries finished, by final result",
        &["event_type", "result"]
    )
    .unwrap(),
    dead_letters: register_int_counter_vec!(
        "laabam_dispatcher_dead_letters_total",
        "Messages dead-lettered, by reason",
        &["reason"]
    )
    .unwrap(),
    endpoints_disabled: register_int_counter_vec!(
        "laabam_dispatcher_endpoints_disabled_total",
        "Endpoints disabled by the platform, by reason",
        &["reason"]
    )
    .unwrap(),
    in_flight: register_int_gauge!("laabam_dispatcher_in_flight_attempts", "Attempts in flight").unwrap(),
    publish_to_delivered_seconds: register_histogram!(
        "laabam_dispatcher_publish_to_delivered_seconds",
        "From the event's timestamp to a successful attempt",
        LATENCY_BUCKETS.to_vec()
    )
    .unwrap(),
});
