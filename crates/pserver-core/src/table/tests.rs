use super::*;
use crate::spec::{Consistency, Init, UpdaterSpec};
use crate::updater::Registry;

fn kr(begin: Key, end: Key) -> KeyRange {
    KeyRange { begin, end }
}

fn table(updater: UpdaterSpec, aggregate: bool) -> Table {
    let u = Registry::new().build(&updater).unwrap();
    let spec = TableSpec {
        id: 1,
        name: "t".into(),
        dim: 1,
        init: Init::Zero,
        updater,
        consistency: Consistency::Eventual,
        aggregate,
        job: None,
    };
    Table::new(spec, u, &Threads::one())
}

fn push<'a>(sender: NodeId, clock: u64, keys: &'a [Key], vals: &'a [f32]) -> Push<'a> {
    Push {
        sender,
        range: kr(0, 100),
        clock,
        retry: false,
        keys: Keys::List(keys),
        vals,
    }
}

const NOW: PushCtx<'static> = PushCtx {
    aggregate: false,
    workers: &[],
    gate: None,
};

fn pull(t: &Table, keys: &[Key]) -> Vec<f32> {
    let mut out = Vec::new();
    t.pull(keys, &mut out);
    out
}

#[test]
fn push_applies_once_per_clock_whatever_the_order() {
    let mut t = table(UpdaterSpec::Add, false);
    let keys = [1, 2];
    let p = |c| push(7, c, &keys, &[1.0, 1.0]);
    assert_eq!(t.push(&p(2), NOW).unwrap().applied, 2);
    // Clock 1 arrives late (a resent slice): applied, once.
    assert_eq!(t.push(&p(1), NOW).unwrap().applied, 2);
    assert!(matches!(
        t.push(&p(1), NOW),
        Err(TableError::Duplicate { clock: 1, .. })
    ));
    let retry = Push {
        retry: true,
        ..p(2)
    };
    let r = t.push(&retry, NOW).unwrap();
    assert_eq!((r.applied, r.duplicate), (0, 2));
    assert_eq!(pull(&t, &keys), [2.0, 2.0]);
    // Far below the window: refused, nothing changes.
    t.push(&p(200), NOW).unwrap();
    assert!(matches!(
        t.push(&p(100), NOW),
        Err(TableError::TooOld { clock: 100, .. })
    ));
    assert_eq!(pull(&t, &keys), [3.0, 3.0]);
}

#[test]
fn refused_pushes_change_nothing_not_even_the_clock() {
    let mut t = table(UpdaterSpec::Add, false);
    type Check = fn(&TableError) -> bool;
    let cases: Vec<(Push<'_>, Check)> = vec![
        (push(7, 0, &[1], &[1.0]), |e| {
            matches!(e, TableError::NoClock { .. })
        }),
        (push(7, 1, &[1], &[1.0, 2.0]), |e| {
            matches!(e, TableError::Store(StoreError::WrongWidth { .. }))
        }),
        (push(7, 1, &[1], &[f32::NAN]), |e| {
            matches!(e, TableError::Store(StoreError::NotFinite { .. }))
        }),
        (push(7, 1, &[2, 1], &[1.0, 1.0]), |e| {
            matches!(e, TableError::Store(StoreError::Unsorted { .. }))
        }),
    ];
    for (p, want) in cases {
        let e = t.push(&p, NOW).unwrap_err();
        assert!(want(&e), "{e}");
    }
    assert_eq!(t.clock().min_clock(kr(0, 100), &[7]), 0);
    assert!(t.store().is_empty());
    assert_eq!(t.push(&push(7, 1, &[1], &[1.0]), NOW).unwrap().applied, 1);
}

#[test]
fn aggregates_apply_once_every_worker_pushed_in_clock_order() {
    let mut t = table(UpdaterSpec::Add, true);
    let workers = [1, 2];
    let ctx = PushCtx {
        aggregate: true,
        workers: &workers,
        gate: None,
    };
    let r = t.push(&push(1, 1, &[5], &[1.0]), ctx).unwrap();
    assert!(r.flushed.is_empty());
    assert!(t.has_pending(1));
    // Worker 1's clock 2 waits behind clock 1, which waits for worker 2.
    assert!(
        t.push(&push(1, 2, &[5], &[10.0]), ctx)
            .unwrap()
            .flushed
            .is_empty()
    );
    assert!(!t.ready(kr(0, 100), 1, &workers));
    let r = t.push(&push(2, 1, &[6], &[1.0]), ctx).unwrap();
    let clocks: Vec<u64> = r.flushed.iter().map(|a| a.clock).collect();
    assert_eq!(clocks, [1]);
    assert_eq!(r.flushed[0].keys, [5, 6]);
    assert!(r.flushed[0].refused.is_none());
    assert_eq!(pull(&t, &[5, 6]), [1.0, 1.0]);
    assert!(t.ready(kr(0, 100), 1, &workers));
    assert!(!t.ready(kr(0, 100), 2, &workers));
    let r = t.push(&push(2, 2, &[6], &[10.0]), ctx).unwrap();
    assert_eq!(r.flushed.len(), 1);
    assert_eq!(pull(&t, &[5, 6]), [11.0, 11.0]);
    assert!(t.ready(kr(0, 100), 2, &workers));
}

#[test]
fn a_push_pull_reads_what_a_pull_after_the_push_reads() {
    let mut t = table(UpdaterSpec::Add, false);
    let keys = [1, 2, 3];
    let p = |c| push(7, c, &keys, &[1.0, 2.0, 3.0]);
    let mut out = vec![9.0];
    let r = t.push_pull(&p(1), NOW, &mut out).unwrap();
    assert_eq!(r.applied, 3);
    assert_eq!(out, [9.0, 1.0, 2.0, 3.0], "appended after what was there");
    // A retry of an applied clock applies nothing and still reads.
    let retry = Push {
        retry: true,
        ..p(1)
    };
    let mut out = Vec::new();
    let r = t.push_pull(&retry, NOW, &mut out).unwrap();
    assert_eq!((r.applied, r.duplicate), (0, 3));
    assert_eq!(out, [1.0, 2.0, 3.0]);
    // A refused push (a duplicate without the retry flag) reads nothing.
    let mut out = Vec::new();
    assert!(t.push_pull(&p(1), NOW, &mut out).is_err());
    assert!(out.is_empty());
    // Part of a push already applied (an earlier slice over [0, 2) at
    // clock 2): those keys are read as they are, the rest updated.
    let early = Push {
        range: kr(0, 2),
        ..push(7, 2, &keys[..1], &[10.0])
    };
    t.push(&early, NOW).unwrap();
    let mut out = Vec::new();
    let r = t.push_pull(&p(2), NOW, &mut out).unwrap();
    assert_eq!((r.applied, r.duplicate), (2, 1));
    assert_eq!(out, [11.0, 4.0, 6.0]);
    assert_eq!(pull(&t, &keys), out);
    // Dense.
    let dense = Push {
        range: kr(40, 43),
        keys: Keys::Dense,
        ..push(7, 3, &[], &[1.0, 1.0, 1.0])
    };
    let mut out = Vec::new();
    t.push_pull(&dense, NOW, &mut out).unwrap();
    assert_eq!(out, [1.0, 1.0, 1.0]);
}

#[test]
fn a_summed_push_pull_reads_after_the_sums_it_completes() {
    let mut t = table(UpdaterSpec::Add, true);
    let workers = [1, 2];
    let ctx = PushCtx {
        aggregate: true,
        workers: &workers,
        gate: None,
    };
    let mut out = Vec::new();
    t.push_pull(&push(1, 1, &[5], &[1.0]), ctx, &mut out)
        .unwrap();
    assert_eq!(out, [0.0], "summed, not applied yet");
    let mut out = Vec::new();
    let r = t
        .push_pull(&push(2, 1, &[5], &[2.0]), ctx, &mut out)
        .unwrap();
    assert_eq!(r.flushed.len(), 1);
    assert_eq!(out, [3.0], "the sum this push completed is applied first");
}

#[test]
fn a_late_part_of_an_applied_sum_is_applied_on_its_own() {
    // Completeness reads each worker's highest clock: a slice of
    // worker 2's clock 1 resent after its clock 2 arrived finds clock 1
    // already applied without it, and is applied (once) by itself.
    let mut t = table(UpdaterSpec::Add, true);
    let workers = [1, 2];
    let ctx = PushCtx {
        aggregate: true,
        workers: &workers,
        gate: None,
    };
    t.push(&push(1, 1, &[5], &[1.0]), ctx).unwrap();
    t.push(&push(1, 2, &[5], &[1.0]), ctx).unwrap();
    let r = t.push(&push(2, 2, &[6], &[1.0]), ctx).unwrap();
    assert_eq!(r.flushed.len(), 2);
    let r = t.push(&push(2, 1, &[6], &[1.0]), ctx).unwrap();
    assert_eq!(r.flushed.len(), 1);
    assert!(t.push(&push(2, 1, &[6], &[1.0]), ctx).is_err(), "once");
    assert_eq!(pull(&t, &[5, 6]), [2.0, 2.0]);
}

#[test]
fn a_sum_that_would_overflow_is_refused_to_its_sender() {
    let mut t = table(UpdaterSpec::Add, true);
    let workers = [1, 2, 3];
    let ctx = PushCtx {
        aggregate: true,
        workers: &workers,
        gate: None,
    };
    t.push(&push(1, 1, &[5], &[f32::MAX]), ctx).unwrap();
    let e = t.push(&push(2, 1, &[5], &[f32::MAX]), ctx).unwrap_err();
    assert!(
        matches!(
            e,
            TableError::Overflow {
                node: 2,
                key: 5,
                ..
            }
        ),
        "{e}"
    );
    // Refused whole: worker 2's clock did not advance, so the sum waits
    // for a push it can take.
    assert_eq!(t.clock().min_clock(kr(0, 100), &[2]), 0);
    t.push(&push(2, 1, &[5], &[-1.0]), ctx).unwrap();
    let r = t.push(&push(3, 1, &[], &[]), ctx).unwrap();
    assert_eq!(r.flushed.len(), 1);
    assert!(r.flushed[0].refused.is_none());
    assert_eq!(pull(&t, &[5]), [f32::MAX - 1.0]);
}

#[test]
fn replica_changes_are_checked_before_anything_is_stored() {
    let mut t = table(UpdaterSpec::Add, false);
    let rec = [(7, kr(0, 100), 3)];
    assert!(matches!(
        t.replica_slots(&[1, 2], &[1.0], &rec),
        Err(TableError::Store(StoreError::WrongWidth { .. }))
    ));
    assert!(matches!(
        t.replica_slots(&[1, 2], &[1.0, f32::INFINITY], &rec),
        Err(TableError::Store(StoreError::NotFinite { index: 1, .. }))
    ));
    assert!(t.store().is_empty());
    assert_eq!(t.clock().min_clock(kr(0, 100), &[7]), 0);
    t.replica_slots(&[1, 2], &[1.0, 2.0], &rec).unwrap();
    assert_eq!(pull(&t, &[1, 2]), [1.0, 2.0]);
    // The promoted replica refuses what its primary applied.
    assert!(t.push(&push(7, 3, &[1], &[1.0]), NOW).is_err());
}

#[test]
fn replica_pending_is_set_and_flushed_drops_it() {
    let mut t = table(UpdaterSpec::Add, true);
    t.replica_pending(4, kr(0, 50), &[1, 2], &[1.0, 2.0], &[])
        .unwrap();
    t.replica_pending(4, kr(0, 50), &[1], &[5.0], &[]).unwrap();
    let (keys, sums) = t.pending()[&4].sums_in(KeyRange::ALL);
    assert_eq!((keys, sums), (vec![1, 2], vec![5.0, 2.0]));
    assert!(t.replica_pending(4, kr(0, 50), &[1], &[], &[]).is_err());
    t.replica_flushed(4, kr(0, 10));
    let (keys, _) = t.pending()[&4].sums_in(KeyRange::ALL);
    assert!(keys.is_empty());
    assert_eq!(t.pending()[&4].ranges(), [kr(10, 50)]);
    // Which ranges the clock's sum still covers.
    assert!(t.has_pending_over(4, kr(40, 60)));
    assert!(!t.has_pending_over(4, kr(0, 10)));
    assert!(!t.has_pending_over(5, kr(10, 50)));
    t.replica_flushed(4, kr(10, 50));
    assert!(!t.has_pending(4));
}

#[test]
fn prune_cuts_sums_to_held_ranges_and_names_orphans() {
    let mut t = table(UpdaterSpec::Add, true);
    let ctx = PushCtx {
        aggregate: true,
        workers: &[1, 2],
        gate: None,
    };
    let left = Push {
        range: kr(0, 50),
        ..push(1, 1, &[10], &[1.0])
    };
    let right = Push {
        range: kr(50, 100),
        ..push(1, 2, &[60], &[1.0])
    };
    t.push(&left, ctx).unwrap();
    t.push(&right, ctx).unwrap();
    // Still holds [0, 50) as primary: clock 1 unchanged; clock 2's range
    // is gone, so its sum is dropped and its acks orphaned.
    let orphaned = t.prune(&[kr(0, 50)], |_| true);
    assert_eq!(orphaned, [2]);
    assert!(t.has_pending(1) && !t.has_pending(2));
    // Not primary any more: orphaned, but the sum stays for the copy.
    assert_eq!(t.prune(&[kr(0, 50)], |_| false), [1]);
    assert!(t.has_pending(1));
}

#[test]
fn retain_ranges_drops_handed_away_keys() {
    let mut t = table(UpdaterSpec::Add, false);
    let keys: Vec<Key> = (0..100).collect();
    let vals = vec![1.0; 100];
    t.push(&push(7, 1, &keys, &vals), NOW).unwrap();
    assert_eq!(t.retain_ranges(&[kr(0, 10), kr(90, 95)]), 85);
    assert_eq!(t.store().len(), 15);
    assert_eq!(pull(&t, &[5, 50, 92]), [1.0, 0.0, 1.0]);
}

#[test]
fn dense_pushes_cover_their_range() {
    let mut t = table(UpdaterSpec::Add, false);
    let p = Push {
        range: kr(10, 14),
        keys: Keys::Dense,
        ..push(7, 1, &[], &[1.0, 2.0, 3.0, 4.0])
    };
    assert_eq!(t.push(&p, NOW).unwrap().applied, 4);
    let mut out = Vec::new();
    t.pull_dense(kr(10, 14), &mut out);
    assert_eq!(out, [1.0, 2.0, 3.0, 4.0]);
    let short = Push { vals: &[1.0], ..p };
    assert!(t.push(&Push { clock: 2, ..short }, NOW).is_err());
}

#[test]
fn subtract_and_gaps() {
    assert_eq!(subtract(kr(0, 10), kr(3, 5)), [kr(0, 3), kr(5, 10)]);
    assert_eq!(subtract(kr(0, 10), kr(20, 30)), [kr(0, 10)]);
    assert!(subtract(kr(3, 5), kr(0, 10)).is_empty());
    assert_eq!(
        gaps(&[kr(10, 20), kr(30, crate::KEY_END)]),
        [kr(0, 10), kr(20, 30)]
    );
    assert_eq!(gaps(&[]), [KeyRange::ALL]);
}
