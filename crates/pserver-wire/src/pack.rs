//! Value compression: the filter that shrinks a frame's values section.
//!
//! Two kinds, as in the paper's filters:
//!
//! - **lossless**: the `f32`s are byte-shuffled (all first bytes, then all
//!   second bytes, ...) so that runs of zeros and shared exponents line up,
//!   then LZ4-compressed. Gradients and weights of a sparse model are mostly
//!   zeros, which this removes almost entirely.
//! - **fixed point** with 16 or 8 bits and *random rounding*: each value `v`
//!   becomes an integer `q` with `v ~ q * 2^e` for one exponent `e` per frame,
//!   rounded up with probability equal to the fraction, so the rounding is
//!   unbiased (`E[q * 2^e] = v`) and errors average out over iterations
//!   instead of accumulating. The integers are then shuffled and compressed
//!   like the lossless kind.
//!
//! The rounding is seeded by the caller (the frame's request id), so a frame
//! packs to the same bytes every time and a simulation stays deterministic.
//! Unpacking checks every length before allocating and never produces a
//! non-finite value from a fixed-point section, so bad input gets an error,
//! never a panic.
//!
//! Layout of a packed section (its length is declared in the header):
//! lossless: LZ4 block of the shuffled values; fixed point: `e` as a
//! little-endian `i16`, then an LZ4 block of the shuffled `i16` / `i8` integers.

use crate::frame::WireError;
use bytes::Bytes;

/// How a values section is packed. The byte is the header's packing field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum Packing {
    /// Exact: shuffled bytes, LZ4.
    Lossless = 1,
    /// 16-bit fixed point with random rounding, then as lossless.
    Fixed16 = 2,
    /// 8-bit fixed point with random rounding, then as lossless.
    Fixed8 = 3,
}

impl Packing {
    /// The packing with this header byte, if any (0 means "not packed").
    pub fn from_u8(b: u8) -> Option<Packing> {
        Some(match b {
            1 => Packing::Lossless,
            2 => Packing::Fixed16,
            3 => Packing::Fixed8,
            _ => return None,
        })
    }

    /// Largest integer magnitude of a fixed-point kind.
    fn qmax(self) -> f64 {
        match self {
            Packing::Lossless => 0.0,
            Packing::Fixed16 => f64::from(i16::MAX),
            Packing::Fixed8 => f64::from(i8::MAX),
        }
    }

    /// Bytes per integer of a fixed-point kind.
    fn width(self) -> usize {
        match self {
            Packing::Lossless => 4,
            Packing::Fixed16 => 2,
            Packing::Fixed8 => 1,
        }
    }

    /// Whether values come back exactly as they went in.
    pub fn is_lossless(self) -> bool {
        self == Packing::Lossless
    }
}

impl std::str::FromStr for Packing {
    type Err = String;

    fn from_str(s: &str) -> Result<Packing, String> {
        match s {
            "lossless" | "lz4" => Ok(Packing::Lossless),
            "fixed16" => Ok(Packing::Fixed16),
            "fixed8" => Ok(Packing::Fixed8),
            _ => Err(format!(
                "unknown compression {s:?} (expected lossless, fixed16 or fixed8)"
            )),
        }
    }
}

/// A packed values section, as it travels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packed {
    /// How it was packed.
    pub packing: Packing,
    /// Values it holds once unpacked.
    pub count: u32,
    /// The packed bytes.
    pub bytes: Bytes,
}

/// Smallest exponent of a fixed-point section: `2^-149` is the smallest
/// positive `f32`, so every `q * 2^e` is an exact `f32`.
const EXP_MIN: i32 = -149;

/// Largest exponent for `packing`: `qmax * 2^e` must stay finite.
fn exp_max(packing: Packing) -> i32 {
    match packing {
        Packing::Fixed8 => 120,
        _ => 112,
    }
}

/// Packs `vals`. Fixed point falls back to lossless when a value is not
/// finite or too large for the format (never silently changing a NaN the
/// server must refuse). Returns `None` when packing would not make the
/// section smaller than the raw `4 * len` bytes or when `vals` is empty:
/// the caller then sends the values raw.
pub fn pack(vals: &[f32], packing: Packing, seed: u64) -> Option<Packed> {
    if vals.is_empty() {
        return None;
    }
    let count = u32::try_from(vals.len()).ok()?;
    let packed = match packing {
        Packing::Lossless => lossless(vals),
        fixed => match exponent(vals, fixed) {
            Some(e) => fixed_point(vals, fixed, e, seed),
            None => lossless(vals),
        },
    };
    // Raw values are exact, so they win any tie.
    if packed.bytes.len() >= vals.len() * 4 {
        return None;
    }
    Some(Packed { count, ..packed })
}

/// The lossless packing of `vals`.
fn lossless(vals: &[f32]) -> Packed {
    let raw: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    Packed {
        packing: Packing::Lossless,
        count: 0,
        bytes: Bytes::from(lz4_flex::block::compress(&shuffle(&raw, 4))),
    }
}

/// The exponent `e` for fixed point: the smallest with `max |v| <= qmax * 2^e`,
/// or `None` when a value is not finite or needs more than [`exp_max`].
fn exponent(vals: &[f32], packing: Packing) -> Option<i32> {
    let mut max = 0.0f64;
    for v in vals {
        if !v.is_finite() {
            return None;
        }
        max = max.max(f64::from(v.abs()));
    }
    if max == 0.0 {
        return Some(0);
    }
    let qmax = packing.qmax();
    let mut e = ((max / qmax).log2().ceil() as i32).clamp(EXP_MIN, exp_max(packing) + 1);
    // Floating-point log2 can be off by one either way; settle it exactly.
    while e <= exp_max(packing) && max / pow2(e) > qmax {
        e += 1;
    }
    while e > EXP_MIN && max / pow2(e - 1) <= qmax {
        e -= 1;
    }
    (e <= exp_max(packing)).then_some(e)
}

/// `2^e` exactly, for `e` in the fixed-point range.
fn pow2(e: i32) -> f64 {
    2f64.powi(e)
}

/// Fixed-point packing with exponent `e`; rounding seeded by `seed`.
fn fixed_point(vals: &[f32], packing: Packing, e: i32, seed: u64) -> Packed {
    let qmax = packing.qmax();
    let scale = pow2(e);
    let width = packing.width();
    let mut raw = Vec::with_capacity(vals.len() * width);
    for (i, v) in vals.iter().enumerate() {
        let x = f64::from(*v) / scale;
        let low = x.floor();
        let q = (low + f64::from(u8::from(uniform(seed, i as u64) < x - low))).clamp(-qmax, qmax);
        // `q` is an integer within the width's range, so the casts are exact.
        match packing {
            Packing::Fixed8 => raw.push(q as i8 as u8),
            _ => raw.extend_from_slice(&(q as i16).to_le_bytes()),
        }
    }
    let mut bytes = Vec::with_capacity(2 + raw.len());
    // In range for i16: `exponent` keeps e within [EXP_MIN, exp_max].
    bytes.extend_from_slice(&(e as i16).to_le_bytes());
    bytes.extend_from_slice(&lz4_flex::block::compress(&shuffle(&raw, width)));
    Packed {
        packing,
        count: 0,
        bytes: Bytes::from(bytes),
    }
}

/// A uniform number in `[0, 1)` for value `i` of a frame seeded `seed`
/// (splitmix64, top 53 bits).
fn uniform(seed: u64, i: u64) -> f64 {
    let mut z = seed ^ i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// Byte `j` of every `width`-byte item, for `j` in order.
fn shuffle(raw: &[u8], width: usize) -> Vec<u8> {
    let n = raw.len() / width;
    let mut out = vec![0; raw.len()];
    for (i, item) in raw.chunks_exact(width).enumerate() {
        for (j, b) in item.iter().enumerate() {
            out[j * n + i] = *b;
        }
    }
    out
}

/// The inverse of [`shuffle`].
fn unshuffle(shuffled: &[u8], width: usize) -> Vec<u8> {
    let n = shuffled.len() / width;
    let mut out = vec![0; shuffled.len()];
    for (i, item) in out.chunks_exact_mut(width).enumerate() {
        for (j, b) in item.iter_mut().enumerate() {
            *b = shuffled[j * n + i];
        }
    }
    out
}

/// Unpacks a section into exactly `count` values. `count` was checked
/// against the frame limits by the decoder, so the allocation is bounded.
pub fn unpack(p: &Packed) -> Result<Vec<f32>, WireError> {
    let n = p.count as usize;
    let bad = |why: String| WireError::Packed {
        packing: p.packing as u8,
        why,
    };
    let inflate = |src: &[u8], width: usize| -> Result<Vec<u8>, WireError> {
        let mut out = vec![0; n * width];
        let got =
            lz4_flex::block::decompress_into(src, &mut out).map_err(|e| bad(e.to_string()))?;
        if got != out.len() {
            return Err(bad(format!(
                "unpacks to {got} bytes, not the {} that {n} values need",
                out.len()
            )));
        }
        Ok(unshuffle(&out, width))
    };
    match p.packing {
        Packing::Lossless => Ok(inflate(&p.bytes, 4)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()),
        fixed => {
            let Some((e, rest)) = p.bytes.split_first_chunk::<2>() else {
                return Err(bad("no exponent".into()));
            };
            let e = i32::from(i16::from_le_bytes(*e));
            if !(EXP_MIN..=exp_max(fixed)).contains(&e) {
                return Err(bad(format!("exponent {e} is out of range")));
            }
            let scale = pow2(e);
            let raw = inflate(rest, fixed.width())?;
            // `q * 2^e` with |q| < 2^15 and e >= -149 is an exact, finite f32.
            Ok(match fixed {
                Packing::Fixed8 => raw
                    .iter()
                    .map(|&b| (f64::from(b as i8) * scale) as f32)
                    .collect(),
                _ => raw
                    .chunks_exact(2)
                    .map(|c| (f64::from(i16::from_le_bytes([c[0], c[1]])) * scale) as f32)
                    .collect(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(vals: &[f32], packing: Packing) -> Vec<f32> {
        match pack(vals, packing, 42) {
            Some(p) => {
                assert_eq!(p.count as usize, vals.len());
                unpack(&p).unwrap()
            }
            None => vals.to_vec(),
        }
    }

    #[test]
    fn lossless_is_exact_and_shrinks_sparse_values() {
        let mut vals = vec![0.0f32; 10_000];
        for i in (0..10_000).step_by(37) {
            vals[i] = (i as f32).sin() * 1e-3;
        }
        vals[5] = f32::NAN;
        vals[6] = f32::NEG_INFINITY;
        vals[7] = -0.0;
        let p = pack(&vals, Packing::Lossless, 0).unwrap();
        assert!(
            p.bytes.len() < vals.len() * 4 / 5,
            "{} bytes",
            p.bytes.len()
        );
        let back = unpack(&p).unwrap();
        assert!(
            back.iter()
                .map(|v| v.to_bits())
                .eq(vals.iter().map(|v| v.to_bits()))
        );
    }

    #[test]
    fn incompressible_values_stay_raw() {
        let vals: Vec<f32> = (0..64)
            .map(|i| f32::from_bits((uniform(7, i) * 4e9) as u32))
            .collect();
        assert_eq!(pack(&vals, Packing::Lossless, 0), None);
        assert_eq!(pack(&[], Packing::Fixed8, 0), None);
    }

    #[test]
    fn fixed_point_error_is_within_one_step() {
        let vals: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        for (packing, steps) in [(Packing::Fixed16, 32767.0), (Packing::Fixed8, 127.0)] {
            let back = round(&vals, packing);
            let max = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
            // The step is the smallest power of two with max <= qmax * step.
            let step = 2f32.powi((max / steps).log2().ceil() as i32);
            for (v, b) in vals.iter().zip(&back) {
                assert!((v - b).abs() < step, "{packing:?}: {v} -> {b}");
            }
        }
    }

    #[test]
    fn random_rounding_is_unbiased() {
        // 0.3 of a step: nearest rounding would always give 0; random rounding
        // gives one step 30% of the time, so the mean stays 0.3 steps.
        let step = 2f32.powi(-10);
        let mut vals = vec![0.3 * step; 20_000];
        vals[0] = 127.0 * step; // fixes the exponent at -10 for Fixed8
        let back = round(&vals, Packing::Fixed8);
        let mean = back[1..].iter().map(|v| f64::from(*v)).sum::<f64>() / 19_999.0;
        let want = f64::from(0.3 * step);
        assert!((mean - want).abs() < 0.05 * want, "mean {mean} vs {want}");
        assert!(back[1..].iter().all(|&v| v == 0.0 || v == step));
    }

    #[test]
    fn fixed_point_values_repack_exactly() {
        let vals: Vec<f32> = (0..500).map(|i| (i as f32).cos() * 1e-4).collect();
        for packing in [Packing::Fixed16, Packing::Fixed8] {
            let once = round(&vals, packing);
            let twice = round(&once, packing);
            assert_eq!(once, twice, "{packing:?}");
        }
    }

    #[test]
    fn fixed_point_keeps_non_finite_values_exactly() {
        let vals = vec![1.0, f32::NAN, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let p = pack(&vals, Packing::Fixed8, 1).unwrap();
        assert_eq!(p.packing, Packing::Lossless);
        assert!(unpack(&p).unwrap()[1].is_nan());
        // Too large for 8 bits: lossless too.
        let p = pack(&[f32::MAX, 0.0, 0.0, 0.0, 0.0, 0.0], Packing::Fixed8, 1).unwrap();
        assert_eq!(p.packing, Packing::Lossless);
        assert_eq!(round(&[f32::MAX, 0.0], Packing::Fixed16)[0], f32::MAX);
    }

    #[test]
    fn zeros_and_tiny_values() {
        assert_eq!(round(&[0.0; 100], Packing::Fixed16), vec![0.0; 100]);
        let tiny = [f32::from_bits(1), 0.0, -f32::from_bits(3)];
        assert_eq!(round(&tiny, Packing::Fixed16), tiny.to_vec());
    }

    #[test]
    fn bad_sections_are_errors() {
        let good = pack(&[0.0; 64], Packing::Fixed16, 0).unwrap();
        let cases = [
            Packed {
                count: 65,
                ..good.clone()
            },
            Packed {
                count: 63,
                ..good.clone()
            },
            Packed {
                bytes: Bytes::new(),
                ..good.clone()
            },
            Packed {
                bytes: Bytes::from_static(&[200, 0, 0, 0]),
                ..good.clone()
            },
            Packed {
                bytes: Bytes::from_static(&[0x6a, 0xff, 0, 0]),
                ..good.clone()
            },
            Packed {
                bytes: good.bytes.slice(..good.bytes.len() - 1),
                ..good.clone()
            },
            Packed {
                packing: Packing::Lossless,
                ..good.clone()
            },
            Packed {
                bytes: Bytes::from_static(&[0xff; 40]),
                packing: Packing::Lossless,
                count: 3,
            },
        ];
        for p in cases {
            assert!(matches!(unpack(&p), Err(WireError::Packed { .. })), "{p:?}");
        }
        assert_eq!(unpack(&good).unwrap(), vec![0.0; 64]);
    }

    #[test]
    fn names_parse() {
        assert_eq!("lossless".parse(), Ok(Packing::Lossless));
        assert_eq!("fixed8".parse(), Ok(Packing::Fixed8));
        assert!("gzip".parse::<Packing>().is_err());
        for b in 0..=255u8 {
            if let Some(p) = Packing::from_u8(b) {
                assert_eq!(p as u8, b);
            }
        }
    }
}
