//! Moving what a queue holds back through an exchange: every message confirmed before it is
//! acknowledged, so a failure leaves it where it was, or at worst in both places (at least
//! once). Only what the queue held when the move began is moved: should something still route
//! into it, or should a moved message come back to it (a dead letter still poison), an
//! unbounded loop would never end.

use super::{EVENTS_EXCHANGE, ORIGINAL_EXCHANGE_HEADER, RETRY_EXCHANGE, RETRY_ROUTING_KEY};
use crate::startup;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions};
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Channel, Confirmation};

/// How many messages are moved between two waits for the broker's confirms.
const MOVE_BATCH: u64 = 500;

#[derive(Debug, thiserror::Error)]
pub enum MoveError {
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

/// Where a moved message goes back in.
#[derive(Debug, Clone, Copy)]
pub(super) enum Destination {
    /// Events are published again as publishers sent them, so the current layout routes them.
    Events,
    /// Retry jobs go to the single layout's retry queue, which every dispatcher consumes.
    Retries,
    /// Where it was first published: the exchange a dead letter names in its header (events or
    /// retry jobs), otherwise `laabam.events`, with its routing key. The reason headers stay
    /// until a new dead-lettering replaces them.
    Original,
}

/// Moves the `held` messages `queue` held, in batches; returns how many moved.
pub(super) async fn move_held(
    channel: &Channel,
    queue: &str,
    held: u64,
    destination: Destination,
) -> Result<u64, MoveError> {
    let mut moved = 0;
    while moved < held {
        let batch = (held - moved).min(MOVE_BATCH);
        match move_batch(channel, queue, destination, batch).await? {
            0 => break,
            count => moved += count,
        }
    }
    Ok(moved)
}

/// The exchange and routing key `destination` sends a message got from a queue to.
fn address<'a>(
    destination: Destination,
    routing_key: &'a str,
    properties: &BasicProperties,
) -> (&'static str, &'a str) {
    match destination {
        Destination::Events => (EVENTS_EXCHANGE, routing_key),
        Destination::Retries => (RETRY_EXCHANGE, RETRY_ROUTING_KEY),
        Destination::Original => {
            let first = properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(ORIGINAL_EXCHANGE_HEADER));
            match first {
                Some(AMQPValue::LongString(exchange)) if exchange.as_bytes() == RETRY_EXCHANGE.as_bytes() => {
                    (RETRY_EXCHANGE, routing_key)
                }
                _ => (EVENTS_EXCHANGE, routing_key),
            }
        }
    }
}

/// Moves up to `limit` messages; fewer once the queue is empty.
async fn move_batch(channel: &Channel, queue: &str, destination: Destination, limit: u64) -> Result<u64, MoveError> {
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
        let (exchange, routing_key) = address(destination, delivery.routing_key.as_str(), &delivery.properties);
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
        Err(MoveError::NotMoved {
            queue: queue.to_owned(),
        })
    }
}
