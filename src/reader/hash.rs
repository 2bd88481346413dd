//! Tables stored as hashes (`format = "hash"`): a field per column, the text the daemon's
//! encoder gives it (`encode_field`: numbers as digits, booleans as `true`/`false`, times in
//! RFC 3339), NULL columns without a field.
//!
//! Such tables go through the same lookups as JSON tables (single flight, the lease
//! protocol, waits, fallbacks, early refresh, batches); only the Redis commands differ, at
//! three points: the hit path reads `HGETALL` (in `lookup`: one pipeline of them for a
//! batch), `acquire.lua` gets `hash` (it answers with the fields when the key is there), and
//! a fill runs `fill.lua` with kind `hash` (`HSET` of the fields, `PEXPIRE` with the table's
//! TTL; `hash-refresh` for an early refresh, which replaces the hash).
//!
//! In process a hash row travels as a JSON object of strings (`{"id":"1","total":"9.50"}`,
//! what [`get_raw`](super::Table::get_raw) returns for such tables); [`decode`] turns it into
//! the caller's type, parsing numbers and booleans from the fields' text.

use std::sync::Arc;

use bytes::Bytes;
use serde::de::{self, DeserializeOwned, IntoDeserializer};

use super::ReaderError;

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

/// A hash's fields as the JSON object of strings that stands for the row in process.
pub(crate) fn fields_to_bytes(fields: &[(String, String)]) -> Bytes {
    let mut out = Vec::new();
    write_fields(
        &mut out,
        fields.iter().map(|(n, v)| (n.as_str(), v.as_str())),
    );
    Bytes::from(out)
}

/// `HGETALL`'s flat reply (field, value, ...) as pairs.
pub(crate) fn pairs(flat: Vec<redis::Value>) -> Vec<(String, String)> {
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

/// The fields of a hash row carried as a JSON object of strings.
pub(crate) fn parse_fields(value: &[u8]) -> Result<Vec<(String, String)>, serde_json::Error> {
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
