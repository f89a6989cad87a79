//! A delivery's life in Redis: begun when its event is first seen, taken when a retry job
//! comes due, recorded after each attempt. Each step is one atomic script.
//!
//! While an attempt is in flight its delivery holds a *lease*: a token in the state hash and
//! an entry in the retry set due when the attempt must be over. If the dispatcher dies, the
//! entry comes due and the scheduler re-queues the delivery; if it lives, its record replaces
//! the entry. Only the holder of the current token may change the state, so a late record from
//! an expired lease can add its attempt to the log but cannot undo a newer outcome.

use super::batch_writer::Prepared;
use super::script_call::ScriptCall;
use super::stats;
use super::{Keys, Store, StoreError};
use crate::delivery::{AttemptRecord, DeliveryState, DeliveryStatus, RetryJob};
use crate::endpoint::Endpoint;
use crate::envelope::Envelope;
use redis::Script;
use std::sync::{Arc, LazyLock};

/// Events' arrivals, each as if alone (see `batch_writer` for how they share a call): if the
/// account's endpoints are still at the version the dispatcher cached, stores the event (first
/// copy wins) and creates each of its deliveries that does not exist yet, under a lease or
/// deferred. Answers per event {'stale'} when the endpoints changed (nothing written for it),
/// else {'ok', stored body or '' when this copy was stored, then '1' created / '0' already
/// known per delivery}. When this copy is the first, none of its deliveries can exist (they are
/// only ever created here, with the event, and a redelivery extends both), so only a repeated
/// copy pays for the `HSETNX` that tells known from new. The account's indexes and each
/// endpoint's history are trimmed and their lifetimes renewed only when a flag asks for it (see
/// `upkeep`). Their entries are added together after the call's last event, one `ZADD` per key:
/// `laabam-bench redis-calls` measured 1.0 µs less Redis CPU per delivery with one endpoint per
/// event (median of three pairs, 20.2 → 19.2 µs) and 1.3 µs less with ten (12.7 → 11.4 µs).
/// KEYS per event: endpoints version, event, account's events, account's deliveries, then three
/// per delivery (state, retry shard, endpoint history). ARGV: the store's three
/// (`arrival_call_args`) once per call, then per event its number of deliveries, six values and
/// ten per delivery, in the order `Store::ingest` gives them.
pub(super) static INGEST: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/ingest.lua")));

/// The arrival script's arguments that are the same for every event of a store: the retention,
/// the events kept per account and the history kept per endpoint. They go once per call.
pub(super) fn arrival_call_args(retention_secs: u64, history_per_endpoint: u32) -> redis::Cmd {
    let mut args = redis::Cmd::new();
    args.arg(retention_secs)
        .arg(EVENTS_PER_ACCOUNT)
        .arg(history_per_endpoint);
    args
}

/// Takes a retry job if it is still the delivery's current one: the delivery is unfinished and
/// not queued again (a duplicate job finds the lease of the first taker in the retry set).
static TAKE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/take.lua")));

/// Records a batch of attempts' outcomes (see `batch_writer`), each in turn as if alone: logs
/// the attempt (if any) with its statistics and the endpoint's health, and, when the lease is
/// still ours, moves the state on. Returns {applied, failing_since} per record.
/// The attempt joins the state hash as field `att:<n>`, numbered in the order logged, so a
/// delivery is one key and its record one write; a late record from an expired lease still
/// gets its own entry. The newest 100 are kept.
/// What records of one endpoint share is written once per call, after them all: the
/// statistics' counts summed per field, and the health's fields as the last record left them (a
/// failure reads `failing_since` from what the call gathered before asking Redis). Only the
/// script's end state is ever seen, so this is what the records one at a time would leave. It
/// pays where one endpoint is busy: with calls full of one endpoint's records, Redis's CPU per
/// record fell by about a fifth (`laabam-bench redis-calls`, one endpoint per event); with ten
/// endpoints sharing a call it did not measurably change.
/// KEYS, six per record: state, retry shard, endpoint health, 5-minute stats, hourly stats, the
/// endpoint's history. ARGV: the store's four (`record_call_args`) once per call, then thirteen
/// per record, in the order `Store::record` gives them. A finish trims the endpoint's history
/// (`lua/trim_history.lua`).
pub(super) static RECORD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/trim_history.lua"),
        include_str!("lua/record.lua")
    ))
});

/// The record script's arguments that are the same for every record of a store: the statistics
/// buckets' lifetimes, the history kept per endpoint and the key prefix. They go once per call.
pub(super) fn record_call_args(keys: &Keys, history_per_endpoint: u32) -> redis::Cmd {
    let mut args = redis::Cmd::new();
    args.arg(stats::FIVE_MINUTE_TTL_SECS)
        .arg(stats::HOUR_TTL_SECS)
        .arg(history_per_endpoint)
        .arg(keys.prefix());
    args
}

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
        body: Vec<u8>,
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
const EVENTS_PER_ACCOUNT: u32 = 10_000;

/// Room for one key when a script's keys are sized up front (a prefix and two ids fit); a
/// longer key only regrows the buffer once.
const KEY_BYTES: usize = 112;

impl Store {
    /// One round trip, shared with the arrivals waiting at the same moment: stores the event
    /// (first copy wins) and begins its deliveries, provided the account's endpoints are still at
    /// `endpoints_version` (the version `begins` were chosen from).
    pub async fn ingest(
        &self,
        envelope: &Envelope,
        body: &[u8],
        endpoints_version: u64,
        begins: &[Begin],
        now_ms: i64,
    ) -> Result<Ingest, StoreError> {
        let acct = &envelope.account_id;
        let events_index = self.keys.account_events(acct);
        let deliveries_index = self.keys.account_deliveries(acct);
        let histories: Vec<String> = begins
            .iter()
            .map(|b| self.keys.endpoint_deliveries(&b.job.endpoint))
            .collect();
        let flag = |key: &str| if self.upkeep.due(key) { "1" } else { "" };
        // Sized for the keys and arguments below, so that building them never regrows a buffer.
        let key_count = 4 + 3 * begins.len();
        let mut keys = redis::Cmd::with_capacity(key_count, KEY_BYTES * key_count);
        keys.arg(self.keys.endpoints_version(acct))
            .arg(self.keys.event(acct, &envelope.id))
            .arg(&events_index)
            .arg(&deliveries_index);
        for (b, history) in begins.iter().zip(&histories) {
            keys.arg(self.keys.delivery(&b.job.delivery))
                .arg(self.keys.retry_due(self.keys.shard_of(&b.job.delivery)))
                .arg(history);
        }
        let mut args = redis::Cmd::with_capacity(7 + 10 * begins.len(), body.len() + 64 + 400 * begins.len());
        args.arg(begins.len())
            .arg(endpoints_version)
            .arg(body)
            .arg(now_ms)
            .arg(envelope.id.as_str())
            .arg(flag(&events_index))
            .arg(flag(&deliveries_index));
        for (b, history) in begins.iter().zip(&histories) {
            let job = &b.job;
            let status = if b.lease.is_some() {
                DeliveryStatus::Pending
            } else {
                DeliveryStatus::Retrying
            };
            args.arg(job.encode())
                .arg(job.delivery.as_str())
                .arg(job.event.as_str())
                .arg(job.endpoint.as_str())
                .arg(job.account.as_str())
                .arg(&b.event_type)
                .arg(status.as_str())
                .arg(b.due_ms)
                .arg(b.lease.as_deref().unwrap_or(""))
                .arg(flag(history));
        }
        let reply = match self.arrivals.write(Prepared { keys, args }).await {
            Ok(reply) if reply.first().is_some_and(|s| s == b"ok") => reply,
            stale_or_failed => {
                // Nothing was written, or maybe not: the next write to these keys does their upkeep.
                for key in [&events_index, &deliveries_index].into_iter().chain(&histories) {
                    self.upkeep.forget(key);
                }
                stale_or_failed?;
                return Ok(Ingest::Stale);
            }
        };
        let mut reply = reply.into_iter().skip(1);
        let stored = reply.next().filter(|b| !b.is_empty());
        Ok(Ingest::Begun {
            body: stored.unwrap_or_else(|| body.to_vec()),
            created: reply.map(|c| c == b"1").collect(),
        })
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
        let attempt = r.attempt.map(AttemptRecord::to_stored).unwrap_or_default();
        let opt = |v: Option<i64>| v.map(|n| n.to_string()).unwrap_or_default();
        let timing = r.timing;
        let at = timing.map_or(0, |t| t.at_ms);
        let reason = r.reason.unwrap_or("");
        let mut args = redis::Cmd::with_capacity(13, attempt.len() + reason.len() + 320);
        args.arg(r.lease)
            .arg(attempt)
            .arg(r.status.as_str())
            .arg(r.attempts)
            .arg(opt(r.first_attempt_ms))
            .arg(opt(r.next_attempt_ms))
            .arg(reason)
            .arg(job.encode())
            .arg(timing.map_or("", |t| t.outcome))
            .arg(timing.map(|t| stats::latency_index(t.duration_ms)).unwrap_or_default())
            .arg(at)
            .arg(job.delivery.as_str())
            .arg(
                timing
                    .and_then(|t| t.status_code)
                    .map(|c| c.to_string())
                    .unwrap_or_default(),
            );
        let mut keys = redis::Cmd::with_capacity(6, 6 * KEY_BYTES);
        keys.arg(self.keys.delivery(&job.delivery))
            .arg(self.keys.retry_due(self.keys.shard_of(&job.delivery)))
            .arg(self.keys.endpoint_health(&job.endpoint))
            .arg(
                self.keys
                    .endpoint_stats(&job.endpoint, "5m", at / stats::FIVE_MINUTES_MS),
            )
            .arg(self.keys.endpoint_stats(&job.endpoint, "1h", at / stats::HOUR_MS))
            .arg(self.keys.endpoint_deliveries(&job.endpoint));
        let (applied, failing) = self.records.write(Prepared { keys, args }).await?;
        Ok(Recorded {
            applied: applied == 1,
            failing_since_ms: failing.parse().ok(),
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
