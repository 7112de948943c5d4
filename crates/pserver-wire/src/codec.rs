//! A `tokio_util` codec: `u32` little-endian length prefix, then a [`Frame`]
//! body, refusing bodies over the configured maximum before buffering them.
//!
//! A body over the maximum whose header is a pserver header is refused with
//! [`CodecError::Oversized`], which carries that header (so the refusal can
//! answer the very request), and its bytes are then skipped as they arrive,
//! never buffered: the stream stays in step and the connection usable.

use crate::frame::{Frame, Limits, SHARED_VALS_FROM, WireError};
use crate::header::{HEADER_LEN, Header, MAGIC};
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

/// A frame of at most this many bytes has room for all of it reserved as
/// soon as its length is known: one allocation of the right size, read
/// into directly, where growing in `RESERVE_STEP`s would copy what had
/// arrived at every step (three copies of a 4 MiB frame's first 3 MiB).
/// Twice the worker library's frames, so they always get it. Reserved is
/// not resident: a silent peer pins only the pages its bytes filled, plus
/// at most this much of address space.
const WHOLE_RESERVE: usize = 8 << 20;

/// Frames a byte stream.
#[derive(Clone, Debug)]
pub struct FrameCodec {
    limits: Limits,
    /// Bytes of a refused oversized body still to be dropped as they arrive.
    skip: u64,
}

impl FrameCodec {
    /// A codec enforcing `limits`.
    pub fn new(limits: Limits) -> FrameCodec {
        FrameCodec { limits, skip: 0 }
    }

    /// Drops what has arrived of a refused body; true once all of it is gone.
    fn skipped(&mut self, src: &mut BytesMut) -> bool {
        let n = self.skip.min(src.len() as u64);
        // Fits: at most `src.len()`.
        src.advance(n as usize);
        self.skip -= n;
        self.skip == 0
    }

    /// Whether `src` holds a whole frame that [`Decoder::decode`] would
    /// give out without more bytes (a frame, or the error a bad one is):
    /// its prefix and all the body the prefix declares. False while the
    /// body of a refused frame is still being skipped, or when the
    /// declared length is over the limit (that refusal waits for a header,
    /// not a body). A reader that gets `true` may take the next frame
    /// without waiting on its stream.
    pub fn has_frame(&self, src: &[u8]) -> bool {
        if self.skip > 0 {
            return false;
        }
        let Some(prefix) = src.first_chunk::<PREFIX_LEN>() else {
            return false;
        };
        let declared = u64::from(u32::from_le_bytes(*prefix));
        declared <= self.limits.max_frame as u64
            && (src.len() as u64) >= PREFIX_LEN as u64 + declared
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
    /// A frame declared a body over `max_frame`. Unlike the others this one
    /// leaves the stream in step: the codec drops the body's bytes as they
    /// arrive, so the caller may answer `header` (its request id says which
    /// request) and read on.
    #[error("a frame of {bytes} bytes is over the limit of {max} bytes")]
    Oversized {
        /// The refused frame's header.
        header: Box<Header>,
        /// Its declared body length.
        bytes: u64,
        /// The limit.
        max: u64,
    },
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
    /// buffered for it: under the header length is an error at once; over
    /// `max_frame` is [`CodecError::Oversized`] once the header has arrived
    /// (a bad header instead is the error it is), and the body is skipped.
    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        if !self.skipped(src) {
            return Ok(None);
        }
        let Some(prefix) = src.first_chunk::<PREFIX_LEN>() else {
            return Ok(None);
        };
        let declared = u32::from_le_bytes(*prefix);
        // Compared in u64 so a 4 GiB declaration is refused even where
        // `usize` is 32 bits.
        let max = self.limits.max_frame as u64;
        if u64::from(declared) > max {
            // Waits for the header (80 bytes, whatever was declared), so the
            // refusal can name the request; nothing more is buffered.
            let Some(head) = src.get(PREFIX_LEN..PREFIX_LEN + HEADER_LEN) else {
                // Bytes that already cannot begin a header are refused now.
                let begun = &src[PREFIX_LEN..src.len().min(PREFIX_LEN + MAGIC.len())];
                if begun != &MAGIC[..begun.len()] {
                    let mut magic = [0; 4];
                    magic[..begun.len()].copy_from_slice(begun);
                    return Err(WireError::BadMagic(magic).into());
                }
                src.reserve(PREFIX_LEN + HEADER_LEN - src.len());
                return Ok(None);
            };
            // A bad header is not a pserver frame: the stream cannot be
            // trusted to be in step, so that is the error.
            let (header, _) = Header::decode(head)?;
            src.advance(PREFIX_LEN);
            self.skip = declared.into();
            self.skipped(src);
            return Err(CodecError::Oversized {
                header: Box::new(header),
                bytes: declared.into(),
                max,
            });
        }
        // Fits: it is at most `max_frame`, a `usize`.
        let len = declared as usize;
        if len < HEADER_LEN {
            return Err(WireError::Short(len).into());
        }
        let total = PREFIX_LEN + len;
        if src.len() < total {
            let missing = total - src.len();
            src.reserve(if total <= WHOLE_RESERVE {
                missing
            } else {
                missing.min(RESERVE_STEP)
            });
            return Ok(None);
        }
        // The frame's extent is known even when its contents are bad, so the
        // stream stays in step whatever the caller does next.
        if len < HEADER_LEN + SHARED_VALS_FROM {
            let result = Frame::decode(&src[PREFIX_LEN..total], &self.limits);
            src.advance(total);
            return result.map(Some).map_err(CodecError::from);
        }
        // Large enough to hold values worth reading in place: the frame
        // keeps its part of the buffer (the buffer's next reservation
        // reuses the allocation once the frame is gone, or makes another).
        let mut body = src.split_to(total).freeze();
        body.advance(PREFIX_LEN);
        Frame::decode_bytes(&body, &self.limits)
            .map(Some)
            .map_err(CodecError::from)
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
            vals: vec![1.0, 2.0, 3.0].into(),
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
    fn has_frame_says_whether_a_whole_frame_is_buffered() {
        let codec = FrameCodec::default();
        let one = wire(&frame());
        assert!(!codec.has_frame(&[]));
        assert!(!codec.has_frame(&one[..3]), "a prefix cut short");
        assert!(!codec.has_frame(&one[..one.len() - 1]), "a body cut short");
        assert!(codec.has_frame(&one));
        let mut two = one.clone();
        two.extend_from_slice(&one[..5]);
        assert!(codec.has_frame(&two), "a whole frame, then part of one");
        // Whatever the decoder does with it, it does it with these bytes.
        let mut b = BytesMut::from(&two[..]);
        let mut codec = FrameCodec::default();
        assert_eq!(codec.decode(&mut b).unwrap(), Some(frame()));
        assert!(!codec.has_frame(&b), "only part of the next");
        // Over the limit: the refusal waits for a header, not a body.
        let small = Limits {
            max_frame: 100,
            ..Limits::default()
        };
        let mut over = Vec::from(1000u32.to_le_bytes());
        over.extend_from_slice(&[0; 1000]);
        assert!(!FrameCodec::new(small).has_frame(&over));
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
        let mut codec = FrameCodec::default();
        // It waits for the header, and for nothing more.
        assert!(codec.decode(&mut b).unwrap().is_none());
        assert!(b.capacity() <= 128, "capacity grew to {}", b.capacity());
        // A header that is no pserver header: refused as what it is.
        b.extend_from_slice(&[0; HEADER_LEN - 4]);
        let err = codec.decode(&mut b).unwrap_err();
        assert!(
            matches!(err, CodecError::Wire(WireError::BadVersion(0))),
            "{err}"
        );
        // Bytes that cannot begin a header are refused without waiting.
        let mut b = BytesMut::new();
        b.put_u32_le(u32::MAX);
        b.extend_from_slice(b"PSx");
        let err = FrameCodec::default().decode(&mut b).unwrap_err();
        assert!(
            matches!(err, CodecError::Wire(WireError::BadMagic(m)) if &m == b"PSx\0"),
            "{err}"
        );
    }

    #[test]
    fn an_oversized_frame_is_refused_with_its_header_and_skipped() {
        let limits = Limits {
            max_frame: 200,
            ..Limits::default()
        };
        let mut big = Frame {
            vals: vec![1.0; 100].into(),
            ..frame()
        };
        big.header.request_id = 42;
        let whole = {
            let mut b = BytesMut::new();
            FrameCodec::new(Limits::default())
                .encode(&big, &mut b)
                .unwrap();
            b
        };
        let mut small = frame();
        small.header.request_id = 43;
        let mut after = wire(&small);
        after.extend_from_slice(&wire(&small));
        // Arriving in pieces: the header first, then the rest and two
        // good frames.
        let mut codec = FrameCodec::new(limits);
        let mut b = BytesMut::from(&whole[..PREFIX_LEN + HEADER_LEN - 1]);
        assert!(codec.decode(&mut b).unwrap().is_none());
        b.extend_from_slice(&whole[PREFIX_LEN + HEADER_LEN - 1..PREFIX_LEN + HEADER_LEN + 10]);
        match codec.decode(&mut b).unwrap_err() {
            CodecError::Oversized { header, bytes, max } => {
                assert_eq!(header.request_id, 42);
                assert_eq!(bytes, big.encoded_len() as u64);
                assert_eq!(max, 200);
            }
            other => panic!("{other}"),
        }
        assert!(b.is_empty(), "what arrived of the body is dropped");
        b.extend_from_slice(&whole[PREFIX_LEN + HEADER_LEN + 10..]);
        b.extend_from_slice(&after);
        assert_eq!(codec.decode(&mut b).unwrap(), Some(small.clone()));
        assert_eq!(codec.decode(&mut b).unwrap(), Some(small));
        assert!(b.is_empty());
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
        b.extend_from_slice(&wire(&frame())[PREFIX_LEN..PREFIX_LEN + HEADER_LEN]);
        let err = FrameCodec::new(limits).decode(&mut b).unwrap_err();
        assert!(
            matches!(
                err,
                CodecError::Oversized {
                    bytes: 101,
                    max: 100,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "a frame of 101 bytes is over the limit of 100 bytes"
        );
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
