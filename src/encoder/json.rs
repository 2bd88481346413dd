//! JSON text: strings escaped exactly like serde_json, number syntax, and a validator for
//! the json/jsonb text that is embedded as is.

use super::digits;

/// Writes a JSON string the way serde_json does: `"` and `\` backslashed, the short escapes
/// `\b \f \n \r \t`, other control characters as `\u00XX` (lower-case hex), all else as is.
pub(super) fn write_json_string(out: &mut Vec<u8>, s: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(s.len() + 2);
    out.push(b'"');
    let mut start = 0;
    for (i, &b) in s.iter().enumerate() {
        // One table look-up per byte: most bytes need nothing.
        let escape = ESCAPE[usize::from(b)];
        if escape == 0 {
            continue;
        }
        out.extend_from_slice(&s[start..i]);
        if escape == b'u' {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(&[b'\\', escape]);
        }
        start = i + 1;
    }
    out.extend_from_slice(&s[start..]);
    out.push(b'"');
}

/// For each byte: 0 if it goes into a JSON string as is, else the character after the
/// backslash of its escape (`u`: `\u00XX`).
static ESCAPE: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = b'u';
        b += 1;
    }
    table[0x08] = b'b';
    table[0x0c] = b'f';
    table[b'\n' as usize] = b'n';
    table[b'\r' as usize] = b'r';
    table[b'\t' as usize] = b't';
    table[b'"' as usize] = b'"';
    table[b'\\' as usize] = b'\\';
    table
};

/// Length of the JSON number at the start of `s` (0 if none):
/// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
fn json_number_len(s: &[u8]) -> usize {
    let mut i = usize::from(s.first() == Some(&b'-'));
    match s.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => i += digits(s, i),
        _ => return 0,
    }
    if s.get(i) == Some(&b'.') {
        let n = digits(s, i + 1);
        if n == 0 {
            return 0;
        }
        i += 1 + n;
    }
    if matches!(s.get(i), Some(b'e' | b'E')) {
        let sign = usize::from(matches!(s.get(i + 1), Some(b'+' | b'-')));
        let n = digits(s, i + 1 + sign);
        if n == 0 {
            return 0;
        }
        i += 1 + sign + n;
    }
    i
}

pub(super) fn is_json_number(s: &[u8]) -> bool {
    !s.is_empty() && json_number_len(s) == s.len()
}

pub(super) fn is_json_integer(s: &[u8]) -> bool {
    is_json_number(s) && !s.iter().any(|b| matches!(b, b'.' | b'e' | b'E'))
}

/// Skips JSON whitespace.
fn ws(s: &[u8], i: &mut usize) {
    while matches!(s.get(*i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        *i += 1;
    }
}
/// One JSON string at `*i`, escapes checked.
fn string(s: &[u8], i: &mut usize) -> bool {
    if s.get(*i) != Some(&b'"') {
        return false;
    }
    *i += 1;
    loop {
        match s.get(*i) {
            Some(b'"') => {
                *i += 1;
                return true;
            }
            Some(b'\\') => match s.get(*i + 1) {
                Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => *i += 2,
                Some(b'u') => {
                    let hex = s.get(*i + 2..*i + 6);
                    if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                        return false;
                    }
                    *i += 6;
                }
                _ => return false,
            },
            Some(&b) if b >= 0x20 => *i += 1,
            _ => return false,
        }
    }
}
/// An object key and its colon.
fn key(s: &[u8], i: &mut usize) -> bool {
    ws(s, i);
    if !string(s, i) {
        return false;
    }
    ws(s, i);
    if s.get(*i) != Some(&b':') {
        return false;
    }
    *i += 1;
    true
}

/// Whether `s` is one JSON document. Iterative, so deeply nested jsonb cannot overflow the
/// stack; Postgres produced it, so this is a guard against corrupt input, not a parser.
pub(super) fn is_json(s: &[u8]) -> bool {
    let mut open: Vec<u8> = Vec::new();
    let mut i = 0;
    'value: loop {
        ws(s, &mut i);
        match s.get(i) {
            Some(&c @ (b'{' | b'[')) => {
                i += 1;
                ws(s, &mut i);
                let close = if c == b'{' { b'}' } else { b']' };
                if s.get(i) == Some(&close) {
                    i += 1;
                } else {
                    open.push(close);
                    if c == b'{' && !key(s, &mut i) {
                        return false;
                    }
                    continue 'value;
                }
            }
            Some(b'"') => {
                if !string(s, &mut i) {
                    return false;
                }
            }
            Some(b't') if s[i..].starts_with(b"true") => i += 4,
            Some(b'f') if s[i..].starts_with(b"false") => i += 5,
            Some(b'n') if s[i..].starts_with(b"null") => i += 4,
            _ => {
                let n = json_number_len(&s[i..]);
                if n == 0 {
                    return false;
                }
                i += n;
            }
        }
        // After a value: close containers or move to the next element.
        loop {
            ws(s, &mut i);
            let Some(&close) = open.last() else {
                return i == s.len();
            };
            match s.get(i) {
                Some(b',') => {
                    i += 1;
                    if close == b'}' && !key(s, &mut i) {
                        return false;
                    }
                    continue 'value;
                }
                Some(&c) if c == close => {
                    i += 1;
                    open.pop();
                }
                _ => return false,
            }
        }
    }
}
