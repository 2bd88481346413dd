//! TLS for Postgres connections with rustls (the `tls` feature): libpq's meaning of each
//! `sslmode`, and its choice of root certificates.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::{select_root_cert, PgTargetError, SslMode, SslRootCert};

/// The rustls client configuration for an ssl mode, with libpq's semantics:
/// `Prefer`/`Require` encrypt without checking the certificate; `VerifyCa` checks the chain
/// against the root certificates but not the host name; `VerifyFull` checks both. Root
/// certificates come, as with libpq, from `root_cert` (a PEM file, or the operating system's
/// store for [`SslRootCert::System`]), else from `~/.postgresql/root.crt`; with neither, a
/// verifying mode is an error. There is no silent fallback to public roots: they would let
/// anyone with a certificate from a public CA pose as the database.
///
/// Uses the `ring` provider explicitly so no process-wide default provider is needed.
///
/// # Errors
/// No root certificates, a root certificate file that cannot be read or holds no
/// certificates, or rustls rejects the configuration.
pub fn tls_config(
    mode: SslMode,
    root_cert: Option<&SslRootCert>,
) -> Result<Arc<rustls::ClientConfig>, PgTargetError> {
    tls_config_with_home(mode, root_cert, home_dir().as_deref())
}

/// [`tls_config`] with the home directory given, so tests need not touch `$HOME`.
///
/// # Errors
/// As [`tls_config`].
pub fn tls_config_with_home(
    mode: SslMode,
    root_cert: Option<&SslRootCert>,
    home: Option<&Path>,
) -> Result<Arc<rustls::ClientConfig>, PgTargetError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| PgTargetError::Tls(e.to_string()))?;
    let algorithms = provider.signature_verification_algorithms;
    let config = match mode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PgCertVerifier {
                roots: None,
                algorithms,
            }))
            .with_no_client_auth(),
        SslMode::VerifyCa => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PgCertVerifier {
                roots: Some(Arc::new(root_store(mode, root_cert, home)?)),
                algorithms,
            }))
            .with_no_client_auth(),
        SslMode::VerifyFull => builder
            .with_root_certificates(root_store(mode, root_cert, home)?)
            .with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

fn root_store(
    mode: SslMode,
    root_cert: Option<&SslRootCert>,
    home: Option<&Path>,
) -> Result<RootCertStore, PgTargetError> {
    let mut store = RootCertStore::empty();
    let path = match select_root_cert(mode, root_cert, home)? {
        SslRootCert::File(path) => path,
        SslRootCert::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _unparsable) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = match found.errors.first() {
                    Some(e) => format!(" ({e})"),
                    None => String::new(),
                };
                return Err(PgTargetError::NoSystemRoots(why));
            }
            return Ok(store);
        }
    };
    let path = path.as_path();
    let read_err = |reason: String| PgTargetError::RootCert {
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| read_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(PgTargetError::NoRootCerts(path.to_path_buf()));
    }
    for cert in certs {
        store.add(cert).map_err(|e| read_err(e.to_string()))?;
    }
    Ok(store)
}

/// Certificate checks for `require` (none) and `verify-ca` (chain, no host name), which
/// rustls's own verifier cannot express. Handshake signatures are always verified, so the
/// peer must at least hold the key of the certificate it shows.
#[derive(Debug)]
struct PgCertVerifier {
    /// `None`: accept any certificate (sslmode=require semantics).
    roots: Option<Arc<RootCertStore>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PgCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The user's home directory, where libpq looks for `.postgresql/root.crt`: `$HOME`, else
/// the password database's entry.
fn home_dir() -> Option<PathBuf> {
    #[allow(deprecated)] // Deprecated only for its old Windows behaviour.
    std::env::home_dir().filter(|home| !home.as_os_str().is_empty())
}
