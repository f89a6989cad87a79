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

    /// The prefix and `parts`, joined into a string sized once. A delivery's two Redis calls
    /// name thirteen keys, and `format!` spent about a thousand instructions on each (its
    /// formatting machinery, ids' `Display`, the string grown two or three times): a tenth of
    /// the dispatcher's instructions per delivery, though only about a percent of its time
    /// (docs/performance-log.md, session 44).
    fn join(&self, parts: &[&str]) -> String {
        let mut key = String::with_capacity(self.prefix.len() + parts.iter().map(|p| p.len()).sum::<usize>());
        key.push_str(&self.prefix);
        parts.iter().for_each(|p| key.push_str(p));
        key
    }

    pub fn accounts(&self) -> String {
        self.join(&["accounts"])
    }

    pub fn account_endpoints(&self, account: &AccountId) -> String {
        self.join(&["acct:", account.as_str(), ":eps"])
    }

    /// Bumped by every change to the account's endpoints, so dispatchers can cache them.
    pub fn endpoints_version(&self, account: &AccountId) -> String {
        self.join(&["acct:", account.as_str(), ":eps:ver"])
    }

    pub fn endpoint_owner(&self, endpoint: &EndpointId) -> String {
        self.join(&["ep:", endpoint.as_str()])
    }

    pub fn endpoint_deliveries(&self, endpoint: &EndpointId) -> String {
        self.join(&["ep:", endpoint.as_str(), ":dlv"])
    }

    /// Scoped by account: event ids are chosen by publishers, and two accounts may choose the same.
    pub fn event(&self, account: &AccountId, event: &EventId) -> String {
        self.join(&["evt:", account.as_str(), ":", event.as_str()])
    }

    pub fn account_info(&self, account: &AccountId) -> String {
        self.join(&["acct:", account.as_str()])
    }

    pub fn account_keys(&self, account: &AccountId) -> String {
        self.join(&["acct:", account.as_str(), ":keys"])
    }

    /// An API key, by the SHA-256 of its plaintext (the plaintext is never stored).
    pub fn api_key(&self, key_hash: &str) -> String {
        self.join(&["apikey:", key_hash])
    }

    /// A caller's API request bucket, by the digest of its credential or address.
    pub fn api_rate(&self, caller: &str) -> String {
        self.join(&["api:rate:", caller])
    }

    pub fn account_events(&self, account: &AccountId) -> String {
        self.join(&["acct:", account.as_str(), ":evt"])
    }

    pub fn account_deliveries(&self, account: &AccountId) -> String {
        self.join(&["acct:", account.as_str(), ":dlv"])
    }

    pub fn idempotency(&self, account: &AccountId, key_hash: &str) -> String {
        self.join(&["idem:", account.as_str(), ":", key_hash])
    }

    /// An endpoint's requests in flight across every dispatcher (see `Store::hold_request_slot`).
    pub fn endpoint_requests(&self, endpoint: &EndpointId) -> String {
        self.join(&["ep:", endpoint.as_str(), ":inflight"])
    }

    /// Last delivery, last success and failing-since of an endpoint.
    pub fn endpoint_health(&self, endpoint: &EndpointId) -> String {
        self.join(&["ep:", endpoint.as_str(), ":health"])
    }

    /// Attempt counts by outcome and latency bucket in one time bucket (`5m` or `1h`).
    pub fn endpoint_stats(&self, endpoint: &EndpointId, granularity: &str, bucket: i64) -> String {
        self.join(&[
            "ep:",
            endpoint.as_str(),
            ":st:",
            granularity,
            ":",
            itoa::Buffer::new().format(bucket),
        ])
    }

    pub fn delivery(&self, delivery: &DeliveryId) -> String {
        self.join(&["dlv:", delivery.as_str()])
    }

    /// Where attempts were logged before they moved into the state hash; read until it expires.
    pub fn legacy_attempts(&self, delivery: &DeliveryId) -> String {
        self.join(&["dlv:", delivery.as_str(), ":att"])
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
        self.join(&["retry:{", itoa::Buffer::new().format(shard), "}:due"])
    }

    pub fn retry_claimed(&self, shard: u16) -> String {
        self.join(&["retry:{", itoa::Buffer::new().format(shard), "}:claimed"])
    }

    /// The dispatchers running, scored by when each last said so.
    pub fn dispatchers(&self) -> String {
        self.join(&["dispatchers"])
    }

    /// The shard counts processes run with, scored by when each was last announced.
    pub fn retry_shard_counts(&self) -> String {
        self.join(&["retry:shard_counts"])
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

    /// Every key as the layout table in `store/mod.rs` gives it: stored data is found by these
    /// names, so a builder that drifts loses it.
    #[test]
    fn every_key_is_named_as_the_layout_gives_it() {
        let keys = Keys::new("t1:", 2);
        let a = AccountId::parse("acct_1").unwrap();
        let e = EndpointId::parse("ep_2").unwrap();
        let v = EventId::parse("evt_3").unwrap();
        let d = DeliveryId::parse("dlv_4").unwrap();
        let named = [
            (keys.accounts(), "t1:accounts"),
            (keys.account_endpoints(&a), "t1:acct:acct_1:eps"),
            (keys.endpoints_version(&a), "t1:acct:acct_1:eps:ver"),
            (keys.endpoint_owner(&e), "t1:ep:ep_2"),
            (keys.endpoint_deliveries(&e), "t1:ep:ep_2:dlv"),
            (keys.event(&a, &v), "t1:evt:acct_1:evt_3"),
            (keys.account_info(&a), "t1:acct:acct_1"),
            (keys.account_keys(&a), "t1:acct:acct_1:keys"),
            (keys.api_key("ab12"), "t1:apikey:ab12"),
            (keys.api_rate("cd34"), "t1:api:rate:cd34"),
            (keys.account_events(&a), "t1:acct:acct_1:evt"),
            (keys.account_deliveries(&a), "t1:acct:acct_1:dlv"),
            (keys.idempotency(&a, "ef56"), "t1:idem:acct_1:ef56"),
            (keys.endpoint_requests(&e), "t1:ep:ep_2:inflight"),
            (keys.endpoint_health(&e), "t1:ep:ep_2:health"),
            (keys.endpoint_stats(&e, "5m", 5_881_234), "t1:ep:ep_2:st:5m:5881234"),
            (keys.endpoint_stats(&e, "1h", -1), "t1:ep:ep_2:st:1h:-1"),
            (keys.delivery(&d), "t1:dlv:dlv_4"),
            (keys.legacy_attempts(&d), "t1:dlv:dlv_4:att"),
            (keys.retry_due(1), "t1:retry:{1}:due"),
            (keys.retry_claimed(1023), "t1:retry:{1023}:claimed"),
            (keys.dispatchers(), "t1:dispatchers"),
            (keys.retry_shard_counts(), "t1:retry:shard_counts"),
        ];
        for (built, expected) in named {
            assert_eq!(built, expected);
        }
    }
}
