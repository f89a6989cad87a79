//! The retry policy: exponential backoff with jitter, bounded by attempts and by age.

use rand::Rng;
use std::time::Duration;

/// When to try again, and when to stop trying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay before the second attempt.
    pub first_delay: Duration,
    /// No two attempts further apart than this (also caps `Retry-After`).
    pub max_delay: Duration,
    /// Every attempt counts, the first included.
    pub max_attempts: u32,
    /// Measured from the first attempt.
    pub max_age: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            first_delay: Duration::from_secs(5),
            max_delay: Duration::from_secs(8 * 3600),
            max_attempts: 20,
            max_age: Duration::from_secs(3 * 24 * 3600),
        }
    }
}

/// What follows a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextStep {
    /// Attempt again at this unix-millisecond time.
    RetryAt(i64),
    /// Stop; the delivery is failed for good.
    GiveUp(String),
}

impl RetryPolicy {
    /// The delay before attempt `attempts_made + 1`: `min(first × 2^(n-1), max) × jitter`,
    /// with `jitter` drawn from [0.8, 1.2].
    pub fn backoff(&self, attempts_made: u32, jitter: f64) -> Duration {
        let exponent = attempts_made.saturating_sub(1).min(62);
        let base = self
            .first_delay
            .checked_mul(1u32 << exponent.min(31))
            .unwrap_or(self.max_delay)
            .min(self.max_delay);
        base.mul_f64(jitter.clamp(0.8, 1.2))
    }

    /// Decides after a failed attempt. `retry_after` is the endpoint's own request (429/503),
    /// honoured up to `max_delay`.
    pub fn after_failure(
        &self,
        attempts_made: u32,
        first_attempt_ms: i64,
        now_ms: i64,
        retry_after: Option<Duration>,
        jitter: f64,
    ) -> NextStep {
        if attempts_made >= self.max_attempts {
            return NextStep::GiveUp(format!("gave up after {attempts_made} attempts"));
        }
        let delay = match retry_after {
            Some(asked) => asked.min(self.max_delay),
            None => self.backoff(attempts_made, jitter),
        };
        let next = now_ms.saturating_add(delay.as_millis() as i64);
        if next.saturating_sub(first_attempt_ms) > self.max_age.as_millis() as i64 {
            return NextStep::GiveUp(format!(
                "gave up: next attempt would be more than {} after the first",
                humantime::format_duration(self.max_age)
            ));
        }
        NextStep::RetryAt(next)
    }
}

/// A uniform draw from [0.8, 1.2], so that endpoints failing together do not retry together.
pub fn random_jitter() -> f64 {
    rand::rng().random_range(0.8..=1.2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn defaults_match_the_design() {
        let p = RetryPolicy::default();
        assert_eq!(p.backoff(1, 1.0), 5 * S);
        assert_eq!(p.backoff(2, 1.0), 10 * S);
        assert_eq!(p.backoff(3, 1.0), 20 * S);
        assert_eq!(p.backoff(19, 1.0), 8 * 3600 * S);
        assert_eq!(p.backoff(1, 0.8), 4 * S);
        assert_eq!(p.backoff(1, 1.2), 6 * S);
    }

    #[test]
    fn gives_up_on_the_last_attempt() {
        let p = RetryPolicy {
            max_attempts: 3,
            ..Default::default()
        };
        assert!(matches!(p.after_failure(2, 0, 0, None, 1.0), NextStep::RetryAt(10_000)));
        assert!(matches!(p.after_failure(3, 0, 0, None, 1.0), NextStep::GiveUp(_)));
    }

    #[test]
    fn gives_up_past_the_maximum_age() {
        let p = RetryPolicy {
            max_age: Duration::from_secs(60),
            ..Default::default()
        };
        assert!(matches!(
            p.after_failure(1, 0, 50_000, None, 1.0),
            NextStep::RetryAt(55_000)
        ));
        assert!(matches!(p.after_failure(1, 0, 56_000, None, 1.0), NextStep::GiveUp(_)));
    }

    #[test]
    fn retry_after_is_honoured_up_to_the_cap() {
        let p = RetryPolicy {
            max_delay: Duration::from_secs(100),
            ..Default::default()
        };
        assert_eq!(p.after_failure(1, 0, 0, Some(30 * S), 1.0), NextStep::RetryAt(30_000));
        assert_eq!(
            p.after_failure(1, 0, 0, Some(3000 * S), 1.0),
            NextStep::RetryAt(100_000)
        );
    }

    proptest! {
        #[test]
        fn backoff_stays_within_jittered_bounds(n in 0u32..100, jitter in 0.0f64..2.0) {
            let p = RetryPolicy::default();
            let d = p.backoff(n, jitter);
            prop_assert!(d <= p.max_delay.mul_f64(1.2));
            prop_assert!(d >= p.first_delay.mul_f64(0.8));
        }

        #[test]
        fn backoff_never_shrinks(n in 1u32..60) {
            let p = RetryPolicy::default();
            prop_assert!(p.backoff(n + 1, 1.0) >= p.backoff(n, 1.0));
        }

        #[test]
        fn every_failure_retries_later_or_gives_up(n in 1u32..40, age_ms in 0i64..400_000_000) {
            let p = RetryPolicy::default();
            match p.after_failure(n, 0, age_ms, None, random_jitter()) {
                NextStep::RetryAt(t) => {
                    prop_assert!(t > age_ms);
                    prop_assert!(n < p.max_attempts);
                    prop_assert!(t <= p.max_age.as_millis() as i64);
                }
                NextStep::GiveUp(_) => {}
            }
        }
    }
}
