//! Sending back what the platform kept aside: messages `laabam.events` could not route (kept
//! by its alternate exchange while a dispatch queue or binding was missing), and dead letters
//! (kept with the reason they could not be handled). Once the cause is gone (the topology
//! declared again, a dispatcher that knows a new event type deployed), an operator replays
//! them and they are delivered as if published now; one still poison is dead-lettered again.

use super::moving::{Destination, MoveError, move_held};
use super::{DEAD_QUEUE, UNROUTABLE_QUEUE, durable_queue};
use lapin::Connection;
use lapin::types::FieldTable;

/// A queue of messages kept aside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kept {
    /// `laabam.unroutable`: events `laabam.events` had no route for.
    Unroutable,
    /// `laabam.dead`: events and retry jobs a dispatcher could not handle.
    Dead,
}

impl Kept {
    pub fn queue(self) -> &'static str {
        match self {
            Kept::Unroutable => UNROUTABLE_QUEUE,
            Kept::Dead => DEAD_QUEUE,
        }
    }
}

/// Moves every message `kept` holds now back where it was first published (see
/// [`Destination::Original`]); returns how many. Messages kept meanwhile stay for the next run.
pub async fn replay_kept(conn: &Connection, kept: Kept) -> Result<u64, MoveError> {
    let channel = super::moving_channel(conn, "open the replaying channel").await?;
    let held = channel
        .queue_declare(kept.queue().into(), durable_queue(), FieldTable::default())
        .await?
        .message_count();
    let moved = move_held(&channel, kept.queue(), u64::from(held), Destination::Original).await?;
    let _ = channel.close(200, "replayed".into()).await;
    Ok(moved)
}
