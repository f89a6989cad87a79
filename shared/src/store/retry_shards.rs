//! Which retry shards may hold jobs. While `LAABAM_RETRY_SHARDS` changes (a rolling switch,
//! or a count lowered after a peak), some processes write leases, deferrals and redeliveries
//! to shards that a scheduler's own count does not cover, and whatever lands there would never
//! come due. So every process announces its count, and a scheduler claims over the largest
//! count announced lately, or whose extra shards still hold jobs; an old count is forgotten
//! once its extra shards are empty. Lowering the count drains the shards it leaves.
//!
//! An announcement can still miss a write: a process that writes to an extra shard after its
//! count was forgotten (it could not reach Redis for the five minutes an announcement holds)
//! and dies before it announces again leaves a job that no count covers. So schedulers also
//! sweep every shard a process could run with, now and then, and announce a count that covers
//! any shard found holding jobs; from there it drains like any other.

use super::{Store, StoreError};
use crate::clock::redis_now_ms;
use crate::shutdown;
use redis::AsyncCommands;
use std::ops::Range;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often a running process announces its count again.
const ANNOUNCE_EVERY: Duration = Duration::from_secs(60);

/// How long an announcement keeps its shards claimed over, empty or not: several announcement
/// periods, so a process that is still running never lets its count lapse.
const ANNOUNCEMENT_HOLDS_MS: i64 = 5 * 60_000;

/// The most retry shards a process may run with (`LAABAM_RETRY_SHARDS`), so the most a sweep
/// has to look at.
pub const MAX_RETRY_SHARDS: u16 = 1024;

impl Store {
    /// Records that a process runs with this store's shard count, now.
    pub async fn announce_retry_shards(&self, now_ms: i64) -> Result<(), StoreError> {
        self.announce(self.keys.retry_shards(), now_ms).await
    }

    /// Records `count` as in use at `now_ms`, so schedulers claim over it while it holds.
    async fn announce(&self, count: u16, now_ms: i64) -> Result<(), StoreError> {
        self.conn()
            .zadd::<_, _, _, ()>(self.keys.retry_shard_counts(), count, now_ms)
            .await?;
        Ok(())
    }

    /// Announces this store's shard count now and every minute until `shutdown`.
    pub fn keep_announcing_retry_shards(&self, shutdown: CancellationToken) {
        let store = self.clone();
        tokio::spawn(async move {
            let store = &store;
            shutdown::every(ANNOUNCE_EVERY, &shutdown, || async move {
                if let Err(e) = store.announce_retry_shards(redis_now_ms()).await {
                    tracing::warn!(error = %e, "could not announce the retry shard count; trying again later");
                }
            })
            .await;
        });
    }

    /// How many shards a scheduler claims from: at least its own count; more while a larger
    /// count was announced within the last five minutes or its extra shards hold jobs or
    /// claims. Counts that no longer matter are forgotten here.
    pub async fn retry_shards_to_claim(&self, now_ms: i64) -> Result<u16, StoreError> {
        let own = self.keys.retry_shards();
        let registry = self.keys.retry_shard_counts();
        let announced: Vec<(u16, i64)> = self.conn().zrange_withscores(&registry, 0, -1).await?;
        let mut shards = own;
        for (count, at) in announced {
            let lapsed = now_ms - at > ANNOUNCEMENT_HOLDS_MS;
            if count > own && (!lapsed || self.highest_shard_holding_jobs(own..count).await?.is_some()) {
                shards = shards.max(count);
            } else if lapsed {
                // A process still running with it announces it again within a minute.
                self.conn().zrem::<_, _, ()>(&registry, count).await?;
            }
        }
        Ok(shards)
    }

    /// Looks at every shard from `from` up to [`MAX_RETRY_SHARDS`] and, if any holds a job, a
    /// lease or a claim, announces a count that covers it, as of `now_ms`; answers that count.
    /// One `EXISTS` per shard (about a millisecond of Redis for all of them), so a scheduler
    /// runs it once a minute, not at every look at the counts.
    pub async fn sweep_retry_shards(&self, from: u16, now_ms: i64) -> Result<Option<u16>, StoreError> {
        let Some(highest) = self.highest_shard_holding_jobs(from..MAX_RETRY_SHARDS).await? else {
            return Ok(None);
        };
        let count = highest + 1;
        self.announce(count, now_ms).await?;
        Ok(Some(count))
    }

    /// The highest of `shards` that holds a job, a lease or a claim (an empty set does not
    /// exist in Redis).
    async fn highest_shard_holding_jobs(&self, shards: Range<u16>) -> Result<Option<u16>, StoreError> {
        let mut pipe = redis::pipe();
        for shard in shards.clone() {
            pipe.exists(&[self.keys.retry_due(shard), self.keys.retry_claimed(shard)]);
        }
        let held: Vec<u8> = pipe.query_async(&mut self.conn()).await?;
        Ok(shards.zip(held).rev().find(|&(_, n)| n > 0).map(|(shard, _)| shard))
    }
}
