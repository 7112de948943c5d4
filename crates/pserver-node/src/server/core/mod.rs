//! The server's decisions, as a state machine without I/O.
//!
//! [`ServerCore::step`] takes one [`Input`] (a frame from a connection, a
//! new map, a replica's answer to a change, a closed connection) with the
//! time, and returns [`Effect`]s as data: frames to send on connections,
//! changes to queue for the next server of a chain, forwarders to abandon,
//! a `Synced` report for the manager, checkpoint files to write. The
//! runtime (`server::runtime`) carries them out and feeds the results back
//! in; nothing here touches a socket, a task, a file or the clock, so the
//! tests drive it with plain calls.
//!
//! Acknowledgements: a reply that must wait for replication is an *ack*
//! waiting on *tickets*, one per change queued down a chain
//! ([`Effect::Forward`]). [`Input::Delivered`] settles a ticket; when the
//! last ticket of an ack is settled the reply goes out, or, if any ticket
//! came back `Stale` (the chain no longer takes changes from this server),
//! the ack's stale reply does, so the worker resends to the current
//! primary. An aggregating table's pushes under replication after
//! aggregation are *held* per clock until the clock's sum is applied and
//! replicated once; the sum's tickets then release them. A ticket that is
//! never settled (the server stops) releases nothing, so no ack leaves for
//! a change the chain does not have.

mod chain;
mod data;
mod fence;
mod lend;
pub mod request;
#[cfg(test)]
mod tests;

pub use lend::Work;
pub use request::{Refusal, Request};

use crate::proto::{control_reply, control_request, error_reply};
use crate::snapshot::RangePart;
use pserver_core::keycache::KeyCache;
use pserver_core::significant::Shadows;
use pserver_core::store::Threads;
use pserver_core::table::{Applied, Table};
use pserver_core::updater::Registry;
use pserver_core::{ClusterMap, Consistency, KeyRange, NodeId, NodeState, Role, TableSpec};
use pserver_wire::{Control, ErrorCode, Frame, Header, Kind, Limits};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

/// A connection, as the runtime numbers them.
pub type ConnId = u64;

/// One change queued down a chain, as [`Effect::Forward`] numbers them.
pub type Ticket = u64;

/// What became of a change queued down a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The rest of the chain has it.
    Stored,
    /// The target was given up on (the map declares it dead, or it could
    /// not be reached): whether the rest of the chain has the change is not
    /// known. It counts as stored only where this server is still the
    /// range's primary, which copies the range to the chain's new members
    /// (`fill_new_replicas`); anywhere else it goes back as `Stale`, so the
    /// worker resends to the current primary, which applies it if it lacks
    /// it and recognises it by its clock records if not.
    Abandoned,
    /// The target refused it as coming from a server that is no longer the
    /// range's primary (`NotOwner`): the change must not be acknowledged;
    /// the sender should retry at the current primary.
    Stale,
}

/// What the runtime hands the core.
#[derive(Debug)]
pub enum Input {
    /// A frame read from connection `conn` (already unpacked).
    Request {
        /// The connection.
        conn: ConnId,
        /// The frame.
        frame: Frame,
    },
    /// A map from the manager.
    Map(ClusterMap),
    /// The next server of a chain answered the change of `ticket`.
    Delivered {
        /// The change.
        ticket: Ticket,
        /// Its fate.
        delivery: Delivery,
    },
    /// Connection `conn` closed: nothing more can be sent on it.
    Closed(ConnId),
    /// A lent table comes back with its work done ([`Effect::Apply`]).
    Applied(Box<Work>),
}

/// What the core asks the runtime to do.
#[derive(Debug)]
pub enum Effect {
    /// Send `frame` on connection `conn` (dropped if it closed).
    Send {
        /// The connection.
        conn: ConnId,
        /// The frame; `FLAG_PACK_REPLY` asks for its values packed.
        frame: Frame,
    },
    /// Queue `frame` for server `to` at `addr`, behind everything queued to
    /// it before, and answer with [`Input::Delivered`] for `ticket` once it
    /// is done. Frames to one server must leave in the order of these
    /// effects.
    Forward {
        /// The next server of the chain.
        to: NodeId,
        /// Its address.
        addr: String,
        /// What to report the answer as.
        ticket: Ticket,
        /// The change.
        frame: Frame,
    },
    /// Server `to` is dead: settle everything queued to it as `Stored`
    /// (the replica replacing it gets a full copy) and drop its queue.
    Abandon {
        /// The server.
        to: NodeId,
    },
    /// Tell the manager this server is synced at `epoch`: every copy the
    /// map of that epoch called for has reached its chain.
    Synced {
        /// The map's epoch.
        epoch: u64,
    },
    /// Run [`Work::run`] without the core's lock (it holds a lent table and
    /// may take long), then hand it back as [`Input::Applied`].
    Apply(Box<Work>),
    /// Answer `request` on `conn` with this server's figures: the core's
    /// (`figures`) with the runtime's counters and queues.
    Report {
        /// The connection.
        conn: ConnId,
        /// The request's header (for the reply).
        request: Header,
        /// What the core holds.
        figures: Box<CoreFigures>,
    },
    /// Write the checkpoint parts into `dir`, then answer `request` on
    /// `conn` with the files written (or the error). The parts were copied
    /// when the request arrived, so each is consistent.
    Checkpoint {
        /// The connection.
        conn: ConnId,
        /// The request's header (for the reply).
        request: Header,
        /// The checkpoint directory.
        dir: String,
        /// What to write.
        parts: Vec<RangePart>,
    },
}

/// What a server's core holds, as figures: read by the metrics listener
/// and the live view (`pserver status --watch`), never by a decision.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CoreFigures {
    /// The map's epoch.
    pub epoch: u64,
    /// Partitions this server is primary of.
    pub primary_ranges: u64,
    /// Partitions this server replicates.
    pub replica_ranges: u64,
    /// Every table of the map.
    pub tables: Vec<TableFigures>,
    /// Replies waiting on changes down a chain (acks) or held with their
    /// clock's sum.
    pub acks_waiting: u64,
    /// Maps whose copies and markers down the chains are not all answered.
    pub syncs_pending: u64,
    /// Ranges held back until their old primary's fence arrives.
    pub fences_waiting: u64,
}

/// One table's figures on one server.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TableFigures {
    /// Its id.
    pub id: u32,
    /// Its name.
    pub name: String,
    /// Keys stored and the bytes their store allocated; `None` while the
    /// table is lent out for a big request (or cannot be built here).
    pub stored: Option<(u64, u64)>,
    /// Pulls parked until slower workers catch up.
    pub pulls_waiting: u64,
}

/// Longest a new primary holds a range back waiting for its old primary's
/// fence, in ms. The fence travels behind the old primary's last changes,
/// which normally takes milliseconds; past this the old primary is presumed
/// stuck, and the manager will declare it dead within its lease anyway.
pub const FENCE_TIMEOUT_MS: u64 = 5_000;

/// How a server decides: the settings of `ServerConfig` the core needs.
#[derive(Clone)]
pub struct CoreConfig {
    /// Frame and request limits.
    pub limits: Limits,
    /// User updaters this server can build.
    pub registry: Registry,
    /// Most keys the key cache holds (0: key caching off).
    pub key_cache_keys: usize,
    /// Replication after aggregation (see `ServerConfig`).
    pub replicate_after_aggregation: bool,
    /// Threads one large push or pull may use, shared by every table.
    pub apply_threads: Threads,
    /// Keys (or values) from which a push or pull runs on a lent table,
    /// outside the core (see [`Work`]).
    pub lend_from: usize,
    /// Most entries the significantly-modified filter's shadows hold (see
    /// `ServerConfig::significant_entries`; 0: off).
    pub significant_entries: usize,
}

/// Default of [`CoreConfig::lend_from`]: requests of 64Ki keys or values
/// take milliseconds or more to apply.
pub const LEND_FROM: usize = 1 << 16;

/// A reply waiting for tickets (and, for a waiting push-pull, for its
/// pull to be answered: `frame` is `None` until then).
struct Ack {
    conn: ConnId,
    frame: Option<Frame>,
    /// Sent instead when a ticket came back `Stale`.
    stale: Frame,
    /// Tickets not yet settled.
    waits: usize,
    is_stale: bool,
}

/// An acknowledgement held with its clock's sum (replication after
/// aggregation): sent once the sum is applied and replicated.
struct Held {
    conn: ConnId,
    request: Header,
    reply: Frame,
    stale: Frame,
}

/// A pull waiting for slower workers.
struct Waiting {
    frame: Frame,
    conn: ConnId,
    consistency: Consistency,
    /// The ack of its push part (a push-pull whose push is replicating).
    ack: Option<u64>,
    /// The significantly-modified filter's request, when flagged.
    significant: Option<request::Significant>,
}

/// The server's state. See the module docs.
pub struct ServerCore {
    id: NodeId,
    map: Arc<ClusterMap>,
    /// `Err` holds why the updater could not be built; requests get it.
    tables: BTreeMap<u32, Result<Table, String>>,
    waiting: Vec<Waiting>,
    cfg: CoreConfig,
    key_cache: KeyCache,
    /// What each connection was last sent of each table, for pulls
    /// flagged `FLAG_SIGNIFICANT` (see `data::filter_reply`).
    shadows: Shadows,
    /// Servers with a queue of changes from this one (see `Effect::Forward`).
    linked: HashSet<NodeId>,
    next_ticket: Ticket,
    next_ack: u64,
    acks: HashMap<u64, Ack>,
    /// Ticket -> acks waiting on it.
    ticket_acks: HashMap<Ticket, Vec<u64>>,
    /// Per map epoch, the markers queued behind its copies still unsettled.
    syncs: Vec<(u64, HashSet<Ticket>)>,
    /// Acks held per (table, clock) until the clock's sum is replicated.
    held: HashMap<(u32, u64), Vec<Held>>,
    /// Ranges this server is primary of but holds back, until their old
    /// primary's `Fence` arrives or [`FENCE_TIMEOUT_MS`] passes: (range,
    /// old primary, since ms).
    fence_waits: Vec<(KeyRange, NodeId, u64)>,
    /// Fences that arrived before the map that needs them: (range, from).
    fences_seen: Vec<(KeyRange, NodeId)>,
    /// Per server, the highest epoch of a chain change from it this server
    /// refused as stale (not held, superseded): its later changes under
    /// that epoch or an older one are refused too (`chain::replicate`).
    refused_chain: HashMap<NodeId, u64>,
    /// Sums just applied, to replicate and release at the end of the step.
    applied: Vec<(u32, Applied)>,
    /// When the manager last answered this server (ms), if the runtime
    /// tracks it: past half the lease without an answer this server may
    /// have been declared dead, and serves no data (see `admit`).
    manager_seen_ms: Option<u64>,
    /// Tables lent to the runtime ([`Work`]).
    lent: HashSet<u32>,
    /// Inputs waiting for lent tables, in arrival order.
    later: VecDeque<lend::Later>,
    /// The time of the input being handled, in ms.
    now_ms: u64,
    effects: Vec<Effect>,
    /// Set by [`ServerCore::stop`]: every later input is dropped.
    stopped: bool,
}

impl ServerCore {
    /// The core of server `id` before its first map.
    pub fn new(id: NodeId, cfg: CoreConfig) -> ServerCore {
        ServerCore {
            id,
            map: Arc::new(ClusterMap::empty(0, 1)),
            tables: BTreeMap::new(),
            waiting: Vec::new(),
            key_cache: KeyCache::new(cfg.key_cache_keys),
            shadows: Shadows::new(cfg.significant_entries),
            cfg,
            linked: HashSet::new(),
            next_ticket: 1,
            next_ack: 1,
            acks: HashMap::new(),
            ticket_acks: HashMap::new(),
            syncs: Vec::new(),
            held: HashMap::new(),
            fence_waits: Vec::new(),
            fences_seen: Vec::new(),
            refused_chain: HashMap::new(),
            applied: Vec::new(),
            manager_seen_ms: None,
            lent: HashSet::new(),
            later: VecDeque::new(),
            now_ms: 0,
            effects: Vec::new(),
            stopped: false,
        }
    }

    /// This server's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The map this server serves under.
    pub fn map(&self) -> &ClusterMap {
        &self.map
    }

    /// The table with id `id`, if this server has it and could build it.
    pub fn table(&self, id: u32) -> Option<&Table> {
        self.tables.get(&id).and_then(|t| t.as_ref().ok())
    }

    /// What it holds now, as figures (a pass over its tables and queues:
    /// for a scrape, not for every request).
    pub fn figures(&self) -> CoreFigures {
        let me = self.id;
        let (mut primary, mut replica) = (0, 0);
        for p in &self.map.partitions {
            if p.primary == me {
                primary += 1;
            } else if p.replicas.contains(&me) {
                replica += 1;
            }
        }
        let tables = self
            .map
            .tables
            .iter()
            .map(|spec| TableFigures {
                id: spec.id,
                name: spec.name.clone(),
                stored: self.table(spec.id).map(|t| {
                    let store = t.store();
                    (store.len() as u64, store.memory_bytes() as u64)
                }),
                pulls_waiting: self
                    .waiting
                    .iter()
                    .filter(|w| w.frame.header.table == spec.id)
                    .count() as u64,
            })
            .collect();
        CoreFigures {
            epoch: self.map.epoch,
            primary_ranges: primary,
            replica_ranges: replica,
            tables,
            acks_waiting: (self.acks.len() + self.held.values().map(Vec::len).sum::<usize>())
                as u64,
            syncs_pending: self.syncs.len() as u64,
            fences_waiting: self.fence_waits.len() as u64,
        }
    }

    /// The manager answered a heartbeat this server sent at `ms` (the time
    /// it was sent, which the manager's renewal of the lease cannot
    /// precede). Until it is called the core does not time its lease.
    pub fn manager_seen(&mut self, ms: u64) {
        self.manager_seen_ms = Some(self.manager_seen_ms.map_or(ms, |m| m.max(ms)));
    }

    /// Handles one input at time `now_ms` and returns what to do.
    pub fn step(&mut self, now_ms: u64, input: Input) -> Vec<Effect> {
        self.now_ms = now_ms;
        if self.stopped {
            // Nothing more is applied, replicated or answered: the queues
            // to the chains are gone, so a push taken now would reach a
            // replica through a new queue ahead of the changes dropped
            // with the old one, and its absolute slots would carry their
            // effect without their clock records (their workers' resends
            // would then apply them twice). The senders see their
            // connections close and resend elsewhere.
            return Vec::new();
        }
        match input {
            Input::Request { conn, frame } => self.request(conn, frame),
            Input::Map(map) if self.must_wait(Some(None)) => {
                self.later.push_back(lend::Later::Map(map));
            }
            Input::Map(map) => self.apply_map(map),
            Input::Delivered { ticket, delivery } => self.delivered(ticket, delivery),
            Input::Closed(conn) => self.closed(conn),
            Input::Applied(work) => self.applied(*work),
        }
        self.release_applied();
        std::mem::take(&mut self.effects)
    }

    /// The server is stopping: forgets every reply it still owes, so none
    /// goes out for a change that may not be replicated (the senders see
    /// their connections close and resend elsewhere), and takes no input
    /// from now on (see [`ServerCore::step`]).
    pub fn stop(&mut self) {
        self.stopped = true;
        self.acks.clear();
        self.ticket_acks.clear();
        self.held.clear();
        self.waiting.clear();
        self.syncs.clear();
        self.later.clear();
    }

    fn send(&mut self, conn: ConnId, frame: Frame) {
        self.effects.push(Effect::Send { conn, frame });
    }

    fn error(&self, h: &Header, r: &Refusal) -> Frame {
        error_reply(h, self.id, self.map.epoch, r.code(), r.to_string())
    }

    fn request(&mut self, conn: ConnId, frame: Frame) {
        let h = frame.header;
        match Request::parse(frame) {
            Err(r) => {
                let f = self.error(&h, &r);
                self.send(conn, f);
            }
            Ok(r) if self.must_wait(lend::request_touches(&r)) => {
                self.later
                    .push_back(lend::Later::Request(conn, Box::new(r)));
            }
            Ok(r) => self.request_parsed(conn, r),
        }
    }

    /// Handles a parsed request whose tables are here.
    fn request_parsed(&mut self, conn: ConnId, r: Request) {
        let h = r.header();
        let reply = match r {
            Request::Data(d) => self.data(d, conn),
            Request::Replicate(r) => self.replicate(r, conn),
            Request::Fence {
                header,
                from,
                chain,
            } => self.fenced(&header, from, chain, conn),
            Request::Restore { spec, frame } => self.restore(spec, frame, conn),
            Request::Snapshot { header, dir } => self.snapshot(conn, &header, dir),
            Request::GetMap(h) => Ok(Some(control_reply(
                &h,
                self.id,
                self.map.epoch,
                &Control::Map((*self.map).clone()),
            ))),
            // The runtime adds its counters and queues to the figures.
            Request::Stats(h) => {
                let figures = self.figures();
                self.effects.push(Effect::Report {
                    conn,
                    request: h,
                    figures: Box::new(figures),
                });
                Ok(None)
            }
            // A forwarder's marker: everything before it has arrived.
            Request::Marker(h) => Ok(Some(control_reply(
                &h,
                self.id,
                self.map.epoch,
                &Control::Ok,
            ))),
        };
        match reply {
            Ok(Some(f)) => self.send(conn, f),
            Ok(None) => {}
            Err(r) => {
                let f = self.error(&h, &r);
                self.send(conn, f);
            }
        }
        // A push lent its table out is rechecked when the table returns.
        if matches!(h.kind, Kind::Push | Kind::PushPull)
            && !self.waiting.is_empty()
            && !self.lent.contains(&h.table)
        {
            self.recheck(Some(h.table));
        }
    }

    /// Copies every range this server is primary of, for every table, for
    /// a checkpoint (each table lent in turn, so the others are served
    /// meanwhile); the runtime then writes the files.
    fn snapshot(
        &mut self,
        conn: ConnId,
        h: &Header,
        dir: String,
    ) -> Result<Option<Frame>, Refusal> {
        let snap = lend::Snap {
            conn,
            request: *h,
            dir,
            ranges: self.map.primary_ranges(self.id),
            tables: self.tables.keys().copied().collect(),
            parts: Vec::new(),
        };
        self.copy_next(snap);
        Ok(None)
    }

    /// The state of the table `spec` names, created (empty) if new here.
    fn ensure_table(&mut self, spec: &TableSpec) -> &mut Result<Table, String> {
        let registry = &self.cfg.registry;
        let threads = &self.cfg.apply_threads;
        self.tables.entry(spec.id).or_insert_with(|| {
            registry
                .build(&spec.updater)
                .map(|u| Table::new(spec.clone(), u, threads))
                .map_err(|e| e.to_string())
        })
    }

    /// The table `spec` names, created (empty) if new here; refused when
    /// its updater cannot be built. For changes that may arrive before the
    /// map that created the table (chain changes, restores).
    fn table_for(&mut self, spec: &TableSpec) -> Result<&mut Table, Refusal> {
        match self.ensure_table(spec) {
            Ok(t) => Ok(t),
            Err(e) => Err(Refusal::TableUnusable {
                table: spec.id,
                why: e.clone(),
            }),
        }
    }

    /// Installs a newer map: creates tables, abandons queues to dead
    /// servers, copies ranges to new replicas, fences hand-offs, drops what
    /// this server no longer holds, and re-examines sums and waiting pulls.
    fn apply_map(&mut self, map: ClusterMap) {
        if map.epoch <= self.map.epoch && !self.map.partitions.is_empty() {
            return;
        }
        for spec in &map.tables {
            self.ensure_table(spec);
        }
        // Servers that came back under their ids since the last map: new,
        // empty processes at (maybe) new addresses. Whatever this server
        // knew of the earlier process (queues to it, what it held) is
        // stale, as if it had seen it die, even when the map where it was
        // dead never arrived.
        let reborn: Vec<NodeId> = map
            .nodes
            .iter()
            .filter(|n| {
                n.state == NodeState::Alive
                    && self
                        .map
                        .node(n.id)
                        .is_some_and(|o| o.state == NodeState::Alive && o.joined != n.joined)
            })
            .map(|n| n.id)
            .collect();
        // A dead node's lists would only take room: a worker's id is never
        // reused, and a server that comes back under its id starts anew.
        for sender in self.key_cache.senders() {
            if map.node(sender).is_some_and(|n| n.state == NodeState::Dead)
                || map.departed(sender)
                || reborn.contains(&sender)
            {
                self.key_cache.forget(sender);
            }
        }
        // Nor would what this server refused of a dead server's changes,
        // or an earlier process's: a server back under its id sends
        // changes under maps from its return on.
        self.refused_chain.retain(|id, _| {
            !reborn.contains(id) && map.node(*id).is_some_and(|n| n.state == NodeState::Alive)
        });
        // Nor would the clock records of workers and clients that left
        // (issue #16, defect 8): from this map on their pushes are refused
        // (`data`), so nothing needs to tell them from fresh ones. Before
        // the copies below, which carry records down new chains: a server
        // that gets such a copy holds this map or a later one, and refuses
        // them too. Records a chain brings later (a push applied before
        // the primary had this map) go at the next map.
        for t in self.tables.values_mut().filter_map(|t| t.as_mut().ok()) {
            t.forget(|n| map.departed(n));
        }
        let old = std::mem::replace(&mut self.map, Arc::new(map));
        let mut gone: Vec<NodeId> = self
            .linked
            .iter()
            .copied()
            .filter(|id| {
                reborn.contains(id)
                    || self
                        .map
                        .node(*id)
                        .is_none_or(|n| n.state == NodeState::Dead)
            })
            .collect();
        gone.sort_unstable();
        for &to in &gone {
            self.linked.remove(&to);
            self.effects.push(Effect::Abandon { to });
        }
        // A member of an old chain that died took along what was queued to
        // it, whoever queued it: the members after it may lack changes.
        // So did one that came back: it holds nothing of what it held.
        let mut lost = gone.clone();
        lost.extend(
            old.live(Role::Server)
                .map(|n| n.id)
                .filter(|&id| self.map.node(id).is_none_or(|n| n.state == NodeState::Dead)),
        );
        lost.extend(reborn.iter().copied());
        lost.sort_unstable();
        lost.dedup();
        self.fill_new_replicas(&old, &lost);
        self.fence(&old, &reborn);
        // A marker behind everything queued so far on each queue: when all
        // are answered, every copy this map called for has arrived.
        let epoch = self.map.epoch;
        let mut targets: Vec<NodeId> = self.linked.iter().copied().collect();
        targets.sort_unstable();
        let mut markers = HashSet::new();
        for to in targets {
            let marker = control_request(self.id, epoch, &Control::Synced { epoch });
            if let Some(t) = self.forward(to, marker) {
                markers.insert(t);
            }
        }
        if markers.is_empty() {
            self.effects.push(Effect::Synced { epoch });
        } else {
            self.syncs.push((epoch, markers));
        }
        self.prune_pending();
        self.drop_handed_away();
        // Fewer live workers in a table's group may complete its waiting sums.
        let gate = self.gate();
        for (&id, t) in &mut self.tables {
            if let Ok(t) = t {
                let workers = self.map.workers_of(t.spec());
                let done = t.flush(&workers, gate.as_deref());
                self.applied.extend(done.into_iter().map(|a| (id, a)));
            }
        }
        self.recheck(None);
    }

    /// Drops the stored keys of ranges this server no longer holds as
    /// primary or replica: they were handed away, and the new holders have
    /// them. Only under a map where this server is alive and holds
    /// something, so a map without servers never empties a store.
    fn drop_handed_away(&mut self) {
        let me = self.id;
        let alive = self
            .map
            .node(me)
            .is_some_and(|n| n.state == NodeState::Alive);
        let held = self.held_ranges();
        if !alive || held.is_empty() {
            return;
        }
        for t in self.tables.values_mut().filter_map(|t| t.as_mut().ok()) {
            let dropped = t.retain_ranges(&held);
            if dropped > 0 {
                tracing::debug!(node = me, table = %t.spec().name, dropped, "dropped keys handed away");
            }
        }
    }

    /// The ranges this server holds under its map, as primary or replica.
    fn held_ranges(&self) -> Vec<KeyRange> {
        let me = self.id;
        self.map
            .partitions
            .iter()
            .filter(|p| p.primary == me || p.replicas.contains(&me))
            .map(|p| p.range)
            .collect()
    }

    /// Which ranges decide when a sum is complete here: with replication
    /// after aggregation, only those this server is primary of (`Some`):
    /// the rest are copies a primary's `Flushed` will settle, and waiting
    /// on them could wait on a primary that waits on this server. Without
    /// it (`None`), every range: replicas sum forwarded pushes themselves.
    fn gate(&self) -> Option<Vec<KeyRange>> {
        self.cfg
            .replicate_after_aggregation
            .then(|| self.map.primary_ranges(self.id))
    }

    /// Registers a reply to send once `tickets` are all settled (and, when
    /// `frame` is `None`, once [`ServerCore::complete_ack`] gives it).
    /// Sends it now when there is nothing to wait for.
    fn defer(
        &mut self,
        conn: ConnId,
        frame: Option<Frame>,
        stale: Frame,
        tickets: &[Ticket],
    ) -> Option<u64> {
        if tickets.is_empty() {
            if let Some(f) = frame {
                self.send(conn, f);
                return None;
            }
        }
        let id = self.next_ack;
        self.next_ack += 1;
        for t in tickets {
            self.ticket_acks.entry(*t).or_default().push(id);
        }
        self.acks.insert(
            id,
            Ack {
                conn,
                frame,
                stale,
                waits: tickets.len(),
                is_stale: false,
            },
        );
        Some(id)
    }

    /// Gives a deferred ack its reply (a waiting pull was answered).
    fn complete_ack(&mut self, id: u64, frame: Frame) {
        let Some(ack) = self.acks.get_mut(&id) else {
            return;
        };
        ack.frame = Some(frame);
        if ack.waits == 0 {
            self.finish_ack(id);
        }
    }

    fn finish_ack(&mut self, id: u64) {
        if let Some(ack) = self.acks.remove(&id) {
            let frame = if ack.is_stale {
                Some(ack.stale)
            } else {
                ack.frame
            };
            if let Some(f) = frame {
                self.send(ack.conn, f);
            }
        }
    }

    fn delivered(&mut self, ticket: Ticket, delivery: Delivery) {
        for id in self.ticket_acks.remove(&ticket).unwrap_or_default() {
            let serves = self
                .acks
                .get(&id)
                .is_some_and(|ack| self.primary_of(ack.stale.header.range));
            let Some(ack) = self.acks.get_mut(&id) else {
                continue;
            };
            ack.waits = ack.waits.saturating_sub(1);
            // Abandoned where this server no longer serves the range: no
            // one copies the change to the range's holders (issue #16's
            // lost update: a server drained at the switch of a join, in the
            // middle of a moving range's old chain, took the changes queued
            // to it along, and they were acknowledged all the same).
            let lost = delivery == Delivery::Abandoned && !serves;
            if delivery == Delivery::Stale || lost {
                ack.is_stale = true;
            }
            if ack.waits == 0 && ack.frame.is_some() {
                self.finish_ack(id);
            }
        }
        let mut synced = Vec::new();
        self.syncs.retain_mut(|(epoch, waits)| {
            waits.remove(&ticket);
            if waits.is_empty() {
                synced.push(*epoch);
            }
            !waits.is_empty()
        });
        for epoch in synced {
            self.effects.push(Effect::Synced { epoch });
        }
    }

    /// Whether this server is, under its map, the primary of all of `r`.
    fn primary_of(&self, r: KeyRange) -> bool {
        self.map
            .partition_of(r.begin)
            .map(|i| &self.map.partitions[i])
            .is_some_and(|p| p.primary == self.id && p.range.covers(&r))
    }

    fn closed(&mut self, conn: ConnId) {
        // Its shadows describe what that connection's worker holds, and it
        // is gone (a new connection starts with an empty mirror).
        self.shadows.drop_conn(conn);
        self.waiting.retain(|w| w.conn != conn);
        self.acks.retain(|_, a| a.conn != conn);
        for held in self.held.values_mut() {
            held.retain(|h| h.conn != conn);
        }
        self.held.retain(|_, h| !h.is_empty());
    }

    /// The answer to a request whose change the chain refused as coming
    /// from a server that is no longer the range's primary.
    fn stale_reply(&self, h: &Header) -> Frame {
        error_reply(
            h,
            self.id,
            self.map.epoch,
            ErrorCode::NotOwner,
            format!(
                "server {} is no longer the primary of {}; retry at the current one",
                self.id, h.range
            ),
        )
    }
}
