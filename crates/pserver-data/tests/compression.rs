//! gzip and zstd are read transparently, and corruption is a fatal error.

mod common;

use common::*;
use pserver_data::{DataError, Format};

fn sample() -> Vec<u8> {
    // Enough lines that the decoders cross their internal buffers.
    let mut s = String::new();
    for i in 0..20_000u64 {
        s.push_str(&format!(
            "{} {}:1 {}:0.5\n",
            if i % 3 == 0 { 1 } else { -1 },
            i,
            i * 7 + 1
        ));
    }
    s.into_bytes()
}

#[test]
fn gzip_reads_like_plain() {
    let dir = tempfile::tempdir().unwrap();
    let plain = sample();
    let a = write(dir.path(), "a.svm", &plain);
    // The name does not matter: detection is by magic bytes.
    let b = write(dir.path(), "b.data", &gzip(&plain));
    let (va, _) = read(&a, &Format::Libsvm, &all());
    let (vb, sb) = read(&b, &Format::Libsvm, &all());
    assert_eq!(va.len(), 20_000);
    assert_eq!(va, vb);
    assert_eq!(sb.bad, 0);
}

#[test]
fn gzip_multi_member() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = gzip(b"1 1:1\n");
    bytes.extend(gzip(b"0 2:1\n"));
    let p = write(dir.path(), "m.gz", &bytes);
    let (v, _) = read(&p, &Format::Libsvm, &all());
    assert_eq!(v.len(), 2);
}

#[test]
fn zstd_reads_like_plain() {
    let dir = tempfile::tempdir().unwrap();
    let plain = sample();
    let a = write(dir.path(), "a.svm", &plain);
    let b = write(dir.path(), "b.zst", &zstd(&plain));
    let (va, _) = read(&a, &Format::Libsvm, &all());
    let (vb, _) = read(&b, &Format::Libsvm, &all());
    assert_eq!(va, vb);
}

#[test]
fn zstd_several_frames_and_a_skippable_frame() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = zstd(b"1 1:1\n");
    // A skippable frame: magic 0x184D2A50, u32 length, payload.
    bytes.extend([0x50, 0x2A, 0x4D, 0x18, 3, 0, 0, 0, 9, 9, 9]);
    bytes.extend(zstd(b"0 2:1\n1 3:1\n"));
    let p = write(dir.path(), "m.zst", &bytes);
    let (v, _) = read(&p, &Format::Libsvm, &all());
    assert_eq!(v.len(), 3);
}

#[test]
fn truncated_gzip_is_a_compression_error() {
    let dir = tempfile::tempdir().unwrap();
    let gz = gzip(&sample());
    let p = write(dir.path(), "t.gz", &gz[..gz.len() / 2]);
    let mut r = pserver_data::open(&p, &Format::Libsvm, &all()).unwrap();
    let n = r.by_ref().count();
    assert!(n > 0, "the lines before the cut are read");
    match r.error() {
        Some(DataError::Compression { path, message }) => {
            assert!(path.ends_with("t.gz"));
            assert!(message.contains("line"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(pserver_data::read_all(&p, &Format::Libsvm, &all()).is_err());
}

#[test]
fn corrupt_gzip_is_a_compression_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut gz = gzip(&sample());
    let mid = gz.len() / 2;
    for b in &mut gz[mid..mid + 64] {
        *b ^= 0x5A;
    }
    let p = write(dir.path(), "c.gz", &gz);
    let mut r = pserver_data::open(&p, &Format::Libsvm, &all()).unwrap();
    r.by_ref().for_each(drop);
    assert!(
        matches!(r.error(), Some(DataError::Compression { .. })),
        "{:?}",
        r.error()
    );
}

#[test]
fn truncated_and_corrupt_zstd_are_compression_errors() {
    let dir = tempfile::tempdir().unwrap();
    let z = zstd(&sample());
    let p = write(dir.path(), "t.zst", &z[..z.len() - 10]);
    let mut r = pserver_data::open(&p, &Format::Libsvm, &all()).unwrap();
    r.by_ref().for_each(drop);
    assert!(
        matches!(r.error(), Some(DataError::Compression { .. })),
        "{:?}",
        r.error()
    );

    let mut z = zstd(&sample());
    let mid = z.len() / 2;
    for b in &mut z[mid..mid + 64] {
        *b ^= 0x5A;
    }
    let p = write(dir.path(), "c.zst", &z);
    let mut r = pserver_data::open(&p, &Format::Libsvm, &all()).unwrap();
    r.by_ref().for_each(drop);
    assert!(
        matches!(r.error(), Some(DataError::Compression { .. })),
        "{:?}",
        r.error()
    );

    // Trailing garbage after the last frame is corruption too.
    let mut z = zstd(b"1 1:1\n");
    z.extend(b"junk");
    let p = write(dir.path(), "g.zst", &z);
    let mut r = pserver_data::open(&p, &Format::Libsvm, &all()).unwrap();
    assert_eq!(r.by_ref().count(), 1);
    assert!(
        matches!(r.error(), Some(DataError::Compression { .. })),
        "{:?}",
        r.error()
    );
}

#[test]
fn tiny_files_are_plain() {
    // Shorter than any magic number.
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "t.svm", b"1\n");
    let (v, _) = read(&p, &Format::Libsvm, &all());
    assert_eq!(v.len(), 1);
}
