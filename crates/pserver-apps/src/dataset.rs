//! A worker's share of the training data in memory, over a local
//! dictionary of the keys it holds, in one compact layout: by row (CSR)
//! for predictions and minibatches (FTRL, the test set), or by column
//! (CSC) for per-coordinate gradients (DBPG), never both at once.
//!
//! What an entry costs: its index, a `u32` (4 bytes); its value, an `f32`,
//! only when some value of the shard is not 1.0 (hashed click data is
//! binary, so its values are not stored at all); per row its label and
//! (by row) where it starts, `u32` offsets while the entries fit in 32
//! bits; per key the `u64` key and (by column) where its column starts.
//! While loading, the [`Builder`] holds a provisional `u32` id per entry
//! and one hash map entry per distinct key, never a `u64` per entry.

use pserver_core::{KEY_END, Key};
use rustc_hash::FxHashMap;
use std::ops::Range;

/// Where each row's (or column's) entries begin and end: `u32` offsets
/// while they fit, `u64` past that.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Offsets {
    /// Every offset below 2^32.
    Narrow(Vec<u32>),
    /// Some offset is not.
    Wide(Vec<u64>),
}

impl Default for Offsets {
    fn default() -> Offsets {
        Offsets::Narrow(vec![0])
    }
}

impl Offsets {
    /// Number of offsets (one more than the rows or columns they bound).
    pub fn len(&self) -> usize {
        match self {
            Offsets::Narrow(v) => v.len(),
            Offsets::Wide(v) => v.len(),
        }
    }

    /// True when there is no offset at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Offset `i`.
    #[inline]
    pub fn get(&self, i: usize) -> usize {
        match self {
            Offsets::Narrow(v) => v[i] as usize,
            Offsets::Wide(v) => v[i] as usize,
        }
    }

    /// Entries of row (or column) `i`.
    #[inline]
    pub fn range(&self, i: usize) -> Range<usize> {
        match self {
            Offsets::Narrow(v) => v[i] as usize..v[i + 1] as usize,
            Offsets::Wide(v) => v[i] as usize..v[i + 1] as usize,
        }
    }

    /// Appends an offset, widening when it does not fit in 32 bits.
    pub fn push(&mut self, at: usize) {
        match self {
            Offsets::Narrow(v) => match u32::try_from(at) {
                Ok(a) => v.push(a),
                Err(_) => {
                    let mut w: Vec<u64> = v.iter().map(|&o| o as u64).collect();
                    w.push(at as u64);
                    *self = Offsets::Wide(w);
                }
            },
            Offsets::Wide(v) => v.push(at as u64),
        }
    }

    /// Offsets from counts: `0, c0, c0 + c1, ...`.
    fn prefix_sums(counts: &[u32]) -> Offsets {
        let total: u64 = counts.iter().map(|&c| c as u64).sum();
        let mut out = if total <= u32::MAX as u64 {
            Offsets::Narrow(Vec::with_capacity(counts.len() + 1))
        } else {
            Offsets::Wide(Vec::with_capacity(counts.len() + 1))
        };
        let mut at = 0usize;
        out.push(0);
        for &c in counts {
            at += c as usize;
            out.push(at);
        }
        out
    }

    fn shrink_to_fit(&mut self) {
        match self {
            Offsets::Narrow(v) => v.shrink_to_fit(),
            Offsets::Wide(v) => v.shrink_to_fit(),
        }
    }

    /// Bytes allocated.
    pub fn bytes(&self) -> usize {
        match self {
            Offsets::Narrow(v) => v.capacity() * 4,
            Offsets::Wide(v) => v.capacity() * 8,
        }
    }
}

/// A sparse matrix compressed along its major dimension (rows of a CSR,
/// columns of a CSC): line `i` holds entries `ptr.range(i)`, each with the
/// index `idx[e]` along the other dimension and the value `vals[e]`, or
/// 1.0 when `vals` is `None` (every value is 1.0: binary features).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sparse {
    /// Where each line's entries begin.
    pub ptr: Offsets,
    /// The other dimension's index of each entry.
    pub idx: Vec<u32>,
    /// The value of each entry; `None` when every value is 1.0.
    pub vals: Option<Vec<f32>>,
}

impl Sparse {
    /// Lines (rows of a CSR, columns of a CSC).
    pub fn lines(&self) -> usize {
        self.ptr.len().saturating_sub(1)
    }

    /// Entries.
    pub fn nnz(&self) -> usize {
        self.idx.len()
    }

    /// Entries of line `i`.
    #[inline]
    pub fn range(&self, i: usize) -> Range<usize> {
        self.ptr.range(i)
    }

    /// The value of entry `e`.
    #[inline]
    pub fn value(&self, e: usize) -> f32 {
        match &self.vals {
            None => 1.0,
            Some(v) => v[e],
        }
    }

    /// Line `i`'s entries: (index, value).
    #[inline]
    pub fn line(&self, i: usize) -> impl Iterator<Item = (u32, f32)> + '_ {
        let r = self.range(i);
        let vals = self.vals.as_deref().map(|v| &v[r.clone()]);
        self.idx[r]
            .iter()
            .enumerate()
            .map(move |(n, &j)| (j, vals.map_or(1.0, |v| v[n])))
    }

    /// The same entries along the other dimension (of `minor` lines):
    /// each new line's entries in the order of the old lines.
    pub fn transpose(&self, minor: usize) -> Sparse {
        let mut count = vec![0u32; minor];
        for &j in &self.idx {
            count[j as usize] += 1;
        }
        let ptr = Offsets::prefix_sums(&count);
        // Reuse the counts as each new line's next free slot.
        let mut next: Vec<usize> = (0..minor).map(|j| ptr.get(j)).collect();
        drop(count);
        let mut idx = vec![0u32; self.idx.len()];
        let mut vals = self.vals.as_ref().map(|_| vec![0f32; self.idx.len()]);
        for i in 0..self.lines() {
            for e in self.range(i) {
                let j = self.idx[e] as usize;
                idx[next[j]] = i as u32;
                if let (Some(out), Some(v)) = (vals.as_mut(), self.vals.as_ref()) {
                    out[next[j]] = v[e];
                }
                next[j] += 1;
            }
        }
        Sparse { ptr, idx, vals }
    }

    /// Bytes allocated.
    pub fn bytes(&self) -> usize {
        self.ptr.bytes()
            + self.idx.capacity() * 4
            + self.vals.as_ref().map_or(0, |v| v.capacity() * 4)
    }
}

/// Which way a [`Dataset`] holds its entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// By row (CSR): lines are rows, indices local columns.
    Rows,
    /// By column (CSC): lines are local columns, indices rows.
    Columns,
}

/// Examples over local column ids, by row or by column.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// Label of each row, 0 or 1.
    pub labels: Vec<f32>,
    /// The global key of each local column, sorted ascending.
    pub keys: Vec<Key>,
    /// The entries, along `layout`.
    pub entries: Sparse,
    /// Which way `entries` runs.
    pub layout: Layout,
}

impl Default for Dataset {
    fn default() -> Dataset {
        Dataset {
            labels: Vec::new(),
            keys: Vec::new(),
            entries: Sparse::default(),
            layout: Layout::Rows,
        }
    }
}

/// Builds a [`Dataset`] from examples with global keys.
///
/// Each entry is held as a provisional `u32` id (in the order keys are
/// first seen) and each distinct key once in a hash map; `build` sorts the
/// distinct keys and renumbers the entries in place, so the local ids are
/// in key order.
pub struct Builder {
    labels: Vec<f32>,
    row_ptr: Offsets,
    ids: Vec<u32>,
    /// `None` while every value added is 1.0.
    vals: Option<Vec<f32>>,
    seen: FxHashMap<Key, u32>,
}

impl Default for Builder {
    fn default() -> Builder {
        Builder::new()
    }
}

impl Builder {
    /// An empty builder.
    pub fn new() -> Builder {
        Builder {
            labels: Vec::new(),
            row_ptr: Offsets::default(),
            ids: Vec::new(),
            vals: None,
            seen: FxHashMap::default(),
        }
    }

    /// Adds one example (`label` 0 or 1; keys and values paired, a key
    /// without a value has 1.0).
    ///
    /// # Panics
    ///
    /// When one builder sees more than `u32::MAX` distinct keys.
    pub fn add(&mut self, label: f32, keys: &[Key], vals: &[f32]) {
        self.labels.push(label);
        let start = self.ids.len();
        for &k in keys {
            let next = self.seen.len();
            let id = *self.seen.entry(k).or_insert_with(|| {
                u32::try_from(next).expect("more than 2^32 distinct keys in one shard")
            });
            self.ids.push(id);
        }
        let given = &vals[..keys.len().min(vals.len())];
        if self.vals.is_none() && given.iter().any(|&v| v != 1.0) {
            self.vals = Some(vec![1.0; start]);
        }
        if let Some(v) = &mut self.vals {
            v.extend_from_slice(given);
            v.resize(self.ids.len(), 1.0);
        }
        self.row_ptr.push(self.ids.len());
    }

    /// Rows added so far.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when no row was added.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Replaces global keys by local column ids: the dataset by row.
    pub fn build(self) -> Dataset {
        let Builder {
            mut labels,
            mut row_ptr,
            mut ids,
            mut vals,
            seen,
        } = self;
        let mut pairs: Vec<(Key, u32)> = seen.into_iter().collect();
        pairs.sort_unstable_by_key(|p| p.0);
        let mut rank = vec![0u32; pairs.len()];
        for (r, &(_, id)) in pairs.iter().enumerate() {
            rank[id as usize] = r as u32;
        }
        let keys: Vec<Key> = pairs.into_iter().map(|p| p.0).collect();
        for id in &mut ids {
            *id = rank[*id as usize];
        }
        drop(rank);
        labels.shrink_to_fit();
        row_ptr.shrink_to_fit();
        ids.shrink_to_fit();
        if let Some(v) = &mut vals {
            v.shrink_to_fit();
        }
        Dataset {
            labels,
            keys,
            entries: Sparse {
                ptr: row_ptr,
                idx: ids,
                vals,
            },
            layout: Layout::Rows,
        }
    }

    /// The dataset by column (what DBPG needs): built by row, transposed,
    /// and the rows dropped.
    pub fn build_columns(self) -> Dataset {
        self.build().into_columns()
    }
}

impl Dataset {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.labels.len()
    }

    /// Number of entries (non-zeros).
    pub fn nnz(&self) -> usize {
        self.entries.nnz()
    }

    /// True when every value is 1.0 (no value is stored).
    pub fn binary(&self) -> bool {
        self.entries.vals.is_none()
    }

    /// The same data by column (a no-op when it is already).
    pub fn into_columns(self) -> Dataset {
        match self.layout {
            Layout::Columns => self,
            Layout::Rows => {
                let entries = self.entries.transpose(self.keys.len());
                Dataset {
                    labels: self.labels,
                    keys: self.keys,
                    entries,
                    layout: Layout::Columns,
                }
            }
        }
    }

    /// The same data by row (a no-op when it is already).
    pub fn into_rows(self) -> Dataset {
        match self.layout {
            Layout::Rows => self,
            Layout::Columns => {
                let entries = self.entries.transpose(self.labels.len());
                Dataset {
                    labels: self.labels,
                    keys: self.keys,
                    entries,
                    layout: Layout::Rows,
                }
            }
        }
    }

    /// The entries by row.
    ///
    /// # Panics
    ///
    /// When the dataset is held by column.
    pub fn by_row(&self) -> &Sparse {
        assert_eq!(self.layout, Layout::Rows, "the dataset is held by column");
        &self.entries
    }

    /// The entries by column.
    ///
    /// # Panics
    ///
    /// When the dataset is held by row.
    pub fn by_column(&self) -> &Sparse {
        assert_eq!(self.layout, Layout::Columns, "the dataset is held by row");
        &self.entries
    }

    /// Local column bounds of `b` equal key-range blocks: block `j` is columns
    /// `bounds[j]..bounds[j + 1]`, the keys of `block_range(j, b)`.
    pub fn block_bounds(&self, b: usize) -> Vec<usize> {
        (0..=b)
            .map(|j| {
                let edge = block_edge(j, b);
                self.keys.partition_point(|&k| k < edge)
            })
            .collect()
    }

    /// `x_i . w` for every row, with `w` indexed by local column. By row,
    /// each row's products are summed in the row's order; by column they
    /// are added column by column (the same terms, so equal up to the
    /// rounding of their order).
    pub fn margins(&self, w: &[f32]) -> Vec<f64> {
        match self.layout {
            Layout::Rows => (0..self.rows())
                .map(|r| {
                    self.entries
                        .line(r)
                        .map(|(c, x)| x as f64 * w[c as usize] as f64)
                        .sum()
                })
                .collect(),
            Layout::Columns => {
                let mut m = vec![0f64; self.rows()];
                for (k, &wk) in w.iter().enumerate().take(self.entries.lines()) {
                    if wk == 0.0 {
                        continue;
                    }
                    for (r, x) in self.entries.line(k) {
                        m[r as usize] += x as f64 * wk as f64;
                    }
                }
                m
            }
        }
    }

    /// Bytes allocated for the data (labels, keys, entries).
    pub fn bytes(&self) -> usize {
        self.labels.capacity() * 4 + self.keys.capacity() * 8 + self.entries.bytes()
    }
}

/// The first key of block `j` of `b` (block `b` begins at [`KEY_END`]).
pub fn block_edge(j: usize, b: usize) -> Key {
    if j >= b {
        return KEY_END;
    }
    ((KEY_END as u128 * j as u128) / b as u128) as Key
}

/// The process's peak resident set size in bytes (`VmHWM` of
/// `/proc/self/status`), where the system says.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Sets the process's peak resident set size back to its current one
/// (`5` into `/proc/self/clear_refs`, Linux 4.0 on), so that
/// [`peak_rss`] measures from now; false where the system does not allow
/// it (then the peak is the process's whole life's).
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rows_columns_and_blocks_agree() {
        let mut b = Builder::new();
        b.add(1.0, &[10, u64::MAX / 2 + 5], &[1.0, 2.0]);
        b.add(0.0, &[10, 99], &[3.0, 4.0]);
        let d = b.build();
        assert_eq!(d.keys, vec![10, 99, u64::MAX / 2 + 5]);
        assert_eq!(d.entries.idx, vec![0, 2, 0, 1]);
        let c = d.clone().into_columns();
        assert_eq!(c.entries.ptr, Offsets::Narrow(vec![0, 2, 3, 4]));
        assert_eq!(c.entries.idx, vec![0, 1, 1, 0]);
        assert_eq!(c.entries.vals, Some(vec![1.0, 3.0, 4.0, 2.0]));
        assert_eq!(d.block_bounds(2), vec![0, 2, 3]);
        assert_eq!(d.margins(&[1.0, 1.0, 1.0]), vec![3.0, 7.0]);
        assert_eq!(c.margins(&[1.0, 1.0, 1.0]), vec![3.0, 7.0]);
        assert_eq!(c.clone().into_rows(), d);
        assert_eq!(block_edge(0, 4), 0);
        assert_eq!(block_edge(4, 4), KEY_END);
    }

    #[test]
    fn binary_data_stores_no_values() {
        let mut b = Builder::new();
        b.add(1.0, &[7, 3], &[1.0, 1.0]);
        b.add(0.0, &[3], &[]);
        let d = b.build();
        assert!(d.binary());
        assert_eq!(d.entries.value(0), 1.0);
        // One value that is not 1.0 stores them all, earlier ones as 1.0.
        let mut b = Builder::new();
        b.add(1.0, &[7, 3], &[1.0, 1.0]);
        b.add(0.0, &[3, 9], &[0.5]);
        let d = b.build();
        assert_eq!(d.entries.vals, Some(vec![1.0, 1.0, 0.5, 1.0]));
    }

    #[test]
    fn offsets_widen_past_32_bits() {
        let mut o = Offsets::default();
        o.push(5);
        o.push(u32::MAX as usize + 2);
        assert_eq!(o, Offsets::Wide(vec![0, 5, u32::MAX as u64 + 2]));
        assert_eq!(o.range(1), 5..u32::MAX as usize + 2);
        assert!(o.bytes() >= 24);
    }

    #[test]
    fn peak_rss_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss().unwrap() > 0);
            // A reset brings the peak down to about the current size.
            let big = vec![1u8; 64 << 20];
            std::hint::black_box(&big);
            drop(big);
            let before = peak_rss().unwrap();
            if reset_peak_rss() {
                assert!(peak_rss().unwrap() < before, "{before}");
            }
        }
    }

    /// The layout this module had before (CSR and CSC with every value
    /// stored, `usize` offsets, the dictionary by sorting every key), as
    /// the reference the compact one must equal.
    struct Old {
        labels: Vec<f32>,
        row_ptr: Vec<usize>,
        cols: Vec<u32>,
        vals: Vec<f32>,
        keys: Vec<Key>,
        col_ptr: Vec<usize>,
        col_rows: Vec<u32>,
        col_vals: Vec<f32>,
    }

    fn old(rows: &[(f32, Vec<Key>, Vec<f32>)]) -> Old {
        let (mut labels, mut row_ptr, mut all, mut vals) = (vec![], vec![0], vec![], vec![]);
        for (y, k, v) in rows {
            labels.push(*y);
            all.extend_from_slice(k);
            vals.extend_from_slice(&v[..k.len().min(v.len())]);
            vals.resize(all.len(), 1.0);
            row_ptr.push(all.len());
        }
        let mut keys = all.clone();
        keys.sort_unstable();
        keys.dedup();
        let cols: Vec<u32> = all
            .iter()
            .map(|k| keys.partition_point(|d| d < k) as u32)
            .collect();
        let n = keys.len();
        let mut count = vec![0usize; n + 1];
        for &c in &cols {
            count[c as usize + 1] += 1;
        }
        for i in 0..n {
            count[i + 1] += count[i];
        }
        let col_ptr = count.clone();
        let mut next = count;
        let mut col_rows = vec![0u32; cols.len()];
        let mut col_vals = vec![0f32; cols.len()];
        for r in 0..labels.len() {
            for e in row_ptr[r]..row_ptr[r + 1] {
                let c = cols[e] as usize;
                col_rows[next[c]] = r as u32;
                col_vals[next[c]] = vals[e];
                next[c] += 1;
            }
        }
        Old {
            labels,
            row_ptr,
            cols,
            vals,
            keys,
            col_ptr,
            col_rows,
            col_vals,
        }
    }

    /// Rows of keys from a small pool (so keys repeat, within rows too),
    /// spread over the whole key space, binary or not.
    fn rows() -> impl Strategy<Value = Vec<(f32, Vec<Key>, Vec<f32>)>> {
        let pool = prop::collection::vec(any::<u64>(), 1..40);
        (pool, any::<bool>()).prop_flat_map(|(pool, binary)| {
            let n = pool.len();
            let row = (
                prop::bool::ANY,
                prop::collection::vec(0..n, 0..8),
                prop::collection::vec(-3.0f32..3.0, 0..8),
            )
                .prop_map(move |(y, picks, v)| {
                    let keys: Vec<Key> = picks.iter().map(|&i| pool[i]).collect();
                    let vals = if binary { vec![1.0; keys.len()] } else { v };
                    (if y { 1.0 } else { 0.0 }, keys, vals)
                });
            prop::collection::vec(row, 0..30)
        })
    }

    proptest! {
        #[test]
        fn the_compact_layout_equals_the_old_one(rows in rows(), b in 1usize..7, seed in any::<u64>()) {
            let o = old(&rows);
            let mut builder = Builder::new();
            for (y, k, v) in &rows {
                builder.add(*y, k, v);
            }
            let d = builder.build();
            prop_assert_eq!(&d.labels, &o.labels);
            prop_assert_eq!(&d.keys, &o.keys);
            prop_assert_eq!(&d.entries.idx, &o.cols);
            let ptr: Vec<usize> = (0..o.row_ptr.len()).map(|i| d.entries.ptr.get(i)).collect();
            prop_assert_eq!(&ptr, &o.row_ptr);
            let vals: Vec<f32> = (0..d.nnz()).map(|e| d.entries.value(e)).collect();
            prop_assert_eq!(&vals, &o.vals);
            prop_assert_eq!(d.binary(), o.vals.iter().all(|&v| v == 1.0));
            prop_assert_eq!(d.block_bounds(b), {
                (0..=b).map(|j| o.keys.partition_point(|&k| k < block_edge(j, b))).collect::<Vec<_>>()
            });

            // Columns: the same entries in the same order.
            let c = d.clone().into_columns();
            let cptr: Vec<usize> = (0..o.col_ptr.len()).map(|i| c.entries.ptr.get(i)).collect();
            prop_assert_eq!(&cptr, &o.col_ptr);
            prop_assert_eq!(&c.entries.idx, &o.col_rows);
            let cvals: Vec<f32> = (0..c.nnz()).map(|e| c.entries.value(e)).collect();
            prop_assert_eq!(&cvals, &o.col_vals);
            prop_assert_eq!(c.block_bounds(b), d.block_bounds(b));
            // Back by row: each row's entries, sorted by column.
            let back = c.clone().into_rows();
            for r in 0..d.rows() {
                let mut want: Vec<(u32, u32)> = d.entries.line(r).map(|(j, x)| (j, x.to_bits())).collect();
                want.sort_unstable();
                let mut got: Vec<(u32, u32)> = back.entries.line(r).map(|(j, x)| (j, x.to_bits())).collect();
                prop_assert!(got.is_sorted_by_key(|e| e.0));
                got.sort_unstable();
                prop_assert_eq!(got, want);
            }
            let direct = {
                let mut builder = Builder::new();
                for (y, k, v) in &rows {
                    builder.add(*y, k, v);
                }
                builder.build_columns()
            };
            prop_assert_eq!(&direct, &c);

            // Margins: by row bit for bit as before; by column the same
            // terms in another order.
            let mut x = seed | 1;
            let w: Vec<f32> = (0..o.keys.len()).map(|_| {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            }).collect();
            let want: Vec<f64> = (0..o.labels.len()).map(|r| {
                (o.row_ptr[r]..o.row_ptr[r + 1])
                    .map(|e| o.vals[e] as f64 * w[o.cols[e] as usize] as f64)
                    .sum()
            }).collect();
            let got = d.margins(&w);
            prop_assert_eq!(got.iter().map(|m| m.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|m| m.to_bits()).collect::<Vec<_>>());
            for (a, b) in c.margins(&w).iter().zip(&want) {
                prop_assert!((a - b).abs() <= 1e-9 * (1.0 + b.abs()), "{} vs {}", a, b);
            }
        }
    }
}
