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
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::frontend;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use self::frame::{
    decode_copy_data, parse_data_row, server_error, split_frame, start_replication_command,
    unexpected, write_status_update, Fields, Frame,
};
use crate::pgconn::{tls_config, PgTarget, SslMode};
use crate::Lsn;

mod frame;

/// Room made in the read buffer before each read; one read can take this much.
const READ_CHUNK: usize = 256 * 1024;
/// Below this much free space the buffer is grown (or reclaimed) before reading.
const MIN_READ_SPACE: usize = 32 * 1024;
/// How long [`ReplicationStream::finish`] waits for the server to end the copy.
const FINISH_TIMEOUT: Duration = Duration::from_secs(10);
/// Microseconds from the Unix epoch to the Postgres epoch (2000-01-01 UTC).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

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

fn log_notice(body: &[u8]) {
    if let ReplicationError::Server {
        severity, message, ..
    } = server_error(body)
    {
        tracing::info!(%severity, %message, "notice from the replication connection");
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
    pub async fn connect(target: &PgTarget) -> Result<ReplicationConnection, ReplicationError> {
        let attempt = Self::connect_inner(target);
        match target.connect_timeout() {
            Some(limit) => tokio::time::timeout(limit, attempt).await.map_err(|_| {
                ReplicationError::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "connecting to {} timed out after {limit:?}",
                        target.redacted()
                    ),
                ))
            })?,
            None => attempt.await,
        }
    }

    async fn connect_inner(target: &PgTarget) -> Result<ReplicationConnection, ReplicationError> {
        let io = match open_transport(target, target.ssl_mode()).await {
            Err(ReplicationError::Tls(reason)) if target.ssl_mode() == SslMode::Prefer => {
                tracing::debug!(%reason, "TLS handshake failed with sslmode=prefer; retrying without TLS");
                open_transport(target, SslMode::Disable).await?
            }
            other => other?,
        };
        let mut conn = ReplicationConnection {
            wire: Wire::new(io),
            parameters: Vec::new(),
        };
        conn.startup(target).await?;
        Ok(conn)
    }

    async fn startup(&mut self, target: &PgTarget) -> Result<(), ReplicationError> {
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
        self.authenticate(target).await?;
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

    async fn authenticate(&mut self, target: &PgTarget) -> Result<(), ReplicationError> {
        let user = target.user();
        let password = || {
            target.password().ok_or_else(|| {
                ReplicationError::Auth(format!(
                    "the server asks for a password for user {user:?}, but the connection string has none"
                ))
            })
        };
        let mut scram: Option<ScramSha256> = None;
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
                0 => return Ok(()),
                3 => frontend::password_message(password()?, wbuf).map_err(encode_err)?,
                5 => {
                    let salt = f.take(4)?;
                    let salt = [salt[0], salt[1], salt[2], salt[3]];
                    let hash = md5_hash(user.as_bytes(), password()?, salt);
                    frontend::password_message(hash.as_bytes(), wbuf).map_err(encode_err)?;
                }
                10 => {
                    let mut offered = Vec::new();
                    while !f.buf.is_empty() && f.buf[0] != 0 {
                        offered.push(f.cstr()?);
                    }
                    if !offered.contains(&SCRAM_SHA_256) {
                        return Err(ReplicationError::Auth(format!(
                            "the server offers SASL mechanisms {offered:?}; only {SCRAM_SHA_256} is supported"
                        )));
                    }
                    // No channel binding: 'n' is honest and accepted with or without TLS.
                    let s = ScramSha256::new(password()?, ChannelBinding::unsupported());
                    frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), wbuf)
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
                        ReplicationError::Auth(format!("the server's SCRAM signature: {e}"))
                    })?;
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
        mut self,
        slot: &str,
        start: Lsn,
        publication: &str,
    ) -> Result<ReplicationStream, ReplicationError> {
        let command = start_replication_command(slot, start, publication);
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
    mode: SslMode,
) -> Result<Box<dyn Transport>, ReplicationError> {
    #[cfg(unix)]
    if target.is_unix_socket() {
        let path = format!("{}/.s.PGSQL.{}", target.host(), target.port());
        return Ok(Box::new(tokio::net::UnixStream::connect(path).await?));
    }
    let mut tcp = match target.hostaddr() {
        Some(addr) => TcpStream::connect((addr, target.port())).await?,
        None => TcpStream::connect((target.host(), target.port())).await?,
    };
    // Status updates are small and latency-sensitive; never hold them back.
    tcp.set_nodelay(true)?;
    if mode == SslMode::Disable {
        return Ok(Box::new(tcp));
    }
    let mut request = BytesMut::with_capacity(8);
    frontend::ssl_request(&mut request);
    tcp.write_all(&request).await?;
    // Read exactly one byte: anything after it must come through TLS (CVE-2021-23222).
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => {}
        b'N' if mode == SslMode::Prefer => return Ok(Box::new(tcp)),
        b'N' => {
            return Err(ReplicationError::Tls(format!(
                "sslmode={mode}, but the server at {}:{} does not accept TLS",
                target.host(),
                target.port()
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
    let name = ServerName::try_from(target.host().to_string()).map_err(|e| {
        ReplicationError::Tls(format!("{:?} is not a TLS server name: {e}", target.host()))
    })?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(
            |e| match e.get_ref().and_then(|r| r.downcast_ref::<rustls::Error>()) {
                Some(tls_err) => ReplicationError::Tls(format!(
                    "handshake with {}:{} (sslmode={mode}): {tls_err}",
                    target.host(),
                    target.port()
                )),
                None => ReplicationError::Io(e),
            },
        )?;
    Ok(Box::new(tls))
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

/// The client clock in the protocol's unit: microseconds since 2000-01-01 UTC.
fn pg_now_micros() -> i64 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    unix - PG_EPOCH_OFFSET_MICROS
}

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
    fn client_clock_uses_the_postgres_epoch() {
        // 2022-01-01 is 22 years after the Postgres epoch.
        assert!(pg_now_micros() > 22 * 365 * 86_400 * 1_000_000);
    }
}
