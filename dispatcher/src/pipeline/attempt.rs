//! One attempt: signed, sent, recorded under its lease, and what follows it (a retry, a
//! deferral, the endpoint disabled).

use super::in_flight::take_turns;
use super::{AttemptTask, Attempts, Disposition, Handled, Pipeline};
use crate::limits::{Slot, Turn};
use crate::metrics::METRICS;
use http::header::{HeaderName, HeaderValue};
use laabam_shared::catalog::ENDPOINT_DISABLED;
use laabam_shared::clock::{now_ms, redis_now_ms};
use laabam_shared::delivery::{AttemptRecord, DeliveryStatus, Outcome, RetryJob};
use laabam_shared::endpoint::Endpoint;
use laabam_shared::envelope::Envelope;
use laabam_shared::ids::{DeliveryId, EndpointId};
use laabam_shared::retry::{NextStep, random_jitter};
use laabam_shared::signing::signature_header;
use laabam_shared::store::{AttemptTiming, Record, Recorded};
use serde_json::value::RawValue;
use std::time::Duration;
use tokio::time::Instant;
use tracing::Instrument;

fn header(name: &'static str, value: &str) -> Option<(HeaderName, HeaderValue)> {
    Some((HeaderName::from_static(name), HeaderValue::from_str(value).ok()?))
}

/// A bounded label for the disabled-endpoints metric.
fn disabled_reason_label(why: &str) -> &'static str {
    if why.contains("410") { "gone" } else { "failing" }
}

impl Pipeline {
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

    /// The slot an attempt under `lease` sends on, and whether it also holds a place among its
    /// endpoint's requests across dispatchers (under the same lease token); `None` to defer.
    async fn slot_for(&self, turn: Turn, endpoint: &Endpoint, lease: &str) -> Option<(Slot, bool)> {
        let slot = match turn {
            Turn::Now(slot) => slot,
            Turn::Queued(queued) => self.limits.wait(queued, endpoint).await?,
        };
        let Some(limit) = self.limits.held_together(endpoint) else {
            return Some((slot, false));
        };
        // Asked again while the wait is short, as for the process's own slots: a deferral is a
        // round trip through the retry set and a defer delay at least.
        let mut retry = None;
        loop {
            match self
                .store
                .hold_request_slot(&endpoint.id, limit, lease, self.lease)
                .await
            {
                Ok(true) => return Some((slot, true)),
                Ok(false) => {
                    let (every, until) = *retry
                        .get_or_insert_with(|| self.limits.place_retry(endpoint))
                        .as_ref()?;
                    if std::time::Instant::now() + every > until {
                        return None;
                    }
                    tokio::time::sleep(every).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, endpoint_id = %endpoint.id, "could not count the endpoint's requests across dispatchers; this process's limit stands");
                    return Some((slot, false));
                }
            }
        }
    }

    /// Gives back the place among the endpoint's requests across dispatchers held under `lease`.
    async fn release_place(&self, endpoint: &EndpointId, lease: &str) {
        if let Err(e) = self.store.release_request_slot(endpoint, lease).await {
            tracing::warn!(error = %e, endpoint_id = %endpoint, "could not give back a place among the endpoint's requests; its lease ends it");
        }
    }

    async fn attempt(&self, task: AttemptTask) {
        let Some((mut slot, held_together)) = self.slot_for(task.turn, &task.endpoint, &task.lease).await else {
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
        };
        // Late after a Redis stall or a long wait for the slot: sent now, the attempt could
        // still be running when the lease ends and the scheduler sends the delivery again, so it
        // is left to the lease, as if this process had died, and goes out once, a little later.
        if redis_now_ms() + self.http_timeout.as_millis() as i64 > task.lease_until_ms {
            if held_together {
                self.release_place(&task.endpoint.id, &task.lease).await;
            }
            METRICS.left_to_lease.inc();
            tracing::warn!(
                lease_left_ms = task.lease_until_ms - redis_now_ms(),
                "too little of the lease left to attempt; the scheduler sends the delivery again when it ends"
            );
            return;
        }
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
        slot.sending();
        let checkpoint = self.limits.checkpoint(&mut slot);
        let result = self
            .sender
            .post(task.endpoint.url.as_str(), headers, task.body.clone(), checkpoint)
            .await;
        METRICS.in_flight.dec();
        // The place across dispatchers goes back before the slot, or the next delivery waiting
        // here for the slot could find it still held and be deferred.
        if held_together {
            self.release_place(&task.endpoint.id, &task.lease).await;
        }
        // The endpoint's slot counts its requests in flight, and its hold is how long the
        // endpoint takes: the record that follows is ours, and at a moderate rate it waits for
        // company in the record writer, which an endpoint limited to one request at a time
        // would otherwise wait out between its requests.
        drop(slot);

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
                // The first attempt's time is the host's: off from Redis's by seconds at most,
                // against a maximum age of hours.
                match self.policy.after_failure(
                    number - task.cycle_start,
                    first_attempt_ms,
                    redis_now_ms(),
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
        if let Disposition::Requeue(e) = &handled.disposition {
            // The endpoint stays disabled; only its announcement is lost.
            tracing::error!(error = %e, endpoint_id = %endpoint, "endpoint.disabled could not be begun before the deadline; not announced");
        }
        Box::pin(self.run_attempts(handled.attempts)).await;
    }

    /// Moves a delivery held under `lease` to the retry set without counting an attempt: its
    /// endpoint has no slot for it soon enough (see [`crate::limits::EndpointLimits`]).
    pub(super) async fn defer(
        &self,
        job: &RetryJob,
        lease: &str,
        event_type: &str,
        attempts: u32,
        first_attempt_ms: Option<i64>,
        endpoint: &Endpoint,
    ) {
        let due_ms = self.deferred_until(redis_now_ms(), endpoint);
        self.record(Record {
            job,
            lease,
            attempt: None,
            status: DeliveryStatus::Retrying,
            attempts,
            first_attempt_ms,
            next_attempt_ms: Some(due_ms),
            reason: None,
            timing: None,
        })
        .await;
        self.count_deferral(endpoint, event_type, &job.delivery, due_ms);
    }

    /// Counts a deferred delivery: in the metric, and in its endpoint's deferred backlog, which
    /// spreads the next deferrals' due times (see [`Pipeline::deferred_until`]).
    pub(super) fn count_deferral(&self, endpoint: &Endpoint, event_type: &str, delivery: &DeliveryId, due_ms: i64) {
        let delay = u64::try_from(due_ms - redis_now_ms()).unwrap_or(0);
        self.limits.deferred(endpoint, Duration::from_millis(delay));
        METRICS.deferred.with_label_values(&[event_type]).inc();
        tracing::debug!(delivery_id = %delivery, endpoint_id = %endpoint.id, "endpoint at its limit; deferred");
    }

    /// Writes a record, retrying while Redis is unreachable for as long as the lease lasts;
    /// past that the lease has already re-queued the delivery, so giving up loses nothing.
    pub(super) async fn record(&self, record: Record<'_>) -> Option<Recorded> {
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
