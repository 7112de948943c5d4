//! The load loop: requests of one kind kept `depth` in flight for a while,
//! timed one by one, with the worker's traffic counters read around it.

use super::keys::Pool;
use super::stats::Run;
use anyhow::{Context, Result};
use pserver_core::KeyRange;
use pserver_node::worker::{Handle, Keys, Op, Outcome, Request, Traffic, Worker};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The three operations, in the order they run (a push first, so pulls
/// read stored keys).
pub const OPS: [Op; 3] = [Op::Push, Op::Pull, Op::PushPull];

/// The name an operation has in the report.
pub fn op_name(op: Op) -> &'static str {
    match op {
        Op::Push => "push",
        Op::Pull => "pull",
        Op::PushPull => "push_pull",
    }
}

/// Where a case's keys come from.
pub enum Source<'a> {
    /// Sparse: lists of random sorted keys, in turn.
    Lists(&'a mut Pool),
    /// Dense: every key of one range, no key list on the wire.
    Range(KeyRange),
}

impl Source<'_> {
    /// The keys of the next request and how many there are.
    fn next(&mut self, op: Op) -> (Keys, usize) {
        match self {
            Source::Lists(pool) => {
                let keys = pool.next_list(op != Op::Pull);
                let n = keys.len();
                (Keys::List(keys), n)
            }
            Source::Range(r) => (Keys::Range(*r), r.len() as usize),
        }
    }
}

/// One case: a table, an operation, a request width.
pub struct Case<'a> {
    /// The table.
    pub table: &'a str,
    /// What each request does.
    pub op: Op,
    /// Floats per key.
    pub dim: usize,
    /// Requests kept in flight.
    pub depth: usize,
}

/// How often a request's values cross the wire: pushed, pulled, or both.
fn value_directions(op: Op) -> u64 {
    match op {
        Op::Push | Op::Pull => 1,
        Op::PushPull => 2,
    }
}

/// The worker's counters at one moment.
#[derive(Clone, Copy)]
struct Counters {
    frames: u64,
    sent: u64,
    received: u64,
}

impl Counters {
    fn read(t: &Traffic) -> Counters {
        Counters {
            frames: t.requests.load(Ordering::Relaxed),
            sent: t.bytes_sent.load(Ordering::Relaxed),
            received: t.bytes_received.load(Ordering::Relaxed),
        }
    }
}

/// Runs one repetition of `case` on `w` for `duration` (at least one request
/// completes, however long it takes). Only this loop may use `w` meanwhile:
/// the figures are differences of its traffic counters.
pub async fn run(
    w: &Worker,
    case: &Case<'_>,
    source: &mut Source<'_>,
    duration: Duration,
) -> Result<Run> {
    let before = Counters::read(w.traffic());
    let end = Instant::now() + duration;
    let mut in_flight: VecDeque<(Instant, usize, Handle<Outcome>)> = VecDeque::new();
    let mut run = Run::default();
    let mut busy = Duration::ZERO;
    let mut busy_since: Option<Instant> = None;
    let mut sent = 0u64;
    // Answers come back as the next requests' spare vectors, as a program
    // that pulls the same range at every step would reuse its buffer
    // (`Worker::send_into`).
    let mut spares: Vec<Vec<f32>> = Vec::new();
    // Pushed arrays come back (`Outcome::pushed`) and are pushed again, as
    // a program would fill its gradient buffer at every step: a fresh
    // array of 64 MB is a page fault every 4 KiB before it is even sent.
    // They are never written to, so they keep their ones.
    let mut pushed: Vec<Vec<f32>> = Vec::new();
    loop {
        // The first request goes even past the end: a case of requests
        // longer than `duration` still measures one.
        while in_flight.len() < case.depth && (sent == 0 || Instant::now() < end) {
            let (keys, n) = source.next(case.op);
            let vals = match case.op {
                Op::Pull => Vec::new(),
                _ => match pushed.pop() {
                    Some(v) if v.len() == n * case.dim => v,
                    _ => vec![1.0f32; n * case.dim],
                },
            };
            // Pushes need a rising clock: the server takes a second push of a
            // worker at one clock over one range for a duplicate.
            w.advance();
            let req = Request {
                table: case.table.to_string(),
                op: case.op,
                keys,
                vals,
                clock: None,
                consistency: None,
            };
            let t0 = Instant::now();
            busy_since.get_or_insert(t0);
            let spare = spares.pop().unwrap_or_default();
            in_flight.push_back((t0, n, w.send_into(req, spare)));
            sent += 1;
        }
        let Some((t0, n, h)) = in_flight.pop_front() else {
            break;
        };
        let outcome = h
            .await
            .with_context(|| format!("{} of {n} keys", op_name(case.op)))?;
        if outcome.vals.capacity() > 0 {
            spares.push(outcome.vals);
        }
        if !outcome.pushed.is_empty() {
            pushed.push(outcome.pushed);
        }
        let done = Instant::now();
        run.latencies_us.push((done - t0).as_secs_f64() * 1e6);
        run.requests += 1;
        run.keys += n as u64;
        run.payload_bytes += n as u64 * case.dim as u64 * 4 * value_directions(case.op);
        if in_flight.is_empty() {
            if let Some(since) = busy_since.take() {
                busy += done - since;
            }
        }
    }
    let after = Counters::read(w.traffic());
    run.frames = after.frames - before.frames;
    run.bytes_sent = after.sent - before.sent;
    run.bytes_received = after.received - before.received;
    run.seconds = busy.as_secs_f64();
    run.latencies_us.sort_by(f64::total_cmp);
    Ok(run)
}
