//! The job's settings and its table: creating or resuming it, a warm
//! start, checkpoints.

use super::*;

impl Sched {
    /// The job's settings.
    pub(super) fn spec(&self, first: u64, clock_base: u64, workers: usize) -> JobSpec {
        let cfg = &self.cfg;
        JobSpec {
            job: self.job.clone(),
            table: self.cfg_table(),
            algo: cfg.algo,
            format: cfg.format.clone(),
            train_split: cfg.test.is_none(),
            blocks: cfg.blocks,
            tau: cfg.tau,
            l1: cfg.l1,
            kkt: cfg.kkt,
            workers,
            batches: self.batches,
            steps: cfg.steps(),
            first,
            clock_base,
            key_caching: cfg.key_caching,
            compression: cfg.compression,
            // DBPG pushes (gradient, curvature bound) pairs: the push filter
            // tests the gradient, the curvature rides along with it.
            value_filters: pserver_node::worker::ValueFilters {
                significant_push_tests: if cfg.algo == Algo::Dbpg { 1 } else { 0 },
                ..cfg.value_filters
            },
            slow_ms: 0,
            validation: self.extra.validation.map(|v| ValidationSplit {
                keep_validation: false,
                ..v
            }),
            warm: self.extra.warm.is_some(),
        }
    }

    /// The settings as worker `slot` gets them (the slowed one of a test).
    pub(super) fn spec_for(&self, spec: &JobSpec, slot: Slot) -> JobSpec {
        let mut spec = spec.clone();
        if self.cfg.slow_worker_ms > 0 && slot == 0 {
            spec.slow_ms = self.cfg.slow_worker_ms;
        }
        spec
    }

    /// Creates the job's table, or resumes it: the steps already done and
    /// the clock base.
    pub(super) async fn table(
        &mut self,
        progress: &UnboundedSender<Progress>,
    ) -> Result<(u64, u64), TrainError> {
        let cfg = self.cfg.clone();
        let table = self.cfg_table();
        if let (true, Some(dir), Algo::Dbpg) = (cfg.resume, &cfg.checkpoint_dir, cfg.algo) {
            if let Some((epoch, at)) = crate::train::latest_checkpoint(dir)? {
                // A table still in the cluster goes on as it stands (it is
                // at least as far as the checkpoint); else the checkpoint
                // is restored.
                let map = self.observer.refresh().await?;
                if map.table(&table).is_none() {
                    let restored = self
                        .observer
                        .restore(&at, &pserver_core::updater::Registry::new())
                        .await?;
                    if !restored.iter().any(|t| t.name == table) {
                        return Err(TrainError::Config(format!(
                            "the checkpoint {} holds no table {table:?} (this job's)",
                            at.display()
                        )));
                    }
                }
                let _ = progress.send(Progress::Resumed { epoch, dir: at });
                let first = (epoch.min(cfg.epochs) * cfg.blocks) as u64;
                // Above every clock an earlier run of the job pushed.
                let base = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(1)
                    * 1000;
                return Ok((first, base));
            }
        }
        let consistency = if cfg.tau == 0 {
            pserver_core::Consistency::Sequential
        } else {
            pserver_core::Consistency::Bounded(cfg.tau)
        };
        let opts = match cfg.algo {
            // Up to tau other blocks move on margins this worker has not
            // seen yet; a step of 1 / (tau + 1) keeps their sum within the
            // bound (the delay-dependent step of Li et al., NIPS 2014).
            Algo::Dbpg => TableOptions::new(
                1,
                UpdaterSpec::Prox {
                    eta: 1.0 / (cfg.tau as f32 + 1.0),
                    l1: cfg.l1,
                    l2: cfg.l2,
                    eps: crate::tune::PROX_EPS,
                },
            )
            .aggregate(true),
            Algo::Ftrl => TableOptions::new(
                1,
                UpdaterSpec::Ftrl {
                    alpha: cfg.alpha,
                    beta: cfg.beta,
                    l1: cfg.l1,
                    l2: cfg.l2,
                },
            ),
        }
        .consistency(consistency)
        .job(self.job.clone());
        let map = self.observer.refresh().await?;
        if map.table(&table).is_some() {
            return Err(TrainError::Config(format!(
                "table {table:?} exists already: job {:?} ran on this cluster before; pick another --job, or --resume it with its --checkpoint-dir",
                self.job
            )));
        }
        self.observer.create_table(&table, opts).await?;
        if let Some(m) = self.extra.warm.clone() {
            self.warm_start(&table, &m).await?;
        }
        Ok((0, 0))
    }

    /// Fills the new (empty) table with `m`'s non-zero weights: one push
    /// from this client, applied at once (a client's push to an
    /// aggregating table is not summed), of the `(g, h)` pair that takes
    /// each weight from 0 to its value under the table's proximal step
    /// ([`crate::tune::warm_push`]). DBPG only.
    pub(super) async fn warm_start(&mut self, table: &str, m: &Model) -> Result<(), TrainError> {
        let eta = 1.0 / (self.cfg.tau as f32 + 1.0);
        let mut kw: Vec<(u64, f32)> = m
            .keys
            .iter()
            .zip(m.weights.iter().step_by(m.dim.max(1) as usize))
            .filter(|(_, w)| **w != 0.0)
            .map(|(k, w)| (*k, *w))
            .collect();
        if kw.is_empty() {
            return Ok(());
        }
        kw.sort_unstable_by_key(|(k, _)| *k);
        kw.dedup_by_key(|(k, _)| *k);
        let keys: Vec<u64> = kw.iter().map(|(k, _)| *k).collect();
        let vals: Vec<f32> = kw
            .iter()
            .flat_map(|(_, w)| {
                crate::tune::warm_push(*w, eta, self.cfg.l1, self.cfg.l2, crate::tune::PROX_EPS)
            })
            .collect();
        // Pushes need a clock >= 1; this client pushes once per table.
        self.observer.set_clock(self.observer.clock().max(1));
        self.observer.push(table, keys, vals).await?;
        Ok(())
    }

    /// Writes the checkpoint after epoch `epoch`: every worker has
    /// acknowledged the epoch's last step and none was given a later one,
    /// so every sum up to it is applied and none after.
    pub(super) async fn checkpoint(
        &mut self,
        epoch: usize,
        progress: &UnboundedSender<Progress>,
    ) -> Result<(), TrainError> {
        let Some(dir) = self.cfg.checkpoint_dir.clone() else {
            return Ok(());
        };
        let name = format!("epoch-{epoch}");
        let at: PathBuf = dir.join(&name);
        self.observer.checkpoint(&at).await?;
        // LATEST changes only once the checkpoint is whole.
        Disk::new()
            .write_atomic(&dir.join(dbpg::LATEST), format!("{name}\n").as_bytes())
            .map_err(|e| TrainError::Config(e.to_string()))?;
        let _ = progress.send(Progress::Checkpointed { epoch, dir: at });
        Ok(())
    }
}
