//! The RabbitMQ topology. Every process declares it with identical arguments (declaring is
//! idempotent only when arguments match), so any of them may start first.
//!
//! ```text
//! publishers ─▶ laabam.events (topic) ──#──▶ laabam.dispatch ─▶ dispatchers
//!        or, with LAABAM_DISPATCH_QUEUES=N > 1 (the consistent-hash exchange plugin):
//!               laabam.events ──#──▶ laabam.dispatch.shards (x-consistent-hash on message_id)
//!                                      ─▶ laabam.dispatch.0 … laabam.dispatch.N-1 ─▶ dispatchers
//!               (laabam.dispatch stays, unbound and consumed, for what it held before)
//!                   └─ alternate-exchange ─▶ laabam.unroutable (fanout) ─▶ laabam.unroutable
//! scheduler  ─▶ laabam.retries (direct) ─retry─▶ laabam.retries ─▶ dispatchers
//!                                     └─retry.i─▶ laabam.retries.i (N > 1) ─▶ dispatchers
//! dispatcher ─▶ laabam.dead (fanout) ─▶ laabam.dead       (poison messages, with a reason header)
//! ```
//!
//! A layout of fewer queues than before leaves shard queues behind; [`retire_former_shards`]
//! empties them into the current layout.

mod moving;
mod replay;
mod retire;

pub use moving::MoveError;
pub use replay::{Kept, replay_kept};
pub use retire::{MAX_DISPATCH_QUEUES, Retired, retire_former_shards};

use crate::startup;
use lapin::options::{
    ConfirmSelectOptions, ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};

/// The publishers' whole contract: routing key = event type, body = envelope JSON.
pub const EVENTS_EXCHANGE: &str = "laabam.events";
/// Keeps what `laabam.events` could not route, instead of dropping it.
pub const UNROUTABLE_EXCHANGE: &str = "laabam.unroutable";
pub const UNROUTABLE_QUEUE: &str = "laabam.unroutable";
/// Bound with `#`, so unknown types reach a dispatcher and are dead-lettered with a reason.
pub const DISPATCH_QUEUE: &str = "laabam.dispatch";
/// Spreads events over several dispatch queues by a hash of their `message_id` (publishers
/// keep publishing to `laabam.events`; a message without one goes to one fixed queue).
pub const DISPATCH_SHARDS_EXCHANGE: &str = "laabam.dispatch.shards";
/// The routing key of a consistent-hash binding is the queue's weight; every shard weighs the
/// same.
const SHARD_WEIGHT: &str = "1";
/// The exchange type the sharded layout needs (RabbitMQ's bundled plugin
/// `rabbitmq_consistent_hash_exchange`).
pub const CONSISTENT_HASH: &str = "x-consistent-hash";
/// Retry jobs travel apart from events and never pass through `laabam.events`.
pub const RETRY_EXCHANGE: &str = "laabam.retries";
/// The single layout's retry queue. The sharded layout keeps it declared and consumed, so jobs
/// queued before a switch to that layout still reach a dispatcher.
pub const RETRY_QUEUE: &str = "laabam.retries";
pub const RETRY_ROUTING_KEY: &str = "retry";
pub const DEAD_EXCHANGE: &str = "laabam.dead";
pub const DEAD_QUEUE: &str = "laabam.dead";
/// Restricts an event's fan-out to one endpoint of its account: how test sends travel the
/// real pipeline without reaching the account's other endpoints.
pub const TARGET_ENDPOINT_HEADER: &str = "x-laabam-endpoint";
/// Why a message was dead-lettered.
pub const DEAD_REASON_HEADER: &str = "x-laabam-dead-reason";
/// What a dead-lettered message's reason means for it (the parse error, the size).
pub const DEAD_DETAIL_HEADER: &str = "x-laabam-dead-detail";
/// The exchange a dead-lettered message was first published to, where a replay sends it back.
pub const ORIGINAL_EXCHANGE_HEADER: &str = "x-laabam-original-exchange";

/// How the event stream is laid out over queues; every process must use the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// One queue (the default, no plugin needed), or N queues that N consumers and the broker's
    /// cores work on in parallel: one classic queue is one Erlang process, so one core.
    pub dispatch_queues: u16,
}

impl Default for Layout {
    fn default() -> Self {
        Layout { dispatch_queues: 1 }
    }
}

impl Layout {
    pub fn sharded(&self) -> bool {
        self.dispatch_queues > 1
    }

    /// The queues dispatchers consume events from. The sharded layout keeps the single
    /// layout's queue, unbound, so events queued there before a switch still reach a dispatcher.
    pub fn dispatch_queues(&self) -> Vec<String> {
        let mut queues = vec![DISPATCH_QUEUE.to_owned()];
        queues.extend(self.shards_of(DISPATCH_QUEUE));
        queues
    }

    /// The queues events are routed to: the sharded layout's shards, or the single queue.
    pub fn routed_dispatch_queues(&self) -> Vec<String> {
        self.routed(DISPATCH_QUEUE)
    }

    /// The routing keys the scheduler spreads retry jobs over: one retry queue per dispatch
    /// queue, because one queue is about one broker core whichever stream it carries
    /// (re-queueing into one retry queue stopped at 11,000–13,700 jobs/s on the 2-core
    /// benchmark machine).
    pub fn retry_routing_keys(&self) -> Vec<String> {
        self.routed(RETRY_ROUTING_KEY)
    }

    /// The queues dispatchers consume retry jobs from.
    pub fn retry_queues(&self) -> Vec<String> {
        self.retry_bindings().into_iter().map(|(queue, _)| queue).collect()
    }

    /// Each retry queue with the key that routes to it.
    fn retry_bindings(&self) -> Vec<(String, String)> {
        let mut bindings = vec![(RETRY_QUEUE.to_owned(), RETRY_ROUTING_KEY.to_owned())];
        bindings.extend(
            self.shards_of(RETRY_QUEUE)
                .into_iter()
                .zip(self.shards_of(RETRY_ROUTING_KEY)),
        );
        bindings
    }

    /// How many shard queues of each kind this layout has: none in the single layout.
    fn shard_count(&self) -> u16 {
        if self.sharded() { self.dispatch_queues } else { 0 }
    }

    /// What new messages go to: the shards of `name` in the sharded layout, `name` itself in
    /// the single one.
    fn routed(&self, name: &str) -> Vec<String> {
        if self.sharded() {
            self.shards_of(name)
        } else {
            vec![name.to_owned()]
        }
    }

    fn shards_of(&self, name: &str) -> Vec<String> {
        (0..self.shard_count()).map(|i| shard_name(name, i)).collect()
    }
}

fn shard_name(name: &str, index: u16) -> String {
    format!("{name}.{index}")
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

/// A channel in confirm mode on the declared topology: what every publisher (the producer's
/// publisher, the retry scheduler) opens on a fresh connection. Bounded by
/// [`startup::AMQP_SETUP_LIMIT`], so a broker that leaves a step unanswered is an error for the
/// caller's reconnect loop, not a silent wait.
pub async fn publishing_channel(conn: &Connection, layout: Layout) -> Result<Channel, lapin::Error> {
    startup::amqp_within(startup::AMQP_SETUP_LIMIT, "open the publishing channel", async {
        let channel = conn.create_channel().await?;
        declare(&channel, layout).await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(channel)
    })
    .await
}

/// Declares every exchange, queue and binding.
pub async fn declare(channel: &Channel, layout: Layout) -> Result<(), lapin::Error> {
    let mut events_args = FieldTable::default();
    events_args.insert(
        "alternate-exchange".into(),
        AMQPValue::LongString(UNROUTABLE_EXCHANGE.into()),
    );
    let exchanges = [
        (UNROUTABLE_EXCHANGE, ExchangeKind::Fanout, FieldTable::default()),
        (EVENTS_EXCHANGE, ExchangeKind::Topic, events_args),
        (RETRY_EXCHANGE, ExchangeKind::Direct, FieldTable::default()),
        (DEAD_EXCHANGE, ExchangeKind::Fanout, FieldTable::default()),
    ];
    for (name, kind, args) in exchanges {
        channel
            .exchange_declare(name.into(), kind, durable_exchange(), args)
            .await?;
    }
    let mut bindings = vec![
        (UNROUTABLE_QUEUE.to_owned(), UNROUTABLE_EXCHANGE, String::new()),
        (DEAD_QUEUE.to_owned(), DEAD_EXCHANGE, String::new()),
    ];
    for (queue, key) in layout.retry_bindings() {
        bindings.push((queue, RETRY_EXCHANGE, key));
    }
    for (queue, exchange, key) in bindings {
        declare_bound_queue(channel, &queue, exchange, &key).await?;
    }
    declare_dispatch(channel, layout).await
}

/// A confirm-mode channel for moving messages between queues.
async fn moving_channel(conn: &Connection, what: &str) -> Result<Channel, lapin::Error> {
    startup::amqp_within(startup::AMQP_SETUP_LIMIT, what, async {
        let channel = conn.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(channel)
    })
    .await
}

async fn declare_bound_queue(channel: &Channel, queue: &str, source: &str, key: &str) -> Result<(), lapin::Error> {
    channel
        .queue_declare(queue.into(), durable_queue(), FieldTable::default())
        .await?;
    channel
        .queue_bind(
            queue.into(),
            source.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// The dispatch queue, or the sharding exchange and its queues. Whichever layout came before,
/// the new routes are bound before the old one is removed, so an event published meanwhile is
/// at worst routed twice (and delivered once more), never unroutable.
async fn declare_dispatch(channel: &Channel, layout: Layout) -> Result<(), lapin::Error> {
    if !layout.sharded() {
        declare_bound_queue(channel, DISPATCH_QUEUE, EVENTS_EXCHANGE, "#").await?;
        // Deleting a missing exchange is no error. The shard queues a sharded layout left
        // stop receiving events here; `retire` moves what they hold.
        return channel
            .exchange_delete(DISPATCH_SHARDS_EXCHANGE.into(), ExchangeDeleteOptions::default())
            .await;
    }
    let mut args = FieldTable::default();
    args.insert("hash-property".into(), AMQPValue::LongString("message_id".into()));
    channel
        .exchange_declare(
            DISPATCH_SHARDS_EXCHANGE.into(),
            ExchangeKind::Custom(CONSISTENT_HASH.into()),
            durable_exchange(),
            args,
        )
        .await
        .inspect_err(|e| {
            tracing::error!(error = %e, "LAABAM_DISPATCH_QUEUES > 1 needs RabbitMQ's consistent-hash exchange: rabbitmq-plugins enable rabbitmq_consistent_hash_exchange");
        })?;
    channel
        .exchange_bind(
            DISPATCH_SHARDS_EXCHANGE.into(),
            EVENTS_EXCHANGE.into(),
            "#".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    for queue in layout.routed_dispatch_queues() {
        declare_bound_queue(channel, &queue, DISPATCH_SHARDS_EXCHANGE, SHARD_WEIGHT).await?;
    }
    // The single layout's queue stays declared and consumed but no longer gets every event:
    // left bound, it would take a copy of each that nobody acknowledges once drained.
    channel
        .queue_declare(DISPATCH_QUEUE.into(), durable_queue(), FieldTable::default())
        .await?;
    channel
        .queue_unbind(
            DISPATCH_QUEUE.into(),
            EVENTS_EXCHANGE.into(),
            "#".into(),
            FieldTable::default(),
        )
        .await
}
