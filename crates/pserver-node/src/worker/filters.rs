//! The value filters of a worker's requests (Li et al., section 5), beside
//! key caching and compression: the significantly-modified filter on pull
//! replies (the server sends what moved past a threshold since this
//! connection's last reply; the worker fills in the rest from its
//! [`Mirror`]), the same filter on pushes (entries carried in
//! [`Residuals`] until their sum passes the threshold) and random skip.
//! Pull replies are filtered per connection (`send`), pushes when the
//! request is made (here), so that residuals add up in call order.

use super::*;
use pserver_core::push_filter::{Residuals, random_skip, skip_seed};
use pserver_core::significant::{MergeError, Mirror, Stamp};

/// Which value filters a worker's requests go through; all off by default.
/// Servers of an older build refuse the flag the pull filter uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ValueFilters {
    /// The significantly-modified filter on pull replies: servers send
    /// only values that moved by more than this since the value this
    /// worker last received from them; the pull's answer is still whole
    /// (the rest comes from the worker's mirror of what it received), and
    /// each value in it is within this of the server's.
    pub significant_pull: Option<f32>,
    /// The significantly-modified filter on pushes: an entry is sent once
    /// the sum of what was pushed to it since it was last sent has a value
    /// larger than this in magnitude; until then it is carried (see
    /// [`Worker::flush_residuals`]). For pushes whose values add up on the
    /// server (gradients), not assignments.
    pub significant_push: Option<f32>,
    /// How many values of each pushed entry, from the first, the push
    /// threshold tests (0: all). DBPG pushes a gradient and a curvature
    /// bound per key and tests the gradient only (1): the curvature is
    /// large and positive, and rides along with it.
    pub significant_push_tests: usize,
    /// Random skip on pushes: each entry is dropped with this probability
    /// and the kept ones are scaled by `1 / (1 - p)`, so a push's
    /// expectation is unchanged; drawn from the worker's id, the table and
    /// the clock, so a request's choice is repeatable. For additive pushes.
    pub random_skip: Option<f64>,
}

/// A value filter setting that cannot be used.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum FilterError {
    /// A threshold that is negative or not a number.
    #[error(
        "the significantly-modified filter's threshold on {on} must be a number >= 0, not {value}"
    )]
    Threshold {
        /// "pulls" or "pushes".
        on: &'static str,
        /// The value given.
        value: f32,
    },
    /// A random-skip probability outside `[0, 1)`.
    #[error("random skip's probability must be in [0, 1), not {0}")]
    Probability(f64),
}

impl ValueFilters {
    /// Checks every setting.
    pub fn validate(&self) -> Result<(), FilterError> {
        for (on, t) in [
            ("pulls", self.significant_pull),
            ("pushes", self.significant_push),
        ] {
            if let Some(value) = t {
                if !(value.is_finite() && value >= 0.0) {
                    return Err(FilterError::Threshold { on, value });
                }
            }
        }
        if let Some(p) = self.random_skip {
            if !(0.0..1.0).contains(&p) {
                return Err(FilterError::Probability(p));
            }
        }
        Ok(())
    }
}

/// Most keys carried per table by the push filter: past it, entries are
/// sent rather than carried.
const MAX_CARRIED_KEYS: usize = 1 << 24;

/// A worker's mirrors of what one server connection sent, per table.
pub(super) type Mirrors = Arc<Mutex<HashMap<u32, Mirror>>>;

impl Inner {
    /// Runs a push through the push filters, in call order: returns it with
    /// the entries that go, and counts the bytes the others would have
    /// taken. Other requests, dense pushes and malformed ones (the request
    /// refuses those later) pass unchanged.
    pub(super) fn filter_push(&self, mut req: Request, clock: u64) -> Request {
        let f = lock(&self.filters).values;
        if req.op != Op::Push || (f.significant_push.is_none() && f.random_skip.is_none()) {
            return req;
        }
        let Keys::List(keys) = &req.keys else {
            return req;
        };
        if keys.is_empty() || req.vals.is_empty() || !req.vals.len().is_multiple_of(keys.len()) {
            return req;
        }
        let width = req.vals.len() / keys.len();
        let entry_bytes = (8 + 4 * width) as u64;
        let (mut keys, mut vals) = (keys.clone(), std::mem::take(&mut req.vals));
        if let Some(t) = f.significant_push {
            let mut all = lock(&self.residuals);
            let r = all
                .entry(req.table.clone())
                .or_insert_with(|| Residuals::new(width, MAX_CARRIED_KEYS));
            if r.width() != width {
                // A push of another width to the same table will be
                // refused by the server anyway; nothing to carry it with.
                *r = Residuals::new(width, MAX_CARRIED_KEYS);
            }
            let kept = r.filter(&keys, &vals, t, f.significant_push_tests);
            self.traffic
                .significant_saved_sent
                .fetch_add(kept.held as u64 * entry_bytes, Ordering::Relaxed);
            (keys, vals) = (kept.keys, kept.vals);
        }
        if let Some(p) = f.random_skip {
            let (k, v, dropped) = random_skip(
                &keys,
                &vals,
                width,
                p,
                skip_seed(self.id, &req.table, clock),
            );
            self.traffic
                .skip_saved_sent
                .fetch_add(dropped as u64 * entry_bytes, Ordering::Relaxed);
            (keys, vals) = (k, v);
        }
        req.keys = Keys::List(keys);
        req.vals = vals;
        req
    }

    /// Takes what the push filter carries for `table`, as a push.
    pub(super) fn take_residuals(&self, table: &str) -> (Vec<u64>, Vec<f32>) {
        lock(&self.residuals)
            .get_mut(table)
            .map(Residuals::drain)
            .unwrap_or_default()
    }
}

/// Completes a reply flagged `FLAG_SIGNIFICANT` (its values unpacked) from
/// `mirrors`: `keys` the request's keys, `dim` the table's width. Returns
/// the whole answer's values. A reply that cannot be completed is
/// `Ok(None)`: the request goes again at once (when the mirror was given
/// up, it asks with no basis, and the server sends everything); a reply
/// whose shape is wrong is an error.
pub(super) fn complete(
    mirrors: &Mirrors,
    table: u32,
    dim: usize,
    keys: &[u64],
    stamp: &Stamp,
    sent: &[f32],
) -> Result<Option<Vec<f32>>, MergeError> {
    let mut all = lock(mirrors);
    let m = all.entry(table).or_insert_with(|| Mirror::new(dim));
    match m.merge(keys, stamp, sent) {
        Ok(v) => Ok(Some(v)),
        // Of a generation the mirror moved past: the mirror is fine.
        Err(MergeError::Missing { generation, .. }) if generation != m.generation() => Ok(None),
        // The mirror lost what the server relied on: give it up.
        Err(MergeError::Missing { .. }) => {
            m.clear();
            Ok(None)
        }
        Err(e) => {
            m.clear();
            Err(e)
        }
    }
}
