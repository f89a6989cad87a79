//! Claim due jobs, publish them with publisher confirms, and only then release the claims;
//! the next batch is claimed and sent while the broker confirms the one before.
//! A failed publish hands its claims back for the next round on a new channel; any other
//! failure (the scheduler dies, Redis is down) leaves them to expire and be reclaimed: nothing
//! is lost either way. While the broker blocks publishing for a memory or disk alarm, nothing
//! is claimed: what was in flight is handed back as soon as the block is announced, and the
//! connection is kept, so the rounds go on the moment the alarm clears.

use crate::config::SchedulerConfig;
use crate::metrics::METRICS;
use futures_util::future::try_join_all;
use laabam_shared::clock::redis_now_ms;
use laabam_shared::ops::Readiness;
use laabam_shared::publish_link::until_blocked;
use laabam_shared::shutdown;
use laabam_shared::startup::{self, Backoff};
use laabam_shared::store::{Store, StoreError};
use laabam_shared::topology;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionStatus, PublisherConfirm};
use std::collections::VecDeque;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
enum PublishError {
    #[error("RabbitMQ: {0}")]
    Broker(#[from] lapin::Error),
    #[error("RabbitMQ refused a retry job (negative confirm)")]
    Nacked,
    #[error("RabbitMQ had no queue bound for a retry job and returned it")]
    Returned,
    #[error("RabbitMQ blocked publishing for a memory or disk alarm")]
    Blocked,
}

/// Runs rounds until `shutdown`, reconnecting to the broker whenever it fails.
pub async fn run(
    store: Store,
    first: Connection,
    config: &SchedulerConfig,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) {
    let mut conn = Some(first);
    let mut backoff = Backoff::default();
    while !shutdown.is_cancelled() {
        let connection = match conn.take() {
            Some(c) => Ok(c),
            None => startup::amqp_connect(&config.common.amqp_url, "laabam-retry-scheduler").await,
        };
        let channel = match connection {
            Ok(c) => topology::publishing_channel(&c, config.common.layout())
                .await
                .map(|ch| (c, ch)),
            Err(e) => Err(e),
        };
        let (connection, channel) = match channel {
            Ok(pair) => pair,
            Err(e) => {
                readiness.set_broker(false);
                tracing::warn!(error = %e, retry_in = ?backoff.upcoming(), "cannot reach RabbitMQ; retrying");
                backoff.pause(&shutdown).await;
                continue;
            }
        };
        readiness.set_broker(true);
        backoff.reset();
        rounds(&store, &channel, connection.status(), config, &readiness, &shutdown).await;
        readiness.set_broker(false);
        startup::amqp_close(&connection, "reconnecting").await;
    }
}

/// How many published batches may wait for their confirms while the next batch is claimed and
/// sent. Rounds that each waited for their own confirms left the scheduler idle while the
/// broker persisted a batch, and the broker idle while the scheduler claimed and encoded the
/// next: on two shared cores they stopped at 11,000–12,600 re-queues/s with 25,000/s due.
const BATCHES_IN_FLIGHT: usize = 2;

/// A batch sent to the broker whose claims are released once every job is confirmed.
struct Sent {
    shard: u16,
    jobs: Vec<String>,
    confirms: Vec<PublisherConfirm>,
}

/// Rounds over every shard on one channel; returns when the channel fails or on shutdown,
/// after settling every batch already sent (released if confirmed, handed back if not).
async fn rounds(
    store: &Store,
    channel: &Channel,
    connection: &ConnectionStatus,
    config: &SchedulerConfig,
    readiness: &Readiness,
    shutdown: &CancellationToken,
) {
    let mut in_flight = VecDeque::with_capacity(BATCHES_IN_FLIGHT);
    let link = (channel, connection);
    rounds_until_failure(store, link, config, readiness, shutdown, &mut in_flight).await;
    while let Some(sent) = in_flight.pop_front() {
        let _ = settle(store, sent, connection, readiness).await;
    }
}

/// A spell of publishing blocked by a RabbitMQ resource alarm: said once in the log and shown in
/// `laabam_scheduler_publishing_blocked` from its start until it ends or the connection does.
#[derive(Default)]
struct BlockedSpell(bool);

impl BlockedSpell {
    fn begin(&mut self) {
        if !std::mem::replace(&mut self.0, true) {
            tracing::warn!("RabbitMQ blocks publishing (a memory or disk alarm): nothing is claimed until it clears");
            METRICS.publishing_blocked.set(1);
        }
    }

    fn end(&mut self) {
        if std::mem::take(&mut self.0) {
            tracing::info!("RabbitMQ takes publishes again; claiming");
            METRICS.publishing_blocked.set(0);
        }
    }
}

impl Drop for BlockedSpell {
    /// A connection that ends blocked is replaced by one the broker has not blocked (yet).
    fn drop(&mut self) {
        if self.0 {
            METRICS.publishing_blocked.set(0);
        }
    }
}

/// A publishing channel and its connection's status (blocked or not).
type Link<'a> = (&'a Channel, &'a ConnectionStatus);

async fn rounds_until_failure(
    store: &Store,
    (channel, connection): Link<'_>,
    config: &SchedulerConfig,
    readiness: &Readiness,
    shutdown: &CancellationToken,
    in_flight: &mut VecDeque<Sent>,
) {
    let mut shards = store.keys().retry_shards();
    let (mut shards_checked, mut swept): (Option<Instant>, Option<Instant>) = (None, None);
    let routing_keys = config.common.layout().retry_routing_keys();
    let mut blocked = BlockedSpell::default();
    'rounds: while !shutdown.is_cancelled() {
        if shards_checked.is_none_or(|at| at.elapsed() >= SHARDS_CHECK_EVERY) {
            if swept.is_none_or(|at| at.elapsed() >= SHARDS_SWEEP_EVERY) {
                sweep_shards(store, shards).await;
                swept = Some(Instant::now());
            }
            shards = shards_to_claim(store, shards).await;
            shards_checked = Some(Instant::now());
        }
        // A broker that closed the connection (a restart, a cut) is noticed here, not at the
        // next publish: readiness tells the truth and the channel is reopened before it is
        // needed.
        if !channel.status().connected() {
            tracing::warn!("the broker closed the publishing channel; reconnecting");
            return;
        }
        if connection.blocked() {
            blocked.begin();
            while let Some(sent) = in_flight.pop_front() {
                let _ = settle(store, sent, connection, readiness).await;
            }
            shutdown::pause(config.poll, shutdown).await;
            continue;
        }
        blocked.end();
        let mut busy = false;
        let mut earliest: Option<i64> = None;
        for shard in 0..shards {
            let jobs = match claim(store, shard, config).await {
                Ok(jobs) => {
                    readiness.set_redis(true);
                    jobs
                }
                Err(e) => {
                    readiness.set_redis(false);
                    tracing::warn!(shard, error = %e, "Redis unavailable; nothing is claimed until it is back");
                    continue;
                }
            };
            busy |= jobs.len() >= config.batch;
            if jobs.len() < config.batch
                && let Ok(Some(due)) = store.next_due_ms(shard).await
            {
                earliest = Some(earliest.map_or(due, |e: i64| e.min(due)));
            }
            if jobs.is_empty() {
                continue;
            }
            match send((channel, connection), &routing_keys, &jobs).await {
                Ok(confirms) => in_flight.push_back(Sent { shard, jobs, confirms }),
                Err(e) => {
                    hand_back(store, shard, &jobs, &e).await;
                    if matches!(e, PublishError::Blocked) {
                        continue 'rounds;
                    }
                    return;
                }
            }
            if in_flight.len() >= BATCHES_IN_FLIGHT
                && let Some(oldest) = in_flight.pop_front()
            {
                match settle(store, oldest, connection, readiness).await {
                    Ok(()) => {}
                    Err(PublishError::Blocked) => continue 'rounds,
                    Err(_) => return,
                }
            }
        }
        if let Ok(backlog) = store.retry_backlog_of(shards).await {
            METRICS.backlog.set(backlog as i64);
        }
        if busy {
            continue;
        }
        // Nothing more is due yet: what was sent is settled before the pause, not after it.
        while let Some(sent) = in_flight.pop_front() {
            match settle(store, sent, connection, readiness).await {
                Ok(()) => {}
                Err(PublishError::Blocked) => continue 'rounds,
                Err(_) => return,
            }
        }
        let poll = config.poll.as_millis() as i64;
        let shortest = (SHORTEST_PAUSE.as_millis() as i64).min(poll);
        let wait_ms = earliest.map_or(poll, |due| (due - redis_now_ms()).clamp(shortest, poll));
        shutdown::pause(Duration::from_millis(wait_ms as u64), shutdown).await;
    }
}

/// The shortest pause after a round that left nothing due: jobs coming due continuously (a
/// backlog draining at 10,000/s) were otherwise claimed a millisecond apart a few dozen at a
/// time, and a round's Redis calls, confirm wait and wakes cost more than its jobs. Rounds at
/// least 10 ms apart cut the scheduler's CPU per re-queued job from 22 to 16 µs and Redis's from
/// 8.6 to 6.4 in `retry-backlog`, for a due lag p99 of 25 ms instead of 5; retry delays are
/// seconds and more, jittered by a fifth. A round that claimed a full batch never pauses.
const SHORTEST_PAUSE: Duration = Duration::from_millis(10);

/// How often a scheduler looks again at which shard counts are in use.
const SHARDS_CHECK_EVERY: Duration = Duration::from_secs(5);

/// How often a scheduler sweeps every possible shard for jobs no announced count covers.
const SHARDS_SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Sweeps the shards past the `current` ones for jobs (see `Store::sweep_retry_shards`); a
/// count it announces is claimed over from the next look at the counts.
async fn sweep_shards(store: &Store, current: u16) {
    match store.sweep_retry_shards(current, redis_now_ms()).await {
        Ok(Some(shards)) => tracing::warn!(
            shards,
            "retry jobs found in shards no announced count covers (a process that could not announce its LAABAM_RETRY_SHARDS stopped): claiming from them until they are empty"
        ),
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "could not sweep the retry shards; trying again later"),
    }
}

/// The shards to claim from (see `Store::retry_shards_to_claim`), saying when that changes;
/// `current` stays while Redis cannot tell.
async fn shards_to_claim(store: &Store, current: u16) -> u16 {
    let own = store.keys().retry_shards();
    let shards = match store.retry_shards_to_claim(redis_now_ms()).await {
        Ok(shards) if shards != current && shards > own => {
            tracing::warn!(
                own,
                shards,
                "processes run, or ran, with more retry shards than this scheduler: claiming from all of them until the extra ones are empty"
            );
            shards
        }
        Ok(shards) if shards != current => {
            tracing::info!(
                shards,
                "the extra retry shards are drained; claiming from this scheduler's own"
            );
            shards
        }
        Ok(shards) => shards,
        Err(_) => current,
    };
    METRICS.retry_shards.set(shards.into());
    shards
}

/// Claims up to a batch of due jobs on one shard.
async fn claim(store: &Store, shard: u16, config: &SchedulerConfig) -> Result<Vec<String>, StoreError> {
    let now = redis_now_ms();
    let claimed = store
        .claim_due(shard, now, now + config.claim_lease.as_millis() as i64, config.batch)
        .await?;
    if let Some(due) = claimed.earliest_due_ms {
        METRICS.due_lag_seconds.observe((now - due).max(0) as f64 / 1000.0);
    }
    if claimed.reclaimed > 0 {
        METRICS.reclaimed.inc_by(claimed.reclaimed as u64);
        tracing::info!(
            shard,
            reclaimed = claimed.reclaimed,
            "reclaimed jobs whose claim expired or was handed back"
        );
    }
    Ok(claimed.jobs)
}

/// Publishes encoded jobs, each to the retry queue its hash picks; the confirms are awaited by
/// `settle`.
///
/// The publishes are awaited together, not one after another: lapin's `basic_publish` returns
/// once its I/O thread has written the frames, so a batch published in sequence handed each
/// job to that thread and waited for it to wake, write and wake us back, and those thread
/// switches were most of the scheduler's CPU (47 µs per job in `retry-backlog`). Together,
/// every job's frames are queued before any write is waited for, and the thread writes them in
/// a few wakes. Each publish queues its frames and takes its confirm's sequence number in the
/// same first poll, so frames and confirms stay paired in whatever order the jobs are polled.
async fn send(
    (channel, connection): Link<'_>,
    routing_keys: &[String],
    jobs: &[String],
) -> Result<Vec<PublisherConfirm>, PublishError> {
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"));
    let hasher = BuildHasherDefault::<DefaultHasher>::default();
    let publishes = jobs.iter().map(|job| {
        let key = match routing_keys {
            [only] => only,
            keys => &keys[hasher.hash_one(job) as usize % keys.len()],
        };
        channel.basic_publish(
            topology::RETRY_EXCHANGE.into(),
            key.as_str().into(),
            // Mandatory: the broker confirms a message it could route nowhere, so only a
            // return tells that a retry queue is missing (deleted by hand, or of a layout not
            // declared yet); the job is then handed back and goes out again once a new channel
            // has declared the topology.
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            job.as_bytes(),
            properties.clone(),
        )
    });
    Ok(until_blocked(connection, try_join_all(publishes))
        .await
        .ok_or(PublishError::Blocked)??)
}

/// Waits until the broker has confirmed a sent batch, then releases its claims. A batch the
/// broker did not confirm is handed back and the error ends the rounds on this channel, unless
/// the broker blocked it, which the rounds wait out.
async fn settle(
    store: &Store,
    sent: Sent,
    connection: &ConnectionStatus,
    readiness: &Readiness,
) -> Result<(), PublishError> {
    let Sent { shard, jobs, confirms } = sent;
    if let Err(e) = confirmed(confirms, connection).await {
        hand_back(store, shard, &jobs, &e).await;
        return Err(e);
    }
    match store.release_claimed(shard, &jobs).await {
        Ok(()) => {
            METRICS.republished.inc_by(jobs.len() as u64);
            tracing::debug!(shard, jobs = jobs.len(), "retry jobs re-queued");
        }
        Err(e) => {
            readiness.set_redis(false);
            tracing::warn!(shard, error = %e, "Redis unavailable; claims stay leased and will be retried");
        }
    }
    Ok(())
}

async fn confirmed(confirms: Vec<PublisherConfirm>, connection: &ConnectionStatus) -> Result<(), PublishError> {
    let confirmations = startup::amqp_within(
        startup::AMQP_CONFIRM_LIMIT,
        "confirm the retry jobs",
        try_join_all(confirms),
    );
    let confirmations = until_blocked(connection, confirmations)
        .await
        .ok_or(PublishError::Blocked)??;
    for confirmation in confirmations {
        match confirmation {
            Confirmation::Ack(None) => {}
            Confirmation::Ack(Some(_)) => return Err(PublishError::Returned),
            _ => return Err(PublishError::Nacked),
        }
    }
    Ok(())
}

/// Hands back the claims of a batch that did not go out (or may have, when the broker blocked
/// it: a job sent twice is dropped by the dispatcher): the next round takes them again instead
/// of waiting out their lease; should Redis fail too, the lease still brings them back.
async fn hand_back(store: &Store, shard: u16, jobs: &[String], why: &PublishError) {
    tracing::warn!(shard, error = %why, "publishing failed; the claimed jobs are handed back to go out again");
    if let Err(store_error) = store.hand_back_claimed(shard, jobs).await {
        tracing::warn!(shard, error = %store_error, "could not hand claims back; they return when their lease expires");
    }
}
