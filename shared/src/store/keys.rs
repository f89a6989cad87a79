//! Key names, in one place so the layout table in `store/mod.rs` stays true.

use crate::ids::{AccountId, DeliveryId, EndpointId, EventId};

#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    retry_shards: u16,
}

impl Keys {
    pub fn new(prefix: &str, retry_shards: u16) -> Self {
        Keys {
            prefix: prefix.to_owned(),
            retry_shards: retry_shards.max(1),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn accounts(&self) -> String {
        format!("{}accounts", self.prefix)
    }

    pub fn account_endpoints(&self, account: &AccountId) -> String {
        format!("{}acct:{account}:eps", self.prefix)
    }

    /// Bumped by every change to the account's endpoints, so dispatchers can cache them.
    pub fn endpoints_version(&self, account: &AccountId) -> String {
        format!("{}acct:{account}:eps:ver", self.prefix)
    }

    pub fn endpoint_owner(&self, endpoint: &EndpointId) -> String {
        format!("{}ep:{endpoint}", self.prefix)
    }

    pub fn endpoint_deliveries(&self, endpoint: &EndpointId) -> String {
        format!("{}ep:{endpoint}:dlv", self.prefix)
    }

    /// Scoped by account: event ids are chosen by publishers, and two accounts may choose the same.
    pub fn event(&self, account: &AccountId, event: &EventId) -> String {
        format!("{}evt:{account}:{event}", self.prefix)
    }

    pub fn account_info(&self, account: &AccountId) -> String {
        format!("{}acct:{account}", self.prefix)
    }

    pub fn account_keys(&self, account: &AccountId) -> String {
        format!("{}acct:{account}:keys", self.prefix)
    }

    /// An API key, by the SHA-256 of its plaintext (the plaintext is never stored).
    pub fn api_key(&self, key_hash: &str) -> String {
        format!("{}apikey:{key_hash}", self.prefix)
    }

    /// A caller's API request bucket, by the digest of its credential or address.
    pub fn api_rate(&self, caller: &str) -> String {
        format!("{}api:rate:{caller}", self.prefix)
    }

    pub fn account_events(&self, account: &AccountId) -> String {
        format!("{}acct:{account}:evt", self.prefix)
    }

    pub fn account_deliveries(&self, account: &AccountId) -> String {
        format!("{}acct:{account}:dlv", self.prefix)
    }

    pub fn idempotency(&self, account: &AccountId, key_hash: &str) -> String {
        format!("{}idem:{account}:{key_hash}", self.prefix)
    }

    /// An endpoint's requests in flight across every dispatcher (see `Store::hold_request_slot`).
    pub fn endpoint_requests(&self, endpoint: &EndpointId) -> String {
        format!("{}ep:{endpoint}:inflight", self.prefix)
    }

    /// Last delivery, last success and failing-since of an endpoint.
    pub fn endpoint_health(&self, endpoint: &EndpointId) -> String {
        format!("{}ep:{endpoint}:health", self.prefix)
    }

    /// Attempt counts by outcome and latency bucket in one time bucket (`5m` or `1h`).
    pub fn endpoint_stats(&self, endpoint: &EndpointId, granularity: &str, bucket: i64) -> String {
        format!("{}ep:{endpoint}:st:{granularity}:{bucket}", self.prefix)
    }

    pub fn delivery(&self, delivery: &DeliveryId) -> String {
        format!("{}dlv:{delivery}", self.prefix)
    }

    /// Where attempts were logged before they moved into the state hash; read until it expires.
    pub fn legacy_attempts(&self, delivery: &DeliveryId) -> String {
        format!("{}dlv:{delivery}:att", self.prefix)
    }

    pub fn retry_shards(&self) -> u16 {
        self.retry_shards
    }

    /// The retry shard of a delivery: FNV-1a of its id, stable across processes and restarts.
    pub fn shard_of(&self, delivery: &DeliveryId) -> u16 {
        let hash = delivery.as_str().bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        (hash % self.retry_shards as u64) as u16
    }

    /// Retry jobs and in-flight leases of one shard, scored by due time (unix ms). The braces
    /// are a Redis Cluster hash tag: a shard's two sets always live on the same node.
    pub fn retry_due(&self, shard: u16) -> String {
        format!("{}retry:{{{shard}}}:due", self.prefix)
    }

    pub fn retry_claimed(&self, shard: u16) -> String {
        format!("{}retry:{{{shard}}}:claimed", self.prefix)
    }

    /// The dispatchers running, scored by when each last said so.
    pub fn dispatchers(&self) -> String {
        format!("{}dispatchers", self.prefix)
    }

    /// The shard counts processes run with, scored by when each was last announced.
    pub fn retry_shard_counts(&self) -> String {
        format!("{}retry:shard_counts", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_spread_and_stay_in_range() {
        let keys = Keys::new("p:", 8);
        let mut seen = [0u32; 8];
        for i in 0..800 {
            let id = DeliveryId::parse(format!("dlv_{i}")).unwrap();
            seen[keys.shard_of(&id) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
        assert_eq!(Keys::new("p:", 1).shard_of(&DeliveryId::parse("dlv_x").unwrap()), 0);
    }

    #[test]
    fn every_key_starts_with_the_prefix() {
        let keys = Keys::new("t1:", 2);
        let a = AccountId::parse("acct_1").unwrap();
        assert_eq!(keys.account_endpoints(&a), "t1:acct:acct_1:eps");
        assert_eq!(keys.retry_due(1), "t1:retry:{1}:due");
        assert_eq!(keys.dispatchers(), "t1:dispatchers");
    }
}
