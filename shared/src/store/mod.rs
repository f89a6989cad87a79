//! The Redis store: endpoints, events, deliveries with their attempts, and the retry set.
//!
//! Every multi-key change is atomic: the hot ones, an event's storage with the start of all its
//! deliveries and each attempt's record, are optimistic transactions (`WATCH`, reads, then
//! `MULTI`/`EXEC`; see `arrivals` and `records`), which cost Redis about half what the Lua
//! scripts that did them before cost; the rest are Lua scripts (the `.lua` files in `lua/`).
//! Arrivals, and records, waiting at the same moment share one transaction (see
//! `batch_writer`). Key layout (all below `LAABAM_REDIS_PREFIX`):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `accounts` | set | account ids |
//! | `acct:{A}` | hash | account name and creation time |
//! | `acct:{A}:keys` | hash | API key prefix → prefix, creation time, SHA-256 |
//! | `apikey:{sha256}` | string | the account of an API key |
//! | `api:rate:{C}` | string | when API caller C's request bucket (a credential's or address's digest) is full again, in µs; lasts until then |
//! | `acct:{A}:evt` / `acct:{A}:dlv` | sorted set | the account's events / deliveries by time (bounded) |
//! | `idem:{A}:{sha256}` | string | the response to an idempotent publish (24 h) |
//! | `acct:{A}:eps` | hash | endpoint id → endpoint JSON |
//! | `acct:{A}:eps:ver` | string | a counter bumped by every endpoint change (dispatchers cache endpoints by it) |
//! | `ep:{E}` | string | the account owning endpoint E |
//! | `ep:{E}:dlv` | sorted set | E's deliveries by creation time (newest `LAABAM_HISTORY_PER_ENDPOINT`) |
//! | `ep:{E}:health` | hash | last delivery, last success, failing since (`failing_from`, absent while not failing) |
//! | `ep:{E}:inflight` | sorted set | E's requests in flight across dispatchers, by when each lease ends, for an E with `max_concurrency` while several dispatchers run |
//! | `ep:{E}:st:5m:{n}` / `ep:{E}:st:1h:{n}` | hash | attempts by outcome and latency bucket (2 h / 8 d) |
//! | `evt:{A}:{id}` | string | the event body as delivered (first copy wins) |
//! | `dlv:{D}` | hash | delivery state (see [`crate::delivery::field`]) and its attempt log, `att:1`, `att:2`, … (newest 100); a delivered one's values are all short, so Redis keeps it compact (listpack) |
//! | `dlv:{D}:att` | list | attempt records of deliveries begun before the log moved into `dlv:{D}`; expire with them |
//! | `retry:{n}:due` | sorted set | retry jobs and in-flight leases by due time |
//! | `retry:{n}:claimed` | sorted set | jobs a scheduler is publishing, by lease expiry |
//! | `retry:shard_counts` | sorted set | the `LAABAM_RETRY_SHARDS` values processes run with, by when each was last announced |
//! | `dispatchers` | sorted set | the dispatchers running, by when each last said so (every second, by Redis's clock; gone after 5 s), so each keeps to its share of every endpoint's rate limit, and holds places in `ep:{E}:inflight` while more than one runs |

mod accounts;
mod api_rates;
mod arrivals;
mod batch_writer;
mod deliveries;
mod dispatchers;
mod endpoints;
mod keys;
mod listings;
mod records;
mod request_slots;
mod retry_set;
mod retry_shards;
mod script_call;
mod server_clock;
mod sorted_sets;
mod stats;
mod upkeep;
mod watched;

pub use accounts::{API_KEY_PREFIX, Account, ApiKeyInfo, Idempotency};
pub use api_rates::Spent;
pub use batch_writer::{ARRIVALS_PER_CALL, RECORDS_PER_CALL};
pub use deliveries::{AttemptTiming, Begin, Ingest, Record, Recorded, Redelivery, Taken};
pub use dispatchers::SEEN_EVERY as DISPATCHER_SEEN_EVERY;
pub use endpoints::AccountEndpoints;
pub use keys::Keys;
pub use listings::{Cursor, DeliveryFilter, Page};
pub use retry_set::Claimed;
pub use retry_shards::MAX_RETRY_SHARDS;
pub use stats::{EndpointHealth, EndpointStats, LastDelivery, SeriesPoint, WindowStats};

use crate::sealing::SecretSealer;
use crate::startup::{self, Unreachable};
use arrivals::ArrivalWriter;
use batch_writer::{BatchWriter, Batched, RECORD_LINGER};
use records::RecordWriter;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::sync::Arc;
use std::time::Duration;
use watched::Watched;

/// A Redis failure, or a record in Redis that no longer parses.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("corrupt record at {key}: {problem}")]
    Corrupt { key: String, problem: String },
    #[error("the account already has {most} endpoints, the most it may have; delete one to add another")]
    TooManyEndpoints { most: u32 },
}

impl StoreError {
    /// What was found at `key` and why it does not parse.
    pub(crate) fn corrupt(key: &str, problem: impl std::fmt::Display) -> Self {
        StoreError::Corrupt {
            key: key.to_owned(),
            problem: problem.to_string(),
        }
    }
}

/// Handle to the store; cheap to clone (one multiplexed, self-reconnecting connection).
#[derive(Clone)]
pub struct Store {
    conn: ConnectionManager,
    keys: Keys,
    retention: Duration,
    /// Seals endpoint secrets on the way into Redis and opens them on the way out.
    sealer: Arc<SecretSealer>,
    /// When writes to the bounded indexes also trim them and renew their lifetime.
    upkeep: Arc<upkeep::Upkeep>,
    /// Events' arrivals and attempts' records, queued to go to Redis in batches.
    arrivals: BatchWriter<ArrivalWriter>,
    records: BatchWriter<RecordWriter>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

/// How Redis is reached and laid out.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub url: String,
    pub prefix: String,
    pub retry_shards: u16,
    pub retention: Duration,
    pub history_per_endpoint: u32,
    /// How long an event's arrival waits for others to share its call when no call is out:
    /// zero (the default, and what every process but the dispatcher writes with) sends it at
    /// once. Below full load a wait of a few hundred microseconds halves Redis's round trips
    /// for as much more latency (the dispatcher's `LAABAM_ARRIVAL_LINGER`).
    pub arrival_linger: Duration,
    /// Validated sealing keys (see [`crate::sealing`]).
    pub secret_key: Option<String>,
    pub secret_key_previous: Option<String>,
}

impl From<&crate::config::CommonArgs> for StoreConfig {
    fn from(c: &crate::config::CommonArgs) -> Self {
        StoreConfig {
            url: c.redis_url.clone(),
            prefix: c.redis_prefix.clone(),
            retry_shards: c.retry_shards,
            retention: c.retention,
            history_per_endpoint: c.history_per_endpoint,
            arrival_linger: Duration::ZERO,
            secret_key: c.secret_key.clone(),
            secret_key_previous: c.secret_key_previous.clone(),
        }
    }
}

impl Store {
    /// Connects, waiting up to `wait` for Redis to answer `PING`.
    pub async fn connect(config: &StoreConfig, wait: Duration) -> Result<Self, Unreachable> {
        let url = config.url.clone();
        let (client, conn) = startup::within("Redis", &config.url, wait, || async {
            let client = redis::Client::open(url.as_str())?;
            let manager_config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_response_timeout(Some(Duration::from_secs(5)))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_millis(500));
            let mut conn = ConnectionManager::new_with_config(client.clone(), manager_config).await?;
            redis::cmd("PING").query_async::<()>(&mut conn).await?;
            // A server that hides its version (some hosted ones restrict `INFO`) is taken at its
            // word.
            let info: Option<String> = redis::cmd("INFO").arg("server").query_async(&mut conn).await.ok();
            if let Some(version) = info.as_deref().and_then(too_old) {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "Redis is too old",
                    format!("it runs {version}; Laabam needs {MIN_REDIS_MAJOR}.0 or later (`EXPIRE … NX`)"),
                )));
            }
            Ok::<_, redis::RedisError>((client, conn))
        })
        .await?;
        let keys = Keys::new(&config.prefix, config.retry_shards);
        let history_per_endpoint = config.history_per_endpoint.max(1);
        Ok(Store {
            arrivals: BatchWriter::start(
                ArrivalWriter {
                    ttl_secs: retention_secs(config.retention),
                    events_kept: deliveries::EVENTS_PER_ACCOUNT,
                    deliveries_kept: history_per_endpoint.saturating_mul(10),
                },
                Watched::new(client.clone()),
                Batched {
                    per_call: &ARRIVALS_PER_CALL,
                    linger: config.arrival_linger,
                },
            ),
            records: BatchWriter::start(
                RecordWriter {
                    history_kept: history_per_endpoint,
                    prefix: keys.prefix().to_owned(),
                    trims: conn.clone(),
                },
                Watched::new(client),
                Batched {
                    per_call: &RECORDS_PER_CALL,
                    linger: RECORD_LINGER,
                },
            ),
            conn,
            keys,
            retention: config.retention,
            sealer: Arc::new(
                SecretSealer::new(config.secret_key.as_deref(), config.secret_key_previous.as_deref())
                    .expect("sealing keys are validated when configuration is parsed"),
            ),
            upkeep: Arc::new(upkeep::Upkeep::new(config.retention)),
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A connection handle for one command; clones share the underlying connection.
    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    fn retention_secs(&self) -> u64 {
        retention_secs(self.retention)
    }

    /// Answers whether Redis responds now (readiness probes).
    pub async fn ping(&self) -> bool {
        redis::cmd("PING").query_async::<()>(&mut self.conn()).await.is_ok()
    }

    /// Warns about settings a production installation must not run with: Redis that would lose
    /// recorded outcomes on a crash or evict them ("recorded" only means durable with
    /// append-only persistence and no eviction), and signing secrets stored unsealed.
    pub async fn warn_about_unsafe_settings(&self) {
        if !self.sealer.is_sealing() {
            tracing::warn!("LAABAM_SECRET_KEY is not set: endpoint signing secrets are stored in Redis unencrypted");
        }
        let mut conn = self.conn();
        let mut setting = async |name: &str| -> Option<String> {
            let pair: Vec<String> = redis::cmd("CONFIG")
                .arg("GET")
                .arg(name)
                .query_async(&mut conn)
                .await
                .ok()?;
            pair.into_iter().nth(1)
        };
        if setting("appendonly").await.is_some_and(|aof| aof != "yes") {
            tracing::warn!(
                "Redis runs without append-only persistence: recorded outcomes and retries are lost if Redis restarts (set appendonly yes, appendfsync everysec)"
            );
        }
        if let Some(policy) = setting("maxmemory-policy").await
            && policy != "noeviction"
        {
            tracing::warn!(
                policy,
                "Redis may evict keys under memory pressure: set maxmemory-policy noeviction"
            );
        }
    }
}

/// The oldest Redis whose commands the store sends: `EXPIRE … NX` came with 7.0.
const MIN_REDIS_MAJOR: u32 = 7;

/// The version `INFO server` reports, if it is older than [`MIN_REDIS_MAJOR`].
fn too_old(info: &str) -> Option<&str> {
    let version = info.lines().find_map(|l| l.strip_prefix("redis_version:"))?.trim();
    let major: u32 = version.split('.').next()?.parse().ok()?;
    (major < MIN_REDIS_MAJOR).then_some(version)
}

/// Lifetimes in whole seconds, at least one: Redis refuses an `EXPIRE` of zero.
fn retention_secs(retention: Duration) -> u64 {
    retention.as_secs().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redis_older_than_seven_is_named_by_its_version() {
        let info = |v: &str| format!("# Server\r\nredis_version:{v}\r\nredis_mode:standalone\r\n");
        assert_eq!(too_old(&info("6.2.14")), Some("6.2.14"));
        assert_eq!(too_old(&info("7.0.15")), None);
        assert_eq!(too_old(&info("10.1.0")), None);
        assert_eq!(
            too_old("# Server\r\nredis_mode:standalone\r\n"),
            None,
            "no version, no refusal"
        );
    }
}
