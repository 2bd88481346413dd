//! The streaming replication protocol client.
//!
//! tokio-postgres cannot open a replication connection, so this module speaks the protocol
//! itself: `postgres-protocol` writes the frontend messages and supplies the MD5 and SCRAM
//! helpers, and the backend side is framed here, because upstream does not know
//! `CopyBothResponse` ('W') nor the XLogData ('w') and keepalive ('k') payloads inside CopyData.
//!
//! Throughput matters (the target is pg_recvlogical's), so reads go into one large
//! [`BytesMut`] and every frame is split off it: an XLogData payload is a zero-copy [`Bytes`]
//! view of the read buffer, and nothing else is allocated per message.
//!
//! The `frame` submodule holds the pure message encoding and decoding; this file holds the
//! I/O: connecting, TLS, authentication, and the stream.

use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{
    self, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
};
use postgres_protocol::message::frontend;
use rustls::pki_types::ServerName;
use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use self::frame::{
    decode_copy_data, parse_data_row, server_error, split_frame, start_replication_command,
    unexpected, write_status_update, Fields, Frame,
};
use crate::pgconn::{tls_config, ChannelBinding, Endpoint, PgTarget, SslMode};
use crate::Lsn;

mod frame;

/// Room made in the read buffer before each read; one read can take this much.
const READ_CHUNK: usize = 256 * 1024;
/// Below this much free space the buffer is grown (or reclaimed) before reading.
const MIN_READ_SPACE: usize = 32 * 1024;
/// How long [`ReplicationStream::finish`] waits for the server to end the copy.
const FINISH_TIMEOUT: Duration = Duration::from_secs(10);

/// A replication connection failed. Classify with [`is_retryable`](Self::is_retryable)
/// before retrying: a missing slot or a bad password will not fix itself.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("replication connection I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("replication connection TLS error: {0}")]
    Tls(String),
    #[error("replication connection authentication failed: {0}")]
    Auth(String),
    #[error("server error {code} ({severity}): {message}{}", detail_and_hint(.detail, .hint))]
    Server {
        severity: String,
        code: String,
        message: String,
        detail: Option<String>,
        hint: Option<String>,
    },
    #[error("replication protocol violation: {0}")]
    Protocol(String),
    #[error("the server closed the replication connection")]
    Closed,
}

fn detail_and_hint(detail: &Option<String>, hint: &Option<String>) -> String {
    let mut s = String::new();
    if let Some(d) = detail {
        s.push_str(&format!(" (detail: {d})"));
    }
    if let Some(h) = hint {
        s.push_str(&format!(" (hint: {h})"));
    }
    s
}

impl ReplicationError {
    /// Whether reconnecting later can succeed: dropped connections, server shutdowns,
    /// resource shortages and a slot that another consumer holds are transient; bad
    /// credentials, a missing slot or database, TLS misconfiguration and protocol
    /// violations are not.
    pub fn is_retryable(&self) -> bool {
        match self {
            ReplicationError::Io(_) | ReplicationError::Closed => true,
            ReplicationError::Server { code, .. } => {
                let class = code.get(..2).unwrap_or("");
                // 08 connection exception (but not 08P01, a protocol violation: a bug that a
                // retry repeats), 53 insufficient resources (53300 too many connections), 57
                // operator intervention (57P01 admin shutdown), 55006 object in use (another
                // consumer holds the slot), 58000/58030 system and I/O errors (but not 58P01,
                // which is how a removed WAL segment is reported).
                (class == "08" && code != "08P01")
                    || matches!(class, "53" | "57")
                    || matches!(code.as_str(), "55006" | "58000" | "58030")
            }
            ReplicationError::Tls(_)
            | ReplicationError::Auth(_)
            | ReplicationError::Protocol(_) => false,
        }
    }

    /// The SQLSTATE of a server error.
    pub fn code(&self) -> Option<&str> {
        match self {
            ReplicationError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// What `IDENTIFY_SYSTEM` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    pub system_id: String,
    pub timeline: u32,
    /// The current WAL flush position.
    pub xlog_pos: Lsn,
    /// The database of a `replication=database` connection.
    pub dbname: Option<String>,
}

/// One message of the replication stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationEvent {
    /// A chunk of decoded output (one pgoutput message), a zero-copy view of the read buffer.
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        /// Server clock, microseconds since 2000-01-01.
        send_time: i64,
        data: Bytes,
    },
    /// The server's position; answer with [`ReplicationStream::send_status`] when
    /// `reply_requested`, or the server drops the connection after `wal_sender_timeout`.
    Keepalive {
        wal_end: Lsn,
        send_time: i64,
        reply_requested: bool,
    },
}

/// The byte stream under the protocol: TCP, TLS over TCP, or a Unix socket.
trait Transport: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Transport for T {}

/// What the transport offers SCRAM for channel binding.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ChannelData {
    /// No TLS: nothing to bind to.
    Plain,
    /// TLS: the `tls-server-end-point` data (the hash of the server's certificate), or why
    /// it cannot be computed.
    Tls(Result<Vec<u8>, String>),
}

/// The GS2 header choice of the SCRAM client-first message (RFC 5802 §7).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Gs2 {
    /// `n`: the client does not bind.
    Unsupported,
    /// `y`: the client could bind but the server did not offer it; a server that did offer
    /// `SCRAM-SHA-256-PLUS` (its list was tampered with) then refuses the login.
    Unrequested,
    /// `p=tls-server-end-point` with this data.
    Bind(Vec<u8>),
}

/// Which SASL mechanism and GS2 header to answer the server's offer with, under libpq's
/// `channel_binding` rules.
fn choose_mechanism(
    mode: ChannelBinding,
    channel: &ChannelData,
    offered: &[&str],
) -> Result<(&'static str, Gs2), ReplicationError> {
    let plus = offered.contains(&SCRAM_SHA_256_PLUS);
    let plain = offered.contains(&SCRAM_SHA_256);
    let refuse = |why: String| {
        Err(ReplicationError::Auth(format!(
            "channel_binding=require, but {why}"
        )))
    };
    let choice = match (mode, channel) {
        (ChannelBinding::Disable, _) | (ChannelBinding::Prefer, ChannelData::Plain) => {
            (SCRAM_SHA_256, Gs2::Unsupported)
        }
        (ChannelBinding::Prefer, ChannelData::Tls(Err(why))) => {
            tracing::warn!(reason = %why, "SCRAM without channel binding");
            (SCRAM_SHA_256, Gs2::Unsupported)
        }
        (ChannelBinding::Prefer | ChannelBinding::Require, ChannelData::Tls(Ok(data))) if plus => {
            (SCRAM_SHA_256_PLUS, Gs2::Bind(data.clone()))
        }
        (ChannelBinding::Prefer, ChannelData::Tls(Ok(_))) => (SCRAM_SHA_256, Gs2::Unrequested),
        (ChannelBinding::Require, ChannelData::Plain) => {
            return refuse("the connection is not encrypted (the server declined TLS)".into())
        }
        (ChannelBinding::Require, ChannelData::Tls(Err(why))) => return refuse(why.clone()),
        (ChannelBinding::Require, ChannelData::Tls(Ok(_))) => {
            return refuse(format!(
                "the server does not offer {SCRAM_SHA_256_PLUS} (it offers {offered:?})"
            ))
        }
    };
    if choice.0 == SCRAM_SHA_256 && !plain {
        return Err(ReplicationError::Auth(format!(
            "the server offers SASL mechanisms {offered:?}; with channel_binding={mode} and {} \
             pgcache can only use {SCRAM_SHA_256}",
            match channel {
                ChannelData::Plain => "no TLS",
                ChannelData::Tls(_) => "TLS",
            }
        )));
    }
    Ok(choice)
}

/// RFC 5929 §4.1 `tls-server-end-point`: the hash of the server's certificate with the hash
/// function of the certificate's signature algorithm, SHA-256 for MD5 and SHA-1.
fn tls_server_end_point(cert_der: &[u8]) -> Result<Vec<u8>, String> {
    use x509_cert::der::oid::db::rfc5912 as oid;
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(cert_der).map_err(|e| {
        format!("the server's certificate cannot be parsed for channel binding: {e}")
    })?;
    Ok(match cert.signature_algorithm.oid {
        oid::MD_5_WITH_RSA_ENCRYPTION
        | oid::SHA_1_WITH_RSA_ENCRYPTION
        | oid::DSA_WITH_SHA_1
        | oid::SHA_256_WITH_RSA_ENCRYPTION
        | oid::ECDSA_WITH_SHA_256
        | oid::DSA_WITH_SHA_256 => Sha256::digest(cert_der).to_vec(),
        oid::SHA_224_WITH_RSA_ENCRYPTION | oid::ECDSA_WITH_SHA_224 | oid::DSA_WITH_SHA_224 => {
            Sha224::digest(cert_der).to_vec()
        }
        oid::SHA_384_WITH_RSA_ENCRYPTION | oid::ECDSA_WITH_SHA_384 => {
            Sha384::digest(cert_der).to_vec()
        }
        oid::SHA_512_WITH_RSA_ENCRYPTION | oid::ECDSA_WITH_SHA_512 => {
            Sha512::digest(cert_der).to_vec()
        }
        other => {
            return Err(format!(
                "the server's certificate is signed with algorithm {other}, which names no hash \
                 function for tls-server-end-point channel binding (RFC 5929)"
            ))
        }
    })
}

/// The socket with its reused read and write buffers.
struct Wire {
    io: Box<dyn Transport>,
    /// Frames are split off the front; XLogData payloads keep their block alive until dropped.
    rbuf: BytesMut,
    /// Cleared after each send, so its allocation is reused.
    wbuf: BytesMut,
}

impl Wire {
    fn new(io: Box<dyn Transport>) -> Wire {
        Wire {
            io,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::with_capacity(1024),
        }
    }

    /// Read once from the socket into the buffer. Cancel-safe: bytes are either in the
    /// buffer or still in the socket.
    async fn fill(&mut self) -> Result<(), ReplicationError> {
        if self.rbuf.capacity() - self.rbuf.len() < MIN_READ_SPACE {
            self.rbuf.reserve(READ_CHUNK);
        }
        match self.io.read_buf(&mut self.rbuf).await? {
            0 => Err(ReplicationError::Closed),
            _ => Ok(()),
        }
    }

    async fn read_frame(&mut self) -> Result<Frame, ReplicationError> {
        loop {
            if let Some(frame) = split_frame(&mut self.rbuf)? {
                return Ok(frame);
            }
            self.fill().await?;
        }
    }

    /// Write out and flush everything queued in `wbuf`. Not cancel-safe: a half-written
    /// message corrupts the stream.
    async fn send(&mut self) -> Result<(), ReplicationError> {
        let written = self.io.write_all(&self.wbuf).await;
        // Cleared on failure too, so a later send never repeats a message.
        self.wbuf.clear();
        written?;
        self.io.flush().await?;
        Ok(())
    }
}

/// A NoticeResponse: a WARNING is logged as one, with its hint and what it means for
/// pgcache where that is known; anything else at INFO.
fn log_notice(body: &[u8]) {
    let ReplicationError::Server {
        severity,
        message,
        detail,
        hint,
        ..
    } = server_error(body)
    else {
        return;
    };
    if severity != "WARNING" {
        tracing::info!(%severity, %message, "notice from the replication connection");
        return;
    }
    let (detail, hint) = (detail.unwrap_or_default(), hint.unwrap_or_default());
    if message.contains("synchronized_standby_slots") {
        tracing::warn!(
            %message,
            %hint,
            "the server holds the stream back until the standbys listed in \
             synchronized_standby_slots confirm, and one of them does not exist (or is \
             invalidated): pgcache receives nothing until it does or the setting is amended. \
             After a promotion the new primary keeps the old primary's setting, which names \
             slots that exist only there: ALTER SYSTEM SET synchronized_standby_slots = '<its \
             own standbys' physical slots, or empty>'; SELECT pg_reload_conf(); (pgcache check \
             lists what is missing)"
        );
    } else {
        tracing::warn!(%message, %detail, %hint, "warning from the replication connection");
    }
}

fn encode_err(e: io::Error) -> ReplicationError {
    ReplicationError::Protocol(format!("cannot encode message: {e}"))
}

/// A connection in replication mode (`replication=database`), before streaming starts.
pub struct ReplicationConnection {
    wire: Wire,
    /// ParameterStatus values from startup (server_version, ...), for diagnostics.
    parameters: Vec<(String, String)>,
}

impl ReplicationConnection {
    /// Open a replication connection: TLS per the target's sslmode (prefer falls back to
    /// plain when the server declines or the handshake fails, as libpq does), startup with
    /// `replication=database` and the pinned session settings, then trust, cleartext, MD5
    /// or SCRAM-SHA-256 authentication. Honours `connect_timeout`.
    ///
    /// # Errors
    /// `Auth` for rejected or missing credentials (including the server's 28xxx errors),
    /// `Tls` for TLS failures, `Server` for other server refusals (e.g. 3D000 no such
    /// database, 53300 too many connections), `Io`/`Closed` for network failures.
    ///
    /// With several hosts (`postgres://a,b/db`, `host=a,b`) they are tried in order, as libpq
    /// does, each within `connect_timeout`; with `target_session_attrs=read-write` a server
    /// whose `transaction_read_only` is on (a standby) is passed over, and with `read-only`
    /// one where it is off. The error is the last host's, naming every host tried.
    pub async fn connect(target: &PgTarget) -> Result<ReplicationConnection, ReplicationError> {
        let endpoints = target.endpoints();
        let mut failures = Vec::new();
        for endpoint in endpoints {
            let attempt = Self::connect_to(target, endpoint);
            let result = match target.connect_timeout() {
                Some(limit) => tokio::time::timeout(limit, attempt)
                    .await
                    .unwrap_or_else(|_| {
                        Err(ReplicationError::Io(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("connecting to {endpoint} timed out after {limit:?}"),
                        )))
                    }),
                None => attempt.await,
            };
            match result {
                Ok(conn) => return Ok(conn),
                // One host: its error as it is.
                Err(e) if endpoints.len() == 1 => return Err(e),
                Err(e) => {
                    tracing::debug!(host = %endpoint, error = %e, "replication connection: trying the next host");
                    failures.push((endpoint.to_string(), e));
                }
            }
        }
        let tried = failures
            .iter()
            .map(|(host, e)| format!("{host}: {e}"))
            .collect::<Vec<_>>()
            .join("; ");
        // The last retryable error decides, else the last: one host that may come back (or
        // be promoted) is reason enough to retry.
        let at = failures
            .iter()
            .rposition(|(_, e)| e.is_retryable())
            .unwrap_or(failures.len().saturating_sub(1));
        let last = (at < failures.len()).then(|| failures.remove(at).1);
        Err(match last {
            Some(ReplicationError::Server {
                severity,
                code,
                message,
                detail,
                hint,
            }) => ReplicationError::Server {
                severity,
                code,
                message: format!("{message} (hosts tried: {tried})"),
                detail,
                hint,
            },
            Some(ReplicationError::Auth(_)) => ReplicationError::Auth(tried),
            Some(ReplicationError::Tls(_)) => ReplicationError::Tls(tried),
            Some(ReplicationError::Protocol(_)) => ReplicationError::Protocol(tried),
            Some(ReplicationError::Io(e)) => {
                ReplicationError::Io(io::Error::new(e.kind(), format!("hosts tried: {tried}")))
            }
            Some(ReplicationError::Closed) | None => ReplicationError::Io(io::Error::new(
                io::ErrorKind::NotConnected,
                format!("hosts tried: {tried}"),
            )),
        })
    }

    async fn connect_to(
        target: &PgTarget,
        endpoint: &Endpoint,
    ) -> Result<ReplicationConnection, ReplicationError> {
        let (io, channel) = match open_transport(target, endpoint, target.ssl_mode()).await {
            Err(ReplicationError::Tls(reason)) if target.ssl_mode() == SslMode::Prefer => {
                tracing::debug!(%reason, "TLS handshake failed with sslmode=prefer; retrying without TLS");
                open_transport(target, endpoint, SslMode::Disable).await?
            }
            other => other?,
        };
        let mut conn = ReplicationConnection {
            wire: Wire::new(io),
            parameters: Vec::new(),
        };
        conn.startup(target, &channel).await?;
        if target.wants_read_write() || target.wants_read_only() {
            let rows = conn.simple_query("SHOW transaction_read_only").await?;
            let read_only = rows
                .first()
                .and_then(|row| row.first())
                .and_then(|v| v.as_deref())
                == Some("on");
            if read_only && target.wants_read_write() {
                return Err(ReplicationError::Server {
                    severity: "FATAL".into(),
                    // 57P03 cannot_connect_now, as a server in recovery answers: retried,
                    // since a standby may be promoted (or the primary come back) meanwhile.
                    code: "57P03".into(),
                    message: format!(
                        "{endpoint} is read-only (a standby), and target_session_attrs=read-write"
                    ),
                    detail: None,
                    hint: None,
                });
            }
            if !read_only && target.wants_read_only() {
                return Err(ReplicationError::Server {
                    severity: "FATAL".into(),
                    code: "57P03".into(),
                    message: format!(
                        "{endpoint} accepts writes, and target_session_attrs=read-only"
                    ),
                    detail: None,
                    hint: None,
                });
            }
        }
        Ok(conn)
    }

    async fn startup(
        &mut self,
        target: &PgTarget,
        channel: &ChannelData,
    ) -> Result<(), ReplicationError> {
        let options = target.startup_options();
        let params = [
            ("user", target.user()),
            ("database", target.dbname()),
            ("replication", "database"),
            ("options", options.as_str()),
            ("client_encoding", "UTF8"),
            ("application_name", target.application_name()),
        ];
        frontend::startup_message(params, &mut self.wire.wbuf).map_err(encode_err)?;
        self.wire.send().await?;
        self.authenticate(target, channel).await?;
        loop {
            let frame = self.wire.read_frame().await?;
            match frame.tag {
                b'Z' => return Ok(()),
                b'S' => {
                    let mut f = Fields {
                        buf: &frame.body,
                        what: "ParameterStatus",
                    };
                    let (name, value) = (f.cstr()?.to_string(), f.cstr()?.to_string());
                    self.parameters.push((name, value));
                }
                b'K' => {}
                b'N' => log_notice(&frame.body),
                b'E' => return Err(server_error(&frame.body)),
                tag => return Err(unexpected(tag, "startup")),
            }
        }
    }

    /// Answers the server's authentication requests until it accepts or refuses the login.
    ///
    /// With SCRAM the server must prove that it knows the password (the `v=` signature of
    /// AuthenticationSASLFinal, RFC 5802 §3) before its AuthenticationOk counts: otherwise
    /// anyone who can intercept the connection could accept any login and feed the daemon
    /// a forged change stream.
    async fn authenticate(
        &mut self,
        target: &PgTarget,
        channel: &ChannelData,
    ) -> Result<(), ReplicationError> {
        let user = target.user();
        let binding = target.channel_binding();
        let password = || {
            target.password().ok_or_else(|| {
                ReplicationError::Auth(format!(
                    "the server asks for a password for user {user:?}, but the connection string has none"
                ))
            })
        };
        let unbound = |method: &str| {
            ReplicationError::Auth(format!(
                "channel_binding=require, but the server asks for {method}, which cannot be \
                 bound to the TLS channel (it must use scram-sha-256 for this role in pg_hba.conf)"
            ))
        };
        let mut scram: Option<ScramSha256> = None;
        let mut bound = false;
        let mut server_proved = false;
        loop {
            let frame = self.wire.read_frame().await?;
            match frame.tag {
                b'R' => {}
                b'E' => {
                    // 28xxx: invalid authorization (bad password, no pg_hba.conf entry).
                    return Err(match server_error(&frame.body) {
                        ReplicationError::Server { code, message, .. }
                            if code.starts_with("28") =>
                        {
                            ReplicationError::Auth(format!("{message} (SQLSTATE {code})"))
                        }
                        other => other,
                    });
                }
                b'N' => {
                    log_notice(&frame.body);
                    continue;
                }
                tag => return Err(unexpected(tag, "authentication")),
            }
            let mut f = Fields {
                buf: &frame.body,
                what: "Authentication",
            };
            let wbuf = &mut self.wire.wbuf;
            match f.i32()? {
                0 => {
                    if scram.is_some() && !server_proved {
                        return Err(ReplicationError::Auth(format!(
                            "the server did not prove it knows the password of user {user:?}: \
                             it accepted the SCRAM login without sending its signature \
                             (AuthenticationSASLFinal); refusing a server that may be an impostor"
                        )));
                    }
                    if binding == ChannelBinding::Require && !bound {
                        return Err(unbound("no authentication at all (trust)"));
                    }
                    return Ok(());
                }
                3 if binding == ChannelBinding::Require => {
                    return Err(unbound("a cleartext password"))
                }
                5 if binding == ChannelBinding::Require => return Err(unbound("an MD5 password")),
                3 => frontend::password_message(password()?, wbuf).map_err(encode_err)?,
                5 => {
                    let salt = f.take(4)?;
                    let salt = [salt[0], salt[1], salt[2], salt[3]];
                    let hash = md5_hash(user.as_bytes(), password()?, salt);
                    frontend::password_message(hash.as_bytes(), wbuf).map_err(encode_err)?;
                }
                10 => {
                    if scram.is_some() {
                        return Err(ReplicationError::Protocol("SASL started twice".into()));
                    }
                    let mut offered = Vec::new();
                    while !f.buf.is_empty() && f.buf[0] != 0 {
                        offered.push(f.cstr()?);
                    }
                    let (mechanism, gs2) = choose_mechanism(binding, channel, &offered)?;
                    let gs2 = match gs2 {
                        Gs2::Unsupported => sasl::ChannelBinding::unsupported(),
                        Gs2::Unrequested => sasl::ChannelBinding::unrequested(),
                        Gs2::Bind(data) => {
                            bound = true;
                            sasl::ChannelBinding::tls_server_end_point(data)
                        }
                    };
                    let s = ScramSha256::new(password()?, gs2);
                    frontend::sasl_initial_response(mechanism, s.message(), wbuf)
                        .map_err(encode_err)?;
                    scram = Some(s);
                }
                11 => {
                    let s = scram.as_mut().ok_or_else(|| {
                        ReplicationError::Protocol("SASLContinue before SASL started".into())
                    })?;
                    s.update(f.buf)
                        .map_err(|e| ReplicationError::Auth(format!("SCRAM exchange: {e}")))?;
                    frontend::sasl_response(s.message(), wbuf).map_err(encode_err)?;
                }
                12 => {
                    let s = scram.as_mut().ok_or_else(|| {
                        ReplicationError::Protocol("SASLFinal before SASL started".into())
                    })?;
                    s.finish(f.buf).map_err(|e| {
                        ReplicationError::Auth(format!(
                            "the server did not prove it knows the password of user {user:?}: \
                             its SCRAM signature does not verify ({e}); refusing a server that \
                             may be an impostor"
                        ))
                    })?;
                    server_proved = true;
                    continue;
                }
                method => {
                    return Err(ReplicationError::Auth(format!(
                        "unsupported authentication method {method} (only trust, password, md5 and scram-sha-256 are)"
                    )))
                }
            }
            self.wire.send().await?;
        }
    }

    /// A server parameter reported at startup (`server_version`, `integer_datetimes`, ...).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// `IDENTIFY_SYSTEM`: system id, timeline, current WAL position and database.
    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ReplicationError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let bad = |what: &str| ReplicationError::Protocol(format!("IDENTIFY_SYSTEM: {what}"));
        let row = rows.first().ok_or_else(|| bad("no row"))?;
        let col = |i: usize| row.get(i).and_then(|v| v.as_deref());
        Ok(SystemIdentity {
            system_id: col(0).ok_or_else(|| bad("no systemid"))?.to_string(),
            timeline: col(1)
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| bad("bad timeline"))?,
            xlog_pos: col(2)
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| bad("bad xlogpos"))?,
            dbname: col(3).map(str::to_string),
        })
    }

    /// Run a simple query (a replication command or, with `replication=database`, plain
    /// SQL such as `SHOW wal_level`) and return its rows as text.
    ///
    /// # Errors
    /// `Server` if the command fails (the connection stays usable), `Protocol` if the
    /// command starts a COPY, which belongs in [`start_logical`](Self::start_logical).
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, ReplicationError> {
        frontend::query(sql, &mut self.wire.wbuf).map_err(encode_err)?;
        self.wire.send().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let frame = self.wire.read_frame().await?;
            match frame.tag {
                b'D' => rows.push(parse_data_row(&frame.body)?),
                b'T' | b'C' | b'I' | b'S' => {}
                b'E' => error = Some(server_error(&frame.body)),
                b'N' => log_notice(&frame.body),
                b'Z' => return error.map_or(Ok(rows), Err),
                b'W' | b'H' | b'G' => {
                    return Err(ReplicationError::Protocol(format!(
                        "{sql:?} started a COPY; stream with start_logical instead"
                    )))
                }
                tag => return Err(unexpected(tag, "a simple query")),
            }
        }
    }

    /// `START_REPLICATION SLOT "slot" LOGICAL start (proto_version '1', publication_names
    /// '"publication"', messages 'false')`; returns the stream once the server enters CopyBoth.
    ///
    /// # Errors
    /// `Server` with 42704 if the slot does not exist (not retryable), 55006 if another
    /// consumer holds it (retryable), 42704/other codes for a missing publication.
    pub async fn start_logical(
        self,
        slot: &str,
        start: Lsn,
        publication: &str,
    ) -> Result<ReplicationStream, ReplicationError> {
        self.start_pgoutput(slot, start, publication, false).await
    }

    /// As [`start_logical`](Self::start_logical), with protocol version 2 and
    /// `streaming 'on'`: large transactions arrive in blocks while in progress (Stream
    /// Start, Stop, Commit, Abort). Postgres 14 or later.
    ///
    /// # Errors
    /// As [`start_logical`](Self::start_logical).
    pub async fn start_logical_streaming(
        self,
        slot: &str,
        start: Lsn,
        publication: &str,
    ) -> Result<ReplicationStream, ReplicationError> {
        self.start_pgoutput(slot, start, publication, true).await
    }

    async fn start_pgoutput(
        mut self,
        slot: &str,
        start: Lsn,
        publication: &str,
        streaming: bool,
    ) -> Result<ReplicationStream, ReplicationError> {
        let command = start_replication_command(slot, start, publication, streaming);
        frontend::query(&command, &mut self.wire.wbuf).map_err(encode_err)?;
        self.wire.send().await?;
        loop {
            let frame = self.wire.read_frame().await?;
            match frame.tag {
                b'W' => return Ok(ReplicationStream { wire: self.wire }),
                b'E' => return Err(server_error(&frame.body)),
                b'N' => log_notice(&frame.body),
                b'S' => {}
                tag => return Err(unexpected(tag, "START_REPLICATION")),
            }
        }
    }
}

/// Connect the socket and negotiate TLS per `mode`. Unix sockets are never encrypted
/// (PgTarget refuses sslmode=require and stricter for them).
async fn open_transport(
    target: &PgTarget,
    endpoint: &Endpoint,
    mode: SslMode,
) -> Result<(Box<dyn Transport>, ChannelData), ReplicationError> {
    #[cfg(unix)]
    if endpoint.unix_socket {
        let path = format!("{}/.s.PGSQL.{}", endpoint.host, endpoint.port);
        return Ok((
            Box::new(tokio::net::UnixStream::connect(path).await?),
            ChannelData::Plain,
        ));
    }
    let mut tcp = match endpoint.hostaddr {
        Some(addr) => TcpStream::connect((addr, endpoint.port)).await?,
        None => TcpStream::connect((endpoint.host.as_str(), endpoint.port)).await?,
    };
    // Status updates are small and latency-sensitive; never hold them back.
    tcp.set_nodelay(true)?;
    if mode == SslMode::Disable {
        return Ok((Box::new(tcp), ChannelData::Plain));
    }
    let mut request = BytesMut::with_capacity(8);
    frontend::ssl_request(&mut request);
    tcp.write_all(&request).await?;
    // Read exactly one byte: anything after it must come through TLS (CVE-2021-23222).
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => {}
        b'N' if mode == SslMode::Prefer => return Ok((Box::new(tcp), ChannelData::Plain)),
        b'N' => {
            return Err(ReplicationError::Tls(format!(
                "sslmode={mode}, but the server at {}:{} does not accept TLS",
                endpoint.host, endpoint.port
            )))
        }
        other => {
            return Err(ReplicationError::Protocol(format!(
                "unexpected answer {other:#04x} to the SSL request"
            )))
        }
    }
    let config = tls_config(mode, target.ssl_root_cert())
        .map_err(|e| ReplicationError::Tls(e.to_string()))?;
    let name = ServerName::try_from(endpoint.host.clone()).map_err(|e| {
        ReplicationError::Tls(format!("{:?} is not a TLS server name: {e}", endpoint.host))
    })?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(
            |e| match e.get_ref().and_then(|r| r.downcast_ref::<rustls::Error>()) {
                Some(tls_err) => ReplicationError::Tls(format!(
                    "handshake with {}:{} (sslmode={mode}): {tls_err}",
                    endpoint.host, endpoint.port
                )),
                None => ReplicationError::Io(e),
            },
        )?;
    let end_point = match tls.get_ref().1.peer_certificates() {
        Some([leaf, ..]) => tls_server_end_point(leaf),
        _ => Err("the server showed no certificate".to_string()),
    };
    Ok((Box::new(tls), ChannelData::Tls(end_point)))
}

/// A replication connection in CopyBoth mode, streaming pgoutput messages.
pub struct ReplicationStream {
    wire: Wire,
}

impl ReplicationStream {
    /// The next event, waiting for the network if none is buffered. Cancel-safe.
    ///
    /// # Errors
    /// `Server` for an ErrorResponse, `Closed` for CopyDone or end of file, `Io` for
    /// network errors, `Protocol` for malformed messages.
    pub async fn next(&mut self) -> Result<ReplicationEvent, ReplicationError> {
        loop {
            if let Some(event) = self.buffered()? {
                return Ok(event);
            }
            self.wire.fill().await?;
        }
    }

    /// The next event if one is complete in the buffer or arrives with a single read that
    /// does not wait; `Ok(None)` otherwise. This is what natural batching builds on: keep
    /// taking events while this returns some, flush when it returns `None`.
    pub fn next_ready(&mut self) -> Result<Option<ReplicationEvent>, ReplicationError> {
        if let Some(event) = self.buffered()? {
            return Ok(Some(event));
        }
        match self.wire.fill().now_or_never() {
            None => Ok(None),
            Some(result) => {
                result?;
                self.buffered()
            }
        }
    }

    /// Decode buffered frames until one is an event; `Ok(None)` once the buffer holds no
    /// complete frame.
    fn buffered(&mut self) -> Result<Option<ReplicationEvent>, ReplicationError> {
        while let Some(frame) = split_frame(&mut self.wire.rbuf)? {
            match frame.tag {
                b'd' => return decode_copy_data(frame.body).map(Some),
                b'E' => return Err(server_error(&frame.body)),
                // CopyDone, or the CommandComplete / ReadyForQuery that end the command
                // when a walsender stops (server shutdown): the stream is over.
                b'c' | b'C' | b'Z' => return Err(ReplicationError::Closed),
                b'N' => log_notice(&frame.body),
                b'S' => {}
                tag => return Err(unexpected(tag, "streaming")),
            }
        }
        Ok(None)
    }

    /// Send a standby status update: the positions written, flushed and applied, the client
    /// clock, and whether the server should answer with a keepalive. The server confirms the
    /// slot up to `flushed`. Not cancel-safe (a half-written message breaks the stream).
    pub async fn send_status(
        &mut self,
        written: Lsn,
        flushed: Lsn,
        applied: Lsn,
        reply_requested: bool,
    ) -> Result<(), ReplicationError> {
        write_status_update(
            &mut self.wire.wbuf,
            written,
            flushed,
            applied,
            pg_now_micros(),
            reply_requested,
        );
        self.wire.send().await
    }

    /// End streaming cleanly: send CopyDone, discard what is still in flight until the
    /// server finishes the command, then Terminate. Best effort, bounded by a timeout.
    pub async fn finish(mut self) -> Result<(), ReplicationError> {
        frontend::copy_done(&mut self.wire.wbuf);
        self.wire.send().await?;
        let drain = async {
            loop {
                let frame = match self.wire.read_frame().await {
                    Err(ReplicationError::Closed) => return Ok(()),
                    other => other?,
                };
                match frame.tag {
                    b'Z' => break,
                    b'E' => return Err(server_error(&frame.body)),
                    _ => {}
                }
            }
            frontend::terminate(&mut self.wire.wbuf);
            self.wire.send().await?;
            let _ = self.wire.io.shutdown().await;
            Ok(())
        };
        tokio::time::timeout(FINISH_TIMEOUT, drain)
            .await
            .map_err(|_| {
                ReplicationError::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the server did not end the replication stream in time",
                ))
            })?
    }
}

use crate::clock::pg_now_micros;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_retryable_errors() {
        let server = |code: &str| ReplicationError::Server {
            severity: "FATAL".into(),
            code: code.into(),
            message: String::new(),
            detail: None,
            hint: None,
        };
        for code in ["57P01", "53300", "55006", "08006"] {
            assert!(server(code).is_retryable(), "{code}");
        }
        for code in [
            "42704", "28P01", "28000", "3D000", "42501", "55000", "58P01", "08P01",
        ] {
            assert!(!server(code).is_retryable(), "{code}");
        }
        assert!(ReplicationError::Closed.is_retryable());
        assert!(ReplicationError::Io(io::ErrorKind::ConnectionReset.into()).is_retryable());
        assert!(!ReplicationError::Auth("x".into()).is_retryable());
        assert!(!ReplicationError::Tls("x".into()).is_retryable());
    }

    #[test]
    fn channel_binding_follows_libpq() {
        use ChannelBinding::{Disable, Prefer, Require};
        let both = [SCRAM_SHA_256_PLUS, SCRAM_SHA_256];
        let plain_only = [SCRAM_SHA_256];
        let tls = ChannelData::Tls(Ok(vec![1, 2, 3]));
        let no_hash = ChannelData::Tls(Err("signed with ed25519".into()));
        let plain = ChannelData::Plain;
        let choose = |mode, channel: &ChannelData, offered: &[&str]| {
            choose_mechanism(mode, channel, offered).map_err(|e| e.to_string())
        };
        let bind = Ok((SCRAM_SHA_256_PLUS, Gs2::Bind(vec![1, 2, 3])));

        // prefer: bind when TLS is on and the server offers PLUS.
        assert_eq!(choose(Prefer, &tls, &both), bind);
        assert_eq!(
            choose(Prefer, &tls, &plain_only),
            Ok((SCRAM_SHA_256, Gs2::Unrequested))
        );
        assert_eq!(
            choose(Prefer, &plain, &both),
            Ok((SCRAM_SHA_256, Gs2::Unsupported))
        );
        assert_eq!(
            choose(Prefer, &no_hash, &both),
            Ok((SCRAM_SHA_256, Gs2::Unsupported))
        );
        // require: bind or fail, naming why.
        assert_eq!(choose(Require, &tls, &both), bind);
        let e = choose(Require, &tls, &plain_only).unwrap_err();
        assert!(e.contains("does not offer SCRAM-SHA-256-PLUS"), "{e}");
        let e = choose(Require, &plain, &both).unwrap_err();
        assert!(e.contains("not encrypted"), "{e}");
        let e = choose(Require, &no_hash, &both).unwrap_err();
        assert!(e.contains("ed25519"), "{e}");
        // disable: never bind.
        assert_eq!(
            choose(Disable, &tls, &both),
            Ok((SCRAM_SHA_256, Gs2::Unsupported))
        );
        let e = choose(Disable, &tls, &[SCRAM_SHA_256_PLUS]).unwrap_err();
        assert!(e.contains("can only use SCRAM-SHA-256"), "{e}");
    }

    #[test]
    fn end_point_hash_uses_the_certificates_hash_function() {
        use rustls::pki_types::pem::PemObject;
        // Signed with ecdsa-with-SHA256, so the data is the SHA-256 of the DER bytes.
        let der = rustls::pki_types::CertificateDer::from_pem_slice(
            include_str!("../pgconn/test-ca.pem").as_bytes(),
        )
        .unwrap();
        assert_eq!(
            tls_server_end_point(&der).unwrap(),
            Sha256::digest(&der).to_vec()
        );
        let e = tls_server_end_point(b"not a certificate").unwrap_err();
        assert!(e.contains("cannot be parsed"), "{e}");
    }

    #[test]
    fn client_clock_uses_the_postgres_epoch() {
        // 2022-01-01 is 22 years after the Postgres epoch.
        assert!(pg_now_micros() > 22 * 365 * 86_400 * 1_000_000);
    }
}
