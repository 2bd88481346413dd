//! Property tests of config loading: arbitrary text and mutations of a valid config never
//! panic, and a wrong type, an unknown value or an unknown key is reported under its key.

use proptest::collection::vec;
use proptest::prelude::*;

use super::file::is_slot_name;
use super::*;
use crate::fuzz;

/// What a key holds, for choosing a value of another type.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Str,
    Count,
    Bool,
    List,
}

/// One `[section]` (or `[[tables]]` entry) of the valid config: its header, the path its
/// keys are reported under, and its keys with their TOML values.
struct Section {
    header: &'static str,
    path: &'static str,
    keys: &'static [(&'static str, Kind, &'static str)],
}

/// A config that sets every key.
const VALID: &[Section] = &[
    Section {
        header: "[postgres]",
        path: "postgres",
        keys: &[
            ("url", Kind::Str, r#""postgres://pgcache@localhost/app""#),
            ("slot", Kind::Str, r#""pgcache_2""#),
            ("publication", Kind::Str, r#""Cache Pub""#),
            ("recreate_lost_slot", Kind::Bool, "true"),
            ("streaming", Kind::Bool, "false"),
        ],
    },
    Section {
        header: "[redis]",
        path: "redis",
        keys: &[
            ("url", Kind::Str, r#""redis://localhost:6379/2""#),
            ("key_prefix", Kind::Str, r#""app1:""#),
        ],
    },
    Section {
        header: "[apply]",
        path: "apply",
        keys: &[
            ("max_batch_changes", Kind::Count, "500"),
            ("max_transaction_changes", Kind::Count, "7"),
            ("confirm_delay", Kind::Str, r#""1s""#),
        ],
    },
    Section {
        header: "[backfill]",
        path: "backfill",
        keys: &[
            ("chunk_rows", Kind::Count, "100"),
            ("auto", Kind::Bool, "false"),
        ],
    },
    Section {
        header: "[metrics]",
        path: "metrics",
        keys: &[("listen", Kind::Str, r#""127.0.0.1:9187""#)],
    },
    Section {
        header: "[log]",
        path: "log",
        keys: &[
            ("format", Kind::Str, r#""json""#),
            ("level", Kind::Str, r#""info,pgcache=debug""#),
        ],
    },
    Section {
        header: "[[tables]]",
        path: "tables[0]",
        keys: &[
            ("table", Kind::Str, r#""sales.orders""#),
            ("key", Kind::Str, r#""tenant:{tenant_id}:order:{id}""#),
            ("columns", Kind::List, r#"["tenant_id", "id", "total"]"#),
            ("mode", Kind::Str, r#""refresh""#),
            ("ttl", Kind::Str, r#""1h30m""#),
            ("format", Kind::Str, r#""hash""#),
            ("numeric", Kind::Str, r#""number""#),
        ],
    },
    Section {
        header: "[[tables]]",
        path: "tables[1]",
        keys: &[
            ("table", Kind::Str, r#""events""#),
            ("key", Kind::Str, r#""event:{id}""#),
            ("mode", Kind::Str, r#""invalidate""#),
        ],
    },
];

/// The valid config as TOML, with `value` in place of key `at` (section, key) and `extra`
/// lines added to section `extra_at`.
fn render(at: Option<(usize, usize, &str)>, extra: Option<(usize, &str)>) -> String {
    let mut out = String::new();
    for (s, section) in VALID.iter().enumerate() {
        out.push_str(section.header);
        out.push('\n');
        for (k, (key, _, value)) in section.keys.iter().enumerate() {
            let value = match at {
                Some((ats, atk, v)) if (ats, atk) == (s, k) => v,
                _ => value,
            };
            out.push_str(&format!("{key} = {value}\n"));
        }
        if let Some((ats, line)) = extra {
            if ats == s {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// A TOML basic string holding `s`.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A TOML value that is not of `kind` (nor text the key would read as one).
fn wrong_value(kind: Kind) -> BoxedStrategy<String> {
    let number = prop_oneof![
        any::<i32>().prop_map(|n| n.to_string()),
        (-1e6f32..1e6).prop_map(|f| format!("{f:?}")),
        Just("inf".to_string()),
        Just("nan".to_string()),
    ];
    let boolean = any::<bool>().prop_map(|b| b.to_string());
    let table = prop_oneof![
        Just("{ a = 1 }".to_string()),
        Just("{ url = \"x\" }".to_string()),
    ];
    let list = prop_oneof![
        Just("[1, 2]".to_string()),
        Just("[\"a\", \"b\"]".to_string()),
        Just("[[\"a\"]]".to_string()),
    ];
    // No digits, so never a count; "true" and "false" are spoiled rather than rejected.
    let text = "[a-zA-Z %:.-]{0,8}".prop_map(|s: String| {
        if matches!(s.trim(), "true" | "false") {
            toml_string(&format!("{s}!"))
        } else {
            toml_string(&s)
        }
    });
    match kind {
        Kind::Str => prop_oneof![number, boolean, table, list].boxed(),
        Kind::Count => prop_oneof![
            text,
            boolean,
            table,
            list,
            Just("0".to_string()),
            (i64::MIN..0).prop_map(|n| n.to_string()),
            Just("1.5".to_string()),
        ]
        .boxed(),
        Kind::Bool => prop_oneof![text, number, table, list].boxed(),
        Kind::List => prop_oneof![
            number,
            boolean,
            table,
            text,
            Just("[\"id\", 2]".to_string()),
            Just("[\"id\", [\"x\"]]".to_string()),
        ]
        .boxed(),
    }
}

/// A key of the valid config: (section, key) indexes.
fn key_at() -> impl Strategy<Value = (usize, usize)> {
    (0..VALID.len()).prop_flat_map(|s| (Just(s), 0..VALID[s].keys.len()))
}

fn path_of(s: usize, k: usize) -> String {
    format!("{}.{}", VALID[s].path, VALID[s].keys[k].0)
}

/// Some line of the errors starts with `path`: the message names the key before anything
/// else.
fn names(result: Result<Config, ConfigError>, path: &str) -> Result<(), TestCaseError> {
    let err = match result {
        Ok(_) => return Err(TestCaseError::fail(format!("{path}: accepted"))),
        Err(err) => err,
    };
    prop_assert!(
        err.errors().iter().any(|e| e.starts_with(path)),
        "no error names {}: {:?}",
        path,
        err.errors()
    );
    Ok(())
}

/// Pieces of TOML and of this config's vocabulary, for text that gets past the parser.
fn toml_noise() -> impl Strategy<Value = String> {
    vec(
        prop_oneof![
            3 => proptest::sample::select(vec![
                "[postgres]\n", "[redis]\n", "[[tables]]\n", "[log]\n", "[apply]\n", "url = ",
                "table = ", "key = ", "mode = ", "columns = ", "ttl = ", "\"", "\"x\"", "'",
                "\n", " ", "=", "[", "]", "{", "}", ",", ".", "1", "-1", "true", "1979-05-27",
                "\"redis://h\"", "\"postgres://h/d\"", "\"t:{id}\"", "\"1h\"", "#", "\\",
                "tables.", "[tables]\n", "[[postgres]]\n", "= [", "= {", "\u{0}", "é",
            ]).prop_map(str::to_string),
            1 => "\\PC{1,4}",
        ],
        0..40,
    )
    .prop_map(|pieces| pieces.concat())
}

/// A change to a valid config's text: cut a range, insert a piece, or duplicate a line.
#[derive(Debug, Clone)]
enum Mutation {
    Cut(prop::sample::Index, usize),
    Insert(prop::sample::Index, String),
    DuplicateLine(prop::sample::Index),
    SwapLines(prop::sample::Index, prop::sample::Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<prop::sample::Index>(), 1usize..12).prop_map(|(i, n)| Mutation::Cut(i, n)),
        (any::<prop::sample::Index>(), toml_noise()).prop_map(|(i, s)| Mutation::Insert(i, s)),
        any::<prop::sample::Index>().prop_map(Mutation::DuplicateLine),
        (any::<prop::sample::Index>(), any::<prop::sample::Index>())
            .prop_map(|(a, b)| Mutation::SwapLines(a, b)),
    ]
}

fn apply(text: &str, mutation: &Mutation) -> String {
    // Cut and insert at char boundaries, so the text stays a &str.
    let boundaries: Vec<usize> = text
        .char_indices()
        .map(|(i, _)| i)
        .chain([text.len()])
        .collect();
    let mut lines: Vec<&str> = text.lines().collect();
    match mutation {
        Mutation::Cut(at, n) => {
            let from = at.index(boundaries.len());
            let to = (from + n).min(boundaries.len() - 1);
            format!(
                "{}{}",
                &text[..boundaries[from]],
                &text[boundaries[to.max(from)]..]
            )
        }
        Mutation::Insert(at, piece) => {
            let at = boundaries[at.index(boundaries.len())];
            format!("{}{piece}{}", &text[..at], &text[at..])
        }
        Mutation::DuplicateLine(at) => {
            let at = at.index(lines.len());
            lines.insert(at, lines[at]);
            lines.join("\n")
        }
        Mutation::SwapLines(a, b) => {
            let (a, b) = (a.index(lines.len()), b.index(lines.len()));
            lines.swap(a, b);
            lines.join("\n")
        }
    }
}

#[test]
fn the_valid_config_is_valid() {
    let config = Config::from_toml_str(&render(None, None)).unwrap();
    assert_eq!(config.tables.len(), 2);
    assert_eq!(config.backfill.chunk_rows, 100);
}

proptest! {
    #![proptest_config(fuzz::config(1024))]

    #[test]
    fn arbitrary_text_never_panics(text in prop_oneof!["\\PC{0,64}", toml_noise()]) {
        if let Err(err) = Config::from_toml_str(&text) {
            prop_assert!(!err.errors().is_empty());
            prop_assert!(err.errors().iter().all(|e| !e.is_empty()));
        }
    }

    #[test]
    fn mutated_configs_never_panic(mutations in vec(mutation(), 1..4)) {
        let mut text = render(None, None);
        for m in &mutations {
            text = apply(&text, m);
        }
        if let Err(err) = Config::from_toml_str(&text) {
            prop_assert!(!err.errors().is_empty());
            prop_assert!(err.errors().iter().all(|e| !e.is_empty()));
        }
    }

    /// A value of the wrong type is reported under its key.
    #[test]
    fn wrong_types_name_their_key(
        (s, k, value) in key_at().prop_flat_map(|(s, k)| {
            (Just(s), Just(k), wrong_value(VALID[s].keys[k].1))
        }),
    ) {
        let text = render(Some((s, k, &value)), None);
        names(Config::from_toml_str(&text), &path_of(s, k))?;
    }

    /// A string that is none of a closed set of values is reported under its key.
    #[test]
    fn unknown_values_name_their_key(
        (s, k) in prop_oneof![
            Just((0usize, 1usize)), // postgres.slot
            Just((5, 0)),           // log.format
            Just((6, 1)),           // tables[0].key
            Just((6, 3)),           // tables[0].mode
            Just((6, 4)),           // tables[0].ttl
            Just((6, 5)),           // tables[0].format
            Just((6, 6)),           // tables[0].numeric
            Just((2, 2)),           // apply.confirm_delay
            Just((4, 0)),           // metrics.listen
        ],
        value in "[a-zA-Z0-9_ :{}.-]{0,12}",
    ) {
        let accepted: &[&str] = match (s, k) {
            (5, 0) => &["human", "json"],
            (6, 3) => &["mirror", "refresh", "invalidate"],
            (6, 5) => &["json", "hash"],
            (6, 6) => &["string", "number"],
            _ => &[],
        };
        let valid = accepted.contains(&value.as_str())
            || match (s, k) {
                (0, 1) => is_slot_name(&value),
                (6, 1) => KeyTemplate::parse(&value).is_ok(),
                (6, 4) | (2, 2) => {
                    !value.contains(char::is_whitespace)
                        && humantime::parse_duration(&value).is_ok_and(|d| {
                            (s, k) == (2, 2) || d >= Duration::from_millis(1)
                        })
                }
                (4, 0) => value.is_empty() || value.parse::<SocketAddr>().is_ok(),
                _ => false,
            };
        // A value that happens to be valid is spoiled rather than rejected: a space is in no
        // slot, enum, duration or address, and a lone '{' in no template.
        let value = if valid { format!("{value} {{") } else { value };
        let text = render(Some((s, k, &toml_string(&value))), None);
        names(Config::from_toml_str(&text), &path_of(s, k))?;
    }

    /// A key nobody reads is reported with its path.
    #[test]
    fn unknown_keys_are_named(
        s in 0..VALID.len(),
        name in "[a-zA-Z_][a-zA-Z0-9_-]{0,10}",
        value in prop_oneof![Just("1".to_string()), Just("\"x\"".to_string()), Just("true".to_string())],
    ) {
        let known: &[&str] = match VALID[s].path {
            "postgres" => &["url", "url_file", "slot", "publication", "recreate_lost_slot", "streaming"],
            "redis" => &["url", "url_file", "key_prefix", "wait_replicas"],
            "apply" => &[
                "max_batch_changes", "max_transaction_changes", "confirm_delay",
                "max_batch_bytes", "max_transaction_bytes", "max_spool_bytes", "spool_dir",
            ],
            "backfill" => &["chunk_rows", "auto"],
            "metrics" => &["listen"],
            "log" => &["format", "level"],
            _ => &["table", "key", "columns", "mode", "ttl", "format", "numeric"],
        };
        // No known key ends in 'x'.
        let name = if known.contains(&name.as_str()) { format!("{name}x") } else { name };
        let text = render(None, Some((s, &format!("{name} = {value}"))));
        let path = format!("{}.{name}", VALID[s].path);
        let err = Config::from_toml_str(&text).expect_err("an unknown key was accepted");
        let expected = format!("unknown key {path:?}");
        prop_assert!(
            err.errors().contains(&expected),
            "expected {:?} in {:?}", expected, err.errors()
        );
    }

    /// A wrong value from the environment is reported under its key and its variable.
    #[test]
    fn environment_errors_name_key_and_variable(
        (s, k) in prop_oneof![
            Just((2usize, 0usize)), // apply.max_batch_changes
            Just((2, 1)),           // apply.max_transaction_changes
            Just((3, 0)),           // backfill.chunk_rows
            Just((3, 1)),           // backfill.auto
            Just((5, 0)),           // log.format
            Just((0, 1)),           // postgres.slot
            Just((0, 3)),           // postgres.recreate_lost_slot
            Just((0, 4)),           // postgres.streaming
        ],
        value in "[A-Za-z %:.-]{1,8}",
    ) {
        // A value that happens to be valid is spoiled: no count, boolean, format or slot name
        // has a space in it.
        let valid = matches!(value.trim(), "true" | "false" | "human" | "json") || is_slot_name(&value);
        let value = if valid { format!("{value} !") } else { value };
        let path = path_of(s, k);
        let var = format!("PGCACHE__{}", path.replace('.', "__").to_ascii_uppercase());
        let result = Config::from_toml_str_with_env(&render(None, None), [(var.clone(), value)]);
        names(result, &format!("{path} (from {var})"))?;
    }

    /// Any variable under the prefix, with any value, is read or refused without a panic.
    #[test]
    fn arbitrary_environment_never_panics(
        vars in vec(("PGCACHE__[A-Za-z_]{0,12}(__[A-Za-z_]{0,12})?", "\\PC{0,12}"), 0..4),
    ) {
        if let Err(err) = Config::from_toml_str_with_env(&render(None, None), vars) {
            prop_assert!(err.errors().iter().all(|e| !e.is_empty()));
        }
    }
}
