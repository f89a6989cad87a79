//! How far this process's clock is from Redis's. A dispatcher writes a lease's end and a retry's
//! due time by its own clock and a scheduler claims them by its own, so two clocks apart by
//! more than `LAABAM_LEASE_MARGIN` send deliveries twice, and a retry goes out early or late by
//! their difference. Redis's clock is the one every process can read, so each measures itself
//! against it, exports the difference, and warns while it is large; keeping the hosts' clocks in
//! step (NTP) is the operator's part.

use super::{Store, StoreError};
use crate::clock::{now_ms, offset_ms};
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
        "Redis's clock minus this process's; leases and retry due times assume the two agree"
    )
    .expect("registered once")
});

impl Store {
    /// Redis's clock minus ours, in milliseconds, and the round trip it was measured over.
    async fn clock_offset_ms(&self) -> Result<(i64, i64), StoreError> {
        let sent = now_ms();
        let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut self.conn()).await?;
        let received = now_ms();
        Ok((offset_ms(sent, secs * 1000 + micros / 1000, received), received - sent))
    }

    /// Measures the clock now and every minute until `shutdown`, into
    /// `laabam_clock_offset_seconds`, warning while it is more than a second off.
    pub fn keep_checking_clock(&self, shutdown: CancellationToken) {
        let store = self.clone();
        tokio::spawn(async move {
            let store = &store;
            shutdown::every(CHECK_EVERY, &shutdown, || async move {
                match store.clock_offset_ms().await {
                    Ok((_, round_trip)) if round_trip > LONGEST_ROUND_TRIP_MS => {
                        tracing::debug!(round_trip_ms = round_trip, "clock reading left out: Redis answered slowly");
                    }
                    Ok((offset, _)) => {
                        if offset.abs() > WARN_BEYOND_MS {
                            tracing::warn!(
                                offset_ms = offset,
                                "this host's clock and Redis's differ: leases and retry times assume they agree (keep clocks synchronised, e.g. with NTP)"
                            );
                        }
                        CLOCK_OFFSET.set(offset as f64 / 1000.0);
                    }
                    Err(e) => tracing::debug!(error = %e, "could not read Redis's clock; trying again later"),
                }
            })
            .await;
        });
    }
}
