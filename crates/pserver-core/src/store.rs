//! A server's storage for one table: sparse, hash-keyed, with each key's
//! weights and optimizer state contiguous in one slab.
//!
//! HELPER: implement.

use crate::key::{Key, KeyRange};
use crate::spec::TableSpec;
use crate::updater::Updater;
use std::sync::Arc;

/// Why a push or pull was refused. Nothing is changed when one is returned.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StoreError {
    /// The values do not match keys x dim x push width.
    #[error("table {table:?}: expected {expected} values, got {got}")]
    WrongWidth {
        /// Table name.
        table: String,
        /// Values expected.
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
    // HELPER
}

impl Store {
    /// An empty store for `spec`, applying pushes with `updater`.
    pub fn new(spec: TableSpec, updater: Arc<dyn Updater>) -> Store {
        let _ = (spec, updater);
        todo!()
    }

    /// The table's spec.
    pub fn spec(&self) -> &TableSpec {
        todo!()
    }

    /// Floats a push carries per key (`dim * push_len`).
    pub fn push_width(&self) -> usize {
        todo!()
    }

    /// Applies a push of sorted, unique `keys` with `vals`
    /// (`keys.len() * push_width()` floats), but only keys for which
    /// `apply(key)` is true (duplicate rejection). Validates everything
    /// before changing anything. Returns the number of keys applied.
    pub fn push(
        &mut self,
        keys: &[Key],
        vals: &[f32],
        apply: impl Fn(Key) -> bool,
    ) -> Result<usize, StoreError> {
        let _ = (keys, vals, apply);
        todo!()
    }

    /// Applies a push to every key of `range` (dense: no key list),
    /// `range.len() * push_width()` floats, only where `apply(key)`.
    pub fn push_dense(
        &mut self,
        range: KeyRange,
        vals: &[f32],
        apply: impl Fn(Key) -> bool,
    ) -> Result<usize, StoreError> {
        let _ = (range, vals, apply);
        todo!()
    }

    /// Appends `dim` weights per key to `out`; keys never pushed read as the
    /// table's initializer (and are not stored).
    pub fn pull(&self, keys: &[Key], out: &mut Vec<f32>) {
        let _ = (keys, out);
        todo!()
    }

    /// Appends `dim` weights for every key of `range` to `out`.
    pub fn pull_dense(&self, range: KeyRange, out: &mut Vec<f32>) {
        let _ = (range, out);
        todo!()
    }

    /// Number of keys stored.
    pub fn len(&self) -> usize {
        todo!()
    }

    /// True when no key is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Approximate bytes held (index and slab).
    pub fn memory_bytes(&self) -> usize {
        todo!()
    }
}

/// The initial weights of `key` under `init`, written into `out` (`dim` floats).
pub fn initial(init: &crate::spec::Init, key: Key, out: &mut [f32]) {
    let _ = (init, key, out);
    todo!()
}
