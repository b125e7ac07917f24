//! Signed, expiring Flight tickets.
//!
//! A ticket is `base64url(claims JSON) "." base64url(HMAC-SHA256(key, claims JSON))`. The key
//! lives in the data directory and never leaves the node. DoGet verifies the signature and the
//! expiry, then checks that the caller and purpose match the claims, then re-decides access.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::error::{Error, Result};

type HmacSha256 = Hmac<Sha256>;

/// Largest ticket accepted, so a hostile ticket cannot make us decode megabytes.
const MAX_TICKET_BYTES: usize = 256 * 1024;

/// What a ticket grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TicketClaims {
    /// Format version.
    pub v: u8,
    /// Principal the ticket was issued to.
    pub principal: String,
    /// Purpose declared at issue.
    pub purpose: String,
    /// Dataset.
    pub dataset: String,
    /// Columns, if the request named them.
    pub columns: Option<Vec<String>>,
    /// User filter, if any.
    pub filter: Option<String>,
    /// Row limit, if any.
    pub limit: Option<u64>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: i64,
    /// Random nonce: two tickets for the same request differ.
    pub nonce: u64,
    /// A Flight SQL statement (then `dataset` is empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql: Option<SqlClaim>,
}

/// A statement and its bound parameters, carried by Flight SQL tickets and prepared-statement
/// handles: the server keeps no per-statement state, so any replica can serve them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlClaim {
    /// SQL text.
    pub text: String,
    /// Parameters: a one-row Arrow IPC stream, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<String>,
}

/// Signs and verifies tickets with the node's ticket key.
#[derive(Clone)]
pub struct TicketSigner {
    key: Vec<u8>,
}

impl std::fmt::Debug for TicketSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TicketSigner { .. }")
    }
}

const TICKET_HINT: &str = "request a new ticket with GetFlightInfo";

impl TicketSigner {
    /// A signer over a secret key.
    pub fn new(key: Vec<u8>) -> Self {
        Self { key }
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC takes keys of any length.
        HmacSha256::new_from_slice(&self.key)
            .unwrap_or_else(|_| <HmacSha256 as hmac::digest::KeyInit>::new(&Default::default()))
    }

    /// Encodes and signs claims.
    pub fn sign(&self, claims: &TicketClaims) -> Result<Vec<u8>> {
        let body = serde_json::to_vec(claims).map_err(|e| Error::Internal(format!("serialise ticket: {e}")))?;
        let mut mac = self.mac();
        mac.update(&body);
        let sig = mac.finalize().into_bytes();
        Ok(format!("{}.{}", URL_SAFE_NO_PAD.encode(&body), URL_SAFE_NO_PAD.encode(sig)).into_bytes())
    }

    /// Verifies a ticket's signature and expiry and returns its claims.
    pub fn verify(&self, ticket: &[u8], now_secs: i64) -> Result<TicketClaims> {
        let malformed = || Error::invalid("ticket is malformed or was altered", TICKET_HINT);
        if ticket.len() > MAX_TICKET_BYTES {
            return Err(malformed());
        }
        let text = std::str::from_utf8(ticket).map_err(|_| malformed())?;
        let (body, sig) = text.split_once('.').ok_or_else(malformed)?;
        let body = URL_SAFE_NO_PAD.decode(body).map_err(|_| malformed())?;
        let sig = URL_SAFE_NO_PAD.decode(sig).map_err(|_| malformed())?;
        let mut mac = self.mac();
        mac.update(&body);
        mac.verify_slice(&sig).map_err(|_| malformed())?;
        let claims: TicketClaims = serde_json::from_slice(&body).map_err(|_| malformed())?;
        if claims.v != 1 {
            return Err(malformed());
        }
        if claims.exp <= now_secs {
            return Err(Error::invalid("ticket has expired", TICKET_HINT));
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: i64) -> TicketClaims {
        TicketClaims {
            v: 1,
            principal: "t".into(),
            purpose: "research".into(),
            dataset: "d".into(),
            columns: None,
            filter: Some("x > 1".into()),
            limit: Some(5),
            exp,
            nonce: 7,
            sql: None,
        }
    }

    #[test]
    fn round_trips_and_rejects_tampering_and_expiry() {
        let s = TicketSigner::new(b"k".to_vec());
        let t = s.sign(&claims(100)).unwrap();
        assert_eq!(s.verify(&t, 99).unwrap(), claims(100));
        assert!(s.verify(&t, 100).unwrap_err().to_string().contains("expired"));
        for i in 0..t.len() {
            let mut bad = t.clone();
            bad[i] ^= 1;
            assert!(s.verify(&bad, 0).is_err(), "byte {i}");
        }
        assert!(TicketSigner::new(b"other".to_vec()).verify(&t, 0).is_err());
        for junk in [&b""[..], b".", b"abc", b"\xff\xfe", &[b'a'; 20000]] {
            let e = s.verify(junk, 0).unwrap_err();
            assert_eq!(e.status(), crate::error::StatusClass::InvalidArgument);
        }
    }
}
