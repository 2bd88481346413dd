//! `Batch` without a server: which operations each change makes, and where the checkpoint
//! goes. The Redis side of the same operations (the apply script) is tested against a real
//! server in `tests/it`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::config::{Format, Mode, TableRule};
use crate::daemon::pgoutput::{Column, Relation, Tuple, TupleData};
use crate::daemon::relations::{table_state, TableState};
use crate::encoder::EncodeOptions;
use crate::template::KeyTemplate;

const INT4: u32 = 23;
const TEXT: u32 = 25;

/// `public.docs (id int4, small int4, body text)`, key `doc:{id}`.
fn docs(mode: Mode, format: Format, ttl: Option<Duration>) -> TableState {
    let rule = Arc::new(TableRule {
        schema: "public".into(),
        name: "docs".into(),
        key: KeyTemplate::parse("doc:{id}").unwrap(),
        columns: None,
        mode,
        ttl,
        format,
        encode: EncodeOptions::default(),
        invalidate: Vec::new(),
    });
    let column = |name: &str, type_oid, flags| Column {
        flags,
        name: name.into(),
        type_oid,
        type_modifier: -1,
    };
    let relation = Relation {
        id: 1,
        namespace: "public".into(),
        name: "docs".into(),
        replica_identity: b'd',
        columns: vec![
            column("id", INT4, 1),
            column("small", INT4, 0),
            column("body", TEXT, 0),
        ],
    };
    let types = [PgType::Int, PgType::Int, PgType::Text];
    table_state(&rule, &relation, &types, "").unwrap()
}

use crate::encoder::PgType;

fn json() -> TableState {
    docs(Mode::Mirror, Format::Json, None)
}

fn text(v: &str) -> TupleData {
    TupleData::Text(Bytes::from(v.to_string()))
}

fn row(id: &str, small: &str, body: TupleData) -> Tuple {
    Tuple(vec![text(id), text(small), body])
}

fn set(key: &str, value: &str) -> Op {
    Op::Set {
        key: key.into(),
        value: value.as_bytes().to_vec(),
        ttl_ms: None,
    }
}

fn del(key: &str) -> Op {
    Op::Del { key: key.into() }
}

fn ops(batch: &mut Batch) -> Vec<Op> {
    batch.prepare(true).map(|p| p.ops).unwrap_or_default()
}

#[test]
fn inserts_updates_and_deletes_per_mode() {
    struct Case {
        mode: Mode,
        expect: fn() -> Vec<Op>,
    }
    let cases = [
        Case {
            mode: Mode::Mirror,
            expect: || {
                vec![
                    set("doc:1", r#"{"id":1,"small":2,"body":"b"}"#),
                    set("doc:1", r#"{"id":1,"small":3,"body":"b"}"#),
                    del("doc:1"),
                ]
            },
        },
        Case {
            mode: Mode::Refresh,
            expect: || {
                vec![
                    Op::SetIfCached {
                        key: "doc:1".into(),
                        value: br#"{"id":1,"small":2,"body":"b"}"#.to_vec(),
                    },
                    Op::SetIfCached {
                        key: "doc:1".into(),
                        value: br#"{"id":1,"small":3,"body":"b"}"#.to_vec(),
                    },
                    del("doc:1"),
                ]
            },
        },
        Case {
            mode: Mode::Invalidate,
            expect: || vec![del("doc:1"), del("doc:1"), del("doc:1")],
        },
    ];
    for case in cases {
        let table = docs(case.mode, Format::Json, None);
        let mut batch = Batch::default();
        batch.insert(&table, &row("1", "2", text("b"))).unwrap();
        batch
            .update(&table, None, &row("1", "3", text("b")))
            .unwrap();
        batch
            .delete(
                &table,
                &OldTuple::Key(Tuple(vec![text("1"), TupleData::Null, TupleData::Null])),
            )
            .unwrap();
        assert_eq!(ops(&mut batch), (case.expect)(), "{:?}", case.mode);
    }
}

#[test]
fn ttls_and_hashes() {
    let table = docs(Mode::Mirror, Format::Json, Some(Duration::from_secs(60)));
    let mut batch = Batch::default();
    batch
        .insert(&table, &row("1", "2", TupleData::Null))
        .unwrap();
    assert_eq!(
        ops(&mut batch),
        vec![Op::Set {
            key: "doc:1".into(),
            value: br#"{"id":1,"small":2,"body":null}"#.to_vec(),
            ttl_ms: Some(60_000)
        }]
    );
    let table = docs(Mode::Refresh, Format::Hash, Some(Duration::from_secs(60)));
    batch
        .insert(&table, &row("1", "2", TupleData::Null))
        .unwrap();
    assert_eq!(
        ops(&mut batch),
        vec![Op::Hash {
            key: "doc:1".into(),
            fields: vec![
                ("id".into(), b"1".to_vec()),
                ("small".into(), b"2".to_vec())
            ],
            ttl_ms: None,
            only_if_cached: true,
        }]
    );
}

#[test]
fn a_key_change_deletes_the_old_key_first() {
    let table = json();
    let mut batch = Batch::default();
    let old = OldTuple::Key(Tuple(vec![text("10"), TupleData::Null, TupleData::Null]));
    batch
        .update(&table, Some(&old), &row("11", "1", text("b")))
        .unwrap();
    assert_eq!(
        ops(&mut batch),
        vec![
            del("doc:10"),
            set("doc:11", r#"{"id":11,"small":1,"body":"b"}"#)
        ]
    );
}

#[test]
fn unchanged_toast_columns_merge_in_redis_from_the_right_base() {
    let table = json();
    let mut batch = Batch::default();
    // Same key: the base is the key itself.
    batch
        .update(&table, None, &row("10", "5", TupleData::Unchanged))
        .unwrap();
    // Key change: the base is the old key, deleted after the merge read it.
    let old = OldTuple::Key(Tuple(vec![text("10"), TupleData::Null, TupleData::Null]));
    batch
        .update(
            &table,
            Some(&old),
            &row("900000", "5", TupleData::Unchanged),
        )
        .unwrap();
    let ops = ops(&mut batch);
    let merge = |op: &Op| match op {
        Op::Merge(m) => (**m).clone(),
        other => panic!("expected a merge, found {other:?}"),
    };
    let first = merge(&ops[0]);
    assert_eq!(
        (first.key.as_str(), first.base.as_str()),
        ("doc:10", "doc:10")
    );
    assert_eq!(
        first.columns,
        vec![
            (br#""id""#.to_vec(), MergeValue::Value(b"10".to_vec())),
            (br#""small""#.to_vec(), MergeValue::Value(b"5".to_vec())),
            (br#""body""#.to_vec(), MergeValue::Unchanged),
        ]
    );
    assert!(!first.only_if_cached);
    assert_eq!(
        first.repair,
        Some(Repair {
            table: "public.docs".into(),
            key: "doc:10".into(),
            key_texts: vec!["10".into()],
        })
    );
    let second = merge(&ops[1]);
    assert_eq!(
        (second.key.as_str(), second.base.as_str()),
        ("doc:900000", "doc:10")
    );
    assert_eq!(ops[2], del("doc:10"));
    assert_eq!(ops.len(), 3);
}

#[test]
fn no_merge_into_a_value_a_backfill_may_not_have_rewritten() {
    let table = json();
    let mut batch = Batch::default();
    batch.set_stale_bases(true);
    batch
        .update(&table, None, &row("10", "5", TupleData::Unchanged))
        .unwrap();
    batch.set_stale_bases(false);
    batch
        .update(&table, None, &row("11", "5", TupleData::Unchanged))
        .unwrap();
    let stale: Vec<bool> = ops(&mut batch)
        .iter()
        .map(|op| match op {
            Op::Merge(m) => m.stale_base,
            other => panic!("expected a merge, found {other:?}"),
        })
        .collect();
    // The first is sent as 'X': the script deletes the key and records the repair.
    assert_eq!(stale, vec![true, false]);
}

#[test]
fn a_full_old_image_needs_no_merge_and_refresh_key_changes_only_delete() {
    let table = json();
    let mut batch = Batch::default();
    let old = OldTuple::Full(row("1", "1", text("old body")));
    batch
        .update(&table, Some(&old), &row("1", "2", TupleData::Unchanged))
        .unwrap();
    assert_eq!(
        ops(&mut batch),
        vec![set("doc:1", r#"{"id":1,"small":2,"body":"old body"}"#)]
    );
    let table = docs(Mode::Refresh, Format::Json, None);
    let old = OldTuple::Key(Tuple(vec![text("1"), TupleData::Null, TupleData::Null]));
    batch
        .update(&table, Some(&old), &row("2", "2", TupleData::Unchanged))
        .unwrap();
    assert_eq!(ops(&mut batch), vec![del("doc:1"), del("doc:2")]);
}

#[test]
fn truncate_drops_the_key_space() {
    let table = json();
    let mut batch = Batch::default();
    batch.truncate(&table);
    assert_eq!(
        ops(&mut batch),
        vec![Op::DropKeySpace {
            key_space: "doc:".into()
        }]
    );
}

#[test]
fn values_that_cannot_be_built_delete_their_key() {
    let table = json();
    let mut batch = Batch::default();
    let err = batch
        .insert(&table, &row("1", "not a number", text("b")))
        .unwrap_err();
    assert_eq!(err.kind(), "encode");
    assert!(err.to_string().contains("doc:1"), "{err}");
    let mut small = Batch::with_max_value(32);
    let err = small
        .insert(&table, &row("2", "1", text("a body longer than the limit")))
        .unwrap_err();
    assert_eq!(err.kind(), "too_large");
    // A key over the limit cannot exist in Redis: nothing is sent for it, not even a DEL,
    // which Redis would refuse by breaking the connection.
    let long_id = "9".repeat(40);
    small
        .insert(&table, &row(&long_id, "1", text("b")))
        .unwrap_or_default();
    small
        .delete(&table, &OldTuple::Full(row(&long_id, "1", text("b"))))
        .unwrap();
    let err = batch
        .insert(&table, &Tuple(vec![TupleData::Null, text("1"), text("b")]))
        .unwrap_err();
    assert_eq!(err.kind(), "no_key");
    assert_eq!(ops(&mut batch), vec![del("doc:1")]);
    assert_eq!(ops(&mut small), vec![del("doc:2")]);
}

#[test]
fn muted_batches_write_only_deletes() {
    let table = json();
    let mut batch = Batch::default();
    batch.set_muted(true);
    batch.insert(&table, &row("1", "2", text("b"))).unwrap();
    batch
        .update(&table, None, &row("1", "3", TupleData::Unchanged))
        .unwrap();
    assert_eq!(ops(&mut batch), vec![del("doc:1"), del("doc:1")]);
}

#[test]
fn the_checkpoint_moves_only_at_commits_and_past_idle_wal() {
    let table = json();
    let mut batch = Batch::default();
    assert!(batch.prepare(false).is_none());
    batch.begin(7);
    batch.insert(&table, &row("1", "2", text("b"))).unwrap();
    // The open transaction is not written unless asked, and then without a position.
    assert!(!batch.has_committed());
    let part = batch.prepare(true).unwrap();
    assert_eq!(
        (part.ops.len(), part.position, part.xids.clone()),
        (1, None, vec![7])
    );
    batch.insert(&table, &row("2", "2", text("b"))).unwrap();
    batch.commit(Lsn(0x100), 0);
    batch.begin(8);
    batch.insert(&table, &row("3", "2", text("b"))).unwrap();
    let committed = batch.prepare(false).unwrap();
    assert_eq!(committed.ops.len(), 1);
    assert_eq!(committed.position, Some(Lsn(0x100)));
    assert_eq!(committed.xids, vec![7]);
    assert_eq!(batch.open_len(), 1);
    batch.commit(Lsn(0x200), 0);
    batch.advance(Lsn(0x180));
    let rest = batch.prepare(false).unwrap();
    assert_eq!(rest.position, Some(Lsn(0x200)));
    assert!(batch.is_idle());
    batch.advance(Lsn(0x300));
    assert_eq!(batch.prepare(false).unwrap().position, Some(Lsn(0x300)));
}

#[test]
fn transactions_without_operations_need_no_visibility_wait_unless_marked() {
    let mut batch = Batch::default();
    batch.begin(1);
    batch.commit(Lsn(1), 0);
    batch.begin(2);
    batch.mark_transaction();
    batch.commit(Lsn(2), 0);
    assert_eq!(batch.prepare(false).unwrap().xids, vec![2]);
}

#[test]
fn bytes_are_counted_and_released() {
    let table = json();
    let mut batch = Batch::default();
    batch.begin(1);
    batch
        .insert(&table, &row("1", "2", text(&"x".repeat(10_000))))
        .unwrap();
    assert!(batch.bytes() > 10_000 && batch.open_bytes() == batch.bytes());
    batch.commit(Lsn(1), 0);
    assert_eq!(batch.open_bytes(), 0);
    batch.prepare(false).unwrap();
    assert_eq!(batch.bytes(), 0);
}

/// `docs` with invalidation rules on `small` (outside the primary key: needs FULL).
fn docs_invalidating(replica_identity: u8) -> Result<TableState, String> {
    let rule = Arc::new(TableRule {
        schema: "public".into(),
        name: "docs".into(),
        key: KeyTemplate::parse("doc:{id}").unwrap(),
        columns: None,
        mode: Mode::Mirror,
        ttl: None,
        format: Format::Json,
        encode: EncodeOptions::default(),
        invalidate: vec![
            crate::config::InvalidateRule::new("list:{small}").unwrap(),
            crate::config::InvalidateRule::new("page:{small}:{id}").unwrap(),
        ],
    });
    let column = |name: &str, type_oid, flags| Column {
        flags,
        name: name.into(),
        type_oid,
        type_modifier: -1,
    };
    let relation = Relation {
        id: 1,
        namespace: "public".into(),
        name: "docs".into(),
        replica_identity,
        columns: vec![
            column("id", INT4, 1),
            column("small", INT4, 0),
            column("body", TEXT, 0),
        ],
    };
    table_state(
        &rule,
        &relation,
        &[PgType::Int, PgType::Int, PgType::Text],
        "app:",
    )
}

#[test]
fn invalidation_keys_go_with_every_change_from_new_and_old_rows() {
    let table = docs_invalidating(b'f').unwrap();
    let mut batch = Batch::default();
    batch.insert(&table, &row("1", "7", text("a"))).unwrap();
    let ops = batch.prepare(true).unwrap().ops;
    assert_eq!(ops[1..], [del("app:list:7"), del("app:page:7:1")]);

    // An update that moves the row: the new row's keys, then the old row's.
    let old = OldTuple::Full(row("1", "7", text("a")));
    batch
        .update(&table, Some(&old), &row("1", "8", text("a")))
        .unwrap();
    let ops = batch.prepare(true).unwrap().ops;
    assert_eq!(
        ops[1..],
        [
            del("app:list:8"),
            del("app:list:7"),
            del("app:page:8:1"),
            del("app:page:7:1")
        ]
    );

    // An update that leaves the template columns alone names each key once.
    let old = OldTuple::Full(row("1", "8", text("a")));
    batch
        .update(&table, Some(&old), &row("1", "8", text("b")))
        .unwrap();
    let ops = batch.prepare(true).unwrap().ops;
    assert_eq!(ops[1..], [del("app:list:8"), del("app:page:8:1")]);

    // A delete renders from the old row; NULL renders no key.
    batch
        .delete(&table, &OldTuple::Full(row("1", "8", text("b"))))
        .unwrap();
    batch
        .delete(
            &table,
            &OldTuple::Full(Tuple(vec![text("2"), TupleData::Null, text("x")])),
        )
        .unwrap();
    let ops = batch.prepare(true).unwrap().ops;
    assert_eq!(
        ops,
        [
            del("app:doc:1"),
            del("app:list:8"),
            del("app:page:8:1"),
            del("app:doc:2")
        ]
    );

    // A value that is not at hand (unchanged TOAST in both images) drops the rule's keys.
    let unknown = Tuple(vec![text("3"), TupleData::Unchanged, text("x")]);
    batch.update(&table, None, &unknown).unwrap();
    let ops = batch.prepare(true).unwrap().ops;
    assert!(ops.contains(&Op::DropMatching {
        patterns: vec![
            "app:list:*".into(),
            "{app:list:*}:pgcache-lease".into(),
            "app:list:*:pgcache-lease".into()
        ]
    }));

    // TRUNCATE drops every key the rules could name.
    batch.truncate(&table);
    let ops = batch.prepare(true).unwrap().ops;
    assert_eq!(ops.len(), 2);
    assert!(matches!(&ops[1], Op::DropMatching { patterns } if patterns.len() == 6));
}

#[test]
fn invalidation_columns_outside_the_replica_identity_stop_the_table() {
    let err = docs_invalidating(b'd').unwrap_err();
    assert!(
        err.contains("\"small\"") && err.contains("REPLICA IDENTITY FULL"),
        "{err}"
    );
}

#[test]
fn operations_queued_before_tagging_starts_get_no_tag() {
    // A refused table's key drop is queued at the start, before the cluster session turns
    // tagging on: every operation still has its tag (none for that drop), so the batch's
    // operations and tags stay in step.
    let mut batch = Batch::default();
    batch.drop_key_space("gone:".to_string());
    batch.tag_changes();
    let tag = ChangeTag {
        commit_lsn: Lsn(0x10),
        change: 1,
    };
    batch.set_tag(Some(tag));
    batch.drop_key_space("t:".to_string());
    let prepared = batch.prepare(true).expect("a batch");
    assert_eq!(prepared.ops.len(), 2);
    assert_eq!(prepared.tags, [None, Some(tag)]);
}

/// A checkpoint field pushed while a transaction is being read (a table's new shape or OID,
/// its `stopped` mark) goes with that transaction's operations, not in a write ahead of
/// them: after a crash in between, the next start would find the shape recorded and never
/// drop or rebuild the keys left in the old one.
#[test]
fn fields_pushed_inside_a_transaction_wait_for_its_operations() {
    let mut batch = Batch::default();
    batch.push_field("before".into(), "1".into());
    batch.begin(7);
    batch.drop_key_space("doc:".into());
    batch.push_field("shape:public.docs".into(), "new".into());
    assert!(
        batch.has_committed(),
        "the field from before the transaction"
    );
    let early = batch.prepare(false).unwrap();
    assert_eq!(early.fields, [("before".to_string(), "1".to_string())]);
    assert!(early.ops.is_empty());
    assert!(!batch.has_committed());
    assert!(
        batch.prepare(false).is_none(),
        "nothing of the open transaction goes ahead of its operations"
    );

    batch.commit(Lsn(0x100), 0);
    let written = batch.prepare(false).unwrap();
    assert_eq!(
        written.ops,
        [Op::DropKeySpace {
            key_space: "doc:".into()
        }]
    );
    assert_eq!(
        written.fields,
        [("shape:public.docs".to_string(), "new".to_string())]
    );
    assert_eq!(written.position, Some(Lsn(0x100)));

    // A transaction too large to hold is written in parts: its fields go with the first.
    batch.begin(8);
    batch.drop_key_space("doc:".into());
    batch.push_field("oid:public.docs".into(), "42".into());
    let part = batch.prepare(true).unwrap();
    assert_eq!(
        part.fields,
        [("oid:public.docs".to_string(), "42".to_string())]
    );
    assert_eq!(part.position, None);

    // A skipped transaction's fields are written with the next write.
    batch.begin(9);
    batch.push_field("stopped".into(), String::new());
    batch.commit_skipped();
    let next = batch.prepare(false).unwrap();
    assert_eq!(next.fields, [("stopped".to_string(), String::new())]);
}

/// A transaction the checkpoint covers is skipped, but its Relation messages are still
/// read, and may stop or reshape a table: the key drop that queues is written with the
/// fields it goes with, not left to wait for a transaction that may never come.
#[test]
fn a_skipped_transactions_schema_operations_go_with_their_fields() {
    let mut batch = Batch::default();
    batch.begin(9);
    batch.drop_key_space("doc:".into());
    batch.push_field("shape:public.docs".into(), "new".into());
    batch.commit_skipped();
    assert!(batch.has_committed());
    let next = batch.prepare(false).unwrap();
    assert_eq!(
        next.ops,
        [Op::DropKeySpace {
            key_space: "doc:".into()
        }]
    );
    assert_eq!(
        next.fields,
        [("shape:public.docs".to_string(), "new".to_string())]
    );
    assert_eq!(next.position, None, "a skipped transaction moves nothing");
    assert!(batch.prepare(true).is_none());
}
