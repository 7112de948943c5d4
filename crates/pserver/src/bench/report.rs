//! What a benchmark run reports: the JSON written by `--json` and the
//! markdown table printed at the end.

use super::memory::MemoryReport;
use super::procs::Ceilings;
use super::stats::{Figures, Run, StoreRun, ratio, store_rates, summarize};
use serde::{Deserialize, Serialize};

/// The machine the figures come from.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// Cores this process may use.
    pub cores: usize,
    /// The CPU's model name from `/proc/cpuinfo` (`None` without it).
    pub cpu_model: Option<String>,
    /// Whether this binary was built with optimizations (a debug build's
    /// figures say little).
    pub release_build: bool,
}

impl Machine {
    /// This machine.
    pub fn current() -> Machine {
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model: std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|t| cpu_model(&t)),
            release_build: !cfg!(debug_assertions),
        }
    }
}

/// The first `model name` of a `/proc/cpuinfo` text.
pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("model name"))
        .find_map(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// One measured case: its figures (medians over repetitions), their ratios
/// to the ceilings of the same run, and every repetition's raw counts.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaseReport {
    /// push, pull or push_pull.
    pub op: String,
    /// Keys per request.
    pub keys: usize,
    /// Requests in flight per worker.
    pub depth: usize,
    /// Workers sending at once (their figures add up).
    pub workers: usize,
    /// Keys the table held when the case began.
    pub table_keys: Option<u64>,
    /// The medians.
    #[serde(flatten)]
    pub figures: Figures,
    /// p50 over the raw TCP round trip's p50 (cases of one request in flight).
    pub latency_vs_ceiling: Option<f64>,
    /// Wire GB/s over the one-stream GB/s.
    pub wire_vs_stream: Option<f64>,
    /// Dense cases: value GB/s over the one-stream GB/s.
    pub vs_stream: Option<f64>,
    /// Each repetition's counts, from the workers' traffic counters.
    pub runs: Vec<Run>,
    /// The same keys applied to the table in this process, no wire, no
    /// runtime (sparse cases of one server; `None` elsewhere or with
    /// `--no-store`).
    pub store: Option<StoreReport>,
    /// Keys/s over the store alone's keys/s: the share of the table's own
    /// speed left after the wire and the runtime.
    pub vs_store: Option<f64>,
}

/// The store alone on a case's keys: figures, and each repetition's counts.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoreReport {
    /// Threads a large request could use (as many as a server here gets).
    pub threads: usize,
    /// Keys the in-process table held when the case began.
    pub table_keys: u64,
    /// Requests per second (median over repetitions).
    pub req_per_s: f64,
    /// Keys per second (median over repetitions).
    pub keys_per_s: f64,
    /// Each repetition's counts.
    pub runs: Vec<StoreRun>,
}

impl StoreReport {
    /// The report of the store alone's repetitions `runs`.
    pub fn new(threads: usize, table_keys: u64, runs: Vec<StoreRun>) -> StoreReport {
        let (req_per_s, keys_per_s) = store_rates(&runs);
        StoreReport {
            threads,
            table_keys,
            req_per_s,
            keys_per_s,
            runs,
        }
    }
}

/// What a case is, beside its measurements.
pub struct CaseSpec {
    /// push, pull or push_pull.
    pub op: &'static str,
    /// Keys per request.
    pub keys: usize,
    /// Requests in flight per worker.
    pub depth: usize,
    /// Workers sending at once.
    pub workers: usize,
    /// Keys the table held when the case began.
    pub table_keys: Option<u64>,
    /// A dense range (the ratio that matters is the values' to the stream).
    pub dense: bool,
}

impl CaseReport {
    /// The report of case `spec` from its repetitions, against `ceilings`.
    pub fn new(spec: CaseSpec, runs: Vec<Run>, ceilings: &Ceilings) -> CaseReport {
        let figures = summarize(&runs);
        let stream = ceilings.stream_gb_per_s.unwrap_or(f64::NAN);
        CaseReport {
            op: spec.op.to_string(),
            keys: spec.keys,
            depth: spec.depth,
            workers: spec.workers,
            table_keys: spec.table_keys,
            latency_vs_ceiling: (spec.depth == 1)
                .then(|| ratio(figures.p50_us, ceilings.rtt_p50_us))
                .flatten(),
            wire_vs_stream: ratio(figures.wire_gb_per_s, stream),
            vs_stream: spec
                .dense
                .then(|| ratio(figures.payload_gb_per_s, stream))
                .flatten(),
            figures,
            runs,
            store: None,
            vs_store: None,
        }
    }

    /// This case with the store alone's figures on the same keys beside it.
    pub fn with_store(mut self, store: Option<StoreReport>) -> CaseReport {
        self.vs_store = store
            .as_ref()
            .and_then(|st| ratio(self.figures.keys_per_s, st.keys_per_s));
        self.store = store;
        self
    }

    /// The ratio shown in the table: latency for 1-key requests one at a
    /// time (what bounds them is the round trip), values for dense ranges,
    /// wire bytes for the rest (what bounds them is the stream).
    fn ceiling_cell(&self) -> String {
        let cell = if self.keys == 1 && self.depth == 1 {
            self.latency_vs_ceiling.map(|r| format!("{} RTT", times(r)))
        } else if let Some(r) = self.vs_stream {
            Some(format!("{} stream", times(r)))
        } else {
            self.wire_vs_stream.map(|r| format!("{} stream", times(r)))
        };
        cell.unwrap_or_else(|| "-".into())
    }
}

/// The table preloaded before the large cases.
#[derive(Clone, Debug, Serialize)]
pub struct PreloadReport {
    /// Keys pushed (all distinct).
    pub keys: u64,
    /// Seconds it took.
    pub seconds: f64,
    /// The smallest request size it was loaded for.
    pub before_keys: usize,
}

/// The cases of one key set other than the random sweep: `small` (one
/// fixed list, a table holding just it) or `zipf` (Zipf draws from a
/// universe the table was preloaded with).
#[derive(Clone, Debug, Serialize)]
pub struct KeysetReport {
    /// small or zipf.
    pub keyset: String,
    /// Keys drawn per request (each case's `keys`); a Zipf request carries
    /// fewer, its repeats merged.
    pub draws: usize,
    /// The Zipf exponent (zipf only).
    pub zipf_s: Option<f64>,
    /// Keys of the universe (zipf only).
    pub universe: Option<u64>,
    /// Key lists the requests cycle through.
    pub lists: usize,
    /// Distinct keys a request carried, on average over those lists (what
    /// each case's keys/s counts).
    pub distinct_keys_mean: f64,
    /// The universe pushed into the table before the cases (zipf only).
    pub preload: Option<PreloadReport>,
    /// Push, pull, push_pull.
    pub cases: Vec<CaseReport>,
}

impl KeysetReport {
    /// The label of this set's rows.
    fn label(&self) -> String {
        match (self.zipf_s, self.universe) {
            (Some(s), Some(u)) => format!(
                "1x1 zipf s={s} of {} ({} distinct)",
                thousands(u),
                thousands(self.distinct_keys_mean.round() as u64)
            ),
            _ => format!("1x1 {}", self.keyset),
        }
    }
}

/// Dense-range cases.
#[derive(Clone, Debug, Serialize)]
pub struct DenseReport {
    /// Keys in the range.
    pub keys: usize,
    /// Floats per key.
    pub dim: usize,
    /// Push, pull, push_pull of the whole range.
    pub cases: Vec<CaseReport>,
}

/// Several servers and workers at once.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterReport {
    /// Server processes.
    pub servers: usize,
    /// Workers sending at once (figures are their totals).
    pub workers: usize,
    /// Keys per request.
    pub keys: usize,
    /// Push, pull, push_pull.
    pub cases: Vec<CaseReport>,
}

/// The figures with every process pinned to one core.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PinnedReport {
    /// The CPUs each process of the pinned run may use (the benchmark, its
    /// peer, manager and server), as the kernel says.
    pub cpus_allowed: Vec<String>,
    /// Raw TCP request + 8-byte answer, pinned, p50 µs.
    pub rtt_p50_us: f64,
    /// Its p99.
    pub rtt_p99_us: f64,
    /// 1-key requests, one in flight.
    pub cases: Vec<CaseReport>,
}

/// Everything `--json` writes.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Where it ran.
    pub machine: Machine,
    /// Repetitions per case.
    pub reps: usize,
    /// Time per repetition, ms.
    pub duration_ms: u64,
    /// Time per repetition of the store alone, ms (`None`: not run).
    pub store_duration_ms: Option<u64>,
    /// Floats per key.
    pub dim: usize,
    /// The ceilings, unpinned.
    pub ceilings: Ceilings,
    /// Bytes per key of a large table.
    pub memory: Option<MemoryReport>,
    /// The preload before the large sparse cases.
    pub preload: Option<PreloadReport>,
    /// Random sorted keys, one server, one worker.
    pub sparse: Vec<CaseReport>,
    /// The small and zipf key sets, one server, one worker.
    pub keysets: Vec<KeysetReport>,
    /// Dense ranges.
    pub dense: Option<DenseReport>,
    /// Several servers and workers.
    pub cluster: Option<ClusterReport>,
    /// Everything on one core.
    pub pinned: Option<PinnedReport>,
    /// Why `pinned` is missing, when it is.
    pub pinned_skipped: Option<String>,
    /// Wall-clock seconds of the whole run.
    pub total_seconds: f64,
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A rate with a K/M suffix.
fn rate(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}K", x / 1e3)
    } else if x >= 10.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

/// Microseconds, with a decimal only where it is not noise.
fn micros(x: f64) -> String {
    if x >= 1000.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

/// A ratio with three significant digits or so.
fn times(r: f64) -> String {
    if r >= 0.1 {
        format!("{r:.2}x")
    } else {
        format!("{r:.4}x")
    }
}

/// The table's header.
pub fn header() -> String {
    "| case | op | keys | depth | table keys | req/s | keys/s | wire GB/s | values GB/s | p50 us | p99 us | p999 us | vs ceiling | store alone keys/s | vs store |\n\
     |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        .to_string()
}

/// One row of the table.
pub fn row(label: &str, c: &CaseReport) -> String {
    let f = &c.figures;
    format!(
        "| {label} | {} | {} | {} | {} | {} | {} | {:.3} | {:.3} | {} | {} | {} | {} | {} | {} |",
        c.op,
        thousands(c.keys as u64),
        c.depth,
        c.table_keys.map_or("-".into(), thousands),
        rate(f.req_per_s),
        rate(f.keys_per_s),
        f.wire_gb_per_s,
        f.payload_gb_per_s,
        micros(f.p50_us),
        micros(f.p99_us),
        micros(f.p999_us),
        c.ceiling_cell(),
        c.store
            .as_ref()
            .map_or("-".into(), |st| rate(st.keys_per_s)),
        c.vs_store.map_or("-".into(), times)
    )
}

/// Every case of the report as table rows, labelled by section.
pub fn rows(r: &Report) -> Vec<String> {
    let mut out: Vec<String> = r.sparse.iter().map(|c| row("1x1", c)).collect();
    for k in &r.keysets {
        let label = k.label();
        out.extend(k.cases.iter().map(|c| row(&label, c)));
    }
    if let Some(d) = &r.dense {
        let label = format!("dense, dim {}", d.dim);
        out.extend(d.cases.iter().map(|c| row(&label, c)));
    }
    if let Some(cl) = &r.cluster {
        let label = format!("{}x{}", cl.servers, cl.workers);
        out.extend(cl.cases.iter().map(|c| row(&label, c)));
    }
    if let Some(p) = &r.pinned {
        out.extend(p.cases.iter().map(|c| row("pinned", c)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_easily() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(16_777_216), "16,777,216");
        assert_eq!(rate(12.4), "12");
        assert_eq!(rate(0.43), "0.43");
        assert_eq!(micros(2_315_197.6), "2315198");
        assert_eq!(micros(61.04), "61.0");
        assert_eq!(times(1.234), "1.23x");
        assert_eq!(times(0.0123), "0.0123x");
        assert_eq!(rate(175_400.0), "175.4K");
        assert_eq!(rate(55_900_000.0), "55.90M");
    }

    #[test]
    fn the_cpu_model_is_the_first_model_name() {
        let t =
            "processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\nprocessor\t: 1\nmodel name\t: other\n";
        assert_eq!(cpu_model(t).as_deref(), Some("Intel(R) Xeon(R)"));
        assert_eq!(cpu_model("processor: 0\n"), None);
    }

    fn one_run(keys: u64, secs: f64, lat: f64) -> Run {
        Run {
            requests: 10,
            keys: 10 * keys,
            frames: 10,
            bytes_sent: 1000,
            bytes_received: 1000,
            payload_bytes: 10 * keys * 4,
            seconds: secs,
            latencies_us: vec![lat],
        }
    }

    #[test]
    fn ratios_go_to_the_ceiling_that_bounds_the_case() {
        let ceil = Ceilings {
            rtt_p50_us: 50.0,
            rtt_p99_us: 90.0,
            stream_gb_per_s: Some(4.0),
        };
        let spec = |keys, depth, dense| CaseSpec {
            op: "push",
            keys,
            depth,
            workers: 1,
            table_keys: None,
            dense,
        };
        let c = CaseReport::new(spec(1, 1, false), vec![one_run(1, 1.0, 60.0)], &ceil);
        assert_eq!(c.latency_vs_ceiling, Some(1.2));
        assert_eq!(c.wire_vs_stream, Some(2000.0 / 1e9 / 4.0));
        assert_eq!(c.vs_stream, None);
        assert_eq!(c.ceiling_cell(), "1.20x RTT");
        let c = CaseReport::new(spec(1, 32, false), vec![one_run(1, 1.0, 60.0)], &ceil);
        assert_eq!(c.latency_vs_ceiling, None);
        // 100M keys of 4 bytes in 0.1 s: 4 GB/s of values, the stream's rate.
        let c = CaseReport::new(
            spec(10_000_000, 1, true),
            vec![one_run(10_000_000, 0.1, 9.0)],
            &ceil,
        );
        assert!((c.vs_stream.unwrap() - 1.0).abs() < 1e-9, "{c:?}");
        assert_eq!(c.ceiling_cell(), "1.00x stream");
        // Without a stream figure (the pinned run) there is no stream ratio.
        let pinned = Ceilings {
            stream_gb_per_s: None,
            ..ceil
        };
        let c = CaseReport::new(spec(64, 1, false), vec![one_run(64, 1.0, 60.0)], &pinned);
        assert_eq!(c.wire_vs_stream, None);
        assert_eq!(c.ceiling_cell(), "-");
    }

    #[test]
    fn the_store_alone_sits_beside_its_case() {
        let ceil = Ceilings {
            rtt_p50_us: 50.0,
            rtt_p99_us: 90.0,
            stream_gb_per_s: Some(4.0),
        };
        let spec = CaseSpec {
            op: "pull",
            keys: 64,
            depth: 1,
            workers: 1,
            table_keys: Some(64),
            dense: false,
        };
        // 640 keys/s against the store's 6,400.
        let c = CaseReport::new(spec, vec![one_run(64, 1.0, 60.0)], &ceil);
        let store = StoreReport::new(
            2,
            64,
            vec![StoreRun {
                requests: 100,
                keys: 6400,
                seconds: 1.0,
            }],
        );
        assert_eq!(store.keys_per_s, 6400.0);
        let c = c.with_store(Some(store));
        assert_eq!(c.vs_store, Some(0.1));
        let r = row("1x1", &c);
        assert!(r.ends_with("| 6.4K | 0.10x |"), "{r}");
        let none = c.clone().with_store(None);
        assert_eq!(none.vs_store, None);
        assert!(row("1x1", &none).ends_with("| - | - |"));
        // The header has as many columns as a row.
        let cols = |l: &str| l.matches('|').count();
        assert_eq!(cols(header().lines().next().unwrap()), cols(&r));
    }
}
