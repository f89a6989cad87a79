//! The scheduler's settings.

use laabam_shared::config::{CommonArgs, Settings, parse_at_least};
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
    /// Jobs claimed and published per round trip. A claim holds Redis while it runs, so a batch
    /// is at most 10,000 (a claim of that many takes it for tens of milliseconds); a batch of 0
    /// would claim nothing, round after round, at full speed.
    #[arg(long, env = "LAABAM_SCHEDULER_BATCH", default_value_t = 500,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_BATCH as u64))]
    pub batch: usize,
    /// The longest a due job waits when the set is idle (the poll interval). At least a
    /// millisecond, the pause's unit: a shorter one would be a pause of 0, rounds at full speed.
    #[arg(long, env = "LAABAM_SCHEDULER_POLL", default_value = "100ms",
        value_parser = |s: &str| parse_at_least(s, Duration::from_millis(1)))]
    pub poll: Duration,
    /// How long a claim holds before another scheduler may publish the job again. At least a
    /// second: a claim that lapses while its batch awaits the broker's confirms has the job
    /// published again by the next round.
    #[arg(long, env = "LAABAM_SCHEDULER_CLAIM_LEASE", default_value = "30s",
        value_parser = |s: &str| parse_at_least(s, Duration::from_secs(1)))]
    pub claim_lease: Duration,
}

/// The largest `--batch`.
const MAX_BATCH: usize = 10_000;

impl Settings for SchedulerConfig {}
