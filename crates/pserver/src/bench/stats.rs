//! Pure arithmetic of the benchmark: quantiles, medians, ratios, and the
//! figures of a case from its repetitions. No clocks, no I/O, so each rule
//! is tested with plain numbers.

use serde::{Deserialize, Serialize};

/// The `q` quantile (0..=1) of sorted samples, by nearest rank; NaN when
/// there are none.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of samples (the lower of the two middle ones for an even
/// count, so it is always a measured value); NaN when there are none.
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    quantile(&xs, 0.5)
}

/// `num / den`, or `None` when the ceiling `den` is not a positive finite
/// number (a ratio to a failed measurement would mean nothing).
pub fn ratio(num: f64, den: f64) -> Option<f64> {
    (den.is_finite() && den > 0.0 && num.is_finite()).then(|| num / den)
}

/// What one repetition of a case measured, as the worker's counters saw it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// Requests completed.
    pub requests: u64,
    /// Keys in those requests.
    pub keys: u64,
    /// Frames the worker sent to servers (a request is one frame per
    /// partition it touches).
    pub frames: u64,
    /// Bytes of those frames, length prefixes included.
    pub bytes_sent: u64,
    /// Bytes of the replies, length prefixes included.
    pub bytes_received: u64,
    /// Bytes of values carried (pushed values out, pulled values back).
    pub payload_bytes: u64,
    /// Seconds with at least one request in flight (preparing the next
    /// request while none is out is the benchmark's cost, not the system's).
    pub seconds: f64,
    /// Latency of each request, µs, sorted (not written: the quantiles are).
    #[serde(skip)]
    pub latencies_us: Vec<f64>,
}

impl Run {
    /// Both directions' bytes.
    pub fn wire_bytes(&self) -> u64 {
        self.bytes_sent + self.bytes_received
    }

    /// Adds another concurrent run (another worker's, over the same time):
    /// counts add up, the time is the longer one, latencies merge.
    pub fn merge(mut self, other: Run) -> Run {
        self.requests += other.requests;
        self.keys += other.keys;
        self.frames += other.frames;
        self.bytes_sent += other.bytes_sent;
        self.bytes_received += other.bytes_received;
        self.payload_bytes += other.payload_bytes;
        self.seconds = self.seconds.max(other.seconds);
        self.latencies_us.extend(other.latencies_us);
        self.latencies_us.sort_by(f64::total_cmp);
        self
    }
}

/// A case's figures: each the median, over repetitions, of that figure in
/// each repetition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// Requests per second.
    pub req_per_s: f64,
    /// Keys per second.
    pub keys_per_s: f64,
    /// Bytes on the wire per second, both ways, in GB (1e9).
    pub wire_gb_per_s: f64,
    /// Value bytes per second (pushed plus pulled), in GB.
    pub payload_gb_per_s: f64,
    /// Median latency, µs.
    pub p50_us: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
    /// 99.9th percentile latency, µs.
    pub p999_us: f64,
}

/// The figures of a case from its repetitions.
pub fn summarize(runs: &[Run]) -> Figures {
    let med = |f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f).collect());
    let rate = |count: &dyn Fn(&Run) -> f64| med(&|r| count(r) / r.seconds);
    Figures {
        req_per_s: rate(&|r| r.requests as f64),
        keys_per_s: rate(&|r| r.keys as f64),
        wire_gb_per_s: rate(&|r| r.wire_bytes() as f64) / 1e9,
        payload_gb_per_s: rate(&|r| r.payload_bytes as f64) / 1e9,
        p50_us: med(&|r| quantile(&r.latencies_us, 0.5)),
        p99_us: med(&|r| quantile(&r.latencies_us, 0.99)),
        p999_us: med(&|r| quantile(&r.latencies_us, 0.999)),
    }
}

/// What one repetition of the store alone measured: requests applied to an
/// in-process table, no wire, no runtime.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StoreRun {
    /// Requests applied (a push-pull counts once).
    pub requests: u64,
    /// Keys in those requests.
    pub keys: u64,
    /// Seconds they took.
    pub seconds: f64,
}

/// Requests and keys per second of the store alone: each the median over
/// repetitions of that rate in each repetition.
pub fn store_rates(runs: &[StoreRun]) -> (f64, f64) {
    let rate = |count: &dyn Fn(&StoreRun) -> f64| {
        median(runs.iter().map(|r| count(r) / r.seconds).collect())
    };
    (rate(&|r| r.requests as f64), rate(&|r| r.keys as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&xs, 0.5), 50.0);
        assert_eq!(quantile(&xs, 0.99), 99.0);
        assert_eq!(quantile(&xs, 0.999), 100.0);
        assert_eq!(quantile(&xs, 0.0), 1.0);
        assert_eq!(quantile(&[7.0], 0.999), 7.0);
        assert!(quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn medians_are_measured_values() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.0);
        assert_eq!(median(vec![5.0]), 5.0);
        assert!(median(Vec::new()).is_nan());
    }

    #[test]
    fn ratios_need_a_real_ceiling() {
        assert_eq!(ratio(3.0, 2.0), Some(1.5));
        assert_eq!(ratio(1.0, 0.0), None);
        assert_eq!(ratio(1.0, f64::NAN), None);
        assert_eq!(ratio(f64::NAN, 1.0), None);
    }

    fn run(requests: u64, keys_each: u64, seconds: f64, lat: &[f64]) -> Run {
        Run {
            requests,
            keys: requests * keys_each,
            frames: requests,
            bytes_sent: requests * 100,
            bytes_received: requests * 50,
            payload_bytes: requests * keys_each * 4,
            seconds,
            latencies_us: lat.to_vec(),
        }
    }

    #[test]
    fn figures_are_medians_of_each_repetition() {
        let runs = [
            run(100, 10, 1.0, &[1.0, 2.0, 3.0]),
            run(300, 10, 1.0, &[10.0, 20.0, 30.0]),
            run(100, 10, 0.5, &[4.0, 5.0, 6.0]),
        ];
        let f = summarize(&runs);
        // Requests per second per run: 100, 300, 200.
        assert_eq!(f.req_per_s, 200.0);
        assert_eq!(f.keys_per_s, 2000.0);
        assert_eq!(f.wire_gb_per_s, 150.0 * 200.0 / 1e9);
        assert_eq!(f.payload_gb_per_s, 40.0 * 200.0 / 1e9);
        // p50 per run: 2, 20, 5; p999: 3, 30, 6.
        assert_eq!(f.p50_us, 5.0);
        assert_eq!(f.p999_us, 6.0);
    }

    #[test]
    fn store_rates_are_medians_of_each_repetition() {
        let r = |requests, keys, seconds| StoreRun {
            requests,
            keys,
            seconds,
        };
        // Per run: 10, 40, 20 req/s and 100, 400, 100 keys/s.
        let (req, keys) = store_rates(&[r(10, 100, 1.0), r(20, 200, 0.5), r(40, 200, 2.0)]);
        assert_eq!((req, keys), (20.0, 100.0));
        let (req, keys) = store_rates(&[]);
        assert!(req.is_nan() && keys.is_nan());
    }

    #[test]
    fn concurrent_runs_add_counts_and_keep_the_longer_time() {
        let a = run(10, 4, 1.0, &[3.0, 1.0]);
        let b = run(30, 4, 2.0, &[2.0]);
        let m = a.merge(b);
        assert_eq!((m.requests, m.keys, m.frames), (40, 160, 40));
        assert_eq!(m.wire_bytes(), 40 * 150);
        assert_eq!(m.seconds, 2.0);
        assert_eq!(m.latencies_us, [1.0, 2.0, 3.0]);
    }
}
