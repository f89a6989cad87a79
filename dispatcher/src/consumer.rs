//! The broker side of the dispatcher: one connection that only consumes (a consumer on each
//! event queue and one on the retry queue, manual acks, bounded prefetch, reconnection with
//! backoff), and dead letters published on a connection of their own, so a resource alarm that
//! blocks publishing never stops deliveries (see [`PublishLink`]).

use crate::acks::{Acks, Settle};
use crate::metrics::METRICS;
use crate::pipeline::{Disposition, Handled, Pipeline};
use futures_util::StreamExt;
use laabam_shared::envelope::Provenance;
use laabam_shared::ids::EndpointId;
use laabam_shared::ops::Readiness;
use laabam_shared::publish_link::{LinkError, PublishLink};
use laabam_shared::startup::{self, Backoff};
use laabam_shared::topology;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, Consumer};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How the consumer loop is set up.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub amqp_url: String,
    pub layout: topology::Layout,
    pub max_in_flight: usize,
    pub shutdown_grace: Duration,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker ended the consumer")]
    ConsumerEnded,
}

#[derive(Debug, thiserror::Error)]
enum DeadLetterError {
    #[error("{0}")]
    Link(#[from] LinkError),
    #[error("the broker refused the dead letter (negative confirm)")]
    Nacked,
}

#[derive(Debug, Clone, Copy)]
enum Source {
    Events,
    Retries,
}

/// Consumes until `shutdown`, reconnecting after any broker failure; then drains in-flight
/// work for at most the shutdown grace.
pub async fn run(
    pipeline: Arc<Pipeline>,
    settings: ConsumerSettings,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(settings.max_in_flight.max(1)));
    let mut backoff = Backoff::default();
    while !shutdown.is_cancelled() {
        match session(
            &pipeline,
            &settings,
            &readiness,
            &tracker,
            &slots,
            &shutdown,
            &mut backoff,
        )
        .await
        {
            Ok(()) => break,
            Err(e) => {
                readiness.set_broker(false);
                METRICS.consuming.set(0);
                tracing::warn!(error = %e, retry_in = ?backoff.upcoming(), "broker session ended; reconnecting");
                backoff.pause(&shutdown).await;
            }
        }
    }
    readiness.set_broker(false);
}

fn consume_options() -> BasicConsumeOptions {
    // Manual acks: a message is acknowledged only once its deliveries are begun in Redis.
    BasicConsumeOptions::default()
}

async fn session(
    pipeline: &Arc<Pipeline>,
    settings: &ConsumerSettings,
    readiness: &Readiness,
    tracker: &TaskTracker,
    slots: &Arc<Semaphore>,
    shutdown: &CancellationToken,
    backoff: &mut Backoff,
) -> Result<(), SessionError> {
    let opened = startup::amqp_within(startup::AMQP_SETUP_LIMIT, "open the consumer session", open(settings)).await?;
    // Connected on the first poison message, and closed with the session.
    let dead_letters = Arc::new(PublishLink::new(
        &settings.amqp_url,
        "laabam-dispatcher-dead-letters",
        settings.layout,
    ));
    let (events_acks, events_acker) = Acks::start(opened.events_channel.clone());
    let (retry_acks, retry_acker) = Acks::start(opened.retry_channel.clone());
    // Retry jobs and events take turns: neither waits for the other stream to run dry, so
    // retries coming due by the thousand (an endpoint back after an outage) never hold back new
    // events, nor the reverse. Each stream ends with a `None` of its own, so the session
    // notices either kind of consumer ending.
    let tagged = |source: Source, consumers: Vec<Consumer>| {
        futures_util::stream::select_all(consumers)
            .map(Some)
            .chain(futures_util::stream::iter([None]))
            .map(move |next| (source, next))
    };
    let mut messages = futures_util::stream::select(
        tagged(Source::Retries, opened.retry_consumers),
        tagged(Source::Events, opened.event_consumers),
    );
    readiness.set_broker(true);
    METRICS.consuming.set(1);
    backoff.reset();
    tracing::info!("consuming events and retry jobs");

    loop {
        let slot = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => slot.expect("the slot semaphore is never closed"),
        };
        let (source, next) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            next = messages.next() => next.expect("each stream yields its closing None before both end"),
        };
        let delivery = match next {
            None => return Err(SessionError::ConsumerEnded),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(d)) => d,
        };
        let pipeline = pipeline.clone();
        let dead_letters = dead_letters.clone();
        let acks = match source {
            Source::Events => events_acks.clone(),
            Source::Retries => retry_acks.clone(),
        };
        tracker.spawn(async move {
            handle(&pipeline, &dead_letters, &acks, source, delivery, slot).await;
        });
    }

    // Shutdown: stop deliveries, let in-flight work finish (or its leases hand it back), close.
    METRICS.consuming.set(0);
    for (channel, tags) in [
        (&opened.events_channel, &opened.events_tags),
        (&opened.retry_channel, &opened.retry_tags),
    ] {
        for consumer_tag in tags {
            let _ = channel
                .basic_cancel(consumer_tag.as_str().into(), BasicCancelOptions::default())
                .await;
        }
    }
    tracker.close();
    if tokio::time::timeout(settings.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace elapsed with attempts in flight; their leases will retry them");
    }
    // Every message handled so far is settled: send the last acknowledgements before closing.
    drop((events_acks, retry_acks));
    for acker in [events_acker, retry_acker] {
        let _ = tokio::time::timeout(Duration::from_secs(2), acker).await;
    }
    dead_letters.close("shutdown").await;
    startup::amqp_close(&opened.conn, "shutdown").await;
    Ok(())
}

/// A consumer session's connection, channels and consumers, ready to run.
struct Opened {
    conn: Connection,
    events_channel: Channel,
    retry_channel: Channel,
    events_tags: Vec<String>,
    event_consumers: Vec<Consumer>,
    retry_tags: Vec<String>,
    retry_consumers: Vec<Consumer>,
}

async fn open(settings: &ConsumerSettings) -> Result<Opened, lapin::Error> {
    let conn = startup::amqp_connect(&settings.amqp_url, "laabam-dispatcher").await?;
    let setup = conn.create_channel().await?;
    topology::declare(&setup, settings.layout).await?;
    let (events_channel, events_tags, event_consumers) =
        consume_all(&conn, settings.layout.dispatch_queues(), settings.max_in_flight).await?;
    let (retry_channel, retry_tags, retry_consumers) =
        consume_all(&conn, settings.layout.retry_queues(), settings.max_in_flight).await?;
    Ok(Opened {
        conn,
        events_channel,
        retry_channel,
        events_tags,
        event_consumers,
        retry_tags,
        retry_consumers,
    })
}

/// Consumes every queue of one kind on a new channel; returns the channel, the consumer tags (to
/// cancel at shutdown) and the consumers.
///
/// Prefetch bounds what the broker pushes ahead of processing, and RabbitMQ applies it to each
/// consumer (a channel-wide limit is costlier, and quorum queues refuse it), so the in-flight
/// cap is shared out among the queues: however many queues a layout has, at most about that
/// many messages of each kind wait unacknowledged in this process. A prefetch of the whole cap
/// on each of 2N+2 queues would let a sharded dispatcher buffer (2N+2) times as many, up to the
/// event size limit each.
async fn consume_all(
    conn: &Connection,
    queues: Vec<String>,
    max_in_flight: usize,
) -> Result<(Channel, Vec<String>, Vec<Consumer>), lapin::Error> {
    let channel = conn.create_channel().await?;
    let prefetch = max_in_flight.div_ceil(queues.len().max(1)).clamp(1, u16::MAX as usize) as u16;
    channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut tags = Vec::new();
    let mut consumers = Vec::new();
    for queue in queues {
        let tag = format!("laabam-dispatcher-{}-{queue}-{}", std::process::id(), ulid::Ulid::new());
        consumers.push(
            channel
                .basic_consume(
                    queue.as_str().into(),
                    tag.as_str().into(),
                    consume_options(),
                    FieldTable::default(),
                )
                .await?,
        );
        tags.push(tag);
    }
    Ok((channel, tags, consumers))
}

fn provenance(delivery: &Delivery) -> Provenance {
    Provenance {
        message_id: delivery.properties.message_id().as_ref().map(|s| s.as_str().to_owned()),
        amqp_timestamp: *delivery.properties.timestamp(),
        routing_key: Some(delivery.routing_key.as_str().to_owned()),
    }
}

/// The endpoint a test send is addressed to, from [`topology::TARGET_ENDPOINT_HEADER`].
fn target(delivery: &Delivery) -> Option<EndpointId> {
    let headers = delivery.properties.headers().as_ref()?;
    match headers.inner().get(topology::TARGET_ENDPOINT_HEADER)? {
        AMQPValue::LongString(s) => EndpointId::parse(s.to_string()).ok(),
        AMQPValue::ShortString(s) => EndpointId::parse(s.as_str()).ok(),
        _ => None,
    }
}

/// Settles one message, then runs its attempts. The message's slot is freed once it is settled:
/// attempts are bounded by the pipeline's own in-flight limit, so a slow attempt never keeps
/// the consumer from taking the next message.
async fn handle(
    pipeline: &Pipeline,
    dead_letters: &PublishLink,
    acks: &Acks,
    source: Source,
    delivery: Delivery,
    slot: OwnedSemaphorePermit,
) {
    let Handled { disposition, attempts } = match source {
        Source::Events => {
            pipeline
                .handle_event(&delivery.data, &provenance(&delivery), target(&delivery))
                .await
        }
        Source::Retries => pipeline.handle_retry(&delivery.data).await,
    };
    let tag = delivery.delivery_tag;
    match disposition {
        Disposition::Ack => acks.settle(Settle::Ack(tag)),
        Disposition::DeadLetter { reason, detail } => {
            let message_id = delivery.properties.message_id().as_ref().map(|id| id.as_str());
            tracing::warn!(reason, detail = %detail, message_id, routing_key = %delivery.routing_key, bytes = delivery.data.len(), "message dead-lettered");
            METRICS.dead_letters.with_label_values(&[reason]).inc();
            // Dead letters are confirmed before the original is acknowledged, so none is lost.
            match dead_letter(dead_letters, &delivery, reason, &detail).await {
                Ok(()) => acks.settle(Settle::Ack(tag)),
                Err(e) => {
                    tracing::error!(error = %e, message_id, "could not dead-letter; handing the message back");
                    if !matches!(&e, DeadLetterError::Link(e) if e.is_blocked()) {
                        dead_letters.forget().await;
                    }
                    // It comes straight back: a pause keeps an alarm or outage from spinning on it.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    acks.settle(Settle::Requeue(tag));
                }
            }
        }
        Disposition::Requeue(_) => {
            // Logged by the pipeline inside the message's span, with its ids.
            tokio::time::sleep(Duration::from_secs(1)).await;
            acks.settle(Settle::Requeue(tag));
        }
    }
    drop(slot);
    pipeline.run_attempts(attempts).await;
}

/// Republishes the original body and properties to the dead-letter exchange with the reason.
async fn dead_letter(
    link: &PublishLink,
    delivery: &Delivery,
    reason: &str,
    detail: &str,
) -> Result<(), DeadLetterError> {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(
        topology::DEAD_REASON_HEADER.into(),
        AMQPValue::LongString(reason.into()),
    );
    headers.insert(
        topology::DEAD_DETAIL_HEADER.into(),
        AMQPValue::LongString(detail.into()),
    );
    headers.insert(
        topology::ORIGINAL_EXCHANGE_HEADER.into(),
        AMQPValue::LongString(delivery.exchange.as_str().into()),
    );
    let properties: BasicProperties = delivery.properties.clone().with_headers(headers).with_delivery_mode(2);
    let confirm = link
        .channel()
        .await?
        .publish(
            topology::DEAD_EXCHANGE,
            delivery.routing_key.as_str(),
            &delivery.data,
            properties,
            "confirm the dead letter",
        )
        .await?;
    if confirm.is_ack() {
        Ok(())
    } else {
        Err(DeadLetterError::Nacked)
    }
}
