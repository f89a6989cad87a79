//! The operations port of every process: `/metrics` (Prometheus text), `/healthz` (the process
//! is up) and `/readyz` (its dependencies are reachable and it is doing its work).

use crate::http_server::ConnectionLimits;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus::{Encoder, TextEncoder};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What `/readyz` asks. The dispatcher and scheduler keep [`Readiness`] flags that the loops
/// owning each dependency flip; the producer, which has no such loops, asks its connections.
pub trait ReadinessCheck: Send + Sync + 'static {
    fn is_ready(&self) -> impl Future<Output = bool> + Send;
}

/// Readiness flags, flipped by the loops that own each dependency.
#[derive(Debug, Default)]
pub struct Readiness {
    pub broker: AtomicBool,
    pub redis: AtomicBool,
}

impl Readiness {
    pub fn set_broker(&self, up: bool) {
        self.broker.store(up, Ordering::Relaxed);
    }

    pub fn set_redis(&self, up: bool) {
        self.redis.store(up, Ordering::Relaxed);
    }
}

impl ReadinessCheck for Readiness {
    async fn is_ready(&self) -> bool {
        self.broker.load(Ordering::Relaxed) && self.redis.load(Ordering::Relaxed)
    }
}

/// `/readyz`: 200 while `check` says ready, 503 otherwise.
pub async fn readyz(check: &impl ReadinessCheck) -> (StatusCode, &'static str) {
    if check.is_ready().await {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// `/metrics`: every registered metric in Prometheus text format, process metrics (CPU, memory,
/// open fds) included: the default registry collects them.
pub async fn metrics() -> (StatusCode, String) {
    let mut buf = Vec::new();
    match TextEncoder::new().encode(&prometheus::gather(), &mut buf) {
        Ok(()) => (StatusCode::OK, String::from_utf8_lossy(&buf).into_owned()),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Scrapers and probes keep a few connections each; longer than Prometheus's usual scrape
/// interval, so a scraper's kept-alive connection is not closed between scrapes.
const OPS_CONNECTIONS: ConnectionLimits = ConnectionLimits {
    idle_timeout: Duration::from_secs(75),
    max_connections: 256,
    shutdown_grace: Duration::from_secs(1),
};

/// The operations port could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds `addr` (port 0 picks a free one) and serves until `shutdown`; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    readiness: Arc<impl ReadinessCheck>,
    shutdown: CancellationToken,
) -> Result<SocketAddr, BindError> {
    let bind_error = |source| BindError { addr, source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(move || async move { readyz(readiness.as_ref()).await }));
    tokio::spawn(crate::http_server::serve(listener, app, OPS_CONNECTIONS, shutdown));
    Ok(bound)
}
