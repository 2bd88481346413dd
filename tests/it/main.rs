//! The integration tests, all in this one test binary.
//!
//! One binary means one process, so the harness ([`pgcache::testkit`]) runs initdb at most
//! once and every test copies its template, and cargo links one executable instead of one
//! per file. Each file below is one area; add yours as another `mod` line.
//!
//! Run one area with `cargo test --test it <module>`, e.g. `cargo test --test it testkit`.

mod backfill;
mod bench;
mod cdc;
mod cluster;
mod cluster_daemon;
mod cluster_review;
mod cluster_review2;
mod cluster_review3;
mod cluster_review4;
mod cluster_review5;
mod common;
mod control;
mod demo;
mod deploy;
mod edges;
mod failover;
mod faults;
mod heartbeat;
mod ops;
mod protocol;
mod reader;
mod replication;
mod review;
mod rule_changes;
mod security;
mod sentinel;
mod slots;
mod soak;
mod stream;
mod streaming;
mod testkit;
mod versions;
