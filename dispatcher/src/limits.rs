//! Per-endpoint limits: requests in flight at once, and deliveries per second. A delivery
//! finding its endpoint at either limit is deferred to the retry set instead of waiting here,
//! so one slow or throttled endpoint never holds broker messages or slots that healthy
//! endpoints need. Both limits are per dispatcher process.

use laabam_shared::endpoint::Endpoint;
use laabam_shared::ids::EndpointId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug)]
pub struct EndpointLimits {
    default_limit: u32,
    slots: Mutex<HashMap<EndpointId, (u32, Arc<Semaphore>)>>,
    rates: Mutex<HashMap<EndpointId, TokenBucket>>,
}

/// A bucket of `rate` tokens refilled continuously at `rate` per second.
#[derive(Debug)]
struct TokenBucket {
    rate: u32,
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    fn new(rate: u32, now: Instant) -> Self {
        TokenBucket {
            rate,
            tokens: rate as f64,
            refilled: now,
        }
    }

    fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.rate as f64);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Idle entries are dropped when the map grows past this, so it stays bounded.
const PRUNE_ABOVE: usize = 10_000;

impl EndpointLimits {
    pub fn new(default_limit: u32) -> Self {
        EndpointLimits {
            default_limit: default_limit.max(1),
            slots: Mutex::new(HashMap::new()),
            rates: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token of the endpoint's rate limit, if it has one.
    fn try_rate(&self, endpoint: &Endpoint) -> bool {
        let Some(rate) = endpoint.rate_limit else {
            return true;
        };
        let now = Instant::now();
        let mut rates = self.rates.lock().expect("limits lock");
        if rates.len() > PRUNE_ABOVE {
            rates.retain(|_, b| b.tokens < b.rate as f64);
        }
        let bucket = rates
            .entry(endpoint.id.clone())
            .or_insert_with(|| TokenBucket::new(rate, now));
        if bucket.rate != rate {
            *bucket = TokenBucket::new(rate, now);
        }
        bucket.try_take(now)
    }

    /// A slot for one request to `endpoint`, or `None` when it is at either limit.
    pub fn try_acquire(&self, endpoint: &Endpoint) -> Option<OwnedSemaphorePermit> {
        let slot = self.try_slot(endpoint)?;
        self.try_rate(endpoint).then_some(slot)
    }

    fn try_slot(&self, endpoint: &Endpoint) -> Option<OwnedSemaphorePermit> {
        let limit = endpoint.max_concurrency.unwrap_or(self.default_limit).max(1);
        let semaphore = {
            let mut slots = self.slots.lock().expect("limits lock");
            if slots.len() > PRUNE_ABOVE {
                slots.retain(|_, (max, sem)| sem.available_permits() < *max as usize);
            }
            let entry = slots
                .entry(endpoint.id.clone())
                .or_insert_with(|| (limit, Arc::new(Semaphore::new(limit as usize))));
            if entry.0 != limit {
                // The owner changed the limit: start a fresh semaphore; old permits drain away.
                *entry = (limit, Arc::new(Semaphore::new(limit as usize)));
            }
            entry.1.clone()
        };
        semaphore.try_acquire_owned().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use laabam_shared::endpoint::NewEndpoint;
    use laabam_shared::ids::AccountId;
    use std::time::Duration;

    fn endpoint(max: Option<u32>) -> Endpoint {
        Endpoint::create(
            AccountId::parse("acct_1").unwrap(),
            NewEndpoint {
                url: "http://127.0.0.1/".into(),
                max_concurrency: max,
                ..Default::default()
            },
            0,
        )
        .unwrap()
    }

    #[test]
    fn a_rate_limit_admits_its_rate_then_refills() {
        let limits = EndpointLimits::new(100);
        let mut ep = endpoint(None);
        ep.rate_limit = Some(3);
        let admitted = (0..10).filter(|_| limits.try_acquire(&ep).is_some()).count();
        assert_eq!(admitted, 3);
        let start = Instant::now();
        let mut bucket = TokenBucket::new(2, start);
        assert!(bucket.try_take(start) && bucket.try_take(start) && !bucket.try_take(start));
        assert!(bucket.try_take(start + Duration::from_millis(500)));
        assert!(!bucket.try_take(start + Duration::from_millis(500)));
    }

    #[test]
    fn at_most_the_limit_is_handed_out_and_slots_come_back() {
        let limits = EndpointLimits::new(2);
        let ep = endpoint(None);
        let a = limits.try_acquire(&ep).unwrap();
        let _b = limits.try_acquire(&ep).unwrap();
        assert!(limits.try_acquire(&ep).is_none());
        drop(a);
        assert!(limits.try_acquire(&ep).is_some());
    }

    #[test]
    fn an_endpoint_limit_overrides_the_default() {
        let limits = EndpointLimits::new(8);
        let serial = endpoint(Some(1));
        let _only = limits.try_acquire(&serial).unwrap();
        assert!(limits.try_acquire(&serial).is_none());
        assert!(limits.try_acquire(&endpoint(None)).is_some());
    }
}
