//! What happens to each broker message, apart from the broker: an event fans out into
//! deliveries, a retry job resumes one delivery. Each returns what to do with the message and
//! the attempts to run once it is acknowledged.
//!
//! Order matters for at-least-once: deliveries are begun in Redis (each under a lease that
//! re-queues it if this process dies) *before* the message is acknowledged, and attempts run
//! *after*, so an acknowledged message never depends on this process surviving.

mod arrival;
mod attempt;
mod in_flight;
mod resume;

pub use in_flight::InFlight;

use crate::directory::Directory;
use crate::limits::{EndpointLimits, MAX_BACKLOG, PacedTurn, Turn};
use crate::sender::Sender;
use bytes::Bytes;
use laabam_shared::clock;
use laabam_shared::delivery::RetryJob;
use laabam_shared::endpoint::Endpoint;
use laabam_shared::retry::RetryPolicy;
use laabam_shared::store::Store;
use rand::Rng;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;

/// The dead-letter reason of a retry-queue message that is not a retry job.
pub const INVALID_RETRY_JOB: &str = "invalid_retry_job";

/// What to do with the broker message.
#[derive(Debug)]
pub enum Disposition {
    Ack,
    /// Unprocessable: republish to the dead-letter exchange with this reason, then ack.
    DeadLetter {
        reason: &'static str,
        detail: String,
    },
    /// A dependency failed; hand the message back to the broker to try again.
    Requeue(String),
}

/// The outcome of handling one message.
#[derive(Debug)]
pub struct Handled {
    pub disposition: Disposition,
    /// Attempts to run after the message is acknowledged.
    pub attempts: Attempts,
}

impl Handled {
    fn only(disposition: Disposition) -> Self {
        Handled {
            disposition,
            attempts: Attempts::default(),
        }
    }

    /// Warns of a message handed back while still inside its span, so the line carries the
    /// event's (and a retry's delivery's) ids: the consumer that settles it knows only a tag.
    fn warn_if_requeued(self) -> Self {
        if let Disposition::Requeue(why) = &self.disposition {
            tracing::warn!(error = %why, "dependency failed; handing the message back");
        }
        self
    }
}

/// One message's attempts and the share of the process's in-flight bound they run in.
#[derive(Debug, Default)]
pub struct Attempts {
    tasks: Vec<AttemptTask>,
    /// One permit per attempt that may run at once; fewer than the attempts only for an event
    /// wider than the whole bound.
    room: Option<OwnedSemaphorePermit>,
}

/// One attempt, holding its lease and its endpoint slot (or its place among the deliveries
/// waiting for one).
#[derive(Debug)]
struct AttemptTask {
    job: RetryJob,
    event_type: String,
    endpoint: Arc<Endpoint>,
    body: Bytes,
    attempts_before: u32,
    /// Attempts made before the current cycle (an owner's redelivery restarts the budget).
    cycle_start: u32,
    first_attempt_ms: Option<i64>,
    /// The event's timestamp (unix ms), read once per event for the publish-to-delivered metric.
    published_ms: Option<i64>,
    lease: String,
    /// When the lease ends, by Redis's clock (unix ms), as written with it.
    lease_until_ms: i64,
    turn: Turn,
}

/// Everything the dispatcher's message handling needs.
#[derive(Debug)]
pub struct Pipeline {
    pub store: Store,
    /// Each account's endpoints, cached and checked against Redis by version.
    pub directory: Directory,
    /// Attempts in flight in this process (`LAABAM_MAX_IN_FLIGHT`). An event takes one per
    /// recipient before its deliveries begin (all of it, past the bound, for its attempts to
    /// take turns on), so a wide fan-out waits here (holding its broker message) instead of
    /// oversubscribing endpoints and deferring through the retry set.
    pub in_flight: InFlight,
    pub sender: Sender,
    pub limits: EndpointLimits,
    pub policy: RetryPolicy,
    /// How long an in-flight lease lasts (HTTP timeout plus margin).
    pub lease: Duration,
    /// How much of its lease an attempt needs left to start: an attempt begun later could still
    /// be running when the lease ends and the scheduler sends the delivery round again.
    pub http_timeout: Duration,
    pub defer_delay: Duration,
    /// An endpoint failing without a single success for this long is disabled.
    pub disable_after: Duration,
}

fn new_lease() -> String {
    format!("{:016x}", rand::rng().random::<u64>())
}

#[derive(serde::Deserialize)]
struct TimestampOnly<'a> {
    #[serde(borrow)]
    timestamp: &'a str,
}

/// The `timestamp` of a stored event body, in unix ms.
fn published_ms(body: &[u8]) -> Option<i64> {
    serde_json::from_slice::<TimestampOnly<'_>>(body)
        .ok()
        .and_then(|t| clock::parse_rfc3339_ms(t.timestamp))
}

impl Pipeline {
    /// When the lease of an attempt that waits `turns` attempts' time before it starts ends.
    fn lease_until(&self, now: i64, turns: i64) -> i64 {
        now + (turns + 1) * self.lease.as_millis() as i64
    }

    /// When a deferred delivery to `endpoint` comes back: after the defer delay (jittered ×1–2)
    /// plus the time the deliveries already deferred for it need to pass through its slots, and,
    /// for an endpoint with a rate limit, not before its turn at the rate, so a slow or
    /// rate-limited endpoint's backlog waits in the retry set instead of cycling through it.
    fn deferred_until(&self, now: i64, endpoint: &Endpoint) -> i64 {
        let mut rng = rand::rng();
        let ms = |d: Duration| d.as_millis() as i64;
        let spread = ms(self.defer_delay) + ms(self.limits.deferral_backlog(endpoint));
        let estimated = spread + rng.random_range(0..=spread.max(1));
        let paced = match self.limits.paced_turn(endpoint, self.defer_delay) {
            None => 0,
            Some(PacedTurn::After(wait)) => ms(wait),
            Some(PacedTurn::PastHorizon) => ms(MAX_BACKLOG) + rng.random_range(0..=ms(MAX_BACKLOG)),
        };
        now + estimated.max(paced)
    }
}
