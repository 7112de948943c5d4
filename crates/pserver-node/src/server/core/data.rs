//! The data path: admitting pushes and pulls, applying pushes through the
//! table, answering pulls now or when the consistency model allows.
//!
//! Key caching: a data frame flagged `FLAG_CACHE_KEYS` leaves its key list
//! in the bounded [`KeyCache`](pserver_core::keycache::KeyCache); a later
//! frame of the same sender and table may then carry only `[hash, count]`
//! (`FLAG_KEYREF`), which is resolved to the list before any other check,
//! or refused with `KeyCacheMiss`.

use super::request::{Data, Op, Significant};
use super::{ConnId, Held, Refusal, ServerCore, Ticket, Waiting};
use crate::proto::{control_reply, error_reply, reply_header};
use pserver_core::map::Role;
use pserver_core::table::{Keys, Push, PushCtx};
use pserver_core::{Consistency, KeyRange};
use pserver_wire::header::{
    FLAG_CACHE_KEYS, FLAG_KEYREF, FLAG_PACK_REPLY, FLAG_RETRY, FLAG_SIGNIFICANT,
};
use pserver_wire::{Control, ErrorCode, Frame, Header, Kind};

impl ServerCore {
    /// Checks epoch, table, ownership and keys of a data request.
    pub(super) fn admit(&self, h: &Header, keys: &[u64]) -> Result<(), Refusal> {
        if h.epoch < self.map.epoch {
            return Err(Refusal::StaleEpoch);
        }
        if h.epoch > self.map.epoch {
            return Err(Refusal::EpochAhead {
                got: h.epoch,
                have: self.map.epoch,
            });
        }
        self.check_lease()?;
        if !self.tables.contains_key(&h.table) {
            return Err(Refusal::UnknownTable(h.table));
        }
        let owned = self
            .map
            .partition_of(h.range.begin)
            .map(|i| &self.map.partitions[i])
            .is_some_and(|p| p.primary == self.id && p.range.covers(&h.range));
        if h.range.is_empty() || !owned {
            return Err(Refusal::NotPrimary {
                me: self.id,
                range: h.range,
            });
        }
        if let Some((r, from, _)) = self.fence_waits.iter().find(|(r, _, since)| {
            r.intersect(&h.range).is_some()
                && self.now_ms.saturating_sub(*since) < super::FENCE_TIMEOUT_MS
        }) {
            return Err(Refusal::HandingOver {
                range: *r,
                from: *from,
            });
        }
        if h.dense() {
            if h.range.len() > self.cfg.limits.max_keys as u64 {
                return Err(Refusal::DenseTooLarge {
                    range: h.range,
                    max: self.cfg.limits.max_keys,
                });
            }
        } else {
            if let Some(i) = keys.windows(2).position(|w| w[0] >= w[1]) {
                return Err(Refusal::Unsorted(i + 1));
            }
            if let (Some(&first), Some(&last)) = (keys.first(), keys.last()) {
                if !h.range.contains(first) || !h.range.contains(last) {
                    return Err(Refusal::OutsideRange(h.range));
                }
            }
        }
        Ok(())
    }

    /// Refuses a push from a worker outside the table's group: the table's
    /// consistency and sums do not count it, so its pushes would land
    /// outside every clock the job waits for (a worker given to another
    /// job, or an idle one). Clients are not in the map and may push.
    fn check_group(&self, h: &Header) -> Result<(), Refusal> {
        let (Some(node), Some(table)) = (self.map.node(h.sender), self.map.table_by_id(h.table))
        else {
            return Ok(());
        };
        if node.role != Role::Worker || node.group == table.group() {
            return Ok(());
        }
        Err(Refusal::OtherGroup {
            sender: h.sender,
            group: node.group.clone(),
            table: table.name.clone(),
            table_group: table.group(),
        })
    }

    /// Refuses data while this server's own view of its lease has lapsed:
    /// the manager declares a server dead after three quarters of the
    /// lease in silence, and this server stops at half, so a server cut
    /// off from the manager never serves a range another server was given.
    pub(super) fn check_lease(&self) -> Result<(), Refusal> {
        let Some(seen) = self.manager_seen_ms else {
            return Ok(());
        };
        let silent_ms = self.now_ms.saturating_sub(seen);
        let half_ms = self.map.lease_ms / 2;
        if silent_ms > half_ms {
            return Err(Refusal::LeaseLapsed {
                me: self.id,
                silent_ms,
                half_ms,
            });
        }
        Ok(())
    }

    /// A redirect carrying the current map.
    fn redirect(&self, h: &Header) -> Frame {
        let mut r = Frame::control(
            reply_header(h, Kind::Redirect, self.id, self.map.epoch),
            &Control::Map((*self.map).clone()),
        );
        r.header.flags = 0;
        r
    }

    /// A push, pull or push-pull: the reply to send now, or `None` when it
    /// goes out later (after replication, or once the pull may be
    /// answered).
    pub(super) fn data(&mut self, req: Data, conn: ConnId) -> Result<Option<Frame>, Refusal> {
        let Data {
            frame,
            op,
            consistency,
            significant,
        } = req;
        let h = frame.header;
        if h.epoch < self.map.epoch {
            return Ok(Some(self.redirect(&h)));
        }
        // Pulls that cannot be answered yet wait in memory: bound them per
        // connection, refusing before anything (a push-pull's push) applies.
        if op.waits() {
            let waiting = self.waiting.iter().filter(|w| w.conn == conn).count();
            if waiting >= self.cfg.limits.max_waiting {
                return Err(Refusal::TooManyWaiting(waiting));
            }
        }
        // From here on the frame carries its key list, whichever way it came,
        // and every check below applies to that list.
        let mut frame = self.resolve_keys(frame)?;
        self.admit(&frame.header, &frame.keys)?;
        if op.pushes() {
            self.check_group(&frame.header)?;
            // Its clock records are forgotten (or will be at this map):
            // applying it could apply it twice.
            if self.map.departed(frame.header.sender) {
                return Err(Refusal::Departed(frame.header.sender));
            }
        }
        // Only after admission: a refused request changes nothing, and only
        // lists this server would accept are worth naming later. The cache
        // hashes the list itself; the sender never says how. The flag stays
        // on the frame only if the list was kept, and is echoed on the
        // reply so the sender refers to lists this server really holds.
        let fh = frame.header;
        let kept = fh.flags & FLAG_CACHE_KEYS != 0
            && op != Op::Scan
            && self
                .key_cache
                .insert(fh.sender, fh.table, &frame.keys)
                .is_some();
        if !kept {
            frame.header.flags &= !FLAG_CACHE_KEYS;
        }
        let h = frame.header;
        if op == Op::Scan {
            return self.scan(&h).map(Some);
        }
        // Replication after aggregation: a worker's push into an aggregating
        // table with replicas is acknowledged once its clock's sum is
        // applied and replicated, which is one message per clock.
        let aggregated = self.aggregates(&h);
        let hold = aggregated
            && op == Op::Push
            && self.cfg.replicate_after_aggregation
            && self.has_replicas(h.range);
        let consistency = consistency.unwrap_or_else(|| {
            self.map
                .table_by_id(h.table)
                .map(|t| t.consistency)
                .unwrap_or(Consistency::Eventual)
        });
        let plan = Plan {
            frame,
            op,
            consistency,
            aggregated,
            hold,
            significant,
        };
        if self.lends(&plan) {
            return self.lend(conn, plan).map(|()| None);
        }
        // A push-pull reads its keys in the same pass over the table as it
        // updates them; the reply is made here when the pull may be
        // answered at once (else it waits, and reads again when it goes).
        let (pushed, pulled) = match op {
            Op::PushPull => {
                let width = plan.frame.vals.len();
                let mut vals = pserver_wire::vals::buffer(width);
                let pushed = self.push_into(&plan.frame, Some(&mut vals))?;
                let ready = self.ready(&plan.frame.header, consistency);
                let reply = ready.then(|| {
                    let ctrl = pull_ctrl(Some(pushed));
                    reply_with(&plan.frame.header, ctrl, vals, self.id, self.map.epoch)
                });
                (Some(pushed), reply)
            }
            op if op.pushes() => (Some(self.push(&plan.frame)?), None),
            _ => (None, None),
        };
        Ok(self.after_push(conn, plan, pushed, None, pulled))
    }

    /// The rest of a data request once its push part (if any) is applied:
    /// replication, the acknowledgement, and the pull part, answered now or
    /// parked. `slots` and `pulled` are what a lent table's work already
    /// computed (the push's resulting slots to replicate, the pull's reply).
    pub(super) fn after_push(
        &mut self,
        conn: ConnId,
        plan: Plan,
        pushed: Option<(u64, u64)>,
        slots: Option<Vec<f32>>,
        pulled: Option<Frame>,
    ) -> Option<Frame> {
        let Plan {
            mut frame,
            op,
            consistency,
            aggregated,
            hold,
            significant,
        } = plan;
        let h = frame.header;
        let mut after: Vec<Ticket> = Vec::new();
        if op.pushes() && !hold {
            after.extend(self.replicate_push(&frame, aggregated, slots));
        }
        if op == Op::Push {
            let (applied, duplicate) = pushed.unwrap_or((0, 0));
            let mut reply = control_reply(
                &h,
                self.id,
                self.map.epoch,
                &Control::PushAck { applied, duplicate },
            );
            reply.header.flags = h.flags & FLAG_CACHE_KEYS;
            if hold {
                return self.hold_ack(conn, &h, reply);
            }
            if after.is_empty() {
                return Some(reply);
            }
            let stale = self.stale_reply(&h);
            self.defer(conn, Some(reply), stale, &after);
            return None;
        }
        frame.vals = pserver_wire::Vals::new();
        frame.ctrl = pull_ctrl(pushed);
        let reply = match pulled {
            Some(r) => Some(r),
            None if self.ready(&frame.header, consistency) => Some(self.answer_pull(&frame)),
            None => None,
        }
        .map(|r| self.filter_reply(conn, &frame, significant, r));
        if let Some(reply) = reply {
            if after.is_empty() {
                return Some(reply);
            }
            let stale = self.stale_reply(&h);
            self.defer(conn, Some(reply), stale, &after);
            None
        } else {
            let ack = if after.is_empty() {
                None
            } else {
                let stale = self.stale_reply(&h);
                self.defer(conn, None, stale, &after)
            };
            self.waiting.push(Waiting {
                frame,
                conn,
                consistency,
                ack,
                significant,
            });
            None
        }
    }

    /// True when the partition holding `range` has replicas in this map.
    fn has_replicas(&self, range: KeyRange) -> bool {
        self.map
            .partition_of(range.begin)
            .is_some_and(|i| !self.map.partitions[i].replicas.is_empty())
    }

    /// Keeps a push's acknowledgement with its clock's sum, to go out once
    /// the sum is applied and replicated; returns it to send now when no
    /// sum of the clock over the push's range is pending here or was just
    /// applied (a retry of a push applied long ago).
    ///
    /// Only a sum over the push's own range counts: this server is its
    /// primary, so it applies that sum and releases the ack. Another part
    /// of the clock's sum may be one it only replicates (a copy of another
    /// primary's range in a hand-off), which that primary's `Flushed`
    /// removes without applying anything here: an ack held for it would
    /// never be released.
    fn hold_ack(&mut self, conn: ConnId, h: &Header, reply: Frame) -> Option<Frame> {
        let pending = self
            .table(h.table)
            .is_some_and(|t| t.has_pending_over(h.clock, h.range));
        let applied = self.applied.iter().any(|(t, a)| {
            *t == h.table
                && a.clock == h.clock
                && a.ranges.iter().any(|r| r.intersect(&h.range).is_some())
        });
        if !pending && !applied {
            return Some(reply);
        }
        let stale = self.stale_reply(h);
        self.held.entry((h.table, h.clock)).or_default().push(Held {
            conn,
            request: *h,
            reply,
            stale,
        });
        None
    }

    /// True when a push with header `h` goes into an aggregate rather than
    /// straight through the updater.
    pub(super) fn aggregates(&self, h: &Header) -> bool {
        self.map
            .table_by_id(h.table)
            .is_some_and(|t| t.aggregate && self.map.workers_of(t).contains(&h.sender))
    }

    /// Replaces the `[hash, count]` of a key-reference frame by the list it
    /// names; other frames pass through. A miss is refused with
    /// `KeyCacheMiss` before anything else happens, so the sender can resend
    /// the keys and nothing is applied twice.
    fn resolve_keys(&mut self, mut frame: Frame) -> Result<Frame, Refusal> {
        if !frame.header.key_ref() {
            return Ok(frame);
        }
        let h = frame.header;
        // The decoder has checked the shape; refuse rather than trust it.
        let (hash, count) = frame.key_ref().ok_or(Refusal::BadKeyRef)?;
        let keys =
            self.key_cache
                .get(h.sender, h.table, hash, count)
                .ok_or(Refusal::KeyCacheMiss {
                    hash,
                    count,
                    sender: h.sender,
                    table: h.table,
                })?;
        frame.keys = keys.to_vec();
        frame.header.flags &= !FLAG_KEYREF;
        Ok(frame)
    }

    /// Applies a push (already admitted) through its table. Returns
    /// (applied, duplicate) key counts.
    pub(super) fn push(&mut self, frame: &Frame) -> Result<(u64, u64), Refusal> {
        self.push_into(frame, None)
    }

    /// [`ServerCore::push`] that, given `read`, appends the weights of the
    /// push's keys after it there (a push-pull; see `Table::push_pull`).
    fn push_into(
        &mut self,
        frame: &Frame,
        read: Option<&mut Vec<f32>>,
    ) -> Result<(u64, u64), Refusal> {
        let h = &frame.header;
        let gate = self.gate();
        let table = match self.tables.get_mut(&h.table) {
            Some(Ok(t)) => t,
            Some(Err(e)) => {
                return Err(Refusal::TableUnusable {
                    table: h.table,
                    why: e.clone(),
                });
            }
            None => return Err(Refusal::UnknownTable(h.table)),
        };
        let push = as_push(frame);
        let workers = self.map.workers_of(table.spec());
        let ctx = PushCtx {
            aggregate: table.spec().aggregate && workers.contains(&h.sender),
            workers: &workers,
            gate: gate.as_deref(),
        };
        let pushed = match read {
            Some(out) => table.push_pull(&push, ctx, out)?,
            None => table.push(&push, ctx)?,
        };
        self.applied
            .extend(pushed.flushed.into_iter().map(|a| (h.table, a)));
        Ok((pushed.applied, pushed.duplicate))
    }

    /// Answers a scan: every stored key of the range with its weights.
    fn scan(&self, h: &Header) -> Result<Frame, Refusal> {
        let store = match self.tables.get(&h.table) {
            Some(Ok(t)) => t.store(),
            Some(Err(e)) => {
                return Err(Refusal::TableUnusable {
                    table: h.table,
                    why: e.clone(),
                });
            }
            None => return Err(Refusal::UnknownTable(h.table)),
        };
        let entries = store.entries_in(h.range);
        if entries.len() > self.cfg.limits.max_keys {
            return Err(Refusal::ScanTooLarge {
                range: h.range,
                keys: entries.len(),
                max: self.cfg.limits.max_keys,
            });
        }
        let dim = store.spec().dim as usize;
        let mut reply = Frame::new(reply_header(h, Kind::Reply, self.id, self.map.epoch));
        reply.keys.reserve(entries.len());
        let out = reply.vals.vec_mut();
        out.reserve(entries.len() * dim);
        for (k, slot) in entries {
            reply.keys.push(k);
            out.extend_from_slice(&slot[..dim]);
        }
        reply.header.flags = h.flags & FLAG_PACK_REPLY;
        Ok(reply)
    }

    /// True when a pull at the header's clock may be answered now.
    fn ready(&self, h: &Header, consistency: Consistency) -> bool {
        let Some(need) = consistency.required_clock(h.clock) else {
            return true;
        };
        match self.table(h.table) {
            Some(t) => t.ready(h.range, need, &self.map.workers_of(t.spec())),
            None => true,
        }
    }

    fn answer_pull(&self, frame: &Frame) -> Frame {
        let h = &frame.header;
        match self.tables.get(&h.table) {
            Some(Ok(t)) => pull_reply(t, frame, self.id, self.map.epoch),
            Some(Err(e)) => error_reply(h, self.id, self.map.epoch, ErrorCode::Invalid, e.clone()),
            None => error_reply(
                h,
                self.id,
                self.map.epoch,
                ErrorCode::UnknownTable,
                format!("no table with id {}", h.table),
            ),
        }
    }

    /// The significantly-modified filter on a pull's reply (`request` the
    /// pull, `sig` what it asked): only the values that moved by more than
    /// the threshold since what connection `conn` confirmed holding
    /// (`pserver_core::significant` says why that cannot drift), the
    /// reply flagged `FLAG_SIGNIFICANT` with its stamp. Decided here, when
    /// the reply is made, never when the pull arrives: a pull that waits
    /// for slower workers is filtered against what the worker holds once
    /// it is answered. Errors, unflagged pulls, and replies the shadows
    /// cannot take (the filter is off) go as they are.
    fn filter_reply(
        &mut self,
        conn: ConnId,
        request: &Frame,
        sig: Option<Significant>,
        mut reply: Frame,
    ) -> Frame {
        let Some(sig) = sig else { return reply };
        if reply.header.kind != Kind::Reply {
            return reply;
        }
        let h = &request.header;
        let Some(dim) = self.table(h.table).map(|t| t.spec().dim as usize) else {
            return reply;
        };
        let dense: Vec<u64>;
        let keys: &[u64] = if h.dense() {
            dense = (h.range.begin..h.range.end).collect();
            &dense
        } else {
            &request.keys
        };
        let Some(filtered) = self.shadows.filter(
            (conn, h.table),
            sig.basis,
            sig.threshold,
            keys,
            dim,
            &reply.vals,
        ) else {
            return reply;
        };
        reply.vals = filtered.vals.into();
        reply.ctrl = Control::Significant(filtered.stamp).to_bytes().into();
        reply.header.flags |= FLAG_SIGNIFICANT;
        reply
    }

    /// Answers the waiting pulls (of `table`, or all) that may now be
    /// answered; redirects those whose range this server no longer owns.
    pub(super) fn recheck(&mut self, table: Option<u32>) {
        let waiting = std::mem::take(&mut self.waiting);
        for w in waiting {
            let h = w.frame.header;
            if table.is_some_and(|t| t != h.table) || self.lent.contains(&h.table) {
                self.waiting.push(w);
                continue;
            }
            let moved = h.epoch < self.map.epoch
                && self
                    .admit(
                        &Header {
                            epoch: self.map.epoch,
                            ..h
                        },
                        &w.frame.keys,
                    )
                    .is_err();
            if moved {
                let r = self.redirect(&h);
                // A redirect is no acknowledgement: nothing waits for the
                // push part's replication any more.
                if let Some(id) = w.ack {
                    self.acks.remove(&id);
                }
                let mut r = r;
                r.header.flags = 0;
                self.send(w.conn, r);
            } else if self.ready(&h, w.consistency) {
                let reply = self.answer_pull(&w.frame);
                let reply = self.filter_reply(w.conn, &w.frame, w.significant, reply);
                match w.ack {
                    Some(id) => self.complete_ack(id, reply),
                    None => self.send(w.conn, reply),
                }
            } else {
                self.waiting.push(w);
            }
        }
    }

    /// Releases the acks held for `(table, clock)`, each waiting on
    /// `tickets`; as refusals when the sum was refused.
    pub(super) fn release_held(
        &mut self,
        table: u32,
        clock: u64,
        tickets: &[Ticket],
        refused: Option<&Refusal>,
    ) {
        for held in self.held.remove(&(table, clock)).unwrap_or_default() {
            match refused {
                Some(r) => {
                    let f = self.error(&held.request, r);
                    self.send(held.conn, f);
                }
                None => {
                    self.defer(held.conn, Some(held.reply), held.stale, tickets);
                }
            }
        }
    }
}

/// A data request admitted and decided on, before its push is applied.
#[derive(Debug)]
pub(crate) struct Plan {
    /// The frame, its key list resolved.
    pub(crate) frame: Frame,
    pub(crate) op: Op,
    /// The consistency model its pull part waits by.
    pub(crate) consistency: Consistency,
    /// Its push goes into the clock's sum.
    pub(crate) aggregated: bool,
    /// Its ack is held until the clock's sum is replicated.
    pub(crate) hold: bool,
    /// The significantly-modified filter's request, when flagged.
    pub(crate) significant: Option<Significant>,
}

/// The control section a pull's reply carries: the push part's ack, if any.
pub(crate) fn pull_ctrl(pushed: Option<(u64, u64)>) -> bytes::Bytes {
    match pushed {
        Some((applied, duplicate)) => Control::PushAck { applied, duplicate }.to_bytes().into(),
        None => bytes::Bytes::new(),
    }
}

/// The reply to pull `frame` (its control section already set): the
/// weights of its keys, or of its dense range, in order.
pub(crate) fn pull_reply(
    t: &pserver_core::table::Table,
    frame: &Frame,
    me: pserver_core::NodeId,
    epoch: u64,
) -> Frame {
    let h = &frame.header;
    let dim = t.spec().dim as usize;
    // A vector from the pool of written replies when it is large: filled
    // here, written from where it is, and back in the pool after.
    let n = if h.dense() {
        h.range.len() as usize
    } else {
        frame.keys.len()
    };
    let mut vals = pserver_wire::vals::buffer(n.saturating_mul(dim));
    if h.dense() {
        t.pull_dense(h.range, &mut vals);
    } else {
        t.pull(&frame.keys, &mut vals);
    }
    reply_with(h, frame.ctrl.clone(), vals, me, epoch)
}

/// The reply to the pull of header `h` carrying `vals` (its keys' weights,
/// in order) and control section `ctrl`.
pub(crate) fn reply_with(
    h: &Header,
    ctrl: bytes::Bytes,
    vals: Vec<f32>,
    me: pserver_core::NodeId,
    epoch: u64,
) -> Frame {
    let mut reply = Frame::new(reply_header(h, Kind::Reply, me, epoch));
    // Set only when this server kept the pull's key list (see `data`);
    // `FLAG_PACK_REPLY` is taken off by the runtime, which packs.
    reply.header.flags = h.flags & (FLAG_CACHE_KEYS | FLAG_PACK_REPLY);
    reply.ctrl = ctrl;
    // Back to the pool of reply vectors once written, when it is large.
    reply.vals = pserver_wire::Vals::pooled(vals);
    reply
}

/// The table's view of a push frame.
pub(crate) fn as_push(frame: &Frame) -> Push<'_> {
    let h = &frame.header;
    Push {
        sender: h.sender,
        range: h.range,
        clock: h.clock,
        retry: h.flags & FLAG_RETRY != 0,
        keys: if h.dense() {
            Keys::Dense
        } else {
            Keys::List(&frame.keys)
        },
        vals: &frame.vals,
    }
}
