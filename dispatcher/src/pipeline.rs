//! What happens to each broker message, apart from the broker: an event fans out into
//! deliveries, a retry job resumes one delivery. Each returns what to do with the message and
//! the attempts to run once it is acknowledged.
//!
//! Order matters for at-least-once: deliveries are begun in Redis (each under a lease that
//! re-queues it if this process dies) *before* the message is acknowledged, and attempts run
//! *after*, so an acknowledged message never depends on this process surviving.

use crate::directory::Directory;
use crate::limits::{EndpointLimits, Turn};
use crate::metrics::METRICS;
use crate::sender::Sender;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use laabam_shared::catalog::ENDPOINT_DISABLED;
use laabam_shared::clock::{self, now_ms};
use laabam_shared::delivery::{AttemptRecord, DeliveryStatus, Outcome, RetryJob};
use laabam_shared::endpoint::Endpoint;
use laabam_shared::envelope::{Envelope, Provenance};
use laabam_shared::ids::{DeliveryId, EndpointId};
use laabam_shared::retry::{NextStep, RetryPolicy, random_jitter};
use laabam_shared::signing::signature_header;
use laabam_shared::store::{AttemptTiming, Begin, Ingest, Record, Recorded, Store, Taken};
use rand::Rng;
use serde_json::value::RawValue;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::Instrument;

/// The process-wide bound on attempts in flight.
#[derive(Debug)]
pub struct InFlight {
    semaphore: Arc<Semaphore>,
    capacity: usize,
}

impl InFlight {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, Semaphore::MAX_PERMITS);
        InFlight {
            semaphore: Arc::new(Semaphore::new(capacity)),
            capacity,
        }
    }

    /// Waits for `n` attempts' room at once (never part of it, so two wide events cannot each
    /// hold half and wait for the rest). An event wider than the capacity takes all of it, and
    /// its attempts take turns on that room (see [`Pipeline::run_attempts`]).
    async fn acquire(&self, n: usize) -> Option<OwnedSemaphorePermit> {
        let n = n.min(self.capacity);
        if n == 0 {
            return None;
        }
        self.semaphore.clone().acquire_many_owned(n as u32).await.ok()
    }

    /// How many attempts of the same event run before the one at `rank` can start: its lease
    /// must last through their turns as well as its own.
    fn turns_before(&self, rank: usize) -> i64 {
        (rank / self.capacity) as i64
    }
}

/// Runs `tasks`, as many at once as `room` holds permits (all at once without one): each
/// permit is a turn that takes the next waiting task when its own ends, and is released when
/// none is left. Permits beyond the tasks go back before any runs.
async fn take_turns<T, Fut>(tasks: Vec<T>, mut room: Option<OwnedSemaphorePermit>, run: impl Fn(T) -> Fut)
where
    Fut: std::future::Future<Output = ()>,
{
    let turns = room.as_ref().map_or(tasks.len(), |r| r.num_permits()).min(tasks.len());
    let queue = std::sync::Mutex::new(tasks.into_iter());
    let next = || queue.lock().expect("task queue lock").next();
    let run = &run;
    let turns: Vec<_> = (0..turns)
        .map(|_| {
            let permit = room.as_mut().and_then(|r| r.split(1));
            async move {
                let _permit = permit;
                while let Some(task) = next() {
                    run(task).await;
                }
            }
        })
        .collect();
    // Room for deliveries that were deferred or already known is not held while others run.
    drop(room);
    futures_util::future::join_all(turns).await;
}

/// How often a fan-out re-reads endpoints that changed under it before handing the message back.
const MAX_STALE_TRIES: usize = 5;

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
    pub defer_delay: Duration,
    /// An endpoint failing without a single success for this long is disabled.
    pub disable_after: Duration,
}

fn new_lease() -> String {
    format!("{:016x}", rand::rng().random::<u64>())
}

fn header(name: &'static str, value: &str) -> Option<(HeaderName, HeaderValue)> {
    Some((HeaderName::from_static(name), HeaderValue::from_str(value).ok()?))
}

/// A bounded label for the disabled-endpoints metric.
fn disabled_reason_label(why: &str) -> &'static str {
    if why.contains("410") { "gone" } else { "failing" }
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
    /// plus the time the deliveries already deferred for it need to pass through its slots, so
    /// a slow endpoint's backlog waits in the retry set instead of cycling through it.
    fn deferred_until(&self, now: i64, endpoint: &Endpoint) -> i64 {
        let base = self.defer_delay.as_millis() as i64;
        let backlog = self.limits.deferral_backlog(endpoint).as_millis() as i64;
        now + base + backlog + rand::rng().random_range(0..=(base + backlog).max(1))
    }

    /// A newly published event: validate, fan out, begin each delivery. `target` restricts the
    /// fan-out to one endpoint of the event's account (test sends).
    pub async fn handle_event(&self, data: &[u8], provenance: &Provenance, target: Option<EndpointId>) -> Handled {
        let envelope = match Envelope::parse(data, provenance, now_ms()) {
            Ok(e) => e,
            Err(e) => {
                return Handled::only(Disposition::DeadLetter {
                    reason: e.code(),
                    detail: e.to_string(),
                });
            }
        };
        METRICS.events_consumed.with_label_values(&[&envelope.event_type]).inc();
        let span = tracing::info_span!("event", event_id = %envelope.id, event_type = %envelope.event_type);
        async { self.fan_out(envelope, target.as_ref()).await.warn_if_requeued() }
            .instrument(span)
            .await
    }

    async fn fan_out(&self, envelope: Envelope, target: Option<&EndpointId>) -> Handled {
        let json = envelope.to_json();
        let mut endpoints = match self.directory.get(&envelope.account_id).await {
            Ok(e) => e,
            Err(e) => return Handled::only(Disposition::Requeue(e.to_string())),
        };
        // Endpoints changing between our read and the write is rare; a few tries settle it.
        for _ in 0..MAX_STALE_TRIES {
            let recipients: Vec<&Arc<Endpoint>> = endpoints.recipients(&envelope.event_type, target).collect();
            let room = self.in_flight.acquire(recipients.len()).await;
            // Decided without waiting: a delivery that must wait for its endpoint's slot waits
            // in its attempt, after the message is settled, so its event's other deliveries go
            // ahead and hold no slot of theirs idle meanwhile.
            let turns: Vec<Option<Turn>> = recipients.iter().map(|ep| self.limits.take(ep)).collect();
            let now = now_ms();
            let mut rank = 0;
            let begins: Vec<Begin> = recipients
                .iter()
                .zip(&turns)
                .map(|(endpoint, turn)| {
                    let (due_ms, lease) = match turn {
                        Some(_) => {
                            let turns = self.in_flight.turns_before(rank);
                            rank += 1;
                            (self.lease_until(now, turns), Some(new_lease()))
                        }
                        None => (self.deferred_until(now, endpoint), None),
                    };
                    Begin {
                        job: RetryJob {
                            delivery: DeliveryId::for_pair(&envelope.id, &endpoint.id),
                            event: envelope.id.clone(),
                            endpoint: endpoint.id.clone(),
                            account: envelope.account_id.clone(),
                        },
                        event_type: envelope.event_type.clone(),
                        due_ms,
                        lease,
                    }
                })
                .collect();
            let (body, created) = match self
                .store
                .ingest(&envelope, &json, endpoints.version, &begins, now)
                .await
            {
                Ok(Ingest::Begun { body, created }) => (body, created),
                Ok(Ingest::Stale) => {
                    tracing::debug!("the account's endpoints changed; reloading them");
                    endpoints = match self.directory.reload(&envelope.account_id).await {
                        Ok(e) => e,
                        Err(e) => return Handled::only(Disposition::Requeue(e.to_string())),
                    };
                    continue;
                }
                Err(e) => return Handled::only(Disposition::Requeue(e.to_string())),
            };
            let published = published_ms(&body);
            let body = Bytes::from(body);
            let mut tasks = Vec::new();
            for (((begin, turn), endpoint), created) in begins.into_iter().zip(turns).zip(recipients).zip(created) {
                if !created {
                    tracing::debug!(delivery_id = %begin.job.delivery, "delivery already known; skipped");
                    continue;
                }
                match (turn, begin.lease) {
                    (Some(turn), Some(lease)) => tasks.push(AttemptTask {
                        job: begin.job,
                        event_type: begin.event_type,
                        endpoint: endpoint.clone(),
                        body: body.clone(),
                        attempts_before: 0,
                        cycle_start: 0,
                        first_attempt_ms: None,
                        published_ms: published,
                        lease,
                        turn,
                    }),
                    _ => self.count_deferral(endpoint, &envelope.event_type, &begin.job.delivery),
                }
            }
            tracing::debug!(deliveries = tasks.len(), "event fanned out");
            return Handled {
                disposition: Disposition::Ack,
                attempts: Attempts { tasks, room },
            };
        }
        Handled::only(Disposition::Requeue(
            "the account's endpoints kept changing during fan-out".into(),
        ))
    }

    /// A retry job that came due: take it under a new lease and attempt, defer, or finish it.
    pub async fn handle_retry(&self, data: &[u8]) -> Handled {
        let job = match RetryJob::decode(data) {
            Ok(j) => j,
            Err(e) => {
                return Handled::only(Disposition::DeadLetter {
                    reason: INVALID_RETRY_JOB,
                    detail: e.to_string(),
                });
            }
        };
        let span = tracing::info_span!("retry", delivery_id = %job.delivery, event_id = %job.event, endpoint_id = %job.endpoint);
        async { self.resume(job).await.warn_if_requeued() }
            .instrument(span)
            .await
    }

    async fn resume(&self, job: RetryJob) -> Handled {
        let lease = new_lease();
        let now = now_ms();
        let taken = match self.store.take(&job, &lease, self.lease_until(now, 0)).await {
            Ok(t) => t,
            Err(e) => return Handled::only(Disposition::Requeue(e.to_string())),
        };
        let (event_type, attempts, cycle_start, first_attempt_ms, body, endpoint) = match taken {
            Taken::Stale(why) => {
                tracing::debug!(state = %why, "stale retry job dropped");
                return Handled::only(Disposition::Ack);
            }
            Taken::Go {
                event_type,
                attempts,
                cycle_start,
                first_attempt_ms,
                body,
                endpoint,
            } => (event_type, attempts, cycle_start, first_attempt_ms, body, endpoint),
        };
        let fail = |why: &str| {
            let why = why.to_owned();
            let job = &job;
            let lease = &lease;
            async move {
                self.record(Record {
                    job,
                    lease,
                    attempt: None,
                    status: DeliveryStatus::Failed,
                    attempts,
                    first_attempt_ms,
                    next_attempt_ms: None,
                    reason: Some(&why),
                    timing: None,
                })
                .await;
                Handled::only(Disposition::Ack)
            }
        };
        let (body, endpoint) = match (body, endpoint) {
            (None, _) => return fail("event expired from the store before delivery").await,
            (_, None) => return fail("endpoint was deleted").await,
            (Some(body), Some(endpoint)) => (body, endpoint),
        };
        if !endpoint.enabled {
            let why = format!(
                "endpoint is disabled: {}",
                endpoint.disabled_reason.as_deref().unwrap_or("by its owner")
            );
            return fail(&why).await;
        }
        self.limits.returned(&endpoint);
        let room = self.in_flight.acquire(1).await;
        let Some(turn) = self.limits.take(&endpoint) else {
            self.defer(&job, &lease, &event_type, attempts, first_attempt_ms, &endpoint)
                .await;
            return Handled::only(Disposition::Ack);
        };
        let published_ms = published_ms(&body);
        Handled {
            disposition: Disposition::Ack,
            attempts: Attempts {
                tasks: vec![AttemptTask {
                    job: job.clone(),
                    event_type,
                    endpoint,
                    body: Bytes::from(body),
                    attempts_before: attempts,
                    cycle_start,
                    first_attempt_ms,
                    published_ms,
                    lease,
                    turn,
                }],
                room,
            },
        }
    }

    /// Runs a message's attempts within its room, each permit a turn that takes the next waiting
    /// attempt when its own ends, so a fan-out wider than the in-flight bound stays within it: a
    /// connection storm is what the bound exists to stop.
    ///
    /// Each attempt's future is boxed when its turn starts: unboxed, every turn would carry a
    /// whole attempt's state (the HTTP exchange and the record, kilobytes) and be copied as the
    /// turns are gathered, which the `fanout` profile showed as 2% of the dispatcher's time.
    pub async fn run_attempts(&self, attempts: Attempts) {
        take_turns(attempts.tasks, attempts.room, |task| Box::pin(self.run_attempt(task))).await
    }

    /// Signs and sends one attempt, then records it and decides what follows.
    async fn run_attempt(&self, task: AttemptTask) {
        let span = tracing::info_span!(
            "attempt",
            event_id = %task.job.event,
            endpoint_id = %task.endpoint.id,
            delivery_id = %task.job.delivery,
            attempt = task.attempts_before + 1,
            outcome = tracing::field::Empty,
        );
        self.attempt(task).instrument(span).await
    }

    async fn attempt(&self, task: AttemptTask) {
        let mut slot = match task.turn {
            Turn::Now(slot) => slot,
            Turn::Queued(queued) => match self.limits.wait(queued, &task.endpoint).await {
                Some(slot) => slot,
                None => {
                    let (attempts, first) = (task.attempts_before, task.first_attempt_ms);
                    return self
                        .defer(
                            &task.job,
                            &task.lease,
                            &task.event_type,
                            attempts,
                            first,
                            &task.endpoint,
                        )
                        .await;
                }
            },
        };
        let number = task.attempts_before + 1;
        let started_ms = now_ms();
        let timestamp = started_ms / 1000;
        let signature = signature_header(
            task.endpoint.signing_secrets(started_ms),
            task.job.event.as_str(),
            timestamp,
            &task.body,
        );
        let custom = task.endpoint.headers.iter().filter_map(|(name, value)| {
            Some((
                HeaderName::from_bytes(name.as_bytes()).ok()?,
                HeaderValue::from_str(value).ok()?,
            ))
        });
        let headers: Vec<_> = [
            header("webhook-id", task.job.event.as_str()),
            header("webhook-timestamp", &timestamp.to_string()),
            header("webhook-signature", &signature),
            header("x-laabam-signature", &signature),
            header("x-laabam-delivery-id", task.job.delivery.as_str()),
            header("x-laabam-attempt", &number.to_string()),
        ]
        .into_iter()
        .flatten()
        .chain(custom)
        .collect();

        METRICS.in_flight.inc();
        let checkpoint = self.limits.checkpoint(&mut slot);
        let result = self
            .sender
            .post(task.endpoint.url.as_str(), headers, task.body.clone(), checkpoint)
            .await;
        METRICS.in_flight.dec();

        let outcome = result.outcome;
        tracing::Span::current().record("outcome", outcome.as_str());
        METRICS
            .attempts
            .with_label_values(&[&task.event_type, outcome.as_str()])
            .inc();
        crate::metrics::count_endpoint_attempt(task.endpoint.id.as_str(), outcome.as_str());
        METRICS
            .attempt_seconds
            .with_label_values(&[&task.event_type])
            .observe(result.duration.as_secs_f64());

        let attempt = AttemptRecord {
            attempt: number,
            at_ms: started_ms,
            outcome,
            status_code: result.status,
            duration_ms: result.duration.as_millis() as u64,
            error: result.error.clone(),
            // Kept for failed attempts, where it explains the failure; a success needs no body.
            response_excerpt: if outcome.is_success() {
                None
            } else {
                result.excerpt.clone()
            },
        };
        let first_attempt_ms = task.first_attempt_ms.unwrap_or(started_ms);
        let (status, next_attempt_ms, reason) = match outcome {
            Outcome::Success => {
                if let Some(published) = task.published_ms {
                    METRICS
                        .publish_to_delivered_seconds
                        .observe((now_ms() - published).max(0) as f64 / 1000.0);
                }
                (DeliveryStatus::Succeeded, None, None)
            }
            Outcome::Http410 => {
                let why = "endpoint answered 410 Gone";
                self.disable(&task.endpoint.id, why).await;
                (DeliveryStatus::Failed, None, Some(format!("{why}; endpoint disabled")))
            }
            _ => {
                match self.policy.after_failure(
                    number - task.cycle_start,
                    first_attempt_ms,
                    now_ms(),
                    result.retry_after,
                    random_jitter(),
                ) {
                    NextStep::RetryAt(at) => (DeliveryStatus::Retrying, Some(at), None),
                    NextStep::GiveUp(why) => (DeliveryStatus::Failed, None, Some(why)),
                }
            }
        };
        match status {
            DeliveryStatus::Succeeded | DeliveryStatus::Failed => {
                METRICS
                    .completed
                    .with_label_values(&[&task.event_type, status.as_str()])
                    .inc();
            }
            DeliveryStatus::Retrying => METRICS.retries_scheduled.with_label_values(&[&task.event_type]).inc(),
            DeliveryStatus::Pending => {}
        }
        // A success is a debug line: every attempt is in the delivery's log in Redis already,
        // and at the default level a line per success cost the dispatcher about a tenth more
        // CPU in `fanout` (and a busy system gigabytes of logs a day). What did not succeed is what an
        // operator looks for: a retry at info, a delivery given up at warn.
        macro_rules! finished {
            ($level:expr) => {
                tracing::event!(
                    $level,
                    status_code = result.status,
                    duration_ms = attempt.duration_ms,
                    next = status.as_str(),
                    error = result.error.as_deref().unwrap_or(""),
                    "attempt finished"
                )
            };
        }
        match status {
            DeliveryStatus::Succeeded => finished!(tracing::Level::DEBUG),
            DeliveryStatus::Retrying | DeliveryStatus::Pending => finished!(tracing::Level::INFO),
            DeliveryStatus::Failed => finished!(tracing::Level::WARN),
        }
        let recorded = self
            .record(Record {
                job: &task.job,
                lease: &task.lease,
                attempt: Some(&attempt),
                status,
                attempts: number,
                first_attempt_ms: Some(first_attempt_ms),
                next_attempt_ms,
                reason: reason.as_deref(),
                timing: Some(AttemptTiming {
                    outcome: outcome.as_str(),
                    duration_ms: attempt.duration_ms,
                    status_code: result.status,
                    at_ms: started_ms,
                }),
            })
            .await;
        if let Some(since) = recorded.and_then(|r| r.failing_since_ms)
            && now_ms() - since > self.disable_after.as_millis() as i64
        {
            let why = format!(
                "no successful delivery for {}",
                humantime::format_duration(self.disable_after)
            );
            self.disable(&task.endpoint.id, &why).await;
        }
    }

    /// Disables an endpoint and tells the account's other endpoints with `endpoint.disabled`.
    async fn disable(&self, endpoint: &EndpointId, why: &str) {
        let disabled = match self.store.disable_endpoint(endpoint, why, now_ms()).await {
            Ok(Some(ep)) => ep,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(error = %e, endpoint_id = %endpoint, "could not disable endpoint");
                return;
            }
        };
        tracing::warn!(endpoint_id = %endpoint, reason = why, "endpoint disabled");
        METRICS
            .endpoints_disabled
            .with_label_values(&[disabled_reason_label(why)])
            .inc();
        let data = serde_json::json!({ "endpoint_id": disabled.id, "url": disabled.url, "reason": why });
        let data = RawValue::from_string(data.to_string()).expect("JSON is JSON");
        let announcement = match Envelope::new(ENDPOINT_DISABLED, disabled.account_id.clone(), data, None, now_ms()) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "could not build endpoint.disabled");
                return;
            }
        };
        // Fanned out here rather than through the broker: the same begin-under-lease path makes
        // it durable once begun. A Redis failure is retried for as long as a lease would last.
        let deadline = Instant::now() + self.lease;
        let handled = loop {
            match Box::pin(self.fan_out(announcement.clone(), None)).await {
                Handled {
                    disposition: Disposition::Requeue(e),
                    ..
                } if Instant::now() < deadline => {
                    tracing::warn!(error = %e, "endpoint.disabled not begun yet; retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                handled => break handled,
            }
        };
        Box::pin(self.run_attempts(handled.attempts)).await;
    }

    /// Moves a delivery held under `lease` to the retry set without counting an attempt: its
    /// endpoint has no slot for it soon enough (see [`EndpointLimits`]).
    async fn defer(
        &self,
        job: &RetryJob,
        lease: &str,
        event_type: &str,
        attempts: u32,
        first_attempt_ms: Option<i64>,
        endpoint: &Endpoint,
    ) {
        self.record(Record {
            job,
            lease,
            attempt: None,
            status: DeliveryStatus::Retrying,
            attempts,
            first_attempt_ms,
            next_attempt_ms: Some(self.deferred_until(now_ms(), endpoint)),
            reason: None,
            timing: None,
        })
        .await;
        self.count_deferral(endpoint, event_type, &job.delivery);
    }

    /// Counts a deferred delivery: in the metric, and in its endpoint's deferred backlog, which
    /// spreads the next deferrals' due times (see [`Pipeline::deferred_until`]).
    fn count_deferral(&self, endpoint: &Endpoint, event_type: &str, delivery: &DeliveryId) {
        self.limits.deferred(endpoint);
        METRICS.deferred.with_label_values(&[event_type]).inc();
        tracing::debug!(delivery_id = %delivery, endpoint_id = %endpoint.id, "endpoint at its limit; deferred");
    }

    /// Writes a record, retrying while Redis is unreachable for as long as the lease lasts;
    /// past that the lease has already re-queued the delivery, so giving up loses nothing.
    async fn record(&self, record: Record<'_>) -> Option<Recorded> {
        let deadline = Instant::now() + self.lease;
        loop {
            match self.store.record(&record).await {
                Ok(recorded) => {
                    if !recorded.applied {
                        tracing::warn!(delivery_id = %record.job.delivery, "lease expired before the outcome was recorded; the newer holder's state is kept");
                    }
                    return Some(recorded);
                }
                Err(e) if Instant::now() < deadline => {
                    tracing::warn!(delivery_id = %record.job.delivery, error = %e, "recording failed; retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => {
                    tracing::error!(delivery_id = %record.job.delivery, error = %e, "could not record the outcome; the lease will retry the delivery");
                    return None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    #[tokio::test]
    async fn tasks_past_the_room_take_turns_and_each_runs_once() {
        let semaphore = Arc::new(Semaphore::new(8));
        let room = semaphore.clone().acquire_many_owned(3).await.unwrap();
        let (running, peak) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let ran = std::sync::Mutex::new(Vec::new());
        take_turns((0..20).collect(), Some(room), |task: usize| {
            let (running, peak, ran) = (&running, &peak, &ran);
            async move {
                peak.fetch_max(running.fetch_add(1, SeqCst) + 1, SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
                running.fetch_sub(1, SeqCst);
                ran.lock().unwrap().push(task);
            }
        })
        .await;
        assert_eq!(peak.load(SeqCst), 3, "never more at once than the room");
        let mut ran = ran.into_inner().unwrap();
        ran.sort();
        assert_eq!(ran, (0..20).collect::<Vec<_>>(), "each task once");
        assert_eq!(semaphore.available_permits(), 8, "the room is given back");
    }

    #[tokio::test]
    async fn room_beyond_the_tasks_goes_back_before_they_run() {
        let semaphore = Arc::new(Semaphore::new(8));
        let room = semaphore.clone().acquire_many_owned(5).await.unwrap();
        let free_while_running = AtomicUsize::new(0);
        take_turns(vec![()], Some(room), |()| async {
            free_while_running.store(semaphore.available_permits(), SeqCst);
        })
        .await;
        assert_eq!(
            free_while_running.load(SeqCst),
            7,
            "only the one task's permit is held while it runs"
        );
    }
}
