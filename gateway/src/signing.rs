//! The node's Ed25519 identity key: it signs tickets, statement handles and audit checkpoints,
//! and its public half is published at `GET /api/v1/keys`, so that auditors, notaries and
//! peer nodes can verify what this node issued without sharing a secret with it.

use std::io::Write as _;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use openssl::pkey::{Id, PKey, Private, Public};
use openssl::sign::{Signer, Verifier};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// An Ed25519 private key with its key id.
pub struct NodeKey {
    private: PKey<Private>,
    public_raw: Vec<u8>,
    kid: String,
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeKey {{ kid: {} }}", self.kid)
    }
}

/// A published verification key (the JWK form of RFC 8037).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PublicJwk {
    /// Key id: the first 8 bytes of SHA-256 of the raw public key, hex.
    pub kid: String,
    /// `OKP`.
    pub kty: &'static str,
    /// `EdDSA`.
    pub alg: &'static str,
    /// `Ed25519`.
    pub crv: &'static str,
    /// The raw 32-byte public key, base64url without padding.
    pub x: String,
}

fn openssl_error(what: &'static str) -> impl Fn(openssl::error::ErrorStack) -> Error {
    move |e| Error::Internal(format!("{what}: {e}"))
}

/// The key id of a raw public key.
pub fn key_id(public_raw: &[u8]) -> String {
    crate::auth::hex(&Sha256::digest(public_raw)[..8])
}

impl NodeKey {
    /// Reads the PEM key at `path`, creating it (mode 0600, written atomically) on first use.
    pub fn load_or_create(path: &Path) -> Result<Self> {
        let io = |op: &'static str| {
            move |source| Error::Io {
                op,
                path: path.display().to_string(),
                source,
            }
        };
        let private = match std::fs::read(path) {
            Ok(pem) => PKey::private_key_from_pem(&pem).map_err(|e| {
                Error::invalid(
                    format!("node key `{}` is not a PEM private key: {e}", path.display()),
                    "restore the file from backup, or delete it to create a new identity (tickets and checkpoints signed with the old key stop verifying)",
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = PKey::generate_ed25519().map_err(openssl_error("generate node key"))?;
                let pem = key
                    .private_key_to_pem_pkcs8()
                    .map_err(openssl_error("encode node key"))?;
                // Callers in a data directory hold its keys lock, so one process makes the key.
                let tmp = path.with_extension("tmp");
                let mut f = crate::data_dir::create_private_file(&tmp)?;
                f.write_all(&pem).map_err(io("write node key"))?;
                f.sync_all().map_err(io("sync node key"))?;
                std::fs::rename(&tmp, path).map_err(io("install node key"))?;
                key
            }
            Err(e) => return Err(io("read node key")(e)),
        };
        if private.id() != Id::ED25519 {
            return Err(Error::invalid(
                format!("node key `{}` is not an Ed25519 key", path.display()),
                "delete it to create a new one",
            ));
        }
        let public_raw = private
            .raw_public_key()
            .map_err(openssl_error("read node public key"))?;
        Ok(Self {
            kid: key_id(&public_raw),
            private,
            public_raw,
        })
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The raw public key.
    pub fn public_raw(&self) -> &[u8] {
        &self.public_raw
    }

    /// Signs `message` (Ed25519 hashes internally; no digest is chosen here).
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>> {
        let mut signer = Signer::new_without_digest(&self.private).map_err(openssl_error("sign"))?;
        signer.sign_oneshot_to_vec(message).map_err(openssl_error("sign"))
    }

    /// Whether `signature` is this key's over `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        verify(&self.public_raw, message, signature)
    }

    /// The public half as published.
    pub fn jwk(&self) -> PublicJwk {
        PublicJwk {
            kid: self.kid.clone(),
            kty: "OKP",
            alg: "EdDSA",
            crv: "Ed25519",
            x: URL_SAFE_NO_PAD.encode(&self.public_raw),
        }
    }
}

/// Verifies an Ed25519 signature with a raw public key; any malformed input is `false`.
pub fn verify(public_raw: &[u8], message: &[u8], signature: &[u8]) -> bool {
    let Ok(key): std::result::Result<PKey<Public>, _> = PKey::public_key_from_raw_bytes(public_raw, Id::ED25519) else {
        return false;
    };
    Verifier::new_without_digest(&key)
        .and_then(|mut v| v.verify_oneshot(signature, message))
        .unwrap_or(false)
}

/// What a signature is for: the signed bytes start with the context, so that a signature made
/// for one kind of document never verifies as another (a ticket as an assertion, or the other
/// way round), whatever their bodies happen to look like. No context is a prefix of another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// Flight tickets and Flight SQL statement handles this node issues to itself.
    Ticket,
    /// Federation assertions a home node issues to a peer.
    Assertion,
}

impl Context {
    /// The bytes signed before the document.
    pub fn prefix(self) -> &'static [u8] {
        match self {
            Self::Ticket => b"passerelle-ticket-v1\n",
            Self::Assertion => b"passerelle-assertion-v2\n",
        }
    }

    /// `prefix || message`: what is actually signed.
    pub fn framed(self, message: &[u8]) -> Vec<u8> {
        let prefix = self.prefix();
        let mut out = Vec::with_capacity(prefix.len() + message.len());
        out.extend_from_slice(prefix);
        out.extend_from_slice(message);
        out
    }
}

impl NodeKey {
    /// Signs `message` for `context` (see [`Context`]).
    pub fn sign_for(&self, context: Context, message: &[u8]) -> Result<Vec<u8>> {
        self.sign(&context.framed(message))
    }

    /// Whether `signature` is this key's over `message` for `context`.
    pub fn verify_for(&self, context: Context, message: &[u8], signature: &[u8]) -> bool {
        verify(&self.public_raw, &context.framed(message), signature)
    }
}

/// [`verify`] for `context` (see [`Context`]).
pub fn verify_for(public_raw: &[u8], context: Context, message: &[u8], signature: &[u8]) -> bool {
    verify(public_raw, &context.framed(message), signature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_persist_sign_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let a = NodeKey::load_or_create(&path).unwrap();
        let b = NodeKey::load_or_create(&path).unwrap();
        assert_eq!(a.kid(), b.kid());
        assert_eq!(a.kid().len(), 16);
        let sig = a.sign(b"hello").unwrap();
        assert!(b.verify(b"hello", &sig));
        assert!(!b.verify(b"hellO", &sig));
        assert!(!verify(b"short", b"hello", &sig));
        let other = NodeKey::load_or_create(&dir.path().join("other.key")).unwrap();
        assert!(!other.verify(b"hello", &sig));
        assert_eq!(URL_SAFE_NO_PAD.decode(a.jwk().x).unwrap(), a.public_raw());
        // Domain separation: a signature for one context verifies for no other, nor bare.
        let t = a.sign_for(Context::Ticket, b"{}").unwrap();
        assert!(b.verify_for(Context::Ticket, b"{}", &t));
        assert!(!b.verify_for(Context::Assertion, b"{}", &t));
        assert!(!b.verify(b"{}", &t));
        let s = a.sign_for(Context::Assertion, b"{}").unwrap();
        assert!(verify_for(a.public_raw(), Context::Assertion, b"{}", &s));
        assert!(!verify_for(a.public_raw(), Context::Ticket, b"{}", &s));
        assert!(!b.verify_for(Context::Assertion, b"{}", &a.sign(b"{}").unwrap()));
        for x in [Context::Ticket, Context::Assertion] {
            for y in [Context::Ticket, Context::Assertion] {
                assert!(x == y || !x.prefix().starts_with(y.prefix()));
            }
            assert!(!x.prefix().starts_with(b"passerelle-audit-checkpoint"));
        }
        std::fs::write(&path, b"junk").unwrap();
        assert!(
            NodeKey::load_or_create(&path)
                .unwrap_err()
                .to_string()
                .contains("not a PEM")
        );
    }
}
