//! Keyed pseudonyms per recipient organisation.
//!
//! `pseudonym = hex(key_version || HMAC-SHA256(k_rcpt, canonical(value))[..15])` where the
//! recipient key is `k_rcpt = HMAC-SHA256(master_v, "passerelle/pseudonym/v2/" || CC "/" || org)`
//! (the recipient's member state and organisation: `acme` of FR and `acme` of DE are different
//! recipients), or, for key versions made before member states were part of the recipient,
//! `HMAC-SHA256(master_v, "passerelle/pseudonym/v1/" || org)`. The leading byte names the
//! master-key version, so after a key rotation old pseudonyms are recognisable as old. One recipient always
//! sees the same pseudonym for a subject (so it can link its own pulls), two recipients see
//! unrelated ones (so they cannot join on them). Integers are canonicalised to their decimal
//! text, so an id stored as `123` in one dataset and `"123"` in another pseudonymises equally.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, StringArray};
use arrow::buffer::{Buffer, OffsetBuffer, ScalarBuffer};
use arrow::datatypes::{DataType, Int32Type, Int64Type};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::classification::MemberState;
use crate::enforce::sha256x4::compress4;
use crate::error::{Error, Result};

type HmacSha256 = Hmac<Sha256>;

/// Bytes of MAC kept per pseudonym (128 bits, 32 hex characters).
pub const PSEUDONYM_BYTES: usize = 16;

/// Characters of one pseudonym.
const HEX_LEN: usize = PSEUDONYM_BYTES * 2;

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

/// The state after one key block XORed with `pad` (HMAC's ipad/opad; the key is 32 bytes).
fn padded_state(key: &[u8], pad: u8) -> [u32; 8] {
    let mut block = [pad; 64];
    for (b, k) in block.iter_mut().zip(key) {
        *b ^= k;
    }
    let mut state = SHA256_IV;
    sha2::compress256(
        &mut state,
        std::slice::from_ref(sha2::digest::generic_array::GenericArray::from_slice(&block)),
    );
    state
}

/// Pads `block`, zero but for its first `len` (at most 55) bytes, the message after one key
/// block, into SHA-256's final block. (Byte stores rather than `copy_from_slice`: a libc call per
/// value cost more than the copy here.)
#[inline(always)]
fn pad(block: &mut [u8; 64], len: usize) {
    block[len] = 0x80;
    // The message is 64 + len <= 119 bytes: its bit length fits the last two bytes.
    let bits = (64 + len as u16) * 8;
    block[62] = (bits >> 8) as u8;
    block[63] = bits as u8;
}

/// Copies `value` (at most 55 bytes) to the start of `block`, eight bytes at a time.
#[inline(always)]
fn copy_short(block: &mut [u8; 64], value: &[u8]) {
    let mut at = 0;
    while at + 8 <= value.len() {
        if let (Ok(dst), Ok(src)) = (
            <&mut [u8; 8]>::try_from(&mut block[at..at + 8]),
            <[u8; 8]>::try_from(&value[at..at + 8]),
        ) {
            *dst = src;
        }
        at += 8;
    }
    while at < value.len() {
        block[at] = value[at];
        at += 1;
    }
}

/// Writes the decimal text of `v` at the start of `block` (the canonical form integers are
/// pseudonymised in, so `123` and `"123"` agree) and returns its length (at most 20).
#[inline(always)]
fn decimal(block: &mut [u8; 64], v: i64) -> usize {
    let mut u = v.unsigned_abs();
    let sign = usize::from(v < 0);
    block[0] = b'-';
    let len = sign + u.checked_ilog10().map_or(1, |d| d as usize + 1);
    let mut i = len;
    while u >= 100 {
        let r = (u % 100) as usize;
        u /= 100;
        i -= 2;
        block[i] = b'0' + (r / 10) as u8;
        block[i + 1] = b'0' + (r % 10) as u8;
    }
    if u >= 10 {
        i -= 2;
        block[i] = b'0' + (u / 10) as u8;
        block[i + 1] = b'0' + (u % 10) as u8;
    } else {
        block[i - 1] = b'0' + u as u8;
    }
    len
}

impl std::fmt::Debug for Pseudonymiser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pseudonymiser { .. }")
    }
}

/// Up to four short values waiting for their HMACs, computed four at a time (see
/// [`compress4`]) and written as hex into their rows' slots of the output values.
struct Lanes<'a> {
    p: &'a Pseudonymiser,
    out: &'a mut [[u8; HEX_LEN]],
    blocks: [[u8; 64]; 4],
    slots: [usize; 4],
    len: usize,
}

impl Lanes<'_> {
    #[inline(always)]
    fn push_bytes(&mut self, value: &[u8], slot: usize) {
        if value.len() > ONE_BLOCK {
            let mut m = self.p.keyed.clone();
            m.update(value);
            let tag: [u8; 32] = m.finalize().into_bytes().into();
            let mut words = [0u32; 8];
            for (w, c) in words.iter_mut().zip(tag.chunks_exact(4)) {
                *w = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
            }
            self.p.hex(&words, &mut self.out[slot]);
            return;
        }
        let block = &mut self.blocks[self.len];
        *block = [0; 64];
        copy_short(block, value);
        pad(block, value.len());
        self.queued(slot);
    }

    #[inline(always)]
    fn push_int(&mut self, value: i64, slot: usize) {
        let block = &mut self.blocks[self.len];
        *block = [0; 64];
        let len = decimal(block, value);
        pad(block, len);
        self.queued(slot);
    }

    #[inline(always)]
    fn queued(&mut self, slot: usize) {
        self.slots[self.len] = slot;
        self.len += 1;
        if self.len == 4 {
            self.flush();
        }
    }

    /// Finishes the waiting values (lanes past `len` hash stale blocks; their results are unused).
    #[inline(always)]
    fn flush(&mut self) {
        if self.len == 0 {
            return;
        }
        let mut states = [self.p.inner; 4];
        compress4(&mut states, &self.blocks);
        // The outer message: opad block, then the 32-byte inner digest.
        for (block, state) in self.blocks.iter_mut().zip(&states) {
            *block = [0; 64];
            for (i, word) in state.iter().enumerate() {
                let b = word.to_be_bytes();
                (block[4 * i], block[4 * i + 1], block[4 * i + 2], block[4 * i + 3]) = (b[0], b[1], b[2], b[3]);
            }
            pad(block, 32);
        }
        let mut states = [self.p.outer; 4];
        compress4(&mut states, &self.blocks);
        for (state, slot) in states.iter().zip(self.slots).take(self.len) {
            self.p.hex(state, &mut self.out[slot]);
        }
        self.len = 0;
    }
}

impl Pseudonymiser {
    /// Derives the recipient's key from the node's master key (version 1).
    pub fn for_recipient(master_key: &[u8], org: &str) -> Self {
        Self::for_recipient_versioned(master_key, 1, org)
    }

    /// Derives the recipient's key from master key `key_version` and the organisation name
    /// alone: the derivation of key versions made before recipients carried their member state
    /// (kept so those recipients' pseudonyms stay stable until the next rotation).
    pub fn for_recipient_versioned(master_key: &[u8], key_version: u8, org: &str) -> Self {
        Self::derive(master_key, key_version, &[b"passerelle/pseudonym/v1/", org.as_bytes()])
    }

    /// Derives the recipient's key from master key `key_version`, the recipient's member state
    /// and its organisation, so equally named organisations of two member states get unrelated
    /// pseudonyms. A member state is two letters, so `CC/org` names one recipient only.
    pub fn for_recipient_in_state(master_key: &[u8], key_version: u8, member_state: &MemberState, org: &str) -> Self {
        Self::derive(
            master_key,
            key_version,
            &[
                b"passerelle/pseudonym/v2/",
                member_state.as_str().as_bytes(),
                b"/",
                org.as_bytes(),
            ],
        )
    }

    fn derive(master_key: &[u8], key_version: u8, label: &[&[u8]]) -> Self {
        // HMAC accepts keys of any length, so new_from_slice cannot fail; fall back defensively.
        let mut kdf = HmacSha256::new_from_slice(master_key).unwrap_or_else(|_| keyed_zero());
        for part in label {
            kdf.update(part);
        }
        let k_org = kdf.finalize().into_bytes();
        Self {
            keyed: HmacSha256::new_from_slice(&k_org).unwrap_or_else(|_| keyed_zero()),
            inner: padded_state(&k_org, 0x36),
            outer: padded_state(&k_org, 0x5c),
            key_version,
        }
    }

    /// `hex(key_version || tag[..15])`, the tag given as SHA-256's big-endian state words.
    #[inline(always)]
    fn hex(&self, tag: &[u32; 8], out: &mut [u8; HEX_LEN]) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut bytes = [0u8; PSEUDONYM_BYTES];
        bytes[0] = self.key_version;
        for i in 0..PSEUDONYM_BYTES - 1 {
            bytes[i + 1] = (tag[i / 4] >> (24 - 8 * (i % 4))) as u8;
        }
        for i in 0..PSEUDONYM_BYTES {
            out[2 * i] = HEX[(bytes[i] >> 4) as usize];
            out[2 * i + 1] = HEX[(bytes[i] & 15) as usize];
        }
    }

    /// Pseudonymises a column into a Utf8 column of 32-character hex strings; nulls stay null.
    ///
    /// Values are hashed four at a time and written straight into the result's value buffer:
    /// every pseudonym has the same length, so each row's place is known up front.
    pub fn apply(&self, col: &ArrayRef) -> Result<ArrayRef> {
        if let DataType::Dictionary(_, _) = col.data_type() {
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
        let nulls = col.nulls().cloned();
        let valid = col.len() - nulls.as_ref().map_or(0, |n| n.null_count());
        if valid.saturating_mul(HEX_LEN) > i32::MAX as usize {
            return Err(Error::Unsupported {
                what: format!("pseudonymising {valid} values in one batch (at most 67,108,863)"),
            });
        }
        let mut values = vec![[0u8; HEX_LEN]; valid];
        let mut offsets = Vec::with_capacity(col.len() + 1);
        offsets.push(0i32);
        let mut lanes = Lanes {
            p: self,
            out: &mut values,
            blocks: [[0; 64]; 4],
            slots: [0; 4],
            len: 0,
        };
        let offsets_out = &mut offsets;
        match col.data_type() {
            DataType::Int64 => queue(
                col.as_primitive::<Int64Type>(),
                &mut lanes,
                offsets_out,
                |l, v, slot| l.push_int(v, slot),
            ),
            DataType::Int32 => queue(
                col.as_primitive::<Int32Type>(),
                &mut lanes,
                offsets_out,
                |l, v, slot| l.push_int(i64::from(v), slot),
            ),
            DataType::Utf8 => queue(col.as_string::<i32>(), &mut lanes, offsets_out, |l, v: &str, slot| {
                l.push_bytes(v.as_bytes(), slot)
            }),
            DataType::LargeUtf8 => queue(col.as_string::<i64>(), &mut lanes, offsets_out, |l, v: &str, slot| {
                l.push_bytes(v.as_bytes(), slot)
            }),
            DataType::Utf8View => queue(col.as_string_view(), &mut lanes, offsets_out, |l, v: &str, slot| {
                l.push_bytes(v.as_bytes(), slot)
            }),
            other => {
                return Err(Error::Unsupported {
                    what: format!("pseudonymising a column of type {other}"),
                });
            }
        }
        lanes.flush();
        let offsets = OffsetBuffer::new(ScalarBuffer::from(offsets));
        let values = Buffer::from_vec(values.into_flattened());
        Ok(Arc::new(StringArray::try_new(offsets, values, nulls)?))
    }
}

/// Queues every valid value of `values` in row order (the i-th valid value takes output slot i)
/// and records where each row's text ends; a null row ends where it starts.
#[inline(always)]
fn queue<T>(
    values: impl IntoIterator<Item = Option<T>>,
    lanes: &mut Lanes<'_>,
    offsets: &mut Vec<i32>,
    push: impl Fn(&mut Lanes<'_>, T, usize),
) {
    let mut next = 0usize;
    for v in values {
        if let Some(v) = v {
            push(lanes, v, next);
            next += 1;
        }
        // Cannot truncate: next * HEX_LEN <= valid * HEX_LEN <= i32::MAX (checked by `apply`).
        offsets.push((next * HEX_LEN) as i32);
    }
}

fn keyed_zero() -> HmacSha256 {
    // Unreachable in practice (HMAC takes any key length); keeps the request path free of panics.
    <HmacSha256 as hmac::digest::KeyInit>::new(&Default::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every length around the one-block limit, nulls between values so that groups of four
    /// straddle them, and every group fill from 1 to 4: each pseudonym equals the `hmac` crate's.
    #[test]
    fn four_lane_pseudonyms_equal_hmac_for_every_length() {
        for master in [&b"master"[..], &[0u8; 100][..], b""] {
            let p = Pseudonymiser::for_recipient_versioned(master, 3, "dkfz");
            let mut values: Vec<Option<String>> = Vec::new();
            for len in 0..=ONE_BLOCK + 20 {
                for fill in [b'a', b'~', b'0', b'Z', b'6'] {
                    values.push(Some((0..len).map(|i| (fill ^ (i as u8 % 7)) as char).collect()));
                    if (len + fill as usize).is_multiple_of(3) {
                        values.push(None);
                    }
                }
                values.push(Some("\u{e9}t\u{e9}-\u{1f600}".repeat(len % 9)));
            }
            // Prefixes (every group fill), then slices (offset inputs), in every string layout.
            let cuts = [0, 1, 2, 3, 4, 5, 7, 9, values.len()].map(|n| (0, n));
            let slices = [(1, values.len() - 1), (3, 10), (6, values.len() - 9)];
            for (from, n) in cuts.into_iter().chain(slices) {
                let all = values.clone();
                let layouts: [ArrayRef; 3] = [
                    Arc::new(StringArray::from(all.clone())),
                    Arc::new(arrow::array::LargeStringArray::from(all.clone())),
                    Arc::new(arrow::array::StringViewArray::from(all)),
                ];
                for col in layouts {
                    let col = col.slice(from, n);
                    let got = p.apply(&col).unwrap();
                    let got = got.as_string::<i32>();
                    assert_eq!(got.len(), n);
                    for (i, v) in values[from..from + n].iter().enumerate() {
                        let Some(v) = v else {
                            assert!(got.is_null(i));
                            continue;
                        };
                        let mut reference = p.keyed.clone();
                        reference.update(v.as_bytes());
                        let expected: [u8; 32] = reference.finalize().into_bytes().into();
                        let want: String = std::iter::once(3u8)
                            .chain(expected[..PSEUDONYM_BYTES - 1].iter().copied())
                            .map(|b| format!("{b:02x}"))
                            .collect();
                        assert_eq!(got.value(i), want, "{} value {v:?}", col.data_type());
                    }
                }
            }
        }
    }

    #[test]
    fn decimal_text_equals_to_string_at_every_digit_boundary() {
        let mut cases = vec![0, 1, -1, i64::MIN, i64::MAX, i64::MIN + 1];
        let mut p = 1i64;
        while let Some(next) = p.checked_mul(10) {
            cases.extend([p - 1, p, p + 1, -p + 1, -p, -p - 1]);
            p = next;
        }
        cases.extend([p - 1, p, p + 1, -p]);
        for v in cases {
            let mut block = [0xAAu8; 64];
            let len = decimal(&mut block, v);
            assert_eq!(std::str::from_utf8(&block[..len]).unwrap(), v.to_string());
        }
    }

    #[test]
    fn every_string_layout_and_integers_agree() {
        let p = Pseudonymiser::for_recipient(b"master", "dkfz");
        let mut ids: Vec<Option<i64>> = (0..37).map(|i| (i % 5 != 0).then_some(i * 1_000_003 - 7)).collect();
        ids.extend([
            Some(-7),
            Some(-1),
            Some(0),
            None,
            Some(i64::MIN),
            Some(i64::MAX),
            Some(-123_456_789),
        ]);
        let text: Vec<Option<String>> = ids.iter().map(|v| v.map(|v| v.to_string())).collect();
        let from_i64 = p.apply(&(Arc::new(Int64Array::from(ids.clone())) as ArrayRef)).unwrap();
        let layouts: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(text.clone())),
            Arc::new(arrow::array::LargeStringArray::from(text.clone())),
            Arc::new(arrow::array::StringViewArray::from(text.clone())),
        ];
        for col in layouts {
            assert_eq!(
                p.apply(&col).unwrap().as_ref(),
                from_i64.as_ref(),
                "{}",
                col.data_type()
            );
        }
        let small: Vec<Option<i32>> = ids
            .iter()
            .map(|v| v.and_then(|v| i32::try_from(v).ok()))
            .chain([Some(i32::MIN), Some(i32::MAX)])
            .collect();
        let wide: Vec<Option<i64>> = small.iter().map(|v| v.map(i64::from)).collect();
        let from_i32 = p
            .apply(&(Arc::new(arrow::array::Int32Array::from(small)) as ArrayRef))
            .unwrap();
        let from_wide = p.apply(&(Arc::new(Int64Array::from(wide)) as ArrayRef)).unwrap();
        assert_eq!(from_i32.as_ref(), from_wide.as_ref());
        // A sliced array keeps its own offsets and nulls.
        let sliced = Arc::new(Int64Array::from(ids)).slice(3, 20);
        assert_eq!(
            p.apply(&(Arc::new(sliced) as ArrayRef)).unwrap().as_ref(),
            from_i64.slice(3, 20).as_ref()
        );
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
        let dict: DictionaryArray<Int8Type> = vec![Some("123"), None, Some("7"), Some("123")].into_iter().collect();
        let pd = a.apply(&(Arc::new(dict) as ArrayRef)).unwrap();
        let pd = pd.as_string::<i32>();
        assert_eq!(
            (pd.value(0), pd.value(2), pd.value(3)),
            (pa.value(0), pa.value(2), pa.value(0))
        );
        assert!(pd.is_null(1));
        // The key version leads, so a rotated key's pseudonyms are told apart.
        assert!(pa.value(0).starts_with("01"));
        let v2 = Pseudonymiser::for_recipient_versioned(b"master2", 2, "dkfz")
            .apply(&ints)
            .unwrap();
        assert!(v2.as_string::<i32>().value(0).starts_with("02"));
    }

    /// The member state is part of the recipient: `FR/acme` and `DE/acme` get unrelated
    /// pseudonyms, each stable; the org-only derivation of older key versions is unchanged
    /// (pinned against the `hmac` crate computed here independently).
    #[test]
    fn member_state_is_part_of_the_recipient() {
        let (fr, de) = (MemberState::parse("FR").unwrap(), MemberState::parse("DE").unwrap());
        let ints: ArrayRef = Arc::new(Int64Array::from(vec![42]));
        let one = |p: Pseudonymiser| p.apply(&ints).unwrap().as_string::<i32>().value(0).to_string();
        let a = one(Pseudonymiser::for_recipient_in_state(b"master", 4, &fr, "acme"));
        assert_eq!(a, one(Pseudonymiser::for_recipient_in_state(b"master", 4, &fr, "acme")));
        assert_ne!(a, one(Pseudonymiser::for_recipient_in_state(b"master", 4, &de, "acme")));
        assert_ne!(a, one(Pseudonymiser::for_recipient_versioned(b"master", 4, "acme")));
        assert!(a.starts_with("04"));
        let reference = |label: &[u8], value: &[u8], version: u8| {
            let mut kdf = <HmacSha256 as Mac>::new_from_slice(b"master").unwrap();
            kdf.update(label);
            let k = kdf.finalize().into_bytes();
            let mut m = <HmacSha256 as Mac>::new_from_slice(&k).unwrap();
            m.update(value);
            let tag = m.finalize().into_bytes();
            let mut out = format!("{version:02x}");
            for b in &tag[..15] {
                out.push_str(&format!("{b:02x}"));
            }
            out
        };
        assert_eq!(a, reference(b"passerelle/pseudonym/v2/FR/acme", b"42", 4));
        assert_eq!(
            one(Pseudonymiser::for_recipient_versioned(b"master", 1, "acme")),
            reference(b"passerelle/pseudonym/v1/acme", b"42", 1)
        );
    }
}
