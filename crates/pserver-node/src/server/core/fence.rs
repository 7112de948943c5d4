//! Hand-off fences: two primaries never serve a range at once.
//!
//! When a range's primary changes while the old one lives (a join or a
//! drain), the old primary sends a `Fence` down the range's old chain (past
//! members the new map declares dead), behind its last changes there (the
//! new primary is on that chain), and
//! the new primary answers `EpochAhead` for the range until the fence
//! arrives, or [`FENCE_TIMEOUT_MS`](super::FENCE_TIMEOUT_MS) passes.

use super::chain::subtract_all;
use super::{ConnId, Refusal, ServerCore};
use crate::proto::{control_reply, control_request};
use pserver_core::table::subtract;
use pserver_core::{ClusterMap, KeyRange, NodeId, NodeState};
use pserver_wire::{Control, Frame, Header};

/// Fences remembered before the map that needs them arrives.
const FENCES_SEEN: usize = 1024;

impl ServerCore {
    /// Fences both ways after installing a map (`old` is the one before).
    /// Ranges this server was primary of and no longer is: a `Fence` goes
    /// down their old chain. Ranges this server is newly primary of, taken
    /// from a primary still alive: held back until that server's fence.
    /// A server in `reborn` came back under its id since `old`: a new
    /// process, which sends no fence for what its earlier one held and has
    /// none of the changes it would follow, so it counts as dead here.
    pub(super) fn fence(&mut self, old: &ClusterMap, reborn: &[NodeId]) {
        let me = self.id;
        let map = self.map.clone();
        let alive = |id: NodeId| {
            !reborn.contains(&id) && map.node(id).is_some_and(|n| n.state == NodeState::Alive)
        };
        // A fence the earlier process sent covers nothing of the new one's.
        self.fences_seen.retain(|(_, by)| !reborn.contains(by));
        let mut sends = Vec::new();
        for p in old.partitions.iter().filter(|p| p.primary == me) {
            // The old chain as this map still reaches it: a member declared
            // dead (a server drained at this very switch) passes nothing on,
            // so the fence skips it, as `reachable_chain` does further down.
            // Sent to it, the fence would be dropped and the new primary
            // would hold the range back until `FENCE_TIMEOUT_MS`.
            let chain: Vec<NodeId> = p.replicas.iter().copied().filter(|&n| alive(n)).collect();
            let Some((&next, rest)) = chain.split_first() else {
                continue;
            };
            for i in self.map.partitions_overlapping(p.range) {
                let q = &self.map.partitions[i];
                if q.primary == me {
                    continue;
                }
                let Some(piece) = q.range.intersect(&p.range) else {
                    continue;
                };
                let mut f = control_request(
                    me,
                    self.map.epoch,
                    &Control::Fence {
                        from: me,
                        chain: rest.to_vec(),
                    },
                );
                f.header.range = piece;
                sends.push((next, f));
            }
        }
        for (to, f) in sends {
            let _ = self.forward(to, f);
        }
        // Waits: drop those for ranges no longer ours, add new ones.
        self.fence_waits.retain(|(r, from, _)| {
            alive(*from)
                && map
                    .partitions_overlapping(*r)
                    .all(|i| map.partitions[i].primary == me)
        });
        let mut waits = Vec::new();
        for q in map.partitions.iter().filter(|q| q.primary == me) {
            for i in old.partitions_overlapping(q.range) {
                let p = &old.partitions[i];
                if p.primary == me || !alive(p.primary) {
                    continue;
                }
                if let Some(piece) = q.range.intersect(&p.range) {
                    waits.push((piece, p.primary));
                }
            }
        }
        for w in waits {
            self.add_fence_wait(w);
        }
    }

    /// Holds `range` back until `from` fences it, unless it already has.
    fn add_fence_wait(&mut self, (range, from): (KeyRange, NodeId)) {
        let seen: Vec<KeyRange> = self
            .fences_seen
            .iter()
            .filter(|(_, by)| *by == from)
            .map(|(r, _)| *r)
            .collect();
        let now = self.now_ms;
        self.fence_waits.extend(
            subtract_all(range, &seen)
                .into_iter()
                .map(|r| (r, from, now)),
        );
    }

    /// A `Fence` arrived: forward it down its chain, release what it covers.
    pub(super) fn fenced(
        &mut self,
        h: &Header,
        from: NodeId,
        chain: Vec<NodeId>,
        conn: ConnId,
    ) -> Result<Option<Frame>, Refusal> {
        self.check_server(h, "fences")?;
        let chain = self.reachable_chain(h, chain)?;
        let r = h.range;
        let before = self.fence_waits.len();
        self.fence_waits = std::mem::take(&mut self.fence_waits)
            .into_iter()
            .flat_map(|(w, by, since)| {
                let left = if by == from { subtract(w, r) } else { vec![w] };
                left.into_iter().map(move |l| (l, by, since))
            })
            .collect();
        if self.fence_waits.len() == before {
            // Not awaited yet: the map that needs it has not arrived.
            self.fences_seen.push((r, from));
            let excess = self.fences_seen.len().saturating_sub(FENCES_SEEN);
            self.fences_seen.drain(..excess);
        }
        let ok = control_reply(h, self.id, self.map.epoch, &Control::Ok);
        let Some((&next, rest)) = chain.split_first() else {
            return Ok(Some(ok));
        };
        let mut f = control_request(
            self.id,
            self.map.epoch,
            &Control::Fence {
                from,
                chain: rest.to_vec(),
            },
        );
        f.header.range = r;
        Ok(self.pass_on(next, f, h, conn, ok))
    }
}
