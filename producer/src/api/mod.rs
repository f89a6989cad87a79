//! The HTTP front door (`laabam-producer serve`): accounts and keys, endpoints, publishing,
//! events, deliveries and statistics, all read from and written to the same Redis store and
//! broker as the pipeline, so any number of producer instances serve the same state.

pub mod accounts;
pub mod dashboard;
pub mod deliveries;
pub mod endpoints;
pub mod error;
pub mod event_types;
pub mod events;
pub mod extract;
pub mod limits;
pub mod observed;
pub mod openapi;
pub mod views;

use crate::Publisher;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use error::ApiError;
use laabam_shared::config::{CommonArgs, at_least_one, parse_duration, parse_positive_duration};
use laabam_shared::endpoint::Endpoint;
use laabam_shared::http_server::{self, ConnectionLimits};
use laabam_shared::ops::{self, ReadinessCheck};
use laabam_shared::startup::Unreachable;
use laabam_shared::store::{Store, StoreConfig};
use laabam_shared::targets::{TargetArgs, TargetPolicy};
use sha2::{Digest, Sha256};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The largest request body accepted (the largest event, as over AMQP).
pub const MAX_BODY_BYTES: usize = laabam_shared::envelope::MAX_EVENT_BYTES;

/// `laabam-producer serve` settings.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Serves the API, /healthz and /readyz: what clients and load balancers reach.
    #[arg(long, env = "LAABAM_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// Serves /metrics (with /healthz and /readyz) apart from the API, so that the platform's
    /// figures (event volumes by type across every account) reach only the operator's scraper.
    #[arg(long, env = "LAABAM_METRICS_ADDR", default_value = "127.0.0.1:9103")]
    pub metrics_addr: SocketAddr,
    /// The operator token for creating accounts and keys; operator routes are off without it.
    #[arg(long, env = "LAABAM_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// How long a rotated-out secret keeps signing.
    #[arg(long, env = "LAABAM_SECRET_GRACE", default_value = "24h", value_parser = parse_duration)]
    pub secret_grace: Duration,
    #[command(flatten)]
    pub targets: TargetArgs,
    /// Endpoints one account may have (disabled ones count) unless the operator gave it a bound
    /// of its own; past it, creating one answers 409.
    /// Each event is written for all of its account's endpoints in one Redis script, and
    /// dispatchers cache them, so this bounds what one account costs the others.
    #[arg(long, env = "LAABAM_MAX_ENDPOINTS_PER_ACCOUNT", default_value_t = 100, value_parser = at_least_one::<u32>())]
    pub max_endpoints_per_account: u32,
    /// Requests per second per credential (or per client address) for the whole deployment,
    /// with bursts of twice that.
    #[arg(long, env = "LAABAM_API_RATE_LIMIT", default_value_t = 100, value_parser = at_least_one::<u32>())]
    pub api_rate_limit: u32,
    /// Requests processed at once; past it the API answers 503 with Retry-After.
    #[arg(long, env = "LAABAM_API_MAX_IN_FLIGHT", default_value_t = 512, value_parser = at_least_one::<usize>())]
    pub api_max_in_flight: usize,
    /// The longest a request may take (a publish waits for the broker's confirm).
    #[arg(long, env = "LAABAM_API_TIMEOUT", default_value = "30s", value_parser = parse_positive_duration)]
    pub api_timeout: Duration,
    /// How long a connection may take to send a request's head, from when it opens or from its
    /// previous response; also the keep-alive idle timeout (behind a load balancer, make it
    /// longer than the balancer's).
    #[arg(long, env = "LAABAM_API_IDLE_TIMEOUT", default_value = "75s", value_parser = parse_positive_duration)]
    pub api_idle_timeout: Duration,
    /// Client connections open at once; past it new ones wait to be accepted. Keep it below the
    /// process's open-file limit.
    #[arg(long, env = "LAABAM_API_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = at_least_one::<usize>())]
    pub api_max_connections: usize,
}

/// What every handler shares.
#[derive(Debug)]
pub struct ApiState {
    pub store: Store,
    pub publisher: Arc<Publisher>,
    /// SHA-256 of the operator token.
    pub admin_token_hash: Option<Vec<u8>>,
    pub secret_grace: Duration,
    pub targets: TargetPolicy,
    /// Endpoints one account may have.
    pub max_endpoints: u32,
}

impl ApiState {
    /// Refuses endpoints the target policy forbids at registration (the dispatcher checks again
    /// when it connects). Names that do not resolve now are left to that check.
    pub async fn guard_target(&self, ep: &Endpoint) -> Result<(), ApiError> {
        self.targets
            .check_scheme(ep.url.as_str())
            .map_err(|e| ApiError::invalid("url", e))?;
        if self.targets.allow_private {
            return Ok(());
        }
        let uri: axum::http::Uri = ep
            .url
            .as_str()
            .parse()
            .map_err(|_| ApiError::invalid("url", "not a valid URL"))?;
        let host = uri
            .host()
            .unwrap_or("")
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let addrs: Vec<IpAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => tokio::net::lookup_host((host.as_str(), 443))
                .await
                .map(|a| a.map(|s| s.ip()).collect())
                .unwrap_or_default(),
        };
        match addrs.into_iter().find(|ip| !self.targets.permits(*ip)) {
            Some(ip) => Err(ApiError::invalid("url", TargetPolicy::refusal(&host, ip))),
            None => Ok(()),
        }
    }
}

impl ReadinessCheck for ApiState {
    async fn is_ready(&self) -> bool {
        self.store.ping().await && self.publisher.is_connected().await
    }
}

async fn ready(State(state): State<Arc<ApiState>>) -> (StatusCode, &'static str) {
    ops::readyz(state.as_ref()).await
}

/// Every route, behind the API's own limits.
pub fn router(state: Arc<ApiState>, limits: Arc<limits::Limits>) -> Router {
    Router::new()
        .route("/v1/event-types", get(event_types::list))
        .route("/v1/events", post(events::publish).get(events::list))
        .route("/v1/events/{id}", get(events::get))
        .route("/v1/endpoints", post(endpoints::create).get(endpoints::list))
        .route(
            "/v1/endpoints/{id}",
            get(endpoints::get).patch(endpoints::update).delete(endpoints::delete),
        )
        .route("/v1/endpoints/{id}/secret", get(endpoints::secret))
        .route("/v1/endpoints/{id}/secret/rotate", post(endpoints::rotate))
        .route("/v1/endpoints/{id}/stats", get(endpoints::stats))
        .route("/v1/endpoints/{id}/test", post(endpoints::test))
        .route("/v1/endpoints/{id}/recover", post(endpoints::recover))
        .route("/v1/deliveries", get(deliveries::list))
        .route("/v1/deliveries/{id}", get(deliveries::get))
        .route("/v1/deliveries/{id}/redeliver", post(deliveries::redeliver))
        .route("/v1/accounts", post(accounts::create))
        .route("/v1/accounts/{id}", get(accounts::get).patch(accounts::update))
        .route(
            "/v1/accounts/{id}/keys",
            post(accounts::create_key).get(accounts::list_keys),
        )
        .route("/v1/accounts/{id}/keys/{prefix}", delete(accounts::revoke_key))
        .route("/v1/api-keys", get(accounts::own_keys))
        .route("/v1/api-keys/{prefix}", delete(accounts::revoke_own_key))
        .route("/v1/openapi.json", get(openapi::document))
        .merge(dashboard::routes())
        .layer(axum::middleware::from_fn_with_state(
            (limits.clone(), state.store.clone()),
            limits::count_for_deployment,
        ))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .fallback(|| async { ApiError::NotFound("route") })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(limits, limits::enforce))
        .layer(axum::middleware::from_fn(observed::observe))
        .with_state(state)
}

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Unreachable(#[from] Unreachable),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Operations(#[from] ops::BindError),
}

/// A running API: where it listens, where its operations port listens, and the server's task.
#[derive(Debug)]
pub struct Started {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub task: tokio::task::JoinHandle<()>,
}

/// Connects, binds and serves the API and the operations port in the background until
/// `shutdown`.
pub async fn start(common: &CommonArgs, args: &ServeArgs, shutdown: CancellationToken) -> Result<Started, ServeError> {
    crate::metrics::initialize();
    let store = Store::connect(&StoreConfig::from(common), common.connect_timeout).await?;
    store.warn_about_unsafe_settings().await;
    store.keep_checking_clock(shutdown.clone()).await;
    // Redeliveries go to the retry set, so schedulers must claim over this count.
    store.keep_announcing_retry_shards(shutdown.clone());
    let publisher = Arc::new(Publisher::connect(&common.amqp_url, common.connect_timeout, common.layout()).await?);
    let state = Arc::new(ApiState {
        store,
        publisher,
        admin_token_hash: args.admin_token.as_ref().map(|t| Sha256::digest(t.as_bytes()).to_vec()),
        secret_grace: args.secret_grace,
        targets: args.targets.policy(),
        max_endpoints: args.max_endpoints_per_account,
    });
    let listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: args.http_addr,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: args.http_addr,
        source,
    })?;
    let limits = Arc::new(limits::Limits::new(
        args.api_rate_limit,
        args.api_max_in_flight,
        args.api_timeout,
    ));
    // Room for Redis, RabbitMQ and the process's own files beside the clients.
    if let Some(limit) = laabam_shared::open_files::current_limit()
        && args.api_max_connections as u64 + 64 > limit
    {
        tracing::warn!(
            max_connections = args.api_max_connections,
            open_file_limit = limit,
            "LAABAM_API_MAX_CONNECTIONS is more than the open-file limit leaves room for: connections past it fail; raise the limit (ulimit -n, LimitNOFILE) or lower the setting"
        );
    }
    let connections = ConnectionLimits {
        idle_timeout: args.api_idle_timeout,
        max_connections: args.api_max_connections,
        // No request takes longer: past it the API answers 503 itself.
        shutdown_grace: args.api_timeout,
    };
    let metrics_addr = ops::serve(args.metrics_addr, state.clone(), shutdown.clone()).await?;
    let task = tokio::spawn(http_server::serve(
        listener,
        router(state, limits),
        connections,
        shutdown,
    ));
    tracing::info!(%addr, %metrics_addr, "HTTP API listening");
    Ok(Started {
        addr,
        metrics_addr,
        task,
    })
}
