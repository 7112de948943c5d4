//! The job's workers: offering the job, gathering idle workers, taking
//! one in during the run, and losing one.

use super::*;

impl Sched {
    /// Offers the job to worker `id` at `addr`: its slot and the files it
    /// can read, or why it will not take the job.
    pub(super) async fn offer(
        &mut self,
        id: u32,
        addr: &str,
    ) -> Result<Result<(Slot, Vec<FileInfo>), String>, TrainError> {
        self.tried.insert(id);
        let dialed = tokio::time::timeout(
            OFFER_TIMEOUT,
            link::dial::<ToWorker, FromWorker>(&self.cfg.net, addr),
        )
        .await;
        let (mut tx, mut rx) = match dialed {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => return Ok(Err(e.to_string())),
            Err(_) => return Ok(Err(format!("no answer from {addr}"))),
        };
        let offer = ToWorker::Offer {
            job: self.job.clone(),
            train: vec![self.cfg.train.display().to_string()],
        };
        if let Err(e) = tx.send(&offer).await {
            return Ok(Err(e.to_string()));
        }
        let answer = match tokio::time::timeout(OFFER_TIMEOUT, rx.recv()).await {
            Ok(Some(Ok(a))) => a,
            Ok(Some(Err(e))) => return Ok(Err(e.to_string())),
            Ok(None) => return Ok(Err("it closed the link".into())),
            Err(_) => return Ok(Err(format!("no answer from {addr}"))),
        };
        let files = match answer {
            FromWorker::Files { files, .. } => files,
            FromWorker::Refused { why } => return Ok(Err(why)),
            other => return Ok(Err(format!("unexpected answer {other:?}"))),
        };
        let slot = self.members.len();
        let events = self.events_tx.clone();
        let reader = tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Some(Ok(m)) => {
                        if events.send(Event::Msg(slot, m)).is_err() {
                            break;
                        }
                    }
                    Some(Err(e)) => {
                        let _ = events.send(Event::Closed(slot, e.to_string()));
                        break;
                    }
                    None => {
                        let _ = events.send(Event::Closed(slot, "its link closed".into()));
                        break;
                    }
                }
            }
        });
        self.readers.push(reader);
        self.members.push(Member {
            id,
            addr: addr.to_string(),
            tx,
            done: 0,
            from: 1,
            alive: true,
        });
        Ok(Ok((slot, files)))
    }

    /// Waits for `min` idle workers of the cluster that take the job.
    pub(super) async fn gather(
        &mut self,
        manager: &str,
        min: usize,
        wait: Duration,
    ) -> Result<BTreeMap<Slot, Vec<FileInfo>>, TrainError> {
        let deadline = Instant::now() + wait;
        let mut offers = BTreeMap::new();
        let mut refusals = Vec::new();
        loop {
            let map = self.observer.refresh().await?;
            for n in map.live(Role::Worker) {
                if offers.len() >= min {
                    break;
                }
                if n.group != Group::Idle || n.addr.is_empty() || self.tried.contains(&n.id) {
                    continue;
                }
                match self.offer(n.id, &n.addr).await? {
                    Ok((slot, files)) => {
                        offers.insert(slot, files);
                    }
                    Err(why) => refusals.push(format!("worker {}: {why}", n.id)),
                }
            }
            if offers.len() >= min {
                return Ok(offers);
            }
            if Instant::now() >= deadline {
                let mut msg = format!(
                    "waiting for {min} worker processes: {} took the job within {} s; start more with `pserver worker --manager {manager}`",
                    offers.len(),
                    wait.as_secs()
                );
                if !refusals.is_empty() {
                    msg.push_str(&format!(" (refused: {})", refusals.join("; ")));
                }
                return Err(TrainError::Config(msg));
            }
            tokio::time::sleep(MAP_EVERY).await;
        }
    }

    /// Offers the job to one idle worker of `map` not tried yet.
    pub(super) async fn take_idle(
        &mut self,
        map: &pserver_core::ClusterMap,
    ) -> Option<(Slot, Vec<FileInfo>)> {
        let idle: Vec<(u32, String)> = map
            .live(Role::Worker)
            .filter(|n| n.group == Group::Idle && !n.addr.is_empty() && !self.tried.contains(&n.id))
            .map(|n| (n.id, n.addr.clone()))
            .collect();
        for (id, addr) in idle {
            if let Ok(Ok(taken)) = self.offer(id, &addr).await {
                let _ = self.progress.send(Progress::Joined {
                    worker: taken.0,
                    node: id,
                });
                return Some(taken);
            }
        }
        None
    }

    /// Worker `slot` is lost: its units go to the others from the next
    /// step not yet issued.
    pub(super) async fn lose(
        &mut self,
        slot: Slot,
        why: String,
        assignment: &mut Assignment,
        issued: u64,
        joining: &mut Option<Joining>,
    ) -> Result<(), TrainError> {
        if !std::mem::replace(&mut self.members[slot].alive, false) {
            return Ok(());
        }
        let m = &self.members[slot];
        let _ = self.progress.send(Progress::WorkerLost {
            worker: slot,
            why: format!("worker {} at {}: {why}", m.id, m.addr),
        });
        if let Some(j) = joining.as_mut() {
            j.changed.retain(|c| *c != slot);
        }
        let changed = assignment.lose(slot);
        for to in changed {
            let units: Vec<Unit> = assignment.units.get(&to).cloned().unwrap_or_default();
            self.send(
                to,
                ToWorker::Reassign {
                    from: issued + 1,
                    units,
                },
            )
            .await;
        }
        Ok(())
    }
}
