//! pgcache keeps Redis in step with PostgreSQL.
//!
//! # Layout
//! - [`config`]: the TOML file and environment overrides, validated into typed rules.
//! - [`template`]: key templates (`user:profile:{id}`), value escaping, lease keys.
//! - [`encoder`]: the one function that turns a row's Postgres text values into JSON.
//! - [`pgconn`]: ordinary Postgres connections with the pinned session settings and TLS.
//! - [`lsn`]: write-ahead log positions.
//! - [`checkpoint`]: where the daemon's progress lives in Redis.
//! - [`metrics`]: metric names, recorded through the `metrics` facade.
//!
//! Behind the `daemon` feature (on by default), the parts only the daemon needs:
//! - `replication`: the streaming replication protocol client.
//! - `pgoutput`: the pgoutput decoder, a pure function over `Bytes`.
//! - `relations`: the relation cache: stream relation ids resolved against our table rules.
//! - `apply`: turning row changes into Redis commands and applying them with the checkpoint.
//! - `backfill`: the watermark backfill of mirror tables.
//! - `preflight`: server prerequisites, each with the SQL that fixes it.
//! - `daemon`: the run loop that ties them together.
//! - `http`: `/metrics`, `/healthz` and `/readyz`.
//! - `verify`: comparing Redis with Postgres (`pgcache verify`).
//! - `commands`: the command line.
//! - `testkit`: throwaway Postgres and Redis servers for tests and `pgcache demo`.

pub mod checkpoint;
pub mod clock;
pub mod config;
pub mod encoder;
#[cfg(test)]
mod fuzz;
#[cfg(feature = "daemon")]
pub mod health;
#[cfg(feature = "daemon")]
pub mod http;
pub mod lsn;
pub mod metrics;
pub mod pgconn;
pub mod reader;
pub mod sql;
pub mod template;

#[cfg(feature = "daemon")]
pub mod apply;
#[cfg(feature = "daemon")]
pub mod backfill;
#[cfg(feature = "daemon")]
pub mod bench;
#[cfg(feature = "daemon")]
pub mod commands;
#[cfg(feature = "daemon")]
pub mod daemon;
#[cfg(feature = "daemon")]
pub mod demo;
#[cfg(feature = "daemon")]
pub mod pgoutput;
#[cfg(feature = "daemon")]
pub mod preflight;
#[cfg(feature = "daemon")]
pub mod relations;
#[cfg(feature = "daemon")]
pub mod replication;
#[cfg(feature = "daemon")]
pub mod testkit;
#[cfg(feature = "daemon")]
pub mod verify;
#[cfg(feature = "daemon")]
pub mod visibility;

pub use lsn::Lsn;
pub use reader::Reader;
