//! The store alone: the same key lists a sparse case sends, applied in this
//! process to the server's table type (`pserver_core::table::Table`, the
//! store behind its range clock), as a server applies a push or a pull, but
//! without the wire, the runtime or any other process. Its keys per second
//! are the ceiling of the table itself, so a case's figure over it says
//! what the wire and the runtime cost on top.

use super::load::op_name;
use super::report::StoreReport;
use super::stats::StoreRun;
use anyhow::{Context, Result, bail};
use pserver_core::store::Threads;
use pserver_core::table::{Keys, Push, PushCtx, Table};
use pserver_core::updater::Registry;
use pserver_core::{Consistency, Init, KeyRange, NodeId, TableSpec, UpdaterSpec};
use pserver_node::worker::Op;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The node id the mirror's pushes come from (any: one sender, rising clocks).
const SENDER: NodeId = 1;

/// Keys between two looks at the clock, so that timing 1-key requests one by
/// one does not become what is measured.
const KEYS_PER_CHECK: usize = 4096;

/// An in-process copy of one bench table: it is given the pushes the
/// server's table was given (preloads, each case's lists), so it holds the
/// same keys when a case runs on both.
pub struct Mirror {
    table: Table,
    /// Threads a large request may use, as a server process gets them.
    threads: usize,
    /// The clock of the last push (the table's range clock wants them rising).
    clock: u64,
    /// The pushed values: all 1.0, as the cluster cases push.
    vals: Vec<f32>,
    /// A pull's output, reused (what a server would allocate per reply).
    out: Vec<f32>,
    /// The lists of the case at hand, and the next one to take.
    lists: Arc<Vec<Vec<u64>>>,
    next: usize,
}

impl Mirror {
    /// An empty table of `dim` floats per key with the `assign` updater,
    /// the spec `create_table` gives the server's, using as many threads
    /// for large requests as a server on this machine does.
    pub fn new(dim: usize) -> Result<Mirror> {
        let updater = UpdaterSpec::Assign;
        let built = Registry::new()
            .build(&updater)
            .context("building the assign updater")?;
        let spec = TableSpec {
            id: 1,
            name: "bench-store-alone".into(),
            dim: u32::try_from(dim).context("--dim")?,
            init: Init::Zero,
            updater,
            consistency: Consistency::Eventual,
            aggregate: false,
            job: None,
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = Threads::new(cores).context("starting the store's apply threads")?;
        Ok(Mirror {
            table: Table::new(spec, built, &threads),
            threads: threads.count(),
            clock: 0,
            vals: Vec::new(),
            out: Vec::new(),
            lists: Arc::new(Vec::new()),
            next: 0,
        })
    }

    /// Keys the table holds.
    pub fn len(&self) -> u64 {
        self.table.store().len() as u64
    }

    /// Pushes `keys` (sorted, unique) through the table, as a server applies
    /// a push: checks, range clock, store.
    pub fn push(&mut self, keys: &[u64]) -> Result<()> {
        self.push_read(keys, false)
    }

    /// [`Mirror::push`], and with `read` the push-pull a server answers:
    /// the keys' weights read in the same pass (`Table::push_pull`).
    fn push_read(&mut self, keys: &[u64], read: bool) -> Result<()> {
        let n = keys.len() * self.table.store().push_width();
        if self.vals.len() < n {
            self.vals.resize(n, 1.0);
        }
        self.clock += 1;
        let push = Push {
            sender: SENDER,
            range: KeyRange::ALL,
            clock: self.clock,
            retry: false,
            keys: Keys::List(keys),
            vals: &self.vals[..n],
        };
        let ctx = PushCtx {
            aggregate: false,
            workers: &[],
            gate: None,
        };
        if read {
            self.out.clear();
            self.table.push_pull(&push, ctx, &mut self.out)
        } else {
            self.table.push(&push, ctx)
        }
        .context("the store alone refused a push")?;
        Ok(())
    }

    /// Pulls `keys`, as a server answers a pull.
    fn pull(&mut self, keys: &[u64]) {
        self.out.clear();
        self.table.pull(keys, &mut self.out);
    }

    /// Makes the next cases cycle through `lists`, from the first.
    pub fn use_lists(&mut self, lists: Arc<Vec<Vec<u64>>>) {
        self.lists = lists;
        self.next = 0;
    }

    /// One repetition: `op` on the lists in turn for `duration` (at least one
    /// request, however long it takes, as in the cluster's load loop).
    fn run(&mut self, op: Op, duration: Duration) -> Result<StoreRun> {
        let lists = Arc::clone(&self.lists);
        let Some(first) = lists.first() else {
            bail!("the store alone has no key lists");
        };
        let per_check = (KEYS_PER_CHECK / first.len().max(1)).max(1);
        let mut run = StoreRun::default();
        let started = Instant::now();
        loop {
            for _ in 0..per_check {
                let keys = &lists[self.next % lists.len()];
                self.next = (self.next + 1) % lists.len();
                match op {
                    Op::Push => self.push(keys)?,
                    Op::Pull => self.pull(keys),
                    Op::PushPull => self.push_read(keys, true)?,
                }
                run.requests += 1;
                run.keys += keys.len() as u64;
            }
            if started.elapsed() >= duration {
                break;
            }
        }
        run.seconds = started.elapsed().as_secs_f64();
        Ok(run)
    }

    /// `reps` repetitions of `op` on the current lists.
    fn repeat(&mut self, op: Op, reps: usize, duration: Duration) -> Result<StoreReport> {
        let table_keys = self.len();
        let runs = (0..reps)
            .map(|_| self.run(op, duration))
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("the store alone's {}", op_name(op)))?;
        Ok(StoreReport::new(self.threads, table_keys, runs))
    }
}

/// Runs `reps` repetitions of `op` on `mirror`'s current lists on a blocking
/// thread (a second of work must not hold one of the runtime's threads),
/// giving the mirror back with the figures.
pub async fn measure(
    mut mirror: Mirror,
    op: Op,
    reps: usize,
    duration: Duration,
) -> Result<(Mirror, StoreReport)> {
    tokio::task::spawn_blocking(move || {
        let report = mirror.repeat(op, reps, duration)?;
        Ok((mirror, report))
    })
    .await
    .context("the store alone's thread")?
}

/// Applies `chunks` as pushes to `mirror` on a blocking thread: a preload
/// of the server's table, repeated here.
pub async fn preload(
    mut mirror: Mirror,
    chunks: impl Iterator<Item = Vec<u64>> + Send + 'static,
) -> Result<Mirror> {
    tokio::task::spawn_blocking(move || {
        for keys in chunks {
            mirror.push(&keys).context("preloading the store alone")?;
        }
        Ok(mirror)
    })
    .await
    .context("the store alone's thread")?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mirror_stores_what_is_pushed_and_counts_every_request() {
        let mut m = Mirror::new(2).unwrap();
        m.use_lists(Arc::new(vec![vec![1, 2, 3], vec![3, 4]]));
        let ms = Duration::from_millis(5);
        let push = m.repeat(Op::Push, 2, ms).unwrap();
        assert_eq!(push.table_keys, 0);
        assert_eq!(push.runs.len(), 2);
        for r in &push.runs {
            assert!(r.requests > 0 && r.seconds > 0.0, "{r:?}");
            // Lists of 3 and 2 keys taken in turn.
            let (three, two) = (r.requests.div_ceil(2), r.requests / 2);
            assert!(r.keys == 3 * three + 2 * two || r.keys == 2 * three + 3 * two);
        }
        assert_eq!(m.len(), 4);
        let pull = m.repeat(Op::PushPull, 1, ms).unwrap();
        assert_eq!(pull.table_keys, 4);
        assert!(pull.keys_per_s > 0.0 && pull.req_per_s > 0.0, "{pull:?}");
        // A pull reads what the pushes wrote.
        m.pull(&[1, 4, 9]);
        assert_eq!(m.out, [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn no_lists_is_an_error_not_a_panic() {
        let mut m = Mirror::new(1).unwrap();
        assert!(m.repeat(Op::Pull, 1, Duration::from_millis(1)).is_err());
        // Unsorted keys are refused as a server refuses them.
        assert!(m.push(&[2, 1]).is_err());
    }
}
