//! Accounts, their API keys, and idempotency records for publishing over HTTP.
//!
//! An API key is shown once and stored only as its SHA-256: a lookup by hash needs no
//! comparison of secrets at all, so there is nothing to time.

use super::{Store, StoreError};
use crate::clock;
use crate::ids::AccountId;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::time::Duration;

/// The prefix of every account API key.
pub const API_KEY_PREFIX: &str = "lbk_";
/// How many characters of a key identify it in listings (the prefix included).
const SHOWN_CHARS: usize = 12;
/// The field of the account's hash holding its own bound on endpoints (read by the script that
/// creates an endpoint, too).
pub(super) const MAX_ENDPOINTS_FIELD: &str = "max_endpoints";

/// An account as shown to operators.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Account {
    #[schema(value_type = String)]
    pub id: AccountId,
    pub name: String,
    pub created_at: String,
    /// Endpoints this account may have, when the operator gave it a bound of its own; otherwise
    /// the API's `LAABAM_MAX_ENDPOINTS_PER_ACCOUNT` applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_endpoints: Option<u32>,
}

/// An API key as listed: never the key itself.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApiKeyInfo {
    /// The first characters of the key, enough to recognise it.
    pub prefix: String,
    pub created_at: String,
    #[serde(skip)]
    hash: String,
}

/// Where an idempotent request stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Idempotency {
    /// First time: go ahead, then [`Store::idempotency_finish`] or [`Store::idempotency_abort`].
    New,
    /// The same key is being processed right now.
    InProgress,
    /// Already done: the stored response.
    Done(String),
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

const IN_PROGRESS: &str = "\u{0}in-progress";

impl Store {
    /// A new account, with a bound of its own on its endpoints if `max_endpoints` is given;
    /// written at once, so it never exists without its bound.
    pub async fn create_account(
        &self,
        name: &str,
        max_endpoints: Option<u32>,
        now_ms: i64,
    ) -> Result<Account, StoreError> {
        let account = Account {
            id: AccountId::generate(),
            name: name.to_owned(),
            created_at: clock::format_rfc3339_ms(now_ms),
            max_endpoints,
        };
        let mut pipe = self.account_writes(&account.id, name, now_ms);
        if let Some(most) = max_endpoints {
            pipe.hset(self.keys.account_info(&account.id), MAX_ENDPOINTS_FIELD, most);
        }
        pipe.query_async::<()>(&mut self.conn()).await?;
        Ok(account)
    }

    /// One transaction that lists the account, and names and dates it unless it already is.
    fn account_writes(&self, id: &AccountId, name: &str, now_ms: i64) -> redis::Pipeline {
        let key = self.keys.account_info(id);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .sadd(self.keys.accounts(), id.as_str())
            .hset_nx(&key, "name", name)
            .hset_nx(&key, "created_at", clock::format_rfc3339_ms(now_ms));
        pipe
    }

    /// Gives the account a bound of its own on its endpoints (`None`: the API's default again).
    /// Endpoints it already has past a lower bound stay; it adds none until under it.
    pub async fn set_max_endpoints(&self, id: &AccountId, most: Option<u32>) -> Result<(), StoreError> {
        let key = self.keys.account_info(id);
        match most {
            Some(most) => self.conn().hset::<_, _, _, ()>(key, MAX_ENDPOINTS_FIELD, most).await?,
            None => self.conn().hdel::<_, _, ()>(key, MAX_ENDPOINTS_FIELD).await?,
        }
        Ok(())
    }

    /// Creates the account if it does not exist (operators' CLI: first use creates it).
    pub async fn ensure_account(&self, id: &AccountId, name: &str, now_ms: i64) -> Result<(), StoreError> {
        self.account_writes(id, name, now_ms)
            .query_async::<()>(&mut self.conn())
            .await?;
        Ok(())
    }

    pub async fn get_account(&self, id: &AccountId) -> Result<Option<Account>, StoreError> {
        let h: HashMap<String, String> = self.conn().hgetall(self.keys.account_info(id)).await?;
        Ok((!h.is_empty()).then(|| Account {
            id: id.clone(),
            name: h.get("name").cloned().unwrap_or_default(),
            created_at: h.get("created_at").cloned().unwrap_or_default(),
            max_endpoints: h.get(MAX_ENDPOINTS_FIELD).and_then(|v| v.parse().ok()),
        }))
    }

    /// Issues a key; the plaintext is returned this once and never stored.
    pub async fn create_api_key(&self, account: &AccountId, now_ms: i64) -> Result<(String, ApiKeyInfo), StoreError> {
        let mut bytes = [0u8; 24];
        rand::rng().fill_bytes(&mut bytes);
        let key = format!("{API_KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes));
        let info = ApiKeyInfo {
            prefix: key[..SHOWN_CHARS].to_owned(),
            created_at: clock::format_rfc3339_ms(now_ms),
            hash: sha256_hex(&key),
        };
        let record = serde_json::json!({ "prefix": info.prefix, "created_at": info.created_at, "hash": info.hash });
        redis::pipe()
            .atomic()
            .set(self.keys.api_key(&info.hash), account.as_str())
            .hset(self.keys.account_keys(account), &info.prefix, record.to_string())
            .query_async::<()>(&mut self.conn())
            .await?;
        Ok((key, info))
    }

    /// The account a key belongs to, if the key is valid.
    pub async fn authenticate(&self, key: &str) -> Result<Option<AccountId>, StoreError> {
        let Some(entry) = self.api_key_entry(key) else {
            return Ok(None);
        };
        let account: Option<String> = self.conn().get(entry).await?;
        Ok(account.and_then(|a| AccountId::parse(a).ok()))
    }

    /// Where `key`'s account is kept; `None` for what cannot be an API key.
    pub(super) fn api_key_entry(&self, key: &str) -> Option<String> {
        (key.starts_with(API_KEY_PREFIX) && key.len() <= 100).then(|| self.keys.api_key(&sha256_hex(key)))
    }

    pub async fn list_api_keys(&self, account: &AccountId) -> Result<Vec<ApiKeyInfo>, StoreError> {
        let raw: Vec<String> = self.conn().hvals(self.keys.account_keys(account)).await?;
        let mut keys: Vec<ApiKeyInfo> = raw
            .iter()
            .filter_map(|j| {
                let v: serde_json::Value = serde_json::from_str(j).ok()?;
                Some(ApiKeyInfo {
                    prefix: v["prefix"].as_str()?.to_owned(),
                    created_at: v["created_at"].as_str()?.to_owned(),
                    hash: v["hash"].as_str()?.to_owned(),
                })
            })
            .collect();
        keys.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        Ok(keys)
    }

    /// Revokes the key shown as `prefix`; `false` when the account has no such key.
    pub async fn revoke_api_key(&self, account: &AccountId, prefix: &str) -> Result<bool, StoreError> {
        let Some(info) = self
            .list_api_keys(account)
            .await?
            .into_iter()
            .find(|k| k.prefix == prefix)
        else {
            return Ok(false);
        };
        redis::pipe()
            .atomic()
            .del(self.keys.api_key(&info.hash))
            .hdel(self.keys.account_keys(account), prefix)
            .query_async::<()>(&mut self.conn())
            .await?;
        Ok(true)
    }

    /// Claims an idempotency key for `ttl`, or reports what happened to it.
    pub async fn idempotency_begin(
        &self,
        account: &AccountId,
        key: &str,
        ttl: Duration,
    ) -> Result<Idempotency, StoreError> {
        let redis_key = self.keys.idempotency(account, &sha256_hex(key));
        let claimed: bool = redis::cmd("SET")
            .arg(&redis_key)
            .arg(IN_PROGRESS)
            .arg("NX")
            .arg("EX")
            .arg(ttl.as_secs().max(1))
            .query_async::<Option<String>>(&mut self.conn())
            .await?
            .is_some();
        if claimed {
            return Ok(Idempotency::New);
        }
        let existing: Option<String> = self.conn().get(&redis_key).await?;
        Ok(match existing {
            Some(v) if v == IN_PROGRESS => Idempotency::InProgress,
            Some(v) => Idempotency::Done(v),
            None => Idempotency::InProgress,
        })
    }

    pub async fn idempotency_finish(
        &self,
        account: &AccountId,
        key: &str,
        response: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let redis_key = self.keys.idempotency(account, &sha256_hex(key));
        self.conn()
            .set_ex::<_, _, ()>(redis_key, response, ttl.as_secs().max(1))
            .await?;
        Ok(())
    }

    /// Releases a key whose request failed, so that a retry may succeed.
    pub async fn idempotency_abort(&self, account: &AccountId, key: &str) -> Result<(), StoreError> {
        self.conn()
            .del::<_, ()>(self.keys.idempotency(account, &sha256_hex(key)))
            .await?;
        Ok(())
    }
}
