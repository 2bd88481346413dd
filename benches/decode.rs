//! The pgoutput decoder on one core: rows decoded per second.
//!
//! Messages are built here in the protocol-version-1 layout (PostgreSQL docs, "Logical
//! Replication Message Formats") with the shape of a typical row: seven columns of text
//! output, about 120 bytes. `cargo bench --bench decode`.

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use pgcache::daemon::pgoutput::{self, Message};

/// A row's column values as Postgres prints them.
fn row(id: u64) -> Vec<Vec<u8>> {
    vec![
        id.to_string().into_bytes(),
        format!("customer {id}").into_bytes(),
        format!("customer{id}@example.com").into_bytes(),
        b"3702.59".to_vec(),
        b"123.45".to_vec(),
        b"t".to_vec(),
        b"2026-01-12 13:46:40+00".to_vec(),
    ]
}

fn put_tuple(buf: &mut BytesMut, values: &[Vec<u8>]) {
    buf.put_u16(values.len() as u16);
    for value in values {
        buf.put_u8(b't');
        buf.put_u32(value.len() as u32);
        buf.put_slice(value);
    }
}

fn insert(id: u64) -> Bytes {
    let mut buf = BytesMut::new();
    buf.put_u8(b'I');
    buf.put_u32(16_384);
    buf.put_u8(b'N');
    put_tuple(&mut buf, &row(id));
    buf.freeze()
}

/// An update with the old key (REPLICA IDENTITY DEFAULT, key changed) and the new row.
fn update_with_key(id: u64) -> Bytes {
    let mut buf = BytesMut::new();
    buf.put_u8(b'U');
    buf.put_u32(16_384);
    buf.put_u8(b'K');
    buf.put_u16(7);
    buf.put_u8(b't');
    let key = id.to_string();
    buf.put_u32(key.len() as u32);
    buf.put_slice(key.as_bytes());
    for _ in 1..7 {
        buf.put_u8(b'n');
    }
    buf.put_u8(b'N');
    put_tuple(&mut buf, &row(id + 1));
    buf.freeze()
}

fn begin_and_commit() -> (Bytes, Bytes) {
    let mut begin = BytesMut::new();
    begin.put_u8(b'B');
    begin.put_u64(0x16_B374_D848);
    begin.put_i64(820_000_000_000_000);
    begin.put_u32(7_777);
    let mut commit = BytesMut::new();
    commit.put_u8(b'C');
    commit.put_u8(0);
    commit.put_u64(0x16_B374_D800);
    commit.put_u64(0x16_B374_D848);
    commit.put_i64(820_000_000_000_000);
    (begin.freeze(), commit.freeze())
}

fn decode(c: &mut Criterion) {
    let inserts: Vec<Bytes> = (0..1_000).map(insert).collect();
    let updates: Vec<Bytes> = (0..1_000).map(update_with_key).collect();
    // Every message must decode, or the bench would time the error path.
    for message in inserts.iter().chain(&updates) {
        match pgoutput::decode(message.clone()) {
            Ok(Message::Insert(_) | Message::Update(_)) => {}
            other => panic!("bench message did not decode as a change: {other:?}"),
        }
    }
    let mut group = c.benchmark_group("pgoutput_decode");
    group.throughput(Throughput::Elements(inserts.len() as u64));
    group.bench_function("insert_7_columns", |b| {
        b.iter(|| {
            for message in &inserts {
                black_box(pgoutput::decode(message.clone()).ok());
            }
        })
    });
    group.bench_function("update_with_old_key", |b| {
        b.iter(|| {
            for message in &updates {
                black_box(pgoutput::decode(message.clone()).ok());
            }
        })
    });
    // A single-row transaction, as the stream brings it: three messages per row.
    let (begin, commit) = begin_and_commit();
    group.bench_function("single_row_transaction", |b| {
        b.iter(|| {
            for message in &inserts {
                black_box(pgoutput::decode(begin.clone()).ok());
                black_box(pgoutput::decode(message.clone()).ok());
                black_box(pgoutput::decode(commit.clone()).ok());
            }
        })
    });
    group.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
