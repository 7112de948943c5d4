//! A fixed workload on one `Table` for profilers (`perf record`,
//! `valgrind --tool=callgrind`): the same key lists every run, no wire, no
//! runtime, so instruction counts repeat exactly from run to run.
//!
//! `cargo run --release -p pserver-core --example store_profile -- OP KEYSET [REQUESTS] [THREADS]`
//! with OP `push`, `pull` or `pushpull` and KEYSET `small` (one fixed list
//! of 65,536 keys: a cache-resident table) or `random` (65,536 random keys
//! a request over a table of 4M keys).

use pserver_core::store::Threads;
use pserver_core::table::{Keys, Push, PushCtx, Table};
use pserver_core::updater::Registry;
use pserver_core::{Consistency, Init, KeyRange, TableSpec, UpdaterSpec};

/// Keys a request carries, as the bench's 65,536-key cases.
const KEYS: usize = 65_536;

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn list(seed: &mut u64, n: usize, universe: u64) -> Vec<u64> {
    let mut keys: Vec<u64> = (0..n).map(|_| splitmix(seed) % universe).collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let op = args.get(1).map_or("push", String::as_str).to_string();
    let keyset = args.get(2).map_or("small", String::as_str).to_string();
    let requests: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(200);
    let threads: usize = args.get(4).and_then(|a| a.parse().ok()).unwrap_or(1);
    let updater = UpdaterSpec::Assign;
    let built = Registry::new().build(&updater).expect("assign");
    let spec = TableSpec {
        id: 1,
        name: "profile".into(),
        dim: 1,
        init: Init::Zero,
        updater,
        consistency: Consistency::Eventual,
        aggregate: false,
        job: None,
    };
    let pool = Threads::new(threads).expect("apply threads");
    let threads = pool.count();
    let mut table = Table::new(spec, built, &pool);
    let mut seed = 7;
    let mut clock = 0;
    let vals = vec![1.0f32; KEYS];
    // With `read`, a push-pull: each key read in the probe that updates it.
    let mut push_read = |table: &mut Table, keys: &[u64], read: Option<&mut Vec<f32>>| {
        clock += 1;
        let p = Push {
            sender: 1,
            range: KeyRange::ALL,
            clock,
            retry: false,
            keys: Keys::List(keys),
            vals: &vals[..keys.len()],
        };
        let ctx = PushCtx {
            aggregate: false,
            workers: &[],
            gate: None,
        };
        match read {
            Some(out) => table.push_pull(&p, ctx, out).expect("push-pull"),
            None => table.push(&p, ctx).expect("push"),
        };
    };
    let lists: Vec<Vec<u64>> = match keyset.as_str() {
        "small" => vec![list(&mut seed, KEYS, u64::MAX)],
        _ => {
            let universe = 1u64 << 22;
            let all: Vec<u64> = (0..universe).collect();
            for chunk in all.chunks(KEYS) {
                push_read(&mut table, chunk, None);
            }
            (0..256).map(|_| list(&mut seed, KEYS, universe)).collect()
        }
    };
    for l in &lists {
        push_read(&mut table, l, None);
    }
    let mut out = Vec::new();
    let started = std::time::Instant::now();
    let mut keys = 0usize;
    for r in 0..requests {
        let l = &lists[r % lists.len()];
        match op.as_str() {
            "push" => push_read(&mut table, l, None),
            "pull" => {
                out.clear();
                table.pull(l, &mut out);
            }
            _ => {
                out.clear();
                push_read(&mut table, l, Some(&mut out));
            }
        }
        keys += l.len();
    }
    let s = started.elapsed().as_secs_f64();
    println!(
        "{op} {keyset}: {:.1}M keys/s ({requests} requests, {threads} threads)",
        keys as f64 / s / 1e6
    );
}
