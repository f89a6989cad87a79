//! Publishing events to `laabam.events`: validated, persistent, and confirmed by the broker.

use crate::metrics::METRICS;
use laabam_shared::envelope::Envelope;
use laabam_shared::ids::EndpointId;
use laabam_shared::publish_link::{LinkError, PublishLink};
use laabam_shared::startup::Unreachable;
use laabam_shared::topology;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use std::time::Duration;

/// Why an event may not have reached the broker. The caller should publish it again: the
/// event id makes a second publish harmless.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("RabbitMQ: {0}")]
    Broker(#[from] lapin::Error),
    /// A resource alarm blocks publishing: answered at once instead of at the confirm limit.
    /// Only the first event after the alarm began may have been sent (and may arrive when it
    /// clears); the rest are refused unsent.
    #[error("{0}")]
    Blocked(LinkError),
    #[error("RabbitMQ refused the event (negative confirm)")]
    Nacked,
}

impl From<LinkError> for PublishError {
    fn from(e: LinkError) -> Self {
        match e {
            LinkError::Broker(e) => PublishError::Broker(e),
            blocked => PublishError::Blocked(blocked),
        }
    }
}

/// A publisher holding one confirm-mode channel; safe to share between tasks.
#[derive(Debug)]
pub struct Publisher {
    link: PublishLink,
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

impl Publisher {
    /// Connects (waiting up to `wait` for the broker) and declares the topology, so events
    /// published before any dispatcher starts are kept.
    pub async fn connect(url: &str, wait: Duration, layout: topology::Layout) -> Result<Self, Unreachable> {
        let link = PublishLink::connect(url, "laabam-producer", layout, wait).await?;
        Ok(Publisher { link })
    }

    /// Whether the broker connection is up now (readiness probes).
    pub async fn is_connected(&self) -> bool {
        self.link.is_connected().await
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
            let confirm = self
                .link
                .channel()
                .await?
                .publish(
                    topology::EVENTS_EXCHANGE,
                    &envelope.event_type,
                    &envelope.to_json(),
                    properties(envelope, target),
                    "confirm the event",
                )
                .await?;
            if confirm.is_ack() {
                Ok(())
            } else {
                Err(PublishError::Nacked)
            }
        }
        .await;
        let label = match &result {
            Ok(()) => "confirmed",
            Err(PublishError::Blocked(_)) => "blocked",
            Err(_) => "failed",
        };
        METRICS
            .published
            .with_label_values(&[&envelope.event_type, label])
            .inc();
        METRICS.confirm_seconds.observe(started.elapsed().as_secs_f64());
        match &result {
            Ok(()) => tracing::debug!(event_id = %envelope.id, event_type = %envelope.event_type, "event published"),
            Err(e @ PublishError::Blocked(_)) => {
                tracing::warn!(event_id = %envelope.id, error = %e, "event not published");
            }
            Err(e) => {
                tracing::warn!(event_id = %envelope.id, error = %e, "event not confirmed by the broker");
                self.link.forget().await;
            }
        }
        result
    }
}
