//! Unit tests of the server core: inputs in, effects out, no sockets.
//!
//! Maps are written by hand: servers 1, 2, 3 (addresses `s1`...), workers
//! 10 and 11; the key space is cut at `MID` into two partitions.

use super::*;
use pserver_core::{Init, KEY_END, NodeInfo, Partition, Role, UpdaterSpec};
use pserver_wire::header::{FLAG_CACHE_KEYS, FLAG_DENSE, FLAG_KEYREF, FLAG_RETRY, FLAG_SCAN};
use pserver_wire::message::Replica;

const MID: u64 = 1 << 63;
const LOW: KeyRange = KeyRange { begin: 0, end: MID };
const HIGH: KeyRange = KeyRange {
    begin: MID,
    end: KEY_END,
};
const T: u32 = 1;
const CONN: ConnId = 7;

fn cfg() -> CoreConfig {
    CoreConfig {
        limits: Limits {
            max_waiting: 4,
            max_keys: 1 << 20,
            ..Limits::default()
        },
        registry: Registry::new(),
        key_cache_keys: 1 << 10,
        replicate_after_aggregation: true,
        apply_threads: 1,
        lend_from: usize::MAX,
    }
}

fn spec(aggregate: bool, consistency: Consistency) -> TableSpec {
    TableSpec {
        id: T,
        name: "t".into(),
        dim: 1,
        init: Init::Zero,
        updater: UpdaterSpec::Add,
        consistency,
        aggregate,
    }
}

fn node(id: NodeId, role: Role, state: NodeState) -> NodeInfo {
    NodeInfo {
        id,
        role,
        addr: format!("s{id}"),
        state,
    }
}

fn part(range: KeyRange, primary: NodeId, replicas: &[NodeId]) -> Partition {
    Partition {
        range,
        primary,
        replicas: replicas.to_vec(),
    }
}

/// A map at `epoch`: servers 1-3 (those in `dead` dead), workers 10 and
/// 11, the given partitions and one table.
fn map(epoch: u64, dead: &[NodeId], parts: Vec<Partition>, table: TableSpec) -> ClusterMap {
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
fn solo(table: TableSpec) -> ClusterMap {
    map(5, &[], vec![part(KeyRange::ALL, 1, &[])], table)
}

/// Server 1 primary of LOW with replica 2; server 2 primary of HIGH with
/// replica 1.
fn chained(epoch: u64, table: TableSpec) -> ClusterMap {
    map(
        epoch,
        &[],
        vec![part(LOW, 1, &[2]), part(HIGH, 2, &[1])],
        table,
    )
}

fn core_with(id: NodeId, m: ClusterMap) -> ServerCore {
    let mut c = ServerCore::new(id, cfg());
    c.step(0, Input::Map(m));
    c
}

fn header(kind: Kind, sender: NodeId, epoch: u64, clock: u64, range: KeyRange) -> Header {
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

fn push(sender: NodeId, clock: u64, keys: &[u64], vals: &[f32]) -> Frame {
    let mut f = Frame::new(header(Kind::Push, sender, 5, clock, KeyRange::ALL));
    f.keys = keys.to_vec();
    f.vals = vals.to_vec();
    f
}

fn pull(sender: NodeId, clock: u64, keys: &[u64]) -> Frame {
    let mut f = Frame::new(header(Kind::Pull, sender, 5, clock, KeyRange::ALL));
    f.keys = keys.to_vec();
    f
}

fn req(c: &mut ServerCore, frame: Frame) -> Vec<Effect> {
    c.step(1, Input::Request { conn: CONN, frame })
}

/// The frames sent on connections.
fn sent(effects: &[Effect]) -> Vec<&Frame> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send { frame, .. } => Some(frame),
            _ => None,
        })
        .collect()
}

/// The one frame sent.
fn only(effects: &[Effect]) -> &Frame {
    let s = sent(effects);
    assert_eq!(s.len(), 1, "{effects:?}");
    s[0]
}

fn code(f: &Frame) -> Option<ErrorCode> {
    match f.control_msg() {
        Ok(Control::Error { code, .. }) if f.header.kind == Kind::Error => Some(code),
        _ => None,
    }
}

fn acked(f: &Frame) -> (u64, u64) {
    match f.control_msg() {
        Ok(Control::PushAck { applied, duplicate }) => (applied, duplicate),
        other => panic!("not a PushAck: {other:?} {f:?}"),
    }
}

fn forwards(effects: &[Effect]) -> Vec<(NodeId, Ticket, &Frame)> {
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

fn value(c: &ServerCore, key: u64) -> f32 {
    let mut out = Vec::new();
    c.table(T).unwrap().pull(&[key], &mut out);
    out[0]
}

#[test]
fn push_then_pull() {
    let mut c = core_with(1, solo(spec(false, Consistency::Eventual)));
    let e = req(&mut c, push(10, 1, &[3, 9], &[1.0, 2.0]));
    assert_eq!(acked(only(&e)), (2, 0));
    let e = req(&mut c, pull(10, 0, &[3, 9, 12]));
    let r = only(&e);
    assert_eq!(r.header.kind, Kind::Reply);
    assert_eq!(r.header.request_id, 99);
    assert_eq!(r.vals, [1.0, 2.0, 0.0]);
}

#[test]
fn every_refusal_changes_nothing() {
    let m = solo(spec(false, Consistency::Eventual));
    let mut c = core_with(1, m.clone());
    req(&mut c, push(10, 3, &[1], &[1.0]));
    let with = |f: fn(&mut Frame)| {
        let mut p = push(10, 4, &[1], &[1.0]);
        f(&mut p);
        p
    };
    let cases: Vec<(&str, Frame, ErrorCode)> = vec![
        (
            "epoch ahead",
            with(|p| p.header.epoch = 6),
            ErrorCode::EpochAhead,
        ),
        (
            "unknown table",
            with(|p| p.header.table = 9),
            ErrorCode::UnknownTable,
        ),
        (
            "empty range",
            with(|p| p.header.range = KeyRange { begin: 4, end: 4 }),
            ErrorCode::NotOwner,
        ),
        (
            "unsorted",
            with(|p| {
                p.keys = vec![5, 2];
                p.vals = vec![1.0, 1.0];
            }),
            ErrorCode::BadKeys,
        ),
        (
            "outside its range",
            with(|p| p.header.range = KeyRange { begin: 2, end: 9 }),
            ErrorCode::BadKeys,
        ),
        (
            "wrong width",
            with(|p| p.vals = vec![1.0, 2.0]),
            ErrorCode::WrongWidth,
        ),
        (
            "NaN",
            with(|p| p.vals = vec![f32::NAN]),
            ErrorCode::NotFinite,
        ),
        (
            "infinite",
            with(|p| p.vals = vec![f32::INFINITY]),
            ErrorCode::NotFinite,
        ),
        ("clock 0", with(|p| p.header.clock = 0), ErrorCode::Invalid),
        (
            "duplicate",
            with(|p| p.header.clock = 3),
            ErrorCode::Duplicate,
        ),
        (
            "dense over the limit",
            with(|p| {
                p.header.flags = FLAG_DENSE;
                p.keys.clear();
                p.header.range = KeyRange {
                    begin: 0,
                    end: 1 << 21,
                };
            }),
            ErrorCode::Limit,
        ),
        (
            "key list not cached",
            with(|p| {
                p.header.flags = FLAG_KEYREF;
                p.keys = vec![0xabc, 1];
            }),
            ErrorCode::KeyCacheMiss,
        ),
        (
            "a reply as a request",
            with(|p| p.header.kind = Kind::Reply),
            ErrorCode::Invalid,
        ),
        (
            "a manager's message",
            {
                let mut f = Frame::control(
                    header(Kind::Control, 10, 5, 0, KeyRange::ALL),
                    &Control::Heartbeat,
                );
                f.header.table = 0;
                f
            },
            ErrorCode::Invalid,
        ),
        (
            "garbage control bytes",
            {
                let mut f = Frame::new(header(Kind::Control, 10, 5, 0, KeyRange::ALL));
                f.ctrl = bytes::Bytes::from_static(&[0xff, 0xff, 0xff]);
                f
            },
            ErrorCode::Malformed,
        ),
        (
            "a pull carrying no Consistency",
            {
                let mut f = pull(10, 1, &[1]);
                f.ctrl = Control::Heartbeat.to_bytes().into();
                f
            },
            ErrorCode::Invalid,
        ),
    ];
    for (what, frame, want) in cases {
        let e = req(&mut c, frame);
        assert_eq!(code(only(&e)), Some(want), "{what}: {e:?}");
        assert_eq!(value(&c, 1), 1.0, "{what} changed the table");
        assert!(forwards(&e).is_empty(), "{what}");
    }
    // Worker 11 far below its own window is TooOld.
    req(&mut c, push(11, 200, &[2], &[1.0]));
    let e = req(&mut c, push(11, 100, &[2], &[1.0]));
    assert_eq!(code(only(&e)), Some(ErrorCode::TooOld));
    assert_eq!(value(&c, 2), 1.0);
    // A stale epoch is redirected with the map.
    let mut old = push(10, 9, &[1], &[1.0]);
    old.header.epoch = 4;
    let e = req(&mut c, old);
    let r = only(&e);
    assert_eq!(r.header.kind, Kind::Redirect);
    assert!(matches!(r.control_msg(), Ok(Control::Map(got)) if got == m));
    assert_eq!(value(&c, 1), 1.0);
}

#[test]
fn a_late_pipelined_push_is_applied_once() {
    let mut c = core_with(1, solo(spec(false, Consistency::Eventual)));
    for clock in [2, 3, 1] {
        let e = req(&mut c, push(10, clock, &[1], &[1.0]));
        assert_eq!(acked(only(&e)), (1, 0), "clock {clock}");
    }
    let mut again = push(10, 1, &[1], &[1.0]);
    again.header.flags = FLAG_RETRY;
    assert_eq!(acked(only(&req(&mut c, again))), (0, 1));
    assert_eq!(value(&c, 1), 3.0);
}

#[test]
fn a_push_is_acknowledged_once_its_chain_has_it() {
    let mut c = core_with(1, chained(5, spec(false, Consistency::Eventual)));
    let mut p = push(10, 1, &[1], &[2.0]);
    p.header.range = LOW;
    let e = req(&mut c, p.clone());
    assert!(sent(&e).is_empty(), "no ack before the chain has it");
    let f = forwards(&e);
    assert_eq!(f.len(), 1);
    let (to, ticket, frame) = f[0];
    assert_eq!(to, 2);
    match frame.control_msg() {
        Ok(Control::Replicate {
            what: Replica::Slots,
            records,
            chain,
            ..
        }) => {
            assert_eq!(records, [(10, LOW, 1)]);
            assert!(chain.is_empty());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(frame.vals, [2.0], "the resulting slot travels");
    let e = c.step(
        2,
        Input::Delivered {
            ticket,
            delivery: Delivery::Stored,
        },
    );
    assert_eq!(acked(only(&e)), (1, 0));
    // The chain refuses the next one as stale: the worker hears NotOwner.
    p.header.clock = 2;
    let e = req(&mut c, p);
    let (_, ticket, _) = forwards(&e)[0];
    let e = c.step(
        3,
        Input::Delivered {
            ticket,
            delivery: Delivery::Stale,
        },
    );
    assert_eq!(code(only(&e)), Some(ErrorCode::NotOwner));
}

#[test]
fn a_replica_stores_forwards_and_answers_after_its_successor() {
    // Server 2 is the middle of chain 1 -> 2 -> 3 for LOW.
    let m = map(
        5,
        &[],
        vec![part(LOW, 1, &[2, 3]), part(HIGH, 3, &[1, 2])],
        spec(false, Consistency::Eventual),
    );
    let mut c = core_with(2, m);
    let mut f = Frame::new(header(Kind::Control, 1, 5, 4, LOW));
    f.keys = vec![7];
    f.vals = vec![5.0];
    f.ctrl = Control::Replicate {
        spec: spec(false, Consistency::Eventual),
        what: Replica::Slots,
        records: vec![(10, LOW, 4)],
        chain: vec![3],
    }
    .to_bytes()
    .into();
    let bad = {
        let mut b = f.clone();
        b.vals = vec![f32::NAN];
        b
    };
    assert_eq!(code(only(&req(&mut c, bad))), Some(ErrorCode::NotFinite));
    assert_eq!(value(&c, 7), 0.0);
    let e = req(&mut c, f);
    assert!(sent(&e).is_empty());
    let fw = forwards(&e);
    assert_eq!((fw.len(), fw[0].0), (1, 3));
    assert_eq!(value(&c, 7), 5.0);
    let e = c.step(
        2,
        Input::Delivered {
            ticket: fw[0].1,
            delivery: Delivery::Stored,
        },
    );
    assert_eq!(only(&e).header.kind, Kind::Reply);
    // The replayed record makes the promoted replica refuse the duplicate.
    let promoted = map(
        6,
        &[1],
        vec![part(LOW, 2, &[3]), part(HIGH, 3, &[2])],
        spec(false, Consistency::Eventual),
    );
    c.step(3, Input::Map(promoted));
    let mut retry = push(10, 4, &[7], &[5.0]);
    retry.header.epoch = 6;
    retry.header.range = LOW;
    retry.header.flags = FLAG_RETRY;
    let e = req(&mut c, retry);
    let (_, t, _) = forwards(&e)[0];
    let e = c.step(
        4,
        Input::Delivered {
            ticket: t,
            delivery: Delivery::Stored,
        },
    );
    assert_eq!(acked(only(&e)), (0, 1));
    assert_eq!(value(&c, 7), 5.0);
}

#[test]
fn changes_from_a_server_declared_dead_are_refused() {
    let m = map(
        5,
        &[1],
        vec![part(KeyRange::ALL, 2, &[])],
        spec(false, Consistency::Eventual),
    );
    let mut c = core_with(2, m);
    let mut f = Frame::new(header(Kind::Control, 1, 4, 4, LOW));
    f.keys = vec![7];
    f.vals = vec![5.0];
    f.ctrl = Control::Replicate {
        spec: spec(false, Consistency::Eventual),
        what: Replica::Slots,
        records: vec![],
        chain: vec![],
    }
    .to_bytes()
    .into();
    assert_eq!(code(only(&req(&mut c, f))), Some(ErrorCode::NotOwner));
    assert_eq!(value(&c, 7), 0.0);
}

#[test]
fn aggregated_pushes_are_acknowledged_after_their_sum_is_replicated() {
    let mut c = core_with(1, chained(5, spec(true, Consistency::Sequential)));
    let mut a = push(10, 1, &[1], &[1.0]);
    a.header.range = LOW;
    let mut b = push(11, 1, &[1], &[2.0]);
    b.header.range = LOW;
    let e = req(&mut c, a);
    assert!(sent(&e).is_empty() && forwards(&e).is_empty(), "{e:?}");
    let e = req(&mut c, b);
    assert!(sent(&e).is_empty());
    let fw = forwards(&e);
    assert_eq!(fw.len(), 1, "one message for the clock's sum");
    assert!(matches!(
        fw[0].2.control_msg(),
        Ok(Control::Replicate {
            what: Replica::Flushed { clock: 1 },
            ..
        })
    ));
    assert_eq!(value(&c, 1), 3.0);
    let e = c.step(
        2,
        Input::Delivered {
            ticket: fw[0].1,
            delivery: Delivery::Stored,
        },
    );
    let acks: Vec<(u64, u64)> = sent(&e).into_iter().map(acked).collect();
    assert_eq!(acks, [(1, 0), (1, 0)]);
}

#[test]
fn an_overflowing_sum_is_refused_to_its_sender() {
    let mut c = core_with(1, solo(spec(true, Consistency::Sequential)));
    let e = req(&mut c, push(10, 1, &[1], &[f32::MAX]));
    assert_eq!(acked(only(&e)), (1, 0));
    let e = req(&mut c, push(11, 1, &[1], &[f32::MAX]));
    assert_eq!(code(only(&e)), Some(ErrorCode::NotFinite));
    // The clock waits for a push worker 11 can make.
    let e = req(&mut c, pull(10, 1, &[1]));
    assert!(sent(&e).is_empty(), "the pull waits");
    let e = req(&mut c, push(11, 1, &[1], &[-1.0]));
    let s = sent(&e);
    assert_eq!(s.len(), 2, "the ack, then the waiting pull: {e:?}");
    assert_eq!(acked(s[0]), (1, 0));
    assert_eq!(s[1].vals, [f32::MAX - 1.0]);
}

#[test]
fn pulls_wait_for_the_slowest_worker_and_are_bounded() {
    let mut c = core_with(1, solo(spec(false, Consistency::Bounded(1))));
    req(&mut c, push(10, 1, &[1], &[1.0]));
    req(&mut c, push(10, 2, &[1], &[1.0]));
    // Clock 3 with tau 1 needs every worker at 2; worker 11 is at 0.
    for _ in 0..4 {
        assert!(sent(&req(&mut c, pull(10, 3, &[1]))).is_empty());
    }
    let e = req(&mut c, pull(10, 3, &[1]));
    assert_eq!(code(only(&e)), Some(ErrorCode::Limit));
    req(&mut c, push(11, 1, &[2], &[1.0]));
    let e = req(&mut c, push(11, 2, &[2], &[1.0]));
    let s = sent(&e);
    assert_eq!(s.len(), 5, "the ack and the four pulls");
    assert!(s[1..].iter().all(|f| f.vals == [2.0]));
}

#[test]
fn a_closed_connection_drops_its_waiting_pulls() {
    let mut c = core_with(1, solo(spec(false, Consistency::Sequential)));
    assert!(sent(&req(&mut c, pull(10, 1, &[1]))).is_empty());
    c.step(2, Input::Closed(CONN));
    req(&mut c, push(10, 1, &[1], &[1.0]));
    let e = req(&mut c, push(11, 1, &[1], &[1.0]));
    assert_eq!(sent(&e).len(), 1, "only the ack: {e:?}");
}

#[test]
fn a_moved_range_redirects_its_waiting_pulls() {
    let mut c = core_with(1, solo(spec(false, Consistency::Sequential)));
    assert!(sent(&req(&mut c, pull(10, 1, &[1]))).is_empty());
    let moved = map(
        6,
        &[],
        vec![part(LOW, 2, &[]), part(HIGH, 1, &[])],
        spec(false, Consistency::Sequential),
    );
    let e = c.step(2, Input::Map(moved));
    let r = only(&e);
    assert_eq!(r.header.kind, Kind::Redirect);
}

#[test]
fn a_new_primary_waits_for_the_old_ones_fence() {
    // Server 2 takes LOW from server 1, which is alive (a drain).
    let before = chained(5, spec(false, Consistency::Eventual));
    let after = map(
        6,
        &[],
        vec![part(LOW, 2, &[3]), part(HIGH, 2, &[3])],
        spec(false, Consistency::Eventual),
    );
    let mut c = core_with(2, before);
    c.step(10, Input::Map(after.clone()));
    let mut p = push(10, 1, &[1], &[1.0]);
    p.header.epoch = 6;
    p.header.range = LOW;
    let e = c.step(
        20,
        Input::Request {
            conn: CONN,
            frame: p.clone(),
        },
    );
    assert_eq!(code(only(&e)), Some(ErrorCode::EpochAhead));
    // The fence arrives from server 1: LOW is served.
    let mut fence = control_request(
        1,
        6,
        &Control::Fence {
            from: 1,
            chain: vec![],
        },
    );
    fence.header.range = LOW;
    let e = c.step(
        30,
        Input::Request {
            conn: 8,
            frame: fence,
        },
    );
    assert_eq!(only(&e).header.kind, Kind::Reply);
    let e = c.step(
        40,
        Input::Request {
            conn: CONN,
            frame: p.clone(),
        },
    );
    assert!(sent(&e).is_empty(), "queued for the replica");
    assert_eq!(forwards(&e).len(), 1);

    // Without the fence the range is served once the timeout passes.
    let mut d = core_with(2, chained(5, spec(false, Consistency::Eventual)));
    d.step(10, Input::Map(after));
    let e = d.step(
        10 + FENCE_TIMEOUT_MS - 1,
        Input::Request {
            conn: CONN,
            frame: p.clone(),
        },
    );
    assert_eq!(code(only(&e)), Some(ErrorCode::EpochAhead));
    let e = d.step(
        10 + FENCE_TIMEOUT_MS,
        Input::Request {
            conn: CONN,
            frame: p,
        },
    );
    assert_eq!(forwards(&e).len(), 1);
}

#[test]
fn the_old_primary_fences_the_ranges_it_hands_over() {
    let mut c = core_with(1, chained(5, spec(false, Consistency::Eventual)));
    let after = map(
        6,
        &[],
        vec![part(LOW, 2, &[3]), part(HIGH, 2, &[3])],
        spec(false, Consistency::Eventual),
    );
    let e = c.step(2, Input::Map(after));
    let fences: Vec<_> = forwards(&e)
        .into_iter()
        .filter(|(_, _, f)| matches!(f.control_msg(), Ok(Control::Fence { from: 1, .. })))
        .collect();
    assert_eq!(fences.len(), 1);
    assert_eq!((fences[0].0, fences[0].2.header.range), (2, LOW));
}

#[test]
fn a_map_change_copies_to_new_replicas_and_reports_synced_after() {
    let mut c = core_with(1, solo(spec(false, Consistency::Eventual)));
    assert!(
        c.step(1, Input::Map(solo(spec(false, Consistency::Eventual))))
            .is_empty(),
        "an old map changes nothing"
    );
    req(&mut c, push(10, 1, &[1, MID + 1], &[1.0, 2.0]));
    let mut m = map(
        6,
        &[],
        vec![part(KeyRange::ALL, 1, &[2])],
        spec(false, Consistency::Eventual),
    );
    m.epoch = 6;
    let e = c.step(2, Input::Map(m));
    let fw = forwards(&e);
    let copy = fw
        .iter()
        .find(|(_, _, f)| {
            matches!(
                f.control_msg(),
                Ok(Control::Replicate {
                    what: Replica::Copy { reset: true },
                    ..
                })
            )
        })
        .expect("a copy");
    assert_eq!(copy.0, 2);
    assert_eq!(copy.2.keys, [1, MID + 1]);
    let marker = fw
        .iter()
        .find(|(_, _, f)| matches!(f.control_msg(), Ok(Control::Synced { epoch: 6 })))
        .expect("a marker behind the copy");
    assert!(marker.1 > copy.1, "the marker queues behind the copy");
    assert!(!e.iter().any(|x| matches!(x, Effect::Synced { .. })));
    let e = c.step(
        3,
        Input::Delivered {
            ticket: marker.1,
            delivery: Delivery::Stored,
        },
    );
    assert!(matches!(e[..], [Effect::Synced { epoch: 6 }]), "{e:?}");
}

#[test]
fn a_dead_replica_is_abandoned_and_its_waiting_acks_follow_its_tickets() {
    let mut c = core_with(1, chained(5, spec(false, Consistency::Eventual)));
    let mut p = push(10, 1, &[1], &[1.0]);
    p.header.range = LOW;
    let e = req(&mut c, p);
    let (_, ticket, _) = forwards(&e)[0];
    let m = map(
        6,
        &[2],
        vec![part(KeyRange::ALL, 1, &[3])],
        spec(false, Consistency::Eventual),
    );
    let e = c.step(2, Input::Map(m));
    assert!(e.iter().any(|x| matches!(x, Effect::Abandon { to: 2 })));
    assert!(
        forwards(&e).iter().any(|(to, _, _)| *to == 3),
        "the new replica gets a copy"
    );
    // The runtime settles an abandoned queue's tickets as stored.
    let e = c.step(
        3,
        Input::Delivered {
            ticket,
            delivery: Delivery::Stored,
        },
    );
    assert_eq!(acked(only(&e)), (1, 0));
}

#[test]
fn keys_of_ranges_handed_away_are_dropped() {
    let mut c = core_with(1, solo(spec(false, Consistency::Eventual)));
    req(&mut c, push(10, 1, &[1, 2, MID + 1], &[1.0, 1.0, 1.0]));
    assert_eq!(c.table(T).unwrap().store().len(), 3);
    let m = map(
        6,
        &[],
        vec![part(LOW, 2, &[]), part(HIGH, 1, &[])],
        spec(false, Consistency::Eventual),
    );
    c.step(2, Input::Map(m));
    assert_eq!(c.table(T).unwrap().store().len(), 1);
    assert_eq!(value(&c, MID + 1), 1.0);
}

#[test]
fn key_caching_resolves_references_after_a_kept_list() {
    let mut c = core_with(1, solo(spec(false, Consistency::Eventual)));
    let keys = [3u64, 5, 8];
    let mut p = push(10, 1, &keys, &[1.0; 3]);
    p.header.flags = FLAG_CACHE_KEYS;
    let e = req(&mut c, p);
    let r = only(&e);
    assert_ne!(
        r.header.flags & FLAG_CACHE_KEYS,
        0,
        "the server says it kept the list"
    );
    let hash = pserver_core::keycache::key_list_hash(&keys);
    let mut q = push(10, 2, &[hash, 3], &[1.0; 3]);
    q.header.flags = FLAG_KEYREF;
    assert_eq!(acked(only(&req(&mut c, q))), (3, 0));
    assert_eq!(value(&c, 8), 2.0);
}

#[test]
fn dense_push_pull_and_scan() {
    let mut c = core_with(1, solo(spec(false, Consistency::Eventual)));
    let r = KeyRange { begin: 10, end: 14 };
    let mut p = Frame::new(header(Kind::Push, 10, 5, 1, r));
    p.header.flags = FLAG_DENSE;
    p.vals = vec![1.0, 2.0, 3.0, 4.0];
    assert_eq!(acked(only(&req(&mut c, p))), (4, 0));
    let mut q = Frame::new(header(Kind::Pull, 10, 5, 0, r));
    q.header.flags = FLAG_DENSE;
    assert_eq!(only(&req(&mut c, q)).vals, [1.0, 2.0, 3.0, 4.0]);
    let mut s = Frame::new(header(Kind::Pull, 10, 5, 0, KeyRange::ALL));
    s.header.flags = FLAG_SCAN;
    let e = req(&mut c, s);
    assert_eq!(only(&e).keys, [10, 11, 12, 13]);
}

#[test]
fn a_checkpoint_is_copied_now_and_written_by_the_runtime() {
    let mut c = core_with(1, solo(spec(false, Consistency::Eventual)));
    req(&mut c, push(10, 1, &[1, 2], &[1.0, 2.0]));
    let f = Frame::control(
        header(Kind::Control, 10, 5, 0, KeyRange::ALL),
        &Control::Snapshot { dir: "/d".into() },
    );
    let e = req(&mut c, f);
    let [Effect::Checkpoint { dir, parts, .. }] = &e[..] else {
        panic!("{e:?}");
    };
    assert_eq!(dir, "/d");
    assert_eq!(parts.len(), 1);
    assert_eq!(
        (parts[0].keys.clone(), parts[0].slots.clone()),
        (vec![1, 2], vec![1.0, 2.0])
    );
    assert_eq!(parts[0].records, [(10, KeyRange::ALL, 1)]);
}

#[test]
fn stop_forgets_every_owed_reply() {
    let mut c = core_with(1, chained(5, spec(false, Consistency::Eventual)));
    let mut p = push(10, 1, &[1], &[1.0]);
    p.header.range = LOW;
    let e = req(&mut c, p);
    let (_, ticket, _) = forwards(&e)[0];
    c.stop();
    let e = c.step(
        2,
        Input::Delivered {
            ticket,
            delivery: Delivery::Stored,
        },
    );
    assert!(sent(&e).is_empty());
}

fn replicate_frame(
    sender: NodeId,
    epoch: u64,
    range: KeyRange,
    keys: &[u64],
    vals: &[f32],
) -> Frame {
    let mut f = Frame::new(header(Kind::Control, sender, epoch, 1, range));
    f.keys = keys.to_vec();
    f.vals = vals.to_vec();
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

#[test]
fn only_servers_send_chain_changes_and_fences() {
    let mut c = core_with(2, chained(5, spec(false, Consistency::Eventual)));
    // A worker (10) and a client unknown to the map (42) may not write
    // slots or fence ranges; a server of a newer map is told to retry.
    for sender in [10, 42] {
        let e = req(&mut c, replicate_frame(sender, 5, LOW, &[1], &[9.0]));
        assert_eq!(code(only(&e)), Some(ErrorCode::Invalid), "sender {sender}");
        let mut fence = control_request(
            sender,
            5,
            &Control::Fence {
                from: 1,
                chain: vec![],
            },
        );
        fence.header.range = LOW;
        assert_eq!(code(only(&req(&mut c, fence))), Some(ErrorCode::Invalid));
    }
    assert_eq!(value(&c, 1), 0.0);
    let e = req(&mut c, replicate_frame(42, 6, LOW, &[1], &[9.0]));
    assert_eq!(code(only(&e)), Some(ErrorCode::EpochAhead));
    let e = req(&mut c, replicate_frame(1, 5, LOW, &[1], &[9.0]));
    assert_eq!(only(&e).header.kind, Kind::Reply);
    assert_eq!(value(&c, 1), 9.0);
}

#[test]
fn a_restore_is_stored_by_the_primary_and_copied_down_its_own_chain() {
    let mut c = core_with(1, chained(5, spec(false, Consistency::Eventual)));
    let restore = |range: KeyRange, keys: &[u64], vals: &[f32]| {
        let mut f = Frame::new(header(Kind::Control, 10, 5, 0, range));
        f.keys = keys.to_vec();
        f.vals = vals.to_vec();
        f.ctrl = Control::Restore {
            spec: spec(false, Consistency::Eventual),
        }
        .to_bytes()
        .into();
        f
    };
    // Not primary of HIGH; keys outside the range; a bad slot.
    let bad = [
        (restore(HIGH, &[MID + 1], &[1.0]), ErrorCode::NotOwner),
        (restore(LOW, &[MID + 1], &[1.0]), ErrorCode::BadKeys),
        (restore(LOW, &[2, 1], &[1.0, 1.0]), ErrorCode::BadKeys),
        (restore(LOW, &[1], &[f32::NAN]), ErrorCode::NotFinite),
        (restore(LOW, &[1], &[]), ErrorCode::WrongWidth),
    ];
    for (f, want) in bad {
        assert_eq!(code(only(&req(&mut c, f))), Some(want));
    }
    assert_eq!(value(&c, 1), 0.0);
    let e = req(&mut c, restore(LOW, &[1, 2], &[3.0, 4.0]));
    assert!(sent(&e).is_empty());
    let fw = forwards(&e);
    assert_eq!(fw.len(), 1);
    assert_eq!(fw[0].0, 2, "this server's own replica");
    assert!(matches!(
        fw[0].2.control_msg(),
        Ok(Control::Replicate {
            what: Replica::Slots,
            ..
        })
    ));
    assert_eq!(fw[0].2.header.sender, 1);
    assert_eq!((value(&c, 1), value(&c, 2)), (3.0, 4.0));
    let e = c.step(
        2,
        Input::Delivered {
            ticket: fw[0].1,
            delivery: Delivery::Stored,
        },
    );
    assert_eq!(only(&e).header.kind, Kind::Reply);
}

/// A core that lends tables for requests of 4 keys or more, with tables
/// 1 and 2.
fn lender(m: impl FnOnce(TableSpec) -> ClusterMap) -> ServerCore {
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

fn lent_work(effects: Vec<Effect>) -> (Vec<Effect>, Option<Box<Work>>) {
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

#[test]
fn a_big_push_runs_on_a_lent_table_while_other_tables_are_served() {
    let mut c = lender(solo);
    let keys = [1u64, 2, 3, 4];
    let (rest, work) = lent_work(req(&mut c, push(10, 1, &keys, &[1.0; 4])));
    assert!(
        rest.is_empty(),
        "no reply before the work is done: {rest:?}"
    );
    let work = work.expect("the table is lent");
    assert_eq!(work.size(), 4);
    // Another table is served meanwhile.
    let mut other = push(10, 1, &[9], &[5.0]);
    other.header.table = 2;
    assert_eq!(acked(only(&req(&mut c, other))), (1, 0));
    // The lent table's requests, and the next map, wait in order.
    assert!(req(&mut c, pull(10, 0, &[1])).is_empty());
    let mut next = solo(spec(false, Consistency::Eventual));
    next.epoch = 6;
    next.tables.push(TableSpec {
        id: 2,
        name: "u".into(),
        ..spec(false, Consistency::Eventual)
    });
    assert!(c.step(2, Input::Map(next)).is_empty());
    let mut small_other = pull(10, 0, &[9]);
    small_other.header.table = 2;
    assert!(
        req(&mut c, small_other).is_empty(),
        "behind the waiting map"
    );
    let e = c.step(3, Input::Applied(Box::new(work.run())));
    let s = sent(&e);
    assert_eq!(s.len(), 3, "{e:?}");
    assert_eq!(acked(s[0]), (4, 0));
    assert_eq!(s[1].vals, [1.0], "the pull saw the push before it");
    // It ran after the map, so its old epoch is redirected.
    assert_eq!(s[2].header.kind, Kind::Redirect);
    assert_eq!(c.map().epoch, 6);
}

#[test]
fn a_refused_push_on_a_lent_table_changes_nothing() {
    let mut c = lender(solo);
    let (_, work) = lent_work(req(&mut c, push(10, 1, &[1, 2, 3, 4], &[1.0; 3])));
    let e = c.step(2, Input::Applied(Box::new(work.unwrap().run())));
    assert_eq!(code(only(&e)), Some(ErrorCode::WrongWidth));
    assert_eq!(value(&c, 1), 0.0);
    let (_, work) = lent_work(req(&mut c, push(10, 1, &[1, 2, 3, 4], &[1.0; 4])));
    let e = c.step(3, Input::Applied(Box::new(work.unwrap().run())));
    assert_eq!(acked(only(&e)), (4, 0), "the same clock, once it is valid");
}

#[test]
fn a_lent_push_is_replicated_with_its_slots_and_a_lent_pull_answered() {
    let mut c = lender(|t| chained(5, t));
    let mut p = push(10, 1, &[1, 2, 3, 4], &[1.0, 2.0, 3.0, 4.0]);
    p.header.range = LOW;
    let (_, work) = lent_work(req(&mut c, p));
    let e = c.step(2, Input::Applied(Box::new(work.unwrap().run())));
    assert!(sent(&e).is_empty());
    let fw = forwards(&e);
    assert_eq!(fw.len(), 1);
    assert_eq!(fw[0].2.vals, [1.0, 2.0, 3.0, 4.0]);
    let e = c.step(
        3,
        Input::Delivered {
            ticket: fw[0].1,
            delivery: Delivery::Stored,
        },
    );
    assert_eq!(acked(only(&e)), (4, 0));
    let mut q = pull(10, 0, &[1, 2, 3, 4]);
    q.header.range = LOW;
    let (rest, work) = lent_work(req(&mut c, q));
    assert!(rest.is_empty());
    let e = c.step(4, Input::Applied(Box::new(work.unwrap().run())));
    assert_eq!(only(&e).vals, [1.0, 2.0, 3.0, 4.0]);
}

#[test]
fn a_server_that_has_not_heard_the_manager_for_half_its_lease_serves_nothing() {
    let mut c = core_with(1, solo(spec(false, Consistency::Eventual)));
    req(&mut c, push(10, 1, &[1], &[1.0]));
    c.manager_seen(1_000);
    let lease = c.map().lease_ms;
    let at = |c: &mut ServerCore, now: u64, f: Frame| {
        c.step(
            now,
            Input::Request {
                conn: CONN,
                frame: f,
            },
        )
    };
    // Within half the lease: served.
    let e = at(&mut c, 1_000 + lease / 2, pull(10, 0, &[1]));
    assert_eq!(only(&e).vals, [1.0]);
    // Past it: pulls and pushes are refused for now (the worker retries,
    // and finds the range's new primary once the map moves it).
    let e = at(&mut c, 1_001 + lease / 2, pull(10, 0, &[1]));
    assert_eq!(code(only(&e)), Some(ErrorCode::EpochAhead));
    let e = at(&mut c, 1_001 + lease / 2, push(10, 2, &[1], &[1.0]));
    assert_eq!(code(only(&e)), Some(ErrorCode::EpochAhead));
    assert_eq!(value(&c, 1), 1.0);
    // A later answer from the manager: served again.
    c.manager_seen(lease);
    let e = at(&mut c, lease + 10, push(10, 2, &[1], &[1.0]));
    assert_eq!(acked(only(&e)), (1, 0));
}

#[test]
fn a_checkpoint_lends_its_big_tables_one_at_a_time() {
    let mut c = lender(solo);
    let (_, work) = lent_work(req(&mut c, push(10, 1, &[1, 2, 3, 4], &[1.0; 4])));
    c.step(2, Input::Applied(Box::new(work.unwrap().run())));
    let f = Frame::control(
        header(Kind::Control, 10, 5, 0, KeyRange::ALL),
        &Control::Snapshot { dir: "/d".into() },
    );
    let (rest, work) = lent_work(req(&mut c, f));
    assert!(rest.is_empty());
    let work = work.expect("table 1 is lent for its copy");
    // Table 2 is served while table 1 is copied; table 1 waits.
    let mut other = push(10, 1, &[9], &[5.0]);
    other.header.table = 2;
    assert_eq!(acked(only(&req(&mut c, other))), (1, 0));
    assert!(req(&mut c, push(10, 2, &[1], &[1.0])).is_empty());
    let e = c.step(3, Input::Applied(Box::new(work.run())));
    let parts = e
        .iter()
        .find_map(|x| match x {
            Effect::Checkpoint { parts, .. } => Some(parts),
            _ => None,
        })
        .expect("the files to write");
    let got: Vec<(u32, Vec<u64>, Vec<f32>)> = parts
        .iter()
        .map(|p| (p.table, p.keys.clone(), p.slots.clone()))
        .collect();
    assert_eq!(
        got,
        [(1, vec![1, 2, 3, 4], vec![1.0; 4]), (2, vec![9], vec![5.0])],
        "table 1 as of the checkpoint"
    );
    assert_eq!(acked(only(&e)), (1, 0), "the waiting push after the copy");
    assert_eq!(value(&c, 1), 2.0);
}

/// A chain change to server 2 (replica of LOW under `chained`) from 1.
fn change(
    what: Replica,
    clock: u64,
    keys: &[u64],
    vals: &[f32],
    records: Vec<(NodeId, KeyRange, u64)>,
) -> Frame {
    let mut f = Frame::new(header(Kind::Control, 1, 5, clock, LOW));
    f.keys = keys.to_vec();
    f.vals = vals.to_vec();
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

#[test]
fn a_replica_takes_every_kind_of_change() {
    // Server 2 replicates LOW (primary 1) and is primary of HIGH.
    let mut c = core_with(2, chained(5, spec(true, Consistency::Sequential)));
    let ok = |c: &mut ServerCore, f: Frame| {
        let e = req(c, f);
        assert_eq!(only(&e).header.kind, Kind::Reply, "{e:?}");
    };
    // Slots: stored as they are, records replayed.
    ok(
        &mut c,
        change(Replica::Slots, 1, &[1], &[4.0], vec![(10, LOW, 1)]),
    );
    assert_eq!(value(&c, 1), 4.0);
    // A worker's raw push to an aggregating table: summed, not applied (the
    // replica does not decide LOW's sums: its primary does).
    ok(
        &mut c,
        change(Replica::Push { worker: 10 }, 2, &[1], &[1.0], vec![]),
    );
    ok(
        &mut c,
        change(Replica::Push { worker: 10 }, 2, &[1], &[1.0], vec![]),
    );
    assert!(c.table(T).unwrap().has_pending(2), "summed once (a resend)");
    assert_eq!(value(&c, 1), 4.0);
    // The primary's applied sum: stored, and the raw part dropped.
    ok(
        &mut c,
        change(
            Replica::Flushed { clock: 2 },
            2,
            &[1],
            &[5.0],
            vec![(10, LOW, 2), (11, LOW, 2)],
        ),
    );
    assert!(!c.table(T).unwrap().has_pending(2));
    assert_eq!(value(&c, 1), 5.0);
    // A copy: its first piece resets the sums of its range; a pending
    // piece sets them.
    ok(
        &mut c,
        change(Replica::Pending { clock: 3 }, 0, &[1], &[2.0], vec![]),
    );
    ok(
        &mut c,
        change(
            Replica::Copy { reset: true },
            0,
            &[1, 2],
            &[6.0, 7.0],
            vec![(10, LOW, 3)],
        ),
    );
    assert!(
        c.table(T).unwrap().pending()[&3]
            .sums_in(KeyRange::ALL)
            .0
            .is_empty()
    );
    ok(
        &mut c,
        change(Replica::Pending { clock: 3 }, 0, &[1], &[2.0], vec![]),
    );
    assert_eq!(
        c.table(T).unwrap().pending()[&3].sums_in(KeyRange::ALL),
        (vec![1], vec![2.0])
    );
    assert_eq!((value(&c, 1), value(&c, 2)), (6.0, 7.0));
    // Refusals, each changing nothing: bad width, a range it does not
    // hold from a sender no newer than it, a mismatched table.
    let mut wrong = change(Replica::Slots, 1, &[1], &[1.0, 2.0], vec![]);
    assert_eq!(
        code(only(&req(&mut c, wrong.clone()))),
        Some(ErrorCode::WrongWidth)
    );
    wrong = change(Replica::Pending { clock: 4 }, 0, &[1], &[], vec![]);
    assert_eq!(code(only(&req(&mut c, wrong))), Some(ErrorCode::WrongWidth));
    let mut elsewhere = change(Replica::Slots, 1, &[MID + 1], &[1.0], vec![]);
    elsewhere.header.range = HIGH;
    elsewhere.header.sender = 3;
    let e = req(&mut c, elsewhere);
    assert_eq!(
        only(&e).header.kind,
        Kind::Reply,
        "server 2 holds HIGH: taken"
    );
    let m = map(
        6,
        &[],
        vec![part(KeyRange::ALL, 1, &[3])],
        spec(true, Consistency::Sequential),
    );
    c.step(2, Input::Map(m));
    let gone = change(Replica::Slots, 1, &[1], &[9.0], vec![]);
    assert_eq!(code(only(&req(&mut c, gone))), Some(ErrorCode::NotOwner));
    let mut mismatch = change(Replica::Slots, 1, &[1], &[9.0], vec![]);
    mismatch.header.table = 9;
    mismatch.header.epoch = 6;
    assert_eq!(code(only(&req(&mut c, mismatch))), Some(ErrorCode::Invalid));
}
