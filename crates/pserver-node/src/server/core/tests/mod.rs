//! Unit tests of the server core: inputs in, effects out, no sockets.
//! This file holds the maps and frames they share; the tests are by part:
//! `data` (pushes, pulls, refusals, leases), `chain` (replication, both
//! ends, restores), `maps` (fences, copies, hand-offs), `returned` (a
//! server back under its id: a new process), `lend` (work on lent tables,
//! checkpoints).
//!
//! Maps are written by hand: servers 1, 2, 3 (addresses `s1`...), workers
//! 10 and 11; the key space is cut at `MID` into two partitions.

use super::*;

mod chain;
mod data;
mod lend;
mod maps;
mod returned;
mod significant;
use pserver_core::map::Group;
use pserver_core::{Init, KEY_END, NodeInfo, Partition, Role, UpdaterSpec};
use pserver_wire::header::{FLAG_CACHE_KEYS, FLAG_DENSE, FLAG_KEYREF, FLAG_RETRY, FLAG_SCAN};
use pserver_wire::message::Replica;

pub(super) const MID: u64 = 1 << 63;
pub(super) const LOW: KeyRange = KeyRange { begin: 0, end: MID };
pub(super) const HIGH: KeyRange = KeyRange {
    begin: MID,
    end: KEY_END,
};
pub(super) const T: u32 = 1;
pub(super) const CONN: ConnId = 7;

pub(super) fn cfg() -> CoreConfig {
    CoreConfig {
        limits: Limits {
            max_waiting: 4,
            max_keys: 1 << 20,
            ..Limits::default()
        },
        registry: Registry::new(),
        key_cache_keys: 1 << 10,
        replicate_after_aggregation: true,
        apply_threads: pserver_core::store::Threads::one(),
        lend_from: usize::MAX,
        significant_entries: 1 << 10,
    }
}

pub(super) fn spec(aggregate: bool, consistency: Consistency) -> TableSpec {
    TableSpec {
        id: T,
        name: "t".into(),
        dim: 1,
        init: Init::Zero,
        updater: UpdaterSpec::Add,
        consistency,
        aggregate,
        job: None,
    }
}

pub(super) fn node(id: NodeId, role: Role, state: NodeState) -> NodeInfo {
    NodeInfo {
        id,
        role,
        addr: format!("s{id}"),
        state,
        group: Group::Default,
        task: String::new(),
        joined: 0,
    }
}

pub(super) fn part(range: KeyRange, primary: NodeId, replicas: &[NodeId]) -> Partition {
    Partition {
        range,
        primary,
        replicas: replicas.to_vec(),
    }
}

/// A map at `epoch`: servers 1-3 (those in `dead` dead), workers 10 and
/// 11, the given partitions and one table.
pub(super) fn map(
    epoch: u64,
    dead: &[NodeId],
    parts: Vec<Partition>,
    table: TableSpec,
) -> ClusterMap {
    let state = |id| {
        if dead.contains(&id) {
            NodeState::Dead
        } else {
            NodeState::Alive
        }
    };
    let mut m = ClusterMap::empty(1, 1);
    m.epoch = epoch;
    m.nodes = vec![
        node(1, Role::Server, state(1)),
        node(2, Role::Server, state(2)),
        node(3, Role::Server, state(3)),
        node(10, Role::Worker, state(10)),
        node(11, Role::Worker, state(11)),
    ];
    m.partitions = parts;
    m.tables = vec![table];
    m
}

/// Server 1 primary of everything, no replicas.
pub(super) fn solo(table: TableSpec) -> ClusterMap {
    map(5, &[], vec![part(KeyRange::ALL, 1, &[])], table)
}

/// Server 1 primary of LOW with replica 2; server 2 primary of HIGH with
/// replica 1.
pub(super) fn chained(epoch: u64, table: TableSpec) -> ClusterMap {
    map(
        epoch,
        &[],
        vec![part(LOW, 1, &[2]), part(HIGH, 2, &[1])],
        table,
    )
}

pub(super) fn core_with(id: NodeId, m: ClusterMap) -> ServerCore {
    let mut c = ServerCore::new(id, cfg());
    c.step(0, Input::Map(m));
    c
}

pub(super) fn header(
    kind: Kind,
    sender: NodeId,
    epoch: u64,
    clock: u64,
    range: KeyRange,
) -> Header {
    Header {
        kind,
        sender,
        epoch,
        clock,
        range,
        table: T,
        request_id: 99,
        ..Header::new(kind)
    }
}

pub(super) fn push(sender: NodeId, clock: u64, keys: &[u64], vals: &[f32]) -> Frame {
    let mut f = Frame::new(header(Kind::Push, sender, 5, clock, KeyRange::ALL));
    f.keys = keys.to_vec();
    f.vals = vals.to_vec().into();
    f
}

pub(super) fn pull(sender: NodeId, clock: u64, keys: &[u64]) -> Frame {
    let mut f = Frame::new(header(Kind::Pull, sender, 5, clock, KeyRange::ALL));
    f.keys = keys.to_vec();
    f
}

pub(super) fn req(c: &mut ServerCore, frame: Frame) -> Vec<Effect> {
    c.step(1, Input::Request { conn: CONN, frame })
}

/// The frames sent on connections.
pub(super) fn sent(effects: &[Effect]) -> Vec<&Frame> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send { frame, .. } => Some(frame),
            _ => None,
        })
        .collect()
}

/// The one frame sent.
pub(super) fn only(effects: &[Effect]) -> &Frame {
    let s = sent(effects);
    assert_eq!(s.len(), 1, "{effects:?}");
    s[0]
}

pub(super) fn code(f: &Frame) -> Option<ErrorCode> {
    match f.control_msg() {
        Ok(Control::Error { code, .. }) if f.header.kind == Kind::Error => Some(code),
        _ => None,
    }
}

pub(super) fn acked(f: &Frame) -> (u64, u64) {
    match f.control_msg() {
        Ok(Control::PushAck { applied, duplicate }) => (applied, duplicate),
        other => panic!("not a PushAck: {other:?} {f:?}"),
    }
}

pub(super) fn forwards(effects: &[Effect]) -> Vec<(NodeId, Ticket, &Frame)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Forward {
                to, ticket, frame, ..
            } => Some((*to, *ticket, frame)),
            _ => None,
        })
        .collect()
}

pub(super) fn value(c: &ServerCore, key: u64) -> f32 {
    let mut out = Vec::new();
    c.table(T).unwrap().pull(&[key], &mut out);
    out[0]
}

pub(super) fn replicate_frame(
    sender: NodeId,
    epoch: u64,
    range: KeyRange,
    keys: &[u64],
    vals: &[f32],
) -> Frame {
    let mut f = Frame::new(header(Kind::Control, sender, epoch, 1, range));
    f.keys = keys.to_vec();
    f.vals = vals.to_vec().into();
    f.ctrl = Control::Replicate {
        spec: spec(false, Consistency::Eventual),
        what: Replica::Slots,
        records: vec![],
        chain: vec![],
    }
    .to_bytes()
    .into();
    f
}

/// A core that lends tables for requests of 4 keys or more, with tables
/// 1 and 2.
pub(super) fn lender(m: impl FnOnce(TableSpec) -> ClusterMap) -> ServerCore {
    let mut m = m(spec(false, Consistency::Eventual));
    let mut other = spec(false, Consistency::Eventual);
    other.id = 2;
    other.name = "u".into();
    m.tables.push(other);
    let mut c = ServerCore::new(
        1,
        CoreConfig {
            lend_from: 4,
            ..cfg()
        },
    );
    c.step(0, Input::Map(m));
    c
}

pub(super) fn lent_work(effects: Vec<Effect>) -> (Vec<Effect>, Option<Box<Work>>) {
    let mut work = None;
    let mut rest = Vec::new();
    for e in effects {
        match e {
            Effect::Apply(w) => work = Some(w),
            other => rest.push(other),
        }
    }
    (rest, work)
}

/// A chain change to server 2 (replica of LOW under `chained`) from 1.
pub(super) fn change(
    what: Replica,
    clock: u64,
    keys: &[u64],
    vals: &[f32],
    records: Vec<(NodeId, KeyRange, u64)>,
) -> Frame {
    let mut f = Frame::new(header(Kind::Control, 1, 5, clock, LOW));
    f.keys = keys.to_vec();
    f.vals = vals.to_vec().into();
    f.ctrl = Control::Replicate {
        spec: spec(true, Consistency::Sequential),
        what,
        records,
        chain: vec![],
    }
    .to_bytes()
    .into();
    f
}
