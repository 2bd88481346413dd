//! Unit tests for the encoder. Sample inputs are what Postgres 15 prints under the pinned
//! session settings (captured with psql), so these tests pin the stream's text format too.

use super::*;

fn json(ty: &PgType, text: &str) -> String {
    json_opts(ty, text, EncodeOptions::default())
}

fn json_opts(ty: &PgType, text: &str, opts: EncodeOptions) -> String {
    let mut out = Vec::new();
    encode_value(&mut out, ty, text.as_bytes(), opts).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    String::from_utf8(out).unwrap()
}

fn field(ty: &PgType, text: &str) -> String {
    let mut out = Vec::new();
    encode_field(&mut out, ty, text.as_bytes(), EncodeOptions::default()).unwrap();
    String::from_utf8(out).unwrap()
}

fn fails(ty: &PgType, text: &[u8]) -> EncodeError {
    let mut out = b"kept".to_vec();
    let err = encode_value(&mut out, ty, text, EncodeOptions::default()).unwrap_err();
    assert_eq!(out, b"kept", "out must be left unchanged on error");
    err
}

fn array(elem: PgType) -> PgType {
    PgType::Array(Box::new(elem))
}

#[test]
fn maps_builtin_oids() {
    use PgType::*;
    for (oid, ty) in [
        (20, Int),
        (21, Int),
        (23, Int),
        (26, Int),
        (700, Float),
        (701, Float),
        (1700, Numeric),
        (16, Bool),
        (25, Text),
        (1043, Text),
        (1042, Text),
        (19, Text),
        (18, Text),
        (2950, Text),
        (869, Text),
        (650, Text),
        (829, Text),
        (114, Json),
        (3802, Json),
        (1184, TimestampTz),
        (1114, Timestamp),
        (1082, Date),
        (1083, Time),
        (1266, TimeTz),
        (1186, Interval),
        (17, Bytea),
        (790, Other),
        (3904, Other),
        (603, Other),
        (1020, Other),
        (1005, array(Int)),
        (1007, array(Int)),
        (1016, array(Int)),
        (1021, array(Float)),
        (1022, array(Float)),
        (1231, array(Numeric)),
        (1000, array(Bool)),
        (1009, array(Text)),
        (1015, array(Text)),
        (1014, array(Text)),
        (2951, array(Text)),
        (1041, array(Text)),
        (651, array(Text)),
        (1040, array(Text)),
        (199, array(Json)),
        (3807, array(Json)),
        (1185, array(TimestampTz)),
        (1115, array(Timestamp)),
        (1182, array(Date)),
        (1183, array(Time)),
        (1270, array(TimeTz)),
        (1187, array(Interval)),
        (1001, array(Bytea)),
        (1002, array(Text)),
        (1017, array(Other)),
        (3905, array(Other)),
        (6151, array(Other)),
        (271, array(Other)),
    ] {
        assert_eq!(PgType::from_oid(oid), Some(ty), "oid {oid}");
    }
    // User types (enums, domains, citext, their arrays) need resolve().
    assert_eq!(PgType::from_oid(16384), None);
    assert_eq!(PgType::from_oid(0), None);
}

#[test]
fn numbers() {
    assert_eq!(json(&PgType::Int, "42"), "42");
    assert_eq!(
        json(&PgType::Int, "-9223372036854775808"),
        "-9223372036854775808"
    );
    assert_eq!(json(&PgType::Int, "0"), "0");
    for bad in ["", "-", "1.5", "01", "1e5", " 1", "0x1", "NaN"] {
        assert!(
            matches!(
                fails(&PgType::Int, bad.as_bytes()),
                EncodeError::Malformed { .. }
            ),
            "{bad}"
        );
    }

    for (text, want) in [
        ("1e+20", "1e+20"),
        ("0.1", "0.1"),
        ("-0", "-0"),
        ("1.5e-10", "1.5e-10"),
        ("1.2345679e+11", "1.2345679e+11"),
        ("NaN", "\"NaN\""),
        ("Infinity", "\"Infinity\""),
        ("-Infinity", "\"-Infinity\""),
    ] {
        assert_eq!(json(&PgType::Float, text), want);
    }
    assert!(matches!(
        fails(&PgType::Float, b"inf"),
        EncodeError::Malformed { .. }
    ));
    assert!(matches!(
        fails(&PgType::Float, b"1."),
        EncodeError::Malformed { .. }
    ));

    let number = EncodeOptions {
        numeric_as_number: true,
    };
    assert_eq!(json(&PgType::Numeric, "1.50"), "\"1.50\"");
    assert_eq!(json_opts(&PgType::Numeric, "1.50", number), "1.50");
    assert_eq!(
        json_opts(&PgType::Numeric, "0.000000000000000000000000000001", number),
        "0.000000000000000000000000000001"
    );
    for special in ["NaN", "Infinity", "-Infinity"] {
        assert_eq!(
            json_opts(&PgType::Numeric, special, number),
            format!("\"{special}\"")
        );
        assert_eq!(json(&PgType::Numeric, special), format!("\"{special}\""));
    }
    assert!(matches!(
        fails(&PgType::Numeric, b"1,5"),
        EncodeError::Malformed { .. }
    ));
}

#[test]
fn booleans_from_the_stream_and_from_casts() {
    assert_eq!(json(&PgType::Bool, "t"), "true");
    assert_eq!(json(&PgType::Bool, "true"), "true");
    assert_eq!(json(&PgType::Bool, "f"), "false");
    assert_eq!(json(&PgType::Bool, "false"), "false");
    assert!(matches!(
        fails(&PgType::Bool, b"yes"),
        EncodeError::Malformed { .. }
    ));
}

#[test]
fn strings_are_escaped_like_serde_json() {
    let mut all_ascii = String::new();
    for b in 0u8..=127 {
        all_ascii.push(char::from(b));
    }
    for s in [
        all_ascii.as_str(),
        "",
        "plain",
        "é☃𝄞",
        "a\"b\\c/d",
        "\u{2028}",
    ] {
        assert_eq!(
            json(&PgType::Text, s),
            serde_json::to_string(s).unwrap(),
            "{s:?}"
        );
        assert_eq!(json(&PgType::Other, s), serde_json::to_string(s).unwrap());
    }
    assert!(matches!(
        fails(&PgType::Text, b"a\xffb"),
        EncodeError::NotUtf8 { .. }
    ));
    assert_eq!(
        json(&PgType::TimeTz, "03:04:05.5+05:30"),
        "\"03:04:05.5+05:30\""
    );
    assert_eq!(
        json(&PgType::Interval, "P1Y2M3DT4H5M6.5S"),
        "\"P1Y2M3DT4H5M6.5S\""
    );
    assert_eq!(json(&PgType::Interval, "PT0S"), "\"PT0S\"");
}

#[test]
fn json_is_embedded_verbatim() {
    for doc in [
        r#"{"a": 1, "b": [true, null, "x\"y", -1.5e3]}"#,
        "[]",
        "{}",
        "\"s\"",
        "1",
        " [ 1 , { \"k\" : { } } ] ",
        r#"{"\u00e9":"\ud83d\ude00\n"}"#,
    ] {
        assert_eq!(json(&PgType::Json, doc), doc);
        assert_eq!(field(&PgType::Json, doc), doc);
    }
    for bad in [
        "",
        "{",
        "[1,]",
        "{\"a\"}",
        "{\"a\":1,}",
        "tru",
        "[1] 2",
        "\"\\x\"",
        "01",
        "{1:2}",
        "\"a\nb\"",
    ] {
        assert!(
            matches!(
                fails(&PgType::Json, bad.as_bytes()),
                EncodeError::Malformed { .. }
            ),
            "{bad}"
        );
    }
    // Deep nesting must not overflow the stack.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert_eq!(json(&PgType::Json, &deep).len(), deep.len());
    let unbalanced = format!("{}{}", "[".repeat(100_000), "]".repeat(99_999));
    fails(&PgType::Json, unbalanced.as_bytes());
}

#[test]
fn dates_and_times() {
    use PgType::*;
    for (ty, text, want) in [
        (
            TimestampTz,
            "2026-01-02 03:04:05.123456+00",
            "2026-01-02T03:04:05.123456Z",
        ),
        (
            TimestampTz,
            "2026-01-02 03:04:05+00",
            "2026-01-02T03:04:05Z",
        ),
        (
            TimestampTz,
            "1900-01-01 00:00:00+00",
            "1900-01-01T00:00:00Z",
        ),
        (
            TimestampTz,
            "2026-01-02 03:04:05+00:00",
            "2026-01-02T03:04:05Z",
        ),
        (TimestampTz, "infinity", "infinity"),
        (TimestampTz, "-infinity", "-infinity"),
        (
            TimestampTz,
            "0044-03-15 10:00:00+00 BC",
            "0044-03-15 10:00:00+00 BC",
        ),
        (
            TimestampTz,
            "12026-01-02 03:04:05.5+00",
            "12026-01-02 03:04:05.5+00",
        ),
        (Timestamp, "2026-01-02 03:04:05.1", "2026-01-02T03:04:05.1"),
        (Timestamp, "2026-01-02 03:04:05", "2026-01-02T03:04:05"),
        (Timestamp, "-infinity", "-infinity"),
        (Date, "2026-01-02", "2026-01-02"),
        (Date, "0044-03-15 BC", "0044-03-15 BC"),
        (Date, "infinity", "infinity"),
        (Time, "03:04:05.5", "03:04:05.5"),
        (Time, "24:00:00", "24:00:00"),
    ] {
        assert_eq!(json(&ty, text), format!("\"{want}\""), "{ty:?} {text}");
        assert_eq!(field(&ty, text), want, "{ty:?} {text}");
    }
    for (ty, bad) in [
        (TimestampTz, "2026-01-02 03:04:05.123456+05:30"),
        (TimestampTz, "2026-01-02 03:04:05"),
        (TimestampTz, "2026-01-02T03:04:05Z"),
        (Timestamp, "2026-01-02 03:04:05+00"),
        (Timestamp, "2026-01-02 03:04"),
        (Timestamp, "2026-01-02 03:04:05."),
        (Date, "2026-1-2"),
        (Date, "2026-01-02 00:00:00"),
        (Time, "3:04:05"),
        (Time, "03:04:05+00"),
        (Date, "garbage BC"),
    ] {
        let err = fails(&ty, bad.as_bytes());
        assert!(
            matches!(err, EncodeError::Malformed { .. }),
            "{ty:?} {bad}: {err}"
        );
    }
    assert_eq!(
        fails(&TimestampTz, b"yesterday").to_string(),
        "cannot read timestamptz value \"yesterday\""
    );
}

#[test]
fn bytea_as_base64() {
    use base64::engine::general_purpose::STANDARD;
    assert_eq!(
        json(&PgType::Bytea, "\\x0102ff"),
        format!("\"{}\"", STANDARD.encode([1, 2, 255]))
    );
    assert_eq!(json(&PgType::Bytea, "\\x"), "\"\"");
    assert_eq!(json(&PgType::Bytea, "\\xDEADbeef"), "\"3q2+7w==\"");
    assert_eq!(field(&PgType::Bytea, "\\x01"), "AQ==");
    // Escape format, should a connection not pin bytea_output=hex.
    assert_eq!(
        json(&PgType::Bytea, "a\\\\b\\000\\377"),
        format!("\"{}\"", STANDARD.encode(b"a\\b\0\xff"))
    );
    for bad in ["\\x0", "\\x0g", "a\\9", "a\\"] {
        fails(&PgType::Bytea, bad.as_bytes());
    }
    // Longer than one internal chunk, at and around its boundary.
    for n in [767, 768, 769, 2000, 2304] {
        let bytes: Vec<u8> = (0..n).map(|i| (i * 7 % 256) as u8).collect();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            json(&PgType::Bytea, &format!("\\x{hex}")),
            format!("\"{}\"", STANDARD.encode(&bytes)),
            "{n}"
        );
    }
}

#[test]
fn arrays_from_postgres_output() {
    use PgType::*;
    for (ty, text, want) in [
        (array(Int), "{1,2,NULL}", "[1,2,null]"),
        (array(Int), "{{1,2},{3,4}}", "[[1,2],[3,4]]"),
        (array(Int), "{{{1}}}", "[[[1]]]"),
        (array(Int), "{}", "[]"),
        (array(Int), "[0:1]={5,6}", "[5,6]"),
        (array(Int), "[0:1][-2:-2]={{5},{6}}", "[[5],[6]]"),
        (array(Text), "[0:1]={a,b}", r#"["a","b"]"#),
        (
            array(Text),
            r#"{"a,b","NULL","","x\"y\\z"," s ","null",NULL}"#,
            r#"["a,b","NULL","","x\"y\\z"," s ","null",null]"#,
        ),
        (array(Text), "{nUlL,\\NULL}", r#"[null,"NULL"]"#),
        (array(Text), "{é}", r#"["é"]"#),
        (array(Text), "{\"a\nb\",\"a\tb\"}", r#"["a\nb","a\tb"]"#),
        (array(Text), "{ a b , c }", r#"["a b","c"]"#),
        (array(Other), r#"{"(1,2)"}"#, r#"["(1,2)"]"#),
        (array(Bytea), r#"{"\\x01",NULL}"#, r#"["AQ==",null]"#),
        (
            array(Json),
            r#"{"{\"a\": 1}","[1, 2]"}"#,
            r#"[{"a": 1},[1, 2]]"#,
        ),
        (
            array(TimestampTz),
            r#"{"2026-01-02 03:04:05+00"}"#,
            r#"["2026-01-02T03:04:05Z"]"#,
        ),
        (array(Bool), "{t,f,NULL}", "[true,false,null]"),
        (
            array(Float),
            "{NaN,1.5,-Infinity}",
            r#"["NaN",1.5,"-Infinity"]"#,
        ),
        (array(Numeric), "{1.50}", r#"["1.50"]"#),
        // An array of a domain over an array: elements are quoted array literals.
        (array(array(Int)), r#"{"{1,2}","{}"}"#, "[[1,2],[]]"),
    ] {
        let got = json(&ty, text);
        assert_eq!(got, want, "{text}");
        assert!(
            serde_json::from_str::<serde_json::Value>(&got).is_ok(),
            "{got}"
        );
        // Arrays stay JSON in a hash field.
        assert_eq!(field(&ty, text), want);
    }
    let n = EncodeOptions {
        numeric_as_number: true,
    };
    assert_eq!(
        json_opts(&array(Numeric), "{1.50,NaN}", n),
        r#"[1.50,"NaN"]"#
    );
}

#[test]
fn malformed_arrays_are_errors() {
    for bad in [
        "",
        "{",
        "}",
        "{1,}",
        "{,1}",
        "{1 2",
        "{1}x",
        "1,2",
        "{\"a}",
        "{a\"b\"}",
        "[1:2]{1,2}",
        "[a]={1}",
        "{{1},2",
        "{\\",
    ] {
        let err = fails(&array(PgType::Text), bad.as_bytes());
        assert!(
            matches!(err, EncodeError::MalformedArray { .. }),
            "{bad}: {err}"
        );
    }
    let err = fails(&array(PgType::Int), b"{1,x}");
    assert_eq!(err.to_string(), "cannot read integer value \"x\"");
    let deep = format!("{}{}", "{".repeat(1000), "}".repeat(1000));
    fails(&array(PgType::Int), deep.as_bytes());
}

#[test]
fn rows_are_compact_objects_in_column_order() {
    let int = PgType::Int;
    let text = PgType::Text;
    let ts = PgType::TimestampTz;
    let columns = [
        ("id", &int),
        ("user\"name\n", &text),
        ("created_at", &ts),
        ("note", &text),
    ];
    let values: [Option<&[u8]>; 4] = [
        Some(b"42"),
        Some("Zoë".as_bytes()),
        Some(b"2026-01-02 03:04:05.5+00"),
        None,
    ];
    let mut out = Vec::new();
    encode_row(&mut out, &columns, values, EncodeOptions::default()).unwrap();
    let got = String::from_utf8(out).unwrap();
    assert_eq!(
        got,
        r#"{"id":42,"user\"name\n":"Zoë","created_at":"2026-01-02T03:04:05.5Z","note":null}"#
    );
    // Key escaping and compact layout match serde_json.
    let v: serde_json::Value = serde_json::from_str(&got).unwrap();
    let mut map = serde_json::Map::new();
    map.insert("id".into(), 42.into());
    map.insert("user\"name\n".into(), "Zoë".into());
    map.insert("created_at".into(), "2026-01-02T03:04:05.5Z".into());
    map.insert("note".into(), serde_json::Value::Null);
    assert_eq!(v, serde_json::Value::Object(map));

    let mut out = Vec::new();
    encode_row::<&str, &PgType>(&mut out, &[], std::iter::empty(), EncodeOptions::default())
        .unwrap();
    assert_eq!(out, b"{}");
}

#[test]
fn row_errors_name_the_column_and_leave_out_alone() {
    let int = PgType::Int;
    let ts = PgType::TimestampTz;
    let columns = [("id", &int), ("created_at", &ts)];
    let mut out = b"prev".to_vec();
    let err = encode_row(
        &mut out,
        &columns,
        [Some(&b"1"[..]), Some(&b"soon"[..])],
        EncodeOptions::default(),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "column created_at: cannot read timestamptz value \"soon\""
    );
    assert_eq!(out, b"prev");

    let err = encode_row(
        &mut out,
        &columns,
        [Some(&b"1"[..])],
        EncodeOptions::default(),
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "row has 1 values for 2 columns");
    let err = encode_row(
        &mut out,
        &columns,
        [None, None, None, None],
        EncodeOptions::default(),
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "row has 4 values for 2 columns");
    assert_eq!(out, b"prev");
}

#[test]
fn error_messages_shorten_long_values() {
    let long = "x".repeat(1000);
    let msg = fails(&PgType::Int, long.as_bytes()).to_string();
    assert!(msg.len() < 120, "{msg}");
    assert!(msg.contains("..."), "{msg}");
}

#[test]
fn hash_fields_are_raw_strings_or_json() {
    let n = EncodeOptions {
        numeric_as_number: true,
    };
    assert_eq!(field(&PgType::Text, "a \"b\"\n"), "a \"b\"\n");
    assert_eq!(field(&PgType::Int, "7"), "7");
    assert_eq!(field(&PgType::Bool, "t"), "true");
    assert_eq!(field(&PgType::Float, "NaN"), "NaN");
    assert_eq!(field(&PgType::Numeric, "1.50"), "1.50");
    let mut out = Vec::new();
    encode_field(&mut out, &PgType::Numeric, b"1.50", n).unwrap();
    assert_eq!(out, b"1.50");
    assert_eq!(field(&PgType::Interval, "P1D"), "P1D");
}

/// Random input must never panic, and whatever is accepted must be valid JSON.
#[test]
fn random_bytes_never_panic() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x9c);
    let scalars = [
        PgType::Int,
        PgType::Float,
        PgType::Numeric,
        PgType::Bool,
        PgType::Text,
        PgType::Json,
        PgType::TimestampTz,
        PgType::Timestamp,
        PgType::Date,
        PgType::Time,
        PgType::TimeTz,
        PgType::Interval,
        PgType::Bytea,
        PgType::Other,
    ];
    let mut types: Vec<PgType> = scalars.to_vec();
    types.extend(scalars.iter().cloned().map(array));
    types.push(array(array(PgType::Int)));
    // Bytes that matter to some parser, so random input reaches deep paths.
    let alphabet = b"{}[]=:,\"\\ \n\t-+.0123456789eExTtfNULLnul\x00\xff\xc3\xa9aBC";
    let mut out = Vec::new();
    for round in 0..30_000 {
        let len = rng.gen_range(0..24);
        let text: Vec<u8> = if round % 3 == 0 {
            (0..len).map(|_| rng.gen()).collect()
        } else {
            (0..len)
                .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                .collect()
        };
        for ty in &types {
            for opts in [
                EncodeOptions::default(),
                EncodeOptions {
                    numeric_as_number: true,
                },
            ] {
                out.clear();
                if encode_value(&mut out, ty, &text, opts).is_ok() {
                    assert!(
                        serde_json::from_slice::<serde::de::IgnoredAny>(&out).is_ok(),
                        "{ty:?} {:?} gave {:?}",
                        String::from_utf8_lossy(&text),
                        String::from_utf8_lossy(&out)
                    );
                } else {
                    assert!(out.is_empty());
                }
                out.clear();
                let _ = encode_field(&mut out, ty, &text, opts);
            }
        }
    }
}
