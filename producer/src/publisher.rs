//! Publishing events to `laabam.events`: validated, persistent, and confirmed by the broker.

use crate::metrics::METRICS;
use laabam_shared::envelope::Envelope;
use laabam_shared::ids::EndpointId;
use laabam_shared::startup::{self, Unreachable};
use laabam_shared::topology;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use std::time::Duration;
use tokio::sync::Mutex;

/// Why an event may not have reached the broker. The caller should publish it again: the
/// event id makes a second publish harmless.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("RabbitMQ: {0}")]
    Broker(#[from] lapin::Error),
    #[error("RabbitMQ refused the event (negative confirm)")]
    Nacked,
}

/// A publisher holding one confirm-mode channel; safe to share between tasks.
#[derive(Debug)]
pub struct Publisher {
    url: String,
    name: String,
    layout: topology::Layout,
    /// The live connection and channel; `None` after a failure, until the next publish
    /// reconnects.
    link: Mutex<Option<(Connection, Channel)>>,
}

/// Persistent, typed and stamped, as the AMQP contract recommends; addressed to one endpoint
/// when `target` is given.
fn properties(envelope: &Envelope, target: Option<&EndpointId>) -> BasicProperties {
    let ts_secs = laabam_shared::clock::parse_rfc3339_ms(&envelope.timestamp).unwrap_or(0) / 1000;
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"))
        .with_message_id(ShortString::from(envelope.id.as_str()))
        .with_timestamp(ts_secs.max(0) as u64);
    match target {
        Some(endpoint) => {
            let mut headers = FieldTable::default();
            headers.insert(
                topology::TARGET_ENDPOINT_HEADER.into(),
                AMQPValue::LongString(endpoint.as_str().into()),
            );
            props.with_headers(headers)
        }
        None => props,
    }
}

async fn open(url: &str, name: &str, layout: topology::Layout) -> Result<(Connection, Channel), lapin::Error> {
    let conn = startup::amqp_connect(url, name).await?;
    let channel = topology::publishing_channel(&conn, layout).await?;
    Ok((conn, channel))
}

impl Publisher {
    /// Connects (waiting up to `wait` for the broker) and declares the topology, so events
    /// published before any dispatcher starts are kept.
    pub async fn connect(url: &str, wait: Duration, layout: topology::Layout) -> Result<Self, Unreachable> {
        let name = "laabam-producer";
        let link = startup::within("RabbitMQ", url, wait, || open(url, name, layout)).await?;
        Ok(Publisher {
            url: url.to_owned(),
            name: name.to_owned(),
            layout,
            link: Mutex::new(Some(link)),
        })
    }

    async fn channel(&self) -> Result<Channel, lapin::Error> {
        let mut link = self.link.lock().await;
        if let Some((conn, channel)) = link.as_ref()
            && conn.status().connected()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        *link = None;
        let (conn, channel) = open(&self.url, &self.name, self.layout).await?;
        *link = Some((conn, channel.clone()));
        Ok(channel)
    }

    async fn forget_link(&self) {
        *self.link.lock().await = None;
    }

    /// Whether the broker connection is up now (readiness probes).
    pub async fn is_connected(&self) -> bool {
        match self.link.lock().await.as_ref() {
            Some((conn, channel)) => conn.status().connected() && channel.status().connected(),
            None => false,
        }
    }

    /// Publishes and returns once the broker has confirmed the event. After a broker restart
    /// the next call reconnects.
    pub async fn publish(&self, envelope: &Envelope) -> Result<(), PublishError> {
        self.publish_to(envelope, None).await
    }

    /// Publishes an event that only `target` (an endpoint of the event's account) receives: how
    /// test sends travel the real pipeline.
    pub async fn publish_to(&self, envelope: &Envelope, target: Option<&EndpointId>) -> Result<(), PublishError> {
        let started = std::time::Instant::now();
        let result = async {
            let channel = self.channel().await?;
            let confirm = channel
                .basic_publish(
                    topology::EVENTS_EXCHANGE.into(),
                    envelope.event_type.as_str().into(),
                    BasicPublishOptions::default(),
                    &envelope.to_json(),
                    properties(envelope, target),
                )
                .await?;
            let confirm = startup::amqp_within(startup::AMQP_CONFIRM_LIMIT, "confirm the event", confirm).await?;
            if confirm.is_ack() {
                Ok(())
            } else {
                Err(PublishError::Nacked)
            }
        }
        .await;
        let label = if result.is_ok() { "confirmed" } else { "failed" };
        METRICS
            .published
            .with_label_values(&[&envelope.event_type, label])
            .inc();
        METRICS.confirm_seconds.observe(started.elapsed().as_secs_f64());
        match &result {
            Ok(()) => tracing::debug!(event_id = %envelope.id, event_type = %envelope.event_type, "event published"),
            Err(e) => {
                tracing::warn!(event_id = %envelope.id, error = %e, "event not confirmed by the broker");
                self.forget_link().await;
            }
        }
        result
    }
}
