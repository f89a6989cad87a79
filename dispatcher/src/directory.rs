//! The endpoints of each account, cached in the dispatcher. An entry is used only while Redis
//! still holds the same endpoints version: the fan-out script checks it and writes nothing when
//! it changed, and the dispatcher then reloads. So an event costs no endpoint reads, and an
//! endpoint created, changed, disabled or deleted is seen by the very next event.
//!
//! The cache is bounded by the endpoints it holds, not by accounts, since one account may have
//! thousands and another one. Past the bound, quick_cache evicts entries used once before those
//! in steady use, so accounts seen now and then come and go while the busy ones stay cached
//! (formerly the whole cache was dropped whenever it filled, and every account read again).

use crate::metrics::METRICS;
use laabam_shared::ids::AccountId;
use laabam_shared::store::{AccountEndpoints, Store, StoreError};
use quick_cache::Weighter;
use quick_cache::sync::Cache;
use std::sync::{Arc, Mutex};

/// An account's entry weighs its endpoints, plus one for the account itself (an account with
/// none is cached too, so its events cost no reads either).
#[derive(Debug, Clone, Copy)]
struct ByEndpoints;

impl Weighter<AccountId, Arc<AccountEndpoints>> for ByEndpoints {
    fn weight(&self, _: &AccountId, entry: &Arc<AccountEndpoints>) -> u64 {
        1 + entry.endpoints.len() as u64
    }
}

pub struct Directory {
    store: Store,
    accounts: Cache<AccountId, Arc<AccountEndpoints>, ByEndpoints>,
    /// Held while a reload compares versions and stores its entry, so that concurrent reloads
    /// finishing out of order keep the newest. Lookups never take it.
    storing: Mutex<()>,
}

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Directory")
            .field("accounts", &self.accounts.len())
            .field("endpoints", &self.accounts.weight())
            .finish_non_exhaustive()
    }
}

impl Directory {
    /// Holds about `capacity` endpoints in all. An account with more than the cache can hold is
    /// read from Redis for each of its events (counted in `laabam_dispatcher_endpoint_loads_total`).
    pub fn new(store: Store, capacity: usize) -> Self {
        let options = quick_cache::OptionsBuilder::new()
            .weight_capacity(capacity as u64)
            .estimated_items_capacity(capacity)
            // One shard: lookups share a read lock, and an account may use the whole capacity
            // instead of one shard's part of it.
            .shards(1)
            .build()
            .expect("cache options are valid");
        Directory {
            store,
            accounts: Cache::with_options(options, ByEndpoints, Default::default(), Default::default()),
            storing: Mutex::new(()),
        }
    }

    /// The cached endpoints of `account`, loaded on first use.
    pub async fn get(&self, account: &AccountId) -> Result<Arc<AccountEndpoints>, StoreError> {
        match self.accounts.get(account) {
            Some(entry) => Ok(entry),
            None => self.reload(account).await,
        }
    }

    /// Reads the account's endpoints again (their version moved on).
    pub async fn reload(&self, account: &AccountId) -> Result<Arc<AccountEndpoints>, StoreError> {
        let fresh = Arc::new(self.store.account_endpoints(account).await?);
        METRICS.endpoint_loads.inc();
        let _storing = self.storing.lock().expect("directory lock");
        if let Some(cached) = self.accounts.peek(account)
            && cached.version >= fresh.version
        {
            return Ok(cached);
        }
        self.accounts.insert(account.clone(), fresh.clone());
        // Each entry weighs one more than its endpoints.
        let endpoints = self.accounts.weight().saturating_sub(self.accounts.len() as u64);
        METRICS.cached_endpoints.set(endpoints as i64);
        Ok(fresh)
    }
}
