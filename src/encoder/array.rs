//! Postgres array literals (`{1,2}`, `{{"a b",NULL},{c,d}}`, `[0:1]={x,y}`) as nested JSON
//! arrays.

use super::{encode, quote, EncodeError, EncodeOptions, Form, PgType};

/// Postgres allows 6 dimensions; the bound only protects the stack from corrupt input.
const MAX_ARRAY_DEPTH: usize = 32;

/// A Postgres array literal (`{1,2}`, `{{"a b",NULL},{c,d}}`, `[0:1]={x,y}`) as nested
/// JSON arrays, each element encoded as its element type. Arrays are always JSON, also in
/// a hash field.
pub(super) fn encode_array(
    out: &mut Vec<u8>,
    elem: &PgType,
    text: &[u8],
    opts: EncodeOptions,
) -> Result<(), EncodeError> {
    let bad = |problem| EncodeError::MalformedArray {
        text: quote(text),
        problem,
    };
    let mut i = 0;
    if text.first() == Some(&b'[') {
        // Dimension decoration, printed when a lower bound is not 1; JSON has no bounds.
        i = text
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| bad("dimension decoration without '='"))?
            + 1;
        let decoration = &text[..i - 1];
        if !decoration
            .iter()
            .all(|&b| matches!(b, b'[' | b']' | b':' | b'-' | b'0'..=b'9'))
        {
            return Err(bad("malformed dimension decoration"));
        }
    }
    let mut scratch = Vec::new();
    let mut parser = ArrayParser {
        text,
        i,
        elem,
        opts,
        scratch: &mut scratch,
    };
    parser.skip_ws();
    parser.level(out, 0).map_err(|p| match p {
        ArrayProblem::Syntax(problem) => bad(problem),
        ArrayProblem::Element(e) => e,
    })?;
    parser.skip_ws();
    if parser.i != text.len() {
        return Err(bad("text after the closing '}'"));
    }
    Ok(())
}

enum ArrayProblem {
    Syntax(&'static str),
    Element(EncodeError),
}

struct ArrayParser<'t, 's> {
    text: &'t [u8],
    i: usize,
    elem: &'t PgType,
    opts: EncodeOptions,
    /// Holds an element while its backslash escapes are removed.
    scratch: &'s mut Vec<u8>,
}

impl ArrayParser<'_, '_> {
    fn peek(&self) -> Option<u8> {
        self.text.get(self.i).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            self.i += 1;
        }
    }

    /// One `{...}` level, starting at its `{`.
    fn level(&mut self, out: &mut Vec<u8>, depth: usize) -> Result<(), ArrayProblem> {
        use ArrayProblem::Syntax;
        if depth >= MAX_ARRAY_DEPTH {
            return Err(Syntax("nested too deeply"));
        }
        if self.peek() != Some(b'{') {
            return Err(Syntax("expected '{'"));
        }
        self.i += 1;
        out.push(b'[');
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            out.push(b']');
            return Ok(());
        }
        loop {
            self.skip_ws();
            match self.peek() {
                Some(b'{') => self.level(out, depth + 1)?,
                Some(b'"') => self.quoted(out)?,
                Some(_) => self.unquoted(out)?,
                None => return Err(Syntax("unexpected end")),
            }
            self.skip_ws();
            match self.peek() {
                Some(b',') => {
                    self.i += 1;
                    out.push(b',');
                }
                Some(b'}') => {
                    self.i += 1;
                    out.push(b']');
                    return Ok(());
                }
                _ => return Err(Syntax("expected ',' or '}' after an element")),
            }
        }
    }

    fn quoted(&mut self, out: &mut Vec<u8>) -> Result<(), ArrayProblem> {
        self.i += 1;
        self.scratch.clear();
        loop {
            match self.peek() {
                Some(b'"') => break,
                Some(b'\\') => {
                    self.i += 1;
                    let b = self
                        .peek()
                        .ok_or(ArrayProblem::Syntax("unexpected end after '\\'"))?;
                    self.scratch.push(b);
                }
                Some(b) => self.scratch.push(b),
                None => return Err(ArrayProblem::Syntax("unterminated quoted element")),
            }
            self.i += 1;
        }
        self.i += 1;
        self.element(out)
    }

    fn unquoted(&mut self, out: &mut Vec<u8>) -> Result<(), ArrayProblem> {
        self.scratch.clear();
        let mut escaped = false;
        // Length of the element without trailing (unescaped) whitespace.
        let mut kept = 0;
        loop {
            match self.peek() {
                Some(b',' | b'}') => break,
                Some(b'{' | b'"') => return Err(ArrayProblem::Syntax("unexpected '{' or '\"'")),
                Some(b'\\') => {
                    self.i += 1;
                    let b = self
                        .peek()
                        .ok_or(ArrayProblem::Syntax("unexpected end after '\\'"))?;
                    self.scratch.push(b);
                    escaped = true;
                    kept = self.scratch.len();
                }
                Some(b) => {
                    self.scratch.push(b);
                    if !b.is_ascii_whitespace() {
                        kept = self.scratch.len();
                    }
                }
                None => return Err(ArrayProblem::Syntax("unexpected end")),
            }
            self.i += 1;
        }
        self.scratch.truncate(kept);
        if self.scratch.is_empty() {
            return Err(ArrayProblem::Syntax("empty unquoted element"));
        }
        if !escaped && self.scratch.eq_ignore_ascii_case(b"NULL") {
            out.extend_from_slice(b"null");
            return Ok(());
        }
        self.element(out)
    }

    fn element(&mut self, out: &mut Vec<u8>) -> Result<(), ArrayProblem> {
        encode(out, self.elem, self.scratch, self.opts, Form::Json).map_err(ArrayProblem::Element)
    }
}
