//! Rows out: LIBSVM lines, a chunk of rows as one gzip member, and the
//! files the members are appended to.
//!
//! Each chunk is compressed on its own (a complete gzip member), so chunks
//! are compressed in parallel and a file is their concatenation: a valid
//! multi-member gzip file, which `gzip -d`, Python's `gzip` and this
//! crate's reader read as one stream.

use super::distinct::Distinct;
use super::meta::Stats;
use super::model::{Part, Row, Synth};
use flate2::Compression;
use flate2::write::GzEncoder;
use std::io::{self, Write};
use std::ops::Range;

/// Appends `v` in decimal (a hot loop: 40 numbers a row, so no `fmt`).
fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Appends one LIBSVM line as the reference writes it: `+1 ` or `-1 `,
/// then `idx:1` for each index, separated by single spaces.
pub fn write_line(out: &mut Vec<u8>, label: bool, indices: &[u64]) {
    out.extend_from_slice(if label { b"+1 " } else { b"-1 " });
    for (i, &idx) in indices.iter().enumerate() {
        if i > 0 {
            out.push(b' ');
        }
        push_u64(out, idx);
        out.extend_from_slice(b":1");
    }
    out.push(b'\n');
}

/// A compressed chunk and its sums.
pub(crate) struct Chunk {
    /// One gzip member holding the chunk's lines.
    pub gz: Vec<u8>,
    pub stats: Stats,
}

/// Text handed to the compressor at a time.
const FLUSH_BYTES: usize = 1 << 16;

/// Generates rows `rows` of `part`, counts their keys in `distinct`, and
/// compresses their lines at gzip `level`.
pub(crate) fn chunk(
    synth: &Synth,
    part: Part,
    rows: Range<u64>,
    level: u32,
    distinct: &Distinct,
) -> io::Result<Chunk> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::new(level));
    let mut text = Vec::with_capacity(2 * FLUSH_BYTES);
    let mut stats = Stats::default();
    let mut tally = distinct.tally();
    let mut row = Row::default();
    for i in rows {
        synth.fill(part, i, &mut row);
        for d in &row.draws {
            tally.record(d.field as usize, d.rank, d.key);
        }
        stats.row(row.p, row.label, row.draws.len(), row.indices.len());
        write_line(&mut text, row.label, &row.indices);
        if text.len() >= FLUSH_BYTES {
            gz.write_all(&text)?;
            text.clear();
        }
    }
    gz.write_all(&text)?;
    Ok(Chunk {
        gz: gz.finish()?,
        stats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::parse_libsvm;

    #[test]
    fn lines_look_like_the_reference() {
        let mut out = Vec::new();
        write_line(&mut out, true, &[1, 20, u64::MAX]);
        write_line(&mut out, false, &[0]);
        write_line(&mut out, false, &[]);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "+1 1:1 20:1 18446744073709551615:1\n-1 0:1\n-1 \n"
        );
    }

    #[test]
    fn numbers_print_like_display() {
        for v in [0u64, 9, 10, 99, 100, 12345678901234567890, u64::MAX] {
            let mut out = Vec::new();
            push_u64(&mut out, v);
            assert_eq!(out, v.to_string().into_bytes());
        }
    }

    #[test]
    fn a_chunk_is_one_gzip_member_of_parseable_lines() {
        let tiny = super::super::preset::preset("tiny").unwrap();
        let s = Synth::new(&tiny, 1, 0, -1.0);
        let d = Distinct::new(&s);
        let c = chunk(&s, Part::Train, 10..110, 1, &d).unwrap();
        assert_eq!(&c.gz[..2], &[0x1F, 0x8B]);
        let mut text = String::new();
        io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&c.gz[..]), &mut text).unwrap();
        assert_eq!(text.lines().count(), 100);
        assert_eq!(c.stats.rows, 100);
        let mut feats = Vec::new();
        let mut row = Row::default();
        for (i, line) in text.lines().enumerate() {
            feats.clear();
            let label = parse_libsvm(line, &mut feats).unwrap();
            s.fill(Part::Train, 10 + i as u64, &mut row);
            assert_eq!(label == 1.0, row.label);
            assert_eq!(feats.len(), row.indices.len());
        }
        // Tiny rows have all five fields.
        assert_eq!(c.stats.draws, 500);
        assert!(d.count().keys <= 250);
    }
}
