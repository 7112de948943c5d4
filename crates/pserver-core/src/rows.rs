//! A hash table from keys to fixed-width rows of floats, each row stored
//! inline beside its key in one flat array.
//!
//! Why not `HashMap<Key, slot>` plus a slab: on a table much larger than the
//! cache, that costs two cache misses per key (the index bucket, then the
//! slab row), and hashbrown's control bytes and padding cost about 9 bytes a
//! key beyond the content. Here a key and its row share one bucket, so a
//! lookup of a present key usually touches one cache line, and a table of
//! dim-1 AdaGrad rows (8-byte key + 8 bytes of floats) costs about 16 bytes
//! divided by the load factor.
//!
//! Open addressing with linear probing; keys are never removed one by one,
//! so no tombstones are needed: a server drops the keys of ranges it handed
//! away all at once ([`Rows::retain`]), which rebuilds the table at the size
//! the kept keys need, so the memory returns. The bucket of a key is
//! Fibonacci hashing of the folded key, which spreads consecutive keys (dense
//! ranges) evenly as well as random ones.
//!
//! Layout: bucket `b` is `cells[b * stride..][..stride]`: two cells holding
//! the key's low and high 32 bits (as `f32::from_bits`, so the whole table is
//! one `Vec<f32>` that updaters can borrow rows of without conversion), then
//! `width` floats of row. An empty bucket holds [`EMPTY`] as its key; the one
//! key equal to [`EMPTY`] lives in a side row.

use crate::key::Key;

/// The key value that marks an empty bucket. It is `KEY_END`, which no key
/// range contains, but a row for it is still kept (aside) so the table
/// accepts every `u64`.
const EMPTY: Key = u64::MAX;

/// Buckets of a table that has held at least one key, at the start.
const MIN_BUCKETS: usize = 16;

/// Grow when more than `LOAD_NUM / LOAD_DEN` of the buckets are full: linear
/// probing's expected probe count climbs quickly past 0.8.
const LOAD_NUM: usize = 4;
const LOAD_DEN: usize = 5;

/// 2^64 / golden ratio: Fibonacci hashing's multiplier.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// Top bits of a key's [`hash`] that a bucket index does not use: a store
/// picks one of its `1 << HASH_SKIP` shards by them, so the hash is
/// computed once per key for both.
pub const HASH_SKIP: u32 = 3;

/// The hash of `key` that places it: Fibonacci hashing of the folded key.
/// Folding the high half in first keeps keys that differ only in their top
/// bits (say, per-table prefixes) from sharing a bucket. Its top
/// [`HASH_SKIP`] bits are for the caller (a store's shard), the bits below
/// pick the bucket.
#[inline]
pub fn hash(key: Key) -> u64 {
    (key ^ (key >> 32)).wrapping_mul(GOLDEN)
}

/// Keys to fixed-width rows of `f32`, stored inline. See the module docs.
#[derive(Clone)]
pub struct Rows {
    cells: Vec<f32>,
    /// Floats per row.
    width: usize,
    /// Cells per bucket: 2 for the key, then `width`.
    stride: usize,
    /// A power of two, or 0 before the first insert.
    buckets: usize,
    /// `64 - log2(buckets)`: the hash's top bits pick the bucket.
    shift: u32,
    /// Keys stored in buckets (not counting `aside`).
    len: usize,
    /// The row of key [`EMPTY`], which cannot live in a bucket.
    aside: Option<Box<[f32]>>,
}

impl std::fmt::Debug for Rows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rows")
            .field("width", &self.width)
            .field("len", &self.len())
            .field("buckets", &self.buckets)
            .finish_non_exhaustive()
    }
}

impl Rows {
    /// An empty table of rows of `width` floats. Allocates nothing yet.
    pub fn new(width: usize) -> Rows {
        Rows {
            cells: Vec::new(),
            width,
            stride: width.saturating_add(2),
            buckets: 0,
            shift: 64,
            len: 0,
            aside: None,
        }
    }

    /// Floats per row.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Number of keys stored.
    pub fn len(&self) -> usize {
        self.len + usize::from(self.aside.is_some())
    }

    /// True when no key is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes allocated for rows and keys.
    pub fn memory_bytes(&self) -> usize {
        let aside = self.aside.as_ref().map_or(0, |r| r.len());
        (self.cells.capacity() + aside).saturating_mul(size_of::<f32>())
    }

    /// The row of `key`, if stored.
    #[inline]
    pub fn get(&self, key: Key) -> Option<&[f32]> {
        self.get_hashed(key, hash(key))
    }

    /// [`Rows::get`] for a key whose [`hash`] the caller has already
    /// computed (a store picks the shard with the same hash).
    #[inline]
    pub fn get_hashed(&self, key: Key, h: u64) -> Option<&[f32]> {
        if key == EMPTY {
            return self.aside.as_deref();
        }
        let Probe::Found(b) = self.find(key, h) else {
            return None;
        };
        self.cells.get(self.row_range(b))
    }

    /// The row of `key` for writing, if stored.
    #[inline]
    pub fn get_mut(&mut self, key: Key) -> Option<&mut [f32]> {
        if key == EMPTY {
            return self.aside.as_deref_mut();
        }
        let Probe::Found(b) = self.find(key, hash(key)) else {
            return None;
        };
        let r = self.row_range(b);
        self.cells.get_mut(r)
    }

    /// The row of `key`, inserted first if missing: zeroed, then handed to
    /// `init`. `None` only when memory for the table cannot be had (the
    /// table is then unchanged), so a huge table fails softly instead of
    /// aborting the process.
    #[inline]
    pub fn get_or_insert(&mut self, key: Key, init: impl FnOnce(&mut [f32])) -> Option<&mut [f32]> {
        self.get_or_insert_hashed(key, hash(key), init)
    }

    /// [`Rows::get_or_insert`] for a key whose [`hash`] is `h`.
    #[inline]
    pub fn get_or_insert_hashed(
        &mut self,
        key: Key,
        h: u64,
        init: impl FnOnce(&mut [f32]),
    ) -> Option<&mut [f32]> {
        if key == EMPTY {
            if self.aside.is_none() {
                let mut row = Vec::new();
                row.try_reserve_exact(self.width).ok()?;
                row.resize(self.width, 0.0);
                init(&mut row);
                self.aside = Some(row.into_boxed_slice());
            }
            return self.aside.as_deref_mut();
        }
        let b = match self.find(key, h) {
            Probe::Found(b) => b,
            Probe::Vacant(b) if !self.full() => self.occupy(b, key, init)?,
            Probe::Vacant(_) | Probe::NoRoom => {
                self.grow()?;
                let Probe::Vacant(b) = self.find(key, h) else {
                    return None;
                };
                self.occupy(b, key, init)?
            }
        };
        let r = self.row_range(b);
        self.cells.get_mut(r)
    }

    /// Keeps only the keys for which `keep(key)` is true, rebuilding the
    /// table at the size the kept keys need (so the memory of the dropped
    /// ones returns). Returns how many keys were dropped. When memory for
    /// the smaller table cannot be had, the table is left as it was and 0
    /// is returned.
    pub fn retain(&mut self, keep: impl Fn(Key) -> bool) -> usize {
        let before = self.len();
        let kept = self.iter().filter(|(k, _)| keep(*k)).count();
        if kept == before {
            return 0;
        }
        let mut fresh = Rows::new(self.width);
        // Sized up front: one allocation, no regrowth while copying.
        let mut buckets = if kept == 0 { 0 } else { MIN_BUCKETS };
        while buckets > 0 && kept * LOAD_DEN > buckets * LOAD_NUM {
            buckets *= 2;
        }
        if buckets > 0 {
            let Some(total) = buckets.checked_mul(fresh.stride) else {
                return 0;
            };
            let Some(cells) = empty_cells(total) else {
                return 0;
            };
            fresh.cells = cells;
            fresh.buckets = buckets;
            fresh.shift = 64 - buckets.trailing_zeros();
        }
        for (key, row) in self.iter().filter(|(k, _)| keep(*k)) {
            match fresh.get_or_insert(key, |_| {}) {
                Some(dst) => dst.copy_from_slice(row),
                None => return 0,
            }
        }
        *self = fresh;
        before - kept
    }

    /// Every stored key with its row, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (Key, &[f32])> + '_ {
        let stride = self.stride;
        let width = self.width;
        self.cells
            .chunks_exact(stride)
            .filter_map(move |bucket| {
                let key = key_of(bucket);
                (key != EMPTY).then(|| (key, &bucket[2..2 + width]))
            })
            .chain(self.aside.as_deref().map(|row| (EMPTY, row)))
    }

    /// Where `key` is, or the empty bucket where it would go, as the index
    /// of the bucket's first cell (so callers index its row without
    /// multiplying again).
    #[inline]
    fn find(&self, key: Key, h: u64) -> Probe {
        let cells = self.cells.as_slice();
        // `cells` holds exactly `buckets * stride` cells (see `grow`), so
        // none before the first insert.
        let end = cells.len();
        if end == 0 {
            return Probe::NoRoom;
        }
        let stride = self.stride;
        let mut at = self.home(h) * stride;
        // A load factor under 1 guarantees an empty bucket, so this ends;
        // the bound only turns a broken invariant into a miss, not a hang.
        for _ in 0..self.buckets {
            let Some(bucket) = cells.get(at..at + 2) else {
                return Probe::NoRoom;
            };
            match key_of(bucket) {
                k if k == key => return Probe::Found(at),
                EMPTY => return Probe::Vacant(at),
                // The next bucket, wrapping at the end: an add and a
                // compare rather than a multiply per probe.
                _ => {
                    at += stride;
                    if at >= end {
                        at = 0;
                    }
                }
            }
        }
        Probe::NoRoom
    }

    /// Asks the CPU to start fetching the cache line of `key`'s home
    /// bucket. A loop over many keys calls it a few keys ahead, so that
    /// several cache misses are in flight at once instead of one after
    /// another (a table far larger than the cache misses on nearly every
    /// key; a plain load would hold up the loop until it arrives). It
    /// changes nothing and costs a few instructions where the line is
    /// already cached; elsewhere than x86-64 it does nothing.
    #[inline]
    pub fn prefetch(&self, key: Key) {
        self.prefetch_hashed(hash(key));
    }

    /// [`Rows::prefetch`] for a key whose [`hash`] is `h`.
    #[inline]
    pub fn prefetch_hashed(&self, h: u64) {
        if self.buckets == 0 {
            return;
        }
        if let Some(cell) = self.cells.get(self.home(h) * self.stride) {
            prefetch_line(cell);
        }
    }

    /// The first bucket probed for a key of hash `h`: the bits just below
    /// the top [`HASH_SKIP`] (those pick a store's shard, so every bucket of
    /// a shard's table is used). `buckets` is at least [`MIN_BUCKETS`]
    /// here, so the shift is below 64.
    #[inline]
    fn home(&self, h: u64) -> usize {
        ((h << HASH_SKIP) >> self.shift) as usize
    }

    /// Cells of the row of the bucket whose first cell is `at`.
    #[inline]
    fn row_range(&self, at: usize) -> std::ops::Range<usize> {
        let start = at + 2;
        start..start + self.width
    }

    /// Whether one more key would pass the load limit.
    #[inline]
    fn full(&self) -> bool {
        self.buckets == 0 || (self.len + 1) * LOAD_DEN > self.buckets * LOAD_NUM
    }

    /// Writes `key` into the empty bucket whose first cell is `start`
    /// (from [`Rows::find`], so in bounds) with a zeroed row given to
    /// `init`.
    #[inline]
    fn occupy(&mut self, start: usize, key: Key, init: impl FnOnce(&mut [f32])) -> Option<usize> {
        let cells = self.cells.get_mut(start..start + self.stride)?;
        cells[0] = f32::from_bits(key as u32);
        cells[1] = f32::from_bits((key >> 32) as u32);
        let row = &mut cells[2..];
        row.fill(0.0);
        init(row);
        self.len += 1;
        Some(start)
    }

    /// Doubles the buckets and re-inserts every key. `None` (and nothing
    /// changed) when the bigger array cannot be allocated.
    fn grow(&mut self) -> Option<()> {
        let buckets = if self.buckets == 0 {
            MIN_BUCKETS
        } else {
            self.buckets.checked_mul(2)?
        };
        let total = buckets.checked_mul(self.stride)?;
        let cells = empty_cells(total)?;
        let old = std::mem::replace(&mut self.cells, cells);
        self.buckets = buckets;
        self.shift = 64 - buckets.trailing_zeros();
        for bucket in old.chunks_exact(self.stride) {
            let key = key_of(bucket);
            if key == EMPTY {
                continue;
            }
            if let Probe::Vacant(start) = self.find(key, hash(key)) {
                if let Some(dst) = self.cells.get_mut(start..start + self.stride) {
                    dst.copy_from_slice(bucket);
                }
            }
        }
        Some(())
    }
}

/// What probing for a key found; buckets are named by their first cell.
enum Probe {
    /// The key is in this bucket.
    Found(usize),
    /// The key is absent; this empty bucket is where it goes.
    Vacant(usize),
    /// No buckets yet (or, were the load invariant broken, none empty).
    NoRoom,
}

/// The key in a bucket's first two cells.
#[inline]
fn key_of(bucket: &[f32]) -> Key {
    u64::from(bucket[0].to_bits()) | (u64::from(bucket[1].to_bits()) << 32)
}

/// `total` cells of empty buckets, or `None` when the memory cannot be
/// had. A large table asks for transparent huge pages before its pages
/// are first touched ([`advise_huge_pages`]).
fn empty_cells(total: usize) -> Option<Vec<f32>> {
    let mut cells = Vec::new();
    cells.try_reserve_exact(total).ok()?;
    advise_huge_pages(&cells);
    cells.resize(total, f32::from_bits(u32::MAX));
    Some(cells)
}

/// Tables from this many bytes ask for huge pages: below it a table's
/// pages fit the TLB well enough.
const HUGE_FROM: usize = 8 << 20;

/// 2 MiB: the huge page size of x86-64 and of arm64 with 4 KiB pages.
const HUGE_PAGE: usize = 2 << 20;

/// Asks the kernel to back the allocation of `v` (its capacity, not yet
/// touched) with transparent huge pages where it is aligned to them. A
/// table far larger than the cache otherwise takes a TLB miss on nearly
/// every key, on top of the cache miss; measured on a 16M-key table,
/// 65,536-key requests, one thread, 3 interleaved pairs: push 15.5-16.1M
/// to 19.7-20.4M keys/s, pull 19.8-19.9M to 23.7-24.2M. Only advice: the
/// kernel may decline (THP `never`), and then nothing changes. Linux only.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn advise_huge_pages(v: &Vec<f32>) {
    let bytes = v.capacity().saturating_mul(std::mem::size_of::<f32>());
    if bytes < HUGE_FROM {
        return;
    }
    let begin = v.as_ptr() as usize;
    let (Some(first), Some(end)) = (
        begin.checked_next_multiple_of(HUGE_PAGE),
        begin.checked_add(bytes),
    ) else {
        return;
    };
    let last = end - end % HUGE_PAGE;
    if last <= first {
        return;
    }
    // SAFETY: [first, last) lies inside the allocation `v` owns (rounded
    // inward to huge-page boundaries), and MADV_HUGEPAGE changes neither
    // its contents nor whether it is mapped, only how the kernel backs
    // it. An error (no THP in this kernel) leaves it as it was and is
    // ignored: it is advice.
    unsafe {
        libc::madvise(
            first as *mut libc::c_void,
            last - first,
            libc::MADV_HUGEPAGE,
        );
    }
}

/// Elsewhere: no advice.
#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_v: &Vec<f32>) {}

/// `n` zeros, whose memory, when it is 8 MB or more and still untouched
/// (fresh from the kernel), is advised onto transparent huge pages before
/// anything writes to it: a large answer (a dense pull's 64 MB) then takes
/// a page fault per 2 MiB instead of per 4 KiB as it is filled (`perf`:
/// those faults were most of what a dense pull spent on its answer).
pub fn zeroed(n: usize) -> Vec<f32> {
    let v = vec![0.0f32; n];
    advise_huge_pages(&v);
    v
}

/// The prefetch hint of [`Rows::prefetch`].
#[cfg(target_arch = "x86_64")]
#[inline]
#[allow(unsafe_code)]
fn prefetch_line(cell: &f32) {
    // SAFETY: `_mm_prefetch` is only a hint: it reads nothing into the
    // program, writes nothing, and never faults, whatever the address
    // (here a reference, so valid anyway). SSE, which it needs, is part of
    // every x86-64 CPU.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            std::ptr::from_ref(cell).cast::<i8>(),
        );
    }
}

/// Elsewhere: no hint.
#[cfg(not(target_arch = "x86_64"))]
#[inline]
fn prefetch_line(_cell: &f32) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_is_zeros_at_every_size() {
        for n in [0, 1, 1000, HUGE_FROM / 4 + 12_345] {
            let mut v = zeroed(n);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|&x| x.to_bits() == 0));
            // Writable like any vector, huge pages or not.
            if let Some(last) = v.last_mut() {
                *last = 1.0;
            }
        }
    }

    #[test]
    fn a_table_large_enough_for_huge_pages_keeps_every_row() {
        // Past HUGE_FROM the buckets are advised before their first
        // touch; whatever the kernel does with that, nothing may change.
        let mut r = Rows::new(1);
        let n = 1u64 << 20;
        for k in 0..n {
            let key = k.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            r.get_or_insert(key, |row| row[0] = k as f32).unwrap();
        }
        assert!(r.memory_bytes() >= HUGE_FROM, "{}", r.memory_bytes());
        assert_eq!(r.len(), n as usize);
        for k in (0..n).step_by(997) {
            let key = k.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            assert_eq!(r.get(key), Some(&[k as f32][..]));
        }
        // Rebuilt smaller (still past the threshold): the kept rows stay.
        let dropped = r.retain(|key| key % 2 == 0);
        assert_eq!(dropped + r.len(), n as usize);
        for k in (0..n).step_by(991) {
            let key = k.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let row = [k as f32];
            let want = (key % 2 == 0).then_some(&row[..]);
            assert_eq!(r.get(key), want);
        }
    }
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn insert_get_grow() {
        let mut t = Rows::new(2);
        assert!(t.is_empty());
        assert_eq!(t.get(5), None);
        for k in 0..10_000u64 {
            let row = t.get_or_insert(k * 7, |r| r[0] = k as f32).expect("memory");
            row[1] += 1.0;
        }
        assert_eq!(t.len(), 10_000);
        for k in 0..10_000u64 {
            assert_eq!(t.get(k * 7), Some(&[k as f32, 1.0][..]));
        }
        assert_eq!(t.get(3), None);
        // Present keys are not re-initialized.
        t.get_or_insert(14, |r| r[0] = -1.0).unwrap()[1] += 1.0;
        assert_eq!(t.get(14), Some(&[2.0, 2.0][..]));
        assert_eq!(t.iter().count(), 10_000);
        // 10,000 keys at most 0.8 full: 16,384 buckets of 4 cells.
        assert_eq!(t.memory_bytes(), 16_384 * 4 * 4);
    }

    #[test]
    fn the_marker_key_and_zero_width() {
        let mut t = Rows::new(1);
        t.get_or_insert(u64::MAX, |r| r[0] = 3.0).unwrap();
        t.get_or_insert(0, |_| {}).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.get(u64::MAX), Some(&[3.0][..]));
        t.get_mut(u64::MAX).unwrap()[0] = 4.0;
        let mut all: Vec<_> = t.iter().map(|(k, r)| (k, r.to_vec())).collect();
        all.sort_by_key(|e| e.0);
        assert_eq!(all, [(0, vec![0.0]), (u64::MAX, vec![4.0])]);

        let mut z = Rows::new(0);
        z.get_or_insert(9, |_| {}).unwrap();
        assert_eq!(z.get(9), Some(&[][..]));
        assert_eq!(z.len(), 1);
    }

    #[test]
    fn keys_whose_halves_look_like_nan_survive() {
        // Key halves are stored as f32 bit patterns; NaN-shaped ones must
        // come back bit for bit.
        let mut t = Rows::new(1);
        let keys = [
            0x7FC0_0001_FFC0_0000u64,
            0xFFFF_FFFF_0000_0000,
            0x0000_0000_FFFF_FFFF,
        ];
        for &k in &keys {
            t.get_or_insert(k, |r| r[0] = 1.0).unwrap();
        }
        for &k in &keys {
            assert_eq!(t.get(k), Some(&[1.0][..]), "{k:x}");
        }
    }

    #[test]
    fn retain_drops_keys_and_returns_memory() {
        let mut t = Rows::new(1);
        for k in 0..10_000u64 {
            t.get_or_insert(k, |r| r[0] = k as f32).unwrap();
        }
        t.get_or_insert(u64::MAX, |r| r[0] = -1.0).unwrap();
        let big = t.memory_bytes();
        assert_eq!(t.retain(|k| k < 100 || k == u64::MAX), 9_900);
        assert_eq!(t.len(), 101);
        assert!(t.memory_bytes() * 50 < big, "{} of {big}", t.memory_bytes());
        for k in 0..100u64 {
            assert_eq!(t.get(k), Some(&[k as f32][..]));
        }
        assert_eq!(t.get(100), None);
        assert_eq!(t.get(u64::MAX), Some(&[-1.0][..]));
        assert_eq!(t.retain(|_| true), 0);
        assert_eq!(t.retain(|_| false), 101);
        assert!(t.is_empty());
        assert_eq!(t.memory_bytes(), 0);
        t.get_or_insert(5, |r| r[0] = 5.0).unwrap();
        assert_eq!(t.get(5), Some(&[5.0][..]), "usable after emptying");
    }

    proptest! {
        #[test]
        fn behaves_like_a_map(ops in prop::collection::vec((0u64..64, any::<bool>(), -4.0f32..4.0), 0..400),
                              high in any::<u64>()) {
            // Keys from a small set plus a shared high part: many collide in
            // their home bucket and the table grows several times.
            let mut t = Rows::new(1);
            let mut model: BTreeMap<u64, f32> = BTreeMap::new();
            for (k, write, v) in ops {
                let key = (k << 40) ^ high;
                if write {
                    t.get_or_insert(key, |_| {}).unwrap()[0] += v;
                    *model.entry(key).or_default() += v;
                } else {
                    prop_assert_eq!(t.get(key).map(|r| r[0]), model.get(&key).copied());
                }
            }
            prop_assert_eq!(t.len(), model.len());
            let mut all: Vec<(u64, f32)> = t.iter().map(|(k, r)| (k, r[0])).collect();
            all.sort_by_key(|e| e.0);
            prop_assert_eq!(all, model.into_iter().collect::<Vec<_>>());
        }
    }
}
