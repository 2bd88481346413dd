//! Replication protocol messages as pure functions over bytes: splitting backend frames
//! off the read buffer, decoding the CopyData payloads (XLogData, keepalive), error fields
//! and data rows, and encoding the commands and status updates we send. No I/O here, so
//! every function can be tested (and fuzzed) on hand-built input.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::message::backend;

use super::{ReplicationError, ReplicationEvent};
use crate::Lsn;

/// Postgres never sends a message over 1 GiB (MaxAllocSize); a larger length is corruption.
const MAX_MESSAGE_LEN: usize = 1 << 30;

/// A backend message: its tag and the body after the length word.
#[derive(Debug)]
pub(super) struct Frame {
    pub(super) tag: u8,
    pub(super) body: Bytes,
}

/// Split one complete backend message off the front of `buf`; `Ok(None)` while incomplete
/// (after making room for the rest, so a large message arrives in few reads).
pub(super) fn split_frame(buf: &mut BytesMut) -> Result<Option<Frame>, ReplicationError> {
    let header = match backend::Header::parse(buf) {
        Ok(Some(header)) => header,
        Ok(None) => return Ok(None),
        Err(e) => return Err(ReplicationError::Protocol(e.to_string())),
    };
    // Header::parse guarantees len >= 4.
    let total = 1 + header.len() as usize;
    if total > MAX_MESSAGE_LEN {
        return Err(ReplicationError::Protocol(format!(
            "message '{}' claims {total} bytes",
            header.tag() as char
        )));
    }
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    frame.advance(5);
    Ok(Some(Frame {
        tag: header.tag(),
        body: frame.freeze(),
    }))
}

/// Decode the payload of a CopyData message of the replication stream.
pub(super) fn decode_copy_data(mut body: Bytes) -> Result<ReplicationEvent, ReplicationError> {
    let truncated = |what: &str| ReplicationError::Protocol(format!("truncated {what} message"));
    match body.first() {
        Some(b'w') => {
            if body.len() < 25 {
                return Err(truncated("XLogData"));
            }
            body.advance(1);
            let wal_start = Lsn(body.get_u64());
            let wal_end = Lsn(body.get_u64());
            let send_time = body.get_i64();
            Ok(ReplicationEvent::XLogData {
                wal_start,
                wal_end,
                send_time,
                data: body,
            })
        }
        Some(b'k') => {
            if body.len() < 18 {
                return Err(truncated("keepalive"));
            }
            body.advance(1);
            Ok(ReplicationEvent::Keepalive {
                wal_end: Lsn(body.get_u64()),
                send_time: body.get_i64(),
                reply_requested: body.get_u8() != 0,
            })
        }
        Some(&tag) => Err(ReplicationError::Protocol(format!(
            "unexpected CopyData message '{}'",
            tag as char
        ))),
        None => Err(truncated("CopyData")),
    }
}

/// Parse the fields of an ErrorResponse (or NoticeResponse) body.
pub(super) fn server_error(body: &[u8]) -> ReplicationError {
    let (mut severity, mut code, mut message) = (String::new(), String::new(), String::new());
    let (mut detail, mut hint) = (None, None);
    let mut rest = body;
    while let Some((&kind, tail)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        let value = String::from_utf8_lossy(&tail[..end]).into_owned();
        rest = tail.get(end + 1..).unwrap_or(&[]);
        match kind {
            // 'V' is the untranslated severity; prefer it over the localized 'S'.
            b'V' => severity = value,
            b'S' if severity.is_empty() => severity = value,
            b'C' => code = value,
            b'M' => message = value,
            b'D' => detail = Some(value),
            b'H' => hint = Some(value),
            _ => {}
        }
    }
    ReplicationError::Server {
        severity,
        code,
        message,
        detail,
        hint,
    }
}

/// A bounds-checked reader over a message body, for the few non-hot-path messages.
pub(super) struct Fields<'a> {
    pub(super) buf: &'a [u8],
    pub(super) what: &'static str,
}

impl<'a> Fields<'a> {
    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], ReplicationError> {
        if self.buf.len() < n {
            return Err(ReplicationError::Protocol(format!(
                "truncated {} message",
                self.what
            )));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub(super) fn i16(&mut self) -> Result<i16, ReplicationError> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    pub(super) fn i32(&mut self) -> Result<i32, ReplicationError> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(super) fn cstr(&mut self) -> Result<&'a str, ReplicationError> {
        let end = self.buf.iter().position(|&b| b == 0).ok_or_else(|| {
            ReplicationError::Protocol(format!("unterminated string in {} message", self.what))
        })?;
        let s = std::str::from_utf8(&self.buf[..end])
            .map_err(|_| ReplicationError::Protocol(format!("non-UTF-8 text in {}", self.what)))?;
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }
}

pub(super) fn parse_data_row(body: &[u8]) -> Result<Vec<Option<String>>, ReplicationError> {
    let mut fields = Fields {
        buf: body,
        what: "DataRow",
    };
    let count = fields.i16()?;
    let mut row = Vec::with_capacity(count.max(0) as usize);
    for _ in 0..count {
        let len = fields.i32()?;
        if len < 0 {
            row.push(None);
            continue;
        }
        let value = std::str::from_utf8(fields.take(len as usize)?)
            .map_err(|_| ReplicationError::Protocol("non-UTF-8 value in DataRow".into()))?;
        row.push(Some(value.to_string()));
    }
    Ok(row)
}

pub(super) use crate::sql::{quote_ident, quote_literal};

/// The `START_REPLICATION` command for a pgoutput slot. `publication_names` is itself a
/// list of identifiers inside a literal, hence the double quoting. `streaming` asks for
/// protocol version 2 and large transactions streamed while in progress (Postgres 14+).
pub(super) fn start_replication_command(
    slot: &str,
    start: Lsn,
    publication: &str,
    streaming: bool,
) -> String {
    let (proto, streaming) = if streaming {
        ("2", ", streaming 'on'")
    } else {
        ("1", "")
    };
    format!(
        "START_REPLICATION SLOT {} LOGICAL {start} (proto_version '{proto}', publication_names {}, messages 'false'{streaming})",
        quote_ident(slot),
        quote_literal(&quote_ident(publication))
    )
}

pub(super) fn unexpected(tag: u8, during: &str) -> ReplicationError {
    ReplicationError::Protocol(format!(
        "unexpected message '{}' during {during}",
        tag as char
    ))
}

pub(super) fn write_status_update(
    buf: &mut BytesMut,
    written: Lsn,
    flushed: Lsn,
    applied: Lsn,
    now_micros: i64,
    reply_requested: bool,
) {
    buf.put_u8(b'd');
    buf.put_i32(4 + 34);
    buf.put_u8(b'r');
    buf.put_u64(written.0);
    buf.put_u64(flushed.0);
    buf.put_u64(applied.0);
    buf.put_i64(now_micros);
    buf.put_u8(u8::from(reply_requested));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn xlogdata(start: u64, end: u64, time: i64, data: &[u8]) -> Vec<u8> {
        let mut body = vec![b'w'];
        body.extend_from_slice(&start.to_be_bytes());
        body.extend_from_slice(&end.to_be_bytes());
        body.extend_from_slice(&time.to_be_bytes());
        body.extend_from_slice(data);
        frame(b'd', &body)
    }

    fn next_event(buf: &mut BytesMut) -> Option<ReplicationEvent> {
        let f = split_frame(buf).unwrap()?;
        assert_eq!(f.tag, b'd');
        Some(decode_copy_data(f.body).unwrap())
    }

    #[test]
    fn decodes_xlogdata_and_keepalive() {
        let mut keepalive = vec![b'k'];
        keepalive.extend_from_slice(&0x1_0000_0010u64.to_be_bytes());
        keepalive.extend_from_slice(&77i64.to_be_bytes());
        keepalive.push(1);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&xlogdata(0x16_B374_D848, 0x16_B374_D900, 42, b"BEGIN"));
        buf.extend_from_slice(&frame(b'd', &keepalive));

        assert_eq!(
            next_event(&mut buf),
            Some(ReplicationEvent::XLogData {
                wal_start: Lsn(0x16_B374_D848),
                wal_end: Lsn(0x16_B374_D900),
                send_time: 42,
                data: Bytes::from_static(b"BEGIN"),
            })
        );
        assert_eq!(
            next_event(&mut buf),
            Some(ReplicationEvent::Keepalive {
                wal_end: Lsn(0x1_0000_0010),
                send_time: 77,
                reply_requested: true,
            })
        );
        assert!(buf.is_empty());
        assert_eq!(next_event(&mut buf), None);
    }

    #[test]
    fn partial_frames_wait_for_more_bytes() {
        let whole = xlogdata(1, 2, 3, &[7; 1000]);
        let mut buf = BytesMut::new();
        for (i, byte) in whole.iter().enumerate() {
            assert!(
                split_frame(&mut buf).unwrap().is_none(),
                "complete after {i} bytes"
            );
            buf.put_u8(*byte);
        }
        match next_event(&mut buf) {
            Some(ReplicationEvent::XLogData { data, .. }) => assert_eq!(&data[..], &[7; 1000]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejects_malformed_frames() {
        let mut buf = BytesMut::from(&[b'd', 0, 0, 0, 2][..]);
        assert!(matches!(
            split_frame(&mut buf),
            Err(ReplicationError::Protocol(_))
        ));
        let mut buf = BytesMut::from(&[b'd', 0x7f, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            split_frame(&mut buf),
            Err(ReplicationError::Protocol(_))
        ));
        for body in [&b"w\0\0"[..], b"k", b"x123", b""] {
            let err = decode_copy_data(Bytes::copy_from_slice(body)).unwrap_err();
            assert!(matches!(err, ReplicationError::Protocol(_)), "{err}");
        }
    }

    #[test]
    fn parses_error_response_fields() {
        let body = b"SERROR\0VERROR\0C42704\0Mreplication slot \"nope\" does not exist\0\
                     Dsome detail\0Hcreate it\0Fslot.c\0\0";
        let err = server_error(body);
        assert_eq!(err.code(), Some("42704"));
        assert!(!err.is_retryable());
        match &err {
            ReplicationError::Server {
                severity,
                message,
                detail,
                hint,
                ..
            } => {
                assert_eq!(severity, "ERROR");
                assert_eq!(message, "replication slot \"nope\" does not exist");
                assert_eq!(detail.as_deref(), Some("some detail"));
                assert_eq!(hint.as_deref(), Some("create it"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            err.to_string(),
            "server error 42704 (ERROR): replication slot \"nope\" does not exist (detail: some detail) (hint: create it)"
        );
        // Truncated input still yields an error value, never a panic.
        assert!(matches!(
            server_error(b"C5530"),
            ReplicationError::Server { .. }
        ));
    }

    #[test]
    fn parses_data_rows() {
        let mut body = 2i16.to_be_bytes().to_vec();
        body.extend_from_slice(&7i32.to_be_bytes());
        body.extend_from_slice(b"logical");
        body.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(
            parse_data_row(&body).unwrap(),
            vec![Some("logical".to_string()), None]
        );
        assert!(parse_data_row(&body[..6]).is_err());
    }

    #[test]
    fn quotes_the_start_command() {
        assert_eq!(
            start_replication_command("my\"slot", Lsn(0x1_0000_0002), "it's pub", false),
            "START_REPLICATION SLOT \"my\"\"slot\" LOGICAL 1/2 (proto_version '1', publication_names '\"it''s pub\"', messages 'false')"
        );
        assert_eq!(
            start_replication_command("s", Lsn(0), "p", true),
            "START_REPLICATION SLOT \"s\" LOGICAL 0/0 (proto_version '2', publication_names '\"p\"', messages 'false', streaming 'on')"
        );
    }

    #[test]
    fn encodes_status_update() {
        let mut buf = BytesMut::new();
        write_status_update(&mut buf, Lsn(1), Lsn(2), Lsn(3), 4, true);
        assert_eq!(buf.len(), 39);
        assert_eq!(&buf[..6], &[b'd', 0, 0, 0, 38, b'r']);
        assert_eq!(&buf[6..14], &1u64.to_be_bytes());
        assert_eq!(&buf[22..30], &3u64.to_be_bytes());
        assert_eq!(&buf[30..38], &4i64.to_be_bytes());
        assert_eq!(buf[38], 1);
    }
}

#[cfg(test)]
mod props;
