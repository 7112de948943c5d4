//! Work on lent tables: big requests and checkpoints while other tables are served.

use super::*;

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
