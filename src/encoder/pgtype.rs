//! [`PgType`]: which encoding a column gets, from its type OID, and from `pg_type` for user
//! types.

use std::future::Future;
use std::pin::Pin;

/// How a column's text is turned into JSON, chosen from its type OID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgType {
    /// int2, int4, int8, oid: a JSON number.
    Int,
    /// float4, float8: a number; NaN and ±Infinity as strings.
    Float,
    /// numeric: a string by default (exact), a number with [`EncodeOptions::numeric_as_number`](crate::encoder::EncodeOptions::numeric_as_number).
    Numeric,
    Bool,
    /// String-like types (text, varchar, uuid, inet, enums, citext, ...): a JSON string.
    Text,
    /// json, jsonb: embedded as is.
    Json,
    TimestampTz,
    Timestamp,
    Date,
    Time,
    TimeTz,
    Interval,
    /// bytea: base64 (standard alphabet, padded).
    Bytea,
    /// A Postgres array of the element type: nested JSON arrays.
    Array(Box<PgType>),
    /// Anything else: its Postgres text as a JSON string.
    Other,
}

impl PgType {
    /// The type for a built-in type OID, `None` for OIDs it does not know (user types:
    /// enums, domains, citext, arrays of those); see [`PgType::resolve`].
    pub fn from_oid(oid: u32) -> Option<PgType> {
        use PgType::*;
        let ty = match oid {
            20 | 21 | 23 | 26 => Int,
            700 | 701 => Float,
            1700 => Numeric,
            16 => Bool,
            // text, varchar, bpchar, name, "char", uuid, inet, cidr, macaddr, macaddr8, xml
            25 | 1043 | 1042 | 19 | 18 | 2950 | 869 | 650 | 829 | 774 | 142 => Text,
            114 | 3802 => Json,
            1184 => TimestampTz,
            1114 => Timestamp,
            1082 => Date,
            1083 => Time,
            1266 => TimeTz,
            1186 => Interval,
            17 => Bytea,
            // box[] separates its elements with ';', which we do not parse: keep its text.
            1020 => Other,
            // Other built-in scalars: vectors, reg*, geometry, money, bit strings, xids,
            // text search, jsonpath, snapshots, ranges and multiranges.
            22
            | 24
            | 27..=30
            | 600..=604
            | 628
            | 718
            | 790
            | 1033
            | 1560
            | 1562
            | 1790
            | 2202..=2206
            | 2970
            | 3220
            | 3614
            | 3615
            | 3642
            | 3734
            | 3769
            | 3904
            | 3906
            | 3908
            | 3910
            | 3912
            | 3926
            | 4072
            | 4089
            | 4096
            | 4191
            | 4451
            | 4532..=4536
            | 5038
            | 5069 => Other,
            _ => {
                return array_element_oid(oid)
                    .and_then(PgType::from_oid)
                    .map(|e| Array(Box::new(e)))
            }
        };
        Some(ty)
    }

    /// Looks a type the built-in table does not know up in `pg_type`: an enum is text, a
    /// domain is its base type, an array is an array of its (resolved) element type,
    /// citext and other string-category types are text, anything else is [`PgType::Other`].
    ///
    /// # Errors
    /// Only the query's own errors; an OID missing from `pg_type` is [`PgType::Other`].
    pub async fn resolve(
        client: &tokio_postgres::Client,
        oid: u32,
    ) -> Result<PgType, tokio_postgres::Error> {
        Ok(Self::lookup(client, oid).await?.unwrap_or(PgType::Other))
    }

    /// As [`PgType::resolve`], but `None` when `pg_type` has no such OID (or no base or
    /// element type it names): a type created by a transaction not yet visible to this
    /// session.
    ///
    /// # Errors
    /// Only the query's own errors.
    pub async fn lookup(
        client: &tokio_postgres::Client,
        oid: u32,
    ) -> Result<Option<PgType>, tokio_postgres::Error> {
        resolve_depth(client, oid, 0).await
    }

    pub(super) fn name(&self) -> &'static str {
        match self {
            PgType::Int => "integer",
            PgType::Float => "float",
            PgType::Numeric => "numeric",
            PgType::Bool => "boolean",
            PgType::Text => "text",
            PgType::Json => "json",
            PgType::TimestampTz => "timestamptz",
            PgType::Timestamp => "timestamp",
            PgType::Date => "date",
            PgType::Time => "time",
            PgType::TimeTz => "timetz",
            PgType::Interval => "interval",
            PgType::Bytea => "bytea",
            PgType::Array(_) => "array",
            PgType::Other => "value",
        }
    }
}

/// The element OID of a built-in array type OID.
fn array_element_oid(oid: u32) -> Option<u32> {
    let elem = match oid {
        1000 => 16,
        1001 => 17,
        1002 => 18,
        1003 => 19,
        1016 => 20,
        1005 => 21,
        1006 => 22,
        1007 => 23,
        1008 => 24,
        1009 => 25,
        1028 => 26,
        1010 => 27,
        1011 => 28,
        1012 => 29,
        1013 => 30,
        199 => 114,
        143 => 142,
        1017 => 600,
        1018 => 601,
        1019 => 602,
        1027 => 604,
        629 => 628,
        651 => 650,
        1021 => 700,
        1022 => 701,
        719 => 718,
        775 => 774,
        791 => 790,
        1040 => 829,
        1041 => 869,
        1034 => 1033,
        1014 => 1042,
        1015 => 1043,
        1182 => 1082,
        1183 => 1083,
        1115 => 1114,
        1185 => 1184,
        1187 => 1186,
        1270 => 1266,
        1561 => 1560,
        1563 => 1562,
        1231 => 1700,
        2201 => 1790,
        2207..=2211 => oid - 5,
        2951 => 2950,
        2949 => 2970,
        3221 => 3220,
        3643 => 3614,
        3645 => 3615,
        3644 => 3642,
        3735 => 3734,
        3770 => 3769,
        3807 => 3802,
        3905 | 3907 | 3909 | 3911 | 3913 | 3927 => oid - 1,
        4073 => 4072,
        4090 => 4089,
        4097 => 4096,
        4192 => 4191,
        6150 => 4451,
        6151..=6153 => oid - 6151 + 4532,
        6155 => 4535,
        6157 => 4536,
        5039 => 5038,
        271 => 5069,
        _ => return None,
    };
    Some(elem)
}

/// Domains over domains (and arrays of domains) nest; a cycle is impossible in a sane
/// catalog, but a bound keeps a broken one from looping.
const MAX_RESOLVE_DEPTH: usize = 16;

const RESOLVE_SQL: &str = "SELECT t.typtype::text, t.typcategory::text, t.typbasetype, t.typelem, \
     (t.typelem <> 0 AND t.typlen = -1 AND t.typname::text LIKE '\\_%' \
      AND EXISTS (SELECT 1 FROM pg_type e WHERE e.oid = t.typelem AND e.typarray = t.oid)) \
     FROM pg_type t WHERE t.oid = $1";

fn resolve_depth<'a>(
    client: &'a tokio_postgres::Client,
    oid: u32,
    depth: usize,
) -> Pin<Box<dyn Future<Output = Result<Option<PgType>, tokio_postgres::Error>> + Send + 'a>> {
    Box::pin(async move {
        if let Some(ty) = PgType::from_oid(oid) {
            return Ok(Some(ty));
        }
        if depth >= MAX_RESOLVE_DEPTH {
            return Ok(Some(PgType::Other));
        }
        let Some(row) = client.query_opt(RESOLVE_SQL, &[&oid]).await? else {
            return Ok(None);
        };
        let typtype: String = row.try_get(0)?;
        let category: String = row.try_get(1)?;
        let base: u32 = row.try_get(2)?;
        let elem: u32 = row.try_get(3)?;
        let is_array: bool = row.try_get(4)?;
        Ok(match (typtype.as_str(), category.as_str()) {
            ("e", _) => Some(PgType::Text),
            ("d", _) => resolve_depth(client, base, depth + 1).await?,
            _ if is_array => resolve_depth(client, elem, depth + 1)
                .await?
                .map(|e| PgType::Array(Box::new(e))),
            (_, "S") => Some(PgType::Text),
            _ => Some(PgType::Other),
        })
    })
}
