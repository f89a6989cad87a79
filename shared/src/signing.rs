//! Standard Webhooks signatures: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
//!
//! Any receiver using a Standard Webhooks library verifies our deliveries unchanged; this
//! module is also what our own tests and receivers use to verify them.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Sha256;
use std::fmt;
use std::time::Duration;

type HmacSha256 = Hmac<Sha256>;

/// The prefix of every signing secret, as the specification writes it.
pub const SECRET_PREFIX: &str = "whsec_";

/// How far a `webhook-timestamp` may be from the receiver's clock, against replays.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(5 * 60);

/// An endpoint's signing key. `Debug` never shows it, so it cannot leak through a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

/// Why a secret or a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("secret must be whsec_ followed by base64 of 24 to 64 bytes")]
    MalformedSecret,
    #[error("webhook-timestamp is not a unix time in seconds")]
    MalformedTimestamp,
    #[error("webhook-timestamp is outside the tolerance window")]
    TimestampOutOfTolerance,
    #[error("no v1 signature in webhook-signature matches")]
    NoMatchingSignature,
}

impl Secret {
    /// 32 random bytes from the OS-seeded CSPRNG (the specification asks for 24 to 64).
    pub fn generate() -> Self {
        let mut key = vec![0u8; 32];
        rand::rng().fill_bytes(&mut key);
        Secret(key)
    }

    pub fn parse(s: &str) -> Result<Self, SignatureError> {
        let encoded = s.strip_prefix(SECRET_PREFIX).unwrap_or(s);
        let key = B64.decode(encoded).map_err(|_| SignatureError::MalformedSecret)?;
        if !(24..=64).contains(&key.len()) {
            return Err(SignatureError::MalformedSecret);
        }
        Ok(Secret(key))
    }

    /// The `whsec_…` form shown to the account owner. Named so that every use stands out.
    pub fn expose(&self) -> String {
        format!("{SECRET_PREFIX}{}", B64.encode(&self.0))
    }

    fn mac(&self, msg_id: &str, timestamp: &str, body: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any size");
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// One `v1,<base64>` signature.
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        let tag = self.mac(msg_id, &timestamp.to_string(), body).finalize().into_bytes();
        format!("v1,{}", B64.encode(tag))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.expose())
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Secret::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The `webhook-signature` value: one signature per secret, space-separated, so a receiver
/// holding either the old or the new secret verifies while a secret rotates.
pub fn signature_header<'a>(
    secrets: impl IntoIterator<Item = &'a Secret>,
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    secrets
        .into_iter()
        .map(|s| s.sign(msg_id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Verifies a delivery as a receiver would: timestamp within `tolerance` of `now_secs`, and at
/// least one `v1` signature matching, compared in constant time.
pub fn verify(
    secret: &Secret,
    msg_id: &str,
    timestamp: &str,
    signatures: &str,
    body: &[u8],
    now_secs: i64,
    tolerance: Duration,
) -> Result<(), SignatureError> {
    let ts: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| SignatureError::MalformedTimestamp)?;
    if ts.abs_diff(now_secs) > tolerance.as_secs() {
        return Err(SignatureError::TimestampOutOfTolerance);
    }
    let expected = secret.mac(msg_id, timestamp.trim(), body);
    let matched = signatures
        .split_whitespace()
        .filter_map(|sig| sig.strip_prefix("v1,"))
        .filter_map(|b64| B64.decode(b64).ok())
        // `verify_slice` compares in constant time.
        .any(|tag| expected.clone().verify_slice(&tag).is_ok());
    if matched {
        Ok(())
    } else {
        Err(SignatureError::NoMatchingSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The test vector published with the Standard Webhooks specification.
    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TS: i64 = 1614265330;
    const SPEC_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SPEC_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn matches_the_specification_test_vector() {
        let secret = Secret::parse(SPEC_SECRET).unwrap();
        assert_eq!(secret.sign(SPEC_ID, SPEC_TS, SPEC_BODY), SPEC_SIG);
        assert_eq!(
            verify(
                &secret,
                SPEC_ID,
                "1614265330",
                SPEC_SIG,
                SPEC_BODY,
                SPEC_TS,
                DEFAULT_TOLERANCE
            ),
            Ok(())
        );
    }

    #[test]
    fn any_of_several_signatures_may_match() {
        let secret = Secret::parse(SPEC_SECRET).unwrap();
        let header = format!("v1,Zm9vYmFy v2,abc {SPEC_SIG}");
        assert!(
            verify(
                &secret,
                SPEC_ID,
                "1614265330",
                &header,
                SPEC_BODY,
                SPEC_TS,
                DEFAULT_TOLERANCE
            )
            .is_ok()
        );
    }

    #[test]
    fn tampering_and_replays_are_refused() {
        let secret = Secret::parse(SPEC_SECRET).unwrap();
        let v =
            |id: &str, ts: &str, body: &[u8], now: i64| verify(&secret, id, ts, SPEC_SIG, body, now, DEFAULT_TOLERANCE);
        assert_eq!(
            v(SPEC_ID, "1614265330", b"{}", SPEC_TS),
            Err(SignatureError::NoMatchingSignature)
        );
        assert_eq!(
            v("msg_other", "1614265330", SPEC_BODY, SPEC_TS),
            Err(SignatureError::NoMatchingSignature)
        );
        assert_eq!(
            v(SPEC_ID, "1614265330", SPEC_BODY, SPEC_TS + 301),
            Err(SignatureError::TimestampOutOfTolerance)
        );
        assert_eq!(
            v(SPEC_ID, "1614265330", SPEC_BODY, SPEC_TS - 301),
            Err(SignatureError::TimestampOutOfTolerance)
        );
        assert_eq!(
            v(SPEC_ID, "soon", SPEC_BODY, SPEC_TS),
            Err(SignatureError::MalformedTimestamp)
        );
    }

    #[test]
    fn rotation_header_verifies_with_either_secret() {
        let (old, new) = (Secret::generate(), Secret::generate());
        let header = signature_header([&old, &new], "evt_1", 100, b"body");
        assert_eq!(header.split(' ').count(), 2);
        for s in [&old, &new] {
            assert!(verify(s, "evt_1", "100", &header, b"body", 100, DEFAULT_TOLERANCE).is_ok());
        }
        let stranger = Secret::generate();
        assert!(verify(&stranger, "evt_1", "100", &header, b"body", 100, DEFAULT_TOLERANCE).is_err());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn every_signature_verifies_and_any_change_breaks_it(
                id in "[ -~]{1,64}",
                ts in 0i64..4_000_000_000,
                body in proptest::collection::vec(any::<u8>(), 0..256),
                flip in any::<usize>(),
            ) {
                let secret = Secret::generate();
                let header = signature_header([&secret], &id, ts, &body);
                prop_assert!(verify(&secret, &id, &ts.to_string(), &header, &body, ts, DEFAULT_TOLERANCE).is_ok());
                if !body.is_empty() {
                    let mut changed = body.clone();
                    let i = flip % changed.len();
                    changed[i] ^= 0x01;
                    prop_assert!(verify(&secret, &id, &ts.to_string(), &header, &changed, ts, DEFAULT_TOLERANCE).is_err());
                }
            }

            #[test]
            fn garbage_headers_never_panic(header in "[ -~]{0,200}", ts in "[ -~]{0,20}") {
                let secret = Secret::generate();
                let _ = verify(&secret, "id", &ts, &header, b"{}", 0, DEFAULT_TOLERANCE);
            }

            #[test]
            fn secret_parsing_never_panics(s in "[ -~]{0,100}") {
                let _ = Secret::parse(&s);
            }
        }
    }

    #[test]
    fn secrets_round_trip_and_never_print() {
        let s = Secret::generate();
        assert!(s.expose().starts_with("whsec_"));
        assert_eq!(Secret::parse(&s.expose()).unwrap(), s);
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        assert!(Secret::parse("whsec_c2hvcnQ=").is_err());
        assert!(Secret::parse("whsec_!!!").is_err());
    }
}
