//! Pushes, pulls, every refusal, waits, key caching, the server's own lease.

use super::*;

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
                p.vals = vec![1.0, 1.0].into();
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
            with(|p| p.vals = vec![1.0, 2.0].into()),
            ErrorCode::WrongWidth,
        ),
        (
            "NaN",
            with(|p| p.vals = vec![f32::NAN].into()),
            ErrorCode::NotFinite,
        ),
        (
            "infinite",
            with(|p| p.vals = vec![f32::INFINITY].into()),
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
    p.vals = vec![1.0, 2.0, 3.0, 4.0].into();
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

#[test]
fn a_stopped_server_applies_replicates_and_answers_nothing() {
    // A stopping server's queues to its chains are dropped with what they
    // held; a push taken after that would reach the replica ahead of the
    // dropped changes, its absolute slots carrying their effect without
    // their clock records (seen as a push applied twice on a server kill).
    let mut c = core_with(1, chained(5, spec(false, Consistency::Eventual)));
    let mut p = push(10, 1, &[1], &[1.0]);
    p.header.range = LOW;
    let e = req(&mut c, p.clone());
    assert_eq!(forwards(&e).len(), 1);
    c.stop();
    p.header.clock = 2;
    let e = req(&mut c, p);
    assert!(e.is_empty(), "{e:?}");
    let mut q = pull(10, 0, &[1]);
    q.header.range = LOW;
    assert!(req(&mut c, q).is_empty());
    let map = chained(6, spec(false, Consistency::Eventual));
    assert!(c.step(9, Input::Map(map)).is_empty());
    // The one push applied before the stop is all the table holds.
    let t = c.tables[&T].as_ref().unwrap();
    assert_eq!(t.store().slots_of(&[1]), [1.0]);
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

/// Worker 10 in job `a`, worker 11 in job `b`, table `t` of job `a`.
fn two_jobs(table: TableSpec) -> ClusterMap {
    let mut m = solo(TableSpec {
        job: Some("a".into()),
        ..table
    });
    for n in &mut m.nodes {
        n.group = match n.id {
            10 => Group::Job("a".into()),
            11 => Group::Job("b".into()),
            _ => Group::Default,
        };
    }
    m
}

#[test]
fn a_jobs_table_waits_for_its_own_workers_only() {
    // Sequential: worker 10's pull at clock 1 needs only worker 10's push
    // (worker 11 is another job's and never pushes here).
    let mut c = core_with(1, two_jobs(spec(false, Consistency::Sequential)));
    assert!(sent(&req(&mut c, pull(10, 1, &[1]))).is_empty());
    let e = req(&mut c, push(10, 1, &[1], &[1.0]));
    let s = sent(&e);
    assert_eq!(s.len(), 2, "the ack and the pull: {e:?}");
    assert_eq!(s[1].vals, [1.0]);
}

#[test]
fn a_jobs_sums_complete_with_its_own_workers() {
    let mut c = core_with(1, two_jobs(spec(true, Consistency::Sequential)));
    req(&mut c, push(10, 1, &[1], &[2.0]));
    // Applied: worker 10 is the job's only worker.
    assert_eq!(only(&req(&mut c, pull(10, 0, &[1]))).vals, [2.0]);
}

#[test]
fn a_worker_of_another_job_may_not_push_and_changes_nothing() {
    let mut c = core_with(1, two_jobs(spec(false, Consistency::Eventual)));
    let e = req(&mut c, push(11, 1, &[1], &[5.0]));
    let f = only(&e);
    assert_eq!(code(f), Some(ErrorCode::Invalid));
    let Ok(Control::Error { message, .. }) = f.control_msg() else {
        panic!("{f:?}")
    };
    assert!(
        message.contains("job b") && message.contains("job a"),
        "{message}"
    );
    // It may still read.
    assert_eq!(only(&req(&mut c, pull(11, 0, &[1]))).vals, [0.0]);
    // Pulls of the job's own worker are not held back by it either.
    req(&mut c, push(10, 1, &[1], &[1.0]));
    assert_eq!(only(&req(&mut c, pull(10, 0, &[1]))).vals, [1.0]);
}

#[test]
fn the_clocks_of_senders_that_left_are_forgotten_and_their_pushes_refused() {
    // Issue #16, defect 8: the records of every client ever were kept.
    let t = spec(false, Consistency::Eventual);
    let mut c = core_with(1, solo(t.clone()));
    for sender in [20, 21, 10] {
        assert_eq!(
            acked(only(&req(&mut c, push(sender, 1, &[1], &[1.0])))),
            (1, 0)
        );
    }
    let senders = |c: &ServerCore| {
        let mut s: Vec<NodeId> = c
            .table(T)
            .unwrap()
            .clock()
            .records_in(KeyRange::ALL)
            .into_iter()
            .map(|r| r.0)
            .collect();
        s.dedup();
        s
    };
    assert_eq!(senders(&c), [10, 20, 21]);
    // Client 20 left and worker 10 was declared dead; client 21 is here.
    let mut gone = map(6, &[10], vec![part(KeyRange::ALL, 1, &[])], t);
    gone.clients = pserver_core::map::Clients {
        below: 30,
        here: vec![21],
    };
    c.step(2, Input::Map(gone));
    assert_eq!(senders(&c), [21]);
    // A push of theirs still in flight (a retry, say) is refused, not
    // applied a second time; the client present and one newer than the
    // record push as before.
    for sender in [20, 10] {
        let mut late = push(sender, 1, &[1], &[1.0]);
        late.header.epoch = 6;
        late.header.flags = FLAG_RETRY;
        let e = req(&mut c, late);
        let f = only(&e);
        assert_eq!(code(f), Some(ErrorCode::Invalid), "{f:?}");
        let Ok(Control::Error { message, .. }) = f.control_msg() else {
            panic!("{f:?}")
        };
        assert!(message.contains("left the cluster"), "{message}");
    }
    assert_eq!(value(&c, 1), 3.0);
    for sender in [21, 40] {
        let mut p = push(sender, 2, &[1], &[1.0]);
        p.header.epoch = 6;
        assert_eq!(acked(only(&req(&mut c, p))), (1, 0));
    }
    assert_eq!(value(&c, 1), 5.0);
    // They may still read.
    let mut p = pull(20, 0, &[1]);
    p.header.epoch = 6;
    assert_eq!(only(&req(&mut c, p)).vals, [5.0]);
}
