//! A delivery's life in Redis: begun when its event is first seen, taken when a retry job
//! comes due, recorded after each attempt. Each step is one atomic script.
//!
//! While an attempt is in flight its delivery holds a *lease*: a token in the state hash and
//! an entry in the retry set due when the attempt must be over. If the dispatcher dies, the
//! entry comes due and the scheduler re-queues the delivery; if it lives, its record replaces
//! the entry. Only the holder of the current token may change the state, so a late record from
//! an expired lease can add its attempt to the log but cannot undo a newer outcome.

use super::batch_writer::Prepared;
use super::script_call::ScriptCall;
use super::stats;
use super::{Keys, Store, StoreError};
use crate::delivery::{AttemptRecord, DeliveryState, DeliveryStatus, RetryJob, field};
use crate::endpoint::Endpoint;
use crate::envelope::Envelope;
use crate::ids::{AccountId, DeliveryId, EndpointId, EventId};
use redis::{AsyncCommands, Script};
use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

/// Lua: keeps an endpoint's history (sorted set `idx`) to its newest `keep` entries by deleting
/// the oldest *finished* deliveries; unfinished ones stay listed until they finish. Run when a
/// delivery finishes. It lets the history grow by `keep / 64` before trimming, so a busy
/// endpoint pays for one scan and two deletes per 150 deliveries instead of per delivery. A scan
/// looks at no more than that batch (plus ten). When the oldest entries are unfinished (a
/// backlog waiting on a slow or failing endpoint), a scan finds too few to delete, and the point
/// at which to look again, once the history has grown by another batch, goes into the
/// endpoint's health hash (`trim_at`, cleared by the next scan that finds a full batch):
/// otherwise every finish would look at the same unfinished entries again, which made a record
/// cost seven times as much (140 µs of Redis instead of 18, `laabam-bench redis-calls`). The
/// price: a backlog that finishes while nothing new arrives stays listed past the bound until
/// another batch arrives (or its retention ends), and then goes a window per finish.
const TRIM_HISTORY: &str = r"
local function trim_history(idx, keep, prefix, health)
  local slack = math.floor(keep / 64)
  local count = redis.call('ZCARD', idx)
  if count <= keep + slack then return end
  local trim_at = tonumber(redis.call('HGET', health, 'trim_at'))
  if trim_at and count < trim_at then return end
  local excess = count - keep
  local batch = math.min(excess, slack + 1)
  local keys, members = {}, {}
  for _, old in ipairs(redis.call('ZRANGE', idx, 0, batch + 9)) do
    local old_key = prefix .. 'dlv:' .. old
    local st = redis.call('HGET', old_key, 'status')
    if st ~= 'pending' and st ~= 'retrying' then
      keys[#keys + 1] = old_key
      members[#members + 1] = old
      if #members == excess then break end
    end
  end
  if #members > 0 then
    redis.call('DEL', unpack(keys))
    redis.call('ZREM', idx, unpack(members))
  end
  if #members < batch then
    redis.call('HSET', health, 'trim_at', count - #members + slack)
  elseif trim_at then
    redis.call('HDEL', health, 'trim_at')
  end
end
";

/// Events' arrivals, each as if alone (see `batch_writer` for how they share a call): if the
/// account's endpoints are still at the version the dispatcher cached, stores the event (first
/// copy wins) and creates each of its deliveries that does not exist yet, under a lease or
/// deferred. Answers per event {'stale'} when the endpoints changed (nothing written for it),
/// else {'ok', stored body or '' when this copy was stored, then '1' created / '0' already
/// known per delivery}. When this copy is the first, none of its deliveries can exist (they are
/// only ever created here, with the event, and a redelivery extends both), so only a repeated
/// copy pays for the `HSETNX` that tells known from new. The account's indexes and each
/// endpoint's history are trimmed and their lifetimes renewed only when a flag asks for it (see
/// `upkeep`). Their entries are added together after the call's last event, one `ZADD` per key:
/// `laabam-bench redis-calls` measured 1.0 µs less Redis CPU per delivery with one endpoint per
/// event (median of three pairs, 20.2 → 19.2 µs) and 1.3 µs less with ten (12.7 → 11.4 µs).
/// KEYS per event: endpoints version, event, account's events, account's deliveries, then three
/// per delivery (state, retry shard, endpoint history). ARGV: the store's three
/// (`arrival_call_args`) once per call, then per event its number of deliveries, six values and
/// ten per delivery, in the order `Store::ingest` gives them.
pub(super) static INGEST: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local ttl, events_kept, keep = ARGV[1], ARGV[2], tonumber(ARGV[3])
-- Index entries are gathered across the call and added with one ZADD per key after every
-- event, then the upkeep the events asked for, in their order: a call's events mostly share
-- their account's two indexes, and a command per entry cost more than the entries.
local index_keys, entries, upkeeps = {}, {}, {}
local function index(key, score, member)
  local list = entries[key]
  if not list then
    list = {}
    entries[key] = list
    index_keys[#index_keys + 1] = key
  end
  list[#list + 1] = score
  list[#list + 1] = member
end
local function upkeep(key, keep_newest)
  upkeeps[#upkeeps + 1] = {key, keep_newest}
end
-- The event whose keys follow KEYS[k] and whose arguments follow its count of deliveries at ARGV[c].
local function arrive(k, c, deliveries)
  if (redis.call('GET', KEYS[k + 1]) or '0') ~= ARGV[c + 1] then return {'stale'} end
  local now = ARGV[c + 3]
  local out = {'ok', ''}
  local first = redis.call('SET', KEYS[k + 2], ARGV[c + 2], 'NX', 'EX', ttl)
  if first then
    index(KEYS[k + 3], now, ARGV[c + 4])
  else
    out[2] = redis.call('GET', KEYS[k + 2])
  end
  if ARGV[c + 5] == '1' then upkeep(KEYS[k + 3], tonumber(events_kept)) end
  for i = 0, deliveries - 1 do
    local dk, due, idx = KEYS[k + 5 + i * 3], KEYS[k + 6 + i * 3], KEYS[k + 7 + i * 3]
    local a = c + 7 + i * 10
    if not first and redis.call('HSETNX', dk, 'event', ARGV[a + 2]) == 0 then
      out[#out + 1] = '0'
    else
      -- Under a lease (pending), or deferred (retrying) until its next attempt; no table built.
      local last, value = 'lease', ARGV[a + 8]
      if value == '' then last, value = 'next_attempt', ARGV[a + 7] end
      redis.call('HSET', dk, 'event', ARGV[a + 2], 'endpoint', ARGV[a + 3], 'account', ARGV[a + 4],
        'type', ARGV[a + 5], 'status', ARGV[a + 6], 'attempts', '0', 'cycle_start', '0', 'created', now,
        last, value)
      redis.call('EXPIRE', dk, ttl)
      redis.call('ZADD', due, ARGV[a + 7], ARGV[a])
      index(idx, now, ARGV[a + 1])
      index(KEYS[k + 4], now, ARGV[a + 1])
      out[#out + 1] = '1'
    end
    if ARGV[a + 9] == '1' then upkeep(idx, nil) end
  end
  if ARGV[c + 6] == '1' then upkeep(KEYS[k + 4], keep * 10) end
  return out
end
local out, k, c = {}, 0, 4
while c <= #ARGV do
  local deliveries = tonumber(ARGV[c])
  out[#out + 1] = arrive(k, c, deliveries)
  k = k + 4 + deliveries * 3
  c = c + 7 + deliveries * 10
end
-- In slices: Lua's unpack takes at most about 8,000 values, and one event of thousands of
-- endpoints gives its account's index two per delivery.
for _, key in ipairs(index_keys) do
  local list = entries[key]
  for from = 1, #list, 1000 do
    redis.call('ZADD', key, unpack(list, from, math.min(from + 999, #list)))
  end
end
for _, u in ipairs(upkeeps) do
  if u[2] then redis.call('ZREMRANGEBYRANK', u[1], 0, -u[2] - 1) end
  redis.call('EXPIRE', u[1], ttl)
end
return out
",
    )
});

/// The arrival script's arguments that are the same for every event of a store: the retention,
/// the events kept per account and the history kept per endpoint. They go once per call.
pub(super) fn arrival_call_args(retention_secs: u64, history_per_endpoint: u32) -> redis::Cmd {
    let mut args = redis::Cmd::new();
    args.arg(retention_secs)
        .arg(EVENTS_PER_ACCOUNT)
        .arg(history_per_endpoint);
    args
}

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
  redis.call('HGET', KEYS[1], 'type') or '', redis.call('HGET', KEYS[1], 'cycle_start') or '0'}
",
    )
});

/// Records a batch of attempts' outcomes (see `batch_writer`), each in turn as if alone: logs
/// the attempt (if any) with its statistics and the endpoint's health, and, when the lease is
/// still ours, moves the state on. Returns {applied, failing_since} per record.
/// The attempt joins the state hash as field `att:<n>`, numbered in the order logged, so a
/// delivery is one key and its record one write; a late record from an expired lease still
/// gets its own entry. The newest 100 are kept.
/// What records of one endpoint share is written once per call, after them all: the
/// statistics' counts summed per field, and the health's fields as the last record left them (a
/// failure reads `failing_since` from what the call gathered before asking Redis). Only the
/// script's end state is ever seen, so this is what the records one at a time would leave. It
/// pays where one endpoint is busy: with calls full of one endpoint's records, Redis's CPU per
/// record fell by about a fifth (`laabam-bench redis-calls`, one endpoint per event); with ten
/// endpoints sharing a call it did not measurably change.
/// KEYS, six per record: state, retry shard, endpoint health, 5-minute stats, hourly stats, the
/// endpoint's history. ARGV: the store's four (`record_call_args`) once per call, then thirteen
/// per record, in the order `Store::record` gives them.
pub(super) static RECORD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{TRIM_HISTORY}
-- Gathered across the call's records in flat tables, so gathering allocates little in Lua:
-- counts per (bucket, field); per health key the last record's arguments, its latest success
-- and its failing_since.
local ttl_5m, ttl_1h, keep, prefix = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local counted, count_key, count_field, count_ttl, count_n = {{}}, {{}}, {{}}, {{}}, {{}}
local health_keys, last_of, success_of, failing_of = {{}}, {{}}, {{}}, {{}}
local function count(key, field, ttl)
  local id = key .. '\n' .. field
  local i = counted[id]
  if i then
    count_n[i] = count_n[i] + 1
  else
    i = #count_key + 1
    counted[id], count_key[i], count_field[i], count_ttl[i], count_n[i] = i, key, field, ttl, 1
  end
end
local function record(k, a)
  local state, due, health, idx = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 6]
  local lease, attempt, status, attempts, first, next_at, reason, job, outcome, latency, at,
    delivery, code = unpack(ARGV, a + 1, a + 13)
  local failing = ''
  local held = redis.call('HMGET', state, 'lease', 'logged')
  -- A released lease is stored empty, so an empty token never holds it.
  local ours = lease ~= '' and held[1] == lease
  local n
  if attempt ~= '' then
    n = tonumber(held[2] or 0) + 1
    if n > 100 then redis.call('HDEL', state, 'att:' .. (n - 100)) end
    count(KEYS[k + 4], outcome .. '|' .. latency, ttl_5m)
    count(KEYS[k + 5], outcome .. '|' .. latency, ttl_1h)
    -- The endpoint's health as this record leaves it; an empty failing_since means not failing.
    if not last_of[health] then health_keys[#health_keys + 1] = health end
    last_of[health] = a
    if outcome == 'success' then
      success_of[health], failing_of[health] = at, ''
    else
      failing = failing_of[health] or redis.call('HGET', health, 'failing_since') or ''
      if failing == '' then failing = at end
      failing_of[health] = failing
    end
  end
  if not ours then
    -- Only the attempt, and only into a delivery that still exists (a write would recreate an
    -- expired one without a lifetime).
    if n and redis.call('EXISTS', state) == 1 then
      redis.call('HSET', state, 'att:' .. n, attempt, 'logged', n)
    end
    return {{0, failing}}
  end
  -- The state keeps the lifetime it got when the delivery began (retention from creation).
  -- One write: the attempt, the lease released and an absent next attempt cleared by empty
  -- values (read back as none), which costs less than a separate HDEL.
  local set = {{'status', status, 'attempts', attempts, 'lease', '', 'next_attempt', next_at}}
  if n then
    set[#set + 1] = 'att:' .. n; set[#set + 1] = attempt
    set[#set + 1] = 'logged'; set[#set + 1] = n
  end
  if first ~= '' then set[#set + 1] = 'first_attempt'; set[#set + 1] = first end
  if reason ~= '' then set[#set + 1] = 'reason'; set[#set + 1] = reason end
  if next_at ~= '' then
    redis.call('ZADD', due, next_at, job)
  else
    redis.call('ZREM', due, job)
  end
  redis.call('HSET', state, unpack(set))
  if status == 'succeeded' or status == 'failed' then trim_history(idx, keep, prefix, health) end
  return {{1, failing}}
end
local out = {{}}
for r = 0, #KEYS / 6 - 1 do out[r + 1] = record(r * 6, 4 + r * 13) end
for i, key in ipairs(count_key) do
  -- A bucket's first count of a field sets its lifetime; later ones need not.
  if redis.call('HINCRBY', key, count_field[i], count_n[i]) == count_n[i] then
    redis.call('EXPIRE', key, count_ttl[i])
  end
end
for _, health in ipairs(health_keys) do
  local a = last_of[health]
  local set = {{'last_at', ARGV[a + 11], 'last_outcome', ARGV[a + 9], 'last_status', ARGV[a + 13],
    'last_delivery', ARGV[a + 12], 'failing_since', failing_of[health]}}
  if success_of[health] then set[#set + 1] = 'last_success'; set[#set + 1] = success_of[health] end
  redis.call('HSET', health, unpack(set))
end
return out
"
    ))
});

/// The record script's arguments that are the same for every record of a store: the statistics
/// buckets' lifetimes, the history kept per endpoint and the key prefix. They go once per call.
pub(super) fn record_call_args(keys: &Keys, history_per_endpoint: u32) -> redis::Cmd {
    let mut args = redis::Cmd::new();
    args.arg(stats::FIVE_MINUTE_TTL_SECS)
        .arg(stats::HOUR_TTL_SECS)
        .arg(history_per_endpoint)
        .arg(keys.prefix());
    args
}

/// An owner's redelivery: a finished delivery starts a new cycle of attempts now; a waiting one
/// is brought forward; one in flight is left alone. A new cycle extends the event's body with
/// the state (its attempt log included), so a redelivery near the end of retention still has
/// its payload when its retries come due; a delivery whose body already expired cannot be sent.
/// KEYS: state, retry shard, event.
static REDELIVER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'gone' end
if st == 'pending' then return 'in_flight' end
if redis.call('EXPIRE', KEYS[3], ARGV[3]) == 0 then return 'expired' end
if st ~= 'retrying' then
  redis.call('HSET', KEYS[1], 'status', 'retrying', 'cycle_start', redis.call('HGET', KEYS[1], 'attempts'))
  redis.call('HDEL', KEYS[1], 'first_attempt', 'reason')
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
redis.call('HSET', KEYS[1], 'next_attempt', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 'queued'
",
    )
});

/// The answer to an event's arrival.
#[derive(Debug)]
pub enum Ingest {
    /// The account's endpoints changed since the version given; nothing was written.
    Stale,
    Begun {
        /// The body to deliver: the first stored copy, so a redelivered message keeps its
        /// timestamp.
        body: Vec<u8>,
        /// Per delivery asked for: created now (`true`) or already known.
        created: Vec<bool>,
    },
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
        /// Attempts made before the current cycle began (an owner's redelivery starts one).
        cycle_start: u32,
        first_attempt_ms: Option<i64>,
        /// `None` when the event expired from the store.
        body: Option<Vec<u8>>,
        /// `None` when the endpoint was deleted.
        endpoint: Option<Arc<Endpoint>>,
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
    /// The attempt's outcome and timing, for the endpoint's statistics and health.
    pub timing: Option<AttemptTiming<'a>>,
}

/// What the statistics need of an attempt.
#[derive(Debug, Clone, Copy)]
pub struct AttemptTiming<'a> {
    pub outcome: &'a str,
    pub duration_ms: u64,
    pub status_code: Option<u16>,
    pub at_ms: i64,
}

/// The answer to recording: whether the lease was still ours, and since when the endpoint has
/// failed without a success in between.
#[derive(Debug, Clone, Copy)]
pub struct Recorded {
    pub applied: bool,
    pub failing_since_ms: Option<i64>,
}

/// The answer to an owner's redelivery request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redelivery {
    Queued,
    InFlight,
    /// The delivery is known but its event's body has outlived retention.
    EventExpired,
    NotFound,
}

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

/// How many events each account's listing keeps.
const EVENTS_PER_ACCOUNT: u32 = 10_000;

/// Room for one key when a script's keys are sized up front (a prefix and two ids fit); a
/// longer key only regrows the buffer once.
const KEY_BYTES: usize = 112;

fn corrupt(key: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key: key.to_owned(),
        problem: e.to_string(),
    }
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
    /// One round trip, shared with the arrivals waiting at the same moment: stores the event
    /// (first copy wins) and begins its deliveries, provided the account's endpoints are still at
    /// `endpoints_version` (the version `begins` were chosen from).
    pub async fn ingest(
        &self,
        envelope: &Envelope,
        body: &[u8],
        endpoints_version: u64,
        begins: &[Begin],
        now_ms: i64,
    ) -> Result<Ingest, StoreError> {
        let acct = &envelope.account_id;
        let events_index = self.keys.account_events(acct);
        let deliveries_index = self.keys.account_deliveries(acct);
        let histories: Vec<String> = begins
            .iter()
            .map(|b| self.keys.endpoint_deliveries(&b.job.endpoint))
            .collect();
        let flag = |key: &str| if self.upkeep.due(key) { "1" } else { "" };
        // Sized for the keys and arguments below, so that building them never regrows a buffer.
        let key_count = 4 + 3 * begins.len();
        let mut keys = redis::Cmd::with_capacity(key_count, KEY_BYTES * key_count);
        keys.arg(self.keys.endpoints_version(acct))
            .arg(self.keys.event(acct, &envelope.id))
            .arg(&events_index)
            .arg(&deliveries_index);
        for (b, history) in begins.iter().zip(&histories) {
            keys.arg(self.keys.delivery(&b.job.delivery))
                .arg(self.keys.retry_due(self.keys.shard_of(&b.job.delivery)))
                .arg(history);
        }
        let mut args = redis::Cmd::with_capacity(7 + 10 * begins.len(), body.len() + 64 + 400 * begins.len());
        args.arg(begins.len())
            .arg(endpoints_version)
            .arg(body)
            .arg(now_ms)
            .arg(envelope.id.as_str())
            .arg(flag(&events_index))
            .arg(flag(&deliveries_index));
        for (b, history) in begins.iter().zip(&histories) {
            let job = &b.job;
            let status = if b.lease.is_some() {
                DeliveryStatus::Pending
            } else {
                DeliveryStatus::Retrying
            };
            args.arg(job.encode())
                .arg(job.delivery.as_str())
                .arg(job.event.as_str())
                .arg(job.endpoint.as_str())
                .arg(job.account.as_str())
                .arg(&b.event_type)
                .arg(status.as_str())
                .arg(b.due_ms)
                .arg(b.lease.as_deref().unwrap_or(""))
                .arg(flag(history));
        }
        let reply = match self.arrivals.write(Prepared { keys, args }).await {
            Ok(reply) if reply.first().is_some_and(|s| s == b"ok") => reply,
            stale_or_failed => {
                // Nothing was written, or maybe not: the next write to these keys does their upkeep.
                for key in [&events_index, &deliveries_index].into_iter().chain(&histories) {
                    self.upkeep.forget(key);
                }
                stale_or_failed?;
                return Ok(Ingest::Stale);
            }
        };
        let mut reply = reply.into_iter().skip(1);
        let stored = reply.next().filter(|b| !b.is_empty());
        Ok(Ingest::Begun {
            body: stored.unwrap_or_else(|| body.to_vec()),
            created: reply.map(|c| c == b"1").collect(),
        })
    }

    /// Takes a retry job under a new lease lasting until `lease_until_ms`.
    pub async fn take(&self, job: &RetryJob, lease: &str, lease_until_ms: i64) -> Result<Taken, StoreError> {
        let eps_key = self.keys.account_endpoints(&job.account);
        let reply: Vec<Vec<u8>> = ScriptCall::new(&TAKE, 4)
            .key(self.keys.delivery(&job.delivery))
            .key(self.keys.retry_due(self.keys.shard_of(&job.delivery)))
            .key(self.keys.event(&job.account, &job.event))
            .key(&eps_key)
            .arg(job.encode())
            .arg(lease_until_ms)
            .arg(lease)
            .arg(job.endpoint.as_str())
            .invoke(&mut self.conn())
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
            .map(|json| {
                self.open_endpoint(&eps_key, &String::from_utf8_lossy(&json))
                    .map(Arc::new)
            })
            .transpose()?;
        Ok(Taken::Go {
            event_type: text(5),
            attempts: text(1).parse().unwrap_or(0),
            cycle_start: text(6).parse().unwrap_or(0),
            first_attempt_ms: text(2).parse().ok(),
            body: non_empty(3),
            endpoint,
        })
    }

    /// Applies a record under its lease, and counts its attempt in the endpoint's statistics;
    /// written together with the other records waiting at the time (see `batch_writer`).
    pub async fn record(&self, r: &Record<'_>) -> Result<Recorded, StoreError> {
        let job = r.job;
        let attempt = r.attempt.map(AttemptRecord::to_stored).unwrap_or_default();
        let opt = |v: Option<i64>| v.map(|n| n.to_string()).unwrap_or_default();
        let timing = r.timing;
        let at = timing.map_or(0, |t| t.at_ms);
        let reason = r.reason.unwrap_or("");
        let mut args = redis::Cmd::with_capacity(13, attempt.len() + reason.len() + 320);
        args.arg(r.lease)
            .arg(attempt)
            .arg(r.status.as_str())
            .arg(r.attempts)
            .arg(opt(r.first_attempt_ms))
            .arg(opt(r.next_attempt_ms))
            .arg(reason)
            .arg(job.encode())
            .arg(timing.map_or("", |t| t.outcome))
            .arg(timing.map(|t| stats::latency_index(t.duration_ms)).unwrap_or_default())
            .arg(at)
            .arg(job.delivery.as_str())
            .arg(
                timing
                    .and_then(|t| t.status_code)
                    .map(|c| c.to_string())
                    .unwrap_or_default(),
            );
        let mut keys = redis::Cmd::with_capacity(6, 6 * KEY_BYTES);
        keys.arg(self.keys.delivery(&job.delivery))
            .arg(self.keys.retry_due(self.keys.shard_of(&job.delivery)))
            .arg(self.keys.endpoint_health(&job.endpoint))
            .arg(
                self.keys
                    .endpoint_stats(&job.endpoint, "5m", at / stats::FIVE_MINUTES_MS),
            )
            .arg(self.keys.endpoint_stats(&job.endpoint, "1h", at / stats::HOUR_MS))
            .arg(self.keys.endpoint_deliveries(&job.endpoint));
        let (applied, failing) = self.records.write(Prepared { keys, args }).await?;
        Ok(Recorded {
            applied: applied == 1,
            failing_since_ms: failing.parse().ok(),
        })
    }

    /// Queues an owner's redelivery of one delivery, attempted as soon as a scheduler sees it.
    pub async fn redeliver(&self, state: &DeliveryState, now_ms: i64) -> Result<Redelivery, StoreError> {
        let job = RetryJob {
            delivery: state.id.clone(),
            event: state.event_id.clone(),
            endpoint: state.endpoint_id.clone(),
            account: state.account_id.clone(),
        };
        let answer: String = ScriptCall::new(&REDELIVER, 3)
            .key(self.keys.delivery(&state.id))
            .key(self.keys.retry_due(self.keys.shard_of(&state.id)))
            .key(self.keys.event(&state.account_id, &state.event_id))
            .arg(job.encode())
            .arg(now_ms)
            .arg(self.retention_secs())
            .invoke(&mut self.conn())
            .await?;
        Ok(match answer.as_str() {
            "queued" => Redelivery::Queued,
            "in_flight" => Redelivery::InFlight,
            "expired" => Redelivery::EventExpired,
            _ => Redelivery::NotFound,
        })
    }

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
            pipe.get(
                self.keys
                    .event(account, &EventId::parse(id.as_str()).map_err(|e| corrupt(&index, e))?),
            );
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
                .map(|(id, _)| DeliveryId::parse(id.as_str()).map_err(|e| corrupt(&index, e)))
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
            .ok_or_else(|| corrupt(&self.keys.delivery(id), "missing or invalid fields"))
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
            .map(|text| AttemptRecord::from_stored(text).ok_or_else(|| corrupt(&key, "unreadable attempt record")))
            .collect()
    }
}
