//! Decoder tests. The fixtures are real Postgres 15 output captured by
//! `tests/fixtures/pgoutput/capture.sh`: one payload per file, named
//! `NN-<step>-MM-<kind>.bin`. Relation and type OIDs are read from the fixtures rather than
//! hard-coded, so a re-capture on another server does not break these tests.

use std::path::PathBuf;

use super::*;

const INT4: u32 = 23;
const INT8: u32 = 20;
const TEXT: u32 = 25;
const VARCHAR: u32 = 1043;
const NUMERIC: u32 = 1700;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pgoutput")
}

/// Every fixture, in capture order, as (file name, payload).
fn fixtures() -> Vec<(String, Bytes)> {
    let mut files: Vec<(String, Bytes)> = std::fs::read_dir(fixture_dir())
        .expect("fixture directory")
        .map(|entry| entry.expect("fixture entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "bin"))
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (
                name,
                Bytes::from(std::fs::read(&path).expect("fixture file")),
            )
        })
        .collect();
    files.sort();
    assert!(files.len() >= 50, "fixtures missing: {}", files.len());
    files
}

/// The decoded messages of one capture step (e.g. "03-update-key"), in order.
fn step(prefix: &str) -> Vec<Message> {
    let messages: Vec<Message> = fixtures()
        .into_iter()
        .filter(|(name, _)| name.starts_with(&format!("{prefix}-")))
        .map(|(name, buf)| decode(buf).unwrap_or_else(|e| panic!("{name}: {e}")))
        .collect();
    assert!(!messages.is_empty(), "no fixtures for step {prefix}");
    messages
}

fn text(value: &str) -> TupleData {
    TupleData::Text(Bytes::copy_from_slice(value.as_bytes()))
}

fn relation_named<'a>(messages: &'a [Message], name: &str) -> &'a Relation {
    messages
        .iter()
        .find_map(|m| match m {
            Message::Relation(r) if r.name == name => Some(r),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no relation {name}"))
}

fn type_named<'a>(messages: &'a [Message], name: &str) -> &'a TypeMessage {
    messages
        .iter()
        .find_map(|m| match m {
            Message::Type(t) if t.name == name => Some(t),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no type {name}"))
}

/// Begin opens and Commit closes the step's transaction with matching LSNs.
fn assert_transaction(messages: &[Message]) -> (Begin, Commit) {
    let begin = messages
        .iter()
        .find_map(|m| match m {
            Message::Begin(b) => Some(b.clone()),
            _ => None,
        })
        .expect("begin");
    let Some(Message::Commit(commit)) = messages.last().cloned() else {
        panic!("step does not end with commit: {:?}", messages.last());
    };
    assert_eq!(begin.final_lsn, commit.commit_lsn);
    assert!(commit.end_lsn > commit.commit_lsn);
    assert_eq!(begin.commit_time, commit.commit_time);
    assert_eq!(commit.flags, 0);
    assert!(begin.xid > 0);
    // Captured after 2020: a sanity check on the epoch and the units.
    assert!(commit.commit_time + PG_EPOCH_UNIX_MICROS > 1_577_836_800_000_000);
    (begin, commit)
}

#[test]
fn every_fixture_decodes_to_the_kind_in_its_name() {
    for (name, buf) in fixtures() {
        let message = decode(buf).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            name.ends_with(&format!("-{}.bin", message.kind())),
            "{name} decoded as {}",
            message.kind()
        );
    }
}

#[test]
fn transactions_are_framed_and_ordered() {
    let mut last_end = Lsn::ZERO;
    for prefix in [
        "01-insert",
        "02-update",
        "03-update-key",
        "04-delete",
        "05-full",
        "06-truncate",
        "07-messages",
        "08-origin",
        "09-binary",
    ] {
        let (begin, commit) = assert_transaction(&step(prefix));
        assert!(begin.final_lsn > last_end, "{prefix} goes backwards");
        last_end = commit.end_lsn;
    }
}

#[test]
fn insert_with_types_nulls_and_a_large_value() {
    let messages = step("01-insert");
    let mood = type_named(&messages, "mood");
    assert_eq!(mood.namespace, "public");
    let mood = mood.id;
    // For a domain, pgoutput sends the domain's OID with its base type's name: the
    // email_addr column arrives as a type named "text" in pg_catalog (empty namespace).
    let email = type_named(&messages, "text");
    assert_eq!(email.namespace, "");
    let email = email.id;
    assert_ne!(email, TEXT);
    let users = relation_named(&messages, "users");
    assert_eq!(users.namespace, "public");
    assert_eq!(users.replica_identity, b'd');
    let names: Vec<&str> = users.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["id", "name", "email", "mood", "bio", "score"]);
    let oids: Vec<u32> = users.columns.iter().map(|c| c.type_oid).collect();
    assert_eq!(oids, [INT4, VARCHAR, email, mood, TEXT, NUMERIC]);
    let keys: Vec<bool> = users.columns.iter().map(Column::is_key).collect();
    assert_eq!(keys, [true, false, false, false, false, false]);
    // varchar(32) and numeric(10,2), as atttypmod encodes them.
    assert_eq!(users.columns[1].type_modifier, 32 + 4);
    assert_eq!(users.columns[5].type_modifier, ((10 << 16) | 2) + 4);
    assert_eq!(users.columns[0].type_modifier, -1);

    let inserts: Vec<&Insert> = messages
        .iter()
        .filter_map(|m| match m {
            Message::Insert(i) => Some(i),
            _ => None,
        })
        .collect();
    assert_eq!(inserts.len(), 2);
    assert!(inserts.iter().all(|i| i.relation_id == users.id));
    let ann = &inserts[0].new.0;
    assert_eq!(
        ann[..4],
        [
            text("1"),
            text("ann"),
            text("ann@example.com"),
            text("happy")
        ]
    );
    assert_eq!(ann[4], text(&"0123456789".repeat(400)));
    assert_eq!(ann[5], text("12.50"));
    let zoe = &inserts[1].new.0;
    assert_eq!(
        zoe,
        &[
            text("2"),
            text("Zoë"),
            TupleData::Null,
            TupleData::Null,
            TupleData::Null,
            TupleData::Null
        ]
    );
}

#[test]
fn column_values_are_slices_of_the_input() {
    let (_, buf) = fixtures()
        .into_iter()
        .find(|(name, _)| name == "01-insert-05-insert.bin")
        .expect("fixture");
    let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
    let Message::Insert(insert) = decode(buf.clone()).unwrap() else {
        panic!("not an insert");
    };
    let TupleData::Text(bio) = &insert.new.0[4] else {
        panic!("bio is not text");
    };
    assert_eq!(bio.len(), 4000);
    assert!(range.contains(&(bio.as_ptr() as usize)), "bio was copied");
}

#[test]
fn update_without_key_change_leaves_toast_unchanged() {
    let messages = step("02-update");
    let users = relation_named(&messages, "users");
    let Some(Message::Update(update)) = messages.iter().find(|m| m.kind() == "update") else {
        panic!("no update");
    };
    assert_eq!(update.relation_id, users.id);
    assert_eq!(update.old, None);
    assert_eq!(
        update.new.0,
        [
            text("1"),
            text("ann b"),
            text("ann@example.com"),
            text("ok"),
            TupleData::Unchanged,
            text("12.50")
        ]
    );
}

#[test]
fn key_change_sends_old_key() {
    let messages = step("03-update-key");
    let Some(Message::Update(update)) = messages.iter().find(|m| m.kind() == "update") else {
        panic!("no update");
    };
    let Some(OldTuple::Key(old)) = &update.old else {
        panic!("expected a 'K' old tuple: {:?}", update.old);
    };
    assert_eq!(old.0[0], text("2"));
    assert!(old.0[1..].iter().all(|v| *v == TupleData::Null));
    assert_eq!(update.new.0[..2], [text("20"), text("Zoë")]);
}

#[test]
fn delete_sends_old_key() {
    let messages = step("04-delete");
    let users = relation_named(&messages, "users");
    let Some(Message::Delete(delete)) = messages.iter().find(|m| m.kind() == "delete") else {
        panic!("no delete");
    };
    assert_eq!(delete.relation_id, users.id);
    assert!(matches!(delete.old, OldTuple::Key(_)));
    assert_eq!(delete.old.tuple().0.len(), 6);
    assert_eq!(delete.old.tuple().0[0], text("20"));
}

#[test]
fn replica_identity_full_sends_whole_old_rows() {
    let messages = step("05-full");
    let audit = relation_named(&messages, "audit");
    assert_eq!(audit.replica_identity, b'f');
    assert!(audit.columns.iter().all(Column::is_key));
    let oids: Vec<u32> = audit.columns.iter().map(|c| c.type_oid).collect();
    assert_eq!(oids, [INT8, TEXT, INT4]);

    let Some(Message::Update(update)) = messages.iter().find(|m| m.kind() == "update") else {
        panic!("no update");
    };
    assert_eq!(update.relation_id, audit.id);
    assert_eq!(
        update.old,
        Some(OldTuple::Full(Tuple(vec![
            text("1"),
            text("first"),
            text("100")
        ])))
    );
    assert_eq!(update.new.0, [text("1"), text("first"), text("200")]);

    let Some(Message::Delete(delete)) = messages.iter().find(|m| m.kind() == "delete") else {
        panic!("no delete");
    };
    assert_eq!(
        delete.old,
        OldTuple::Full(Tuple(vec![text("1"), text("first"), text("200")]))
    );
}

#[test]
fn truncate_names_both_relations_and_options() {
    let messages = step("06-truncate");
    let users = relation_named(&messages, "users").id;
    let audit = relation_named(&messages, "audit").id;
    let Some(Message::Truncate(truncate)) = messages.iter().find(|m| m.kind() == "truncate") else {
        panic!("no truncate");
    };
    assert_eq!(truncate.options, 1 | 2, "CASCADE and RESTART IDENTITY");
    let mut ids = truncate.relation_ids.clone();
    ids.sort_unstable();
    let mut expected = vec![users, audit];
    expected.sort_unstable();
    assert_eq!(ids, expected);
}

#[test]
fn logical_messages_inside_and_outside_the_transaction() {
    let messages = step("07-messages");
    let Message::Message(now) = &messages[0] else {
        panic!(
            "the non-transactional message should come first: {:?}",
            messages[0]
        );
    };
    assert!(!now.transactional);
    assert_eq!(now.prefix, "pgcache");
    assert_eq!(now.content, Bytes::from_static(b"now"));

    let (begin, _) = assert_transaction(&messages[1..]);
    let inside: Vec<&LogicalMessage> = messages[1..]
        .iter()
        .filter_map(|m| match m {
            Message::Message(lm) => Some(lm),
            _ => None,
        })
        .collect();
    assert_eq!(inside.len(), 2);
    assert!(inside.iter().all(|m| m.transactional));
    assert_eq!(inside[0].prefix, "pgcache");
    assert_eq!(inside[0].content, Bytes::from_static(b"low:1"));
    assert_eq!(inside[1].prefix, "bin");
    assert_eq!(
        inside[1].content,
        Bytes::from_static(b"\xde\xad\xbe\xef\x00\xff")
    );
    assert!(inside[0].lsn < inside[1].lsn);
    assert!(inside[1].lsn < begin.final_lsn);
}

#[test]
fn origin_follows_begin() {
    let messages = step("08-origin");
    let Message::Origin(origin) = &messages[1] else {
        panic!("expected origin after begin: {:?}", messages[1]);
    };
    assert_eq!(origin.name, "upstream");
    assert_eq!(origin.commit_lsn, "0/1234ABCD".parse().unwrap());
}

#[test]
fn binary_values() {
    let messages = step("09-binary");
    let Some(Message::Insert(insert)) = messages.iter().find(|m| m.kind() == "insert") else {
        panic!("no insert");
    };
    assert_eq!(
        insert.new.0,
        [
            TupleData::Binary(Bytes::copy_from_slice(&4i64.to_be_bytes())),
            TupleData::Binary(Bytes::from_static(b"bin")),
            TupleData::Null
        ]
    );
}

#[test]
fn every_truncation_of_every_fixture_is_an_error() {
    for (name, buf) in fixtures() {
        for len in 0..buf.len() {
            let result = decode(buf.slice(..len));
            assert!(result.is_err(), "{name} cut at {len} decoded: {result:?}");
        }
    }
}

#[test]
fn trailing_bytes_are_an_error() {
    for (name, buf) in fixtures() {
        let mut longer = buf.to_vec();
        longer.push(0);
        let err = decode(Bytes::from(longer)).unwrap_err();
        assert!(
            matches!(err, DecodeError::TrailingBytes { len: 1, .. }),
            "{name}: {err}"
        );
    }
}

/// Corrupting any single byte may or may not still decode, but never panics.
#[test]
fn corrupted_bytes_never_panic() {
    for (_, buf) in fixtures().into_iter().filter(|(_, b)| b.len() < 200) {
        for at in 0..buf.len() {
            for value in [0x00, 0x01, 0x7f, 0x80, 0xff, b'n', b't', b'N'] {
                let mut bytes = buf.to_vec();
                bytes[at] = value;
                let _ = decode(Bytes::from(bytes));
            }
        }
    }
}

#[test]
fn empty_and_unknown_tags() {
    assert_eq!(decode(Bytes::new()), Err(DecodeError::Empty));
    assert_eq!(
        decode(Bytes::from_static(b"Z")),
        Err(DecodeError::UnknownTag(b'Z'))
    );
    let err = decode(Bytes::from_static(b"P\0\0\0\x01\x01")).unwrap_err();
    assert!(matches!(err, DecodeError::Unsupported { tag: b'P', .. }));
    assert!(err.to_string().contains("prepare"), "{err}");
}

#[test]
fn strings_must_be_utf8_and_terminated() {
    let bad = Bytes::from_static(b"Y\0\0\x40\0public\0\xff\xfe\0");
    assert_eq!(
        decode(bad),
        Err(DecodeError::BadString {
            what: "type name",
            at: 12
        })
    );
    let open = Bytes::from_static(b"Y\0\0\x40\0public\0mood");
    assert_eq!(
        decode(open),
        Err(DecodeError::UnterminatedString {
            what: "type name",
            at: 12
        })
    );
}

#[test]
fn huge_counts_are_refused_before_allocating() {
    // Relation claiming 65535 columns with none present.
    let relation = Bytes::from_static(b"R\0\0\x40\0public\0t\0d\xff\xff");
    assert!(matches!(
        decode(relation),
        Err(DecodeError::CountTooLarge {
            what: "relation column",
            count: 65535,
            ..
        })
    ));
    // Insert whose tuple claims 65535 columns.
    let insert = Bytes::from_static(b"I\0\0\x40\0N\xff\xfft\0\0\0\x011");
    assert!(matches!(
        decode(insert),
        Err(DecodeError::CountTooLarge {
            what: "tuple column",
            ..
        })
    ));
    // Truncate claiming 4 billion relations.
    let truncate = Bytes::from_static(b"T\xff\xff\xff\xff\x00\0\0\x40\0");
    assert!(matches!(
        decode(truncate),
        Err(DecodeError::CountTooLarge {
            what: "truncate relation",
            count: 4_294_967_295,
            ..
        })
    ));
}

#[test]
fn bad_lengths_and_markers() {
    let negative = Bytes::from_static(b"I\0\0\x40\0N\0\x01t\xff\xff\xff\xff");
    assert!(matches!(
        decode(negative),
        Err(DecodeError::NegativeLength { len: -1, .. })
    ));
    let too_long = Bytes::from_static(b"I\0\0\x40\0N\0\x01t\0\0\0\x09abc");
    assert!(matches!(
        decode(too_long),
        Err(DecodeError::Truncated {
            needed: 9,
            available: 3,
            ..
        })
    ));
    let marker = Bytes::from_static(b"I\0\0\x40\0X\0\0");
    assert!(matches!(
        decode(marker),
        Err(DecodeError::UnexpectedPart { found: b'X', .. })
    ));
    let kind = Bytes::from_static(b"D\0\0\x40\0K\0\x01q");
    assert!(matches!(
        decode(kind),
        Err(DecodeError::UnexpectedPart {
            what: "tuple column kind",
            found: b'q',
            ..
        })
    ));
    // An update with an old tuple must still mark the new one.
    let update = Bytes::from_static(b"U\0\0\x40\0O\0\x01nK\0\x01n");
    assert!(matches!(
        decode(update),
        Err(DecodeError::UnexpectedPart {
            what: "update new tuple marker",
            ..
        })
    ));
}

#[test]
fn errors_name_the_problem() {
    let err = decode(Bytes::from_static(b"B\0\0")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "pgoutput message truncated: begin final_lsn at byte 1 needs 8 bytes, 2 left"
    );
}

/// The stream messages of protocol version 2, byte for byte as the docs lay them out.
#[test]
fn stream_control_messages() {
    assert_eq!(
        decode(Bytes::from_static(b"S\0\0\x02\x0a\x01")),
        Ok(Message::StreamStart(StreamStart {
            xid: 522,
            first_segment: true
        }))
    );
    assert_eq!(
        decode(Bytes::from_static(b"S\0\0\x02\x0a\0")),
        Ok(Message::StreamStart(StreamStart {
            xid: 522,
            first_segment: false
        }))
    );
    assert_eq!(decode(Bytes::from_static(b"E")), Ok(Message::StreamStop));
    let mut commit = b"c\0\0\x02\x0a\0".to_vec();
    commit.extend_from_slice(&0x0000_0001_0000_0010_u64.to_be_bytes());
    commit.extend_from_slice(&0x0000_0001_0000_0040_u64.to_be_bytes());
    commit.extend_from_slice(&7_i64.to_be_bytes());
    assert_eq!(
        decode(Bytes::from(commit)),
        Ok(Message::StreamCommit(StreamCommit {
            xid: 522,
            flags: 0,
            commit_lsn: Lsn(0x1_0000_0010),
            end_lsn: Lsn(0x1_0000_0040),
            commit_time: 7,
        }))
    );
    let abort = decode(Bytes::from_static(b"A\0\0\x02\x0a\0\0\x02\x0b")).unwrap();
    assert_eq!(
        abort,
        Message::StreamAbort(StreamAbort {
            xid: 522,
            subxid: 523
        })
    );
    let Message::StreamAbort(abort) = abort else {
        unreachable!()
    };
    assert!(!abort.is_top_level());
    assert!(StreamAbort { xid: 1, subxid: 1 }.is_top_level());
    // Protocol version 4's abort LSN and time are not asked for: extra bytes are an error.
    assert!(matches!(
        decode(Bytes::from_static(b"A\0\0\x02\x0a\0\0\x02\x0b\0")),
        Err(DecodeError::TrailingBytes {
            message: "stream abort",
            ..
        })
    ));
}

/// Inside a stream block every change carries its subtransaction's xid after the tag; the
/// same bytes outside one are a different (here: malformed) message.
#[test]
fn streamed_changes_carry_their_xid() {
    // Insert into relation 16384 by subtransaction 523: one text column "7".
    let insert = Bytes::from_static(b"I\0\0\x02\x0b\0\0\x40\0N\0\x01t\0\0\0\x017");
    assert_eq!(
        decode_streamed(insert.clone()),
        Ok(Streamed {
            xid: Some(523),
            message: Message::Insert(Insert {
                relation_id: 16384,
                new: Tuple(vec![text("7")]),
            }),
        })
    );
    assert!(decode(insert).is_err());
    let truncate = Bytes::from_static(b"T\0\0\x02\x0a\0\0\0\x01\0\0\0\x40\0");
    assert_eq!(
        decode_streamed(truncate),
        Ok(Streamed {
            xid: Some(522),
            message: Message::Truncate(Truncate {
                options: 0,
                relation_ids: vec![16384],
            }),
        })
    );
    let relation = Bytes::from_static(
        b"R\0\0\x02\x0a\0\0\x40\0public\0t\0d\0\x01\x01id\0\0\0\0\x17\xff\xff\xff\xff",
    );
    let streamed = decode_streamed(relation).unwrap();
    assert_eq!(streamed.xid, Some(522));
    assert!(
        matches!(streamed.message, Message::Relation(ref r) if r.name == "t" && r.columns[0].type_oid == INT4)
    );
    // Stream Stop carries none.
    assert_eq!(
        decode_streamed(Bytes::from_static(b"E")),
        Ok(Streamed {
            xid: None,
            message: Message::StreamStop
        })
    );
    // A cut xid is named as such.
    assert!(matches!(
        decode_streamed(Bytes::from_static(b"D\0\0")),
        Err(DecodeError::Truncated {
            what: "streamed change xid",
            ..
        })
    ));
}
