//! The row encoder: one function from a row's Postgres text values to JSON.
//!
//! It has two callers, the replication stream (pgoutput sends each value's output-function
//! text) and the read helper (which SELECTs the row), and both must produce byte-identical
//! JSON. That holds when both connections pin the session settings that shape text output
//! (`DateStyle=ISO`, `TimeZone=UTC`, `IntervalStyle=iso_8601`, `extra_float_digits=3`,
//! `bytea_output=hex`) and the SELECT yields the same output-function text. A plain
//! `::text` cast differs for three types: bool (`true`, not `t`: accepted here), inet
//! (`10.0.0.1/32`, not `10.0.0.1`) and bpchar (trailing blanks stripped). Text-format
//! results, or `format('%s', col)` guarded for NULL, give the output-function text.
//!
//! On the hot path nothing is allocated beyond the growth of `out` (arrays use one scratch
//! buffer). On error, `out` is left as it was before the call.

mod array;
mod json;
mod pgtype;

pub use pgtype::PgType;

use base64::Engine as _;

use self::array::encode_array;
use self::json::{is_json, is_json_integer, is_json_number, write_json_string};

/// Options from the table rule that change the JSON.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EncodeOptions {
    /// Write numeric as a JSON number instead of a string (may lose precision in readers
    /// that parse numbers as doubles).
    pub numeric_as_number: bool,
}

/// A value's text could not be read as its type. Values are quoted (shortened when long).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("cannot read {type_name} value {text:?}")]
    Malformed {
        type_name: &'static str,
        text: String,
    },
    #[error("{type_name} value is not valid UTF-8: {text:?}")]
    NotUtf8 {
        type_name: &'static str,
        text: String,
    },
    #[error("malformed array literal {text:?}: {problem}")]
    MalformedArray { text: String, problem: &'static str },
    #[error("column {column}: {error}")]
    Column {
        column: String,
        error: Box<EncodeError>,
    },
    #[error("row has {values} values for {columns} columns")]
    RowArity { columns: usize, values: usize },
}

/// Error messages quote at most this many bytes of a value.
const QUOTE_LIMIT: usize = 64;

fn quote(text: &[u8]) -> String {
    let cut = text.len().min(QUOTE_LIMIT);
    let mut s = String::from_utf8_lossy(&text[..cut]).into_owned();
    if cut < text.len() {
        s.push_str("...");
    }
    s
}

/// Whether a value goes into a JSON document (strings quoted and escaped) or into a hash
/// field (strings raw).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Form {
    Json,
    Field,
}

/// Appends one value as JSON. `text` is the value's Postgres text output.
///
/// # Errors
/// The text is not a valid value of the type; `out` is then left unchanged.
pub fn encode_value(
    out: &mut Vec<u8>,
    ty: &PgType,
    text: &[u8],
    opts: EncodeOptions,
) -> Result<(), EncodeError> {
    encode_restoring(out, ty, text, opts, Form::Json)
}

/// Appends the hash-format field value for one column: values that are JSON strings are
/// written raw (unquoted, unescaped), everything else as its JSON text.
///
/// # Errors
/// As [`encode_value`].
pub fn encode_field(
    out: &mut Vec<u8>,
    ty: &PgType,
    text: &[u8],
    opts: EncodeOptions,
) -> Result<(), EncodeError> {
    encode_restoring(out, ty, text, opts, Form::Field)
}

/// Appends a JSON object `{"col":value,...}` in column order, NULL as `null`: compact, with
/// keys escaped exactly like serde_json.
///
/// # Errors
/// A value that cannot be encoded ([`EncodeError::Column`] names the column), or a number
/// of values different from the number of columns. `out` is then left unchanged.
/// `columns` may borrow (`&[(&str, &PgType)]`) or own (`&[(String, PgType)]`) its names and
/// types, so callers that keep a column list need not rebuild one per row.
pub fn encode_row<'a, N: AsRef<str>, T: std::borrow::Borrow<PgType>>(
    out: &mut Vec<u8>,
    columns: &[(N, T)],
    values: impl IntoIterator<Item = Option<&'a [u8]>>,
    opts: EncodeOptions,
) -> Result<(), EncodeError> {
    let start = out.len();
    let result = encode_row_inner(out, columns, values, opts);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

fn encode_row_inner<'a, N: AsRef<str>, T: std::borrow::Borrow<PgType>>(
    out: &mut Vec<u8>,
    columns: &[(N, T)],
    values: impl IntoIterator<Item = Option<&'a [u8]>>,
    opts: EncodeOptions,
) -> Result<(), EncodeError> {
    let mut values = values.into_iter();
    out.push(b'{');
    for (i, (name, ty)) in columns.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let name = name.as_ref();
        write_json_string(out, name.as_bytes());
        out.push(b':');
        match values.next() {
            None => {
                return Err(EncodeError::RowArity {
                    columns: columns.len(),
                    values: i,
                })
            }
            Some(None) => out.extend_from_slice(b"null"),
            Some(Some(text)) => encode(out, ty.borrow(), text, opts, Form::Json).map_err(|e| {
                EncodeError::Column {
                    column: name.to_string(),
                    error: Box::new(e),
                }
            })?,
        }
    }
    let extra = values.count();
    if extra > 0 {
        return Err(EncodeError::RowArity {
            columns: columns.len(),
            values: columns.len() + extra,
        });
    }
    out.push(b'}');
    Ok(())
}

fn encode_restoring(
    out: &mut Vec<u8>,
    ty: &PgType,
    text: &[u8],
    opts: EncodeOptions,
    form: Form,
) -> Result<(), EncodeError> {
    let start = out.len();
    let result = encode(out, ty, text, opts, form);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

fn encode(
    out: &mut Vec<u8>,
    ty: &PgType,
    text: &[u8],
    opts: EncodeOptions,
    form: Form,
) -> Result<(), EncodeError> {
    let malformed = || EncodeError::Malformed {
        type_name: ty.name(),
        text: quote(text),
    };
    match ty {
        PgType::Int => {
            if !is_json_integer(text) {
                return Err(malformed());
            }
            out.extend_from_slice(text);
        }
        PgType::Float => match text {
            b"NaN" | b"Infinity" | b"-Infinity" => write_str(out, text, form),
            _ if is_json_number(text) => out.extend_from_slice(text),
            _ => return Err(malformed()),
        },
        PgType::Numeric => match text {
            b"NaN" | b"Infinity" | b"-Infinity" => write_str(out, text, form),
            _ if !is_json_number(text) => return Err(malformed()),
            _ if opts.numeric_as_number => out.extend_from_slice(text),
            _ => write_str(out, text, form),
        },
        PgType::Bool => match text {
            b"t" | b"true" => out.extend_from_slice(b"true"),
            b"f" | b"false" => out.extend_from_slice(b"false"),
            _ => return Err(malformed()),
        },
        PgType::Text | PgType::Other | PgType::TimeTz | PgType::Interval => {
            write_str(out, utf8(ty, text)?, form)
        }
        PgType::Json => {
            if !is_json(utf8(ty, text)?) {
                return Err(malformed());
            }
            out.extend_from_slice(text);
        }
        PgType::TimestampTz | PgType::Timestamp | PgType::Date => {
            encode_datetime(out, ty, utf8(ty, text)?, form).ok_or_else(malformed)?
        }
        PgType::Time => {
            let t = utf8(ty, text)?;
            if clock_len(t) != Some(t.len()) {
                return Err(malformed());
            }
            write_str(out, t, form);
        }
        PgType::Bytea => encode_bytea(out, text, form).ok_or_else(malformed)?,
        PgType::Array(elem) => encode_array(out, elem, text, opts)?,
    }
    Ok(())
}

/// Checks UTF-8 (guaranteed by `client_encoding=UTF8`, checked anyway since a key or JSON
/// document must never carry invalid text) and gives the bytes back.
fn utf8<'t>(ty: &PgType, text: &'t [u8]) -> Result<&'t [u8], EncodeError> {
    match std::str::from_utf8(text) {
        Ok(_) => Ok(text),
        Err(_) => Err(EncodeError::NotUtf8 {
            type_name: ty.name(),
            text: quote(text),
        }),
    }
}

fn write_str(out: &mut Vec<u8>, s: &[u8], form: Form) {
    match form {
        Form::Json => write_json_string(out, s),
        Form::Field => out.extend_from_slice(s),
    }
}

/// Digits from `s[i..]`, returning how many.
fn digits(s: &[u8], i: usize) -> usize {
    s.get(i..).map_or(0, |rest| {
        rest.iter().take_while(|b| b.is_ascii_digit()).count()
    })
}

/// Length of `HH:MM:SS` with an optional fraction at the start of `s`, if it is one.
fn clock_len(s: &[u8]) -> Option<usize> {
    let shape = s.get(..8)?;
    let ok = shape.iter().enumerate().all(|(i, &b)| {
        if i % 3 == 2 {
            b == b':'
        } else {
            b.is_ascii_digit()
        }
    });
    if !ok {
        return None;
    }
    if s.get(8) == Some(&b'.') {
        let n = digits(s, 9);
        (n > 0).then_some(9 + n)
    } else {
        Some(8)
    }
}

/// Whether `s` starts with `YYYY-MM-DD`.
fn is_date(s: &[u8]) -> bool {
    s.get(..10).is_some_and(|d| {
        d.iter().enumerate().all(|(i, &b)| match i {
            4 | 7 => b == b'-',
            _ => b.is_ascii_digit(),
        })
    })
}

/// Dates and timestamps become ISO 8601 / RFC 3339. Values outside what those can say
/// (BC, years past 9999) and the infinities keep their Postgres text, as strings.
fn encode_datetime(out: &mut Vec<u8>, ty: &PgType, t: &[u8], form: Form) -> Option<()> {
    let big_year = digits(t, 0) > 4 && t.get(digits(t, 0)) == Some(&b'-');
    let passthrough =
        matches!(t, b"infinity" | b"-infinity") || big_year || (t.ends_with(b" BC") && is_date(t));
    if passthrough {
        write_str(out, t, form);
        return Some(());
    }
    if !is_date(t) {
        return None;
    }
    if *ty == PgType::Date {
        if t.len() != 10 {
            return None;
        }
        write_str(out, t, form);
        return Some(());
    }
    if t.get(10) != Some(&b' ') {
        return None;
    }
    let clock_end = 11 + clock_len(&t[11..])?;
    let zone = &t[clock_end..];
    let json = form == Form::Json;
    let zone_ok = match ty {
        PgType::TimestampTz => matches!(zone, b"+00" | b"+00:00" | b"+00:00:00"),
        _ => zone.is_empty(),
    };
    if !zone_ok {
        return None;
    }
    if json {
        out.push(b'"');
    }
    out.extend_from_slice(&t[..10]);
    out.push(b'T');
    out.extend_from_slice(&t[11..clock_end]);
    if *ty == PgType::TimestampTz {
        out.push(b'Z');
    }
    if json {
        out.push(b'"');
    }
    Some(())
}

/// bytea text (`\x0102` hex, or the escape format should a connection not pin hex) as
/// base64, decoded and encoded in stack-sized chunks so nothing is allocated.
fn encode_bytea(out: &mut Vec<u8>, text: &[u8], form: Form) -> Option<()> {
    // A multiple of 3, so chunk encodings concatenate without inner padding.
    const CHUNK: usize = 3 * 256;
    let mut buf = [0u8; CHUNK];
    let hex = text.strip_prefix(b"\\x");
    let mut pos = 0;
    if form == Form::Json {
        out.push(b'"');
    }
    loop {
        let mut n = 0;
        while n < CHUNK {
            let Some(&b) = (match hex {
                Some(h) => h.get(pos),
                None => text.get(pos),
            }) else {
                break;
            };
            buf[n] = match hex {
                Some(h) => {
                    let hi = char::from(b).to_digit(16)?;
                    let lo = char::from(*h.get(pos + 1)?).to_digit(16)?;
                    pos += 2;
                    u8::try_from(hi * 16 + lo).ok()?
                }
                None if b == b'\\' => match text.get(pos + 1..) {
                    Some([b'\\', ..]) => {
                        pos += 2;
                        b'\\'
                    }
                    Some([a @ b'0'..=b'3', b @ b'0'..=b'7', c @ b'0'..=b'7', ..]) => {
                        pos += 4;
                        ((a - b'0') << 6) | ((b - b'0') << 3) | (c - b'0')
                    }
                    _ => return None,
                },
                None => {
                    pos += 1;
                    b
                }
            };
            n += 1;
        }
        if n == 0 {
            break;
        }
        let at = out.len();
        out.resize(at + base64::encoded_len(n, true)?, 0);
        base64::engine::general_purpose::STANDARD
            .encode_slice(&buf[..n], &mut out[at..])
            .ok()?;
        if n < CHUNK {
            break;
        }
    }
    if form == Form::Json {
        out.push(b'"');
    }
    Some(())
}

#[cfg(test)]
mod tests;
