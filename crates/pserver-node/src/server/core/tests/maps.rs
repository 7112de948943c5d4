//! Map changes: fences, copies to new replicas with their markers, handed-away keys.

use super::*;

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

/// A hand-off's switch for LOW, seen by server 3: before, LOW's chain is
/// server 1 (primary), 2 (its replica), 3 (the future primary); after, 3
/// is LOW's primary with replica 2, and the servers in `dead` are dead.
fn handing_low_to_3(dead: &[NodeId]) -> (ClusterMap, ClusterMap) {
    let before = map(
        5,
        &[],
        vec![part(LOW, 1, &[2, 3]), part(HIGH, 2, &[1])],
        spec(false, Consistency::Eventual),
    );
    let after = map(
        6,
        dead,
        vec![part(LOW, 3, &[2]), part(HIGH, 2, &[3])],
        spec(false, Consistency::Eventual),
    );
    (before, after)
}

#[test]
fn a_new_primary_refuses_the_old_chains_changes_once_it_serves() {
    // A hand-off's chain of LOW: server 1 (primary), 2 (its replica), 3
    // (the future primary). At the switch server 1 is retired (drained at
    // the same switch, so no fence is awaited from it) and 3 serves LOW at
    // once. A change server 1 made under the old map, still on its way
    // through server 2, must not land on 3 after 3 applied newer pushes:
    // its slots are absolute and would undo them (acknowledged pushes
    // lost). Refused, it travels back and its worker resends it to 3.
    let (before, after) = handing_low_to_3(&[1]);
    let mut c = core_with(3, before);
    // Under the old map, the old chain's changes are taken (a replica).
    let e = c.step(
        2,
        Input::Request {
            conn: 8,
            frame: replicate_frame(2, 5, LOW, &[1], &[0.25]),
        },
    );
    assert_eq!(only(&e).header.kind, Kind::Reply, "{e:?}");
    assert_eq!(value(&c, 1), 0.25);
    c.step(10, Input::Map(after));
    let mut p = push(10, 1, &[1], &[1.0]);
    p.header.epoch = 6;
    p.header.range = LOW;
    let e = c.step(
        20,
        Input::Request {
            conn: CONN,
            frame: p,
        },
    );
    assert_eq!(forwards(&e).len(), 1, "served at once: {e:?}");
    assert_eq!(value(&c, 1), 1.25);
    // Server 1's older change arrives through server 2.
    let e = c.step(
        30,
        Input::Request {
            conn: 8,
            frame: replicate_frame(2, 5, LOW, &[1], &[0.5]),
        },
    );
    assert_eq!(code(only(&e)), Some(ErrorCode::NotOwner), "{e:?}");
    assert_eq!(value(&c, 1), 1.25, "the newer push stays");
}

#[test]
fn the_old_chains_changes_are_taken_until_the_old_primarys_fence() {
    // As above, but server 1 lives on (drained later): server 3 waits for
    // its fence, and what came down the old chain before it is the old
    // primary's last word, taken; after the fence, the old chain is done.
    let (before, after) = handing_low_to_3(&[]);
    let mut c = core_with(3, before);
    c.step(10, Input::Map(after));
    let e = c.step(
        20,
        Input::Request {
            conn: 8,
            frame: replicate_frame(2, 5, LOW, &[1], &[0.5]),
        },
    );
    assert_eq!(only(&e).header.kind, Kind::Reply, "{e:?}");
    assert_eq!(value(&c, 1), 0.5);
    let mut fence = control_request(
        2,
        5,
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
            conn: 8,
            frame: replicate_frame(2, 5, LOW, &[1], &[0.75]),
        },
    );
    assert_eq!(code(only(&e)), Some(ErrorCode::NotOwner), "{e:?}");
    assert_eq!(value(&c, 1), 0.5);
}

#[test]
fn a_fence_goes_past_a_chain_member_declared_dead() {
    // A hand-off's chain of LOW: server 1, then 2 (its replica), then 3
    // (the future primary). At the switch server 2 is retired too (it was
    // being drained): the fence goes to server 3 itself, or 3 would hold
    // LOW back until FENCE_TIMEOUT_MS.
    let before = map(
        5,
        &[],
        vec![part(LOW, 1, &[2, 3]), part(HIGH, 1, &[2])],
        spec(false, Consistency::Eventual),
    );
    let after = map(
        6,
        &[2],
        vec![part(LOW, 3, &[1]), part(HIGH, 1, &[3])],
        spec(false, Consistency::Eventual),
    );
    let mut c = core_with(1, before);
    let e = c.step(2, Input::Map(after));
    let fences: Vec<_> = forwards(&e)
        .into_iter()
        .filter_map(|(to, _, f)| match f.control_msg() {
            Ok(Control::Fence { from: 1, chain }) => Some((to, f.header.range, chain)),
            _ => None,
        })
        .collect();
    assert_eq!(fences, [(3, LOW, vec![])]);
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
