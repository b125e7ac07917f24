//! Keyed pseudonyms per recipient organisation.
//!
//! `pseudonym = hex(key_version || HMAC-SHA256(k_org, canonical(value))[..15])` where
//! `k_org = HMAC-SHA256(master_v, "passerelle/pseudonym/v1/" || org)`. The leading byte names the
//! master-key version, so after a key rotation old pseudonyms are recognisable as old. One organisation always
//! sees the same pseudonym for a subject (so it can link its own pulls), two organisations see
//! unrelated ones (so they cannot join on them). Integers are canonicalised to their decimal
//! text, so an id stored as `123` in one dataset and `"123"` in another pseudonymises equally.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, StringBuilder};
use arrow::datatypes::{DataType, Int32Type, Int64Type};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{Error, Result};

type HmacSha256 = Hmac<Sha256>;

/// Bytes of MAC kept per pseudonym (128 bits, 32 hex characters).
pub const PSEUDONYM_BYTES: usize = 16;

/// Types [`Pseudonymiser::apply`] accepts.
pub fn is_pseudonymisable(dt: &DataType) -> bool {
    match dt {
        DataType::Int32 | DataType::Int64 | DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => true,
        DataType::Dictionary(_, v) => is_pseudonymisable(v),
        _ => false,
    }
}

/// A keyed pseudonymiser for one recipient organisation.
#[derive(Clone)]
pub struct Pseudonymiser {
    keyed: HmacSha256,
    /// SHA-256 states after the HMAC key's inner and outer pad blocks: a value of at most
    /// [`ONE_BLOCK`] bytes then costs exactly two compressions and no buffering.
    inner: [u32; 8],
    outer: [u32; 8],
    key_version: u8,
}

/// Longest value whose padded message fits one SHA-256 block.
const ONE_BLOCK: usize = 55;

const SHA256_IV: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

fn compress(state: &mut [u32; 8], block: &[u8; 64]) {
    sha2::compress256(
        state,
        std::slice::from_ref(sha2::digest::generic_array::GenericArray::from_slice(block)),
    );
}

/// The state after one key block XORed with `pad` (HMAC's ipad/opad; the key is 32 bytes).
fn padded_state(key: &[u8], pad: u8) -> [u32; 8] {
    let mut block = [pad; 64];
    for (b, k) in block.iter_mut().zip(key) {
        *b ^= k;
    }
    let mut state = SHA256_IV;
    compress(&mut state, &block);
    state
}

impl std::fmt::Debug for Pseudonymiser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pseudonymiser { .. }")
    }
}

impl Pseudonymiser {
    /// Derives the recipient's key from the node's master key (version 1).
    pub fn for_recipient(master_key: &[u8], org: &str) -> Self {
        Self::for_recipient_versioned(master_key, 1, org)
    }

    /// Derives the recipient's key from master key `key_version`.
    pub fn for_recipient_versioned(master_key: &[u8], key_version: u8, org: &str) -> Self {
        // HMAC accepts keys of any length, so new_from_slice cannot fail; fall back defensively.
        let mut kdf = HmacSha256::new_from_slice(master_key).unwrap_or_else(|_| keyed_zero());
        kdf.update(b"passerelle/pseudonym/v1/");
        kdf.update(org.as_bytes());
        let k_org = kdf.finalize().into_bytes();
        Self {
            keyed: HmacSha256::new_from_slice(&k_org).unwrap_or_else(|_| keyed_zero()),
            inner: padded_state(&k_org, 0x36),
            outer: padded_state(&k_org, 0x5c),
            key_version,
        }
    }

    /// HMAC-SHA256 of a value of at most [`ONE_BLOCK`] bytes, from the precomputed pad states:
    /// the same tag as the `hmac` crate, in two compressions.
    #[inline]
    fn short_tag(&self, bytes: &[u8]) -> [u8; 32] {
        let mut block = [0u8; 64];
        block[..bytes.len()].copy_from_slice(bytes);
        block[bytes.len()] = 0x80;
        block[56..].copy_from_slice(&((64 + bytes.len() as u64) * 8).to_be_bytes());
        let mut inner = self.inner;
        compress(&mut inner, &block);
        let mut block = [0u8; 64];
        for (chunk, word) in block[..32].chunks_exact_mut(4).zip(inner) {
            chunk.copy_from_slice(&word.to_be_bytes());
        }
        block[32] = 0x80;
        block[56..].copy_from_slice(&((64u64 + 32) * 8).to_be_bytes());
        let mut outer = self.outer;
        compress(&mut outer, &block);
        let mut tag = [0u8; 32];
        for (chunk, word) in tag.chunks_exact_mut(4).zip(outer) {
            chunk.copy_from_slice(&word.to_be_bytes());
        }
        tag
    }

    #[inline]
    fn one(&self, bytes: &[u8], out: &mut [u8; PSEUDONYM_BYTES * 2]) {
        let tag: [u8; 32] = if bytes.len() <= ONE_BLOCK {
            self.short_tag(bytes)
        } else {
            let mut m = self.keyed.clone();
            m.update(bytes);
            m.finalize().into_bytes().into()
        };
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let bytes = std::iter::once(&self.key_version).chain(tag[..PSEUDONYM_BYTES - 1].iter());
        for (i, b) in bytes.enumerate() {
            out[2 * i] = HEX[(b >> 4) as usize];
            out[2 * i + 1] = HEX[(b & 15) as usize];
        }
    }

    /// Pseudonymises a column into a Utf8 column of 32-character hex strings; nulls stay null.
    pub fn apply(&self, col: &ArrayRef) -> Result<ArrayRef> {
        let mut out = StringBuilder::with_capacity(col.len(), col.len() * PSEUDONYM_BYTES * 2);
        let mut hex = [0u8; PSEUDONYM_BYTES * 2];
        let mut push = |v: Option<&[u8]>, out: &mut StringBuilder| match v {
            None => out.append_null(),
            Some(b) => {
                self.one(b, &mut hex);
                out.append_value(std::str::from_utf8(&hex).unwrap_or_default());
            }
        };
        match col.data_type() {
            DataType::Int64 => {
                let mut buf = itoa::Buffer::new();
                for v in col.as_primitive::<Int64Type>() {
                    push(v.map(|v| buf.format(v).as_bytes()), &mut out);
                }
            }
            DataType::Int32 => {
                let mut buf = itoa::Buffer::new();
                for v in col.as_primitive::<Int32Type>() {
                    push(v.map(|v| buf.format(v).as_bytes()), &mut out);
                }
            }
            DataType::Utf8 => col
                .as_string::<i32>()
                .iter()
                .for_each(|v| push(v.map(str::as_bytes), &mut out)),
            DataType::LargeUtf8 => col
                .as_string::<i64>()
                .iter()
                .for_each(|v| push(v.map(str::as_bytes), &mut out)),
            DataType::Utf8View => col
                .as_string_view()
                .iter()
                .for_each(|v| push(v.map(str::as_bytes), &mut out)),
            DataType::Dictionary(_, _) => {
                // Pseudonymise the (small) dictionary once, then expand through the keys.
                let dict = col.as_any_dictionary();
                let values = self.apply(dict.values())?;
                let expanded = arrow::compute::take(
                    values.as_ref(),
                    &arrow::compute::cast(dict.keys(), &DataType::UInt32)?,
                    None,
                )?;
                return Ok(expanded);
            }
            other => {
                return Err(Error::Unsupported {
                    what: format!("pseudonymising a column of type {other}"),
                });
            }
        }
        Ok(Arc::new(out.finish()))
    }
}

fn keyed_zero() -> HmacSha256 {
    // Unreachable in practice (HMAC takes any key length); keeps the request path free of panics.
    <HmacSha256 as hmac::digest::KeyInit>::new(&Default::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_two_compression_path_equals_hmac_for_every_length() {
        for master in [&b"master"[..], &[0u8; 100][..], b""] {
            let p = Pseudonymiser::for_recipient_versioned(master, 3, "dkfz");
            for len in 0..=ONE_BLOCK + 20 {
                for fill in [0u8, 0x80, 0xff, 0x36] {
                    let value: Vec<u8> = (0..len).map(|i| fill ^ (i as u8).wrapping_mul(31)).collect();
                    let mut reference = p.keyed.clone();
                    reference.update(&value);
                    let expected: [u8; 32] = reference.finalize().into_bytes().into();
                    if len <= ONE_BLOCK {
                        assert_eq!(p.short_tag(&value), expected, "length {len}");
                    }
                    let mut hex = [0u8; PSEUDONYM_BYTES * 2];
                    p.one(&value, &mut hex);
                    let want: String = std::iter::once(3u8)
                        .chain(expected[..PSEUDONYM_BYTES - 1].iter().copied())
                        .map(|b| format!("{b:02x}"))
                        .collect();
                    assert_eq!(std::str::from_utf8(&hex).unwrap(), want, "length {len}");
                }
            }
        }
    }
    use arrow::array::{DictionaryArray, Int64Array, StringArray};
    use arrow::datatypes::Int8Type;

    #[test]
    fn stable_per_org_distinct_across_orgs_and_type_independent() {
        let a = Pseudonymiser::for_recipient(b"master", "dkfz");
        let b = Pseudonymiser::for_recipient(b"master", "gemelli");
        let ints: ArrayRef = Arc::new(Int64Array::from(vec![Some(123), None, Some(7)]));
        let strs: ArrayRef = Arc::new(StringArray::from(vec![Some("123"), None, Some("7")]));
        let pa = a.apply(&ints).unwrap();
        assert_eq!(pa.as_ref(), a.apply(&strs).unwrap().as_ref());
        assert_eq!(pa.as_ref(), a.apply(&ints).unwrap().as_ref());
        let pb = b.apply(&ints).unwrap();
        let (pa, pb) = (pa.as_string::<i32>(), pb.as_string::<i32>());
        assert!(pa.is_null(1) && pb.is_null(1));
        assert_ne!(pa.value(0), pb.value(0));
        assert_eq!(pa.value(0).len(), 32);
        assert!(
            pa.value(0)
                .bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        let dict: DictionaryArray<Int8Type> = vec!["123", "7", "123"].into_iter().collect();
        let pd = a.apply(&(Arc::new(dict) as ArrayRef)).unwrap();
        assert_eq!(pd.as_string::<i32>().value(2), pa.value(0));
        // The key version leads, so a rotated key's pseudonyms are told apart.
        assert!(pa.value(0).starts_with("01"));
        let v2 = Pseudonymiser::for_recipient_versioned(b"master2", 2, "dkfz")
            .apply(&ints)
            .unwrap();
        assert!(v2.as_string::<i32>().value(0).starts_with("02"));
    }
}
