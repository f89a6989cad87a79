//! Claim due jobs, publish them with publisher confirms, and only then release the claims.
//! A failed publish hands its claims back for the next round on a new channel; any other
//! failure (the scheduler dies, Redis is down) leaves them to expire and be reclaimed: nothing
//! is lost either way.

use crate::config::SchedulerConfig;
use crate::metrics::METRICS;
use futures_util::future::try_join_all;
use laabam_shared::clock::now_ms;
use laabam_shared::ops::Readiness;
use laabam_shared::startup::{self, Backoff};
use laabam_shared::store::Store;
use laabam_shared::topology;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Connection};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error("RabbitMQ: {0}")]
    Broker(#[from] lapin::Error),
    #[error("RabbitMQ refused a retry job (negative confirm)")]
    Nacked,
    #[error("{0}")]
    Store(#[from] laabam_shared::store::StoreError),
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
        rounds(&store, &channel, config, &readiness, &shutdown).await;
        readiness.set_broker(false);
        startup::amqp_close(&connection, "reconnecting").await;
    }
}

/// Rounds over every shard on one channel; returns when the channel fails or on shutdown.
async fn rounds(
    store: &Store,
    channel: &Channel,
    config: &SchedulerConfig,
    readiness: &Readiness,
    shutdown: &CancellationToken,
) {
    let shards = store.keys().retry_shards();
    while !shutdown.is_cancelled() {
        // A broker that closed the connection (a restart, a cut) is noticed here, not at the
        // next publish: readiness tells the truth and the channel is reopened before it is
        // needed.
        if !channel.status().connected() {
            tracing::warn!("the broker closed the publishing channel; reconnecting");
            return;
        }
        let mut busy = false;
        let mut earliest: Option<i64> = None;
        for shard in 0..shards {
            match round(store, channel, shard, config).await {
                Ok(claimed) => {
                    readiness.set_redis(true);
                    busy |= claimed >= config.batch;
                    if claimed < config.batch
                        && let Ok(Some(due)) = store.next_due_ms(shard).await
                    {
                        earliest = Some(earliest.map_or(due, |e: i64| e.min(due)));
                    }
                }
                Err(RoundError::Store(e)) => {
                    readiness.set_redis(false);
                    tracing::warn!(shard, error = %e, "Redis unavailable; claims stay leased and will be retried");
                }
                Err(e) => {
                    tracing::warn!(shard, error = %e, "publishing failed; the claimed jobs go out again on a new channel");
                    return;
                }
            }
        }
        if let Ok(backlog) = store.retry_backlog().await {
            METRICS.backlog.set(backlog as i64);
        }
        if busy {
            continue;
        }
        let poll = config.poll.as_millis() as i64;
        let wait_ms = earliest.map_or(poll, |due| (due - now_ms()).clamp(1, poll));
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(wait_ms as u64)) => {}
            _ = shutdown.cancelled() => {}
        }
    }
}

/// One claim–publish–release round on one shard; returns how many jobs it moved.
async fn round(store: &Store, channel: &Channel, shard: u16, config: &SchedulerConfig) -> Result<usize, RoundError> {
    let now = now_ms();
    let claimed = store
        .claim_due(shard, now, now + config.claim_lease.as_millis() as i64, config.batch)
        .await?;
    if claimed.jobs.is_empty() {
        return Ok(0);
    }
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
    if let Err(e) = publish(channel, &claimed.jobs).await {
        // Handed back, the claims are taken again by the next round on a new channel instead of
        // waiting out their lease; should Redis fail too, the lease still brings them back.
        if let Err(store_error) = store.hand_back_claimed(shard, &claimed.jobs).await {
            tracing::warn!(shard, error = %store_error, "could not hand claims back; they return when their lease expires");
        }
        return Err(e);
    }
    store.release_claimed(shard, &claimed.jobs).await?;
    METRICS.republished.inc_by(claimed.jobs.len() as u64);
    tracing::debug!(shard, jobs = claimed.jobs.len(), "retry jobs re-queued");
    Ok(claimed.jobs.len())
}

/// Publishes encoded jobs and waits until the broker has confirmed every one.
async fn publish(channel: &Channel, jobs: &[String]) -> Result<(), RoundError> {
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"));
    let mut confirms = Vec::with_capacity(jobs.len());
    for job in jobs {
        confirms.push(
            channel
                .basic_publish(
                    topology::RETRY_EXCHANGE.into(),
                    topology::RETRY_ROUTING_KEY.into(),
                    BasicPublishOptions::default(),
                    job.as_bytes(),
                    properties.clone(),
                )
                .await?,
        );
    }
    let confirmations = startup::amqp_within(
        startup::AMQP_CONFIRM_LIMIT,
        "confirm the retry jobs",
        try_join_all(confirms),
    )
    .await?;
    if confirmations.iter().any(|c| !c.is_ack()) {
        return Err(RoundError::Nacked);
    }
    Ok(())
}
