//! Checkpoints from the worker's side: asking every primary to write its
//! ranges and writing the manifest, and loading a checkpoint into a cluster
//! of any size, piece by piece, to each piece's primary.

use super::{TableOptions, Worker};
use crate::error::NodeError;
use crate::proto::{control_request, reply_control};
use pserver_core::{KeyRange, NodeId, TableSpec};
use pserver_wire::{Control, ErrorCode, Frame, Header, Kind};
use std::time::{Duration, Instant};

impl Worker {
    /// Writes a checkpoint of every table into `dir`: each server writes the
    /// ranges it is primary of (so `dir` must be on a file system every
    /// server sees, as on one machine), then the manifest is written last.
    /// Consistent when no pushes are in flight (between training runs, or
    /// at a barrier); the map must not change meanwhile, else it fails and
    /// should be retried. Returns the manifest.
    ///
    /// A checkpoint already in `dir` stays whole until the new one is
    /// complete: the servers write into a subdirectory of the new
    /// generation, and writing the manifest switches to it (see
    /// [`crate::snapshot`]); if anything fails first, that subdirectory is
    /// removed and `dir` holds the old checkpoint as before. One checkpoint
    /// into a directory at a time.
    pub async fn checkpoint(
        &self,
        dir: &std::path::Path,
    ) -> Result<crate::snapshot::Manifest, NodeError> {
        let map = self.refresh().await?;
        let mut primaries: Vec<NodeId> = map.partitions.iter().map(|p| p.primary).collect();
        primaries.sort_unstable();
        primaries.dedup();
        let bad = |e: crate::snapshot::SnapshotError| NodeError::BadRequest(e.to_string());
        // Dropped on any early return below, which removes what the
        // servers wrote so far.
        let pending = crate::snapshot::begin(dir).map_err(bad)?;
        let mut files = Vec::new();
        let msg = Control::Snapshot {
            dir: pending.dir().display().to_string(),
        };
        for server in primaries {
            let link = self.inner.link(server, &map).await?;
            let reply = link
                .peer
                .request(control_request(self.inner.id, map.epoch, &msg))
                .await?;
            match reply_control(&reply, link.peer.label())? {
                Control::Snapshotted { files: f } => files.extend(f),
                other => {
                    return Err(NodeError::Protocol {
                        peer: link.peer.label().to_string(),
                        what: format!("expected Snapshotted, got {other:?}"),
                    });
                }
            }
        }
        let after = self.refresh().await?;
        if after.partitions != map.partitions {
            return Err(NodeError::BadRequest(
                "the cluster's ranges changed during the checkpoint; take it again".into(),
            ));
        }
        let manifest = crate::snapshot::Manifest {
            version: 1,
            epoch: map.epoch,
            tables: map.tables.clone(),
            files,
            generation: pending.generation(),
        };
        pending
            .commit(&crate::durable::Disk::new(), manifest)
            .map_err(bad)
    }

    /// Loads the checkpoint in `dir` into this cluster, whatever its number
    /// of servers: creates its tables (same names and specs; a table that
    /// exists already and holds keys is refused, before anything changes) and sends each range's slots to the range's
    /// primary (`Control::Restore`), which stores them and copies them down
    /// its chain. The whole checkpoint is read and checked first; a damaged
    /// or partial one is refused before anything changes. Returns the
    /// tables restored.
    pub async fn restore(
        &self,
        dir: &std::path::Path,
        registry: &pserver_core::updater::Registry,
    ) -> Result<Vec<TableSpec>, NodeError> {
        let width = |spec: &TableSpec| {
            registry
                .build(&spec.updater)
                .map(|u| pserver_core::store::Store::new(spec.clone(), u).slot_width())
                .unwrap_or(usize::MAX)
        };
        let ckpt =
            crate::snapshot::load(dir, width).map_err(|e| NodeError::BadRequest(e.to_string()))?;
        // A table that exists already must be empty: restoring into it
        // would merge the checkpoint with what it holds. Checked for every
        // table before anything changes.
        let map = self.refresh().await?;
        for old in &ckpt.manifest.tables {
            if map.table(&old.name).is_none() {
                continue;
            }
            let held = match self.scan(&old.name, KeyRange::ALL).await {
                Ok((keys, _)) if keys.is_empty() => continue,
                Ok((keys, _)) => keys.len().to_string(),
                // Too many keys to list in one reply: certainly not empty.
                Err(NodeError::Remote {
                    code: ErrorCode::Limit,
                    ..
                }) => "too many".to_string(),
                Err(e) => return Err(e),
            };
            return Err(NodeError::BadRequest(format!(
                "table {:?} already holds {held} keys; a checkpoint is restored into empty \
                 tables only (restore into a fresh cluster, or under other names)",
                old.name
            )));
        }
        let mut restored = Vec::new();
        for old in &ckpt.manifest.tables {
            let opts = TableOptions {
                dim: old.dim,
                init: old.init.clone(),
                updater: old.updater.clone(),
                consistency: old.consistency,
                aggregate: old.aggregate,
                job: old.job.clone(),
            };
            let spec = self.create_table(&old.name, opts).await?;
            for part in ckpt.parts.iter().filter(|p| p.table == old.id) {
                self.restore_part(&spec, part).await?;
            }
            restored.push(spec);
        }
        Ok(restored)
    }

    /// Sends one checkpoint part to the primaries of its pieces under the
    /// current map. A piece refused for a passing reason (the map moved on,
    /// a hand-off holds the range back) sends the whole part again under
    /// the newer map, until the timeout: slots are absolute, so a piece
    /// stored twice is stored once.
    async fn restore_part(
        &self,
        spec: &TableSpec,
        part: &crate::snapshot::RangePart,
    ) -> Result<(), NodeError> {
        let deadline = Instant::now() + self.inner.timeout;
        loop {
            match self.restore_part_once(spec, part).await {
                Err(e) if e.is_transient() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                done => return done,
            }
        }
    }

    async fn restore_part_once(
        &self,
        spec: &TableSpec,
        part: &crate::snapshot::RangePart,
    ) -> Result<(), NodeError> {
        let map = self.refresh().await?;
        let w = part.slot_width;
        for i in map.partitions_overlapping(part.range) {
            let p = &map.partitions[i];
            let Some(piece) = p.range.intersect(&part.range) else {
                continue;
            };
            let lo = part.keys.partition_point(|k| *k < piece.begin);
            let hi = part.keys.partition_point(|k| *k < piece.end);
            // Bounded frames; an empty piece still goes, once.
            let step = (self.inner.limits.max_frame / 2 / (8 + 4 * w.max(1))).max(1);
            let mut at = lo;
            loop {
                let end = (at + step).min(hi);
                let mut f = Frame::new(Header {
                    kind: Kind::Control,
                    sender: self.inner.id,
                    table: spec.id,
                    epoch: map.epoch,
                    range: piece,
                    ..Header::new(Kind::Control)
                });
                f.keys = part.keys[at..end].to_vec();
                f.vals = part.slots[at * w..end * w].to_vec().into();
                // The primary copies them down its own chain. Clock records
                // name the old cluster's workers: they mean nothing here
                // and are not carried over.
                f.ctrl = Control::Restore { spec: spec.clone() }.to_bytes().into();
                let link = self.inner.link(p.primary, &map).await?;
                let reply = link.peer.request(f).await?;
                reply_control(&reply, link.peer.label())?;
                at = end;
                if at >= hi {
                    break;
                }
            }
        }
        Ok(())
    }
}
