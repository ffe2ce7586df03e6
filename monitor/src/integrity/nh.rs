//! Keyed page tags for the steady-state check: NH, the universal hash of
//! UMAC and Adiantum, iterated twice with Toeplitz-shifted keys, over each
//! 4 KiB page. It runs at nearly the speed of reading memory, where BLAKE3
//! per page runs at a tenth of it.
//!
//! For a page of 32-bit words `m[0..1024]` and key words `k`, one pass is
//!
//! ```text
//! NH_k(m) = sum over i < 512 of ((m[2i] + k[2i]) mod 2^32) * ((m[2i+1] + k[2i+1]) mod 2^32)   mod 2^64
//! ```
//!
//! and pass `p` uses the key shifted by `4p` words. For any two different
//! pages, the chance over a random key that all [`PASSES`] tags agree is at
//! most 2^-32 per pass, 2^-64 for both (NH is 2^-32-almost-universal on
//! equal-length inputs, and its Toeplitz iteration multiplies the bound;
//! Black, Halevi, Krawczyk, Krovetz, Rogaway, "UMAC", CRYPTO 1999, and
//! RFC 4418).
//!
//! That bound holds only while the key is secret from whoever writes the
//! page, so the key is drawn from the host's random source in the daemon's
//! memory, never written anywhere, and tags are never shown: an adversary
//! inside the guest learns at most whether a write was caught, and every
//! write that is caught is reported. Tags are a fast path only: BLAKE3
//! stays the identity of a baseline (roots, alerts, evidence), and a page
//! whose tag differs is hashed with BLAKE3 and judged as before.

/// Toeplitz iterations: tags are `PASSES * 64` bits.
pub const PASSES: usize = 2;
const PAGE: usize = crate::addr::PAGE_BYTES;
const WORDS: usize = PAGE / 4;
/// Key words: one page's worth, plus the shift of each further pass.
const KEY_WORDS: usize = WORDS + 4 * (PASSES - 1);

/// A page's tag.
pub type Tag = [u64; PASSES];

/// A secret NH key.
#[derive(Clone)]
pub struct Key {
    words: Box<[u32; KEY_WORDS]>,
    simd: Simd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Simd {
    Avx2,
    None,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Key").field("simd", &self.simd).finish_non_exhaustive()
    }
}

impl Key {
    /// A fresh key from the operating system's random source.
    pub fn random() -> std::io::Result<Self> {
        let mut bytes = vec![0u8; KEY_WORDS * 4];
        getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
        Ok(Self::from_bytes(&bytes))
    }

    /// A key from given bytes (tests and benchmarks; repeated if short).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let mut words = Box::new([0u32; KEY_WORDS]);
        if !bytes.is_empty() {
            for (i, w) in words.iter_mut().enumerate() {
                let b = |j: usize| bytes[(4 * i + j) % bytes.len()];
                *w = u32::from_le_bytes([b(0), b(1), b(2), b(3)]);
            }
        }
        Self { words, simd: Simd::detect() }
    }

    /// The same key computing without SIMD (to check the SIMD paths).
    pub fn portable(&self) -> Self {
        Self { words: self.words.clone(), simd: Simd::None }
    }

    /// The instruction set used: `avx2` or `portable`.
    pub fn engine(&self) -> &'static str {
        match self.simd {
            Simd::Avx2 => "avx2",
            Simd::None => "portable",
        }
    }

    /// The tag of one page.
    pub fn tag(&self, page: &[u8; PAGE]) -> Tag {
        match self.simd {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Simd::detect` chose AVX2 only when the CPU has it.
            Simd::Avx2 => unsafe { x86::tag_avx2(&self.words, page) },
            _ => tag_portable(&self.words, page),
        }
    }

    /// The tag of a page given as a slice; `None` unless it is one page long.
    pub fn tag_slice(&self, page: &[u8]) -> Option<Tag> {
        page.try_into().ok().map(|p| self.tag(p))
    }
}

impl Simd {
    /// AVX2 where the CPU has it. (An AVX-512 version, since dropped,
    /// measured slower on the AMD EPYC hosts here, which split 512-bit
    /// operations in two; see benches/README.md.)
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                return Simd::Avx2;
            }
        }
        Simd::None
    }
}

fn tag_portable(key: &[u32; KEY_WORDS], page: &[u8; PAGE]) -> Tag {
    let mut tag = [0u64; PASSES];
    for (p, t) in tag.iter_mut().enumerate() {
        let k = &key[4 * p..4 * p + WORDS];
        let mut sum = 0u64;
        for (i, pair) in page.chunks_exact(8).enumerate() {
            let m0 = u32::from_le_bytes([pair[0], pair[1], pair[2], pair[3]]);
            let m1 = u32::from_le_bytes([pair[4], pair[5], pair[6], pair[7]]);
            let a = u64::from(m0.wrapping_add(k[2 * i]));
            let b = u64::from(m1.wrapping_add(k[2 * i + 1]));
            sum = sum.wrapping_add(a * b);
        }
        *t = sum;
    }
    tag
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{KEY_WORDS, PAGE, PASSES, Tag};

    const _: () = assert!(PASSES == 2, "the SIMD paths compute two passes");

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn tag_avx2(key: &[u32; KEY_WORDS], page: &[u8; PAGE]) -> Tag {
        let m = page.as_ptr();
        let k = key.as_ptr().cast::<u8>();
        let mut acc = [_mm256_setzero_si256(); 4];
        let mut off = 0;
        while off < PAGE {
            for lane in 0..2 {
                let o = off + 32 * lane;
                // SAFETY: `o + 32 <= PAGE` (the loop steps by 64 over a
                // 4096-byte page); the key is 16 bytes longer than a page.
                let (x, k0, k1) = unsafe {
                    (
                        _mm256_loadu_si256(m.add(o).cast()),
                        _mm256_loadu_si256(k.add(o).cast()),
                        _mm256_loadu_si256(k.add(o + 16).cast()),
                    )
                };
                let s0 = _mm256_add_epi32(x, k0);
                let s1 = _mm256_add_epi32(x, k1);
                let p0 = _mm256_mul_epu32(s0, _mm256_srli_epi64(s0, 32));
                let p1 = _mm256_mul_epu32(s1, _mm256_srli_epi64(s1, 32));
                acc[2 * lane] = _mm256_add_epi64(acc[2 * lane], p0);
                acc[2 * lane + 1] = _mm256_add_epi64(acc[2 * lane + 1], p1);
            }
            off += 64;
        }
        let sum = |v: __m256i| {
            let mut out = [0u64; 4];
            // SAFETY: `out` is 32 bytes; an unaligned store takes any address.
            unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), v) };
            out.iter().fold(0u64, |a, &b| a.wrapping_add(b))
        };
        [sum(_mm256_add_epi64(acc[0], acc[2])), sum(_mm256_add_epi64(acc[1], acc[3]))]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn page(seed: u64) -> Box<[u8; PAGE]> {
        let mut x = seed | 1;
        let mut p = Box::new([0u8; PAGE]);
        for b in p.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x.to_le_bytes()[3];
        }
        p
    }

    #[test]
    fn simd_and_portable_agree_with_the_definition() {
        let key = Key::from_bytes(&page(7)[..]);
        let p = page(1);
        // The definition, word by word, for pass 0.
        let w = |b: &[u8], i: usize| u32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap());
        let k: Vec<u8> = page(7).iter().copied().cycle().take(KEY_WORDS * 4).collect();
        let mut want = 0u64;
        for i in 0..WORDS / 2 {
            let a = u64::from(w(&p[..], 2 * i).wrapping_add(w(&k, 2 * i)));
            let b = u64::from(w(&p[..], 2 * i + 1).wrapping_add(w(&k, 2 * i + 1)));
            want = want.wrapping_add(a * b);
        }
        assert_eq!(key.portable().tag(&p)[0], want);
        assert_eq!(key.tag(&p), key.portable().tag(&p), "engine {}", key.engine());
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            let avx2 = Key { simd: Simd::Avx2, ..key.clone() };
            assert_eq!(avx2.tag(&p), key.portable().tag(&p));
        }
    }

    #[test]
    fn keys_differ_and_are_not_printed() {
        let (a, b) = (Key::random().unwrap(), Key::random().unwrap());
        let p = page(3);
        assert_ne!(a.tag(&p), b.tag(&p));
        assert!(!format!("{a:?}").contains(&a.words[0].to_string()));
        assert_eq!(Key::from_bytes(&[]).portable().tag(&[0; PAGE]), [0, 0]);
        assert_eq!(a.tag_slice(&[0u8; 100]), None);
    }

    proptest! {
        /// Any change of any bytes of a page changes its tag (a random key
        /// misses one with chance 2^-64), on every engine alike.
        #[test]
        fn changes_change_the_tag(seed in any::<u64>(), key_seed in any::<u64>(),
                                  at in 0usize..PAGE, len in 1usize..64, xor in 1u8..=255) {
            let key = Key::from_bytes(&page(key_seed)[..]);
            let p = page(seed);
            let mut q = p.clone();
            for b in q.iter_mut().skip(at).take(len) {
                *b ^= xor;
            }
            prop_assert_ne!(key.tag(&p), key.tag(&q));
            prop_assert_eq!(key.tag(&q), key.portable().tag(&q));
        }
    }
}
