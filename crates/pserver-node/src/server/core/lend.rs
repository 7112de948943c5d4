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

use super::data::{Plan, as_push, pull_ctrl, pull_reply};
use super::request::{Op, Request};
use super::{ConnId, Effect, Refusal, ServerCore};
use pserver_core::table::{PushCtx, Table, TableError};
use pserver_core::{ClusterMap, KeyRange, NodeId};
use pserver_wire::Frame;

/// A data request on a table lent to the runtime. See the module docs.
#[derive(Debug)]
pub struct Work {
    table_id: u32,
    table: Table,
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

/// What the work did.
#[derive(Debug)]
struct Outcome {
    pushed: Option<Result<pserver_core::table::Pushed, TableError>>,
    slots: Option<Vec<f32>>,
    pulled: Option<Frame>,
}

impl Work {
    /// Keys in the request (for the runtime's choice of thread).
    pub fn keys(&self) -> usize {
        self.plan.frame.keys.len().max(self.plan.frame.vals.len())
    }

    /// Applies the push part and reads the pull part: all of the request
    /// that needs the table and nothing else. Call it once, without the
    /// core's lock, then give the work back with `Input::Applied`.
    pub fn run(mut self) -> Work {
        let frame = &mut self.plan.frame;
        let h = frame.header;
        let mut outcome = Outcome {
            pushed: None,
            slots: None,
            pulled: None,
        };
        if self.plan.op.pushes() {
            let ctx = PushCtx {
                aggregate: self.plan.aggregated,
                workers: &self.workers,
                gate: self.gate.as_deref(),
            };
            let pushed = self.table.push(&as_push(frame), ctx);
            if pushed.is_ok() && self.slots {
                let keys: Vec<u64> = if h.dense() {
                    (h.range.begin..h.range.end).collect()
                } else {
                    frame.keys.clone()
                };
                outcome.slots = Some(self.table.store().slots_of(&keys));
            }
            outcome.pushed = Some(pushed);
        }
        let refused = matches!(outcome.pushed, Some(Err(_)));
        if self.plan.op.waits() && !refused {
            let ready = self
                .need
                .is_none_or(|need| self.table.ready(h.range, need, &self.workers));
            if ready {
                let ack = outcome
                    .pushed
                    .as_ref()
                    .and_then(|p| p.as_ref().ok())
                    .map(|p| (p.applied, p.duplicate));
                let mut q = Frame::new(h);
                q.keys = std::mem::take(&mut frame.keys);
                q.ctrl = pull_ctrl(ack);
                outcome.pulled = Some(pull_reply(&self.table, &q, self.me, self.epoch));
                frame.keys = q.keys;
            }
        }
        self.result = Some(outcome);
        self
    }
}

/// An input that waits for lent tables to come back.
#[derive(Debug)]
pub(super) enum Later {
    Request(ConnId, Box<Request>),
    Map(ClusterMap),
}

impl Later {
    /// The table it touches: `Some(None)` for every table, `None` for none.
    fn touches(&self) -> Option<Option<u32>> {
        match self {
            Later::Map(_) => Some(None),
            Later::Request(_, r) => request_touches(r),
        }
    }
}

/// Which table a request touches: `Some(Some(id))` one, `Some(None)` every
/// table (a checkpoint; a chain's marker, which must follow every change
/// before it), `None` no table.
pub(super) fn request_touches(r: &Request) -> Option<Option<u32>> {
    match r {
        Request::Data(d) => Some(Some(d.frame.header.table)),
        Request::Replicate(c) => Some(Some(c.frame.header.table)),
        Request::Restore { frame, .. } => Some(Some(frame.header.table)),
        Request::Snapshot { .. } | Request::Marker(_) => Some(None),
        Request::Fence { .. } | Request::GetMap(_) => None,
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
        self.effects.push(Effect::Apply(Box::new(Work {
            table_id: h.table,
            table,
            conn,
            plan,
            me: self.id,
            epoch: self.map.epoch,
            workers: self.map.live_workers(),
            gate: self.gate(),
            need,
            slots,
            result: None,
        })));
        Ok(())
    }

    /// A lent table comes back with its work done: the request goes on as
    /// if applied here, then what waited for the table runs.
    pub(super) fn applied(&mut self, work: Work) {
        let Work {
            table_id,
            table,
            conn,
            plan,
            result,
            ..
        } = work;
        self.tables.insert(table_id, Ok(table));
        self.lent.remove(&table_id);
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
                self.drain_later();
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
        self.drain_later();
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
                None => return,
            }
        }
    }
}
