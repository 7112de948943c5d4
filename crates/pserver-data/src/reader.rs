//! The streaming [`Reader`]: lines in, examples out, one at a time.

use crate::csv::{Fields, QuoteScan};
use crate::hash::{BIAS_KEY, in_test};
use crate::schema::Plan;
use crate::source::{LineRead, Lines, open_lines};
use crate::text::{Criteo, libsvm_is_data, parse_libsvm};
use crate::{
    BadLine, DataError, Example, Format, Holdout, ReadOptions, ReadStats, Split, VALIDATION_SALT,
    Validation,
};
use std::io;
use std::path::Path;

/// How many bad lines [`ReadStats::first_bad`] keeps.
pub const MAX_BAD_KEPT: usize = 20;

/// One CSV record (possibly several physical lines, when a quoted field
/// holds newlines) or why there is none.
pub(crate) enum Rec {
    /// The record is in the record buffer; `line` is its first line.
    Record { line: u64 },
    /// A blank line: not a record, not numbered.
    Blank,
    /// A record that cannot be read as text; still a data line.
    Bad { line: u64, message: String },
    /// End of input.
    Eof,
}

/// Reads the next CSV record into `rec`: one line, or more while a quoted
/// field is open at the end of a line.
pub(crate) fn next_record(
    lines: &mut Lines,
    buf: &mut Vec<u8>,
    rec: &mut String,
    delim: u8,
    max: usize,
) -> io::Result<Rec> {
    rec.clear();
    let mut first: Option<u64> = None;
    let mut quotes = QuoteScan::default();
    loop {
        let r = lines.next_line(buf)?;
        let line = lines.line_no;
        match r {
            LineRead::Eof => {
                return Ok(match first {
                    Some(line) => Rec::Bad {
                        line,
                        message: "quoted field not closed before the end of the file".into(),
                    },
                    None => Rec::Eof,
                });
            }
            LineRead::TooLong => {
                return Ok(Rec::Bad {
                    line: first.unwrap_or(line),
                    message: format!("line longer than {max} bytes"),
                });
            }
            LineRead::Line => {}
        }
        let text = match std::str::from_utf8(buf) {
            Ok(t) => t,
            Err(e) => {
                return Ok(Rec::Bad {
                    line: first.unwrap_or(line),
                    message: format!("not UTF-8 (bad byte at offset {})", e.valid_up_to()),
                });
            }
        };
        if first.is_none() {
            if text.trim().is_empty() {
                return Ok(Rec::Blank);
            }
            first = Some(line);
        } else {
            rec.push('\n');
            quotes.feed(b"\n", delim);
        }
        rec.push_str(text);
        let at = first.unwrap_or(line);
        if rec.len() > max {
            return Ok(Rec::Bad {
                line: at,
                message: format!("record longer than {max} bytes (a quoted field not closed?)"),
            });
        }
        // Most lines have no quote at all: no scan needed.
        if first == Some(line) && !text.contains('"') {
            return Ok(Rec::Record { line: at });
        }
        quotes.feed(text.as_bytes(), delim);
        if !quotes.open() {
            // A quoting error is reported when (and if) the record is parsed.
            return Ok(Rec::Record { line: at });
        }
    }
}

enum Parser {
    Libsvm,
    Criteo(Criteo),
    Csv(Box<Plan>),
}

/// Which data lines a reader keeps (shard and split), decided by number.
#[derive(Clone, Copy, Debug)]
struct Selector {
    shard_index: u64,
    shard_count: u64,
    split: Split,
    holdout: Option<Holdout>,
    validation: Option<Validation>,
}

impl Selector {
    /// Whether 0-based data line `n` belongs to this reader.
    fn keeps(&self, n: u64) -> bool {
        if n % self.shard_count != self.shard_index {
            return false;
        }
        let outer = match (self.split, self.holdout) {
            (Split::All, _) | (_, None) => true,
            (s, Some(h)) => in_test(n, h.seed, h.test_fraction) == (s == Split::Test),
        };
        outer
            && match self.validation {
                None
                | Some(Validation {
                    keep: Split::All, ..
                }) => true,
                Some(v) => {
                    in_test(n, v.seed ^ VALIDATION_SALT, v.fraction) == (v.keep == Split::Test)
                }
            }
    }
}

/// Streams the examples of one file; see [`open`](crate::open).
///
/// Malformed lines are counted and skipped ([`Reader::stats`]); a fatal
/// error (I/O, corrupt compression) ends the iteration and is kept
/// ([`Reader::error`]), so always check it after the loop.
pub struct Reader {
    path: String,
    lines: Lines,
    parser: Parser,
    select: Selector,
    bias: bool,
    max_line: usize,
    stats: ReadStats,
    error: Option<DataError>,
    done: bool,
    buf: Vec<u8>,
    rec: String,
    feats: Vec<(u64, f32)>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("path", &self.path)
            .field("stats", &self.stats)
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

/// What one step of reading found.
enum Found {
    /// A line that is not data (blank; LIBSVM comment).
    Nothing,
    /// A data line of another shard or split.
    Elsewhere,
    /// A data line of this reader, starting at this 1-based line.
    Mine(u64, Outcome),
    /// End of input, or a fatal error (kept in `Reader::error`).
    End,
}

/// What became of one data line of this reader.
enum Outcome {
    /// Parsed: the label; the features are in `Reader::feats`.
    Example(f32),
    NoLabel,
    Bad(String),
}

impl Reader {
    pub(crate) fn open(
        path: &Path,
        format: &Format,
        opts: &ReadOptions,
    ) -> Result<Reader, DataError> {
        let shown = path.display().to_string();
        if opts.shard.count == 0 || opts.shard.index >= opts.shard.count {
            return Err(DataError::options(format!(
                "shard {} of {}: need index < count",
                opts.shard.index, opts.shard.count
            )));
        }
        let holdout = match (opts.holdout, format) {
            (Some(h), _) => Some(h),
            (None, Format::Csv(s)) => s.holdout(),
            (None, _) => None,
        };
        if let Some(h) = holdout {
            if !(0.0..=1.0).contains(&h.test_fraction) {
                return Err(DataError::options(format!(
                    "holdout test_fraction {} is not within [0, 1]",
                    h.test_fraction
                )));
            }
        }
        if let Some(v) = opts.validation {
            if !(0.0..=1.0).contains(&v.fraction) {
                return Err(DataError::options(format!(
                    "validation fraction {} is not within [0, 1]",
                    v.fraction
                )));
            }
        }
        if opts.split != Split::All && holdout.is_none() {
            return Err(DataError::options(format!(
                "{:?} split asked for {shown}, but no holdout is defined (set ReadOptions::holdout, or [split] in the schema)",
                opts.split
            )));
        }
        let max_line = opts.max_line_bytes.max(1);
        let mut lines = open_lines(path, max_line)?;
        let mut buf = Vec::new();
        let mut rec = String::new();
        let parser = match format {
            Format::Libsvm => Parser::Libsvm,
            Format::Criteo => Parser::Criteo(Criteo::new()),
            Format::Csv(schema) => {
                let header = read_header(
                    &mut lines,
                    &mut buf,
                    &mut rec,
                    schema.delimiter(),
                    max_line,
                    &shown,
                )?;
                Parser::Csv(Box::new(Plan::new(schema.clone(), &header, &shown)?))
            }
        };
        Ok(Reader {
            path: shown,
            lines,
            parser,
            select: Selector {
                shard_index: opts.shard.index as u64,
                shard_count: opts.shard.count as u64,
                split: opts.split,
                holdout,
                validation: opts.validation,
            },
            bias: opts.bias,
            max_line,
            stats: ReadStats::default(),
            error: None,
            done: false,
            buf,
            rec,
            feats: Vec::new(),
        })
    }

    /// Counts so far (final once the iterator has returned `None`).
    pub fn stats(&self) -> &ReadStats {
        &self.stats
    }

    /// The fatal error that ended the iteration early, if any.
    pub fn error(&self) -> Option<&DataError> {
        self.error.as_ref()
    }

    /// The file, as shown in messages.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// For a CSV reader, the features of the example `next()` returned
    /// last, kept apart by field: one key per name of
    /// [`Schema::feature_names`](crate::Schema::feature_names) (each
    /// feature, then each cross), [`MISSING_KEY`](crate::schema::MISSING_KEY)
    /// where the row has no value for it. The same keys as the example's,
    /// without the bias; what a model with one embedding per field needs.
    /// `None` for the other formats.
    pub fn field_keys(&self) -> Option<&[u64]> {
        match &self.parser {
            Parser::Csv(plan) => Some(plan.field_keys()),
            _ => None,
        }
    }

    fn bad(&mut self, line: u64, message: String) {
        self.stats.bad += 1;
        if self.stats.first_bad.len() < MAX_BAD_KEPT {
            self.stats.first_bad.push(BadLine {
                path: self.path.clone(),
                line,
                message,
            });
        }
    }

    fn fail(&mut self, e: io::Error) -> Found {
        self.error = Some(self.lines.error(&self.path, e));
        Found::End
    }

    /// Sorts the features, sums duplicates, adds the bias.
    fn example(&mut self, label: f32) -> Result<Example, String> {
        if self.bias {
            self.feats.push((BIAS_KEY, 1.0));
        }
        self.feats.sort_unstable_by_key(|f| f.0);
        let mut keys = Vec::with_capacity(self.feats.len());
        let mut vals: Vec<f32> = Vec::with_capacity(self.feats.len());
        for &(k, v) in &self.feats {
            match vals.last_mut() {
                Some(last) if keys.last() == Some(&k) => *last += v,
                _ => {
                    keys.push(k);
                    vals.push(v);
                }
            }
        }
        // Finite values can still sum past f32::MAX when a feature repeats.
        if vals.iter().any(|v| !v.is_finite()) {
            return Err("repeated features sum to a value out of f32 range".into());
        }
        Ok(Example { label, keys, vals })
    }

    /// Reads the next CSV record.
    fn step_csv(&mut self) -> Found {
        let Parser::Csv(plan) = &mut self.parser else {
            return Found::End;
        };
        let r = next_record(
            &mut self.lines,
            &mut self.buf,
            &mut self.rec,
            plan.delimiter(),
            self.max_line,
        );
        let (line, bad) = match r {
            Err(e) => return self.fail(e),
            Ok(Rec::Eof) => return Found::End,
            Ok(Rec::Blank) => return Found::Nothing,
            Ok(Rec::Bad { line, message }) => (line, Some(message)),
            Ok(Rec::Record { line }) => (line, None),
        };
        let n = self.stats.lines;
        self.stats.lines += 1;
        if !self.select.keeps(n) {
            return Found::Elsewhere;
        }
        let out = match bad {
            Some(m) => Outcome::Bad(m),
            None => match plan.row(&self.rec, &mut self.feats) {
                Ok(Some(l)) => Outcome::Example(l),
                Ok(None) => Outcome::NoLabel,
                Err(m) => Outcome::Bad(m),
            },
        };
        Found::Mine(line, out)
    }

    /// Reads the next line of a line-per-example format.
    fn step_line(&mut self) -> Found {
        let r = match self.lines.next_line(&mut self.buf) {
            Ok(r) => r,
            Err(e) => return self.fail(e),
        };
        let line = self.lines.line_no;
        let text = match r {
            LineRead::Eof => return Found::End,
            LineRead::TooLong => Err(format!("line longer than {} bytes", self.max_line)),
            LineRead::Line => std::str::from_utf8(&self.buf)
                .map_err(|e| format!("not UTF-8 (bad byte at offset {})", e.valid_up_to())),
        };
        // Blank (and, for LIBSVM, comment) lines are not data lines.
        if let Ok(t) = &text {
            let data = match self.parser {
                Parser::Libsvm => libsvm_is_data(t),
                _ => !t.trim().is_empty(),
            };
            if !data {
                return Found::Nothing;
            }
        }
        let n = self.stats.lines;
        self.stats.lines += 1;
        if !self.select.keeps(n) {
            return Found::Elsewhere;
        }
        let parsed = text.and_then(|t| match &mut self.parser {
            Parser::Libsvm => parse_libsvm(t, &mut self.feats),
            Parser::Criteo(c) => c.parse(t, &mut self.feats),
            Parser::Csv(_) => Err("internal: a CSV record read as a line".into()),
        });
        Found::Mine(
            line,
            match parsed {
                Ok(l) => Outcome::Example(l),
                Err(m) => Outcome::Bad(m),
            },
        )
    }
}

/// Reads the header of a CSV file: the first non-blank record, names trimmed.
fn read_header(
    lines: &mut Lines,
    buf: &mut Vec<u8>,
    rec: &mut String,
    delim: u8,
    max_line: usize,
    shown: &str,
) -> Result<Vec<String>, DataError> {
    let header_err = |message: String| DataError::Header {
        path: shown.to_string(),
        message,
    };
    loop {
        match next_record(lines, buf, rec, delim, max_line).map_err(|e| lines.error(shown, e))? {
            Rec::Blank => continue,
            Rec::Eof => return Err(header_err("empty file: no header line".into())),
            Rec::Bad { line, message } => {
                return Err(header_err(format!("header (line {line}): {message}")));
            }
            Rec::Record { line } => {
                let mut fields = Fields::default();
                if let Err(m) = fields.split(rec, delim) {
                    return Err(header_err(format!("header (line {line}): {m}")));
                }
                return Ok((0..fields.len())
                    .map(|i| fields.get(rec, i).unwrap_or("").trim().to_string())
                    .collect());
            }
        }
    }
}

impl Iterator for Reader {
    type Item = Example;

    fn next(&mut self) -> Option<Example> {
        while !self.done {
            self.feats.clear();
            let found = match self.parser {
                Parser::Csv(_) => self.step_csv(),
                _ => self.step_line(),
            };
            match found {
                Found::End => self.done = true,
                Found::Nothing => {}
                Found::Elsewhere => self.stats.elsewhere += 1,
                Found::Mine(_, Outcome::NoLabel) => self.stats.skipped += 1,
                Found::Mine(line, Outcome::Bad(m)) => self.bad(line, m),
                Found::Mine(line, Outcome::Example(label)) => match self.example(label) {
                    Ok(e) => {
                        self.stats.examples += 1;
                        return Some(e);
                    }
                    Err(m) => self.bad(line, m),
                },
            }
        }
        None
    }
}

impl std::iter::FusedIterator for Reader {}
