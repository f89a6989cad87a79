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
}
