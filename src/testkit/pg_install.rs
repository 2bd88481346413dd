//! The local Postgres installation: where its binaries are, which OS user runs the
//! server, and the initdb template that every [`TestPostgres`](super::TestPostgres) is
//! copied from.

use std::ffi::{CString, OsString};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};

use super::{clear_pg_env, run};

/// The environment variable that names the Postgres bin directory to test against, so the
/// same suite can run on several versions (`PGCACHE_PG_BINDIR=/usr/lib/postgresql/15/bin`).
pub(super) const BINDIR_ENV: &str = "PGCACHE_PG_BINDIR";

/// Binaries a server needs; a directory named by [`BINDIR_ENV`] must hold all of them.
const SERVER_PROGRAMS: [&str; 3] = ["initdb", "pg_ctl", "postgres"];

/// Client programs that talk to a server only over the wire. When the chosen directory lacks
/// one (a server-only package), any other installed version serves: the tests use nothing
/// from them that differs between versions.
const CLIENT_PROGRAMS: [&str; 2] = ["psql", "pg_recvlogical"];

/// Where the Postgres binaries come from, and how they were found (for error messages).
#[derive(Debug, Clone)]
pub(super) struct Bindir {
    pub(super) path: PathBuf,
    from_env: bool,
}

/// The Postgres bin directory: [`BINDIR_ENV`] when set, else `pg_config --bindir`, else the
/// newest `/usr/lib/postgresql/*/bin`.
///
/// # Errors
/// When the variable names something that is not a Postgres bin directory (the message says
/// what is wrong and how to fix it), or nothing was found at all.
pub(super) fn bindir() -> Result<Bindir> {
    static BINDIR: OnceLock<Result<Bindir, String>> = OnceLock::new();
    BINDIR
        .get_or_init(|| {
            resolve_bindir(std::env::var_os(BINDIR_ENV), find_system_bindir)
                .map_err(|err| format!("{err:#}"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// The path of a Postgres binary from [`bindir`].
pub(super) fn bin(name: &str) -> Result<PathBuf> {
    locate(&bindir()?, name, find_system_bindir)
}

fn resolve_bindir(
    from_env: Option<OsString>,
    system: impl FnOnce() -> Option<PathBuf>,
) -> Result<Bindir> {
    let Some(value) = from_env.filter(|value| !value.is_empty()) else {
        return system()
            .map(|path| Bindir {
                path,
                from_env: false,
            })
            .ok_or_else(|| {
                anyhow!(
                    "no Postgres server binaries found (looked in `pg_config --bindir` and \
                     /usr/lib/postgresql/*/bin); install them with \
                     `apt-get install -y postgresql`, or set {BINDIR_ENV} to the directory \
                     that holds initdb, pg_ctl and postgres"
                )
            });
    };
    let given = PathBuf::from(&value);
    let fix = format!(
        "set {BINDIR_ENV} to the directory that holds initdb, pg_ctl and postgres (for \
         example /usr/lib/postgresql/15/bin, or the directory `bash .ci/install-pg18` \
         prints), or unset it to use `pg_config --bindir` or the newest \
         /usr/lib/postgresql/*/bin"
    );
    // Absolute, because the servers run in directories of their own.
    let path = fs::canonicalize(&given).map_err(|err| {
        anyhow!(
            "{BINDIR_ENV}={} does not exist ({err}); {fix}",
            given.display()
        )
    })?;
    if !path.is_dir() {
        bail!("{BINDIR_ENV}={} is not a directory; {fix}", given.display());
    }
    let missing: Vec<&str> = SERVER_PROGRAMS
        .into_iter()
        .filter(|name| !is_executable_file(&path.join(name)))
        .collect();
    if !missing.is_empty() {
        bail!(
            "{BINDIR_ENV}={} is not a Postgres bin directory: it has no executable {}; {fix}",
            given.display(),
            missing.join(", ")
        );
    }
    Ok(Bindir {
        path,
        from_env: true,
    })
}

fn locate(
    bindir: &Bindir,
    name: &str,
    system: impl FnOnce() -> Option<PathBuf>,
) -> Result<PathBuf> {
    let path = bindir.path.join(name);
    if is_executable_file(&path) {
        return Ok(path);
    }
    if CLIENT_PROGRAMS.contains(&name) {
        let elsewhere = system()
            .map(|dir| dir.join(name))
            .filter(|path| is_executable_file(path))
            .or_else(|| super::find_on_path(name).filter(|path| is_executable_file(path)));
        if let Some(path) = elsewhere {
            return Ok(path);
        }
    }
    if bindir.from_env {
        bail!(
            "Postgres binary {name:?} not found in {BINDIR_ENV}={}{}; use a Postgres \
             installation that has it, or `apt-get install -y postgresql` for the Debian one",
            bindir.path.display(),
            if CLIENT_PROGRAMS.contains(&name) {
                " nor in the system's Postgres or PATH"
            } else {
                ""
            }
        )
    }
    bail!(
        "Postgres binary {name:?} not found in {} (from `pg_config --bindir` or \
         /usr/lib/postgresql/*/bin); install it with `apt-get install -y postgresql`",
        bindir.path.display()
    )
}

fn is_executable_file(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
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

/// The system's Postgres: `pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`.
fn find_system_bindir() -> Option<PathBuf> {
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
/// It is kept in the temp directory, named after the Postgres version, the bin directory and
/// our uid, so later test runs skip initdb entirely and two installations (say 15 and 18, or
/// two builds of one version) never share one; it is built aside and renamed into place, so
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

/// The server's version (`15.20`, `18.6`), from `initdb --version` run as the server's OS
/// user: that also proves the user may run the binaries, which it may not when they were
/// installed under a private directory such as /root.
fn server_version() -> Result<String> {
    let initdb = bin("initdb")?;
    let mut cmd = server_command_at(&initdb, &tmp_root())?;
    cmd.arg("--version");
    let output = run(&mut cmd, "initdb --version").map_err(|err| {
        let denied = format!("{err:#}").contains("Permission denied");
        match server_user() {
            Ok(Some(_)) if denied => err.context(format!(
                "the `postgres` OS user cannot run {}: install Postgres where that user can \
                 read and execute it, not under /root or another private directory (`bash \
                 .ci/install-pg18` puts Postgres 18 in /opt/pgcache/pg18), or make every \
                 directory on the way readable with `chmod a+rX`",
                initdb.display()
            )),
            _ => err,
        }
    })?;
    Ok(parse_version(&output))
}

/// "initdb (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)": the first number is the version.
fn parse_version(output: &str) -> String {
    output
        .split_whitespace()
        .find(|word| word.starts_with(|c: char| c.is_ascii_digit()))
        .unwrap_or("unknown")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '.')
        .collect()
}

/// A short, stable name for a bin directory.
fn path_tag(path: &Path) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(path.as_os_str().as_encoded_bytes());
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

fn build_template() -> Result<PathBuf> {
    let user = server_user()?;
    let version = server_version()?;
    let tag = path_tag(&bindir()?.path);
    // SAFETY: geteuid cannot fail.
    let owner = user.map_or_else(|| unsafe { libc::geteuid() }, |u| u.uid);
    let final_path = tmp_root().join(format!(
        "pgcache-testkit-template-{version}-{tag}-u{owner}-f{TEMPLATE_FORMAT}"
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory with empty files for `names`, executable or not.
    fn fake_bindir(names: &[&str], mode: u32) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in names {
            let path = dir.path().join(name);
            fs::write(&path, "").expect("write");
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
        }
        dir
    }

    fn from_env(dir: &Path) -> Result<Bindir> {
        resolve_bindir(Some(dir.as_os_str().to_owned()), || {
            panic!("the system's Postgres must not be looked at when the variable is set")
        })
    }

    #[test]
    fn the_variable_wins_and_is_made_absolute() {
        let dir = fake_bindir(&SERVER_PROGRAMS, 0o755);
        let bindir = from_env(dir.path()).expect("a complete bin directory");
        assert!(bindir.from_env);
        assert_eq!(bindir.path, fs::canonicalize(dir.path()).unwrap());
        assert_eq!(
            locate(&bindir, "initdb", || None).unwrap(),
            bindir.path.join("initdb")
        );
    }

    #[test]
    fn an_empty_variable_means_unset() {
        let system = PathBuf::from("/usr/lib/postgresql/15/bin");
        let bindir = resolve_bindir(Some(OsString::new()), || Some(system.clone())).unwrap();
        assert!(!bindir.from_env);
        assert_eq!(bindir.path, system);
        let err = resolve_bindir(None, || None).unwrap_err().to_string();
        assert!(err.contains("apt-get install -y postgresql"), "{err}");
        assert!(err.contains(BINDIR_ENV), "{err}");
    }

    #[test]
    fn a_wrong_directory_is_named_with_the_fix() {
        let missing = Path::new("/nonexistent/pgcache/bin");
        let err = format!("{:#}", from_env(missing).unwrap_err());
        assert!(
            err.contains("PGCACHE_PG_BINDIR=/nonexistent/pgcache/bin does not exist"),
            "{err}"
        );
        assert!(err.contains("unset it"), "{err}");

        let file = fake_bindir(&["initdb"], 0o755);
        let err = format!("{:#}", from_env(&file.path().join("initdb")).unwrap_err());
        assert!(err.contains("is not a directory"), "{err}");

        // A client-only directory (libpq's /usr/bin) and binaries without the x bit.
        let clients = fake_bindir(&["psql", "pg_ctl"], 0o755);
        let err = format!("{:#}", from_env(clients.path()).unwrap_err());
        assert!(err.contains("not a Postgres bin directory"), "{err}");
        assert!(err.contains("no executable initdb, postgres"), "{err}");
        let unexecutable = fake_bindir(&SERVER_PROGRAMS, 0o644);
        let err = format!("{:#}", from_env(unexecutable.path()).unwrap_err());
        assert!(
            err.contains("no executable initdb, pg_ctl, postgres"),
            "{err}"
        );
    }

    #[test]
    fn client_programs_may_come_from_the_system() {
        let server_only = fake_bindir(&SERVER_PROGRAMS, 0o755);
        let system = fake_bindir(&["psql", "pg_recvlogical", "pg_dump"], 0o755);
        let bindir = from_env(server_only.path()).unwrap();
        let system_dir = || Some(system.path().to_path_buf());
        assert_eq!(
            locate(&bindir, "psql", system_dir).unwrap(),
            system.path().join("psql")
        );
        // Anything else must come from the chosen version.
        let err = format!("{:#}", locate(&bindir, "pg_dump", system_dir).unwrap_err());
        assert!(
            err.contains("\"pg_dump\" not found in PGCACHE_PG_BINDIR="),
            "{err}"
        );
    }

    #[test]
    fn versions_and_tags() {
        assert_eq!(
            parse_version("initdb (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)"),
            "15.20"
        );
        assert_eq!(parse_version("initdb (PostgreSQL) 18.6"), "18.6");
        assert_eq!(parse_version("initdb (PostgreSQL) 19beta1"), "19beta1");
        let a = path_tag(Path::new("/usr/lib/postgresql/15/bin"));
        assert_eq!(a, path_tag(Path::new("/usr/lib/postgresql/15/bin")));
        assert_ne!(a, path_tag(Path::new("/opt/pgcache/pg18/bin")));
        assert_eq!(a.len(), 8);
    }
}
