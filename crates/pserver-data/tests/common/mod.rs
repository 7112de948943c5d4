//! Helpers shared by the integration tests: files in a tempdir, compressed.

#![allow(dead_code)] // each test binary uses a different subset

use pserver_data::{Example, Format, ReadOptions, ReadStats};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Gzip of `bytes`.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Zstd of `bytes` (ruzstd's encoder; one frame with a checksum).
pub fn zstd(bytes: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(bytes, ruzstd::encoding::CompressionLevel::Fastest)
}

/// Reads everything, panicking on a fatal error.
pub fn read(path: &Path, format: &Format, opts: &ReadOptions) -> (Vec<Example>, ReadStats) {
    let (v, s) = pserver_data::read_all(path, format, opts).unwrap();
    check_invariants(&v, &s);
    (v, s)
}

/// What must hold of any read.
pub fn check_invariants(v: &[Example], s: &ReadStats) {
    assert_eq!(
        s.lines,
        s.examples + s.skipped + s.bad + s.elsewhere,
        "{s:?}"
    );
    assert_eq!(v.len() as u64, s.examples);
    assert!(s.first_bad.len() as u64 <= s.bad.min(20));
    for e in v {
        assert!(e.label == 0.0 || e.label == 1.0);
        assert_eq!(e.keys.len(), e.vals.len());
        assert!(
            e.keys.windows(2).all(|w| w[0] < w[1]),
            "keys not sorted and unique"
        );
        assert!(e.keys.iter().all(|&k| k < u64::MAX));
    }
}

/// Lines of the bad lines, in order.
pub fn bad_lines(s: &ReadStats) -> Vec<u64> {
    s.first_bad.iter().map(|b| b.line).collect()
}

/// Default options.
pub fn all() -> ReadOptions {
    ReadOptions::default()
}
