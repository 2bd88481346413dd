//! The row encoder on one core: rows encoded to JSON per second.
//!
//! Rows have the shape of a typical table (ids, text, floats, numeric, bool, timestamptz)
//! and, separately, the types with more work per value (JSON, arrays, bytea).
//! `cargo bench --bench encode`.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use pgcache::encoder::{self, EncodeOptions, PgType};

const ROWS: usize = 1_000;

fn typical_rows() -> Vec<Vec<Vec<u8>>> {
    (0..ROWS as u64)
        .map(|id| {
            vec![
                id.to_string().into_bytes(),
                format!("customer {id}").into_bytes(),
                format!("customer{id}@example.com").into_bytes(),
                format!("{}", id as f64 * 0.37).into_bytes(),
                format!("{}.{:02}", id % 1000, id % 100).into_bytes(),
                if id % 3 == 0 {
                    b"t".to_vec()
                } else {
                    b"f".to_vec()
                },
                format!("2026-01-12 13:46:{:02}.123456+00", id % 60).into_bytes(),
            ]
        })
        .collect()
}

fn rich_rows() -> Vec<Vec<Vec<u8>>> {
    (0..ROWS as u64)
        .map(|id| {
            vec![
                id.to_string().into_bytes(),
                format!(r#"{{"sku": "A-{id}", "tags": ["new", "sale"], "price": 12.5}}"#)
                    .into_bytes(),
                format!("{{{id},{},NULL,{}}}", id + 1, id + 2).into_bytes(),
                format!(r#"{{"a b","c\"d",{id}}}"#).into_bytes(),
                b"\\x00ff10a0deadbeef".to_vec(),
                b"P1DT2H3M4.5S".to_vec(),
            ]
        })
        .collect()
}

fn bench_rows(c: &mut Criterion, name: &str, columns: &[(&str, PgType)], rows: &[Vec<Vec<u8>>]) {
    let columns: Vec<(&str, &PgType)> = columns.iter().map(|(n, t)| (*n, t)).collect();
    let opts = EncodeOptions::default();
    let mut out = Vec::with_capacity(512);
    // Every row must encode, or the bench would time the error path.
    for row in rows {
        out.clear();
        encoder::encode_row(
            &mut out,
            &columns,
            row.iter().map(|v| Some(v.as_slice())),
            opts,
        )
        .unwrap_or_else(|e| panic!("bench row did not encode: {e}"));
    }
    let mut group = c.benchmark_group("encode_row");
    group.throughput(Throughput::Elements(rows.len() as u64));
    group.bench_function(name, |b| {
        b.iter(|| {
            for row in rows {
                out.clear();
                let values = row.iter().map(|v| Some(v.as_slice()));
                black_box(encoder::encode_row(&mut out, &columns, values, opts).ok());
            }
        })
    });
    group.finish();
}

fn encode(c: &mut Criterion) {
    let typical = [
        ("id", PgType::Int),
        ("name", PgType::Text),
        ("email", PgType::Text),
        ("score", PgType::Float),
        ("balance", PgType::Numeric),
        ("active", PgType::Bool),
        ("created", PgType::TimestampTz),
    ];
    bench_rows(c, "typical_7_columns", &typical, &typical_rows());
    let rich = [
        ("id", PgType::Int),
        ("attrs", PgType::Json),
        ("ids", PgType::Array(Box::new(PgType::Int))),
        ("labels", PgType::Array(Box::new(PgType::Text))),
        ("blob", PgType::Bytea),
        ("age", PgType::Interval),
    ];
    bench_rows(c, "json_arrays_bytea_interval", &rich, &rich_rows());
}

criterion_group!(benches, encode);
criterion_main!(benches);
