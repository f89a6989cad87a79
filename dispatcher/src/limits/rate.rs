//! Per-endpoint rate limits: a token bucket for each endpoint that has a rate.

use super::PRUNE_ABOVE;
use laabam_shared::endpoint::Endpoint;
use laabam_shared::ids::EndpointId;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// The buckets of the endpoints with a rate limit; full ones are dropped when the map grows.
#[derive(Debug, Default)]
pub(super) struct RateLimits(Mutex<HashMap<EndpointId, TokenBucket>>);

/// A bucket of `rate` tokens refilled continuously at `rate` per second.
#[derive(Debug)]
pub(super) struct TokenBucket {
    rate: u32,
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    pub(super) fn new(rate: u32, now: Instant) -> Self {
        TokenBucket {
            rate,
            tokens: rate as f64,
            refilled: now,
        }
    }

    pub(super) fn try_take(&mut self, now: Instant) -> bool {
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

impl RateLimits {
    /// Takes a token of the endpoint's rate limit, if it has one.
    pub(super) fn try_take(&self, endpoint: &Endpoint) -> bool {
        let Some(rate) = endpoint.rate_limit else {
            return true;
        };
        let now = Instant::now();
        let mut rates = self.0.lock().expect("limits lock");
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
}
