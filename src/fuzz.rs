//! Configuration shared by the property tests (the `props` modules beside the code they
//! test). CI runs each property with its small default case count, so the whole suite stays
//! fast in a debug build; `PGCACHE_FUZZ_CASES=<n>` runs `n` cases of every property instead,
//! for a long fuzzing run:
//!
//! ```sh
//! PGCACHE_FUZZ_CASES=100000 cargo test --lib props
//! ```
//!
//! A failure prints the shrunk input; `PROPTEST_RNG_SEED=<n>` makes a run repeatable.
//! Failing inputs are not written to `proptest-regressions/` files: a case worth keeping
//! becomes a named unit test beside the code it broke.

use proptest::test_runner::Config;

/// The environment variable that sets the case count of every property.
pub(crate) const CASES_VAR: &str = "PGCACHE_FUZZ_CASES";

/// The proptest configuration of a property: `default_cases` cases (what CI runs), or
/// [`CASES_VAR`] when it is set.
///
/// # Panics
/// When [`CASES_VAR`] is set but is not a number of at least 1: a typo would otherwise
/// quietly turn a long run into a short one.
pub(crate) fn config(default_cases: u32) -> Config {
    let cases = match std::env::var(CASES_VAR) {
        Err(std::env::VarError::NotPresent) => default_cases,
        Ok(text) => match text.trim().parse::<u32>() {
            Ok(n) if n > 0 => n,
            _ => panic!("{CASES_VAR}={text:?} is not a number of cases (1 or more)"),
        },
        Err(e) => panic!("{CASES_VAR}: {e}"),
    };
    Config {
        failure_persistence: None,
        ..Config::with_cases(cases)
    }
}
