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
        self.tokens = self.tokens_at(now);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn tokens_at(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        (self.tokens + elapsed * self.rate as f64).min(self.rate as f64)
    }

    /// Refilled to its rate by `now`: dropping it forgets nothing, since a new one starts full.
    fn full(&self, now: Instant) -> bool {
        self.tokens_at(now) >= self.rate as f64
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
            rates.retain(|_, b| !b.full(now));
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

#[cfg(test)]
mod tests {
    use super::*;
    use laabam_shared::endpoint::NewEndpoint;
    use laabam_shared::ids::AccountId;
    use std::time::Duration;

    fn rate_limited() -> Endpoint {
        let account = AccountId::parse("acct_1").unwrap();
        let new = NewEndpoint {
            url: "http://127.0.0.1/".into(),
            rate_limit: Some(1_000),
            ..Default::default()
        };
        Endpoint::create(account, new, 0).unwrap()
    }

    /// The buckets were kept while their tokens *as last stored* were short of full, which a
    /// bucket's are after any take: none was ever dropped, and past the bound every take
    /// scanned them all.
    #[test]
    fn buckets_refilled_since_their_last_take_are_dropped_once_the_map_grows() {
        let rates = RateLimits::default();
        for _ in 0..=PRUNE_ABOVE {
            assert!(rates.try_take(&rate_limited()));
        }
        // At 1,000 a second, a millisecond refills the one token each took.
        std::thread::sleep(Duration::from_millis(5));
        assert!(rates.try_take(&rate_limited()));
        let kept = rates.0.lock().unwrap().len();
        assert_eq!(kept, 1, "only the bucket just taken from is short of full");
    }
}
