//! The messages between a job's scheduler and its worker processes.
//!
//! The scheduler offers the job (`Offer`); the worker answers with the
//! files it can read (`Files`) or why it cannot take the job (`Refused`).
//! `Start` gives it its units and the job's settings; it joins the job's
//! worker group, loads them and says `Loaded` (or `Failed`, naming the file
//! and the reason). Steps (`Step`) are then issued in order, several ahead;
//! each ends with `Done`. `Reassign` changes the worker's units from a
//! given step on (it is sent before that step, so the stream's order says
//! exactly where the change falls). `Finish` ends the job: the worker goes
//! idle again. A broken link ends the job on both sides.

use super::{DataFormat, Unit};
use serde::{Deserialize, Serialize};

/// Which learning algorithm a job runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Algo {
    /// Delayed block proximal gradient: a step is one block's iteration.
    Dbpg,
    /// Asynchronous minibatch SGD with FTRL-Proximal on the servers: a step
    /// is one epoch of minibatches.
    Ftrl,
}

impl Algo {
    /// Its name on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Algo::Dbpg => "dbpg",
            Algo::Ftrl => "ftrl",
        }
    }
}

/// What every worker of a job needs to know.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// The job's name: its worker group.
    pub job: String,
    /// The weights table.
    pub table: String,
    /// The algorithm.
    pub algo: Algo,
    /// How the files are read.
    pub format: DataFormat,
    /// Keep only the lines not held out by the format's split (a CSV
    /// schema's `[split]`), the test lines being the scheduler's.
    pub train_split: bool,
    /// Key-range blocks (DBPG).
    pub blocks: usize,
    /// Bounded delay.
    pub tau: u64,
    /// L1 strength, for the KKT filter (DBPG).
    pub l1: f32,
    /// KKT filter margin, `None` for no filter (DBPG).
    pub kkt: Option<f32>,
    /// Workers the job started with (the KKT filter scales a local
    /// gradient by it).
    pub workers: usize,
    /// Minibatches per epoch (FTRL), the same on every worker so clocks
    /// line up; 0 until every worker has loaded (then each `Step` says).
    pub batches: usize,
    /// Steps the job runs (DBPG: blocks x epochs; FTRL: epochs).
    pub steps: u64,
    /// Steps already in the weights when this run started (a run resumed
    /// from a checkpoint); the run issues `first + 1 ..= steps`.
    pub first: u64,
    /// Added to every clock: a resumed job's clocks start above any clock
    /// an earlier run of it pushed, so the servers' range clocks take them.
    pub clock_base: u64,
    /// Send repeated key lists as hashes.
    pub key_caching: bool,
    /// Pack pushed values, and have servers pack pulled ones.
    pub compression: Option<pserver_node::worker::Packing>,
    /// The value filters: significantly-modified on pull replies and on
    /// pushes, random skip on pushes.
    pub value_filters: pserver_node::worker::ValueFilters,
    /// Slow every step by this long (a test's slow worker; 0 normally).
    pub slow_ms: u64,
    /// A validation split of the training part (`--tune`): workers keep the
    /// side it names; `None`: every training line.
    pub validation: Option<ValidationSplit>,
    /// Start from the weights the table holds (a warm start: the scheduler
    /// filled the new table before `Start`), not from zero.
    pub warm: bool,
}

/// A seeded validation split carved out of the training lines (see
/// [`pserver_data::Validation`]), and which side a reader keeps.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ValidationSplit {
    /// Fraction of the training lines that validate, in `(0, 1)`.
    pub fraction: f64,
    /// Seed.
    pub seed: u64,
    /// Keep the validation lines (the scheduler, scoring) rather than the
    /// others (the workers, fitting).
    pub keep_validation: bool,
}

impl ValidationSplit {
    /// The same split, keeping the other side.
    pub fn other_side(self) -> ValidationSplit {
        ValidationSplit {
            keep_validation: !self.keep_validation,
            ..self
        }
    }

    /// As the reader takes it.
    pub fn read(&self) -> pserver_data::Validation {
        pserver_data::Validation {
            fraction: self.fraction,
            seed: self.seed,
            keep: if self.keep_validation {
                pserver_data::Split::Test
            } else {
                pserver_data::Split::Train
            },
        }
    }
}

impl JobSpec {
    /// The clock a worker pushes at for its last minibatch or iteration of
    /// step `step` (0: none yet), base included.
    pub fn last_clock(&self, step: u64) -> u64 {
        self.clock_base
            + match self.algo {
                Algo::Dbpg => step,
                Algo::Ftrl => step * self.batches as u64,
            }
    }
}

/// A file a worker can read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// Its path on that worker.
    pub path: String,
    /// Its size in bytes.
    pub bytes: u64,
}

/// Scheduler to worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ToWorker {
    /// Would you take job `job`, training on these paths (files or globs)?
    Offer {
        /// The job.
        job: String,
        /// Its training data as the job names it.
        train: Vec<String>,
    },
    /// Your units and the job's settings; you start at step `from`.
    Start {
        /// The settings (boxed: they are most of the message's size).
        spec: Box<JobSpec>,
        /// Your units.
        units: Vec<Unit>,
        /// The first step you will be given.
        from: u64,
    },
    /// Run step `step`.
    Step {
        /// The step.
        step: u64,
        /// FTRL's minibatches per epoch, fixed once every worker loaded
        /// (from the most rows any holds), the same for all.
        batches: usize,
    },
    /// From step `from` on, your units are these.
    Reassign {
        /// The first step with the new units.
        from: u64,
        /// The units.
        units: Vec<Unit>,
    },
    /// The job is over.
    Finish,
}

/// One worker's figures for one iteration (DBPG) or minibatch (FTRL).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    /// The iteration or minibatch, counted from 1 within the job (clock
    /// base not included).
    pub iteration: u64,
    /// Sum of the logistic loss over the rows it evaluated.
    pub loss: f64,
    /// Rows the loss is over.
    pub rows: usize,
    /// Coordinates pushed.
    pub pushed: usize,
    /// Coordinates the KKT filter kept back.
    pub filtered: usize,
    /// Microseconds computing.
    pub busy_us: u64,
    /// Microseconds waiting on pushes and pulls.
    pub wait_us: u64,
    /// The part of `wait_us` spent handing the push and pulls to the
    /// connections (slicing, encoding, queueing): CPU work of sending, not
    /// idle time. DBPG only (FTRL awaits its push, so it cannot be told
    /// apart; 0 there).
    pub send_us: u64,
}

/// Worker to scheduler.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum FromWorker {
    /// The files matching the offer this worker can read.
    Files {
        /// Its node id.
        id: u32,
        /// The files.
        files: Vec<FileInfo>,
    },
    /// It will not take the job.
    Refused {
        /// Why.
        why: String,
    },
    /// Its units are loaded (after `Start` or a `Reassign` that changed
    /// them).
    Loaded {
        /// Rows it now holds.
        rows: usize,
        /// Distinct features (keys) of the units it loaded.
        keys: usize,
        /// What its readers counted (bad lines with the first few).
        stats: Vec<pserver_data::ReadStats>,
        /// Entries (non-zeros) it now holds.
        nnz: u64,
        /// Bytes it holds them in, with the algorithm's state over them.
        bytes: u64,
    },
    /// One iteration or minibatch is done.
    Iter(StepStats),
    /// A step is done: every push of it acknowledged.
    Done(u64),
    /// Its task failed; the message names the file or request and why.
    Failed {
        /// What failed.
        what: String,
    },
    /// Bytes this worker moved so far (sent with `Done` of the last step).
    Traffic {
        /// Bytes sent.
        sent: u64,
        /// Bytes received.
        received: u64,
        /// Bytes key caching and compression kept off the wire.
        saved: u64,
        /// The worker process's peak resident set size in bytes (`VmHWM`)
        /// since the job's start (reset then where Linux allows; 0 where
        /// the system does not say).
        peak_rss: u64,
    },
}
