//! Rows of `COPY ... TO STDOUT` in text format: one line per row, fields separated by tabs,
//! `\N` for NULL, and backslash escapes for the bytes that would break the framing.
//!
//! The text of each field is the column's output function under the session's settings, as
//! in pgoutput and in the simple query protocol; COPY only escapes it. Postgres writes
//! `\\`, `\b`, `\f`, `\n`, `\r`, `\t` and `\v`; the other escapes `COPY FROM` accepts
//! (octal `\NNN`, hex `\xHH`, and a backslash before any other character standing for that
//! character) are decoded too, so any valid COPY text reads back as what it encodes.

use std::ops::Range;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CopyTextError {
    #[error("a COPY row ends in a lone backslash")]
    TrailingBackslash,
    #[error("a COPY row has {found} fields where {expected} were selected")]
    Fields { found: usize, expected: usize },
}

/// Parses rows; reused from line to line so parsing allocates nothing once warm.
#[derive(Debug, Default)]
pub struct Row {
    /// Unescaped text of the fields that had escapes (rare: most fields are used in place).
    text: Vec<u8>,
    fields: Vec<Field>,
}

#[derive(Debug, Clone)]
enum Field {
    Null,
    /// Bytes of the line itself: the field had no escapes.
    InLine(Range<usize>),
    /// Bytes of `Row::text`.
    Unescaped(Range<usize>),
}

/// The fields of one parsed line.
pub struct Fields<'a> {
    line: &'a [u8],
    row: &'a Row,
}

impl Row {
    /// Parses one line (without its `\n`), which must hold `expected` fields.
    ///
    /// # Errors
    /// The line is not COPY text of `expected` fields.
    pub fn parse<'a>(
        &'a mut self,
        line: &'a [u8],
        expected: usize,
    ) -> Result<Fields<'a>, CopyTextError> {
        self.text.clear();
        self.fields.clear();
        let mut start = 0;
        loop {
            // The field ends at the next tab; a backslash before it means escapes.
            let (end, escaped) = match memchr::memchr2(b'\t', b'\\', &line[start..]) {
                Some(at) if line[start + at] == b'\t' => (start + at, false),
                Some(at) => (escaped_field_end(line, start + at), true),
                None => (line.len(), false),
            };
            let raw = &line[start..end];
            let field = if raw == b"\\N" {
                Field::Null
            } else if escaped {
                let from = self.text.len();
                unescape_into(&mut self.text, raw)?;
                Field::Unescaped(from..self.text.len())
            } else {
                Field::InLine(start..end)
            };
            self.fields.push(field);
            if end == line.len() {
                break;
            }
            start = end + 1;
        }
        if self.fields.len() != expected {
            return Err(CopyTextError::Fields {
                found: self.fields.len(),
                expected,
            });
        }
        Ok(Fields { line, row: self })
    }
}

impl<'a> Fields<'a> {
    /// Field `at`'s text; `None` for NULL (or past the end).
    pub fn get(&self, at: usize) -> Option<&'a [u8]> {
        match self.row.fields.get(at)? {
            Field::Null => None,
            Field::InLine(range) => Some(&self.line[range.clone()]),
            Field::Unescaped(range) => Some(&self.row.text[range.clone()]),
        }
    }
}

/// Where a field that has a backslash at `at` ends: at the first tab that no backslash
/// escapes. `COPY FROM` reads a backslash and a tab as a tab inside the field.
fn escaped_field_end(line: &[u8], mut at: usize) -> usize {
    // `at` is always on a backslash here: skip it and the byte it escapes.
    loop {
        at += 2;
        if at >= line.len() {
            return line.len();
        }
        match memchr::memchr2(b'\t', b'\\', &line[at..]) {
            Some(next) if line[at + next] == b'\t' => return at + next,
            Some(next) => at += next,
            None => return line.len(),
        }
    }
}

fn unescape_into(out: &mut Vec<u8>, raw: &[u8]) -> Result<(), CopyTextError> {
    let mut rest = raw;
    while let Some(at) = memchr::memchr(b'\\', rest) {
        out.extend_from_slice(&rest[..at]);
        let Some(&c) = rest.get(at + 1) else {
            return Err(CopyTextError::TrailingBackslash);
        };
        rest = &rest[at + 2..];
        match c {
            b'b' => out.push(0x08),
            b'f' => out.push(0x0c),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(0x0b),
            b'0'..=b'7' => {
                // Up to three octal digits, this one included.
                let mut value = u32::from(c - b'0');
                let digits = rest
                    .iter()
                    .take(2)
                    .take_while(|d| (b'0'..=b'7').contains(*d))
                    .count();
                for &d in &rest[..digits] {
                    value = value * 8 + u32::from(d - b'0');
                }
                rest = &rest[digits..];
                out.push(value as u8);
            }
            b'x' if rest.first().is_some_and(u8::is_ascii_hexdigit) => {
                let digits = rest
                    .iter()
                    .take(2)
                    .take_while(|d| d.is_ascii_hexdigit())
                    .count();
                let value = rest[..digits]
                    .iter()
                    .fold(0u32, |v, d| v * 16 + hex_value(*d));
                rest = &rest[digits..];
                out.push(value as u8);
            }
            other => out.push(other),
        }
    }
    out.extend_from_slice(rest);
    Ok(())
}

fn hex_value(d: u8) -> u32 {
    match d {
        b'0'..=b'9' => u32::from(d - b'0'),
        b'a'..=b'f' => u32::from(d - b'a' + 10),
        _ => u32::from(d - b'A' + 10),
    }
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(line: &[u8], expected: usize) -> Vec<Option<Vec<u8>>> {
        let mut row = Row::default();
        let fields = row.parse(line, expected).unwrap();
        (0..expected)
            .map(|i| fields.get(i).map(<[u8]>::to_vec))
            .collect()
    }

    #[test]
    fn splits_fields_and_reads_nulls() {
        assert_eq!(
            fields(b"1\t\\N\t\tx", 4),
            vec![
                Some(b"1".to_vec()),
                None,
                Some(Vec::new()),
                Some(b"x".to_vec())
            ]
        );
        // A field that holds the two characters \N is written \\N, and is not NULL.
        assert_eq!(fields(b"\\\\N", 1), vec![Some(b"\\N".to_vec())]);
    }

    #[test]
    fn decodes_every_escape_postgres_writes() {
        assert_eq!(
            fields(b"a\\\\b\\bc\\fd\\ne\\rf\\tg\\vh", 1),
            vec![Some(b"a\\b\x08c\x0cd\ne\rf\tg\x0bh".to_vec())]
        );
    }

    #[test]
    fn decodes_the_escapes_copy_from_accepts() {
        assert_eq!(
            fields(b"\\101\\7\\x41\\x4a2\\q\\.", 1),
            vec![Some(b"A\x07AJ2q.".to_vec())]
        );
        // \x without a hex digit is an x.
        assert_eq!(fields(b"\\xg", 1), vec![Some(b"xg".to_vec())]);
    }

    /// Found by the property tests: a backslash before the delimiter quotes it, so
    /// `a\<tab>b` is one field holding a tab (the parser split the line there and then
    /// refused the first half's lone backslash).
    #[test]
    fn a_backslash_quotes_the_delimiter() {
        assert_eq!(fields(b"\\\t", 1), vec![Some(b"\t".to_vec())]);
        assert_eq!(
            fields(b"a\\\tb\tc", 2),
            vec![Some(b"a\tb".to_vec()), Some(b"c".to_vec())]
        );
        // An escaped backslash does not quote the tab after it.
        assert_eq!(
            fields(b"a\\\\\tb", 2),
            vec![Some(b"a\\".to_vec()), Some(b"b".to_vec())]
        );
        assert_eq!(fields(b"\\\t\\\t", 1), vec![Some(b"\t\t".to_vec())]);
    }

    #[test]
    fn rejects_what_is_not_copy_text() {
        let mut row = Row::default();
        assert_eq!(
            row.parse(b"abc\\", 1).err(),
            Some(CopyTextError::TrailingBackslash)
        );
        assert_eq!(
            row.parse(b"1\t2", 3).err(),
            Some(CopyTextError::Fields {
                found: 2,
                expected: 3
            })
        );
        // A line's fields, some escaped and some not, some empty, read back in order.
        assert_eq!(
            fields(b"\ta\\tb\t\tc\\\\", 4),
            vec![
                Some(Vec::new()),
                Some(b"a\tb".to_vec()),
                Some(Vec::new()),
                Some(b"c\\".to_vec())
            ]
        );
    }
}
