//! The dispatcher's Prometheus metrics. Label sets stay bounded: event type and outcome only.

use laabam_shared::delivery::Outcome;
use laabam_shared::envelope::EnvelopeError;
use prometheus::{
    Gauge, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, register_gauge, register_histogram,
    register_histogram_vec, register_int_counter, register_int_counter_vec, register_int_gauge,
};
use std::sync::{LazyLock, OnceLock};

/// Attempts by endpoint and outcome: one series per endpoint, so registered only when an
/// operator asks for it (`LAABAM_METRICS_PER_ENDPOINT=true`) and accepts the cardinality.
static PER_ENDPOINT: OnceLock<IntCounterVec> = OnceLock::new();

pub fn enable_per_endpoint() {
    PER_ENDPOINT.get_or_init(|| {
        register_int_counter_vec!(
            "laabam_dispatcher_endpoint_attempts_total",
            "Delivery attempts by endpoint and outcome (opt-in: one series per endpoint)",
            &["endpoint_id", "outcome"]
        )
        .unwrap()
    });
}

/// Creates every known label combination at zero, so dashboards and alerts find each metric
/// from the start and `rate()` sees the first increment.
pub fn initialize() {
    let m = &*METRICS;
    for spec in laabam_shared::catalog::CATALOG {
        let t = spec.name;
        m.events_consumed.with_label_values(&[t]);
        m.deferred.with_label_values(&[t]);
        m.retries_scheduled.with_label_values(&[t]);
        m.attempt_seconds.with_label_values(&[t]);
        for outcome in Outcome::ALL {
            m.attempts.with_label_values(&[t, outcome.as_str()]);
        }
        for result in ["succeeded", "failed"] {
            m.completed.with_label_values(&[t, result]);
        }
    }
    for reason in EnvelopeError::CODES
        .into_iter()
        .chain([crate::pipeline::INVALID_RETRY_JOB])
    {
        m.dead_letters.with_label_values(&[reason]);
    }
    for reason in ["gone", "failing"] {
        m.endpoints_disabled.with_label_values(&[reason]);
    }
    LazyLock::force(&laabam_shared::store::RECORDS_PER_CALL);
    LazyLock::force(&laabam_shared::store::ARRIVALS_PER_CALL);
}

/// Counts an attempt against its endpoint, when per-endpoint metrics are on.
pub fn count_endpoint_attempt(endpoint_id: &str, outcome: &str) {
    if let Some(counter) = PER_ENDPOINT.get() {
        counter.with_label_values(&[endpoint_id, outcome]).inc();
    }
}

#[derive(Debug)]
pub struct Metrics {
    pub events_consumed: IntCounterVec,
    pub attempts: IntCounterVec,
    pub attempt_seconds: HistogramVec,
    pub deferred: IntCounterVec,
    pub completed: IntCounterVec,
    pub dead_letters: IntCounterVec,
    pub in_flight: IntGauge,
    pub idle_connections: IntGauge,
    pub cached_endpoints: IntGauge,
    pub endpoint_loads: IntCounter,
    pub slow_room_in_use: IntGauge,
    pub cut_short: IntCounter,
    pub left_to_lease: IntCounter,
    pub over_rate_limit: IntCounter,
    pub dispatchers_running: IntGauge,
    pub slot_wait_budget: Gauge,
    pub consuming: IntGauge,
    pub endpoints_disabled: IntCounterVec,
    pub retries_scheduled: IntCounterVec,
    pub publish_to_delivered_seconds: Histogram,
    pub messages_per_ack: Histogram,
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
        "Deliveries deferred by their endpoint's limits: no slot soon, slow room full, or rate (not attempts)",
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
    retries_scheduled: register_int_counter_vec!(
        "laabam_dispatcher_retries_scheduled_total",
        "Failed attempts given a next attempt in the retry set",
        &["event_type"]
    )
    .unwrap(),
    endpoints_disabled: register_int_counter_vec!(
        "laabam_dispatcher_endpoints_disabled_total",
        "Endpoints disabled by the platform, by reason",
        &["reason"]
    )
    .unwrap(),
    consuming: register_int_gauge!(
        "laabam_dispatcher_consuming",
        "1 while this dispatcher consumes events and retry jobs, else 0"
    )
    .unwrap(),
    in_flight: register_int_gauge!("laabam_dispatcher_in_flight_attempts", "Attempts in flight").unwrap(),
    idle_connections: register_int_gauge!(
        "laabam_dispatcher_idle_connections",
        "Connections to endpoints kept open for reuse (at most LAABAM_HTTP_IDLE_CONNECTIONS)"
    )
    .unwrap(),
    cached_endpoints: register_int_gauge!(
        "laabam_dispatcher_cached_endpoints",
        "Endpoints held in the endpoint cache (at most about LAABAM_CACHED_ENDPOINTS)"
    )
    .unwrap(),
    endpoint_loads: register_int_counter!(
        "laabam_dispatcher_endpoint_loads_total",
        "Accounts' endpoints read from Redis: first use, a change, or an account the cache had no room for"
    )
    .unwrap(),
    slow_room_in_use: register_int_gauge!(
        "laabam_dispatcher_slow_room_in_use",
        "Requests in flight to endpoints judged slow; past half the in-flight bound, more are deferred"
    )
    .unwrap(),
    cut_short: register_int_counter!(
        "laabam_dispatcher_requests_cut_short_total",
        "Requests that turned slow while the slow room was full, cut short and retried"
    )
    .unwrap(),
    left_to_lease: register_int_counter!(
        "laabam_dispatcher_attempts_left_to_lease_total",
        "Attempts not started because less than the HTTP timeout was left of their lease; the scheduler resends them"
    )
    .unwrap(),
    over_rate_limit: register_int_counter!(
        "laabam_dispatcher_over_rate_limit_total",
        "Deliveries over this dispatcher's share of their endpoint's rate limit, deferred to a turn"
    )
    .unwrap(),
    dispatchers_running: register_int_gauge!(
        "laabam_dispatcher_dispatchers_running",
        "Dispatchers running as last heard; each keeps to its share of every rate limit"
    )
    .unwrap(),
    slot_wait_budget: register_gauge!(
        "laabam_dispatcher_slot_wait_budget_seconds",
        "How long a delivery may wait for a busy endpoint's slot: the slot wait, longer while every request is slow"
    )
    .unwrap(),
    publish_to_delivered_seconds: register_histogram!(
        "laabam_dispatcher_publish_to_delivered_seconds",
        "From the event's timestamp to a successful attempt",
        LATENCY_BUCKETS.to_vec()
    )
    .unwrap(),
    messages_per_ack: register_histogram!(
        "laabam_dispatcher_messages_per_ack",
        "Broker messages settled per basic.ack frame sent",
        vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0]
    )
    .unwrap(),
});
