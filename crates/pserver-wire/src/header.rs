//! The fixed little-endian header every frame starts with.
//!
//! Layout (HELPER: implement encode/decode exactly so; 80 bytes):
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
//!  68   12 reserved    zero
//! ```

use pserver_core::{KeyRange, NodeId};

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
/// Flag: the request's consistency overrides the table's (see `Control::Consistency`).
pub const FLAG_ALL_FLAGS: u16 = FLAG_DENSE | FLAG_RETRY;

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
}
