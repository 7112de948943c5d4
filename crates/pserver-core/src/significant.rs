//! The significantly-modified filter on pull replies (Li et al., section 5):
//! a server sends only the entries whose value moved by more than a
//! threshold since the last value *that connection* received from it, and
//! the worker fills in the rest from its mirror of what it received.
//!
//! Both halves are plain data: [`Shadows`] is the server's (per connection
//! and table, bounded), [`Mirror`] the worker's (per connection and table).
//!
//! # Why the copies cannot drift
//!
//! The server stamps every filtered reply of a shadow with a sequence
//! number `seq` (1, 2, 3, ... per shadow), and every entry it sends with
//! the `seq` of the reply that carried it. The shadow belongs to one
//! *generation* `generation` (a fresh one whenever the server creates the shadow:
//! a first pull, or after the shadow was evicted). With each filtered pull
//! the worker says, as a [`Basis`], which replies of which generation it
//! has *applied*, as a run `[from, upto)` of consecutive sequence numbers.
//! The server leaves an entry out only when the value it last sent for it
//! went in a reply inside that run: the worker then holds exactly that
//! value, so its view is within the threshold of the server's. Anything
//! else (an entry never sent, sent in a reply the worker has not confirmed,
//! another generation) is sent again.
//!
//! So a reply that is lost, a request that is retried, or replies that the
//! worker handles out of order cannot leave the mirror wrong: an entry whose
//! reply was not confirmed is simply sent again. The server never has to
//! learn that a reply was lost: it only ever omits against what the worker
//! confirmed. A sequence number is taken when a reply is made, not when a
//! pull arrives (a pull waiting for slower workers has none), so a gap in
//! the run is normally a reply still on its way; one that stays while
//! [`GAP_LIMIT`] later replies are applied is taken as lost (a request that
//! timed out, a reply the server could not send), and the run restarts at
//! the replies after it. A reply the worker cannot merge (see
//! [`MergeError`]) makes it give the mirror up ([`Mirror::clear`]) and ask
//! again: with no basis, the server sends everything.
//!
//! Failover: shadows are per connection, and a worker keeps one mirror per
//! server connection. A range that moves to another server is pulled over
//! another connection, whose shadow and mirror are those of that pair (a
//! new primary has no shadow for keys it never sent: it sends them). A
//! server that restarts is a new connection, so both sides start over; a
//! client that leaves closes its connections, and the server drops their
//! shadows ([`Shadows::drop_conn`]).
//!
//! Memory: a server's shadows hold at most [`Shadows::max_entries`] entries
//! in all (each a key, a sequence number and `dim` floats). Past it, the
//! least recently used shadow of another connection or table is dropped
//! (its next pull comes back in full under a new generation); when there
//! is none, new entries are sent but not recorded, so they are sent every
//! time. Nothing is ever omitted without being recorded.

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};

/// Which filtered replies of one generation a worker has applied to its
/// mirror: every one with `from <= seq < upto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Basis {
    /// The shadow's generation the replies belong to.
    pub generation: u64,
    /// First sequence number of the run.
    pub from: u64,
    /// One past the last sequence number of the run.
    pub upto: u64,
}

impl Basis {
    /// True when the reply numbered `seq` is in the run.
    pub fn covers(&self, seq: u64) -> bool {
        self.from <= seq && seq < self.upto
    }
}

/// What a filtered reply says besides its values.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    /// The shadow's generation.
    pub generation: u64,
    /// The reply's sequence number within it.
    pub seq: u64,
    /// Bit `i` (of byte `i / 8`, least significant first) set when the
    /// reply carries the values of the request's `i`-th key.
    pub present: Vec<u8>,
}

impl Stamp {
    /// True when entry `i` is in the reply.
    pub fn has(&self, i: usize) -> bool {
        self.present
            .get(i / 8)
            .is_some_and(|b| b & (1 << (i % 8)) != 0)
    }

    /// Entries the reply carries.
    pub fn count(&self) -> usize {
        self.present.iter().map(|b| b.count_ones() as usize).sum()
    }
}

/// True when `new` must be sent to a receiver holding `old`: some value
/// moved by more than `threshold` (or is not a number: NaN never compares
/// as "within").
pub fn significant(old: &[f32], new: &[f32], threshold: f32) -> bool {
    old.len() != new.len()
        || old
            .iter()
            .zip(new)
            .any(|(o, n)| !within(n - o, threshold) && o.to_bits() != n.to_bits())
}

/// Replies a mirror applies beyond a gap in its run before it takes the
/// missing reply as lost. Gaps are normally replies on their way, a few at
/// a time; a lost one would otherwise stop the run, and the filter with it.
pub const GAP_LIMIT: usize = 32;

/// True when `d` is within `threshold` of zero (false for NaN).
fn within(d: f32, threshold: f32) -> bool {
    d.abs() <= threshold
}

/// Who a shadow belongs to: a connection, as the server numbers them, and a
/// table.
pub type Owner = (u64, u32);

/// One entry of a shadow or mirror: where its values start, and the
/// sequence number of the reply that last carried them.
#[derive(Clone, Copy, Debug)]
struct Entry {
    at: usize,
    seq: u64,
}

/// The values last sent (or received) per key, `dim` floats each. Keys
/// are hashed with Fx, not SipHash: a lookup per pulled key on both sides
/// is this filter's whole cost, and keys are not chosen by an adversary
/// who could gain from collisions beyond slowing their own pulls.
#[derive(Debug, Default)]
struct Values {
    dim: usize,
    index: FxHashMap<u64, Entry>,
    vals: Vec<f32>,
}

impl Values {
    fn new(dim: usize) -> Values {
        Values {
            dim,
            ..Values::default()
        }
    }

    fn get(&self, key: u64) -> Option<(Entry, &[f32])> {
        let e = *self.index.get(&key)?;
        Some((e, &self.vals[e.at..e.at + self.dim]))
    }

    /// Sets `key`'s values and sequence number; returns true when the key
    /// is new.
    fn set(&mut self, key: u64, seq: u64, v: &[f32]) -> bool {
        match self.index.get_mut(&key) {
            Some(e) => {
                e.seq = seq;
                self.vals[e.at..e.at + self.dim].copy_from_slice(v);
                false
            }
            None => {
                let at = self.vals.len();
                self.vals.extend_from_slice(v);
                self.index.insert(key, Entry { at, seq });
                true
            }
        }
    }

    fn len(&self) -> usize {
        self.index.len()
    }
}

/// One connection's shadow of one table.
#[derive(Debug)]
struct Shadow {
    generation: u64,
    /// The sequence number of the next reply.
    next_seq: u64,
    values: Values,
    /// When it was last used, in [`Shadows`]' own ticks (for eviction).
    used: u64,
}

/// What [`Shadows::filter`] made of a reply.
#[derive(Clone, Debug, PartialEq)]
pub struct Filtered {
    /// The values to send: those of the keys `stamp` marks present, in order.
    pub vals: Vec<f32>,
    /// Generation, sequence number and which keys are present.
    pub stamp: Stamp,
}

/// A server's shadows: per (connection, table), the values it last sent.
/// See the module docs.
#[derive(Debug)]
pub struct Shadows {
    max_entries: usize,
    entries: usize,
    next_generation: u64,
    tick: u64,
    by: HashMap<Owner, Shadow>,
}

impl Shadows {
    /// Shadows holding at most `max_entries` entries in all (0: the filter
    /// is off, and [`Shadows::filter`] answers `None`).
    pub fn new(max_entries: usize) -> Shadows {
        Shadows {
            max_entries,
            entries: 0,
            next_generation: 1,
            tick: 0,
            by: HashMap::new(),
        }
    }

    /// The bound on entries.
    pub fn max_entries(&self) -> usize {
        self.max_entries
    }

    /// Entries held now, over every shadow.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Shadows held now.
    pub fn len(&self) -> usize {
        self.by.len()
    }

    /// True when no shadow is held.
    pub fn is_empty(&self) -> bool {
        self.by.is_empty()
    }

    /// Filters the reply `vals` (`dim` per key of `keys`, in order) for
    /// `owner`, whose request said it holds `basis`: the entries that moved
    /// by more than `threshold` since the value `owner` confirmed holding,
    /// and those it may not hold. Records what is sent. `None` when the
    /// filter is off (send the reply as it is). `vals` must be
    /// `keys.len() * dim` long; a reply that is not is sent whole.
    pub fn filter(
        &mut self,
        owner: Owner,
        basis: Option<Basis>,
        threshold: f32,
        keys: &[u64],
        dim: usize,
        vals: &[f32],
    ) -> Option<Filtered> {
        if self.max_entries == 0 || dim == 0 || vals.len() != keys.len() * dim {
            return None;
        }
        self.tick += 1;
        let tick = self.tick;
        if !self.by.contains_key(&owner) {
            let generation = self.next_generation;
            self.next_generation += 1;
            self.by.insert(
                owner,
                Shadow {
                    generation,
                    next_seq: 1,
                    values: Values::new(dim),
                    used: tick,
                },
            );
        }
        // Room for the keys this reply may add, made before borrowing the
        // shadow: older shadows of others go first.
        let fresh = {
            let s = &self.by[&owner];
            keys.iter()
                .filter(|k| !s.values.index.contains_key(k))
                .count()
        };
        while self.entries + fresh > self.max_entries && self.evict_other(owner) {}
        let room = self.max_entries.saturating_sub(self.entries);
        let s = self.by.get_mut(&owner)?;
        s.used = tick;
        if s.values.dim != dim {
            // The table's width cannot change; a mismatch means a bug
            // elsewhere, and the safe answer is the whole reply, unrecorded.
            return None;
        }
        let seq = s.next_seq;
        s.next_seq += 1;
        let basis = basis.filter(|b| b.generation == s.generation);
        let mut present = vec![0u8; keys.len().div_ceil(8)];
        let mut out = Vec::with_capacity(vals.len());
        let mut added = 0usize;
        let values = &mut s.values;
        for (i, (&k, v)) in keys.iter().zip(vals.chunks_exact(dim)).enumerate() {
            // One lookup for a key left out, two for one sent and new.
            match values.index.get_mut(&k) {
                Some(e) => {
                    let old = &mut values.vals[e.at..e.at + dim];
                    if basis.is_some_and(|b| b.covers(e.seq)) && !significant(old, v, threshold) {
                        continue;
                    }
                    e.seq = seq;
                    old.copy_from_slice(v);
                }
                None => {
                    if added < room {
                        values.set(k, seq, v);
                        added += 1;
                    }
                }
            }
            present[i / 8] |= 1 << (i % 8);
            out.extend_from_slice(v);
        }
        self.entries += added;
        Some(Filtered {
            vals: out,
            stamp: Stamp {
                generation: s.generation,
                seq,
                present,
            },
        })
    }

    /// Drops the least recently used shadow other than `keep`'s; false
    /// when there is none.
    fn evict_other(&mut self, keep: Owner) -> bool {
        let Some(victim) = self
            .by
            .iter()
            .filter(|(o, _)| **o != keep)
            .min_by_key(|(_, s)| s.used)
            .map(|(o, _)| *o)
        else {
            return false;
        };
        if let Some(s) = self.by.remove(&victim) {
            self.entries -= s.values.len();
        }
        true
    }

    /// Drops every shadow of connection `conn` (it closed).
    pub fn drop_conn(&mut self, conn: u64) {
        let entries = &mut self.entries;
        self.by.retain(|o, s| {
            let keep = o.0 != conn;
            if !keep {
                *entries -= s.values.len();
            }
            keep
        });
    }
}

/// Why a filtered reply could not be merged. Nothing of it was applied to
/// the mirror; the worker gives the mirror up and asks again in full.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum MergeError {
    /// The reply's presence bits do not match its keys or values.
    #[error(
        "a filtered reply marks {marked} of {keys} keys present but carries {vals} values of width {dim}"
    )]
    Shape {
        /// Keys of the request.
        keys: usize,
        /// Entries the reply marks present.
        marked: usize,
        /// Values it carries.
        vals: usize,
        /// The table's width.
        dim: usize,
    },
    /// The reply leaves out a key the mirror does not hold: the reply is
    /// of a generation the mirror has moved past (resend the request; the
    /// mirror is fine), or of the mirror's own (it was given up after the
    /// request left, or the server is wrong: give it up).
    #[error(
        "a filtered reply (generation {generation}, reply {seq}) leaves out key {key}, which this worker does not hold"
    )]
    Missing {
        /// The key.
        key: u64,
        /// The reply's generation.
        generation: u64,
        /// Its sequence number.
        seq: u64,
    },
}

/// A worker's mirror of one server connection's shadow of one table: the
/// values it received, and which replies it applied. See the module docs.
#[derive(Debug)]
pub struct Mirror {
    /// The generation held (0: none yet).
    generation: u64,
    from: u64,
    upto: u64,
    /// Applied sequence numbers past `upto` (replies handled out of order).
    above: BTreeSet<u64>,
    values: Values,
}

impl Mirror {
    /// An empty mirror of a table `dim` floats wide.
    pub fn new(dim: usize) -> Mirror {
        Mirror {
            generation: 0,
            from: 0,
            upto: 0,
            above: BTreeSet::new(),
            values: Values::new(dim),
        }
    }

    /// What to tell the server with the next filtered pull (`None`: the
    /// mirror holds nothing the server may rely on).
    pub fn basis(&self) -> Option<Basis> {
        (self.generation != 0).then_some(Basis {
            generation: self.generation,
            from: self.from,
            upto: self.upto,
        })
    }

    /// The generation held (0: none).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// True when no key is held.
    pub fn is_empty(&self) -> bool {
        self.values.len() == 0
    }

    /// Forgets everything: later pulls confirm nothing, so the server sends
    /// every entry until a reply in full starts the mirror again.
    pub fn clear(&mut self) {
        let dim = self.values.dim;
        *self = Mirror::new(dim);
    }

    /// The whole answer to a request for `keys` from a filtered reply
    /// (`stamp`, and the values of the keys it marks present), recording
    /// what it carried. A reply in full of a newer generation restarts the
    /// mirror at it; one of an older generation is used as it is and
    /// recorded nowhere.
    pub fn merge(
        &mut self,
        keys: &[u64],
        stamp: &Stamp,
        sent: &[f32],
    ) -> Result<Vec<f32>, MergeError> {
        let dim = self.values.dim;
        let marked = stamp.count();
        if stamp.present.len() != keys.len().div_ceil(8)
            || sent.len() != marked * dim
            || (0..stamp.present.len() * 8)
                .skip(keys.len())
                .any(|i| stamp.has(i))
        {
            return Err(MergeError::Shape {
                keys: keys.len(),
                marked,
                vals: sent.len(),
                dim,
            });
        }
        let full = marked == keys.len();
        if stamp.generation != self.generation {
            if !full {
                let i = (0..keys.len()).find(|&i| !stamp.has(i)).unwrap_or(0);
                return Err(MergeError::Missing {
                    key: keys.get(i).copied().unwrap_or(0),
                    generation: stamp.generation,
                    seq: stamp.seq,
                });
            }
            if stamp.generation < self.generation {
                return Ok(sent.to_vec());
            }
            // A newer generation (the server dropped the shadow, or this
            // is the first reply): start over at this reply.
            self.clear();
            self.generation = stamp.generation;
            self.from = stamp.seq;
            self.upto = stamp.seq;
        }
        // Check before changing anything: a reply that cannot be completed
        // must leave the mirror as it was.
        if let Some(i) =
            (0..keys.len()).find(|&i| !stamp.has(i) && self.values.get(keys[i]).is_none())
        {
            return Err(MergeError::Missing {
                key: keys[i],
                generation: stamp.generation,
                seq: stamp.seq,
            });
        }
        // Replies older than the run's start are used but not recorded:
        // the server never relies on them (they are outside every basis).
        let record = stamp.seq >= self.from;
        let mut out = Vec::with_capacity(keys.len() * dim);
        let mut next = sent.chunks_exact(dim);
        for (i, &k) in keys.iter().enumerate() {
            if stamp.has(i) {
                let v = next.next().unwrap_or(&[]);
                out.extend_from_slice(v);
                // A reply handled after a later one must not undo it.
                let newer = self.values.get(k).is_some_and(|(e, _)| e.seq > stamp.seq);
                if record && !newer {
                    self.values.set(k, stamp.seq, v);
                }
            } else if let Some((_, v)) = self.values.get(k) {
                out.extend_from_slice(v);
            }
        }
        if record {
            self.applied(stamp.seq);
        }
        Ok(out)
    }

    /// Marks reply `seq` applied, extending the run while it is unbroken.
    /// Past [`GAP_LIMIT`] replies applied beyond a gap, the gap is taken
    /// as lost and the run becomes the unbroken run at the top of what was
    /// applied (entries recorded before it stay, but no basis covers them
    /// any more, so the server sends them again when asked).
    fn applied(&mut self, seq: u64) {
        if seq == self.upto {
            self.upto += 1;
            while self.above.remove(&self.upto) {
                self.upto += 1;
            }
        } else if seq > self.upto {
            self.above.insert(seq);
            if self.above.len() > GAP_LIMIT {
                let top = self.above.iter().next_back().copied().unwrap_or(seq);
                let mut start = top;
                while start > 0 && self.above.contains(&(start - 1)) {
                    start -= 1;
                }
                self.from = start;
                self.upto = top + 1;
                self.above.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests;
