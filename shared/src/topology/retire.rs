//! The shard queues a former layout of more dispatch queues left behind. Lowering
//! `LAABAM_DISPATCH_QUEUES` (or going back to one queue) leaves `laabam.dispatch.i` and
//! `laabam.retries.i` beyond the new count that no dispatcher consumes any more; while the
//! sharding exchange still binds such a dispatch queue, it even keeps taking its share of new
//! events. Retiring one unbinds it, moves what it holds back through its exchange (every
//! message confirmed before it is acknowledged, so a failure leaves it where it was, or at worst
//! in both places: at least once), and deletes it once it is empty.
//!
//! AMQP cannot list queues, and asking for a missing one closes the channel (which lapin logs
//! as an error), so every name a layout could have used is declared instead: a queue that was
//! not there is created empty and deleted at once.

use super::{
    DISPATCH_QUEUE, DISPATCH_SHARDS_EXCHANGE, EVENTS_EXCHANGE, Layout, RETRY_EXCHANGE, RETRY_QUEUE, RETRY_ROUTING_KEY,
    SHARD_WEIGHT, durable_queue, shard_name,
};
use crate::startup;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Confirmation, Connection};

/// The most dispatch queues a layout may have (`LAABAM_DISPATCH_QUEUES`): how far a former
/// layout's shards are looked for.
pub const MAX_DISPATCH_QUEUES: u16 = 64;

/// How many messages are moved between two waits for the broker's confirms.
const MOVE_BATCH: u64 = 500;

/// A retired queue that held messages, and how many were moved out of it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Retired {
    pub queue: String,
    pub moved: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RetireError {
    #[error("RabbitMQ: {0}")]
    Broker(#[from] lapin::Error),
    #[error("{queue} still has {consumers} consumer(s): stop every process of the former layout, then retire again")]
    InUse { queue: String, consumers: u32 },
    #[error("RabbitMQ did not take a message moved out of {queue}; it stays there")]
    NotMoved { queue: String },
    #[error(
        "{queue} still gets messages ({left} after moving what it held): a process of the former layout still declares it; stop it, then retire again"
    )]
    StillRouted { queue: String, left: u32 },
}

/// Where what a retired queue holds goes back in.
#[derive(Debug, Clone, Copy)]
enum Destination {
    /// Events are published again as publishers sent them, so the current layout routes them.
    Events,
    /// Retry jobs go to the single layout's retry queue, which every dispatcher consumes.
    Retries,
}

/// Retires the shard queues beyond `layout`'s own, after `layout` has been declared (so its
/// routes are in place before the old ones go). Safe to run again at any time: it refuses a
/// queue some process still consumes, and a run that fails part-way leaves every message in
/// at least one queue (two runs at once may trip over a queue the other just deleted; the
/// next run finishes the job).
pub async fn retire_former_shards(conn: &Connection, layout: Layout) -> Result<Vec<Retired>, RetireError> {
    let channel = startup::amqp_within(startup::AMQP_SETUP_LIMIT, "open the retiring channel", async {
        let channel = conn.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(channel)
    })
    .await?;
    let mut retired = Vec::new();
    for index in layout.shard_count()..MAX_DISPATCH_QUEUES {
        for (name, destination) in [
            (DISPATCH_QUEUE, Destination::Events),
            (RETRY_QUEUE, Destination::Retries),
        ] {
            let queue = shard_name(name, index);
            let moved = retire(&channel, layout, &queue, destination).await?;
            if moved > 0 {
                tracing::info!(queue, moved, "retired a queue of a former layout");
                retired.push(Retired { queue, moved });
            }
        }
    }
    let _ = channel.close(200, "retired".into()).await;
    Ok(retired)
}

async fn retire(channel: &Channel, layout: Layout, queue: &str, destination: Destination) -> Result<u64, RetireError> {
    let declared = channel
        .queue_declare(queue.into(), durable_queue(), FieldTable::default())
        .await?;
    if declared.consumer_count() > 0 {
        return Err(RetireError::InUse {
            queue: queue.to_owned(),
            consumers: declared.consumer_count(),
        });
    }
    if matches!(destination, Destination::Events) && layout.sharded() {
        // Unbound first, so no moved event can be routed back into it. (The single layout
        // deleted the sharding exchange, and its bindings with it.)
        channel
            .queue_unbind(
                queue.into(),
                DISPATCH_SHARDS_EXCHANGE.into(),
                SHARD_WEIGHT.into(),
                FieldTable::default(),
            )
            .await?;
    }
    // Only what it held is moved: should a process of the former layout still route into it,
    // what it moved would come back, and an unbounded loop would never end.
    let held = u64::from(declared.message_count());
    let mut moved = 0;
    while moved < held {
        let batch = (held - moved).min(MOVE_BATCH);
        match move_batch(channel, queue, destination, batch).await? {
            0 => break,
            count => moved += count,
        }
    }
    let left = channel
        .queue_declare(queue.into(), durable_queue(), FieldTable::default())
        .await?
        .message_count();
    if left > 0 {
        return Err(RetireError::StillRouted {
            queue: queue.to_owned(),
            left,
        });
    }
    channel
        .queue_delete(
            queue.into(),
            QueueDeleteOptions {
                if_unused: true,
                if_empty: true,
                ..Default::default()
            },
        )
        .await?;
    Ok(moved)
}

/// Moves up to `limit` messages; fewer once the queue is empty.
async fn move_batch(channel: &Channel, queue: &str, destination: Destination, limit: u64) -> Result<u64, RetireError> {
    let mut confirms = Vec::new();
    let mut last_tag = None;
    while (confirms.len() as u64) < limit {
        let Some(message) = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        let delivery = message.delivery;
        let (exchange, routing_key) = match destination {
            Destination::Events => (EVENTS_EXCHANGE, delivery.routing_key.as_str()),
            Destination::Retries => (RETRY_EXCHANGE, RETRY_ROUTING_KEY),
        };
        confirms.push(
            channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &delivery.data,
                    delivery.properties,
                )
                .await?,
        );
        last_tag = Some(delivery.delivery_tag);
    }
    let Some(last_tag) = last_tag else {
        return Ok(0);
    };
    let confirmations = startup::amqp_within(
        startup::AMQP_CONFIRM_LIMIT,
        "confirm the moved messages",
        futures_util::future::try_join_all(confirms),
    )
    .await?;
    if confirmations.iter().all(|c| matches!(c, Confirmation::Ack(None))) {
        channel.basic_ack(last_tag, BasicAckOptions { multiple: true }).await?;
        Ok(confirmations.len() as u64)
    } else {
        channel
            .basic_nack(
                last_tag,
                BasicNackOptions {
                    multiple: true,
                    requeue: true,
                },
            )
            .await?;
        Err(RetireError::NotMoved {
            queue: queue.to_owned(),
        })
    }
}
