//! How far this process's clock is from Redis's. A dispatcher writes a lease's end and a retry's
//! due time, and a scheduler claims them, each on its own host: by the hosts' own clocks, a
//! dispatcher 25 s behind the scheduler had every lease taken for ended at once and each event
//! sent four or five times. So every process measures Redis's clock, the one they can all read,
//! and keeps those times by it ([`crate::clock::redis_now_ms`]); it exports the difference and
//! warns while it is large, since the host's own clock still signs requests
//! (`webhook-timestamp`), where receivers hold it to their own.

use super::{Store, StoreError};
use crate::clock::{now_ms, offset_ms, set_redis_offset_ms};
use crate::shutdown;
use prometheus::{Gauge, register_gauge};
use std::sync::LazyLock;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often a running process measures its clock again.
const CHECK_EVERY: Duration = Duration::from_secs(60);

/// A difference past which a process warns: synchronised clocks stay within milliseconds.
const WARN_BEYOND_MS: i64 = 1_000;

/// A reading whose round trip took longer than this says too little (it is off by up to half
/// of it) and is left out.
const LONGEST_ROUND_TRIP_MS: i64 = 500;

/// Redis's clock minus this process's, in seconds, as last measured.
static CLOCK_OFFSET: LazyLock<Gauge> = LazyLock::new(|| {
    register_gauge!(
        "laabam_clock_offset_seconds",
        "Redis's clock minus this process's; leases and due times follow Redis's"
    )
    .expect("registered once")
});

impl Store {
    /// Measures the clock now (before the process takes work, so its first lease is on Redis's
    /// clock already) and then every minute until `shutdown`.
    pub async fn keep_checking_clock(&self, shutdown: CancellationToken) {
        self.check_clock().await;
        let store = self.clone();
        tokio::spawn(async move {
            shutdown::pause(CHECK_EVERY, &shutdown).await;
            shutdown::every(CHECK_EVERY, &shutdown, || store.check_clock()).await;
        });
    }

    /// One reading: kept for [`crate::clock::redis_now_ms`] and exported in
    /// `laabam_clock_offset_seconds`, with a warning while it is more than a second.
    async fn check_clock(&self) {
        match self.clock_offset_ms().await {
            Ok((_, round_trip)) if round_trip > LONGEST_ROUND_TRIP_MS => {
                tracing::debug!(
                    round_trip_ms = round_trip,
                    "clock reading left out: Redis answered slowly"
                );
            }
            Ok((offset, _)) => {
                if offset.abs() > WARN_BEYOND_MS {
                    tracing::warn!(
                        offset_ms = offset,
                        "this host's clock and Redis's differ: leases and due times follow Redis's, but requests are signed with this host's time (keep clocks synchronised, e.g. with NTP)"
                    );
                }
                set_redis_offset_ms(offset);
                CLOCK_OFFSET.set(offset as f64 / 1000.0);
            }
            Err(e) => tracing::debug!(error = %e, "could not read Redis's clock; trying again later"),
        }
    }

    /// Redis's clock minus ours, in milliseconds, and the round trip it was measured over.
    async fn clock_offset_ms(&self) -> Result<(i64, i64), StoreError> {
        let sent = now_ms();
        let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut self.conn()).await?;
        let received = now_ms();
        Ok((offset_ms(sent, secs * 1000 + micros / 1000, received), received - sent))
    }
}
