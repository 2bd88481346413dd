//! Property tests of key templates: random templates and random (hostile) column values.
//! No two rows share a key, no value adds a brace, every key starts with its table's
//! literal prefix, and a row's lease key hashes to the row key's Redis Cluster slot.

use proptest::collection::vec;
use proptest::prelude::*;

use super::*;
use crate::fuzz;

/// CRC16-CCITT (XMODEM: polynomial 0x1021, initial value 0, no reflection), the checksum
/// of the Redis Cluster spec's key distribution model.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The cluster slot of a key: only the hash tag is hashed when the key has a `{` followed
/// later by a `}` with at least one byte between the first `{` and the first `}` after it.
fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = match bytes.iter().position(|&b| b == b'{') {
        Some(open) => match bytes[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &bytes[open + 1..open + 1 + len],
            _ => bytes,
        },
        None => bytes,
    };
    crc16(hashed) % 16384
}

#[test]
fn crc16_matches_the_cluster_spec() {
    // The spec's check value, and hash tags as its examples describe them.
    assert_eq!(crc16(b"123456789"), 0x31C3);
    assert_eq!(slot("{user1000}.following"), slot("user1000"));
    assert_eq!(slot("foo{}{bar}"), crc16(b"foo{}{bar}") % 16384);
    assert_eq!(slot("foo{{bar}}zap"), slot("{bar"));
    assert_eq!(slot("foo{bar}{zap}"), slot("bar"));
}

/// Text for literals: letters, digits, separators, `%` and non-ASCII, never a brace (braces
/// are added on purpose, doubled, where a hash tag is wanted).
fn literal(min: usize) -> impl Strategy<Value = String> {
    vec(
        prop_oneof![
            4 => proptest::char::range('a', 'z'),
            1 => proptest::sample::select(vec!['0', '7', '_', '-', '.', '%', '$', 'é', '☃', '\u{85}']),
        ],
        min..min + 6,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

/// Text between two columns: it must hold a byte values never contain (`:` or a space).
fn separator() -> impl Strategy<Value = String> {
    (
        literal(0),
        proptest::sample::select(vec![":", " ", "::", ": "]),
        literal(0),
    )
        .prop_map(|(a, s, b)| format!("{a}{s}{b}"))
}

/// Where a template puts a cluster hash tag.
#[derive(Debug, Clone, Copy)]
enum Tag {
    None,
    /// `{{app}}:` in the literal prefix.
    Prefix,
    /// Around the column at this index: `t:{{{tenant}}}:{id}`.
    Column(usize),
}

/// A template that parse() must accept, as written in the config.
#[derive(Debug, Clone)]
struct Generated {
    source: String,
    columns: usize,
    /// The literal prefix as rendered (doubled braces undone).
    prefix: String,
}

fn template() -> impl Strategy<Value = Generated> {
    (1usize..=4)
        .prop_flat_map(|n| {
            (
                literal(1),
                vec(separator(), n - 1),
                literal(0),
                prop_oneof![
                    Just(Tag::None),
                    Just(Tag::Prefix),
                    (0..n).prop_map(Tag::Column),
                ],
                vec("[a-z_][a-z0-9_$]{0,6}", n),
            )
        })
        .prop_map(|(prefix, separators, suffix, tag, names)| {
            let n = names.len();
            let mut prefix_text = prefix.clone();
            let mut prefix_rendered = prefix;
            if let Tag::Prefix = tag {
                prefix_text = format!("{prefix_text}{{{{app}}}}:");
                prefix_rendered = format!("{prefix_rendered}{{app}}:");
            }
            let mut source = prefix_text;
            for (i, name) in names.iter().enumerate() {
                if i > 0 {
                    source.push_str(&separators[i - 1]);
                }
                // Names are made distinct by their index.
                let column = format!("{{{name}{i}}}");
                if matches!(tag, Tag::Column(c) if c == i) {
                    if i == 0 {
                        prefix_rendered.push('{');
                    }
                    source.push_str(&format!("{{{{{column}}}}}"));
                } else {
                    source.push_str(&column);
                }
            }
            source.push_str(&suffix);
            Generated {
                source,
                columns: n,
                prefix: prefix_rendered,
            }
        })
}

/// Redis key prefixes from the config: empty, plain, carrying a hash tag of their own, or
/// a `{` that opens none.
fn key_prefix() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("app:".to_string()),
        Just("{app}:".to_string()),
        Just("app{".to_string()),
        literal(1),
    ]
}

/// A column's text: bytes that escaping must handle (`%`, `:`, braces, spaces, control
/// characters, broken UTF-8) and any Unicode.
fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(
            prop_oneof![
                2 => proptest::sample::select(b"%:{} \t\n\x00\x7fa1%3A".to_vec()),
                1 => any::<u8>(),
            ],
            0..12,
        ),
        "\\PC{0,8}".prop_map(String::into_bytes),
        any::<String>().prop_map(String::into_bytes),
    ]
}

/// A template with `values` for one row, and a second row that tries to collide with it:
/// text moved across a column boundary together with the separator, or any other values.
fn two_rows() -> impl Strategy<Value = (Generated, String, Vec<Vec<u8>>, Vec<Vec<u8>>)> {
    (template(), key_prefix()).prop_flat_map(|(template, key_prefix)| {
        let n = template.columns;
        (
            Just(template),
            Just(key_prefix),
            vec(value(), n),
            vec(value(), n),
            any::<prop::sample::Index>(),
            any::<prop::sample::Index>(),
            any::<bool>(),
        )
            .prop_map(
                move |(template, key_prefix, a, other, column, cut, forge)| {
                    let mut b = a.clone();
                    let parsed = KeyTemplate::parse(&template.source).unwrap();
                    if forge && n > 1 {
                        // b[i] = a[i] + <the text between the columns> + a[i+1][..k]
                        let i = column.index(n - 1);
                        let between = rendered_between(&parsed, i);
                        let k = cut.index(a[i + 1].len() + 1);
                        b[i].extend_from_slice(between.as_bytes());
                        b[i].extend_from_slice(&a[i + 1][..k]);
                        b[i + 1] = a[i + 1][k..].to_vec();
                    } else {
                        b = other;
                    }
                    (template, key_prefix, a, b)
                },
            )
    })
}

/// The literal text a template renders between column `i` and column `i + 1`.
fn rendered_between(template: &KeyTemplate, i: usize) -> String {
    let mut seen = 0;
    let mut out = String::new();
    for part in &template.parts {
        match part {
            Part::Column(_) => seen += 1,
            Part::Literal(s) if seen == i + 1 => out.push_str(s),
            Part::Literal(_) => {}
        }
    }
    out
}

fn render(template: &KeyTemplate, key_prefix: &str, values: &[Vec<u8>]) -> String {
    let values: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
    template.render(key_prefix, &values)
}

fn braces(s: &str) -> (usize, usize) {
    (s.matches('{').count(), s.matches('}').count())
}

/// The lease key of `key` hashes to its slot. The one exception cannot be named: a key
/// whose first `{` is followed by `}` at once has no hash tag but a `}`, and a hash tag
/// cannot hold a `}`, so no lease key shares its slot. Values never contain braces, so
/// this happens only when every column of a column-only hash tag (`t:{{{tenant}}}:{id}`)
/// is empty.
fn check_lease(key: &str, values: &[Vec<u8>]) -> Result<(), TestCaseError> {
    let lease = lease_key(key);
    prop_assert_ne!(&lease, key);
    let first = key.find('{');
    if first.is_some_and(|at| key[at..].starts_with("{}")) {
        prop_assert!(values.iter().any(Vec::is_empty), "{}", key);
    } else {
        prop_assert_eq!(slot(&lease), slot(key), "{} and {}", key, lease);
    }
    Ok(())
}

proptest! {
    #![proptest_config(fuzz::config(2048))]

    /// Distinct rows get distinct keys, and each key reads back as its row.
    #[test]
    fn distinct_rows_get_distinct_keys((generated, key_prefix, a, b) in two_rows()) {
        let template = KeyTemplate::parse(&generated.source).unwrap();
        let (key_a, key_b) = (render(&template, &key_prefix, &a), render(&template, &key_prefix, &b));
        if a != b {
            prop_assert_ne!(&key_a, &key_b, "rows {:?} and {:?}", a, b);
        }
        prop_assert_eq!(template.parse_key(&key_prefix, &key_a), Some(a));
        prop_assert_eq!(template.parse_key(&key_prefix, &key_b), Some(b));
    }

    /// Values add no brace: a key has exactly the braces of its prefix and template
    /// literals, so no value can open, close or empty a hash tag. Every key starts with the
    /// Redis key prefix and the table's literal prefix.
    #[test]
    fn values_forge_no_structure((generated, key_prefix, a, _) in two_rows()) {
        let template = KeyTemplate::parse(&generated.source).unwrap();
        prop_assert_eq!(template.columns().len(), generated.columns);
        prop_assert_eq!(template.literal_prefix(), generated.prefix.as_str());
        let key = render(&template, &key_prefix, &a);
        let empty = render(&template, &key_prefix, &vec![Vec::new(); generated.columns]);
        prop_assert_eq!(braces(&key), braces(&empty), "{}", key);
        let start = format!("{key_prefix}{}", template.literal_prefix());
        prop_assert!(key.starts_with(&start), "{} does not start with {}", key, start);
    }

    /// The lease key lives in the row key's cluster slot, so the reader's scripts and the
    /// daemon's revocation touch one slot.
    #[test]
    fn lease_keys_share_the_row_slot((generated, key_prefix, a, _) in two_rows()) {
        let template = KeyTemplate::parse(&generated.source).unwrap();
        check_lease(&render(&template, &key_prefix, &a), &a)?;
    }

    /// Any text parses to a template or an error, never a panic; a template that parses
    /// keeps the invariants render, parse_key and lease keys rely on.
    #[test]
    fn arbitrary_templates_parse_or_fail(
        source in vec(
            prop_oneof![
                3 => proptest::sample::select(vec!["{", "}", "{{", "}}", ":", " ", "a", "id", "_", "1", "$", "é", "-"])
                    .prop_map(str::to_string),
                1 => "\\PC",
            ],
            0..16,
        ).prop_map(|pieces| pieces.concat()),
        values in vec(value(), 4),
    ) {
        let Ok(template) = KeyTemplate::parse(&source) else {
            return Ok(());
        };
        prop_assert!(!template.literal_prefix().is_empty());
        prop_assert!(!template.columns().is_empty());
        let values = &values[..template.columns().len().min(4)];
        if values.len() == template.columns().len() {
            let key = render(&template, "p:", values);
            prop_assert_eq!(template.parse_key("p:", &key), Some(values.to_vec()), "{}", key);
            let start = format!("p:{}", template.literal_prefix());
            prop_assert!(key.starts_with(&start), "{} does not start with {}", key, start);
            check_lease(&key, values)?;
        }
    }

    /// parse_key takes any text without panicking, and accepts only keys that render
    /// produces byte for byte.
    #[test]
    fn parse_key_accepts_only_rendered_keys(
        generated in template(),
        key in vec(
            prop_oneof![
                3 => proptest::sample::select(vec!["{", "}", ":", " ", "%", "%3A", "%7B", "%2", "a", "app", "é", "\u{0}"])
                    .prop_map(str::to_string),
                1 => "\\PC{1,3}",
            ],
            0..12,
        ).prop_map(|pieces| pieces.concat()),
    ) {
        let template = KeyTemplate::parse(&generated.source).unwrap();
        // Start most keys with the literal prefix, so the rest is looked at.
        let key = format!("{}{key}", template.literal_prefix());
        if let Some(values) = template.parse_key("", &key) {
            prop_assert_eq!(render(&template, "", &values), key);
        }
    }
}
