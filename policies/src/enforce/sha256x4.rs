//! Four independent SHA-256 block compressions at once.
//!
//! Pseudonymising a column is one HMAC per row: two compressions whose inputs do not depend on
//! any other row. A single SHA-NI compression is bound by the latency of `sha256rnds2`; running
//! four independent messages through the rounds in lockstep fills the gaps, which measured
//! 21 ns per block here instead of 44 ns through `sha2::compress256` (AMD EPYC, Zen 3).
//! No maintained crate offers multi-message SHA-256, hence these ~80 lines. The result is
//! exactly `sha2::compress256` per lane (tested against it, and through HMAC against the
//! `hmac` crate); CPUs without SHA-NI take that function lane by lane.
#![allow(unsafe_code)]

/// Compresses `blocks[l]` into `states[l]` for each of the four lanes.
pub(crate) fn compress4(states: &mut [[u32; 8]; 4], blocks: &[[u8; 64]; 4]) {
    #[cfg(target_arch = "x86_64")]
    if shani::available() {
        // SAFETY: the CPU supports every feature `compress4` is compiled with (checked above).
        unsafe { shani::compress4(states, blocks) };
        return;
    }
    for (state, block) in states.iter_mut().zip(blocks) {
        sha2::compress256(
            state,
            std::slice::from_ref(sha2::digest::generic_array::GenericArray::from_slice(block)),
        );
    }
}

#[cfg(target_arch = "x86_64")]
mod shani {
    use std::arch::x86_64::*;

    /// SHA-256 round constants (FIPS 180-4, 4.2.2).
    const K: [u32; 64] = [
        0x428a_2f98,
        0x7137_4491,
        0xb5c0_fbcf,
        0xe9b5_dba5,
        0x3956_c25b,
        0x59f1_11f1,
        0x923f_82a4,
        0xab1c_5ed5,
        0xd807_aa98,
        0x1283_5b01,
        0x2431_85be,
        0x550c_7dc3,
        0x72be_5d74,
        0x80de_b1fe,
        0x9bdc_06a7,
        0xc19b_f174,
        0xe49b_69c1,
        0xefbe_4786,
        0x0fc1_9dc6,
        0x240c_a1cc,
        0x2de9_2c6f,
        0x4a74_84aa,
        0x5cb0_a9dc,
        0x76f9_88da,
        0x983e_5152,
        0xa831_c66d,
        0xb003_27c8,
        0xbf59_7fc7,
        0xc6e0_0bf3,
        0xd5a7_9147,
        0x06ca_6351,
        0x1429_2967,
        0x27b7_0a85,
        0x2e1b_2138,
        0x4d2c_6dfc,
        0x5338_0d13,
        0x650a_7354,
        0x766a_0abb,
        0x81c2_c92e,
        0x9272_2c85,
        0xa2bf_e8a1,
        0xa81a_664b,
        0xc24b_8b70,
        0xc76c_51a3,
        0xd192_e819,
        0xd699_0624,
        0xf40e_3585,
        0x106a_a070,
        0x19a4_c116,
        0x1e37_6c08,
        0x2748_774c,
        0x34b0_bcb5,
        0x391c_0cb3,
        0x4ed8_aa4a,
        0x5b9c_ca4f,
        0x682e_6ff3,
        0x748f_82ee,
        0x78a5_636f,
        0x84c8_7814,
        0x8cc7_0208,
        0x90be_fffa,
        0xa450_6ceb,
        0xbef9_a3f7,
        0xc671_78f2,
    ];

    pub(super) fn available() -> bool {
        is_x86_feature_detected!("sha") && is_x86_feature_detected!("ssse3") && is_x86_feature_detected!("sse4.1")
    }

    /// The four-lane form of the Intel SHA extensions' reference compression (the same steps
    /// as `sha2`'s x86 backend), each round group issued for all lanes before the next.
    ///
    /// # Safety
    /// The CPU must support `sha`, `sse2`, `ssse3` and `sse4.1`.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    pub(super) unsafe fn compress4(states: &mut [[u32; 8]; 4], blocks: &[[u8; 64]; 4]) {
        // SAFETY (whole body): every load and store reads or writes 16 bytes inside the
        // `[u32; 8]` states, the `[u8; 64]` blocks or `K`, all unaligned-tolerant (`loadu`/`storeu`).
        unsafe {
            let bswap = _mm_set_epi64x(0x0C0D_0E0F_0809_0A0Bu64 as i64, 0x0405_0607_0001_0203u64 as i64);
            let mut abef = [_mm_setzero_si128(); 4];
            let mut cdgh = [_mm_setzero_si128(); 4];
            let mut w = [[_mm_setzero_si128(); 4]; 4];
            for l in 0..4 {
                let s = states[l].as_ptr().cast::<__m128i>();
                let cdab = _mm_shuffle_epi32(_mm_loadu_si128(s), 0xB1);
                let efgh = _mm_shuffle_epi32(_mm_loadu_si128(s.add(1)), 0x1B);
                abef[l] = _mm_alignr_epi8(cdab, efgh, 8);
                cdgh[l] = _mm_blend_epi16(efgh, cdab, 0xF0);
                let d = blocks[l].as_ptr().cast::<__m128i>();
                for (j, wj) in w.iter_mut().enumerate() {
                    wj[l] = _mm_shuffle_epi8(_mm_loadu_si128(d.add(j)), bswap);
                }
            }
            let (abef0, cdgh0) = (abef, cdgh);
            for i in 0..16 {
                let k = _mm_loadu_si128(K.as_ptr().add(4 * i).cast::<__m128i>());
                for l in 0..4 {
                    let m = if i < 4 {
                        w[i][l]
                    } else {
                        // The message schedule: W[i] from the four previous word groups.
                        let t1 = _mm_sha256msg1_epu32(w[i % 4][l], w[(i + 1) % 4][l]);
                        let t2 = _mm_alignr_epi8(w[(i + 3) % 4][l], w[(i + 2) % 4][l], 4);
                        let v = _mm_sha256msg2_epu32(_mm_add_epi32(t1, t2), w[(i + 3) % 4][l]);
                        w[i % 4][l] = v;
                        v
                    };
                    let t1 = _mm_add_epi32(m, k);
                    cdgh[l] = _mm_sha256rnds2_epu32(cdgh[l], abef[l], t1);
                    abef[l] = _mm_sha256rnds2_epu32(abef[l], cdgh[l], _mm_shuffle_epi32(t1, 0x0E));
                }
            }
            for l in 0..4 {
                let feba = _mm_shuffle_epi32(_mm_add_epi32(abef[l], abef0[l]), 0x1B);
                let dchg = _mm_shuffle_epi32(_mm_add_epi32(cdgh[l], cdgh0[l]), 0xB1);
                let s = states[l].as_mut_ptr().cast::<__m128i>();
                _mm_storeu_si128(s, _mm_blend_epi16(feba, dchg, 0xF0));
                _mm_storeu_si128(s.add(1), _mm_alignr_epi8(dchg, feba, 8));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_lanes_equal_sha2_compress256() {
        for seed in 0..200u32 {
            let mut blocks = [[0u8; 64]; 4];
            let mut states = [[0u32; 8]; 4];
            for l in 0..4 {
                for (j, b) in blocks[l].iter_mut().enumerate() {
                    *b = (seed.wrapping_mul(2_654_435_761) >> (j % 24)) as u8 ^ (l * 64 + j) as u8;
                }
                for (j, s) in states[l].iter_mut().enumerate() {
                    *s = seed.wrapping_mul(0x9e37_79b9).rotate_left((l * 8 + j) as u32);
                }
            }
            let mut expected = states;
            for (state, block) in expected.iter_mut().zip(&blocks) {
                sha2::compress256(
                    state,
                    std::slice::from_ref(sha2::digest::generic_array::GenericArray::from_slice(block)),
                );
            }
            let mut through_dispatch = states;
            compress4(&mut through_dispatch, &blocks);
            assert_eq!(through_dispatch, expected, "seed {seed}");
            // The SHA-NI path itself, named, so that a machine without it says so rather than
            // passing by comparing sha2 with itself.
            #[cfg(target_arch = "x86_64")]
            if shani::available() {
                // SAFETY: the CPU has the features (checked just above).
                unsafe { shani::compress4(&mut states, &blocks) };
                assert_eq!(states, expected, "seed {seed}");
            } else if seed == 0 {
                eprintln!("this CPU has no SHA-NI: only the portable path was tested");
            }
        }
    }
}
