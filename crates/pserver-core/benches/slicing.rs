//! Key slicing by range: cutting a request's sorted key list into one piece
//! per partition of the cluster map.
//!
//! Every push and pull a worker sends goes through `ClusterMap::slice` first
//! (the worker library in `pserver-node` calls it for each request and adds
//! nothing but bookkeeping around it), so its cost is paid once per request
//! on the worker's core before any byte leaves. The map is the one
//! `ring::place` builds for `S` servers with 16 virtual nodes each (the
//! command line's default), so a request over every key is cut into about
//! `16 * S` pieces. Two request shapes:
//!
//! - `all`: `n` random keys spread over the whole ring (a minibatch of
//!   hashed features);
//! - `block`: `n` random keys inside one sixteenth of the ring (a block of
//!   delayed block proximal gradient), sliced over that range only.
//!
//! Also `partition_of`, the lookup of one key's partition, which the
//! single-key path amounts to.

mod support;

use divan::Bencher;
use divan::counter::ItemsCount;
use pserver_core::map::NodeId;
use pserver_core::ring::place;
use pserver_core::{ClusterMap, KEY_END, KeyRange};
use support::Rng;

/// Virtual nodes per server (the command line's default).
const VNODES: u32 = 16;

fn main() {
    // Divan's default of 100 samples, but at most 3 s per benchmark, so that
    // the suite stays short on a shared 2-core machine. Command-line flags
    // (`--sample-count`, `--max-time`, a name filter) override these.
    divan::Divan::default()
        .max_time(std::time::Duration::from_secs(3))
        .config_with_args()
        .main();
}

/// The map of `servers` servers (ids 1..=servers), no replicas.
fn map(servers: u32) -> ClusterMap {
    let ids: Vec<NodeId> = (1..=servers).collect();
    let mut map = ClusterMap::empty(0, VNODES);
    map.partitions = place(&ids, VNODES, 0);
    map
}

#[divan::bench(consts = [1, 4, 16], args = [1, 1024, 65536])]
fn all<const SERVERS: u32>(bencher: Bencher, n: usize) {
    let map = map(SERVERS);
    let keys = Rng::new(0x511ce ^ n as u64).sorted_keys(n);
    assert_eq!(
        map.slice(KeyRange::ALL, &keys).last().map(|s| s.keys.end),
        Some(n)
    );
    bencher
        .counter(ItemsCount::new(n))
        .bench_local(|| map.slice(KeyRange::ALL, divan::black_box(&keys)));
}

#[divan::bench(consts = [1, 4, 16], args = [1, 1024, 65536])]
fn block<const SERVERS: u32>(bencher: Bencher, n: usize) {
    let map = map(SERVERS);
    let width = KEY_END / 16;
    let range = KeyRange::new(3 * width, 4 * width).expect("range");
    let keys: Vec<u64> = Rng::new(0xb10c ^ n as u64)
        .sorted_keys(n)
        .into_iter()
        .map(|k| range.begin + k % width)
        .collect::<std::collections::BTreeSet<u64>>()
        .into_iter()
        .collect();
    bencher
        .counter(ItemsCount::new(keys.len()))
        .bench_local(|| map.slice(range, divan::black_box(&keys)));
}

#[divan::bench(consts = [1, 4, 16])]
fn partition_of<const SERVERS: u32>(bencher: Bencher) {
    let map = map(SERVERS);
    let keys = Rng::new(0x0f).sorted_keys(1024);
    bencher
        .counter(ItemsCount::new(keys.len()))
        .bench_local(|| {
            divan::black_box(&keys)
                .iter()
                .filter_map(|&k| map.partition_of(k))
                .sum::<usize>()
        });
}
