//! `pserver soak`: a bounded load test. Starts a manager and servers as
//! processes (with a fresh cluster secret unless security flags are given),
//! runs workers in this process that push and pull random key sets of a
//! fixed key universe for the whole duration, samples every server's
//! resident memory, and fails unless there was no error and memory stayed
//! flat once the universe was stored.

use crate::bench::procs::Procs;
use crate::security::Security;
use anyhow::{Context, Result, bail};
use clap::Args;
use pserver_core::UpdaterSpec;
use pserver_node::auth::{Secret, authenticated};
use pserver_node::net::Net;
use pserver_node::worker::{TableOptions, Worker, WorkerConfig};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// `pserver soak` flags.
#[derive(Args, Debug)]
pub struct SoakArgs {
    /// How long the load runs, in seconds.
    #[arg(long, default_value_t = 180)]
    duration_s: u64,
    /// Workers pushing and pulling at once.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Server processes.
    #[arg(long, default_value_t = 2)]
    servers: usize,
    /// Distinct keys the workers draw from (the table's final size).
    #[arg(long, default_value_t = 1_000_000)]
    keys: u64,
    /// Keys per request.
    #[arg(long, default_value_t = 4096)]
    batch: usize,
    /// Most growth of a server's resident memory allowed between the end
    /// of the warm-up (the first quarter) and the end, as a fraction.
    #[arg(long, default_value_t = 0.10)]
    max_growth: f64,
}

/// What the workers did.
#[derive(Default)]
struct Counts {
    pushes: AtomicU64,
    pulls: AtomicU64,
    errors: AtomicU64,
}

/// One worker's loop: push a random key set, pull it back, check the values
/// are finite, until `stop`.
async fn work(w: Worker, seed: u64, a: Arc<SoakPlan>, c: Arc<Counts>, stop: Arc<AtomicBool>) {
    let mut x = seed;
    let mut next = move || {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    while !stop.load(Ordering::Relaxed) {
        // Keys spread over the ring: a universe index scaled to u64.
        let mut keys: Vec<u64> = (0..a.batch)
            .map(|_| (next() % a.keys).wrapping_mul(a.spread))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let grads: Vec<f32> = keys
            .iter()
            .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        w.advance();
        match w.push(&a.table, keys.clone(), grads).await {
            Ok(_) => c.pushes.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                tracing::error!(error = %e, "soak push failed");
                c.errors.fetch_add(1, Ordering::Relaxed)
            }
        };
        match w.pull(&a.table, keys).await {
            Ok(v) if v.iter().all(|x| x.is_finite()) => {
                c.pulls.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {
                tracing::error!("soak pull returned a non-finite weight");
                c.errors.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::error!(error = %e, "soak pull failed");
                c.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    w.shutdown();
}

/// The parts of the flags the workers need.
struct SoakPlan {
    table: String,
    keys: u64,
    /// Multiplier taking a universe index to a key spread over the ring.
    spread: u64,
    batch: usize,
}

/// Resident memory of process `pid` in bytes, from /proc (Linux).
fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Runs the soak test; an error (or growth) makes it fail.
pub async fn run(args: SoakArgs, sec: &Security) -> Result<()> {
    if args.duration_s == 0 || args.workers == 0 || args.servers == 0 || args.batch == 0 {
        bail!("--duration-s, --workers, --servers and --batch must be at least 1");
    }
    if args.keys < args.batch as u64 || !(0.0..10.0).contains(&args.max_growth) {
        bail!("--keys must be at least --batch, and --max-growth in 0..10");
    }
    // A cluster of its own gets a fresh secret, handed to the processes in
    // a private file; configured security is used as given.
    let dir = tempfile_dir()?;
    let (child_args, net) = if sec.has_secret {
        (sec.child_args(), sec.net.clone())
    } else {
        let text = Secret::random_text()?;
        let path = dir.join("secret");
        write_private(&path, &text)?;
        let mut a = sec.child_args();
        a.push("--secret-file".into());
        a.push(path.display().to_string());
        let secret = Secret::new(text.as_bytes(), "the soak secret")?;
        (a, authenticated(sec.net.clone(), secret))
    };
    let mut procs = Procs::new(&child_args);
    let manager = procs.start_cluster(args.servers)?;
    let servers: Vec<u32> = procs.pids().into_iter().skip(1).collect();
    let result = soak(&args, &manager, &net, &servers).await;
    let result = result.map_err(|e| procs.explain(e));
    drop(procs);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// A private temporary directory for the secret file.
fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("pserver-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Writes `text` to `path`, readable by its owner only.
fn write_private(path: &std::path::Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// The load and the sampling, against the cluster at `manager`.
async fn soak(args: &SoakArgs, manager: &str, net: &Net, servers: &[u32]) -> Result<()> {
    let config = |role: fn(String) -> WorkerConfig| WorkerConfig {
        net: net.clone(),
        ..role(manager.to_string())
    };
    let first = Worker::connect(config(WorkerConfig::new)).await?;
    let table = format!("soak-{}", std::process::id());
    first
        .create_table(
            &table,
            TableOptions::new(1, UpdaterSpec::AdaGrad { lr: 0.1, eps: 1.0 }),
        )
        .await?;
    let plan = Arc::new(SoakPlan {
        table,
        keys: args.keys,
        spread: (u64::MAX / args.keys).max(1),
        batch: args.batch,
    });
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = vec![tokio::spawn(work(
        first,
        1,
        plan.clone(),
        counts.clone(),
        stop.clone(),
    ))];
    for i in 1..args.workers {
        let w = Worker::connect(config(WorkerConfig::new)).await?;
        tasks.push(tokio::spawn(work(
            w,
            i as u64 + 1,
            plan.clone(),
            counts.clone(),
            stop.clone(),
        )));
    }
    println!(
        "soak: {} workers, {} server processes, {} keys, {} keys a request, {} s",
        args.workers, args.servers, args.keys, args.batch, args.duration_s
    );
    println!("| s | pushes | pulls | errors | server RSS MB |");
    println!("|---:|---:|---:|---:|---|");
    let start = Instant::now();
    let total = Duration::from_secs(args.duration_s);
    let warm = total / 4;
    let every = (total / 20).max(Duration::from_millis(200));
    let mut at_warm: Option<Vec<u64>> = None;
    let mut last = Vec::new();
    while start.elapsed() < total {
        tokio::time::sleep(every.min(total.saturating_sub(start.elapsed()))).await;
        let now: Vec<u64> = servers.iter().map(|&p| rss(p).unwrap_or(0)).collect();
        if at_warm.is_none() && start.elapsed() >= warm {
            at_warm = Some(now.clone());
        }
        println!(
            "| {:.0} | {} | {} | {} | {} |",
            start.elapsed().as_secs_f64(),
            counts.pushes.load(Ordering::Relaxed),
            counts.pulls.load(Ordering::Relaxed),
            counts.errors.load(Ordering::Relaxed),
            now.iter()
                .map(|b| format!("{:.1}", *b as f64 / 1e6))
                .collect::<Vec<_>>()
                .join(" / ")
        );
        last = now;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let errors = counts.errors.load(Ordering::Relaxed);
    let at_warm = at_warm.unwrap_or_else(|| last.clone());
    let growth = at_warm
        .iter()
        .zip(&last)
        .map(|(&a, &b)| {
            if a == 0 {
                0.0
            } else {
                b as f64 / a as f64 - 1.0
            }
        })
        .fold(0.0f64, f64::max);
    println!(
        "soak: {} pushes, {} pulls, {errors} errors in {:.0} s; server memory from the end of warm-up to the end: {:+.1}% at most (allowed {:+.1}%)",
        counts.pushes.load(Ordering::Relaxed),
        counts.pulls.load(Ordering::Relaxed),
        start.elapsed().as_secs_f64(),
        growth * 100.0,
        args.max_growth * 100.0
    );
    if errors > 0 {
        bail!("{errors} requests failed during the soak");
    }
    if counts.pushes.load(Ordering::Relaxed) == 0 {
        bail!("no push completed during the soak");
    }
    if growth > args.max_growth {
        bail!(
            "a server's memory grew {:.1}% after warm-up (allowed {:.1}%)",
            growth * 100.0,
            args.max_growth * 100.0
        );
    }
    println!("soak: passed (no errors, memory flat)");
    Ok(())
}
