//! Delivery records: one delivery per (event, endpoint), its state, and every attempt made.

use crate::ids::{AccountId, DeliveryId, EndpointId, EventId};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Where a delivery stands. `Pending` covers both "about to be attempted" and "attempt in
/// flight": in either case a lease in the retry set guarantees that it is attempted again if
/// the dispatcher holding it dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    Pending,
    Retrying,
    Succeeded,
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Retrying => "retrying",
            DeliveryStatus::Succeeded => "succeeded",
            DeliveryStatus::Failed => "failed",
        }
    }

    /// Whether no attempt follows without an owner's redelivery.
    pub fn is_finished(self) -> bool {
        matches!(self, DeliveryStatus::Succeeded | DeliveryStatus::Failed)
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => DeliveryStatus::Pending,
            "retrying" => DeliveryStatus::Retrying,
            "succeeded" => DeliveryStatus::Succeeded,
            "failed" => DeliveryStatus::Failed,
            _ => return None,
        })
    }
}

/// The result of one attempt, in the vocabulary of DESIGN.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    Http3xx,
    Http4xx,
    Http5xx,
    Http410,
    Timeout,
    ConnectError,
    TlsError,
    InvalidResponse,
}

impl Outcome {
    /// Every outcome, for metrics initialised at zero.
    pub const ALL: [Outcome; 9] = [
        Outcome::Success,
        Outcome::Http3xx,
        Outcome::Http4xx,
        Outcome::Http5xx,
        Outcome::Http410,
        Outcome::Timeout,
        Outcome::ConnectError,
        Outcome::TlsError,
        Outcome::InvalidResponse,
    ];

    /// Classifies an HTTP status; any 2xx is success, `410 Gone` has its own outcome.
    pub fn from_status(status: u16) -> Self {
        match status {
            200..=299 => Outcome::Success,
            410 => Outcome::Http410,
            300..=399 => Outcome::Http3xx,
            400..=499 => Outcome::Http4xx,
            500..=599 => Outcome::Http5xx,
            _ => Outcome::InvalidResponse,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Http3xx => "http_3xx",
            Outcome::Http4xx => "http_4xx",
            Outcome::Http5xx => "http_5xx",
            Outcome::Http410 => "http_410",
            Outcome::Timeout => "timeout",
            Outcome::ConnectError => "connect_error",
            Outcome::TlsError => "tls_error",
            Outcome::InvalidResponse => "invalid_response",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == s)
    }

    pub fn is_success(self) -> bool {
        self == Outcome::Success
    }
}

/// One attempt as recorded in Redis and shown to the account owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// 1 for the first attempt; deferrals by our own limits do not count.
    pub attempt: u32,
    /// When the request was sent, unix milliseconds.
    pub at_ms: i64,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub status_code: Option<u16>,
    pub duration_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    /// The first bytes of the response body (lossy UTF-8).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub response_excerpt: Option<String>,
}

impl AttemptRecord {
    /// The record as stored in its delivery's hash. An attempt with neither error nor excerpt
    /// (every success) takes the short form `attempt at_ms outcome status duration_ms`, which
    /// stays under Redis' compact-hash value limit (64 bytes) where JSON would not, so a
    /// delivered hash keeps its listpack encoding; anything else is JSON.
    pub fn to_stored(&self) -> String {
        if self.error.is_some() || self.response_excerpt.is_some() {
            return serde_json::to_string(self).expect("attempts serialize");
        }
        // Written by hand, not by `format!`: every record writes one, and `format!` took about
        // 1,800 instructions for it (callgrind, session 44; see `Keys::join`).
        let mut n = itoa::Buffer::new();
        let mut stored = String::with_capacity(48);
        stored.push_str(n.format(self.attempt));
        stored.push(' ');
        stored.push_str(n.format(self.at_ms));
        stored.push(' ');
        stored.push_str(self.outcome.as_str());
        stored.push(' ');
        match self.status_code {
            Some(code) => stored.push_str(n.format(code)),
            None => stored.push('-'),
        }
        stored.push(' ');
        stored.push_str(n.format(self.duration_ms));
        stored
    }

    /// Reads either stored form; `None` when the text is neither.
    pub fn from_stored(text: &str) -> Option<Self> {
        if text.starts_with('{') {
            return serde_json::from_str(text).ok();
        }
        let mut parts = text.split(' ');
        let mut next = || parts.next();
        let record = AttemptRecord {
            attempt: next()?.parse().ok()?,
            at_ms: next()?.parse().ok()?,
            outcome: Outcome::parse(next()?)?,
            status_code: match next()? {
                "-" => None,
                code => Some(code.parse().ok()?),
            },
            duration_ms: next()?.parse().ok()?,
            error: None,
            response_excerpt: None,
        };
        next().is_none().then_some(record)
    }
}

/// A delivery's state as stored in its Redis hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeliveryState {
    pub id: DeliveryId,
    pub event_id: EventId,
    pub endpoint_id: EndpointId,
    pub account_id: AccountId,
    pub event_type: String,
    pub status: DeliveryStatus,
    /// Attempts made so far.
    pub attempts: u32,
    pub created_ms: i64,
    pub first_attempt_ms: Option<i64>,
    /// When the next attempt is due, while retrying.
    pub next_attempt_ms: Option<i64>,
    /// Why the delivery failed for good.
    pub reason: Option<String>,
}

/// Redis hash field names of a delivery's state, shared by the Rust code and the Lua scripts.
pub mod field {
    pub const EVENT: &str = "event";
    pub const ENDPOINT: &str = "endpoint";
    pub const ACCOUNT: &str = "account";
    pub const TYPE: &str = "type";
    pub const STATUS: &str = "status";
    pub const ATTEMPTS: &str = "attempts";
    pub const CREATED: &str = "created";
    pub const FIRST_ATTEMPT: &str = "first_attempt";
    pub const NEXT_ATTEMPT: &str = "next_attempt";
    pub const REASON: &str = "reason";
    /// How many attempts the hash has logged, late records from expired leases included.
    pub const LOGGED: &str = "logged";
    /// Attempt `n` of the log is field `att:n` (see [`super::AttemptRecord::to_stored`]).
    pub const ATTEMPT_PREFIX: &str = "att:";
    /// The fields that make up [`super::DeliveryState`], read without the attempt log.
    pub const STATE: [&str; 10] = [
        EVENT,
        ENDPOINT,
        ACCOUNT,
        TYPE,
        STATUS,
        ATTEMPTS,
        CREATED,
        FIRST_ATTEMPT,
        NEXT_ATTEMPT,
        REASON,
    ];
}

impl DeliveryState {
    /// Rebuilds the state from its hash; `None` when the hash is absent or damaged.
    pub fn from_hash(id: DeliveryId, h: &HashMap<String, String>) -> Option<Self> {
        let get = |k: &str| h.get(k).map(String::as_str);
        let num = |k: &str| get(k).and_then(|v| v.parse::<i64>().ok());
        Some(DeliveryState {
            id,
            event_id: EventId::parse(get(field::EVENT)?).ok()?,
            endpoint_id: EndpointId::parse(get(field::ENDPOINT)?).ok()?,
            account_id: AccountId::parse(get(field::ACCOUNT)?).ok()?,
            event_type: get(field::TYPE)?.to_owned(),
            status: DeliveryStatus::parse(get(field::STATUS)?)?,
            attempts: get(field::ATTEMPTS).and_then(|v| v.parse().ok()).unwrap_or(0),
            created_ms: num(field::CREATED).unwrap_or(0),
            first_attempt_ms: num(field::FIRST_ATTEMPT),
            next_attempt_ms: num(field::NEXT_ATTEMPT),
            reason: get(field::REASON).map(str::to_owned),
        })
    }
}

/// A retry job: what the retry set holds and what the scheduler re-publishes. It names every
/// key the dispatcher needs, so taking a job is one Redis round trip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryJob {
    pub delivery: DeliveryId,
    pub event: EventId,
    pub endpoint: EndpointId,
    pub account: AccountId,
}

impl RetryJob {
    /// The job's one encoding: the sorted-set member and the AMQP body are the same bytes, so
    /// scheduling the same delivery twice updates one member instead of adding a second.
    pub fn encode(&self) -> String {
        serde_json::to_string(&(&self.delivery, &self.event, &self.endpoint, &self.account))
            .expect("ids always serialize")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        let (delivery, event, endpoint, account) = serde_json::from_slice(bytes)?;
        Ok(RetryJob {
            delivery,
            event,
            endpoint,
            account,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_classify_per_the_contract() {
        assert_eq!(Outcome::from_status(200), Outcome::Success);
        assert_eq!(Outcome::from_status(204), Outcome::Success);
        assert_eq!(Outcome::from_status(301), Outcome::Http3xx);
        assert_eq!(Outcome::from_status(404), Outcome::Http4xx);
        assert_eq!(Outcome::from_status(410), Outcome::Http410);
        assert_eq!(Outcome::from_status(503), Outcome::Http5xx);
        assert_eq!(Outcome::from_status(102), Outcome::InvalidResponse);
    }

    #[test]
    fn retry_jobs_round_trip_and_encode_deterministically() {
        let job = RetryJob {
            delivery: DeliveryId::parse("dlv_1").unwrap(),
            event: EventId::parse("evt \"odd\"".replace(' ', "_")).unwrap(),
            endpoint: EndpointId::parse("ep_1").unwrap(),
            account: AccountId::parse("acct_1").unwrap(),
        };
        assert_eq!(job.encode(), job.encode());
        assert_eq!(RetryJob::decode(job.encode().as_bytes()).unwrap(), job);
        assert!(RetryJob::decode(b"[1,2]").is_err());
    }

    fn attempt(outcome: Outcome, status_code: Option<u16>) -> AttemptRecord {
        AttemptRecord {
            attempt: 4_000_000_000,
            at_ms: 9_999_999_999_999,
            outcome,
            status_code,
            duration_ms: 30_000,
            error: None,
            response_excerpt: None,
        }
    }

    #[test]
    fn every_bare_attempt_is_stored_short_enough_for_a_compact_hash() {
        for outcome in Outcome::ALL {
            for code in [None, Some(599)] {
                let a = attempt(outcome, code);
                let stored = a.to_stored();
                assert!(!stored.starts_with('{') && stored.len() <= 64, "{stored}");
                assert_eq!(AttemptRecord::from_stored(&stored), Some(a));
            }
        }
        // The form stored logs hold, which every reader of them parses.
        assert_eq!(
            attempt(Outcome::Success, Some(200)).to_stored(),
            "4000000000 9999999999999 success 200 30000"
        );
        assert_eq!(
            attempt(Outcome::Timeout, None).to_stored(),
            "4000000000 9999999999999 timeout - 30000"
        );
    }

    #[test]
    fn attempts_with_an_error_or_excerpt_are_stored_as_json_and_read_back() {
        let mut a = attempt(Outcome::Http5xx, Some(503));
        a.error = Some("upstream said \"no\" twice".into());
        a.response_excerpt = Some("{\"busy\": true}".into());
        let stored = a.to_stored();
        assert!(stored.starts_with('{'));
        assert_eq!(AttemptRecord::from_stored(&stored), Some(a));
    }

    #[test]
    fn damaged_attempt_text_is_refused() {
        for text in [
            "",
            "1 2 success 200",
            "1 2 success 200 3 4",
            "1 2 sucess 200 3",
            "x 2 success 200 3",
            "{",
        ] {
            assert_eq!(AttemptRecord::from_stored(text), None, "{text:?}");
        }
    }
}
