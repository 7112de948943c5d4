//! `pserver experiment failover`: how long a range is unavailable when its
//! server dies, and whether any acknowledged push was lost or doubled.
//!
//! Each run starts a manager and servers as separate `pserver` processes on
//! loopback, then from this process: clients push +1 to keys spread over
//! the ring in a loop, and a probe pushes +1 to one key of the victim's
//! range in a loop. The victim is killed with SIGKILL (its connections drop,
//! so the manager notices at once) or frozen with SIGSTOP (its sockets stay
//! open: only the lease finds it). The figures: time from the signal to the
//! manager's new map, and to the first acknowledged push on the victim's
//! range; then every key is pulled and compared with the pushes acknowledged.
//!
//! With `--pipelined N` it measures something else, in `pipelined.rs`:
//! whether pushes kept `N` in flight are applied exactly once through a
//! SIGKILL, a join, a drain, and a join with a drain at its switch.

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use pserver_core::UpdaterSpec;
use pserver_node::worker::{TableOptions, Worker, WorkerConfig};
use serde::Serialize;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How the victim is taken down.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Signal {
    /// SIGKILL: the process is gone and the kernel closes its sockets.
    Kill,
    /// SIGSTOP: the process freezes with its sockets open, like a machine
    /// cut off the network; only the lease detects it.
    Stop,
}

/// `pserver experiment failover` flags.
#[derive(Args, Debug)]
pub struct FailoverArgs {
    /// Server processes.
    #[arg(long, default_value_t = 3)]
    pub(crate) servers: usize,
    /// Replicas per range (at least 1: without a replica a dead server's
    /// data is gone).
    #[arg(long, default_value_t = 1)]
    pub(crate) replicas: usize,
    /// The manager's lease, in ms.
    #[arg(long, default_value_t = 2000)]
    pub(crate) lease_ms: u64,
    /// How the victim is taken down.
    #[arg(long, value_enum, default_value = "kill")]
    signal: Signal,
    /// Runs; the summary shows medians (default 3; with `--pipelined`, 1
    /// per event).
    #[arg(long)]
    runs: Option<usize>,
    /// Client loops pushing to every key.
    #[arg(long, default_value_t = 2)]
    clients: usize,
    /// Keys each client pushes to (default 256; with `--pipelined`, 64).
    #[arg(long)]
    keys: Option<u64>,
    /// Write every run as JSON.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Instead of timing recovery: keep N pushes in flight per worker (push
    /// k at clock k, +1 to every key) through each of `--events`, and count
    /// per key the acknowledged pushes lost or applied twice.
    #[arg(long, value_name = "N")]
    pipelined: Option<usize>,
    /// With `--pipelined`: workers, each keeping N pushes in flight.
    #[arg(long, default_value_t = 1)]
    pub(crate) workers: usize,
    /// With `--pipelined`: the map changes to go through, each on a fresh
    /// cluster (kill: SIGKILL a server; join: start one more; drain:
    /// `pserver drain` one).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "kill,join,drain,join-drain"
    )]
    pub(crate) events: Vec<super::pipelined::Event>,
    /// With `--pipelined`: ms of load before each event.
    #[arg(long, default_value_t = 1500)]
    pub(crate) before_ms: u64,
    /// With `--pipelined`: ms of load after each event has completed.
    #[arg(long, default_value_t = 3000)]
    pub(crate) after_ms: u64,
}

impl FailoverArgs {
    /// Keys pushed to (`--keys`, or its default for the mode).
    pub(crate) fn key_count(&self) -> u64 {
        self.keys
            .unwrap_or(if self.pipelined.is_some() { 64 } else { 256 })
    }

    /// Runs (`--runs`, or `default`).
    pub(crate) fn run_count(&self, default: usize) -> usize {
        self.runs.unwrap_or(default)
    }
}

/// One run's figures.
#[derive(Clone, Debug, Serialize)]
struct Run {
    run: usize,
    /// Signal to the manager's map without the victim as a primary.
    detected_ms: f64,
    /// Signal to the first push acknowledged on the victim's range.
    recovered_ms: f64,
    /// `recovered_ms` less `detected_ms`: how long the new primary took.
    after_detection_ms: f64,
    /// `recovered_ms` less the lease (negative: recovered within the lease).
    past_lease_ms: f64,
    /// Pushes acknowledged, all clients and the probe.
    acked: u64,
    /// Keys whose value differs from the pushes acknowledged to them.
    wrong_keys: usize,
}

/// Kills every process it holds when dropped, pass or fail.
pub(crate) struct Procs(pub(crate) Vec<(Child, String)>);

impl Drop for Procs {
    fn drop(&mut self) {
        for (c, _) in &mut self.0 {
            signal(c.id(), "-CONT");
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends a signal by name with the system's `kill` (std has only SIGKILL).
fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Waits (up to a second) until Linux reports process `pid` stopped, so
/// that no push sent afterwards can be answered by it.
fn wait_stopped(pid: u32) {
    let path = format!("/proc/{pid}/stat");
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        let Ok(stat) = std::fs::read_to_string(&path) else {
            return;
        };
        // The state follows the parenthesised command name.
        if stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('T'))
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Starts `pserver ARGS` and returns it with its first line of output.
/// Its log is off unless `PSERVER_CHILD_LOG` sets the filter (as for the
/// bench's children): then its stderr is kept in the temporary directory
/// as `pserver-failover-PID-ROLE-CHILD.log` (CHILD: the child's pid), to
/// trace a failed run afterwards.
pub(crate) fn spawn(args: &[&str]) -> Result<(Child, String)> {
    let exe = std::env::current_exe().context("finding the pserver binary")?;
    let role = args.first().copied().unwrap_or("pserver");
    let name = |child: &str| {
        std::env::temp_dir().join(format!(
            "pserver-failover-{}-{role}-{child}.log",
            std::process::id()
        ))
    };
    let mut cmd = Command::new(exe);
    cmd.args(args).stdout(Stdio::piped());
    // Named for the child once it has a pid; until then for the moment.
    let starting = name(&format!(
        "starting-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let logged = crate::bench::procs::child_log();
    match &logged {
        Some(filter) => {
            let file = std::fs::File::create(&starting)
                .with_context(|| format!("creating {}", starting.display()))?;
            cmd.env("RUST_LOG", filter).stderr(file);
        }
        None => {
            cmd.env("RUST_LOG", "off").stderr(Stdio::null());
        }
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting pserver {}", args.join(" ")))?;
    if logged.is_some() {
        let log = name(&child.id().to_string());
        // Not fatal (the child runs): the log then keeps its first name.
        let _ = std::fs::rename(&starting, &log);
    }
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        BufReader::new(out).read_line(&mut line)?;
    }
    if line.is_empty() {
        bail!("pserver {} printed nothing", args.join(" "));
    }
    Ok((child, line.trim().to_string()))
}

/// Pushes +1 to `keys` until `stop`; returns the pushes acknowledged and
/// when the first push sent at or after `since` (once set) was acknowledged.
async fn push_loop(
    w: Worker,
    keys: Vec<u64>,
    stop: Arc<AtomicBool>,
    since: Arc<std::sync::Mutex<Option<Instant>>>,
) -> (u64, Option<Instant>) {
    let mut acked = 0;
    let mut first_after = None;
    while !stop.load(Ordering::Relaxed) {
        w.advance();
        let start = Instant::now();
        if w.push("failover", keys.clone(), vec![1.0; keys.len()])
            .await
            .is_ok()
        {
            acked += 1;
            // Only a push sent after the signal shows the range is back: one
            // already in flight may have been answered by the victim itself.
            let at = *since.lock().unwrap_or_else(|e| e.into_inner());
            if first_after.is_none() && at.is_some_and(|t| start >= t) {
                first_after = Some(Instant::now());
            }
        }
    }
    (acked, first_after)
}

async fn one_run(args: &FailoverArgs, run: usize) -> Result<Run> {
    let (lease, replicas) = (args.lease_ms.to_string(), args.replicas.to_string());
    let (m, line) = spawn(&[
        "manager",
        "--listen",
        "127.0.0.1:0",
        "--replicas",
        &replicas,
        "--lease-ms",
        &lease,
    ])?;
    let manager = line
        .rsplit(' ')
        .next()
        .context("the manager printed no address")?
        .to_string();
    let mut procs = Procs(vec![(m, line)]);
    for _ in 0..args.servers {
        procs.0.push(spawn(&["server", "--manager", &manager])?);
    }
    let client = || async {
        let mut cfg = WorkerConfig::client(manager.clone());
        cfg.timeout = Duration::from_secs(60);
        Worker::connect(cfg).await
    };
    let setup = client().await?;
    setup
        .create_table("failover", TableOptions::new(1, UpdaterSpec::Add))
        .await?;
    let n = args.key_count();
    let step = u64::MAX / (n + 2);
    let keys: Vec<u64> = (1..=n).map(|i| i * step).collect();
    let probe_key = keys[0] + 1;
    let map = setup.refresh().await?;
    let victim = map.partitions[map.partition_of(probe_key).context("no partition")?].primary;

    let stop = Arc::new(AtomicBool::new(false));
    let since = Arc::new(std::sync::Mutex::new(None));
    let mut loops = Vec::new();
    for _ in 0..args.clients {
        let w = client().await?;
        loops.push(tokio::spawn(push_loop(
            w,
            keys.clone(),
            stop.clone(),
            Arc::new(std::sync::Mutex::new(None)),
        )));
    }
    let probe = tokio::spawn(push_loop(
        client().await?,
        vec![probe_key],
        stop.clone(),
        since.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (child, _) = procs
        .0
        .iter_mut()
        .find(|(_, l)| l.starts_with(&format!("server {victim} ")))
        .context("the victim's process")?;
    let at = Instant::now();
    match args.signal {
        Signal::Kill => {
            child.kill()?;
            child.wait()?;
        }
        Signal::Stop => {
            signal(child.id(), "-STOP");
            wait_stopped(child.id());
        }
    }
    // Pushes sent from now on cannot be answered by the victim.
    *since.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    let limit = Duration::from_millis(args.lease_ms) + Duration::from_secs(30);
    let detected = loop {
        let map = setup.refresh().await?;
        if map.partitions.iter().all(|p| p.primary != victim) {
            break at.elapsed();
        }
        if at.elapsed() > limit {
            bail!("the victim was not declared dead within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // Go on well past the failover, so that new replicas are filled under load.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = 0;
    for l in loops {
        acked += l.await?.0;
    }
    let (probe_acked, first) = probe.await?;
    let recovered = first
        .map(|t| t - at)
        .context("no push on the victim's range succeeded")?;

    let got = setup.pull("failover", keys.clone()).await?;
    let mut wrong = got.iter().filter(|&&v| v != acked as f32).count();
    if setup.pull("failover", vec![probe_key]).await? != [probe_acked as f32] {
        wrong += 1;
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok(Run {
        run,
        detected_ms: ms(detected),
        recovered_ms: ms(recovered),
        after_detection_ms: ms(recovered) - ms(detected),
        past_lease_ms: ms(recovered) - args.lease_ms as f64,
        acked: acked + probe_acked,
        wrong_keys: wrong,
    })
}

/// Runs the experiment and prints one line per run and the medians.
pub async fn run(args: FailoverArgs) -> Result<()> {
    if args.replicas == 0 || args.replicas >= args.servers {
        bail!(
            "--replicas must be at least 1 and below --servers ({} servers, {} replicas)",
            args.servers,
            args.replicas
        );
    }
    if args.run_count(1) == 0 || args.clients == 0 || args.key_count() == 0 {
        bail!("--runs, --clients and --keys must be at least 1");
    }
    if let Some(depth) = args.pipelined {
        return super::pipelined::run(&args, depth).await;
    }
    println!(
        "failover experiment: {} server processes, {} replica(s), lease {} ms, SIG{}, {} clients x {} keys + a probe",
        args.servers,
        args.replicas,
        args.lease_ms,
        match args.signal {
            Signal::Kill => "KILL",
            Signal::Stop => "STOP",
        },
        args.clients,
        args.key_count()
    );
    println!(
        "| run | declared dead after | first push on its range after | of which after detection | vs the lease | pushes acked | keys wrong |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut runs = Vec::new();
    for i in 1..=args.run_count(3) {
        let r = one_run(&args, i)
            .await
            .with_context(|| format!("failover run {i}"))?;
        println!(
            "| {} | {:.0} ms | {:.0} ms | {:.0} ms | {:+.0} ms | {} | {} |",
            r.run,
            r.detected_ms,
            r.recovered_ms,
            r.after_detection_ms,
            r.past_lease_ms,
            r.acked,
            r.wrong_keys
        );
        runs.push(r);
    }
    let med = |f: fn(&Run) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "median: declared dead after {:.0} ms, first push on its range after {:.0} ms ({:.0} ms after detection, {:+.0} ms vs the lease); keys wrong in all runs: {}",
        med(|r| r.detected_ms),
        med(|r| r.recovered_ms),
        med(|r| r.after_detection_ms),
        med(|r| r.past_lease_ms),
        runs.iter().map(|r| r.wrong_keys).sum::<usize>()
    );
    if let Some(path) = &args.json {
        let body = serde_json::to_string_pretty(&runs)?;
        std::fs::write(path, body).with_context(|| format!("writing {}", path.display()))?;
    }
    if runs.iter().any(|r| r.wrong_keys > 0) {
        bail!("acknowledged pushes were lost or applied twice");
    }
    Ok(())
}
