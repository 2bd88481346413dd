//! Property tests of the COPY text parser, against an encoder that escapes as Postgres's
//! `COPY TO` does and against the escapes `COPY FROM` documents.

use proptest::collection::vec;
use proptest::prelude::*;

use super::*;
use crate::fuzz;

/// One field as `COPY TO` text writes it (tab delimiter, `\N` for NULL): backslash and the
/// control characters with a letter escape are escaped, other bytes (other control
/// characters, DEL, non-ASCII) are written as they are.
fn copy_to(field: Option<&[u8]>, out: &mut Vec<u8>) {
    let Some(value) = field else {
        out.extend_from_slice(b"\\N");
        return;
    };
    for &b in value {
        let escape = match b {
            b'\\' => b'\\',
            0x08 => b'b',
            0x0c => b'f',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            0x0b => b'v',
            _ => {
                out.push(b);
                continue;
            }
        };
        out.push(b'\\');
        out.push(escape);
    }
}

fn line_of(fields: &[Option<Vec<u8>>]) -> Vec<u8> {
    let mut line = Vec::new();
    for (i, field) in fields.iter().enumerate() {
        if i > 0 {
            line.push(b'\t');
        }
        copy_to(field.as_deref(), &mut line);
    }
    line
}

fn read(
    row: &mut Row,
    line: &[u8],
    expected: usize,
) -> Result<Vec<Option<Vec<u8>>>, CopyTextError> {
    let fields = row.parse(line, expected)?;
    Ok((0..expected)
        .map(|i| fields.get(i).map(<[u8]>::to_vec))
        .collect())
}

/// A column value: any bytes but NUL (text values cannot hold one), biased towards the
/// bytes COPY escapes; or NULL.
fn field() -> impl Strategy<Value = Option<Vec<u8>>> {
    let byte = prop_oneof![
        3 => 1u8..=255,
        2 => proptest::sample::select(b"\\\t\n\r\x08\x0c\x0bN.x0 ".to_vec()),
    ];
    proptest::option::weighted(0.85, vec(byte, 0..24))
}

fn rows() -> impl Strategy<Value = Vec<Vec<Option<Vec<u8>>>>> {
    vec(vec(field(), 1..8), 1..6)
}

/// A piece of a field as `COPY FROM` may read it: its text and the bytes it stands for.
#[derive(Debug, Clone)]
struct Piece {
    text: Vec<u8>,
    bytes: Vec<u8>,
    /// The digits of a numeric escape that could take more, and of which kind: the next
    /// piece must not start with such a digit, or it would be read as part of this one.
    open: Option<fn(u8) -> bool>,
}

fn is_octal(b: u8) -> bool {
    (b'0'..=b'7').contains(&b)
}

fn is_hex(b: u8) -> bool {
    b.is_ascii_hexdigit()
}

fn piece() -> impl Strategy<Value = Piece> {
    // Bytes are picked from lists rather than filtered, so long runs reject nothing.
    let plain = proptest::sample::select(
        (1u8..=255)
            .filter(|b| !matches!(b, b'\\' | b'\t' | b'\n'))
            .collect::<Vec<u8>>(),
    )
    .prop_map(|b| Piece {
        text: vec![b],
        bytes: vec![b],
        open: None,
    });
    let letter = proptest::sample::select(vec![
        (b'b', 0x08),
        (b'f', 0x0c),
        (b'n', b'\n'),
        (b'r', b'\r'),
        (b't', b'\t'),
        (b'v', 0x0b),
        (b'\\', b'\\'),
    ])
    .prop_map(|(letter, byte)| Piece {
        text: vec![b'\\', letter],
        bytes: vec![byte],
        open: None,
    });
    // \N, \NN or \NNN in octal; Postgres keeps the low 8 bits of \400 to \777. A zero byte
    // is left out: Postgres refuses it as invalid in the server encoding.
    let octal = (1u32..=3)
        .prop_flat_map(|n| (1u32..8u32.pow(n), Just(n)))
        // A zero byte (\400 too) becomes \401 and so on: never rejected, never NUL.
        .prop_map(|(v, n)| if v & 0xff == 0 { (v + 1, n) } else { (v, n) })
        .prop_map(|(v, n)| Piece {
            text: format!("\\{v:0w$o}", w = n as usize).into_bytes(),
            bytes: vec![(v & 0xff) as u8],
            open: (n < 3).then_some(is_octal as fn(u8) -> bool),
        });
    // \xH or \xHH, either case.
    let hex = (
        (1u32..=2).prop_flat_map(|n| (1u32..16u32.pow(n), Just(n))),
        any::<bool>(),
    )
        .prop_map(|((v, n), upper)| {
            let w = n as usize;
            let digits = if upper {
                format!("{v:0w$X}")
            } else {
                format!("{v:0w$x}")
            };
            Piece {
                text: format!("\\x{digits}").into_bytes(),
                bytes: vec![v as u8],
                open: (n < 2).then_some(is_hex as fn(u8) -> bool),
            }
        });
    // A backslash before any other character stands for that character: the delimiter
    // (tab), a carriage return, '.', 'N', non-ASCII... (`\x` with no hex digit is `bare_x`.)
    let other = proptest::sample::select(
        (1u8..=255)
            .filter(|b| {
                !matches!(
                    b,
                    b'\n' | b'b' | b'f' | b'n' | b'r' | b't' | b'v' | b'x' | b'\\'
                ) && !is_octal(*b)
            })
            .collect::<Vec<u8>>(),
    )
    .prop_map(|b| Piece {
        text: vec![b'\\', b],
        bytes: vec![b],
        open: None,
    });
    let bare_x = Just(Piece {
        text: b"\\x".to_vec(),
        bytes: b"x".to_vec(),
        open: Some(is_hex),
    });
    prop_oneof![4 => plain, 2 => letter, 2 => octal, 2 => hex, 2 => other, 1 => bare_x]
}

/// A field written with escapes: its text and what it must read back as.
fn escaped_field() -> impl Strategy<Value = (Vec<u8>, Option<Vec<u8>>)> {
    vec(piece(), 0..10).prop_map(|pieces| {
        let (mut text, mut bytes) = (Vec::new(), Vec::new());
        let mut open: Option<fn(u8) -> bool> = None;
        for piece in pieces {
            if open.is_some_and(|extends| extends(piece.text[0])) {
                // This piece would be read as more digits of the last one.
                continue;
            }
            text.extend_from_slice(&piece.text);
            bytes.extend_from_slice(&piece.bytes);
            open = piece.open;
        }
        // The whole field `\N` is NULL; anywhere else `\N` is an N.
        let value = (text != b"\\N").then_some(bytes);
        (text, value)
    })
}

proptest! {
    #![proptest_config(fuzz::config(2048))]

    /// What COPY TO writes reads back as the values, through one `Row` reused from line to
    /// line as the backfill does.
    #[test]
    fn copy_to_text_round_trips(rows in rows()) {
        let mut row = Row::default();
        for fields in &rows {
            let line = line_of(fields);
            prop_assert_eq!(&read(&mut row, &line, fields.len()).unwrap(), fields);
        }
    }

    /// Every escape COPY FROM accepts reads as the byte it stands for.
    #[test]
    fn copy_from_escapes_decode(fields in vec(escaped_field(), 1..6)) {
        let mut line = Vec::new();
        for (i, (text, _)) in fields.iter().enumerate() {
            if i > 0 {
                line.push(b'\t');
            }
            line.extend_from_slice(text);
        }
        let expected: Vec<Option<Vec<u8>>> = fields.iter().map(|(_, v)| v.clone()).collect();
        let mut row = Row::default();
        prop_assert_eq!(read(&mut row, &line, fields.len()), Ok(expected));
    }

    #[test]
    fn wrong_field_counts_are_errors(fields in vec(field(), 1..8), other in 0usize..10) {
        // Any count but the right one.
        let expected = if other >= fields.len() { other + 1 } else { other };
        let mut row = Row::default();
        prop_assert_eq!(
            read(&mut row, &line_of(&fields), expected),
            Err(CopyTextError::Fields { found: fields.len(), expected })
        );
    }

    /// A line ending in a backslash that escapes nothing is refused, whatever precedes it.
    #[test]
    fn trailing_backslash_is_an_error(fields in vec(field(), 1..8)) {
        let mut line = line_of(&fields);
        line.push(b'\\');
        let mut row = Row::default();
        prop_assert_eq!(
            read(&mut row, &line, fields.len()),
            Err(CopyTextError::TrailingBackslash)
        );
    }

    /// Arbitrary lines parse or fail, never panic; a line that parses has `expected` fields.
    #[test]
    fn arbitrary_lines_never_panic(
        line in vec(
            prop_oneof![
                2 => any::<u8>(),
                1 => proptest::sample::select(b"\\\tN0x7f".to_vec()),
            ],
            0..64,
        ),
        expected in 0usize..8,
    ) {
        let mut row = Row::default();
        if let Ok(fields) = row.parse(&line, expected) {
            for i in 0..expected {
                let _ = fields.get(i);
            }
            prop_assert_eq!(fields.get(expected), None);
        }
    }
}
