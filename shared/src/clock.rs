//! Time as the contracts write it: RFC 3339 UTC with milliseconds in envelopes, unix
//! milliseconds in Redis scores, unix seconds in `webhook-timestamp`.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;

/// Milliseconds since the unix epoch, the unit of every Redis score and stored time.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// How far Redis's clock is ahead of this host's, as last measured (`store::server_clock`).
static REDIS_OFFSET_MS: AtomicI64 = AtomicI64::new(0);

/// The time by Redis's clock, as this process last measured it: the clock of every time that
/// processes on different hosts compare (a lease's end, a retry's due time, a scheduler's
/// claim), so that one host's clock being off cannot end another's leases early. Times that
/// leave the system (`webhook-timestamp`) or time an attempt stay on the host's, [`now_ms`].
pub fn redis_now_ms() -> i64 {
    now_ms() + REDIS_OFFSET_MS.load(Ordering::Relaxed)
}

/// Sets what [`redis_now_ms`] adds to this host's clock.
pub fn set_redis_offset_ms(offset_ms: i64) {
    REDIS_OFFSET_MS.store(offset_ms, Ordering::Relaxed);
}

/// How far a server's clock is ahead of ours (negative: behind), from its reading `server_ms`
/// taken between our `sent_ms` and `received_ms`: the reading is assumed taken halfway, so the
/// answer is off by at most half the round trip.
pub fn offset_ms(sent_ms: i64, server_ms: i64, received_ms: i64) -> i64 {
    server_ms - (sent_ms + received_ms) / 2
}

/// `2026-11-28T04:42:00.123Z`: the one timestamp format of the envelope.
pub fn format_rfc3339_ms(unix_ms: i64) -> String {
    let dt =
        OffsetDateTime::from_unix_timestamp_nanos(unix_ms as i128 * 1_000_000).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    dt.format(format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    ))
    .expect("a fixed format always formats")
}

/// Parses any RFC 3339 timestamp (any offset, any precision) to unix milliseconds.
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let dt = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    i64::try_from(dt.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Normalises a publisher's timestamp to our format, so receivers see one shape only.
pub fn normalize_rfc3339(s: &str) -> Option<String> {
    parse_rfc3339_ms(s).map(format_rfc3339_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_reading_is_placed_halfway_through_the_round_trip() {
        assert_eq!(offset_ms(1_000, 1_005, 1_010), 0);
        assert_eq!(offset_ms(1_000, 31_005, 1_010), 30_000, "the server 30 s ahead");
        assert_eq!(offset_ms(31_000, 1_005, 31_010), -30_000, "the server 30 s behind");
    }

    #[test]
    fn formats_with_milliseconds_in_utc() {
        assert_eq!(format_rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_rfc3339_ms(1_795_840_920_123), "2026-11-28T04:42:00.123Z");
    }

    #[test]
    fn parses_offsets_and_normalises_to_utc() {
        assert_eq!(
            normalize_rfc3339("2026-11-28T11:42:00.123+07:00").as_deref(),
            Some("2026-11-28T04:42:00.123Z")
        );
        assert_eq!(
            normalize_rfc3339("2026-11-28T04:42:00Z").as_deref(),
            Some("2026-11-28T04:42:00.000Z")
        );
        assert_eq!(normalize_rfc3339("yesterday"), None);
    }
}
