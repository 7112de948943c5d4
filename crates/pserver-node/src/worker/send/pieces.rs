//! How a request is cut into frames: how many keys a frame may carry
//! (both it and its reply within the frame limit) and the pieces of a
//! slice, as plain functions of the limits and the keys.

use super::*;

/// Room left in a frame for anything but the header, the keys and the
/// values: a request's consistency, a reply's acknowledgement.
pub(super) const FRAME_SLACK: usize = 256;

/// Bytes a frame of a request aims at (and its reply), below any limit: a
/// large request goes as several frames of about this size, all sent at
/// once. The server starts on the first while the rest are on the wire,
/// instead of one whole request being read, then applied, then answered
/// in turn; and buffers of this size are reused by the allocator, where
/// ones of the whole request's size (a dense 64 MB push) are fresh pages to
/// fault in every time (glibc maps anything over 32 MB afresh).
pub(super) const SEND_FRAME_BYTES: usize = 4 << 20;

/// Most keys one frame of a request may carry, so that the frame (keys
/// unless `dense`, `width` values per key, `ctrl` bytes) and the reply it
/// asks for (`dim` values per key, for a pull or push-pull) both fit in
/// `limits.max_frame`, and the keys in `limits.max_keys`. At least 1.
pub(super) fn keys_per_frame(
    limits: &Limits,
    dense: bool,
    width: usize,
    dim: usize,
    op: Op,
    ctrl: usize,
) -> usize {
    let room = limits
        .max_frame
        .min(SEND_FRAME_BYTES)
        .saturating_sub(pserver_wire::header::HEADER_LEN + ctrl + FRAME_SLACK);
    let sent = if dense { 0 } else { 8 } + 4 * width;
    let back = if op == Op::Push { 0 } else { 4 * dim };
    (room / sent.max(back).max(1)).min(limits.max_keys).max(1)
}

/// Cuts a slice over `range` (its `count` keys start at `first` in the
/// request) into pieces of at most `per` keys: `(range, first, count)`
/// each, in key order, whose ranges are disjoint and cover `range`, so
/// that each piece is a request of its own to the same server (the range
/// clock records each piece's range). `keys` is the request's key list,
/// `None` for a dense request, whose keys are its range's. A slice that
/// fits, or has no keys, is one piece.
pub(super) fn cut(
    range: KeyRange,
    first: usize,
    count: usize,
    per: usize,
    keys: Option<&[u64]>,
) -> Vec<(KeyRange, usize, usize)> {
    let per = per.max(1);
    if count <= per {
        return vec![(range, first, count)];
    }
    let mut out = Vec::with_capacity(count.div_ceil(per));
    let mut at = 0;
    let mut begin = range.begin;
    while at < count {
        let n = per.min(count - at);
        let end = if at + n == count {
            range.end
        } else {
            match keys {
                Some(k) => k[first + at + n],
                // Dense: the range's keys are the keys.
                None => begin + n as u64,
            }
        };
        out.push((KeyRange { begin, end }, first + at, n));
        at += n;
        begin = end;
    }
    out
}
