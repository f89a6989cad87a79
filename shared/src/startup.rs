//! Reaching RabbitMQ and Redis: a bounded wait at start (then one clear error line naming
//! what could not be reached), and plain connects for reconnect loops afterwards.

use crate::config::redact_url;
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Exponential pauses between reconnection attempts: 100 ms doubling to 5 s, reset on success.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: Self::FIRST }
    }
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    /// The pause the next [`Self::pause`] will take.
    pub fn upcoming(&self) -> Duration {
        self.next
    }

    /// Sleeps for the next pause (cut short by `shutdown`) and lengthens the one after.
    pub async fn pause(&mut self, shutdown: &CancellationToken) {
        crate::shutdown::pause(self.next, shutdown).await;
        self.next = (self.next * 2).min(Self::MAX);
    }

    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

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
    let mut backoff = Backoff::default();
    let never = CancellationToken::new();
    loop {
        let err = match tokio::time::timeout_at(deadline, attempt()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_owned(),
        };
        if Instant::now() + backoff.upcoming() >= deadline {
            return Err(Unreachable {
                service,
                url: redact_url(url),
                waited: wait,
                cause: err,
            });
        }
        tracing::info!(service, url = %redact_url(url), error = %err, "waiting for dependency");
        backoff.pause(&never).await;
    }
}

/// How long one AMQP connection attempt may take. lapin sets no limit of its own, and a broker
/// that accepts the TCP connection but never finishes the handshake (a node booting or shutting
/// down) would otherwise hold a reconnect loop, and every delivery waiting on it, forever.
pub const AMQP_CONNECT_LIMIT: Duration = Duration::from_secs(15);

/// The heartbeat (seconds) asked of the broker when the URL names none (`?heartbeat=N`; the
/// lower of the two sides' offers is used). A node that hangs with its connections open (a
/// paused VM, a network that drops packets without closing anything) is then given up after
/// two silent beats, about 20 s. Without it lapin takes the broker's, RabbitMQ's 60 s, and a
/// publish waiting on a hung node was held 120 s before its connection failed.
pub const AMQP_HEARTBEAT_SECS: u16 = 10;

/// One AMQP connection attempt, named so the broker's management view shows who is who, and
/// bounded by [`AMQP_CONNECT_LIMIT`].
pub async fn amqp_connect(url: &str, name: &str) -> Result<Connection, lapin::Error> {
    amqp_connect_bounded(url, name, AMQP_CONNECT_LIMIT).await
}

async fn amqp_connect_bounded(url: &str, name: &str, limit: Duration) -> Result<Connection, lapin::Error> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let uri = with_heartbeat(url)?;
    amqp_within(
        limit,
        "complete the AMQP handshake",
        Connection::connect_uri(uri, props),
    )
    .await
}

/// `url` parsed, with [`AMQP_HEARTBEAT_SECS`] asked for unless it names a heartbeat itself.
fn with_heartbeat(url: &str) -> Result<AMQPUri, lapin::Error> {
    let mut uri: AMQPUri = url
        .parse()
        .map_err(|e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    uri.query.heartbeat.get_or_insert(AMQP_HEARTBEAT_SECS);
    Ok(uri)
}

/// How long opening a session on a fresh connection (channels, topology, QoS, consumers,
/// confirms) may take. Each step waits for the broker's answer with no limit of its own; a node
/// that is still recovering its queues can leave one unanswered, and a process would then sit
/// connected and silent, neither consuming nor reconnecting.
pub const AMQP_SETUP_LIMIT: Duration = Duration::from_secs(30);

/// How long the broker may take to confirm what was published. A publish never confirmed counts
/// as failed: the caller keeps (or reports) what it published and may send it again, which is
/// the at-least-once contract, rather than holding it and its caller forever.
pub const AMQP_CONFIRM_LIMIT: Duration = Duration::from_secs(30);

/// Runs a broker exchange, turning a broker that does not answer within `limit` into an
/// error, so the caller's reconnect loop goes on instead of waiting forever.
pub async fn amqp_within<T>(
    limit: Duration,
    what: &str,
    exchange: impl Future<Output = Result<T, lapin::Error>>,
) -> Result<T, lapin::Error> {
    match tokio::time::timeout(limit, exchange).await {
        Ok(answered) => answered,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the broker did not {what} within {limit:?}"),
        )
        .into()),
    }
}

/// How long closing an AMQP connection may take before it is abandoned.
pub const AMQP_CLOSE_LIMIT: Duration = Duration::from_secs(2);

/// Closes a connection, giving up after [`AMQP_CLOSE_LIMIT`]. After the broker closed the
/// connection itself (a node shutting down), lapin's close can wait for an answer that never
/// comes; a reconnect loop or a shutdown waiting on it would then never go on. Errors are
/// dropped: the connection is being abandoned either way.
pub async fn amqp_close(connection: &Connection, reason: &str) {
    let _ = tokio::time::timeout(AMQP_CLOSE_LIMIT, connection.close(200, reason.into())).await;
}

/// The first AMQP connection of a process, waiting up to `wait` for the broker.
pub async fn amqp_connect_within(url: &str, name: &str, wait: Duration) -> Result<Connection, Unreachable> {
    within("RabbitMQ", url, wait, || amqp_connect(url, name)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener that accepts connections and never speaks: the attempt ends with an error.
    #[tokio::test]
    async fn a_broker_that_never_answers_the_handshake_is_an_error_not_a_hang() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = tokio::spawn(async move {
            let mut sockets = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                sockets.push(socket);
            }
        });
        let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
        let started = Instant::now();
        let err = amqp_connect_bounded(&url, "t", Duration::from_millis(300))
            .await
            .expect_err("no handshake, no connection");
        assert!(err.to_string().contains("did not complete the AMQP handshake"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        held.abort();
    }

    #[test]
    fn the_heartbeat_is_asked_for_unless_the_url_names_one() {
        let plain = with_heartbeat("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(plain.query.heartbeat, Some(AMQP_HEARTBEAT_SECS));
        let named = with_heartbeat("amqp://127.0.0.1:5672/%2f?heartbeat=30&frame_max=8192").unwrap();
        assert_eq!((named.query.heartbeat, named.query.frame_max), (Some(30), Some(8192)));
        assert_eq!(named.vhost, "/");
        let err = with_heartbeat("http://127.0.0.1/").expect_err("not an AMQP URL");
        assert!(err.to_string().contains("http"), "{err}");
    }
}
