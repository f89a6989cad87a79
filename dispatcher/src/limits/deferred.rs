//! An endpoint's deliveries this process deferred that are not due yet: how many are ahead of
//! the next one it defers.
//!
//! Each counts until its due time, not until it comes back. A job comes back to whichever
//! dispatcher the broker gives it to, and may fail there (its endpoint disabled or deleted), so
//! a count lowered by the jobs a process takes back drifts: deferrals that failed on a disabled
//! endpoint stayed counted for good, and with two dispatchers each takes back about half of the
//! other's jobs, so a count that cannot go below none drifts upward. Either way the endpoint's
//! later deferrals were spread over time they did not need. By due time each is forgotten on
//! time, whoever takes it back and whatever becomes of it.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Deferrals are counted in buckets of due times this wide (ms): one counts until the end of
/// its bucket, at most this long past its due time, about as long as a job takes to come back
/// through the scheduler and the broker. The buckets bound the memory an endpoint's deferrals
/// take, however many are deferred: a deferral is due at most twice the defer delay and the
/// 5-minute backlog cap ahead, so an endpoint has at most about 6,000 entries.
const BUCKET_MS: u64 = 100;

#[derive(Debug, Default)]
pub(super) struct DeferredAhead(Mutex<Buckets>);

#[derive(Debug, Default)]
struct Buckets {
    /// Deferrals by the bucket of their due time (due ms / [`BUCKET_MS`]).
    by_due: BTreeMap<u64, u32>,
    total: usize,
}

impl DeferredAhead {
    /// One deferral, due at `due_ms` (on the clock of `now_ms` in [`DeferredAhead::ahead`]).
    pub(super) fn add(&self, due_ms: u64) {
        let mut buckets = self.0.lock().expect("deferrals lock");
        *buckets.by_due.entry(due_ms / BUCKET_MS).or_default() += 1;
        buckets.total += 1;
    }

    /// The deferrals not due yet at `now_ms`.
    pub(super) fn ahead(&self, now_ms: u64) -> usize {
        let mut buckets = self.0.lock().expect("deferrals lock");
        let now = now_ms / BUCKET_MS;
        while let Some(entry) = buckets.by_due.first_entry()
            && *entry.key() < now
        {
            let due = entry.remove();
            buckets.total -= due as usize;
        }
        buckets.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deferral_counts_until_the_end_of_its_due_times_bucket() {
        let deferred = DeferredAhead::default();
        deferred.add(1_050);
        deferred.add(1_250);
        deferred.add(5_000);
        assert_eq!(deferred.ahead(1_000), 3);
        assert_eq!(deferred.ahead(1_099), 3, "due, but its bucket has not ended");
        assert_eq!(deferred.ahead(1_100), 2);
        assert_eq!(deferred.ahead(1_300), 1);
        deferred.add(900);
        assert_eq!(deferred.ahead(1_300), 1, "one added already past due never counts");
        assert_eq!(deferred.ahead(5_100), 0);
    }
}
