//! A frame's values without copies: [`Vals`] is either a vector the node
//! made, or a slice of shared bytes in the wire's little-endian layout (a
//! slice of the buffer a frame was read into, or of a caller's array cut
//! into frames), read in place as `f32`s.
//!
//! Why: a dense request moves tens of megabytes, and every copy of them
//! (out of the read buffer at decode, into a frame per slice, into the write
//! buffer at encode) cost as much as the wire itself. With shared bytes a
//! frame's values go from the read buffer to the store's apply, and from a
//! caller's array or a pull's reply to the socket (a vectored write), as
//! they are.

use bytes::Bytes;
use std::fmt;
use std::ops::{Deref, DerefMut, Range};
use zerocopy::{FromBytes, IntoBytes};

/// A frame's `f32` values. Reads as a `[f32]` either way; writing to it
/// (`DerefMut`) first makes shared bytes a vector of its own.
#[derive(Clone)]
pub struct Vals(Repr);

#[derive(Clone)]
enum Repr {
    /// Values this node made or owns.
    Owned(Vec<f32>),
    /// A vector from [`buffer`]: as `Owned`, except that once written to
    /// the wire ([`Vals::into_le_bytes`]) it goes back to the pool.
    Pooled(Vec<f32>),
    /// Little-endian `f32`s, 4-byte aligned, a multiple of 4 bytes long
    /// (checked when made, so every read in place succeeds), on a
    /// little-endian target only.
    Shared(Bytes),
}

/// A vector of values as the owner of shared bytes: `Bytes::from_owner`
/// then reads its bytes in place, with no copy. Where it goes when the
/// bytes are let go (written out) is `back`'s to say.
struct F32Owner {
    vals: Vec<f32>,
    back: Back,
}

/// Where an [`F32Owner`]'s vector goes once its bytes are let go.
enum Back {
    /// Freed.
    Free,
    /// Into the pool ([`buffer`]).
    Pool,
    /// Into the caller's slot ([`Vals::lent`]).
    To(Return),
}

/// Where a lent vector is put back once the last share of its bytes is let
/// go ([`Vals::lent`]).
pub type Return = std::sync::Arc<std::sync::Mutex<Option<Vec<f32>>>>;

impl AsRef<[u8]> for F32Owner {
    fn as_ref(&self) -> &[u8] {
        self.vals.as_bytes()
    }
}

impl Drop for F32Owner {
    fn drop(&mut self) {
        let vals = std::mem::take(&mut self.vals);
        match &self.back {
            Back::Free => {}
            Back::Pool => give_back(vals),
            Back::To(slot) => *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(vals),
        }
    }
}

/// Vectors of at least this many values are worth keeping for reuse.
const POOL_FROM: usize = 1 << 18;

/// Most values the pool holds in all (128 MiB: two dense pulls of 64 MB
/// in flight).
const POOL_VALUES: usize = 32 << 20;

/// Large vectors a server filled for replies (a dense pull's 4 MiB frames),
/// kept once they are written, for the next replies: a fresh allocation of
/// that size is memory the kernel maps in and zeroes page by page at every
/// frame (`perf`: a large share of a dense pull's time on the server).
static POOL: std::sync::Mutex<Vec<Vec<f32>>> = std::sync::Mutex::new(Vec::new());

/// An empty vector with room for at least `n` values: one from the pool
/// when it holds one that fits (at most twice as large), else a new one.
/// Give it to a frame as [`Vals::pooled`] and it comes back once written.
pub fn buffer(n: usize) -> Vec<f32> {
    if n >= POOL_FROM {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        let fits = pool
            .iter()
            .position(|v| v.capacity() >= n && v.capacity() / 2 <= n);
        if let Some(i) = fits {
            let mut v = pool.swap_remove(i);
            v.clear();
            return v;
        }
    }
    Vec::with_capacity(n)
}

/// Keeps `v` for [`buffer`] if it is large and the pool has room.
fn give_back(v: Vec<f32>) {
    if v.capacity() < POOL_FROM {
        return;
    }
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let held: usize = pool.iter().map(Vec::capacity).sum();
    if held + v.capacity() <= POOL_VALUES {
        pool.push(v);
    }
}

impl Vals {
    /// No values.
    pub const fn new() -> Vals {
        Vals(Repr::Owned(Vec::new()))
    }

    /// The values of `bytes`, little-endian `f32`s (a multiple of 4 bytes
    /// long; a trailing partial value is dropped). Kept in place when the
    /// target is little-endian and the bytes are 4-aligned, copied out
    /// otherwise, so a caller need not care which.
    pub fn from_le_bytes(bytes: Bytes) -> Vals {
        let whole = bytes.len() / 4 * 4;
        if cfg!(target_endian = "little") && <[f32]>::ref_from_bytes(&bytes[..whole]).is_ok() {
            let mut bytes = bytes;
            bytes.truncate(whole);
            return Vals(Repr::Shared(bytes));
        }
        Vals(Repr::Owned(le_f32s(&bytes)))
    }

    /// Values that can be cut without copies ([`Vals::slice`]): a vector
    /// becomes the owner of shared bytes (no copy) on little-endian
    /// targets.
    pub fn into_shared(self) -> Vals {
        match self.0 {
            Repr::Owned(v) | Repr::Pooled(v) if cfg!(target_endian = "little") && !v.is_empty() => {
                Vals(Repr::Shared(Bytes::from_owner(F32Owner {
                    vals: v,
                    back: Back::Free,
                })))
            }
            other => Vals(other),
        }
    }

    /// Shared values over `v`, as [`Vals::into_shared`] makes them, that
    /// put `v` into `to` once the last share of them is let go (every frame
    /// carrying them written): a push's array, back for its caller to use
    /// again, its pages still mapped. Where the values are copied instead
    /// (a big-endian target, no values), `v` goes back at once.
    pub fn lent(v: Vec<f32>, to: Return) -> Vals {
        if cfg!(target_endian = "little") && !v.is_empty() {
            return Vals(Repr::Shared(Bytes::from_owner(F32Owner {
                vals: v,
                back: Back::To(to),
            })));
        }
        let shared = Vals(Repr::Owned(v.clone())).into_shared();
        *to.lock().unwrap_or_else(|e| e.into_inner()) = Some(v);
        shared
    }

    /// Values in a vector from [`buffer`], which goes back to the pool once
    /// the frame carrying them is written.
    pub fn pooled(v: Vec<f32>) -> Vals {
        Vals(Repr::Pooled(v))
    }

    /// Values `range` (indices of values), sharing the bytes when these are
    /// shared (see [`Vals::into_shared`]), copied when they are a vector.
    ///
    /// # Panics
    ///
    /// When `range` is out of bounds, as slicing a `[f32]` would.
    pub fn slice(&self, range: Range<usize>) -> Vals {
        match &self.0 {
            Repr::Owned(v) | Repr::Pooled(v) => Vals(Repr::Owned(v[range].to_vec())),
            Repr::Shared(b) => {
                assert!(range.start <= range.end && range.end * 4 <= b.len());
                Vals(Repr::Shared(b.slice(range.start * 4..range.end * 4)))
            }
        }
    }

    /// The values' wire bytes (little-endian), without a copy when they are
    /// shared or the target is little-endian (a vector becomes their owner).
    pub fn into_le_bytes(self) -> Bytes {
        match self.0 {
            Repr::Shared(b) => b,
            Repr::Owned(v) if cfg!(target_endian = "little") => Bytes::from_owner(F32Owner {
                vals: v,
                back: Back::Free,
            }),
            Repr::Pooled(v) if cfg!(target_endian = "little") => Bytes::from_owner(F32Owner {
                vals: v,
                back: Back::Pool,
            }),
            Repr::Owned(v) | Repr::Pooled(v) => {
                let mut out = Vec::with_capacity(v.len() * 4);
                for x in v {
                    out.extend_from_slice(&x.to_le_bytes());
                }
                Bytes::from(out)
            }
        }
    }

    /// The values as a vector: the one they are, or a copy of shared bytes.
    pub fn into_vec(self) -> Vec<f32> {
        match self.0 {
            Repr::Owned(v) | Repr::Pooled(v) => v,
            Repr::Shared(_) => self.to_vec(),
        }
    }

    /// Writes the values into `out` (as long as they are), as bytes: the
    /// one copy a reply's values take on their way into a caller's array.
    ///
    /// # Panics
    ///
    /// When `out` is not as long as the values.
    pub fn copy_to(&self, out: &mut [f32]) {
        out.copy_from_slice(self);
    }

    /// Empties them (shared bytes are let go).
    pub fn clear(&mut self) {
        *self = Vals::new();
    }

    /// The values as a vector to change in length: shared bytes are copied
    /// into one first.
    pub fn vec_mut(&mut self) -> &mut Vec<f32> {
        if let Repr::Shared(_) = self.0 {
            self.0 = Repr::Owned(self.to_vec());
        }
        match &mut self.0 {
            Repr::Owned(v) | Repr::Pooled(v) => v,
            Repr::Shared(_) => unreachable!("made a vector just above"),
        }
    }

    /// Whether the values are shared bytes (read in place), not a vector.
    pub fn is_shared(&self) -> bool {
        matches!(self.0, Repr::Shared(_))
    }
}

impl Default for Vals {
    fn default() -> Vals {
        Vals::new()
    }
}

impl Deref for Vals {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        match &self.0 {
            Repr::Owned(v) | Repr::Pooled(v) => v,
            // Aligned and whole: checked when the bytes were taken, so this
            // cannot fail; an empty slice would be the safe answer if it did.
            Repr::Shared(b) => <[f32]>::ref_from_bytes(b).unwrap_or(&[]),
        }
    }
}

impl DerefMut for Vals {
    fn deref_mut(&mut self) -> &mut [f32] {
        self.vec_mut()
    }
}

impl From<Vec<f32>> for Vals {
    fn from(v: Vec<f32>) -> Vals {
        Vals(Repr::Owned(v))
    }
}

impl From<Vals> for Vec<f32> {
    fn from(v: Vals) -> Vec<f32> {
        v.into_vec()
    }
}

impl FromIterator<f32> for Vals {
    fn from_iter<I: IntoIterator<Item = f32>>(iter: I) -> Vals {
        Vals(Repr::Owned(iter.into_iter().collect()))
    }
}

impl PartialEq for Vals {
    fn eq(&self, other: &Vals) -> bool {
        **self == **other
    }
}

impl PartialEq<Vec<f32>> for Vals {
    fn eq(&self, other: &Vec<f32>) -> bool {
        **self == other[..]
    }
}

impl PartialEq<[f32]> for Vals {
    fn eq(&self, other: &[f32]) -> bool {
        **self == *other
    }
}

impl<'a> IntoIterator for &'a Vals {
    type Item = &'a f32;
    type IntoIter = std::slice::Iter<'a, f32>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<const N: usize> PartialEq<[f32; N]> for Vals {
    fn eq(&self, other: &[f32; N]) -> bool {
        **self == other[..]
    }
}

impl fmt::Debug for Vals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// The little-endian `f32`s of `bytes` (a trailing partial value dropped).
/// Written as a loop over fixed-size arrays into a vector of the right
/// length, which compiles to a plain copy on little-endian machines.
pub(crate) fn le_f32s(bytes: &[u8]) -> Vec<f32> {
    let mut out = vec![0f32; bytes.len() / 4];
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        let mut b = [0; 4];
        b.copy_from_slice(c);
        *o = f32::from_le_bytes(b);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le(vals: &[f32]) -> Vec<u8> {
        vals.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn aligned_bytes_are_read_in_place_and_misaligned_ones_copied() {
        let vals = [1.5f32, -2.0, f32::NAN, 0.0];
        // One spare byte in front, so one of the two offsets is misaligned.
        let mut raw = vec![0u8];
        raw.extend(le(&vals));
        raw.extend([0, 0, 0]);
        let bytes = Bytes::from(raw);
        for at in 0..4 {
            let v = Vals::from_le_bytes(bytes.slice(at..at + 16));
            let expect: Vec<u8> = bytes[at..at + 16].to_vec();
            assert_eq!(v.as_bytes(), &expect[..], "offset {at}");
        }
        let shared = (0..4)
            .filter(|&at| Vals::from_le_bytes(bytes.slice(at..at + 16)).is_shared())
            .count();
        assert_eq!(shared, usize::from(cfg!(target_endian = "little")));
    }

    #[test]
    fn a_lent_vector_comes_back_once_every_share_is_let_go() {
        let v: Vec<f32> = (0..100).map(|i| i as f32).collect();
        let at = v.as_ptr();
        let slot = Return::default();
        let lent = Vals::lent(v, slot.clone());
        let a = lent.slice(0..50);
        let b = lent.slice(50..100).into_le_bytes();
        drop(lent);
        drop(a);
        assert_eq!(
            slot.lock().unwrap().is_some(),
            !cfg!(target_endian = "little")
        );
        assert_eq!(b.len(), 200);
        drop(b);
        let back = slot
            .lock()
            .unwrap()
            .take()
            .expect("back once every share is gone");
        assert_eq!(back.len(), 100);
        assert_eq!(back[99], 99.0);
        if cfg!(target_endian = "little") {
            assert_eq!(back.as_ptr(), at, "the same memory, not a copy");
        }
    }

    #[test]
    fn a_vector_is_cut_without_copies_once_shared() {
        let v: Vec<f32> = (0..100).map(|i| i as f32).collect();
        let mine = v.clone();
        let ptr = mine.as_ptr();
        let shared = Vals::from(mine).into_shared();
        let piece = shared.slice(10..20);
        assert_eq!(&piece[..], &v[10..20]);
        if cfg!(target_endian = "little") {
            // The very memory of the vector, ten values in.
            assert!(piece.is_shared());
            assert_eq!(piece.as_ptr(), ptr.wrapping_add(10));
        }
        assert_eq!(piece.clone().into_vec(), v[10..20].to_vec());
        assert_eq!(&piece.into_le_bytes()[..], &le(&v[10..20])[..]);
        assert_eq!(&Vals::from(v.clone()).into_le_bytes()[..], &le(&v)[..]);
    }

    #[test]
    fn writing_to_shared_values_makes_them_owned() {
        let mut v = Vals::from_le_bytes(Bytes::from(le(&[1.0, 2.0])));
        v[1] = 5.0;
        assert!(!v.is_shared());
        assert_eq!(v, vec![1.0, 5.0]);
        let mut out = [0.0; 2];
        v.copy_to(&mut out);
        assert_eq!(out, [1.0, 5.0]);
    }

    #[test]
    fn a_pooled_vector_comes_back_once_written() {
        let n = POOL_FROM + 3;
        let mut v = buffer(n);
        v.resize(n, 2.0);
        let ptr = v.as_ptr();
        let bytes = Vals::pooled(v).into_le_bytes();
        assert_eq!(bytes.len(), n * 4);
        drop(bytes);
        // Other tests may take from the pool meanwhile: look for ours.
        let mut taken = Vec::new();
        let mut found = false;
        for _ in 0..64 {
            let b = buffer(n);
            if b.as_ptr() == ptr {
                assert!(b.is_empty() && b.capacity() >= n);
                found = true;
                break;
            }
            taken.push(b);
        }
        assert!(found, "the written vector went back to the pool");
    }

    #[test]
    fn a_partial_value_is_dropped() {
        let v = Vals::from_le_bytes(Bytes::from(vec![0, 0, 128, 63, 1]));
        assert_eq!(v, vec![1.0]);
    }
}
