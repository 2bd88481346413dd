//! Unit tests of connection-string parsing, redaction and TLS configuration.

use super::*;

#[test]
fn parses_url_with_tls_params() {
    let t = PgTarget::parse(
        "postgres://alice:s%40cret@db.example:6543/app?sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem&application_name=x",
    )
    .unwrap();
    assert_eq!(t.host(), "db.example");
    assert_eq!(t.port(), 6543);
    assert_eq!(t.user(), "alice");
    assert_eq!(t.password(), Some(&b"s@cret"[..]));
    assert_eq!(t.dbname(), "app");
    assert_eq!(t.ssl_mode(), SslMode::VerifyFull);
    assert_eq!(
        t.ssl_root_cert(),
        Some(&SslRootCert::File("/tmp/ca.pem".into()))
    );
    assert_eq!(t.application_name(), "x");
    assert!(!t.is_unix_socket());
}

#[test]
fn defaults_follow_libpq() {
    let t = PgTarget::parse("postgres://bob@localhost").unwrap();
    assert_eq!(t.port(), 5432);
    assert_eq!(t.dbname(), "bob");
    assert_eq!(t.ssl_mode(), SslMode::Prefer);
    assert_eq!(t.ssl_root_cert(), None);
    assert_eq!(t.password(), None);
    assert_eq!(t.application_name(), "pgcache");
}

#[test]
fn parses_keyword_value_strings() {
    let t = PgTarget::parse(
        "host=10.0.0.1 port = 5433 user=carol password='it\\'s a secret' dbname=shop sslmode=verify-ca sslrootcert='/etc/ca dir/root.crt'",
    )
    .unwrap();
    assert_eq!(t.host(), "10.0.0.1");
    assert_eq!(t.port(), 5433);
    assert_eq!(t.user(), "carol");
    assert_eq!(t.password(), Some(&b"it's a secret"[..]));
    assert_eq!(t.dbname(), "shop");
    assert_eq!(t.ssl_mode(), SslMode::VerifyCa);
    assert_eq!(
        t.ssl_root_cert(),
        Some(&SslRootCert::File("/etc/ca dir/root.crt".into()))
    );
}

#[test]
fn rejects_bad_input_with_a_named_problem() {
    let e = PgTarget::parse("postgres://u@h/db?sslmode=maybe").unwrap_err();
    assert!(e.to_string().contains("sslmode \"maybe\""), "{e}");
    let e = PgTarget::parse("postgres://h/db").unwrap_err();
    assert!(matches!(e, PgTargetError::NoUser), "{e}");
    let e = PgTarget::parse("postgres://u@h/db?bogus=1").unwrap_err();
    assert!(
        e.to_string().starts_with("invalid connection string"),
        "{e}"
    );
    let e = PgTarget::parse("user=u password='open").unwrap_err();
    assert!(e.to_string().contains("unterminated"), "{e}");
    let e = PgTarget::parse("host=/run/postgresql user=u sslmode=verify-full").unwrap_err();
    assert!(
        e.to_string()
            .contains("sslmode=verify-full needs a TCP host"),
        "{e}"
    );
}

#[test]
fn redacted_never_shows_the_password() {
    let t = PgTarget::parse("postgres://alice:hunter2@db:5432/app?sslmode=require").unwrap();
    assert_eq!(t.redacted(), "postgres://alice@db:5432/app?sslmode=require");
    assert!(!format!("{t:?}").contains("hunter2"));
    let t = PgTarget::parse("host=/run/postgresql user=u").unwrap();
    assert!(t.is_unix_socket());
    assert_eq!(
        t.redacted(),
        "postgres://u@%2Frun%2Fpostgresql:5432/u?sslmode=prefer"
    );
}

#[test]
fn tokio_config_carries_pinned_settings() {
    let t = PgTarget::parse("postgres://u@h/db?options=-c%20work_mem%3D64MB").unwrap();
    let c = t.tokio_config();
    let options = c.get_options().unwrap();
    assert!(
        options.starts_with("-c work_mem=64MB -c DateStyle=ISO"),
        "{options}"
    );
    assert!(options.ends_with("-c client_encoding=UTF8"), "{options}");
    assert_eq!(c.get_application_name(), Some("pgcache"));
    assert_eq!(
        session_options(),
        "-c DateStyle=ISO -c TimeZone=UTC -c IntervalStyle=iso_8601 -c extra_float_digits=3 -c bytea_output=hex -c client_encoding=UTF8"
    );
    let t = PgTarget::parse("postgres://u@h/db?sslmode=verify-full").unwrap();
    assert_eq!(
        t.tokio_config().get_ssl_mode(),
        tokio_postgres::config::SslMode::Require
    );
}

#[test]
fn redact_url_hides_passwords() {
    assert_eq!(
        redact_url("postgres://u:p%40ss@h:5432/db?sslmode=disable"),
        "postgres://u:***@h:5432/db?sslmode=disable"
    );
    assert_eq!(
        redact_url("redis://:secret@r:6379/0"),
        "redis://:***@r:6379/0"
    );
    assert_eq!(
        redact_url("rediss://default:pw@r"),
        "rediss://default:***@r"
    );
    assert_eq!(redact_url("redis://r:6379"), "redis://r:6379");
    assert_eq!(
        redact_url("postgres://u@h/db?password=x&a=b"),
        "postgres://u@h/db?password=***&a=b"
    );
    assert_eq!(
        redact_url("host=h user=u password=x"),
        "host='h' user='u' password='***'"
    );
    assert_eq!(redact_url("not a url"), "not a url");
}

/// A self-signed CA certificate (ECDSA P-256 with SHA-256), valid until 2126.
const CA_PEM: &str = include_str!("test-ca.pem");

#[cfg(feature = "tls")]
#[test]
fn tls_configs_build_for_every_mode() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, CA_PEM).unwrap();
    let ca = SslRootCert::File(ca);
    for mode in [
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ] {
        tls_config_with_home(mode, Some(&ca), None).unwrap();
    }
    let missing = SslRootCert::File("/nonexistent/ca.pem".into());
    let e = tls_config(SslMode::VerifyFull, Some(&missing)).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
    let empty = tempfile::NamedTempFile::new().unwrap();
    let empty = SslRootCert::File(empty.path().to_path_buf());
    let e = tls_config(SslMode::VerifyCa, Some(&empty)).unwrap_err();
    assert!(matches!(e, PgTargetError::NoRootCerts(_)), "{e}");
}

#[test]
fn verifying_modes_take_roots_as_libpq_does() {
    let home = tempfile::tempdir().unwrap();
    let given = SslRootCert::File("/etc/ssl/db-ca.pem".into());
    // sslrootcert wins; without it, ~/.postgresql/root.crt if it exists.
    assert_eq!(
        select_root_cert(SslMode::VerifyFull, Some(&given), Some(home.path())).unwrap(),
        given
    );
    assert_eq!(
        select_root_cert(SslMode::VerifyCa, Some(&SslRootCert::System), None).unwrap(),
        SslRootCert::System
    );
    // Neither: an error that names the file looked for and both fixes, never public roots.
    let e = select_root_cert(SslMode::VerifyFull, None, Some(home.path())).unwrap_err();
    let message = e.to_string();
    let expected = home.path().join(".postgresql/root.crt");
    for part in [
        "sslmode=verify-full",
        &format!("{} does not exist", expected.display()),
        "sslrootcert=/path/to/ca.pem",
        "sslrootcert=system",
    ] {
        assert!(message.contains(part), "{part:?} missing in {message}");
    }
    #[cfg(feature = "tls")]
    {
        let e = tls_config_with_home(SslMode::VerifyCa, None, Some(home.path())).unwrap_err();
        assert!(matches!(e, PgTargetError::NoRootCert { .. }), "{e}");
    }
    let e = select_root_cert(SslMode::VerifyCa, None, None).unwrap_err();
    assert!(e.to_string().contains("no home directory"), "{e}");

    std::fs::create_dir(home.path().join(".postgresql")).unwrap();
    std::fs::write(&expected, CA_PEM).unwrap();
    assert_eq!(
        select_root_cert(SslMode::VerifyCa, None, Some(home.path())).unwrap(),
        SslRootCert::File(expected)
    );
    #[cfg(feature = "tls")]
    {
        tls_config_with_home(SslMode::VerifyCa, None, Some(home.path())).unwrap();
        // Modes that do not verify need no roots.
        tls_config_with_home(SslMode::Require, None, None).unwrap();
    }
}

#[test]
fn plain_unless_tls_is_wanted_and_built() {
    let plain = |s: &str| PgTarget::parse(s).unwrap().plain();
    assert!(plain("postgres://u@db/app?sslmode=disable").unwrap());
    assert!(plain("host=/run/postgresql user=u").unwrap());
    let tls = cfg!(feature = "tls");
    // sslmode=prefer (the default) takes TLS when it is built, as libpq does.
    assert_eq!(plain("postgres://u@db/app").unwrap(), !tls);
    for demands in [
        "postgres://u@db/app?sslmode=require",
        "postgres://u@db/app?sslmode=verify-full&sslrootcert=/etc/ca.pem",
        "postgres://u@db/app?channel_binding=require",
    ] {
        match plain(demands) {
            Ok(plain) => assert!(tls && !plain, "{demands}"),
            Err(e) => {
                assert!(!tls, "{demands}: {e}");
                let message = e.to_string();
                assert!(message.contains("`tls` feature"), "{message}");
                let setting = demands
                    .split_once('?')
                    .unwrap()
                    .1
                    .split('&')
                    .next()
                    .unwrap();
                assert!(message.contains(setting), "{message}");
            }
        }
    }
}

#[test]
fn sslrootcert_system_means_verify_full() {
    let t = PgTarget::parse("postgres://u@db.example/app?sslrootcert=system").unwrap();
    assert_eq!(t.ssl_mode(), SslMode::VerifyFull);
    assert_eq!(t.ssl_root_cert(), Some(&SslRootCert::System));
    let t = PgTarget::parse("host=db user=u sslmode=verify-full sslrootcert=system").unwrap();
    assert_eq!(t.ssl_mode(), SslMode::VerifyFull);
    for weaker in ["require", "verify-ca", "prefer", "disable"] {
        let e = PgTarget::parse(&format!(
            "postgres://u@db/app?sslmode={weaker}&sslrootcert=system"
        ))
        .unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("sslrootcert=system needs sslmode=verify-full (or no sslmode), not sslmode={weaker}")),
            "{e}"
        );
    }
}

#[test]
fn channel_binding_is_parsed_as_libpq_spells_it() {
    let t = PgTarget::parse("postgres://u@h/db").unwrap();
    assert_eq!(t.channel_binding(), ChannelBinding::Prefer);
    assert_eq!(
        t.tokio_config().get_channel_binding(),
        tokio_postgres::config::ChannelBinding::Prefer
    );
    for (value, want, tokio) in [
        (
            "disable",
            ChannelBinding::Disable,
            tokio_postgres::config::ChannelBinding::Disable,
        ),
        (
            "prefer",
            ChannelBinding::Prefer,
            tokio_postgres::config::ChannelBinding::Prefer,
        ),
        (
            "require",
            ChannelBinding::Require,
            tokio_postgres::config::ChannelBinding::Require,
        ),
    ] {
        let url = PgTarget::parse(&format!(
            "postgres://u@h/db?sslmode=require&channel_binding={value}"
        ))
        .unwrap();
        let keywords = PgTarget::parse(&format!(
            "host=h user=u sslmode=require channel_binding={value}"
        ))
        .unwrap();
        for t in [url, keywords] {
            assert_eq!(t.channel_binding(), want);
            assert_eq!(t.tokio_config().get_channel_binding(), tokio);
        }
    }
    let e = PgTarget::parse("postgres://u@h/db?channel_binding=always").unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid channel_binding \"always\": expected disable, prefer or require"
    );
    let e =
        PgTarget::parse("postgres://u@h/db?sslmode=disable&channel_binding=require").unwrap_err();
    assert!(matches!(e, PgTargetError::ChannelBindingWithoutTls), "{e}");
    let e = PgTarget::parse("host=/run/postgresql user=u channel_binding=require").unwrap_err();
    assert!(e.to_string().contains("Unix socket"), "{e}");
}

#[test]
fn parses_multi_host_strings() {
    let ep = |host: &str, port: u16| Endpoint {
        host: host.into(),
        unix_socket: false,
        hostaddr: None,
        port,
    };
    // URL: a port per host, or the default.
    let t = PgTarget::parse(
        "postgres://pgcache:pw@db1:5433,db2/app?target_session_attrs=read-write&sslmode=disable",
    )
    .unwrap();
    assert_eq!(t.endpoints(), &[ep("db1", 5433), ep("db2", 5432)]);
    assert!(t.wants_read_write() && !t.wants_read_only());
    assert_eq!((t.host(), t.port()), ("db1", 5433));
    assert_eq!(
        t.redacted(),
        "postgres://pgcache@db1:5433,db2:5432/app?sslmode=disable&target_session_attrs=read-write"
    );
    // Key-value: one port for all hosts.
    let t = PgTarget::parse(
        "host=db1,db2 port=6000 user=pgcache dbname=app target_session_attrs=read-write",
    )
    .unwrap();
    assert_eq!(t.endpoints(), &[ep("db1", 6000), ep("db2", 6000)]);
    assert!(t.wants_read_write());
    // Key-value: a port and a hostaddr per host.
    let t = PgTarget::parse(
        "host=db1,db2 hostaddr=10.0.0.1,10.0.0.2 port=6000,6001 user=pgcache dbname=app",
    )
    .unwrap();
    assert_eq!(t.endpoints()[1].hostaddr, Some("10.0.0.2".parse().unwrap()));
    assert_eq!(t.endpoints()[1].port, 6001);
    assert!(!t.wants_read_write());
    // One host: as before.
    let t = PgTarget::parse("postgres://u@db/app").unwrap();
    assert_eq!(t.endpoints(), &[ep("db", 5432)]);
    assert_eq!(t.redacted(), "postgres://u@db:5432/app?sslmode=prefer");
}

#[test]
fn multi_host_mismatches_are_named() {
    let e = PgTarget::parse("host=a,b,c port=1,2 user=u").unwrap_err();
    assert!(e.to_string().contains("3 hosts but 2 ports"), "{e}");
    let e = PgTarget::parse("host=a,b hostaddr=10.0.0.1 user=u").unwrap_err();
    assert!(e.to_string().contains("2 hosts but 1 hostaddrs"), "{e}");
}

#[test]
fn one_host_of_many_keeps_the_rest_of_the_target() {
    let t = PgTarget::parse(
        "postgres://pgcache:pw@db1,db2:6000/app?target_session_attrs=read-write&application_name=x&connect_timeout=3",
    )
    .unwrap();
    let second = t.at(&t.endpoints()[1]);
    assert_eq!(second.endpoints(), &t.endpoints()[1..]);
    assert_eq!((second.host(), second.port()), ("db2", 6000));
    assert!(!second.wants_read_write());
    assert_eq!(second.user(), "pgcache");
    assert_eq!(second.password(), Some(&b"pw"[..]));
    assert_eq!(second.dbname(), "app");
    assert_eq!(second.application_name(), "x");
    assert_eq!(second.connect_timeout(), Some(Duration::from_secs(3)));
    let config = second.tokio_config();
    assert_eq!(config.get_hosts().len(), 1);
    assert_eq!(config.get_ports(), &[6000]);
}
