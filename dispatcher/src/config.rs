//! The dispatcher's settings: the shared ones plus how it sends and how much it holds.

use crate::sender::PoolLimits;
use laabam_shared::config::{
    CommonArgs, RetryArgs, SettingNames, Settings, at_least_one, parse_duration, parse_positive_duration,
};
use laabam_shared::store::StoreConfig;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "laabam-dispatcher",
    version,
    about = "Deliver Laabam events to subscribed endpoints",
    args_override_self = true
)]
pub struct DispatcherConfig {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub retry: RetryArgs,
    /// Serves /metrics, /healthz and /readyz (port 0 picks a free port).
    #[arg(long, env = "LAABAM_METRICS_ADDR", default_value = "127.0.0.1:9101")]
    pub metrics_addr: SocketAddr,
    /// Whole-request timeout of one attempt: connect, send, and read the response.
    #[arg(long, env = "LAABAM_HTTP_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub http_timeout: Duration,
    /// Connections to endpoints kept open for reuse, in all; past it the one idle longest is
    /// closed. Each costs about 20 KiB and a file descriptor. Default: 1024, or
    /// LAABAM_MAX_IN_FLIGHT if larger, so one busy endpoint keeps every connection it uses.
    #[arg(long, env = "LAABAM_HTTP_IDLE_CONNECTIONS", value_parser = at_least_one::<usize>())]
    pub http_idle_connections: Option<usize>,
    /// Endpoints cached in all accounts, each about 1 KiB (more with long headers or
    /// descriptions); past it the accounts used least are read again from Redis when next used.
    #[arg(long, env = "LAABAM_CACHED_ENDPOINTS", default_value_t = 50_000, value_parser = at_least_one::<usize>())]
    pub cached_endpoints: usize,
    /// A PEM file of extra CA certificates to trust (private CAs, tests), besides the web PKI.
    #[arg(long, env = "LAABAM_EXTRA_CA_FILE")]
    pub extra_ca_file: Option<PathBuf>,
    #[command(flatten)]
    pub targets: laabam_shared::targets::TargetArgs,
    /// Broker messages (events and retry jobs) being processed, and attempts in flight, at once
    /// in this process; a message fanning out to N endpoints waits for room for N attempts.
    #[arg(long, env = "LAABAM_MAX_IN_FLIGHT", default_value_t = 512, value_parser = at_least_one::<usize>())]
    pub max_in_flight: usize,
    /// Default limit of requests in flight to one endpoint, when the endpoint sets none.
    #[arg(long, env = "LAABAM_ENDPOINT_CONCURRENCY", default_value_t = 16, value_parser = at_least_one::<u32>())]
    pub endpoint_concurrency: u32,
    /// How long a delivery waits for one of its endpoint's request slots before it is deferred
    /// to the retry set; a burst to a healthy endpoint queues here instead. Stretched (up to
    /// eight times) while every endpoint's requests are slow alike, as on a saturated machine.
    #[arg(long, env = "LAABAM_SLOT_WAIT", default_value = "250ms", value_parser = parse_positive_duration)]
    pub slot_wait: Duration,
    /// How long a delivery deferred by an endpoint's concurrency limit waits (jittered ×1–2).
    #[arg(long, env = "LAABAM_DEFER_DELAY", default_value = "1s", value_parser = parse_positive_duration)]
    pub defer_delay: Duration,
    /// How long past the HTTP timeout an in-flight lease lasts; if this dispatcher dies, its
    /// deliveries are retried that long after they started.
    #[arg(long, env = "LAABAM_LEASE_MARGIN", default_value = "20s", value_parser = parse_duration)]
    pub lease_margin: Duration,
    /// An endpoint whose attempts have all failed for this long is disabled.
    #[arg(long, env = "LAABAM_DISABLE_AFTER", default_value = "5d", value_parser = parse_duration)]
    pub disable_after: Duration,
    /// Export attempts per endpoint (`laabam_dispatcher_endpoint_attempts_total`): one series
    /// per endpoint and outcome, so only for fleets with a bounded number of endpoints.
    #[arg(long, env = "LAABAM_METRICS_PER_ENDPOINT", default_value_t = false, action = clap::ArgAction::Set)]
    pub metrics_per_endpoint: bool,
    /// How long a SIGTERM waits for in-flight attempts before closing (their leases cover the rest).
    #[arg(long, env = "LAABAM_SHUTDOWN_GRACE", default_value = "15s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// How long a newly arrived event waits for others to share its Redis call when none is
    /// out; 0 sends it at once. Below full load 500µs cut the machine's CPU per delivery by
    /// 6–8% and Redis's round trips by half, and added a millisecond to the median latency
    /// (README, Performance); under full load calls fill without waiting.
    #[arg(long, env = "LAABAM_ARRIVAL_LINGER", default_value = "0s", value_parser = parse_duration)]
    pub arrival_linger: Duration,
}

impl Settings for DispatcherConfig {
    /// What no single flag can tell: the retry policy's own bounds, and a retention that
    /// outlasts every retry, since a delivery's state and its event's body expire with the
    /// retention and a retry that finds them gone has nothing left to send.
    fn check(&self, names: &SettingNames) -> Result<(), String> {
        self.retry.check(names)?;
        if self.common.retention < self.retry.retry_max_age {
            return Err(format!(
                "{} ({}) is shorter than {} ({}): a delivery still being retried would expire with its event",
                names.name("retention"),
                humantime::format_duration(self.common.retention),
                names.name("retry-max-age"),
                humantime::format_duration(self.retry.retry_max_age)
            ));
        }
        Ok(())
    }
}

impl DispatcherConfig {
    /// The store's settings: the shared ones, and how long this process's arrivals wait.
    pub fn store(&self) -> StoreConfig {
        StoreConfig {
            arrival_linger: self.arrival_linger,
            ..StoreConfig::from(&self.common)
        }
    }

    pub fn lease(&self) -> Duration {
        self.http_timeout + self.lease_margin
    }

    /// Every connection one busy endpoint uses is kept (the process has no more requests in
    /// flight), for 90 s at most.
    pub fn pool(&self) -> PoolLimits {
        PoolLimits {
            per_host: self.max_in_flight,
            total: self.http_idle_connections.unwrap_or(self.max_in_flight.max(1024)),
            idle_timeout: Duration::from_secs(90),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn arrivals_go_at_once_unless_told_to_wait() {
        let parse = |extra: &[&str]| {
            DispatcherConfig::try_parse_from(["laabam-dispatcher"].iter().chain(extra))
                .unwrap()
                .store()
                .arrival_linger
        };
        assert_eq!(parse(&[]), Duration::ZERO);
        assert_eq!(parse(&["--arrival-linger", "500us"]), Duration::from_micros(500));
    }
}
