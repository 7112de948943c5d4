//! What the learning applications report while they run.

use std::time::Duration;

/// One worker's iteration (a block for DBPG, a minibatch for FTRL).
#[derive(Clone, Debug, PartialEq)]
pub struct IterStats {
    /// Which worker.
    pub worker: usize,
    /// Its clock.
    pub iteration: u64,
    /// Sum of the logistic loss over the rows it evaluated.
    pub loss: f64,
    /// Rows the loss is over.
    pub rows: usize,
    /// Coordinates pushed.
    pub pushed: usize,
    /// Coordinates the KKT filter kept back.
    pub filtered: usize,
    /// Time computing.
    pub busy: Duration,
    /// Time in push and pull, consistency waits included.
    pub wait: Duration,
}

/// Events of a training run.
#[derive(Clone, Debug, PartialEq)]
pub enum Progress {
    /// A worker loaded its shard.
    Loaded {
        /// Which worker.
        worker: usize,
        /// Rows it holds.
        rows: usize,
    },
    /// A worker finished an iteration.
    Iter(IterStats),
    /// A worker stopped (it failed, or was killed on purpose); its shard
    /// goes to another.
    WorkerLost {
        /// Which worker.
        worker: usize,
        /// Why.
        why: String,
    },
    /// The run goes on from a checkpoint.
    Resumed {
        /// Epochs it holds.
        epoch: usize,
        /// Where.
        dir: std::path::PathBuf,
    },
    /// A checkpoint was written after an epoch.
    Checkpointed {
        /// Epochs done.
        epoch: usize,
        /// Where.
        dir: std::path::PathBuf,
    },
    /// A worker process joined the running job (its share starts with the
    /// next epoch).
    Joined {
        /// Its slot in the job.
        worker: usize,
        /// Its node id.
        node: u32,
    },
    /// A worker took on the shard of one that was lost.
    Adopted {
        /// The worker that took it.
        worker: usize,
        /// Rows it took on.
        rows: usize,
    },
    /// Every worker finished an iteration: the training objective.
    Objective {
        /// Seconds since training began.
        seconds: f64,
        /// The clock.
        iteration: u64,
        /// Mean logistic loss over the rows evaluated at that clock.
        objective: f64,
    },
    /// The test set was scored during training.
    Test {
        /// Seconds since training began.
        seconds: f64,
        /// Test AUC.
        auc: f64,
        /// Test log-loss.
        logloss: f64,
    },
    /// A point of a `--tune` path is done (scored on the validation set).
    Tuned {
        /// Its index on the path.
        point: usize,
        /// Points on the path.
        points: usize,
        /// Its L1 strength.
        l1: f32,
        /// Its L2 strength.
        l2: f32,
        /// Epochs it ran.
        epochs: usize,
        /// Whether it started from an earlier point's weights.
        warm: bool,
        /// Validation log-loss.
        logloss: f64,
        /// Validation AUC.
        auc: f64,
    },
}
