//! Keys and half-open key ranges.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A parameter key. Applications hash raw features into keys, so keys are
/// spread uniformly over the ring.
pub type Key = u64;

/// One past the largest usable key. `u64::MAX` itself is reserved so that the
/// half-open range `[0, KEY_END)` names every key.
pub const KEY_END: Key = u64::MAX;

/// A half-open range of keys `[begin, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KeyRange {
    /// First key in the range.
    pub begin: Key,
    /// One past the last key in the range.
    pub end: Key,
}

impl KeyRange {
    /// Every usable key.
    pub const ALL: KeyRange = KeyRange {
        begin: 0,
        end: KEY_END,
    };

    /// A range `[begin, end)`; `None` when `begin > end`.
    pub fn new(begin: Key, end: Key) -> Option<KeyRange> {
        (begin <= end).then_some(KeyRange { begin, end })
    }

    /// Number of keys in the range.
    pub fn len(&self) -> u64 {
        self.end - self.begin
    }

    /// True when the range holds no key.
    pub fn is_empty(&self) -> bool {
        self.begin >= self.end
    }

    /// True when `key` lies in the range.
    pub fn contains(&self, key: Key) -> bool {
        self.begin <= key && key < self.end
    }

    /// True when `other` lies wholly inside this range.
    pub fn covers(&self, other: &KeyRange) -> bool {
        other.is_empty() || (self.begin <= other.begin && other.end <= self.end)
    }

    /// The keys in both ranges, or `None` when they do not overlap.
    pub fn intersect(&self, other: &KeyRange) -> Option<KeyRange> {
        let begin = self.begin.max(other.begin);
        let end = self.end.min(other.end);
        (begin < end).then_some(KeyRange { begin, end })
    }
}

impl fmt::Display for KeyRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {})", self.begin, self.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intersect_and_cover() {
        let a = KeyRange::new(10, 20).unwrap();
        let b = KeyRange::new(15, 30).unwrap();
        assert_eq!(a.intersect(&b), KeyRange::new(15, 20));
        assert_eq!(a.intersect(&KeyRange::new(20, 30).unwrap()), None);
        assert!(KeyRange::ALL.covers(&a));
        assert!(!a.covers(&b));
        assert!(a.contains(10) && !a.contains(20));
        assert!(KeyRange::new(5, 4).is_none());
        assert_eq!(a.len(), 10);
    }
}
