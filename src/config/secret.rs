//! Secrets (connection URLs with passwords) and the redaction that keeps them out of logs
//! and error messages.

use std::fmt;

/// A connection URL or string that may carry a password. `Debug` and `Display` print it
/// with the password replaced by `***`; only [`Secret::expose`] gives the real text.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The real text, for handing to a client library. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The text with passwords replaced by `***`.
    pub fn redacted(&self) -> String {
        redact(&self.0)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Secret").field(&self.redacted()).finish()
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

const MASK: &str = "***";

/// Replaces every password in `text` by `***`: the password in a URL's user info
/// (`scheme://user:password@host`), and the value of any `password=` parameter (URI query
/// parameters and libpq key-value strings, quoted or not; `sslpassword` too).
///
/// It works on any text, such as an error message quoting a config line, and errs on the
/// side of hiding too much.
pub fn redact(text: &str) -> String {
    redact_parameters(&redact_user_info(text))
}

fn redact_user_info(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // A URL ends at whitespace or a quote. A password may hold a raw '/' or '@', so
        // the user info runs to the last '@' rather than to the first '/'.
        let end = tail
            .find(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == '`')
            .unwrap_or(tail.len());
        let url = &tail[..end];
        match url
            .rfind('@')
            .and_then(|at| Some((at, url[..at].find(':')?)))
        {
            Some((at, colon)) => {
                out.push_str(&url[..=colon]);
                out.push_str(MASK);
                out.push_str(&url[at..]);
            }
            None => out.push_str(url),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

fn redact_parameters(text: &str) -> String {
    const KEY: &str = "password";
    let lower = text.to_ascii_lowercase();
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut from = 0;
    while let Some(found) = lower[from..].find(KEY) {
        let mut i = from + found + KEY.len();
        from = i;
        while bytes.get(i) == Some(&b' ') {
            i += 1;
        }
        if bytes.get(i) != Some(&b'=') {
            continue;
        }
        i += 1;
        while bytes.get(i) == Some(&b' ') {
            i += 1;
        }
        let start = i;
        if bytes.get(i) == Some(&b'\'') {
            // libpq quoting: backslash escapes, ends at the next unescaped quote.
            i += 1;
            while let Some(&b) = bytes.get(i) {
                i += if b == b'\\' { 2 } else { 1 };
                if b == b'\'' {
                    break;
                }
            }
            i = i.min(bytes.len());
        } else {
            while bytes
                .get(i)
                .is_some_and(|&b| !(b.is_ascii_whitespace() || matches!(b, b'&' | b'"' | b'#')))
            {
                i += 1;
            }
        }
        // All delimiters above are ASCII, so start and i are char boundaries.
        out.push_str(&text[copied..start]);
        out.push_str(MASK);
        copied = i;
        from = i;
    }
    out.push_str(&text[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_url_passwords() {
        for (text, want) in [
            (
                "postgres://app:s3cret@db:5432/app",
                "postgres://app:***@db:5432/app",
            ),
            (
                "redis://:pw@localhost:6379/0",
                "redis://:***@localhost:6379/0",
            ),
            ("rediss://user:p@ss@r:6380", "rediss://user:***@r:6380"),
            ("postgres://u:pa/ss@h/db", "postgres://u:***@h/db"),
            ("postgres://app@db/app", "postgres://app@db/app"),
            ("redis://localhost:6379", "redis://localhost:6379"),
            (
                "url = \"postgres://u:x@h\" and redis://:y@r",
                "url = \"postgres://u:***@h\" and redis://:***@r",
            ),
            ("no url here", "no url here"),
            ("", ""),
        ] {
            assert_eq!(redact(text), want, "{text}");
        }
    }

    #[test]
    fn redacts_password_parameters() {
        for (text, want) in [
            (
                "host=db password=s3cret user=app",
                "host=db password=*** user=app",
            ),
            (
                "host=db password = 's3 \\' cret' user=app",
                "host=db password = *** user=app",
            ),
            ("host=db PASSWORD='unterminated", "host=db PASSWORD=***"),
            (
                "postgres://db/app?password=x&sslmode=require",
                "postgres://db/app?password=***&sslmode=require",
            ),
            ("sslpassword=k password=", "sslpassword=*** password=***"),
            ("a password is required", "a password is required"),
            ("password=é", "password=***"),
        ] {
            assert_eq!(redact(text), want, "{text}");
        }
    }

    #[test]
    fn secret_formats_redacted() {
        let s = Secret::new("postgres://app:s3cret@db/app");
        assert_eq!(s.expose(), "postgres://app:s3cret@db/app");
        assert_eq!(s.to_string(), "postgres://app:***@db/app");
        assert_eq!(format!("{s:?}"), "Secret(\"postgres://app:***@db/app\")");
        assert!(!format!("{s:#?}").contains("s3cret"));
    }
}
