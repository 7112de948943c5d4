//! A worker's share of the training data in memory, laid out for block
//! coordinate methods: rows (CSR) for predictions and columns (CSC) for
//! per-coordinate gradients, over a local dictionary of the keys it holds.

use pserver_core::{KEY_END, Key};

/// Examples in compressed sparse row form over local column ids.
#[derive(Clone, Debug, Default)]
pub struct Dataset {
    /// Label of each row, 0 or 1.
    pub labels: Vec<f32>,
    /// Row `i` holds entries `row_ptr[i]..row_ptr[i + 1]`.
    pub row_ptr: Vec<usize>,
    /// Local column id of each entry.
    pub cols: Vec<u32>,
    /// Value of each entry.
    pub vals: Vec<f32>,
    /// The global key of each local column, sorted ascending.
    pub keys: Vec<Key>,
}

/// The same entries by column.
#[derive(Clone, Debug, Default)]
pub struct Columns {
    /// Column `k` holds entries `col_ptr[k]..col_ptr[k + 1]`.
    pub col_ptr: Vec<usize>,
    /// Row of each entry.
    pub rows: Vec<u32>,
    /// Value of each entry.
    pub vals: Vec<f32>,
}

/// Builds a [`Dataset`] from examples with global keys.
#[derive(Default)]
pub struct Builder {
    labels: Vec<f32>,
    row_ptr: Vec<usize>,
    keys: Vec<Key>,
    vals: Vec<f32>,
}

impl Builder {
    /// An empty builder.
    pub fn new() -> Builder {
        Builder {
            row_ptr: vec![0],
            ..Builder::default()
        }
    }

    /// Adds one example (`label` 0 or 1; keys and values paired).
    pub fn add(&mut self, label: f32, keys: &[Key], vals: &[f32]) {
        self.labels.push(label);
        self.keys.extend_from_slice(keys);
        self.vals
            .extend_from_slice(&vals[..keys.len().min(vals.len())]);
        self.vals.resize(self.keys.len(), 1.0);
        self.row_ptr.push(self.keys.len());
    }

    /// Rows added so far.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when no row was added.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Replaces global keys by local column ids.
    pub fn build(self) -> Dataset {
        let mut dict = self.keys.clone();
        dict.sort_unstable();
        dict.dedup();
        let cols = self
            .keys
            .iter()
            .map(|k| dict.partition_point(|d| d < k) as u32)
            .collect();
        Dataset {
            labels: self.labels,
            row_ptr: self.row_ptr,
            cols,
            vals: self.vals,
            keys: dict,
        }
    }
}

impl Dataset {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.labels.len()
    }

    /// The entries by column.
    pub fn columns(&self) -> Columns {
        let n = self.keys.len();
        let mut count = vec![0usize; n + 1];
        for &c in &self.cols {
            count[c as usize + 1] += 1;
        }
        for i in 0..n {
            count[i + 1] += count[i];
        }
        let col_ptr = count.clone();
        let mut next = count;
        let mut rows = vec![0u32; self.cols.len()];
        let mut vals = vec![0f32; self.cols.len()];
        for r in 0..self.rows() {
            for e in self.row_ptr[r]..self.row_ptr[r + 1] {
                let c = self.cols[e] as usize;
                rows[next[c]] = r as u32;
                vals[next[c]] = self.vals[e];
                next[c] += 1;
            }
        }
        Columns {
            col_ptr,
            rows,
            vals,
        }
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

    /// `x_i . w` for every row, with `w` indexed by local column.
    pub fn margins(&self, w: &[f32]) -> Vec<f64> {
        (0..self.rows())
            .map(|r| {
                (self.row_ptr[r]..self.row_ptr[r + 1])
                    .map(|e| self.vals[e] as f64 * w[self.cols[e] as usize] as f64)
                    .sum()
            })
            .collect()
    }
}

/// The first key of block `j` of `b` (block `b` begins at [`KEY_END`]).
pub fn block_edge(j: usize, b: usize) -> Key {
    if j >= b {
        return KEY_END;
    }
    ((KEY_END as u128 * j as u128) / b as u128) as Key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_columns_and_blocks_agree() {
        let mut b = Builder::new();
        b.add(1.0, &[10, u64::MAX / 2 + 5], &[1.0, 2.0]);
        b.add(0.0, &[10, 99], &[3.0, 4.0]);
        let d = b.build();
        assert_eq!(d.keys, vec![10, 99, u64::MAX / 2 + 5]);
        assert_eq!(d.cols, vec![0, 2, 0, 1]);
        let c = d.columns();
        assert_eq!(c.col_ptr, vec![0, 2, 3, 4]);
        assert_eq!(c.rows, vec![0, 1, 1, 0]);
        assert_eq!(c.vals, vec![1.0, 3.0, 4.0, 2.0]);
        assert_eq!(d.block_bounds(2), vec![0, 2, 3]);
        assert_eq!(d.margins(&[1.0, 1.0, 1.0]), vec![3.0, 7.0]);
        assert_eq!(block_edge(0, 4), 0);
        assert_eq!(block_edge(4, 4), KEY_END);
    }
}
