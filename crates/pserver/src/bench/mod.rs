//! `pserver bench`: push, pull and push-pull throughput and latency against
//! clusters of separate processes, beside the loopback ceilings measured in
//! the same run (a raw TCP request with an 8-byte answer between two
//! processes, one TCP stream's throughput), as medians of repetitions.
//!
//! A default run measures, in this order (issue #5's table):
//! - the bytes per key of a 100M-key AdaGrad table, in this process
//!   (`memory`), freed before anything else starts;
//! - the ceilings against a peer process;
//! - sparse requests of random sorted keys (1 key at each `--depth`, then
//!   each `--keys` size), one server and this process as the worker; the
//!   table is preloaded with 16M keys before the 1M-key cases;
//! - a dense range of 16M floats;
//! - the small and zipf key sets (`--keyset`): one fixed list of 65,536
//!   keys on a table of just those, then 65,536 Zipf(1.1) draws per request
//!   from a universe of 10M keys the table was preloaded with, against a
//!   fresh server;
//! - 2 servers and 2 workers at once;
//! - the round trip and 1-key requests with every process pinned to one
//!   core (a child run under `taskset`).
//!
//! Beside each sparse case of one server, the same key lists are applied to
//! the server's table type in this process (`alone`): the table's own
//! speed, so each case shows what the wire and the runtime cost on top.
//!
//! Progress goes to stderr as cases finish; the tables go to stdout at the
//! end, and `--json` writes every figure with each repetition's counts.

mod alone;
mod cases;
mod keys;
mod load;
mod memory;
mod pinned;
pub(crate) mod procs;
mod report;
pub(crate) mod stats;

use anyhow::{Context, Result, bail};
use cases::{cluster_cases, dense_cases, keyset_cases, sparse_cases};
use clap::{Args, ValueEnum};
use keys::{KeyStream, ZipfSet};
use procs::{Ceilings, Procs, addr_of};
use pserver_core::spec::MAX_DIM;
use pserver_core::{NodeState, Role, UpdaterSpec};
use pserver_node::worker::{TableOptions, Worker, WorkerConfig};
use pserver_wire::Limits;
use pserver_wire::header::HEADER_LEN;
use report::{CaseReport, DenseReport, Machine, PreloadReport, Report, thousands};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// `pserver bench` flags.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Keys per sparse request, comma-separated (random sorted u64 keys).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,1024,65536,1048576,16777216"
    )]
    keys: Vec<usize>,
    /// Sparse key sets, comma-separated: random (the --keys sizes, fresh
    /// random keys), small (one fixed list of --keyset-keys keys: a table
    /// that stays in the cache), zipf (--keyset-keys Zipf draws per request
    /// from --universe keys, all preloaded).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "random,small,zipf"
    )]
    keyset: Vec<Keyset>,
    /// Keys per request of the small and zipf key sets (zipf: draws, whose
    /// repeats a request carries once).
    #[arg(long, default_value_t = 65_536)]
    keyset_keys: usize,
    /// The zipf key set's exponent: rank r is drawn with weight r^-s.
    #[arg(long, default_value_t = 1.1)]
    zipf_s: f64,
    /// Keys of the zipf key set's universe, pushed into its table first.
    #[arg(long, default_value_t = 10_000_000)]
    universe: u64,
    /// Skip the figures of the store alone beside the sparse cases.
    #[arg(long)]
    no_store: bool,
    /// How long each repetition of the store alone runs, in ms (shorter
    /// than the cases' by default, to keep the default run within 5
    /// minutes; there is no wire between its requests to smooth out).
    #[arg(long, default_value_t = 500)]
    store_duration_ms: u64,
    /// Requests in flight for 1-key requests, comma-separated (larger
    /// requests go one at a time).
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    depth: Vec<usize>,
    /// Floats per key.
    #[arg(long, default_value_t = 1)]
    dim: usize,
    /// How long each repetition of a case runs, in ms (a request longer
    /// than this still completes: each repetition has at least one).
    #[arg(long, default_value_t = 1000)]
    duration_ms: u64,
    /// Repetitions of each case; the tables show medians.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Distinct keys pushed into the sparse table before the first case of
    /// at least --preload-from keys per request (0: no preload).
    #[arg(long, default_value_t = 16_777_216)]
    preload: u64,
    /// The request size from which cases run against the preloaded table.
    #[arg(long, default_value_t = 1_048_576)]
    preload_from: usize,
    /// Keys of the dense range pushed and pulled whole (0: no dense case).
    /// With --dense-dim 4096 the default is 16M floats in 4,096 rows.
    #[arg(long, default_value_t = 4096)]
    dense: usize,
    /// Floats per key of the dense table: dense parameters (a layer's
    /// weights) live as wide rows, one key per row.
    #[arg(long, default_value_t = 4096)]
    dense_dim: usize,
    /// Servers x workers of the cluster case, e.g. 2x2 (off: no such case).
    #[arg(long, default_value = "2x2")]
    cluster: String,
    /// Keys per request in the cluster case.
    #[arg(long, default_value_t = 65_536)]
    cluster_keys: usize,
    /// Keys of the AdaGrad table weighed for bytes per key (0: skip).
    #[arg(long, default_value_t = 100_000_000)]
    memory_keys: u64,
    /// Skip the figures with every process pinned to one core.
    #[arg(long)]
    no_pinned: bool,
    /// Run the sparse (key sets included) and dense cases against this
    /// cluster instead of starting a manager and a server.
    #[arg(long)]
    manager: Option<String>,
    /// Write every figure as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Internal: run only the pinned part and print it as JSON (the parent
    /// starts this under taskset).
    #[arg(long, hide = true)]
    pinned_only: bool,
}

/// `pserver bench-peer`: the other end of the ceiling measurements.
#[derive(Args, Debug)]
pub struct PeerArgs {}

/// Runs the peer of the ceiling measurements.
pub async fn peer(_args: PeerArgs) -> Result<()> {
    procs::peer().await
}

/// A sparse key set (`--keyset`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Keyset {
    /// Fresh random keys at each `--keys` size.
    Random,
    /// One fixed list, every request the same.
    Small,
    /// Zipf draws from a preloaded universe.
    Zipf,
}

/// The largest Zipf exponent taken (beyond it nearly every draw is the
/// first rank, which says nothing more).
const MAX_ZIPF_S: f64 = 10.0;

/// Servers and workers of the cluster case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Server processes.
    pub servers: usize,
    /// Workers sending at once.
    pub workers: usize,
}

/// Most servers or workers the cluster case starts on one machine.
const MAX_NODES: usize = 16;

/// Most requests in flight per worker.
const MAX_DEPTH: usize = 4096;

/// Parses `--cluster`: `SxW` or `off`.
pub fn parse_shape(s: &str) -> Result<Option<Shape>> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let bad = || format!("--cluster must be SERVERSxWORKERS (e.g. 2x2) or off, got {s:?}");
    let (a, b) = s.split_once(['x', 'X']).with_context(bad)?;
    let servers: usize = a.trim().parse().with_context(bad)?;
    let workers: usize = b.trim().parse().with_context(bad)?;
    if !(1..=MAX_NODES).contains(&servers) || !(1..=MAX_NODES).contains(&workers) {
        bail!("--cluster: servers and workers must be in 1..={MAX_NODES}, got {s:?}");
    }
    Ok(Some(Shape { servers, workers }))
}

/// The validated settings of a run.
#[derive(Clone, Debug)]
pub struct Settings {
    keys: Vec<usize>,
    /// The key sets to run, each once, in the order given.
    keysets: Vec<Keyset>,
    /// Keys per request of the small and zipf sets.
    keyset_keys: usize,
    /// The zipf key set's universe, exponent and draws per request.
    zipf: ZipfSet,
    /// Whether the store alone runs beside the sparse cases.
    store: bool,
    /// Time per repetition of the store alone.
    store_duration: Duration,
    depths: Vec<usize>,
    dim: usize,
    duration: Duration,
    reps: usize,
    preload: u64,
    preload_from: usize,
    dense: usize,
    dense_dim: usize,
    cluster: Option<Shape>,
    cluster_keys: usize,
    memory_keys: u64,
    pinned: bool,
    manager: Option<String>,
    json: Option<PathBuf>,
    pinned_only: bool,
    /// How this process's workers connect (the security flags' transport).
    net: pserver_node::net::Net,
    /// The security flags, for the processes the run starts.
    child_args: Vec<String>,
}

/// Checks that a request of `keys` keys fits one frame of the default
/// limits, values and key list included (one server may own every key, so
/// the worker may not split it).
fn check_request(flag: &str, keys: usize, dim: usize, with_key_list: bool) -> Result<()> {
    let limits = Limits::default();
    let per_key = 4 * dim + if with_key_list { 8 } else { 0 };
    let bytes = keys.saturating_mul(per_key).saturating_add(HEADER_LEN);
    if keys == 0 || keys > limits.max_keys || bytes > limits.max_frame {
        bail!(
            "{flag}: {keys} keys of dim {dim} make a {bytes}-byte request; \
             a request must have 1..={} keys and fit a {}-byte frame",
            limits.max_keys,
            limits.max_frame
        );
    }
    Ok(())
}

impl Settings {
    /// Validates the flags, so that a bad one fails before anything starts.
    pub fn from_args(a: &BenchArgs) -> Result<Settings> {
        if a.reps == 0 || a.reps > 1000 {
            bail!("--reps must be in 1..=1000, got {}", a.reps);
        }
        if a.duration_ms == 0 || a.duration_ms > 600_000 {
            bail!("--duration-ms must be in 1..=600000, got {}", a.duration_ms);
        }
        if a.store_duration_ms == 0 || a.store_duration_ms > 600_000 {
            bail!(
                "--store-duration-ms must be in 1..=600000, got {}",
                a.store_duration_ms
            );
        }
        if a.dim == 0 || a.dim > MAX_DIM as usize {
            bail!("--dim must be in 1..={MAX_DIM}, got {}", a.dim);
        }
        let mut keysets = Vec::new();
        for &k in &a.keyset {
            if !keysets.contains(&k) {
                keysets.push(k);
            }
        }
        if keysets.is_empty() {
            bail!("--keyset needs at least one of random, small, zipf");
        }
        if keysets.iter().any(|&k| k != Keyset::Random) {
            check_request("--keyset-keys", a.keyset_keys, a.dim, true)?;
        }
        if !(0.0..=MAX_ZIPF_S).contains(&a.zipf_s) {
            bail!("--zipf-s must be in 0..={MAX_ZIPF_S}, got {}", a.zipf_s);
        }
        // Ranks stay below 2^32, so the rank-to-key map is one-to-one
        // (keys::universe_key).
        if a.universe == 0 || a.universe > u64::from(u32::MAX) {
            bail!("--universe must be in 1..={}, got {}", u32::MAX, a.universe);
        }
        if a.keys.is_empty() {
            bail!("--keys needs at least one size");
        }
        for &k in &a.keys {
            check_request("--keys", k, a.dim, true)?;
        }
        if a.depth.is_empty() || a.depth.iter().any(|&d| d == 0 || d > MAX_DEPTH) {
            bail!(
                "--depth must list values in 1..={MAX_DEPTH}, got {:?}",
                a.depth
            );
        }
        if a.dense_dim == 0 || a.dense_dim > MAX_DIM as usize {
            bail!("--dense-dim must be in 1..={MAX_DIM}, got {}", a.dense_dim);
        }
        if a.dense > 0 {
            check_request("--dense", a.dense, a.dense_dim, false)?;
        }
        let cluster = parse_shape(&a.cluster)?;
        if cluster.is_some() {
            check_request("--cluster-keys", a.cluster_keys, a.dim, true)?;
        }
        if a.preload > 1 << 32 {
            bail!("--preload must be at most 2^32 keys, got {}", a.preload);
        }
        if a.memory_keys > u64::from(u32::MAX) {
            bail!(
                "--memory-keys must be at most {}, got {}",
                u32::MAX,
                a.memory_keys
            );
        }
        Ok(Settings {
            keys: a.keys.clone(),
            keysets,
            keyset_keys: a.keyset_keys,
            zipf: ZipfSet {
                universe: a.universe,
                s: a.zipf_s,
                draws: a.keyset_keys,
            },
            store: !a.no_store,
            store_duration: Duration::from_millis(a.store_duration_ms),
            depths: a.depth.clone(),
            dim: a.dim,
            duration: Duration::from_millis(a.duration_ms),
            reps: a.reps,
            preload: a.preload,
            preload_from: a.preload_from,
            dense: a.dense,
            dense_dim: a.dense_dim,
            cluster,
            cluster_keys: a.cluster_keys,
            memory_keys: a.memory_keys,
            pinned: !a.no_pinned,
            manager: a.manager.clone(),
            json: a.json.clone(),
            pinned_only: a.pinned_only,
            net: Default::default(),
            child_args: Vec::new(),
        })
    }
}

/// How long one request may take. The largest (16M keys) take seconds; a
/// request still out after a minute is stuck, and the run should say so
/// well within its time budget.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A client of the cluster at `manager`, over `net`.
async fn connect(manager: &str, net: &pserver_node::net::Net) -> Result<Worker> {
    let cfg = WorkerConfig {
        timeout: REQUEST_TIMEOUT,
        net: net.clone(),
        ..WorkerConfig::client(manager.to_string())
    };
    Worker::connect(cfg)
        .await
        .with_context(|| format!("connecting to {manager}"))
}

/// Creates this run's table `bench-<what>-<pid>` of width `dim` (assign:
/// the server stores what arrives, like ps-lite's benchmark).
async fn create_table(w: &Worker, what: &str, dim: usize) -> Result<String> {
    let name = format!("bench-{what}-{}", std::process::id());
    let dim = u32::try_from(dim).context("--dim")?;
    w.create_table(&name, TableOptions::new(dim, UpdaterSpec::Assign))
        .await
        .with_context(|| format!("creating table {name}"))?;
    // One unmeasured pull of a key of every partition (it stores nothing):
    // it returns once every server has the map with the table, so that no
    // measured request is refused as ahead of a server's map and retried.
    let firsts: Vec<u64> = w.map().partitions.iter().map(|p| p.range.begin).collect();
    w.pull(&name, firsts)
        .await
        .with_context(|| format!("reaching the servers of table {name}"))?;
    Ok(name)
}

/// Waits until the map has `servers` live servers each owning some keys
/// (a server prints its address before the manager has placed it).
async fn wait_for_servers(w: &Worker, servers: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let map = w.refresh().await?;
        let live = map
            .nodes
            .iter()
            .filter(|n| n.role == Role::Server && n.state == NodeState::Alive)
            .filter(|n| map.partitions.iter().any(|p| p.primary == n.id))
            .count();
        if live >= servers {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("only {live} of {servers} servers joined the cluster within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the benchmark and prints its tables. Its own processes and workers
/// use the security flags of this process.
pub async fn run(args: BenchArgs, sec: &crate::security::Security) -> Result<()> {
    let mut s = Settings::from_args(&args)?;
    s.net = sec.net.clone();
    s.child_args = sec.child_args();
    if s.pinned_only {
        return pinned::child(&s).await;
    }
    if s.memory_keys > 0 {
        memory::check_room("--memory-keys", s.memory_keys, "0 to skip the memory case")?;
    }
    if s.keysets.contains(&Keyset::Zipf) {
        // The universe is held twice: by the server and by the store alone.
        memory::check_room("--universe", s.zipf.universe, "a --keyset without zipf")?;
    }
    let started = Instant::now();
    let machine = Machine::current();
    if !machine.release_build {
        eprintln!("bench: warning: a debug build; use --release for meaningful figures");
    }
    let memory = match s.memory_keys {
        0 => None,
        n => {
            progress(&format!("memory: filling a table of {} keys", thousands(n)));
            let m = tokio::task::spawn_blocking(move || memory::measure(n))
                .await
                .context("the memory case")??;
            progress(&memory_line(&m));
            Some(m)
        }
    };
    let mut stream = KeyStream::new(0x0062_656e_6368);
    // The processes of this part stop at the end of the block, before the
    // next parts start their own: each part has the machine to itself.
    let one = {
        let mut procs = Procs::new(&s.child_args);
        let result = one_server(&s, &mut procs, &mut stream).await;
        result.map_err(|e| procs.explain(e))?
    };
    let keysets = match s.keysets.iter().any(|&k| k != Keyset::Random) {
        true => {
            let mut procs = Procs::new(&s.child_args);
            let result = keyset_cases(&s, &one.ceilings, &mut procs).await;
            result.map_err(|e| procs.explain(e))?
        }
        false => Vec::new(),
    };
    let cluster = match s.cluster {
        Some(shape) => Some(cluster_cases(&s, shape, &one.ceilings, &mut stream).await?),
        None => None,
    };
    let (pinned, pinned_skipped) = pinned_part(&s);
    let report = Report {
        machine,
        reps: s.reps,
        duration_ms: s.duration.as_millis() as u64,
        store_duration_ms: s.store.then_some(s.store_duration.as_millis() as u64),
        dim: s.dim,
        ceilings: one.ceilings,
        memory,
        preload: one.preload,
        sparse: one.sparse,
        keysets,
        dense: one.dense,
        cluster,
        pinned,
        pinned_skipped,
        total_seconds: started.elapsed().as_secs_f64(),
    };
    print_report(&report, &s);
    if let Some(path) = &s.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("report written to {}", path.display());
    }
    Ok(())
}

/// The pinned part, or why it is missing. A failure loses only this part:
/// the report keeps the rest and says why.
fn pinned_part(s: &Settings) -> (Option<report::PinnedReport>, Option<String>) {
    if !s.pinned {
        return (None, Some("--no-pinned".to_string()));
    }
    progress("pinned: re-running under taskset -c 0");
    let why = match pinned::run(s) {
        Ok(Ok(p)) => return (Some(p), None),
        Ok(Err(why)) => why,
        Err(e) => format!("the pinned run failed: {e:#}"),
    };
    progress(&format!("pinned: skipped: {why}"));
    (None, Some(why))
}

/// What the one-server part of a run measured.
struct OneServer {
    ceilings: Ceilings,
    sparse: Vec<CaseReport>,
    preload: Option<PreloadReport>,
    dense: Option<DenseReport>,
}

/// The ceilings against a peer, then the sparse and dense cases against one
/// server process (or the cluster at `--manager`), this process the worker.
async fn one_server(s: &Settings, procs: &mut Procs, stream: &mut KeyStream) -> Result<OneServer> {
    let peer = addr_of(&procs.start(&["bench-peer"])?)?;
    let manager = match &s.manager {
        Some(m) => m.clone(),
        None => procs.start_cluster(1)?,
    };
    let w = connect(&manager, &s.net).await?;
    let ceilings = procs::ceilings(&peer, s.duration, s.reps, true).await?;
    progress(&ceilings_line(&ceilings));
    let (sparse, preload) = match s.keysets.contains(&Keyset::Random) {
        true => sparse_cases(&w, s, &ceilings, stream).await?,
        false => (Vec::new(), None),
    };
    let dense = match s.dense {
        0 => None,
        n => Some(dense_cases(&w, s, &ceilings, n).await?),
    };
    w.shutdown();
    Ok(OneServer {
        ceilings,
        sparse,
        preload,
        dense,
    })
}

/// A progress line on stderr (stdout gets the tables at the end).
fn progress(line: &str) {
    eprintln!("bench: {line}");
}

/// The memory case in one line.
fn memory_line(m: &memory::MemoryReport) -> String {
    let rss = match (m.rss_bytes_per_key, m.rss_vs_raw) {
        (Some(b), Some(r)) => format!("{b:.1} bytes/key resident ({r:.2}x)"),
        _ => "resident set unknown".into(),
    };
    format!(
        "memory: {} keys of dim {} with {}: {:.1} bytes/key by the store ({:.2}x the {:.0} bytes of raw content), {rss}; filled in {:.1} s",
        thousands(m.keys),
        m.dim,
        m.updater,
        m.store_bytes_per_key,
        m.store_vs_raw,
        m.raw_bytes_per_key,
        m.fill_seconds
    )
}

/// The unpinned ceilings in one line.
fn ceilings_line(c: &Ceilings) -> String {
    format!(
        "ceilings: TCP request + 8-byte answer p50 {:.1} us, p99 {:.1} us; one stream {:.2} GB/s",
        c.rtt_p50_us,
        c.rtt_p99_us,
        c.stream_gb_per_s.unwrap_or(f64::NAN)
    )
}

/// Prints the run's summary lines and its table.
fn print_report(r: &Report, s: &Settings) {
    println!(
        "bench: {} cores ({}), {} build; {} ms per case, medians of {} runs, dim {}; {:.0} s in all",
        r.machine.cores,
        r.machine.cpu_model.as_deref().unwrap_or("unknown CPU"),
        if r.machine.release_build {
            "release"
        } else {
            "debug"
        },
        r.duration_ms,
        r.reps,
        r.dim,
        r.total_seconds
    );
    if let Some(m) = &r.memory {
        println!("{}", memory_line(m));
    }
    println!("{}", ceilings_line(&r.ceilings));
    match (&r.pinned, &r.pinned_skipped) {
        (Some(p), _) => println!(
            "pinned ceiling (every process on CPU {}): TCP request + 8-byte answer p50 {:.1} us, p99 {:.1} us",
            p.cpus_allowed.first().map_or("?", String::as_str),
            p.rtt_p50_us,
            p.rtt_p99_us
        ),
        (None, Some(why)) => println!("pinned: skipped ({why})"),
        (None, None) => {}
    }
    if let Some(p) = &r.preload {
        println!(
            "sparse table preloaded with {} keys before the cases of {}+ keys ({:.1} s)",
            thousands(p.keys),
            thousands(p.before_keys as u64),
            p.seconds
        );
    }
    for k in &r.keysets {
        if let Some(p) = &k.preload {
            println!(
                "{} table preloaded with its universe of {} keys ({:.1} s); {} lists of {} draws, {:.0} distinct keys a request on average",
                k.keyset,
                thousands(p.keys),
                p.seconds,
                k.lists,
                thousands(k.draws as u64),
                k.distinct_keys_mean
            );
        }
    }
    if let Some(ms) = r.store_duration_ms {
        println!(
            "store alone: the same keys applied to the table in this process (no wire, no runtime), medians of {} runs of {ms} ms; vs store = keys/s over its keys/s",
            r.reps
        );
    }
    if s.manager.is_some() {
        println!("sparse and dense cases ran against the cluster at --manager");
    }
    println!();
    println!("{}", report::header());
    for row in report::rows(r) {
        println!("{row}");
    }
}

#[cfg(test)]
mod tests;
