//! The demo's shop: its schema, its seed rows, the table rules that cache it, and the SQL
//! setup, which is our own `sql/setup.sql` run against it.

use std::time::Duration;

use crate::encoder::PgType;

/// The database the demo creates in its throwaway Postgres.
pub const DATABASE: &str = "shop";
/// The role the daemon and the read helper connect as, created by `sql/role.sql`.
pub const ROLE: &str = "pgcache";
/// Its password (the throwaway server trusts local TCP anyway; the role is made the way an
/// operator makes it).
pub const ROLE_PASSWORD: &str = "demo-password";
/// Publication and slot names: the defaults, so the checkpoint key is the documented one.
pub const PUBLICATION: &str = crate::config::DEFAULT_PUBLICATION;
pub const SLOT: &str = crate::config::DEFAULT_SLOT;

/// Seed sizes. Product ids `1..=HOT_PRODUCTS` are the hot keys most reads go to.
pub const SEED_PRODUCTS: i32 = 200;
pub const SEED_CUSTOMERS: i32 = 100;
pub const HOT_PRODUCTS: i32 = 10;

/// Cached orders expire after this long; the daemon refreshes them while they are cached.
pub const ORDER_TTL: Duration = Duration::from_secs(300);

pub const SCHEMA: &str = "
CREATE TABLE products (
    id         serial PRIMARY KEY,
    name       text NOT NULL,
    price      numeric(10,2) NOT NULL CHECK (price >= 0),
    stock      int NOT NULL CHECK (stock >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE customers (
    id         serial PRIMARY KEY,
    email      text NOT NULL UNIQUE,
    name       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE orders (
    id          serial PRIMARY KEY,
    customer_id int NOT NULL REFERENCES customers (id),
    total       numeric(12,2) NOT NULL,
    status      text NOT NULL,
    placed_at   timestamptz NOT NULL DEFAULT now()
);
";

/// The seed, one transaction per table. It runs after the slot exists, so it reaches Redis
/// through the stream like any other write (the daemon has no initial backfill to rely on).
pub fn seed_sql() -> String {
    format!(
        "INSERT INTO products (name, price, stock)
         SELECT (ARRAY['Espresso beans', 'Green tea', 'Oat milk', 'Dark chocolate',
                       'Sourdough loaf', 'Olive oil', 'Sea salt', 'Honey jar', 'Rolled oats',
                       'Maple syrup', 'Peanut butter', 'Rye crackers'])[1 + (i - 1) % 12] || ' #' || i,
                round((2 + random() * 48)::numeric, 2),
                100 + (random() * 400)::int
         FROM generate_series(1, {SEED_PRODUCTS}) AS i;
         INSERT INTO customers (email, name)
         SELECT 'customer' || i || '@example.com', 'Customer ' || i
         FROM generate_series(1, {SEED_CUSTOMERS}) AS i;"
    )
}

/// How a table is cached: its Redis key prefix and the columns the rule stores, with the
/// encoding each gets (used by the convergence check to encode rows as the daemon does).
#[derive(Debug)]
pub struct TableSpec {
    /// `schema.name`.
    pub table: &'static str,
    /// The key template (`product:{id}`); its literal prefix names the table's keys.
    pub key: &'static str,
    pub prefix: &'static str,
    pub columns: &'static [(&'static str, PgType)],
    /// `true`: every row is in Redis (mirror). `false`: rows are cached on demand by the
    /// read helper and kept current by the daemon (refresh).
    pub mirror: bool,
}

pub static PRODUCTS: TableSpec = TableSpec {
    table: "public.products",
    key: "product:{id}",
    prefix: "product:",
    columns: &[
        ("id", PgType::Int),
        ("name", PgType::Text),
        ("price", PgType::Numeric),
        ("stock", PgType::Int),
        ("updated_at", PgType::TimestampTz),
    ],
    mirror: true,
};

pub static CUSTOMERS: TableSpec = TableSpec {
    table: "public.customers",
    key: "customer:{id}",
    prefix: "customer:",
    columns: &[
        ("id", PgType::Int),
        ("email", PgType::Text),
        ("name", PgType::Text),
        ("created_at", PgType::TimestampTz),
    ],
    mirror: true,
};

pub static ORDERS: TableSpec = TableSpec {
    table: "public.orders",
    key: "order:{id}",
    prefix: "order:",
    columns: &[
        ("id", PgType::Int),
        ("customer_id", PgType::Int),
        ("total", PgType::Numeric),
        ("status", PgType::Text),
        ("placed_at", PgType::TimestampTz),
    ],
    mirror: false,
};

/// Every cached table, in display order.
pub static TABLES: [&TableSpec; 3] = [&PRODUCTS, &CUSTOMERS, &ORDERS];

/// The comma-separated table list that the SQL scripts take.
pub fn table_list() -> String {
    TABLES.map(|t| t.table).join(",")
}

/// The daemon's config for these servers: the table rules of the demo.
/// The demo's config; `redis` is the body of its `[redis]` table.
pub fn config_toml(postgres_url: &str, redis: &str) -> String {
    let mut toml = format!(
        "[postgres]\nurl = {postgres_url:?}\nslot = {SLOT:?}\npublication = {PUBLICATION:?}\n\n\
         [redis]\n{redis}\n\n\
         # The demo reads the daemon's progress in process; no HTTP endpoint.\n\
         [metrics]\nlisten = \"\"\n"
    );
    for spec in TABLES {
        let columns: Vec<String> = spec.columns.iter().map(|(c, _)| format!("{c:?}")).collect();
        toml.push_str(&format!(
            "\n[[tables]]\ntable = {:?}\nkey = {:?}\ncolumns = [{}]\n",
            spec.table,
            spec.key,
            columns.join(", ")
        ));
        if spec.mirror {
            toml.push_str("mode = \"mirror\"\n");
        } else {
            toml.push_str(&format!(
                "mode = \"refresh\"\nttl = \"{}s\"\n",
                ORDER_TTL.as_secs()
            ));
        }
    }
    toml
}

/// The scripts that `sql/setup.sql` includes, embedded so the binary runs anywhere.
const SCRIPTS: [(&str, &str); 5] = [
    ("role.sql", include_str!("../../sql/role.sql")),
    ("publication.sql", include_str!("../../sql/publication.sql")),
    ("events.sql", include_str!("../../sql/events.sql")),
    ("slot.sql", include_str!("../../sql/slot.sql")),
    (
        "replica_identity.sql",
        include_str!("../../sql/replica_identity.sql"),
    ),
];
const SETUP: &str = include_str!("../../sql/setup.sql");

/// `sql/setup.sql` as one script for psql's standard input, its variables set up front:
/// `\ir` resolves files relative to the script, which an embedded script does not have, so
/// each `\ir` line is replaced by the file it names.
///
/// # Errors
/// When setup.sql includes a file that is not embedded here (it gained a script).
pub fn setup_script() -> Result<String, String> {
    let vars = [
        ("role", ROLE.to_string()),
        ("password", ROLE_PASSWORD.to_string()),
        ("publication", PUBLICATION.to_string()),
        ("slot", SLOT.to_string()),
        ("tables", table_list()),
    ];
    let mut script = String::new();
    for (name, value) in vars {
        script.push_str(&format!("\\set {name} '{}'\n", value.replace('\'', "''")));
    }
    for line in SETUP.lines() {
        match line.trim().strip_prefix("\\ir ") {
            Some(file) => {
                let file = file.trim();
                let (_, sql) = SCRIPTS
                    .iter()
                    .find(|(name, _)| *name == file)
                    .ok_or_else(|| {
                        format!("sql/setup.sql includes {file}, which the demo does not embed")
                    })?;
                script.push_str(sql);
            }
            None => script.push_str(line),
        }
        script.push('\n');
    }
    Ok(script)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Mode};

    #[test]
    fn setup_script_inlines_every_include() {
        let script = setup_script().unwrap();
        assert!(!script.contains("\\ir "));
        for (_, sql) in SCRIPTS {
            assert!(script.contains(sql.trim()));
        }
        assert!(script.starts_with("\\set role 'pgcache'\n"));
        assert!(script.contains("\\set tables 'public.products,public.customers,public.orders'"));
        // Role before publication before slot, as setup.sql orders them.
        let at = |needle: &str| script.find(needle).unwrap();
        assert!(at("CREATE ROLE") < at("CREATE PUBLICATION"));
        assert!(at("CREATE PUBLICATION") < at("pg_create_logical_replication_slot"));
    }

    #[test]
    fn config_is_valid_and_matches_the_specs() {
        let config = Config::from_toml_str(&config_toml(
            "postgres://pgcache:pw@127.0.0.1:5999/shop?sslmode=disable",
            "url = \"redis://127.0.0.1:6999/\"",
        ))
        .unwrap();
        assert_eq!(config.tables.len(), TABLES.len());
        // And with the seeds of a cluster.
        let cluster = Config::from_toml_str(&config_toml(
            "postgres://pgcache:pw@127.0.0.1:5999/shop?sslmode=disable",
            "urls = [\"redis://127.0.0.1:7001/\", \"redis://127.0.0.1:7002/\"]\ncluster = true",
        ))
        .unwrap();
        assert!(matches!(
            cluster.redis.topology,
            crate::config::RedisTopology::Cluster { ref seeds } if seeds.len() == 2
        ));
        for spec in TABLES {
            let (schema, name) = spec.table.split_once('.').unwrap();
            let rule = config.table(schema, name).unwrap();
            assert_eq!(rule.key_prefix_literal(), spec.prefix);
            let columns: Vec<&str> = spec.columns.iter().map(|(c, _)| *c).collect();
            assert_eq!(rule.columns.as_deref().unwrap(), columns);
            assert_eq!(rule.mode == Mode::Mirror, spec.mirror);
        }
        assert_eq!(
            config.table("public", "orders").unwrap().ttl,
            Some(ORDER_TTL)
        );
    }
}
