//! Endpoint records, indexed by account and event type so that fan-out is one round trip.

use super::{Store, StoreError};
use crate::endpoint::Endpoint;
use crate::ids::{AccountId, EndpointId};
use redis::AsyncCommands;

impl Store {
    fn index_keys(&self, ep: &Endpoint) -> Vec<String> {
        match &ep.events {
            None => vec![self.keys.all_types_index(&ep.account_id)],
            Some(types) => types.iter().map(|t| self.keys.type_index(&ep.account_id, t)).collect(),
        }
    }

    /// Stores a new endpoint and indexes it under each subscribed type.
    pub async fn create_endpoint(&self, ep: &Endpoint) -> Result<(), StoreError> {
        let json = serde_json::to_string(ep).expect("endpoints serialize");
        let mut pipe = redis::pipe();
        pipe.atomic()
            .sadd(self.keys.accounts(), ep.account_id.as_str())
            .hset(self.keys.account_endpoints(&ep.account_id), ep.id.as_str(), json)
            .set(self.keys.endpoint_owner(&ep.id), ep.account_id.as_str());
        for key in self.index_keys(ep) {
            pipe.sadd(key, ep.id.as_str());
        }
        pipe.query_async::<()>(&mut self.conn()).await?;
        Ok(())
    }

    /// Rewrites an endpoint, moving it between type indexes when its subscriptions changed.
    pub async fn save_endpoint(&self, ep: &Endpoint, previous: &Endpoint) -> Result<(), StoreError> {
        let json = serde_json::to_string(ep).expect("endpoints serialize");
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset(self.keys.account_endpoints(&ep.account_id), ep.id.as_str(), json);
        let (old, new) = (self.index_keys(previous), self.index_keys(ep));
        for key in old.iter().filter(|k| !new.contains(k)) {
            pipe.srem(key, ep.id.as_str());
        }
        for key in &new {
            pipe.sadd(key, ep.id.as_str());
        }
        pipe.query_async::<()>(&mut self.conn()).await?;
        Ok(())
    }

    pub async fn list_endpoints(&self, account: &AccountId) -> Result<Vec<Endpoint>, StoreError> {
        let key = self.keys.account_endpoints(account);
        let raw: Vec<String> = self.conn().hvals(&key).await?;
        let mut eps = raw
            .iter()
            .map(|json| parse_endpoint(&key, json))
            .collect::<Result<Vec<_>, _>>()?;
        eps.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(eps)
    }

    pub async fn get_endpoint(&self, id: &EndpointId) -> Result<Option<Endpoint>, StoreError> {
        let owner: Option<String> = self.conn().get(self.keys.endpoint_owner(id)).await?;
        let Some(account) = owner.and_then(|a| AccountId::parse(a).ok()) else {
            return Ok(None);
        };
        let key = self.keys.account_endpoints(&account);
        let json: Option<String> = self.conn().hget(&key, id.as_str()).await?;
        json.map(|j| parse_endpoint(&key, &j)).transpose()
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
            .del(self.keys.endpoint_owner(id));
        for key in self.index_keys(&ep) {
            pipe.srem(key, id.as_str());
        }
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
        self.save_endpoint(&ep, &previous).await?;
        Ok(Some(ep))
    }
}

pub(super) fn parse_endpoint(key: &str, json: &str) -> Result<Endpoint, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        problem: e.to_string(),
    })
}
