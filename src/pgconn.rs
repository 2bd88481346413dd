//! Ordinary Postgres connections with the pinned session settings and TLS.
//!
//! Every connection pgcache opens (reader, catalog queries, backfill, and the replication
//! connection, which reuses [`PgTarget`] and [`SESSION_SETTINGS`]) pins the settings that
//! change text output, so the stream and the reader produce byte-identical values.
//!
//! `tokio_postgres::Config` only knows `sslmode=disable|prefer|require` and has no
//! `sslrootcert`, so [`PgTarget::parse`] takes those two (and `channel_binding`, to name a bad
//! value clearly) out of the connection string and keeps them itself; TLS is then built here
//! with rustls, following libpq's meaning of each mode and libpq's choice of root
//! certificates (`sslrootcert`, else `~/.postgresql/root.crt`, or `sslrootcert=system`).
//!
//! TLS is the `tls` feature (on with the default `daemon` feature). Without it, connections
//! are plain: `sslmode=prefer` (the default) connects without TLS, as a libpq built without
//! SSL does, and a connection string that demands TLS is refused ([`PgTarget::plain`]).

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::config::Host;

/// Session settings pinned on every connection, because they change how values print as text.
pub const SESSION_SETTINGS: &[(&str, &str)] = &[
    ("DateStyle", "ISO"),
    ("TimeZone", "UTC"),
    ("IntervalStyle", "iso_8601"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
    ("client_encoding", "UTF8"),
];

/// The application name used when the connection string does not set one.
pub const DEFAULT_APPLICATION_NAME: &str = "pgcache";

/// The `options` startup value that pins [`SESSION_SETTINGS`]: `-c DateStyle=ISO -c TimeZone=UTC ...`.
pub fn session_options() -> String {
    SESSION_SETTINGS
        .iter()
        .map(|(name, value)| format!("-c {name}={value}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// How much TLS a connection demands, with libpq's meaning of each `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS if the server offers it (no certificate check), plain otherwise. The libpq default.
    Prefer,
    /// TLS or fail; the certificate is not checked (encryption only).
    Require,
    /// TLS with the certificate chain checked against the root certificates; any host name.
    VerifyCa,
    /// TLS with the chain checked and the certificate valid for the host name.
    VerifyFull,
}

impl SslMode {
    /// The `sslmode` keyword for this mode.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = PgTargetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => return Err(PgTargetError::SslMode(other.to_string())),
        })
    }
}

/// Where `verify-ca` and `verify-full` find the certificates that vouch for the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SslRootCert {
    /// A PEM file (`sslrootcert=/path/to/ca.pem`).
    File(PathBuf),
    /// The operating system's trust store (`sslrootcert=system`).
    System,
}

/// Whether SCRAM binds the login to the TLS channel (`tls-server-end-point`, RFC 5929), so
/// that a man in the middle who terminates TLS cannot relay the login. libpq's
/// `channel_binding` setting, with its values and default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelBinding {
    /// Never bind.
    Disable,
    /// Bind when TLS is on and the server offers `SCRAM-SHA-256-PLUS`. The default.
    Prefer,
    /// Bind or fail: no TLS, a server without `SCRAM-SHA-256-PLUS`, or a login without SCRAM
    /// (trust, password, md5) is refused.
    Require,
}

impl ChannelBinding {
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelBinding::Disable => "disable",
            ChannelBinding::Prefer => "prefer",
            ChannelBinding::Require => "require",
        }
    }
}

impl fmt::Display for ChannelBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ChannelBinding {
    type Err = PgTargetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "disable" => ChannelBinding::Disable,
            "prefer" => ChannelBinding::Prefer,
            "require" => ChannelBinding::Require,
            other => return Err(PgTargetError::ChannelBinding(other.to_string())),
        })
    }
}

/// The settings that pgcache takes out of a connection string and handles itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub ssl_mode: SslMode,
    pub ssl_root_cert: Option<SslRootCert>,
    pub channel_binding: ChannelBinding,
}

/// A connection string that cannot be used, or a TLS setup that cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum PgTargetError {
    #[error("invalid connection string: {0}")]
    Invalid(String),
    #[error("invalid sslmode {0:?}: expected disable, prefer, require, verify-ca or verify-full")]
    SslMode(String),
    #[error("invalid channel_binding {0:?}: expected disable, prefer or require")]
    ChannelBinding(String),
    #[error(
        "sslrootcert=system needs sslmode=verify-full (or no sslmode), not sslmode={0}: with \
         the operating system's roots any public CA vouches for its customers, so the host \
         name must be checked too"
    )]
    SystemRootsNeedVerifyFull(SslMode),
    #[error(
        "channel_binding=require needs TLS, but the connection string says sslmode=disable \
         (use sslmode=require or stricter)"
    )]
    ChannelBindingWithoutTls,
    #[error(
        "channel_binding=require needs TLS, but {0} is a Unix socket, which is never encrypted"
    )]
    ChannelBindingOverUnixSocket(String),
    #[error(
        "sslmode={mode} checks the server's certificate, but no root certificate was given: \
         {}. Set sslrootcert=/path/to/ca.pem in the connection string, or sslrootcert=system \
         to trust the operating system's roots{}",
        match home_file {
            Some(path) => format!("{} does not exist", path.display()),
            None => "there is no home directory to look for ~/.postgresql/root.crt in".into(),
        },
        match home_file {
            Some(path) => format!(", or put the CA certificate at {}", path.display()),
            None => String::new(),
        }
    )]
    NoRootCert {
        mode: SslMode,
        home_file: Option<PathBuf>,
    },
    #[error(
        "sslrootcert=system, but the operating system's trust store gave no certificates{0}; \
         install its CA bundle (apt-get install ca-certificates) or set sslrootcert=/path/to/ca.pem"
    )]
    NoSystemRoots(String),
    #[error(
        "invalid connection string: no user name (write postgres://USER@host/db or user=USER)"
    )]
    NoUser,
    #[error(
        "sslmode={mode} needs a TCP host, but {host} is a Unix socket, which is never encrypted"
    )]
    UnixSocketTls { mode: SslMode, host: String },
    #[error("cannot read sslrootcert {path}: {reason}")]
    RootCert { path: PathBuf, reason: String },
    #[error("sslrootcert {0} holds no PEM certificates")]
    NoRootCerts(PathBuf),
    #[error("cannot build the TLS configuration: {0}")]
    Tls(String),
}

/// An ordinary connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Target(#[from] PgTargetError),
    #[error("cannot connect to {target}: {}", with_causes(source))]
    Postgres {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// An error and its causes, `a: b: c`: tokio-postgres' own text alone says only "error
/// performing TLS handshake" where its cause says which certificate check failed.
fn with_causes(error: &tokio_postgres::Error) -> String {
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(e) = cause {
        let more = e.to_string();
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = e.source();
    }
    text
}

impl ConnectError {
    /// The SQLSTATE the server answered with, if it answered with an error.
    pub fn code(&self) -> Option<&str> {
        match self {
            ConnectError::Postgres { source, .. } => source.code().map(|c| c.code()),
            ConnectError::Target(_) => None,
        }
    }
}

/// A parsed connection target: the `tokio_postgres::Config` plus what it cannot hold (the
/// verify-* ssl modes and the root certificates).
#[derive(Clone)]
pub struct PgTarget {
    /// Everything but the TLS settings, as tokio-postgres parsed it.
    config: tokio_postgres::Config,
    /// Every host of the connection string, in order (libpq's multi-host form:
    /// `postgres://a,b:5433/db` or `host=a,b port=5432,5433`); never empty.
    endpoints: Vec<Endpoint>,
    /// The first host, as text (a Unix socket directory starts with `/`).
    host: String,
    unix_socket: bool,
    port: u16,
    user: String,
    /// libpq defaults the database name to the user name.
    dbname: String,
    ssl_mode: SslMode,
    ssl_root_cert: Option<SslRootCert>,
    channel_binding: ChannelBinding,
}

/// One host of a connection string, with its port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// A name, an IP address, or a Unix socket directory.
    pub host: String,
    pub unix_socket: bool,
    /// The address to connect to instead of resolving `host` (`hostaddr`), if given.
    pub hostaddr: Option<IpAddr>,
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.unix_socket {
            write!(f, "{}:{}", percent_encode(&self.host), self.port)
        } else if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Debug for PgTarget {
    // Debug output ends up in logs: never show the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PgTarget").field(&self.redacted()).finish()
    }
}

impl PgTarget {
    /// Parse a URL (`postgres://user:pass@host:port/db?sslmode=..&sslrootcert=..`) or a libpq
    /// `key=value` string, with one host or several (`postgres://a,b:5433/db`, `host=a,b
    /// port=5432,5433`; see [`endpoints`](Self::endpoints)) and `target_session_attrs`.
    ///
    /// # Errors
    /// [`PgTargetError`] naming what is wrong: syntax, an unknown parameter, an unknown
    /// sslmode, no user name, or TLS demanded over a Unix socket.
    pub fn parse(s: &str) -> Result<PgTarget, PgTargetError> {
        let (mut config, tls) = parse_connection_string(s)?;
        let TlsSettings {
            ssl_mode,
            ssl_root_cert,
            channel_binding,
        } = tls;
        if config.get_hosts().is_empty() {
            config.host("localhost");
        }
        let endpoints = endpoints_of(&config)?;
        let Endpoint {
            host,
            unix_socket,
            port,
            ..
        } = endpoints[0].clone();
        let user = config
            .get_user()
            .filter(|u| !u.is_empty())
            .ok_or(PgTargetError::NoUser)?
            .to_string();
        let dbname = config
            .get_dbname()
            .filter(|d| !d.is_empty())
            .unwrap_or(&user)
            .to_string();
        for endpoint in endpoints.iter().filter(|e| e.unix_socket) {
            if !matches!(ssl_mode, SslMode::Disable | SslMode::Prefer) {
                return Err(PgTargetError::UnixSocketTls {
                    mode: ssl_mode,
                    host: endpoint.host.clone(),
                });
            }
            if channel_binding == ChannelBinding::Require {
                return Err(PgTargetError::ChannelBindingOverUnixSocket(
                    endpoint.host.clone(),
                ));
            }
        }
        Ok(PgTarget {
            config,
            endpoints,
            host,
            unix_socket,
            port,
            user,
            dbname,
            ssl_mode,
            ssl_root_cert,
            channel_binding,
        })
    }

    /// Every host of the connection string, in order, with its port and `hostaddr`.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// Whether the connection string asks for a server that accepts writes
    /// (`target_session_attrs=read-write`): hosts are tried in order until one is not
    /// read-only (a primary, not a standby).
    pub fn wants_read_write(&self) -> bool {
        self.config.get_target_session_attrs()
            == tokio_postgres::config::TargetSessionAttrs::ReadWrite
    }

    /// Whether the connection string asks for a read-only server
    /// (`target_session_attrs=read-only`).
    pub fn wants_read_only(&self) -> bool {
        self.config.get_target_session_attrs()
            == tokio_postgres::config::TargetSessionAttrs::ReadOnly
    }

    /// This target with only `endpoint` as its host, and any session accepted
    /// (`target_session_attrs=any`): to visit every server of a multi-host string.
    pub fn at(&self, endpoint: &Endpoint) -> PgTarget {
        let old = &self.config;
        let mut config = tokio_postgres::Config::new();
        if let Some(user) = old.get_user() {
            config.user(user);
        }
        if let Some(password) = old.get_password() {
            config.password(password);
        }
        if let Some(dbname) = old.get_dbname() {
            config.dbname(dbname);
        }
        if let Some(options) = old.get_options() {
            config.options(options);
        }
        if let Some(name) = old.get_application_name() {
            config.application_name(name);
        }
        if let Some(timeout) = old.get_connect_timeout() {
            config.connect_timeout(*timeout);
        }
        if let Some(timeout) = old.get_tcp_user_timeout() {
            config.tcp_user_timeout(*timeout);
        }
        config.keepalives(old.get_keepalives());
        config.keepalives_idle(old.get_keepalives_idle());
        if let Some(interval) = old.get_keepalives_interval() {
            config.keepalives_interval(interval);
        }
        if let Some(retries) = old.get_keepalives_retries() {
            config.keepalives_retries(retries);
        }
        if endpoint.unix_socket {
            config.host_path(&endpoint.host);
        } else {
            config.host(&endpoint.host);
        }
        if let Some(addr) = endpoint.hostaddr {
            config.hostaddr(addr);
        }
        config.port(endpoint.port);
        PgTarget {
            config,
            endpoints: vec![endpoint.clone()],
            host: endpoint.host.clone(),
            unix_socket: endpoint.unix_socket,
            port: endpoint.port,
            ..self.clone()
        }
    }

    /// The first host: a name, an IP address, or a Unix socket directory.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Whether [`host`](Self::host) is a Unix socket directory.
    pub fn is_unix_socket(&self) -> bool {
        self.unix_socket
    }

    /// The address to connect to instead of resolving the host (`hostaddr`), if given.
    pub fn hostaddr(&self) -> Option<IpAddr> {
        self.config.get_hostaddrs().first().copied()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn password(&self) -> Option<&[u8]> {
        self.config.get_password()
    }

    pub fn dbname(&self) -> &str {
        &self.dbname
    }

    pub fn ssl_mode(&self) -> SslMode {
        self.ssl_mode
    }

    /// `sslrootcert`, if the connection string gives it.
    pub fn ssl_root_cert(&self) -> Option<&SslRootCert> {
        self.ssl_root_cert.as_ref()
    }

    pub fn channel_binding(&self) -> ChannelBinding {
        self.channel_binding
    }

    /// The application name from the connection string, else `pgcache`.
    pub fn application_name(&self) -> &str {
        self.config
            .get_application_name()
            .unwrap_or(DEFAULT_APPLICATION_NAME)
    }

    /// The `connect_timeout` from the connection string, if any.
    pub fn connect_timeout(&self) -> Option<Duration> {
        self.config.get_connect_timeout().copied()
    }

    /// The `options` startup value: the connection string's own options, then the pinned
    /// settings (later `-c` wins, so the pinned ones cannot be overridden by accident).
    pub fn startup_options(&self) -> String {
        match self.config.get_options() {
            Some(own) if !own.trim().is_empty() => format!("{own} {}", session_options()),
            _ => session_options(),
        }
    }

    /// `postgres://user@host:port/db?sslmode=..`: for logs and error messages, never the password.
    /// With several hosts, all of them (`postgres://user@a:5432,b:5432/db?...`), and
    /// `target_session_attrs` when it is not `any`.
    pub fn redacted(&self) -> String {
        let hosts: Vec<String> = self.endpoints.iter().map(Endpoint::to_string).collect();
        let attrs = if self.wants_read_write() {
            "&target_session_attrs=read-write"
        } else if self.wants_read_only() {
            "&target_session_attrs=read-only"
        } else {
            ""
        };
        format!(
            "postgres://{}@{}/{}?sslmode={}{attrs}",
            percent_encode(&self.user),
            hosts.join(","),
            percent_encode(&self.dbname),
            self.ssl_mode
        )
    }

    /// Whether connections go without TLS: `sslmode=disable`, a Unix socket, or, in a build
    /// without the `tls` feature, `sslmode=prefer` (as with a libpq built without SSL).
    ///
    /// # Errors
    /// [`PgTargetError::Tls`] when the target demands TLS (`sslmode=require` or stricter,
    /// `channel_binding=require`) and the build has none.
    pub fn plain(&self) -> Result<bool, PgTargetError> {
        if self.ssl_mode == SslMode::Disable || self.unix_socket {
            return Ok(true);
        }
        if cfg!(feature = "tls") {
            return Ok(false);
        }
        let demand = if self.ssl_mode != SslMode::Prefer {
            format!("sslmode={}", self.ssl_mode)
        } else if self.channel_binding == ChannelBinding::Require {
            "channel_binding=require".to_string()
        } else {
            return Ok(true);
        };
        Err(PgTargetError::Tls(format!(
            "{demand} needs TLS, and this build of pgcache has none: enable its `tls` feature \
             (pgcache = {{ ..., features = [\"tls\"] }}), or connect with sslmode=prefer or \
             disable"
        )))
    }

    /// The tokio-postgres configuration: pinned settings in `options`, the application name,
    /// and the TLS mode mapped onto what tokio-postgres knows (verify-* become `Require`; the
    /// checking itself lives in `tls_config`).
    pub fn tokio_config(&self) -> tokio_postgres::Config {
        let mut config = self.config.clone();
        config.options(self.startup_options());
        config.application_name(self.application_name());
        config.ssl_mode(match self.ssl_mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        });
        config.channel_binding(match self.channel_binding {
            ChannelBinding::Disable => tokio_postgres::config::ChannelBinding::Disable,
            ChannelBinding::Prefer => tokio_postgres::config::ChannelBinding::Prefer,
            ChannelBinding::Require => tokio_postgres::config::ChannelBinding::Require,
        });
        config
    }
}

/// The hosts of a parsed configuration with their ports (one port for all, or one per host,
/// as libpq allows) and `hostaddr`s (none, or one per host).
fn endpoints_of(config: &tokio_postgres::Config) -> Result<Vec<Endpoint>, PgTargetError> {
    let hosts = config.get_hosts();
    let ports = config.get_ports();
    let addrs = config.get_hostaddrs();
    if ports.len() > 1 && ports.len() != hosts.len() {
        return Err(PgTargetError::Invalid(format!(
            "{} hosts but {} ports: give one port for all hosts, or one per host",
            hosts.len(),
            ports.len()
        )));
    }
    if !addrs.is_empty() && addrs.len() != hosts.len() {
        return Err(PgTargetError::Invalid(format!(
            "{} hosts but {} hostaddrs: give one hostaddr per host, or none",
            hosts.len(),
            addrs.len()
        )));
    }
    Ok(hosts
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let (host, unix_socket) = match host {
                Host::Tcp(host) => (host.clone(), false),
                #[cfg(unix)]
                Host::Unix(path) => (path.to_string_lossy().into_owned(), true),
            };
            Endpoint {
                host,
                unix_socket,
                hostaddr: addrs.get(i).copied(),
                port: match ports {
                    [] => 5432,
                    [one] => *one,
                    many => many[i],
                },
            }
        })
        .collect())
}

/// Parse a URL or libpq `key=value` string into what tokio-postgres understands and the TLS
/// settings pgcache handles itself, checking both. Unlike [`PgTarget::parse`] it accepts a
/// string without a user name, so a config can be checked where libpq's defaults apply.
///
/// libpq's rules: `sslmode` defaults to `prefer`, or to `verify-full` with
/// `sslrootcert=system`, which refuses any weaker mode; `channel_binding` defaults to
/// `prefer`, and `require` refuses `sslmode=disable`.
///
/// # Errors
/// [`PgTargetError`] naming the parameter and the problem.
pub fn parse_connection_string(
    s: &str,
) -> Result<(tokio_postgres::Config, TlsSettings), PgTargetError> {
    let (rest, params) = if is_url(s) {
        strip_url_tls_params(s)?
    } else {
        strip_keyword_tls_params(s)?
    };
    let ssl_root_cert = params.sslrootcert.map(|value| match value.as_str() {
        "system" => SslRootCert::System,
        _ => SslRootCert::File(PathBuf::from(value)),
    });
    let ssl_mode = match (params.sslmode, &ssl_root_cert) {
        (Some(mode), Some(SslRootCert::System)) => match mode.parse()? {
            SslMode::VerifyFull => SslMode::VerifyFull,
            weaker => return Err(PgTargetError::SystemRootsNeedVerifyFull(weaker)),
        },
        (Some(mode), _) => mode.parse()?,
        (None, Some(SslRootCert::System)) => SslMode::VerifyFull,
        (None, _) => SslMode::Prefer,
    };
    let channel_binding = match params.channel_binding {
        Some(value) => value.parse()?,
        None => ChannelBinding::Prefer,
    };
    if channel_binding == ChannelBinding::Require && ssl_mode == SslMode::Disable {
        return Err(PgTargetError::ChannelBindingWithoutTls);
    }
    let config = tokio_postgres::Config::from_str(&rest).map_err(|e| {
        // tokio-postgres says "invalid connection string" itself; keep only its cause.
        PgTargetError::Invalid(match std::error::Error::source(&e) {
            Some(cause) => cause.to_string(),
            None => e.to_string(),
        })
    })?;
    Ok((
        config,
        TlsSettings {
            ssl_mode,
            ssl_root_cert,
            channel_binding,
        },
    ))
}

/// A deadpool manager for `target`: every connection pins the session settings of the
/// stream (so values read through it are byte-identical to the daemon's) and uses TLS as
/// the target's `sslmode` says. Shared by the read helper and `verify`.
///
/// # Errors
/// A TLS configuration that cannot be built (an unreadable root certificate, say).
pub fn pool_manager(target: &PgTarget) -> Result<deadpool_postgres::Manager, PgTargetError> {
    let config = target.tokio_config();
    let manager_config = deadpool_postgres::ManagerConfig {
        recycling_method: deadpool_postgres::RecyclingMethod::Fast,
    };
    if target.plain()? {
        return Ok(deadpool_postgres::Manager::from_config(
            config,
            tokio_postgres::NoTls,
            manager_config,
        ));
    }
    #[cfg(feature = "tls")]
    {
        let tls = tls_config(target.ssl_mode(), target.ssl_root_cert())?;
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone());
        Ok(deadpool_postgres::Manager::from_config(
            config,
            tls,
            manager_config,
        ))
    }
    #[cfg(not(feature = "tls"))]
    unreachable!("plain() refuses TLS in a build without the tls feature")
}

/// The primary key columns of a table (by OID), in key order; empty when it has none.
pub async fn primary_key_columns(
    client: &tokio_postgres::Client,
    table_oid: u32,
) -> Result<Vec<String>, tokio_postgres::Error> {
    Ok(client
        .query(
            "SELECT a.attname::text FROM pg_index i \
             CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.n",
            &[&table_oid],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Connect an ordinary tokio-postgres client with TLS per the target's mode and the pinned
/// session settings. The connection task is spawned on the current tokio runtime.
///
/// With `sslmode=prefer` a server that declines TLS gets a plain connection, as with libpq.
///
/// # Errors
/// [`ConnectError::Target`] if the TLS configuration cannot be built (unreadable root
/// certificate), [`ConnectError::Postgres`] for network, TLS, authentication or server errors.
pub async fn connect(target: &PgTarget) -> Result<tokio_postgres::Client, ConnectError> {
    let config = target.tokio_config();
    let postgres_err = |source| ConnectError::Postgres {
        target: target.redacted(),
        source,
    };
    if target.plain()? {
        let (client, connection) = config
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(postgres_err)?;
        spawn_connection(connection, target.redacted());
        return Ok(client);
    }
    #[cfg(feature = "tls")]
    {
        let tls = tls_config(target.ssl_mode, target.ssl_root_cert())?;
        let make_tls = tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone());
        let (client, connection) = config.connect(make_tls).await.map_err(postgres_err)?;
        spawn_connection(connection, target.redacted());
        Ok(client)
    }
    #[cfg(not(feature = "tls"))]
    unreachable!("plain() refuses TLS in a build without the tls feature")
}

fn spawn_connection<S, T>(connection: tokio_postgres::Connection<S, T>, target: String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(target = %target, error = %e, "postgres connection ended with an error");
        }
    });
}

/// Where libpq looks for root certificates when `sslrootcert` is not given.
pub fn default_root_cert_file(home: &Path) -> PathBuf {
    home.join(".postgresql").join("root.crt")
}

/// Which root certificates a verifying mode uses: see `tls_config`.
///
/// # Errors
/// [`PgTargetError::NoRootCert`]: none given and none in the home directory.
pub fn select_root_cert(
    mode: SslMode,
    root_cert: Option<&SslRootCert>,
    home: Option<&Path>,
) -> Result<SslRootCert, PgTargetError> {
    if let Some(root) = root_cert {
        return Ok(root.clone());
    }
    let home_file = home.map(default_root_cert_file);
    match home_file {
        Some(path) if path.exists() => Ok(SslRootCert::File(path)),
        home_file => Err(PgTargetError::NoRootCert { mode, home_file }),
    }
}

/// Replace the password in a postgres or redis URL (or a libpq `password=` keyword) with
/// `***`, for logs. Text that is not recognisably a URL is returned unchanged except for
/// `password=` keywords.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return redact_password_keyword(url);
    };
    let after_scheme = scheme_end + 3;
    let rest = &url[after_scheme..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let mut out = String::with_capacity(url.len());
    out.push_str(&url[..after_scheme]);
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..=colon]);
                    out.push_str("***");
                }
                None => out.push_str(userinfo),
            }
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    // A password can also travel as a query parameter (`?password=...`).
    out.push_str(&redact_query_password(&rest[authority_end..]));
    out
}

fn redact_query_password(tail: &str) -> String {
    let Some(q) = tail.find('?') else {
        return tail.to_string();
    };
    let (path, query) = tail.split_at(q + 1);
    let (query, fragment) = match query.find('#') {
        Some(h) => query.split_at(h),
        None => (query, ""),
    };
    let params: Vec<String> = query
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => p.to_string(),
        })
        .collect();
    format!("{path}{}{fragment}", params.join("&"))
}

fn redact_password_keyword(s: &str) -> String {
    match tokenize_keywords(s) {
        Ok(pairs) if pairs.iter().any(|(k, _)| k == "password") => {
            join_keywords(pairs.into_iter().map(|(k, v)| {
                if k == "password" {
                    (k, "***".into())
                } else {
                    (k, v)
                }
            }))
        }
        _ => s.to_string(),
    }
}

fn is_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// The parameters taken out of a connection string, as written.
#[derive(Default)]
struct TlsParams {
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    channel_binding: Option<String>,
}

impl TlsParams {
    /// Keeps `key`'s value if it is one of ours; `false` for any other key.
    fn take(
        &mut self,
        key: &str,
        value: impl FnOnce() -> Result<String, PgTargetError>,
    ) -> Result<bool, PgTargetError> {
        let slot = match key {
            "sslmode" => &mut self.sslmode,
            "sslrootcert" => &mut self.sslrootcert,
            "channel_binding" => &mut self.channel_binding,
            _ => return Ok(false),
        };
        *slot = Some(value()?);
        Ok(true)
    }
}

/// Take our parameters out of a URL's query string, keeping the rest verbatim.
fn strip_url_tls_params(s: &str) -> Result<(String, TlsParams), PgTargetError> {
    let mut params = TlsParams::default();
    let Some(q) = s.find('?') else {
        return Ok((s.to_string(), params));
    };
    let (base, query) = (&s[..q], &s[q + 1..]);
    let mut kept = Vec::new();
    for param in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = param.split_once('=').ok_or_else(|| {
            PgTargetError::Invalid(format!("query parameter {param:?} has no '='"))
        })?;
        if !params.take(&percent_decode(key)?, || percent_decode(value))? {
            kept.push(param);
        }
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, params))
}

/// Take our parameters out of a libpq `key=value` string.
fn strip_keyword_tls_params(s: &str) -> Result<(String, TlsParams), PgTargetError> {
    let mut params = TlsParams::default();
    let mut kept = Vec::new();
    for (key, value) in tokenize_keywords(s)? {
        if !params.take(&key, || Ok(value.clone()))? {
            kept.push((key, value));
        }
    }
    Ok((join_keywords(kept), params))
}

/// Split a libpq `key = value` string: values are bare words or single-quoted, and a
/// backslash escapes the next character in both.
fn tokenize_keywords(s: &str) -> Result<Vec<(String, String)>, PgTargetError> {
    let mut pairs = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        if key.is_empty() {
            if chars.peek().is_some() {
                return Err(PgTargetError::Invalid("'=' without a keyword".into()));
            }
            return Ok(pairs);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(PgTargetError::Invalid(format!(
                "keyword {key:?} is not followed by '='"
            )));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                    None => {
                        return Err(PgTargetError::Invalid(format!(
                            "unterminated quoted value for {key:?}"
                        )))
                    }
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

fn join_keywords(pairs: impl IntoIterator<Item = (String, String)>) -> String {
    pairs
        .into_iter()
        .map(|(k, v)| {
            let escaped = v.replace('\\', "\\\\").replace('\'', "\\'");
            format!("{k}='{escaped}'")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn percent_decode(s: &str) -> Result<String, PgTargetError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| PgTargetError::Invalid(format!("bad percent-escape in {s:?}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| PgTargetError::Invalid(format!("{s:?} does not decode to UTF-8")))
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests;
#[cfg(feature = "tls")]
mod tls;

#[cfg(feature = "tls")]
pub use self::tls::{tls_config, tls_config_with_home};
