//! The wire codec: what turning requests into bytes and back costs, per key
//! and per byte, on both ends of every push and pull.
//!
//! - `push_frame`: a push of `n` random sorted keys with one `f32` each,
//!   encoded by `FrameCodec` (checks, length prefix, header, sections) and
//!   decoded by it (every length checked, sections copied out);
//! - `pull_reply`: the reply to a pull of `n` keys (values only), both ways;
//! - `pack` / `unpack`: the value filters of `pack.rs` (byte shuffle + LZ4,
//!   and 16- and 8-bit fixed point with random rounding), on a sparse
//!   gradient (half the values zero, the rest small);
//! - `control`: a postcard round trip (`to_bytes` then `from_bytes`) of the
//!   acknowledgement every push gets, and of the cluster map a manager
//!   broadcasts at every change, for `S` servers with 16 virtual nodes.
//!
//! Throughput is shown in keys (or values) per second and in bytes per
//! second of encoded frame, the figure to hold against the loopback
//! stream's few GB/s. Inputs come from a seeded splitmix64 sequence.

use bytes::BytesMut;
use divan::Bencher;
use divan::counter::{BytesCount, ItemsCount};
use pserver_core::map::{Group, NodeId, NodeInfo, NodeState, Role};
use pserver_core::ring::place;
use pserver_core::{ClusterMap, Consistency, Init, KEY_END, TableSpec, UpdaterSpec};
use pserver_wire::header::Header;
use pserver_wire::pack::{Packed, Packing, pack, unpack};
use pserver_wire::{Control, Frame, FrameCodec, Kind};
use tokio_util::codec::{Decoder, Encoder};

fn main() {
    // Divan's default of 100 samples, but at most 3 s per benchmark, so that
    // the suite stays short on a shared 2-core machine. Command-line flags
    // (`--sample-count`, `--max-time`, a name filter) override these.
    divan::Divan::default()
        .max_time(std::time::Duration::from_secs(3))
        .config_with_args()
        .main();
}

/// Keys per request.
const SIZES: [usize; 3] = [1, 1024, 65536];

/// A splitmix64 sequence with a fixed seed: deterministic inputs.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// `n` distinct sorted keys below `KEY_END`.
    fn sorted_keys(&mut self, n: usize) -> Vec<u64> {
        let mut keys = Vec::with_capacity(n);
        while keys.len() < n {
            keys.extend((keys.len()..n).map(|_| self.next_u64() % KEY_END));
            keys.sort_unstable();
            keys.dedup();
        }
        keys
    }

    /// `n` gradient-like values: half exactly zero, the rest in
    /// `(-0.01, 0.01)`.
    fn sparse_values(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let r = self.next_u64();
                if r & 1 == 0 {
                    0.0
                } else {
                    ((r >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02
                }
            })
            .collect()
    }
}

/// A header as a worker fills it for a request to table 1.
fn header(kind: Kind) -> Header {
    Header {
        request_id: 42,
        sender: 3,
        table: 1,
        epoch: 7,
        clock: 5,
        ..Header::new(kind)
    }
}

/// A push of `n` random keys with one value each.
fn push_frame(n: usize) -> Frame {
    let mut rng = Rng(n as u64);
    Frame {
        keys: rng.sorted_keys(n),
        vals: rng.sparse_values(n).into(),
        ..Frame::new(header(Kind::Push))
    }
}

/// The reply to a pull of `n` keys: their values, no keys.
fn pull_reply(n: usize) -> Frame {
    Frame {
        vals: (Rng(!(n as u64)).sparse_values(n)).into(),
        ..Frame::new(header(Kind::Reply))
    }
}

/// `frame` encoded as it goes on the stream (length prefix included).
fn encoded(frame: &Frame) -> BytesMut {
    let mut buf = BytesMut::new();
    FrameCodec::default()
        .encode(frame, &mut buf)
        .expect("benchmark frame encodes");
    buf
}

/// Encodes `frame` again and again into one reused buffer.
fn bench_encode(bencher: Bencher, frame: &Frame, items: usize) {
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::with_capacity(encoded(frame).len());
    bencher
        .counter(ItemsCount::new(items))
        .counter(BytesCount::new(encoded(frame).len()))
        .bench_local(|| {
            buf.clear();
            codec.encode(divan::black_box(frame), &mut buf)
        });
}

/// Decodes the encoding of `frame` (a fresh copy each time, made untimed).
fn bench_decode(bencher: Bencher, frame: &Frame, items: usize) {
    let mut codec = FrameCodec::default();
    let bytes = encoded(frame);
    let back = codec.decode(&mut bytes.clone()).expect("decodes");
    assert_eq!(back.as_ref(), Some(frame));
    bencher
        .counter(ItemsCount::new(items))
        .counter(BytesCount::new(bytes.len()))
        .with_inputs(|| bytes.clone())
        .bench_local_refs(|src| codec.decode(src));
}

mod push_frame {
    use super::*;

    #[divan::bench(args = SIZES)]
    fn encode(bencher: Bencher, n: usize) {
        bench_encode(bencher, &push_frame(n), n);
    }

    #[divan::bench(args = SIZES)]
    fn decode(bencher: Bencher, n: usize) {
        bench_decode(bencher, &push_frame(n), n);
    }
}

mod pull_reply {
    use super::*;

    #[divan::bench(args = SIZES)]
    fn encode(bencher: Bencher, n: usize) {
        bench_encode(bencher, &pull_reply(n), n);
    }

    #[divan::bench(args = SIZES)]
    fn decode(bencher: Bencher, n: usize) {
        bench_decode(bencher, &pull_reply(n), n);
    }
}

/// A packing, named by its type so that divan prints the name.
trait PackingKind {
    const PACKING: Packing;
}

/// Byte shuffle + LZ4.
struct Lossless;
/// 16-bit fixed point.
struct Fixed16;
/// 8-bit fixed point.
struct Fixed8;

impl PackingKind for Lossless {
    const PACKING: Packing = Packing::Lossless;
}
impl PackingKind for Fixed16 {
    const PACKING: Packing = Packing::Fixed16;
}
impl PackingKind for Fixed8 {
    const PACKING: Packing = Packing::Fixed8;
}

/// Values per packed section (a single value never shrinks, so it is sent
/// raw and not measured).
const PACK_SIZES: [usize; 2] = [1024, 65536];

/// `n` sparse values packed with `P`.
fn packed<P: PackingKind>(n: usize) -> (Vec<f32>, Packed) {
    let vals = Rng(0x9ac4 ^ n as u64).sparse_values(n);
    let p = pack(&vals, P::PACKING, 42).expect("sparse values shrink");
    (vals, p)
}

#[divan::bench(types = [Lossless, Fixed16, Fixed8], args = PACK_SIZES)]
fn pack_values<P: PackingKind>(bencher: Bencher, n: usize) {
    let (vals, _) = packed::<P>(n);
    bencher
        .counter(ItemsCount::new(n))
        .counter(BytesCount::f32(n))
        .bench_local(|| pack(divan::black_box(&vals), P::PACKING, 42));
}

#[divan::bench(types = [Lossless, Fixed16, Fixed8], args = PACK_SIZES)]
fn unpack_values<P: PackingKind>(bencher: Bencher, n: usize) {
    let (vals, p) = packed::<P>(n);
    let back = unpack(&p).expect("unpacks");
    assert_eq!(back.len(), vals.len());
    if P::PACKING.is_lossless() {
        assert_eq!(back, vals);
    }
    bencher
        .counter(ItemsCount::new(n))
        .counter(BytesCount::f32(n))
        .bench_local(|| unpack(divan::black_box(&p)));
}

mod control {
    use super::*;

    /// Encodes `msg` and decodes it back.
    fn round_trip(bencher: Bencher, msg: &Control) {
        let len = msg.to_bytes().len();
        assert_eq!(Control::from_bytes(&msg.to_bytes()).as_ref(), Ok(msg));
        bencher
            .counter(ItemsCount::new(1u32))
            .counter(BytesCount::new(len))
            .bench_local(|| Control::from_bytes(&divan::black_box(msg).to_bytes()));
    }

    #[divan::bench]
    fn push_ack(bencher: Bencher) {
        round_trip(
            bencher,
            &Control::PushAck {
                applied: 65536,
                duplicate: 0,
            },
        );
    }

    /// The map of a cluster of `servers` servers (16 virtual nodes, two
    /// replicas), as many workers, and two tables.
    #[divan::bench(args = [2, 16, 64])]
    fn map(bencher: Bencher, servers: u32) {
        let node = |id: NodeId, role: Role| NodeInfo {
            id,
            role,
            addr: format!("127.0.0.1:{}", 7000 + id),
            state: NodeState::Alive,
            group: Group::Default,
            task: String::new(),
            joined: 1,
        };
        let server_ids: Vec<NodeId> = (1..=servers).collect();
        let mut map = ClusterMap::empty(2, 16);
        map.epoch = 12;
        map.nodes = server_ids
            .iter()
            .map(|&id| node(id, Role::Server))
            .collect();
        map.nodes
            .extend((servers + 1..=2 * servers).map(|id| node(id, Role::Worker)));
        map.partitions = place(&server_ids, 16, 2);
        map.tables = [
            UpdaterSpec::AdaGrad { lr: 0.1, eps: 1e-6 },
            UpdaterSpec::Add,
        ]
        .into_iter()
        .enumerate()
        .map(|(i, updater)| TableSpec {
            id: i as u32 + 1,
            name: format!("table{i}"),
            dim: 1,
            init: Init::Zero,
            updater,
            consistency: Consistency::Bounded(2),
            aggregate: false,
            job: None,
        })
        .collect();
        round_trip(bencher, &Control::Map(map));
    }
}
