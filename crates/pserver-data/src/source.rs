//! Bytes in: open a file, detect gzip/zstd by magic bytes, and cut the
//! decompressed stream into lines of bounded length.

use crate::DataError;
use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;
use std::sync::Arc;

const GZIP_MAGIC: [u8; 2] = [0x1F, 0x8B];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];
const BUF_BYTES: usize = 256 * 1024;

/// How the file on disk is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Encoding {
    Plain,
    Gzip,
    Zstd,
}

/// Opens `path` and returns a reader of its decompressed bytes.
pub(crate) fn open_bytes(path: &Path) -> Result<(Box<dyn Read + Send>, Encoding), DataError> {
    let shown = path.display().to_string();
    let mut file = File::open(path).map_err(|e| DataError::Open {
        path: shown.clone(),
        os: Arc::new(e),
    })?;
    // Peek with a loop rather than trusting one read to return 4 bytes
    // (pipes and FIFOs may return fewer), then put the bytes back in front.
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < magic.len() {
        match file.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(DataError::Io {
                    path: shown,
                    line: 1,
                    os: Arc::new(e),
                });
            }
        }
    }
    let head = io::Cursor::new(magic[..got].to_vec());
    let raw = BufReader::with_capacity(BUF_BYTES, head.chain(file));
    if got >= 4 && magic == ZSTD_MAGIC {
        Ok((Box::new(ZstdReader::new(raw)), Encoding::Zstd))
    } else if got >= 2 && magic[..2] == GZIP_MAGIC {
        // Multi-member: `cat a.gz b.gz` and bgzip output are valid gzip files.
        Ok((
            Box::new(flate2::bufread::MultiGzDecoder::new(raw)),
            Encoding::Gzip,
        ))
    } else {
        Ok((Box::new(raw), Encoding::Plain))
    }
}

/// Marks an error raised by the zstd decoder, so it is reported as
/// corruption rather than as an I/O failure.
#[derive(Debug)]
struct ZstdFailure(String);

impl std::fmt::Display for ZstdFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ZstdFailure {}

fn zstd_err(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, ZstdFailure(msg.into()))
}

/// A zstd stream of any number of frames (ruzstd's `StreamingDecoder` reads
/// only one; `zstd -c a b`, `pzstd` and appended files give several), with
/// skippable frames skipped and frame checksums verified.
struct ZstdReader<R: BufRead> {
    src: R,
    dec: FrameDecoder,
    in_frame: bool,
}

impl<R: BufRead> ZstdReader<R> {
    fn new(src: R) -> Self {
        ZstdReader {
            src,
            dec: FrameDecoder::new(),
            in_frame: false,
        }
    }

    /// Starts the next frame; `Ok(false)` at a clean end of input.
    fn next_frame(&mut self) -> io::Result<bool> {
        loop {
            if self.src.fill_buf()?.is_empty() {
                return Ok(false);
            }
            match self.dec.reset(&mut self.src) {
                Ok(()) => return Ok(true),
                Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                    length,
                    ..
                })) => {
                    let skipped = io::copy(
                        &mut (&mut self.src).take(u64::from(length)),
                        &mut io::sink(),
                    )?;
                    if skipped < u64::from(length) {
                        return Err(zstd_err("truncated skippable frame"));
                    }
                }
                Err(e) => return Err(zstd_err(e.to_string())),
            }
        }
    }
}

impl<R: BufRead> Read for ZstdReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.in_frame {
                if self.dec.can_collect() > 0 {
                    return self.dec.read(buf);
                }
                if !self.dec.is_finished() {
                    self.dec
                        .decode_blocks(&mut self.src, BlockDecodingStrategy::UptoBytes(BUF_BYTES))
                        .map_err(|e| zstd_err(e.to_string()))?;
                    continue;
                }
                // The frame is fully drained: only now is the computed checksum final.
                if let (Some(want), Some(got)) = (
                    self.dec.get_checksum_from_data(),
                    self.dec.get_calculated_checksum(),
                ) {
                    if want != got {
                        return Err(zstd_err(format!(
                            "frame checksum mismatch (stored {want:08x}, computed {got:08x})"
                        )));
                    }
                }
                self.in_frame = false;
            }
            if !self.next_frame()? {
                return Ok(0);
            }
            self.in_frame = true;
        }
    }
}

/// What [`Lines::next_line`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LineRead {
    /// A line is in the buffer (without its `\n` or `\r\n`).
    Line,
    /// The line was longer than the limit; its start is in the buffer, the
    /// rest was read and dropped so the next line starts clean.
    TooLong,
    /// End of input.
    Eof,
}

/// Physical lines of a byte stream, never more than `max` bytes held.
pub(crate) struct Lines {
    src: BufReader<Box<dyn Read + Send>>,
    /// 1-based number of the line last returned (0 before the first).
    pub(crate) line_no: u64,
    max: usize,
    pub(crate) encoding: Encoding,
}

impl Lines {
    pub(crate) fn new(src: Box<dyn Read + Send>, encoding: Encoding, max: usize) -> Self {
        Lines {
            src: BufReader::with_capacity(BUF_BYTES, src),
            line_no: 0,
            max: max.max(1),
            encoding,
        }
    }

    /// Reads the next line into `buf` (cleared first). `read_until` is not
    /// used because it would grow `buf` without bound on a file with no
    /// newlines (binary garbage, a wrong format guess).
    pub(crate) fn next_line(&mut self, buf: &mut Vec<u8>) -> io::Result<LineRead> {
        buf.clear();
        let mut any = false;
        let mut too_long = false;
        loop {
            let avail = match self.src.fill_buf() {
                Ok(a) => a,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Report the error against the line being read.
                    self.line_no += 1;
                    return Err(e);
                }
            };
            if avail.is_empty() {
                if !any {
                    return Ok(LineRead::Eof);
                }
                break;
            }
            any = true;
            let (take, done) = match avail.iter().position(|&b| b == b'\n') {
                Some(i) => (i, true),
                None => (avail.len(), false),
            };
            let room = self.max.saturating_sub(buf.len());
            if take > room {
                too_long = true;
            }
            buf.extend_from_slice(&avail[..take.min(room)]);
            self.src.consume(if done { take + 1 } else { take });
            if done {
                break;
            }
        }
        self.line_no += 1;
        if too_long {
            return Ok(LineRead::TooLong);
        }
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        if self.line_no == 1 && buf.starts_with(&[0xEF, 0xBB, 0xBF]) {
            // A UTF-8 byte order mark is not part of the first field.
            buf.drain(..3);
        }
        Ok(LineRead::Line)
    }

    /// Turns a read error into the right [`DataError`]: corruption for a
    /// decoder's complaint, I/O otherwise.
    pub(crate) fn error(&self, path: &str, e: io::Error) -> DataError {
        let decoder_complaint = match self.encoding {
            Encoding::Plain => false,
            Encoding::Gzip => matches!(
                e.kind(),
                io::ErrorKind::InvalidInput
                    | io::ErrorKind::InvalidData
                    | io::ErrorKind::UnexpectedEof
            ),
            Encoding::Zstd => {
                e.get_ref().is_some_and(|i| i.is::<ZstdFailure>())
                    || matches!(e.kind(), io::ErrorKind::UnexpectedEof)
            }
        };
        if decoder_complaint {
            DataError::Compression {
                path: path.to_string(),
                message: format!("{e} (while reading line {})", self.line_no),
            }
        } else {
            DataError::Io {
                path: path.to_string(),
                line: self.line_no,
                os: Arc::new(e),
            }
        }
    }
}

/// Opens `path` as lines of at most `max` bytes.
pub(crate) fn open_lines(path: &Path, max: usize) -> Result<Lines, DataError> {
    let (src, enc) = open_bytes(path)?;
    Ok(Lines::new(src, enc, max))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(bytes: &[u8], max: usize) -> Vec<(LineRead, Vec<u8>)> {
        let src: Box<dyn Read + Send> = Box::new(io::Cursor::new(bytes.to_vec()));
        let mut l = Lines::new(src, Encoding::Plain, max);
        let mut out = Vec::new();
        let mut buf = Vec::new();
        loop {
            let r = l.next_line(&mut buf).unwrap();
            if r == LineRead::Eof {
                return out;
            }
            out.push((r, buf.clone()));
        }
    }

    #[test]
    fn splits_lines_and_strips_crlf_and_bom() {
        let got = lines_of(b"\xEF\xBB\xBFa\r\nb\n\nc", 100);
        let texts: Vec<&[u8]> = got.iter().map(|(_, b)| b.as_slice()).collect();
        assert_eq!(texts, vec![&b"a"[..], b"b", b"", b"c"]);
    }

    #[test]
    fn long_lines_are_cut_and_skipped() {
        let got = lines_of(b"12345678\nok\n", 4);
        assert_eq!(got[0].0, LineRead::TooLong);
        assert_eq!(got[1], (LineRead::Line, b"ok".to_vec()));
    }
}
