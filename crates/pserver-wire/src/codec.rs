//! A `tokio_util` codec: `u32` little-endian length prefix, then a [`Frame`]
//! body, refusing bodies over the configured maximum before buffering them.

use crate::frame::{Frame, Limits, WireError};
use crate::header::HEADER_LEN;
use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// Bytes of the length prefix.
pub const PREFIX_LEN: usize = 4;

/// Most bytes reserved ahead of what has arrived. A peer can declare a frame
/// of up to `max_frame` bytes and then send nothing; reserving the whole
/// declaration at once would let each such connection pin `max_frame` of
/// memory for free. Reserving in steps makes the buffer grow with the bytes
/// actually received (amortized by the buffer's doubling), at the cost of a
/// few more reallocations for large frames.
const RESERVE_STEP: usize = 1 << 20;

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

    /// The limits this codec enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Checks and writes one frame; shared by both `Encoder` impls.
    fn encode_frame(&self, frame: &Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        frame.check(&self.limits)?;
        let len = frame.encoded_len();
        // `check` bounds the body by `max_frame`, which may be configured
        // above what the prefix can express.
        let prefix = u32::try_from(len).map_err(|_| WireError::TooLarge {
            what: "frame bytes",
            got: len as u64,
            max: u32::MAX.into(),
        })?;
        dst.reserve(PREFIX_LEN + len);
        dst.put_u32_le(prefix);
        frame.encode(dst);
        Ok(())
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

impl Default for FrameCodec {
    /// A codec with [`Limits::default`].
    fn default() -> FrameCodec {
        FrameCodec::new(Limits::default())
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = CodecError;

    /// Takes one frame off the front of `src`, or `Ok(None)` when it has not
    /// all arrived. The declared length is checked before anything is
    /// buffered for it: over `max_frame` or under the header length is an
    /// error at once.
    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        let Some(prefix) = src.first_chunk::<PREFIX_LEN>() else {
            return Ok(None);
        };
        let declared = u32::from_le_bytes(*prefix);
        // Compared in u64 so a 4 GiB declaration is refused even where
        // `usize` is 32 bits.
        if u64::from(declared) > self.limits.max_frame as u64 {
            return Err(WireError::TooLarge {
                what: "frame bytes",
                got: declared.into(),
                max: self.limits.max_frame as u64,
            }
            .into());
        }
        // Fits: it is at most `max_frame`, a `usize`.
        let len = declared as usize;
        if len < HEADER_LEN {
            return Err(WireError::Short(len).into());
        }
        let total = PREFIX_LEN + len;
        if src.len() < total {
            src.reserve((total - src.len()).min(RESERVE_STEP));
            return Ok(None);
        }
        let result = Frame::decode(&src[PREFIX_LEN..total], &self.limits);
        // The frame's extent is known even when its contents are bad, so the
        // stream stays in step whatever the caller does next.
        src.advance(total);
        result.map(Some).map_err(CodecError::from)
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = CodecError;

    /// Writes the length prefix and body, refusing a frame the peer would
    /// refuse (see [`Frame::check`]), in particular one over `max_frame`.
    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.encode_frame(frame, dst)
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = CodecError;

    /// As for `&Frame`.
    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.encode_frame(&frame, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::{FLAG_DENSE, Header, Kind};
    use crate::message::Control;

    fn frame() -> Frame {
        Frame {
            keys: vec![1, 2, 3],
            vals: vec![1.0, 2.0, 3.0],
            ..Frame::control(Header::new(Kind::Push), &Control::Ok)
        }
    }

    fn wire(frame: &Frame) -> BytesMut {
        let mut b = BytesMut::new();
        FrameCodec::default().encode(frame, &mut b).unwrap();
        b
    }

    fn too_large(got: u64, max: u64) -> WireError {
        WireError::TooLarge {
            what: "frame bytes",
            got,
            max,
        }
    }

    #[test]
    fn prefix_is_body_length() {
        let b = wire(&frame());
        assert_eq!(b.len(), PREFIX_LEN + frame().encoded_len());
        assert_eq!(&b[..4], &(frame().encoded_len() as u32).to_le_bytes());
        let mut body = BytesMut::new();
        frame().encode(&mut body);
        assert_eq!(&b[4..], &body[..]);
    }

    #[test]
    fn owned_and_borrowed_encoders_agree() {
        let mut owned = BytesMut::new();
        FrameCodec::default().encode(frame(), &mut owned).unwrap();
        assert_eq!(owned, wire(&frame()));
    }

    #[test]
    fn decodes_back_to_back_frames_and_leaves_the_rest() {
        let mut other = frame();
        other.header.request_id = 9;
        let mut b = wire(&frame());
        b.extend_from_slice(&wire(&other));
        b.extend_from_slice(&[1, 2]);
        let mut codec = FrameCodec::default();
        assert_eq!(codec.decode(&mut b).unwrap(), Some(frame()));
        assert_eq!(codec.decode(&mut b).unwrap(), Some(other));
        assert_eq!(codec.decode(&mut b).unwrap(), None);
        assert_eq!(&b[..], &[1, 2]);
    }

    #[test]
    fn every_split_point_streams() {
        let whole = wire(&frame());
        for at in 0..=whole.len() {
            let mut codec = FrameCodec::default();
            let mut b = BytesMut::from(&whole[..at]);
            if at < whole.len() {
                assert_eq!(codec.decode(&mut b).unwrap(), None, "split at {at}");
                assert_eq!(b.len(), at, "a partial frame is not consumed");
                b.extend_from_slice(&whole[at..]);
            }
            assert_eq!(
                codec.decode(&mut b).unwrap(),
                Some(frame()),
                "split at {at}"
            );
            assert!(b.is_empty());
        }
    }

    #[test]
    fn byte_at_a_time() {
        let whole = wire(&frame());
        let mut codec = FrameCodec::default();
        let mut b = BytesMut::new();
        for (i, &byte) in whole.iter().enumerate() {
            assert_eq!(codec.decode(&mut b).unwrap(), None, "after {i} bytes");
            b.put_u8(byte);
        }
        assert_eq!(codec.decode(&mut b).unwrap(), Some(frame()));
    }

    #[test]
    fn partial_frame_reserves_what_it_needs() {
        let whole = wire(&frame());
        let mut b = BytesMut::from(&whole[..10]);
        assert_eq!(FrameCodec::default().decode(&mut b).unwrap(), None);
        assert!(b.capacity() >= whole.len());
    }

    #[test]
    fn four_gib_prefix_is_refused_without_buffering() {
        let mut b = BytesMut::with_capacity(16);
        b.put_u32_le(u32::MAX);
        b.extend_from_slice(b"PSRV");
        let err = FrameCodec::default().decode(&mut b).unwrap_err();
        assert!(
            matches!(err, CodecError::Wire(ref e) if *e == too_large(u32::MAX.into(), 256 << 20)),
            "{err}"
        );
        assert!(b.capacity() <= 64, "capacity grew to {}", b.capacity());
    }

    #[test]
    fn large_declaration_under_the_limit_reserves_in_steps() {
        // A peer may declare a big frame and then stall; memory should track
        // the bytes that arrived, not the declaration.
        let limits = Limits {
            max_frame: usize::MAX,
            max_keys: usize::MAX,
            ..Limits::default()
        };
        let mut b = BytesMut::new();
        b.put_u32_le(u32::MAX);
        assert_eq!(FrameCodec::new(limits).decode(&mut b).unwrap(), None);
        assert!(
            b.capacity() <= 2 * RESERVE_STEP,
            "capacity {}",
            b.capacity()
        );
    }

    #[test]
    fn prefix_over_a_configured_limit() {
        let limits = Limits {
            max_frame: 100,
            ..Limits::default()
        };
        let mut b = BytesMut::new();
        b.put_u32_le(101);
        let err = FrameCodec::new(limits).decode(&mut b).unwrap_err();
        assert!(matches!(err, CodecError::Wire(ref e) if *e == too_large(101, 100)));
    }

    #[test]
    fn prefix_shorter_than_a_header() {
        for len in [0, 1, HEADER_LEN as u32 - 1] {
            let mut b = BytesMut::new();
            b.put_u32_le(len);
            let err = FrameCodec::default().decode(&mut b).unwrap_err();
            assert!(
                matches!(err, CodecError::Wire(WireError::Short(n)) if n == len as usize),
                "{err}"
            );
        }
    }

    #[test]
    fn bad_body_is_reported_and_skipped() {
        let mut b = wire(&frame());
        b[4] = b'X';
        b.extend_from_slice(&wire(&frame()));
        let mut codec = FrameCodec::default();
        let err = codec.decode(&mut b).unwrap_err();
        assert!(matches!(err, CodecError::Wire(WireError::BadMagic(_))));
        assert_eq!(codec.decode(&mut b).unwrap(), Some(frame()));
    }

    #[test]
    fn truncated_stream_is_an_io_error_at_eof() {
        let whole = wire(&frame());
        let mut b = BytesMut::from(&whole[..whole.len() - 1]);
        let err = FrameCodec::default().decode_eof(&mut b).unwrap_err();
        assert!(matches!(err, CodecError::Io(_)), "{err}");
    }

    #[test]
    fn encoder_refuses_frames_over_the_limit() {
        let limits = Limits {
            max_frame: frame().encoded_len() - 1,
            ..Limits::default()
        };
        let mut b = BytesMut::new();
        let err = FrameCodec::new(limits)
            .encode(&frame(), &mut b)
            .unwrap_err();
        let len = frame().encoded_len() as u64;
        assert!(matches!(err, CodecError::Wire(ref e) if *e == too_large(len, len - 1)));
        assert!(b.is_empty(), "nothing is written for a refused frame");
    }

    #[test]
    fn encoder_refuses_frames_the_peer_would_refuse() {
        let mut f = frame();
        f.header.flags = FLAG_DENSE;
        let mut b = BytesMut::new();
        let err = FrameCodec::default().encode(&f, &mut b).unwrap_err();
        assert!(matches!(err, CodecError::Wire(WireError::DenseWithKeys(3))));
        assert!(b.is_empty());
    }
}
