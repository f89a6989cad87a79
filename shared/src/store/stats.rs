//! Per-endpoint statistics: attempt counts by outcome and latency bucket (one hash field
//! `<outcome>|<latency bucket>` per pair, so an attempt is one increment), kept in 5-minute
//! buckets (for the last hour) and hourly buckets (for 24 hours and 7 days), written by the same
//! script that records each attempt.

use super::{Store, StoreError};
use crate::delivery::Outcome;
use crate::ids::EndpointId;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// Upper bounds (ms) of the latency buckets; the last bucket is open.
pub const LATENCY_BOUNDS_MS: &[u64] = &[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000];

pub(super) const FIVE_MINUTES_MS: i64 = 5 * 60 * 1000;
pub(super) const HOUR_MS: i64 = 60 * 60 * 1000;
/// How long buckets are kept: a little more than the longest window that reads them.
pub(super) const FIVE_MINUTE_TTL_SECS: u64 = 2 * 3600;
pub(super) const HOUR_TTL_SECS: u64 = 8 * 24 * 3600;

/// The latency bucket of an attempt that took `duration_ms`.
pub(super) fn latency_index(duration_ms: u64) -> usize {
    LATENCY_BOUNDS_MS
        .iter()
        .position(|&b| duration_ms <= b)
        .unwrap_or(LATENCY_BOUNDS_MS.len())
}

/// Statistics over one window.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct WindowStats {
    /// Attempts by outcome.
    pub counts: BTreeMap<String, u64>,
    pub attempts: u64,
    /// Successful attempts over all attempts; `null` with no attempts.
    pub success_rate: Option<f64>,
    /// Latency percentiles in ms, as the upper bound of the bucket holding the rank (approximate).
    pub latency_p50_ms: Option<u64>,
    pub latency_p95_ms: Option<u64>,
    pub latency_p99_ms: Option<u64>,
}

/// An endpoint's most recent attempt.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct LastDelivery {
    pub at_ms: i64,
    pub outcome: String,
    pub status_code: Option<u16>,
    pub delivery_id: String,
}

/// The health record of an endpoint.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct EndpointHealth {
    pub last_delivery: Option<LastDelivery>,
    pub last_success_ms: Option<i64>,
    /// Since when every attempt failed (cleared by a success).
    pub failing_since_ms: Option<i64>,
}

fn window(buckets: &[HashMap<String, u64>]) -> WindowStats {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut latency = vec![0u64; LATENCY_BOUNDS_MS.len() + 1];
    for bucket in buckets {
        for (field, n) in bucket {
            let (outcome, index) = field.split_once('|').unwrap_or((field, ""));
            *counts.entry(outcome.to_owned()).or_default() += n;
            if let Some(slot) = index.parse::<usize>().ok().and_then(|i| latency.get_mut(i)) {
                *slot += n;
            }
        }
    }
    let attempts: u64 = counts.values().sum();
    let successes = counts.get(Outcome::Success.as_str()).copied().unwrap_or(0);
    let total_timed: u64 = latency.iter().sum();
    let percentile = |p: f64| -> Option<u64> {
        if total_timed == 0 {
            return None;
        }
        let rank = ((p * total_timed as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in latency.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(LATENCY_BOUNDS_MS.get(i).copied().unwrap_or(u64::MAX));
            }
        }
        None
    };
    WindowStats {
        attempts,
        success_rate: (attempts > 0).then(|| successes as f64 / attempts as f64),
        latency_p50_ms: percentile(0.50),
        latency_p95_ms: percentile(0.95),
        latency_p99_ms: percentile(0.99),
        counts,
    }
}

/// One bucket of a time series, so a chart can show how outcomes and latency moved.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SeriesPoint {
    /// RFC 3339 start of the bucket.
    pub start: String,
    #[serde(flatten)]
    pub stats: WindowStats,
}

/// The last hour, day and week of one endpoint, with the buckets behind the first two.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct EndpointStats {
    pub last_1h: WindowStats,
    pub last_24h: WindowStats,
    pub last_7d: WindowStats,
    /// The last hour in 5-minute buckets, oldest first.
    pub series_1h: Vec<SeriesPoint>,
    /// The last 24 hours in hourly buckets, oldest first.
    pub series_24h: Vec<SeriesPoint>,
    #[serde(flatten)]
    pub health: EndpointHealth,
}

/// Buckets `width` ms wide ending with the one holding `now_ms`, one point each.
fn series(buckets: &[HashMap<String, u64>], width: i64, now_ms: i64) -> Vec<SeriesPoint> {
    let first = now_ms / width - buckets.len() as i64 + 1;
    buckets
        .iter()
        .enumerate()
        .map(|(i, b)| SeriesPoint {
            start: crate::clock::format_rfc3339_ms((first + i as i64) * width),
            stats: window(std::slice::from_ref(b)),
        })
        .collect()
}

impl Store {
    async fn buckets(
        &self,
        endpoint: &EndpointId,
        granularity: &str,
        width: i64,
        count: i64,
        now_ms: i64,
    ) -> Result<Vec<HashMap<String, u64>>, StoreError> {
        let newest = now_ms / width;
        let mut pipe = redis::pipe();
        for b in (newest - count + 1)..=newest {
            pipe.hgetall(self.keys.endpoint_stats(endpoint, granularity, b));
        }
        Ok(pipe.query_async(&mut self.conn()).await?)
    }

    pub async fn endpoint_health(&self, endpoint: &EndpointId) -> Result<EndpointHealth, StoreError> {
        let h: HashMap<String, String> =
            redis::AsyncCommands::hgetall(&mut self.conn(), self.keys.endpoint_health(endpoint)).await?;
        let num = |k: &str| h.get(k).and_then(|v| v.parse::<i64>().ok());
        Ok(EndpointHealth {
            last_delivery: num("last_at").map(|at_ms| LastDelivery {
                at_ms,
                outcome: h.get("last_outcome").cloned().unwrap_or_default(),
                status_code: h.get("last_status").and_then(|s| s.parse().ok()),
                delivery_id: h.get("last_delivery").cloned().unwrap_or_default(),
            }),
            last_success_ms: num("last_success"),
            failing_since_ms: num("failing_from"),
        })
    }

    /// Success over the last 24 hours, for endpoint listings.
    pub async fn endpoint_day(&self, endpoint: &EndpointId, now_ms: i64) -> Result<WindowStats, StoreError> {
        Ok(window(&self.buckets(endpoint, "1h", HOUR_MS, 24, now_ms).await?))
    }

    pub async fn endpoint_stats(&self, endpoint: &EndpointId, now_ms: i64) -> Result<EndpointStats, StoreError> {
        // Three reads, sent together on the one multiplexed connection.
        let (five, hours, health) = tokio::try_join!(
            self.buckets(endpoint, "5m", FIVE_MINUTES_MS, 12, now_ms),
            self.buckets(endpoint, "1h", HOUR_MS, 168, now_ms),
            self.endpoint_health(endpoint)
        )?;
        let day = &hours[hours.len() - 24..];
        Ok(EndpointStats {
            last_1h: window(&five),
            last_24h: window(day),
            last_7d: window(&hours),
            series_1h: series(&five, FIVE_MINUTES_MS, now_ms),
            series_24h: series(day, HOUR_MS, now_ms),
            health,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_follow_the_bounds() {
        assert_eq!(latency_index(0), 0);
        assert_eq!(latency_index(5), 0);
        assert_eq!(latency_index(6), 1);
        assert_eq!(latency_index(999_999), LATENCY_BOUNDS_MS.len());
    }

    #[test]
    fn windows_sum_buckets_and_compute_rates_and_percentiles() {
        let b1: HashMap<String, u64> = [("success|0", 5), ("success|4", 4), ("http_5xx|4", 1)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        let b2: HashMap<String, u64> = [("success|0", 90)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        let w = window(&[b1, b2]);
        assert_eq!(w.attempts, 100);
        assert_eq!(w.success_rate, Some(0.99));
        assert_eq!(w.latency_p50_ms, Some(5));
        assert_eq!(w.latency_p99_ms, Some(100));
        assert_eq!(window(&[]).success_rate, None);
    }

    #[test]
    fn series_points_start_at_their_bucket_and_end_with_the_current_one() {
        let now = 10 * HOUR_MS + 1234;
        let ok: HashMap<String, u64> = [("success|1".to_owned(), 3)].into_iter().collect();
        let points = series(&[HashMap::new(), ok], HOUR_MS, now);
        assert_eq!(points.len(), 2);
        assert_eq!(points[0].start, crate::clock::format_rfc3339_ms(9 * HOUR_MS));
        assert_eq!(points[1].start, crate::clock::format_rfc3339_ms(10 * HOUR_MS));
        assert_eq!(points[0].stats.attempts, 0);
        assert_eq!(points[1].stats.success_rate, Some(1.0));
    }
}
