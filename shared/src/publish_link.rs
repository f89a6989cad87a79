//! A confirm-mode publishing channel on a connection of its own, opened on first use and again
//! after a failure.
//!
//! Of its own, because a RabbitMQ memory or disk alarm blocks every connection that publishes
//! (the broker stops reading from it) until the alarm clears, and a connection that also
//! consumes then stops acknowledging, so its consumers stop receiving: the queues that could
//! drain and end the alarm are left to grow. Connections that only consume are never blocked.

use crate::startup::{self, Unreachable};
use crate::topology;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionStatus};
use std::time::Duration;
use tokio::sync::Mutex;

/// Why a publish through a link failed, or was not tried.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("RabbitMQ: {0}")]
    Broker(#[from] lapin::Error),
    /// The broker announced (`connection.blocked`) that it reads nothing this connection sends
    /// until a resource alarm clears. Nothing is sent meanwhile: a message written to a blocked
    /// connection would wait unconfirmed, be reported as failed at the confirm limit, and still
    /// reach the broker when the alarm clears, so its publisher would send it twice.
    #[error("RabbitMQ is refusing publishes until a memory or disk alarm clears; nothing was sent")]
    Blocked,
    /// The broker blocked the connection after the message was sent (it announces the block
    /// only to a connection that publishes): the message may still reach it when the alarm
    /// clears. Reported at once rather than at the confirm limit; the connection is kept, so
    /// what follows is refused as [`LinkError::Blocked`] without being sent.
    #[error(
        "RabbitMQ blocked publishing for a memory or disk alarm before confirming; what was sent may still arrive when it clears"
    )]
    BlockedUnconfirmed,
}

impl LinkError {
    /// Whether the broker is blocking publishes: the connection is fine and should be kept, so
    /// that the next publishes are refused at once until the alarm clears.
    pub fn is_blocked(&self) -> bool {
        matches!(self, LinkError::Blocked | LinkError::BlockedUnconfirmed)
    }
}

/// How often a publish being waited for checks whether the broker blocked its connection.
const BLOCK_CHECK: Duration = Duration::from_millis(50);

/// A channel to publish on, with its connection's status, which tells a publish held up by a
/// resource alarm from one that is only slow.
#[derive(Debug)]
pub struct Publishing {
    channel: Channel,
    connection: ConnectionStatus,
}

impl Publishing {
    /// Publishes and waits for the broker's confirm: up to the confirm limit, or until the
    /// broker blocks the connection (lapin then holds what is not yet written until the alarm
    /// clears, so sending is raced against the block too).
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
        what: &str,
    ) -> Result<Confirmation, LinkError> {
        let sent = async {
            let confirm = self
                .channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    payload,
                    properties,
                )
                .await?;
            startup::amqp_within(startup::AMQP_CONFIRM_LIMIT, what, confirm).await
        };
        match until_blocked(&self.connection, sent).await {
            Some(answered) => Ok(answered?),
            None => Err(LinkError::BlockedUnconfirmed),
        }
    }
}

/// Runs `publishing` (sending, awaiting confirms) unless the broker blocks `connection` first:
/// `None` then, with what was sent perhaps reaching the broker when the alarm clears.
pub async fn until_blocked<T>(connection: &ConnectionStatus, publishing: impl Future<Output = T>) -> Option<T> {
    let blocked = async {
        loop {
            tokio::time::sleep(BLOCK_CHECK).await;
            if connection.blocked() {
                return;
            }
        }
    };
    tokio::select! {
        biased;
        answered = publishing => Some(answered),
        () = blocked => None,
    }
}

/// Shared by a process's publishing tasks; one connection, held behind a lock so a failure is
/// replaced once, not by every task that saw it.
#[derive(Debug)]
pub struct PublishLink {
    url: String,
    /// The connection's name in the broker's listings.
    name: String,
    layout: topology::Layout,
    link: Mutex<Option<(Connection, Channel)>>,
}

async fn open(url: &str, name: &str, layout: topology::Layout) -> Result<(Connection, Channel), lapin::Error> {
    let conn = startup::amqp_connect(url, name).await?;
    let channel = topology::publishing_channel(&conn, layout).await?;
    Ok((conn, channel))
}

/// Whether a link's connection and channel are both still open.
fn usable((conn, channel): &(Connection, Channel)) -> bool {
    conn.status().connected() && channel.status().connected()
}

impl PublishLink {
    /// A link that connects on first use.
    pub fn new(url: &str, name: &str, layout: topology::Layout) -> Self {
        PublishLink {
            url: url.to_owned(),
            name: name.to_owned(),
            layout,
            link: Mutex::new(None),
        }
    }

    /// A link connected now (waiting up to `wait` for the broker), with the topology declared,
    /// so what is published before any dispatcher starts is kept.
    pub async fn connect(url: &str, name: &str, layout: topology::Layout, wait: Duration) -> Result<Self, Unreachable> {
        let opened = startup::within("RabbitMQ", url, wait, || open(url, name, layout)).await?;
        let link = PublishLink::new(url, name, layout);
        *link.link.lock().await = Some(opened);
        Ok(link)
    }

    /// The channel to publish on, reconnecting if the last one failed; refused while the
    /// broker blocks the connection.
    pub async fn channel(&self) -> Result<Publishing, LinkError> {
        let mut link = self.link.lock().await;
        if !link.as_ref().is_some_and(usable) {
            *link = None;
            *link = Some(open(&self.url, &self.name, self.layout).await?);
        }
        let (conn, channel) = link.as_ref().expect("opened above");
        if conn.status().blocked() {
            return Err(LinkError::Blocked);
        }
        Ok(Publishing {
            channel: channel.clone(),
            connection: conn.status().clone(),
        })
    }

    /// Drops the connection after a publish failed, so the next publish opens a fresh one.
    pub async fn forget(&self) {
        *self.link.lock().await = None;
    }

    /// Whether the broker connection is up now (readiness probes).
    pub async fn is_connected(&self) -> bool {
        self.link.lock().await.as_ref().is_some_and(usable)
    }

    /// Closes the connection at shutdown.
    pub async fn close(&self, reason: &str) {
        if let Some((conn, _)) = self.link.lock().await.take() {
            startup::amqp_close(&conn, reason).await;
        }
    }
}
