//! The RabbitMQ topology. Every process declares it with identical arguments (declaring is
//! idempotent only when arguments match), so any of them may start first.
//!
//! ```text
//! publishers ─▶ laabam.events (topic) ──#──▶ laabam.dispatch ─▶ dispatchers
//!                   └─ alternate-exchange ─▶ laabam.unroutable (fanout) ─▶ laabam.unroutable
//! scheduler  ─▶ laabam.retries (direct) ─retry─▶ laabam.retries ─▶ dispatchers
//! dispatcher ─▶ laabam.dead (fanout) ─▶ laabam.dead       (poison messages, with a reason header)
//! ```

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

/// The publishers' whole contract: routing key = event type, body = envelope JSON.
pub const EVENTS_EXCHANGE: &str = "laabam.events";
/// Keeps what `laabam.events` could not route, instead of dropping it.
pub const UNROUTABLE_EXCHANGE: &str = "laabam.unroutable";
pub const UNROUTABLE_QUEUE: &str = "laabam.unroutable";
/// Bound with `#`, so unknown types reach a dispatcher and are dead-lettered with a reason.
pub const DISPATCH_QUEUE: &str = "laabam.dispatch";
/// Retry jobs travel apart from events and never pass through `laabam.events`.
pub const RETRY_EXCHANGE: &str = "laabam.retries";
pub const RETRY_QUEUE: &str = "laabam.retries";
pub const RETRY_ROUTING_KEY: &str = "retry";
pub const DEAD_EXCHANGE: &str = "laabam.dead";
pub const DEAD_QUEUE: &str = "laabam.dead";
/// Restricts an event's fan-out to one endpoint of its account: how test sends travel the
/// real pipeline without reaching the account's other endpoints.
pub const TARGET_ENDPOINT_HEADER: &str = "x-laabam-endpoint";
/// Why a message was dead-lettered.
pub const DEAD_REASON_HEADER: &str = "x-laabam-dead-reason";

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

/// Declares every exchange, queue and binding.
pub async fn declare(channel: &Channel) -> Result<(), lapin::Error> {
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
    let bindings = [
        (UNROUTABLE_QUEUE, UNROUTABLE_EXCHANGE, ""),
        (DISPATCH_QUEUE, EVENTS_EXCHANGE, "#"),
        (RETRY_QUEUE, RETRY_EXCHANGE, RETRY_ROUTING_KEY),
        (DEAD_QUEUE, DEAD_EXCHANGE, ""),
    ];
    for (queue, exchange, key) in bindings {
        channel
            .queue_declare(queue.into(), durable_queue(), FieldTable::default())
            .await?;
        channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}
