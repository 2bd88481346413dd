//! Comparing Redis with Postgres: `pgcache verify`.
