//! The endpoints of each account, cached in the dispatcher. An entry is used only while Redis
//! still holds the same endpoints version: the fan-out script checks it and writes nothing when
//! it changed, and the dispatcher then reloads. So an event costs no endpoint reads, and an
//! endpoint created, changed, disabled or deleted is seen by the very next event.

use laabam_shared::ids::AccountId;
use laabam_shared::store::{AccountEndpoints, Store, StoreError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Accounts cached at most; past it the cache starts over (entries are cheap to reload).
const MAX_ACCOUNTS: usize = 10_000;

#[derive(Debug)]
pub struct Directory {
    store: Store,
    accounts: Mutex<HashMap<AccountId, Arc<AccountEndpoints>>>,
}

impl Directory {
    pub fn new(store: Store) -> Self {
        Directory {
            store,
            accounts: Mutex::new(HashMap::new()),
        }
    }

    /// The cached endpoints of `account`, loaded on first use.
    pub async fn get(&self, account: &AccountId) -> Result<Arc<AccountEndpoints>, StoreError> {
        let cached = self.accounts.lock().expect("directory lock").get(account).cloned();
        match cached {
            Some(entry) => Ok(entry),
            None => self.reload(account).await,
        }
    }

    /// Reads the account's endpoints again (their version moved on).
    pub async fn reload(&self, account: &AccountId) -> Result<Arc<AccountEndpoints>, StoreError> {
        let fresh = Arc::new(self.store.account_endpoints(account).await?);
        let mut accounts = self.accounts.lock().expect("directory lock");
        if accounts.len() >= MAX_ACCOUNTS {
            accounts.clear();
        }
        // Concurrent reloads may finish out of order: keep the newest version.
        let entry = accounts.entry(account.clone()).or_insert_with(|| fresh.clone());
        if entry.version < fresh.version {
            *entry = fresh.clone();
        }
        Ok(entry.clone())
    }
}
