//! Range vector clocks: for one table's partition on a server, the last clock
//! each node pushed, per key segment. Segments split only where a push covers
//! part of a segment and merge back when neighbours agree, so the state stays
//! O(nodes x ranges).
//!
//! HELPER: implement. The same clocks reject duplicate pushes (a retried push
//! carries the same clock, so it finds its clock already recorded).

use crate::key::KeyRange;
use crate::map::NodeId;

/// The vector clock of one partition of one table.
#[derive(Clone, Debug, Default)]
pub struct RangeClock {
    // HELPER: segments
}

impl RangeClock {
    /// A clock over `range` where every node is at clock 0.
    pub fn new(range: KeyRange) -> RangeClock {
        let _ = range;
        todo!()
    }

    /// The range this clock covers.
    pub fn range(&self) -> KeyRange {
        todo!()
    }

    /// Records a push by `node` at `clock` over `r` (clipped to the clock's
    /// range). Returns the sub-ranges of `r` (sorted, disjoint, merged) whose
    /// recorded clock for `node` was below `clock`: only keys in those are to
    /// be applied. Afterwards every segment of `r` records `max(old, clock)`
    /// for `node`. An empty result means the whole push is a duplicate.
    pub fn record(&mut self, node: NodeId, r: KeyRange, clock: u64) -> Vec<KeyRange> {
        let _ = (node, r, clock);
        todo!()
    }

    /// The smallest clock recorded for any of `nodes` over any segment that
    /// overlaps `r`; a node never seen counts as 0. `u64::MAX` when `nodes`
    /// is empty.
    pub fn min_clock(&self, r: KeyRange, nodes: &[NodeId]) -> u64 {
        let _ = (r, nodes);
        todo!()
    }

    /// Forgets `node` everywhere (it left the cluster).
    pub fn forget(&mut self, node: NodeId) {
        let _ = node;
        todo!()
    }

    /// Number of segments (for tests and memory accounting).
    pub fn segments(&self) -> usize {
        todo!()
    }
}
