//! The throwaway servers: both binaries checked first, then Postgres and Redis started
//! through the test harness, the shop created and `sql/setup.sql` run against it.

use std::path::PathBuf;

use super::{shop, DemoError};
use crate::testkit::{PgOptions, RedisOptions, TestPostgres, TestRedis, TestRedisCluster};

/// Both servers' binaries, all problems at once.
pub fn check_binaries() -> Result<(), DemoError> {
    let mut missing = Vec::new();
    for name in ["initdb", "pg_ctl", "postgres", "psql"] {
        if let Err(e) = TestPostgres::bin(name) {
            missing.push(format!("  - {e}"));
            break;
        }
    }
    if !on_path("redis-server") {
        missing.push(
            "  - redis-server not found in PATH; install it with `apt-get install -y redis-server`"
                .to_string(),
        );
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(DemoError::MissingBinaries(missing))
    }
}

/// The throwaway servers, the shop database created and set up for pgcache.
pub struct Servers {
    pub pg: TestPostgres,
    pub redis: TestRedis,
    /// With `--cluster`: the Redis Cluster the daemon and the reader use instead.
    pub cluster: Option<TestRedisCluster>,
    /// What the setup scripts printed (slot created, replica identities).
    pub setup_report: Vec<String>,
}

impl Servers {
    /// Blocking: starts both servers and runs the schema and `sql/setup.sql`.
    pub fn start(cluster: bool) -> Result<Servers, DemoError> {
        let setup = |e: anyhow::Error| DemoError::Setup(format!("{e:#}"));
        let redis = TestRedis::start().map_err(setup)?;
        let cluster = if cluster {
            Some(TestRedisCluster::start_with(3, 0, RedisOptions::default()).map_err(setup)?)
        } else {
            None
        };
        // The harness turns synchronous_commit off for speed, which makes the walsender wait
        // for the WAL writer (up to 200 ms) before it sends a commit: on, as in production
        // (fsync stays off), so the lag shown is the daemon's, not the harness's.
        let pg = TestPostgres::start_with(PgOptions {
            extra_conf: vec!["synchronous_commit = on".to_string()],
            ..PgOptions::default()
        })
        .map_err(setup)?;
        pg.create_database(shop::DATABASE).map_err(setup)?;
        pg.psql(shop::DATABASE, shop::SCHEMA).map_err(setup)?;
        let script = shop::setup_script().map_err(DemoError::Setup)?;
        let output = pg.psql(shop::DATABASE, &script).map_err(setup)?;
        Ok(Servers {
            pg,
            redis,
            cluster,
            setup_report: setup_report(&output),
        })
    }

    /// The body of the config's `[redis]` table: the one server, or the cluster's seeds.
    pub fn redis_toml(&self) -> String {
        match &self.cluster {
            Some(cluster) => format!("urls = {:?}\ncluster = true", cluster.urls()),
            None => format!("url = {:?}", self.redis.url()),
        }
    }

    /// The cluster's client ports, comma separated, with `--cluster`.
    pub fn cluster_ports(&self) -> Option<String> {
        self.cluster.as_ref().map(|cluster| {
            cluster
                .nodes()
                .iter()
                .map(|n| n.port().to_string())
                .collect::<Vec<_>>()
                .join(",")
        })
    }

    /// The port to point `redis-cli` at (with `-c` on a cluster).
    pub fn redis_port(&self) -> u16 {
        self.cluster
            .as_ref()
            .map_or(self.redis.port(), |cluster| cluster.nodes()[0].port())
    }

    /// The Postgres server's temporary directory (its data directory is inside).
    pub fn pg_dir(&self) -> PathBuf {
        let data = self.pg.data_dir();
        data.parent().unwrap_or(data).to_path_buf()
    }
}

/// What `sql/setup.sql` printed, shortened: its replica identity report has a row per table
/// (`table|identity|columns|advice`), and the demo's key templates use only the primary key.
fn setup_report(output: &str) -> Vec<String> {
    let mut report = vec![format!(
        "sql/setup.sql: role {:?}, publication {:?} for {}",
        shop::ROLE,
        shop::PUBLICATION,
        shop::table_list()
    )];
    let mut identities = Vec::new();
    for line in output.lines().filter(|l| !l.trim().is_empty()) {
        match line.split('|').collect::<Vec<_>>()[..] {
            [table, identity, columns, _advice] => {
                identities.push(format!("{table} {identity} ({columns})"));
            }
            _ => report.push(format!("sql/setup.sql: {line}")),
        }
    }
    if !identities.is_empty() {
        report.push(format!(
            "sql/setup.sql: replica identity: {}",
            identities.join(", ")
        ));
    }
    report
}

/// Whether an executable called `name` is in a `PATH` directory.
pub fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()))
}

/// `psql` when it is on PATH, else its full path.
pub fn psql_command() -> String {
    if on_path("psql") {
        return "psql".to_string();
    }
    TestPostgres::bin("psql")
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "psql".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setup_report_condenses_the_replica_identity_rows() {
        let output = "created slot pgcache at 0/195C930\n\
             public.orders|default (primary key)|id|ok if the key template uses only the identity columns, else: ALTER TABLE public.orders REPLICA IDENTITY FULL;\n\
             public.products|default (primary key)|id|ok if ...\n";
        assert_eq!(
            setup_report(output),
            [
                "sql/setup.sql: role \"pgcache\", publication \"pgcache\" for public.products,public.customers,public.orders",
                "sql/setup.sql: created slot pgcache at 0/195C930",
                "sql/setup.sql: replica identity: public.orders default (primary key) (id), public.products default (primary key) (id)",
            ]
        );
    }
}
