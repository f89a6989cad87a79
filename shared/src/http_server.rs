//! Serving a router to HTTP/1 clients with bounds on their connections.
//!
//! `axum::serve` gives hyper no timer, and hyper then leaves its header timeout off: a client
//! that opens a connection and sends nothing, or drips a request's head a line at a time, or
//! keeps a connection idle after its last response, holds that connection (a socket and a task)
//! for ever. Enough of them take every file descriptor the process may open; the API then
//! accepts no one and cannot reconnect to Redis or RabbitMQ either. Here each connection has
//! [`ConnectionLimits::idle_timeout`] to send each request's head, counted from when it opens or
//! its previous response was sent, and at most [`ConnectionLimits::max_connections`] are open
//! at once: past that, new ones wait in the kernel's listen backlog for one to close.

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::io::ErrorKind;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower_service::Service;

/// How much of the server its clients' connections may take.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// How long a connection may take to send a request's head, from when it opens or from its
    /// previous response; it is closed after that. It is also the keep-alive idle timeout, so
    /// behind a load balancer it should exceed the balancer's own idle timeout, or the balancer
    /// may reuse a connection just as it is closed.
    pub idle_timeout: Duration,
    /// Connections open at once. Keep it below the process's open-file limit (`ulimit -n`)
    /// with room for its Redis and RabbitMQ connections.
    pub max_connections: usize,
    /// How long the requests in flight at shutdown may take to finish. A connection still open
    /// after it (a client dripping a request's head, a long request) is dropped, so a slow
    /// client cannot hold a deploy back for its whole idle timeout.
    pub shutdown_grace: Duration,
}

/// The server's "at the connection limit" warning is repeated at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Serves `router` to the clients `listener` accepts until `shutdown`, then lets the requests
/// in flight finish within the shutdown grace. Handlers can read the client's address as `ConnectInfo<SocketAddr>`.
pub async fn serve(listener: TcpListener, router: Router, limits: ConnectionLimits, shutdown: CancellationToken) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.idle_timeout);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut warned_at: Option<Instant> = None;
    loop {
        let Some(slot) = connection_slot(&slots, limits, &mut warned_at, &shutdown).await else {
            break;
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            // The client gave up before it was accepted.
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset) => continue,
            // Out of file descriptors or memory: nothing to do but wait for some to be freed.
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept connections; trying again in a second");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        // Responses leave in one write; without this a client's delayed ACK can hold the next.
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            router.clone().call(request)
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            // An error here is the client's (gone, malformed, too slow): hyper has answered or
            // closed as HTTP says, and nothing else is owed to it.
            let _ = connection.await;
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?limits.shutdown_grace, "connections still open after the shutdown grace are dropped");
    }
}

/// A slot for the next connection, waiting while every slot is taken; `None` at shutdown.
async fn connection_slot(
    slots: &Arc<Semaphore>,
    limits: ConnectionLimits,
    warned_at: &mut Option<Instant>,
    shutdown: &CancellationToken,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(slot) = slots.clone().try_acquire_owned() {
        return Some(slot);
    }
    if warned_at.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
        *warned_at = Some(Instant::now());
        tracing::warn!(
            max_connections = limits.max_connections,
            "every connection slot is taken; new connections wait to be accepted"
        );
    }
    tokio::select! {
        _ = shutdown.cancelled() => None,
        slot = slots.clone().acquire_owned() => Some(slot.expect("the slot semaphore is never closed")),
    }
}
