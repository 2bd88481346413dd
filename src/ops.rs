//! The operator's side of the daemon: what checks, watches and repairs it.
//!
//! - [`preflight`]: server prerequisites, each finding with the SQL or setting that fixes
//!   it (`pgcache check`, and every start of `pgcache run`).
//! - [`verify`]: comparing Redis with Postgres (`pgcache verify`).
//! - [`http`]: `/metrics`, `/healthz` and `/readyz`.
//! - [`health`]: the liveness and readiness those endpoints report.

pub mod health;
pub mod http;
pub mod preflight;
pub mod verify;
