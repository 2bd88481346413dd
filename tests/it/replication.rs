//! The replication protocol client (and the TLS and authentication it shares with
//! `pgconn`) against real Postgres servers: trust, SCRAM, TLS modes, IDENTIFY_SYSTEM,
//! streaming pgoutput, status updates, and the errors a daemon must classify.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pgcache::daemon::replication::{ReplicationConnection, ReplicationError, ReplicationEvent};
use pgcache::pgconn::{self, PgTarget};
use pgcache::testkit::{PgOptions, TestPostgres};
use pgcache::Lsn;

const WAIT: Duration = Duration::from_secs(20);

fn target(url: &str) -> PgTarget {
    PgTarget::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// The harness's URLs say `sslmode=disable`; swap in another mode and extra parameters.
fn with_tls(url: &str, mode_and_params: &str) -> String {
    url.replace("sslmode=disable", mode_and_params)
}

async fn connect(pg: &TestPostgres, url: &str) -> ReplicationConnection {
    match ReplicationConnection::connect(&target(url)).await {
        Ok(conn) => conn,
        Err(e) => panic!("connect {url}: {e}\n--- server log ---\n{}", pg.log()),
    }
}

async fn connect_err(url: &str) -> ReplicationError {
    match ReplicationConnection::connect(&target(url)).await {
        Ok(_) => panic!("connect {url} succeeded, expected an error"),
        Err(e) => e,
    }
}

/// A CA that signed nothing the server shows.
fn unrelated_ca(dir: &Path) -> PathBuf {
    let (key, cert) = (dir.join("wrong-ca.key"), dir.join("wrong-ca.crt"));
    let status = Command::new("openssl")
        .args(["req", "-x509", "-new", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=unrelated test CA"])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(status.status.success(), "openssl: {status:?}");
    cert
}

/// Polls a psql query until it returns `want` or [`WAIT`] passes.
fn wait_for_psql(pg: &TestPostgres, db: &str, sql: &str, want: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = pg.psql(db, sql).expect("psql");
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sql}: got {got:?}, want {want:?}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[tokio::test]
async fn trust_connection_identifies_the_system() {
    let pg = TestPostgres::start().expect("start postgres");
    pg.create_database("repl_ident").unwrap();
    let mut conn = connect(&pg, &pg.url("repl_ident")).await;
    assert!(conn
        .parameter("server_version")
        .is_some_and(|v| !v.is_empty()));

    let id = conn.identify_system().await.unwrap();
    let current: Lsn = pg
        .psql("repl_ident", "SELECT pg_current_wal_flush_lsn()")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        id.xlog_pos > Lsn::ZERO && id.xlog_pos <= current,
        "{id:?} vs {current}"
    );
    assert_eq!(id.timeline, 1);
    assert_eq!(id.dbname.as_deref(), Some("repl_ident"));
    let system_id = pg
        .psql(
            "repl_ident",
            "SELECT system_identifier FROM pg_control_system()",
        )
        .unwrap();
    assert_eq!(id.system_id, system_id);

    // Plain SQL works on a replication=database connection, with the pinned settings.
    let rows = conn.simple_query("SHOW wal_level").await.unwrap();
    assert_eq!(rows, vec![vec![Some("logical".to_string())]]);
    let rows = conn
        .simple_query("SELECT current_setting('TimeZone'), current_setting('IntervalStyle'), NULL")
        .await
        .unwrap();
    assert_eq!(
        rows,
        vec![vec![Some("UTC".into()), Some("iso_8601".into()), None]]
    );
    // A failing command leaves the connection usable.
    let err = conn
        .simple_query("SELECT nonsense_column")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("42703"), "{err}");
    assert_eq!(conn.simple_query("SELECT 1").await.unwrap().len(), 1);
}

#[tokio::test]
async fn scram_authentication_and_wrong_passwords() {
    let pg = TestPostgres::start_with(PgOptions {
        scram_user: Some(("alice".into(), "s3cret pass".into())),
        ..Default::default()
    })
    .expect("start postgres");

    let mut conn = connect(&pg, &pg.url_as("alice", Some("s3cret pass"), "postgres")).await;
    conn.identify_system().await.unwrap();

    let err = connect_err(&pg.url_as("alice", Some("wrong"), "postgres")).await;
    assert!(matches!(err, ReplicationError::Auth(_)), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("password authentication failed") && message.contains("alice"),
        "{message}"
    );
    assert!(!err.is_retryable());

    let err = connect_err(&pg.url_as("alice", None, "postgres")).await;
    assert!(matches!(err, ReplicationError::Auth(_)), "{err:?}");
    assert!(err.to_string().contains("has none"), "{err}");

    // The same credentials work for an ordinary connection through pgconn.
    let client = pgconn::connect(&target(&pg.url_as(
        "alice",
        Some("s3cret pass"),
        "postgres",
    )))
    .await
    .unwrap();
    let row = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "alice");
}

#[tokio::test]
async fn tls_modes_and_certificate_checks() {
    let pg = TestPostgres::start_with(PgOptions {
        ssl: true,
        scram_user: Some(("alice".into(), "secret".into())),
        ..Default::default()
    })
    .expect("start postgres");
    let ca = pg.ca_cert_path().expect("ssl is on, so there is a CA");
    let ca = ca.to_str().unwrap();
    let ssl_in_use = "SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

    // require: encrypted, certificate not checked; SCRAM over TLS.
    let url = with_tls(
        &pg.url_as("alice", Some("secret"), "postgres"),
        "sslmode=require",
    );
    let mut conn = connect(&pg, &url).await;
    assert_eq!(
        conn.simple_query(ssl_in_use).await.unwrap()[0][0].as_deref(),
        Some("true")
    );

    // verify-full against the test CA, by IP address and by name.
    for host in ["127.0.0.1", "localhost"] {
        let url = with_tls(
            &pg.url("postgres"),
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        )
        .replace("127.0.0.1", host);
        let mut conn = connect(&pg, &url).await;
        assert_eq!(
            conn.simple_query(ssl_in_use).await.unwrap()[0][0].as_deref(),
            Some("true")
        );
    }
    // verify-ca checks the chain but not the name: dial 127.0.0.1 while calling the host
    // something the certificate does not name; verify-full refuses the same connection.
    let url = format!(
        "host=db.invalid hostaddr=127.0.0.1 port={} user=postgres dbname=postgres sslmode=verify-ca sslrootcert={ca}",
        pg.port()
    );
    connect(&pg, &url).await.identify_system().await.unwrap();
    let url = url.replace("verify-ca", "verify-full");
    let err = connect_err(&url).await;
    assert!(matches!(err, ReplicationError::Tls(_)), "{err:?}");

    // An unrelated CA does not vouch for the test certificate; without sslrootcert there
    // are no roots at all (unless ~/.postgresql/root.crt exists), never the public ones.
    let dir = tempfile::tempdir().unwrap();
    let wrong = unrelated_ca(dir.path());
    let url = with_tls(
        &pg.url("postgres"),
        &format!("sslmode=verify-full&sslrootcert={}", wrong.display()),
    );
    let err = connect_err(&url).await;
    assert!(matches!(err, ReplicationError::Tls(_)), "{err:?}");
    assert!(!err.is_retryable());
    let err = connect_err(&with_tls(&pg.url("postgres"), "sslmode=verify-full")).await;
    assert!(matches!(err, ReplicationError::Tls(_)), "{err:?}");

    // Ordinary connections follow the same modes.
    let url = with_tls(
        &pg.url("postgres"),
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let client = pgconn::connect(&target(&url)).await.unwrap();
    let row = client.query_one(ssl_in_use, &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "true");
    let row = client
        .query_one(
            "SELECT current_setting('DateStyle'), current_setting('bytea_output')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "ISO, MDY");
    assert_eq!(row.get::<_, String>(1), "hex");
    let url = with_tls(
        &pg.url("postgres"),
        &format!("sslmode=verify-full&sslrootcert={}", wrong.display()),
    );
    assert!(pgconn::connect(&target(&url)).await.is_err());
}

#[tokio::test]
async fn require_fails_without_server_tls_and_prefer_falls_back() {
    let pg = TestPostgres::start().expect("start postgres");
    let err = connect_err(&with_tls(&pg.url("postgres"), "sslmode=require")).await;
    assert!(matches!(err, ReplicationError::Tls(_)), "{err:?}");
    assert!(err.to_string().contains("does not accept TLS"), "{err}");
    let mut conn = connect(&pg, &with_tls(&pg.url("postgres"), "sslmode=prefer")).await;
    conn.identify_system().await.unwrap();
    pgconn::connect(&target(&with_tls(&pg.url("postgres"), "sslmode=prefer")))
        .await
        .unwrap();
}

/// The pgoutput message types in one transaction's XLogData, in order, and the commit's
/// end LSN (read from the Commit message: tag, flags, commit LSN, end LSN, timestamp).
async fn read_transaction(
    stream: &mut pgcache::daemon::replication::ReplicationStream,
) -> (Vec<u8>, Lsn) {
    let mut tags = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        // Take what is already buffered first, as the daemon's batching does.
        let event = match stream.next_ready().unwrap() {
            Some(event) => event,
            None => tokio::time::timeout_at(deadline, stream.next())
                .await
                .expect("the transaction arrives in time")
                .unwrap(),
        };
        if let ReplicationEvent::XLogData { data, .. } = event {
            tags.push(data[0]);
            if data[0] == b'C' {
                let end = u64::from_be_bytes(data[10..18].try_into().unwrap());
                return (tags, Lsn(end));
            }
        }
    }
}

#[tokio::test]
async fn streams_pgoutput_and_confirms_progress() {
    let pg = TestPostgres::start().expect("start postgres");
    let db = "repl_stream";
    pg.create_database(db).unwrap();
    pg.psql(
        db,
        "CREATE TABLE items (id int PRIMARY KEY, name text);
         CREATE PUBLICATION \"pub'1\" FOR TABLE items;
         SELECT pg_create_logical_replication_slot('slot_a', 'pgoutput');",
    )
    .unwrap();
    let slot_lsn = |column: &str| -> Lsn {
        pg.psql(
            db,
            &format!("SELECT {column} FROM pg_replication_slots WHERE slot_name = 'slot_a'"),
        )
        .unwrap()
        .parse()
        .unwrap()
    };
    let before = slot_lsn("confirmed_flush_lsn");

    pg.psql(db, "INSERT INTO items VALUES (1, 'one')").unwrap();
    let conn = connect(&pg, &pg.url(db)).await;
    let mut stream = conn
        .start_logical("slot_a", Lsn::ZERO, "pub'1")
        .await
        .unwrap();
    let (tags, end) = read_transaction(&mut stream).await;
    assert_eq!(tags, b"BRIC", "Begin, Relation, Insert, Commit");
    assert!(end > before);

    // A slot held by this stream is busy for anyone else: retryable.
    let other = connect(&pg, &pg.url(db)).await;
    match other.start_logical("slot_a", Lsn::ZERO, "pub'1").await {
        Err(err) => {
            assert_eq!(err.code(), Some("55006"), "{err}");
            assert!(err.is_retryable());
        }
        Ok(_) => panic!("a second consumer got the active slot"),
    }

    stream.send_status(end, end, end, false).await.unwrap();
    wait_for_psql(
        &pg,
        db,
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'slot_a'",
        &end.to_string(),
    );

    // A second transaction streams on the same connection; an update sends no Relation
    // again (pgoutput caches it per connection).
    pg.psql(db, "UPDATE items SET name = 'uno' WHERE id = 1")
        .unwrap();
    let (tags, _) = read_transaction(&mut stream).await;
    assert_eq!(tags, b"BUC");

    // A keepalive with a reply request comes back when we ask for one.
    stream.send_status(end, end, end, true).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let event = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("a keepalive arrives")
            .unwrap();
        if matches!(event, ReplicationEvent::Keepalive { .. }) {
            break;
        }
    }

    stream.finish().await.unwrap();
    wait_for_psql(
        &pg,
        db,
        "SELECT active::text FROM pg_replication_slots WHERE slot_name = 'slot_a'",
        "false",
    );
}

#[tokio::test]
async fn missing_slot_is_not_retryable() {
    let pg = TestPostgres::start().expect("start postgres");
    let db = "repl_noslot";
    pg.create_database(db).unwrap();
    pg.psql(db, "CREATE PUBLICATION p FOR ALL TABLES").unwrap();
    let conn = connect(&pg, &pg.url(db)).await;
    let err = match conn.start_logical("no_such_slot", Lsn::ZERO, "p").await {
        Err(err) => err,
        Ok(_) => panic!("streaming from a missing slot"),
    };
    assert_eq!(err.code(), Some("42704"), "{err}");
    assert!(matches!(err, ReplicationError::Server { .. }));
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("no_such_slot"), "{err}");

    // A missing database is refused at startup, also for good.
    let err = connect_err(&pg.url("no_such_db")).await;
    assert_eq!(err.code(), Some("3D000"), "{err}");
    assert!(!err.is_retryable());
}
