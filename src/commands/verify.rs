//! `pgcache verify`: compare Redis with Postgres.

use std::path::Path;
use std::process::ExitCode;

pub(crate) async fn verify(
    _path: &Path,
    _table: Option<&str>,
    _sample: Option<u64>,
    _json: bool,
) -> ExitCode {
    ExitCode::FAILURE
}
