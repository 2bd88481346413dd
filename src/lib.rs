//! pgcache keeps Redis in step with PostgreSQL.
//!
//! # Layout
//! - [`config`]: the TOML file and environment overrides, validated into typed rules.
//! - [`template`]: key templates (`user:profile:{id}`), value escaping, lease keys.
//! - [`encoder`]: the one function that turns a row's Postgres text values into JSON.
//! - [`pgconn`]: ordinary Postgres connections with the pinned session settings and TLS.
//! - [`lsn`]: write-ahead log positions.
//!
//! Behind the `daemon` feature (on by default), the parts only the daemon needs:
//! - `replication`: the streaming replication protocol client.
//! - `pgoutput`: the pgoutput decoder, a pure function over `Bytes`.
//! - `apply`: turning row changes into Redis commands and applying them with the checkpoint.
//! - `daemon`: the run loop that ties them together.
//! - `testkit`: throwaway Postgres and Redis servers for tests and `pgcache demo`.

pub mod config;
pub mod encoder;
pub mod lsn;
pub mod pgconn;
pub mod template;

#[cfg(feature = "daemon")]
pub mod pgoutput;
#[cfg(feature = "daemon")]
pub mod replication;
#[cfg(feature = "daemon")]
pub mod testkit;

pub use lsn::Lsn;
