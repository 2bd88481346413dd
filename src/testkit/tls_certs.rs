//! A throwaway certificate authority and server certificate, made with the `openssl` CLI.
//!
//! The certificates must satisfy both libpq (OpenSSL) and rustls/webpki, which is the
//! stricter: the CA needs `basicConstraints CA:TRUE`, the server certificate must be a v3
//! end-entity certificate whose subjectAltName names every host clients dial (`localhost`
//! and `127.0.0.1`); the common name is not consulted.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use rand::Rng;

use super::run;

/// Where [`generate`] put its files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

/// Our own config, so the system `openssl.cnf` cannot add or clash with extensions.
const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
prompt = no

[dn]
CN = pgcache testkit

[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
";

/// Creates `dir` and writes a CA and a server certificate signed by it (P-256 keys: quick
/// to generate, and every TLS stack we use accepts them; the certificate is signed with
/// ECDSA and SHA-256). Each call makes a new CA.
///
/// # Errors
/// When `openssl` is missing or fails; the error holds its output.
pub fn generate(dir: &Path) -> Result<CertFiles> {
    let openssl = super::find_on_path("openssl")
        .context("openssl not found in PATH; install it with `apt-get install -y openssl`")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cnf = dir.join("openssl.cnf");
    fs::write(&cnf, OPENSSL_CNF).with_context(|| format!("writing {}", cnf.display()))?;

    let files = CertFiles {
        ca_cert: dir.join("ca.crt"),
        server_cert: dir.join("server.crt"),
        server_key: dir.join("server.key"),
    };
    let ca_key = dir.join("ca.key");
    let csr = dir.join("server.csr");
    let new_p256_key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];

    let openssl_in_dir = || {
        let mut cmd = Command::new(&openssl);
        cmd.current_dir(dir).arg("req").arg("-config").arg(&cnf);
        cmd
    };
    run(
        openssl_in_dir()
            .args(["-x509", "-new"])
            .args(new_p256_key)
            .arg("-keyout")
            .arg(&ca_key)
            .arg("-out")
            .arg(&files.ca_cert)
            .args(["-days", "3650", "-subj", "/CN=pgcache testkit CA"])
            .args(["-extensions", "ca_ext"]),
        "openssl: creating the test CA",
    )?;
    run(
        openssl_in_dir()
            .arg("-new")
            .args(new_p256_key)
            .arg("-keyout")
            .arg(&files.server_key)
            .arg("-out")
            .arg(&csr)
            .args(["-subj", "/CN=localhost"]),
        "openssl: creating the server key",
    )?;
    let serial = format!("0x{:016x}", rand::thread_rng().gen::<u64>() | 1);
    run(
        Command::new(&openssl)
            .current_dir(dir)
            .args(["x509", "-req", "-in"])
            .arg(&csr)
            .arg("-CA")
            .arg(&files.ca_cert)
            .arg("-CAkey")
            .arg(&ca_key)
            .args(["-set_serial", &serial, "-days", "3650", "-out"])
            .arg(&files.server_cert)
            .arg("-extfile")
            .arg(&cnf)
            .args(["-extensions", "server_ext"]),
        "openssl: signing the server certificate",
    )?;
    // Postgres refuses a key file that others can read.
    fs::set_permissions(&files.server_key, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 600 {}", files.server_key.display()))?;
    Ok(files)
}
