//! Parsing of command-line values: key and value lists, ranges, updaters,
//! consistency models and initializers. Every error names the flag and the
//! offending text.

use anyhow::{Context, Result, anyhow, bail};
use pserver_core::{Consistency, Init, KEY_END, KeyRange};
use pserver_node::worker::Packing;

/// `--compress`: how workers pack the values they send (servers then pack
/// their replies losslessly).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compress {
    /// Raw values.
    None,
    /// Byte-shuffled LZ4: exact.
    Lossless,
    /// 16-bit fixed point with unbiased random rounding.
    Fixed16,
    /// 8-bit fixed point with unbiased random rounding.
    Fixed8,
}

impl Compress {
    /// The worker setting.
    pub fn packing(self) -> Option<Packing> {
        match self {
            Compress::None => None,
            Compress::Lossless => Some(Packing::Lossless),
            Compress::Fixed16 => Some(Packing::Fixed16),
            Compress::Fixed8 => Some(Packing::Fixed8),
        }
    }
}

/// A threshold of the significantly-modified filter (`--significant`,
/// `--significant-push`): a number `>= 0`.
pub fn threshold(s: &str) -> Result<f32> {
    let t: f32 = s
        .trim()
        .parse()
        .map_err(|e| anyhow!("threshold {s:?} is not a number: {e}"))?;
    if !(t.is_finite() && t >= 0.0) {
        bail!("threshold {s:?} must be a finite number >= 0");
    }
    Ok(t)
}

/// A probability of random skip (`--random-skip`): in `[0, 1)`.
pub fn probability(s: &str) -> Result<f64> {
    let p: f64 = s
        .trim()
        .parse()
        .map_err(|e| anyhow!("probability {s:?} is not a number: {e}"))?;
    if !(0.0..1.0).contains(&p) {
        bail!("probability {s:?} must be in [0, 1): 1 would drop every entry");
    }
    Ok(p)
}

/// Parses `1,5,9` into keys.
pub fn keys(s: &str) -> Result<Vec<u64>> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            let k: u64 = t
                .parse()
                .map_err(|_| anyhow!("--keys: {t:?} is not an unsigned 64-bit integer"))?;
            if k == KEY_END {
                bail!("--keys: key {k} is reserved");
            }
            Ok(k)
        })
        .collect()
}

/// Parses `0.5,1,2` into finite values.
pub fn values(s: &str) -> Result<Vec<f32>> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            let v: f32 = t
                .parse()
                .map_err(|_| anyhow!("--values: {t:?} is not a number"))?;
            if !v.is_finite() {
                bail!("--values: {t:?} is not finite");
            }
            Ok(v)
        })
        .collect()
}

/// Parses `A..B` into the half-open range `[A, B)`.
pub fn range(s: &str) -> Result<KeyRange> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| anyhow!("--range: {s:?} is not of the form A..B"))?;
    let a: u64 = a
        .trim()
        .parse()
        .with_context(|| format!("--range: start {a:?} is not an integer"))?;
    let b: u64 = b
        .trim()
        .parse()
        .with_context(|| format!("--range: end {b:?} is not an integer"))?;
    if a >= b {
        bail!("--range: {s:?} is empty (the end is exclusive)");
    }
    Ok(KeyRange { begin: a, end: b })
}

/// Parses `sequential`, `eventual`, `bounded:N` (or just `N`).
pub fn consistency(s: &str) -> Result<Consistency> {
    match s {
        "sequential" | "seq" | "bsp" => Ok(Consistency::Sequential),
        "eventual" | "async" => Ok(Consistency::Eventual),
        _ => {
            let n = s.strip_prefix("bounded:").unwrap_or(s);
            let tau: u64 = n.parse().map_err(|_| {
                anyhow!("--consistency: {s:?} is not sequential, eventual or bounded:N")
            })?;
            Ok(if tau == 0 {
                Consistency::Sequential
            } else {
                Consistency::Bounded(tau)
            })
        }
    }
}

/// Parses `zero` or `uniform:SCALE[:SEED]`.
pub fn init(s: &str) -> Result<Init> {
    if s == "zero" {
        return Ok(Init::Zero);
    }
    let rest = s
        .strip_prefix("uniform:")
        .ok_or_else(|| anyhow!("--init: {s:?} is not zero or uniform:SCALE[:SEED]"))?;
    let (scale, seed) = rest.split_once(':').unwrap_or((rest, "0"));
    let scale: f32 = scale
        .parse()
        .map_err(|_| anyhow!("--init: scale {scale:?} is not a number"))?;
    let seed: u64 = seed
        .parse()
        .map_err(|_| anyhow!("--init: seed {seed:?} is not an integer"))?;
    Ok(Init::Uniform { scale, seed })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_ranges() {
        assert_eq!(keys("1,5, 9").unwrap(), vec![1, 5, 9]);
        assert!(keys("1,x").is_err());
        assert!(keys("18446744073709551615").is_err());
        assert_eq!(values("0.5,1,2").unwrap(), vec![0.5, 1.0, 2.0]);
        assert!(values("nan").is_err());
        assert_eq!(range("3..7").unwrap(), KeyRange { begin: 3, end: 7 });
        assert!(range("7..3").is_err());
        assert!(range("7").is_err());
    }

    #[test]
    fn models() {
        assert_eq!(consistency("sequential").unwrap(), Consistency::Sequential);
        assert_eq!(consistency("bounded:3").unwrap(), Consistency::Bounded(3));
        assert_eq!(consistency("0").unwrap(), Consistency::Sequential);
        assert!(consistency("soon").is_err());
        assert_eq!(init("zero").unwrap(), Init::Zero);
        assert_eq!(
            init("uniform:0.1:7").unwrap(),
            Init::Uniform {
                scale: 0.1,
                seed: 7
            }
        );
        assert!(init("normal").is_err());
    }
}
