//! Table apply: what a server spends inside [`Store`] per push and pull.
//!
//! A server's share of a push or pull is, after decoding, one call to
//! `Store::push` or `Store::pull` with a sorted key list, so these numbers
//! bound the keys/s one server core can apply whatever the network does
//! (issue 5 asks for 100M keys/s end to end at 65,536 keys). Measured for
//! every built-in updater, since they differ in slot width (AdaGrad and FTRL
//! keep state beside each weight) and in arithmetic:
//!
//! - `push`: a push of `n` random sorted keys that a table of 2^20 keys
//!   already holds (the steady state of training), a different random
//!   subset of its keys each iteration, so that no iteration finds its rows
//!   left in cache by the one before;
//! - `pull`: a pull of such keys;
//! - `insert`: a push of `n` keys the table has never seen, into a table of
//!   2^20 keys (each iteration brings new keys, so the table grows during
//!   the run; see [`INSERT_SAMPLES`]);
//! - `insert_empty`: the first push into an empty table, growth included;
//! - `dense`: `push_dense` and `pull_dense` over a range of `n` consecutive
//!   keys (no key list), with the assign updater.
//!
//! Inputs come from a seeded splitmix64 sequence, so every run applies the
//! same keys and values.

mod support;

use divan::Bencher;
use divan::counter::ItemsCount;
use pserver_core::store::Store;
use pserver_core::updater::{AdaGrad, Add, Assign, Ftrl, Prox, Registry, Sgd};
use pserver_core::{Consistency, Init, Key, KeyRange, TableSpec, UpdaterSpec};
use std::cell::RefCell;
use std::collections::HashMap;
use support::Rng;

/// Keys a table holds before `push`, `pull` and `insert` are measured.
const TABLE_KEYS: usize = 1 << 20;

/// Request sizes (keys per push or pull).
const SIZES: [usize; 2] = [1024, 65536];

fn main() {
    // Divan's default of 100 samples, but at most 3 s per benchmark, so that
    // the suite stays short on a shared 2-core machine. Command-line flags
    // (`--sample-count`, `--max-time`, a name filter) override these.
    divan::Divan::default()
        .max_time(std::time::Duration::from_secs(3))
        .config_with_args()
        .main();
}

/// A built-in updater, named by its type so that divan prints the name.
trait BuiltIn {
    /// The spec that selects it, with typical hyper-parameters.
    fn spec() -> UpdaterSpec;
}

impl BuiltIn for Assign {
    fn spec() -> UpdaterSpec {
        UpdaterSpec::Assign
    }
}

impl BuiltIn for Add {
    fn spec() -> UpdaterSpec {
        UpdaterSpec::Add
    }
}

impl BuiltIn for Sgd {
    fn spec() -> UpdaterSpec {
        UpdaterSpec::Sgd { lr: 0.1 }
    }
}

impl BuiltIn for AdaGrad {
    fn spec() -> UpdaterSpec {
        UpdaterSpec::AdaGrad { lr: 0.1, eps: 1e-6 }
    }
}

impl BuiltIn for Ftrl {
    fn spec() -> UpdaterSpec {
        UpdaterSpec::Ftrl {
            alpha: 0.1,
            beta: 1.0,
            l1: 0.01,
            l2: 0.01,
        }
    }
}

impl BuiltIn for Prox {
    fn spec() -> UpdaterSpec {
        UpdaterSpec::Prox {
            eta: 0.5,
            l1: 0.01,
            l2: 0.01,
            eps: 1e-3,
        }
    }
}

/// An empty dim-1 table for `updater`, as a server builds it.
fn empty(updater: UpdaterSpec) -> Store {
    let spec = TableSpec {
        id: 1,
        name: "bench".into(),
        dim: 1,
        init: Init::Zero,
        updater,
        consistency: Consistency::Eventual,
        aggregate: false,
        job: None,
    };
    spec.validate().expect("benchmark spec is valid");
    let built = Registry::new()
        .build(&spec.updater)
        .expect("built-ins always build");
    Store::new(spec, built)
}

/// Random values for a push of `keys` keys into `store`.
fn push_values(rng: &mut Rng, store: &Store, keys: usize) -> Vec<f32> {
    let mut vals = rng.values(keys * store.push_width(), 0.5);
    if matches!(store.spec().updater, UpdaterSpec::Prox { .. }) {
        // Prox takes (gradient, curvature) pairs; curvature is not negative.
        for h in vals.iter_mut().skip(1).step_by(2) {
            *h = h.abs();
        }
    }
    vals
}

/// A table holding [`TABLE_KEYS`] random keys, and those keys, sorted.
fn preloaded(updater: UpdaterSpec) -> (Store, Vec<Key>) {
    let mut rng = Rng::new(0x7ab1e);
    let mut store = empty(updater);
    let keys = rng.sorted_keys(TABLE_KEYS);
    let vals = push_values(&mut rng, &store, keys.len());
    let applied = store.push(&keys, &vals, |_| true).expect("preload push");
    assert_eq!(applied, TABLE_KEYS);
    (store, keys)
}

thread_local! {
    /// Preloaded tables by updater name, built once and shared by `push`
    /// and `pull` (neither changes which keys are stored).
    static TABLES: RefCell<HashMap<String, (Store, Vec<Key>)>> = RefCell::default();
}

/// Runs `f` on the shared preloaded table of `U`.
fn with_table<U: BuiltIn, R>(f: impl FnOnce(&mut Store, &[Key]) -> R) -> R {
    TABLES.with(|tables| {
        let mut tables = tables.borrow_mut();
        let spec = U::spec();
        let (store, keys) = tables
            .entry(spec.name().to_string())
            .or_insert_with(|| preloaded(spec));
        f(store, keys)
    })
}

#[divan::bench(types = [Assign, Add, Sgd, AdaGrad, Ftrl, Prox], args = SIZES)]
fn push<U: BuiltIn>(bencher: Bencher, n: usize) {
    with_table::<U, _>(|store, table_keys| {
        let mut rng = Rng::new(n as u64);
        let vals = push_values(&mut rng, store, n);
        let first = rng.sorted_subset(table_keys, n);
        assert_eq!(store.push(&first, &vals, |_| true), Ok(n));
        bencher
            .counter(ItemsCount::new(n))
            .with_inputs(|| rng.sorted_subset(table_keys, n))
            .bench_local_refs(|keys| store.push(keys, divan::black_box(&vals), |_| true));
        assert_eq!(store.len(), TABLE_KEYS, "push added keys");
    });
}

#[divan::bench(types = [Assign, Add, Sgd, AdaGrad, Ftrl, Prox], args = SIZES)]
fn pull<U: BuiltIn>(bencher: Bencher, n: usize) {
    with_table::<U, _>(|store, table_keys| {
        let mut rng = Rng::new(n as u64);
        let store = &*store;
        let mut out = Vec::with_capacity(n);
        bencher
            .counter(ItemsCount::new(n))
            .with_inputs(|| rng.sorted_subset(table_keys, n))
            .bench_local_refs(|keys| {
                out.clear();
                store.pull(keys, &mut out);
                divan::black_box(out.len())
            });
    });
}

/// Samples of `insert`, fixed (the command line does not change it) because
/// each one adds `n` keys: with divan's tuning run the table grows from 2^20
/// keys by about `(INSERT_SAMPLES + 1) * n` (to about 1.6M at `n = 65536`),
/// so every sample inserts into a table of 1-2M keys.
const INSERT_SAMPLES: u32 = 8;

#[divan::bench(
    types = [Assign, Add, Sgd, AdaGrad, Ftrl, Prox],
    args = SIZES,
    sample_count = INSERT_SAMPLES,
)]
fn insert<U: BuiltIn>(bencher: Bencher, n: usize) {
    // A table of its own: this one grows, and must not change `push` and
    // `pull`'s tables.
    let (mut store, _) = preloaded(U::spec());
    let mut rng = Rng::new(0x1e5e7 ^ n as u64);
    let vals = push_values(&mut rng, &store, n);
    // Fresh random keys each iteration: over 2^64 possible keys they miss
    // the stored ones (a rare hit would only be an update).
    bencher
        .counter(ItemsCount::new(n))
        .with_inputs(move || rng.sorted_keys(n))
        .bench_local_refs(|keys| store.push(keys, &vals, |_| true));
    assert!(
        store.len() < 2 * TABLE_KEYS,
        "insert grew the table too far"
    );
}

#[divan::bench(types = [Assign, Add, Sgd, AdaGrad, Ftrl, Prox], args = SIZES)]
fn insert_empty<U: BuiltIn>(bencher: Bencher, n: usize) {
    let mut rng = Rng::new(0xe4e7 ^ n as u64);
    let keys = rng.sorted_keys(n);
    let vals = push_values(&mut rng, &empty(U::spec()), n);
    bencher
        .counter(ItemsCount::new(n))
        .with_inputs(|| empty(U::spec()))
        .bench_local_values(|mut store| {
            let applied = store.push(&keys, &vals, |_| true);
            // Returned so that freeing the table is not timed.
            (store, applied)
        });
}

/// `push_dense` and `pull_dense` over `n` consecutive keys that the table
/// already holds (assign updater).
mod dense {
    use super::*;

    fn table(n: usize) -> (Store, KeyRange, Vec<f32>) {
        let mut store = empty(UpdaterSpec::Assign);
        let range = KeyRange::new(1 << 40, (1 << 40) + n as u64).expect("range");
        let vals = Rng::new(0xde45e).values(n, 0.5);
        assert_eq!(store.push_dense(range, &vals, |_| true), Ok(n));
        (store, range, vals)
    }

    #[divan::bench(args = super::SIZES)]
    fn push(bencher: Bencher, n: usize) {
        let (mut store, range, vals) = table(n);
        bencher.counter(ItemsCount::new(n)).bench_local(|| {
            store.push_dense(divan::black_box(range), divan::black_box(&vals), |_| true)
        });
    }

    #[divan::bench(args = super::SIZES)]
    fn pull(bencher: Bencher, n: usize) {
        let (store, range, _) = table(n);
        let mut out = Vec::with_capacity(n);
        bencher.counter(ItemsCount::new(n)).bench_local(|| {
            out.clear();
            store.pull_dense(divan::black_box(range), &mut out);
            divan::black_box(out.len())
        });
    }
}
