//! Tables stored as hashes (`format = "hash"`): a field per column, the text the daemon's
//! encoder gives it (`encode_field`: numbers as digits, booleans as `true`/`false`, times in
//! RFC 3339), NULL columns without a field.
//!
//! The lease protocol is the same as for JSON rows: `HGETALL`; on a miss `acquire.lua`
//! (with `hash`: it answers with the fields when the key is there), the row read under the
//! lease, and `fill.lua` (with `hash`: `HSET` of the fields, `PEXPIRE` with the table's TTL)
//! only while the lease holds, the key is absent and the daemon has applied up to the read.
//! Differences from JSON tables: no single flight in process, no batch `MGET` (`get_many`
//! looks keys up concurrently) and no early refresh.
//!
//! In process a hash row travels as a JSON object of strings (`{"id":"1","total":"9.50"}`,
//! what [`get_raw`](super::Table::get_raw) returns for such tables); [`decode`] turns it into
//! the caller's type, parsing numbers and booleans from the fields' text.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde::de::{self, DeserializeOwned, IntoDeserializer};

use super::lease::{self, Backoff, ABSENT};
use super::source::KeyTexts;
use super::stats::Event;
use super::{Inner, Key, ReaderError, TableEntry};

/// Writes fields as a JSON object of strings.
pub(crate) fn write_fields<'a>(
    out: &mut Vec<u8>,
    fields: impl IntoIterator<Item = (&'a str, &'a str)>,
) {
    out.push(b'{');
    for (i, (name, value)) in fields.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        // Strings always serialize.
        let _ = serde_json::to_writer(&mut *out, name);
        out.push(b':');
        let _ = serde_json::to_writer(&mut *out, value);
    }
    out.push(b'}');
}

fn fields_to_bytes(fields: &[(String, String)]) -> Bytes {
    let mut out = Vec::new();
    write_fields(
        &mut out,
        fields.iter().map(|(n, v)| (n.as_str(), v.as_str())),
    );
    Bytes::from(out)
}

fn pairs(flat: Vec<redis::Value>) -> Vec<(String, String)> {
    let text = |v: redis::Value| match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
        redis::Value::SimpleString(s) => s,
        _ => String::new(),
    };
    let mut out = Vec::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(f), Some(v)) = (it.next(), it.next()) {
        out.push((text(f), text(v)));
    }
    out
}

/// The row of a hash table as a JSON object of strings; `None` when no row has the key.
pub(super) async fn fetch(
    inner: &Arc<Inner>,
    entry: &Arc<TableEntry>,
    key: &impl Key,
) -> Result<(String, Option<Bytes>), ReaderError> {
    let texts = entry.key_texts(&inner.key_prefix, key)?;
    let mut conn = inner.redis.clone();
    let found: redis::RedisResult<Vec<(String, String)>> = redis::cmd("HGETALL")
        .arg(&texts.redis_key)
        .query_async(&mut conn)
        .await;
    let value = match found {
        Ok(fields) if !fields.is_empty() => {
            inner.redis_worked();
            entry.counters.record(Event::Hit);
            Some(fields_to_bytes(&fields))
        }
        Ok(_) => {
            inner.redis_worked();
            entry.counters.record(Event::Miss);
            lead(inner, entry, &texts).await?
        }
        Err(e) => {
            inner.redis_failed(&e);
            entry.counters.record(Event::Miss);
            entry.counters.record(Event::Fallback);
            read(inner, entry, &texts).await?.0
        }
    };
    Ok((texts.redis_key, value))
}

async fn read(
    inner: &Inner,
    entry: &TableEntry,
    key: &KeyTexts,
) -> Result<(Option<Bytes>, crate::Lsn), ReaderError> {
    let mut read = lease::read_rows(inner, entry, std::slice::from_ref(key)).await?;
    Ok((read.rows.pop().flatten().map(Bytes::from), read.at))
}

enum Found {
    Hit(Bytes),
    Acquired(String),
    Held,
    Absent,
}

async fn acquire(inner: &Inner, key: &KeyTexts) -> Result<Found, redis::RedisError> {
    let lease_key = crate::template::lease_key(&key.redis_key);
    let token = lease::new_token();
    let mut conn = inner.redis.clone();
    let reply: redis::Value = lease::ACQUIRE
        .key(&key.redis_key)
        .key(&lease_key)
        .arg(&token)
        .arg(lease::millis(inner.options.lease_ttl))
        .arg(ABSENT)
        .arg("hash")
        .invoke_async(&mut conn)
        .await?;
    let mut items = match reply {
        redis::Value::Array(items) => items.into_iter(),
        _ => Vec::new().into_iter(),
    };
    Ok(match (items.next(), items.next()) {
        (Some(redis::Value::Int(1)), Some(redis::Value::Array(flat))) => {
            Found::Hit(fields_to_bytes(&pairs(flat)))
        }
        (Some(redis::Value::Int(2)), _) => Found::Acquired(token),
        (Some(redis::Value::Int(3)), _) => Found::Held,
        (Some(redis::Value::Int(4)), _) => Found::Absent,
        _ => {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Parse,
                "unexpected reply from the pgcache acquire script",
            )))
        }
    })
}

/// The lease protocol for one hash key (see the module's doc).
async fn lead(
    inner: &Arc<Inner>,
    entry: &Arc<TableEntry>,
    key: &KeyTexts,
) -> Result<Option<Bytes>, ReaderError> {
    let mut backoff = Backoff::new(inner.options.max_wait_step);
    let deadline = Instant::now() + inner.options.lease_ttl + inner.options.max_wait_step;
    let mut waited = false;
    loop {
        let token = match acquire(inner, key).await {
            Ok(Found::Hit(value)) => return Ok(Some(value)),
            Ok(Found::Absent) => {
                entry.counters.record(Event::NegativeHit);
                return Ok(None);
            }
            Ok(Found::Acquired(token)) => token,
            Ok(Found::Held) => {
                if !waited {
                    waited = true;
                    entry.counters.record(Event::Wait);
                }
                let now = Instant::now();
                if now >= deadline {
                    // As for JSON tables: the row read now may be ahead of the daemon, and
                    // the slow holder's older fill may still land; return it only once the
                    // daemon has applied up to it, so no later read sees an older one (G10).
                    entry.counters.record(Event::WaitTimeout);
                    let (row, at) = read(inner, entry, key).await?;
                    let _ = lease::wait_applied(inner, entry, at).await;
                    return Ok(row);
                }
                tokio::time::sleep(backoff.step().min(deadline - now)).await;
                continue;
            }
            Err(e) => {
                inner.redis_failed(&e);
                entry.counters.record(Event::Fallback);
                return Ok(read(inner, entry, key).await?.0);
            }
        };
        let lease_key = crate::template::lease_key(&key.redis_key);
        let (row, at) = match read(inner, entry, key).await {
            Ok(read) => read,
            Err(e) => {
                let _ = lease::release(inner, &lease_key, &token).await;
                return Err(e);
            }
        };
        let fields: Vec<(String, String)> = match &row {
            Some(bytes) => parse_fields(bytes).map_err(|e| ReaderError::Decode {
                table: entry.name.clone(),
                key: key.redis_key.clone(),
                source: Arc::new(e),
            })?,
            None => Vec::new(),
        };
        let (kind, value, ttl) = match (&row, inner.options.negative_ttl) {
            (Some(_), _) => ("hash", "", entry.rule.ttl.map_or(0, lease::millis)),
            (None, Some(ttl)) => ("absent", ABSENT, lease::millis(ttl)),
            (None, None) => {
                let _ = lease::release(inner, &lease_key, &token).await;
                return Ok(None);
            }
        };
        let at = crate::checkpoint::hex(at);
        let lag_deadline = Instant::now() + inner.options.max_lag_wait;
        let mut lag = Backoff::lag(inner.options.max_wait_step);
        let mut conn = inner.redis.clone();
        loop {
            let mut fill = lease::FILL.key(&key.redis_key);
            fill.key(&lease_key)
                .key(&inner.checkpoint_key)
                .arg(&token)
                .arg(kind)
                .arg(value)
                .arg(ttl)
                .arg(&at);
            for (name, text) in &fields {
                fill.arg(name).arg(text);
            }
            match fill.invoke_async::<i64>(&mut conn).await {
                Ok(1) => {
                    entry.counters.record(Event::Fill);
                    return Ok(row);
                }
                Ok(2) if Instant::now() < lag_deadline => {
                    tokio::time::sleep(lag.step()).await;
                }
                Ok(2) => {
                    entry.counters.record(Event::LagFallback);
                    let _ = lease::release(inner, &lease_key, &token).await;
                    return Ok(row);
                }
                Ok(_) => {
                    // A change revoked the lease: the row read may be older. Start over.
                    entry.counters.record(Event::LostFill);
                    if Instant::now() >= deadline {
                        return Ok(read(inner, entry, key).await?.0);
                    }
                    break;
                }
                Err(e) => {
                    inner.redis_failed(&e);
                    return Ok(row);
                }
            }
        }
    }
}

/// The fields of a hash row carried as a JSON object of strings.
fn parse_fields(value: &[u8]) -> Result<Vec<(String, String)>, serde_json::Error> {
    Ok(
        serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(value)?
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect(),
    )
}

/// A hash row (a JSON object of strings) as the caller's type.
pub(super) fn decode<T: DeserializeOwned>(
    table: &str,
    key: &str,
    value: &[u8],
) -> Result<T, ReaderError> {
    let decode_error = |e: serde_json::Error| ReaderError::Decode {
        table: table.to_string(),
        key: key.to_string(),
        source: Arc::new(e),
    };
    let fields = parse_fields(value).map_err(decode_error)?;
    let map = de::value::MapDeserializer::new(fields.into_iter().map(|(k, v)| (k, Field(v))));
    T::deserialize(map).map_err(|e: de::value::Error| decode_error(de::Error::custom(e)))
}

/// One field's text, deserialized as whatever the caller asks for.
struct Field(String);

impl<'de> IntoDeserializer<'de, de::value::Error> for Field {
    type Deserializer = Field;
    fn into_deserializer(self) -> Field {
        self
    }
}

macro_rules! parse_as {
    ($($method:ident => $visit:ident),* $(,)?) => {
        $(fn $method<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
            match self.0.parse() {
                Ok(v) => visitor.$visit(v),
                Err(_) => Err(de::Error::invalid_value(de::Unexpected::Str(&self.0), &visitor)),
            }
        })*
    };
}

impl<'de> de::Deserializer<'de> for Field {
    type Error = de::value::Error;

    fn deserialize_any<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_string(self.0)
    }

    fn deserialize_option<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: de::Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: de::Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_enum(self.0.into_deserializer())
    }

    parse_as! {
        deserialize_bool => visit_bool,
        deserialize_i8 => visit_i8,
        deserialize_i16 => visit_i16,
        deserialize_i32 => visit_i32,
        deserialize_i64 => visit_i64,
        deserialize_i128 => visit_i128,
        deserialize_u8 => visit_u8,
        deserialize_u16 => visit_u16,
        deserialize_u32 => visit_u32,
        deserialize_u64 => visit_u64,
        deserialize_u128 => visit_u128,
        deserialize_f32 => visit_f32,
        deserialize_f64 => visit_f64,
        deserialize_char => visit_char,
    }

    serde::forward_to_deserialize_any! {
        str string bytes byte_buf unit unit_struct seq tuple tuple_struct map struct identifier
        ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Order {
        id: i64,
        user_id: i32,
        total: String,
        paid: bool,
        note: Option<String>,
        weight: f64,
    }

    #[test]
    fn hash_fields_decode_into_typed_structs() {
        let mut bytes = Vec::new();
        write_fields(
            &mut bytes,
            [
                ("id", "7"),
                ("user_id", "42"),
                ("total", "9.50"),
                ("paid", "true"),
                ("weight", "1.5"),
            ],
        );
        let order: Order = decode("public.orders", "order:7", &bytes).unwrap();
        assert_eq!(
            order,
            Order {
                id: 7,
                user_id: 42,
                total: "9.50".into(),
                paid: true,
                note: None,
                weight: 1.5
            }
        );
        let map: std::collections::HashMap<String, String> =
            decode("public.orders", "order:7", &bytes).unwrap();
        assert_eq!(map["total"], "9.50");
        let bad: Result<Order, _> = decode("public.orders", "order:7", br#"{"id":"x"}"#);
        assert!(matches!(bad, Err(ReaderError::Decode { .. })));
    }
}
