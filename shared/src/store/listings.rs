//! Reading deliveries and events back for the API: listings newest first with cursors, one
//! delivery's state and its attempt log. Nothing here writes; the life of a delivery is in
//! `deliveries`.

use super::{Store, StoreError};
use crate::delivery::{AttemptRecord, DeliveryState, DeliveryStatus, field};
use crate::ids::{AccountId, DeliveryId, EndpointId, EventId};
use redis::AsyncCommands;
use std::collections::HashMap;

/// Which deliveries a listing shows.
#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    pub endpoint: Option<EndpointId>,
    pub event_type: Option<String>,
    pub status: Option<DeliveryStatus>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
}

/// Where a listing continues: the creation time and id of the last item shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub created_ms: i64,
    pub id: String,
}

impl Cursor {
    /// `<created_ms>.<id>`, opaque to clients.
    pub fn encode(&self) -> String {
        format!("{}.{}", self.created_ms, self.id)
    }

    pub fn decode(s: &str) -> Option<Self> {
        let (ms, id) = s.split_once('.')?;
        Some(Cursor {
            created_ms: ms.parse().ok()?,
            id: id.to_owned(),
        })
    }
}

/// A page of a listing.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Present when there may be more.
    pub next: Option<Cursor>,
}

/// A state from the values of [`field::STATE`], in order.
fn state_from_fields(id: &DeliveryId, values: Vec<Option<String>>) -> Option<DeliveryState> {
    let h: HashMap<String, String> = field::STATE
        .iter()
        .zip(values)
        .filter_map(|(name, value)| Some(((*name).to_owned(), value?)))
        .collect();
    DeliveryState::from_hash(id.clone(), &h)
}

impl Store {
    /// The stored body of an account's event.
    pub async fn event_body(&self, account: &AccountId, event: &EventId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.conn().get(self.keys.event(account, event)).await?)
    }

    /// An account's events, newest first, with their bodies.
    pub async fn list_events(
        &self,
        account: &AccountId,
        cursor: Option<&Cursor>,
        limit: usize,
    ) -> Result<Page<Vec<u8>>, StoreError> {
        let index = self.keys.account_events(account);
        let ids = self.scan_index(&index, cursor, None, None, limit).await?;
        if ids.is_empty() {
            return Ok(Page {
                items: Vec::new(),
                next: None,
            });
        }
        let mut pipe = redis::pipe();
        for (id, _) in &ids {
            pipe.get(self.keys.event(
                account,
                &EventId::parse(id.as_str()).map_err(|e| StoreError::corrupt(&index, e))?,
            ));
        }
        let bodies: Vec<Option<Vec<u8>>> = pipe.query_async(&mut self.conn()).await?;
        let next = (ids.len() == limit)
            .then(|| {
                ids.last().map(|(id, ms)| Cursor {
                    created_ms: *ms,
                    id: id.clone(),
                })
            })
            .flatten();
        Ok(Page {
            items: bodies.into_iter().flatten().collect(),
            next,
        })
    }

    /// Up to `limit` (id, score) pairs of a time index, newest first, after `cursor`.
    async fn scan_index(
        &self,
        index: &str,
        cursor: Option<&Cursor>,
        since_ms: Option<i64>,
        until_ms: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let max = match (cursor, until_ms) {
            (Some(c), Some(u)) => c.created_ms.min(u),
            (Some(c), None) => c.created_ms,
            (None, Some(u)) => u,
            (None, None) => i64::MAX,
        };
        let min = since_ms.unwrap_or(i64::MIN);
        let mut out = Vec::with_capacity(limit);
        let mut offset = 0isize;
        let batch = 200isize;
        while out.len() < limit {
            let chunk: Vec<(String, f64)> = self
                .conn()
                .zrevrangebyscore_limit_withscores(index, max, min, offset, batch)
                .await?;
            let fetched = chunk.len();
            for (id, score) in chunk {
                let score = score as i64;
                if let Some(c) = cursor
                    && score == c.created_ms
                    && id.as_str() >= c.id.as_str()
                {
                    continue;
                }
                out.push((id, score));
                if out.len() == limit {
                    break;
                }
            }
            if (fetched as isize) < batch {
                break;
            }
            offset += batch;
        }
        Ok(out)
    }

    /// An account's deliveries, newest first, filtered; scans at most a few thousand entries per
    /// page, returning a cursor to continue when the filter is selective.
    pub async fn list_deliveries(
        &self,
        account: &AccountId,
        filter: &DeliveryFilter,
        cursor: Option<&Cursor>,
        limit: usize,
    ) -> Result<Page<DeliveryState>, StoreError> {
        let index = match &filter.endpoint {
            Some(ep) => self.keys.endpoint_deliveries(ep),
            None => self.keys.account_deliveries(account),
        };
        let mut items = Vec::with_capacity(limit);
        let mut cursor = cursor.cloned();
        let mut scanned = 0;
        loop {
            let ids = self
                .scan_index(&index, cursor.as_ref(), filter.since_ms, filter.until_ms, 200)
                .await?;
            let exhausted = ids.len() < 200;
            if ids.is_empty() {
                return Ok(Page { items, next: None });
            }
            let delivery_ids = ids
                .iter()
                .map(|(id, _)| DeliveryId::parse(id.as_str()).map_err(|e| StoreError::corrupt(&index, e)))
                .collect::<Result<Vec<_>, _>>()?;
            let states = self.deliveries(&delivery_ids).await?;
            for ((id, created), state) in ids.into_iter().zip(states) {
                scanned += 1;
                cursor = Some(Cursor {
                    created_ms: created,
                    id,
                });
                let Some(state) = state else {
                    continue;
                };
                let wanted = state.account_id == *account
                    && filter.event_type.as_ref().is_none_or(|t| *t == state.event_type)
                    && filter.status.is_none_or(|s| s == state.status);
                if wanted {
                    items.push(state);
                    if items.len() == limit {
                        return Ok(Page { items, next: cursor });
                    }
                }
            }
            if exhausted {
                return Ok(Page { items, next: None });
            }
            if scanned >= 5000 {
                return Ok(Page { items, next: cursor });
            }
        }
    }

    /// The ids of an endpoint's deliveries created at or after `since_ms`.
    pub async fn endpoint_deliveries_since(
        &self,
        endpoint: &EndpointId,
        since_ms: i64,
    ) -> Result<Vec<DeliveryId>, StoreError> {
        let ids: Vec<String> = self
            .conn()
            .zrangebyscore(self.keys.endpoint_deliveries(endpoint), since_ms, "+inf")
            .await?;
        Ok(ids.into_iter().filter_map(|i| DeliveryId::parse(i).ok()).collect())
    }

    pub async fn delivery(&self, id: &DeliveryId) -> Result<Option<DeliveryState>, StoreError> {
        let values: Vec<Option<String>> = self.conn().hmget(self.keys.delivery(id), &field::STATE[..]).await?;
        if values.iter().all(Option::is_none) {
            return Ok(None);
        }
        state_from_fields(id, values)
            .map(Some)
            .ok_or_else(|| StoreError::corrupt(&self.keys.delivery(id), "missing or invalid fields"))
    }

    /// The states of several deliveries in one round trip; `None` where one is absent. Only the
    /// state's fields are read, never the attempt log beside them.
    pub async fn deliveries(&self, ids: &[DeliveryId]) -> Result<Vec<Option<DeliveryState>>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.hmget(self.keys.delivery(id), &field::STATE[..]);
        }
        let rows: Vec<Vec<Option<String>>> = pipe.query_async(&mut self.conn()).await?;
        Ok(ids
            .iter()
            .zip(rows)
            .map(|(id, values)| state_from_fields(id, values))
            .collect())
    }

    /// Every recorded attempt (the newest 100), oldest first. Deliveries begun before attempts
    /// moved into the state hash kept them in a list of their own, which is read first until
    /// it expires with them.
    pub async fn attempts(&self, id: &DeliveryId) -> Result<Vec<AttemptRecord>, StoreError> {
        let key = self.keys.delivery(id);
        let (listed, hash): (Vec<String>, HashMap<String, String>) = redis::pipe()
            .lrange(self.keys.legacy_attempts(id), 0, -1)
            .hgetall(&key)
            .query_async(&mut self.conn())
            .await?;
        let mut logged: Vec<(u32, &str)> = hash
            .iter()
            .filter_map(|(name, value)| {
                let n = name.strip_prefix(field::ATTEMPT_PREFIX)?.parse().ok()?;
                Some((n, value.as_str()))
            })
            .collect();
        logged.sort_unstable_by_key(|(n, _)| *n);
        listed
            .iter()
            .map(String::as_str)
            .chain(logged.into_iter().map(|(_, text)| text))
            .map(|text| {
                AttemptRecord::from_stored(text).ok_or_else(|| StoreError::corrupt(&key, "unreadable attempt record"))
            })
            .collect()
    }
}
