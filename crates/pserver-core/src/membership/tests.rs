//! Unit tests of `membership`.

use super::*;

use crate::spec::{Consistency, Init, UpdaterSpec};

pub(super) fn spec_of(name: &str, dim: u32) -> TableSpec {
    TableSpec {
        id: 0,
        name: name.into(),
        dim,
        init: Init::Zero,
        updater: UpdaterSpec::Add,
        consistency: Consistency::Eventual,
        aggregate: false,
        job: None,
    }
}

fn mgr() -> Membership {
    Membership::new(MembershipConfig {
        replicas: 1,
        vnodes: 8,
        lease_ms: 100,
    })
    .unwrap()
}

#[test]
fn config_is_checked() {
    let bad = MembershipConfig {
        vnodes: 0,
        ..Default::default()
    };
    assert!(matches!(
        Membership::new(bad),
        Err(MembershipError::Config(_))
    ));
}

#[test]
fn servers_change_the_map_clients_do_not() {
    let mut m = mgr();
    let s1 = m
        .register(Role::Server, "127.0.0.1:1", Group::Default, 0)
        .unwrap();
    assert_eq!(m.map().epoch, 1);
    let s2 = m
        .register(Role::Server, "127.0.0.1:2", Group::Default, 0)
        .unwrap();
    assert_eq!(m.map().epoch, 2);
    assert!(m.map().partitions.iter().any(|p| p.primary == s1));
    assert!(m.map().partitions.iter().any(|p| p.primary == s2));
    let c = m.register(Role::Client, "", Group::Default, 0).unwrap();
    assert_eq!(m.map().epoch, 2);
    assert!(m.map().node(c).is_none());
    assert!(m.heartbeat(c, 5).is_ok());
    assert_eq!(
        m.register(Role::Server, "", Group::Default, 0),
        Err(MembershipError::NoAddress)
    );
}

#[test]
fn lease_expiry_marks_dead_and_moves_ranges() {
    let mut m = mgr();
    let s1 = m.register(Role::Server, "a", Group::Default, 0).unwrap();
    let s2 = m.register(Role::Server, "b", Group::Default, 0).unwrap();
    m.heartbeat(s1, 50).unwrap();
    // Silent for three quarters of the lease (75 ms) is alive; longer is dead.
    assert!(m.expire(75).is_empty());
    let epoch = m.map().epoch;
    assert_eq!(m.expire(76), vec![s2]);
    assert_eq!(m.map().epoch, epoch + 1);
    assert_eq!(m.map().node(s2).unwrap().state, NodeState::Dead);
    assert!(m.map().partitions.iter().all(|p| p.primary == s1));
    assert_eq!(m.heartbeat(s2, 160), Err(MembershipError::Dead(s2)));
    assert_eq!(m.heartbeat(99, 160), Err(MembershipError::UnknownNode(99)));
}

#[test]
fn tables_are_idempotent_and_checked() {
    let mut m = mgr();
    let (t, new) = m.create_table(spec_of("w", 1)).unwrap();
    assert!(new);
    let (t2, new2) = m.create_table(spec_of("w", 1)).unwrap();
    assert!(!new2);
    assert_eq!(t, t2);
    assert_eq!(
        m.create_table(spec_of("w", 2)),
        Err(MembershipError::TableExists("w".into()))
    );
    assert!(matches!(
        m.create_table(spec_of("x", 0)),
        Err(MembershipError::Spec(_))
    ));
}

#[test]
fn barriers_release_when_all_live_workers_entered() {
    let mut m = mgr();
    let w1 = m.register(Role::Worker, "", Group::Default, 0).unwrap();
    let w2 = m.register(Role::Worker, "", Group::Default, 0).unwrap();
    assert_eq!(m.barrier_enter("b", w1).unwrap(), None);
    let r = m.barrier_enter("b", w2).unwrap().unwrap();
    assert_eq!(r.nodes, [w1, w2].into_iter().collect());
    // A worker dying releases the others.
    assert_eq!(m.barrier_enter("c", w1).unwrap(), None);
    assert!(m.disconnected(w2));
    let r = m.release_ready();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].name, "c");
    assert_eq!(
        m.barrier_enter("d", w2),
        Err(MembershipError::NotWorker(w2))
    );
}

#[test]
fn barriers_count_the_workers_of_their_group() {
    let mut m = mgr();
    let job = |j: &str| Group::Job(j.into());
    let a1 = m.register(Role::Worker, "", job("a"), 0).unwrap();
    let a2 = m.register(Role::Worker, "", job("a"), 0).unwrap();
    let b1 = m.register(Role::Worker, "", job("b"), 0).unwrap();
    let idle = m.register(Role::Worker, "h:1", Group::Idle, 0).unwrap();
    // Job b's one worker is its whole barrier, whatever job a does.
    let r = m.barrier_enter("start", b1).unwrap().unwrap();
    assert_eq!(r.group, job("b"));
    assert_eq!(m.barrier_enter("start", a1).unwrap(), None);
    // An idle worker joining job a counts from then on.
    assert!(m.join(idle, job("a"), "shard 3").unwrap());
    assert_eq!(m.barrier_enter("start", a2).unwrap(), None);
    let r = m.barrier_enter("start", idle).unwrap().unwrap();
    assert_eq!(r.nodes, [a1, a2, idle].into_iter().collect());
    // A worker going idle releases its old group's barrier.
    assert_eq!(m.barrier_enter("end", a1).unwrap(), None);
    assert_eq!(m.barrier_enter("end", a2).unwrap(), None);
    m.join(idle, Group::Idle, "").unwrap();
    let r = m.release_ready();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].nodes, [a1, a2].into_iter().collect());
    // Idle workers are in no barrier.
    assert_eq!(
        m.barrier_enter("x", idle),
        Err(MembershipError::NotWorker(idle))
    );
}

#[test]
fn joins_keep_a_worker_to_one_job_and_show_in_the_map() {
    let mut m = mgr();
    let s = m.register(Role::Server, "s", Group::Default, 0).unwrap();
    let w = m.register(Role::Worker, "h:1", Group::Idle, 0).unwrap();
    let epoch = m.map().epoch;
    assert!(m.join(w, Group::Job("a".into()), "shard 1 of 3").unwrap());
    assert_eq!(m.map().epoch, epoch + 1);
    let n = m.map().node(w).unwrap();
    assert_eq!(
        (&n.group, n.task.as_str()),
        (&Group::Job("a".into()), "shard 1 of 3")
    );
    // The same again changes nothing.
    assert!(!m.join(w, Group::Job("a".into()), "shard 1 of 3").unwrap());
    assert_eq!(
        m.join(w, Group::Job("b".into()), ""),
        Err(MembershipError::OtherJob {
            node: w,
            job: "a".into()
        })
    );
    assert!(m.join(w, Group::Idle, "").unwrap());
    assert!(m.join(w, Group::Job("b".into()), "").unwrap());
    assert_eq!(
        m.join(s, Group::Idle, ""),
        Err(MembershipError::NotAWorker(s))
    );
    assert!(matches!(
        m.join(w, Group::Job("no spaces".into()), ""),
        Err(MembershipError::BadJob(_))
    ));
    // The map counts a table's job's workers only.
    let mut t = spec_of("t", 1);
    t.job = Some("b".into());
    assert_eq!(m.map().workers_of(&t), [w]);
    t.job = Some("a".into());
    assert!(m.map().workers_of(&t).is_empty());
}

#[test]
fn one_scheduler_per_job_until_it_leaves() {
    let mut m = mgr();
    let c1 = m.register(Role::Client, "", Group::Default, 0).unwrap();
    let c2 = m.register(Role::Client, "", Group::Default, 0).unwrap();
    m.claim_job("a", c1).unwrap();
    m.claim_job("a", c1).unwrap();
    assert_eq!(
        m.claim_job("a", c2),
        Err(MembershipError::JobClaimed {
            job: "a".into(),
            by: c1
        })
    );
    m.claim_job("b", c2).unwrap();
    assert_eq!(m.jobs().collect::<Vec<_>>(), [("a", c1), ("b", c2)]);
    // Its scheduler gone, the job may be claimed again (a restarted
    // scheduler resuming it).
    m.disconnected(c1);
    m.claim_job("a", c2).unwrap();
    // A silent client's claims go with it.
    let c3 = m.register(Role::Client, "", Group::Default, 10).unwrap();
    m.claim_job("c", c3).unwrap();
    m.heartbeat(c2, 100_000).unwrap();
    m.expire(100_000);
    assert_eq!(m.jobs().map(|(j, _)| j).collect::<Vec<_>>(), ["a", "b"]);
}

fn unreplicated() -> Membership {
    Membership::new(MembershipConfig {
        replicas: 0,
        vnodes: 8,
        lease_ms: 100,
    })
    .unwrap()
}

pub(super) fn primaries(m: &Membership) -> BTreeSet<NodeId> {
    m.map().partitions.iter().map(|p| p.primary).collect()
}

pub(super) fn chain_members(m: &Membership) -> BTreeSet<NodeId> {
    m.map()
        .partitions
        .iter()
        .flat_map(|p| std::iter::once(p.primary).chain(p.replicas.iter().copied()))
        .collect()
}

#[test]
fn a_server_joining_a_cluster_with_tables_takes_ranges_in_two_phases() {
    let mut m = unreplicated();
    let s1 = m.register(Role::Server, "a", Group::Default, 0).unwrap();
    let s2 = m.register(Role::Server, "b", Group::Default, 0).unwrap();
    m.create_table(spec_of("w", 1)).unwrap();
    let s3 = m.register(Role::Server, "c", Group::Default, 0).unwrap();
    // Phase one: s3 only joins chains; s1 and s2 still serve everything.
    assert!(m.handing_off());
    assert_eq!(primaries(&m), BTreeSet::from([s1, s2]));
    assert!(chain_members(&m).contains(&s3));
    let epoch = m.map().epoch;
    // Only once both primaries report their copies does s3 take over.
    assert!(!m.synced(s1, epoch));
    assert!(!m.synced(s2, epoch - 1));
    assert!(!m.synced(s3, epoch));
    assert!(m.synced(s2, epoch));
    assert!(!m.handing_off());
    assert_eq!(primaries(&m), BTreeSet::from([s1, s2, s3]));
    assert_eq!(m.map().epoch, epoch + 1);
    assert!(m.map().partitions.iter().all(|p| p.replicas.is_empty()));
}

#[test]
fn without_tables_a_join_switches_at_once() {
    let mut m = unreplicated();
    let s1 = m.register(Role::Server, "a", Group::Default, 0).unwrap();
    let s2 = m.register(Role::Server, "b", Group::Default, 0).unwrap();
    assert!(!m.handing_off());
    assert_eq!(primaries(&m), BTreeSet::from([s1, s2]));
}

#[test]
fn a_drained_server_hands_off_then_is_told_to_go() {
    let mut m = mgr();
    let s1 = m.register(Role::Server, "a", Group::Default, 0).unwrap();
    let s2 = m.register(Role::Server, "b", Group::Default, 0).unwrap();
    let s3 = m.register(Role::Server, "c", Group::Default, 0).unwrap();
    m.create_table(spec_of("w", 1)).unwrap();
    assert!(m.drain(s2).unwrap());
    assert!(!m.drain(s2).unwrap(), "draining twice changes nothing");
    assert_eq!(m.leaving().collect::<Vec<_>>(), vec![s2]);
    // s2 keeps serving its ranges while it copies them down chains
    // that now end at their next primaries.
    assert!(m.handing_off());
    assert!(primaries(&m).contains(&s2));
    let epoch = m.map().epoch;
    for s in [s1, s3] {
        assert!(!m.synced(s, epoch));
    }
    assert!(m.synced(s2, epoch));
    assert!(!chain_members(&m).contains(&s2));
    assert_eq!(m.map().node(s2).unwrap().state, NodeState::Dead);
    assert_eq!(primaries(&m), BTreeSet::from([s1, s3]));

    let mut m = unreplicated();
    let s1 = m.register(Role::Server, "a", Group::Default, 0).unwrap();
    let s2 = m.register(Role::Server, "b", Group::Default, 0).unwrap();
    m.create_table(spec_of("w", 1)).unwrap();
    assert!(m.drain(s2).unwrap());
    // No replica holds s2's ranges: it keeps serving while it copies.
    assert!(m.handing_off());
    assert_eq!(m.map().node(s2).unwrap().state, NodeState::Alive);
    assert!(primaries(&m).contains(&s2));
    let epoch = m.map().epoch;
    assert!(!m.synced(s1, epoch));
    assert!(m.synced(s2, epoch));
    assert_eq!(primaries(&m), BTreeSet::from([s1]));
    assert_eq!(m.map().node(s2).unwrap().state, NodeState::Dead);
    // The last server cannot be drained.
    assert!(matches!(m.drain(s1), Err(MembershipError::Drain { .. })));
    assert_eq!(m.drain(99), Err(MembershipError::UnknownNode(99)));
}

#[test]
fn a_death_during_a_hand_off_replans_from_what_is_left() {
    let mut m = unreplicated();
    let s1 = m.register(Role::Server, "a", Group::Default, 0).unwrap();
    let s2 = m.register(Role::Server, "b", Group::Default, 0).unwrap();
    m.create_table(spec_of("w", 1)).unwrap();
    let s3 = m.register(Role::Server, "c", Group::Default, 0).unwrap();
    assert!(m.handing_off());
    // The joiner dies before the copies are done: back to s1 and s2.
    assert!(m.disconnected(s3));
    assert!(!m.handing_off());
    assert_eq!(primaries(&m), BTreeSet::from([s1, s2]));
    assert!(!chain_members(&m).contains(&s3));
}

#[test]
fn a_restored_manager_keeps_the_map_and_takes_its_nodes_back() {
    let mut m = mgr();
    let s1 = m.register(Role::Server, "a", Group::Default, 0).unwrap();
    let s2 = m.register(Role::Server, "b", Group::Default, 0).unwrap();
    let w = m.register(Role::Worker, "", Group::Default, 0).unwrap();
    let c = m.register(Role::Client, "", Group::Default, 0).unwrap();
    m.create_table(spec_of("w", 1)).unwrap();
    let saved = m.persisted();
    let mut r = Membership::restore(*m.config(), saved.clone(), 1000).unwrap();
    assert_eq!(r.map(), m.map());
    // Ids go on where they stopped.
    let w2 = r.register(Role::Worker, "", Group::Default, 1000).unwrap();
    assert!(w2 > c);
    assert_eq!(r.create_table(spec_of("v", 1)).unwrap().0.id, 2);
    // Known nodes come back; others do not.
    assert_eq!(r.rejoin(s1, Role::Server, "a", 1010), Ok(()));
    assert_eq!(r.rejoin(w, Role::Worker, "", 1010), Ok(()));
    assert_eq!(r.rejoin(c, Role::Client, "", 1010), Ok(()));
    assert!(matches!(
        r.rejoin(s2, Role::Server, "elsewhere", 1010),
        Err(MembershipError::Stranger { id, .. }) if id == s2
    ));
    assert!(matches!(
        r.rejoin(99, Role::Server, "z", 1010),
        Err(MembershipError::Stranger { id: 99, .. })
    ));
    // s2 did not rejoin: its lease (from the restart, plus the grace) runs out.
    r.heartbeat(w2, 1070).unwrap();
    r.heartbeat(w2, 1140).unwrap();
    r.heartbeat(s1, 1140).unwrap();
    r.heartbeat(w, 1140).unwrap();
    assert_eq!(r.expire(1180), vec![s2]);
    assert_eq!(
        r.rejoin(s2, Role::Server, "b", 1090),
        Err(MembershipError::Dead(s2))
    );
    // A config that does not match the saved map is refused.
    let other = MembershipConfig {
        replicas: 2,
        ..*m.config()
    };
    assert!(matches!(
        Membership::restore(other, saved.clone(), 0),
        Err(MembershipError::Config(_))
    ));
    let mut bad = saved;
    bad.next_id = 1;
    assert!(matches!(
        Membership::restore(*m.config(), bad, 0),
        Err(MembershipError::Config(_))
    ));
}

#[test]
fn nodes_of_a_restored_map_have_a_grace_to_come_back_however_long_the_manager_was_away() {
    let mut m = mgr();
    let s1 = m.register(Role::Server, "a", Group::Default, 0).unwrap();
    let s2 = m.register(Role::Server, "b", Group::Default, 0).unwrap();
    m.create_table(spec_of("w", 1)).unwrap();
    let saved = m.persisted();
    // Restarted an hour later: the hour of silence counts for nothing.
    let restart = 3_600_000;
    let mut r = Membership::restore(*m.config(), saved, restart).unwrap();
    let limit = silence_limit_ms(100);
    let grace = 100 * RECOVERY_GRACE_LEASES;
    // Nobody is dead within the silence limit plus the grace.
    assert_eq!(r.expire(restart + limit + grace), Vec::<NodeId>::new());
    assert_eq!(r.map().epoch, m.map().epoch);
    // s1 comes back late in the grace, with its ranges as they were.
    assert_eq!(
        r.rejoin(s1, Role::Server, "a", restart + limit + grace),
        Ok(())
    );
    assert_eq!(r.map().partitions, m.map().partitions);
    // s2 never does: declared dead just past the grace, and fails over.
    assert_eq!(r.expire(restart + limit + grace + 1), vec![s2]);
    assert!(r.map().partitions.iter().all(|p| p.primary == s1));
    // Once back, s1 is an ordinary node again: the grace is gone.
    let back = restart + limit + grace;
    assert_eq!(r.expire(back + limit), Vec::<NodeId>::new());
    assert_eq!(r.expire(back + limit + 1), vec![s1]);
}

#[test]
fn a_manager_without_state_calls_the_nodes_of_an_earlier_one_strangers_not_dead() {
    // An earlier manager registered these.
    let mut old = mgr();
    let s1 = old.register(Role::Server, "a", Group::Default, 0).unwrap();
    let w = old.register(Role::Worker, "", Group::Default, 0).unwrap();
    let c = old.register(Role::Client, "", Group::Default, 0).unwrap();
    // A fresh manager has registered one server of its own, which took id 1.
    let mut fresh = mgr();
    let mine = fresh
        .register(Role::Server, "z", Group::Default, 0)
        .unwrap();
    assert_eq!(mine, s1);
    let epoch = fresh.map().epoch;
    for (id, role, addr) in [
        (s1, Role::Server, "a"),
        (w, Role::Worker, ""),
        (c, Role::Client, ""),
    ] {
        let e = fresh.rejoin(id, role, addr, 10).unwrap_err();
        assert_eq!(
            e,
            MembershipError::Stranger {
                id,
                role,
                addr: addr.to_string()
            }
        );
        // It says what happened and what to do.
        let text = e.to_string();
        assert!(text.contains("no record of"), "{text}");
        assert!(text.contains("--state FILE"), "{text}");
    }
    // Refusing strangers changes nothing, and declares no one dead.
    assert_eq!(fresh.map().epoch, epoch);
    assert_eq!(fresh.expire(10), Vec::<NodeId>::new());
    // Only a node this manager knows, under its own role and address, is
    // told it is dead.
    assert!(fresh.disconnected(mine));
    assert_eq!(
        fresh.rejoin(mine, Role::Server, "z", 20),
        Err(MembershipError::Dead(mine))
    );
    assert!(matches!(
        fresh.rejoin(mine, Role::Server, "a", 20),
        Err(MembershipError::Stranger { .. })
    ));
}

/// A report of server `id` at `addr` holding `map`.
fn report(id: NodeId, addr: &str, map: &ClusterMap, senders: NodeId) -> Report {
    Report {
        id,
        addr: addr.into(),
        map: map.clone(),
        senders,
    }
}

#[test]
fn a_manager_without_state_rebuilds_the_map_once_every_server_of_it_reports() {
    // The lost manager's cluster: two servers, a worker, a client.
    let mut old = mgr();
    let s1 = old.register(Role::Server, "a", Group::Default, 0).unwrap();
    let s2 = old.register(Role::Server, "b", Group::Default, 0).unwrap();
    let w = old.register(Role::Worker, "", Group::Default, 0).unwrap();
    let c = old.register(Role::Client, "", Group::Default, 0).unwrap();
    // s1 missed the last map (the table's creation).
    let older = old.map().clone();
    old.create_table(spec_of("t", 1)).unwrap();
    let latest = old.map().clone();

    let mut m = mgr();
    m.salt_fresh_clients(12_345);
    // A client asks before any server reports: it gets an id no cluster
    // uses, and the manager may still take one over.
    let early = m.register(Role::Client, "", Group::Default, 0).unwrap();
    assert_eq!(early, FRESH_CLIENT_IDS + 12_345);
    // s1 reports (and saw requests from the client): the manager
    // waits for s2, and meanwhile no one registers or rejoins.
    assert_eq!(
        m.recover(report(s1, "a", &older, c), 0),
        Ok(Recovered::Waiting(vec![(s2, "b".to_string())]))
    );
    let e = m
        .register(Role::Server, "z", Group::Default, 0)
        .unwrap_err();
    assert!(matches!(&e, MembershipError::Rebuilding { missing } if missing.len() == 1));
    assert!(m.rebuilding());
    // Clients may ask (`pserver status`): they get ids no cluster uses.
    let asking = m.register(Role::Client, "", Group::Default, 0).unwrap();
    assert_eq!(asking, early + 1);
    assert!(e.to_string().contains("server 2 at b"), "{e}");
    assert!(matches!(
        m.rejoin(w, Role::Worker, "", 0),
        Err(MembershipError::Rebuilding { .. })
    ));
    // s2's report completes the roll call: the latest map is taken over,
    // its epoch past any a node holds.
    // s2 saw a client of an earlier fresh manager too: ids stay below
    // that range.
    assert_eq!(
        m.recover(report(s2, "b", &latest, FRESH_CLIENT_IDS + 7), 10),
        Ok(Recovered::Rebuilt {
            from: s2,
            reported: latest.epoch,
            epoch: latest.epoch + REBUILT_EPOCH_JUMP,
            servers: 2,
            rejoined: Ok(()),
        })
    );
    assert!(!m.rebuilding());
    assert_eq!(m.map().partitions, latest.partitions);
    assert_eq!(m.map().tables, latest.tables);
    assert_eq!(m.map().nodes, latest.nodes);
    // Everyone comes back under their ids, the client too.
    assert_eq!(m.rejoin(s1, Role::Server, "a", 20), Ok(()));
    assert_eq!(m.rejoin(w, Role::Worker, "", 20), Ok(()));
    assert_eq!(m.rejoin(c, Role::Client, "", 20), Ok(()));
    // The early client is still one of this manager's.
    assert_eq!(m.heartbeat(early, 20), Ok(()));
    assert_eq!(m.rejoin(early, Role::Client, "", 20), Ok(()));
    // New ids and tables go on above every one the reports name.
    let next = m.register(Role::Client, "", Group::Default, 20).unwrap();
    assert!(next > c && next < FRESH_CLIENT_IDS, "{next}");
    assert!(m.create_table(spec_of("u", 1)).unwrap().0.id > latest.tables[0].id);
    // Later reports are rejoins.
    assert_eq!(
        m.recover(report(s2, "b", &latest, 0), 30),
        Ok(Recovered::Rejoined)
    );
}

#[test]
fn a_rebuild_waits_for_every_live_server_of_the_latest_map_and_takes_no_other() {
    let mut old = mgr();
    let s1 = old.register(Role::Server, "a", Group::Default, 0).unwrap();
    let s2 = old.register(Role::Server, "b", Group::Default, 0).unwrap();
    let s3 = old.register(Role::Server, "c", Group::Default, 0).unwrap();
    old.create_table(spec_of("t", 1)).unwrap();
    // s3 was cut off and declared dead; its own map still says alive.
    let stale = old.map().clone();
    assert!(old.disconnected(s3));
    let latest = old.map().clone();

    let mut m = mgr();
    // From the stale map alone the manager would wait for s1 and s2, never
    // take it: the servers of a later map are among those it waits for.
    assert_eq!(
        m.recover(report(s3, "c", &stale, 0), 0),
        Ok(Recovered::Waiting(vec![
            (s1, "a".to_string()),
            (s2, "b".to_string())
        ]))
    );
    // s1 holds the latest map, in which s3 is dead: only s2 is missing.
    assert_eq!(
        m.recover(report(s1, "a", &latest, 0), 5),
        Ok(Recovered::Waiting(vec![(s2, "b".to_string())]))
    );
    // A report that does not match the manager's settings is refused.
    let mut other = latest.clone();
    other.replicas = 2;
    assert!(matches!(
        m.recover(report(s2, "b", &other, 0), 6),
        Err(MembershipError::CannotRebuild { id, .. }) if id == s2
    ));
    // Or whose map does not hold its sender where it says it is.
    assert!(matches!(
        m.recover(report(s2, "elsewhere", &latest, 0), 6),
        Err(MembershipError::CannotRebuild { .. })
    ));
    let done = m.recover(report(s2, "b", &latest, 0), 7).unwrap();
    assert!(matches!(done, Recovered::Rebuilt { from, servers: 3, .. } if from == s2));
    assert_eq!(m.map().partitions, latest.partitions);
    // The stale server is told it is dead: its ranges are others'.
    assert_eq!(
        m.rejoin(s3, Role::Server, "c", 8),
        Err(MembershipError::Dead(s3))
    );
    // The grace of a restored map holds for the rebuilt one: s1 has not
    // rejoined yet (s2 did, with its report, and heartbeats).
    let limit = silence_limit_ms(100);
    m.heartbeat(s2, 7 + limit + 50).unwrap();
    assert_eq!(m.expire(7 + limit + 100), Vec::<NodeId>::new());
    assert_eq!(m.expire(7 + limit + 101), vec![s1]);
}

#[test]
fn a_manager_that_started_its_own_cluster_takes_over_no_other() {
    let mut old = mgr();
    let s1 = old.register(Role::Server, "a", Group::Default, 0).unwrap();
    let mut m = mgr();
    m.register(Role::Worker, "", Group::Default, 0).unwrap();
    assert!(matches!(
        m.recover(report(s1, "a", old.map(), 0), 0),
        Err(MembershipError::Stranger { id, .. }) if id == s1
    ));
    // A restored manager does not either: it knows its cluster.
    let mut r = Membership::restore(*m.config(), m.persisted(), 0).unwrap();
    assert!(matches!(
        r.recover(report(s1, "a", old.map(), 0), 0),
        Err(MembershipError::Stranger { .. })
    ));
}

#[test]
fn clients_that_leave_are_counted_gone_once_the_map_says_so() {
    // Issue #16, defect 8: one-shot clients came and went, each a new id,
    // and nothing ever told the servers they could forget their clocks.
    let mut m = mgr();
    let s = m.register(Role::Server, "a", Group::Default, 0).unwrap();
    let w = m.register(Role::Worker, "", Group::Default, 0).unwrap();
    let done = m.register(Role::Client, "", Group::Default, 0).unwrap();
    let silent = m.register(Role::Client, "", Group::Default, 0).unwrap();
    let broken = m.register(Role::Client, "", Group::Default, 0).unwrap();
    let staying = m.register(Role::Client, "", Group::Default, 0).unwrap();
    let epoch = m.map().epoch;
    // One says goodbye; one's link breaks (it stays, to rejoin); the
    // others keep their leases or fall silent.
    assert!(!m.goodbye(done));
    assert!(!m.disconnected(broken));
    assert_eq!(m.rejoin(broken, Role::Client, "", 10), Ok(()));
    for t in [100, 200, 300, 400, 500] {
        m.heartbeat(staying, t).unwrap();
        m.heartbeat(broken, t).unwrap();
        m.heartbeat(s, t).unwrap();
        m.heartbeat(w, t).unwrap();
        assert!(m.expire(t).is_empty());
    }
    assert!(m.heartbeat(silent, 501).is_err(), "silent past 4 leases");
    // Nothing is said until the map says it.
    assert_eq!(m.map().epoch, epoch);
    assert!(!m.map().departed(done));
    assert!(m.publish_departures(500));
    assert_eq!(m.map().epoch, epoch + 1);
    let map = m.map();
    assert!(map.departed(done) && map.departed(silent));
    assert!(!map.departed(staying) && !map.departed(broken));
    assert!(!map.departed(s) && !map.departed(w) && !map.departed(crate::map::MANAGER_ID));
    // Ids handed out after the record count as present.
    let later = m.register(Role::Client, "", Group::Default, 502).unwrap();
    assert!(!m.map().departed(later));
    // At most one such map a lease: clients coming and going cost little.
    m.goodbye(later);
    assert!(!m.publish_departures(550));
    assert!(!m.map().departed(later));
    assert!(m.publish_departures(600));
    assert!(m.map().departed(later));
    let later = m.register(Role::Client, "", Group::Default, 600).unwrap();
    // Gone is for good: neither comes back under its id.
    assert_eq!(
        m.rejoin(done, Role::Client, "", 403),
        Err(MembershipError::Dead(done))
    );
    assert_eq!(
        m.rejoin(silent, Role::Client, "", 403),
        Err(MembershipError::Dead(silent))
    );
    // A worker's goodbye declares it dead, which the map says at once.
    assert!(m.goodbye(w));
    assert!(m.map().departed(w));
    // The record holds the clients present, not every client ever.
    assert_eq!(m.map().clients.here, [broken, staying, later]);

    // A restarted manager keeps the record: the gone stay gone, and those
    // present have a lease from the restart to rejoin.
    let mut r = Membership::restore(*m.config(), m.persisted(), 1000).unwrap();
    assert_eq!(
        r.rejoin(done, Role::Client, "", 1001),
        Err(MembershipError::Dead(done))
    );
    assert_eq!(r.rejoin(staying, Role::Client, "", 1001), Ok(()));
    r.heartbeat(staying, 1400).unwrap();
    r.expire(1500);
    r.publish_departures(1500);
    assert!(r.map().departed(broken), "it did not rejoin in time");
    assert!(!r.map().departed(staying));
}

#[test]
fn a_rebuilt_manager_hands_out_no_id_below_the_client_record() {
    let mut old = mgr();
    let s = old.register(Role::Server, "a", Group::Default, 0).unwrap();
    let clients: Vec<NodeId> = (0..5)
        .map(|_| old.register(Role::Client, "", Group::Default, 0).unwrap())
        .collect();
    old.goodbye(clients[0]);
    old.publish_departures(1000);
    let record = old.map().clients.clone();
    assert!(record.below > clients[4]);
    let mut fresh = mgr();
    let rebuilt = fresh.recover(
        Report {
            id: s,
            addr: "a".into(),
            map: old.map().clone(),
            // No server heard of any client.
            senders: s,
        },
        2000,
    );
    assert!(
        matches!(rebuilt, Ok(Recovered::Rebuilt { .. })),
        "{rebuilt:?}"
    );
    let next = fresh
        .register(Role::Client, "", Group::Default, 2000)
        .unwrap();
    assert!(
        next >= record.below,
        "{next} reuses an id below {}",
        record.below
    );
    assert!(fresh.map().departed(clients[0]));
    assert_eq!(fresh.rejoin(clients[1], Role::Client, "", 2001), Ok(()));
}
