//! Reaching RabbitMQ and Redis: a bounded wait at start (then one clear error line naming
//! what could not be reached), and plain connects for reconnect loops afterwards.

use crate::config::redact_url;
use lapin::{Connection, ConnectionProperties};
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// A dependency that could not be reached within the start-up wait.
#[derive(Debug, thiserror::Error)]
#[error("could not reach {service} at {url} within {waited:?}: {cause}")]
pub struct Unreachable {
    pub service: &'static str,
    pub url: String,
    pub waited: Duration,
    pub cause: String,
}

/// Retries `attempt` with backoff until it succeeds or `wait` has passed.
pub async fn within<T, E, F, Fut>(
    service: &'static str,
    url: &str,
    wait: Duration,
    mut attempt: F,
) -> Result<T, Unreachable>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let deadline = Instant::now() + wait;
    let mut pause = Duration::from_millis(100);
    loop {
        let err = match tokio::time::timeout_at(deadline, attempt()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_owned(),
        };
        if Instant::now() + pause >= deadline {
            return Err(Unreachable {
                service,
                url: redact_url(url),
                waited: wait,
                cause: err,
            });
        }
        tracing::info!(service, url = %redact_url(url), error = %err, "waiting for dependency");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// One AMQP connection attempt, named so the broker's management view shows who is who.
pub async fn amqp_connect(url: &str, name: &str) -> Result<Connection, lapin::Error> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url, props).await
}

/// The first AMQP connection of a process, waiting up to `wait` for the broker.
pub async fn amqp_connect_within(url: &str, name: &str, wait: Duration) -> Result<Connection, Unreachable> {
    within("RabbitMQ", url, wait, || amqp_connect(url, name)).await
}
