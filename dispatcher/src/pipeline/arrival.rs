//! A newly published event: validated, fanned out to its account's endpoints, each delivery
//! begun under a lease (or deferred) before the message is acknowledged.

use super::{AttemptTask, Attempts, Disposition, Handled, Pipeline, new_lease, published_ms};
use crate::limits::{Taker, Turn};
use crate::metrics::METRICS;
use laabam_shared::clock::{now_ms, redis_now_ms};
use laabam_shared::delivery::RetryJob;
use laabam_shared::endpoint::Endpoint;
use laabam_shared::envelope::{Envelope, Provenance};
use laabam_shared::ids::{DeliveryId, EndpointId};
use laabam_shared::store::{Begin, Ingest};
use std::sync::Arc;
use tracing::Instrument;

/// How often a fan-out re-reads endpoints that changed under it before handing the message back.
const MAX_STALE_TRIES: usize = 5;

impl Pipeline {
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

    pub(super) async fn fan_out(&self, envelope: Envelope, target: Option<&EndpointId>) -> Handled {
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
            let turns: Vec<Option<Turn>> = recipients
                .iter()
                .map(|ep| self.limits.take(ep, Taker::Arrival))
                .collect();
            let now = redis_now_ms();
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
                        lease_until_ms: begin.due_ms,
                        turn,
                    }),
                    _ => self.count_deferral(endpoint, &envelope.event_type, &begin.job.delivery, begin.due_ms),
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
}
