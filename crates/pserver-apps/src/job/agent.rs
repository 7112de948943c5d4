//! A worker process (`pserver worker`): registers as an idle worker with
//! the address it takes tasks on, and runs one job at a time for whichever
//! scheduler offers one, reading its units from its own file system.

use super::link::{self, LinkError, Receiver, Sender};
use super::proto::{Algo, FileInfo, FromWorker, JobSpec, StepStats, ToWorker};
use super::{Unit, describe};
use crate::dataset::{self, Builder, Dataset};
use crate::dbpg::{DbpgConfig, DbpgWorker};
use crate::ftrl::{self, FtrlConfig};
use crate::gauges::{JobExporter, JobGauges, Scope};
use pserver_data::{ReadOptions, ReadStats, Split};
use pserver_node::NodeError;
use pserver_node::net::Net;
use pserver_node::worker::{Group, Outcome, Worker, WorkerConfig};
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How a worker process starts.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The manager.
    pub manager: String,
    /// Where to take tasks (`host:port`; port 0 picks one).
    pub listen: String,
    /// The address schedulers dial, if not the one bound (behind NAT, or
    /// bound to 0.0.0.0).
    pub advertise: Option<String>,
    /// The files (paths or globs) this worker may read; empty: whatever
    /// the job names.
    pub data: Vec<String>,
    /// The cluster's transport.
    pub net: Net,
    /// Leave the cluster and stop once this many jobs have finished on
    /// this worker (a Kubernetes Job of worker pods completes that way);
    /// `None`: serve jobs until stopped.
    pub exit_after_jobs: Option<usize>,
}

/// Why a worker process could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The cluster refused or failed.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// It could not listen.
    #[error("listening for tasks on {addr}: {os}")]
    Listen {
        /// The address.
        addr: String,
        /// What failed.
        os: std::io::Error,
    },
    /// The worker lost the manager for good.
    #[error("worker {0} was declared dead by the manager; stopping")]
    Lost(u32),
    /// A `--data` pattern is not a valid glob.
    #[error("--data {pattern:?}: {why}")]
    Pattern {
        /// The pattern.
        pattern: String,
        /// What is wrong.
        why: String,
    },
}

/// A running worker process.
pub struct Agent {
    worker: Worker,
    addr: String,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    quota: Arc<Quota>,
    /// Its job's figures, for its metrics listener.
    gauges: Arc<JobGauges>,
}

/// How many jobs a worker process serves before it leaves.
struct Quota {
    /// The most (`None`: no end).
    limit: Option<usize>,
    /// Jobs finished so far (the scheduler said `Finish`).
    finished: std::sync::atomic::AtomicUsize,
    /// Cancelled when the last one has finished.
    reached: CancellationToken,
}

impl Quota {
    /// Counts a finished job; whether it was the last one.
    fn finish(&self) -> bool {
        let done = self.finished.fetch_add(1, Ordering::SeqCst) + 1;
        let last = self.limit.is_some_and(|n| done >= n);
        if last {
            self.reached.cancel();
        }
        last
    }
}

impl Agent {
    /// Registers as an idle worker and starts taking tasks.
    pub async fn start(cfg: AgentConfig) -> Result<Agent, AgentError> {
        for p in &cfg.data {
            glob::Pattern::new(p).map_err(|e| AgentError::Pattern {
                pattern: p.clone(),
                why: e.to_string(),
            })?;
        }
        let (mut listener, bound) =
            cfg.net
                .bind(&cfg.listen)
                .await
                .map_err(|source| AgentError::Listen {
                    addr: cfg.listen.clone(),
                    os: source,
                })?;
        let addr = cfg.advertise.clone().unwrap_or_else(|| bound.to_string());
        let worker = Worker::connect(WorkerConfig {
            group: Group::Idle,
            addr: addr.clone(),
            net: cfg.net.clone(),
            ..WorkerConfig::new(cfg.manager.clone())
        })
        .await?;
        let cancel = CancellationToken::new();
        let busy: Arc<Mutex<Option<String>>> = Arc::default();
        let quota = Arc::new(Quota {
            limit: cfg.exit_after_jobs,
            finished: Default::default(),
            reached: CancellationToken::new(),
        });
        let gauges = JobGauges::new();
        let (w, c, data, q, g) = (
            worker.clone(),
            cancel.clone(),
            Arc::new(cfg.data),
            quota.clone(),
            gauges.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let conn = tokio::select! {
                    _ = c.cancelled() => break,
                    conn = listener.accept() => conn,
                };
                let (stream, peer) = match conn {
                    Ok(c) => c,
                    // Nothing more will come (the runtime is stopping).
                    Err(e) if pserver_node::net::stopped(&e) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a scheduler's connection failed");
                        // Out of descriptors, say: back off, not spin.
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let (tx, rx) = link::split::<FromWorker, ToWorker>(stream, &peer);
                let (w, busy, data, c, q, g) = (
                    w.clone(),
                    busy.clone(),
                    data.clone(),
                    c.clone(),
                    q.clone(),
                    g.clone(),
                );
                tokio::spawn(async move {
                    tokio::select! {
                        // Killed: the session ends unpolled. Its link and
                        // the manager's close with it, so a session polled
                        // first would warn of their failure after the one
                        // line a failed `pserver train` prints.
                        biased;
                        _ = c.cancelled() => {}
                        r = session(&w, tx, rx, &busy, &data, &c, &q, &g) => match r {
                            Ok(()) => {}
                            // Killed meanwhile (on another thread): its
                            // links closing under it are how a kill ends it.
                            Err(e) if c.is_cancelled() => {
                                tracing::debug!(error = %e, %peer, "job link ended: this worker is stopping");
                            }
                            Err(e) => tracing::warn!(error = %e, %peer, "job link ended"),
                        },
                    }
                });
            }
        });
        Ok(Agent {
            worker,
            addr,
            cancel,
            task,
            quota,
            gauges,
        })
    }

    /// What this worker process tells a metrics listener: its job's
    /// iterations, objective and waiting share; ready while it has a job.
    pub fn exporter(&self) -> Arc<dyn pserver_node::metrics::Exporter> {
        Arc::new(JobExporter {
            scope: Scope::Worker,
            gauges: self.gauges.clone(),
        })
    }

    /// Its node id.
    pub fn id(&self) -> u32 {
        self.worker.id()
    }

    /// The address it takes tasks on.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Stops at once, as if the process died: tasks end, links close, and
    /// the manager declares it dead (its connection closes).
    pub fn kill(&self) {
        self.cancel.cancel();
        self.task.abort();
        self.worker.shutdown();
    }

    /// Runs until [`Agent::kill`], until the worker has lost the
    /// manager for good (then says so), or until its
    /// [`AgentConfig::exit_after_jobs`] have finished (then it says
    /// goodbye to the manager, so it is gone from the map at once).
    pub async fn wait(&mut self) -> Result<(), AgentError> {
        tokio::select! {
            _ = &mut self.task => Ok(()),
            _ = self.worker.lost() => {
                self.kill();
                Err(AgentError::Lost(self.worker.id()))
            }
            _ = self.quota.reached.cancelled() => {
                self.cancel.cancel();
                self.task.abort();
                self.worker.leave().await;
                Ok(())
            }
        }
    }

    /// Jobs that have finished on this worker so far.
    pub fn jobs_finished(&self) -> usize {
        self.quota.finished.load(Ordering::SeqCst)
    }
}

/// Why a job ended on this worker.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("{0}")]
    Failed(String),
}

/// One scheduler's connection: an offer, then (if taken) the job.
// The process's shared pieces, each borrowed from the accept loop's clones.
#[allow(clippy::too_many_arguments)]
async fn session(
    w: &Worker,
    mut tx: Sender<FromWorker>,
    mut rx: Receiver<ToWorker>,
    busy: &Mutex<Option<String>>,
    data: &[String],
    killed: &CancellationToken,
    quota: &Quota,
    gauges: &JobGauges,
) -> Result<(), SessionError> {
    let Some(first) = rx.recv().await else {
        return Ok(());
    };
    let ToWorker::Offer { job, train } = first? else {
        tx.send(&FromWorker::Refused {
            why: "expected an offer first".into(),
        })
        .await?;
        return Ok(());
    };
    let taken = {
        let mut b = busy.lock().unwrap_or_else(|e| e.into_inner());
        match b.as_ref() {
            Some(other) => Err(format!("worker {} is running job {other:?}", w.id())),
            None => {
                *b = Some(job.clone());
                gauges.start(&job);
                Ok(())
            }
        }
    };
    if let Err(why) = taken {
        tx.send(&FromWorker::Refused { why }).await?;
        return Ok(());
    }
    let patterns = if data.is_empty() { &train[..] } else { data };
    let r = match readable(patterns) {
        Ok(files) => {
            tx.send(&FromWorker::Files { id: w.id(), files }).await?;
            run_job(w, &mut tx, &mut rx, gauges).await
        }
        Err(why) => {
            tx.send(&FromWorker::Refused { why }).await?;
            Ok(false)
        }
    };
    // The last job of a worker that exits after N: it stays busy (any
    // other offer is refused) and leaves instead of going idle.
    if matches!(r, Ok(true)) && quota.finish() {
        return Ok(());
    }
    let r = r.map(|_| ());
    // Whatever happened, this worker is free again.
    if let Err(e) = w.join(Group::Idle, "").await {
        // Killed meanwhile (the job's process is ending): no news.
        if killed.is_cancelled() {
            tracing::debug!(error = %e, "could not go idle: this worker is stopping");
        } else {
            tracing::warn!(error = %e, "could not go idle");
        }
    }
    *busy.lock().unwrap_or_else(|e| e.into_inner()) = None;
    gauges.end();
    if let Err(SessionError::Failed(what)) = &r {
        let _ = tx.send(&FromWorker::Failed { what: what.clone() }).await;
    }
    r
}

/// The files matching `patterns` (paths or globs), with their sizes.
fn readable(patterns: &[String]) -> Result<Vec<FileInfo>, String> {
    let mut out = BTreeSet::new();
    for p in patterns {
        let paths = glob::glob(p).map_err(|e| format!("{p:?}: {e}"))?;
        for entry in paths.flatten() {
            if let Ok(meta) = std::fs::metadata(&entry) {
                if meta.is_file() {
                    out.insert((entry.display().to_string(), meta.len()));
                }
            }
        }
        // A plain path that does not exist is offered anyway, so loading it
        // fails with the file named (a glob matching nothing offers nothing).
        if !p.contains(['*', '?', '[']) && !std::path::Path::new(p).exists() {
            out.insert((p.clone(), 0));
        }
    }
    Ok(out
        .into_iter()
        .map(|(path, bytes)| FileInfo { path, bytes })
        .collect())
}

/// Loads `units` into one dataset, in the layout the job's algorithm
/// reads (DBPG: by column; FTRL: by row), so only that one is ever held
/// (blocking: run it off the async threads).
fn load(units: &[Unit], spec: &JobSpec, id: u32) -> Result<(Dataset, Vec<ReadStats>), String> {
    let format = spec
        .format
        .load()
        .map_err(|e| format!("worker {id}: {e}"))?;
    let mut b = Builder::new();
    let mut stats = Vec::new();
    for u in units {
        let opts = ReadOptions {
            shard: u.shard(),
            split: if spec.train_split {
                Split::Train
            } else {
                Split::All
            },
            validation: spec.validation.map(|v| v.read()),
            ..ReadOptions::default()
        };
        let fail = |e: &dyn std::fmt::Display| format!("worker {id}: reading {}: {e}", u.path);
        let mut reader = pserver_data::open(std::path::Path::new(&u.path), &format, &opts)
            .map_err(|e| fail(&e))?;
        for ex in reader.by_ref() {
            b.add(ex.label, &ex.keys, &ex.vals);
        }
        if let Some(e) = reader.error() {
            return Err(fail(e));
        }
        stats.push(reader.stats().clone());
    }
    let data = match spec.algo {
        Algo::Dbpg => b.build_columns(),
        Algo::Ftrl => b.build(),
    };
    Ok((data, stats))
}

async fn load_async(
    units: Vec<Unit>,
    spec: &JobSpec,
    id: u32,
) -> Result<(Dataset, Vec<ReadStats>), SessionError> {
    let spec = spec.clone();
    tokio::task::spawn_blocking(move || load(&units, &spec, id))
        .await
        .map_err(|e| SessionError::Failed(format!("worker {id}: loading failed: {e}")))?
        .map_err(SessionError::Failed)
}

/// Bytes sent, received and kept off the wire so far.
fn traffic(w: &Worker) -> (u64, u64, u64) {
    let t = w.traffic();
    (
        t.bytes_sent.load(Ordering::Relaxed),
        t.bytes_received.load(Ordering::Relaxed),
        t.saved(),
    )
}

/// The algorithm's state on this worker.
enum Runner {
    Dbpg(DbpgWorker),
    Ftrl { cfg: FtrlConfig, data: Dataset },
}

impl Runner {
    /// The `Loaded` report of what it now holds (`keys` and `stats` of the
    /// units just read).
    fn loaded(&self, keys: usize, stats: Vec<ReadStats>) -> FromWorker {
        let (nnz, bytes) = self.memory();
        FromWorker::Loaded {
            rows: self.rows(),
            keys,
            stats,
            nnz,
            bytes,
        }
    }

    /// Rows held.
    fn rows(&self) -> usize {
        match self {
            Runner::Dbpg(d) => d.rows(),
            Runner::Ftrl { data, .. } => data.rows(),
        }
    }

    /// The shard's entries (non-zeros) and the bytes allocated for them
    /// and the algorithm's state over them.
    fn memory(&self) -> (u64, u64) {
        match self {
            Runner::Dbpg(d) => (d.nnz() as u64, d.bytes() as u64),
            Runner::Ftrl { data, .. } => (data.nnz() as u64, data.bytes() as u64),
        }
    }
}

/// Runs a job after the offer: start, steps, reassignments, finish.
/// `Ok(true)` when the scheduler finished it, `Ok(false)` when it went
/// away first.
async fn run_job(
    w: &Worker,
    tx: &mut Sender<FromWorker>,
    rx: &mut Receiver<ToWorker>,
    gauges: &JobGauges,
) -> Result<bool, SessionError> {
    let id = w.id();
    // The worker outlives jobs: report this job's bytes only.
    let before = traffic(w);
    let Some(msg) = rx.recv().await else {
        return Ok(false);
    };
    let ToWorker::Start { spec, units, from } = msg? else {
        return Err(SessionError::Failed(format!(
            "worker {id}: expected the job's start"
        )));
    };
    let spec = *spec;
    let node = |e: NodeError| SessionError::Failed(format!("worker {id}: {e}"));
    // The peak RSS reported at the end is this job's (where Linux allows).
    dataset::reset_peak_rss();
    w.set_filters(spec.key_caching, spec.compression);
    w.set_value_filters(spec.value_filters)
        .map_err(|e| SessionError::Failed(format!("worker {id}: {e}")))?;
    w.join(Group::Job(spec.job.clone()), &describe(&units))
        .await
        .map_err(node)?;
    // Joining a running job: the job's sums and pulls count this worker
    // from now on, so it says at once that it has pushed every clock
    // before its first (an empty push over every key), and nothing waits
    // for clocks it was never given.
    if from > spec.first + 1 {
        w.set_clock(spec.last_clock(from - 1));
        let keys: Vec<u64> = Vec::new();
        w.push(&spec.table, keys, Vec::new()).await.map_err(node)?;
    }
    let mut held = units.clone();
    let (data, stats) = load_async(units, &spec, id).await?;
    let keys = data.keys.len();
    // A warm-started table already holds weights: pull them.
    let fresh = from == 1 && spec.first == 0 && !spec.warm;
    let mut runner = match spec.algo {
        Algo::Dbpg => {
            let mut d = DbpgWorker::new(DbpgConfig {
                table: spec.table.clone(),
                blocks: spec.blocks,
                tau: spec.tau,
                l1: spec.l1,
                kkt: spec.kkt,
                workers: spec.workers,
                first: spec.first,
                total: spec.steps,
                clock_base: spec.clock_base,
            });
            d.set_data(w, data, fresh).await.map_err(node)?;
            Runner::Dbpg(d)
        }
        Algo::Ftrl => Runner::Ftrl {
            cfg: FtrlConfig {
                table: spec.table.clone(),
                batches: spec.batches,
                clock_base: spec.clock_base,
            },
            data,
        },
    };
    tracing::info!(
        rows = runner.rows(),
        peak_rss = dataset::peak_rss().unwrap_or(0),
        "loaded"
    );
    tx.send(&runner.loaded(keys, stats)).await?;

    let slow = Duration::from_millis(spec.slow_ms);
    // Acknowledged steps come back here (pushes complete in the background).
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<(u64, Result<Outcome, NodeError>)>();
    let mut acked = BTreeSet::new();
    let mut reported = from - 1;
    loop {
        let msg = tokio::select! {
            m = rx.recv() => m,
            Some((t, r)) = ack_rx.recv() => {
                r.map_err(|e| SessionError::Failed(format!("worker {id}: the push of step {t}: {e}")))?;
                acked.insert(t);
                while acked.remove(&(reported + 1)) {
                    reported += 1;
                    tx.send(&FromWorker::Done(reported)).await?;
                }
                continue;
            }
        };
        let Some(msg) = msg else {
            // The scheduler is gone: the job ends here.
            return Ok(false);
        };
        match msg? {
            ToWorker::Step { step: t, batches } => match &mut runner {
                Runner::Dbpg(d) => {
                    let (stats, push) = d.iterate(w, t, slow).await.map_err(node)?;
                    gauges.step(&stats);
                    tx.send(&FromWorker::Iter(stats)).await?;
                    let ack = ack_tx.clone();
                    tokio::spawn(async move {
                        let _ = ack.send((t, push.await));
                    });
                }
                Runner::Ftrl { cfg, data } => {
                    cfg.batches = batches.max(1);
                    let (stx, mut srx) = mpsc::unbounded_channel::<StepStats>();
                    ftrl::run_epoch(w, data, cfg, t, slow, &stx)
                        .await
                        .map_err(node)?;
                    drop(stx);
                    while let Some(s) = srx.recv().await {
                        gauges.step(&s);
                        tx.send(&FromWorker::Iter(s)).await?;
                    }
                    let _ = ack_tx.send((t, Ok(Outcome::default())));
                }
            },
            ToWorker::Reassign { units, .. } if units == held => {
                tx.send(&FromWorker::Loaded {
                    rows: 0,
                    keys: 0,
                    stats: Vec::new(),
                    nnz: 0,
                    bytes: 0,
                })
                .await?;
            }
            ToWorker::Reassign { from: _, units } => {
                // Only the units it gains are read when it keeps all it
                // had (a lost worker's shard); otherwise all anew. FTRL's
                // minibatches must line up with the other workers' clocks,
                // so it always holds one dataset.
                let grows =
                    matches!(runner, Runner::Dbpg(_)) && held.iter().all(|u| units.contains(u));
                let read = if grows {
                    units
                        .iter()
                        .filter(|u| !held.contains(u))
                        .cloned()
                        .collect()
                } else {
                    units.clone()
                };
                let (data, stats) = load_async(read, &spec, id).await?;
                let keys = data.keys.len();
                match &mut runner {
                    Runner::Dbpg(d) => {
                        if grows {
                            d.add_data(w, data).await.map_err(node)?;
                        } else {
                            d.set_data(w, data, false).await.map_err(node)?;
                        }
                    }
                    Runner::Ftrl { data: mine, .. } => *mine = data,
                }
                held = units;
                w.join(Group::Job(spec.job.clone()), &describe(&held))
                    .await
                    .map_err(node)?;
                tx.send(&runner.loaded(keys, stats)).await?;
            }
            ToWorker::Finish => {
                let now = traffic(w);
                tx.send(&FromWorker::Traffic {
                    sent: now.0 - before.0,
                    received: now.1 - before.1,
                    saved: now.2 - before.2,
                    peak_rss: dataset::peak_rss().unwrap_or(0),
                })
                .await?;
                return Ok(true);
            }
            ToWorker::Offer { .. } | ToWorker::Start { .. } => {
                return Err(SessionError::Failed(format!(
                    "worker {id}: the job was started twice"
                )));
            }
        }
    }
}
