//! Filters a worker runs on its pushes before they leave (Li et al.,
//! section 5): the significantly-modified filter on pushes, which sends an
//! entry only once its accumulated change passes a threshold and carries
//! the rest forward ([`Residuals`]), and random skip ([`random_skip`]),
//! which drops each entry with probability `p` and scales the kept ones by
//! `1 / (1 - p)` so that the push's expectation is unchanged.
//!
//! Both are for pushes whose values add up on the server (gradients, the
//! updaters `add`, SGD, AdaGrad, FTRL, DBPG's `(g, h)` sums): delaying or
//! scaling an assignment would change what it means.

use std::collections::HashMap;

/// The sum of what was pushed to a key but not yet sent, `width` floats
/// per key, for one table of one worker. Bounded: once it holds
/// `max_keys` keys, an entry that would be held is sent instead (nothing
/// is ever dropped).
#[derive(Debug)]
pub struct Residuals {
    width: usize,
    max_keys: usize,
    held: HashMap<u64, Vec<f32>>,
}

/// What [`Residuals::filter`] left of a push.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Kept {
    /// The keys to send, in order.
    pub keys: Vec<u64>,
    /// Their values (each with what was carried for it).
    pub vals: Vec<f32>,
    /// Entries held back.
    pub held: usize,
}

impl Residuals {
    /// Residuals of a push `width` floats per key, holding at most
    /// `max_keys` keys.
    pub fn new(width: usize, max_keys: usize) -> Residuals {
        Residuals {
            width,
            max_keys,
            held: HashMap::new(),
        }
    }

    /// The width the residuals were made for.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Keys with something carried.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// True when nothing is carried.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Adds a push (sorted `keys`, `width` values each) to what is carried
    /// and returns the entries whose sum moved past `threshold` in one of
    /// its first `tests` values (0: any value), or is not finite anywhere
    /// (the server must see it and refuse it); the others stay carried.
    /// `vals` must be `keys.len() * width` long.
    pub fn filter(&mut self, keys: &[u64], vals: &[f32], threshold: f32, tests: usize) -> Kept {
        let tests = if tests == 0 {
            self.width
        } else {
            tests.min(self.width)
        };
        let w = self.width;
        let mut out = Kept::default();
        if w == 0 || vals.len() != keys.len() * w {
            out.keys = keys.to_vec();
            out.vals = vals.to_vec();
            return out;
        }
        for (&k, v) in keys.iter().zip(vals.chunks_exact(w)) {
            let mut sum = v.to_vec();
            if let Some(carried) = self.held.remove(&k) {
                for (s, c) in sum.iter_mut().zip(carried) {
                    *s += c;
                }
            }
            let send = sum[..tests].iter().any(|&x| !within(x, threshold))
                || sum.iter().any(|x| !x.is_finite());
            if send || self.held.len() >= self.max_keys {
                out.keys.push(k);
                out.vals.extend_from_slice(&sum);
            } else {
                self.held.insert(k, sum);
                out.held += 1;
            }
        }
        out
    }

    /// Takes everything carried, as a push (sorted keys, their sums).
    pub fn drain(&mut self) -> (Vec<u64>, Vec<f32>) {
        let mut all: Vec<(u64, Vec<f32>)> = self.held.drain().collect();
        all.sort_unstable_by_key(|e| e.0);
        let keys = all.iter().map(|e| e.0).collect();
        let vals = all.into_iter().flat_map(|e| e.1).collect();
        (keys, vals)
    }
}

/// True when `x` is within `threshold` of zero (false for NaN).
fn within(x: f32, threshold: f32) -> bool {
    x.abs() <= threshold
}

/// splitmix64: one well-mixed 64-bit value per input.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed random skip draws a request's entries from: one per (worker,
/// table, clock), so a request's choice repeats exactly when it is made
/// again, and differs between requests.
pub fn skip_seed(worker: u32, table: &str, clock: u64) -> u64 {
    let mut h = mix(u64::from(worker) ^ 0x5eed_5eed_0000_0000);
    for b in table.bytes() {
        h = mix(h ^ u64::from(b));
    }
    mix(h ^ clock)
}

/// Random skip: drops each entry of a push (sorted `keys`, `width` values
/// each) with probability `p`, drawn from `seed` and the key, and scales
/// the kept values by `1 / (1 - p)`, so every value's expectation is what
/// it was. Returns the kept keys and values and how many entries were
/// dropped. `p` must be in `[0, 1)`; `p = 0` keeps everything as it is.
pub fn random_skip(
    keys: &[u64],
    vals: &[f32],
    width: usize,
    p: f64,
    seed: u64,
) -> (Vec<u64>, Vec<f32>, usize) {
    if p <= 0.0 || width == 0 || vals.len() != keys.len() * width || p.is_nan() || p >= 1.0 {
        return (keys.to_vec(), vals.to_vec(), 0);
    }
    // Compare 53-bit draws against p: exact for every p a f64 holds.
    let cut = (p * (1u64 << 53) as f64) as u64;
    let scale = (1.0 / (1.0 - p)) as f32;
    let mut kept_keys = Vec::with_capacity(keys.len());
    let mut kept = Vec::with_capacity(vals.len());
    for (&k, v) in keys.iter().zip(vals.chunks_exact(width)) {
        if mix(seed ^ mix(k)) >> 11 < cut {
            continue;
        }
        kept_keys.push(k);
        kept.extend(v.iter().map(|x| x * scale));
    }
    let dropped = keys.len() - kept_keys.len();
    (kept_keys, kept, dropped)
}

#[cfg(test)]
mod tests;
