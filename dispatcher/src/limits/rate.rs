//! Per-endpoint rate limits: a token bucket for each endpoint that has a rate, and the turns
//! at that rate its deferred deliveries come back at.

use super::{MAX_BACKLOG, PRUNE_ABOVE, PacedTurn};
use laabam_shared::endpoint::Endpoint;
use laabam_shared::ids::EndpointId;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The buckets of the endpoints with a rate limit; full ones with no turn reserved ahead are
/// dropped when the map grows.
#[derive(Debug, Default)]
pub(super) struct RateLimits(Mutex<HashMap<EndpointId, TokenBucket>>);

/// A bucket of `rate` tokens refilled continuously at `rate` per second, and the turns at that
/// rate reserved for deliveries it deferred.
#[derive(Debug)]
pub(super) struct TokenBucket {
    rate: u32,
    tokens: f64,
    refilled: Instant,
    /// The next turn at the rate not reserved yet by a deferred delivery.
    next_turn: Option<Instant>,
}

impl TokenBucket {
    pub(super) fn new(rate: u32, now: Instant) -> Self {
        TokenBucket {
            rate,
            tokens: rate as f64,
            refilled: now,
            next_turn: None,
        }
    }

    /// The first turn at least `earliest` from `now` after those reserved, one every 1/rate s,
    /// so the deliveries deferred for the rate come back at the rate, in the order they were
    /// deferred; none past [`MAX_BACKLOG`].
    fn reserve(&mut self, now: Instant, earliest: Duration) -> PacedTurn {
        let turn = self.next_turn.map_or(now + earliest, |next| next.max(now + earliest));
        if turn > now + MAX_BACKLOG {
            return PacedTurn::PastHorizon;
        }
        self.next_turn = Some(turn + Duration::from_secs_f64(1.0 / self.rate as f64));
        PacedTurn::After(turn - now)
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

    /// Refilled to its rate by `now` with no turn reserved ahead: dropping it forgets nothing,
    /// since a new one starts full.
    fn idle(&self, now: Instant) -> bool {
        self.tokens_at(now) >= self.rate as f64 && self.next_turn.is_none_or(|next| next <= now)
    }
}

impl RateLimits {
    /// Takes a token of the endpoint's rate limit, if it has one.
    pub(super) fn try_take(&self, endpoint: &Endpoint) -> bool {
        self.with_bucket(endpoint, TokenBucket::try_take).unwrap_or(true)
    }

    /// Reserves a turn at the endpoint's rate for a deferred delivery, at least `earliest` from
    /// now; `None` when it has no rate limit.
    pub(super) fn reserve(&self, endpoint: &Endpoint, earliest: Duration) -> Option<PacedTurn> {
        self.with_bucket(endpoint, |bucket, now| bucket.reserve(now, earliest))
    }

    /// Applies `f` to the endpoint's bucket at the current time; `None`, without reading the
    /// clock or taking the lock, for an endpoint with no rate limit (every delivery asks).
    fn with_bucket<T>(&self, endpoint: &Endpoint, f: impl FnOnce(&mut TokenBucket, Instant) -> T) -> Option<T> {
        let rate = endpoint.rate_limit?;
        let now = Instant::now();
        let mut rates = self.0.lock().expect("limits lock");
        if rates.len() > PRUNE_ABOVE {
            rates.retain(|_, b| !b.idle(now));
        }
        let bucket = rates
            .entry(endpoint.id.clone())
            .or_insert_with(|| TokenBucket::new(rate, now));
        if bucket.rate != rate {
            *bucket = TokenBucket::new(rate, now);
        }
        Some(f(bucket, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use laabam_shared::endpoint::NewEndpoint;
    use laabam_shared::ids::AccountId;
    use std::time::Duration;

    fn rate_limited() -> Endpoint {
        limited_to(1_000)
    }

    fn limited_to(rate: u32) -> Endpoint {
        let account = AccountId::parse("acct_1").unwrap();
        let new = NewEndpoint {
            url: "http://127.0.0.1/".into(),
            rate_limit: Some(rate),
            ..Default::default()
        };
        Endpoint::create(account, new, 0).unwrap()
    }

    #[test]
    fn deferred_deliveries_take_turns_at_the_rate_up_to_the_horizon() {
        let now = Instant::now();
        let mut bucket = TokenBucket::new(2, now);
        let second = Duration::from_secs(1);
        assert_eq!(bucket.reserve(now, second), PacedTurn::After(second), "the earliest");
        assert_eq!(
            bucket.reserve(now, second),
            PacedTurn::After(Duration::from_millis(1_500)),
            "half a second later at 2 a second"
        );
        let later = now + Duration::from_secs(10);
        assert_eq!(
            bucket.reserve(later, second),
            PacedTurn::After(second),
            "turns gone by are not waited for"
        );
        assert!(!bucket.idle(later), "a turn reserved ahead keeps the bucket");
        let mut turns = 1;
        while let PacedTurn::After(wait) = bucket.reserve(later, second) {
            assert!(wait <= MAX_BACKLOG);
            turns += 1;
        }
        assert_eq!(turns, 599, "every half second from 1 s to the 300 s horizon, then none");
        assert_eq!(
            RateLimits::default().reserve(
                &Endpoint {
                    rate_limit: None,
                    ..limited_to(1)
                },
                second
            ),
            None,
            "no rate limit, no turn"
        );
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
