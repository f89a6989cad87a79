//! The event catalog: every event type the platform carries, its payload fields and an example.
//!
//! Adding an event type is one entry in [`CATALOG`]; validation, documentation and examples are
//! all derived from it.

use serde_json::Value;
use serde_json::value::RawValue;

/// The JSON type a payload field must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    String,
    Integer,
}

impl FieldKind {
    fn accepts(self, value: &Value) -> bool {
        match self {
            FieldKind::String => value.is_string(),
            FieldKind::Integer => value.is_i64() || value.is_u64(),
        }
    }

    pub fn json_type(self) -> &'static str {
        match self {
            FieldKind::String => "string",
            FieldKind::Integer => "integer",
        }
    }
}

/// A required payload field. Extra fields beyond the required ones are always allowed, so
/// billing services can add data without a platform release.
#[derive(Debug)]
pub struct FieldSpec {
    pub name: &'static str,
    pub kind: FieldKind,
    pub description: &'static str,
}

/// One event type of the catalog.
#[derive(Debug)]
pub struct EventSpec {
    pub name: &'static str,
    /// What happened in the billing system when this event is published.
    pub description: &'static str,
    pub fields: &'static [FieldSpec],
    /// A payload that validates; used in documentation and in test sends.
    pub example: &'static str,
}

const fn field(name: &'static str, kind: FieldKind, description: &'static str) -> FieldSpec {
    FieldSpec {
        name,
        kind,
        description,
    }
}

/// Every event type the platform accepts.
pub static CATALOG: &[EventSpec] = &[
    EventSpec {
        name: "invoice.created",
        description: "An invoice was created for a customer.",
        fields: &[
            field("invoice_id", FieldKind::String, "The invoice's id."),
            field("status", FieldKind::String, "The invoice's status, e.g. draft or open."),
            field("amount", FieldKind::Integer, "Total in the currency's minor unit."),
        ],
        example: r#"{"invoice_id":"inv_123","status":"open","amount":50000}"#,
    },
    EventSpec {
        name: "invoice.paid",
        description: "An invoice was paid in full.",
        fields: &[
            field("invoice_id", FieldKind::String, "The invoice's id."),
            field("payment_id", FieldKind::String, "The payment that settled it."),
            field(
                "amount",
                FieldKind::Integer,
                "Amount paid in the currency's minor unit.",
            ),
        ],
        example: r#"{"invoice_id":"inv_123","payment_id":"pay_456","amount":50000}"#,
    },
    EventSpec {
        name: "customer.created",
        description: "A customer was added to the account.",
        fields: &[
            field("customer_id", FieldKind::String, "The customer's id."),
            field("name", FieldKind::String, "The customer's display name."),
            field("email", FieldKind::String, "The customer's billing e-mail address."),
        ],
        example: r#"{"customer_id":"cus_789","name":"Nguyen Van A","email":"a@example.com"}"#,
    },
    EventSpec {
        name: "payment.failed",
        description: "A payment attempt was declined or could not be processed.",
        fields: &[
            field("payment_id", FieldKind::String, "The failed payment's id."),
            field("reason", FieldKind::String, "Why it failed, e.g. card_declined."),
        ],
        example: r#"{"payment_id":"pay_456","reason":"card_declined"}"#,
    },
    EventSpec {
        name: ENDPOINT_DISABLED,
        description: "The platform stopped delivering to one of the account's endpoints (it answered 410 Gone, or kept failing). Sent to the account's other endpoints that subscribe to it.",
        fields: &[
            field("endpoint_id", FieldKind::String, "The disabled endpoint."),
            field("url", FieldKind::String, "Its URL."),
            field("reason", FieldKind::String, "Why it was disabled."),
        ],
        example: r#"{"endpoint_id":"ep_01j0000000000000000000000","url":"https://example.com/hooks","reason":"endpoint answered 410 Gone"}"#,
    },
];

/// The type of the event the platform itself publishes when it disables an endpoint.
pub const ENDPOINT_DISABLED: &str = "endpoint.disabled";

/// The spec of an event type, or `None` when the type is not in the catalog.
pub fn lookup(name: &str) -> Option<&'static EventSpec> {
    CATALOG.iter().find(|spec| spec.name == name)
}

impl EventSpec {
    /// The payload's JSON Schema (draft 2020-12), derived from the field list.
    pub fn json_schema(&self) -> Value {
        let properties: serde_json::Map<String, Value> = self
            .fields
            .iter()
            .map(|f| {
                (
                    f.name.to_owned(),
                    serde_json::json!({ "type": f.kind.json_type(), "description": f.description }),
                )
            })
            .collect();
        serde_json::json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": self.name,
            "type": "object",
            "properties": properties,
            "required": self.fields.iter().map(|f| f.name).collect::<Vec<_>>(),
            "additionalProperties": true,
        })
    }
}

/// A payload that does not match its event type, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("data.{field}: {problem}")]
pub struct PayloadError {
    /// The path of the offending field below `data`.
    pub field: String,
    pub problem: String,
}

impl EventSpec {
    /// Checks required fields and their types. The raw payload is only read, never re-encoded.
    pub fn validate(&self, data: &RawValue) -> Result<(), PayloadError> {
        let value: Value = serde_json::from_str(data.get()).map_err(|e| PayloadError {
            field: String::new(),
            problem: format!("not valid JSON: {e}"),
        })?;
        let Value::Object(map) = value else {
            return Err(PayloadError {
                field: String::new(),
                problem: "must be a JSON object".into(),
            });
        };
        for spec in self.fields {
            match map.get(spec.name) {
                None | Some(Value::Null) => {
                    return Err(PayloadError {
                        field: spec.name.into(),
                        problem: "is required".into(),
                    });
                }
                Some(v) if !spec.kind.accepts(v) => {
                    return Err(PayloadError {
                        field: spec.name.into(),
                        problem: format!("must be {} {}", article(spec.kind), spec.kind.json_type()),
                    });
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

fn article(kind: FieldKind) -> &'static str {
    match kind {
        FieldKind::Integer => "an",
        FieldKind::String => "a",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn every_example_validates_against_its_own_spec() {
        for spec in CATALOG {
            spec.validate(&raw(spec.example))
                .unwrap_or_else(|e| panic!("{}: {e}", spec.name));
        }
    }

    #[test]
    fn names_are_unique() {
        for (i, a) in CATALOG.iter().enumerate() {
            assert!(CATALOG[i + 1..].iter().all(|b| b.name != a.name), "{}", a.name);
        }
    }

    #[test]
    fn errors_name_the_field_and_the_problem() {
        let paid = lookup("invoice.paid").unwrap();
        let err = paid
            .validate(&raw(r#"{"invoice_id":"i","payment_id":"p","amount":"5"}"#))
            .unwrap_err();
        assert_eq!(err.to_string(), "data.amount: must be an integer");
        let err = paid.validate(&raw(r#"{"invoice_id":"i","amount":5}"#)).unwrap_err();
        assert_eq!(err.to_string(), "data.payment_id: is required");
        assert!(paid.validate(&raw("[1]")).is_err());
        assert!(
            paid.validate(&raw(r#"{"invoice_id":"i","payment_id":"p","amount":1.5}"#))
                .is_err()
        );
    }

    #[test]
    fn extra_fields_are_allowed() {
        let failed = lookup("payment.failed").unwrap();
        assert!(
            failed
                .validate(&raw(r#"{"payment_id":"p","reason":"r","retryable":true}"#))
                .is_ok()
        );
    }

    #[test]
    fn schemas_list_every_required_field() {
        let schema = lookup("invoice.paid").unwrap().json_schema();
        assert_eq!(
            schema["required"],
            serde_json::json!(["invoice_id", "payment_id", "amount"])
        );
        assert_eq!(schema["properties"]["amount"]["type"], "integer");
    }

    proptest::proptest! {
        #[test]
        fn validation_never_panics_on_any_json(value in proptest::arbitrary::any::<(Option<String>, Option<i64>, bool)>()) {
            let (s, n, flag) = value;
            let json = serde_json::json!({ "invoice_id": s, "payment_id": n, "amount": flag });
            for spec in CATALOG {
                let _ = spec.validate(&raw(&json.to_string()));
            }
        }
    }

    #[test]
    fn unknown_types_are_not_found() {
        assert!(lookup("invoice.deleted").is_none());
    }
}
