//! A `tokio_util` codec: `u32` little-endian length prefix, then a [`Frame`]
//! body, refusing bodies over the configured maximum before buffering them.
//!
//! HELPER: implement `Decoder` and `Encoder<&Frame>` (and `Encoder<Frame>`).

use crate::frame::{Frame, Limits, WireError};

/// Frames a byte stream.
#[derive(Clone, Debug)]
pub struct FrameCodec {
    limits: Limits,
}

impl FrameCodec {
    /// A codec enforcing `limits`.
    pub fn new(limits: Limits) -> FrameCodec {
        FrameCodec { limits }
    }
}

/// Why a stream could not be framed.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The transport failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A frame was malformed; the connection should get an error reply and close.
    #[error("malformed frame: {0}")]
    Wire(#[from] WireError),
}

// HELPER: impl tokio_util::codec::Decoder for FrameCodec { type Item = Frame; type Error = CodecError; }
// HELPER: impl tokio_util::codec::Encoder<Frame> / <&Frame> for FrameCodec { type Error = CodecError; }
#[allow(dead_code)]
fn _uses(_: Frame) {}
