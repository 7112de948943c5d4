//! A server that came back under its id (`pserver server --id`): a new,
//! empty process, told apart from its earlier one by
//! [`NodeInfo::joined`], even by a server that never saw the map where it
//! was dead.

use super::*;

/// Server 1 holding LOW as primary (a push of worker 10 applied and queued
/// to its replica 2) and HIGH as replica of 2 (a change 2 sent).
fn holding() -> ServerCore {
    let mut c = core_with(1, chained(5, spec(false, Consistency::Eventual)));
    let mut p = push(10, 1, &[1], &[1.0]);
    p.header.range = LOW;
    let e = req(&mut c, p);
    assert_eq!(forwards(&e).len(), 1, "queued to replica 2");
    let e = req(&mut c, replicate_frame(2, 5, HIGH, &[MID + 1], &[3.0]));
    assert_eq!(only(&e).header.kind, Kind::Reply);
    c
}

/// Epoch 8: server 1 primary of everything with server 2 after it, server
/// 2 being the process that joined at `joined`, at `addr`.
fn back(joined: u64, addr: &str) -> ClusterMap {
    let mut m = map(
        8,
        &[],
        vec![part(LOW, 1, &[2]), part(HIGH, 1, &[2])],
        spec(false, Consistency::Eventual),
    );
    m.nodes[1].joined = joined;
    m.nodes[1].addr = addr.into();
    m
}

/// The ranges copied, with where to.
fn copies(effects: &[Effect]) -> Vec<(NodeId, String, KeyRange)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Forward {
                to, addr, frame, ..
            } if matches!(
                frame.control_msg(),
                Ok(Control::Replicate {
                    what: Replica::Copy { .. },
                    ..
                })
            ) =>
            {
                Some((*to, addr.clone(), frame.header.range))
            }
            _ => None,
        })
        .collect()
}

fn push_high(c: &mut ServerCore) -> Vec<Effect> {
    let mut p = push(10, 2, &[MID + 2], &[1.0]);
    p.header.epoch = 8;
    p.header.range = HIGH;
    c.step(
        30,
        Input::Request {
            conn: CONN,
            frame: p,
        },
    )
}

#[test]
fn a_server_back_under_its_id_is_a_new_process_even_unseen_dead() {
    // Server 1 never got the map where 2 died: it goes from 2 alive to 2
    // alive again, as another process at another address.
    let mut c = holding();
    let e = c.step(10, Input::Map(back(7, "s2b")));
    // The queue to the earlier process goes first, then everything is
    // copied to the new one (it holds nothing), at its address.
    let abandon = e
        .iter()
        .position(|x| matches!(x, Effect::Abandon { to: 2 }))
        .expect("the queue to the earlier process abandoned");
    let first_forward = e
        .iter()
        .position(|x| matches!(x, Effect::Forward { .. }))
        .unwrap();
    assert!(abandon < first_forward, "{e:?}");
    let mut got = copies(&e);
    got.sort_by_key(|(_, _, r)| r.begin);
    assert_eq!(
        got,
        [(2, "s2b".to_string(), LOW), (2, "s2b".to_string(), HIGH)]
    );
    // HIGH's old primary was the earlier process, which sends no fence:
    // server 1 serves HIGH at once.
    let e = push_high(&mut c);
    assert_eq!(forwards(&e).len(), 1, "{e:?}");
    assert!(sent(&e).is_empty(), "the ack waits for the chain: {e:?}");

    // The same map with the same process of 2: nothing to copy (2 holds
    // both ranges), and HIGH waits for 2's fence.
    let mut c = holding();
    let e = c.step(10, Input::Map(back(0, "s2")));
    assert!(
        !e.iter().any(|x| matches!(x, Effect::Abandon { .. })),
        "{e:?}"
    );
    assert_eq!(copies(&e), []);
    let e = push_high(&mut c);
    assert_eq!(code(only(&e)), Some(ErrorCode::EpochAhead));
}

#[test]
fn chain_changes_of_the_earlier_process_are_refused_and_the_new_ones_wait_for_the_map() {
    let mut c = core_with(1, chained(5, spec(false, Consistency::Eventual)));
    c.step(10, Input::Map(back(7, "s2b")));
    // Made under a map from before the id was taken back: the earlier
    // process's, refused as from a dead server (nothing applied).
    let e = req(&mut c, replicate_frame(2, 6, HIGH, &[MID + 1], &[9.0]));
    let f = only(&e);
    assert_eq!(code(f), Some(ErrorCode::NotOwner));
    assert!(
        format!("{:?}", f.control_msg()).contains("from its earlier process"),
        "{f:?}"
    );
    assert_eq!(value(&c, MID + 1), 0.0);
    // The new process's (at the map that took it back, or later) are taken.
    let e = req(&mut c, replicate_frame(2, 8, HIGH, &[MID + 1], &[9.0]));
    assert_eq!(only(&e).header.kind, Kind::Reply);
    assert_eq!(value(&c, MID + 1), 9.0);

    // A server whose map still holds 2 dead: 2's change under a newer map
    // is refused for now (it may have come back), not for good.
    let dead = map(
        6,
        &[2],
        vec![part(KeyRange::ALL, 1, &[3])],
        spec(false, Consistency::Eventual),
    );
    let mut d = core_with(1, dead.clone());
    let e = req(&mut d, replicate_frame(2, 8, HIGH, &[MID + 1], &[9.0]));
    assert_eq!(code(only(&e)), Some(ErrorCode::EpochAhead));
    let e = req(&mut d, replicate_frame(2, 6, HIGH, &[MID + 1], &[9.0]));
    assert_eq!(code(only(&e)), Some(ErrorCode::NotOwner));
    // And a change whose chain goes on to 2 under a newer map is not taken
    // without it: 2 would miss it.
    let mut d = core_with(3, dead);
    let mut f = replicate_frame(1, 8, HIGH, &[MID + 1], &[9.0]);
    f.ctrl = Control::Replicate {
        spec: spec(false, Consistency::Eventual),
        what: Replica::Slots,
        records: vec![],
        chain: vec![2],
    }
    .to_bytes()
    .into();
    let e = req(&mut d, f);
    assert_eq!(code(only(&e)), Some(ErrorCode::EpochAhead));
    assert!(forwards(&e).is_empty());
}
