//! The scheduler's settings.

use laabam_shared::config::{CommonArgs, parse_duration};
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "laabam-retry-scheduler",
    version,
    about = "Re-queue due Laabam retry jobs",
    args_override_self = true
)]
pub struct SchedulerConfig {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Serves /metrics, /healthz and /readyz (port 0 picks a free port).
    #[arg(long, env = "LAABAM_METRICS_ADDR", default_value = "127.0.0.1:9102")]
    pub metrics_addr: SocketAddr,
    /// Jobs claimed and published per round trip.
    #[arg(long, env = "LAABAM_SCHEDULER_BATCH", default_value_t = 500)]
    pub batch: usize,
    /// The longest a due job waits when the set is idle (the poll interval).
    #[arg(long, env = "LAABAM_SCHEDULER_POLL", default_value = "100ms", value_parser = parse_duration)]
    pub poll: Duration,
    /// How long a claim holds before another scheduler may publish the job again.
    #[arg(long, env = "LAABAM_SCHEDULER_CLAIM_LEASE", default_value = "30s", value_parser = parse_duration)]
    pub claim_lease: Duration,
}
