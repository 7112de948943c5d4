//! A latency histogram that takes an observation with two atomic adds.
//!
//! `prometheus-client`'s own histogram takes a mutex per observation; a
//! server observes every request, from every connection's task, so it
//! counts here instead: fixed bucket bounds, one atomic counter per bucket
//! and one for the sum (in microseconds). The count is the buckets' sum,
//! so a scrape never sees a count that disagrees with its buckets.

use super::scrape::Value;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds of the buckets, in microseconds: 50 µs to 10 s, about
/// 2.5x apart (a loopback round trip is tens of µs; a 16M-key push takes
/// seconds). Past the last, the `+Inf` bucket.
pub const BOUNDS_US: [u64; 17] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// Observations in microseconds, counted into [`BOUNDS_US`].
#[derive(Debug, Default)]
pub struct Histogram {
    /// One per bound, and the last for `+Inf`.
    buckets: [AtomicU64; BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    /// Counts one observation of `us` microseconds.
    pub fn observe_us(&self, us: u64) {
        let i = BOUNDS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(BOUNDS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// The observations so far, in seconds, as a sample's value.
    pub fn value(&self) -> Value {
        let mut buckets = Vec::with_capacity(BOUNDS_US.len() + 1);
        let mut count = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            let n = b.load(Ordering::Relaxed);
            count += n;
            let bound = BOUNDS_US
                .get(i)
                .map_or(f64::INFINITY, |&us| us as f64 / 1e6);
            buckets.push((bound, n));
        }
        Value::Histogram {
            buckets,
            sum: self.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
            count,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let h = Histogram::default();
        for us in [0, 50, 51, 9_999_999, 10_000_001] {
            h.observe_us(us);
        }
        let Value::Histogram {
            buckets,
            sum,
            count,
        } = h.value()
        else {
            panic!("not a histogram");
        };
        assert_eq!(count, 5);
        assert_eq!(buckets[0], (0.00005, 2));
        assert_eq!(buckets[1], (0.0001, 1));
        assert_eq!(buckets[16], (10.0, 1));
        assert_eq!(buckets[17], (f64::INFINITY, 1));
        assert!((sum - 20.000101).abs() < 1e-9, "{sum}");
    }
}
