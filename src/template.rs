//! Key templates (`user:profile:{id}`), the escaping of values inside keys, and lease keys.
//!
//! A rendered key is `<key_prefix><template with escaped values>`. Escaping keeps every key
//! readable in `redis-cli` while making sure that no value can contain the characters that
//! give a key its structure: `:` (our separator), `{`/`}` (Redis Cluster hash tags) and space.
//! Because of that, [`KeyTemplate::parse_key`] can always split a key back into its values,
//! which `verify` and TRUNCATE handling rely on.

use std::fmt;

/// Appended to a row key to name its lease; see [`lease_key`].
pub const LEASE_SUFFIX: &str = ":pgcache-lease";

/// A template could not be parsed, or an escaped value could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("key template {template:?} must start with literal text that names the table, such as \"user:\" in \"user:{{id}}\"")]
    NoLiteralPrefix { template: String },
    #[error("key template {template:?} names no column, so every row would share one key")]
    NoColumns { template: String },
    #[error("key template {template:?} has an unmatched {brace:?} at byte {position} (write {brace}{brace} for a literal brace)")]
    UnbalancedBrace {
        template: String,
        brace: char,
        position: usize,
    },
    #[error(
        "key template {template:?} has an empty {{}} at byte {position}: put a column name inside"
    )]
    EmptyColumn { template: String, position: usize },
    #[error("key template {template:?}: {name:?} is not a column name (letters, digits, _ and $, not starting with a digit)")]
    BadColumnName { template: String, name: String },
    #[error("key template {template:?} uses column {name:?} twice")]
    DuplicateColumn { template: String, name: String },
    #[error("key template {template:?}: {{{first}}}{{{second}}} has no text between the columns, so a key could not be split back into its values")]
    AdjacentColumns {
        template: String,
        first: String,
        second: String,
    },
    #[error("key template {template:?}: the text {separator:?} between {{{first}}} and {{{second}}} must contain ':', '{{', '}}' or a space (characters values never contain), so a key can be split back into its values")]
    AmbiguousSeparator {
        template: String,
        first: String,
        second: String,
        separator: String,
    },
    #[error("key template {template:?}: a literal {{{{ opens a Redis Cluster hash tag, which needs a later }}}} with something between them")]
    UnclosedHashTag { template: String },
    #[error("key template {template:?}: a literal }}}} before any {{{{ closes no Redis Cluster hash tag, and a key with a '}}' but no hash tag cannot keep its lease in its slot")]
    StrayClosingBrace { template: String },
    #[error("{text:?} is not an escaped key value: {problem}")]
    BadEscape { text: String, problem: &'static str },
}

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    /// Text copied into the key as is (with `{{`/`}}` already turned into single braces).
    Literal(String),
    /// The value of `columns[i]`.
    Column(usize),
}

/// A parsed key template such as `tenant:{tenant_id}:order:{id}`.
///
/// Invariants established by [`KeyTemplate::parse`]: the first part is a non-empty literal,
/// there is at least one column, and every literal between two columns contains a byte that
/// escaped values never contain, so [`KeyTemplate::parse_key`] is unambiguous.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    source: String,
    parts: Vec<Part>,
    columns: Vec<String>,
}

/// Bytes that [`escape_value`] never leaves in a value, so a literal containing one of them
/// marks exactly where a value ends. `%` is escaped too, but escaped values contain `%XX`.
fn is_structural(b: u8) -> bool {
    matches!(b, b':' | b'{' | b'}' | b' ') || b.is_ascii_control()
}

fn needs_escape(b: u8) -> bool {
    b == b'%' || is_structural(b)
}

/// The state of [`KeyTemplate::parse`]: the parts so far and the literal text being read.
struct Parser<'a> {
    source: &'a str,
    parts: Vec<Part>,
    columns: Vec<String>,
    literal: String,
}

impl Parser<'_> {
    fn template(&self) -> String {
        self.source.to_string()
    }

    fn unbalanced(&self, brace: char, position: usize) -> TemplateError {
        TemplateError::UnbalancedBrace {
            template: self.template(),
            brace,
            position,
        }
    }

    /// A `{name}` at byte `position`: checks the name and what separates it from the
    /// column before, then ends the literal before it.
    fn column(&mut self, name: &str, position: usize) -> Result<(), TemplateError> {
        let template = self.template();
        if name.is_empty() {
            return Err(TemplateError::EmptyColumn { template, position });
        }
        if !is_column_name(name) {
            let name = name.to_string();
            return Err(TemplateError::BadColumnName { template, name });
        }
        if self.columns.iter().any(|c| c == name) {
            let name = name.to_string();
            return Err(TemplateError::DuplicateColumn { template, name });
        }
        let previous = match self.parts.last() {
            Some(&Part::Column(prev)) => Some(self.columns[prev].clone()),
            _ => None,
        };
        match previous {
            _ if self.literal.is_empty() && self.parts.is_empty() => {
                return Err(TemplateError::NoLiteralPrefix { template });
            }
            Some(first) if self.literal.is_empty() => {
                let second = name.to_string();
                return Err(TemplateError::AdjacentColumns {
                    template,
                    first,
                    second,
                });
            }
            Some(first) if !self.literal.bytes().any(is_structural) => {
                return Err(TemplateError::AmbiguousSeparator {
                    template,
                    first,
                    second: name.to_string(),
                    separator: std::mem::take(&mut self.literal),
                });
            }
            _ => {}
        }
        if !self.literal.is_empty() {
            self.parts
                .push(Part::Literal(std::mem::take(&mut self.literal)));
        }
        self.parts.push(Part::Column(self.columns.len()));
        self.columns.push(name.to_string());
        Ok(())
    }

    /// The end of the template: a literal prefix, at least one column, hash tags closed.
    fn finish(mut self) -> Result<KeyTemplate, TemplateError> {
        if !self.literal.is_empty() {
            self.parts
                .push(Part::Literal(std::mem::take(&mut self.literal)));
        }
        let template = self.template();
        if !matches!(self.parts.first(), Some(Part::Literal(_))) {
            return Err(TemplateError::NoLiteralPrefix { template });
        }
        if self.columns.is_empty() {
            return Err(TemplateError::NoColumns { template });
        }
        check_hash_tag(&self.parts).map_err(|problem| match problem {
            TagProblem::Unclosed => TemplateError::UnclosedHashTag { template },
            TagProblem::Stray => TemplateError::StrayClosingBrace {
                template: self.template(),
            },
        })?;
        Ok(KeyTemplate {
            source: self.template(),
            parts: self.parts,
            columns: self.columns,
        })
    }
}

fn is_column_name(name: &str) -> bool {
    let mut chars = name.chars();
    match chars.next() {
        Some(c) if c.is_alphabetic() || c == '_' => {}
        _ => return false,
    }
    chars.all(|c| c.is_alphanumeric() || c == '_' || c == '$')
}

impl KeyTemplate {
    /// Parses a template such as `user:profile:{id}`.
    ///
    /// # Errors
    /// A template must start with a non-empty literal prefix and name at least one column;
    /// braces must balance (`{{` and `}}` are literal braces); column names are non-empty
    /// identifiers used once each; two columns need literal text between them containing
    /// `:`, `{`, `}` or a space; a literal `{{` (a cluster hash tag) must be closed by `}}`,
    /// and a literal `}}` must come after one.
    pub fn parse(s: &str) -> Result<KeyTemplate, TemplateError> {
        let mut parser = Parser {
            source: s,
            parts: Vec::new(),
            columns: Vec::new(),
            literal: String::new(),
        };
        let mut chars = s.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            let doubled = chars.peek().map(|&(_, next)| next) == Some(c);
            match c {
                '{' | '}' if doubled => {
                    chars.next();
                    parser.literal.push(c);
                }
                '}' => return Err(parser.unbalanced('}', i)),
                '{' => {
                    let end = loop {
                        match chars.next() {
                            Some((j, '}')) => break j,
                            Some((_, '{')) | None => return Err(parser.unbalanced('{', i)),
                            Some(_) => {}
                        }
                    };
                    parser.column(&s[i + 1..end], i)?;
                }
                c => parser.literal.push(c),
            }
        }
        parser.finish()
    }

    /// The template as written in the config.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Column names in template order; [`KeyTemplate::render`] takes values in this order.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// The rendered text before the first column (`user:profile:` for `user:profile:{id}`).
    /// Unique per table, so TRUNCATE and `verify` can find a table's keys by prefix.
    pub fn literal_prefix(&self) -> &str {
        match self.parts.first() {
            Some(Part::Literal(s)) => s,
            // parse() guarantees a literal first part.
            _ => "",
        }
    }

    /// A Redis glob (`SCAN MATCH`) that every key rendered from this template with
    /// `key_prefix` matches: the literals escaped, each column a `*`.
    pub fn glob(&self, key_prefix: &str) -> String {
        let mut out = glob_escape(key_prefix);
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(&glob_escape(s)),
                Part::Column(_) => out.push('*'),
            }
        }
        out
    }

    /// A Lua pattern (anchored) that exactly the keys rendered from this template with
    /// `key_prefix` match: the literals escaped, each column a run of bytes an escaped value
    /// can hold (never `:`, a brace or a space). `fill.lua` matches row keys against the
    /// checkpoint's `stopped` patterns with it (PROTOCOL.md, "fill.lua").
    pub fn lua_pattern(&self, key_prefix: &str) -> String {
        let mut out = String::from("^");
        lua_escape_into(&mut out, key_prefix);
        for part in &self.parts {
            match part {
                Part::Literal(s) => lua_escape_into(&mut out, s),
                Part::Column(_) => out.push_str("[^:{}%s]*"),
            }
        }
        out.push('$');
        out
    }

    /// Renders a key: `key_prefix`, then the template with each value escaped.
    /// Values are the columns' Postgres text output, in [`KeyTemplate::columns`] order.
    /// The caller guarantees the arity; a missing value renders as empty.
    pub fn render(&self, key_prefix: &str, values: &[&[u8]]) -> String {
        let mut out = String::new();
        self.render_into(&mut out, key_prefix, values);
        out
    }

    /// Like [`KeyTemplate::render`], but `None` when the number of values is wrong.
    pub fn try_render(&self, key_prefix: &str, values: &[&[u8]]) -> Option<String> {
        (values.len() == self.columns.len()).then(|| self.render(key_prefix, values))
    }

    /// Appends the rendered key to `out` (which is not cleared): the hot path, which only
    /// allocates when `out` has to grow.
    pub fn render_into(&self, out: &mut String, key_prefix: &str, values: &[&[u8]]) {
        debug_assert_eq!(
            values.len(),
            self.columns.len(),
            "wrong number of values for key template {:?}",
            self.source
        );
        let needed = key_prefix.len()
            + self
                .parts
                .iter()
                .map(|p| match p {
                    Part::Literal(s) => s.len(),
                    Part::Column(i) => values.get(*i).map_or(0, |v| v.len()),
                })
                .sum::<usize>();
        out.reserve(needed);
        out.push_str(key_prefix);
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Column(i) => escape_value(out, values.get(*i).copied().unwrap_or_default()),
            }
        }
    }

    /// Splits a rendered key back into its column values (unescaped, in template order).
    /// `None` if the key was not rendered from this template with this `key_prefix`: only
    /// keys that [`KeyTemplate::render`] could have produced, byte for byte, are accepted.
    pub fn parse_key(&self, key_prefix: &str, key: &str) -> Option<Vec<Vec<u8>>> {
        let mut rest = key.strip_prefix(key_prefix)?;
        let mut values = Vec::with_capacity(self.columns.len());
        let mut parts = self.parts.iter().peekable();
        while let Some(part) = parts.next() {
            if let Part::Literal(lit) = part {
                // Only the leading literal gets here; the others are consumed with the
                // column before them, below.
                rest = rest.strip_prefix(lit.as_str())?;
                continue;
            }
            let segment = match parts.peek() {
                None => std::mem::take(&mut rest),
                Some(Part::Literal(lit)) => {
                    parts.next();
                    if parts.peek().is_none() {
                        let segment = rest.strip_suffix(lit.as_str())?;
                        rest = "";
                        segment
                    } else {
                        // The literal's first structural byte must be the first structural
                        // byte of the rest, since values never contain one.
                        let k = lit.bytes().position(is_structural)?;
                        let p = rest.bytes().position(is_structural)?;
                        let end = p.checked_sub(k)?;
                        let segment = rest.get(..end)?;
                        rest = rest.get(end..)?.strip_prefix(lit.as_str())?;
                        segment
                    }
                }
                // parse() rejects adjacent columns.
                Some(Part::Column(_)) => return None,
            };
            let value = unescape_value(segment).ok()?;
            let mut canonical = String::with_capacity(segment.len());
            escape_value(&mut canonical, &value);
            if canonical != segment {
                return None;
            }
            values.push(value);
        }
        rest.is_empty().then_some(values)
    }
}

impl fmt::Display for KeyTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// What [`check_hash_tag`] found wrong.
enum TagProblem {
    /// A `{` with no `}` after it, or nothing between them.
    Unclosed,
    /// A `}` before any `{`.
    Stray,
}

/// A literal `{` makes the key carry a cluster hash tag; Redis only honours it when a `}`
/// follows with something between, and [`lease_key`] relies on the tag being honoured. A
/// `}` before any `{` would leave a key with a `}` and no hash tag, which no lease key can
/// share a slot with (a hash tag cannot hold a `}`).
fn check_hash_tag(parts: &[Part]) -> Result<(), TagProblem> {
    let mut open = false;
    let mut content = false;
    for part in parts {
        match part {
            Part::Column(_) => content |= open,
            Part::Literal(s) => {
                for c in s.chars() {
                    if !open {
                        if c == '}' {
                            return Err(TagProblem::Stray);
                        }
                        open = c == '{';
                    } else if c == '}' {
                        return if content {
                            Ok(())
                        } else {
                            Err(TagProblem::Unclosed)
                        };
                    } else {
                        content = true;
                    }
                }
            }
        }
    }
    if open {
        Err(TagProblem::Unclosed)
    } else {
        Ok(())
    }
}

/// Appends `value` escaped for use inside a key.
///
/// Percent-encodes (`%XX`, upper-case hex) `%`, `:`, `{`, `}`, space, ASCII control
/// characters and DEL, and bytes that are not valid UTF-8. Everything else, including
/// non-ASCII UTF-8, is kept, so keys stay readable. No value can forge a separator or a
/// cluster hash tag.
pub fn escape_value(out: &mut String, value: &[u8]) {
    for chunk in value.utf8_chunks() {
        let valid = chunk.valid();
        let mut start = 0;
        for (i, b) in valid.bytes().enumerate() {
            // Every escaped byte is ASCII, so `i` and `i + 1` are char boundaries.
            if needs_escape(b) {
                out.push_str(&valid[start..i]);
                push_percent(out, b);
                start = i + 1;
            }
        }
        out.push_str(&valid[start..]);
        for &b in chunk.invalid() {
            push_percent(out, b);
        }
    }
}

fn push_percent(out: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(b >> 4)]));
    out.push(char::from(HEX[usize::from(b & 0xf)]));
}

/// Reverses [`escape_value`].
///
/// # Errors
/// A `%` not followed by two hex digits, or a character that [`escape_value`] would have
/// escaped (a raw `:`, brace, space or control character).
pub fn unescape_value(s: &str) -> Result<Vec<u8>, TemplateError> {
    let err = |problem| TemplateError::BadEscape {
        text: s.to_string(),
        problem,
    };
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = |j: usize| {
                bytes
                    .get(j)
                    .and_then(|&h| char::from(h).to_digit(16))
                    .ok_or_else(|| err("'%' must be followed by two hex digits"))
            };
            let hi = hex(i + 1)?;
            let lo = hex(i + 2)?;
            // Two hex digits fit in a byte.
            out.push(u8::try_from(hi * 16 + lo).unwrap_or_default());
            i += 3;
        } else if is_structural(b) {
            return Err(err(
                "contains ':', a brace, a space or a control character, which values never contain",
            ));
        } else {
            out.push(b);
            i += 1;
        }
    }
    Ok(out)
}

/// Appends `text` to a Lua pattern, each magic character escaped with `%`. A control
/// character (only a key prefix could hold one) becomes `%c`, so patterns stay one line each.
fn lua_escape_into(out: &mut String, text: &str) {
    for c in text.chars() {
        if c.is_ascii_control() {
            out.push_str("%c");
            continue;
        }
        if matches!(
            c,
            '^' | '$' | '(' | ')' | '%' | '.' | '[' | ']' | '*' | '+' | '-' | '?'
        ) {
            out.push('%');
        }
        out.push(c);
    }
}

/// `text` with Redis glob characters (`* ? [ ] \`) escaped, for `SCAN MATCH` patterns.
pub fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The lease key for a row key, in the same Redis Cluster slot as the row (PROTOCOL.md,
/// "Lease keys").
///
/// A row key with a hash tag keeps it: the suffix adds no brace, so the slot stays.
/// Otherwise Redis hashes the whole row key, so the whole row key becomes the lease key's
/// hash tag, which is exact while the row key has no `}` (values never do; a template that
/// has one also has a hash tag before it).
pub fn lease_key(row_key: &str) -> String {
    let mut key = String::with_capacity(row_key.len() + LEASE_SUFFIX.len() + 2);
    if has_hash_tag(row_key) {
        key.push_str(row_key);
    } else {
        key.push('{');
        key.push_str(row_key);
        key.push('}');
    }
    key.push_str(LEASE_SUFFIX);
    key
}

/// Whether Redis Cluster hashes only part of `key`: its first `{` is followed later by a
/// `}`, with at least one byte between the two.
fn has_hash_tag(key: &str) -> bool {
    key.split_once('{')
        .and_then(|(_, after)| after.find('}'))
        .is_some_and(|len| len > 0)
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {

    #[test]
    fn lua_patterns_escape_magic_characters_and_columns_stop_at_structure() {
        let t = KeyTemplate::parse("{{user:{user_id}}}:order.%:{id}").unwrap();
        assert_eq!(
            t.lua_pattern("app-1:"),
            "^app%-1:{user:[^:{}%s]*}:order%.%%:[^:{}%s]*$"
        );
    }
    use super::*;

    fn t(s: &str) -> KeyTemplate {
        KeyTemplate::parse(s).unwrap()
    }

    #[test]
    fn parses_columns_and_prefix() {
        let tpl = t("tenant:{tenant_id}:order:{id}");
        assert_eq!(tpl.as_str(), "tenant:{tenant_id}:order:{id}");
        assert_eq!(tpl.columns(), ["tenant_id", "id"]);
        assert_eq!(tpl.literal_prefix(), "tenant:");
        assert_eq!(tpl.to_string(), "tenant:{tenant_id}:order:{id}");

        let tpl = t("user:profile:{id}");
        assert_eq!(tpl.columns(), ["id"]);
        assert_eq!(tpl.literal_prefix(), "user:profile:");
    }

    #[test]
    fn doubled_braces_are_literal() {
        let tpl = t("order:{{{tenant}}}:{id}");
        assert_eq!(tpl.literal_prefix(), "order:{");
        assert_eq!(tpl.columns(), ["tenant", "id"]);
        assert_eq!(tpl.render("", &[b"7", b"42"]), "order:{7}:42");

        let tpl = t("a{{b}}:{x}");
        assert_eq!(tpl.literal_prefix(), "a{b}:");
        assert_eq!(tpl.render("", &[b"1"]), "a{b}:1");
    }

    #[test]
    fn rejects_bad_templates() {
        use TemplateError::*;
        let err = |s: &str| KeyTemplate::parse(s).unwrap_err();
        assert!(matches!(err(""), NoLiteralPrefix { .. }));
        assert!(matches!(err("{id}"), NoLiteralPrefix { .. }));
        assert!(matches!(err("{id}:x"), NoLiteralPrefix { .. }));
        assert!(matches!(err("user"), NoColumns { .. }));
        assert!(matches!(err("user:{{x}}"), NoColumns { .. }));
        assert!(matches!(
            err("user:{id"),
            UnbalancedBrace {
                brace: '{',
                position: 5,
                ..
            }
        ));
        assert!(matches!(
            err("user:{a{b}"),
            UnbalancedBrace { brace: '{', .. }
        ));
        assert!(matches!(
            err("user:id}"),
            UnbalancedBrace {
                brace: '}',
                position: 7,
                ..
            }
        ));
        assert!(matches!(err("user:{}"), EmptyColumn { position: 5, .. }));
        assert!(matches!(err("user:{1d}"), BadColumnName { .. }));
        assert!(matches!(err("user:{a b}"), BadColumnName { .. }));
        assert!(matches!(err("user:{a:b}"), BadColumnName { .. }));
        assert!(matches!(err("user:{id}:{id}"), DuplicateColumn { .. }));
        assert!(matches!(err("user:{a}{b}"), AdjacentColumns { .. }));
        assert!(matches!(err("user:{a}-{b}"), AmbiguousSeparator { .. }));
        assert!(matches!(err("x:{{{a}"), UnclosedHashTag { .. }));
        assert!(matches!(err("x:{{}}:{a}"), UnclosedHashTag { .. }));
        // Found by the property tests: every key of "a}}:{id}" ("a}:1") has a '}' and no
        // hash tag, so no lease key can share its slot.
        assert!(matches!(err("a}}:{id}"), StrayClosingBrace { .. }));
        assert!(matches!(err("a:{id}}}"), StrayClosingBrace { .. }));
        assert!(KeyTemplate::parse("a:{{t}}:}}:{id}").is_ok());
        // Column names may be any identifier Postgres could report.
        assert!(KeyTemplate::parse("u:{_a$1}:{Üser}").is_ok());
        assert!(KeyTemplate::parse("u:{a}-x:{b}").is_ok());
        assert!(KeyTemplate::parse("u:{a} {b}").is_ok());
    }

    #[test]
    fn error_messages_name_the_problem() {
        let msg = KeyTemplate::parse("user:{id").unwrap_err().to_string();
        assert_eq!(
            msg,
            "key template \"user:{id\" has an unmatched '{' at byte 5 (write {{ for a literal brace)"
        );
        let msg = KeyTemplate::parse("user:{a}{b}").unwrap_err().to_string();
        assert!(msg.contains("{a}{b} has no text between"), "{msg}");
        let msg = KeyTemplate::parse("{id}").unwrap_err().to_string();
        assert!(msg.contains("\"user:\" in \"user:{id}\""), "{msg}");
    }

    #[test]
    fn renders_with_prefix_and_escaping() {
        let tpl = t("tenant:{tenant_id}:order:{id}");
        assert_eq!(
            tpl.render("app:", &[b"acme", b"42"]),
            "app:tenant:acme:order:42"
        );
        assert_eq!(
            tpl.render("", &[b"a:b", b"{x} y%"]),
            "tenant:a%3Ab:order:%7Bx%7D%20y%25"
        );
        assert_eq!(tpl.try_render("", &[b"a"]), None);
        assert_eq!(
            tpl.try_render("", &[b"a", b"b"]).as_deref(),
            Some("tenant:a:order:b")
        );

        let mut out = String::from("keep");
        tpl.render_into(&mut out, "", &[b"1", b"2"]);
        assert_eq!(out, "keeptenant:1:order:2");
    }

    #[test]
    fn escapes_only_what_it_must() {
        let esc = |v: &[u8]| {
            let mut s = String::new();
            escape_value(&mut s, v);
            s
        };
        assert_eq!(esc(b"plain-text_1.2@x"), "plain-text_1.2@x");
        assert_eq!(esc("héllo ☃".as_bytes()), "héllo%20☃");
        assert_eq!(esc(b"%:{} \n\t\x00\x7f"), "%25%3A%7B%7D%20%0A%09%00%7F");
        assert_eq!(esc(b"a\xffb\xc3"), "a%FFb%C3");
        assert_eq!(esc(b""), "");
    }

    #[test]
    fn unescape_round_trips_and_rejects_raw_structure() {
        let samples: [&[u8]; 6] = [
            b"",
            b"42",
            b"a:b{c}d e%f",
            "ünï €".as_bytes(),
            b"\x00\x01\xff\xfe\x7f",
            b"%41",
        ];
        for v in samples {
            let mut s = String::new();
            escape_value(&mut s, v);
            assert_eq!(unescape_value(&s).unwrap(), v, "{s}");
        }
        assert_eq!(unescape_value("%3a").unwrap(), b":");
        assert!(unescape_value("a:b").is_err());
        assert!(unescape_value("a b").is_err());
        assert!(unescape_value("%4").is_err());
        assert!(unescape_value("%zz").is_err());
        assert!(unescape_value("%").is_err());
        assert!(unescape_value("x{").is_err());
    }

    #[test]
    fn escaped_values_never_contain_structure() {
        let mut s = String::new();
        for b in 0..=255u8 {
            s.clear();
            escape_value(&mut s, &[b, b':', b'{', b'}', b' ', b]);
            assert!(!s.bytes().any(is_structural), "{s:?}");
        }
    }

    #[test]
    fn parse_key_inverts_render() {
        let cases: [(&str, &[&[u8]]); 6] = [
            ("user:profile:{id}", &[b"42"]),
            ("tenant:{tenant_id}:order:{id}", &[b"a:b", b"c d"]),
            ("tenant:{tenant_id}:order:{id}", &[b"", b""]),
            ("o:{{{t}}}:{id}:v1", &[b"x}", b"y:"]),
            ("u:{a}-x:{b}", &[b"x-x", b"-x:"]),
            ("u:{a} {b}", &["é".as_bytes(), b"\xff"]),
        ];
        for (tpl, values) in cases {
            let tpl = t(tpl);
            for prefix in ["", "app:"] {
                let key = tpl.render(prefix, values);
                let parsed = tpl
                    .parse_key(prefix, &key)
                    .unwrap_or_else(|| panic!("{key}"));
                assert_eq!(parsed, values, "{key}");
            }
        }
    }

    #[test]
    fn parse_key_rejects_foreign_keys() {
        let tpl = t("tenant:{tenant_id}:order:{id}");
        assert_eq!(tpl.parse_key("", "tenant:1:order"), None);
        assert_eq!(tpl.parse_key("", "tenant:1:invoice:2"), None);
        assert_eq!(tpl.parse_key("", "tenant:1:2:order:3"), None);
        assert_eq!(tpl.parse_key("", "tenant:1:order:2:x"), None);
        assert_eq!(tpl.parse_key("app:", "tenant:1:order:2"), None);
        // Not canonical: render would have kept 'A' and escaped ':' as %3A.
        assert_eq!(tpl.parse_key("", "tenant:%41:order:2"), None);
        assert_eq!(tpl.parse_key("", "tenant:%3a:order:2"), None);
        let user = t("user:{id}");
        assert_eq!(user.parse_key("", &lease_key("user:5")), None);
        assert_eq!(user.parse_key("", "user:5:pgcache-lease"), None);
        assert_eq!(user.parse_key("", "user:5"), Some(vec![b"5".to_vec()]));
        let tagged = t("o:{{{t}}}:{id}");
        let key = tagged.render("", &[b"1", b"2"]);
        assert_eq!(tagged.parse_key("", &lease_key(&key)), None);
    }

    #[test]
    fn lease_keys_share_the_row_slot() {
        assert_eq!(
            lease_key("user:profile:42"),
            "{user:profile:42}:pgcache-lease"
        );
        assert_eq!(lease_key("o:{7}:42"), "o:{7}:42:pgcache-lease");
    }

    /// Found by the property tests: a `{` alone is no hash tag, so Redis hashes the whole
    /// key (here from a `redis.key_prefix` of "app{"), and a lease key that merely appends
    /// the suffix landed in another slot.
    #[test]
    fn a_brace_without_a_hash_tag_is_wrapped_like_any_key() {
        assert_eq!(lease_key("app{user:42"), "{app{user:42}:pgcache-lease");
        assert!(!has_hash_tag("app{user:42"));
        assert!(!has_hash_tag("a{}b}"));
        assert!(has_hash_tag("a{b}"));
        assert!(has_hash_tag("}a{b}"));
    }

    #[test]
    fn random_values_round_trip() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let tpl = t("t:{a}:{b}");
        let alphabet = b"ab:{} %\x00\xc3\xa9\xff";
        for _ in 0..2000 {
            let mut gen = || -> Vec<u8> {
                let n = rng.gen_range(0..8);
                (0..n)
                    .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                    .collect()
            };
            let (a, b) = (gen(), gen());
            let key = tpl.render("p:", &[&a, &b]);
            assert_eq!(tpl.parse_key("p:", &key), Some(vec![a, b]), "{key}");
        }
    }
}
