//! The server-side filters and the range clock, all paid on every request:
//!
//! - key caching (`keycache`): `key_list_hash` is computed by the worker for
//!   each list it sends and by the server for each list it keeps;
//!   `KeyCache::insert` runs when a worker asks the server to keep a list,
//!   `KeyCache::get` whenever a request names a kept list by its hash. The
//!   hash is linear in the list; the cache's bookkeeping should not be.
//! - the range clock (`clock`): a server calls `RangeClock::fresh` and then
//!   `RangeClock::record` for every push slice (duplicate rejection and
//!   consistency), and `RangeClock::min_clock` to decide whether a waiting
//!   pull may be answered. Their cost grows with the number of segments the
//!   clock holds, which is about the number of ranges workers push
//!   separately (partitions, or blocks of block proximal gradient), so the
//!   clock benchmarks are parameterized by segment count.
//!
//! The KKT filter of delayed block proximal gradient is not here: it is
//! `pserver_apps::dbpg::kkt_skip`, a worker-side predicate in the
//! application crate, outside the core and wire crates measured by this
//! suite.

mod support;

use divan::Bencher;
use divan::counter::ItemsCount;
use pserver_core::clock::RangeClock;
use pserver_core::keycache::{KeyCache, key_list_hash};
use pserver_core::map::NodeId;
use pserver_core::{KEY_END, KeyRange};
use support::Rng;

fn main() {
    // Divan's default of 100 samples, but at most 3 s per benchmark, so that
    // the suite stays short on a shared 2-core machine. Command-line flags
    // (`--sample-count`, `--max-time`, a name filter) override these.
    divan::Divan::default()
        .max_time(std::time::Duration::from_secs(3))
        .config_with_args()
        .main();
}

/// Key lists of these lengths.
const LIST_KEYS: [usize; 3] = [16, 1024, 65536];

/// Lists the cache holds besides the one measured (other senders and
/// tables), so that lookups walk a realistically sized cache.
const OTHER_LISTS: u32 = 64;

mod keycache {
    use super::*;

    #[divan::bench(args = LIST_KEYS)]
    fn hash(bencher: Bencher, n: usize) {
        let keys = Rng::new(0x4a54 ^ n as u64).sorted_keys(n);
        bencher
            .counter(ItemsCount::new(n))
            .bench_local(|| key_list_hash(divan::black_box(&keys)));
    }

    /// A cache with room for everything, holding [`OTHER_LISTS`] lists of
    /// `n` keys from other senders.
    fn cache(n: usize) -> KeyCache {
        let mut rng = Rng::new(0xcac4e ^ n as u64);
        let mut cache = KeyCache::new((OTHER_LISTS as usize + 1) * n);
        for sender in 0..OTHER_LISTS {
            let list = rng.sorted_keys(n);
            assert!(cache.insert(100 + sender, 1, &list).is_some());
        }
        cache
    }

    /// Keeping a list again (the same sender resends it): hashing, copying
    /// and replacing the old entry.
    #[divan::bench(args = LIST_KEYS)]
    fn insert(bencher: Bencher, n: usize) {
        let mut cache = cache(n);
        let keys = Rng::new(n as u64).sorted_keys(n);
        bencher
            .counter(ItemsCount::new(n))
            .bench_local(|| cache.insert(7, 1, divan::black_box(&keys)));
    }

    /// Resolving a kept list from `[hash, count]`: a hit, counted in keys
    /// the request did not have to carry.
    #[divan::bench(args = LIST_KEYS)]
    fn get(bencher: Bencher, n: usize) {
        let mut cache = cache(n);
        let keys = Rng::new(n as u64).sorted_keys(n);
        let hash = cache.insert(7, 1, &keys).expect("kept");
        bencher
            .counter(ItemsCount::new(n))
            .bench_local(|| cache.get(7, 1, divan::black_box(hash), n as u64));
    }
}

mod clock {
    use super::*;

    /// Segment counts of the clock.
    const SEGMENTS: [u64; 4] = [1, 16, 256, 4096];

    /// Workers pushing to the table.
    const WORKERS: NodeId = 4;

    /// The `i`-th of `n` equal blocks of the key space.
    fn block(i: u64, n: u64) -> KeyRange {
        let width = KEY_END / n;
        let end = if i + 1 == n { KEY_END } else { (i + 1) * width };
        KeyRange::new(i * width, end).expect("block")
    }

    /// A clock over every key where each of [`WORKERS`] workers pushed each
    /// of `n` blocks at clocks that differ between neighbours, so the clock
    /// holds `n` segments; and the highest clock recorded.
    fn clock(n: u64) -> (RangeClock, u64) {
        let mut c = RangeClock::new(KeyRange::ALL);
        let mut rng = Rng::new(0xc10c ^ n);
        let mut top = 0;
        for i in 0..n {
            for w in 1..=WORKERS {
                let t = 1 + rng.below(8);
                top = top.max(t);
                c.record(w, block(i, n), t);
            }
        }
        assert!(c.segments() as u64 >= n * 9 / 10, "too few segments");
        (c, top)
    }

    /// Recording one worker's push to one block, at a clock above every
    /// recorded one (a fresh push, as in the steady state); blocks in turn.
    #[divan::bench(args = SEGMENTS)]
    fn record(bencher: Bencher, n: u64) {
        let (mut c, top) = clock(n);
        let mut t = top;
        bencher.counter(ItemsCount::new(1u32)).bench_local(|| {
            t += 1;
            let r = block(t % n, n);
            c.record(1, divan::black_box(r), t)
        });
        assert!(c.segments() as u64 <= n, "no segment beyond one per block");
    }

    /// The check before a push is applied: which parts of one block are
    /// fresh for a worker at a new clock.
    #[divan::bench(args = SEGMENTS)]
    fn fresh(bencher: Bencher, n: u64) {
        let (c, top) = clock(n);
        let mut i = 0;
        bencher.counter(ItemsCount::new(1u32)).bench_local(|| {
            i += 1;
            c.fresh(2, divan::black_box(block(i % n, n)), top + 1)
        });
    }

    /// A pull over every key waiting for all workers: the smallest clock
    /// over every segment, counted in segments visited.
    #[divan::bench(args = SEGMENTS)]
    fn min_clock(bencher: Bencher, n: u64) {
        let (c, _) = clock(n);
        let workers: Vec<NodeId> = (1..=WORKERS).collect();
        bencher
            .counter(ItemsCount::new(n))
            .bench_local(|| c.min_clock(divan::black_box(KeyRange::ALL), &workers));
    }
}
