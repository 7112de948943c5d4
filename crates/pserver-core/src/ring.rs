//! Consistent-hashing placement: servers on a ring over the key space.
//!
//! HELPER: implement. Contract:
//! - Each live server gets `vnodes` points on the ring at positions derived
//!   deterministically from `(server id, vnode index)` by a good 64-bit mixer
//!   (splitmix64 or similar), always `< KEY_END`.
//! - Keys are ring positions themselves (not re-hashed).
//! - A point owns the arc that ends at it: key `k` belongs to the first point
//!   strictly greater than `k` (wrapping past the end to the first point). So
//!   when a server leaves, its arcs pass to the next point clockwise, which is
//!   its first replica.
//! - Output partitions are sorted by `range.begin`, disjoint, non-empty and
//!   cover `KeyRange::ALL` exactly (the wrap-around arc is split into
//!   `[last_point, KEY_END)` and `[0, first_point)`); adjacent arcs with the same
//!   primary AND same replicas are merged.
//! - `replicas` of a partition: the next `k` distinct servers clockwise after the
//!   primary (fewer if there are not that many other servers).
//! - With no servers, returns an empty vec. Duplicate positions (collisions) are
//!   resolved deterministically (e.g. the lower server id wins).

use crate::map::{NodeId, Partition};

/// Places `servers` (ids of live servers, any order) on the ring with `vnodes`
/// points each and `k` replicas per range; see the module docs for the rules.
pub fn place(servers: &[NodeId], vnodes: u32, k: usize) -> Vec<Partition> {
    let _ = (servers, vnodes, k);
    todo!()
}
