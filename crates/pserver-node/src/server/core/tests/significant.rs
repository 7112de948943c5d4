//! The significantly-modified filter in the server's core: replies carry
//! only what moved past the threshold for this connection, stamped; a
//! waiting pull is filtered when it is answered; a closed connection's
//! shadows go; a new primary sends everything; bad requests are refused.

use super::*;
use pserver_core::significant::{Basis, Mirror, Stamp};
use pserver_wire::header::FLAG_SIGNIFICANT;

fn sig_pull(clock: u64, keys: &[u64], threshold: f32, basis: Option<Basis>) -> Frame {
    let mut f = pull(10, clock, keys);
    f.header.flags |= FLAG_SIGNIFICANT;
    f.ctrl = Control::SignificantPull {
        threshold,
        basis,
        consistency: None,
    }
    .to_bytes()
    .into();
    f
}

fn stamp(f: &Frame) -> Stamp {
    assert_ne!(f.header.flags & FLAG_SIGNIFICANT, 0, "{f:?}");
    match f.control_msg() {
        Ok(Control::Significant(s)) => s,
        other => panic!("not a stamp: {other:?}"),
    }
}

/// A filtered pull answered at once, merged into `m`: (answer, values sent).
fn round(c: &mut ServerCore, m: &mut Mirror, keys: &[u64], thr: f32) -> (Vec<f32>, usize) {
    let e = req(c, sig_pull(0, keys, thr, m.basis()));
    let f = only(&e);
    let s = stamp(f);
    (m.merge(keys, &s, &f.vals).unwrap(), f.vals.len())
}

#[test]
fn replies_carry_only_what_moved_past_the_threshold() {
    let mut c = core_with(1, solo(spec(false, Consistency::Eventual)));
    let mut m = Mirror::new(1);
    req(&mut c, push(10, 1, &[1, 2, 3], &[1.0, 2.0, 3.0]));
    assert_eq!(
        round(&mut c, &mut m, &[1, 2, 3], 0.5),
        (vec![1.0, 2.0, 3.0], 3)
    );
    req(&mut c, push(10, 2, &[1, 2], &[0.1, 1.0]));
    // Key 1 moved 0.1 (left out: the worker's 1.0 is within 0.5), key 2 by 1.
    assert_eq!(
        round(&mut c, &mut m, &[1, 2, 3], 0.5),
        (vec![1.0, 3.0, 3.0], 1)
    );
    req(&mut c, push(10, 3, &[1], &[0.5]));
    // Key 1 is now 0.6 past what the worker holds.
    assert_eq!(
        round(&mut c, &mut m, &[1, 2, 3], 0.5),
        (vec![1.6, 3.0, 3.0], 1)
    );
    // A pull of a key never sent on this connection carries it.
    assert_eq!(round(&mut c, &mut m, &[3, 4], 0.5), (vec![3.0, 0.0], 1));
}

#[test]
fn a_waiting_pull_is_filtered_when_it_is_answered() {
    let mut c = core_with(1, solo(spec(false, Consistency::Sequential)));
    let mut m = Mirror::new(1);
    assert_eq!(round(&mut c, &mut m, &[1, 2], 0.5), (vec![0.0, 0.0], 2));
    // A pull at clock 1 waits for workers 10 and 11.
    assert!(sent(&req(&mut c, sig_pull(1, &[1, 2], 0.5, m.basis()))).is_empty());
    req(&mut c, push(10, 1, &[1], &[5.0]));
    let e = req(&mut c, push(11, 1, &[2], &[0.1]));
    let s = sent(&e);
    assert_eq!(s.len(), 2, "the ack and the pull: {e:?}");
    let st = stamp(s[1]);
    assert_eq!(m.merge(&[1, 2], &st, &s[1].vals).unwrap(), vec![5.0, 0.0]);
    assert_eq!(s[1].vals, [5.0]);
}

#[test]
fn a_new_connection_or_a_new_primary_gets_everything() {
    let t = spec(false, Consistency::Eventual);
    let mut c = core_with(1, solo(t.clone()));
    let mut m = Mirror::new(1);
    req(&mut c, push(10, 1, &[1, 2], &[1.0, 2.0]));
    round(&mut c, &mut m, &[1, 2], 0.5);
    assert_eq!(round(&mut c, &mut m, &[1, 2], 0.5).1, 0);
    // The connection closes: its shadow goes, and the worker's next
    // connection starts with an empty mirror.
    c.step(2, Input::Closed(CONN));
    let mut m = Mirror::new(1);
    assert_eq!(round(&mut c, &mut m, &[1, 2], 0.5), (vec![1.0, 2.0], 2));
    // Another server that becomes primary (no shadow for this worker)
    // sends everything, even when the worker names a basis it does not know.
    let mut other = core_with(1, solo(t));
    req(&mut other, push(10, 1, &[1, 2], &[1.0, 2.0]));
    let e = req(&mut other, sig_pull(0, &[1, 2], 0.5, m.basis()));
    assert_eq!(only(&e).vals, [1.0, 2.0]);
}

#[test]
fn a_dense_pull_is_filtered_over_its_range() {
    let mut c = core_with(1, solo(spec(false, Consistency::Eventual)));
    let range = KeyRange { begin: 10, end: 14 };
    let mut f = sig_pull(0, &[], 0.5, None);
    f.header.flags |= FLAG_DENSE;
    f.header.range = range;
    let e = req(&mut c, f.clone());
    let keys: Vec<u64> = (10..14).collect();
    let mut m = Mirror::new(1);
    let st = stamp(only(&e));
    assert_eq!(m.merge(&keys, &st, &only(&e).vals).unwrap(), vec![0.0; 4]);
    f.ctrl = Control::SignificantPull {
        threshold: 0.5,
        basis: m.basis(),
        consistency: None,
    }
    .to_bytes()
    .into();
    let e = req(&mut c, f);
    assert!(only(&e).vals.is_empty());
}

#[test]
fn bad_filtered_requests_are_refused() {
    let mut c = core_with(1, solo(spec(false, Consistency::Eventual)));
    let e = req(&mut c, sig_pull(0, &[1], -1.0, None));
    assert_eq!(code(only(&e)), Some(ErrorCode::Invalid));
    let e = req(&mut c, sig_pull(0, &[1], f32::NAN, None));
    assert_eq!(code(only(&e)), Some(ErrorCode::Invalid));
    let mut p = push(10, 1, &[1], &[1.0]);
    p.header.flags |= FLAG_SIGNIFICANT;
    let e = req(&mut c, p);
    assert_eq!(code(only(&e)), Some(ErrorCode::Invalid));
    let mut p = pull(10, 0, &[1]);
    p.header.flags |= FLAG_SIGNIFICANT;
    p.ctrl = Control::Consistency(Consistency::Eventual)
        .to_bytes()
        .into();
    let e = req(&mut c, p);
    assert_eq!(code(only(&e)), Some(ErrorCode::Invalid));
    // Nothing was applied.
    assert_eq!(value(&c, 1), 0.0);
}

#[test]
fn with_the_filter_off_replies_are_whole() {
    let mut c = ServerCore::new(
        1,
        CoreConfig {
            significant_entries: 0,
            ..cfg()
        },
    );
    c.step(0, Input::Map(solo(spec(false, Consistency::Eventual))));
    let e = req(&mut c, sig_pull(0, &[1, 2], 0.5, None));
    let f = only(&e);
    assert_eq!(f.header.flags & FLAG_SIGNIFICANT, 0);
    assert_eq!(f.vals, [0.0, 0.0]);
}
