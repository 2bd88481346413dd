//! Issue 12: logins that the server must prove (SCRAM signature, channel binding), TLS
//! roots, the reader's least-privilege role, the HTTP endpoint under idle connections, and
//! secrets that must never be printed.
//!
//! Impostor servers are small fakes written here (a TCP listener speaking just enough of
//! the protocol, or a TLS relay in front of the real server); everything else runs against
//! the testkit's real Postgres and Redis.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use pgcache::config::Config;
use pgcache::daemon::replication::{ReplicationConnection, ReplicationError};
use pgcache::pgconn::{self, PgTarget};
use pgcache::testkit::{generate_tls_certs, CertFiles, PgOptions, RedisOptions, TestPostgres};
use pgcache::Reader;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::{pgcache, Env, DB};

fn target(url: &str) -> PgTarget {
    PgTarget::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"))
}

async fn replication_err(url: &str) -> ReplicationError {
    match ReplicationConnection::connect(&target(url)).await {
        Ok(_) => panic!("{url}: the login succeeded, expected a refusal"),
        Err(e) => e,
    }
}

// ---------------------------------------------------------------------------------------------
// Fake servers

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// What the fake server does after the client's SCRAM proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// AuthenticationOk at once, without AuthenticationSASLFinal.
    OkWithoutSignature,
    /// AuthenticationSASLFinal with a `v=` that no password produces, then AuthenticationOk.
    ForgedSignature,
}

/// A fake Postgres: answers the SSL request (with TLS when `tls` is given), offers
/// `mechanisms`, plays SCRAM up to the client's proof, and then ends as `ending` says.
/// Returns the address and a log of the client-first messages it received.
async fn fake_server(
    mechanisms: &'static [&'static str],
    ending: Ending,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> (u16, Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (tls, log) = (tls.clone(), log.clone());
            tokio::spawn(async move {
                let _ = fake_session(tcp, mechanisms, ending, tls, log).await;
            });
        }
    });
    (port, seen)
}

async fn fake_session(
    mut tcp: TcpStream,
    mechanisms: &[&str],
    ending: Ending,
    tls: Option<tokio_rustls::TlsAcceptor>,
    log: Arc<std::sync::Mutex<Vec<String>>>,
) -> std::io::Result<()> {
    const SSL_REQUEST: i32 = 80_877_103;
    let len = tcp.read_i32().await?;
    let code = tcp.read_i32().await?;
    let mut io: Box<dyn Stream> = if code == SSL_REQUEST {
        match tls {
            Some(acceptor) => {
                tcp.write_all(b"S").await?;
                Box::new(acceptor.accept(tcp).await?)
            }
            None => {
                tcp.write_all(b"N").await?;
                Box::new(tcp)
            }
        }
    } else {
        // That was the startup message itself: skip the rest of it.
        let mut rest = vec![0; len as usize - 8];
        tcp.read_exact(&mut rest).await?;
        Box::new(tcp)
    };
    if code == SSL_REQUEST {
        let len = io.read_i32().await?;
        let mut startup = vec![0; len as usize - 4];
        io.read_exact(&mut startup).await?;
    }

    let mut offer = Vec::new();
    for m in mechanisms {
        offer.extend_from_slice(m.as_bytes());
        offer.push(0);
    }
    offer.push(0);
    send_auth(&mut io, 10, &offer).await?;

    // SASLInitialResponse: mechanism, then the client-first message.
    let body = read_message(&mut io, b'p').await?;
    let name_end = body.iter().position(|&b| b == 0).unwrap();
    let first = String::from_utf8_lossy(&body[name_end + 5..]).into_owned();
    log.lock().unwrap().push(first.clone());
    let nonce = first.split("r=").nth(1).unwrap_or_default().to_string();
    let salt = base64::engine::general_purpose::STANDARD.encode(b"sixteen byte salt");
    let server_first = format!("r={nonce}fakeserver,s={salt},i=4096");
    send_auth(&mut io, 11, server_first.as_bytes()).await?;

    // SASLResponse: the client's proof, which a real server would check.
    read_message(&mut io, b'p').await?;
    if ending == Ending::ForgedSignature {
        let forged = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        send_auth(&mut io, 12, format!("v={forged}").as_bytes()).await?;
    }
    send_auth(&mut io, 0, &[]).await?;
    // ReadyForQuery: a client that trusted us would now go on.
    io.write_all(&[b'Z', 0, 0, 0, 5, b'I']).await?;
    io.flush().await?;
    let mut sink = Vec::new();
    let _ = io.read_to_end(&mut sink).await;
    Ok(())
}

async fn send_auth(io: &mut Box<dyn Stream>, code: i32, body: &[u8]) -> std::io::Result<()> {
    let mut msg = vec![b'R'];
    msg.extend_from_slice(&(8 + body.len() as i32).to_be_bytes());
    msg.extend_from_slice(&code.to_be_bytes());
    msg.extend_from_slice(body);
    io.write_all(&msg).await?;
    io.flush().await
}

async fn read_message(io: &mut Box<dyn Stream>, tag: u8) -> std::io::Result<Vec<u8>> {
    let got = io.read_u8().await?;
    assert_eq!(
        got, tag,
        "the client sent {:?}, expected {:?}",
        got as char, tag as char
    );
    let len = io.read_i32().await?;
    let mut body = vec![0; len as usize - 4];
    io.read_exact(&mut body).await?;
    Ok(body)
}

fn tls_acceptor(certs: &CertFiles) -> tokio_rustls::TlsAcceptor {
    let chain = CertificateDer::pem_file_iter(&certs.server_cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&certs.server_key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// A man in the middle: terminates the client's TLS with its own certificate and relays
/// everything to the real server over a second TLS connection.
async fn tls_relay(upstream_port: u16, certs: &CertFiles) -> u16 {
    let acceptor = tls_acceptor(certs);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = relay(client, acceptor, upstream_port).await;
            });
        }
    });
    port
}

async fn relay(
    mut client: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    upstream_port: u16,
) -> std::io::Result<()> {
    let mut request = [0u8; 8];
    client.read_exact(&mut request).await?;
    client.write_all(b"S").await?;
    let mut client = acceptor.accept(client).await?;
    let mut server = TcpStream::connect(("127.0.0.1", upstream_port)).await?;
    server.write_all(&request).await?;
    let mut answer = [0u8; 1];
    server.read_exact(&mut answer).await?;
    assert_eq!(&answer, b"S", "the real server offers TLS");
    let config = pgconn::tls_config(pgconn::SslMode::Require, None).unwrap();
    let mut server = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), server)
        .await?;
    tokio::io::copy_bidirectional(&mut client, &mut server).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// SCRAM and channel binding

#[tokio::test]
async fn scram_refuses_a_server_that_never_proves_the_password() {
    for ending in [Ending::OkWithoutSignature, Ending::ForgedSignature] {
        let (port, seen) = fake_server(&["SCRAM-SHA-256"], ending, None).await;
        let url = format!("postgres://alice:secret@127.0.0.1:{port}/db?sslmode=disable");
        let err = replication_err(&url).await;
        assert!(
            matches!(err, ReplicationError::Auth(_)),
            "{ending:?}: {err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains("the server did not prove it knows the password of user \"alice\""),
            "{ending:?}: {message}"
        );
        assert!(!err.is_retryable(), "{ending:?}");
        assert_eq!(
            seen.lock().unwrap().len(),
            1,
            "{ending:?}: one login attempt"
        );

        // Ordinary connections (tokio-postgres) refuse the same server.
        let refused = pgconn::connect(&target(&url)).await;
        assert!(refused.is_err(), "{ending:?}: pgconn accepted an impostor");
    }
}

#[tokio::test]
async fn channel_binding_require_refuses_what_cannot_be_bound() {
    let dir = tempfile::tempdir().unwrap();
    let certs = generate_tls_certs(dir.path()).unwrap();

    // TLS, but the server offers only plain SCRAM.
    let (port, seen) = fake_server(
        &["SCRAM-SHA-256"],
        Ending::OkWithoutSignature,
        Some(tls_acceptor(&certs)),
    )
    .await;
    let base = format!("postgres://alice:secret@127.0.0.1:{port}/db");
    let err = replication_err(&format!("{base}?sslmode=require&channel_binding=require")).await;
    assert!(
        err.to_string()
            .contains("channel_binding=require, but the server does not offer SCRAM-SHA-256-PLUS"),
        "{err}"
    );
    assert!(
        seen.lock().unwrap().is_empty(),
        "nothing is sent to a server that cannot bind"
    );
    let refused = pgconn::connect(&target(&format!(
        "{base}?sslmode=require&channel_binding=require"
    )))
    .await;
    assert!(refused.is_err(), "pgconn logged in without channel binding");
    // prefer over TLS: plain SCRAM with the 'y' flag (binding possible, not offered).
    let _ = replication_err(&format!("{base}?sslmode=require")).await;
    assert!(
        seen.lock().unwrap()[0].starts_with("y,,"),
        "{:?}",
        seen.lock().unwrap()
    );

    // No TLS at all (the server declines it).
    let (port, _) = fake_server(&["SCRAM-SHA-256"], Ending::OkWithoutSignature, None).await;
    let err = replication_err(&format!(
        "postgres://alice:secret@127.0.0.1:{port}/db?channel_binding=require"
    ))
    .await;
    assert!(err.to_string().contains("not encrypted"), "{err}");
}

#[tokio::test]
async fn channel_binding_stops_a_tls_relay() {
    let pg = TestPostgres::start_with(PgOptions {
        ssl: true,
        scram_user: Some(("alice".into(), "s3cret pass".into())),
        ..Default::default()
    })
    .expect("start postgres");
    let url = |port: u16, params: &str| {
        format!("postgres://alice:s3cret%20pass@127.0.0.1:{port}/postgres?{params}")
    };
    let ssl_in_use = "SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

    // Direct: require binds (the server checks our hash of its certificate), and so does
    // the default, prefer.
    for params in ["sslmode=require&channel_binding=require", "sslmode=require"] {
        let mut conn = ReplicationConnection::connect(&target(&url(pg.port(), params)))
            .await
            .unwrap_or_else(|e| panic!("{params}: {e}\n{}", pg.log()));
        assert_eq!(
            conn.simple_query(ssl_in_use).await.unwrap()[0][0].as_deref(),
            Some("true")
        );
        let client = pgconn::connect(&target(&url(pg.port(), params)))
            .await
            .unwrap_or_else(|e| panic!("pgconn {params}: {e}\n{}", pg.log()));
        let row = client.query_one(ssl_in_use, &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), "true");
    }

    // Through a relay that shows its own certificate (sslmode=require does not check
    // certificates, so only channel binding can notice it).
    let dir = tempfile::tempdir().unwrap();
    let relay = tls_relay(pg.port(), &generate_tls_certs(dir.path()).unwrap()).await;
    let mut conn = ReplicationConnection::connect(&target(&url(
        relay,
        "sslmode=require&channel_binding=disable",
    )))
    .await
    .expect("without binding, the relay goes unnoticed");
    conn.identify_system().await.unwrap();
    for params in ["sslmode=require", "sslmode=require&channel_binding=require"] {
        let err = replication_err(&url(relay, params)).await;
        assert!(
            err.to_string().contains("channel binding"),
            "{params}: {err}"
        );
        let err = pgconn::connect(&target(&url(relay, params)))
            .await
            .expect_err("pgconn through the relay");
        let message = match &err {
            pgconn::ConnectError::Postgres { source, .. } => source
                .as_db_error()
                .map(|db| db.message().to_string())
                .unwrap_or_else(|| source.to_string()),
            other => other.to_string(),
        };
        assert!(message.contains("channel binding"), "{params}: {message}");
    }
    assert!(
        pg.log().contains("SCRAM channel binding check failed"),
        "{}",
        pg.log()
    );
}

// ---------------------------------------------------------------------------------------------
// TLS roots

/// A config for `check` with this Postgres URL (Redis is not needed for the TLS part).
fn check_config(dir: &Path, pg_url: &str) -> PathBuf {
    let path = dir.join("tls.toml");
    std::fs::write(
        &path,
        format!(
            "[postgres]\nurl = \"{pg_url}\"\n[redis]\nurl = \"redis://127.0.0.1:1\"\n\
             [metrics]\nlisten = \"\"\n[[tables]]\ntable = \"t\"\nkey = \"t:{{id}}\"\n"
        ),
    )
    .unwrap();
    path
}

/// `pgcache check` with `HOME` set, as libpq would find `~/.postgresql/root.crt` there.
fn check_with_home(config: &Path, home: &Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgcache"))
        .args(["check", "--config"])
        .arg(config)
        .env("HOME", home)
        .output()
        .expect("run pgcache check");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[tokio::test]
async fn verifying_modes_need_roots_and_take_them_as_libpq_does() {
    let pg = TestPostgres::start_with(PgOptions {
        ssl: true,
        ..Default::default()
    })
    .expect("start postgres");
    let ca = pg.ca_cert_path().unwrap();
    let base = pg.url("postgres");

    // verify-ca with the server's CA: accepted by both connection kinds.
    let url = base.replace(
        "sslmode=disable",
        &format!("sslmode=verify-ca&sslrootcert={}", ca.display()),
    );
    ReplicationConnection::connect(&target(&url))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", pg.log()))
        .identify_system()
        .await
        .unwrap();
    pgconn::connect(&target(&url)).await.unwrap();

    // No sslrootcert and no ~/.postgresql/root.crt: refused before any handshake, with
    // both fixes named.
    let home = tempfile::tempdir().unwrap();
    let url = base.replace("sslmode=disable", "sslmode=verify-full");
    let config = check_config(home.path(), &url);
    let out = check_with_home(&config, home.path());
    let root_crt = home.path().join(".postgresql/root.crt");
    for expected in [
        "FAIL postgres postgres://postgres@127.0.0.1:",
        "sslmode=verify-full checks the server's certificate, but no root certificate was given",
        &format!("{} does not exist", root_crt.display()),
        "Set sslrootcert=/path/to/ca.pem in the connection string, or sslrootcert=system",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
    // In-process, with the home directory given: the same error from the TLS setup.
    let e = pgconn::tls_config_with_home(pgconn::SslMode::VerifyFull, None, Some(home.path()))
        .unwrap_err();
    assert!(matches!(e, pgconn::PgTargetError::NoRootCert { .. }), "{e}");

    // The CA at ~/.postgresql/root.crt: found, and the server is verified.
    std::fs::create_dir(home.path().join(".postgresql")).unwrap();
    std::fs::copy(&ca, &root_crt).unwrap();
    let out = check_with_home(&config, home.path());
    assert!(
        out.contains("OK   postgres postgres://postgres@127.0.0.1:"),
        "{out}"
    );
    // sslrootcert=system: the operating system's roots do not know the test CA.
    let url = base.replace("sslmode=disable", "sslrootcert=system");
    let out = check_with_home(&check_config(home.path(), &url), home.path());
    assert!(
        out.contains("FAIL postgres postgres://postgres@127.0.0.1:"),
        "{out}"
    );
    assert!(
        out.contains("sslmode=verify-full is not reachable"),
        "{out}"
    );
    assert!(out.contains("certificate"), "{out}");
}

#[tokio::test]
async fn rediss_is_checked_against_the_configured_ca() {
    let dir = tempfile::tempdir().unwrap();
    let certs = generate_tls_certs(&dir.path().join("redis")).unwrap();
    let other = generate_tls_certs(&dir.path().join("other")).unwrap();
    let tls_port = pgcache::testkit::free_port().unwrap();
    let redis = pgcache::testkit::TestRedis::start_with(RedisOptions {
        extra_args: vec![
            "--tls-port".into(),
            tls_port.to_string(),
            "--tls-cert-file".into(),
            certs.server_cert.display().to_string(),
            "--tls-key-file".into(),
            certs.server_key.display().to_string(),
            "--tls-ca-cert-file".into(),
            certs.ca_cert.display().to_string(),
            "--tls-auth-clients".into(),
            "no".into(),
        ],
        ..Default::default()
    })
    .expect("start redis with TLS");
    let url = format!("rediss://127.0.0.1:{tls_port}/0");
    let config = |ca: &str| {
        Config::from_toml_str(&format!(
            "[postgres]\nurl = \"postgres://u@127.0.0.1:1/db\"\n[redis]\nurl = \"{url}\"\n{ca}\n\
             [[tables]]\ntable = \"t\"\nkey = \"t:{{id}}\"\n"
        ))
    };
    let e = config("").unwrap_err();
    assert!(e.to_string().contains("no CA is configured"), "{e}");

    let ping = |config: Config| async move {
        let client = config.redis.client().map_err(|e| e.to_string())?;
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| e.to_string())?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(|e| e.to_string())
    };
    let good = config(&format!("tls_ca_file = \"{}\"", certs.ca_cert.display())).unwrap();
    assert_eq!(ping(good.clone()).await, Ok("PONG".to_string()));
    let wrong = config(&format!("tls_ca_file = \"{}\"", other.ca_cert.display())).unwrap();
    let e = ping(wrong).await.unwrap_err();
    assert!(e.contains("certificate"), "{e}");
    let system = config("tls_ca_file = \"system\"").unwrap();
    assert!(
        ping(system).await.is_err(),
        "the system roots must not vouch for the test CA"
    );

    // The read helper uses the same setting.
    let reader = Reader::from_config(&good).unwrap();
    drop(reader);
    drop(redis);
}

// ---------------------------------------------------------------------------------------------
// Least privilege

const SHOP: &str = "CREATE TABLE users (id int PRIMARY KEY, name text NOT NULL);
     CREATE TABLE secrets (id int PRIMARY KEY, payload text NOT NULL);
     INSERT INTO users VALUES (1, 'ada'), (2, 'grace');
     INSERT INTO secrets VALUES (1, 'do not read');";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reader_role_reads_the_cached_tables_and_nothing_else() {
    let env = Env::start(SHOP, "public.users");
    crate::reader::daemon_caught_up(&env).await;
    // Twice: the script is safe to run again.
    for _ in 0..2 {
        env.run_sql_file(
            "sql/reader_role.sql",
            &[
                ("role", "app_reader"),
                ("password", "reader-pw"),
                ("tables", "public.users"),
            ],
        );
    }
    assert_eq!(
        env.sql(
            "SELECT rolsuper, rolreplication, rolcanlogin FROM pg_roles WHERE rolname = 'app_reader'"
        ),
        "f|f|t"
    );
    let reader_url = env.pg.url_as("app_reader", Some("reader-pw"), DB);
    let toml = env.config_toml(&format!(
        "[reader]\nurl = \"{reader_url}\"\n\n\
         [[tables]]\ntable = \"public.users\"\nkey = \"user:{{id}}\"\nmode = \"refresh\"\n"
    ));
    let config = Config::from_toml_str(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    assert_eq!(config.reader.url.as_ref().unwrap().expose(), reader_url);

    let reader = Reader::from_config(&config).unwrap();
    let users = reader.table("public.users").unwrap();
    // A miss reads Postgres as app_reader and fills; the second lookup is a hit.
    let row: Option<serde_json::Value> = users.get(1).await.unwrap();
    assert_eq!(row, Some(serde_json::json!({"id": 1, "name": "ada"})));
    let row: Option<serde_json::Value> = users.get(1).await.unwrap();
    assert_eq!(row, Some(serde_json::json!({"id": 1, "name": "ada"})));
    let absent: Option<serde_json::Value> = users.get(3).await.unwrap();
    assert_eq!(absent, None);
    let stats = reader.stats();
    assert_eq!((stats.hits, stats.misses), (1, 2), "{stats:?}");
    let mut redis = env.redis().await;
    assert_eq!(
        crate::common::get(&mut redis, "user:1").await.as_deref(),
        Some("{\"id\":1,\"name\":\"ada\"}")
    );
    // The fill's session was app_reader's.
    let active: String = env.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app_reader' AND datname = 'app'",
    );
    assert_ne!(active, "0", "the reader's pool connects as app_reader");

    // app_reader cannot read a table it was not granted, nor stream.
    let err = env
        .pg
        .psql_as("app_reader", Some("reader-pw"), DB, "SELECT * FROM secrets")
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("permission denied for table secrets"),
        "{err:#}"
    );
    let err = replication_err(&env.pg.url_as("app_reader", Some("reader-pw"), DB)).await;
    assert!(
        err.to_string().contains("replication"),
        "app_reader opened a replication connection: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_warns_about_superuser_and_replication_roles() {
    let env = Env::start(SHOP, "public.users");
    env.run_sql_file(
        "sql/reader_role.sql",
        &[
            ("role", "app_reader"),
            ("password", "reader-pw"),
            ("tables", "public.users"),
        ],
    );
    let rule = "[[tables]]\ntable = \"public.users\"\nkey = \"user:{id}\"\n";
    let write = |name: &str, pg: &str, reader: &str| {
        let path = env.dir.path().join(name);
        let text = env
            .config_toml(&format!("[reader]\nurl = \"{reader}\"\n\n{rule}"))
            .replacen(&env.pg.url(DB), pg, 1);
        std::fs::write(&path, text).unwrap();
        path
    };

    // The daemon as the superuser, the reader as the daemon's REPLICATION role.
    let superuser = env.pg.url(DB);
    let daemon_role = env.pg.url_as("pgcache", Some("pgcache-secret"), DB);
    let config = write("loose.toml", &superuser, &daemon_role);
    let (code, out, err) = pgcache(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "warnings only:\n{out}\n{err}");
    for expected in [
        "WARN role \"postgres\" is a superuser: the daemon needs only REPLICATION",
        "fix: connect as a role made by sql/role.sql",
        "WARN reader role \"pgcache\" (reader.url) has REPLICATION",
        "sql/reader_role.sql",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
    let config = write("super-reader.toml", &daemon_role, &superuser);
    let (_, out, _) = pgcache(&["check", "--config", config.to_str().unwrap()]);
    assert!(
        out.contains(
            "WARN reader role \"postgres\" (reader.url) is a superuser and has REPLICATION"
        ),
        "{out}"
    );
    assert!(
        !out.contains("WARN role \"pgcache\" is a superuser"),
        "{out}"
    );

    // The intended setup: no warning about roles.
    let reader = env.pg.url_as("app_reader", Some("reader-pw"), DB);
    let config = write("tight.toml", &daemon_role, &reader);
    let (_, out, _) = pgcache(&["check", "--config", config.to_str().unwrap()]);
    assert!(
        out.contains("OK   reader role \"app_reader\" is neither a superuser nor REPLICATION"),
        "{out}"
    );
    assert!(!out.contains("superuser:"), "{out}");
    assert!(
        !out.contains("reader-pw") && !out.contains("pgcache-secret"),
        "{out}"
    );
}

// ---------------------------------------------------------------------------------------------
// The HTTP endpoint

/// Raises this process's open-file limit to at least `want` (as root the hard limit too).
fn raise_nofile(want: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_cur >= want {
            return;
        }
        limit.rlim_max = limit.rlim_max.max(want);
        limit.rlim_cur = want;
        assert_eq!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit),
            0,
            "cannot raise RLIMIT_NOFILE to {want}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Starts the endpoint on a free port with these limits; the handle is a recorder of its
/// own, so no process-wide recorder is installed.
async fn serve(
    limits: pgcache::ops::http::Limits,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    serve_with(limits, Default::default()).await
}

/// As [`serve`], reporting `health`.
async fn serve_with(
    limits: pgcache::ops::http::Limits,
    health: Arc<pgcache::ops::health::Health>,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .build_recorder()
        .handle();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(pgcache::ops::http::serve(
        listener,
        handle,
        limits,
        health,
        async move {
            let _ = stopped.await;
        },
    ));
    (addr, stop)
}

/// `GET path` on a fresh connection: the status line and how long it took.
fn get(addr: std::net::SocketAddr, path: &str) -> (String, Duration) {
    use std::io::Write;
    let started = Instant::now();
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.lines().next().unwrap_or_default().to_string();
    (status, started.elapsed())
}

/// Whether the server has closed this connection (EOF or reset), without blocking.
fn closed_by_server(mut stream: &std::net::TcpStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(_) => true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_with_ten_thousand_idle_connections_open() {
    const IDLE: usize = 10_000;
    raise_nofile(IDLE as u64 + 2_000);
    let limits = pgcache::ops::http::Limits::default();
    let health = Arc::new(pgcache::ops::health::Health::default());
    let (addr, _stop) = serve_with(limits, health.clone()).await;
    let idle = tokio::task::spawn_blocking(move || {
        (0..IDLE)
            .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    // A live run loop (without a beat, /healthz turns 503 a minute after the start, which
    // opening the connections can take on a machine busy with builds).
    health.beat();
    let (status, took) = tokio::task::spawn_blocking(move || get(addr, "/healthz"))
        .await
        .unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(took < Duration::from_secs(1), "/healthz took {took:?}");

    // The server kept at most max_connections of them: the others were closed.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let open = idle.iter().filter(|s| !closed_by_server(s)).count();
        if open <= limits.max_connections {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{open} of {IDLE} idle connections still open, limit {}",
            limits.max_connections
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_clients_are_dropped_after_the_timeouts() {
    let limits = pgcache::ops::http::Limits {
        max_connections: 64,
        header_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(2),
    };
    let (addr, _stop) = serve(limits).await;
    let idle: Vec<_> = (0..20)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    // A client that trickles its request never finishes it.
    let mut slow = std::net::TcpStream::connect(addr).unwrap();
    std::io::Write::write_all(&mut slow, b"GET /metr").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        idle.iter().all(|s| !closed_by_server(s)),
        "closed before the header timeout"
    );
    // Closed soon after the timeout (polled, so a loaded machine's timer slop is no failure).
    let deadline = Instant::now() + limits.header_timeout + Duration::from_secs(3);
    while !(idle.iter().all(closed_by_server) && closed_by_server(&slow)) {
        assert!(
            Instant::now() < deadline,
            "idle connections or a partial request outlived the header timeout"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = tokio::task::spawn_blocking(move || get(addr, "/healthz"))
        .await
        .unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
}

// ---------------------------------------------------------------------------------------------
// Secrets

/// An HTTP GET with a blocking client: the whole response.
fn try_http(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

fn http_body(addr: std::net::SocketAddr, path: &str) -> String {
    try_http(addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_password_is_ever_printed() {
    // Distinctive, and unchanged by percent-encoding, so any copy of them is found.
    const PG_PASSWORD: &str = "PgScramSecret-4711";
    const REDIS_PASSWORD: &str = "RedisRequirepass-0815";
    const WRONG_REDIS_PASSWORD: &str = "WrongRedisPass-9999";
    const SECRETS: [&str; 3] = [PG_PASSWORD, REDIS_PASSWORD, WRONG_REDIS_PASSWORD];

    let env = Env::start_with(
        PgOptions {
            scram_user: Some(("streamer".into(), PG_PASSWORD.into())),
            ..Default::default()
        },
        RedisOptions::default(),
        "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL);",
        "public.items",
    );
    env.sql("GRANT SELECT ON items TO streamer");
    env.grant_control("streamer");
    env.redis
        .cli(&["CONFIG", "SET", "requirepass", REDIS_PASSWORD])
        .unwrap();
    let metrics_port = pgcache::testkit::free_port().unwrap();
    let metrics: std::net::SocketAddr = ([127, 0, 0, 1], metrics_port).into();
    let port = env.pg.port();
    let write_config = |name: &str, redis_password: &str| {
        // The same password in a URL's query (the daemon's) and in its user info (the
        // reader's, which only `check` uses here).
        let text = format!(
            "[postgres]\n\
             url = \"postgres://streamer@127.0.0.1:{port}/{DB}?password={PG_PASSWORD}&sslmode=disable\"\n\
             [redis]\nurl = \"redis://:{redis_password}@127.0.0.1:{}/\"\n\
             [reader]\nurl = \"postgres://streamer:{PG_PASSWORD}@127.0.0.1:{port}/{DB}?sslmode=disable\"\n\
             [metrics]\nlisten = \"{metrics}\"\n\
             [log]\nlevel = \"trace\"\n\
             [[tables]]\ntable = \"public.items\"\nkey = \"item:{{id}}\"\n",
            env.redis.port()
        );
        let path = env.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let good = write_config("good.toml", REDIS_PASSWORD);
    let mut printed: Vec<(String, String)> = Vec::new();

    // A run that streams, logging everything at trace level.
    let log = env.dir.path().join("daemon.log");
    let mut daemon = crate::common::Daemon::spawn_logging(&good, &log, "trace");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !try_http(metrics, "/readyz").is_ok_and(|r| r.contains(" 200 OK")) {
        assert!(Instant::now() < deadline, "not ready:\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    env.sql("INSERT INTO items VALUES (1, 'one')");
    let mut redis = redis::Client::open(format!(
        "redis://:{REDIS_PASSWORD}@127.0.0.1:{}/",
        env.redis.port()
    ))
    .unwrap()
    .get_multiplexed_async_connection()
    .await
    .unwrap();
    crate::common::wait_for_json(
        &mut redis,
        "item:1",
        Some(serde_json::json!({"id": 1, "name": "one"})),
    )
    .await;
    for path in ["/metrics", "/healthz", "/readyz"] {
        printed.push((format!("GET {path}"), http_body(metrics, path)));
    }
    assert!(printed[0].1.contains("pgcache_"), "{}", printed[0].1);
    let config = good.to_str().unwrap();
    for args in [
        &["status", "--json", "--config", config][..],
        &["check", "--config", config][..],
    ] {
        let (code, out, err) = pgcache(args);
        assert_eq!(code, 0, "{args:?}:\n{out}\n{err}");
        printed.push((format!("pgcache {args:?}"), out + &err));
    }
    assert!(
        printed
            .iter()
            .any(|(_, text)| text.contains("\"lag_bytes\"")),
        "status --json printed no status"
    );
    daemon.terminate();
    let first = daemon.log();
    assert!(
        first.contains("TRACE"),
        "the daemon did not log at trace level"
    );
    printed.push(("daemon log (streaming)".into(), first));

    // A run with the wrong Redis password: the daemon fails, and says why.
    let wrong = write_config("wrong.toml", WRONG_REDIS_PASSWORD);
    let log = env.dir.path().join("daemon-wrong.log");
    let mut daemon = crate::common::Daemon::spawn_logging(&wrong, &log, "trace");
    let status = daemon.wait(Duration::from_secs(30));
    assert!(
        !status.success(),
        "the daemon ran with a wrong Redis password"
    );
    let second = daemon.log();
    assert!(
        second.contains("Password authentication failed"),
        "the error was not about the password:\n{second}"
    );
    printed.push(("daemon log (wrong Redis password)".into(), second));
    let config = wrong.to_str().unwrap();
    for args in [
        &["status", "--json", "--config", config][..],
        &["check", "--config", config][..],
    ] {
        let (code, out, err) = pgcache(args);
        assert_ne!(code, 0, "{args:?} succeeded with a wrong Redis password");
        printed.push((format!("pgcache {args:?}"), out + &err));
    }
    // A config error quotes the URL.
    let broken = env.dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        std::fs::read_to_string(&good).unwrap().replace(
            &format!("127.0.0.1:{port}/{DB}?password"),
            &format!("127.0.0.1:port/{DB}?password"),
        ),
    )
    .unwrap();
    let (code, out, err) = pgcache(&["check", "--config", broken.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(err.contains("postgres.url"), "{err}");
    printed.push(("pgcache check (bad config)".into(), out + &err));

    for (what, text) in &printed {
        for secret in SECRETS {
            assert!(
                !text.contains(secret),
                "{what} shows the secret {secret:?}:\n{text}"
            );
        }
    }
}
