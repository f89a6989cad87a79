//! The shard queues a former layout of more dispatch queues left behind. Lowering
//! `LAABAM_DISPATCH_QUEUES` (or going back to one queue) leaves `laabam.dispatch.i` and
//! `laabam.retries.i` beyond the new count that no dispatcher consumes any more; while the
//! sharding exchange still binds such a dispatch queue, it even keeps taking its share of new
//! events. Retiring one unbinds it, moves what it holds back through its exchange (see
//! [`super::moving`]), and deletes it once it is empty.
//!
//! AMQP cannot list queues, and asking for a missing one closes the channel (which lapin logs
//! as an error), so every name a layout could have used is declared instead: a queue that was
//! not there is created empty and deleted at once.

use super::moving::{Destination, MoveError, move_held};
use super::{DISPATCH_QUEUE, DISPATCH_SHARDS_EXCHANGE, Layout, RETRY_QUEUE, SHARD_WEIGHT, durable_queue, shard_name};
use lapin::options::QueueDeleteOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection};

/// The most dispatch queues a layout may have (`LAABAM_DISPATCH_QUEUES`): how far a former
/// layout's shards are looked for.
pub const MAX_DISPATCH_QUEUES: u16 = 64;

/// A retired queue that held messages, and how many were moved out of it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Retired {
    pub queue: String,
    pub moved: u64,
}

/// Retires the shard queues beyond `layout`'s own, after `layout` has been declared (so its
/// routes are in place before the old ones go). Safe to run again at any time: it refuses a
/// queue some process still consumes, and a run that fails part-way leaves every message in
/// at least one queue (two runs at once may trip over a queue the other just deleted; the
/// next run finishes the job).
pub async fn retire_former_shards(conn: &Connection, layout: Layout) -> Result<Vec<Retired>, MoveError> {
    let channel = super::moving_channel(conn, "open the retiring channel").await?;
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

async fn retire(channel: &Channel, layout: Layout, queue: &str, destination: Destination) -> Result<u64, MoveError> {
    let declared = channel
        .queue_declare(queue.into(), durable_queue(), FieldTable::default())
        .await?;
    if declared.consumer_count() > 0 {
        return Err(MoveError::InUse {
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
    let moved = move_held(channel, queue, u64::from(declared.message_count()), destination).await?;
    let left = channel
        .queue_declare(queue.into(), durable_queue(), FieldTable::default())
        .await?
        .message_count();
    if left > 0 {
        return Err(MoveError::StillRouted {
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
