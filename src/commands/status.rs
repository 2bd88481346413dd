//! `pgcache status`.

use std::path::Path;
use std::process::ExitCode;

pub(crate) async fn status(_path: &Path, _json: bool) -> ExitCode {
    ExitCode::FAILURE
}
