//! `pserver bench`: push, pull and push-pull throughput and latency against
//! a cluster of separate processes, beside the loopback ceilings measured in
//! the same run (a raw TCP request and 8-byte answer between two processes,
//! and one TCP stream's throughput), as medians of several repetitions.
//!
//! A first increment of issue #5: sparse requests of chosen sizes at chosen
//! depths, one server and one worker unless joined to a cluster. Dense
//! ranges, several workers and pinning are still to come.

use anyhow::{Context, Result, bail};
use clap::Args;
use pserver_core::UpdaterSpec;
use pserver_node::worker::{Handle, Outcome, TableOptions, Worker, WorkerConfig};
use serde::Serialize;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `pserver bench` flags.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Keys per request, comma-separated (random sorted u64 keys).
    #[arg(long, value_delimiter = ',', default_value = "1,1024,65536")]
    keys: Vec<usize>,
    /// Requests in flight for 1-key requests, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    depth: Vec<usize>,
    /// How long each case runs, in ms.
    #[arg(long, default_value_t = 1000)]
    duration_ms: u64,
    /// Repetitions of each case; the table shows medians.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Join this cluster instead of starting a manager and a server.
    #[arg(long)]
    manager: Option<String>,
    /// Write every figure as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// `pserver bench-peer`: the other end of the ceiling measurements.
#[derive(Args, Debug)]
pub struct PeerArgs {}

/// One measured case (medians over repetitions).
#[derive(Clone, Debug, Serialize)]
pub struct CaseResult {
    /// push, pull or push_pull.
    pub op: String,
    /// Keys per request.
    pub keys: usize,
    /// Requests in flight.
    pub depth: usize,
    /// Requests per second.
    pub req_per_s: f64,
    /// Keys per second.
    pub keys_per_s: f64,
    /// Bytes on the wire per second, both ways (the worker's counters).
    pub wire_gb_per_s: f64,
    /// Latency percentiles, microseconds.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// p50 over the raw TCP round trip's p50 (depth 1 only).
    pub latency_vs_ceiling: Option<f64>,
}

/// The loopback ceilings of the run.
#[derive(Clone, Debug, Serialize)]
pub struct Ceilings {
    /// Raw TCP request + 8-byte answer between two processes, p50 µs.
    pub rtt_p50_us: f64,
    /// Its p99.
    pub rtt_p99_us: f64,
    /// One TCP stream between two processes, 1 MiB writes, GB/s.
    pub stream_gb_per_s: f64,
}

/// Everything `--json` writes.
#[derive(Debug, Serialize)]
struct Report {
    machine_cores: usize,
    reps: usize,
    duration_ms: u64,
    ceilings: Ceilings,
    cases: Vec<CaseResult>,
}

/// The `q` quantile (0..=1) of sorted samples, by nearest rank.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of samples (upper median for an even count).
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    quantile(&xs, 0.5)
}

/// Kills its processes when dropped.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `pserver ARGS` and returns it with its first line of output.
fn spawn(args: &[&str]) -> Result<(Child, String)> {
    let exe = std::env::current_exe().context("finding the pserver binary")?;
    let mut child = Command::new(exe)
        .args(args)
        .env("RUST_LOG", "off")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting pserver {}", args.join(" ")))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        BufReader::new(out).read_line(&mut line)?;
    }
    let line = line.trim().to_string();
    if line.is_empty() {
        bail!("pserver {} printed nothing", args.join(" "));
    }
    Ok((child, line))
}

/// The last word of a line (the address the child listens on).
fn addr_of(line: &str) -> Result<String> {
    line.rsplit(' ')
        .next()
        .map(str::to_string)
        .with_context(|| format!("no address in {line:?}"))
}

/// Runs the peer: answers each length-prefixed request with 8 bytes, and
/// after a stream (a zero-length marker) answers with the bytes it read.
pub async fn peer(_args: PeerArgs) -> Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("bench peer listening on {}", listener.local_addr()?);
    loop {
        let (mut s, _) = listener.accept().await?;
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 1 << 20];
            let mut streamed: u64 = 0;
            loop {
                let mut len = [0u8; 4];
                if s.read_exact(&mut len).await.is_err() {
                    return;
                }
                let n = u32::from_le_bytes(len) as usize;
                if n == 0 {
                    // End of a stream: report what arrived.
                    if s.write_all(&streamed.to_le_bytes()).await.is_err() {
                        return;
                    }
                    streamed = 0;
                    continue;
                }
                let mut left = n;
                while left > 0 {
                    let take = left.min(buf.len());
                    if s.read_exact(&mut buf[..take]).await.is_err() {
                        return;
                    }
                    left -= take;
                }
                if n > 64 {
                    streamed += n as u64;
                } else if s.write_all(&[0u8; 8]).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Measures the ceilings against a peer process at `addr`.
async fn ceilings(addr: &str, duration: Duration) -> Result<Ceilings> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    // Round trips: 16-byte request, 8-byte answer.
    let mut samples = Vec::new();
    let mut msg = Vec::from(16u32.to_le_bytes());
    msg.extend_from_slice(&[1u8; 16]);
    let mut ack = [0u8; 8];
    let end = Instant::now() + duration;
    while Instant::now() < end {
        let t = Instant::now();
        s.write_all(&msg).await?;
        s.read_exact(&mut ack).await?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    // One stream of 1 MiB writes, then a marker; the peer says what it read.
    let chunk = vec![7u8; 1 << 20];
    let len = (chunk.len() as u32).to_le_bytes();
    let t = Instant::now();
    let end = t + duration;
    while Instant::now() < end {
        s.write_all(&len).await?;
        s.write_all(&chunk).await?;
    }
    s.write_all(&0u32.to_le_bytes()).await?;
    let mut got = [0u8; 8];
    s.read_exact(&mut got).await?;
    let secs = t.elapsed().as_secs_f64();
    Ok(Ceilings {
        rtt_p50_us: quantile(&samples, 0.5),
        rtt_p99_us: quantile(&samples, 0.99),
        stream_gb_per_s: u64::from_le_bytes(got) as f64 / secs / 1e9,
    })
}

/// A pool of random sorted key lists of `n` keys (seeded: runs compare).
fn key_pool(n: usize, lists: usize, seed: u64) -> Vec<Vec<u64>> {
    let mut x = seed;
    let mut next = move || {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % (u64::MAX - 1)
    };
    (0..lists)
        .map(|_| {
            let mut k: Vec<u64> = (0..n).map(|_| next()).collect();
            k.sort_unstable();
            k.dedup();
            k
        })
        .collect()
}

/// What one repetition of a case measured.
struct Rep {
    requests: u64,
    keys: u64,
    wire_bytes: u64,
    seconds: f64,
    /// Latencies, µs, sorted.
    latencies: Vec<f64>,
}

/// One repetition of one case: requests of `keys` keys, `depth` in flight,
/// for `duration`.
async fn run_case(
    w: &Worker,
    table: &str,
    op: &str,
    pool: &[Vec<u64>],
    depth: usize,
    duration: Duration,
) -> Result<Rep> {
    let t = w.traffic();
    let bytes0 = t.bytes_sent.load(Ordering::Relaxed) + t.bytes_received.load(Ordering::Relaxed);
    let start = Instant::now();
    let end = start + duration;
    let mut in_flight: std::collections::VecDeque<(Instant, usize, Handle<Outcome>)> =
        std::collections::VecDeque::new();
    let (mut reqs, mut keys, mut lat) = (0u64, 0u64, Vec::new());
    let mut i = 0usize;
    loop {
        while in_flight.len() < depth && Instant::now() < end {
            let k = pool[i % pool.len()].clone();
            i += 1;
            let n = k.len();
            let vals = vec![1.0f32; n];
            w.advance();
            let req = pserver_node::worker::Request {
                table: table.to_string(),
                op: match op {
                    "push" => pserver_node::worker::Op::Push,
                    "pull" => pserver_node::worker::Op::Pull,
                    _ => pserver_node::worker::Op::PushPull,
                },
                keys: pserver_node::worker::Keys::List(k),
                vals: if op == "pull" { Vec::new() } else { vals },
                clock: None,
                consistency: None,
            };
            in_flight.push_back((Instant::now(), n, w.send(req)));
        }
        let Some((t0, n, h)) = in_flight.pop_front() else {
            break;
        };
        h.await.with_context(|| format!("{op} of {n} keys"))?;
        lat.push(t0.elapsed().as_secs_f64() * 1e6);
        reqs += 1;
        keys += n as u64;
    }
    let seconds = start.elapsed().as_secs_f64();
    let bytes1 = t.bytes_sent.load(Ordering::Relaxed) + t.bytes_received.load(Ordering::Relaxed);
    lat.sort_by(f64::total_cmp);
    Ok(Rep {
        requests: reqs,
        keys,
        wire_bytes: bytes1 - bytes0,
        seconds,
        latencies: lat,
    })
}

/// Runs the benchmark and prints the table.
pub async fn run(args: BenchArgs) -> Result<()> {
    if args.reps == 0 || args.keys.is_empty() || args.duration_ms == 0 {
        bail!("--reps, --keys and --duration-ms must not be empty or zero");
    }
    if args.keys.iter().any(|&k| k == 0 || k > 1 << 22) || args.depth.contains(&0) {
        bail!("--keys must be in 1..=4194304 and --depth at least 1");
    }
    let duration = Duration::from_millis(args.duration_ms);
    let mut procs = Procs(Vec::new());
    let (peer, line) = spawn(&["bench-peer"])?;
    procs.0.push(peer);
    let peer_addr = addr_of(&line)?;
    let manager = match &args.manager {
        Some(m) => m.clone(),
        None => {
            let (m, line) = spawn(&["manager", "--listen", "127.0.0.1:0"])?;
            procs.0.push(m);
            let addr = addr_of(&line)?;
            let (s, _) = spawn(&["server", "--manager", &addr])?;
            procs.0.push(s);
            addr
        }
    };
    let w = Worker::connect(WorkerConfig::client(manager.clone()))
        .await
        .with_context(|| format!("connecting to {manager}"))?;
    let table = format!("bench-{}", std::process::id());
    w.create_table(&table, TableOptions::new(1, UpdaterSpec::Assign))
        .await?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "bench: 1 worker (this process), {} to {manager}; {} ms per case, medians of {} runs, {cores} cores",
        if args.manager.is_some() {
            "existing cluster"
        } else {
            "1 server process"
        },
        args.duration_ms,
        args.reps
    );
    let mut ceil = Vec::new();
    for _ in 0..args.reps {
        ceil.push(ceilings(&peer_addr, duration).await?);
    }
    let ceilings = Ceilings {
        rtt_p50_us: median(ceil.iter().map(|c| c.rtt_p50_us).collect()),
        rtt_p99_us: median(ceil.iter().map(|c| c.rtt_p99_us).collect()),
        stream_gb_per_s: median(ceil.iter().map(|c| c.stream_gb_per_s).collect()),
    };
    println!(
        "ceilings: TCP request + 8-byte answer p50 {:.1} us, p99 {:.1} us; one stream {:.2} GB/s",
        ceilings.rtt_p50_us, ceilings.rtt_p99_us, ceilings.stream_gb_per_s
    );
    println!(
        "| request | keys | depth | req/s | keys/s | wire GB/s | p50 us | p99 us | p999 us | p50 / TCP p50 |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut cases = Vec::new();
    for &n in &args.keys {
        let pool = key_pool(n, if n > 65536 { 4 } else { 64 }, n as u64);
        let depths: Vec<usize> = if n == 1 { args.depth.clone() } else { vec![1] };
        for op in ["push", "pull", "push_pull"] {
            for &depth in &depths {
                let mut reps = Vec::new();
                for _ in 0..args.reps {
                    reps.push(run_case(&w, &table, op, &pool, depth, duration).await?);
                }
                let med = |f: &dyn Fn(&Rep) -> f64| median(reps.iter().map(f).collect());
                let q = |qq: f64| med(&|r| quantile(&r.latencies, qq));
                let c = CaseResult {
                    op: op.to_string(),
                    keys: n,
                    depth,
                    req_per_s: med(&|r| r.requests as f64 / r.seconds),
                    keys_per_s: med(&|r| r.keys as f64 / r.seconds),
                    wire_gb_per_s: med(&|r| r.wire_bytes as f64 / r.seconds / 1e9),
                    p50_us: q(0.5),
                    p99_us: q(0.99),
                    p999_us: q(0.999),
                    latency_vs_ceiling: None,
                };
                let c = CaseResult {
                    latency_vs_ceiling: (depth == 1).then(|| c.p50_us / ceilings.rtt_p50_us),
                    ..c
                };
                println!(
                    "| {} | {} | {} | {:.0} | {:.3}M | {:.3} | {:.1} | {:.1} | {:.1} | {} |",
                    c.op,
                    c.keys,
                    c.depth,
                    c.req_per_s,
                    c.keys_per_s / 1e6,
                    c.wire_gb_per_s,
                    c.p50_us,
                    c.p99_us,
                    c.p999_us,
                    c.latency_vs_ceiling
                        .map_or("-".to_string(), |r| format!("{r:.2}x"))
                );
                cases.push(c);
            }
        }
    }
    if let Some(path) = &args.json {
        let report = Report {
            machine_cores: cores,
            reps: args.reps,
            duration_ms: args.duration_ms,
            ceilings,
            cases,
        };
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("report written to {}", path.display());
    }
    w.shutdown();
    drop(procs);
    Ok(())
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
        assert!(quantile(&[], 0.5).is_nan());
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.0);
    }

    #[test]
    fn key_lists_are_sorted_unique_and_repeatable() {
        let a = key_pool(1000, 3, 9);
        assert_eq!(a, key_pool(1000, 3, 9));
        for k in &a {
            assert!(k.windows(2).all(|w| w[0] < w[1]));
            assert!(k.len() > 990);
            assert!(k.iter().all(|&x| x < u64::MAX));
        }
    }
}
