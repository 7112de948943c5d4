//! A small RFC 4180 field splitter. Written here rather than taken from the
//! `csv` crate because the reader needs only this (one record at a time,
//! fields as slices of a reused buffer) and keeps its own line accounting.
//!
//! Rules: a field that starts with `"` is quoted; inside it `""` is one `"`,
//! and the delimiter and newlines are data. A quoted field must be followed
//! by the delimiter or the end of the record. A `"` inside an unquoted field
//! is kept as data (lenient, as most writers in the wild need).

use std::ops::Range;

/// Where a field's text lives.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Span {
    /// A slice of the record itself (unquoted, or quoted without `""`).
    Record(Range<usize>),
    /// A slice of [`Fields::unescaped`] (quoted with `""` inside).
    Unescaped(Range<usize>),
}

/// The fields of one record, as spans; reused from record to record so a
/// steady-state read allocates nothing here.
#[derive(Debug, Default)]
pub(crate) struct Fields {
    spans: Vec<Span>,
    unescaped: String,
}

/// How splitting a record ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Split {
    /// All fields found.
    Complete,
    /// The record ends inside a quoted field: append the next line.
    Open,
}

impl Fields {
    /// Number of fields.
    pub(crate) fn len(&self) -> usize {
        self.spans.len()
    }

    /// Field `i` of `record` (the same record given to [`Fields::split`]).
    pub(crate) fn get<'a>(&'a self, record: &'a str, i: usize) -> Option<&'a str> {
        match self.spans.get(i)? {
            Span::Record(r) => record.get(r.clone()),
            Span::Unescaped(r) => self.unescaped.get(r.clone()),
        }
    }

    /// Splits `record` on the ASCII byte `delim`. `Err` says what is wrong.
    pub(crate) fn split(&mut self, record: &str, delim: u8) -> Result<Split, String> {
        self.spans.clear();
        self.unescaped.clear();
        let b = record.as_bytes();
        let mut pos = 0;
        loop {
            if b.get(pos) == Some(&b'"') {
                // Quoted field. `seg` is the start of text not yet copied;
                // copying starts only once a `""` is met.
                let start = pos + 1;
                let mut seg = start;
                let mut p = start;
                let mut owned: Option<usize> = None;
                let end = loop {
                    let Some(q) = find(b, p, b'"') else {
                        return Ok(Split::Open);
                    };
                    if b.get(q + 1) == Some(&b'"') {
                        owned.get_or_insert(self.unescaped.len());
                        self.unescaped.push_str(&record[seg..=q]);
                        p = q + 2;
                        seg = p;
                    } else {
                        break q;
                    }
                };
                match owned {
                    Some(from) => {
                        self.unescaped.push_str(&record[seg..end]);
                        self.spans.push(Span::Unescaped(from..self.unescaped.len()));
                    }
                    None => self.spans.push(Span::Record(start..end)),
                }
                pos = end + 1;
                match b.get(pos) {
                    None => return Ok(Split::Complete),
                    Some(&c) if c == delim => pos += 1,
                    Some(_) => {
                        return Err(format!(
                            "field {} has text after its closing quote",
                            self.spans.len()
                        ));
                    }
                }
            } else {
                match find(b, pos, delim) {
                    Some(d) => {
                        self.spans.push(Span::Record(pos..d));
                        pos = d + 1;
                    }
                    None => {
                        self.spans.push(Span::Record(pos..b.len()));
                        return Ok(Split::Complete);
                    }
                }
            }
        }
    }
}

/// Follows the quoting of a record line by line, to tell whether a quoted
/// field runs on to the next line, in time linear in the record (splitting
/// the growing record again after every line would be quadratic). Agrees
/// with [`Fields::split`] on which records are open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum QuoteScan {
    /// At the start of a field.
    #[default]
    FieldStart,
    /// Inside an unquoted field.
    Unquoted,
    /// Inside a quoted field.
    Quoted,
    /// Just after a quote inside a quoted field: closing, or half of `""`.
    QuoteInQuoted,
    /// Text after a closing quote: the record is malformed (and complete).
    Broken,
}

impl QuoteScan {
    /// Advances over `bytes`.
    pub(crate) fn feed(&mut self, bytes: &[u8], delim: u8) {
        use QuoteScan::*;
        for &c in bytes {
            *self = match (*self, c) {
                (Broken, _) => Broken,
                (FieldStart, b'"') => Quoted,
                (FieldStart | Unquoted | QuoteInQuoted, c) if c == delim => FieldStart,
                (FieldStart | Unquoted, _) => Unquoted,
                (Quoted, b'"') => QuoteInQuoted,
                (Quoted, _) => Quoted,
                (QuoteInQuoted, b'"') => Quoted,
                (QuoteInQuoted, _) => Broken,
            };
        }
    }

    /// Whether the record so far ends inside a quoted field.
    pub(crate) fn open(self) -> bool {
        self == QuoteScan::Quoted
    }
}

fn find(b: &[u8], from: usize, what: u8) -> Option<usize> {
    b.get(from..)?
        .iter()
        .position(|&c| c == what)
        .map(|i| i + from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn scan_agrees_with_split(s in "[a,\"\n]{0,24}") {
            let mut f = Fields::default();
            let open = f.split(&s, b',') == Ok(Split::Open);
            // Fed line by line, as the reader does.
            let mut q = QuoteScan::default();
            for (i, line) in s.split('\n').enumerate() {
                if i > 0 {
                    q.feed(b"\n", b',');
                }
                q.feed(line.as_bytes(), b',');
            }
            prop_assert_eq!(q.open(), open, "{:?}", s);
        }
    }

    fn split(s: &str) -> Result<(Split, Vec<String>), String> {
        let mut f = Fields::default();
        let r = f.split(s, b',')?;
        let v = (0..f.len())
            .map(|i| f.get(s, i).unwrap().to_string())
            .collect();
        Ok((r, v))
    }

    #[test]
    fn plain_and_empty_fields() {
        assert_eq!(split("a,b,,c").unwrap().1, vec!["a", "b", "", "c"]);
        assert_eq!(split("").unwrap().1, vec![""]);
        assert_eq!(split("a,").unwrap().1, vec!["a", ""]);
        assert_eq!(split(",").unwrap().1, vec!["", ""]);
    }

    #[test]
    fn quoted_fields() {
        assert_eq!(
            split(r#""a,b",c,"say ""hi""","""""#).unwrap().1,
            vec!["a,b", "c", r#"say "hi""#, r#"""#]
        );
        assert_eq!(split(r#""",x"#).unwrap().1, vec!["", "x"]);
        assert_eq!(
            split("\"line\nbreak\",z").unwrap().1,
            vec!["line\nbreak", "z"]
        );
        assert_eq!(split("é,\"ü\"").unwrap().1, vec!["é", "ü"]);
    }

    #[test]
    fn stray_quote_in_unquoted_field_is_data() {
        assert_eq!(split(r#"ab"c,d"#).unwrap().1, vec![r#"ab"c"#, "d"]);
    }

    #[test]
    fn open_and_bad_quotes() {
        assert_eq!(split(r#"a,"open"#).unwrap().0, Split::Open);
        assert_eq!(split("a,\"x\"\"").unwrap().0, Split::Open);
        assert_eq!(split("a,\"x\"\"\"").unwrap().1, vec!["a", "x\""]);
        assert!(split(r#""x"y,z"#).is_err());
    }
}
