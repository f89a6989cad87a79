//! A delivery's life in Redis: begun when its event is first seen, taken when a retry job
//! comes due, recorded after each attempt. Each step is one atomic script.
//!
//! While an attempt is in flight its delivery holds a *lease*: a token in the state hash and
//! an entry in the retry set due when the attempt must be over. If the dispatcher dies, the
//! entry comes due and the scheduler re-queues the delivery; if it lives, its record replaces
//! the entry. Only the holder of the current token may change the state, so a late record from
//! an expired lease can add its attempt to the log but cannot undo a newer outcome.

use super::endpoints::parse_endpoint;
use super::{Store, StoreError};
use crate::delivery::{AttemptRecord, DeliveryState, DeliveryStatus, RetryJob};
use crate::endpoint::Endpoint;
use crate::envelope::Envelope;
use crate::ids::{DeliveryId, EndpointId};
use redis::{AsyncCommands, Script};
use std::collections::HashMap;
use std::sync::LazyLock;

/// Stores the event (first copy wins) when anyone subscribes, and returns the stored body and
/// the subscribed endpoints' records.
static INGEST: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local ids = redis.call('SUNION', KEYS[2], KEYS[3])
if #ids == 0 then return {} end
redis.call('SET', KEYS[4], ARGV[1], 'NX', 'EX', ARGV[2])
local out = {redis.call('GET', KEYS[4])}
local eps = redis.call('HMGET', KEYS[1], unpack(ids))
for i = 1, #eps do out[#out + 1] = eps[i] end
return out
",
    )
});

/// Creates each delivery that does not exist yet; returns 1 for created, 0 for already known.
static BEGIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local now, ttl, keep = ARGV[1], ARGV[2], tonumber(ARGV[3])
local out = {}
for i = 0, #KEYS / 3 - 1 do
  local dk, due, idx = KEYS[i * 3 + 1], KEYS[i * 3 + 2], KEYS[i * 3 + 3]
  local a = 4 + i * 9
  if redis.call('EXISTS', dk) == 1 then
    out[#out + 1] = 0
  else
    redis.call('HSET', dk, 'event', ARGV[a + 2], 'endpoint', ARGV[a + 3], 'account', ARGV[a + 4],
      'type', ARGV[a + 5], 'status', ARGV[a + 6], 'attempts', 0, 'created', now)
    if ARGV[a + 8] ~= '' then redis.call('HSET', dk, 'lease', ARGV[a + 8]) end
    if ARGV[a + 6] == 'retrying' then redis.call('HSET', dk, 'next_attempt', ARGV[a + 7]) end
    redis.call('EXPIRE', dk, ttl)
    redis.call('ZADD', due, ARGV[a + 7], ARGV[a])
    redis.call('ZADD', idx, now, ARGV[a + 1])
    redis.call('ZREMRANGEBYRANK', idx, 0, -keep - 1)
    redis.call('EXPIRE', idx, ttl)
    out[#out + 1] = 1
  end
end
return out
",
    )
});

/// Takes a retry job if it is still the delivery's current one: the delivery is unfinished and
/// not queued again (a duplicate job finds the lease of the first taker in the retry set).
static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'gone'} end
if st ~= 'pending' and st ~= 'retrying' then return {st} end
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then return {'queued'} end
redis.call('HSET', KEYS[1], 'status', 'pending', 'lease', ARGV[3])
redis.call('HDEL', KEYS[1], 'next_attempt')
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return {'go', redis.call('HGET', KEYS[1], 'attempts') or '0',
  redis.call('HGET', KEYS[1], 'first_attempt') or '',
  redis.call('GET', KEYS[3]) or '', redis.call('HGET', KEYS[4], ARGV[4]) or '',
  redis.call('HGET', KEYS[1], 'type') or ''}
",
    )
});

/// Appends the attempt (if any) and, when the lease is still ours, moves the state on.
static RECORD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if ARGV[2] ~= '' then
  redis.call('RPUSH', KEYS[2], ARGV[2])
  redis.call('LTRIM', KEYS[2], -100, -1)
  redis.call('EXPIRE', KEYS[2], ARGV[9])
end
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'attempts', ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'first_attempt', ARGV[5]) end
if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'reason', ARGV[7]) end
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[1], 'next_attempt', ARGV[6])
  redis.call('ZADD', KEYS[3], ARGV[6], ARGV[8])
else
  redis.call('HDEL', KEYS[1], 'next_attempt')
  redis.call('ZREM', KEYS[3], ARGV[8])
end
redis.call('HDEL', KEYS[1], 'lease')
redis.call('EXPIRE', KEYS[1], ARGV[9])
return 1
",
    )
});

/// What the store knows of an event's fan-out.
#[derive(Debug)]
pub struct Ingested {
    /// The body to deliver: the first stored copy, so a redelivered message keeps its timestamp.
    pub body: Vec<u8>,
    /// Enabled endpoints subscribed to the event's type.
    pub endpoints: Vec<Endpoint>,
}

/// A delivery to create: attempted now under `lease`, or deferred to `due_ms` without one.
#[derive(Debug)]
pub struct Begin {
    pub job: RetryJob,
    pub event_type: String,
    pub due_ms: i64,
    /// `Some` to attempt now (status pending); `None` to defer (status retrying).
    pub lease: Option<String>,
}

/// The answer to taking a retry job.
#[derive(Debug)]
pub enum Taken {
    /// The job is current; the lease is ours.
    Go {
        event_type: String,
        attempts: u32,
        first_attempt_ms: Option<i64>,
        /// `None` when the event expired from the store.
        body: Option<Vec<u8>>,
        /// `None` when the endpoint was deleted.
        endpoint: Option<Box<Endpoint>>,
    },
    /// The job is stale (delivery finished, queued again, or gone); drop it.
    Stale(String),
}

/// The state change after an attempt or a deferral, applied only under the current lease.
#[derive(Debug)]
pub struct Record<'a> {
    pub job: &'a RetryJob,
    pub lease: &'a str,
    /// `None` for a deferral, which is not an attempt.
    pub attempt: Option<&'a AttemptRecord>,
    pub status: DeliveryStatus,
    pub attempts: u32,
    pub first_attempt_ms: Option<i64>,
    /// When the delivery is retrying: the due time of the next attempt.
    pub next_attempt_ms: Option<i64>,
    pub reason: Option<&'a str>,
}

/// How many deliveries each endpoint's listing keeps; older ones age out with retention.
const DELIVERIES_PER_ENDPOINT: u32 = 10_000;

impl Store {
    /// One round trip: the subscribed endpoints and, if any, the stored event body.
    pub async fn ingest(&self, envelope: &Envelope, body: &[u8]) -> Result<Ingested, StoreError> {
        let acct = &envelope.account_id;
        let eps_key = self.keys.account_endpoints(acct);
        let reply: Vec<Option<Vec<u8>>> = INGEST
            .key(&eps_key)
            .key(self.keys.type_index(acct, &envelope.event_type))
            .key(self.keys.all_types_index(acct))
            .key(self.keys.event(&envelope.id))
            .arg(body)
            .arg(self.retention_secs())
            .invoke_async(&mut self.conn())
            .await?;
        let mut reply = reply.into_iter();
        let Some(stored) = reply.next() else {
            return Ok(Ingested {
                body: body.to_vec(),
                endpoints: Vec::new(),
            });
        };
        let mut endpoints = Vec::new();
        // A missing record is an index entry racing a delete: skip it.
        for json in reply.flatten() {
            let ep = parse_endpoint(&eps_key, &String::from_utf8_lossy(&json))?;
            if ep.enabled && ep.subscribes_to(&envelope.event_type) {
                endpoints.push(ep);
            }
        }
        Ok(Ingested {
            body: stored.unwrap_or_else(|| body.to_vec()),
            endpoints,
        })
    }

    /// Creates the deliveries that are new; `true` at each index that was created.
    pub async fn begin(&self, begins: &[Begin], now_ms: i64) -> Result<Vec<bool>, StoreError> {
        if begins.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = BEGIN.prepare_invoke();
        inv.arg(now_ms).arg(self.retention_secs()).arg(DELIVERIES_PER_ENDPOINT);
        for b in begins {
            let job = &b.job;
            inv.key(self.keys.delivery(&job.delivery))
                .key(self.keys.retry_due(self.keys.shard_of(&job.delivery)))
                .key(self.keys.endpoint_deliveries(&job.endpoint));
            let status = if b.lease.is_some() {
                DeliveryStatus::Pending
            } else {
                DeliveryStatus::Retrying
            };
            inv.arg(job.encode())
                .arg(job.delivery.as_str())
                .arg(job.event.as_str())
                .arg(job.endpoint.as_str())
                .arg(job.account.as_str())
                .arg(&b.event_type)
                .arg(status.as_str())
                .arg(b.due_ms)
                .arg(b.lease.as_deref().unwrap_or(""));
        }
        let created: Vec<i64> = inv.invoke_async(&mut self.conn()).await?;
        Ok(created.into_iter().map(|c| c == 1).collect())
    }

    /// Takes a retry job under a new lease lasting until `lease_until_ms`.
    pub async fn take(&self, job: &RetryJob, lease: &str, lease_until_ms: i64) -> Result<Taken, StoreError> {
        let eps_key = self.keys.account_endpoints(&job.account);
        let reply: Vec<Vec<u8>> = TAKE
            .key(self.keys.delivery(&job.delivery))
            .key(self.keys.retry_due(self.keys.shard_of(&job.delivery)))
            .key(self.keys.event(&job.event))
            .key(&eps_key)
            .arg(job.encode())
            .arg(lease_until_ms)
            .arg(lease)
            .arg(job.endpoint.as_str())
            .invoke_async(&mut self.conn())
            .await?;
        let text = |i: usize| {
            reply
                .get(i)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        if text(0) != "go" {
            return Ok(Taken::Stale(text(0)));
        }
        let non_empty = |i: usize| reply.get(i).filter(|v| !v.is_empty()).cloned();
        let endpoint = non_empty(4)
            .map(|json| parse_endpoint(&eps_key, &String::from_utf8_lossy(&json)).map(Box::new))
            .transpose()?;
        Ok(Taken::Go {
            event_type: text(5),
            attempts: text(1).parse().unwrap_or(0),
            first_attempt_ms: text(2).parse().ok(),
            body: non_empty(3),
            endpoint,
        })
    }

    /// Applies a record; `false` when the lease had expired and another taker owns the delivery.
    pub async fn record(&self, r: &Record<'_>) -> Result<bool, StoreError> {
        let job = r.job;
        let attempt_json = r
            .attempt
            .map(|a| serde_json::to_string(a).expect("attempts serialize"))
            .unwrap_or_default();
        let opt = |v: Option<i64>| v.map(|n| n.to_string()).unwrap_or_default();
        let applied: i64 = RECORD
            .key(self.keys.delivery(&job.delivery))
            .key(self.keys.attempts(&job.delivery))
            .key(self.keys.retry_due(self.keys.shard_of(&job.delivery)))
            .arg(r.lease)
            .arg(attempt_json)
            .arg(r.status.as_str())
            .arg(r.attempts)
            .arg(opt(r.first_attempt_ms))
            .arg(opt(r.next_attempt_ms))
            .arg(r.reason.unwrap_or(""))
            .arg(job.encode())
            .arg(self.retention_secs())
            .invoke_async(&mut self.conn())
            .await?;
        Ok(applied == 1)
    }

    pub async fn delivery(&self, id: &DeliveryId) -> Result<Option<DeliveryState>, StoreError> {
        let h: HashMap<String, String> = self.conn().hgetall(self.keys.delivery(id)).await?;
        if h.is_empty() {
            return Ok(None);
        }
        DeliveryState::from_hash(id.clone(), &h)
            .map(Some)
            .ok_or_else(|| StoreError::Corrupt {
                key: self.keys.delivery(id),
                problem: "missing or invalid fields".into(),
            })
    }

    /// Every recorded attempt, oldest first.
    pub async fn attempts(&self, id: &DeliveryId) -> Result<Vec<AttemptRecord>, StoreError> {
        let key = self.keys.attempts(id);
        let raw: Vec<String> = self.conn().lrange(&key, 0, -1).await?;
        raw.iter()
            .map(|j| {
                serde_json::from_str(j).map_err(|e| StoreError::Corrupt {
                    key: key.clone(),
                    problem: e.to_string(),
                })
            })
            .collect()
    }

    /// An endpoint's most recent deliveries, newest first.
    pub async fn endpoint_deliveries(
        &self,
        endpoint: &EndpointId,
        limit: usize,
    ) -> Result<Vec<DeliveryId>, StoreError> {
        let ids: Vec<String> = self
            .conn()
            .zrevrange(self.keys.endpoint_deliveries(endpoint), 0, limit as isize - 1)
            .await?;
        Ok(ids.into_iter().filter_map(|i| DeliveryId::parse(i).ok()).collect())
    }
}
