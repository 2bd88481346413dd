//! Key values as callers pass them: one value (`42`, `"acme"`) or a tuple of values for a
//! template with several columns (`("acme", 42)` for `tenant:{tenant_id}:order:{id}`).
//!
//! A key value is the column's Postgres text output, because that is what the daemon puts
//! into keys (pgoutput sends text). Integers and strings print the same way in Rust and in
//! Postgres; booleans do not (`t`/`f`), so they get their own impl. Values that Postgres would
//! print differently (`042` for an integer, an upper-case UUID) are caught when the row is
//! read: see [`ReaderError::NonCanonicalKey`](super::ReaderError::NonCanonicalKey).
//!
//! Rendering allocates nothing beyond the key string: integers are formatted into a buffer on
//! the stack, and tuples hand their values over as an array on the stack.

use std::fmt::Write as _;

/// The longest integer text (`-170141183460469231731687303715884105728`) fits.
const INLINE: usize = 48;

/// One key value's Postgres text, borrowed or formatted on the stack.
pub struct KeyText<'a>(Repr<'a>);

enum Repr<'a> {
    Borrowed(&'a [u8]),
    Inline { buf: [u8; INLINE], len: usize },
}

impl<'a> KeyText<'a> {
    /// A value whose Postgres text is `text`, as is.
    pub fn borrowed(text: &'a str) -> KeyText<'a> {
        KeyText(Repr::Borrowed(text.as_bytes()))
    }

    fn display(value: impl std::fmt::Display) -> KeyText<'static> {
        let mut w = InlineWriter {
            buf: [0; INLINE],
            len: 0,
        };
        // Only used for integers, which always fit; an overflow would truncate, never panic.
        let _ = write!(w, "{value}");
        KeyText(Repr::Inline {
            buf: w.buf,
            len: w.len,
        })
    }

    /// The text's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Borrowed(b) => b,
            Repr::Inline { buf, len } => &buf[..*len],
        }
    }
}

struct InlineWriter {
    buf: [u8; INLINE],
    len: usize,
}

impl std::fmt::Write for InlineWriter {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        let dst = self.buf.get_mut(self.len..end).ok_or(std::fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// A value of one key column.
pub trait KeyValue {
    /// The value as Postgres prints it for the column's type.
    fn key_text(&self) -> KeyText<'_>;
}

macro_rules! integer_key_values {
    ($($t:ty),*) => {$(
        impl KeyValue for $t {
            fn key_text(&self) -> KeyText<'_> {
                KeyText::display(self)
            }
        }
    )*};
}

integer_key_values!(i8, i16, i32, i64, i128, isize, u8, u16, u32, u64, u128, usize);

impl KeyValue for str {
    fn key_text(&self) -> KeyText<'_> {
        KeyText::borrowed(self)
    }
}

impl KeyValue for String {
    fn key_text(&self) -> KeyText<'_> {
        KeyText::borrowed(self)
    }
}

impl KeyValue for bool {
    /// Postgres prints booleans as `t` and `f`, and so does pgoutput.
    fn key_text(&self) -> KeyText<'_> {
        KeyText::borrowed(if *self { "t" } else { "f" })
    }
}

impl<T: KeyValue + ?Sized> KeyValue for &T {
    fn key_text(&self) -> KeyText<'_> {
        (**self).key_text()
    }
}

/// The values of all key columns of one row, in template order.
///
/// Implemented for a single [`KeyValue`] (templates with one column), tuples of up to six
/// values, and arrays and slices of `&dyn KeyValue`.
pub trait Key {
    /// How many values this key has.
    fn len(&self) -> usize;

    /// Whether the key has no values (never a valid key: templates name at least one column).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f` with the values' texts.
    fn with_texts<R>(&self, f: impl FnOnce(&[&[u8]]) -> R) -> R;
}

impl<T: KeyValue + ?Sized> Key for T {
    fn len(&self) -> usize {
        1
    }

    fn with_texts<R>(&self, f: impl FnOnce(&[&[u8]]) -> R) -> R {
        let text = self.key_text();
        f(&[text.as_bytes()])
    }
}

macro_rules! tuple_keys {
    ($(($n:expr; $($name:ident $idx:tt),+)),*) => {$(
        impl<$($name: KeyValue),+> Key for ($($name,)+) {
            fn len(&self) -> usize {
                $n
            }

            fn with_texts<R>(&self, f: impl FnOnce(&[&[u8]]) -> R) -> R {
                let texts = ($(self.$idx.key_text(),)+);
                f(&[$(texts.$idx.as_bytes()),+])
            }
        }
    )*};
}

tuple_keys!(
    (1; A 0),
    (2; A 0, B 1),
    (3; A 0, B 1, C 2),
    (4; A 0, B 1, C 2, D 3),
    (5; A 0, B 1, C 2, D 3, E 4),
    (6; A 0, B 1, C 2, D 3, E 4, F 5)
);

/// Keys with more values than this pass through a heap buffer (no template is that wide in
/// practice).
const STACK_VALUES: usize = 8;

fn with_dyn_texts<R>(values: &[&dyn KeyValue], f: impl FnOnce(&[&[u8]]) -> R) -> R {
    let texts: Vec<KeyText<'_>> = values.iter().map(|v| v.key_text()).collect();
    if texts.len() <= STACK_VALUES {
        let mut slices: [&[u8]; STACK_VALUES] = [&[]; STACK_VALUES];
        for (slot, text) in slices.iter_mut().zip(&texts) {
            *slot = text.as_bytes();
        }
        f(&slices[..texts.len()])
    } else {
        let slices: Vec<&[u8]> = texts.iter().map(KeyText::as_bytes).collect();
        f(&slices)
    }
}

impl Key for &[&dyn KeyValue] {
    fn len(&self) -> usize {
        <[_]>::len(self)
    }

    fn with_texts<R>(&self, f: impl FnOnce(&[&[u8]]) -> R) -> R {
        with_dyn_texts(self, f)
    }
}

impl<const N: usize> Key for [&dyn KeyValue; N] {
    fn len(&self) -> usize {
        N
    }

    fn with_texts<R>(&self, f: impl FnOnce(&[&[u8]]) -> R) -> R {
        with_dyn_texts(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(key: &impl Key) -> Vec<String> {
        key.with_texts(|t| {
            t.iter()
                .map(|b| String::from_utf8(b.to_vec()).unwrap())
                .collect()
        })
    }

    #[test]
    fn single_values_print_like_postgres() {
        assert_eq!(texts(&42), ["42"]);
        assert_eq!(texts(&-7i64), ["-7"]);
        assert_eq!(texts(&i128::MIN), [i128::MIN.to_string()]);
        assert_eq!(texts(&u64::MAX), [u64::MAX.to_string()]);
        assert_eq!(texts(&"acme"), ["acme"]);
        assert_eq!(texts(&String::from("a:b")), ["a:b"]);
        assert_eq!(texts(&true), ["t"]);
        assert_eq!(texts(&&false), ["f"]);
        assert_eq!(42.len(), 1);
    }

    #[test]
    fn tuples_arrays_and_slices_keep_order() {
        assert_eq!(texts(&("acme", 42)), ["acme", "42"]);
        assert_eq!(texts(&(1, "b", 3u8)), ["1", "b", "3"]);
        assert_eq!(("a", 1, 2).len(), 3);
        let dynamic: [&dyn KeyValue; 2] = [&"x", &5];
        assert_eq!(texts(&dynamic), ["x", "5"]);
        let slice: &[&dyn KeyValue] = &[&1, &2, &3];
        assert_eq!(texts(&slice), ["1", "2", "3"]);
        let wide: Vec<i32> = (0..10).collect();
        let refs: Vec<&dyn KeyValue> = wide.iter().map(|v| v as &dyn KeyValue).collect();
        assert_eq!(texts(&&refs[..]).len(), 10);
        assert_eq!(Key::len(&&refs[..]), 10);
    }
}
