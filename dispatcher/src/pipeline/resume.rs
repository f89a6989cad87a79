//! A retry job from the scheduler: the delivery taken under a new lease, if it is still
//! current, and attempted again.

use super::{AttemptTask, Attempts, Disposition, Handled, INVALID_RETRY_JOB, Pipeline, new_lease, published_ms};
use crate::limits::Taker;
use bytes::Bytes;
use laabam_shared::clock::redis_now_ms;
use laabam_shared::delivery::{DeliveryStatus, RetryJob};
use laabam_shared::store::{Record, Taken};
use tracing::Instrument;

impl Pipeline {
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
        // Room first, as for an arrival: the lease is reckoned from when the attempt may run, so
        // waiting for room does not eat into it.
        let room = self.in_flight.acquire(1).await;
        let lease = new_lease();
        let lease_until_ms = self.lease_until(redis_now_ms(), 0);
        let taken = match self.store.take(&job, &lease, lease_until_ms).await {
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
        let Some(turn) = self.limits.take(&endpoint, Taker::Return) else {
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
                    lease_until_ms,
                    turn,
                }],
                room,
            },
        }
    }
}
