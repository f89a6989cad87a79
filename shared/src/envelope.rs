//! The event envelope: what producers publish and what endpoints receive as the POST body.
//!
//! Parsing is where untrusted bytes become an [`Envelope`]; after it, the id is a valid token,
//! the type is in the catalog, the payload has its required fields, and `data` is still the
//! publisher's exact bytes.

use crate::catalog::{self, EventSpec, PayloadError};
use crate::clock;
use crate::ids::{AccountId, EventId, IdError};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The largest event accepted, over AMQP and HTTP alike.
pub const MAX_EVENT_BYTES: usize = 256 * 1024;

/// A validated event, ready to be stored and delivered.
#[derive(Debug, Clone, Serialize)]
pub struct Envelope {
    pub id: EventId,
    #[serde(rename = "type")]
    pub event_type: String,
    /// RFC 3339 UTC with milliseconds.
    pub timestamp: String,
    pub account_id: AccountId,
    /// Carried raw: numbers and field order stay exactly as published.
    pub data: Box<RawValue>,
}

/// What the broker knows about a message beyond its body, used to fill in what a publisher
/// that does not use our library left out.
#[derive(Debug, Clone, Default)]
pub struct Provenance {
    pub message_id: Option<String>,
    /// The AMQP `timestamp` property, in unix seconds.
    pub amqp_timestamp: Option<u64>,
    pub routing_key: Option<String>,
}

/// Why an event was refused. Each variant maps to a stable reason code used in dead-letter
/// headers, metrics labels and API errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("event is {size} bytes, larger than the {max}-byte limit")]
    TooLarge { size: usize, max: usize },
    #[error("body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("{0} is required")]
    MissingField(&'static str),
    #[error("{field}: {problem}")]
    InvalidField { field: &'static str, problem: String },
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    #[error("{0}")]
    InvalidPayload(#[from] PayloadError),
}

impl EnvelopeError {
    /// Every reason code, for metrics initialised at zero.
    pub const CODES: [&'static str; 6] = [
        "too_large",
        "invalid_json",
        "missing_field",
        "invalid_field",
        "unknown_type",
        "invalid_payload",
    ];

    /// A short machine-readable reason (`x-laabam-dead-reason`, metric labels).
    pub fn code(&self) -> &'static str {
        match self {
            EnvelopeError::TooLarge { .. } => "too_large",
            EnvelopeError::InvalidJson(_) => "invalid_json",
            EnvelopeError::MissingField(_) => "missing_field",
            EnvelopeError::InvalidField { .. } => "invalid_field",
            EnvelopeError::UnknownType(_) => "unknown_type",
            EnvelopeError::InvalidPayload(_) => "invalid_payload",
        }
    }

    /// The path of the offending field, when there is one.
    pub fn field(&self) -> Option<String> {
        match self {
            EnvelopeError::MissingField(f) => Some((*f).to_owned()),
            EnvelopeError::InvalidField { field, .. } => Some((*field).to_owned()),
            EnvelopeError::UnknownType(_) => Some("type".into()),
            EnvelopeError::InvalidPayload(p) if p.field.is_empty() => Some("data".into()),
            EnvelopeError::InvalidPayload(p) => Some(format!("data.{}", p.field)),
            _ => None,
        }
    }
}

/// The wire shape, with everything optional so that each absence gets its own error.
#[derive(Deserialize)]
struct WireEnvelope<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(rename = "type", default)]
    event_type: Option<String>,
    #[serde(default)]
    timestamp: Option<String>,
    #[serde(default)]
    account_id: Option<String>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

fn invalid_id(field: &'static str) -> impl Fn(IdError) -> EnvelopeError {
    move |e| EnvelopeError::InvalidField {
        field,
        problem: e.to_string(),
    }
}

impl Envelope {
    /// Parses a published body. `now_ms` fills a missing timestamp; the store keeps the first
    /// copy of an event, so a redelivered message keeps the timestamp it was first seen with.
    pub fn parse(body: &[u8], provenance: &Provenance, now_ms: i64) -> Result<Self, EnvelopeError> {
        if body.len() > MAX_EVENT_BYTES {
            return Err(EnvelopeError::TooLarge {
                size: body.len(),
                max: MAX_EVENT_BYTES,
            });
        }
        let wire: WireEnvelope<'_> =
            serde_json::from_slice(body).map_err(|e| EnvelopeError::InvalidJson(e.to_string()))?;

        let id = match (wire.id, provenance.message_id.as_deref()) {
            (Some(id), _) => EventId::parse(id).map_err(invalid_id("id"))?,
            (None, Some(mid)) => EventId::parse(mid).map_err(invalid_id("message_id"))?,
            (None, None) => EventId::from_body_hash(body),
        };
        let event_type = wire
            .event_type
            .or_else(|| provenance.routing_key.clone())
            .ok_or(EnvelopeError::MissingField("type"))?;
        let spec = lookup_type(&event_type)?;
        let timestamp = match wire.timestamp {
            Some(ts) => clock::normalize_rfc3339(&ts).ok_or(EnvelopeError::InvalidField {
                field: "timestamp",
                problem: "must be an RFC 3339 date-time".into(),
            })?,
            None => clock::format_rfc3339_ms(match provenance.amqp_timestamp {
                Some(secs) => secs as i64 * 1000,
                None => now_ms,
            }),
        };
        let account_id = AccountId::parse(wire.account_id.ok_or(EnvelopeError::MissingField("account_id"))?)
            .map_err(invalid_id("account_id"))?;
        let data = wire.data.ok_or(EnvelopeError::MissingField("data"))?;
        spec.validate(data)?;
        Ok(Envelope {
            id,
            event_type: spec.name.to_owned(),
            timestamp,
            account_id,
            data: data.to_owned(),
        })
    }

    /// A new event from our own publisher: fresh id and timestamp unless the caller chose them.
    pub fn new(
        event_type: &str,
        account_id: AccountId,
        data: Box<RawValue>,
        id: Option<EventId>,
        now_ms: i64,
    ) -> Result<Self, EnvelopeError> {
        let spec = lookup_type(event_type)?;
        spec.validate(&data)?;
        let envelope = Envelope {
            id: id.unwrap_or_else(EventId::generate),
            event_type: spec.name.to_owned(),
            timestamp: clock::format_rfc3339_ms(now_ms),
            account_id,
            data,
        };
        let size = envelope.to_json().len();
        if size > MAX_EVENT_BYTES {
            return Err(EnvelopeError::TooLarge {
                size,
                max: MAX_EVENT_BYTES,
            });
        }
        Ok(envelope)
    }

    /// The POST body: `id`, `type`, `timestamp`, `account_id`, `data`, in that order.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope always serializes")
    }
}

fn lookup_type(event_type: &str) -> Result<&'static EventSpec, EnvelopeError> {
    catalog::lookup(event_type).ok_or_else(|| EnvelopeError::UnknownType(event_type.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAID: &str = r#"{"id":"evt_1","type":"invoice.paid","timestamp":"2026-11-28T04:42:00.123Z","account_id":"acct_1","data":{"invoice_id":"inv_123","payment_id":"pay_456","amount":50000}}"#;

    fn parse(body: &str) -> Result<Envelope, EnvelopeError> {
        Envelope::parse(body.as_bytes(), &Provenance::default(), 0)
    }

    #[test]
    fn a_complete_envelope_round_trips_byte_for_byte() {
        let env = parse(PAID).unwrap();
        assert_eq!(String::from_utf8(env.to_json()).unwrap(), PAID);
    }

    #[test]
    fn data_keeps_its_numbers_and_field_order() {
        let body = r#"{"type":"invoice.paid","account_id":"a","data":{"z":1.10,"amount":12345678901234567890,"payment_id":"p","invoice_id":"i"}}"#;
        let env = parse(body).unwrap();
        assert_eq!(
            env.data.get(),
            r#"{"z":1.10,"amount":12345678901234567890,"payment_id":"p","invoice_id":"i"}"#
        );
    }

    #[test]
    fn missing_id_comes_from_message_id_then_from_the_body_hash() {
        let body = r#"{"type":"payment.failed","account_id":"a","data":{"payment_id":"p","reason":"r"}}"#;
        let with_mid = Provenance {
            message_id: Some("m-42".into()),
            ..Default::default()
        };
        assert_eq!(
            Envelope::parse(body.as_bytes(), &with_mid, 0).unwrap().id.as_str(),
            "m-42"
        );
        let a = parse(body).unwrap().id;
        let b = parse(body).unwrap().id;
        assert_eq!(a, b);
        assert!(a.as_str().starts_with("evt_"));
    }

    #[test]
    fn missing_timestamp_comes_from_amqp_then_from_now() {
        let body = r#"{"id":"e","type":"payment.failed","account_id":"a","data":{"payment_id":"p","reason":"r"}}"#;
        let amqp = Provenance {
            amqp_timestamp: Some(1_795_840_920),
            ..Default::default()
        };
        assert_eq!(
            Envelope::parse(body.as_bytes(), &amqp, 0).unwrap().timestamp,
            "2026-11-28T04:42:00.000Z"
        );
        assert_eq!(
            Envelope::parse(body.as_bytes(), &Provenance::default(), 1_000)
                .unwrap()
                .timestamp,
            "1970-01-01T00:00:01.000Z"
        );
    }

    #[test]
    fn type_falls_back_to_the_routing_key() {
        let body = r#"{"account_id":"a","data":{"payment_id":"p","reason":"r"}}"#;
        let prov = Provenance {
            routing_key: Some("payment.failed".into()),
            ..Default::default()
        };
        assert_eq!(
            Envelope::parse(body.as_bytes(), &prov, 0).unwrap().event_type,
            "payment.failed"
        );
    }

    #[test]
    fn each_refusal_has_a_precise_reason() {
        let cases = [
            ("not json", "invalid_json", None),
            ("[1,2]", "invalid_json", None),
            (r#"{"account_id":"a","data":{}}"#, "missing_field", Some("type")),
            (
                r#"{"type":"invoice.deleted","account_id":"a","data":{}}"#,
                "unknown_type",
                Some("type"),
            ),
            (
                r#"{"type":"payment.failed","data":{}}"#,
                "missing_field",
                Some("account_id"),
            ),
            (
                r#"{"type":"payment.failed","account_id":"a b","data":{}}"#,
                "invalid_field",
                Some("account_id"),
            ),
            (
                r#"{"type":"payment.failed","account_id":"a"}"#,
                "missing_field",
                Some("data"),
            ),
            (
                r#"{"type":"payment.failed","account_id":"a","data":{"payment_id":7,"reason":"r"}}"#,
                "invalid_payload",
                Some("data.payment_id"),
            ),
            (
                r#"{"type":"payment.failed","account_id":"a","timestamp":"soon","data":{"payment_id":"p","reason":"r"}}"#,
                "invalid_field",
                Some("timestamp"),
            ),
        ];
        for (body, code, field) in cases {
            let err = parse(body).unwrap_err();
            assert_eq!(err.code(), code, "{body}: {err}");
            assert_eq!(err.field().as_deref(), field, "{body}: {err}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn payload() -> impl Strategy<Value = String> {
            ("[a-zA-Z0-9 _.@-]{0,40}", "[a-zA-Z0-9 _.@-]{0,40}", any::<i64>()).prop_map(|(a, b, n)| {
                serde_json::json!({ "invoice_id": a, "payment_id": b, "amount": n, "note": "é\u{1F600}\"" }).to_string()
            })
        }

        proptest! {
            #[test]
            fn arbitrary_bytes_never_panic_and_always_get_a_reason(body in proptest::collection::vec(any::<u8>(), 0..512)) {
                if let Err(e) = Envelope::parse(&body, &Provenance::default(), 0) {
                    prop_assert!(EnvelopeError::CODES.contains(&e.code()));
                }
            }

            #[test]
            fn json_shaped_noise_never_panics(
                id in proptest::option::of("[ -~]{0,140}"),
                ty in proptest::option::of("[a-z.]{0,20}"),
                ts in proptest::option::of("[0-9TZ:.+-]{0,30}"),
                account in proptest::option::of("[ -~]{0,70}"),
            ) {
                let body = serde_json::json!({ "id": id, "type": ty, "timestamp": ts, "account_id": account, "data": {} });
                let _ = Envelope::parse(body.to_string().as_bytes(), &Provenance::default(), 0);
            }

            #[test]
            fn valid_events_round_trip_with_data_byte_for_byte(data in payload(), account in "[a-z0-9_]{1,20}") {
                let raw = RawValue::from_string(data.clone()).unwrap();
                let env = Envelope::new("invoice.paid", AccountId::parse(account).unwrap(), raw, None, 1_000).unwrap();
                let back = Envelope::parse(&env.to_json(), &Provenance::default(), 0).unwrap();
                prop_assert_eq!(back.data.get(), data.as_str());
                prop_assert_eq!(back.to_json(), env.to_json());
            }
        }
    }

    #[test]
    fn every_code_is_listed() {
        let errors = [
            EnvelopeError::TooLarge { size: 1, max: 0 },
            EnvelopeError::InvalidJson(String::new()),
            EnvelopeError::MissingField("x"),
            EnvelopeError::InvalidField {
                field: "x",
                problem: String::new(),
            },
            EnvelopeError::UnknownType(String::new()),
            EnvelopeError::InvalidPayload(PayloadError {
                field: String::new(),
                problem: String::new(),
            }),
        ];
        let codes: Vec<_> = errors.iter().map(EnvelopeError::code).collect();
        assert_eq!(codes, EnvelopeError::CODES);
    }

    #[test]
    fn oversized_bodies_are_refused_before_parsing() {
        let body = vec![b' '; MAX_EVENT_BYTES + 1];
        assert_eq!(
            Envelope::parse(&body, &Provenance::default(), 0).unwrap_err().code(),
            "too_large"
        );
    }

    #[test]
    fn new_events_get_an_id_and_a_timestamp() {
        let data = RawValue::from_string(r#"{"payment_id":"p","reason":"r"}"#.into()).unwrap();
        let env = Envelope::new("payment.failed", AccountId::parse("acct_1").unwrap(), data, None, 0).unwrap();
        assert!(env.id.as_str().starts_with("evt_"));
        assert_eq!(env.timestamp, "1970-01-01T00:00:00.000Z");
        let reparsed = parse(std::str::from_utf8(&env.to_json()).unwrap()).unwrap();
        assert_eq!(reparsed.id, env.id);
    }
}
