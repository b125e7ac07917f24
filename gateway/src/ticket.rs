//! Signed, expiring Flight tickets.
//!
//! A ticket is `base64url(claims JSON) "." base64url(Ed25519 signature)`, signed with the node
//! key (see [`crate::signing`]) whose public half is at `GET /api/v1/keys`: any node of the
//! federation, or an auditor, can check who asked for what, under which consent and policy
//! version, and which node issued it. DoGet verifies signature, issuer and expiry, then checks
//! that the caller and purpose match the claims, then re-decides access.
//!
//! The signature covers `passerelle-ticket-v1\n` followed by the claims
//! ([`crate::signing::Context::Ticket`]), so no ticket verifies as a federation assertion and no
//! assertion as a ticket, even though both are signed with the node key.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::signing::{Context, NodeKey};

/// Largest ticket accepted, so a hostile ticket cannot make us decode megabytes.
const MAX_TICKET_BYTES: usize = 256 * 1024;

/// Claims format version.
pub const TICKET_VERSION: u8 = 2;

/// What a ticket grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TicketClaims {
    /// Format version.
    pub v: u8,
    /// Issuing node (set by the signer).
    #[serde(default)]
    pub iss: String,
    /// Id of the key that signed (set by the signer).
    #[serde(default)]
    pub kid: String,
    /// Issued at, seconds since the Unix epoch (set by the signer).
    #[serde(default)]
    pub iat: i64,
    /// Principal the ticket was issued to.
    pub principal: String,
    /// The principal's organisation.
    pub org: String,
    /// The principal's member state.
    pub member_state: String,
    /// Consent version in force when the ticket was issued (DoGet applies the current one).
    pub consent_version: u64,
    /// Policy version that allowed the request.
    pub policy_version: String,
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
    /// Part `k` of `n` of the stream (rows dealt round-robin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<(u32, u32)>,
    /// Batches of the part already consumed: a resumed reader continues after them.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skip: u64,
    /// Summaries per group instead of rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<crate::catalog::AggregateSpec>,
    /// Columns added as typed nulls (federated SQL; see `DataCommand::fill_nulls`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fill_nulls: Option<std::collections::BTreeMap<String, String>>,
    /// A peer node's principal: the role its home node asserted when the ticket was issued, so
    /// that a reader holding only its certificate is decided with that role again (never with
    /// one assumed here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<passerelle_policies::Role>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
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

/// Signs and verifies tickets with the node key.
#[derive(Clone, Debug)]
pub struct TicketSigner {
    key: Arc<NodeKey>,
    node_id: String,
}

const TICKET_HINT: &str = "request a new ticket with GetFlightInfo";

impl TicketSigner {
    /// A signer for `node_id` with its key.
    pub fn new(key: Arc<NodeKey>, node_id: String) -> Self {
        Self { key, node_id }
    }

    /// The node id written into tickets.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Stamps issuer, key id and issue time, encodes and signs.
    pub fn sign(&self, claims: &TicketClaims) -> Result<Vec<u8>> {
        let claims = TicketClaims {
            v: TICKET_VERSION,
            iss: self.node_id.clone(),
            kid: self.key.kid().to_string(),
            iat: chrono::Utc::now().timestamp(),
            ..claims.clone()
        };
        let body = serde_json::to_vec(&claims).map_err(|e| Error::Internal(format!("serialise ticket: {e}")))?;
        let sig = self.key.sign_for(Context::Ticket, &body)?;
        Ok(format!("{}.{}", URL_SAFE_NO_PAD.encode(&body), URL_SAFE_NO_PAD.encode(sig)).into_bytes())
    }

    /// Verifies a ticket's signature, issuer and expiry and returns its claims.
    pub fn verify(&self, ticket: &[u8], now_secs: i64) -> Result<TicketClaims> {
        let malformed = || Error::invalid("ticket is malformed or was altered", TICKET_HINT);
        if ticket.len() > MAX_TICKET_BYTES {
            return Err(malformed());
        }
        let text = std::str::from_utf8(ticket).map_err(|_| malformed())?;
        let (body, sig) = text.split_once('.').ok_or_else(malformed)?;
        let body = URL_SAFE_NO_PAD.decode(body).map_err(|_| malformed())?;
        let sig = URL_SAFE_NO_PAD.decode(sig).map_err(|_| malformed())?;
        if !self.key.verify_for(Context::Ticket, &body, &sig) {
            return Err(malformed());
        }
        let claims: TicketClaims = serde_json::from_slice(&body).map_err(|_| malformed())?;
        if claims.v != TICKET_VERSION || claims.kid != self.key.kid() || claims.iss != self.node_id {
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
            v: TICKET_VERSION,
            iss: "node-a".into(),
            kid: String::new(),
            iat: 0,
            principal: "t".into(),
            org: "o".into(),
            member_state: "DE".into(),
            consent_version: 3,
            policy_version: "p".into(),
            purpose: "research".into(),
            dataset: "d".into(),
            columns: None,
            filter: Some("x > 1".into()),
            limit: Some(5),
            exp,
            nonce: 7,
            sql: None,
            part: None,
            skip: 0,
            aggregate: None,
            fill_nulls: None,
            role: None,
        }
    }

    #[test]
    fn round_trips_and_rejects_tampering_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let key = Arc::new(NodeKey::load_or_create(&dir.path().join("a.key")).unwrap());
        let s = TicketSigner::new(Arc::clone(&key), "node-a".into());
        let t = s.sign(&claims(100)).unwrap();
        let got = s.verify(&t, 99).unwrap();
        assert_eq!((got.iss.as_str(), got.kid.as_str()), ("node-a", key.kid()));
        assert_eq!(
            TicketClaims {
                kid: String::new(),
                iat: 0,
                ..got
            },
            claims(100)
        );
        assert!(s.verify(&t, 100).unwrap_err().to_string().contains("expired"));
        for i in 0..t.len() {
            let mut bad = t.clone();
            bad[i] ^= 1;
            assert!(s.verify(&bad, 0).is_err(), "byte {i}");
        }
        let other = Arc::new(NodeKey::load_or_create(&dir.path().join("b.key")).unwrap());
        assert!(TicketSigner::new(other, "node-a".into()).verify(&t, 0).is_err());
        // The same key under another node id: not ours.
        assert!(
            TicketSigner::new(Arc::clone(&key), "node-b".into())
                .verify(&t, 0)
                .is_err()
        );
        // The same claims signed without the ticket context (or as an assertion) are not a ticket.
        let body = t.split(|b| *b == b'.').next().unwrap().to_vec();
        let raw = URL_SAFE_NO_PAD.decode(&body).unwrap();
        for sig in [key.sign(&raw).unwrap(), key.sign_for(Context::Assertion, &raw).unwrap()] {
            let forged = [&body[..], b".", URL_SAFE_NO_PAD.encode(sig).as_bytes()].concat();
            assert!(s.verify(&forged, 0).is_err());
        }
        for junk in [&b""[..], b".", b"abc", b"\xff\xfe", &[b'a'; 20000]] {
            let e = s.verify(junk, 0).unwrap_err();
            assert_eq!(e.status(), crate::error::StatusClass::InvalidArgument);
        }
    }
}
