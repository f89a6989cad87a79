//! Identifiers as newtypes, so an endpoint id can never be passed where an event id belongs,
//! and every id that reaches a Redis key or an HTTP header has been checked once at the edge.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("must not be empty")]
    Empty,
    #[error("is longer than {max} characters")]
    TooLong { max: usize },
    #[error("may only contain printable ASCII without spaces")]
    BadCharacter,
}

/// Ids become parts of Redis keys and HTTP header values: printable ASCII, no spaces, bounded.
fn check_token(s: &str, max: usize) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > max {
        return Err(IdError::TooLong { max });
    }
    if !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(IdError::BadCharacter);
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $max:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The prefix of ids this platform generates.
            pub const PREFIX: &'static str = $prefix;

            /// Accepts any well-formed token: ids minted elsewhere need not carry our prefix.
            pub fn parse(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                check_token(&s, $max)?;
                Ok(Self(s))
            }

            /// A new time-ordered id (ULID), so listings sort by creation without another index.
            pub fn generate() -> Self {
                Self(format!("{}{}", $prefix, ulid::Ulid::new().to_string().to_ascii_lowercase()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// The idempotency key of an event: the same across every retry, sent as `webhook-id`.
    EventId, "evt_", 128
);
id_type!(
    /// The Laabam account an event belongs to; it scopes endpoints and deliveries.
    AccountId, "acct_", 64
);
id_type!(
    /// An HTTP endpoint registered by an account.
    EndpointId, "ep_", 64
);
id_type!(
    /// One (event, endpoint) pair. Derived, never random, so every dispatcher that sees the same
    /// event computes the same delivery and a redelivered message cannot create a second one.
    DeliveryId, "dlv_", 64
);

impl EventId {
    /// The id of an event whose publisher gave neither a body `id` nor an AMQP `message_id`:
    /// a hash of the exact bytes, so the broker redelivering the message yields the same id.
    pub fn from_body_hash(body: &[u8]) -> Self {
        Self(format!("evt_{}", short_hash(&[body])))
    }
}

impl DeliveryId {
    /// The one delivery of `event` to `endpoint`.
    pub fn for_pair(event: &EventId, endpoint: &EndpointId) -> Self {
        Self(format!(
            "dlv_{}",
            short_hash(&[event.as_str().as_bytes(), b"\n", endpoint.as_str().as_bytes()])
        ))
    }
}

/// 128 bits of SHA-256 in lowercase hex: collision-free in practice, short enough for keys.
fn short_hash(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
    }
    let digest = hasher.finalize();
    hex::encode(&digest[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_carry_their_prefix_and_parse_back() {
        let id = EndpointId::generate();
        assert!(id.as_str().starts_with("ep_"));
        assert_eq!(EndpointId::parse(id.as_str()).unwrap(), id);
    }

    #[test]
    fn foreign_ids_are_accepted_when_well_formed() {
        assert!(EventId::parse("3f1c2a9e-0d1b-4e5f-9a8b-7c6d5e4f3a2b").is_ok());
        assert_eq!(EventId::parse(""), Err(IdError::Empty));
        assert_eq!(EventId::parse("has space"), Err(IdError::BadCharacter));
        assert_eq!(EventId::parse("é"), Err(IdError::BadCharacter));
        assert_eq!(AccountId::parse("a".repeat(65)), Err(IdError::TooLong { max: 64 }));
    }

    #[test]
    fn delivery_id_is_a_pure_function_of_the_pair() {
        let e = EventId::parse("evt_1").unwrap();
        let a = EndpointId::parse("ep_a").unwrap();
        let b = EndpointId::parse("ep_b").unwrap();
        assert_eq!(DeliveryId::for_pair(&e, &a), DeliveryId::for_pair(&e, &a));
        assert_ne!(DeliveryId::for_pair(&e, &a), DeliveryId::for_pair(&e, &b));
        assert_eq!(DeliveryId::for_pair(&e, &a).as_str().len(), 4 + 32);
    }

    #[test]
    fn body_hash_ids_are_stable() {
        assert_eq!(EventId::from_body_hash(b"{}"), EventId::from_body_hash(b"{}"));
        assert_ne!(EventId::from_body_hash(b"{}"), EventId::from_body_hash(b"[]"));
    }
}
