//! The fixed little-endian header every frame starts with.
//!
//! Layout (80 bytes, every integer little-endian):
//! ```text
//! off size field
//!   0    4 magic       b"PSRV"
//!   4    1 version     VERSION
//!   5    1 kind        Kind as u8
//!   6    2 flags       u16
//!   8    8 request_id  u64
//!  16    4 sender      u32 (NodeId)
//!  20    4 table       u32
//!  24    8 epoch       u64
//!  32    8 clock       u64
//!  40    8 range.begin u64
//!  48    8 range.end   u64
//!  56    4 n_keys      u32  (count of u64 keys)
//!  60    4 n_vals      u32  (count of f32 values)
//!  64    4 ctrl_len    u32  (bytes of control section)
//!  68    1 packing     u8   (0: values raw; else `pack::Packing`)
//!  69    3 reserved    zero
//!  72    4 packed_len  u32  (bytes of a packed values section; 0 when raw)
//!  76    4 reserved    zero
//! ```
//!
//! When `packing` is not 0, `n_vals` still counts the values (as unpacked)
//! and the values section is `packed_len` bytes (see [`crate::pack`]).

use crate::frame::WireError;
use bytes::{BufMut, BytesMut};
use pserver_core::{KeyRange, NodeId};

/// Offset of the packing byte.
const PACKING_AT: usize = 68;
/// Offset of the packed values section's length.
const PACKED_LEN_AT: usize = 72;
/// Header bytes that must be zero.
const RESERVED: [std::ops::Range<usize>; 2] = [69..72, 76..80];

/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"PSRV";
/// Protocol version this build speaks.
pub const VERSION: u8 = 1;
/// Bytes in the fixed header.
pub const HEADER_LEN: usize = 80;

/// Flag: the request covers every key of `range` and carries no key list.
pub const FLAG_DENSE: u16 = 1;
/// Flag: this push is a retry of one sent before (a duplicate verdict is then success).
pub const FLAG_RETRY: u16 = 2;
/// Every flag this version knows; a decoder refuses a header with any other bit
/// set, so a later version cannot give an old node a flag it would silently ignore.
pub const FLAG_ALL_FLAGS: u16 = FLAG_DENSE
    | FLAG_RETRY
    | FLAG_SCAN
    | FLAG_KEYREF
    | FLAG_CACHE_KEYS
    | FLAG_PACK_REPLY
    | FLAG_SIGNIFICANT;
/// Flag: a pull of every stored entry in `range`; the reply carries their keys.
pub const FLAG_SCAN: u16 = 4;
/// Flag: the key section is exactly two `u64`s, `[hash, count]`, naming a key
/// list the receiver cached from an earlier frame of this sender and table
/// (see `pserver_core::keycache`). Not valid with [`FLAG_DENSE`] or
/// [`FLAG_SCAN`], which carry no key list to name.
pub const FLAG_KEYREF: u16 = 8;
/// Flag: on a request, the receiver should remember this frame's key list,
/// so that later frames can name it with [`FLAG_KEYREF`] (a receiver may
/// decline, e.g. when the list is larger than its cache). On a successful
/// reply: the receiver kept the request's list.
pub const FLAG_CACHE_KEYS: u16 = 16;
/// Flag: on a request, the sender would like the values of the reply
/// packed losslessly ([`crate::pack`]); the receiver packs them when that
/// makes them smaller. Values in a request say their own packing in the
/// header's packing field and need no flag.
pub const FLAG_PACK_REPLY: u16 = 32;
/// Flag: the significantly-modified filter (`pserver_core::significant`).
/// On a pull, its control section is a `Control::SignificantPull` (the
/// threshold and what the sender holds); on the reply, a
/// `Control::Significant` stamp saying which keys' values it carries (the
/// values section holds only those). A reply without the flag carries
/// every value, as any pull's.
pub const FLAG_SIGNIFICANT: u16 = 64;

/// What a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// A control request or notice; the control section says which.
    Control = 1,
    /// Push keys and values to a table.
    Push = 2,
    /// Pull the values of keys.
    Pull = 3,
    /// Push, then pull the same keys after the push is applied.
    PushPull = 4,
    /// A successful reply: values for a pull, and/or a control section.
    Reply = 5,
    /// A refused request: the control section is `Control::Error`.
    Error = 6,
    /// The sender's epoch is stale: the control section is `Control::Map`.
    Redirect = 7,
}

impl Kind {
    /// The kind with this byte, if any.
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Control,
            2 => Kind::Push,
            3 => Kind::Pull,
            4 => Kind::PushPull,
            5 => Kind::Reply,
            6 => Kind::Error,
            7 => Kind::Redirect,
            _ => return None,
        })
    }
}

/// The fixed fields of a frame (the section lengths are derived from the frame).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// What the frame is.
    pub kind: Kind,
    /// `FLAG_*` bits.
    pub flags: u16,
    /// Chosen by the requester; a reply carries the request's id.
    pub request_id: u64,
    /// Node id of the sender.
    pub sender: NodeId,
    /// Table id (0 when not about a table).
    pub table: u32,
    /// Sender's cluster-map epoch.
    pub epoch: u64,
    /// Sender's logical clock (iteration).
    pub clock: u64,
    /// Key range the request covers.
    pub range: KeyRange,
}

impl Header {
    /// A header of `kind` with every other field zero and the full key range.
    pub fn new(kind: Kind) -> Header {
        Header {
            kind,
            flags: 0,
            request_id: 0,
            sender: 0,
            table: 0,
            epoch: 0,
            clock: 0,
            range: KeyRange::ALL,
        }
    }

    /// True when `FLAG_DENSE` is set.
    pub fn dense(&self) -> bool {
        self.flags & FLAG_DENSE != 0
    }

    /// True when `FLAG_KEYREF` is set: the keys are `[hash, count]`.
    pub fn key_ref(&self) -> bool {
        self.flags & FLAG_KEYREF != 0
    }
}

/// Section sizes as the header declares them: counts, not bytes, for keys
/// and values, so that a declared size can be checked against limits before
/// it is multiplied into a byte length.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sections {
    /// Number of `u64` keys.
    pub keys: u32,
    /// Number of `f32` values.
    pub vals: u32,
    /// Bytes of the control section.
    pub ctrl: u32,
    /// How the values section is packed (0: raw `f32`s).
    pub packing: u8,
    /// Bytes of the values section when packed (0 when raw).
    pub packed: u32,
}

impl Sections {
    /// Bytes of a body with these sections, header included. Computed in
    /// `u64`, where it cannot overflow (at most `80 + 13 * u32::MAX`), so an
    /// absurd declaration is compared with the real length rather than wrapped.
    pub fn body_len(&self) -> u64 {
        HEADER_LEN as u64 + u64::from(self.keys) * 8 + self.vals_len() + u64::from(self.ctrl)
    }

    /// Bytes of the values section: raw `f32`s, or the packed length.
    pub fn vals_len(&self) -> u64 {
        if self.packing == 0 {
            u64::from(self.vals) * 4
        } else {
            u64::from(self.packed)
        }
    }
}

impl Header {
    /// Appends the 80-byte header, declaring `sections`, to `dst`.
    pub fn encode_into(&self, sections: Sections, dst: &mut BytesMut) {
        dst.reserve(HEADER_LEN);
        dst.put_slice(&MAGIC);
        dst.put_u8(VERSION);
        dst.put_u8(self.kind as u8);
        dst.put_u16_le(self.flags);
        dst.put_u64_le(self.request_id);
        dst.put_u32_le(self.sender);
        dst.put_u32_le(self.table);
        dst.put_u64_le(self.epoch);
        dst.put_u64_le(self.clock);
        dst.put_u64_le(self.range.begin);
        dst.put_u64_le(self.range.end);
        dst.put_u32_le(sections.keys);
        dst.put_u32_le(sections.vals);
        dst.put_u32_le(sections.ctrl);
        dst.put_u8(sections.packing);
        dst.put_bytes(0, PACKED_LEN_AT - PACKING_AT - 1);
        dst.put_u32_le(sections.packed);
        dst.put_bytes(0, HEADER_LEN - PACKED_LEN_AT - 4);
    }

    /// Decodes the header at the start of `body` and the section sizes it
    /// declares. Checks, in this order: length, magic, version, kind, flags,
    /// reserved bytes, range. The sizes are returned unchecked: limits and the
    /// frame length are the caller's ([`crate::Frame::decode`]).
    pub fn decode(body: &[u8]) -> Result<(Header, Sections), WireError> {
        let Some(h) = body.first_chunk::<HEADER_LEN>() else {
            return Err(WireError::Short(body.len()));
        };
        let magic = field::<4>(h, 0);
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        if h[4] != VERSION {
            return Err(WireError::BadVersion(h[4]));
        }
        let kind = Kind::from_u8(h[5]).ok_or(WireError::BadKind(h[5]))?;
        let flags = u16::from_le_bytes(field(h, 6));
        if flags & !FLAG_ALL_FLAGS != 0 {
            return Err(WireError::BadFlags(flags));
        }
        // Checked before the range so that a header from a newer layout that
        // reuses these bytes is reported as such, not as a confusing range.
        if RESERVED
            .iter()
            .any(|r| h[r.clone()].iter().any(|&b| b != 0))
        {
            return Err(WireError::Reserved);
        }
        let begin = u64::from_le_bytes(field(h, 40));
        let end = u64::from_le_bytes(field(h, 48));
        let range = KeyRange::new(begin, end).ok_or(WireError::BadRange(begin, end))?;
        let header = Header {
            kind,
            flags,
            request_id: u64::from_le_bytes(field(h, 8)),
            sender: u32::from_le_bytes(field(h, 16)),
            table: u32::from_le_bytes(field(h, 20)),
            epoch: u64::from_le_bytes(field(h, 24)),
            clock: u64::from_le_bytes(field(h, 32)),
            range,
        };
        let sections = Sections {
            keys: u32::from_le_bytes(field(h, 56)),
            vals: u32::from_le_bytes(field(h, 60)),
            ctrl: u32::from_le_bytes(field(h, 64)),
            packing: h[PACKING_AT],
            packed: u32::from_le_bytes(field(h, PACKED_LEN_AT)),
        };
        Ok((header, sections))
    }
}

/// The `N` header bytes at `at`. Offsets are constants inside the fixed-size
/// header, so the slice is always in bounds.
fn field<const N: usize>(h: &[u8; HEADER_LEN], at: usize) -> [u8; N] {
    let mut out = [0; N];
    out.copy_from_slice(&h[at..at + N]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            kind: Kind::PushPull,
            flags: FLAG_RETRY,
            request_id: 0x0102_0304_0506_0708,
            sender: 0x1112_1314,
            table: 0x2122_2324,
            epoch: 0x3132_3334_3536_3738,
            clock: 0x4142_4344_4546_4748,
            range: KeyRange::new(0x5152_5354_5556_5758, 0x6162_6364_6566_6768).unwrap(),
        }
    }

    /// Pins every field to the offset the module docs promise, so a change
    /// to the layout cannot pass unnoticed.
    #[test]
    fn layout_matches_the_documented_offsets() {
        let mut b = BytesMut::new();
        let sections = Sections {
            keys: 0x7172_7374,
            vals: 0x8182_8384,
            ctrl: 0x9192_9394,
            packing: 2,
            packed: 0xa1a2_a3a4,
        };
        sample().encode_into(sections, &mut b);
        assert_eq!(b.len(), HEADER_LEN);
        assert_eq!(&b[0..4], b"PSRV");
        assert_eq!(b[4], VERSION);
        assert_eq!(b[5], Kind::PushPull as u8);
        assert_eq!(&b[6..8], &FLAG_RETRY.to_le_bytes());
        assert_eq!(&b[8..16], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&b[16..20], &0x1112_1314u32.to_le_bytes());
        assert_eq!(&b[20..24], &0x2122_2324u32.to_le_bytes());
        assert_eq!(&b[24..32], &0x3132_3334_3536_3738u64.to_le_bytes());
        assert_eq!(&b[32..40], &0x4142_4344_4546_4748u64.to_le_bytes());
        assert_eq!(&b[40..48], &0x5152_5354_5556_5758u64.to_le_bytes());
        assert_eq!(&b[48..56], &0x6162_6364_6566_6768u64.to_le_bytes());
        assert_eq!(&b[56..60], &0x7172_7374u32.to_le_bytes());
        assert_eq!(&b[60..64], &0x8182_8384u32.to_le_bytes());
        assert_eq!(&b[64..68], &0x9192_9394u32.to_le_bytes());
        assert_eq!(b[68], 2);
        assert_eq!(&b[69..72], &[0; 3]);
        assert_eq!(&b[72..76], &0xa1a2_a3a4u32.to_le_bytes());
        assert_eq!(&b[76..80], &[0; 4]);
        assert_eq!(Header::decode(&b), Ok((sample(), sections)));
    }

    #[test]
    fn every_kind_byte_round_trips() {
        for b in 0..=u8::MAX {
            match Kind::from_u8(b) {
                Some(k) => assert_eq!(k as u8, b),
                None => assert!(b == 0 || b > 7, "byte {b} has no kind"),
            }
        }
    }

    #[test]
    fn body_len_cannot_overflow() {
        let s = Sections {
            keys: u32::MAX,
            vals: u32::MAX,
            ctrl: u32::MAX,
            packing: 0,
            packed: u32::MAX,
        };
        assert_eq!(s.body_len(), 80 + 13 * u64::from(u32::MAX));
        let packed = Sections { packing: 1, ..s };
        assert_eq!(packed.body_len(), 80 + 10 * u64::from(u32::MAX));
    }
}
