//! A server's storage for one table: sparse, hash-keyed, with each key's
//! weights and optimizer state contiguous in one slab.
//!
//! Layout: each key's slot is a row of [`Rows`], stored inline beside the
//! key: the first `dim` floats are the weights and the remaining
//! `dim * state_len` the updater's state. Keeping a key, its weights and its
//! state adjacent means one cache line per key on push and pull, and one
//! flat array instead of a heap object per key.

use crate::key::{Key, KeyRange};
use crate::rows::{HASH_SKIP, Rows, hash};
use crate::spec::{Init, TableSpec};
use crate::updater::{Builtin, Updater};
use std::sync::Arc;

pub mod threads;

pub use threads::{Threads, ThreadsError};

/// Why a push or pull was refused. Nothing is changed when one is returned.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StoreError {
    /// The values do not match keys x dim x push width.
    #[error("table {table:?}: expected {expected} values, got {got}")]
    WrongWidth {
        /// Table name.
        table: String,
        /// Values expected (`usize::MAX` when the count overflows).
        expected: usize,
        /// Values received.
        got: usize,
    },
    /// A pushed value is NaN or infinite.
    #[error("table {table:?}: value {index} is not finite")]
    NotFinite {
        /// Table name.
        table: String,
        /// Position of the first bad value.
        index: usize,
    },
    /// Keys not sorted strictly ascending.
    #[error("table {table:?}: keys are not sorted and unique at position {index}")]
    Unsorted {
        /// Table name.
        table: String,
        /// Position of the first key out of order.
        index: usize,
    },
}

/// The stored part of one table on one server.
pub struct Store {
    spec: TableSpec,
    updater: Arc<dyn Updater>,
    /// `spec.dim` as a `usize`, cached for the hot loops.
    dim: usize,
    /// Floats per key: `dim` weights plus `dim * state_len` state.
    slot_width: usize,
    /// Floats per key in a push: `dim * push_len`.
    push_width: usize,
    /// The keys, split by [`shard_of`] so that a large request can be
    /// applied by several threads, each owning some shards.
    shards: Vec<Rows>,
    /// Threads a large request may use (a power of two dividing
    /// [`SHARDS`]), and the pool that runs all but the caller's share.
    threads: Threads,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("table", &self.spec.name)
            .field("dim", &self.dim)
            .field("slot_width", &self.slot_width)
            .field("keys", &self.len())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// An empty store for `spec`, applying pushes with `updater`.
    ///
    /// The spec is expected to have passed [`TableSpec::validate`]; an
    /// unvalidated one (say, a huge `dim`) does not panic, but keys whose
    /// slot cannot be allocated are then skipped on push.
    pub fn new(spec: TableSpec, updater: Arc<dyn Updater>) -> Store {
        let dim = spec.dim as usize;
        // Saturating: an absurd width then fails allocation in `Rows`
        // (and the key is skipped) instead of wrapping to a wrong layout.
        let slot_width = dim.saturating_mul(updater.state_len().saturating_add(1));
        let push_width = dim.saturating_mul(updater.push_len());
        Store {
            spec,
            updater,
            dim,
            slot_width,
            push_width,
            shards: (0..SHARDS).map(|_| Rows::new(slot_width)).collect(),
            threads: Threads::one(),
        }
    }

    /// Lets requests of at least [`PARALLEL_MIN_KEYS`] keys use `threads`
    /// (a server gives all its tables the same ones); [`Threads::one`],
    /// the default, keeps all work on the caller's thread.
    pub fn with_threads(mut self, threads: &Threads) -> Store {
        self.threads = threads.clone();
        self
    }

    /// The table's spec.
    pub fn spec(&self) -> &TableSpec {
        &self.spec
    }

    /// Floats a push carries per key (`dim * push_len`).
    pub fn push_width(&self) -> usize {
        self.push_width
    }

    /// Floats stored per key: `dim` weights followed by `dim * state_len`
    /// optimizer state. This is the length of each slice
    /// [`Store::entries_in`] returns and [`Store::restore`] takes.
    pub fn slot_width(&self) -> usize {
        self.slot_width
    }

    /// Applies a push of sorted, unique `keys` with `vals`
    /// (`keys.len() * push_width()` floats), but only keys for which
    /// `apply(key)` is true (duplicate rejection). Validates everything
    /// before changing anything. Returns the number of keys applied.
    pub fn push(
        &mut self,
        keys: &[Key],
        vals: &[f32],
        apply: impl Fn(Key) -> bool + Sync,
    ) -> Result<usize, StoreError> {
        self.check_push(keys, vals)?;
        Ok(self.apply_all(keys.len(), |i| keys[i], vals, apply, None))
    }

    /// [`Store::push`] or [`Store::push_dense`] (`keys: None`) for a push
    /// that already passed [`Store::check_push`] (or `check_push_dense`):
    /// the table checks once, before deduplicating, and applies without
    /// checking again.
    pub(crate) fn push_checked(
        &mut self,
        keys: Option<&[Key]>,
        range: KeyRange,
        vals: &[f32],
        apply: impl Fn(Key) -> bool + Sync,
    ) -> usize {
        match keys {
            Some(keys) => self.apply_all(keys.len(), |i| keys[i], vals, apply, None),
            None => {
                let n = vals.len().checked_div(self.push_width).unwrap_or(0);
                self.apply_all(n, |i| range.begin + i as Key, vals, apply, None)
            }
        }
    }

    /// [`Store::push_checked`] that also appends every key's weights after
    /// the push to `out` (`dim` floats a key, in the push's order, as
    /// [`Store::pull`] would right after it): a push-pull answered from the
    /// same probe of each key as its update, instead of a second pass over
    /// the table. Keys `apply` skips read as they are.
    pub(crate) fn push_checked_read(
        &mut self,
        keys: Option<&[Key]>,
        range: KeyRange,
        vals: &[f32],
        apply: impl Fn(Key) -> bool + Sync,
        out: &mut Vec<f32>,
    ) -> usize {
        let n = match keys {
            Some(keys) => keys.len(),
            None => vals.len().checked_div(self.push_width).unwrap_or(0),
        };
        let start = out.len();
        let Some(end) = n.checked_mul(self.dim).and_then(|t| t.checked_add(start)) else {
            return 0;
        };
        out.resize(end, 0.0);
        let dst = Some(&mut out[start..]);
        match keys {
            Some(keys) => self.apply_all(n, |i| keys[i], vals, apply, dst),
            None => self.apply_all(n, |i| range.begin + i as Key, vals, apply, dst),
        }
    }

    /// The checks [`Store::push`] makes before changing anything: the value
    /// count, finiteness, and sorted unique keys. For callers that keep a
    /// push aside (an aggregating table sums it first) and must refuse it
    /// on the same terms.
    pub fn check_push(&self, keys: &[Key], vals: &[f32]) -> Result<(), StoreError> {
        let expected = keys.len().checked_mul(self.push_width);
        self.check_vals(expected, vals)?;
        if !sorted_unique(keys) {
            let i = keys.windows(2).position(|w| w[0] >= w[1]).unwrap_or(0);
            return Err(StoreError::Unsorted {
                table: self.spec.name.clone(),
                index: i + 1,
            });
        }
        Ok(())
    }

    /// The checks [`Store::push_dense`] makes before changing anything.
    pub fn check_push_dense(&self, range: KeyRange, vals: &[f32]) -> Result<(), StoreError> {
        let expected = usize::try_from(range.len())
            .ok()
            .and_then(|n| n.checked_mul(self.push_width));
        self.check_vals(expected, vals)
    }

    /// Applies a push to every key of `range` (dense: no key list),
    /// `range.len() * push_width()` floats, only where `apply(key)`.
    pub fn push_dense(
        &mut self,
        range: KeyRange,
        vals: &[f32],
        apply: impl Fn(Key) -> bool + Sync,
    ) -> Result<usize, StoreError> {
        self.check_push_dense(range, vals)?;
        // The check passed, so the range's length fits a `usize`.
        let n = vals.len().checked_div(self.push_width).unwrap_or(0);
        Ok(self.apply_all(n, |i| range.begin + i as Key, vals, apply, None))
    }

    /// Appends `dim` weights per key to `out`; keys never pushed read as the
    /// table's initializer (and are not stored).
    pub fn pull(&self, keys: &[Key], out: &mut Vec<f32>) {
        self.fill_all(keys.len(), |i| keys[i], out);
    }

    /// Appends `dim` weights for every key of `range` to `out`.
    ///
    /// Appends `range.len() * dim` floats, so callers bound the range.
    pub fn pull_dense(&self, range: KeyRange, out: &mut Vec<f32>) {
        let n = usize::try_from(range.len()).unwrap_or(usize::MAX);
        self.fill_all(n, |i| range.begin + i as Key, out);
    }

    /// Number of keys stored.
    pub fn len(&self) -> usize {
        self.shards.iter().map(Rows::len).sum()
    }

    /// True when no key is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes allocated for keys, weights and state.
    pub fn memory_bytes(&self) -> usize {
        self.shards.iter().map(Rows::memory_bytes).sum()
    }

    /// The stored keys in `range`, sorted, each with its whole slot:
    /// `dim` weights followed by `dim * state_len` optimizer state
    /// ([`Store::slot_width`] floats). For checkpoints and state transfer.
    pub fn entries_in(&self, range: KeyRange) -> Vec<(Key, &[f32])> {
        let mut entries: Vec<(Key, &[f32])> = self
            .shards
            .iter()
            .flat_map(Rows::iter)
            .filter(|(key, _)| range.contains(*key))
            .collect();
        entries.sort_unstable_by_key(|(key, _)| *key);
        entries
    }

    /// Drops every stored key outside `held` (ranges this server still
    /// holds, as primary or replica), returning the memory they took.
    /// Returns how many keys were dropped.
    pub fn retain_ranges(&mut self, held: &[KeyRange]) -> usize {
        let keep = |k: Key| held.iter().any(|r| r.contains(k));
        self.shards.iter_mut().map(|rows| rows.retain(keep)).sum()
    }

    /// The whole slots ([`Store::slot_width`] floats each) of `keys`, in
    /// order; a key not stored reads as its initial weights and zero state.
    /// What a primary forwards to its replicas after applying a push.
    pub fn slots_of(&self, keys: &[Key]) -> Vec<f32> {
        let mut out = Vec::with_capacity(keys.len().saturating_mul(self.slot_width));
        for &key in keys {
            match self.row(key) {
                Some(slot) => out.extend_from_slice(slot),
                None => {
                    let start = out.len();
                    out.resize(start + self.slot_width, 0.0);
                    initial(&self.spec.init, key, &mut out[start..start + self.dim]);
                }
            }
        }
        out
    }

    /// Sets `key`'s whole slot (weights then state, [`Store::slot_width`]
    /// floats, as [`Store::entries_in`] returns it), inserting the key if
    /// needed. For loading checkpoints and receiving state transfers; the
    /// updater is not called. Validates before changing anything; returns
    /// whether the key was stored (false only when its slot could not be
    /// allocated).
    pub fn restore(&mut self, key: Key, slot: &[f32]) -> Result<bool, StoreError> {
        self.check_vals(Some(self.slot_width), slot)?;
        let Some(dst) = self.shards[shard_of(key)].get_or_insert(key, |_| {}) else {
            return Ok(false);
        };
        dst.copy_from_slice(slot);
        Ok(true)
    }

    /// Checks a push's value count (`None`: the count overflowed) and that
    /// every value is finite.
    fn check_vals(&self, expected: Option<usize>, vals: &[f32]) -> Result<(), StoreError> {
        if expected != Some(vals.len()) {
            return Err(StoreError::WrongWidth {
                table: self.spec.name.clone(),
                expected: expected.unwrap_or(usize::MAX),
                got: vals.len(),
            });
        }
        if !all_finite(vals) {
            let index = vals.iter().position(|v| !v.is_finite()).unwrap_or(0);
            return Err(StoreError::NotFinite {
                table: self.spec.name.clone(),
                index,
            });
        }
        Ok(())
    }

    /// The stored slot of `key`.
    #[inline]
    fn row(&self, key: Key) -> Option<&[f32]> {
        self.shards[shard_of(key)].get(key)
    }

    /// Runs the updater on each key `key_at(i)`, `i < n`, where
    /// `apply(key)`, key `i` taking `vals[i * push_width..][..push_width]`.
    /// The caller has checked that `vals` holds exactly that many floats.
    /// With `read`, key `i`'s weights after the push go to
    /// `read[i * dim..][..dim]` (`n * dim` floats). Returns how many keys
    /// were applied.
    fn apply_all(
        &mut self,
        n: usize,
        key_at: impl Fn(usize) -> Key + Sync,
        vals: &[f32],
        apply: impl Fn(Key) -> bool + Sync,
        read: Option<&mut [f32]>,
    ) -> usize {
        // A built-in runs through its own type (see `Updater::builtin`); the
        // loop below is compiled once per built-in.
        match self.updater.builtin() {
            Some(Builtin::Assign(u)) => self.apply_with(&u, n, &key_at, vals, &apply, read),
            Some(Builtin::Add(u)) => self.apply_with(&u, n, &key_at, vals, &apply, read),
            Some(Builtin::Sgd(u)) => self.apply_with(&u, n, &key_at, vals, &apply, read),
            Some(Builtin::AdaGrad(u)) => self.apply_with(&u, n, &key_at, vals, &apply, read),
            Some(Builtin::Ftrl(u)) => self.apply_with(&u, n, &key_at, vals, &apply, read),
            Some(Builtin::Prox(u)) => self.apply_with(&u, n, &key_at, vals, &apply, read),
            None => {
                let u = Arc::clone(&self.updater);
                self.apply_with(&*u, n, &key_at, vals, &apply, read)
            }
        }
    }

    /// [`Store::apply_all`] with the updater `u`.
    fn apply_with<U: Updater + ?Sized>(
        &mut self,
        u: &U,
        n: usize,
        key_at: &(impl Fn(usize) -> Key + Sync),
        vals: &[f32],
        apply: &(impl Fn(Key) -> bool + Sync),
        mut read: Option<&mut [f32]>,
    ) -> usize {
        let applier = Applier {
            updater: u,
            init: &self.spec.init,
            dim: self.dim,
            push_width: self.push_width,
            key_at,
            vals,
            apply,
            n,
        };
        let one_thread = |shards: &mut [Rows], read: Option<&mut [f32]>| match read {
            Some(out) => applier.run(shards, &mut ReadAt { out, dim: self.dim }),
            None => applier.run(shards, &mut NoRead),
        };
        // Each thread owns a run of shards and applies the keys that fall
        // in them, which it sorts out first itself (a pass over the keys
        // in parallel, instead of one on this thread before any starts).
        // Positions are `u32`; a push too big for them is applied on this
        // thread.
        let pool = match self.threads.pool() {
            Some(pool) if n >= PARALLEL_MIN_KEYS && u32::try_from(n).is_ok() => pool,
            _ => return one_thread(&mut self.shards, read),
        };
        let groups = self.threads.count();
        let per = SHARDS / groups;
        let reads = read.is_some();
        let dim = self.dim;
        let applier = &applier;
        // A thread's keys are scattered over the push, so a thread that
        // reads back collects its weights in its own order; they are put in
        // place once every thread is done, at the positions it returns.
        let part = |g: usize| {
            move |shards: &mut [Rows]| {
                let mine = own_positions(n, g, groups, key_at);
                let at = |j: usize| mine[j] as usize;
                let (applied, got) = if reads {
                    let mut got = Collect {
                        vals: Vec::with_capacity(mine.len() * dim),
                        dim,
                    };
                    let applied = applier.run_at(shards, g * per, mine.len(), at, &mut got);
                    (applied, got.vals)
                } else {
                    let applied = applier.run_at(shards, g * per, mine.len(), at, &mut NoRead);
                    (applied, Vec::new())
                };
                (applied, got, mine)
            }
        };
        // The caller applies the first group; the pool's threads the rest,
        // each into its own slot.
        let mut chunks = self.shards.chunks_mut(per);
        let first = chunks.next();
        let mut rest: Vec<_> = (1..groups).map(|_| None).collect();
        let mut done = Vec::with_capacity(groups);
        pool.in_place_scope(|scope| {
            for ((g, group), slot) in (1..).zip(chunks).zip(rest.iter_mut()) {
                let work = part(g);
                scope.spawn(move |_| *slot = Some(work(group)));
            }
            if let Some(first) = first {
                done.push(part(0)(first));
            }
        });
        done.extend(rest.into_iter().flatten());
        let mut applied = 0;
        for (count, got, mine) in done {
            applied += count;
            if let Some(out) = read.as_deref_mut() {
                scatter(out, dim, &mine, &got);
            }
        }
        applied
    }

    /// Appends the weights of keys `key_at(i)`, `i < n`, to `out`: read
    /// from the table, or the initializer for keys not stored.
    fn fill_all(&self, n: usize, key_at: impl Fn(usize) -> Key + Sync, out: &mut Vec<f32>) {
        let dim = self.dim;
        let start = out.len();
        let Some(end) = n.checked_mul(dim).and_then(|t| t.checked_add(start)) else {
            return;
        };
        let pool = self.threads.pool().filter(|_| n >= PARALLEL_MIN_KEYS);
        if dim == 1 && pool.is_none() {
            // One float a key, on this thread: appended as looked up, with
            // no zeroing pass first (the lookups have an exact length, so
            // `extend` checks the capacity once).
            let init = &self.spec.init;
            out.extend(self.lookups(0, n, &key_at).map(|(key, row)| match row {
                Some(&[w, ..]) => w,
                _ => {
                    let mut w = [0.0];
                    initial(init, key, &mut w);
                    w[0]
                }
            }));
            return;
        }
        out.resize(end, 0.0);
        let Some(pool) = pool else {
            self.fill_part(0, &mut out[start..], &key_at);
            return;
        };
        // Reads need no ownership of shards: split the output by position.
        // The caller fills the first part; the pool's threads the rest.
        let per = n.div_ceil(self.threads.count()).max(1);
        let chunk = per * dim.max(1);
        let key_at = &key_at;
        pool.in_place_scope(|scope| {
            let mut parts = out[start..].chunks_mut(chunk).enumerate();
            let first = parts.next();
            for (p, part) in parts {
                scope.spawn(move |_| self.fill_part(p * per, part, key_at));
            }
            if let Some((_, first)) = first {
                self.fill_part(0, first, key_at);
            }
        });
    }

    /// Fills `dst` with the weights of keys `key_at(first + j)` for each
    /// `dim`-float chunk `j` of `dst`.
    fn fill_part(&self, first: usize, dst: &mut [f32], key_at: &(impl Fn(usize) -> Key + Sync)) {
        let dim = self.dim;
        if dim == 0 {
            return;
        }
        let n = dst.len() / dim;
        for (w, (key, row)) in dst
            .chunks_exact_mut(dim)
            .zip(self.lookups(first, n, key_at))
        {
            match row {
                Some(slot) if dim == 1 => w[0] = slot[0],
                Some(slot) => w.copy_from_slice(&slot[..dim]),
                None => initial(&self.spec.init, key, w),
            }
        }
    }

    /// Keys `key_at(first + j)` for `j` in `0..n`, each with its row if
    /// stored, in order. Each key is hashed once, when its bucket is
    /// prefetched [`PREFETCH_AHEAD`] keys before its turn (as in the push
    /// loop); the hash waits in a ring until then.
    fn lookups<'a>(
        &'a self,
        first: usize,
        n: usize,
        key_at: &'a (impl Fn(usize) -> Key + Sync),
    ) -> impl Iterator<Item = (Key, Option<&'a [f32]>)> + 'a {
        let mut ahead = [0u64; RING];
        for (j, h) in ahead.iter_mut().enumerate().take(n.min(PREFETCH_AHEAD)) {
            *h = hash(key_at(first + j));
        }
        // A mapped range: its exact length lets `extend` skip per-item
        // capacity checks.
        (0..n).map(move |j| {
            let next = j + PREFETCH_AHEAD;
            if next < n {
                let h = hash(key_at(first + next));
                ahead[next % RING] = h;
                if let Some(rows) = self.shards.get(shard_of_hash(h)) {
                    rows.prefetch_hashed(h);
                }
            }
            let key = key_at(first + j);
            let h = ahead[j % RING];
            let row = self
                .shards
                .get(shard_of_hash(h))
                .and_then(|r| r.get_hashed(key, h));
            (key, row)
        })
    }
}

/// Whether `keys` ascend strictly. Checked in blocks without an early
/// exit inside a block, so the compiler can use vector compares (a
/// `position` that stops at the first bad pair cannot); a bad push is rare,
/// and its position is found afterwards.
fn sorted_unique(keys: &[Key]) -> bool {
    let Some(rest) = keys.get(1..) else {
        return true;
    };
    rest.chunks(CHECK_BLOCK)
        .zip(keys.chunks(CHECK_BLOCK))
        .all(|(next, prev)| next.iter().zip(prev).fold(true, |ok, (n, p)| ok & (n > p)))
}

/// Whether every value is finite, checked in blocks as [`sorted_unique`].
fn all_finite(vals: &[f32]) -> bool {
    vals.chunks(CHECK_BLOCK)
        .all(|c| c.iter().fold(true, |ok, v| ok & v.is_finite()))
}

/// Elements per block of the push checks: long enough for vector compares,
/// short enough that a bad push stops soon.
const CHECK_BLOCK: usize = 256;

/// How many keys ahead the push and pull loops prefetch ([`Rows::prefetch`]):
/// enough misses in flight to keep a core's line-fill buffers (10 to 16 on
/// current x86 cores) busy, few enough that a line is still cached when
/// its key comes. Measured on a 4M-key table, 65,536 keys per request:
/// push 6.5M to 9.5M keys/s, pull 9.5M to 11.5M, on one thread.
const PREFETCH_AHEAD: usize = 12;

/// Number of shards a store's keys are split into: enough for the threads
/// of a large request on common machines.
pub const SHARDS: usize = 8;

/// Requests of fewer keys than this run on the caller's thread: handing a
/// share to a pool thread (which took ~45 µs to start on it, measured on a
/// 2-vCPU VM, its vCPU idle) only pays off over thousands of keys.
pub const PARALLEL_MIN_KEYS: usize = 16_384;

/// The shard of a key whose [`hash`] is `h`: its top [`HASH_SKIP`] bits,
/// which the shard's [`Rows`] leave out of the bucket index (so a shard's
/// keys still spread over all of its buckets, and one hash serves both).
#[inline]
fn shard_of_hash(h: u64) -> usize {
    (h >> (64 - HASH_SKIP)) as usize
}

/// The shard of `key`.
#[inline]
fn shard_of(key: Key) -> usize {
    shard_of_hash(hash(key))
}

// The shard index has exactly the bits the rows leave to it.
const _: () = assert!(SHARDS == 1 << HASH_SKIP);

/// One push's work, shared by the threads applying it.
struct Applier<'a, U: ?Sized, K, A> {
    updater: &'a U,
    init: &'a Init,
    dim: usize,
    push_width: usize,
    key_at: &'a K,
    vals: &'a [f32],
    apply: &'a A,
    n: usize,
}

impl<U: Updater + ?Sized, K: Fn(usize) -> Key + Sync, A: Fn(Key) -> bool + Sync>
    Applier<'_, U, K, A>
{
    /// Applies every key of the push, `shards` being all the store's
    /// shards. Returns how many were applied.
    fn run(&self, shards: &mut [Rows], read: &mut impl ReadBack) -> usize {
        self.run_at(shards, 0, self.n, |j| j, read)
    }

    /// Applies keys `at(0)`, `at(1)`, ... `at(m - 1)` (positions in the
    /// push, ascending), all of whose shards are in `first..first +
    /// shards.len()`, `shards` being those shards in order; `read` gets
    /// each key's weights after its update. Returns how many were applied.
    fn run_at<R: ReadBack>(
        &self,
        shards: &mut [Rows],
        first: usize,
        m: usize,
        at: impl Fn(usize) -> usize,
        read: &mut R,
    ) -> usize {
        let (pw, dim, init) = (self.push_width, self.dim, self.init);
        debug_assert!(first + shards.len() <= SHARDS);
        let mut applied = 0;
        // The hash of each key is computed once, when it is prefetched,
        // and kept in a ring until its turn.
        let mut ahead = [0u64; RING];
        for (j, h) in ahead.iter_mut().enumerate().take(m.min(PREFETCH_AHEAD)) {
            *h = hash((self.key_at)(at(j)));
        }
        for j in 0..m {
            let next = j + PREFETCH_AHEAD;
            if next < m {
                let h = hash((self.key_at)(at(next)));
                ahead[next % RING] = h;
                if let Some(rows) = shards.get(shard_of_hash(h).wrapping_sub(first)) {
                    rows.prefetch_hashed(h);
                }
            }
            let i = at(j);
            let h = ahead[j % RING];
            let Some(rows) = shards.get_mut(shard_of_hash(h).wrapping_sub(first)) else {
                continue;
            };
            let key = (self.key_at)(i);
            if !(self.apply)(key) {
                if R::READS {
                    match rows.get_hashed(key, h) {
                        Some(slot) => read.put(i, &slot[..dim]),
                        None => read.put_initial(i, init, key),
                    }
                }
                continue;
            }
            let Some(push) = self.vals.get(i * pw..i * pw + pw) else {
                break;
            };
            // A new key starts from its initial weights and zero state.
            let Some(slot) =
                rows.get_or_insert_hashed(key, h, |s| initial(init, key, &mut s[..dim]))
            else {
                // No memory for it: it is skipped, and reads as new.
                if R::READS {
                    read.put_initial(i, init, key);
                }
                continue;
            };
            let (weights, state) = slot.split_at_mut(dim);
            self.updater.apply(weights, state, push);
            if R::READS {
                read.put(i, weights);
            }
            applied += 1;
        }
        applied
    }
}

/// Where a push's applier puts each key's weights after its update: a
/// push-pull reads them in the same probe as the update. Compiled per
/// kind, so a plain push ([`NoRead`]) pays nothing for it.
trait ReadBack {
    /// Whether anything is read (false: the applier skips reading).
    const READS: bool;
    /// Key `i` of the push has weights `w`.
    fn put(&mut self, i: usize, w: &[f32]);
    /// Key `i` of the push, `key`, is not stored: it reads as new.
    fn put_initial(&mut self, i: usize, init: &Init, key: Key);
}

/// A plain push: nothing read back.
struct NoRead;

impl ReadBack for NoRead {
    const READS: bool = false;
    #[inline(always)]
    fn put(&mut self, _: usize, _: &[f32]) {}
    #[inline(always)]
    fn put_initial(&mut self, _: usize, _: &Init, _: Key) {}
}

/// Weights in place: key `i`'s at `out[i * dim..][..dim]`.
struct ReadAt<'a> {
    out: &'a mut [f32],
    dim: usize,
}

impl ReadBack for ReadAt<'_> {
    const READS: bool = true;
    #[inline(always)]
    fn put(&mut self, i: usize, w: &[f32]) {
        let dim = self.dim;
        if let Some(dst) = self.out.get_mut(i * dim..i * dim + dim) {
            if let ([d], [v, ..]) = (&mut *dst, w) {
                *d = *v;
            } else {
                dst.copy_from_slice(&w[..dim]);
            }
        }
    }
    #[inline]
    fn put_initial(&mut self, i: usize, init: &Init, key: Key) {
        let dim = self.dim;
        if let Some(dst) = self.out.get_mut(i * dim..i * dim + dim) {
            initial(init, key, dst);
        }
    }
}

/// Weights in the order the applier visits its keys (one thread's share of
/// a push, put in place afterwards by [`scatter`]).
struct Collect {
    vals: Vec<f32>,
    dim: usize,
}

impl ReadBack for Collect {
    const READS: bool = true;
    #[inline(always)]
    fn put(&mut self, _: usize, w: &[f32]) {
        self.vals.extend_from_slice(&w[..self.dim]);
    }
    #[inline]
    fn put_initial(&mut self, _: usize, init: &Init, key: Key) {
        let start = self.vals.len();
        self.vals.resize(start + self.dim, 0.0);
        initial(init, key, &mut self.vals[start..]);
    }
}

/// Puts one thread's collected weights (`got`, `dim` floats for each of
/// the positions `mine`, in that order) in place in `out`.
fn scatter(out: &mut [f32], dim: usize, mine: &[u32], got: &[f32]) {
    if dim == 0 {
        return;
    }
    for (&p, w) in mine.iter().zip(got.chunks_exact(dim)) {
        let p = p as usize;
        if let Some(dst) = out.get_mut(p * dim..p * dim + dim) {
            dst.copy_from_slice(w);
        }
    }
}

/// The positions `0..n` of a push's keys that fall in the shards of thread
/// `g` of `groups` (a power of two, each owning `SHARDS / groups`
/// consecutive shards), ascending. Every thread scans all the keys for its
/// own, in parallel: a hash and a compare a key, written without a branch
/// (whether a random key is a thread's own is a coin toss the CPU cannot
/// predict) into a small block that is then appended, so the list holds
/// only its own.
fn own_positions(n: usize, g: usize, groups: usize, key_at: &impl Fn(usize) -> Key) -> Vec<u32> {
    const BLOCK: usize = 256;
    debug_assert!(groups.is_power_of_two() && groups <= SHARDS);
    // Consecutive shards share their top bits of the hash, so a key's
    // thread is its hash's top `log2(groups)` bits: a shift, where dividing
    // the shard by a run-time `SHARDS / groups` cost a division a key (it
    // was most of this pass).
    if groups == 1 {
        return (0..n as u32).collect();
    }
    let skip = 64 - groups.ilog2();
    let g = g as u64;
    let mut mine = Vec::with_capacity(n / groups + n / groups / 8 + BLOCK);
    let mut block = [0u32; BLOCK];
    let mut start = 0;
    while start < n {
        let end = (start + BLOCK).min(n);
        let mut len = 0;
        for i in start..end {
            block[len] = i as u32;
            len += usize::from(hash(key_at(i)) >> skip == g);
        }
        mine.extend_from_slice(&block[..len]);
        start = end;
    }
    mine
}

/// Slots of the ring of hashes the push and pull loops keep between
/// prefetching a key and reaching it: a power of two above
/// [`PREFETCH_AHEAD`], so the index is a mask.
const RING: usize = 16;
const _: () = assert!(RING > PREFETCH_AHEAD && RING.is_power_of_two());

/// The initial weights of `key` under `init`, written into `out` (`dim` floats).
///
/// `Uniform` draws element `i` from `(seed, key, i)` alone, so every replica
/// and every restart computes the same value without storing it.
pub fn initial(init: &Init, key: Key, out: &mut [f32]) {
    match *init {
        Init::Zero => out.fill(0.0),
        Init::Uniform { scale, seed } => {
            let base = splitmix64(seed ^ splitmix64(key));
            for (i, x) in out.iter_mut().enumerate() {
                let h = splitmix64(base.wrapping_add((i as u64).wrapping_mul(GOLDEN)));
                // Top 24 bits: exactly representable, so u is in [0, 1) and
                // 2u - 1 in [-1, 1) without rounding up to 1.
                let u = (h >> 40) as f32 * (1.0 / (1u32 << 24) as f32);
                *x = (2.0 * u - 1.0) * scale;
            }
        }
    }
}

/// 2^64 / golden ratio, the splitmix64 increment.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The splitmix64 finalizer (Steele, Lea, Flood 2014): a cheap bijective
/// mixer whose outputs look independent for consecutive inputs.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests;
