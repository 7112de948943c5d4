//! What a server's runtime counts as it carries out requests, and the
//! scrape made of it with the core's figures.
//!
//! Counting stays off the hot path's locks: a request is counted once, in
//! its connection's task, with three relaxed atomic adds into the slot of
//! its table and operation (never once per key); its latency is taken
//! under the core's lock that its step holds anyway (see
//! `runtime::Shared::step_locked`) with two more. Table ids are small
//! numbers handed out in order by the manager, so a table's counters are
//! found by indexing, not by a map that would need a lock; ids past
//! [`TABLE_SLOTS`] share the last slot (`table="other"`).

use super::core::CoreFigures;
use super::core::request::Op;
use crate::metrics::histogram::Histogram;
use crate::metrics::{Family, MetricKind, MetricUnit, Scrape, Value};
use pserver_core::map::DRAINING;
use pserver_core::{ClusterMap, NodeId, NodeState};
use pserver_wire::ErrorCode;
use pserver_wire::message::{LinkReport, ServerReport, TableReport};
use std::sync::atomic::{AtomicU64, Ordering};

/// Table ids counted apart: the cluster holds at most
/// `membership::MAX_TABLES` (1024) tables, and ids start at 1.
pub const TABLE_SLOTS: usize = pserver_core::membership::MAX_TABLES + 2;

/// The operations, in the order of their counters.
pub const OPS: [Op; 4] = [Op::Push, Op::Pull, Op::PushPull, Op::Scan];

/// An operation's label.
pub fn op_name(op: Op) -> &'static str {
    match op {
        Op::Push => "push",
        Op::Pull => "pull",
        Op::PushPull => "push_pull",
        Op::Scan => "scan",
    }
}

fn op_index(op: Op) -> usize {
    match op {
        Op::Push => 0,
        Op::Pull => 1,
        Op::PushPull => 2,
        Op::Scan => 3,
    }
}

/// Every error code, in the order of their counters, with its label.
pub const CODES: [(ErrorCode, &str); 14] = [
    (ErrorCode::Malformed, "malformed"),
    (ErrorCode::UnknownTable, "unknown_table"),
    (ErrorCode::WrongWidth, "wrong_width"),
    (ErrorCode::NotFinite, "not_finite"),
    (ErrorCode::BadKeys, "bad_keys"),
    (ErrorCode::NotOwner, "not_owner"),
    (ErrorCode::EpochAhead, "epoch_ahead"),
    (ErrorCode::Duplicate, "duplicate"),
    (ErrorCode::Limit, "limit"),
    (ErrorCode::Invalid, "invalid"),
    (ErrorCode::Internal, "internal"),
    (ErrorCode::KeyCacheMiss, "key_cache_miss"),
    (ErrorCode::TooOld, "too_old"),
    (ErrorCode::Stranger, "stranger"),
];

fn code_index(code: ErrorCode) -> usize {
    // Exhaustive, so a new code fails to compile until it is counted.
    match code {
        ErrorCode::Malformed => 0,
        ErrorCode::UnknownTable => 1,
        ErrorCode::WrongWidth => 2,
        ErrorCode::NotFinite => 3,
        ErrorCode::BadKeys => 4,
        ErrorCode::NotOwner => 5,
        ErrorCode::EpochAhead => 6,
        ErrorCode::Duplicate => 7,
        ErrorCode::Limit => 8,
        ErrorCode::Invalid => 9,
        ErrorCode::Internal => 10,
        ErrorCode::KeyCacheMiss => 11,
        ErrorCode::TooOld => 12,
        ErrorCode::Stranger => 13,
    }
}

/// Requests, keys and bytes of one operation on one table.
#[derive(Debug, Default)]
struct OpCounters {
    requests: AtomicU64,
    keys: AtomicU64,
    bytes: AtomicU64,
}

/// Everything a scrape of a server reads besides its counters, gathered
/// by the runtime (the core's figures under its lock, the rest outside).
#[derive(Clone, Debug, Default)]
pub struct Figured {
    /// The core's figures.
    pub core: CoreFigures,
    /// The queue to each next server of a chain.
    pub links: Vec<LinkFigures>,
    /// Bytes queued down chains so far.
    pub replicated_bytes: u64,
    /// Since the manager last answered, in ms.
    pub manager_silence_ms: u64,
}

/// The queue of one chain link (a forwarder).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkFigures {
    /// The next server.
    pub to: NodeId,
    /// Bytes queued and not yet answered.
    pub bytes: u64,
    /// Changes queued and not yet answered.
    pub changes: u64,
}

/// A server's counters (one value per server: a process may hold many).
#[derive(Debug)]
pub struct ServerStats {
    /// By table id, then by [`OPS`].
    tables: Box<[[OpCounters; 4]]>,
    /// Error replies sent, by [`code_index`].
    errors: [AtomicU64; 14],
    /// Request latency by [`OPS`]: from the frame read to its reply made.
    latency: [Histogram; 4],
    /// Bytes of every frame queued to connections (replies, errors).
    sent_bytes: AtomicU64,
    /// Connections taken, and open now.
    connections: AtomicU64,
    open: AtomicU64,
}

impl Default for ServerStats {
    fn default() -> ServerStats {
        ServerStats {
            tables: (0..TABLE_SLOTS).map(|_| Default::default()).collect(),
            errors: Default::default(),
            latency: Default::default(),
            sent_bytes: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            open: AtomicU64::new(0),
        }
    }
}

impl ServerStats {
    /// A data request read: `keys` keys (a key reference's count, a dense
    /// range's length) in a frame of `bytes` bytes on the wire.
    pub fn request(&self, table: u32, op: Op, keys: u64, bytes: u64) {
        let slot = (table as usize).min(TABLE_SLOTS - 1);
        let c = &self.tables[slot][op_index(op)];
        c.requests.fetch_add(1, Ordering::Relaxed);
        c.keys.fetch_add(keys, Ordering::Relaxed);
        c.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A request of `op` answered `us` microseconds after it was read.
    pub fn latency(&self, op: Op, us: u64) {
        self.latency[op_index(op)].observe_us(us);
    }

    /// An error reply sent.
    pub fn error(&self, code: ErrorCode) {
        self.errors[code_index(code)].fetch_add(1, Ordering::Relaxed);
    }

    /// A frame of `bytes` bytes queued to a connection.
    pub fn sent(&self, bytes: u64) {
        self.sent_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A connection opened.
    pub fn opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection closed.
    pub fn closed(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Requests, keys and bytes of `op` on table `table` so far.
    pub fn counts(&self, table: u32, op: Op) -> (u64, u64, u64) {
        let slot = (table as usize).min(TABLE_SLOTS - 1);
        let c = &self.tables[slot][op_index(op)];
        (
            c.requests.load(Ordering::Relaxed),
            c.keys.load(Ordering::Relaxed),
            c.bytes.load(Ordering::Relaxed),
        )
    }

    /// The scrape: these counters, the core's figures, the forwarders'
    /// queues and what the runtime knows of its link to the manager.
    pub fn scrape(&self, fig: &Figured) -> Scrape {
        let mut s = Scrape::default();
        let name = |id: u32| -> String {
            if id as usize >= TABLE_SLOTS - 1 {
                return "other".into();
            }
            fig.core
                .tables
                .iter()
                .find(|t| t.id == id)
                .map_or_else(|| format!("#{id}"), |t| t.name.clone())
        };
        let mut requests = Family::new(
            "server_requests",
            "Data requests a server read, by table and operation (refused ones too).",
            MetricUnit::None,
            MetricKind::Counter,
        );
        let mut keys = Family::new(
            "server_request_keys",
            "Keys in the data requests a server read (a key reference's count, a dense range's length).",
            MetricUnit::None,
            MetricKind::Counter,
        );
        let mut bytes = Family::new(
            "server_request",
            "Bytes on the wire of the data requests a server read (length prefix included).",
            MetricUnit::Bytes,
            MetricKind::Counter,
        );
        for (id, ops) in self.tables.iter().enumerate() {
            for (i, c) in ops.iter().enumerate() {
                let n = c.requests.load(Ordering::Relaxed);
                if n == 0 {
                    continue;
                }
                let labels = || {
                    vec![
                        ("table", name(id as u32)),
                        ("op", op_name(OPS[i]).to_string()),
                    ]
                };
                requests.push(labels(), Value::Int(n));
                keys.push(labels(), Value::Int(c.keys.load(Ordering::Relaxed)));
                bytes.push(labels(), Value::Int(c.bytes.load(Ordering::Relaxed)));
            }
        }
        s.add(requests);
        s.add(keys);
        s.add(bytes);
        let mut latency = Family::new(
            "server_request_duration",
            "Time from a data request read to its reply made (waits for slower workers and for the chain included), by operation.",
            MetricUnit::Seconds,
            MetricKind::Histogram,
        );
        for (i, h) in self.latency.iter().enumerate() {
            latency.push(vec![("op", op_name(OPS[i]).to_string())], h.value());
        }
        s.add(latency);
        let mut errors = Family::new(
            "server_errors",
            "Error replies a server sent, by code (the wire's ErrorCode of each refusal).",
            MetricUnit::None,
            MetricKind::Counter,
        );
        for (code, label) in &CODES {
            let n = self.errors[code_index(*code)].load(Ordering::Relaxed);
            errors.push(vec![("code", (*label).to_string())], Value::Int(n));
        }
        s.add(errors);
        s.add(
            Family::new(
                "server_sent",
                "Bytes of the frames a server queued to its connections (replies and errors).",
                MetricUnit::Bytes,
                MetricKind::Counter,
            )
            .with(Value::Int(self.sent_bytes.load(Ordering::Relaxed))),
        );
        s.add(
            Family::new(
                "server_connections",
                "Connections a server took.",
                MetricUnit::None,
                MetricKind::Counter,
            )
            .with(Value::Int(self.connections.load(Ordering::Relaxed))),
        );
        s.add(
            Family::new(
                "server_connections_open",
                "Connections a server serves now.",
                MetricUnit::None,
                MetricKind::Gauge,
            )
            .with(Value::Int(self.open.load(Ordering::Relaxed))),
        );
        core_families(&mut s, &fig.core);
        let mut queue = Family::new(
            "server_replication_queue",
            "Bytes of changes queued to the next server of a chain and not yet answered, by that server (the chain link's lag).",
            MetricUnit::Bytes,
            MetricKind::Gauge,
        );
        let mut changes = Family::new(
            "server_replication_queue_changes",
            "Changes queued to the next server of a chain and not yet answered, by that server.",
            MetricUnit::None,
            MetricKind::Gauge,
        );
        for l in &fig.links {
            queue.push(vec![("to", l.to.to_string())], Value::Int(l.bytes));
            changes.push(vec![("to", l.to.to_string())], Value::Int(l.changes));
        }
        s.add(queue);
        s.add(changes);
        s.add(
            Family::new(
                "server_replicated",
                "Bytes a server queued down replica chains (changes, copies, markers).",
                MetricUnit::Bytes,
                MetricKind::Counter,
            )
            .with(Value::Int(fig.replicated_bytes)),
        );
        s.add(
            Family::new(
                "server_manager_silence",
                "Seconds since the manager last answered this server (past half the lease it serves nothing).",
                MetricUnit::Seconds,
                MetricKind::Gauge,
            )
            .with(Value::Float(fig.manager_silence_ms as f64 / 1e3)),
        );
        s
    }
}

/// Whether server `me` serves its ranges under `map`, the manager silent
/// for `silent_ms`: `Ok`, or why not in one line.
pub fn ready(me: NodeId, map: &ClusterMap, silent_ms: u64) -> Result<(), String> {
    if map.partitions.is_empty() {
        return Err("no cluster map with key ranges from the manager yet".into());
    }
    let Some(node) = map.node(me) else {
        return Err(format!(
            "server {me} is not in the map of epoch {}",
            map.epoch
        ));
    };
    if node.state == NodeState::Dead {
        return Err(format!(
            "the map of epoch {} says server {me} is dead (drained or declared dead): it is stopping",
            map.epoch
        ));
    }
    if node.task == DRAINING {
        return Err(format!(
            "draining: server {me} is handing its ranges to the other servers and will exit"
        ));
    }
    if silent_ms > map.lease_ms / 2 {
        return Err(format!(
            "lease lapsed: the manager has not answered for {silent_ms} ms (over half the {} ms lease), so server {me} serves nothing until it does",
            map.lease_ms
        ));
    }
    if map.primary_ranges(me).is_empty() {
        return Err(format!(
            "joining: the map of epoch {} gives server {me} no range of its own yet (a hand-off copies them first)",
            map.epoch
        ));
    }
    Ok(())
}

impl ServerStats {
    /// The answer to `Control::Stats`: these counters and `fig`.
    pub fn report(&self, fig: &Figured) -> ServerReport {
        let tables = fig
            .core
            .tables
            .iter()
            .map(|t| {
                let mut r = TableReport {
                    id: t.id,
                    stored_keys: t.stored.map(|(k, _)| k),
                    ..Default::default()
                };
                for (i, op) in OPS.iter().enumerate() {
                    let (n, k, b) = self.counts(t.id, *op);
                    r.requests[i] = n;
                    r.keys[i] = k;
                    r.bytes[i] = b;
                }
                r
            })
            .collect();
        ServerReport {
            epoch: fig.core.epoch,
            tables,
            links: fig
                .links
                .iter()
                .map(|l| LinkReport {
                    to: l.to,
                    bytes: l.bytes,
                    changes: l.changes,
                })
                .collect(),
            pulls_waiting: fig.core.tables.iter().map(|t| t.pulls_waiting).sum(),
            acks_waiting: fig.core.acks_waiting,
            handoff_copies_pending: fig.core.syncs_pending,
            errors: self.errors.iter().map(|e| e.load(Ordering::Relaxed)).sum(),
            connections: self.open.load(Ordering::Relaxed),
        }
    }
}

/// The families of the core's own figures.
fn core_families(s: &mut Scrape, c: &CoreFigures) {
    let gauge = |name, help, v: u64| {
        Family::new(name, help, MetricUnit::None, MetricKind::Gauge).with(Value::Int(v))
    };
    s.add(gauge(
        "server_map_epoch",
        "Epoch of the cluster map a server serves under.",
        c.epoch,
    ));
    let mut ranges = Family::new(
        "server_ranges",
        "Key ranges a server holds under its map, as primary or as replica.",
        MetricUnit::None,
        MetricKind::Gauge,
    );
    ranges.push(
        vec![("role", "primary".into())],
        Value::Int(c.primary_ranges),
    );
    ranges.push(
        vec![("role", "replica".into())],
        Value::Int(c.replica_ranges),
    );
    s.add(ranges);
    let mut stored_keys = Family::new(
        "server_stored_keys",
        "Keys a server stores, by table (a table lent out for a big request is left out until it is back).",
        MetricUnit::None,
        MetricKind::Gauge,
    );
    let mut stored_bytes = Family::new(
        "server_stored",
        "Bytes a server's store allocated for keys, weights and optimizer state, by table.",
        MetricUnit::Bytes,
        MetricKind::Gauge,
    );
    let mut waiting = Family::new(
        "server_pulls_waiting",
        "Pulls parked on a server until slower workers' pushes arrive, by table.",
        MetricUnit::None,
        MetricKind::Gauge,
    );
    for t in &c.tables {
        let l = || vec![("table", t.name.clone())];
        if let Some((k, b)) = t.stored {
            stored_keys.push(l(), Value::Int(k));
            stored_bytes.push(l(), Value::Int(b));
        }
        waiting.push(l(), Value::Int(t.pulls_waiting));
    }
    s.add(stored_keys);
    s.add(stored_bytes);
    s.add(waiting);
    s.add(gauge(
        "server_acks_waiting",
        "Replies waiting for their changes to reach the end of the chain.",
        c.acks_waiting,
    ));
    s.add(gauge(
        "server_handoff_copies_pending",
        "Maps whose copies to new replicas (a hand-off's first phase) have not all been answered yet.",
        c.syncs_pending,
    ));
    s.add(gauge(
        "server_handoff_ranges_held_back",
        "Ranges this server is the new primary of but holds back until the old primary's fence arrives.",
        c.fences_waiting,
    ));
}
