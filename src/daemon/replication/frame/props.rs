//! Property tests of the frame splitter and the CopyData decoder: whatever the chunking of
//! the stream, the same frames come out; short input waits; lying lengths are errors.

use bytes::{BufMut, Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;

use super::*;
use crate::fuzz;

/// A backend message as the server sends it, with what it must decode to.
#[derive(Debug, Clone)]
enum Sent {
    /// CopyData holding XLogData ('w').
    XLogData {
        wal_start: u64,
        wal_end: u64,
        send_time: i64,
        data: Vec<u8>,
    },
    /// CopyData holding a primary keepalive ('k'); `reply` is the raw byte.
    Keepalive {
        wal_end: u64,
        send_time: i64,
        reply: u8,
    },
    /// ErrorResponse ('E') or NoticeResponse ('N'): fields of (code, value), each code once.
    Fields { tag: u8, fields: Vec<(u8, String)> },
    /// DataRow ('D').
    DataRow(Vec<Option<String>>),
    /// Any other message (CopyBothResponse 'W', CopyDone 'c', CommandComplete 'C',
    /// ReadyForQuery 'Z', ...): passed through as a tag and a body.
    Other { tag: u8, body: Vec<u8> },
}

impl Sent {
    fn tag(&self) -> u8 {
        match self {
            Sent::XLogData { .. } | Sent::Keepalive { .. } => b'd',
            Sent::Fields { tag, .. } | Sent::Other { tag, .. } => *tag,
            Sent::DataRow(_) => b'D',
        }
    }

    fn body(&self) -> Vec<u8> {
        let mut body = BytesMut::new();
        match self {
            Sent::XLogData {
                wal_start,
                wal_end,
                send_time,
                data,
            } => {
                body.put_u8(b'w');
                body.put_u64(*wal_start);
                body.put_u64(*wal_end);
                body.put_i64(*send_time);
                body.put_slice(data);
            }
            Sent::Keepalive {
                wal_end,
                send_time,
                reply,
            } => {
                body.put_u8(b'k');
                body.put_u64(*wal_end);
                body.put_i64(*send_time);
                body.put_u8(*reply);
            }
            Sent::Fields { fields, .. } => {
                for (code, value) in fields {
                    body.put_u8(*code);
                    body.put_slice(value.as_bytes());
                    body.put_u8(0);
                }
                body.put_u8(0);
            }
            Sent::DataRow(values) => {
                body.put_i16(i16::try_from(values.len()).unwrap());
                for value in values {
                    match value {
                        None => body.put_i32(-1),
                        Some(v) => {
                            body.put_i32(i32::try_from(v.len()).unwrap());
                            body.put_slice(v.as_bytes());
                        }
                    }
                }
            }
            Sent::Other { body: raw, .. } => body.put_slice(raw),
        }
        body.to_vec()
    }

    /// The whole message: tag, Int32 length (itself included), body.
    fn wire(&self) -> Vec<u8> {
        let body = self.body();
        let mut out = vec![self.tag()];
        out.extend_from_slice(&(i32::try_from(body.len()).unwrap() + 4).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Checks what the client decodes from the frame's body.
    fn check(&self, frame: &Frame) -> Result<(), TestCaseError> {
        prop_assert_eq!(frame.tag, self.tag());
        prop_assert_eq!(&frame.body[..], &self.body()[..]);
        match self {
            Sent::XLogData {
                wal_start,
                wal_end,
                send_time,
                data,
            } => prop_assert_eq!(
                decode_copy_data(frame.body.clone()).unwrap(),
                ReplicationEvent::XLogData {
                    wal_start: Lsn(*wal_start),
                    wal_end: Lsn(*wal_end),
                    send_time: *send_time,
                    data: Bytes::copy_from_slice(data),
                }
            ),
            Sent::Keepalive {
                wal_end,
                send_time,
                reply,
            } => prop_assert_eq!(
                decode_copy_data(frame.body.clone()).unwrap(),
                ReplicationEvent::Keepalive {
                    wal_end: Lsn(*wal_end),
                    send_time: *send_time,
                    reply_requested: *reply != 0,
                }
            ),
            Sent::Fields { fields, .. } => {
                let ReplicationError::Server {
                    severity,
                    code,
                    message,
                    detail,
                    hint,
                } = server_error(&frame.body)
                else {
                    return Err(TestCaseError::fail("not a server error"));
                };
                // Postgres sends each field once; the untranslated 'V' beats 'S'.
                let field = |c: u8| {
                    fields
                        .iter()
                        .find(|(code, _)| *code == c)
                        .map(|(_, v)| v.clone())
                };
                let expected_severity = field(b'V').or(field(b'S')).unwrap_or_default();
                prop_assert_eq!(severity, expected_severity);
                prop_assert_eq!(code, field(b'C').unwrap_or_default());
                prop_assert_eq!(message, field(b'M').unwrap_or_default());
                prop_assert_eq!(detail, field(b'D'));
                prop_assert_eq!(hint, field(b'H'));
            }
            Sent::DataRow(values) => {
                prop_assert_eq!(&parse_data_row(&frame.body).unwrap(), values);
            }
            Sent::Other { .. } => {}
        }
        Ok(())
    }
}

/// Field text without NUL (the terminator).
fn text() -> impl Strategy<Value = String> {
    "[^\u{0}]{0,16}"
}

fn sent() -> impl Strategy<Value = Sent> {
    prop_oneof![
        3 => (any::<u64>(), any::<u64>(), any::<i64>(), vec(any::<u8>(), 0..200)).prop_map(
            |(wal_start, wal_end, send_time, data)| Sent::XLogData {
                wal_start,
                wal_end,
                send_time,
                data,
            }
        ),
        2 => (any::<u64>(), any::<i64>(), prop_oneof![Just(0u8), Just(1u8), any::<u8>()])
            .prop_map(|(wal_end, send_time, reply)| Sent::Keepalive {
                wal_end,
                send_time,
                reply,
            }),
        1 => (
            prop_oneof![Just(b'E'), Just(b'N')],
            proptest::sample::subsequence(b"SVCMDHFLRPq".to_vec(), 0..=11).prop_shuffle(),
            vec("[^\u{0}]{1,16}", 11),
        )
            .prop_map(|(tag, codes, values)| Sent::Fields {
                tag,
                fields: codes.into_iter().zip(values).collect(),
            }),
        1 => vec(proptest::option::of(text()), 0..5).prop_map(Sent::DataRow),
        1 => (
            proptest::sample::select(b"WcCZTtsKS".to_vec()),
            vec(any::<u8>(), 0..24),
        )
            .prop_map(|(tag, body)| Sent::Other { tag, body }),
    ]
}

/// Cut points (as fractions of the stream) at which the bytes arrive.
fn cuts() -> impl Strategy<Value = Vec<prop::sample::Index>> {
    vec(any::<prop::sample::Index>(), 0..12)
}

/// Feeds `stream` in pieces cut at `cuts`, splitting frames after each piece as the client
/// does; a piece that completes no frame must leave the buffer as it was.
fn split_in_pieces(
    stream: &[u8],
    cuts: &[prop::sample::Index],
) -> Result<Vec<Frame>, TestCaseError> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
    at.push(0);
    at.push(stream.len());
    at.sort_unstable();
    at.dedup();
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for piece in at.windows(2) {
        buf.extend_from_slice(&stream[piece[0]..piece[1]]);
        loop {
            let before = buf.clone();
            match split_frame(&mut buf) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => {
                    prop_assert_eq!(&buf[..], &before[..], "Ok(None) consumed bytes");
                    break;
                }
                Err(e) => return Err(TestCaseError::fail(format!("valid stream: {e}"))),
            }
        }
    }
    prop_assert!(buf.is_empty(), "{} bytes left over", buf.len());
    Ok(frames)
}

proptest! {
    #![proptest_config(fuzz::config(2048))]

    #[test]
    fn any_chunking_yields_the_frames_sent(sent in vec(sent(), 0..8), cuts in cuts()) {
        let stream: Vec<u8> = sent.iter().flat_map(Sent::wire).collect();
        let whole = split_in_pieces(&stream, &[])?;
        let pieces = split_in_pieces(&stream, &cuts)?;
        prop_assert_eq!(whole.len(), sent.len());
        prop_assert_eq!(pieces.len(), sent.len());
        for ((s, w), p) in sent.iter().zip(&whole).zip(&pieces) {
            s.check(w)?;
            s.check(p)?;
        }
    }

    /// Every strict prefix of a frame is `Ok(None)` and stays in the buffer.
    #[test]
    fn short_input_waits(sent in sent()) {
        let wire = sent.wire();
        for len in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..len]);
            prop_assert!(matches!(split_frame(&mut buf), Ok(None)), "cut at {}", len);
            prop_assert_eq!(&buf[..], &wire[..len]);
        }
    }

    /// A length word below 4 (negative included) or beyond the 1 GiB Postgres never sends is
    /// an error as soon as the header is in, whatever follows it.
    #[test]
    fn lying_lengths_are_errors(
        tag in any::<u8>(),
        len in prop_oneof![
            i32::MIN..4,
            (1i32 << 30)..=i32::MAX,
        ],
        rest in vec(any::<u8>(), 0..32),
    ) {
        let mut buf = BytesMut::new();
        buf.put_u8(tag);
        buf.put_i32(len);
        buf.put_slice(&rest);
        prop_assert!(
            matches!(split_frame(&mut buf), Err(ReplicationError::Protocol(_))),
            "length {}", len
        );
    }

    /// A frame whose length is honest but whose bytes are not all in waits for them. (A
    /// length of 4, an empty body, is complete with the header: `short_input_waits` has it.)
    #[test]
    fn honest_lengths_wait_for_their_bytes(
        tag in any::<u8>(),
        len in 5i32..(1 << 20),
        have in any::<prop::sample::Index>(),
    ) {
        let have = have.index(usize::try_from(len).unwrap() - 4);
        let mut buf = BytesMut::new();
        buf.put_u8(tag);
        buf.put_i32(len);
        buf.put_bytes(7, have);
        prop_assert!(matches!(split_frame(&mut buf), Ok(None)));
        prop_assert_eq!(buf.len(), 5 + have);
    }

    /// Arbitrary bytes, split and decoded as the client would: errors, never panics.
    #[test]
    fn arbitrary_bytes_never_panic(
        stream in vec(
            prop_oneof![
                3 => any::<u8>(),
                1 => proptest::sample::select(b"\0\0\0\x04\x08\x19dwkEDN\xff".to_vec()),
            ],
            0..160,
        ),
    ) {
        let mut buf = BytesMut::from(&stream[..]);
        while let Ok(Some(frame)) = split_frame(&mut buf) {
            let _ = decode_copy_data(frame.body.clone());
            let _ = server_error(&frame.body);
            let _ = parse_data_row(&frame.body);
        }
    }

    /// CopyData bodies: 'w' and 'k' with fewer bytes than their fixed fields are errors.
    #[test]
    fn short_copy_data_is_an_error(
        kind in proptest::sample::select(b"wk".to_vec()),
        rest in vec(any::<u8>(), 0..24),
    ) {
        let fixed = if kind == b'w' { 24 } else { 17 };
        let mut body = vec![kind];
        body.extend_from_slice(&rest);
        let result = decode_copy_data(Bytes::from(body));
        prop_assert_eq!(result.is_ok(), rest.len() >= fixed, "{:?}", result);
    }
}
