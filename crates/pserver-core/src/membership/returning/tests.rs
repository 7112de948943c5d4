//! Unit tests of a server coming back under its id.

use super::super::tests::{chain_members, primaries, spec_of};
use super::*;

/// Three servers with one replica per range and a table, so that moving a
/// range is a two-phase hand-off.
fn cluster() -> (Membership, [NodeId; 3]) {
    let mut m = Membership::new(MembershipConfig {
        replicas: 1,
        vnodes: 8,
        lease_ms: 100,
    })
    .unwrap();
    let s = ["a:1", "b:1", "c:1"].map(|a| m.register(Role::Server, a, Group::Default, 0).unwrap());
    m.create_table(spec_of("w", 1)).unwrap();
    (m, s)
}

/// Reports every live primary's copies done for the current map, as the
/// servers do once their copies arrived; true when that switched the map.
fn sync_all(m: &mut Membership) -> bool {
    let epoch = m.map().epoch;
    let mut done = false;
    for id in primaries(m) {
        done |= m.synced(id, epoch);
    }
    done
}

#[test]
fn a_dead_server_comes_back_under_its_id_to_the_placement_it_had() {
    let (mut m, [s1, s2, s3]) = cluster();
    let before = m.map().partitions.clone();
    let joined = m.map().node(s2).unwrap().joined;
    assert!(before.iter().any(|p| p.primary == s2));
    // s2's process is killed: its connection closes, its ranges fail over.
    assert!(m.disconnected(s2));
    assert!(!chain_members(&m).contains(&s2));
    assert_ne!(m.map().partitions, before);
    let dead_epoch = m.map().epoch;

    // A new process takes the id back, at another address.
    assert_eq!(m.register_as(s2, Role::Server, "b:2", 50), Ok(s2));
    let n = m.map().node(s2).unwrap().clone();
    assert_eq!(n.state, NodeState::Alive);
    assert_eq!(n.addr, "b:2");
    assert_eq!(m.map().epoch, dead_epoch + 1);
    assert_eq!(n.joined, m.map().epoch);
    assert!(n.joined > joined);
    // It holds nothing, so it enters as a joiner: chains first, ranges
    // only once their primaries have copied them to it.
    assert!(m.handing_off());
    assert_eq!(primaries(&m), BTreeSet::from([s1, s3]));
    assert!(chain_members(&m).contains(&s2));
    assert!(!m.synced(s2, m.map().epoch));
    assert!(sync_all(&mut m));
    assert!(!m.handing_off());
    // The ring gives it the positions it had: the map is the one before
    // the failure.
    assert_eq!(m.map().partitions, before);
    // Its lease runs from now, like any live server's.
    assert_eq!(m.heartbeat(s2, 60), Ok(()));
    assert_eq!(m.expire(60), Vec::<NodeId>::new());
}

#[test]
fn a_server_declared_dead_by_its_lease_comes_back_and_ids_go_on() {
    let (mut m, [s1, s2, s3]) = cluster();
    let before = m.map().partitions.clone();
    for s in [s1, s3] {
        m.heartbeat(s, 100).unwrap();
    }
    assert_eq!(m.expire(100), vec![s2]);
    assert_eq!(m.register_as(s2, Role::Server, "b:1", 120), Ok(s2));
    assert!(sync_all(&mut m));
    assert_eq!(m.map().partitions, before);
    // Taking an id back hands none out: the next server is a new one.
    let s4 = m
        .register(Role::Server, "d:1", Group::Default, 130)
        .unwrap();
    assert!(s4 > s3);
}

#[test]
fn a_live_server_keeps_its_id() {
    let (mut m, [_, s2, _]) = cluster();
    let map = m.map().clone();
    let e = m.register_as(s2, Role::Server, "b:2", 10).unwrap_err();
    assert_eq!(
        e,
        MembershipError::IdAlive {
            id: s2,
            addr: "b:1".into()
        }
    );
    assert_eq!(
        e.to_string(),
        format!("server {s2} is alive at b:1; stop it first or wait for its lease to run out")
    );
    // So does one being drained, which still serves.
    assert!(m.drain(s2).unwrap());
    assert!(matches!(
        m.register_as(s2, Role::Server, "b:2", 10),
        Err(MembershipError::IdAlive { .. })
    ));
    assert_eq!(m.map().node(s2).unwrap().addr, map.node(s2).unwrap().addr);
}

#[test]
fn unknown_ids_ids_of_workers_and_ids_for_workers_are_refused() {
    let (mut m, _) = cluster();
    let w = m.register(Role::Worker, "", Group::Default, 0).unwrap();
    let c = m.register(Role::Client, "", Group::Default, 0).unwrap();
    // The worker is dead, so only its role makes its id no server's.
    assert!(m.goodbye(w));
    let map = m.map().clone();
    let e = m.register_as(99, Role::Server, "z:1", 10).unwrap_err();
    assert_eq!(e, MembershipError::NoSuchId(99));
    assert!(e.to_string().contains("has no node 99"), "{e}");
    assert!(e.to_string().contains("without --id"), "{e}");
    // A client's id is in no map either.
    assert_eq!(
        m.register_as(c, Role::Server, "z:1", 10),
        Err(MembershipError::NoSuchId(c))
    );
    let e = m.register_as(w, Role::Server, "z:1", 10).unwrap_err();
    assert_eq!(
        e,
        MembershipError::IdOfNonServer {
            id: w,
            role: Role::Worker
        }
    );
    assert!(e.to_string().contains("is a worker, not a server"), "{e}");
    for role in [Role::Worker, Role::Client] {
        assert_eq!(
            m.register_as(w, role, "", 10),
            Err(MembershipError::IdNotForRole(role))
        );
    }
    assert_eq!(
        m.register_as(1, Role::Server, "", 10),
        Err(MembershipError::NoAddress)
    );
    // Nothing changed.
    assert_eq!(m.map(), &map);
}

#[test]
fn a_manager_rebuilding_its_map_takes_no_id_back() {
    let (mut old, [s1, s2, _]) = cluster();
    assert!(old.disconnected(s2));
    let mut m = Membership::new(*old.config()).unwrap();
    let r = m
        .recover(
            Report {
                id: s1,
                addr: "a:1".into(),
                map: old.map().clone(),
                senders: 0,
            },
            0,
        )
        .unwrap();
    assert!(matches!(r, Recovered::Waiting(_)));
    assert!(matches!(
        m.register_as(s2, Role::Server, "b:2", 10),
        Err(MembershipError::Rebuilding { .. })
    ));
    // A fresh manager that is not rebuilding knows no id.
    let mut fresh = Membership::new(*old.config()).unwrap();
    assert_eq!(
        fresh.register_as(s2, Role::Server, "b:2", 10),
        Err(MembershipError::NoSuchId(s2))
    );
}

#[test]
fn a_drained_server_may_come_back_and_is_not_marked_draining() {
    let (mut m, [_, s2, _]) = cluster();
    let before = m.map().partitions.clone();
    assert!(m.drain(s2).unwrap());
    assert!(sync_all(&mut m));
    assert_eq!(m.map().node(s2).unwrap().state, NodeState::Dead);
    assert_eq!(m.register_as(s2, Role::Server, "b:2", 10), Ok(s2));
    let n = m.map().node(s2).unwrap();
    assert_eq!(n.task, "");
    assert!(m.leaving().next().is_none());
    assert!(sync_all(&mut m));
    assert_eq!(m.map().partitions, before);
}

#[test]
fn the_earlier_process_of_a_returned_server_is_told_it_was_replaced() {
    let (mut m, [_, s2, _]) = cluster();
    let old_map = m.map().clone();
    assert!(m.disconnected(s2));
    m.register_as(s2, Role::Server, "b:2", 10).unwrap();
    // The old process (frozen while it was declared dead) asks to rejoin
    // from its old address, or from the new one had it been the same.
    for addr in ["b:1", "b:2"] {
        let e = m
            .recover(
                Report {
                    id: s2,
                    addr: addr.into(),
                    map: old_map.clone(),
                    senders: 0,
                },
                20,
            )
            .unwrap_err();
        assert_eq!(
            e,
            MembershipError::Replaced {
                id: s2,
                addr: "b:2".into()
            }
        );
    }
    // A node of another cluster that shares the id stays a stranger, and
    // keeps its data.
    assert!(matches!(
        m.recover(
            Report {
                id: s2,
                addr: "elsewhere:1".into(),
                map: old_map.clone(),
                senders: 0,
            },
            20,
        ),
        Err(MembershipError::Stranger { .. })
    ));
    // The new process itself rejoins as usual.
    let now_map = m.map().clone();
    assert_eq!(
        m.recover(
            Report {
                id: s2,
                addr: "b:2".into(),
                map: now_map,
                senders: 0,
            },
            30,
        ),
        Ok(Recovered::Rejoined)
    );
}
