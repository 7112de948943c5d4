//! A whole frame: header plus sections, with checked decoding.
//!
//! HELPER: implement `encode`/`decode`.

use crate::header::Header;
use crate::message::Control;
use bytes::{Bytes, BytesMut};

/// Bounds a decoder enforces before allocating.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame body in bytes (after the length prefix).
    pub max_frame: usize,
    /// Most keys in one frame.
    pub max_keys: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_frame: 256 << 20,
            max_keys: 32 << 20,
        }
    }
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WireError {
    /// Shorter than the fixed header.
    #[error("frame of {0} bytes is shorter than the {len}-byte header", len = crate::header::HEADER_LEN)]
    Short(usize),
    /// Does not start with the magic bytes.
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// Another protocol version.
    #[error("protocol version {0} is not supported (this build speaks {v})", v = crate::header::VERSION)]
    BadVersion(u8),
    /// Unknown kind byte.
    #[error("unknown frame kind {0}")]
    BadKind(u8),
    /// Unknown flag bits.
    #[error("unknown flags {0:#06x}")]
    BadFlags(u16),
    /// Reserved bytes not zero.
    #[error("reserved header bytes are not zero")]
    Reserved,
    /// The range has begin > end.
    #[error("range [{0}, {1}) is inverted")]
    BadRange(u64, u64),
    /// Section lengths do not add up to the frame length.
    #[error("sections ({keys} keys, {vals} values, {ctrl} control bytes) do not fill the {frame}-byte frame")]
    Length {
        /// Keys declared.
        keys: u64,
        /// Values declared.
        vals: u64,
        /// Control bytes declared.
        ctrl: u64,
        /// Frame length.
        frame: usize,
    },
    /// Over a configured limit.
    #[error("{what} {got} is over the limit {max}")]
    TooLarge {
        /// What was counted.
        what: &'static str,
        /// How many.
        got: u64,
        /// The limit.
        max: u64,
    },
    /// A dense frame with a key list.
    #[error("dense frame carries {0} keys")]
    DenseWithKeys(u32),
    /// The control section did not decode.
    #[error("control section: {0}")]
    Control(String),
}

/// A decoded frame.
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    /// Fixed fields.
    pub header: Header,
    /// Keys (sorted in requests; checked by the receiver, not the codec).
    pub keys: Vec<u64>,
    /// Values.
    pub vals: Vec<f32>,
    /// Control section, still encoded (empty when absent).
    pub ctrl: Bytes,
}

impl Frame {
    /// A frame with a header and no sections.
    pub fn new(header: Header) -> Frame {
        Frame {
            header,
            keys: Vec::new(),
            vals: Vec::new(),
            ctrl: Bytes::new(),
        }
    }

    /// A frame carrying a control message.
    pub fn control(header: Header, msg: &Control) -> Frame {
        Frame {
            ctrl: Bytes::from(msg.to_bytes()),
            ..Frame::new(header)
        }
    }

    /// Decodes the control section.
    pub fn control_msg(&self) -> Result<Control, WireError> {
        Control::from_bytes(&self.ctrl)
    }

    /// Bytes of the encoded body (header and sections, without the length prefix).
    pub fn encoded_len(&self) -> usize {
        crate::header::HEADER_LEN + self.keys.len() * 8 + self.vals.len() * 4 + self.ctrl.len()
    }

    /// Appends the body (no length prefix) to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        let _ = dst;
        todo!()
    }

    /// Decodes a body (no length prefix), checking every field and length
    /// against `limits` before allocating.
    pub fn decode(body: &[u8], limits: &Limits) -> Result<Frame, WireError> {
        let _ = (body, limits);
        todo!()
    }
}
