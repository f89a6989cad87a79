//! A delivery's life in Redis: begun when its event is first seen, taken when a retry job
//! comes due, recorded after each attempt. Each step is atomic: arrivals and records are
//! transactions guarded by `WATCH` (see `arrivals` and `records`), taking and redelivering are
//! scripts.
//!
//! While an attempt is in flight its delivery holds a *lease*: a token in the state hash and
//! an entry in the retry set due when the attempt must be over. If the dispatcher dies, the
//! entry comes due and the scheduler re-queues the delivery; if it lives, its record replaces
//! the entry. Only the holder of the current token may change the state, so a late record from
//! an expired lease can add its attempt to the log but cannot undo a newer outcome.

use super::arrivals::{Arrival, Arrived, Beginning};
use super::records::{Counted, Recording};
use super::script_call::ScriptCall;
use super::stats;
use super::{Store, StoreError};
use crate::delivery::{AttemptRecord, DeliveryState, DeliveryStatus, RetryJob};
use crate::endpoint::Endpoint;
use crate::envelope::Envelope;
use bytes::Bytes;
use redis::Script;
use std::sync::{Arc, LazyLock};

/// Takes a retry job if it is still the delivery's current one: the delivery is unfinished and
/// not queued again (a duplicate job finds the lease of the first taker in the retry set).
static TAKE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/take.lua")));

/// An owner's redelivery: a finished delivery starts a new cycle of attempts now; a waiting one
/// is brought forward; one in flight is left alone. A new cycle extends the event's body with
/// the state (its attempt log included), so a redelivery near the end of retention still has
/// its payload when its retries come due; a delivery whose body already expired cannot be sent.
/// KEYS: state, retry shard, event.
static REDELIVER: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/redeliver.lua")));

/// The answer to an event's arrival.
#[derive(Debug)]
pub enum Ingest {
    /// The account's endpoints changed since the version given; nothing was written.
    Stale,
    Begun {
        /// The body to deliver: the first stored copy, so a redelivered message keeps its
        /// timestamp.
        body: Bytes,
        /// Per delivery asked for: created now (`true`) or already known.
        created: Vec<bool>,
    },
}

/// A delivery to create: attempted now under `lease`, or deferred to `due_ms` without one.
#[derive(Debug)]
pub struct Begin {
    pub job: RetryJob,
    pub event_type: String,
    pub due_ms: i64,
    /// `Some` to attempt now (status pending); `None` to defer (status retrying).
    pub lease: Option<String>,
}

/// The answer to taking a retry job.
#[derive(Debug)]
pub enum Taken {
    /// The job is current; the lease is ours.
    Go {
        event_type: String,
        attempts: u32,
        /// Attempts made before the current cycle began (an owner's redelivery starts one).
        cycle_start: u32,
        first_attempt_ms: Option<i64>,
        /// `None` when the event expired from the store.
        body: Option<Vec<u8>>,
        /// `None` when the endpoint was deleted.
        endpoint: Option<Arc<Endpoint>>,
    },
    /// The job is stale (delivery finished, queued again, or gone); drop it.
    Stale(String),
}

/// The state change after an attempt or a deferral, applied only under the current lease.
#[derive(Debug)]
pub struct Record<'a> {
    pub job: &'a RetryJob,
    pub lease: &'a str,
    /// `None` for a deferral, which is not an attempt.
    pub attempt: Option<&'a AttemptRecord>,
    pub status: DeliveryStatus,
    pub attempts: u32,
    pub first_attempt_ms: Option<i64>,
    /// When the delivery is retrying: the due time of the next attempt.
    pub next_attempt_ms: Option<i64>,
    pub reason: Option<&'a str>,
    /// The attempt's outcome and timing, for the endpoint's statistics and health.
    pub timing: Option<AttemptTiming<'a>>,
}

/// What the statistics need of an attempt.
#[derive(Debug, Clone, Copy)]
pub struct AttemptTiming<'a> {
    pub outcome: &'a str,
    pub duration_ms: u64,
    pub status_code: Option<u16>,
    pub at_ms: i64,
}

/// The answer to recording: whether the lease was still ours, and since when the endpoint has
/// failed without a success in between.
#[derive(Debug, Clone, Copy)]
pub struct Recorded {
    pub applied: bool,
    pub failing_since_ms: Option<i64>,
}

/// The answer to an owner's redelivery request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redelivery {
    Queued,
    InFlight,
    /// The delivery is known but its event's body has outlived retention.
    EventExpired,
    NotFound,
}

/// How many events each account's listing keeps.
pub(super) const EVENTS_PER_ACCOUNT: u32 = 10_000;

impl Store {
    /// A transaction shared with the arrivals waiting at the same moment (its reads, then its
    /// writes): stores the event (first copy wins) and begins its deliveries, provided the
    /// account's endpoints are still at `endpoints_version` (the version `begins` were chosen
    /// from).
    pub async fn ingest(
        &self,
        envelope: &Envelope,
        body: &[u8],
        endpoints_version: u64,
        begins: &[Begin],
        now_ms: i64,
    ) -> Result<Ingest, StoreError> {
        // One copy of the body, shared by the arrival and the answer when this copy is stored.
        let body = Bytes::copy_from_slice(body);
        let acct = &envelope.account_id;
        let events_index = self.keys.account_events(acct);
        let deliveries_index = self.keys.account_deliveries(acct);
        // The keys whose upkeep this write does: if it may not have happened (the endpoints
        // changed, or the write failed), the next write to them does it.
        let mut upkept: Vec<String> = Vec::new();
        let mut due = |key: &str| {
            let due = self.upkeep.due(key);
            if due {
                upkept.push(key.to_owned());
            }
            due
        };
        let deliveries: Vec<Beginning> = begins
            .iter()
            .map(|b| {
                let job = &b.job;
                let history = self.keys.endpoint_deliveries(&job.endpoint);
                Beginning {
                    state: self.keys.delivery(&job.delivery),
                    due: self.keys.retry_due(self.keys.shard_of(&job.delivery)),
                    history_upkeep: due(&history),
                    history,
                    job: job.encode(),
                    delivery: job.delivery.to_string(),
                    endpoint: job.endpoint.to_string(),
                    event_type: b.event_type.clone(),
                    due_ms: b.due_ms,
                    lease: b.lease.clone(),
                }
            })
            .collect();
        let arrival = Arrival {
            endpoints_version_key: self.keys.endpoints_version(acct),
            endpoints_version,
            event_key: self.keys.event(acct, &envelope.id),
            events_upkeep: due(&events_index),
            deliveries_upkeep: due(&deliveries_index),
            events_index,
            deliveries_index,
            body: body.clone(),
            now_ms,
            event_id: envelope.id.to_string(),
            account: acct.to_string(),
            deliveries,
        };
        let forget = || {
            for key in &upkept {
                self.upkeep.forget(key);
            }
        };
        match self.arrivals.write(arrival).await {
            Ok(Arrived::Begun { stored, created }) => Ok(Ingest::Begun {
                body: stored.map_or(body, Bytes::from),
                created,
            }),
            Ok(Arrived::Stale) => {
                forget();
                Ok(Ingest::Stale)
            }
            Err(e) => {
                forget();
                Err(e.into())
            }
        }
    }

    /// Takes a retry job under a new lease lasting until `lease_until_ms`.
    pub async fn take(&self, job: &RetryJob, lease: &str, lease_until_ms: i64) -> Result<Taken, StoreError> {
        let eps_key = self.keys.account_endpoints(&job.account);
        let reply: Vec<Vec<u8>> = ScriptCall::new(&TAKE, 4)
            .key(self.keys.delivery(&job.delivery))
            .key(self.keys.retry_due(self.keys.shard_of(&job.delivery)))
            .key(self.keys.event(&job.account, &job.event))
            .key(&eps_key)
            .arg(job.encode())
            .arg(lease_until_ms)
            .arg(lease)
            .arg(job.endpoint.as_str())
            .invoke(&mut self.conn())
            .await?;
        let text = |i: usize| {
            reply
                .get(i)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        if text(0) != "go" {
            return Ok(Taken::Stale(text(0)));
        }
        let non_empty = |i: usize| reply.get(i).filter(|v| !v.is_empty()).cloned();
        let endpoint = non_empty(4)
            .map(|json| {
                self.open_endpoint(&eps_key, &String::from_utf8_lossy(&json))
                    .map(Arc::new)
            })
            .transpose()?;
        Ok(Taken::Go {
            event_type: text(5),
            attempts: text(1).parse().unwrap_or(0),
            cycle_start: text(6).parse().unwrap_or(0),
            first_attempt_ms: text(2).parse().ok(),
            body: non_empty(3),
            endpoint,
        })
    }

    /// Applies a record under its lease, and counts its attempt in the endpoint's statistics;
    /// written together with the other records waiting at the time (see `batch_writer`).
    pub async fn record(&self, r: &Record<'_>) -> Result<Recorded, StoreError> {
        let job = r.job;
        let timing = r.timing;
        let at = timing.map_or(0, |t| t.at_ms);
        let attempt = r.attempt.map(|attempt| {
            let counted = Counted {
                field: timing.map_or_else(String::new, |t| {
                    format!("{}|{}", t.outcome, stats::latency_index(t.duration_ms))
                }),
                status_code: timing.and_then(|t| t.status_code),
                at_ms: at,
            };
            (attempt.to_stored(), counted)
        });
        let recording = Recording {
            state: self.keys.delivery(&job.delivery),
            due: self.keys.retry_due(self.keys.shard_of(&job.delivery)),
            health: self.keys.endpoint_health(&job.endpoint),
            stats_5m: self
                .keys
                .endpoint_stats(&job.endpoint, "5m", at / stats::FIVE_MINUTES_MS),
            stats_1h: self.keys.endpoint_stats(&job.endpoint, "1h", at / stats::HOUR_MS),
            history: self.keys.endpoint_deliveries(&job.endpoint),
            lease: r.lease.to_owned(),
            attempt,
            status: r.status,
            attempts: r.attempts,
            first_attempt_ms: r.first_attempt_ms,
            next_attempt_ms: r.next_attempt_ms,
            reason: r.reason.map(str::to_owned),
            job: job.encode(),
            delivery: job.delivery.to_string(),
        };
        let (applied, failing_since_ms) = self.records.write(recording).await?;
        Ok(Recorded {
            applied,
            failing_since_ms,
        })
    }

    /// Queues an owner's redelivery of one delivery, attempted as soon as a scheduler sees it.
    pub async fn redeliver(&self, state: &DeliveryState, now_ms: i64) -> Result<Redelivery, StoreError> {
        let job = RetryJob {
            delivery: state.id.clone(),
            event: state.event_id.clone(),
            endpoint: state.endpoint_id.clone(),
            account: state.account_id.clone(),
        };
        let answer: String = ScriptCall::new(&REDELIVER, 3)
            .key(self.keys.delivery(&state.id))
            .key(self.keys.retry_due(self.keys.shard_of(&state.id)))
            .key(self.keys.event(&state.account_id, &state.event_id))
            .arg(job.encode())
            .arg(now_ms)
            .arg(self.retention_secs())
            .invoke(&mut self.conn())
            .await?;
        Ok(match answer.as_str() {
            "queued" => Redelivery::Queued,
            "in_flight" => Redelivery::InFlight,
            "expired" => Redelivery::EventExpired,
            _ => Redelivery::NotFound,
        })
    }
}
