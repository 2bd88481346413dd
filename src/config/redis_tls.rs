//! TLS to Redis: which certificates vouch for the server of a `rediss://` URL.
//!
//! redis-rs checks the certificate and the host name of a `rediss://` server against the
//! roots it is given, and when given none, against the operating system's store. pgcache
//! does not let the second happen by default: a private Redis is signed by a private CA, and
//! trusting every public CA instead would let anyone with a certificate for the Redis host
//! name from one of them pose as it. So a `rediss://` URL needs `[redis] tls_ca_file`: a PEM
//! file, or `"system"` to choose the operating system's roots on purpose (the same spelling
//! as libpq's `sslrootcert=system`).
//!
//! TLS is the `tls` feature; without it a `rediss://` URL is refused with an error saying so.

use std::path::{Path, PathBuf};

/// Where a `rediss://` connection finds the certificates that vouch for Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisRoots {
    /// A PEM file with the CA certificate(s) that signed Redis' certificate.
    File(PathBuf),
    /// The operating system's trust store.
    System,
}

/// The value of `tls_ca_file` that selects the operating system's roots.
pub const SYSTEM_ROOTS: &str = "system";

impl RedisRoots {
    /// Reads a `tls_ca_file` value; a relative path is taken relative to `base_dir`.
    pub fn from_setting(value: &str, base_dir: Option<&Path>) -> RedisRoots {
        if value == SYSTEM_ROOTS {
            return RedisRoots::System;
        }
        match base_dir {
            Some(dir) => RedisRoots::File(dir.join(value)),
            None => RedisRoots::File(PathBuf::from(value)),
        }
    }
}

/// Whether a Redis URL asks for TLS, as redis-rs reads it: its URL parser trims spaces,
/// drops tabs and line breaks and lower-cases the scheme, and `valkeys://` is TLS too.
pub fn is_tls_url(url: &str) -> bool {
    let scheme: String = url
        .trim()
        .chars()
        .filter(|c| !matches!(c, '\t' | '\n' | '\r'))
        .take_while(|&c| c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    scheme == "rediss" || scheme == "valkeys"
}

/// Whether redis-rs would skip the certificate check of a TLS URL (`#insecure`), read as
/// redis-rs reads it (see [`is_tls_url`]); any other fragment counts too, since redis-rs
/// may read it so.
fn asks_insecure(url: &str) -> bool {
    let parsed = redis::IntoConnectionInfo::into_connection_info(url).ok();
    match parsed.as_ref().map(redis::ConnectionInfo::addr) {
        Some(redis::ConnectionAddr::TcpTls { insecure, .. }) => *insecure,
        _ => url.split_once('#').is_some_and(|(_, fragment)| {
            let bare: String = fragment.chars().filter(|c| !c.is_whitespace()).collect();
            !bare.is_empty()
        }),
    }
}

/// What is wrong with this combination of URL and roots, if anything: TLS without roots,
/// roots without TLS, or TLS without certificate checks.
pub fn tls_problem(url: &str, roots: Option<&RedisRoots>) -> Option<String> {
    let tls = is_tls_url(url);
    if tls && asks_insecure(url) {
        return Some(
            "rediss:// with #insecure would accept any certificate; pgcache does not allow it: \
             remove #insecure and set redis.tls_ca_file to the CA that signed Redis' certificate"
                .to_string(),
        );
    }
    match (tls, roots) {
        (true, None) => Some(
            "rediss:// checks the server's certificate, but no CA is configured: set \
             redis.tls_ca_file = \"/path/to/ca.pem\" (the CA that signed Redis' certificate), \
             or redis.tls_ca_file = \"system\" to trust the operating system's roots"
                .to_string(),
        ),
        (false, Some(_)) => Some(
            "redis.tls_ca_file is set, but the URL is not rediss://, so nothing would use it \
             (write rediss:// for TLS, or remove tls_ca_file)"
                .to_string(),
        ),
        _ => None,
    }
}

/// A redis-rs client for `url` that checks a TLS server against `roots`.
///
/// # Errors
/// The URL is invalid, TLS is asked for without roots (or roots without TLS), or the CA
/// file cannot be read.
pub fn redis_client(url: &str, roots: Option<&RedisRoots>) -> redis::RedisResult<redis::Client> {
    let invalid = |what: String| {
        redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "invalid Redis TLS setup",
            what,
        ))
    };
    if let Some(problem) = tls_problem(url, roots) {
        return Err(invalid(problem));
    }
    #[cfg(not(feature = "tls"))]
    if is_tls_url(url) {
        return Err(invalid(
            "rediss:// needs TLS, and this build of pgcache has none: enable its `tls` feature \
             (pgcache = { ..., features = [\"tls\"] })"
                .to_string(),
        ));
    }
    match roots {
        // redis-rs uses the operating system's store when it is given no roots.
        None | Some(RedisRoots::System) => redis::Client::open(url),
        #[cfg(not(feature = "tls"))]
        Some(RedisRoots::File(_)) => unreachable!("rediss:// is refused above without TLS"),
        #[cfg(feature = "tls")]
        Some(RedisRoots::File(path)) => {
            let pem = read_ca_file(path)?;
            redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                },
            )
        }
    }
}

/// A redis-rs cluster client builder for `seeds` that checks TLS nodes against `roots`:
/// each seed is checked as [`redis_client`] checks one URL, and the nodes found from them
/// are reached with the seeds' scheme.
///
/// # Errors
/// As [`redis_client`], for any seed.
#[cfg(feature = "cluster")]
pub fn redis_cluster_builder(
    seeds: &[String],
    roots: Option<&RedisRoots>,
) -> redis::RedisResult<redis::cluster::ClusterClientBuilder> {
    for seed in seeds {
        redis_client(seed, roots)?;
    }
    let builder = redis::cluster::ClusterClientBuilder::new(seeds.to_vec());
    match roots {
        // redis-rs uses the operating system's store when it is given no roots.
        None | Some(RedisRoots::System) => Ok(builder),
        #[cfg(not(feature = "tls"))]
        Some(RedisRoots::File(_)) => unreachable!("redis_client refuses roots without TLS"),
        #[cfg(feature = "tls")]
        Some(RedisRoots::File(path)) => {
            let pem = read_ca_file(path)?;
            Ok(builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            }))
        }
    }
}

/// The CA file's PEM, which must hold at least one certificate (a file of anything else
/// would only fail at the first connection, as an unknown issuer).
#[cfg(feature = "tls")]
fn read_ca_file(path: &Path) -> redis::RedisResult<Vec<u8>> {
    let invalid = |what: String| {
        redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "invalid Redis TLS setup",
            what,
        ))
    };
    let pem = std::fs::read(path).map_err(|e| {
        invalid(format!(
            "cannot read redis.tls_ca_file {}: {e}",
            path.display()
        ))
    })?;
    if !pem
        .windows(b"-----BEGIN CERTIFICATE-----".len())
        .any(|w| w == b"-----BEGIN CERTIFICATE-----")
    {
        return Err(invalid(format!(
            "redis.tls_ca_file {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_are_required_for_tls_only() {
        let file = RedisRoots::File("/etc/ca.pem".into());
        assert_eq!(tls_problem("redis://h:6379", None), None);
        assert_eq!(tls_problem("rediss://h:6380", Some(&file)), None);
        assert_eq!(
            tls_problem("rediss://h:6380", Some(&RedisRoots::System)),
            None
        );
        let e = tls_problem("rediss://:pw@h:6380/0", None).unwrap();
        assert!(e.contains("tls_ca_file = \"system\""), "{e}");
        let e = tls_problem("redis://h", Some(&RedisRoots::System)).unwrap();
        assert!(e.contains("not rediss://"), "{e}");
        let e = tls_problem("rediss://h/#insecure", Some(&file)).unwrap();
        assert!(e.contains("#insecure"), "{e}");
        // Read as redis-rs reads a URL: spaces trimmed, tabs and line breaks dropped, the
        // scheme in any case, valkeys:// as TLS.
        for (url, roots) in [
            ("rediss://h/#insecure ", Some(&file)),
            ("rediss://h/#insec\ture", Some(&file)),
            ("rediss://h/#insecure\n", Some(&RedisRoots::System)),
            ("REDISS://h/#insecure", Some(&file)),
            ("valkeys://h/#insecure", Some(&file)),
        ] {
            let e = tls_problem(url, roots).unwrap_or_else(|| panic!("{url:?} accepted"));
            assert!(e.contains("#insecure"), "{url:?}: {e}");
        }
        for url in ["REDISS://h:6380", " rediss://h:6380", "valkeys://h:6380"] {
            let e = tls_problem(url, None).unwrap_or_else(|| panic!("{url:?} accepted"));
            assert!(e.contains("no CA is configured"), "{url:?}: {e}");
        }
    }

    #[cfg(feature = "tls")]
    #[test]
    fn a_ca_file_must_hold_a_certificate() {
        let path = std::env::temp_dir().join(format!("pgcache-no-ca-{}.pem", std::process::id()));
        std::fs::write(&path, "not a certificate\n").unwrap();
        let e = redis_client("rediss://h:6380", Some(&RedisRoots::File(path.clone())))
            .unwrap_err()
            .to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(e.contains("holds no PEM certificate"), "{e}");
    }

    #[test]
    fn settings_name_a_file_or_the_system_store() {
        assert_eq!(RedisRoots::from_setting("system", None), RedisRoots::System);
        assert_eq!(
            RedisRoots::from_setting("ca.pem", Some(Path::new("/etc/pgcache"))),
            RedisRoots::File("/etc/pgcache/ca.pem".into())
        );
        assert_eq!(
            RedisRoots::from_setting("/abs/ca.pem", Some(Path::new("/etc/pgcache"))),
            RedisRoots::File("/abs/ca.pem".into())
        );
    }

    #[test]
    fn clients_refuse_what_the_config_refuses() {
        let e = redis_client("rediss://h:6380", None).unwrap_err();
        assert!(e.to_string().contains("no CA is configured"), "{e}");
        redis_client("redis://h:6379", None).unwrap();
        let missing = RedisRoots::File("/nonexistent/redis-ca.pem".into());
        let tls = redis_client("rediss://h:6380", Some(&missing));
        let system = redis_client("rediss://h:6380", Some(&RedisRoots::System));
        if cfg!(feature = "tls") {
            let e = tls.unwrap_err();
            assert!(e.to_string().contains("/nonexistent/redis-ca.pem"), "{e}");
            system.unwrap();
        } else {
            // Without TLS built, rediss:// is refused, naming the feature.
            for e in [tls.unwrap_err(), system.unwrap_err()] {
                assert!(e.to_string().contains("`tls` feature"), "{e}");
            }
        }
    }
}
