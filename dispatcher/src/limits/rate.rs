//! Per-endpoint rate limits: a token bucket for each endpoint that has a rate, and the turns
//! at that rate its deferred deliveries come back at.

use super::{MAX_BACKLOG, PacedTurn, Taker};
use laabam_shared::endpoint::Endpoint;
use laabam_shared::idle_map::IdleMap;
use laabam_shared::ids::EndpointId;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How late a deferred delivery may come back after its turn, through the retry scheduler's
/// rounds and the broker, with its token still kept for it from deliveries arriving meanwhile.
const LATE_RETURN: Duration = Duration::from_millis(250);

/// The buckets of the endpoints with a rate limit; full ones with no turn reserved ahead are
/// dropped when the map grows.
#[derive(Debug, Default)]
pub(super) struct RateLimits {
    buckets: Mutex<IdleMap<EndpointId, TokenBucket>>,
    /// The dispatchers running (0 until first heard, taken as 1): each enforces its share of
    /// every endpoint's rate, so together they keep to it.
    dispatchers: AtomicUsize,
}

/// A bucket of `rate` tokens (at least one) refilled continuously at `rate` per second, and
/// the turns at that rate reserved for deliveries it deferred. `rate` is this process's share
/// of the endpoint's `limit`.
#[derive(Debug)]
pub(super) struct TokenBucket {
    limit: u32,
    rate: f64,
    /// Below zero by at most one: a returning delivery may borrow the token it was promised
    /// (see [`TokenBucket::try_take`]).
    tokens: f64,
    refilled: Instant,
    turns: Option<Turns>,
}

/// The turns reserved for deferred deliveries, one every 1/rate s from `first` up to `next`, the
/// first one free. A run that restarts after a gap (no deferral for a while) keeps its `first`,
/// so the turn found ahead may be up to an interval later than the real one; the returning
/// delivery borrows the token an arrival took meanwhile.
#[derive(Debug, Clone, Copy)]
struct Turns {
    first: Instant,
    next: Instant,
}

impl TokenBucket {
    pub(super) fn new(limit: u32, rate: f64, now: Instant) -> Self {
        let mut bucket = TokenBucket {
            limit,
            rate,
            tokens: 0.0,
            refilled: now,
            turns: None,
        };
        bucket.tokens = bucket.capacity();
        bucket
    }

    /// At least one token, so a share below one a second still lets a delivery through.
    fn capacity(&self) -> f64 {
        self.rate.max(1.0)
    }

    /// Takes a new share of the limit from `now` on, keeping the tokens it has up to its new
    /// capacity and the turns it has reserved.
    fn reshare(&mut self, rate: f64, now: Instant) {
        self.tokens = self.tokens_at(now);
        self.refilled = now;
        self.rate = rate;
        self.tokens = self.tokens.min(self.capacity());
    }

    fn interval(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.rate)
    }

    /// The first turn at least `earliest` from `now` after those reserved, one every 1/rate s,
    /// and none before the bucket has a token for it, so the deliveries deferred for the rate
    /// come back at the rate, in the order they were deferred; none past [`MAX_BACKLOG`].
    fn reserve(&mut self, now: Instant, earliest: Duration) -> PacedTurn {
        let ahead = self.turns.filter(|turns| turns.next > now);
        let refilled = Duration::from_secs_f64((1.0 - self.tokens_at(now)).max(0.0) / self.rate);
        let first = now + earliest.max(refilled);
        let turn = ahead.map_or(first, |turns| turns.next.max(now + earliest));
        if turn > now + MAX_BACKLOG {
            return PacedTurn::PastHorizon;
        }
        self.turns = Some(Turns {
            first: ahead.map_or(turn, |turns| turns.first),
            next: turn + self.interval(),
        });
        PacedTurn::After(turn - now)
    }

    /// The first reserved turn whose delivery may still be on its way back at `now` (see
    /// [`LATE_RETURN`]), if any.
    fn turn_ahead(&self, now: Instant) -> Option<Instant> {
        let turns = self.turns?;
        let since = now.checked_sub(LATE_RETURN).unwrap_or(now);
        if turns.first >= since {
            return Some(turns.first);
        }
        let gone = (since - turns.first).as_secs_f64() * self.rate;
        let turn = turns.first + self.interval().mul_f64(gone.ceil());
        (turn < turns.next).then_some(turn)
    }

    /// Takes a token for a delivery to go now. A new one takes it only if every turn reserved
    /// ahead still finds one: the deliveries deferred for the rate go first, in the order they
    /// were deferred, and it is deferred behind them. Taking the tokens that came back for them
    /// made those that then found none be deferred again behind every later one, so under a
    /// sustained excess the oldest waited longest, some of them over and over. A returning
    /// delivery (its turn come, or a retry due) may borrow the token it was promised when a new
    /// one took it just before (its turn is a little late through the retry set): the bucket
    /// goes below zero by at most one, so the rate is kept but for that one.
    pub(super) fn try_take(&mut self, now: Instant, taker: Taker) -> bool {
        self.tokens = self.tokens_at(now);
        self.refilled = now;
        let may = match taker {
            Taker::Return => self.tokens >= 0.0,
            Taker::Arrival => {
                self.tokens >= 1.0
                    && self.turn_ahead(now).is_none_or(|turn| {
                        // What is left after this take, with the refill until the turn (less
                        // the refill since, for a turn gone by), must give the turn its token;
                        // each later turn brings its own refill.
                        let until = turn.saturating_duration_since(now).as_secs_f64()
                            - now.saturating_duration_since(turn).as_secs_f64();
                        self.tokens - 1.0 + until * self.rate >= 1.0
                    })
            }
        };
        if may {
            self.tokens -= 1.0;
        }
        may
    }

    fn tokens_at(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        (self.tokens + elapsed * self.rate).min(self.capacity())
    }

    /// Refilled to its rate by `now` with no turn reserved ahead: dropping it forgets nothing,
    /// since a new one starts full.
    fn idle(&self, now: Instant) -> bool {
        self.tokens_at(now) >= self.capacity() && self.turns.is_none_or(|turns| turns.next <= now)
    }
}

impl RateLimits {
    /// Takes a token of the endpoint's rate limit, if it has one.
    pub(super) fn try_take(&self, endpoint: &Endpoint, taker: Taker) -> bool {
        self.with_bucket(endpoint, |bucket, now| bucket.try_take(now, taker))
            .unwrap_or(true)
    }

    /// Reserves a turn at the endpoint's rate for a deferred delivery, at least `earliest` from
    /// now; `None` when it has no rate limit.
    pub(super) fn reserve(&self, endpoint: &Endpoint, earliest: Duration) -> Option<PacedTurn> {
        self.with_bucket(endpoint, |bucket, now| bucket.reserve(now, earliest))
    }

    /// Splits every endpoint's rate among `dispatchers` running processes from now on.
    pub(super) fn share_among(&self, dispatchers: usize) {
        self.dispatchers.store(dispatchers, Ordering::Relaxed);
    }

    /// The dispatchers running as last heard (at least one).
    pub(super) fn dispatchers(&self) -> usize {
        self.dispatchers.load(Ordering::Relaxed).max(1)
    }

    /// Applies `f` to the endpoint's bucket at the current time; `None`, without reading the
    /// clock or taking the lock, for an endpoint with no rate limit (every delivery asks).
    fn with_bucket<T>(&self, endpoint: &Endpoint, f: impl FnOnce(&mut TokenBucket, Instant) -> T) -> Option<T> {
        let limit = endpoint.rate_limit?;
        let now = Instant::now();
        let rate = f64::from(limit) / self.dispatchers() as f64;
        let mut buckets = self.buckets.lock().expect("limits lock");
        buckets.prune(|b| b.idle(now));
        let bucket = buckets
            .entry(endpoint.id.clone())
            .or_insert_with(|| TokenBucket::new(limit, rate, now));
        if bucket.limit != limit {
            *bucket = TokenBucket::new(limit, rate, now);
        } else if bucket.rate != rate {
            bucket.reshare(rate, now);
        }
        Some(f(bucket, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use laabam_shared::endpoint::NewEndpoint;
    use laabam_shared::idle_map::PRUNE_ABOVE;
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
        let mut bucket = TokenBucket::new(2, 2.0, now);
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

    /// Tokens that come back while deliveries deferred for the rate wait for their turns are
    /// theirs: a new delivery goes behind them, even a little after a turn whose delivery is
    /// late through the retry set, and takes a token only when the turns ahead are covered.
    #[test]
    fn new_deliveries_go_behind_the_turns_reserved_and_a_return_may_borrow_its_token() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let soon = Duration::from_millis(50);
        let mut bucket = TokenBucket::new(10, 10.0, t0);
        for _ in 0..10 {
            assert!(bucket.try_take(t0, Taker::Arrival));
        }
        assert!(!bucket.try_take(t0, Taker::Arrival), "empty");
        assert_eq!(
            bucket.reserve(t0, soon),
            PacedTurn::After(Duration::from_millis(100)),
            "not before a token is back"
        );
        assert_eq!(bucket.reserve(t0, soon), PacedTurn::After(Duration::from_millis(200)));
        assert!(
            !bucket.try_take(at(150), Taker::Arrival),
            "a token and a half, but the first turn's delivery is not back yet"
        );
        assert!(bucket.try_take(at(160), Taker::Return), "the first turn, late");
        assert!(bucket.try_take(at(200), Taker::Return), "the second, on time");
        assert!(
            bucket.try_take(at(600), Taker::Arrival),
            "no turn ahead once the last is past its lateness"
        );

        let mut bucket = TokenBucket::new(10, 10.0, t0);
        assert_eq!(
            bucket.reserve(t0, Duration::from_secs(1)),
            PacedTurn::After(Duration::from_secs(1))
        );
        assert!(
            (0..10).all(|_| bucket.try_take(t0, Taker::Arrival)),
            "a turn a second away is covered by the refill until then: the tokens are not kept idle"
        );
        assert!(!bucket.try_take(t0, Taker::Arrival));
        assert!(bucket.try_take(at(50), Taker::Return), "half a token: a return borrows");
        assert!(
            !bucket.try_take(at(50), Taker::Return),
            "never more than one below empty"
        );
    }

    /// Each dispatcher keeps to its share of an endpoint's rate, however small, and a new share
    /// applies to the tokens it has, not to a full bucket.
    #[test]
    fn each_dispatcher_keeps_to_its_share_of_the_rate() {
        let rates = RateLimits::default();
        let ep = limited_to(10);
        rates.share_among(2);
        let taken = (0..10).filter(|_| rates.try_take(&ep, Taker::Arrival)).count();
        assert_eq!(taken, 5, "half of 10 at once");
        rates.share_among(1);
        assert!(
            !rates.try_take(&ep, Taker::Arrival),
            "the whole rate from now on, not a bucket refilled at once"
        );

        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut bucket = TokenBucket::new(1, 1.0 / 3.0, t0);
        assert!(
            bucket.try_take(t0, Taker::Arrival),
            "a third of one a second still holds a token"
        );
        assert!(!bucket.try_take(at(2_000), Taker::Arrival), "two thirds of one");
        assert!(bucket.try_take(at(3_000), Taker::Arrival));
        bucket.reshare(1.0, at(3_000));
        assert!(!bucket.try_take(at(3_500), Taker::Arrival));
        assert!(bucket.try_take(at(4_000), Taker::Arrival), "one a second once alone");
    }

    /// The buckets were kept while their tokens *as last stored* were short of full, which a
    /// bucket's are after any take: none was ever dropped, and past the bound every take
    /// scanned them all.
    #[test]
    fn buckets_refilled_since_their_last_take_are_dropped_once_the_map_grows() {
        let rates = RateLimits::default();
        for _ in 0..=PRUNE_ABOVE {
            assert!(rates.try_take(&rate_limited(), Taker::Arrival));
        }
        // At 1,000 a second, a millisecond refills the one token each took.
        std::thread::sleep(Duration::from_millis(5));
        assert!(rates.try_take(&rate_limited(), Taker::Arrival));
        let kept = rates.buckets.lock().unwrap().len();
        assert_eq!(kept, 1, "only the bucket just taken from is short of full");
    }
}
