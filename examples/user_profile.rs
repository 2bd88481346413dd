//! A user-profile cache with `pgcache::Reader`.
//!
//! The hand-written version of this is a page: GET, on a miss query the database, build the
//! object field by field, SETEX, and a lock with a fixed sleep against stampedes, and it
//! still caches a stale profile when an update lands between its query and its SETEX. Here
//! the daemon keeps `user:profile:{id}` up to date, and the reader fills misses under a
//! lease that any update revokes.
//!
//! With the daemon running on a config that caches `public.users` as `user:profile:{id}`
//! (see `deploy/pgcache.example.toml`):
//!
//! ```text
//! cargo run --example user_profile -- pgcache.toml 42
//! ```

use pgcache::config::Config;
use pgcache::Reader;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[allow(dead_code)] // printed with Debug only
struct UserProfile {
    id: i64,
    username: String,
    email: Option<String>,
    /// RFC 3339 in UTC, as the daemon writes timestamptz.
    created_at: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let config_path = args.next().unwrap_or_else(|| "pgcache.toml".to_string());
    let id: i64 = args.next().as_deref().unwrap_or("1").parse()?;

    // The same file as the daemon: tables, key templates, columns and encoding.
    let reader = Reader::from_config(&Config::load(config_path.as_ref())?)?;
    let users = reader.table("public.users")?;

    match users.get::<UserProfile>(id).await? {
        Some(profile) => println!("{profile:#?}"),
        None => println!("no user {id}"),
    }
    println!("{:?}", reader.stats());
    Ok(())
}
