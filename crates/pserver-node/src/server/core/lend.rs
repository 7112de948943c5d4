//! Long work outside the core: a table lent to the runtime.
//!
//! A push or pull of many keys takes long (a 16M-key push, seconds). The
//! core does not apply it while the runtime holds the core's lock: it
//! *lends* the table, moving it out into a [`Work`] value inside an
//! [`Effect::Apply`](super::Effect::Apply); the runtime runs
//! [`Work::run`] (plain CPU work on the table, no core state) without the
//! lock and hands the result back as [`Input::Applied`](super::Input::Applied).
//! Meanwhile every other table is served as usual.
//!
//! Order: while a table is lent, inputs that touch it wait in the core's
//! queue, and so do inputs that touch every table (a map, a checkpoint, a
//! chain's marker); once anything waits, later inputs that touch a table or
//! every table queue behind it, so each table sees its requests in the
//! order they arrived. The queue drains, in order, when the work returns.

use super::data::{Plan, as_push, pull_ctrl, pull_reply, reply_with};
use super::request::{Op, Request};
use super::{ConnId, Effect, Refusal, ServerCore};
use crate::snapshot::RangePart;
use pserver_core::table::{PushCtx, Table, TableError};
use pserver_core::{ClusterMap, KeyRange, NodeId};
use pserver_wire::{Frame, Header};

/// Work on a table lent to the runtime. See the module docs.
#[derive(Debug)]
pub struct Work {
    table_id: u32,
    table: Table,
    job: Job,
}

/// What to do with a lent table.
#[derive(Debug)]
enum Job {
    /// A data request's push and pull parts.
    Data(Box<DataJob>),
    /// Copy the table's ranges for a checkpoint.
    Copy(Snap),
}

/// A big data request.
#[derive(Debug)]
struct DataJob {
    conn: ConnId,
    plan: Plan,
    /// This server and its map's epoch, for the reply's header.
    me: NodeId,
    epoch: u64,
    /// Live workers and the ranges that decide sums (see `PushCtx`).
    workers: Vec<NodeId>,
    gate: Option<Vec<KeyRange>>,
    /// The clock a pull part needs (`None`: it need not wait).
    need: Option<u64>,
    /// Compute the push's resulting slots, for the chain.
    slots: bool,
    result: Option<Outcome>,
}

/// A checkpoint on its way through the tables, one lent at a time.
#[derive(Debug)]
pub(super) struct Snap {
    pub(super) conn: ConnId,
    pub(super) request: Header,
    pub(super) dir: String,
    /// This server's primary ranges when the checkpoint began.
    pub(super) ranges: Vec<KeyRange>,
    /// Tables still to copy.
    pub(super) tables: Vec<u32>,
    /// What is copied so far.
    pub(super) parts: Vec<RangePart>,
}

/// What a data job did.
#[derive(Debug)]
struct Outcome {
    pushed: Option<Result<pserver_core::table::Pushed, TableError>>,
    slots: Option<Vec<f32>>,
    pulled: Option<Frame>,
}

impl Work {
    /// Keys or values the work goes over: a data request's keys or values,
    /// or the keys a copy reads.
    pub fn size(&self) -> usize {
        match &self.job {
            Job::Data(d) => d.plan.frame.keys.len().max(d.plan.frame.vals.len()),
            Job::Copy(_) => self.table.store().len(),
        }
    }

    /// Does all of the work that needs the table and nothing else. Call it
    /// once, without the core's lock, then give the work back with
    /// `Input::Applied`.
    pub fn run(mut self) -> Work {
        match &mut self.job {
            Job::Data(d) => d.result = Some(d.run(&mut self.table)),
            Job::Copy(snap) => snap.copy(self.table_id, &self.table),
        }
        self
    }
}

impl Snap {
    /// Copies table `id`'s part of every range of the checkpoint.
    fn copy(&mut self, id: u32, t: &Table) {
        let store = t.store();
        for r in &self.ranges {
            let entries = store.entries_in(*r);
            self.parts.push(RangePart {
                table: id,
                range: *r,
                slot_width: store.slot_width(),
                keys: entries.iter().map(|(k, _)| *k).collect(),
                slots: entries
                    .iter()
                    .flat_map(|(_, s)| s.iter().copied())
                    .collect(),
                records: t.clock().records_in(*r),
            });
        }
    }
}

impl DataJob {
    /// Applies the push part and reads the pull part.
    fn run(&mut self, table: &mut Table) -> Outcome {
        let frame = &mut self.plan.frame;
        let h = frame.header;
        let mut outcome = Outcome {
            pushed: None,
            slots: None,
            pulled: None,
        };
        let mut read = None;
        if self.plan.op.pushes() {
            let ctx = PushCtx {
                aggregate: self.plan.aggregated,
                workers: &self.workers,
                gate: self.gate.as_deref(),
            };
            // A push-pull reads in the same pass as it updates (see
            // `Table::push_pull`), kept for the reply if it may go now.
            let pushed = if self.plan.op == Op::PushPull {
                let mut vals = pserver_wire::vals::buffer(frame.vals.len());
                let pushed = table.push_pull(&as_push(frame), ctx, &mut vals);
                read = Some(vals);
                pushed
            } else {
                table.push(&as_push(frame), ctx)
            };
            if pushed.is_ok() && self.slots {
                let keys: Vec<u64> = if h.dense() {
                    (h.range.begin..h.range.end).collect()
                } else {
                    frame.keys.clone()
                };
                outcome.slots = Some(table.store().slots_of(&keys));
            }
            outcome.pushed = Some(pushed);
        }
        let refused = matches!(outcome.pushed, Some(Err(_)));
        if self.plan.op.waits() && !refused {
            let ready = self
                .need
                .is_none_or(|need| table.ready(h.range, need, &self.workers));
            if ready {
                let ack = outcome
                    .pushed
                    .as_ref()
                    .and_then(|p| p.as_ref().ok())
                    .map(|p| (p.applied, p.duplicate));
                outcome.pulled = Some(match read {
                    Some(vals) => reply_with(&h, pull_ctrl(ack), vals, self.me, self.epoch),
                    None => {
                        let mut q = Frame::new(h);
                        q.keys = std::mem::take(&mut frame.keys);
                        q.ctrl = pull_ctrl(ack);
                        let reply = pull_reply(table, &q, self.me, self.epoch);
                        frame.keys = q.keys;
                        reply
                    }
                });
            }
        }
        outcome
    }
}

/// An input that waits for lent tables to come back.
#[derive(Debug)]
pub(super) enum Later {
    Request(ConnId, Box<Request>),
    Map(ClusterMap),
    /// A checkpoint waiting for its next table.
    Copy(Snap),
}

impl Later {
    /// The table it touches: `Some(None)` for every table, `None` for none.
    fn touches(&self) -> Option<Option<u32>> {
        match self {
            Later::Map(_) => Some(None),
            Later::Request(_, r) => request_touches(r),
            Later::Copy(snap) => Some(snap.tables.first().copied()),
        }
    }
}

/// Which table a request touches: `Some(Some(id))` one, `Some(None)` every
/// table (a checkpoint; a chain's marker, which must follow every change
/// before it), `None` no table.
pub(super) fn request_touches(r: &Request) -> Option<Option<u32>> {
    match r {
        Request::Data(_) | Request::Replicate(_) | Request::Restore { .. } => {
            Some(Some(r.header().table))
        }
        Request::Marker(_) => Some(None),
        // A checkpoint lends its tables one at a time (`copy_next`).
        Request::Snapshot { .. }
        | Request::Fence { .. }
        | Request::GetMap(_)
        | Request::Stats(_) => None,
    }
}

impl ServerCore {
    /// Whether a data request is big enough to lend its table for.
    pub(super) fn lends(&self, plan: &Plan) -> bool {
        let f = &plan.frame;
        let n = if f.header.dense() {
            f.header.range.len() as usize
        } else {
            f.keys.len()
        };
        plan.op != Op::Scan
            && n.max(f.vals.len()) >= self.cfg.lend_from
            && matches!(self.tables.get(&f.header.table), Some(Ok(_)))
    }

    /// Lends the plan's table to the runtime with the work to do on it.
    pub(super) fn lend(&mut self, conn: ConnId, plan: Plan) -> Result<(), Refusal> {
        let h = plan.frame.header;
        let Some(Ok(table)) = self.tables.remove(&h.table) else {
            return Err(Refusal::UnknownTable(h.table));
        };
        let slots = plan.op.pushes()
            && !plan.hold
            && !plan.aggregated
            && self
                .map
                .partition_of(h.range.begin)
                .is_some_and(|i| !self.map.partitions[i].replicas.is_empty());
        let need = if plan.op.waits() {
            plan.consistency.required_clock(h.clock)
        } else {
            None
        };
        self.lent.insert(h.table);
        let job = DataJob {
            conn,
            plan,
            me: self.id,
            epoch: self.map.epoch,
            workers: self.map.workers_of(table.spec()),
            gate: self.gate(),
            need,
            slots,
            result: None,
        };
        self.effects.push(Effect::Apply(Box::new(Work {
            table_id: h.table,
            table,
            job: Job::Data(Box::new(job)),
        })));
        Ok(())
    }

    /// Takes the checkpoint on to its next table: lends it for the copy,
    /// or waits in the queue while it is lent; once every table is copied,
    /// the runtime writes the files.
    pub(super) fn copy_next(&mut self, mut snap: Snap) {
        loop {
            let Some(&next) = snap.tables.first() else {
                self.effects.push(Effect::Checkpoint {
                    conn: snap.conn,
                    request: snap.request,
                    dir: snap.dir,
                    parts: snap.parts,
                });
                return;
            };
            if self.must_wait(Some(Some(next))) {
                self.later.push_back(Later::Copy(snap));
                return;
            }
            snap.tables.remove(0);
            // A table whose updater cannot be built holds nothing; a small
            // one is copied here at once.
            match self.tables.get(&next) {
                Some(Ok(t)) if t.store().len() < self.cfg.lend_from => {
                    snap.copy(next, t);
                    continue;
                }
                Some(Ok(_)) => {}
                _ => continue,
            }
            if let Some(Ok(table)) = self.tables.remove(&next) {
                self.lent.insert(next);
                self.effects.push(Effect::Apply(Box::new(Work {
                    table_id: next,
                    table,
                    job: Job::Copy(snap),
                })));
                return;
            }
        }
    }

    /// A lent table comes back with its work done: the request goes on as
    /// if applied here, then what waited for the table runs.
    pub(super) fn applied(&mut self, work: Work) {
        let Work {
            table_id,
            table,
            job,
        } = work;
        self.tables.insert(table_id, Ok(table));
        self.lent.remove(&table_id);
        match job {
            Job::Copy(snap) => self.copy_next(snap),
            Job::Data(d) => self.data_applied(table_id, *d),
        }
        self.drain_later();
    }

    fn data_applied(&mut self, table_id: u32, d: DataJob) {
        let DataJob {
            conn, plan, result, ..
        } = d;
        let outcome = result.unwrap_or(Outcome {
            pushed: None,
            slots: None,
            pulled: None,
        });
        let h = plan.frame.header;
        let op = plan.op;
        let pushed = match outcome.pushed {
            Some(Err(e)) => {
                let f = self.error(&h, &Refusal::Table(e));
                self.send(conn, f);
                return;
            }
            Some(Ok(p)) => {
                self.applied
                    .extend(p.flushed.into_iter().map(|a| (table_id, a)));
                Some((p.applied, p.duplicate))
            }
            None => None,
        };
        if let Some(f) = self.after_push(conn, plan, pushed, outcome.slots, outcome.pulled) {
            self.send(conn, f);
        }
        if op.pushes() && !self.waiting.is_empty() {
            self.recheck(Some(table_id));
        }
    }

    /// Whether `touches` must wait: its table is lent, or it touches every
    /// table while one is, or something it must follow already waits.
    pub(super) fn must_wait(&self, touches: Option<Option<u32>>) -> bool {
        let Some(which) = touches else {
            return false;
        };
        let blocked = match which {
            Some(t) => self.lent.contains(&t),
            None => !self.lent.is_empty(),
        };
        blocked
            || self.later.iter().any(|l| match (l.touches(), which) {
                (Some(None), _) | (_, None) => true,
                (Some(Some(a)), Some(b)) => a == b,
                (None, _) => false,
            })
    }

    /// Runs what waited, in order, until something must wait again.
    fn drain_later(&mut self) {
        while let Some(next) = self.later.front() {
            let blocked = match next.touches() {
                Some(Some(t)) => self.lent.contains(&t),
                Some(None) => !self.lent.is_empty(),
                None => false,
            };
            if blocked {
                return;
            }
            match self.later.pop_front() {
                Some(Later::Map(m)) => self.apply_map(m),
                Some(Later::Request(conn, r)) => self.request_parsed(conn, *r),
                Some(Later::Copy(snap)) => self.copy_next(snap),
                None => return,
            }
        }
    }
}
