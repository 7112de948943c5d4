//! Range vector clocks: for one table's partition on a server, the clocks
//! each node pushed, per key segment. Segments split only where a push covers
//! part of a segment and merge back when neighbours agree, so the state stays
//! O(nodes x ranges).
//!
//! The same clocks reject duplicate pushes, exactly: per node and segment a
//! clock keeps the highest clock recorded and which of the [`WINDOW`] clocks
//! below it were recorded too. A retried push finds its clock recorded and is
//! not applied again; a push that arrives after a later clock of the same
//! node (a pipelined slice refused during a map change and resent) finds its
//! clock unrecorded and is applied. Consistency reads the highest clock.

use crate::key::{Key, KeyRange};
use crate::map::NodeId;

/// How many clocks below a node's highest a range clock remembers one by
/// one. A push more than this far below cannot be told from a duplicate
/// ([`RangeClock::unknowable`]): the server refuses it rather than guess.
/// Workers keep fewer pushes than this in flight.
pub const WINDOW: u64 = 64;

/// One node's record over a segment: its highest clock and, as bits, which
/// of the [`WINDOW`] clocks just below it were recorded (bit `i` is clock
/// `max - 1 - i`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Rec {
    max: u64,
    below: u64,
}

impl Rec {
    /// Whether `clock` is recorded (0 always counts as recorded: pushes
    /// need a clock of 1 or more).
    fn has(&self, clock: u64) -> bool {
        if clock == 0 || clock == self.max {
            return true;
        }
        if clock > self.max {
            return false;
        }
        let back = self.max - 1 - clock;
        // Below the window: not known to be fresh, so not fresh.
        back >= WINDOW || self.below & (1 << back) != 0
    }

    /// Records `clock`; true when it was not recorded before.
    fn set(&mut self, clock: u64) -> bool {
        if self.has(clock) {
            return false;
        }
        if clock > self.max {
            let shift = clock - self.max;
            // The old maximum becomes bit `shift - 1`.
            let moved = if shift >= WINDOW {
                0
            } else {
                self.below << shift
            };
            let old_max = if self.max > 0 && shift <= WINDOW {
                1u64 << (shift - 1)
            } else {
                0
            };
            self.below = moved | old_max;
            self.max = clock;
        } else {
            self.below |= 1 << (self.max - 1 - clock);
        }
        true
    }

    /// Every recorded clock, highest first.
    fn clocks(&self) -> impl Iterator<Item = u64> + '_ {
        let max = self.max;
        std::iter::once(max).chain(
            (0..WINDOW)
                .filter(move |i| self.below & (1 << i) != 0)
                .map(move |i| max - 1 - i),
        )
    }
}

/// One run of keys `[begin, end)` that every node has pushed to alike.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Segment {
    begin: Key,
    end: Key,
    /// Records sorted by node, with no empty entries: an absent node reads
    /// as clock 0, and keeping one spelling per state lets neighbours
    /// compare equal with a plain `==` when deciding to merge.
    clocks: Vec<(NodeId, Rec)>,
}

impl Segment {
    fn rec_of(&self, node: NodeId) -> Rec {
        self.clocks
            .binary_search_by_key(&node, |c| c.0)
            .map_or(Rec::default(), |i| self.clocks[i].1)
    }

    fn clock_of(&self, node: NodeId) -> u64 {
        self.rec_of(node).max
    }

    /// Records `clock` for `node`; true when it was not recorded before.
    fn raise(&mut self, node: NodeId, clock: u64) -> bool {
        match self.clocks.binary_search_by_key(&node, |c| c.0) {
            Ok(i) => self.clocks[i].1.set(clock),
            // Only a clock above 0 is stored, so empty entries never appear.
            Err(i) if clock > 0 => {
                let mut rec = Rec::default();
                rec.set(clock);
                self.clocks.insert(i, (node, rec));
                true
            }
            Err(_) => false,
        }
    }

    fn range(&self) -> KeyRange {
        KeyRange {
            begin: self.begin,
            end: self.end,
        }
    }
}

/// The vector clock of one partition of one table.
///
/// Invariants: the segments are sorted, non-empty, contiguous and cover
/// exactly `[begin, end)` (no segment when that is empty), and no two
/// neighbours hold equal clocks. The default value covers no key.
#[derive(Clone, Debug, Default)]
pub struct RangeClock {
    begin: Key,
    end: Key,
    segments: Vec<Segment>,
}

impl RangeClock {
    /// A clock over `range` where every node is at clock 0.
    ///
    /// An inverted range (`begin > end`, possible since the fields are
    /// public) is treated as the empty range at `begin`.
    pub fn new(range: KeyRange) -> RangeClock {
        let end = range.end.max(range.begin);
        let segments = if range.begin < end {
            vec![Segment {
                begin: range.begin,
                end,
                clocks: Vec::new(),
            }]
        } else {
            Vec::new()
        };
        RangeClock {
            begin: range.begin,
            end,
            segments,
        }
    }

    /// The range this clock covers.
    pub fn range(&self) -> KeyRange {
        KeyRange {
            begin: self.begin,
            end: self.end,
        }
    }

    /// Records a push by `node` at `clock` over `r` (clipped to the clock's
    /// range). Returns the sub-ranges of `r` (sorted, disjoint, merged) where
    /// `clock` was not yet recorded for `node`: only keys in those are to be
    /// applied. Afterwards every segment of `r` has `clock` recorded, and its
    /// highest clock for `node` is `max(old, clock)`. An empty result means
    /// the whole push is a duplicate (or below the window: see
    /// [`RangeClock::unknowable`]).
    ///
    /// An `r` that is empty or misses the clock's range returns nothing and
    /// changes nothing.
    pub fn record(&mut self, node: NodeId, r: KeyRange, clock: u64) -> Vec<KeyRange> {
        let Some(r) = self.range().intersect(&r) else {
            return Vec::new();
        };
        // Cut at the push's bounds only; interior boundaries are already
        // where earlier pushes made them.
        let first = self.split_at(r.begin);
        let last = self.split_at(r.end);

        let mut fresh: Vec<KeyRange> = Vec::new();
        for seg in self.segments.get_mut(first..last).unwrap_or_default() {
            if !seg.raise(node, clock) {
                continue;
            }
            match fresh.last_mut() {
                Some(prev) if prev.end == seg.begin => prev.end = seg.end,
                _ => fresh.push(seg.range()),
            }
        }
        self.merge();
        fresh
    }

    /// The smallest clock recorded for any of `nodes` over any segment that
    /// overlaps `r`; a node never seen counts as 0. `u64::MAX` when `nodes`
    /// is empty.
    ///
    /// Also `u64::MAX` when `r` is empty or misses the clock's range: no
    /// segment overlaps, so nothing here holds the caller back.
    pub fn min_clock(&self, r: KeyRange, nodes: &[NodeId]) -> u64 {
        let Some(r) = self.range().intersect(&r) else {
            return u64::MAX;
        };
        let first = self.segments.partition_point(|s| s.end <= r.begin);
        self.segments
            .iter()
            .skip(first)
            .take_while(|s| s.begin < r.end)
            .flat_map(|s| nodes.iter().map(|&n| s.clock_of(n)))
            .min()
            .unwrap_or(u64::MAX)
    }

    /// What [`RangeClock::record`] would return, without recording: the
    /// sub-ranges of `r` where `clock` is not recorded for `node`. Lets a
    /// server check a push before the store accepts it, and record only then.
    pub fn fresh(&self, node: NodeId, r: KeyRange, clock: u64) -> Vec<KeyRange> {
        let Some(r) = self.range().intersect(&r) else {
            return Vec::new();
        };
        let first = self.segments.partition_point(|s| s.end <= r.begin);
        let mut fresh: Vec<KeyRange> = Vec::new();
        for seg in self.segments[first..]
            .iter()
            .take_while(|s| s.begin < r.end)
        {
            if seg.rec_of(node).has(clock) {
                continue;
            }
            let part = KeyRange {
                begin: seg.begin.max(r.begin),
                end: seg.end.min(r.end),
            };
            match fresh.last_mut() {
                Some(prev) if prev.end == part.begin => prev.end = part.end,
                _ => fresh.push(part),
            }
        }
        fresh
    }

    /// True when some segment of `r` has a clock of `node` more than
    /// [`WINDOW`] above `clock`: whether `clock` was recorded there is no
    /// longer known, so a push at it can be neither applied nor taken as
    /// done.
    pub fn unknowable(&self, node: NodeId, r: KeyRange, clock: u64) -> bool {
        let Some(r) = self.range().intersect(&r) else {
            return false;
        };
        let first = self.segments.partition_point(|s| s.end <= r.begin);
        self.segments[first..]
            .iter()
            .take_while(|s| s.begin < r.end)
            .any(|s| s.clock_of(node) > clock.saturating_add(WINDOW))
    }

    /// Every record over `r`, as `(node, range, clock)` triples that
    /// [`RangeClock::record`] replays, in any order, into the same state:
    /// each node's highest clock and every recorded clock of the window
    /// below it. What a copy of the range must carry so that its new holder
    /// refuses the same duplicates and applies the same late pushes.
    pub fn records_in(&self, r: KeyRange) -> Vec<(NodeId, KeyRange, u64)> {
        let Some(r) = self.range().intersect(&r) else {
            return Vec::new();
        };
        let first = self.segments.partition_point(|s| s.end <= r.begin);
        let mut out = Vec::new();
        for seg in self.segments[first..]
            .iter()
            .take_while(|s| s.begin < r.end)
        {
            let part = KeyRange {
                begin: seg.begin.max(r.begin),
                end: seg.end.min(r.end),
            };
            for (n, rec) in &seg.clocks {
                out.extend(rec.clocks().map(|c| (*n, part, c)));
            }
        }
        out
    }

    /// Forgets `node` everywhere (it left the cluster).
    pub fn forget(&mut self, node: NodeId) {
        self.forget_where(|n| n == node);
    }

    /// Forgets every node for which `gone` holds, everywhere (they left the
    /// cluster); returns how many records went. The caller must refuse
    /// their pushes from then on: with its records gone, a push of theirs
    /// would read as fresh.
    pub fn forget_where(&mut self, gone: impl Fn(NodeId) -> bool) -> usize {
        let mut dropped = 0;
        for seg in &mut self.segments {
            let before = seg.clocks.len();
            seg.clocks.retain(|(n, _)| !gone(*n));
            dropped += before - seg.clocks.len();
        }
        if dropped > 0 {
            // Segments that differed only in these nodes' clocks now agree.
            self.merge();
        }
        dropped
    }

    /// Number of segments (for tests and memory accounting).
    pub fn segments(&self) -> usize {
        self.segments.len()
    }

    /// Makes `at` a segment boundary and returns the index of the first
    /// segment starting at or after `at`. `at` must lie in `[begin, end]`.
    fn split_at(&mut self, at: Key) -> usize {
        let i = self.segments.partition_point(|s| s.end <= at);
        match self.segments.get_mut(i) {
            Some(seg) if seg.begin < at => {
                let right = Segment {
                    begin: at,
                    end: seg.end,
                    clocks: seg.clocks.clone(),
                };
                seg.end = at;
                self.segments.insert(i + 1, right);
                i + 1
            }
            _ => i,
        }
    }

    /// Joins neighbours whose clocks agree, restoring the no-equal-neighbours
    /// invariant in one linear pass.
    fn merge(&mut self) {
        self.segments.dedup_by(|next, prev| {
            let same = next.clocks == prev.clocks && prev.end == next.begin;
            if same {
                prev.end = next.end;
            }
            same
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kr(begin: Key, end: Key) -> KeyRange {
        KeyRange { begin, end }
    }

    #[test]
    fn fresh_predicts_record_and_records_replay() {
        let mut c = RangeClock::new(kr(0, 100));
        c.record(1, kr(10, 50), 3);
        c.record(2, kr(40, 90), 5);
        c.record(1, kr(20, 30), 4);
        for (node, r, clock) in [(1, kr(0, 100), 4), (2, kr(30, 60), 5), (1, kr(0, 10), 1)] {
            let want = c.clone().record(node, r, clock);
            assert_eq!(c.fresh(node, r, clock), want, "{node} {r:?} {clock}");
        }
        let mut copy = RangeClock::new(kr(0, 100));
        for (n, r, clock) in c.records_in(kr(0, 100)) {
            copy.record(n, r, clock);
        }
        assert_eq!(copy.segments, c.segments);
        let mut part = RangeClock::new(kr(0, 100));
        for (n, r, clock) in c.records_in(kr(25, 45)) {
            assert!(r.begin >= 25 && r.end <= 45);
            part.record(n, r, clock);
        }
        assert_eq!(part.min_clock(kr(25, 30), &[1]), 4);
        assert_eq!(part.min_clock(kr(40, 45), &[1, 2]), 3);
        assert_eq!(part.min_clock(kr(50, 60), &[2]), 0);
    }

    /// Checks the representation invariants documented on [`RangeClock`].
    fn check_invariants(c: &RangeClock) {
        let r = c.range();
        if r.is_empty() {
            assert!(c.segments.is_empty());
            return;
        }
        assert_eq!(c.segments.first().map(|s| s.begin), Some(r.begin));
        assert_eq!(c.segments.last().map(|s| s.end), Some(r.end));
        for s in &c.segments {
            assert!(s.begin < s.end);
            assert!(s.clocks.windows(2).all(|w| w[0].0 < w[1].0));
            assert!(s.clocks.iter().all(|c| c.1.max > 0));
        }
        for w in c.segments.windows(2) {
            assert_eq!(w[0].end, w[1].begin);
            assert_ne!(w[0].clocks, w[1].clocks, "unmerged at {}", w[1].begin);
        }
    }

    #[test]
    fn clock_new_is_one_zero_segment() {
        let c = RangeClock::new(kr(10, 20));
        assert_eq!(c.range(), kr(10, 20));
        assert_eq!(c.segments(), 1);
        assert_eq!(c.min_clock(kr(10, 20), &[1, 2]), 0);
        check_invariants(&c);
    }

    #[test]
    fn clock_empty_and_inverted_ranges_hold_nothing() {
        for r in [kr(5, 5), kr(9, 3)] {
            let mut c = RangeClock::new(r);
            assert_eq!(c.segments(), 0);
            assert!(c.range().is_empty());
            assert!(c.record(1, KeyRange::ALL, 4).is_empty());
            assert_eq!(c.min_clock(KeyRange::ALL, &[1]), u64::MAX);
            check_invariants(&c);
        }
        let mut d = RangeClock::default();
        assert!(d.record(1, KeyRange::ALL, 1).is_empty());
        d.forget(1);
        assert_eq!(d.segments(), 0);
    }

    #[test]
    fn clock_record_splits_only_at_push_bounds() {
        let mut c = RangeClock::new(kr(0, 100));
        assert_eq!(c.record(1, kr(20, 40), 1), vec![kr(20, 40)]);
        assert_eq!(c.segments(), 3);
        assert_eq!(c.min_clock(kr(20, 40), &[1]), 1);
        assert_eq!(c.min_clock(kr(0, 100), &[1]), 0);
        assert_eq!(c.min_clock(kr(39, 41), &[1]), 0);
        check_invariants(&c);
    }

    #[test]
    fn clock_record_clips_to_range() {
        let mut c = RangeClock::new(kr(10, 20));
        assert_eq!(c.record(1, kr(0, 15), 2), vec![kr(10, 15)]);
        assert_eq!(c.record(1, kr(15, 100), 2), vec![kr(15, 20)]);
        assert_eq!(c.segments(), 1, "neighbours merge back");
        assert!(c.record(1, kr(20, 30), 3).is_empty());
        assert!(c.record(1, kr(0, 10), 3).is_empty());
        assert!(c.record(1, kr(12, 12), 3).is_empty());
        assert!(c.record(1, kr(15, 12), 3).is_empty());
        assert_eq!(c.min_clock(kr(10, 20), &[1]), 2);
        check_invariants(&c);
    }

    #[test]
    fn clock_duplicate_push_is_rejected() {
        let mut c = RangeClock::new(kr(0, 100));
        assert_eq!(c.record(7, kr(0, 100), 3), vec![kr(0, 100)]);
        assert!(c.record(7, kr(0, 100), 3).is_empty(), "retry");
        assert!(c.record(7, kr(10, 20), 0).is_empty(), "zero");
        assert_eq!(c.segments(), 1);
        assert_eq!(c.min_clock(kr(0, 100), &[7]), 3);
    }

    #[test]
    fn clock_late_push_below_the_highest_is_applied_once() {
        // A pipelined worker's clock 2 refused during a map change and
        // resent after its clock 3 arrived: fresh once, then a duplicate.
        let mut c = RangeClock::new(kr(0, 100));
        assert_eq!(c.record(7, kr(0, 100), 3), vec![kr(0, 100)]);
        assert_eq!(c.fresh(7, kr(10, 20), 2), vec![kr(10, 20)]);
        assert_eq!(c.record(7, kr(10, 20), 2), vec![kr(10, 20)], "late");
        assert!(c.record(7, kr(10, 20), 2).is_empty(), "late, again");
        assert_eq!(c.record(7, kr(0, 100), 2), vec![kr(0, 10), kr(20, 100)]);
        assert_eq!(c.segments(), 1, "the same records everywhere merge");
        assert_eq!(
            c.min_clock(kr(0, 100), &[7]),
            3,
            "consistency reads the highest"
        );
        // The window's edge: 64 below the highest is known, 65 is not.
        c.record(7, kr(0, 100), 3 + WINDOW);
        assert!(!c.unknowable(7, kr(0, 100), 3));
        assert!(c.record(7, kr(0, 100), 3).is_empty(), "still remembered");
        assert_eq!(c.record(7, kr(0, 100), 1 + WINDOW), vec![kr(0, 100)]);
        c.record(7, kr(50, 100), 4 + WINDOW);
        assert!(c.unknowable(7, kr(0, 100), 3));
        assert!(!c.unknowable(7, kr(0, 50), 3));
        assert!(c.fresh(7, kr(50, 100), 3).is_empty(), "below the window");
        // A jump past the whole window forgets the old bits.
        c.record(7, kr(0, 100), 1000);
        assert!(c.unknowable(7, kr(0, 100), 900));
        assert_eq!(c.record(7, kr(0, 100), 999), vec![kr(0, 100)]);
    }

    #[test]
    fn clock_partial_duplicate_returns_only_fresh_part() {
        let mut c = RangeClock::new(kr(0, 100));
        c.record(1, kr(30, 60), 5);
        // Fresh on both sides of the already-recorded middle.
        assert_eq!(c.record(1, kr(0, 100), 5), vec![kr(0, 30), kr(60, 100)]);
        assert_eq!(c.segments(), 1);
        // Adjacent fresh segments come back merged; a clock below the
        // highest that was never recorded is fresh there too.
        c.record(1, kr(30, 60), 7);
        assert_eq!(c.record(1, kr(0, 100), 6), vec![kr(0, 100)]);
        c.record(1, kr(30, 60), 9);
        assert_eq!(c.record(1, kr(0, 100), 7), vec![kr(0, 30), kr(60, 100)]);
        assert_eq!(c.record(1, kr(0, 100), 8), vec![kr(0, 100)]);
        check_invariants(&c);
    }

    #[test]
    fn clock_min_over_nodes_and_unknown_nodes() {
        let mut c = RangeClock::new(kr(0, 100));
        c.record(1, kr(0, 100), 4);
        c.record(2, kr(0, 50), 2);
        c.record(2, kr(50, 100), 6);
        assert_eq!(c.min_clock(kr(0, 100), &[1, 2]), 2);
        assert_eq!(c.min_clock(kr(50, 100), &[1, 2]), 4);
        assert_eq!(c.min_clock(kr(50, 100), &[2]), 6);
        assert_eq!(c.min_clock(kr(0, 100), &[1, 2, 3]), 0, "3 never pushed");
        assert_eq!(c.min_clock(kr(0, 100), &[]), u64::MAX);
        assert_eq!(c.min_clock(kr(100, 200), &[1]), u64::MAX);
        assert_eq!(c.min_clock(kr(40, 40), &[1]), u64::MAX);
    }

    #[test]
    fn clock_forget_merges_segments() {
        let mut c = RangeClock::new(kr(0, 100));
        c.record(1, kr(0, 100), 1);
        c.record(2, kr(0, 10), 1);
        c.record(2, kr(20, 30), 1);
        assert_eq!(c.segments(), 4);
        c.forget(2);
        assert_eq!(c.segments(), 1);
        assert_eq!(c.min_clock(kr(0, 100), &[1, 2]), 0);
        assert_eq!(c.min_clock(kr(0, 100), &[1]), 1);
        c.forget(9);
        check_invariants(&c);
    }

    #[test]
    fn clock_forget_where_drops_many_nodes_at_once() {
        let mut c = RangeClock::new(kr(0, 100));
        c.record(1, kr(0, 100), 3);
        for n in 10..40 {
            c.record(n, kr(n as Key, n as Key + 5), 1);
        }
        assert!(c.segments() > 30);
        assert!(c.forget_where(|n| n >= 10) >= 30);
        assert_eq!(c.segments(), 1);
        assert_eq!(c.records_in(kr(0, 100)), [(1, kr(0, 100), 3)]);
        assert_eq!(c.forget_where(|n| n >= 10), 0);
        check_invariants(&c);
    }

    #[test]
    fn clock_full_key_space() {
        let mut c = RangeClock::new(KeyRange::ALL);
        assert_eq!(c.record(1, kr(0, u64::MAX), u64::MAX), vec![KeyRange::ALL]);
        assert_eq!(c.record(2, kr(u64::MAX - 1, u64::MAX), 1).len(), 1);
        assert_eq!(c.min_clock(KeyRange::ALL, &[1]), u64::MAX);
        assert_eq!(c.min_clock(KeyRange::ALL, &[1, 2]), 0);
        check_invariants(&c);
    }

    /// Key space of the model: small enough to track every key.
    const SPACE: Key = 64;

    /// Every recorded clock per node per key: the obviously-right
    /// reference. A clock is fresh when it is above 0, not recorded, and not
    /// more than [`WINDOW`] below the highest recorded.
    struct Model {
        range: KeyRange,
        clocks: Vec<[std::collections::BTreeSet<u64>; 3]>,
    }

    impl Model {
        fn fresh_at(&self, k: Key, node: usize, clock: u64) -> bool {
            let set = &self.clocks[k as usize][node];
            let max = set.last().copied().unwrap_or(0);
            clock > 0 && !set.contains(&clock) && clock.saturating_add(WINDOW) >= max
        }

        fn record(&mut self, node: usize, r: KeyRange, clock: u64) -> Vec<KeyRange> {
            let mut fresh: Vec<KeyRange> = Vec::new();
            let (lo, hi) = (r.begin.max(self.range.begin), r.end.min(self.range.end));
            for k in lo..hi {
                if self.fresh_at(k, node, clock) {
                    self.clocks[k as usize][node].insert(clock);
                    match fresh.last_mut() {
                        Some(prev) if prev.end == k => prev.end = k + 1,
                        _ => fresh.push(kr(k, k + 1)),
                    }
                }
            }
            fresh
        }

        /// What `record` would return, without recording.
        fn clone_record(&self, node: usize, r: KeyRange, clock: u64) -> Vec<KeyRange> {
            let mut copy = Model {
                range: self.range,
                clocks: self.clocks.clone(),
            };
            copy.record(node, r, clock)
        }

        fn unknowable(&self, node: usize, r: KeyRange, clock: u64) -> bool {
            let (lo, hi) = (r.begin.max(self.range.begin), r.end.min(self.range.end));
            (lo..hi).any(|k| {
                let max = self.clocks[k as usize][node].last().copied().unwrap_or(0);
                max > clock.saturating_add(WINDOW)
            })
        }

        fn min_clock(&self, r: KeyRange, nodes: &[usize]) -> u64 {
            let (lo, hi) = (r.begin.max(self.range.begin), r.end.min(self.range.end));
            (lo..hi)
                .flat_map(|k| {
                    nodes
                        .iter()
                        .map(move |&n| self.clocks[k as usize][n].last().copied().unwrap_or(0))
                })
                .min()
                .unwrap_or(u64::MAX)
        }

        fn forget(&mut self, node: usize) {
            for c in &mut self.clocks {
                c[node].clear();
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Record(usize, Key, Key, u64),
        Forget(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            12 => (0usize..3, 0..=SPACE + 4, 0..=SPACE + 4, 0u64..6)
                .prop_map(|(n, a, b, c)| Op::Record(n, a, b, c)),
            // Far apart, to cross the window's edge both ways.
            3 => (0usize..3, 0..=SPACE + 4, 0..=SPACE + 4, 0u64..3 * WINDOW)
                .prop_map(|(n, a, b, c)| Op::Record(n, a, b, c)),
            1 => (0usize..3).prop_map(Op::Forget),
        ]
    }

    /// Node ids in the clock differ from model indexes on purpose, so the
    /// sorted-by-id storage is exercised with non-dense ids.
    const IDS: [NodeId; 3] = [40, 7, 19];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn clock_prop_matches_per_key_model(
            bounds in (0..SPACE, 0..=SPACE),
            ops in prop::collection::vec(op(), 0..40),
            queries in prop::collection::vec((0..=SPACE + 4, 0..=SPACE + 4, 0u8..8), 4),
        ) {
            let range = kr(bounds.0.min(bounds.1), bounds.0.max(bounds.1));
            let mut clock = RangeClock::new(range);
            let mut model = Model { range, clocks: vec![Default::default(); SPACE as usize] };
            let mut records = 0usize;
            for op in ops {
                match op {
                    Op::Record(n, a, b, c) => {
                        // Inverted ranges included: they must be no-ops.
                        let r = kr(a, b);
                        if a <= b {
                            prop_assert_eq!(clock.unknowable(IDS[n], r, c), model.unknowable(n, r, c));
                            prop_assert_eq!(clock.fresh(IDS[n], r, c), model.clone_record(n, r, c));
                        }
                        let got = clock.record(IDS[n], r, c);
                        let want = if a <= b { model.record(n, r, c) } else { Vec::new() };
                        prop_assert_eq!(got, want);
                        records += 1;
                    }
                    Op::Forget(n) => {
                        clock.forget(IDS[n]);
                        model.forget(n);
                    }
                }
                check_invariants(&clock);
                prop_assert!(clock.segments() <= 2 * records + 1);
                let mut copy = RangeClock::new(range);
                for (n, r, c) in clock.records_in(KeyRange::ALL) {
                    copy.record(n, r, c);
                }
                prop_assert_eq!(&copy.segments, &clock.segments, "records_in replays");
                for &(a, b, mask) in &queries {
                    let nodes: Vec<usize> = (0..3).filter(|i| mask & (1 << i) != 0).collect();
                    let ids: Vec<NodeId> = nodes.iter().map(|&i| IDS[i]).collect();
                    let r = kr(a.min(b), a.max(b));
                    let want = if nodes.is_empty() { u64::MAX } else { model.min_clock(r, &nodes) };
                    prop_assert_eq!(clock.min_clock(r, &ids), want, "range {} nodes {:?}", r, ids);
                }
            }
        }
    }
}
