//! Deliveries begun and recorded straight through the store, as a dispatcher would, for tests
//! and benchmarks of the store's own calls without the broker and HTTP around them.

use crate::env::payment_failed;
use laabam_shared::delivery::{AttemptRecord, DeliveryStatus, Outcome, RetryJob};
use laabam_shared::endpoint::Endpoint;
use laabam_shared::envelope::Envelope;
use laabam_shared::ids::{AccountId, DeliveryId};
use laabam_shared::store::{AccountEndpoints, AttemptTiming, Begin, Ingest, Record, Store};
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

/// `n` endpoints of `account`, subscribed to every event, at an address nothing listens on (the
/// store's calls never send anything), and the account's endpoints as a dispatcher sees them.
pub async fn quiet_endpoints(store: &Store, account: &AccountId, n: usize) -> AccountEndpoints {
    for _ in 0..n {
        let ep = crate::env::new_endpoint(account.as_str(), "http://127.0.0.1:9/", None);
        store.create_endpoint(&ep, None).await.unwrap();
    }
    store.account_endpoints(account).await.unwrap()
}

/// Begins, one event at a time as they would arrive, a `payment.failed` event numbered `i` at
/// `now + i` ms for each `i` of `numbers`, with one leased delivery to each of the account's
/// endpoints; each must begin all its deliveries.
pub async fn begin_events(
    store: &Store,
    endpoints: &AccountEndpoints,
    now: i64,
    numbers: std::ops::Range<usize>,
) -> Vec<Begin> {
    let events = numbered_events(endpoints, now, numbers);
    for (event, at, these) in &events {
        begin_all(store, endpoints, event, *at, these).await;
    }
    events.into_iter().flat_map(|(.., these)| these).collect()
}

/// As [`begin_events`], but every arrival at once, so they share the store's calls as a busy
/// dispatcher's do.
pub async fn begin_events_together(
    store: &Store,
    endpoints: &AccountEndpoints,
    now: i64,
    numbers: std::ops::Range<usize>,
) -> Vec<Begin> {
    let events = numbered_events(endpoints, now, numbers);
    let arrivals = events
        .iter()
        .map(|(event, at, these)| begin_all(store, endpoints, event, *at, these));
    futures_util::future::join_all(arrivals).await;
    events.into_iter().flat_map(|(.., these)| these).collect()
}

/// `event`'s arrival at `at`, which must create every one of `these`.
async fn begin_all(store: &Store, endpoints: &AccountEndpoints, event: &Envelope, at: i64, these: &[Begin]) {
    let json = event.to_json();
    match store.ingest(event, &json, endpoints.version, these, at).await.unwrap() {
        Ingest::Begun { created, .. } => assert!(created.iter().all(|&c| c), "every delivery is new"),
        Ingest::Stale => panic!("the endpoints did not change, yet the arrival was stale"),
    }
}

/// The `payment.failed` events numbered `numbers`, each at `now + i` ms, with one leased
/// delivery to each endpoint.
fn numbered_events(
    endpoints: &AccountEndpoints,
    now: i64,
    numbers: std::ops::Range<usize>,
) -> Vec<(Envelope, i64, Vec<Begin>)> {
    let account = &endpoints.endpoints[0].account_id;
    numbers
        .map(|i| {
            let at = now + i as i64;
            let event = payment_failed(account, i, at);
            let these = leased_begins(
                &event,
                &endpoints.endpoints,
                i * endpoints.endpoints.len(),
                now + 30_000,
            );
            (event, at, these)
        })
        .collect()
}

/// A first attempt answered `200` in 3 ms, recorded as a dispatcher records it.
#[derive(Debug)]
pub struct Success {
    attempt: AttemptRecord,
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
        }
    }

    /// The record that finishes `begin`'s delivery under its lease.
    pub fn record<'a>(&'a self, begin: &'a Begin) -> Record<'a> {
        first_attempt(begin, &self.attempt, DeliveryStatus::Succeeded, None)
    }
}

/// The record of `begin`'s first attempt under its lease, with the attempt's timing as a
/// dispatcher gives it; `next_attempt_ms` when it is to be retried.
pub fn first_attempt<'a>(
    begin: &'a Begin,
    attempt: &'a AttemptRecord,
    status: DeliveryStatus,
    next_attempt_ms: Option<i64>,
) -> Record<'a> {
    Record {
        job: &begin.job,
        lease: begin.lease.as_deref().expect("a leased begin"),
        attempt: Some(attempt),
        status,
        attempts: 1,
        first_attempt_ms: Some(attempt.at_ms),
        next_attempt_ms,
        reason: None,
        timing: Some(AttemptTiming {
            outcome: attempt.outcome.as_str(),
            duration_ms: attempt.duration_ms,
            status_code: attempt.status_code,
            at_ms: attempt.at_ms,
        }),
    }
}
