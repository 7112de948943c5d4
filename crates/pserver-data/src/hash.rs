//! The feature hash: how raw features become `u64` keys.
//!
//! **Never change anything in this module.** Saved models are keyed by these
//! values, and servers place keys on the ring without re-hashing them, so the
//! keys must both stay the same forever and spread evenly over `[0, u64::MAX)`.
//!
//! * A hashed feature is a list of byte strings ("parts"), usually
//!   `[field name, value]`. The byte stream `count ‖ (len ‖ bytes)*`, every
//!   number a little-endian `u64`, is fed to 64-bit FNV-1a; the result goes
//!   through the SplitMix64 finalizer ([`mix64`]) because FNV-1a alone leaves
//!   the high bits of short inputs poorly mixed, and the ring is cut by high
//!   bits. The length prefixes make the encoding injective, so `("ab","c")`
//!   and `("a","bc")` differ, as do features with different part counts.
//! * A LIBSVM index becomes `mix64(idx + GAMMA)`: a bijection, so distinct
//!   indices never collide, yet index 1, 2, 3 land far apart on the ring.
//! * `u64::MAX` is reserved (it names the end of the key space), so a result
//!   equal to it is mapped to `u64::MAX - 1`.

/// The SplitMix64 increment (2^64 / golden ratio).
pub const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

const FNV_OFFSET: u64 = 0xCBF2_9CE4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01B3;

/// The SplitMix64 finalizer: a bijection on `u64` with full avalanche.
pub const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Maps the reserved `u64::MAX` to `u64::MAX - 1`; every other key is kept.
pub const fn fix_key(k: u64) -> u64 {
    if k == u64::MAX { u64::MAX - 1 } else { k }
}

const fn fnv_bytes(mut h: u64, bytes: &[u8]) -> u64 {
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(FNV_PRIME);
        i += 1;
    }
    h
}

const fn fnv_u64(h: u64, n: u64) -> u64 {
    fnv_bytes(h, &n.to_le_bytes())
}

/// An incremental [`hash_feature`]: give the part count up front, then each
/// part. Copyable, so the parts that are the same for every row (the field
/// name) are hashed once and the state is reused.
#[derive(Clone, Copy, Debug)]
pub struct KeyHasher(u64);

impl KeyHasher {
    /// Starts a feature of `parts` parts.
    pub const fn new(parts: u64) -> Self {
        KeyHasher(fnv_u64(FNV_OFFSET, parts))
    }

    /// Adds the next part.
    pub const fn part(self, bytes: &[u8]) -> Self {
        KeyHasher(fnv_bytes(fnv_u64(self.0, bytes.len() as u64), bytes))
    }

    /// The key. (Giving fewer or more parts than announced is not checked; it
    /// just yields another key.)
    pub const fn finish(self) -> u64 {
        fix_key(mix64(self.0))
    }
}

/// The key of a hashed feature made of `parts` (see the module docs).
pub const fn hash_feature(parts: &[&[u8]]) -> u64 {
    let mut h = KeyHasher::new(parts.len() as u64);
    let mut i = 0;
    while i < parts.len() {
        h = h.part(parts[i]);
        i += 1;
    }
    h.finish()
}

/// The key of LIBSVM feature index `idx`: `mix64(idx + GAMMA)`, a bijection
/// (except that the one index landing on `u64::MAX` shares `u64::MAX - 1`).
pub const fn libsvm_key(idx: u64) -> u64 {
    fix_key(mix64(idx.wrapping_add(GAMMA)))
}

/// The key of the bias feature every example carries (value 1).
pub const BIAS_KEY: u64 = hash_feature(&[b"__bias__"]);

/// Whether 0-based data line `line` falls in the test part of a holdout:
/// the `line`-th output of SplitMix64 seeded with `seed`, as a fraction of
/// 2^64 (53 bits), is below `fraction`. Independent of sharding (which uses
/// `line % count`), so every shard gets its share of both parts.
pub fn in_test(line: u64, seed: u64, fraction: f64) -> bool {
    let r = mix64(seed.wrapping_add(line.wrapping_add(1).wrapping_mul(GAMMA)));
    ((r >> 11) as f64) * (1.0 / (1u64 << 53) as f64) < fraction
}

#[cfg(test)]
mod tests {
    use super::*;

    // Pinned values: if one of these fails, saved models and any data already
    // hashed no longer match. Do not "fix" the expected numbers.
    #[test]
    fn keys_are_stable() {
        // libsvm_key(0) is also the first output of the reference SplitMix64
        // seeded with 0, which checks mix64 and GAMMA against the literature.
        assert_eq!(libsvm_key(0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(libsvm_key(1), 0x910A_2DEC_8902_5CC1);
        assert_eq!(hash_feature(&[b"carrier", b"UA"]), 0xA6BF_F8C7_7FD1_028F);
        assert_eq!(BIAS_KEY, 0x7822_7BF5_A199_1D7E);
    }

    #[test]
    fn incremental_equals_whole() {
        let whole = hash_feature(&[b"a", b"bc", b""]);
        let inc = KeyHasher::new(3).part(b"a").part(b"bc").part(b"").finish();
        assert_eq!(whole, inc);
    }

    #[test]
    fn encoding_is_injective_on_boundaries() {
        assert_ne!(hash_feature(&[b"ab", b"c"]), hash_feature(&[b"a", b"bc"]));
        assert_ne!(hash_feature(&[b"a"]), hash_feature(&[b"a", b""]));
    }

    #[test]
    fn max_is_reserved() {
        assert_eq!(fix_key(u64::MAX), u64::MAX - 1);
        assert_eq!(fix_key(7), 7);
    }

    #[test]
    fn keys_spread_over_the_ring() {
        // Small indices and short strings must fill all of the top bits,
        // since ring arcs are cut by them.
        let mut top = [0u32; 16];
        for i in 0..16_000u64 {
            top[(libsvm_key(i) >> 60) as usize] += 1;
        }
        assert!(top.iter().all(|&c| (800..1200).contains(&c)), "{top:?}");
        let mut top = [0u32; 16];
        for i in 0..16_000u64 {
            let v = i.to_string();
            top[(hash_feature(&[b"f", v.as_bytes()]) >> 60) as usize] += 1;
        }
        assert!(top.iter().all(|&c| (800..1200).contains(&c)), "{top:?}");
    }

    #[test]
    fn holdout_fraction() {
        let n = 100_000;
        let t = (0..n).filter(|&l| in_test(l, 13, 0.2)).count();
        assert!((19_000..21_000).contains(&t), "{t}");
        assert!((0..1000).all(|l| !in_test(l, 13, 0.0)));
        assert!((0..1000).all(|l| in_test(l, 13, 1.0)));
    }
}
