//! Endpoint signing secrets at rest: sealed with ChaCha20-Poly1305 under `LAABAM_SECRET_KEY`
//! before they reach Redis, so a copy of Redis (a backup, a replica, a `MONITOR`) does not hold
//! the keys that let anyone forge our signatures.
//!
//! A sealed value is `enc:v1:<key id>:<base64 of nonce ‖ ciphertext>`. The endpoint id is
//! authenticated with it, so a sealed secret moved onto another endpoint does not open. Key
//! rotation: set the new key as `LAABAM_SECRET_KEY` and the old one as
//! `LAABAM_SECRET_KEY_PREVIOUS` everywhere, run `laabam-producer secrets reencrypt`, then drop
//! the previous key.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::RngCore;
use sha2::{Digest, Sha256};

const PREFIX: &str = "enc:v1:";

/// Why a key or a sealed value was refused. Never carries the plaintext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("LAABAM_SECRET_KEY must be base64 of 32 bytes (laabam-producer secret-key generate makes one)")]
    BadKey,
    #[error("sealed with key {0}, which is neither LAABAM_SECRET_KEY nor LAABAM_SECRET_KEY_PREVIOUS")]
    UnknownKey(String),
    #[error("a sealed secret failed authentication (tampered, or sealed for another endpoint)")]
    Tampered,
    #[error("a sealed secret is malformed")]
    Malformed,
}

struct SealingKey {
    id: String,
    cipher: ChaCha20Poly1305,
}

impl SealingKey {
    fn parse(encoded: &str) -> Result<Self, SealError> {
        let bytes = B64.decode(encoded.trim()).map_err(|_| SealError::BadKey)?;
        if bytes.len() != 32 {
            return Err(SealError::BadKey);
        }
        let id = hex::encode(&Sha256::digest(&bytes)[..4]);
        Ok(SealingKey {
            id,
            cipher: ChaCha20Poly1305::new(Key::from_slice(&bytes)),
        })
    }
}

/// Seals and opens endpoint secrets; without a key it passes them through (and the processes
/// warn at start).
#[derive(Default)]
pub struct SecretSealer {
    current: Option<SealingKey>,
    previous: Option<SealingKey>,
}

impl std::fmt::Debug for SecretSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretSealer")
            .field("current", &self.current.as_ref().map(|k| &k.id))
            .field("previous", &self.previous.as_ref().map(|k| &k.id))
            .finish()
    }
}

impl SecretSealer {
    pub fn new(current: Option<&str>, previous: Option<&str>) -> Result<Self, SealError> {
        Ok(SecretSealer {
            current: current.map(SealingKey::parse).transpose()?,
            previous: previous.map(SealingKey::parse).transpose()?,
        })
    }

    /// A new random key, base64.
    pub fn generate_key() -> String {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        B64.encode(key)
    }

    pub fn is_sealing(&self) -> bool {
        self.current.is_some()
    }

    /// Seals `plaintext` for the record `bound_to` (the endpoint id).
    pub fn seal(&self, plaintext: &str, bound_to: &str) -> String {
        let Some(key) = &self.current else {
            return plaintext.to_owned();
        };
        let mut nonce = [0u8; 12];
        rand::rng().fill_bytes(&mut nonce);
        let sealed = key
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: bound_to.as_bytes(),
                },
            )
            .expect("ChaCha20-Poly1305 encrypts any message");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        format!("{PREFIX}{}:{}", key.id, B64.encode(out))
    }

    /// Opens a stored value; a value that was never sealed is returned as it is.
    pub fn open(&self, stored: &str, bound_to: &str) -> Result<String, SealError> {
        let Some(rest) = stored.strip_prefix(PREFIX) else {
            return Ok(stored.to_owned());
        };
        let (id, data) = rest.split_once(':').ok_or(SealError::Malformed)?;
        let key = [&self.current, &self.previous]
            .into_iter()
            .flatten()
            .find(|k| k.id == id)
            .ok_or_else(|| SealError::UnknownKey(id.to_owned()))?;
        let data = B64.decode(data).map_err(|_| SealError::Malformed)?;
        if data.len() < 12 {
            return Err(SealError::Malformed);
        }
        let (nonce, sealed) = data.split_at(12);
        let plain = key
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: bound_to.as_bytes(),
                },
            )
            .map_err(|_| SealError::Tampered)?;
        String::from_utf8(plain).map_err(|_| SealError::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_open_only_for_their_endpoint_and_key() {
        let key = SecretSealer::generate_key();
        let sealer = SecretSealer::new(Some(&key), None).unwrap();
        let sealed = sealer.seal("whsec_abc", "ep_1");
        assert!(sealed.starts_with("enc:v1:") && !sealed.contains("whsec_abc"));
        assert_ne!(sealed, sealer.seal("whsec_abc", "ep_1"), "a fresh nonce each time");
        assert_eq!(sealer.open(&sealed, "ep_1").unwrap(), "whsec_abc");
        assert_eq!(sealer.open(&sealed, "ep_2"), Err(SealError::Tampered));
        let other = SecretSealer::new(Some(&SecretSealer::generate_key()), None).unwrap();
        assert!(matches!(other.open(&sealed, "ep_1"), Err(SealError::UnknownKey(_))));
        // One character of the ciphertext changed to a different one (a fixed replacement could
        // equal the original by chance, and the characters next to the padding carry fewer bits).
        let mut tampered = sealed.clone().into_bytes();
        let i = tampered.len() - 8;
        tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert_ne!(tampered, sealed);
        assert!(sealer.open(&tampered, "ep_1").is_err());
    }

    #[test]
    fn rotation_opens_with_the_previous_key_and_seals_with_the_new() {
        let (old, new) = (SecretSealer::generate_key(), SecretSealer::generate_key());
        let sealed_old = SecretSealer::new(Some(&old), None).unwrap().seal("whsec_x", "ep");
        let rotating = SecretSealer::new(Some(&new), Some(&old)).unwrap();
        assert_eq!(rotating.open(&sealed_old, "ep").unwrap(), "whsec_x");
        let resealed = rotating.seal("whsec_x", "ep");
        assert_eq!(
            SecretSealer::new(Some(&new), None)
                .unwrap()
                .open(&resealed, "ep")
                .unwrap(),
            "whsec_x"
        );
    }

    #[test]
    fn without_a_key_values_pass_through_and_bad_keys_are_refused() {
        let none = SecretSealer::default();
        assert_eq!(none.seal("whsec_x", "ep"), "whsec_x");
        assert_eq!(none.open("whsec_x", "ep").unwrap(), "whsec_x");
        assert_eq!(SecretSealer::new(Some("short"), None).unwrap_err(), SealError::BadKey);
        assert!(
            format!(
                "{:?}",
                SecretSealer::new(Some(&SecretSealer::generate_key()), None).unwrap()
            )
            .len()
                < 100
        );
    }
}
