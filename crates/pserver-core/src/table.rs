//! One table on one server: its store, its range clock and the sums of an
//! aggregating table not yet applied, as one value with one push path.
//!
//! Everything a server decides about a table's data lives here, so the
//! primary and its replicas run the same code: [`Table::push`] checks a push
//! (clock, width, finiteness, key order), finds which of its ranges are
//! fresh in the range clock, and applies it or sums it into its clock's
//! aggregate; [`Table::flush`] applies complete aggregates in clock order;
//! the `replica_*` methods take the changes a chain carries. Nothing here
//! knows about connections, acknowledgements or time: the server keeps
//! those beside the table.

use crate::clock::{RangeClock, WINDOW};
use crate::key::{Key, KeyRange};
use crate::map::NodeId;
use crate::spec::TableSpec;
use crate::store::{Store, StoreError, Threads};
use crate::updater::Updater;
use rustc_hash::FxHashMap;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Why a table refused a change. Nothing was changed when one is returned.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TableError {
    /// The values or keys failed the store's checks.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Pushes need a clock of 1 or more (0 means "no clock" in pulls).
    #[error("table {table:?}: a push needs a clock of 1 or more")]
    NoClock {
        /// Table name.
        table: String,
    },
    /// The whole push was already applied at this clock and is not a retry.
    #[error(
        "table {table:?}: node {node} already pushed clock {clock} over {range} (a push records \
         its clock over its whole range, keys or not): nothing was applied"
    )]
    Duplicate {
        /// Table name.
        table: String,
        /// The sender.
        node: NodeId,
        /// The push's clock.
        clock: u64,
        /// The push's range.
        range: KeyRange,
    },
    /// The clock is more than the range clock's window below the sender's
    /// latest there: whether it was applied is no longer known.
    #[error(
        "table {table:?}: clock {clock} of node {node} is more than {WINDOW} below its latest \
         over {range}, below the window of clocks this server remembers for it, so it cannot \
         tell whether it was applied: nothing was done"
    )]
    TooOld {
        /// Table name.
        table: String,
        /// The sender.
        node: NodeId,
        /// The push's clock.
        clock: u64,
        /// The push's range.
        range: KeyRange,
    },
    /// Summing the push into its clock's aggregate would overflow to an
    /// infinite value, which the store would refuse once the sum is whole.
    #[error(
        "table {table:?}: summing node {node}'s push into clock {clock} overflows at key {key}"
    )]
    Overflow {
        /// Table name.
        table: String,
        /// The sender.
        node: NodeId,
        /// The push's clock.
        clock: u64,
        /// The first key whose sum is no longer finite.
        key: Key,
    },
}

/// The keys of a push.
#[derive(Clone, Copy, Debug)]
pub enum Keys<'a> {
    /// Sorted, unique keys, each with `push_width` values.
    List(&'a [Key]),
    /// Every key of the push's range, in order (a dense push).
    Dense,
}

/// A push as the table sees it.
#[derive(Clone, Copy, Debug)]
pub struct Push<'a> {
    /// Who pushed.
    pub sender: NodeId,
    /// The slice's range: its clock is recorded over all of it, keys or not.
    pub range: KeyRange,
    /// The sender's clock (1 or more).
    pub clock: u64,
    /// A resend of a push that may have been applied: finding it recorded
    /// is success rather than [`TableError::Duplicate`].
    pub retry: bool,
    /// The keys.
    pub keys: Keys<'a>,
    /// `push_width` floats per key.
    pub vals: &'a [f32],
}

impl Push<'_> {
    /// Keys in the push.
    pub fn len(&self) -> u64 {
        match self.keys {
            Keys::List(k) => k.len() as u64,
            Keys::Dense => self.range.len(),
        }
    }

    /// True when the push has no key (it still advances the clock).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn key(&self, i: usize) -> Key {
        match self.keys {
            Keys::List(k) => k[i],
            Keys::Dense => self.range.begin + i as Key,
        }
    }
}

/// How [`Table::push`] treats a push.
#[derive(Clone, Copy, Debug)]
pub struct PushCtx<'a> {
    /// Sum it into its clock's aggregate (the table aggregates and the
    /// sender is a live worker) rather than applying it at once.
    pub aggregate: bool,
    /// The live workers: a clock's sum is complete once all of them have
    /// pushed it over every range it covers.
    pub workers: &'a [NodeId],
    /// Which ranges decide completeness ([`Table::flush`]).
    pub gate: Option<&'a [KeyRange]>,
}

/// What a push did.
#[derive(Debug, Default)]
pub struct Pushed {
    /// Keys applied (or summed).
    pub applied: u64,
    /// Keys skipped as already applied at this clock.
    pub duplicate: u64,
    /// Sums this push completed and the table applied.
    pub flushed: Vec<Applied>,
}

/// A clock's sum that [`Table::flush`] just applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// The clock.
    pub clock: u64,
    /// The keys it changed, sorted.
    pub keys: Vec<Key>,
    /// The ranges pushed at that clock.
    pub ranges: Vec<KeyRange>,
    /// Why the store refused the sum (then nothing was applied, and the
    /// pushes it held must not be acknowledged).
    pub refused: Option<StoreError>,
}

/// The sum of one clock's pushes to an aggregating table on this server.
#[derive(Debug, Clone, Default)]
pub struct Aggregate {
    /// The ranges pushed (each slice's range, once): the clock is complete
    /// when every live worker has pushed all of them. Not a hull: a table's
    /// partitions on one server are not contiguous.
    ranges: Vec<KeyRange>,
    /// Key -> position in `keys`.
    index: FxHashMap<Key, usize>,
    keys: Vec<Key>,
    /// `width` floats per key, in `keys` order.
    sums: Vec<f32>,
    width: usize,
}

impl Aggregate {
    fn new(width: usize) -> Aggregate {
        Aggregate {
            width,
            ..Aggregate::default()
        }
    }

    /// The ranges pushed at this clock.
    pub fn ranges(&self) -> &[KeyRange] {
        &self.ranges
    }

    /// The keys summed so far in `range`, sorted, with their sums.
    pub fn sums_in(&self, range: KeyRange) -> (Vec<Key>, Vec<f32>) {
        let mut held: Vec<(Key, usize)> = self
            .keys
            .iter()
            .enumerate()
            .filter(|(_, k)| range.contains(**k))
            .map(|(i, &k)| (k, i))
            .collect();
        held.sort_unstable();
        let w = self.width;
        let mut sums = Vec::with_capacity(held.len() * w);
        for &(_, i) in &held {
            sums.extend_from_slice(&self.sums[i * w..(i + 1) * w]);
        }
        (held.into_iter().map(|(k, _)| k).collect(), sums)
    }

    fn add_range(&mut self, range: KeyRange) {
        if !self.ranges.contains(&range) {
            self.ranges.push(range);
        }
    }

    fn slot(&mut self, key: Key) -> &mut [f32] {
        let w = self.width;
        let i = *self.index.entry(key).or_insert_with(|| {
            self.keys.push(key);
            self.sums.resize(self.sums.len() + w, 0.0);
            self.keys.len() - 1
        });
        &mut self.sums[i * w..(i + 1) * w]
    }

    /// Whether adding `vals` to `key`'s sum would make it infinite.
    fn overflows(&self, key: Key, vals: &[f32]) -> bool {
        let w = self.width;
        match self.index.get(&key) {
            Some(&i) => self.sums[i * w..(i + 1) * w]
                .iter()
                .zip(vals)
                .any(|(s, v)| !(s + v).is_finite()),
            None => false,
        }
    }

    /// Forgets the sums of keys in `range`.
    fn drop_keys_in(&mut self, range: KeyRange) {
        if !self.keys.iter().any(|k| range.contains(*k)) {
            return;
        }
        let w = self.width;
        let old_keys = std::mem::take(&mut self.keys);
        let old_sums = std::mem::take(&mut self.sums);
        self.index.clear();
        for (i, k) in old_keys.into_iter().enumerate() {
            if !range.contains(k) {
                self.index.insert(k, self.keys.len());
                self.keys.push(k);
                self.sums.extend_from_slice(&old_sums[i * w..(i + 1) * w]);
            }
        }
    }

    /// Keys sorted, with their sums.
    fn sorted(&self) -> (Vec<Key>, Vec<f32>) {
        self.sums_in(KeyRange::ALL)
    }
}

/// One table on one server. See the module docs.
#[derive(Debug)]
pub struct Table {
    store: Store,
    /// Records of the pushes this server applied, as primary or as replica,
    /// so that a replica promoted to primary refuses the same duplicates
    /// its primary would have.
    clock: RangeClock,
    /// Sums of an aggregating table not yet applied: clock -> sum.
    pending: BTreeMap<u64, Aggregate>,
}

impl Table {
    /// An empty table for `spec` with `updater`; large requests may use
    /// `threads` ([`Store::with_threads`]).
    pub fn new(spec: TableSpec, updater: Arc<dyn Updater>, threads: &Threads) -> Table {
        Table {
            store: Store::new(spec, updater).with_threads(threads),
            clock: RangeClock::new(KeyRange::ALL),
            pending: BTreeMap::new(),
        }
    }

    /// The table's spec.
    pub fn spec(&self) -> &TableSpec {
        self.store.spec()
    }

    /// The store (reads: pulls, scans, copies, checkpoints).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The range clock.
    pub fn clock(&self) -> &RangeClock {
        &self.clock
    }

    /// Unapplied sums by clock.
    pub fn pending(&self) -> &BTreeMap<u64, Aggregate> {
        &self.pending
    }

    /// True when a sum is waiting for `clock`.
    pub fn has_pending(&self, clock: u64) -> bool {
        self.pending.contains_key(&clock)
    }

    /// True when the sum waiting for `clock` covers some of `range`.
    pub fn has_pending_over(&self, clock: u64, range: KeyRange) -> bool {
        self.pending
            .get(&clock)
            .is_some_and(|agg| agg.ranges.iter().any(|r| r.intersect(&range).is_some()))
    }

    /// Checks, deduplicates and applies a push (or sums it, with
    /// `ctx.aggregate`), then records its clock and applies the sums it
    /// completed. A refused push changes nothing, its clock included.
    pub fn push(&mut self, p: &Push<'_>, ctx: PushCtx<'_>) -> Result<Pushed, TableError> {
        self.push_into(p, ctx, None)
    }

    /// [`Table::push`], then the weights of its keys (or of its dense
    /// range) after it appended to `out`, as [`Table::pull`] would give
    /// them: a push-pull's two halves. A push the table applies itself
    /// reads each key in the same probe as its update (one pass over the
    /// table, not two); a summed one is read after it. A refused push
    /// appends nothing.
    pub fn push_pull(
        &mut self,
        p: &Push<'_>,
        ctx: PushCtx<'_>,
        out: &mut Vec<f32>,
    ) -> Result<Pushed, TableError> {
        self.push_into(p, ctx, Some(out))
    }

    /// [`Table::push`] reading back into `out` when given.
    fn push_into(
        &mut self,
        p: &Push<'_>,
        ctx: PushCtx<'_>,
        mut out: Option<&mut Vec<f32>>,
    ) -> Result<Pushed, TableError> {
        let name = self.store.spec().name.clone();
        let table = || name.clone();
        if p.clock == 0 {
            return Err(TableError::NoClock { table: table() });
        }
        match p.keys {
            Keys::List(keys) => self.store.check_push(keys, p.vals)?,
            Keys::Dense => self.store.check_push_dense(p.range, p.vals)?,
        }
        if self.clock.unknowable(p.sender, p.range, p.clock) {
            return Err(TableError::TooOld {
                table: table(),
                node: p.sender,
                clock: p.clock,
                range: p.range,
            });
        }
        let total = p.len();
        let fresh = self.clock.fresh(p.sender, p.range, p.clock);
        if fresh.is_empty() {
            if p.retry {
                if let Some(out) = out {
                    self.read(p, out);
                }
                return Ok(Pushed {
                    duplicate: total,
                    ..Pushed::default()
                });
            }
            return Err(TableError::Duplicate {
                table: table(),
                node: p.sender,
                clock: p.clock,
                range: p.range,
            });
        }
        let whole = fresh.len() == 1 && fresh[0] == p.range;
        let in_fresh = |k: Key| whole || fresh.iter().any(|r| r.contains(k));
        let applied = if ctx.aggregate {
            self.sum(p, &in_fresh)?
        } else if whole {
            // The common case, with a test the store's loop compiles away.
            self.apply_checked(p, |_| true, out.take())
        } else {
            self.apply_checked(p, in_fresh, out.take())
        };
        self.clock.record(p.sender, p.range, p.clock);
        let flushed = if ctx.aggregate {
            self.flush(ctx.workers, ctx.gate)
        } else {
            Vec::new()
        };
        // A summed push (not taken above) is read once its sums are applied.
        if let Some(out) = out {
            self.read(p, out);
        }
        Ok(Pushed {
            applied: applied as u64,
            duplicate: total - applied as u64,
            flushed,
        })
    }

    /// Applies the keys of `p` for which `apply` holds, through the store
    /// (the checks passed already), reading back into `out` when given.
    fn apply_checked(
        &mut self,
        p: &Push<'_>,
        apply: impl Fn(Key) -> bool + Sync,
        out: Option<&mut Vec<f32>>,
    ) -> usize {
        let keys = match p.keys {
            Keys::List(keys) => Some(keys),
            Keys::Dense => None,
        };
        match out {
            Some(out) => self
                .store
                .push_checked_read(keys, p.range, p.vals, apply, out),
            None => self.store.push_checked(keys, p.range, p.vals, apply),
        }
    }

    /// Sums the fresh keys of `p` into its clock's aggregate, refusing the
    /// whole push (nothing summed) if any sum would overflow.
    fn sum(&mut self, p: &Push<'_>, in_fresh: &impl Fn(Key) -> bool) -> Result<usize, TableError> {
        let width = self.store.push_width();
        let n = p.len() as usize;
        if let Some(agg) = self.pending.get(&p.clock) {
            if let Some(i) = (0..n).find(|&i| {
                let k = p.key(i);
                in_fresh(k) && agg.overflows(k, &p.vals[i * width..(i + 1) * width])
            }) {
                return Err(TableError::Overflow {
                    table: self.store.spec().name.clone(),
                    node: p.sender,
                    clock: p.clock,
                    key: p.key(i),
                });
            }
        }
        let agg = self
            .pending
            .entry(p.clock)
            .or_insert_with(|| Aggregate::new(width));
        agg.add_range(p.range);
        let mut applied = 0;
        for i in 0..n {
            let k = p.key(i);
            if in_fresh(k) {
                for (s, v) in agg.slot(k).iter_mut().zip(&p.vals[i * width..]) {
                    *s += v;
                }
                applied += 1;
            }
        }
        Ok(applied)
    }

    /// Applies, in clock order, the sums that every one of `workers` has now
    /// pushed over all of their ranges. With a `gate`, only the parts of a
    /// sum's ranges inside it decide (a server applying sums only where it
    /// is primary), and a sum with no deciding part waits.
    pub fn flush(&mut self, workers: &[NodeId], gate: Option<&[KeyRange]>) -> Vec<Applied> {
        let mut applied = Vec::new();
        let clocks: Vec<u64> = self.pending.keys().copied().collect();
        for at in clocks {
            let Some(agg) = self.pending.get(&at) else {
                continue;
            };
            let deciding: Vec<KeyRange> = match gate {
                None => agg.ranges.clone(),
                Some(mine) => agg
                    .ranges
                    .iter()
                    .flat_map(|r| mine.iter().filter_map(|m| m.intersect(r)))
                    .collect(),
            };
            if deciding.is_empty() {
                continue;
            }
            if deciding
                .iter()
                .any(|r| self.clock.min_clock(*r, workers) < at)
            {
                // Sums are applied in clock order.
                break;
            }
            let Some(agg) = self.pending.remove(&at) else {
                continue;
            };
            let (keys, sums) = agg.sorted();
            // Every part was checked when it arrived and the sums are
            // finite, so the store takes it; should it not, the pushes are
            // refused to their senders rather than acknowledged.
            let refused = self.store.push(&keys, &sums, |_| true).err();
            applied.push(Applied {
                clock: at,
                keys,
                ranges: agg.ranges,
                refused,
            });
        }
        applied
    }

    /// True when a pull over `range` needing clock `need` may be answered:
    /// every one of `workers` has pushed that far, and the sums of those
    /// clocks over `range` are applied (a clock's sum is applied as a
    /// whole, so a range can be complete before its sum is).
    pub fn ready(&self, range: KeyRange, need: u64, workers: &[NodeId]) -> bool {
        self.clock.min_clock(range, workers) >= need
            && !self
                .pending
                .range(..=need)
                .any(|(_, agg)| agg.ranges.iter().any(|r| r.intersect(&range).is_some()))
    }

    /// Takes whole slots (weights and state) for `keys` from a chain or a
    /// copy, and replays `records` into the clock. Checks every slot before
    /// storing any.
    pub fn replica_slots(
        &mut self,
        keys: &[Key],
        slots: &[f32],
        records: &[(NodeId, KeyRange, u64)],
    ) -> Result<(), TableError> {
        let width = self.store.slot_width();
        let name = self.store.spec().name.clone();
        let table = || name.clone();
        if Some(slots.len()) != keys.len().checked_mul(width) {
            return Err(StoreError::WrongWidth {
                table: table(),
                expected: keys.len().saturating_mul(width),
                got: slots.len(),
            }
            .into());
        }
        if let Some(index) = slots.iter().position(|v| !v.is_finite()) {
            return Err(StoreError::NotFinite {
                table: table(),
                index,
            }
            .into());
        }
        for (k, slot) in keys.iter().zip(slots.chunks_exact(width.max(1))) {
            self.store.restore(*k, slot)?;
        }
        for &(node, r, clock) in records {
            self.clock.record(node, r, clock);
        }
        Ok(())
    }

    /// A primary's applied sum for `clock` over `range` arrives: whatever
    /// part of it this server summed from forwarded pushes is dropped.
    pub fn replica_flushed(&mut self, clock: u64, range: KeyRange) {
        if let Some(agg) = self.pending.get_mut(&clock) {
            agg.drop_keys_in(range);
            agg.ranges = agg
                .ranges
                .iter()
                .flat_map(|r| subtract(*r, range))
                .collect();
            if agg.ranges.is_empty() && agg.keys.is_empty() {
                self.pending.remove(&clock);
            }
        }
    }

    /// The first piece of a copy of `range` arrives: sums held for its keys
    /// are dropped (the copy's `Pending` pieces bring the primary's).
    pub fn replica_reset(&mut self, range: KeyRange) {
        for agg in self.pending.values_mut() {
            agg.drop_keys_in(range);
        }
    }

    /// A copy of another server's unapplied sum for `clock` over `range`:
    /// set, not added, so that a server that already summed the same pushes
    /// ends as it was.
    pub fn replica_pending(
        &mut self,
        clock: u64,
        range: KeyRange,
        keys: &[Key],
        sums: &[f32],
        records: &[(NodeId, KeyRange, u64)],
    ) -> Result<(), TableError> {
        let width = self.store.push_width();
        if Some(sums.len()) != keys.len().checked_mul(width) {
            return Err(StoreError::WrongWidth {
                table: self.store.spec().name.clone(),
                expected: keys.len().saturating_mul(width),
                got: sums.len(),
            }
            .into());
        }
        let agg = self
            .pending
            .entry(clock)
            .or_insert_with(|| Aggregate::new(width));
        agg.add_range(range);
        for (k, v) in keys.iter().zip(sums.chunks_exact(width.max(1))) {
            agg.slot(*k).copy_from_slice(v);
        }
        for &(node, r, c) in records {
            self.clock.record(node, r, c);
        }
        Ok(())
    }

    /// After a map change: cuts unapplied sums down to the ranges this
    /// server still `held` (as primary or replica), dropping sums left with
    /// none, and returns the clocks whose pushes this server no longer
    /// completes as it did: those whose ranges changed, and those not all
    /// inside ranges where `primary(range)` holds. Acknowledgements held
    /// for those clocks must go back as refusals, so the workers resend to
    /// the range's primary, which has their pushes from its copy.
    pub fn prune(&mut self, held: &[KeyRange], primary: impl Fn(&KeyRange) -> bool) -> Vec<u64> {
        let mut orphaned = Vec::new();
        let holes = gaps(held);
        self.pending.retain(|&clock, agg| {
            let before = agg.ranges.clone();
            let mut ranges: Vec<KeyRange> = agg
                .ranges
                .iter()
                .flat_map(|r| held.iter().filter_map(|h| h.intersect(r)))
                .collect();
            ranges.sort_unstable_by_key(|r| (r.begin, r.end));
            ranges.dedup();
            if ranges != before || !before.iter().all(&primary) {
                orphaned.push(clock);
            }
            agg.ranges = ranges;
            for gap in &holes {
                agg.drop_keys_in(*gap);
            }
            !agg.ranges.is_empty()
        });
        orphaned
    }

    /// Forgets the clock records of every sender for which `gone` holds
    /// (they left the cluster: [`crate::map::ClusterMap::departed`]), so
    /// the range clock stays the size of the senders present however many
    /// came and went; returns how many records went. The server refuses
    /// their pushes from then on, which this table cannot tell apart from
    /// fresh ones any more.
    pub fn forget(&mut self, gone: impl Fn(NodeId) -> bool) -> usize {
        self.clock.forget_where(gone)
    }

    /// Drops the stored keys outside `held` (ranges handed away), so their
    /// memory returns. Returns how many were dropped.
    pub fn retain_ranges(&mut self, held: &[KeyRange]) -> usize {
        self.store.retain_ranges(held)
    }

    /// Pull: appends `dim` weights per key to `out`.
    pub fn pull(&self, keys: &[Key], out: &mut Vec<f32>) {
        self.store.pull(keys, out);
    }

    /// The weights of a push's keys (or its dense range), appended to `out`.
    fn read(&self, p: &Push<'_>, out: &mut Vec<f32>) {
        match p.keys {
            Keys::List(keys) => self.store.pull(keys, out),
            Keys::Dense => self.store.pull_dense(p.range, out),
        }
    }

    /// Dense pull: appends `dim` weights for every key of `range`.
    pub fn pull_dense(&self, range: KeyRange, out: &mut Vec<f32>) {
        self.store.pull_dense(range, out);
    }
}

/// The parts of `r` outside `cut` (zero, one or two ranges).
pub fn subtract(r: KeyRange, cut: KeyRange) -> Vec<KeyRange> {
    if r.intersect(&cut).is_none() {
        return vec![r];
    }
    let mut out = Vec::new();
    if r.begin < cut.begin {
        out.push(KeyRange {
            begin: r.begin,
            end: cut.begin,
        });
    }
    if cut.end < r.end {
        out.push(KeyRange {
            begin: cut.end,
            end: r.end,
        });
    }
    out
}

/// The ranges of `[0, KEY_END)` not covered by `held` (sorted, disjoint).
pub fn gaps(held: &[KeyRange]) -> Vec<KeyRange> {
    let mut out = Vec::new();
    let mut at = 0;
    for h in held {
        if h.begin > at {
            out.push(KeyRange {
                begin: at,
                end: h.begin,
            });
        }
        at = at.max(h.end);
    }
    if at < crate::KEY_END {
        out.push(KeyRange {
            begin: at,
            end: crate::KEY_END,
        });
    }
    out
}

#[cfg(test)]
mod tests;
