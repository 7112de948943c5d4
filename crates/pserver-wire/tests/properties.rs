//! Property tests of the wire format: round trips of arbitrary frames through
//! `Frame::encode`/`decode` and through the codec (split anywhere), no panics
//! on arbitrary or mutated input, and every control message.

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use proptest::sample::Index;
use pserver_core::map::Group;
use pserver_core::{
    ClusterMap, Consistency, Init, KeyRange, NodeInfo, NodeState, Partition, Role, TableSpec,
    UpdaterSpec,
};
use pserver_wire::codec::CodecError;
use pserver_wire::header::{FLAG_ALL_FLAGS, FLAG_DENSE, FLAG_KEYREF, FLAG_SCAN};
use pserver_wire::message::{Replica, ServerStats, Status};
use pserver_wire::{Control, ErrorCode, Frame, FrameCodec, Header, Kind, Limits, Packing};
use tokio_util::codec::{Decoder, Encoder};

/// Frame equality with values compared by bits, so NaNs (with any payload)
/// must survive exactly.
fn same(a: &Frame, b: &Frame) -> bool {
    a.header == b.header
        && a.keys == b.keys
        && a.ctrl == b.ctrl
        && a.packed == b.packed
        && a.vals
            .iter()
            .map(|v| v.to_bits())
            .eq(b.vals.iter().map(|v| v.to_bits()))
}

fn kind() -> impl Strategy<Value = Kind> {
    (1u8..=7).prop_map(|b| Kind::from_u8(b).unwrap())
}

fn header() -> impl Strategy<Value = Header> {
    (
        kind(),
        0..=FLAG_ALL_FLAGS,
        (any::<u64>(), any::<u32>(), any::<u32>()),
        (any::<u64>(), any::<u64>()),
        (any::<u64>(), any::<u64>()),
    )
        .prop_map(
            |(kind, flags, (request_id, sender, table), (epoch, clock), (a, b))| Header {
                kind,
                flags,
                request_id,
                sender,
                table,
                epoch,
                clock,
                range: KeyRange::new(a.min(b), a.max(b)).unwrap(),
            },
        )
}

/// Any valid frame: dense frames carry no keys; key references carry
/// exactly `[hash, count]` and are neither dense nor scans; values are any
/// bit pattern.
fn frame() -> impl Strategy<Value = Frame> {
    frame_with(48)
}

/// [`frame`] with up to `max_vals` values: past 1,024 (4 KiB) a values
/// section is read in place when the body is shared bytes.
fn frame_with(max_vals: usize) -> impl Strategy<Value = Frame> {
    (
        header(),
        prop::collection::vec(any::<u64>(), 0..48),
        prop::collection::vec(any::<u32>().prop_map(f32::from_bits), 0..max_vals),
        prop::collection::vec(any::<u8>(), 0..48),
        prop::option::of(packing()),
        any::<bool>(),
    )
        .prop_map(|(mut header, mut keys, mut vals, ctrl, packing, zeros)| {
            if zeros {
                // Mostly zeros, as a sparse model's values are: packs well.
                for (i, v) in vals.iter_mut().enumerate() {
                    if i % 5 != 0 {
                        *v = 0.0;
                    }
                }
            }
            if header.key_ref() {
                header.flags &= !(FLAG_DENSE | FLAG_SCAN);
                keys.resize(2, 0);
            }
            if header.dense() {
                keys.clear();
            }
            let mut f = Frame {
                keys,
                header,
                vals: vals.into(),
                ctrl: Bytes::from(ctrl),
                packed: None,
            };
            if let Some(p) = packing {
                f.pack(p);
            }
            f
        })
}

fn packing() -> impl Strategy<Value = Packing> {
    (1u8..=3).prop_map(|b| Packing::from_u8(b).unwrap())
}

fn body(frame: &Frame) -> Vec<u8> {
    let mut b = BytesMut::new();
    frame.encode(&mut b);
    b.to_vec()
}

fn wire(frame: &Frame) -> BytesMut {
    let mut b = BytesMut::new();
    FrameCodec::default().encode(frame, &mut b).unwrap();
    b
}

/// Decodes frames off `b` until the codec wants more or refuses; checks each
/// frame it yields re-encodes to a frame that decodes the same.
fn drain(codec: &mut FrameCodec, b: &mut BytesMut) -> Result<Vec<Frame>, CodecError> {
    let mut out = Vec::new();
    while let Some(f) = codec.decode(b)? {
        out.push(f);
    }
    Ok(out)
}

/// A valid encoding with a few bytes overwritten: reaches the checks past
/// the magic far more often than uniformly random bytes do.
fn mutated() -> impl Strategy<Value = Vec<u8>> {
    (
        frame_with(3000),
        prop::collection::vec((any::<Index>(), any::<u8>()), 1..6),
        any::<Index>(),
    )
        .prop_map(|(f, edits, cut)| {
            let mut b = wire(&f).to_vec();
            for (at, byte) in edits {
                let i = at.index(b.len());
                b[i] = byte;
            }
            // Sometimes truncate, to reach partial and short paths.
            let keep = cut.index(b.len() + 8);
            b.truncate(keep.max(1));
            b
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn frame_round_trips(f in frame()) {
        let b = body(&f);
        prop_assert_eq!(b.len(), f.encoded_len());
        prop_assert_eq!(f.check(&Limits::default()), Ok(()));
        let back = Frame::decode(&b, &Limits::default()).unwrap();
        prop_assert!(same(&f, &back), "{:?} != {:?}", f, back);
        prop_assert_eq!(body(&back), b);
    }

    #[test]
    fn shared_decoding_gives_what_decoding_gives(f in frame_with(3000), pad in 0usize..4) {
        // `pad` bytes in front: the values section at every alignment.
        let b = body(&f);
        let mut padded = vec![0u8; pad];
        padded.extend_from_slice(&b);
        let shared = Bytes::from(padded).slice(pad..);
        let back = Frame::decode_bytes(&shared, &Limits::default()).unwrap();
        prop_assert!(same(&f, &back), "{:?} != {:?}", f, back);
        prop_assert_eq!(body(&back), b);
    }

    #[test]
    fn shared_decoding_refuses_what_decoding_refuses(b in mutated(), small in any::<bool>()) {
        let limits = if small { Limits { max_frame: 64, max_keys: 4, ..Limits::default() } } else { Limits::default() };
        // The body, without its length prefix.
        let b = b[b.len().min(4)..].to_vec();
        let plain = Frame::decode(&b, &limits);
        let shared = Frame::decode_bytes(&Bytes::from(b), &limits);
        match (plain, shared) {
            (Ok(p), Ok(s)) => prop_assert!(same(&p, &s)),
            (p, s) => prop_assert_eq!(p.err(), s.err()),
        }
    }

    #[test]
    fn split_encoding_is_the_codecs_encoding(f in frame_with(3000), apart in 0usize..8192) {
        let mut g = f.clone();
        let mut tail = BytesMut::new();
        let mut parts: Vec<Bytes> = Vec::new();
        g.encode_split(&mut tail, apart, &mut |b| parts.push(b));
        let apart = apart.max(1);
        let big = usize::from(f.keys.len() * 8 >= apart)
            + usize::from(f.packed.is_none() && f.vals.len() * 4 >= apart);
        // Each section handed over comes after what was encoded before it
        // (nothing between the keys and the values when both are).
        prop_assert!(parts.iter().all(|p| !p.is_empty()));
        prop_assert!(parts.len() <= 2 * big && (big == 0) == parts.is_empty());
        let mut out = BytesMut::new();
        for p in parts {
            out.extend_from_slice(&p);
        }
        out.extend_from_slice(&tail);
        prop_assert_eq!(out, wire(&f));
    }

    #[test]
    fn codec_round_trips_split_anywhere(f in frame_with(3000), split in any::<Index>()) {
        let whole = wire(&f);
        let at = split.index(whole.len() + 1);
        let mut codec = FrameCodec::default();
        let mut b = BytesMut::from(&whole[..at]);
        if at < whole.len() {
            prop_assert!(codec.decode(&mut b).unwrap().is_none());
            b.extend_from_slice(&whole[at..]);
        }
        let back = codec.decode(&mut b).unwrap().unwrap();
        prop_assert!(same(&f, &back));
        prop_assert!(b.is_empty());
    }

    #[test]
    fn codec_streams_many_frames_split_anywhere(
        frames in prop::collection::vec(frame(), 1..6),
        split in any::<Index>(),
    ) {
        let mut whole = BytesMut::new();
        let mut codec = FrameCodec::default();
        for f in &frames {
            codec.encode(f, &mut whole).unwrap();
        }
        let at = split.index(whole.len() + 1);
        let mut b = BytesMut::from(&whole[..at]);
        let mut got = drain(&mut codec, &mut b).unwrap();
        b.extend_from_slice(&whole[at..]);
        got.extend(drain(&mut codec, &mut b).unwrap());
        prop_assert_eq!(got.len(), frames.len());
        for (a, b) in frames.iter().zip(&got) {
            prop_assert!(same(a, b));
        }
        prop_assert!(b.is_empty());
    }

    #[test]
    fn packed_values_come_back(
        vals in prop::collection::vec(-1e3f32..1e3, 1..300),
        zeros in 0usize..300,
        packing in packing(),
        id in any::<u64>(),
    ) {
        let mut vals = vals;
        let n = vals.len();
        for v in vals.iter_mut().take(zeros.min(n)) {
            *v = 0.0;
        }
        let mut f = Frame::new(Header { request_id: id, ..Header::new(Kind::Push) });
        f.vals = vals.clone().into();
        let saved = f.pack(packing);
        let b = body(&f);
        prop_assert_eq!(b.len() as u64 + saved, (Frame { packed: None, vals: vals.clone().into(), ..f.clone() }).encoded_len() as u64);
        let mut back = Frame::decode(&b, &Limits::default()).unwrap();
        prop_assert_eq!(back.val_count(), n);
        let how = back.unpack().unwrap();
        prop_assert_eq!(how.is_some(), saved > 0 || f.packed.is_some());
        prop_assert_eq!(back.vals.len(), n);
        let max = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
        let step = match how {
            Some(Packing::Fixed16) => max / 32767.0 * 2.0,
            Some(Packing::Fixed8) => max / 127.0 * 2.0,
            _ => 0.0,
        };
        for (v, w) in vals.iter().zip(&back.vals) {
            prop_assert!((v - w).abs() <= step, "{:?}: {} came back as {}", how, v, w);
        }
    }

    #[test]
    fn decode_never_panics_on_arbitrary_bytes(b in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(f) = Frame::decode(&b, &Limits::default()) {
            prop_assert_eq!(&body(&f), &b);
        }
        let mut buf = BytesMut::from(&b[..]);
        let _ = drain(&mut FrameCodec::default(), &mut buf);
        let _ = Control::from_bytes(&b);
    }

    #[test]
    fn decode_never_panics_on_mutated_frames(b in mutated(), small in any::<bool>()) {
        let limits = if small {
            Limits { max_frame: 200, max_keys: 4, ..Limits::default() }
        } else {
            Limits::default()
        };
        // Whatever a decoder accepts has exactly one encoding: itself.
        let unprefixed = b.get(4..).unwrap_or_default();
        if let Ok(f) = Frame::decode(unprefixed, &limits) {
            prop_assert_eq!(body(&f), unprefixed);
            prop_assert_eq!(f.check(&limits), Ok(()));
            let _ = f.control_msg();
            // A mangled packed section is an error, never a panic.
            let _ = f.clone().unpack();
        }
        let mut buf = BytesMut::from(&b[..]);
        if let Ok(frames) = drain(&mut FrameCodec::new(limits), &mut buf) {
            for f in frames {
                prop_assert!(same(&Frame::decode(&body(&f), &limits).unwrap(), &f));
            }
        }
    }

    #[test]
    fn key_refs_need_exactly_two_keys(f in frame(), n in 0usize..6) {
        let mut f = f;
        f.header.flags |= FLAG_KEYREF;
        f.header.flags &= !(FLAG_DENSE | FLAG_SCAN);
        f.keys = vec![1; n];
        let got = Frame::decode(&body(&f), &Limits::default());
        prop_assert_eq!(got.is_ok(), n == 2);
        prop_assert_eq!(f.check(&Limits::default()), got.map(drop));
    }

    #[test]
    fn dense_flag_is_refused_with_keys(f in frame(), key in any::<u64>()) {
        let mut f = f;
        f.header.flags |= FLAG_DENSE;
        f.keys = vec![key];
        let err = Frame::decode(&body(&f), &Limits::default()).unwrap_err();
        prop_assert_eq!(err, pserver_wire::WireError::DenseWithKeys(1));
    }
}

fn map() -> ClusterMap {
    ClusterMap {
        epoch: 4,
        nodes: vec![
            NodeInfo {
                id: 1,
                role: Role::Server,
                addr: "127.0.0.1:7001".into(),
                state: NodeState::Alive,
                group: Group::Default,
                task: String::new(),
                joined: 3,
            },
            NodeInfo {
                id: 2,
                role: Role::Worker,
                addr: String::new(),
                state: NodeState::Dead,
                group: Group::Default,
                task: String::new(),
                joined: 3,
            },
        ],
        partitions: vec![Partition {
            range: KeyRange::ALL,
            primary: 1,
            replicas: vec![3],
        }],
        tables: vec![table()],
        replicas: 1,
        vnodes: 16,
        lease_ms: 2000,
        clients: pserver_core::map::Clients {
            below: 9,
            here: vec![4, 7],
        },
    }
}

fn table() -> TableSpec {
    TableSpec {
        id: 1,
        name: "w".into(),
        dim: 2,
        init: Init::Uniform {
            scale: 0.01,
            seed: 42,
        },
        updater: UpdaterSpec::Ftrl {
            alpha: 0.1,
            beta: 1.0,
            l1: 1.0,
            l2: 0.5,
        },
        consistency: Consistency::Bounded(3),
        aggregate: true,
        job: None,
    }
}

/// One of each control message. The match has no catch-all, so adding a
/// variant to `Control` breaks this test until it is listed here.
fn every_control() -> Vec<Control> {
    let all = vec![
        Control::Register {
            role: Role::Worker,
            addr: "10.0.0.1:7000".into(),
            group: Group::Job("ctr-1".into()),
            id: None,
        },
        Control::Register {
            role: Role::Server,
            addr: "10.0.0.2:7000".into(),
            group: Group::Default,
            id: Some(7),
        },
        Control::Registered { id: 5, map: map() },
        Control::Heartbeat,
        Control::Map(map()),
        Control::GetMap,
        Control::CreateTable(TableSpec {
            id: 0,
            name: "emb".into(),
            dim: 8,
            init: Init::Zero,
            updater: UpdaterSpec::Custom {
                name: "mine".into(),
                params: vec![1.0, f32::MIN_POSITIVE],
            },
            consistency: Consistency::Eventual,
            aggregate: false,
            job: None,
        }),
        Control::TableCreated(table()),
        Control::Barrier {
            name: "epoch-1".into(),
        },
        Control::Status,
        Control::StatusReply(Status {
            map: map(),
            servers: vec![ServerStats {
                id: 1,
                keys: vec![(1, 1000)],
                bytes: 8000,
            }],
            jobs: vec![("ctr-1".into(), 9)],
        }),
        Control::Consistency(Consistency::Sequential),
        Control::PushAck {
            applied: 10,
            duplicate: 2,
        },
        Control::Ok,
        Control::Error {
            code: ErrorCode::NotOwner,
            message: "not mine".into(),
        },
        Control::Replicate {
            spec: table(),
            what: Replica::Slots,
            records: vec![(4, KeyRange::new(10, 20).unwrap(), 7)],
            chain: vec![3, 9],
        },
        Control::Replicate {
            spec: table(),
            what: Replica::Push { worker: 12 },
            records: Vec::new(),
            chain: Vec::new(),
        },
        Control::Replicate {
            spec: table(),
            what: Replica::Pending { clock: 3 },
            records: Vec::new(),
            chain: vec![2],
        },
        Control::Replicate {
            spec: table(),
            what: Replica::Copy { reset: true },
            records: Vec::new(),
            chain: Vec::new(),
        },
        Control::Replicate {
            spec: table(),
            what: Replica::Flushed { clock: 9 },
            records: vec![(4, KeyRange::new(0, 20).unwrap(), 9)],
            chain: vec![7],
        },
        Control::Synced { epoch: 41 },
        Control::Drain { node: 6 },
        Control::Fence {
            from: 3,
            chain: vec![4, 5],
        },
        Control::Rejoin {
            id: 7,
            role: Role::Server,
            addr: "10.0.0.2:7000".into(),
        },
        Control::Snapshot {
            dir: "/tmp/ckpt".into(),
        },
        Control::Snapshotted {
            files: vec![pserver_wire::message::SnapshotFile {
                table: 1,
                range: KeyRange::ALL,
                name: "t1.bin".into(),
                bytes: 100,
                crc: 7,
            }],
        },
        Control::Restore { spec: table() },
        Control::Join {
            group: Group::Idle,
            task: "shard 2 of 3".into(),
        },
        Control::ClaimJob {
            job: "ctr-1".into(),
        },
        Control::Recover {
            id: 7,
            addr: "10.0.0.2:7000".into(),
            map: ClusterMap::empty(1, 8),
            senders: 40,
        },
        Control::Goodbye,
        Control::SignificantPull {
            threshold: 0.01,
            basis: Some(pserver_core::significant::Basis {
                generation: 3,
                from: 4,
                upto: 9,
            }),
            consistency: Some(Consistency::Bounded(2)),
        },
        Control::Significant(pserver_core::significant::Stamp {
            generation: 3,
            seq: 9,
            present: vec![0b1010_0001, 0x7f],
        }),
        Control::Stats,
        Control::ServerReport(pserver_wire::message::ServerReport {
            epoch: 4,
            tables: vec![pserver_wire::message::TableReport {
                id: 1,
                requests: [1, 2, 3, 4],
                keys: [10, 20, 30, 40],
                bytes: [100, 200, 300, 400],
                stored_keys: Some(7),
            }],
            links: vec![pserver_wire::message::LinkReport {
                to: 2,
                bytes: 96,
                changes: 1,
            }],
            pulls_waiting: 1,
            acks_waiting: 2,
            handoff_copies_pending: 0,
            errors: 3,
            connections: 5,
        }),
    ];
    let mut seen = [false; 30];
    for c in &all {
        let i = match c {
            Control::Register { .. } => 0,
            Control::Registered { .. } => 1,
            Control::Heartbeat => 2,
            Control::Map(_) => 3,
            Control::GetMap => 4,
            Control::CreateTable(_) => 5,
            Control::TableCreated(_) => 6,
            Control::Barrier { .. } => 7,
            Control::Status => 8,
            Control::StatusReply(_) => 9,
            Control::Consistency(_) => 10,
            Control::PushAck { .. } => 11,
            Control::Ok => 12,
            Control::Error { .. } => 13,
            Control::Replicate { .. } => 14,
            Control::Synced { .. } => 15,
            Control::Drain { .. } => 16,
            Control::Fence { .. } => 17,
            Control::Rejoin { .. } => 18,
            Control::Snapshot { .. } => 19,
            Control::Snapshotted { .. } => 20,
            Control::Restore { .. } => 21,
            Control::Join { .. } => 22,
            Control::ClaimJob { .. } => 23,
            Control::Recover { .. } => 24,
            Control::Goodbye => 25,
            Control::SignificantPull { .. } => 26,
            Control::Significant(_) => 27,
            Control::Stats => 28,
            Control::ServerReport(_) => 29,
        };
        seen[i] = true;
    }
    assert!(seen.iter().all(|&s| s), "a control variant is missing");
    all
}

#[test]
fn every_control_round_trips_through_a_frame() {
    let mut codec = FrameCodec::default();
    for msg in every_control() {
        let f = Frame::control(Header::new(Kind::Control), &msg);
        assert_eq!(f.control_msg().unwrap(), msg);
        let decoded = Frame::decode(&body(&f), &Limits::default()).unwrap();
        assert_eq!(decoded.control_msg().unwrap(), msg);
        let mut b = BytesMut::new();
        codec.encode(&f, &mut b).unwrap();
        let streamed = codec.decode(&mut b).unwrap().unwrap();
        assert_eq!(streamed.control_msg().unwrap(), msg);
    }
}

#[test]
fn every_error_code_round_trips() {
    use ErrorCode::*;
    for code in [
        Malformed,
        UnknownTable,
        WrongWidth,
        NotFinite,
        BadKeys,
        NotOwner,
        EpochAhead,
        Duplicate,
        Limit,
        Invalid,
        Internal,
        KeyCacheMiss,
        TooOld,
    ] {
        let msg = Control::Error {
            code,
            message: format!("{code:?}"),
        };
        assert_eq!(Control::from_bytes(&msg.to_bytes()).unwrap(), msg);
    }
}

/// Postcard encodes variant indexes: pins the new code at the end, so older
/// nodes keep decoding every code they know.
#[test]
fn key_cache_miss_is_the_last_error_code() {
    let msg = Control::Error {
        code: ErrorCode::KeyCacheMiss,
        message: String::new(),
    };
    // Control::Error is variant 13, KeyCacheMiss is code 11, then an empty string.
    assert_eq!(msg.to_bytes(), vec![13, 11, 0]);
}

#[test]
fn large_frame_round_trips_through_the_codec() {
    let n = 1 << 20;
    let f = Frame {
        header: Header::new(Kind::Reply),
        keys: (0..n).map(|k| k * 3).collect(),
        vals: (0..n).map(|v| v as f32 * 0.5).collect(),
        ctrl: Bytes::new(),
        packed: None,
    };
    let mut b = wire(&f);
    // Stream it in 64 KiB reads, as a socket would deliver it.
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::new();
    let mut got = None;
    while !b.is_empty() {
        let chunk = b.split_to(b.len().min(64 << 10));
        buf.put_slice(&chunk);
        if let Some(frame) = codec.decode(&mut buf).unwrap() {
            got = Some(frame);
        }
    }
    assert!(same(&got.unwrap(), &f));
}
