//! The retry set as the scheduler sees it: claim what is due, publish, then release.
//!
//! A claim moves a job from `due` to `claimed` with a lease. If the scheduler dies before it
//! releases, the lease expires and any scheduler claims the job again, unless a dispatcher has
//! since taken it (it is back in `due` under the dispatcher's lease), in which case the stale
//! claim is dropped. A scheduler whose publish failed hands its claims back, which ends their
//! lease at once.

use super::script_call::ScriptCall;
use super::{Store, StoreError};
use redis::{AsyncCommands, Script};
use std::sync::LazyLock;

static CLAIM: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/claim.lua")));

/// Jobs claimed in one call.
#[derive(Debug, Default)]
pub struct Claimed {
    /// Encoded jobs, ready to publish as they are.
    pub jobs: Vec<String>,
    /// How many of them were claimed again after another claim's lease expired.
    pub reclaimed: usize,
    /// The due time of the earliest newly due job, to measure how late jobs are re-queued.
    pub earliest_due_ms: Option<i64>,
}

impl Store {
    /// Claims up to `limit` due jobs of `shard`, leased until `lease_until_ms`.
    pub async fn claim_due(
        &self,
        shard: u16,
        now_ms: i64,
        lease_until_ms: i64,
        limit: usize,
    ) -> Result<Claimed, StoreError> {
        let reply: Vec<redis::Value> = ScriptCall::new(&CLAIM, 2)
            .key(self.keys.retry_due(shard))
            .key(self.keys.retry_claimed(shard))
            .arg(now_ms)
            .arg(lease_until_ms)
            .arg(limit)
            .invoke(&mut self.conn())
            .await?;
        let mut reply = reply.into_iter();
        let mut int = || match reply.next() {
            Some(redis::Value::Int(n)) => n,
            _ => -1,
        };
        let reclaimed = int().max(0) as usize;
        let earliest_due_ms = Some(int()).filter(|&due| due >= 0);
        let jobs = reply
            .filter_map(|v| redis::from_redis_value::<String>(v).ok())
            .collect();
        Ok(Claimed {
            jobs,
            reclaimed,
            earliest_due_ms,
        })
    }

    /// Forgets claimed jobs once the broker has confirmed them.
    pub async fn release_claimed(&self, shard: u16, jobs: &[String]) -> Result<(), StoreError> {
        if !jobs.is_empty() {
            self.conn()
                .zrem::<_, _, ()>(self.keys.retry_claimed(shard), jobs)
                .await?;
        }
        Ok(())
    }

    /// Ends the claim on jobs the broker did not take, so the next claim takes them again at
    /// once instead of after the claim lease. A job a dispatcher has taken since is dropped by
    /// that claim as usual; one released already is not claimed again.
    pub async fn hand_back_claimed(&self, shard: u16, jobs: &[String]) -> Result<(), StoreError> {
        if !jobs.is_empty() {
            let expired: Vec<(i64, &String)> = jobs.iter().map(|job| (0, job)).collect();
            redis::cmd("ZADD")
                .arg(self.keys.retry_claimed(shard))
                .arg("XX")
                .arg(&expired)
                .exec_async(&mut self.conn())
                .await?;
        }
        Ok(())
    }

    /// The due time of the earliest job (or lease) of `shard`.
    pub async fn next_due_ms(&self, shard: u16) -> Result<Option<i64>, StoreError> {
        let first: Vec<(String, f64)> = self.conn().zrange_withscores(self.keys.retry_due(shard), 0, 0).await?;
        Ok(first.first().map(|(_, score)| *score as i64))
    }

    /// Jobs and leases waiting in every shard.
    pub async fn retry_backlog(&self) -> Result<u64, StoreError> {
        self.retry_backlog_of(self.keys.retry_shards()).await
    }

    /// Jobs and leases waiting in the first `shards` shards: a scheduler draining another
    /// count's shards counts theirs too.
    pub async fn retry_backlog_of(&self, shards: u16) -> Result<u64, StoreError> {
        let mut pipe = redis::pipe();
        for shard in 0..shards {
            pipe.zcard(self.keys.retry_due(shard));
        }
        let sizes: Vec<u64> = pipe.query_async(&mut self.conn()).await?;
        Ok(sizes.iter().sum())
    }
}
