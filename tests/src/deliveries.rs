//! Deliveries begun and recorded straight through the store, as a dispatcher would, for tests
//! and benchmarks of the store's own calls without the broker and HTTP around them.

use laabam_shared::delivery::{AttemptRecord, DeliveryStatus, Outcome, RetryJob};
use laabam_shared::endpoint::Endpoint;
use laabam_shared::envelope::Envelope;
use laabam_shared::ids::DeliveryId;
use laabam_shared::store::{AttemptTiming, Begin, Record};
use std::sync::Arc;

/// One delivery of `event` to each endpoint, each under its own lease (numbered from `first`),
/// due when the lease would expire.
pub fn leased_begins(event: &Envelope, endpoints: &[Arc<Endpoint>], first: usize, due_ms: i64) -> Vec<Begin> {
    endpoints
        .iter()
        .enumerate()
        .map(|(k, ep)| Begin {
            job: RetryJob {
                delivery: DeliveryId::for_pair(&event.id, &ep.id),
                event: event.id.clone(),
                endpoint: ep.id.clone(),
                account: event.account_id.clone(),
            },
            event_type: event.event_type.clone(),
            due_ms,
            lease: Some(format!("{:016x}", first + k)),
        })
        .collect()
}

/// A first attempt answered `200` in 3 ms, recorded as a dispatcher records it.
#[derive(Debug)]
pub struct Success {
    attempt: AttemptRecord,
    at_ms: i64,
}

impl Success {
    pub fn at(at_ms: i64) -> Self {
        Success {
            attempt: AttemptRecord {
                attempt: 1,
                at_ms,
                outcome: Outcome::Success,
                status_code: Some(200),
                duration_ms: 3,
                error: None,
                response_excerpt: None,
            },
            at_ms,
        }
    }

    /// The record that finishes `begin`'s delivery under its lease.
    pub fn record<'a>(&'a self, begin: &'a Begin) -> Record<'a> {
        Record {
            job: &begin.job,
            lease: begin.lease.as_deref().expect("a leased begin"),
            attempt: Some(&self.attempt),
            status: DeliveryStatus::Succeeded,
            attempts: 1,
            first_attempt_ms: Some(self.at_ms),
            next_attempt_ms: None,
            reason: None,
            timing: Some(AttemptTiming {
                outcome: Outcome::Success.as_str(),
                duration_ms: 3,
                status_code: Some(200),
                at_ms: self.at_ms,
            }),
        }
    }
}
