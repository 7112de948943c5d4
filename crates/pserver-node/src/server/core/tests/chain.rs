//! Chain replication, both ends: acks after the chain, replicas taking every kind of change, restores, who may send chain messages.

use super::*;

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
    f.vals = vec![5.0].into();
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
        b.vals = vec![f32::NAN].into();
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
    f.vals = vec![5.0].into();
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
    // The runtime settles an abandoned queue's tickets as abandoned: this
    // server is still the range's primary and copied it to the new
    // replica, so the push counts as replicated.
    let e = c.step(
        3,
        Input::Delivered {
            ticket,
            delivery: Delivery::Abandoned,
        },
    );
    assert_eq!(acked(only(&e)), (1, 0));
}

/// Issue #16's lost update: a server drained at the switch of a hand-off
/// sits in the middle of a moving range's old chain; the old primary
/// abandons its queue to it, and what was queued there may never reach the
/// new primary. No one copies it there (the old primary no longer holds
/// the range), so those pushes must go back as refusals, not acks: the
/// workers resend them to the new primary.
#[test]
fn an_abandoned_change_of_a_range_that_moved_away_is_not_acknowledged() {
    let t = spec(false, Consistency::Eventual);
    // The hand-off's map: LOW keeps primary 1, its chain 2, then 3 (its
    // future primary).
    let mut c = core_with(
        1,
        map(
            5,
            &[],
            vec![part(LOW, 1, &[2, 3]), part(HIGH, 1, &[2])],
            t.clone(),
        ),
    );
    let mut p = push(10, 1, &[1], &[1.0]);
    p.header.range = LOW;
    let e = req(&mut c, p);
    let (to, ticket, _) = forwards(&e)[0];
    assert_eq!(to, 2);
    // The switch: LOW to 3, and 2, drained, is gone.
    let e = c.step(
        2,
        Input::Map(map(
            6,
            &[2],
            vec![part(LOW, 3, &[1]), part(HIGH, 1, &[3])],
            t,
        )),
    );
    assert!(e.iter().any(|x| matches!(x, Effect::Abandon { to: 2 })));
    let e = c.step(
        3,
        Input::Delivered {
            ticket,
            delivery: Delivery::Abandoned,
        },
    );
    assert_eq!(code(only(&e)), Some(ErrorCode::NotOwner));
}

/// A chain member that died took along what was queued to it, whoever
/// queued it: the primary copies the range to the members after it too,
/// not only past the ones it forwarded to itself.
#[test]
fn the_members_after_a_dead_one_get_a_copy() {
    let t = spec(false, Consistency::Eventual);
    let with_4 = |mut m: ClusterMap| {
        m.nodes.insert(3, node(4, Role::Server, NodeState::Alive));
        m
    };
    let mut c = core_with(
        1,
        with_4(map(
            5,
            &[],
            vec![part(KeyRange::ALL, 1, &[2, 3, 4])],
            t.clone(),
        )),
    );
    let mut p = push(10, 1, &[1], &[1.0]);
    p.header.range = KeyRange::ALL;
    req(&mut c, p);
    // 3, which only 2 forwards to, dies.
    let e = c.step(
        2,
        Input::Map(with_4(map(
            6,
            &[3],
            vec![part(KeyRange::ALL, 1, &[2, 4])],
            t,
        ))),
    );
    let copied = forwards(&e).iter().any(|(to, _, f)| {
        *to == 2
            && matches!(
                f.control_msg(),
                Ok(Control::Replicate {
                    what: Replica::Copy { reset: true },
                    ..
                })
            )
    });
    assert!(copied, "no copy down the chain past the dead member: {e:?}");
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
        f.vals = vals.to_vec().into();
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

#[test]
fn a_resent_push_is_not_held_for_a_sum_this_server_does_not_apply() {
    // Server 2 is primary of HIGH and replicates LOW (primary 1).
    let mut c = core_with(2, chained(5, spec(true, Consistency::Sequential)));
    let high = |worker, retry| {
        let mut f = push(worker, 1, &[MID + 1], &[1.0]);
        f.header.range = HIGH;
        if retry {
            f.header.flags |= FLAG_RETRY;
        }
        f
    };
    // Both workers' pushes of clock 1 over HIGH: the sum is applied and,
    // once replica 1 has it, both are acknowledged.
    assert!(sent(&req(&mut c, high(10, false))).is_empty());
    let e = req(&mut c, high(11, false));
    let fw = forwards(&e);
    assert_eq!(fw.len(), 1, "{e:?}");
    let e = c.step(
        2,
        Input::Delivered {
            ticket: fw[0].1,
            delivery: Delivery::Stored,
        },
    );
    assert_eq!(sent(&e).len(), 2);
    // LOW's primary copies its own unapplied sum of clock 1 here (a
    // hand-off makes this server a new replica of LOW): a sum over a range
    // only server 1 decides.
    let e = req(
        &mut c,
        change(Replica::Pending { clock: 1 }, 0, &[1], &[2.0], vec![]),
    );
    assert_eq!(only(&e).header.kind, Kind::Reply);
    assert!(c.table(T).unwrap().has_pending(1));
    // Worker 10 resends its push of clock 1 (its ack was lost with a
    // connection): a duplicate whose sum is applied here. It is answered
    // now: no sum of this server would ever release it (LOW's ends with
    // server 1's `Flushed`, which applies nothing here).
    let e = req(&mut c, high(10, true));
    assert_eq!(acked(only(&e)), (0, 1));
    let e = req(
        &mut c,
        change(
            Replica::Flushed { clock: 1 },
            1,
            &[1],
            &[2.0],
            vec![(10, LOW, 1), (11, LOW, 1)],
        ),
    );
    assert_eq!(only(&e).header.kind, Kind::Reply);
    assert!(!c.table(T).unwrap().has_pending(1));
}

/// Issue #13's join-drain doubles: server 2 refused a change (it did not
/// hold LOW at that moment), then held LOW again (a drain put it back in
/// the chain) when the next change of the same old map came. That change's
/// absolute slots carry the refused push's effect without its clock
/// record, so taking it would let the worker's resend apply the push
/// twice: it is refused too. A change under a newer map is taken.
#[test]
fn after_a_refused_change_later_ones_under_its_map_are_refused_too() {
    let s = || spec(false, Consistency::Eventual);
    let mut c = core_with(
        2,
        map(6, &[], vec![part(LOW, 1, &[2]), part(HIGH, 3, &[1])], s()),
    );
    let change = |clock: u64, epoch: u64, val: f32| {
        let mut f = replicate_frame(1, epoch, LOW, &[7], &[val]);
        f.header.clock = clock;
        f.ctrl = Control::Replicate {
            spec: s(),
            what: Replica::Slots,
            records: vec![(10, LOW, clock)],
            chain: vec![],
        }
        .to_bytes()
        .into();
        f
    };
    // Epoch 7: LOW went to server 3 (server 2 holds nothing of it).
    c.step(
        1,
        Input::Map(map(
            7,
            &[],
            vec![part(LOW, 3, &[1]), part(HIGH, 3, &[1])],
            s(),
        )),
    );
    let first = req(&mut c, change(1, 6, 1.0));
    assert_eq!(code(only(&first)), Some(ErrorCode::NotOwner));
    // Epoch 8: server 2 is in LOW's chain again.
    c.step(
        2,
        Input::Map(map(
            8,
            &[],
            vec![part(LOW, 3, &[1, 2]), part(HIGH, 3, &[1])],
            s(),
        )),
    );
    let second = req(&mut c, change(2, 6, 2.0));
    let refused = only(&second);
    assert_eq!(code(refused), Some(ErrorCode::NotOwner));
    assert!(
        String::from_utf8_lossy(&refused.ctrl)
            .contains("refused a change server 1 made under epoch 6"),
        "{:?}",
        refused.control_msg()
    );
    assert_eq!(value(&c, 7), 0.0, "the later change landed on the gap");
    // A change server 1 made under a newer map comes after that map's
    // copies: taken.
    let newer = req(&mut c, change(3, 8, 3.0));
    assert_eq!(only(&newer).header.kind, Kind::Reply);
    assert_eq!(value(&c, 7), 3.0);
}
