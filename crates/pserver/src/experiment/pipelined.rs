//! `pserver experiment failover --pipelined N`: is every acknowledged push
//! applied exactly once when pushes are pipelined across a map change?
//!
//! For each event (`kill`: SIGKILL a server process; `join`: start one more
//! server process, so ranges hand off live; `drain`: `pserver drain` a
//! server) a fresh cluster of processes is started on loopback, and from
//! this process `--workers` workers each keep `N` pushes in flight (push `k`
//! at clock `k`), every push adding +1 to every key of an `add` table. The
//! load runs for `--before-ms` before the event, through it, and for
//! `--after-ms` after it has completed. Then every key is pulled and
//! compared with the pushes acknowledged to it: equal (applied once), below
//! (lost), or above the pushes acknowledged plus those that failed
//! (doubled; a failed push may have been applied, so only what goes beyond
//! counts). The experiment reports; it does not judge (its exit code is 0
//! whatever it finds): `crates/pserver/tests/exactly_once.rs` asserts.

use super::failover::{FailoverArgs, Procs, spawn};
use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use pserver_core::{NodeState, UpdaterSpec};
use pserver_node::worker::{Keys, Op, Request, TableOptions, Worker, WorkerConfig};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// The table every run pushes to.
const TABLE: &str = "exactly";

/// Most distinct error messages kept per worker (the rest are counted
/// together as "(other messages)").
const MAX_MESSAGES: usize = 16;

/// Most clocks of failed pushes kept per run.
const MAX_FAILED_CLOCKS: usize = 64;

/// How long one request may take, retries included.
const PUSH_TIMEOUT: Duration = Duration::from_secs(20);

/// How long an event may take to complete (the map to show it).
const EVENT_LIMIT: Duration = Duration::from_secs(30);

/// A map change made while the load runs.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Event {
    /// SIGKILL the server that is primary of the first key.
    Kill,
    /// Start one more server process: ranges hand off to it live.
    Join,
    /// `pserver drain` the server that is primary of the first key.
    Drain,
    /// Start one more server and, while its hand-off runs, drain the
    /// primary of the first key: both land in one switch of the map, so
    /// the drained server may sit in the middle of a moving range's old
    /// chain when it is retired.
    #[serde(rename = "join-drain")]
    JoinDrain,
}

impl Event {
    fn name(self) -> &'static str {
        match self {
            Event::Kill => "kill",
            Event::Join => "join",
            Event::Drain => "drain",
            Event::JoinDrain => "join-drain",
        }
    }
}

/// One key's figures.
#[derive(Clone, Debug, Serialize)]
struct KeyFigures {
    key: u64,
    /// Pushes to it acknowledged OK.
    acked: u64,
    /// Pushes to it that failed.
    errored: u64,
    /// Its value at the end.
    value: f64,
    /// `value - acked`: 0 when every acknowledged push was applied once.
    deficit: i64,
}

/// An error message and how many pushes got it. Messages that differ only
/// in their numbers (clocks, addresses, ranges) count as one.
#[derive(Clone, Debug, Serialize)]
struct Message {
    /// The message with every run of digits as `#`.
    pattern: String,
    /// The first message of the pattern, as the worker got it.
    example: String,
    count: u64,
}

/// `message` with every run of digits replaced by `#`.
fn pattern(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut in_digits = false;
    for c in message.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('#');
            }
            in_digits = true;
        } else {
            out.push(c);
            in_digits = false;
        }
    }
    out
}

/// One event's run.
#[derive(Clone, Debug, Serialize)]
struct EventRun {
    event: Event,
    run: usize,
    /// The node the event was about (the killed, joined or drained server).
    node: u32,
    /// From the event's start until the map showed it complete.
    event_ms: f64,
    /// Pushes sent, all workers.
    pushes: u64,
    /// Pushes whose handle returned Ok.
    acked: u64,
    /// Pushes whose handle returned an error.
    errored: u64,
    /// Keys the acknowledged pushes said were applied.
    applied_keys: u64,
    /// Keys the acknowledged pushes said were already applied (retries).
    duplicate_keys: u64,
    /// Slices the workers resent.
    retries: u64,
    /// Keys whose value equals the pushes acknowledged to them.
    applied_once_keys: usize,
    /// Keys below the pushes acknowledged.
    lost_keys: usize,
    /// Sum of those keys' deficits.
    lost: u64,
    /// Keys above the pushes acknowledged plus the pushes that failed.
    doubled_keys: usize,
    /// Sum of the excess beyond acknowledged plus failed.
    doubled: u64,
    /// Sum over keys of how much of their failed pushes was applied anyway
    /// (`value - acked`, capped at the failed pushes; lost pushes hide in it).
    errored_but_applied: u64,
    /// The errors the workers got, most frequent first.
    errors: Vec<Message>,
    /// Pushes that failed with a clock sent before the event began: the
    /// workers' own arrival changes the map too.
    errored_before_event: u64,
    /// Per worker, the last clock sent when the event began.
    event_clocks: Vec<u64>,
    /// Clocks of failed pushes (the first few), per worker.
    failed_clocks: Vec<Vec<u64>>,
    /// Every key.
    per_key: Vec<KeyFigures>,
}

/// The JSON written by `--json`.
#[derive(Debug, Serialize)]
struct Report {
    servers: usize,
    replicas: usize,
    lease_ms: u64,
    workers: usize,
    pipelined: usize,
    keys: u64,
    before_ms: u64,
    after_ms: u64,
    runs: Vec<EventRun>,
}

/// What one worker's loop saw.
#[derive(Default)]
struct Tally {
    pushes: u64,
    acked: u64,
    errored: u64,
    applied_keys: u64,
    duplicate_keys: u64,
    /// Pattern -> (first message, count).
    errors: BTreeMap<String, (String, u64)>,
    failed_clocks: Vec<u64>,
}

/// Keeps `depth` pushes in flight, push `k` at clock `k`, each adding +1 to
/// every key, until `stop`; then waits for the ones in flight.
/// `sent` follows the last clock sent.
async fn pipeline(
    w: Worker,
    keys: Arc<Vec<u64>>,
    depth: usize,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> Tally {
    let mut t = Tally::default();
    let mut inflight = JoinSet::new();
    let mut clock = 0u64;
    loop {
        while !stop.load(Ordering::Relaxed) && inflight.len() < depth {
            clock += 1;
            // Sent in call order: the worker makes pushes leave in it.
            let h = w.send(Request {
                table: TABLE.into(),
                op: Op::Push,
                keys: Keys::List(keys.to_vec()),
                vals: vec![1.0; keys.len()],
                clock: Some(clock),
                consistency: None,
            });
            t.pushes += 1;
            sent.store(clock, Ordering::Relaxed);
            inflight.spawn(async move { (clock, h.await) });
        }
        let Some(done) = inflight.join_next().await else {
            break;
        };
        let (c, result) = match done {
            Ok((c, r)) => (c, r.map_err(|e| e.to_string())),
            Err(e) => (0, Err(format!("the push's task failed: {e}"))),
        };
        match result {
            Ok(o) => {
                t.acked += 1;
                t.applied_keys += o.applied;
                t.duplicate_keys += o.duplicate;
            }
            Err(message) => {
                t.errored += 1;
                t.failed_clocks.push(c);
                let mut key = pattern(&message);
                if t.errors.len() >= MAX_MESSAGES && !t.errors.contains_key(&key) {
                    key = "(other messages)".to_string();
                }
                t.errors.entry(key).or_insert((message, 0)).1 += 1;
            }
        }
    }
    t.failed_clocks.sort_unstable();
    t
}

/// The server process whose first line names node `id`.
fn process_of(procs: &mut Procs, id: u32) -> Result<&mut std::process::Child> {
    procs
        .0
        .iter_mut()
        .find(|(_, l)| l.starts_with(&format!("server {id} ")))
        .map(|(c, _)| c)
        .with_context(|| format!("no process for server {id}"))
}

/// Makes the event happen and waits until the map shows it complete;
/// returns the node it was about.
async fn make(
    event: Event,
    procs: &mut Procs,
    manager: &str,
    setup: &Worker,
    first_key: u64,
    replicas: usize,
) -> Result<u32> {
    let map = setup.refresh().await?;
    let holder = map.partitions[map.partition_of(first_key).context("no partition")?].primary;
    let start = Instant::now();
    let waited = || {
        if start.elapsed() > EVENT_LIMIT {
            bail!("the {} did not complete in {EVENT_LIMIT:?}", event.name());
        }
        Ok(())
    };
    match event {
        Event::Kill => {
            let child = process_of(procs, holder)?;
            child.kill()?; // SIGKILL
            child.wait()?;
            while setup
                .refresh()
                .await?
                .partitions
                .iter()
                .any(|p| p.primary == holder)
            {
                waited()?;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(holder)
        }
        Event::Join => {
            let id = join(procs, manager)?;
            joined(setup, id, replicas, waited).await?;
            Ok(id)
        }
        Event::Drain => {
            drain(procs, manager, setup, holder, waited).await?;
            Ok(holder)
        }
        Event::JoinDrain => {
            let id = join(procs, manager)?;
            drain(procs, manager, setup, holder, waited).await?;
            joined(setup, id, replicas, waited).await?;
            Ok(holder)
        }
    }
}

/// Starts one more server process; returns its id.
fn join(procs: &mut Procs, manager: &str) -> Result<u32> {
    let (child, line) = spawn(&["server", "--manager", manager])?;
    let id: u32 = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no server id in {line:?}"))?;
    procs.0.push((child, line));
    Ok(id)
}

/// Waits until server `id` is primary of some range and no hand-off is
/// left: a range being handed off has its future chain appended to its
/// replicas.
async fn joined(
    setup: &Worker,
    id: u32,
    replicas: usize,
    waited: impl Fn() -> Result<()>,
) -> Result<()> {
    loop {
        let map = setup.refresh().await?;
        let settled = map.partitions.iter().all(|p| p.replicas.len() <= replicas);
        if settled && map.partitions.iter().any(|p| p.primary == id) {
            return Ok(());
        }
        waited()?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `pserver drain`s server `holder` and waits until it has exited and the
/// map says it is dead.
async fn drain(
    procs: &mut Procs,
    manager: &str,
    setup: &Worker,
    holder: u32,
    waited: impl Fn() -> Result<()>,
) -> Result<()> {
    let exe = std::env::current_exe().context("finding the pserver binary")?;
    let args = [
        "drain".to_string(),
        "--manager".to_string(),
        manager.to_string(),
        holder.to_string(),
        "--timeout-s".to_string(),
        EVENT_LIMIT.as_secs().to_string(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(exe)
            .args(args)
            .env("RUST_LOG", "off")
            .output()
    })
    .await
    .context("the drain's thread")?
    .context("running pserver drain")?;
    if !out.status.success() {
        bail!(
            "pserver drain {holder} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // The drained server exits by itself once retired.
    let child = process_of(procs, holder)?;
    while child.try_wait()?.is_none() {
        waited()?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let map = setup.refresh().await?;
    if map.node(holder).is_some_and(|n| n.state != NodeState::Dead) {
        bail!("server {holder} exited but is not dead in the map");
    }
    Ok(())
}

/// One event on a fresh cluster.
async fn one(args: &FailoverArgs, depth: usize, event: Event, run: usize) -> Result<EventRun> {
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
    let connect = |cfg: WorkerConfig| async move {
        let cfg = WorkerConfig {
            timeout: PUSH_TIMEOUT,
            ..cfg
        };
        Worker::connect(cfg).await
    };
    let setup = connect(WorkerConfig::client(manager.clone())).await?;
    setup
        .create_table(TABLE, TableOptions::new(1, UpdaterSpec::Add))
        .await?;
    let n = args.key_count();
    let step = u64::MAX / (n + 2);
    let keys: Arc<Vec<u64>> = Arc::new((1..=n).map(|i| i * step).collect());

    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..args.workers {
        workers.push(connect(WorkerConfig::new(manager.clone())).await?);
    }
    let sent: Vec<Arc<AtomicU64>> = workers.iter().map(|_| Arc::default()).collect();
    let loops: Vec<_> = workers
        .iter()
        .zip(&sent)
        .map(|(w, s)| {
            let (keys, stop, s) = (keys.clone(), stop.clone(), s.clone());
            tokio::spawn(pipeline(w.clone(), keys, depth, stop, s))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(args.before_ms)).await;
    let event_clocks: Vec<u64> = sent.iter().map(|s| s.load(Ordering::Relaxed)).collect();
    let at = Instant::now();
    let made = make(event, &mut procs, &manager, &setup, keys[0], args.replicas).await;
    let event_ms = at.elapsed().as_secs_f64() * 1e3;
    if made.is_ok() {
        tokio::time::sleep(Duration::from_millis(args.after_ms)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut tallies = Vec::new();
    for l in loops {
        tallies.push(l.await.context("a worker's loop")?);
    }
    let node = made?;
    // Whatever a failed push left in flight has landed by now.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let values = setup
        .pull(TABLE, keys.to_vec())
        .await
        .context("pulling every key")?;
    let retries = workers
        .iter()
        .map(|w| w.traffic().retries.load(Ordering::Relaxed))
        .sum();
    for w in &workers {
        w.shutdown();
    }

    let acked: u64 = tallies.iter().map(|t| t.acked).sum();
    let errored: u64 = tallies.iter().map(|t| t.errored).sum();
    let mut messages: BTreeMap<String, (String, u64)> = BTreeMap::new();
    for t in &tallies {
        for (p, (example, c)) in &t.errors {
            messages.entry(p.clone()).or_insert((example.clone(), 0)).1 += c;
        }
    }
    let mut errors: Vec<Message> = messages
        .into_iter()
        .map(|(pattern, (example, count))| Message {
            pattern,
            example,
            count,
        })
        .collect();
    errors.sort_by_key(|m| std::cmp::Reverse(m.count));
    // Every push carries every key: each key's figures are the totals.
    let per_key: Vec<KeyFigures> = keys
        .iter()
        .zip(&values)
        .map(|(&key, &v)| KeyFigures {
            key,
            acked,
            errored,
            value: f64::from(v),
            deficit: v as i64 - acked as i64,
        })
        .collect();
    let below = |k: &&KeyFigures| k.value < k.acked as f64;
    let above = |k: &&KeyFigures| k.value > (k.acked + k.errored) as f64;
    Ok(EventRun {
        event,
        run,
        node,
        event_ms,
        pushes: tallies.iter().map(|t| t.pushes).sum(),
        acked,
        errored,
        applied_keys: tallies.iter().map(|t| t.applied_keys).sum(),
        duplicate_keys: tallies.iter().map(|t| t.duplicate_keys).sum(),
        retries,
        applied_once_keys: per_key.iter().filter(|k| k.deficit == 0).count(),
        lost_keys: per_key.iter().filter(below).count(),
        lost: per_key
            .iter()
            .filter(below)
            .map(|k| k.deficit.unsigned_abs())
            .sum(),
        doubled_keys: per_key.iter().filter(above).count(),
        doubled: per_key
            .iter()
            .filter(above)
            .map(|k| k.deficit.unsigned_abs() - k.errored)
            .sum(),
        errored_but_applied: per_key
            .iter()
            .map(|k| k.deficit.clamp(0, k.errored as i64) as u64)
            .sum(),
        errors,
        errored_before_event: tallies
            .iter()
            .zip(&event_clocks)
            .map(|(t, &e)| t.failed_clocks.iter().filter(|&&c| c <= e).count() as u64)
            .sum(),
        event_clocks,
        failed_clocks: tallies
            .into_iter()
            .map(|mut t| {
                t.failed_clocks.truncate(MAX_FAILED_CLOCKS);
                t.failed_clocks
            })
            .collect(),
        per_key,
    })
}

/// `pserver experiment failover --pipelined N`: runs every event, prints a
/// table, writes the JSON.
pub async fn run(args: &FailoverArgs, depth: usize) -> Result<()> {
    if depth == 0 || args.workers == 0 {
        bail!("--pipelined and --workers must be at least 1");
    }
    if args.events.is_empty() {
        bail!("--events names no event");
    }
    let runs = args.run_count(1);
    println!(
        "exactly-once experiment: {} server processes, {} replica(s), lease {} ms, {} worker(s) x {} pushes in flight, +1 to {} keys per push, {} ms before and {} ms after each event",
        args.servers,
        args.replicas,
        args.lease_ms,
        args.workers,
        depth,
        args.key_count(),
        args.before_ms,
        args.after_ms
    );
    println!(
        "| event | run | event took | pushes acked | pushes errored (before the event) | keys applied once | keys lost | lost | keys doubled | doubled | errored but applied |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut all = Vec::new();
    for &event in &args.events {
        for run in 1..=runs {
            // A run that hangs must not hang the experiment.
            let limit = Duration::from_millis(args.before_ms + args.after_ms)
                + EVENT_LIMIT
                + PUSH_TIMEOUT * 2;
            let r = tokio::time::timeout(limit, one(args, depth, event, run))
                .await
                .map_err(|_| anyhow::anyhow!("did not finish in {limit:?}"))
                .and_then(|r| r)
                .with_context(|| format!("{} run {run}", event.name()))?;
            println!(
                "| {} | {} | {:.0} ms | {} | {} ({}) | {} of {} | {} | {} | {} | {} | {} |",
                event.name(),
                r.run,
                r.event_ms,
                r.acked,
                r.errored,
                r.errored_before_event,
                r.applied_once_keys,
                r.per_key.len(),
                r.lost_keys,
                r.lost,
                r.doubled_keys,
                r.doubled,
                r.errored_but_applied
            );
            all.push(r);
        }
    }
    for r in &all {
        if r.lost_keys > 0 || r.doubled_keys > 0 {
            let d: Vec<i64> = r.per_key.iter().map(|k| k.deficit).collect();
            println!(
                "{} run {}: value - acked per key: {d:?}",
                r.event.name(),
                r.run
            );
        }
        for m in &r.errors {
            println!(
                "{} run {}: {} push(es) failed like: {}",
                r.event.name(),
                r.run,
                m.count,
                m.example
            );
        }
    }
    println!(
        "in all events: {} lost, {} doubled, {} pushes errored",
        all.iter().map(|r| r.lost).sum::<u64>(),
        all.iter().map(|r| r.doubled).sum::<u64>(),
        all.iter().map(|r| r.errored).sum::<u64>()
    );
    if let Some(path) = &args.json {
        let report = Report {
            servers: args.servers,
            replicas: args.replicas,
            lease_ms: args.lease_ms,
            workers: args.workers,
            pipelined: depth,
            keys: args.key_count(),
            before_ms: args.before_ms,
            after_ms: args.after_ms,
            runs: all,
        };
        let body = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, body).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
