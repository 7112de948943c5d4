//! pserver's wire format, without I/O.
//!
//! A frame on the stream is a `u32` little-endian length followed by that many
//! bytes: a fixed [`header::Header`], then raw sections (sorted `u64` keys,
//! `f32` values, all little-endian) and a small postcard-encoded control
//! section ([`message::Control`]). Keys and values are copied as slices, never
//! encoded one at a time. Every length and count is checked before use.
//!
//! - [`header`]: the fixed header and frame kinds.
//! - [`frame`]: a whole frame, its encoding and checked decoding.
//! - [`message`]: control messages carried in the control section.
//! - [`pack`]: value compression (lossless, fixed point with random rounding).
//! - [`codec`]: a `tokio_util` codec with a maximum frame size.
//! - [`vals`]: a frame's values, owned or read in place from shared bytes.

pub mod codec;
pub mod frame;
pub mod header;
pub mod message;
pub mod pack;
pub mod vals;

pub use codec::{CodecError, FrameCodec};
pub use frame::{Frame, Limits, WireError};
pub use header::{Header, Kind};
pub use message::{Control, ErrorCode};
pub use pack::{Packed, Packing};
pub use vals::Vals;
