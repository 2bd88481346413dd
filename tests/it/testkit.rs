//! Tests of the throwaway-server harness itself: if these fail, nothing else can be trusted.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pgcache::testkit::{
    free_port, PgOptions, RedisOptions, TestPostgres, TestRedis, TestRedisCluster, CLUSTER_SLOTS,
};

fn refuses_connections(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_err()
}

/// Polls `done` until it holds or `timeout` passes; tests wait on conditions, not sleeps.
fn eventually(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    done()
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

#[test]
fn postgres_starts_with_logical_replication_settings() -> Result<()> {
    let pg = TestPostgres::start()?;
    assert_eq!(pg.psql("postgres", "SHOW wal_level")?, "logical");
    assert_eq!(pg.psql("postgres", "SHOW max_replication_slots")?, "20");
    assert_eq!(pg.psql("postgres", "SHOW listen_addresses")?, "127.0.0.1");
    assert_eq!(pg.psql("postgres", "SHOW port")?, pg.port().to_string());
    assert!(pg
        .url("app")
        .ends_with(&format!(":{}/app?sslmode=disable", pg.port())));
    assert!(TestPostgres::bin("pg_recvlogical")?.is_file());
    Ok(())
}

/// The server is the one in `PGCACHE_PG_BINDIR` when that is set (the version matrix in
/// `.ci/run` relies on it), and the binaries agree with the server about its version.
#[test]
fn postgres_runs_from_the_chosen_bin_directory() -> Result<()> {
    let pg = TestPostgres::start()?;
    let initdb = TestPostgres::bin("initdb")?;
    if let Some(dir) = std::env::var_os("PGCACHE_PG_BINDIR").filter(|dir| !dir.is_empty()) {
        assert_eq!(initdb.parent(), Some(std::fs::canonicalize(dir)?.as_path()));
    }
    let out = Command::new(&initdb).arg("--version").output()?;
    let installed = String::from_utf8_lossy(&out.stdout).to_string();
    // "15.20 (Debian 15.20-0+deb12u1)" or "18.6": the first word is the version.
    let running = pg.psql("postgres", "SHOW server_version")?;
    let running = running.split_whitespace().next().unwrap_or_default();
    assert!(
        installed.contains(&format!(" {running}")),
        "{} says {installed:?}, the server {running:?}",
        initdb.display()
    );
    Ok(())
}

#[test]
fn psql_runs_statements_one_by_one_and_reports_errors() -> Result<()> {
    let pg = TestPostgres::start()?;
    // CREATE DATABASE cannot run inside a multi-statement query string; psql -f splits it.
    pg.psql("postgres", "CREATE DATABASE one; CREATE DATABASE two;")?;
    pg.create_database("three")?;
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT datname FROM pg_database WHERE datname IN ('one', 'two', 'three') ORDER BY 1"
        )?,
        "one\nthree\ntwo"
    );
    let err = pg
        .psql("one", "SELECT 1; SELECT no_such_column;")
        .unwrap_err();
    assert!(format!("{err:#}").contains("no_such_column"), "{err:#}");
    Ok(())
}

#[test]
fn two_postgres_and_two_redis_run_at_once() -> Result<()> {
    let (pgs, redises) = thread::scope(|s| {
        let pgs = [s.spawn(TestPostgres::start), s.spawn(TestPostgres::start)];
        let redises = [s.spawn(TestRedis::start), s.spawn(TestRedis::start)];
        let pgs = pgs.map(|h| h.join().expect("Postgres start thread panicked"));
        let redises = redises.map(|h| h.join().expect("Redis start thread panicked"));
        (pgs, redises)
    });
    let [pg_a, pg_b] = pgs;
    let [redis_a, redis_b] = redises;
    let (pg_a, pg_b, redis_a, redis_b) = (pg_a?, pg_b?, redis_a?, redis_b?);

    let mut ports = vec![pg_a.port(), pg_b.port(), redis_a.port(), redis_b.port()];
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 4, "ports collide: {ports:?}");
    assert!(!ports.contains(&5432) && !ports.contains(&6379));
    assert_ne!(pg_a.data_dir(), pg_b.data_dir());

    // Each server holds its own data.
    for pg in [&pg_a, &pg_b] {
        pg.psql(
            "postgres",
            &format!(
                "CREATE TABLE who (port int); INSERT INTO who VALUES ({})",
                pg.port()
            ),
        )?;
    }
    for pg in [&pg_a, &pg_b] {
        assert_eq!(
            pg.psql("postgres", "SELECT port FROM who")?,
            pg.port().to_string()
        );
    }
    for redis in [&redis_a, &redis_b] {
        redis.cli(&["SET", "who", &redis.port().to_string()])?;
    }
    for redis in [&redis_a, &redis_b] {
        assert_eq!(redis.cli(&["GET", "who"])?, redis.port().to_string());
        assert_eq!(redis.url(), format!("redis://127.0.0.1:{}/", redis.port()));
    }
    Ok(())
}

#[test]
fn postgres_restart_keeps_port_and_data() -> Result<()> {
    let mut pg = TestPostgres::start()?;
    pg.create_database("restart_keeps")?;
    pg.psql(
        "restart_keeps",
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'kept')",
    )?;
    let port = pg.port();

    pg.restart()?;
    assert_eq!(pg.port(), port);
    assert_eq!(
        pg.psql("restart_keeps", "SELECT v FROM t WHERE id = 1")?,
        "kept"
    );

    pg.stop()?;
    assert!(refuses_connections(port));
    assert!(pg.psql("restart_keeps", "SELECT 1").is_err());
    pg.stop()?; // stopping twice is harmless
    pg.start_again()?;
    assert!(
        pg.start_again().is_err(),
        "starting a running server must fail"
    );
    assert_eq!(
        pg.psql("restart_keeps", "SELECT v FROM t WHERE id = 1")?,
        "kept"
    );
    Ok(())
}

#[test]
fn postgres_kill9_kills_server_and_open_sessions() -> Result<()> {
    let mut pg = TestPostgres::start()?;
    // synchronous_commit is off in the harness: a commit that must survive a crash asks.
    pg.psql(
        "postgres",
        "SET synchronous_commit = on; CREATE TABLE t (v text); INSERT INTO t VALUES ('durable')",
    )?;
    let mut session = Command::new(TestPostgres::bin("psql")?)
        .args([
            "-X",
            "-At",
            "-d",
            &pg.url("postgres"),
            "-c",
            "SELECT pg_sleep(120)",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let sleeping = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(120)%'";
    assert!(eventually(Duration::from_secs(10), || {
        pg.psql("postgres", sleeping).is_ok_and(|n| n == "1")
    }));

    pg.kill9()?;
    assert!(refuses_connections(pg.port()));
    assert!(pg.psql("postgres", "SELECT 1").is_err());
    // The backend serving the open session died with the postmaster.
    let session_ended = eventually(Duration::from_secs(10), || {
        matches!(session.try_wait(), Ok(Some(_)))
    });
    if !session_ended {
        let _ = session.kill();
        bail!("a session survived kill9");
    }
    assert!(pg.kill9().is_err(), "killing a dead server must fail");

    pg.start_again()?;
    assert_eq!(pg.psql("postgres", "SELECT v FROM t")?, "durable");
    Ok(())
}

#[test]
fn redis_appendonly_keeps_keys_across_kill9() -> Result<()> {
    let mut redis = TestRedis::start_with(RedisOptions {
        appendonly: true,
        ..Default::default()
    })?;
    redis.cli(&["SET", "k", "v1"])?;
    let port = redis.port();

    redis.kill9()?;
    assert!(refuses_connections(port));
    assert!(redis.cli(&["PING"]).is_err());
    redis.start_again()?;
    assert_eq!(redis.port(), port);
    assert_eq!(redis.cli(&["GET", "k"])?, "v1");

    redis.cli(&["SET", "k", "v2"])?;
    redis.stop()?;
    assert!(refuses_connections(port));
    redis.start_again()?;
    assert_eq!(redis.cli(&["GET", "k"])?, "v2");
    Ok(())
}

#[test]
fn redis_without_persistence_forgets_on_kill9() -> Result<()> {
    let mut redis = TestRedis::start()?;
    redis.cli(&["SET", "k", "v"])?;
    redis.kill9()?;
    assert!(redis.kill9().is_err(), "killing a dead server must fail");
    redis.start_again()?;
    assert_eq!(redis.cli(&["EXISTS", "k"])?, "0");
    Ok(())
}

#[test]
fn redis_cli_reports_error_replies() -> Result<()> {
    let redis = TestRedis::start_with(RedisOptions {
        extra_args: vec!["--maxmemory".into(), "10mb".into()],
        ..Default::default()
    })?;
    assert_eq!(
        redis.cli(&["CONFIG", "GET", "maxmemory"])?,
        "maxmemory\n10485760"
    );
    redis.cli(&["RPUSH", "list", "x"])?;
    let err = redis.cli(&["GET", "list"]).unwrap_err();
    assert!(format!("{err:#}").contains("WRONGTYPE"), "{err:#}");
    // A value that looks like an error is still a value.
    redis.cli(&["SET", "s", "ERR not really"])?;
    assert_eq!(redis.cli(&["GET", "s"])?, "ERR not really");
    Ok(())
}

#[test]
fn scram_user_connects_only_with_its_password() -> Result<()> {
    let password = "s3cret pass/with:odd@chars";
    let pg = TestPostgres::start_with(PgOptions {
        scram_user: Some(("repl".into(), password.into())),
        ..Default::default()
    })?;

    assert_eq!(
        pg.psql_as("repl", Some(password), "postgres", "SELECT current_user")?,
        "repl"
    );
    let wrong = pg
        .psql_as("repl", Some("wrong"), "postgres", "SELECT 1")
        .unwrap_err();
    assert!(
        format!("{wrong:#}").contains("password authentication failed"),
        "{wrong:#}"
    );
    assert!(pg.psql_as("repl", None, "postgres", "SELECT 1").is_err());
    // Everybody else is still trusted.
    assert_eq!(pg.psql_as("postgres", None, "postgres", "SELECT 1")?, "1");

    // It is SCRAM, for normal and replication connections, and the role may replicate.
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT rolreplication FROM pg_roles WHERE rolname = 'repl'"
        )?,
        "t"
    );
    assert!(pg
        .psql(
            "postgres",
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'repl'"
        )?
        .starts_with("SCRAM-SHA-256$"));
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT string_agg(DISTINCT auth_method, ',') FROM pg_hba_file_rules \
             WHERE 'repl' = ANY(user_name)"
        )?,
        "scram-sha-256"
    );

    // tokio-postgres, the client the crate uses, authenticates with the URL from url_as.
    runtime()?.block_on(async {
        let url = pg.url_as("repl", Some(password), "postgres");
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let user: String = client
            .query_one("SELECT current_user::text", &[])
            .await?
            .get(0);
        assert_eq!(user, "repl");
        let url = pg.url_as("repl", Some("wrong"), "postgres");
        assert!(tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .is_err());
        anyhow::Ok(())
    })?;
    Ok(())
}

#[test]
fn ssl_server_presents_a_certificate_from_its_ca() -> Result<()> {
    let pg = TestPostgres::start_with(PgOptions {
        ssl: true,
        ..Default::default()
    })?;
    assert_eq!(pg.psql("postgres", "SHOW ssl")?, "on");
    let ca = pg
        .ca_cert_path()
        .context("ssl=true must give a CA certificate")?;
    assert!(ca.is_file(), "{} is missing", ca.display());

    // libpq checks the chain and the name, by DNS name and by IP address.
    let in_tls = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    for host in ["localhost", "127.0.0.1"] {
        let conninfo = format!(
            "host={host} port={} user=postgres dbname=postgres sslmode=verify-full sslrootcert={}",
            pg.port(),
            ca.display()
        );
        let out = Command::new(TestPostgres::bin("psql")?)
            .args(["-X", "-At", "-d", &conninfo, "-c", in_tls])
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "psql over TLS to {host}: {stderr}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "t");
    }

    // rustls (webpki), stricter than OpenSSL, accepts it too.
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut BufReader::new(File::open(&ca)?)) {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(config);
    runtime()?.block_on(async {
        for host in ["localhost", "127.0.0.1"] {
            let conninfo = format!(
                "host={host} port={} user=postgres dbname=postgres sslmode=require",
                pg.port()
            );
            let (client, connection) = tokio_postgres::connect(&conninfo, tls.clone())
                .await
                .with_context(|| format!("rustls connection to {host}"))?;
            tokio::spawn(connection);
            let ssl: bool = client.query_one(in_tls, &[]).await?.get(0);
            assert!(ssl, "the connection to {host} is not encrypted");
        }
        anyhow::Ok(())
    })?;
    Ok(())
}

#[test]
fn failed_start_reports_the_server_log() {
    let result = TestPostgres::start_with(PgOptions {
        extra_conf: vec!["shared_buffers = 'plenty'".into()],
        ..Default::default()
    });
    let err = result
        .err()
        .expect("a bad setting must stop the server from starting");
    let message = format!("{err:#}");
    assert!(message.contains("shared_buffers"), "{message}");
    assert!(message.contains("server log"), "{message}");
}

/// Three masters and three replicas come up on free ports with every one of the 16384
/// hash slots served exactly once, each replica following a distinct master with its data,
/// and `Drop` takes every node and its files away.
#[test]
fn redis_cluster_comes_up_with_every_slot_covered() -> Result<()> {
    let cluster = TestRedisCluster::start()?;
    let nodes = cluster.nodes();
    assert_eq!(nodes.len(), 6);
    let mut ports: Vec<u16> = nodes
        .iter()
        .flat_map(|n| [n.port(), n.bus_port()])
        .collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 12, "client and bus ports collide: {ports:?}");

    // Every node agrees: state ok, all slots assigned and ok.
    for node in nodes {
        let info = node.cli(&["CLUSTER", "INFO"])?;
        for line in [
            "cluster_state:ok",
            "cluster_slots_assigned:16384",
            "cluster_slots_ok:16384",
            "cluster_known_nodes:6",
            "cluster_size:3",
        ] {
            assert!(info.lines().any(|l| l.trim() == line), "{line} in {info}");
        }
    }

    // The masters' ranges cover 0..=16383, none twice.
    let topology = cluster.topology()?;
    let mut covered = vec![0u8; usize::from(CLUSTER_SLOTS)];
    let masters: Vec<_> = topology.iter().filter(|n| n.is_master()).collect();
    assert_eq!(masters.len(), 3);
    for master in &masters {
        assert!(!master.slots.is_empty(), "{master:?} serves no slot");
        for &(first, last) in &master.slots {
            for slot in first..=last {
                covered[usize::from(slot)] += 1;
            }
        }
    }
    assert!(
        covered.iter().all(|&n| n == 1),
        "a slot is served 0 or 2 times"
    );
    let mut followed: Vec<_> = topology
        .iter()
        .filter(|n| !n.is_master())
        .map(|n| n.master_id.clone().expect("a replica names its master"))
        .collect();
    followed.sort();
    followed.dedup();
    assert_eq!(followed.len(), 3, "each master has its own replica");
    assert_eq!(cluster.masters()?.len(), 3);

    // A key lives on the master of its slot, reaches that master's replica, and another
    // master redirects to it.
    let slot: u16 = nodes[0]
        .cli(&["CLUSTER", "KEYSLOT", "pgcache:probe"])?
        .parse()?;
    let owner = cluster.master_of_slot(slot)?;
    owner.cli(&["SET", "pgcache:probe", "here"])?;
    assert_eq!(owner.cli(&["WAIT", "1", "5000"])?, "1");
    let owner_id = owner.cli(&["CLUSTER", "MYID"])?;
    let replica = topology
        .iter()
        .find(|n| n.master_id.as_deref() == Some(owner_id.as_str()))
        .and_then(|n| n.port())
        .and_then(|port| nodes.iter().find(|n| n.port() == port))
        .context("the owner's replica")?;
    // Keyless, so not redirected: the replica holds the one key.
    assert_eq!(replica.cli(&["DBSIZE"])?, "1");
    let other = cluster
        .masters()?
        .into_iter()
        .find(|m| m.port() != owner.port())
        .context("another master")?;
    let moved = other
        .cli(&["GET", "pgcache:probe"])
        .expect_err("another master must refuse the key");
    assert!(
        format!("{moved:#}").contains(&format!("MOVED {slot} 127.0.0.1:{}", owner.port())),
        "{moved:#}"
    );

    let dirs: Vec<PathBuf> = nodes.iter().map(|n| n.dir().to_path_buf()).collect();
    let client_ports: Vec<u16> = nodes.iter().map(TestRedis::port).collect();
    drop(cluster);
    for port in client_ports {
        assert!(refuses_connections(port), "port {port} still answers");
    }
    for dir in dirs {
        assert!(!dir.exists(), "{} was left behind", dir.display());
    }
    Ok(())
}

/// A killed master's replica takes its slots over with the writes it acknowledged (WAIT),
/// and the old master comes back as a replica, the cluster whole again.
#[test]
fn redis_cluster_fails_over_a_killed_master() -> Result<()> {
    let mut cluster = TestRedisCluster::start()?;
    let slot: u16 = cluster.nodes()[0]
        .cli(&["CLUSTER", "KEYSLOT", "survivor"])?
        .parse()?;
    let owner = cluster.master_of_slot(slot)?;
    let old_port = owner.port();
    owner.cli(&["SET", "survivor", "kept"])?;
    assert_eq!(owner.cli(&["WAIT", "1", "5000"])?, "1");
    let index = cluster
        .nodes()
        .iter()
        .position(|n| n.port() == old_port)
        .context("the owner's index")?;

    let promoted = cluster.fail_over(index, Duration::from_secs(60))?;
    assert_ne!(promoted, old_port);
    assert_eq!(cluster.master_of_slot(slot)?.port(), promoted);
    // Read from the slot's master as the cluster names it, a few times: on a busy machine
    // the first view after the failover can still be settling.
    let mut got = String::new();
    for _ in 0..50 {
        got = cluster.master_of_slot(slot)?.cli(&["GET", "survivor"])?;
        if got == "kept" {
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(got, "kept", "topology: {:?}", cluster.topology().ok());

    cluster.node_mut(index).start_again()?;
    cluster.wait_ready(Duration::from_secs(60))?;
    let back = cluster
        .topology()?
        .into_iter()
        .find(|n| n.port() == Some(old_port))
        .context("the old master is known")?;
    assert!(!back.is_master(), "{back:?} came back as a master");
    assert_eq!(cluster.masters()?.len(), 3);
    Ok(())
}

#[test]
fn drop_stops_servers_and_removes_their_files() -> Result<()> {
    let pg = TestPostgres::start()?;
    let redis = TestRedis::start()?;
    let (pg_port, redis_port) = (pg.port(), redis.port());
    let data_dir = pg.data_dir().to_path_buf();
    drop(pg);
    drop(redis);
    assert!(refuses_connections(pg_port));
    assert!(refuses_connections(redis_port));
    assert!(!data_dir.exists(), "{} was left behind", data_dir.display());
    Ok(())
}

#[test]
fn free_ports_are_distinct_and_not_the_system_ones() -> Result<()> {
    let mut ports = (0..50).map(|_| free_port()).collect::<Result<Vec<_>>>()?;
    assert!(!ports.contains(&5432) && !ports.contains(&6379));
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 50);
    Ok(())
}

/// Set in the child process of `servers_die_with_an_aborted_process`.
const ABORT_CHILD_ENV: &str = "PGCACHE_TESTKIT_ABORT_CHILD";

/// Not a test on its own: run by `servers_die_with_an_aborted_process` in a child process,
/// it starts servers, prints where they are, and aborts without running any `Drop`.
#[test]
#[ignore = "helper, run by servers_die_with_an_aborted_process"]
fn abort_child_helper() -> Result<()> {
    if std::env::var_os(ABORT_CHILD_ENV).is_none() {
        return Ok(());
    }
    let pg = TestPostgres::start()?;
    let redis = TestRedis::start()?;
    println!(
        "SERVERS {} {} {} {}",
        pg.port(),
        redis.port(),
        pg.data_dir().display(),
        redis.dir().display()
    );
    std::process::abort();
}

#[test]
fn servers_die_with_an_aborted_process() -> Result<()> {
    let mut child = Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "testkit::abort_child_helper",
            "--ignored",
            "--nocapture",
        ])
        .env(ABORT_CHILD_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().context("child stdout")?;
    let line = BufReader::new(stdout)
        .lines()
        .map_while(|line| line.ok())
        .find(|line| line.starts_with("SERVERS "))
        .context("the child printed no SERVERS line")?;
    let status = child.wait()?;
    assert!(!status.success(), "the child should have aborted");

    let fields: Vec<&str> = line.split_whitespace().collect();
    let [_, pg_port, redis_port, data_dir, redis_dir] = fields[..] else {
        bail!("bad SERVERS line {line:?}");
    };
    let (pg_port, redis_port): (u16, u16) = (pg_port.parse()?, redis_port.parse()?);
    let (data_dir, redis_dir) = (PathBuf::from(data_dir), PathBuf::from(redis_dir));
    let all_gone = eventually(Duration::from_secs(15), || {
        refuses_connections(pg_port)
            && refuses_connections(redis_port)
            && !data_dir.exists()
            && !redis_dir.exists()
    });
    assert!(
        all_gone,
        "after the abort: postgres up {}, redis up {}, {} exists {}, {} exists {}",
        !refuses_connections(pg_port),
        !refuses_connections(redis_port),
        data_dir.display(),
        data_dir.exists(),
        redis_dir.display(),
        redis_dir.exists()
    );
    Ok(())
}
