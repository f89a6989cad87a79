//! The retry scheduler: moves due retry jobs from Redis back onto RabbitMQ. Run as many as you
//! like; claims are atomic, so two schedulers never publish the same due job in normal
//! operation, and a claim whose scheduler dies is reclaimed when its lease expires.
//!
//! # Layout
//! - [`config`]: flags and `LAABAM_*` variables.
//! - [`republish`]: the loop: claim, publish with confirms, release.
//! - [`metrics`]: Prometheus metrics.

pub mod config;
pub mod metrics;
pub mod republish;

pub use config::SchedulerConfig;

use laabam_shared::ops::{self, Readiness};
use laabam_shared::startup::{self, Unreachable};
use laabam_shared::store::{Store, StoreConfig};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Why the scheduler could not start.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error(transparent)]
    Unreachable(#[from] Unreachable),
    #[error(transparent)]
    Bind(#[from] ops::BindError),
}

/// Runs until `shutdown`. Returns early only if start-up fails.
pub async fn run(config: SchedulerConfig, shutdown: CancellationToken) -> Result<(), SchedulerError> {
    let readiness = Arc::new(Readiness::default());
    let ops_addr = ops::serve(config.metrics_addr, readiness.clone(), shutdown.clone()).await?;
    tracing::info!(%ops_addr, "metrics and health endpoints listening");
    let common = &config.common;
    let conn = startup::amqp_connect_within(&common.amqp_url, "laabam-retry-scheduler", common.connect_timeout).await?;
    let store = Store::connect(&StoreConfig::from(common), common.connect_timeout).await?;
    store.warn_about_unsafe_settings().await;
    store.keep_checking_clock(shutdown.clone()).await;
    readiness.set_redis(true);
    republish::run(store, conn, &config, readiness, shutdown).await;
    tracing::info!("retry scheduler stopped");
    Ok(())
}
