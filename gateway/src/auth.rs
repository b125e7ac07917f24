//! API keys: generation, hashing, and parsing of `authorization` headers.
//!
//! Keys are 256-bit random values shown once; only their SHA-256 is stored. A slow password hash
//! is unnecessary because keys are not guessable, and a fast hash lets every request look its key
//! up directly. The final comparison is constant-time.

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::{Error, Result};

/// Standard base64 that accepts input with or without `=` padding (ADBC sends it unpadded).
const BASE64_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A new random API key.
pub fn generate_key() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("psk_{}", hex(&bytes))
}

/// The stored form of a key.
pub fn hash_key(key: &str) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

/// Constant-time equality of two hashes.
pub fn hashes_equal(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Credentials presented in an `authorization` header.
#[derive(Debug, PartialEq, Eq)]
pub enum Credentials {
    /// `Bearer <key>`.
    Bearer(String),
    /// `Basic base64(name:key)`.
    Basic {
        /// Principal name.
        name: String,
        /// API key.
        key: String,
    },
}

/// Parses an `authorization` header value.
pub fn parse_authorization(value: &str) -> Result<Credentials> {
    let bad = Error::Unauthenticated {
        reason: "malformed authorization header; use `Bearer <key>` or `Basic <base64(name:key)>`".into(),
    };
    let (scheme, rest) = value.trim().split_once(' ').ok_or(Error::Unauthenticated {
        reason: "malformed authorization header; use `Bearer <key>` or `Basic <base64(name:key)>`".into(),
    })?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
        return Ok(Credentials::Bearer(rest.to_string()));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = BASE64_LENIENT.decode(rest).map_err(|_| Error::Unauthenticated {
            reason: "basic credentials are not valid base64".into(),
        })?;
        let text = String::from_utf8(decoded).map_err(|_| Error::Unauthenticated {
            reason: "basic credentials are not UTF-8".into(),
        })?;
        let (name, key) = text.split_once(':').ok_or(Error::Unauthenticated {
            reason: "basic credentials must be `name:key`".into(),
        })?;
        return Ok(Credentials::Basic {
            name: name.to_string(),
            key: key.to_string(),
        });
    }
    Err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_and_basic_with_or_without_padding() {
        assert_eq!(
            parse_authorization("Bearer abc").unwrap(),
            Credentials::Bearer("abc".into())
        );
        let padded = base64::engine::general_purpose::STANDARD.encode("trainer-de:k1");
        let unpadded = padded.trim_end_matches('=');
        assert_ne!(padded, unpadded, "the example must exercise padding");
        for v in [padded.as_str(), unpadded] {
            assert_eq!(
                parse_authorization(&format!("Basic {v}")).unwrap(),
                Credentials::Basic {
                    name: "trainer-de".into(),
                    key: "k1".into()
                }
            );
        }
        for bad in ["", "Bearer", "Token x", "Basic !!!", "Basic bm9jb2xvbg"] {
            assert!(parse_authorization(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_are_random_and_hashed() {
        let (a, b) = (generate_key(), generate_key());
        assert_ne!(a, b);
        assert_eq!(a.len(), 68);
        assert!(hashes_equal(&hash_key(&a), &hash_key(&a)));
        assert!(!hashes_equal(&hash_key(&a), &hash_key(&b)));
    }
}
