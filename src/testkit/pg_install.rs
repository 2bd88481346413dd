//! The local Postgres installation: where its binaries are, which OS user runs the
//! server, and the initdb template that every [`TestPostgres`](super::TestPostgres) is
//! copied from.

use std::ffi::CString;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{anyhow, Context, Result};

use super::{clear_pg_env, run};

/// The path of a Postgres binary, from `pg_config --bindir` or else the newest
/// `/usr/lib/postgresql/*/bin`.
pub(super) fn bin(name: &str) -> Result<PathBuf> {
    static BINDIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    let bindir = BINDIR.get_or_init(find_bindir);
    let path = bindir.as_ref().map(|dir| dir.join(name));
    match path {
        Some(path) if path.is_file() => Ok(path),
        _ => Err(anyhow!(
            "Postgres binary {name:?} not found (looked in `pg_config --bindir` and \
             /usr/lib/postgresql/*/bin); install it with `apt-get install -y postgresql`"
        )),
    }
}

/// The OS user the server runs as: initdb and postgres refuse to run as root.
#[derive(Debug, Clone, Copy)]
pub(super) struct ServerUser {
    uid: u32,
    gid: u32,
}

/// The server's OS user: `postgres` when we are root, else nobody in particular (`None`:
/// run as ourselves).
pub(super) fn server_user() -> Result<Option<ServerUser>> {
    static USER: OnceLock<Result<Option<ServerUser>, String>> = OnceLock::new();
    USER.get_or_init(|| {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(None);
        }
        lookup_user("postgres").map(Some).ok_or_else(|| {
            "running as root, but there is no `postgres` OS user to run Postgres as \
             (initdb refuses root); `apt-get install -y postgresql` creates it"
                .to_string()
        })
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

fn lookup_user(name: &str) -> Option<ServerUser> {
    let name = CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: passwd is plain data; getpwnam_r fills it with pointers into `buf`, which
    // outlives the only reads below (uid and gid, which are not pointers).
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(
            name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        );
        (rc == 0 && !result.is_null()).then_some(ServerUser {
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        })
    }
}

/// Temporary directories must be reachable by the `postgres` user when we are root, which a
/// private `TMPDIR` may not be.
pub(super) fn tmp_root() -> PathBuf {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/tmp")
    } else {
        std::env::temp_dir()
    }
}

/// A Postgres binary as a command run as the server's OS user, in `cwd` (a directory that
/// user can enter: initdb and postgres fail when they cannot resolve the current directory).
pub(super) fn server_command(name: &str, cwd: &Path) -> Result<Command> {
    server_command_at(&bin(name)?, cwd)
}

pub(super) fn server_command_at(program: &Path, cwd: &Path) -> Result<Command> {
    let mut cmd = Command::new(program);
    if let Some(user) = server_user()? {
        // std also drops root's supplementary groups when it changes the uid.
        cmd.uid(user.uid).gid(user.gid);
    }
    clear_pg_env(&mut cmd);
    // Stable, English messages: we look for "already in use" in the log.
    cmd.current_dir(cwd).env("LC_ALL", "C").stdin(Stdio::null());
    Ok(cmd)
}

pub(super) fn chown_tree(path: &Path, user: ServerUser) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid))
        .with_context(|| format!("chown {}", path.display()))?;
    let meta = fs::symlink_metadata(path).with_context(|| format!("stat {}", path.display()))?;
    if meta.is_dir() {
        for entry in fs::read_dir(path).with_context(|| format!("listing {}", path.display()))? {
            chown_tree(&entry?.path(), user)?;
        }
    }
    Ok(())
}

fn find_bindir() -> Option<PathBuf> {
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    // libpq-dev's pg_config may point at /usr/bin, which has psql but no server binaries.
    if let Some(dir) = from_pg_config.filter(|dir| dir.join("initdb").is_file()) {
        return Some(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, bin)| bin.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// The initdb result that every server starts from, made at most once per process.
///
/// It is kept in the temp directory, named after the Postgres version and our uid, so
/// later test runs skip initdb entirely; it is built aside and renamed into place, so
/// processes racing to build it never see half of it. Delete it to force a rebuild.
pub(super) fn template() -> Result<PathBuf> {
    static TEMPLATE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    TEMPLATE
        .get_or_init(|| build_template().map_err(|err| format!("{err:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Bump when the initdb arguments change, so an old template is not reused.
const TEMPLATE_FORMAT: u32 = 1;

fn build_template() -> Result<PathBuf> {
    let user = server_user()?;
    let initdb = bin("initdb")?;
    let version = run(Command::new(&initdb).arg("--version"), "initdb --version")?;
    // "initdb (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)": the first number is the version.
    let version: String = version
        .split_whitespace()
        .find(|word| word.starts_with(|c: char| c.is_ascii_digit()))
        .unwrap_or("unknown")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '.')
        .collect();
    // SAFETY: geteuid cannot fail.
    let owner = user.map_or_else(|| unsafe { libc::geteuid() }, |u| u.uid);
    let final_path = tmp_root().join(format!(
        "pgcache-testkit-template-{version}-u{owner}-f{TEMPLATE_FORMAT}"
    ));
    if template_is_usable(&final_path, owner) {
        return Ok(final_path);
    }

    let build = tempfile::Builder::new()
        .prefix("pgcache-testkit-initdb-")
        .tempdir_in(tmp_root())
        .context("creating a directory for initdb")?;
    if let Some(user) = user {
        chown_tree(build.path(), user)?;
    }
    let data = build.path().join("data");
    let mut cmd = server_command("initdb", build.path())?;
    cmd.args([
        "-A",
        "trust",
        "-U",
        "postgres",
        "--no-sync",
        "-E",
        "UTF8",
        "--locale=C",
        "-D",
    ])
    .arg(&data);
    run(&mut cmd, "initdb")?;
    match fs::rename(&data, &final_path) {
        Ok(()) => Ok(final_path),
        // Another process finished first; use its template.
        Err(_) if template_is_usable(&final_path, owner) => Ok(final_path),
        Err(err) => Err(err).with_context(|| {
            format!(
                "moving the initdb template to {} (delete it if it is stale)",
                final_path.display()
            )
        }),
    }
}

/// A template found in the shared temp directory is used only if it is a real, private
/// directory of ours with a complete cluster in it.
fn template_is_usable(path: &Path, owner: u32) -> bool {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return false;
    };
    meta.is_dir()
        && meta.uid() == owner
        && meta.permissions().mode() & 0o077 == 0
        && path.join("PG_VERSION").is_file()
        && path.join("global/pg_control").is_file()
}
