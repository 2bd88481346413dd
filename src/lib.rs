//! pgcache keeps Redis in step with PostgreSQL: a daemon streams every committed row change
//! into Redis, and a read helper ([`Reader`]) reads Redis first and Postgres on a miss,
//! under a lease that the daemon's changes revoke.
//!
//! # Layout
//! What applications import (always compiled):
//! - [`reader`]: the read helper, [`Reader`]: lookups, leases, fills, stats.
//! - [`config`]: the TOML file and environment overrides, validated into typed rules.
//! - [`template`]: key templates (`user:profile:{id}`), value escaping, lease keys.
//! - [`encoder`]: the one function that turns a row's Postgres text values into JSON, shared
//!   by the stream, the backfill and the reader so their values are byte-identical.
//! - [`pgconn`]: ordinary Postgres connections with the pinned session settings and TLS.
//! - [`checkpoint`]: where the daemon's progress lives in Redis (readers wait on it).
//! - [`sql`], [`lsn`], [`clock`], [`metrics`]: SQL text and catalog queries, WAL positions,
//!   clocks, metric names.
//!
//! Behind the `daemon` feature (on by default):
//! - [`daemon`]: the stream, in flow order: `replication` (the WAL in) → `pgoutput`
//!   (decode) → `relations` (table rules) → `apply` (Redis operations, written with the
//!   checkpoint) ← `visibility` (commits Postgres readers can see); `backfill` beside it;
//!   the run loop ties them together.
//! - [`ops`]: the operator's side: `preflight` checks, `verify`, the HTTP endpoints.
//! - [`commands`]: the command line (`run`, `check`, `status`, `verify`, `resync`, `demo`,
//!   `bench`).
//! - [`demo`], `bench`, `testkit`: the demo, the benchmark, and throwaway Postgres and
//!   Redis servers for both and for the tests.
//!
//! # Features
//! - `daemon` (default): the modules above and the `pgcache` binary; turns on all of the
//!   following.
//! - `tls`: TLS to Postgres (`sslmode`, with rustls) and to Redis (`rediss://`). Without it
//!   `sslmode=prefer` connects in plain text and what demands TLS is refused.
//! - `config-file`: loading the TOML config file (`Config::load`), with `PGCACHE__`
//!   environment overrides.
//! - `metrics`: the reader's counters exported through the `metrics` facade; without it
//!   they are kept in process only ([`Reader::stats`]).
//!
//! An application that only reads uses `default-features = false` and adds what it needs.

// The layout above links the daemon's modules, which a build without it does not have.
#![cfg_attr(not(feature = "daemon"), allow(rustdoc::broken_intra_doc_links))]

pub mod checkpoint;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod encoder;
#[cfg(test)]
mod fuzz;
pub mod lsn;
pub mod metrics;
pub mod pgconn;
pub mod reader;
pub mod sentinel;
pub mod sql;
pub mod template;

#[cfg(feature = "daemon")]
#[doc(hidden)]
pub mod bench;
#[cfg(feature = "daemon")]
pub mod commands;
#[cfg(feature = "daemon")]
pub mod daemon;
#[cfg(feature = "daemon")]
pub mod demo;
#[cfg(feature = "daemon")]
pub mod ops;
#[cfg(feature = "daemon")]
#[doc(hidden)]
pub mod testkit;

pub use lsn::Lsn;
pub use reader::{Reader, ReaderOptions};

/// The crates whose types appear in the reader's API (a pool or connection you pass in, the
/// source of an error), at the versions pgcache is built with: use these to avoid a
/// version mismatch.
pub use {deadpool_postgres, redis, tokio_postgres};
