//! TLS and mTLS on the gRPC port (and, with the same certificate, the admin port): the
//! `grpc_tls` settings, the certificate pair (and client CA) loaded from PEM files, and the
//! rustls configurations every new connection is accepted with.
//!
//! - [`GrpcTlsConfig`]: the settings, validated without touching the files.
//! - [`GrpcTls`]: what is served now. Loaded once at start, where a bad file is a configuration
//!   error naming the setting; then replaced by [`reload::watch`] when the files change (a
//!   renewal), and kept when a renewal does not load.
//! - `incoming`: the gRPC and admin ports' connections, each handshaken with the configuration
//!   current when it was accepted, so a renewal reaches new connections and leaves open ones
//!   alone.
//! - `reload`: notices renewed files and swaps them in.
//!
//! A client certificate is checked in the handshake, so a refused client gets no answer at all:
//! it must chain to `client_ca_file` (and be valid for client authentication, and in date), and
//! when `allowed_client_sans` is set carry one of those names as a URI or DNS subject
//! alternative name.
//!
//! The admin port's handshake checks a client certificate the same way against the same CA, but
//! lets a client without one through, and leaves the names to the admin API's authentication
//! (`admin.client_sans`, judged per request next to bearer tokens): a portal with a token needs
//! no certificate, and a certificate with an unlisted name gets the same 401 as no credentials.

pub(crate) mod incoming;
pub(crate) mod reload;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use rustls::RootCertStore;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use serde::{Deserialize, Serialize};

use crate::setting::InvalidSetting;

/// `grpc_tls`: without `cert_file` and `key_file` the gRPC port is plaintext (the embedded
/// default, on loopback).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcTlsConfig {
    /// PEM certificate chain, leaf first. With `key_file`, the port speaks TLS only.
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, or PKCS#1 RSA, or SEC1 EC) of the leaf certificate.
    pub key_file: Option<PathBuf>,
    /// PEM roots a client certificate must chain to; set, every client must present one (mTLS).
    pub client_ca_file: Option<PathBuf>,
    /// A client certificate must carry one of these subject alternative names: URI SANs (a
    /// SPIFFE ID, `spiffe://cluster.local/ns/edge/sa/envoy`) or DNS names. Empty: any
    /// certificate from `client_ca_file`.
    pub allowed_client_sans: Vec<String>,
}

impl GrpcTlsConfig {
    /// Whether the gRPC port speaks TLS.
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some() || self.key_file.is_some()
    }

    pub fn validate(&self) -> Result<(), InvalidSetting> {
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => {
                return Err(InvalidSetting::new(
                    "grpc_tls.key_file",
                    "must be set with grpc_tls.cert_file",
                ));
            }
            (None, Some(_)) => {
                return Err(InvalidSetting::new(
                    "grpc_tls.cert_file",
                    "must be set with grpc_tls.key_file",
                ));
            }
            _ => {}
        }
        for (field, path) in [
            ("grpc_tls.cert_file", &self.cert_file),
            ("grpc_tls.key_file", &self.key_file),
            ("grpc_tls.client_ca_file", &self.client_ca_file),
        ] {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return Err(InvalidSetting::new(
                    field,
                    "is empty (leave it unset instead)",
                ));
            }
        }
        if self.client_ca_file.is_some() && !self.enabled() {
            return Err(InvalidSetting::new(
                "grpc_tls.client_ca_file",
                "needs grpc_tls.cert_file and grpc_tls.key_file: clients are checked in a TLS handshake",
            ));
        }
        if !self.allowed_client_sans.is_empty() && self.client_ca_file.is_none() {
            return Err(InvalidSetting::new(
                "grpc_tls.allowed_client_sans",
                "needs grpc_tls.client_ca_file: without it clients present no certificate",
            ));
        }
        for (i, san) in self.allowed_client_sans.iter().enumerate() {
            if let Err(why) = check_san(san) {
                return Err(InvalidSetting::new(
                    format!("grpc_tls.allowed_client_sans[{i}]"),
                    format!("{san:?} {why}"),
                ));
            }
        }
        Ok(())
    }
}

/// Whether `san` can be a URI SAN (`scheme:…`) or a DNS name, as the allow-list compares them.
pub(crate) fn check_san(san: &str) -> Result<(), &'static str> {
    if san.is_empty() || san.len() > 2048 {
        return Err("must be 1 to 2048 characters");
    }
    if san.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("may not contain spaces or control characters");
    }
    if san.contains(':') {
        return Ok(());
    }
    let dns = san
        .split('.')
        .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if dns {
        Ok(())
    } else {
        Err("is neither a URI (spiffe://…) nor a DNS name (letters, digits, - and .)")
    }
}

/// A TLS file or its contents that do not load: which setting, and what is wrong (never the
/// contents of a key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {field}: {message}")]
pub struct TlsError {
    pub field: &'static str,
    pub message: String,
}

impl TlsError {
    fn new(field: &'static str, message: impl Into<String>) -> Self {
        TlsError {
            field,
            message: message.into(),
        }
    }
}

/// The contents of the three files, as read at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Files {
    cert: Result<Vec<u8>, String>,
    key: Result<Vec<u8>, String>,
    ca: Option<Result<Vec<u8>, String>>,
}

impl Files {
    /// Reads them (following symlinks, as Kubernetes' `..data` swap needs); a file that cannot
    /// be read is kept as its error.
    pub(crate) fn read(config: &GrpcTlsConfig) -> Files {
        let read = |p: &Option<PathBuf>| {
            let p = p.as_deref().unwrap_or(Path::new(""));
            std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
        };
        Files {
            cert: read(&config.cert_file),
            key: read(&config.key_file),
            ca: config
                .client_ca_file
                .as_ref()
                .map(|_| read(&config.client_ca_file)),
        }
    }
}

/// What the served certificate is, for `/readyz`, the log and `/metrics`: nothing secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The leaf's serial number, hex (`1a:2b:…`).
    pub serial: String,
    pub subject: String,
    /// Its `notAfter`, Unix seconds.
    pub not_after: i64,
}

impl CertInfo {
    pub fn not_after_rfc3339(&self) -> String {
        chrono::DateTime::from_timestamp(self.not_after, 0)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_else(|| self.not_after.to_string())
    }
}

/// A loaded pair (and client CA): the rustls configurations new connections get.
pub(crate) struct Loaded {
    /// The gRPC port's.
    pub(crate) server: Arc<ServerConfig>,
    /// The admin port's: the same certificate; a client certificate optional, and not held to
    /// `allowed_client_sans`; HTTP/1.1 besides h2 (REST clients).
    pub(crate) admin: Arc<ServerConfig>,
    pub(crate) info: CertInfo,
    pub(crate) files: Files,
}

/// The gRPC port's TLS: what is served now, and whether the last renewal failed.
pub struct GrpcTls {
    config: GrpcTlsConfig,
    current: RwLock<Arc<Loaded>>,
    /// The error of the last renewal, while the pair before it is still served.
    last_failure: Mutex<Option<String>>,
}

impl std::fmt::Debug for GrpcTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcTls")
            .field("info", &self.info())
            .finish_non_exhaustive()
    }
}

impl GrpcTls {
    /// Loads the files `config` names; any problem is a [`TlsError`] naming the setting.
    pub fn load(config: &GrpcTlsConfig) -> Result<GrpcTls, TlsError> {
        let files = Files::read(config);
        let loaded = build(config, files)?;
        Ok(GrpcTls {
            config: config.clone(),
            current: RwLock::new(Arc::new(loaded)),
            last_failure: Mutex::new(None),
        })
    }

    /// The configuration a connection accepted now is handshaken with.
    pub(crate) fn server_config(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .server
            .clone()
    }

    /// The configuration an admin connection accepted now is handshaken with.
    pub(crate) fn admin_server_config(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .admin
            .clone()
    }

    pub(crate) fn current(&self) -> Arc<Loaded> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The certificate served now.
    pub fn info(&self) -> CertInfo {
        self.current().info.clone()
    }

    /// Why the last renewal did not load, while the pair before it is served.
    pub fn last_failure(&self) -> Option<String> {
        self.last_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn config(&self) -> &GrpcTlsConfig {
        &self.config
    }

    pub(crate) fn clear_failure(&self) {
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Serves `files` to new connections from now on, if they load; otherwise keeps what is
    /// served and remembers why.
    pub(crate) fn replace(&self, files: Files) -> Result<CertInfo, TlsError> {
        match build(&self.config, files) {
            Ok(loaded) => {
                let info = loaded.info.clone();
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(loaded);
                *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = None;
                Ok(info)
            }
            Err(e) => {
                *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                Err(e)
            }
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls configuration for these file contents.
fn build(config: &GrpcTlsConfig, files: Files) -> Result<Loaded, TlsError> {
    const CERT: &str = "grpc_tls.cert_file";
    const KEY: &str = "grpc_tls.key_file";
    const CA: &str = "grpc_tls.client_ca_file";
    let cert_pem = files.cert.as_ref().map_err(|e| TlsError::new(CERT, e))?;
    let key_pem = files.key.as_ref().map_err(|e| TlsError::new(KEY, e))?;
    let chain = certificates(cert_pem).map_err(|e| TlsError::new(CERT, e))?;
    let info = cert_info(&chain[0]).map_err(|e| TlsError::new(CERT, e))?;
    // The key's own parse error never quotes it.
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
        TlsError::new(
            KEY,
            format!("no PEM private key (PKCS#8, RSA or EC) in it: {e}"),
        )
    })?;
    let provider = provider();
    let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
        TlsError::new(
            KEY,
            format!("does not match the certificate in {CERT}, or cannot sign: {e}"),
        )
    })?;
    let builder = || {
        ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::new(CERT, e.to_string()))
    };
    let (grpc, admin) = match &files.ca {
        None => (
            builder()?.with_no_client_auth(),
            builder()?.with_no_client_auth(),
        ),
        Some(ca) => {
            let ca_pem = ca.as_ref().map_err(|e| TlsError::new(CA, e))?;
            let mut roots = RootCertStore::empty();
            for root in certificates(ca_pem).map_err(|e| TlsError::new(CA, e))? {
                roots
                    .add(root)
                    .map_err(|e| TlsError::new(CA, format!("not a CA certificate: {e}")))?;
            }
            let roots = Arc::new(roots);
            let webpki =
                WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                    .build()
                    .map_err(|e| TlsError::new(CA, e.to_string()))?;
            let verifier: Arc<dyn ClientCertVerifier> = if config.allowed_client_sans.is_empty() {
                webpki
            } else {
                Arc::new(SanAllowList {
                    inner: webpki,
                    allowed: config.allowed_client_sans.clone(),
                })
            };
            // The admin port: a certificate, if presented, must chain to the same roots; none
            // at all is let through to be judged by its bearer token.
            let optional = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::new(CA, e.to_string()))?;
            (
                builder()?.with_client_cert_verifier(verifier),
                builder()?.with_client_cert_verifier(optional),
            )
        }
    };
    let mut server = grpc.with_cert_resolver(Arc::new(SingleCertAndKey::from(certified.clone())));
    // gRPC is HTTP/2: a client that offers ALPN must offer h2.
    server.alpn_protocols = vec![b"h2".to_vec()];
    let mut admin = admin.with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    // gRPC and REST on one port: h2, or HTTP/1.1 for REST clients that offer only that.
    admin.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Loaded {
        server: Arc::new(server),
        admin: Arc::new(admin),
        info,
        files,
    })
}

/// Every certificate in a PEM text, at least one.
fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate file: {e}"))?;
    if certs.is_empty() {
        return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into());
    }
    Ok(certs)
}

fn cert_info(leaf: &CertificateDer<'_>) -> Result<CertInfo, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("the first certificate does not parse: {e}"))?;
    Ok(CertInfo {
        serial: cert.raw_serial_as_string(),
        subject: cert.subject().to_string(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// The URI and DNS subject alternative names of a certificate.
pub(crate) fn subject_alt_names(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(cert) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

/// A client certificate verified as webpki does, that must also carry an allowed SAN.
#[derive(Debug)]
struct SanAllowList {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<String>,
}

impl SanAllowList {
    fn allows(&self, names: &[String]) -> bool {
        first_allowed(&self.allowed, names).is_some()
    }
}

/// The first of a certificate's `names` that `allowed` lists: URIs compare exactly, DNS names
/// without regard to case.
pub(crate) fn first_allowed<'a>(allowed: &[String], names: &'a [String]) -> Option<&'a str> {
    names
        .iter()
        .find(|name| {
            allowed.iter().any(|a| {
                if a.contains(':') {
                    a == *name
                } else {
                    a.eq_ignore_ascii_case(name)
                }
            })
        })
        .map(String::as_str)
}

impl ClientCertVerifier for SanAllowList {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.allows(&subject_alt_names(end_entity)) {
            Ok(verified)
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(sans: &[&str]) -> GrpcTlsConfig {
        GrpcTlsConfig {
            cert_file: Some("c.pem".into()),
            key_file: Some("k.pem".into()),
            client_ca_file: Some("ca.pem".into()),
            allowed_client_sans: sans.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn settings_that_cannot_work_are_named() {
        GrpcTlsConfig::default().validate().unwrap();
        config(&["spiffe://cluster.local/ns/edge/sa/envoy", "envoy.edge.svc"])
            .validate()
            .unwrap();
        let field = |c: GrpcTlsConfig| c.validate().unwrap_err().field;
        assert_eq!(
            field(GrpcTlsConfig {
                key_file: None,
                ..config(&[])
            }),
            "grpc_tls.key_file"
        );
        assert_eq!(
            field(GrpcTlsConfig {
                cert_file: None,
                ..config(&[])
            }),
            "grpc_tls.cert_file"
        );
        assert_eq!(
            field(GrpcTlsConfig {
                cert_file: None,
                key_file: None,
                ..config(&[])
            }),
            "grpc_tls.client_ca_file"
        );
        assert_eq!(
            field(GrpcTlsConfig {
                client_ca_file: None,
                ..config(&["a.b"])
            }),
            "grpc_tls.allowed_client_sans"
        );
        assert_eq!(
            field(config(&["ok.example", "has space"])),
            "grpc_tls.allowed_client_sans[1]"
        );
        assert_eq!(
            field(config(&["*.example"])),
            "grpc_tls.allowed_client_sans[0]"
        );
        assert_eq!(field(config(&[""])), "grpc_tls.allowed_client_sans[0]");
    }

    #[test]
    fn the_allow_list_compares_uris_exactly_and_dns_names_without_case() {
        let list = SanAllowList {
            inner: WebPkiClientVerifier::no_client_auth(),
            allowed: vec![
                "spiffe://cluster.local/ns/edge/sa/envoy".into(),
                "Envoy.Edge.svc".into(),
            ],
        };
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(list.allows(&names(&["spiffe://cluster.local/ns/edge/sa/envoy"])));
        assert!(list.allows(&names(&["other", "envoy.edge.svc"])));
        assert!(!list.allows(&names(&["spiffe://cluster.local/ns/edge/sa/envoy2"])));
        assert!(!list.allows(&names(&["SPIFFE://cluster.local/ns/edge/sa/envoy"])));
        assert!(!list.allows(&names(&["edge.svc"])));
        assert!(!list.allows(&[]));
    }
}
