//! Chain replication, both ends: what a primary queues down its chains
//! (pushes' resulting slots, applied sums, copies for new replicas), and how
//! a chain member takes a change and passes it on.
//!
//! Order matters (slots are absolute), so every change to one server goes
//! through one queue ([`Effect::Forward`](super::Effect::Forward)), filled in
//! the order the changes were made.

use super::request::Replicate;
use super::{ConnId, Effect, Refusal, ServerCore, Ticket};
use crate::proto::control_reply;
use pserver_core::table::{Keys, Push, PushCtx, TableError, subtract};
use pserver_core::{ClusterMap, KeyRange, NodeId, NodeState, Role, TableSpec};
use pserver_wire::header::FLAG_DENSE;
use pserver_wire::message::Replica;
use pserver_wire::{Control, Frame, Header, Kind};

impl ServerCore {
    /// Queues `frame` for server `to`; `None` when `to` is not a live
    /// server of the map.
    pub(super) fn forward(&mut self, to: NodeId, frame: Frame) -> Option<Ticket> {
        let node = self.map.node(to).filter(|n| n.state != NodeState::Dead)?;
        let addr = node.addr.clone();
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.linked.insert(to);
        self.effects.push(Effect::Forward {
            to,
            addr,
            ticket,
            frame,
        });
        Some(ticket)
    }

    /// Forwards `frame` to `next` (the rest of a chain) and holds `ok`, the
    /// answer to the request `h` that arrived on `conn`, until the chain
    /// has it; answers at once when `next` is not a live server.
    pub(super) fn pass_on(
        &mut self,
        next: NodeId,
        frame: Frame,
        h: &Header,
        conn: ConnId,
        ok: Frame,
    ) -> Option<Frame> {
        match self.forward(next, frame) {
            Some(t) => {
                let stale = self.stale_reply(h);
                self.defer(conn, Some(ok), stale, &[t]);
                None
            }
            None => Some(ok),
        }
    }

    /// The rest of a chain a change must be forwarded along, as this server
    /// can reach it. A server this map does not know, named by a sender
    /// with a newer map, means this server is behind: the change is refused
    /// for now (`EpochAhead`, nothing applied) and its forwarder resends it
    /// once the map has arrived. Servers this map knows to be dead are
    /// skipped: the primary fills whoever replaces them.
    pub(super) fn reachable_chain(
        &self,
        h: &Header,
        chain: Vec<NodeId>,
    ) -> Result<Vec<NodeId>, Refusal> {
        let mut out = Vec::with_capacity(chain.len());
        for n in chain {
            match self.map.node(n) {
                // Dead here but named by a newer map: it came back under
                // its id, and must get the change; wait for that map.
                Some(info) if info.state == NodeState::Dead && h.epoch > self.map.epoch => {
                    return Err(Refusal::UnknownServer {
                        node: n,
                        have: self.map.epoch,
                        got: h.epoch,
                    });
                }
                Some(info) if info.state == NodeState::Dead => {}
                Some(_) => out.push(n),
                None if h.epoch > self.map.epoch => {
                    return Err(Refusal::UnknownServer {
                        node: n,
                        have: self.map.epoch,
                        got: h.epoch,
                    });
                }
                None => {}
            }
        }
        Ok(out)
    }

    /// Sends an applied push down the chain of its partition: the keys'
    /// resulting slots, or (for an aggregating table) the push itself, which
    /// replicas sum as the primary does. Returns what the acknowledgement
    /// must wait for (nothing without replicas). A push found to be a
    /// duplicate is sent too, as an empty change: it queues behind the
    /// original's replication, so its ack cannot overtake it.
    pub(super) fn replicate_push(
        &mut self,
        frame: &Frame,
        aggregated: bool,
        slots: Option<Vec<f32>>,
    ) -> Option<Ticket> {
        let h = frame.header;
        let chain = self
            .map
            .partition_of(h.range.begin)
            .map(|i| self.map.partitions[i].replicas.clone())
            .unwrap_or_default();
        let (&next, rest) = chain.split_first()?;
        let table = self.table(h.table)?;
        let store = table.store();
        let spec = store.spec().clone();
        let mut f = Frame::new(Header {
            kind: Kind::Control,
            flags: h.flags & FLAG_DENSE,
            sender: self.id,
            ..h
        });
        let what = if aggregated {
            f.keys = frame.keys.clone();
            f.vals = frame.vals.clone();
            Replica::Push { worker: h.sender }
        } else {
            f.header.flags = 0;
            f.keys = if h.dense() {
                (h.range.begin..h.range.end).collect()
            } else {
                frame.keys.clone()
            };
            // Computed already when the push ran on a lent table.
            f.vals = slots.unwrap_or_else(|| store.slots_of(&f.keys)).into();
            Replica::Slots
        };
        let records = if aggregated {
            Vec::new()
        } else {
            vec![(h.sender, h.range, h.clock)]
        };
        f.ctrl = replicate_ctrl(spec, what, records, rest.to_vec());
        self.forward(next, f)
    }

    /// Replicates the sums just applied where this server is the primary
    /// and the range has replicas (with the range's clock records up to the
    /// sum's clock, so a promoted replica knows which clocks are complete),
    /// and releases their held acknowledgements once the chains have the
    /// result. A sum the store refused releases its acks as refusals.
    pub(super) fn release_applied(&mut self) {
        let me = self.id;
        for (table_id, a) in std::mem::take(&mut self.applied) {
            if let Some(e) = &a.refused {
                tracing::error!(node = me, table = table_id, clock = a.clock, error = %e, "aggregated sum refused");
                let r = Refusal::Table(TableError::Store(e.clone()));
                self.release_held(table_id, a.clock, &[], Some(&r));
                continue;
            }
            let mut tickets = Vec::new();
            if self.cfg.replicate_after_aggregation {
                let Some(table) = self.table(table_id) else {
                    continue;
                };
                let store = table.store();
                let spec = store.spec().clone();
                let mut frames = Vec::new();
                for p in self.map.partitions.iter().filter(|p| {
                    p.primary == me
                        && !p.replicas.is_empty()
                        && a.ranges.iter().any(|r| r.intersect(&p.range).is_some())
                }) {
                    let mut f = Frame::new(Header {
                        table: table_id,
                        sender: me,
                        epoch: self.map.epoch,
                        clock: a.clock,
                        range: p.range,
                        ..Header::new(Kind::Control)
                    });
                    f.keys = a
                        .keys
                        .iter()
                        .copied()
                        .filter(|k| p.range.contains(*k))
                        .collect();
                    f.vals = store.slots_of(&f.keys).into();
                    // Up to this clock: a later push already recorded here
                    // is in a later sum, which the replica must not count
                    // as applied yet.
                    let records = table
                        .clock()
                        .records_in(p.range)
                        .into_iter()
                        .filter(|&(_, _, c)| c <= a.clock)
                        .collect();
                    f.ctrl = replicate_ctrl(
                        spec.clone(),
                        Replica::Flushed { clock: a.clock },
                        records,
                        p.replicas[1..].to_vec(),
                    );
                    frames.push((p.replicas[0], f));
                }
                for (to, f) in frames {
                    tickets.extend(self.forward(to, f));
                }
            }
            self.release_held(table_id, a.clock, &tickets, None);
        }
    }

    /// Copies each range this server is now primary of to the chain of
    /// replicas, when one of them did not hold all of it under `old` (a
    /// replica replaced after a failure, or a range that grew). The copy is
    /// queued before any later change, on the same ordered queue, so the
    /// replica ends with the primary's state. Whole slots and clock records
    /// travel, so the copy refuses the same duplicates.
    pub(super) fn fill_new_replicas(&mut self, old: &ClusterMap, abandoned: &[NodeId]) {
        if old.partitions.is_empty() {
            return;
        }
        // A replica downstream of an abandoned one may have missed changes
        // that were queued to it: it counts as not holding the range. Nor
        // does an abandoned one that is in the new map: a server that came
        // back under its id, empty.
        let holds = |node: NodeId, r: KeyRange| {
            !abandoned.contains(&node)
                && old
                    .partitions_overlapping(r)
                    .map(|i| &old.partitions[i])
                    .all(|p| {
                        let at = std::iter::once(p.primary)
                            .chain(p.replicas.iter().copied())
                            .position(|n| n == node);
                        at.is_some_and(|at| {
                            !p.replicas
                                .iter()
                                .take(at.saturating_sub(1))
                                .any(|n| abandoned.contains(n))
                        })
                    })
        };
        let mut copies = Vec::new();
        for p in self.map.partitions.iter().filter(|p| p.primary == self.id) {
            let Some((&next, rest)) = p.replicas.split_first() else {
                continue;
            };
            if p.replicas.iter().all(|&r| holds(r, p.range)) {
                continue;
            }
            for t in self.tables.values().filter_map(|t| t.as_ref().ok()) {
                let store = t.store();
                let entries = store.entries_in(p.range);
                let records = t.clock().records_in(p.range);
                if entries.is_empty() && records.is_empty() {
                    continue;
                }
                let spec = store.spec().clone();
                // Bounded frames: a large range goes in several copies,
                // the clock records with the first.
                let per_frame = (self.cfg.limits.max_frame / 2 / (8 + 4 * store.slot_width()))
                    .clamp(1, self.cfg.limits.max_keys.max(1));
                let mut chunks: Vec<&[(u64, &[f32])]> = entries.chunks(per_frame).collect();
                if chunks.is_empty() {
                    chunks.push(&[]);
                }
                for (i, chunk) in chunks.into_iter().enumerate() {
                    let mut f = Frame::new(Header {
                        table: spec.id,
                        sender: self.id,
                        epoch: self.map.epoch,
                        range: p.range,
                        ..Header::new(Kind::Control)
                    });
                    f.keys = chunk.iter().map(|(k, _)| *k).collect();
                    f.vals = chunk.iter().flat_map(|(_, s)| s.iter().copied()).collect();
                    f.ctrl = replicate_ctrl(
                        spec.clone(),
                        Replica::Copy { reset: i == 0 },
                        if i == 0 { records.clone() } else { Vec::new() },
                        rest.to_vec(),
                    );
                    copies.push((next, f));
                }
                // Sums not yet applied, so that the range's new holders
                // apply the same sums when the clock completes.
                for (&clock, agg) in t.pending() {
                    // The sums go with the first piece; the other pieces
                    // only tell which ranges the clock must complete over.
                    let mut keys_sent = false;
                    for r in agg.ranges() {
                        let Some(piece) = r.intersect(&p.range) else {
                            continue;
                        };
                        let mut f = Frame::new(Header {
                            table: spec.id,
                            sender: self.id,
                            epoch: self.map.epoch,
                            range: piece,
                            ..Header::new(Kind::Control)
                        });
                        if !keys_sent {
                            keys_sent = true;
                            let vals;
                            (f.keys, vals) = agg.sums_in(p.range);
                            f.vals = vals.into();
                        }
                        f.ctrl = replicate_ctrl(
                            spec.clone(),
                            Replica::Pending { clock },
                            Vec::new(),
                            rest.to_vec(),
                        );
                        copies.push((next, f));
                    }
                }
            }
        }
        for (to, f) in copies {
            tracing::debug!(
                node = self.id,
                to,
                keys = f.keys.len(),
                "copying a range to a new replica"
            );
            // Nobody waits for a copy; the queue's order is what matters.
            let _ = self.forward(to, f);
        }
    }

    /// Drops the parts of unapplied sums over ranges this server no longer
    /// holds (as primary or replica): nobody will complete them here, and
    /// as the oldest clocks they would hold back every later clock of the
    /// ranges it keeps. Acks held for sums this server no longer completes
    /// as primary go back as `NotOwner`: the workers resend, as retries, to
    /// the range's primary, which has their pushes from its copy.
    pub(super) fn prune_pending(&mut self) {
        let me = self.id;
        let held = self.held_ranges();
        let map = self.map.clone();
        let primary_of_all = |r: &KeyRange| {
            map.partitions_overlapping(*r)
                .all(|i| map.partitions[i].primary == me)
        };
        let mut orphans = Vec::new();
        for (&id, t) in &mut self.tables {
            if let Ok(t) = t {
                for clock in t.prune(&held, primary_of_all) {
                    orphans.push((id, clock));
                }
            }
        }
        for key in orphans {
            for h in self.held.remove(&key).unwrap_or_default() {
                self.send(h.conn, h.stale);
            }
        }
    }

    /// Takes a change from the previous server of a chain: stores it,
    /// forwards it along the rest of the chain, and answers once that is done.
    pub(super) fn replicate(
        &mut self,
        r: Replicate,
        conn: ConnId,
    ) -> Result<Option<Frame>, Refusal> {
        let Replicate {
            frame,
            spec,
            what,
            records,
            chain,
        } = r;
        let h = frame.header;
        self.check_server(&h, "chain changes")?;
        let me = self.id;
        // Changes from one server arrive in the order it made them, each
        // with absolute slots: once one is refused, a later one under the
        // same map would land on the gap it left (its slots carry the
        // refused push's effect, not its clock record, and the worker's
        // resend would apply it again). Refused too, each push goes to the
        // current primary whole. A change under a newer map comes after
        // that map's copies, which fill the gap.
        if let Some(&refused) = self.refused_chain.get(&h.sender) {
            if h.epoch <= refused {
                return Err(Refusal::AfterRefused {
                    me,
                    from: h.sender,
                    refused,
                    got: h.epoch,
                });
            }
        }
        // A change for a range this server no longer holds, from a sender
        // whose map is not newer: the sender is behind (the range has moved
        // on); refusing makes it send its client to the current primary.
        // From a newer map, this server is the one behind, and takes it.
        let holds = self.map.partitions_overlapping(h.range).any(|i| {
            let p = &self.map.partitions[i];
            p.primary == me || p.replicas.contains(&me)
        });
        let stale = if h.epoch <= self.map.epoch && !holds {
            Some(Refusal::NotHeld {
                me,
                range: h.range,
                epoch: self.map.epoch,
            })
        } else if h.epoch < self.map.epoch && self.superseded(h.range) {
            Some(Refusal::Superseded {
                me,
                range: h.range,
                got: h.epoch,
                have: self.map.epoch,
            })
        } else {
            None
        };
        if let Some(refusal) = stale {
            let at = self.refused_chain.entry(h.sender).or_insert(0);
            *at = (*at).max(h.epoch);
            return Err(refusal);
        }
        let chain = self.reachable_chain(&h, chain)?;
        let workers = self.map.workers_of(&spec);
        let gate = self.gate();
        let table = self.table_for(&spec)?;
        match what {
            Replica::Slots | Replica::Copy { .. } | Replica::Flushed { .. } => {
                if let Replica::Flushed { clock } = what {
                    // The applied sum includes whatever part of it came here
                    // raw: drop that part, over this frame's range.
                    table.replica_flushed(clock, h.range);
                }
                if let Replica::Copy { reset: true } = what {
                    table.replica_reset(h.range);
                }
                table.replica_slots(&frame.keys, &frame.vals, &records)?;
            }
            Replica::Pending { clock } => {
                table.replica_pending(clock, h.range, &frame.keys, &frame.vals, &records)?;
            }
            Replica::Push { worker } => {
                // The same push path as the primary's, summing it here.
                let push = Push {
                    sender: worker,
                    range: h.range,
                    clock: h.clock,
                    retry: true,
                    keys: if h.flags & FLAG_DENSE != 0 {
                        Keys::Dense
                    } else {
                        Keys::List(&frame.keys)
                    },
                    vals: &frame.vals,
                };
                let ctx = PushCtx {
                    aggregate: spec.aggregate && workers.contains(&worker),
                    workers: &workers,
                    gate: gate.as_deref(),
                };
                // A forwarder's resend finds it summed: a success.
                let pushed = table.push(&push, ctx)?;
                self.applied
                    .extend(pushed.flushed.into_iter().map(|a| (spec.id, a)));
            }
        }
        // Replayed clock records may complete sums waiting here: apply them
        // now, as a push completing them would, before anyone reads.
        if let Some(Ok(t)) = self.tables.get_mut(&h.table) {
            let done = t.flush(&workers, gate.as_deref());
            self.applied.extend(done.into_iter().map(|a| (h.table, a)));
        }
        let ok = control_reply(&h, self.id, self.map.epoch, &Control::Ok);
        let Some((&next, rest)) = chain.split_first() else {
            return Ok(Some(ok));
        };
        let mut f = frame;
        f.header.sender = self.id;
        f.ctrl = replicate_ctrl(spec, what, records, rest.to_vec());
        Ok(self.pass_on(next, f, &h, conn, ok))
    }
}

impl ServerCore {
    /// True when part of `range` is this server's own (it is primary) and
    /// no fence from a former primary is awaited there: a chain change made
    /// under an older map for it comes from a primary replaced since (its
    /// last changes came before its fence, or it died or was retired at
    /// the switch), and its absolute slots would undo pushes applied here
    /// since. Refused, it is acknowledged to no one, and its worker resends
    /// it here. (Only upstream members send changes, and a primary has none
    /// under its own map.)
    fn superseded(&self, range: KeyRange) -> bool {
        let me = self.id;
        let now = self.now_ms;
        let awaited: Vec<KeyRange> = self
            .fence_waits
            .iter()
            .filter(|(_, _, since)| now.saturating_sub(*since) < super::FENCE_TIMEOUT_MS)
            .map(|(r, _, _)| *r)
            .collect();
        self.map.partitions_overlapping(range).any(|i| {
            let p = &self.map.partitions[i];
            p.primary == me
                && p.range
                    .intersect(&range)
                    .is_some_and(|own| !subtract_all(own, &awaited).is_empty())
        })
    }

    /// Chain messages come only from servers: a live server of this map,
    /// or one this map does not know yet when the sender's map is newer
    /// (then it is refused for now, and its forwarder resends once the map
    /// arrives). A server declared dead may still run (frozen, then
    /// resumed): its changes are refused, so it cannot acknowledge them,
    /// and its workers retry at the range's current primary. So are those
    /// of an earlier process of a server that came back under its id: they
    /// carry an epoch before the map that took the id back
    /// ([`NodeInfo::joined`](pserver_core::map::NodeInfo::joined)). A
    /// sender dead here with a newer map may be such a returned server: it
    /// is refused for now, like one this map does not know.
    pub(super) fn check_server(&self, h: &Header, what: &'static str) -> Result<(), Refusal> {
        match self.map.node(h.sender) {
            Some(n) if n.role != Role::Server => Err(Refusal::NotAServer(h.sender, what)),
            Some(n) if n.state == NodeState::Dead && h.epoch > self.map.epoch => {
                Err(Refusal::UnknownServer {
                    node: h.sender,
                    have: self.map.epoch,
                    got: h.epoch,
                })
            }
            Some(n) if n.state == NodeState::Dead => Err(Refusal::SenderDead(h.sender)),
            Some(n) if h.epoch < n.joined => Err(Refusal::EarlierProcess {
                node: h.sender,
                epoch: h.epoch,
                joined: n.joined,
            }),
            Some(_) => Ok(()),
            None if h.epoch > self.map.epoch => Err(Refusal::UnknownServer {
                node: h.sender,
                have: self.map.epoch,
                got: h.epoch,
            }),
            None => Err(Refusal::NotAServer(h.sender, what)),
        }
    }

    /// A checkpoint's slots for a range this server is primary of: checked
    /// and stored, then copied down this server's own chain for the range;
    /// answered once the chain has them.
    pub(super) fn restore(
        &mut self,
        spec: TableSpec,
        frame: Frame,
        conn: ConnId,
    ) -> Result<Option<Frame>, Refusal> {
        let h = frame.header;
        if h.epoch > self.map.epoch {
            return Err(Refusal::EpochAhead {
                got: h.epoch,
                have: self.map.epoch,
            });
        }
        self.check_lease()?;
        let part = self
            .map
            .partition_of(h.range.begin)
            .map(|i| self.map.partitions[i].clone())
            .filter(|p| p.primary == self.id && p.range.covers(&h.range) && !h.range.is_empty());
        let Some(part) = part else {
            return Err(Refusal::NotPrimary {
                me: self.id,
                range: h.range,
            });
        };
        if frame.keys.iter().any(|k| !h.range.contains(*k)) {
            return Err(Refusal::OutsideRange(h.range));
        }
        if let Some(i) = frame.keys.windows(2).position(|w| w[0] >= w[1]) {
            return Err(Refusal::Unsorted(i + 1));
        }
        let table = self.table_for(&spec)?;
        table.replica_slots(&frame.keys, &frame.vals, &[])?;
        let ok = control_reply(&h, self.id, self.map.epoch, &Control::Ok);
        let Some((&next, rest)) = part.replicas.split_first() else {
            return Ok(Some(ok));
        };
        let mut f = Frame::new(Header {
            kind: Kind::Control,
            flags: 0,
            sender: self.id,
            epoch: self.map.epoch,
            ..h
        });
        f.keys = frame.keys;
        f.vals = frame.vals;
        f.ctrl = replicate_ctrl(spec, Replica::Slots, Vec::new(), rest.to_vec());
        Ok(self.pass_on(next, f, &h, conn, ok))
    }
}

/// The control section of a chain change.
fn replicate_ctrl(
    spec: TableSpec,
    what: Replica,
    records: Vec<(NodeId, KeyRange, u64)>,
    chain: Vec<NodeId>,
) -> bytes::Bytes {
    Control::Replicate {
        spec,
        what,
        records,
        chain,
    }
    .to_bytes()
    .into()
}

/// The parts of `r` outside every range of `cuts`.
pub(super) fn subtract_all(r: KeyRange, cuts: &[KeyRange]) -> Vec<KeyRange> {
    let mut left = vec![r];
    for c in cuts {
        left = left.iter().flat_map(|l| subtract(*l, *c)).collect();
    }
    left
}
