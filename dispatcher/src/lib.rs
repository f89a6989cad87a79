//! The dispatcher: consumes events and retry jobs, fans out, signs, POSTs, records, and
//! schedules retries. Stateless: run as many as you like.
//!
//! # Layout
//! - [`config`]: flags and `LAABAM_*` variables.
//! - [`consumer`]: the broker session: consume, dead-letter, reconnect; [`acks`]: acknowledgements
//!   coalesced into multiple acks.
//! - [`pipeline`]: what each message means: fan-out, leases, attempts, outcomes.
//! - [`sender`]: the outbound HTTP client; [`guard`]: which addresses it may reach.
//! - [`directory`]: each account's endpoints, cached by version.
//! - [`limits`]: per-endpoint concurrency and rate limits.
//! - [`metrics`]: Prometheus metrics.

pub mod acks;
pub mod config;
pub mod consumer;
pub mod directory;
pub mod guard;
pub mod limits;
pub mod metrics;
pub mod pipeline;
pub mod sender;

pub use config::DispatcherConfig;

use laabam_shared::ops::{self, Readiness};
use laabam_shared::shutdown;
use laabam_shared::startup::{self, Unreachable};
use laabam_shared::store::Store;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Why the dispatcher could not start.
#[derive(Debug, thiserror::Error)]
pub enum DispatcherError {
    #[error(transparent)]
    Unreachable(#[from] Unreachable),
    #[error(transparent)]
    Bind(#[from] ops::BindError),
    #[error(transparent)]
    Sender(#[from] sender::SenderError),
}

/// Runs until `shutdown`, then drains. Returns early only if start-up fails.
pub async fn run(config: DispatcherConfig, shutdown: CancellationToken) -> Result<(), DispatcherError> {
    let readiness = Arc::new(Readiness::default());
    metrics::initialize();
    if config.metrics_per_endpoint {
        metrics::enable_per_endpoint();
    }
    let ops_addr = ops::serve(config.metrics_addr, readiness.clone(), shutdown.clone()).await?;
    tracing::info!(%ops_addr, "metrics and health endpoints listening");

    let common = &config.common;
    let reachable = startup::amqp_connect_within(&common.amqp_url, "laabam-dispatcher", common.connect_timeout).await?;
    startup::amqp_close(&reachable, "reachability checked").await;
    let store = Store::connect(&config.store(), common.connect_timeout).await?;
    store.warn_about_unsafe_settings().await;
    store.keep_checking_clock(shutdown.clone()).await;
    // Leases and deferrals go to the retry set, so schedulers must claim over this count.
    store.keep_announcing_retry_shards(shutdown.clone());
    readiness.set_redis(true);
    watch_redis(store.clone(), readiness.clone(), shutdown.clone());

    let pipeline = Arc::new(pipeline::Pipeline {
        directory: directory::Directory::new(store.clone(), config.cached_endpoints),
        in_flight: pipeline::InFlight::new(config.max_in_flight),
        store,
        sender: sender::Sender::new(
            config.http_timeout,
            config.extra_ca_file.as_deref(),
            config.targets.policy(),
            config.pool(),
        )?,
        limits: limits::EndpointLimits::new(config.endpoint_concurrency, config.slot_wait, config.max_in_flight / 2),
        policy: config.retry.policy(),
        lease: config.lease(),
        http_timeout: config.http_timeout,
        defer_delay: config.defer_delay,
        disable_after: config.disable_after,
    });
    // Each endpoint's rate limit is split among the dispatchers running, and its own
    // max_concurrency is held in Redis while more than one runs.
    let shares = pipeline.clone();
    let id = format!("{}-{:08x}", std::process::id(), rand::random::<u32>());
    pipeline
        .store
        .keep_saying_dispatcher_runs(id, shutdown.clone(), move |running| {
            shares.limits.share_among(running);
            metrics::METRICS.dispatchers_running.set(running as i64);
        });
    let settings = consumer::ConsumerSettings {
        amqp_url: common.amqp_url.clone(),
        layout: common.layout(),
        max_in_flight: config.max_in_flight,
        shutdown_grace: config.shutdown_grace,
    };
    consumer::run(pipeline, settings, readiness, shutdown).await;
    tracing::info!("dispatcher stopped");
    Ok(())
}

/// Keeps the Redis readiness flag true to what Redis answers.
fn watch_redis(store: Store, readiness: Arc<Readiness>, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let (store, readiness) = (&store, &readiness);
        shutdown::every(Duration::from_secs(2), &shutdown, || async move {
            readiness.set_redis(store.ping().await);
        })
        .await;
    });
}
