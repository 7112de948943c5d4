//! Feeds arbitrary bytes to the frame decoder, both as one body and as a
//! length-prefixed stream through the codec. Nothing may panic, and any frame
//! that decodes must re-encode to the same bytes and decode back equal.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pserver_wire::{Control, Frame, FrameCodec, Limits};
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();

    if let Ok(frame) = Frame::decode(data, &limits) {
        let bytes = check_round_trip(&frame, &limits);
        // The decoder accepts only exact section lengths and zero reserved
        // bytes, so an accepted body has exactly one encoding.
        assert_eq!(&bytes[..], data, "re-encoding changed the bytes");
    }

    // The same bytes as a stream: possibly several frames back to back.
    let mut codec = FrameCodec::new(limits);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = codec.decode(&mut buf) {
        check_round_trip(&frame, &limits);
    }
});

/// Re-encodes `frame`, decodes it again, checks it is the same frame (values
/// by bits, so NaNs count as equal to themselves), and returns the encoding.
fn check_round_trip(frame: &Frame, limits: &Limits) -> BytesMut {
    // A frame the decoder accepted is one the sender-side check accepts.
    assert_eq!(frame.check(limits), Ok(()));
    // Arbitrary control bytes must be refused cleanly, never panic.
    let _ = Control::from_bytes(&frame.ctrl);
    // So must an arbitrary packed values section.
    let _ = frame.clone().unpack();

    let mut bytes = BytesMut::new();
    frame.encode(&mut bytes);
    let again = Frame::decode(&bytes, limits).expect("a re-encoded frame decodes");
    assert_eq!(again.header, frame.header);
    assert_eq!(again.keys, frame.keys);
    assert_eq!(again.ctrl, frame.ctrl);
    let bits = |f: &Frame| f.vals.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&again), bits(frame));
    bytes
}
