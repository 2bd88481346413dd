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
    assert_eq!(t.ssl_root_cert(), Some(Path::new("/tmp/ca.pem")));
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
    assert_eq!(t.ssl_root_cert(), Some(Path::new("/etc/ca dir/root.crt")));
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

#[test]
fn tls_configs_build_for_every_mode() {
    for mode in [
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ] {
        tls_config(mode, None).unwrap();
    }
    let e = tls_config(SslMode::VerifyFull, Some(Path::new("/nonexistent/ca.pem"))).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
    let empty = tempfile::NamedTempFile::new().unwrap();
    let e = tls_config(SslMode::VerifyCa, Some(empty.path())).unwrap_err();
    assert!(matches!(e, PgTargetError::NoRootCerts(_)), "{e}");
}
