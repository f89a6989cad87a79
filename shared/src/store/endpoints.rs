//! Endpoint records, kept per account with a version counter that every change bumps: a
//! dispatcher caches an account's endpoints and the fan-out script checks the version it
//! cached against Redis, so an event costs no endpoint reads and a change is seen at once.

use super::listings::{Cursor, Page};
use super::script_call::ScriptCall;
use super::{Store, StoreError};
use crate::clock::parse_rfc3339_ms;
use crate::endpoint::Endpoint;
use crate::ids::{AccountId, EndpointId};
use redis::AsyncCommands;
use redis::Script;
use std::sync::{Arc, LazyLock};

/// Checks the account's count and stores the endpoint; answers 0, or the bound it is at.
/// KEYS: accounts, the account's endpoints, the endpoint's owner, the endpoints version, the
/// account's hash. ARGV: account id, endpoint id, sealed record, the default bound (empty for
/// none), the account hash's field holding a bound of its own (which wins).
static CREATE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/create_endpoint.lua")));

/// An account's endpoints as of one version of them, shared (not copied) by every delivery
/// made from them.
#[derive(Debug, Clone, Default)]
pub struct AccountEndpoints {
    pub version: u64,
    pub endpoints: Vec<Arc<Endpoint>>,
}

impl AccountEndpoints {
    /// Who gets an event: enabled endpoints subscribed to its type, or only `target` (a test
    /// send reaches its endpoint whatever the endpoint subscribes to).
    pub fn recipients<'a>(
        &'a self,
        event_type: &'a str,
        target: Option<&'a EndpointId>,
    ) -> impl Iterator<Item = &'a Arc<Endpoint>> {
        self.endpoints.iter().filter(move |ep| {
            ep.enabled
                && match target {
                    Some(id) => ep.id == *id,
                    None => ep.subscribes_to(event_type),
                }
        })
    }
}

impl Store {
    /// The record as stored: the endpoint's JSON with every secret sealed.
    fn sealed_json(&self, ep: &Endpoint) -> String {
        let mut value = serde_json::to_value(ep).expect("endpoints serialize");
        let bound_to = ep.id.as_str();
        for_each_secret(&mut value, |s| *s = self.sealer.seal(s, bound_to));
        value.to_string()
    }

    /// Parses a stored record, opening its secrets.
    pub(super) fn open_endpoint(&self, key: &str, json: &str) -> Result<Endpoint, StoreError> {
        let mut value: serde_json::Value = serde_json::from_str(json).map_err(|e| StoreError::corrupt(key, e))?;
        let bound_to = value["id"].as_str().unwrap_or_default().to_owned();
        let mut failure = None;
        for_each_secret(&mut value, |s| match self.sealer.open(s, &bound_to) {
            Ok(plain) => *s = plain,
            Err(e) => failure = Some(e),
        });
        if let Some(e) = failure {
            return Err(StoreError::corrupt(key, e));
        }
        serde_json::from_value(value).map_err(|e| StoreError::corrupt(key, e))
    }

    /// Re-seals every endpoint with the current key (after a key rotation); returns how many.
    pub async fn reseal_all_endpoints(&self) -> Result<usize, StoreError> {
        let accounts: Vec<String> = self.conn().smembers(self.keys.accounts()).await?;
        let mut count = 0;
        for account in accounts.into_iter().filter_map(|a| AccountId::parse(a).ok()) {
            for ep in self.list_endpoints(&account).await? {
                self.conn()
                    .hset::<_, _, _, ()>(
                        self.keys.account_endpoints(&account),
                        ep.id.as_str(),
                        self.sealed_json(&ep),
                    )
                    .await?;
                count += 1;
            }
        }
        Ok(count)
    }

    /// Stores a new endpoint, unless its account already has as many as it may (disabled ones
    /// count): its own bound if the operator gave it one, else `default_bound`. Checked and
    /// written in one script, so concurrent requests cannot pass the bound together. `None`
    /// sets no bound at all (an operator's own command).
    pub async fn create_endpoint(&self, ep: &Endpoint, default_bound: Option<u32>) -> Result<(), StoreError> {
        let mut call = ScriptCall::new(&CREATE, 5);
        call.key(self.keys.accounts())
            .key(self.keys.account_endpoints(&ep.account_id))
            .key(self.keys.endpoint_owner(&ep.id))
            .key(self.keys.endpoints_version(&ep.account_id))
            .key(self.keys.account_info(&ep.account_id))
            .arg(ep.account_id.as_str())
            .arg(ep.id.as_str())
            .arg(self.sealed_json(ep))
            .arg(default_bound.map(|b| b.to_string()).unwrap_or_default())
            .arg(super::accounts::MAX_ENDPOINTS_FIELD);
        match call.invoke::<u32>(&mut self.conn()).await? {
            0 => Ok(()),
            most => Err(StoreError::TooManyEndpoints { most }),
        }
    }

    /// Rewrites an endpoint.
    pub async fn save_endpoint(&self, ep: &Endpoint) -> Result<(), StoreError> {
        let json = self.sealed_json(ep);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset(self.keys.account_endpoints(&ep.account_id), ep.id.as_str(), json)
            .incr(self.keys.endpoints_version(&ep.account_id), 1);
        pipe.query_async::<()>(&mut self.conn()).await?;
        Ok(())
    }

    /// Every endpoint of an account with the version they belong to, read atomically.
    pub async fn account_endpoints(&self, account: &AccountId) -> Result<AccountEndpoints, StoreError> {
        let key = self.keys.account_endpoints(account);
        let (version, raw): (Option<u64>, Vec<String>) = redis::pipe()
            .atomic()
            .get(self.keys.endpoints_version(account))
            .hvals(&key)
            .query_async(&mut self.conn())
            .await?;
        Ok(AccountEndpoints {
            version: version.unwrap_or(0),
            endpoints: raw
                .iter()
                .map(|json| self.open_endpoint(&key, json).map(Arc::new))
                .collect::<Result<_, _>>()?,
        })
    }

    pub async fn list_endpoints(&self, account: &AccountId) -> Result<Vec<Endpoint>, StoreError> {
        let key = self.keys.account_endpoints(account);
        let raw: Vec<String> = self.conn().hvals(&key).await?;
        let mut eps = raw
            .iter()
            .map(|json| self.open_endpoint(&key, json))
            .collect::<Result<Vec<_>, _>>()?;
        eps.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(eps)
    }

    /// An account's endpoint ids, oldest first (ids sort by creation): all that a page needs
    /// to be cut, or a delivery's id to be derived, with no endpoint read or secret unsealed.
    pub async fn endpoint_ids(&self, account: &AccountId) -> Result<Vec<EndpointId>, StoreError> {
        let key = self.keys.account_endpoints(account);
        let raw: Vec<String> = self.conn().hkeys(&key).await?;
        let mut ids = raw
            .into_iter()
            .map(|id| EndpointId::parse(id).map_err(|e| StoreError::corrupt(&key, e)))
            .collect::<Result<Vec<_>, _>>()?;
        ids.sort_unstable();
        Ok(ids)
    }

    /// Up to `limit` of an account's endpoints, oldest first, after the one `after` names. The
    /// page is cut from the sorted ids, and only its endpoints are read and unsealed. An
    /// endpoint deleted meanwhile is left out; one created meanwhile sorts last, so a client
    /// paging through sees it on its last page.
    pub async fn endpoints_page(
        &self,
        account: &AccountId,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Page<Endpoint>, StoreError> {
        let key = self.keys.account_endpoints(account);
        let ids = self.endpoint_ids(account).await?;
        let start = after.map_or(0, |c| ids.partition_point(|id| id.as_str() <= c.id.as_str()));
        let end = ids.len().min(start + limit);
        let chosen = &ids[start..end];
        let raw: Vec<Option<String>> = if chosen.is_empty() {
            Vec::new()
        } else {
            let fields: Vec<&str> = chosen.iter().map(EndpointId::as_str).collect();
            self.conn().hmget(&key, fields).await?
        };
        let items = raw
            .iter()
            .flatten()
            .map(|json| self.open_endpoint(&key, json))
            .collect::<Result<Vec<_>, _>>()?;
        let next = (end < ids.len()).then(|| Cursor {
            created_ms: items
                .last()
                .and_then(|ep| parse_rfc3339_ms(&ep.created_at))
                .unwrap_or_default(),
            id: chosen.last().map(|id| id.as_str().to_owned()).unwrap_or_default(),
        });
        Ok(Page { items, next })
    }

    pub async fn get_endpoint(&self, id: &EndpointId) -> Result<Option<Endpoint>, StoreError> {
        let owner: Option<String> = self.conn().get(self.keys.endpoint_owner(id)).await?;
        let Some(account) = owner.and_then(|a| AccountId::parse(a).ok()) else {
            return Ok(None);
        };
        let key = self.keys.account_endpoints(&account);
        let json: Option<String> = self.conn().hget(&key, id.as_str()).await?;
        json.map(|j| self.open_endpoint(&key, &j)).transpose()
    }

    /// Removes an endpoint; its deliveries stay readable until retention expires them, and
    /// pending retries to it end as failed when they come due.
    pub async fn delete_endpoint(&self, id: &EndpointId) -> Result<bool, StoreError> {
        let Some(ep) = self.get_endpoint(id).await? else {
            return Ok(false);
        };
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hdel(self.keys.account_endpoints(&ep.account_id), id.as_str())
            .del(self.keys.endpoint_owner(id))
            // Its health and per-endpoint listing go with it; its deliveries stay readable
            // through the account's listing until retention expires them.
            .del(self.keys.endpoint_health(id))
            .del(self.keys.endpoint_deliveries(id))
            .incr(self.keys.endpoints_version(&ep.account_id), 1);
        pipe.query_async::<()>(&mut self.conn()).await?;
        Ok(true)
    }

    /// Stops delivery to an endpoint and records why (e.g. it answered `410 Gone`). Returns the
    /// endpoint when this call disabled it, `None` when it was already disabled or is gone.
    pub async fn disable_endpoint(
        &self,
        id: &EndpointId,
        reason: &str,
        now_ms: i64,
    ) -> Result<Option<Endpoint>, StoreError> {
        let Some(previous) = self.get_endpoint(id).await? else {
            return Ok(None);
        };
        if !previous.enabled {
            return Ok(None);
        }
        let mut ep = previous.clone();
        ep.disable(reason, now_ms);
        self.save_endpoint(&ep).await?;
        Ok(Some(ep))
    }
}

/// Applies `f` to the endpoint's current and retired secrets in its JSON form.
fn for_each_secret(value: &mut serde_json::Value, mut f: impl FnMut(&mut String)) {
    if let Some(serde_json::Value::String(s)) = value.get_mut("secret") {
        f(s);
    }
    if let Some(serde_json::Value::Array(retired)) = value.get_mut("previous_secrets") {
        for r in retired {
            if let Some(serde_json::Value::String(s)) = r.get_mut("secret") {
                f(s);
            }
        }
    }
}
