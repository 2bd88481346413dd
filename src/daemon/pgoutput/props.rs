//! Property tests of the decoder: arbitrary bytes, and messages built by a small encoder
//! that follows the protocol-version-1 and -2 (streaming) message formats (PostgreSQL docs, "Logical
//! Replication Message Formats") independently of the decoder.

use bytes::{BufMut, Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;

use super::*;
use crate::fuzz;

/// `super::Result` is the decoder's; a property's checks fail with a `TestCaseError`.
type Check = std::result::Result<(), TestCaseError>;

/// Writes `message` as pgoutput would. `message_flags` is the flags byte of a logical
/// message (only bit 0, transactional, is defined; the decoder ignores the others).
fn encode(message: &Message, message_flags: u8) -> Bytes {
    encode_with(message, message_flags, None)
}

/// Writes `message` as pgoutput does inside a stream block: changes carry `xid` after the
/// tag.
fn encode_streamed(message: &Message, message_flags: u8, xid: u32) -> Bytes {
    let xid = match message {
        Message::Relation(_)
        | Message::Type(_)
        | Message::Insert(_)
        | Message::Update(_)
        | Message::Delete(_)
        | Message::Truncate(_)
        | Message::Message(_) => Some(xid),
        _ => None,
    };
    encode_with(message, message_flags, xid)
}

fn encode_with(message: &Message, message_flags: u8, xid: Option<u32>) -> Bytes {
    let mut out = BytesMut::new();
    // The tag, then the xid of a streamed change, then the body.
    let tagged = |out: &mut BytesMut, tag: u8| {
        out.put_u8(tag);
        if let Some(xid) = xid {
            out.put_u32(xid);
        }
    };
    match message {
        Message::Begin(b) => {
            out.put_u8(b'B');
            out.put_u64(b.final_lsn.0);
            out.put_i64(b.commit_time);
            out.put_u32(b.xid);
        }
        Message::Commit(c) => {
            out.put_u8(b'C');
            out.put_u8(c.flags);
            out.put_u64(c.commit_lsn.0);
            out.put_u64(c.end_lsn.0);
            out.put_i64(c.commit_time);
        }
        Message::Origin(o) => {
            out.put_u8(b'O');
            out.put_u64(o.commit_lsn.0);
            put_string(&mut out, &o.name);
        }
        Message::Relation(r) => {
            tagged(&mut out, b'R');
            out.put_u32(r.id);
            put_string(&mut out, &r.namespace);
            put_string(&mut out, &r.name);
            out.put_u8(r.replica_identity);
            out.put_u16(u16::try_from(r.columns.len()).unwrap());
            for c in &r.columns {
                out.put_u8(c.flags);
                put_string(&mut out, &c.name);
                out.put_u32(c.type_oid);
                out.put_i32(c.type_modifier);
            }
        }
        Message::Type(t) => {
            tagged(&mut out, b'Y');
            out.put_u32(t.id);
            put_string(&mut out, &t.namespace);
            put_string(&mut out, &t.name);
        }
        Message::Insert(i) => {
            tagged(&mut out, b'I');
            out.put_u32(i.relation_id);
            out.put_u8(b'N');
            put_tuple(&mut out, &i.new);
        }
        Message::Update(u) => {
            tagged(&mut out, b'U');
            out.put_u32(u.relation_id);
            if let Some(old) = &u.old {
                put_old(&mut out, old);
            }
            out.put_u8(b'N');
            put_tuple(&mut out, &u.new);
        }
        Message::Delete(d) => {
            tagged(&mut out, b'D');
            out.put_u32(d.relation_id);
            put_old(&mut out, &d.old);
        }
        Message::Truncate(t) => {
            tagged(&mut out, b'T');
            out.put_u32(u32::try_from(t.relation_ids.len()).unwrap());
            out.put_u8(t.options);
            for id in &t.relation_ids {
                out.put_u32(*id);
            }
        }
        Message::Message(m) => {
            tagged(&mut out, b'M');
            out.put_u8(message_flags);
            out.put_u64(m.lsn.0);
            put_string(&mut out, &m.prefix);
            out.put_i32(i32::try_from(m.content.len()).unwrap());
            out.put_slice(&m.content);
        }
        Message::StreamStart(st) => {
            out.put_u8(b'S');
            out.put_u32(st.xid);
            out.put_u8(u8::from(st.first_segment));
        }
        Message::StreamStop => out.put_u8(b'E'),
        Message::StreamCommit(c) => {
            out.put_u8(b'c');
            out.put_u32(c.xid);
            out.put_u8(c.flags);
            out.put_u64(c.commit_lsn.0);
            out.put_u64(c.end_lsn.0);
            out.put_i64(c.commit_time);
        }
        Message::StreamAbort(a) => {
            out.put_u8(b'A');
            out.put_u32(a.xid);
            out.put_u32(a.subxid);
        }
    }
    out.freeze()
}

fn put_string(out: &mut BytesMut, s: &str) {
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

fn put_old(out: &mut BytesMut, old: &OldTuple) {
    out.put_u8(match old {
        OldTuple::Key(_) => b'K',
        OldTuple::Full(_) => b'O',
    });
    put_tuple(out, old.tuple());
}

fn put_tuple(out: &mut BytesMut, tuple: &Tuple) {
    out.put_u16(u16::try_from(tuple.0.len()).unwrap());
    for value in &tuple.0 {
        match value {
            TupleData::Null => out.put_u8(b'n'),
            TupleData::Unchanged => out.put_u8(b'u'),
            TupleData::Text(v) | TupleData::Binary(v) => {
                out.put_u8(if matches!(value, TupleData::Text(_)) {
                    b't'
                } else {
                    b'b'
                });
                out.put_i32(i32::try_from(v.len()).unwrap());
                out.put_slice(v);
            }
        }
    }
}

/// Identifiers and prefixes: any UTF-8 without NUL, short.
fn name() -> impl Strategy<Value = String> {
    "[^\u{0}]{0,12}"
}

fn lsn() -> impl Strategy<Value = Lsn> {
    any::<u64>().prop_map(Lsn)
}

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..=max).prop_map(Bytes::from)
}

fn tuple_data() -> impl Strategy<Value = TupleData> {
    prop_oneof![
        Just(TupleData::Null),
        Just(TupleData::Unchanged),
        bytes(40).prop_map(TupleData::Text),
        bytes(40).prop_map(TupleData::Binary),
    ]
}

fn tuple() -> impl Strategy<Value = Tuple> {
    vec(tuple_data(), 0..8).prop_map(Tuple)
}

fn old_tuple() -> impl Strategy<Value = OldTuple> {
    prop_oneof![
        tuple().prop_map(OldTuple::Key),
        tuple().prop_map(OldTuple::Full)
    ]
}

fn column() -> impl Strategy<Value = Column> {
    (any::<u8>(), name(), any::<u32>(), any::<i32>()).prop_map(
        |(flags, name, type_oid, type_modifier)| Column {
            flags,
            name,
            type_oid,
            type_modifier,
        },
    )
}

/// Every kind of protocol-version-1 and -2 message, with the flags byte to write for a logical
/// message (bit 0 must match `transactional`).
fn message() -> impl Strategy<Value = (Message, u8)> {
    let message = prop_oneof![
        (lsn(), any::<i64>(), any::<u32>()).prop_map(|(final_lsn, commit_time, xid)| {
            Message::Begin(Begin {
                final_lsn,
                commit_time,
                xid,
            })
        }),
        (any::<u8>(), lsn(), lsn(), any::<i64>()).prop_map(
            |(flags, commit_lsn, end_lsn, commit_time)| Message::Commit(Commit {
                flags,
                commit_lsn,
                end_lsn,
                commit_time,
            })
        ),
        (lsn(), name()).prop_map(|(commit_lsn, name)| Message::Origin(Origin { commit_lsn, name })),
        (
            any::<u32>(),
            name(),
            name(),
            any::<u8>(),
            vec(column(), 0..8)
        )
            .prop_map(
                |(id, namespace, name, replica_identity, columns)| Message::Relation(Relation {
                    id,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                })
            ),
        (any::<u32>(), name(), name()).prop_map(|(id, namespace, name)| Message::Type(
            TypeMessage {
                id,
                namespace,
                name
            }
        )),
        (any::<u32>(), tuple())
            .prop_map(|(relation_id, new)| Message::Insert(Insert { relation_id, new })),
        (any::<u32>(), proptest::option::of(old_tuple()), tuple()).prop_map(
            |(relation_id, old, new)| Message::Update(Update {
                relation_id,
                old,
                new,
            })
        ),
        (any::<u32>(), old_tuple())
            .prop_map(|(relation_id, old)| Message::Delete(Delete { relation_id, old })),
        (any::<u8>(), vec(any::<u32>(), 0..8)).prop_map(|(options, relation_ids)| {
            Message::Truncate(Truncate {
                options,
                relation_ids,
            })
        }),
        (any::<bool>(), lsn(), name(), bytes(40)).prop_map(
            |(transactional, lsn, prefix, content)| Message::Message(LogicalMessage {
                transactional,
                lsn,
                prefix,
                content,
            })
        ),
        (any::<u32>(), any::<bool>()).prop_map(|(xid, first_segment)| Message::StreamStart(
            StreamStart { xid, first_segment }
        )),
        Just(Message::StreamStop),
        (any::<u32>(), any::<u8>(), lsn(), lsn(), any::<i64>()).prop_map(
            |(xid, flags, commit_lsn, end_lsn, commit_time)| Message::StreamCommit(StreamCommit {
                xid,
                flags,
                commit_lsn,
                end_lsn,
                commit_time,
            })
        ),
        (any::<u32>(), any::<u32>())
            .prop_map(|(xid, subxid)| Message::StreamAbort(StreamAbort { xid, subxid })),
    ];
    (message, any::<u8>()).prop_map(|(message, high_bits)| {
        let flags = match &message {
            Message::Message(m) => (high_bits & !1) | u8::from(m.transactional),
            _ => 0,
        };
        (message, flags)
    })
}

/// Bytes that start like a message often enough to reach past the tag: a known tag (or any
/// byte), then bytes biased towards markers, column kinds, NULs and small lengths.
fn noise() -> impl Strategy<Value = Vec<u8>> {
    let first = prop_oneof![
        3 => proptest::sample::select(b"BCORYIUDTMSEcAbPKrp".to_vec()),
        1 => any::<u8>(),
    ];
    let body = vec(
        prop_oneof![
            2 => any::<u8>(),
            1 => proptest::sample::select(b"\0\x01\xffNKOntub".to_vec()),
        ],
        0..96,
    );
    (first, body).prop_map(|(first, mut body)| {
        body.insert(0, first);
        body
    })
}

/// The error's byte offsets lie inside the payload, and its numbers are consistent with it.
fn check_error(err: &DecodeError, len: usize) -> Check {
    match *err {
        DecodeError::Empty => prop_assert_eq!(len, 0),
        DecodeError::UnknownTag(_) | DecodeError::Unsupported { .. } => prop_assert!(len >= 1),
        DecodeError::Truncated {
            at,
            needed,
            available,
            ..
        } => {
            prop_assert_eq!(at + available, len, "{}", err);
            prop_assert!(needed > available, "{}", err);
        }
        // A string may start right at the end: no bytes, so no NUL.
        DecodeError::UnterminatedString { at, .. } => prop_assert!(at <= len, "{}", err),
        DecodeError::BadString { at, .. } => prop_assert!(at < len, "{}", err),
        DecodeError::UnexpectedPart { at, .. } | DecodeError::NegativeLength { at, .. } => {
            prop_assert!(at < len, "{}", err);
        }
        DecodeError::CountTooLarge {
            at,
            available,
            count,
            ..
        } => {
            prop_assert!(at + available <= len, "{}", err);
            prop_assert!(count > 0 && count > available as u64 / 10, "{}", err);
        }
        DecodeError::TrailingBytes { at, len: extra, .. } => {
            prop_assert!(extra > 0, "{}", err);
            prop_assert_eq!(at + extra, len, "{}", err);
        }
    }
    Ok(())
}

/// What a decoded payload must have been: the decoder drops nothing but the undefined bits
/// of a logical message's flags and of Stream Start's first-segment flag.
fn reencodes_to(payload: &[u8], in_stream: bool) -> Check {
    let decoded = if in_stream {
        decode_streamed(Bytes::copy_from_slice(payload))
    } else {
        decode(Bytes::copy_from_slice(payload)).map(|message| Streamed { xid: None, message })
    };
    if let Ok(Streamed { xid, message }) = decoded {
        let flags_at = if xid.is_some() { 5 } else { 1 };
        let flags = if payload[0] == b'M' {
            payload[flags_at]
        } else {
            0
        };
        let mut expected = payload.to_vec();
        if payload[0] == b'S' {
            expected[5] = u8::from(expected[5] == 1);
        }
        let encoded = match xid {
            Some(xid) => encode_streamed(&message, flags, xid),
            None => encode(&message, flags),
        };
        prop_assert_eq!(&encoded[..], &expected[..], "{:?}", message);
    }
    Ok(())
}

fn decode_in(payload: Bytes, in_stream: bool) -> Result<Message> {
    if in_stream {
        decode_streamed(payload).map(|s| s.message)
    } else {
        decode(payload)
    }
}

fn encode_in(message: &Message, flags: u8, in_stream: bool, xid: u32) -> Bytes {
    if in_stream {
        encode_streamed(message, flags, xid)
    } else {
        encode(message, flags)
    }
}

proptest! {
    #![proptest_config(fuzz::config(2048))]

    /// Anything decodes or fails with an error whose offsets fit the payload, and whatever
    /// decodes is exactly what the bytes say.
    #[test]
    fn arbitrary_bytes_never_panic(payload in noise(), in_stream in any::<bool>()) {
        match decode_in(Bytes::from(payload.clone()), in_stream) {
            Ok(_) => reencodes_to(&payload, in_stream)?,
            Err(err) => check_error(&err, payload.len())?,
        }
    }

    #[test]
    fn valid_messages_decode_to_what_was_encoded((message, flags) in message()) {
        let payload = encode(&message, flags);
        prop_assert_eq!(decode(payload.clone()), Ok(message));
    }

    /// Inside a stream block, changes carry their xid and everything else reads as outside.
    #[test]
    fn streamed_messages_decode_to_what_was_encoded(
        (message, flags) in message(),
        xid in any::<u32>(),
    ) {
        let payload = encode_streamed(&message, flags, xid);
        let carries = payload.len() != encode(&message, flags).len();
        prop_assert_eq!(
            decode_streamed(payload),
            Ok(Streamed { xid: carries.then_some(xid), message })
        );
    }

    /// A cut message is reported as cut: never decoded as some other message, never a
    /// complaint about a byte it does not have.
    #[test]
    fn every_strict_prefix_is_a_truncation(
        (message, flags) in message(),
        in_stream in any::<bool>(),
        xid in any::<u32>(),
    ) {
        let payload = encode_in(&message, flags, in_stream, xid);
        for len in 0..payload.len() {
            let err = decode_in(payload.slice(..len), in_stream)
                .expect_err("a strict prefix decoded");
            prop_assert!(
                matches!(
                    err,
                    DecodeError::Empty
                        | DecodeError::Truncated { .. }
                        | DecodeError::UnterminatedString { .. }
                        | DecodeError::CountTooLarge { .. }
                ),
                "{:?} cut at {}: {}", message, len, err
            );
            check_error(&err, len)?;
        }
    }

    /// `decode` documents bytes left over at the end as an error: exactly one message per
    /// payload.
    #[test]
    fn trailing_bytes_are_reported_where_they_start(
        (message, flags) in message(),
        garbage in vec(any::<u8>(), 1..16),
        in_stream in any::<bool>(),
        xid in any::<u32>(),
    ) {
        let payload = encode_in(&message, flags, in_stream, xid);
        let mut longer = payload.to_vec();
        longer.extend_from_slice(&garbage);
        prop_assert_eq!(
            decode_in(Bytes::from(longer), in_stream),
            Err(DecodeError::TrailingBytes {
                message: message.kind(),
                at: payload.len(),
                len: garbage.len(),
            })
        );
    }

    /// One corrupted byte of a valid message: an error with sane offsets, or a message that
    /// encodes back to the corrupted bytes.
    #[test]
    fn corrupted_messages_never_panic(
        (message, flags) in message(),
        at in any::<prop::sample::Index>(),
        value in any::<u8>(),
        in_stream in any::<bool>(),
        xid in any::<u32>(),
    ) {
        let mut payload = encode_in(&message, flags, in_stream, xid).to_vec();
        let at = at.index(payload.len());
        payload[at] = value;
        match decode_in(Bytes::from(payload.clone()), in_stream) {
            Ok(_) => reencodes_to(&payload, in_stream)?,
            Err(err) => check_error(&err, payload.len())?,
        }
    }
}
