//! Certificates made in the test with rcgen: [`TestCa`] signs [`Pair`]s for servers (tollgate,
//! PostgreSQL) and clients (Envoy with a SPIFFE ID, the test's own gRPC clients), written as PEM
//! files; and the client side of TLS: a gRPC [`Channel`] over mTLS, one bare handshake
//! ([`served_certificate`]) that tells which certificate a new connection gets, and one
//! HTTP/1.1 request over it ([`https_request`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use tokio_rustls::rustls;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// The name tollgate's test certificates are for, and that clients ask for (SNI).
pub const SERVER_NAME: &str = "tollgate";

/// The SPIFFE ID the test's Envoy (and trusted clients) present.
pub const ENVOY_SPIFFE_ID: &str = "spiffe://cluster.local/ns/edge/sa/envoy";

/// A certificate authority of the test's own.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

/// A certificate and its private key, as PEM.
#[derive(Clone)]
pub struct Pair {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for `SERVER_NAME`, `localhost` and 127.0.0.1, with this serial.
    pub fn server(&self, serial: u64) -> Pair {
        self.leaf(
            &[SERVER_NAME, "localhost", "127.0.0.1"],
            &[],
            serial,
            ExtendedKeyUsagePurpose::ServerAuth,
            SERVER_NAME,
        )
    }

    /// A client certificate carrying these URI SANs (and no DNS name), with common name `cn`.
    pub fn client(&self, cn: &str, uris: &[&str]) -> Pair {
        self.leaf(&[], uris, 1, ExtendedKeyUsagePurpose::ClientAuth, cn)
    }

    fn leaf(
        &self,
        names: &[&str],
        uris: &[&str],
        serial: u64,
        usage: ExtendedKeyUsagePurpose,
        cn: &str,
    ) -> Pair {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI((*uri).try_into().unwrap()));
        }
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.serial_number = Some(SerialNumber::from(serial));
        params.not_after = rcgen::date_time_ymd(2040, 1, 1);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Writes the CA certificate to `dir/NAME`; returns the path.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        write(dir, name, &self.pem)
    }
}

impl Pair {
    /// Writes `dir/NAME.crt` and `dir/NAME.key`; returns their paths.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        (
            write(dir, &format!("{name}.crt"), &self.cert_pem),
            write(dir, &format!("{name}.key"), &self.key_pem),
        )
    }

    /// The certificate, DER.
    pub fn cert_der(&self) -> Vec<u8> {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .unwrap()
            .to_vec()
    }
}

/// Writes `contents` to `dir/name` (through a temporary file and a rename, as a renewal does).
pub fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

/// The serial number of a DER certificate, as x509-parser writes it (`02`, `1a:2b`).
pub fn serial_of(der: &[u8]) -> String {
    x509_parser::parse_x509_certificate(der)
        .unwrap()
        .1
        .raw_serial_as_string()
}

/// A gRPC channel to tollgate at `addr` over TLS, trusting `ca` and presenting `identity`.
/// Connects at once; a refused handshake is the error.
pub async fn tls_channel(
    addr: SocketAddr,
    ca: &str,
    identity: Option<&Pair>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(SERVER_NAME);
    if let Some(pair) = identity {
        tls = tls.identity(Identity::from_pem(&pair.cert_pem, &pair.key_pem));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
}

/// A rustls client configuration trusting `ca`, presenting `identity`, offering `alpn`.
fn client_config(ca: &str, identity: Option<&Pair>, alpn: &[&[u8]]) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some(pair) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(pair.cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// A TLS connection to tollgate at `addr` (as `SERVER_NAME`), or why the handshake failed.
async fn connect(
    addr: SocketAddr,
    config: rustls::ClientConfig,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    use rustls::pki_types::ServerName;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    connector
        .connect(ServerName::try_from(SERVER_NAME).unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())
}

/// One TLS handshake with tollgate at `addr` (ALPN h2), trusting `ca`, presenting `identity`:
/// the certificate it served, or why the handshake failed.
pub async fn served_certificate(
    addr: SocketAddr,
    ca: &str,
    identity: Option<&Pair>,
) -> Result<Vec<u8>, String> {
    let attempt = async {
        let mut tls = connect(addr, client_config(ca, identity, &[b"h2"])).await?;
        // TLS 1.3: the server judges the client's certificate after the client is done, so a
        // refusal arrives as an alert on the first read. Read once to hear it.
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(500), tls.read(&mut buf)).await {
            Ok(Err(e)) => return Err(e.to_string()),
            Ok(Ok(0)) => return Err("closed by the server".into()),
            _ => {}
        }
        let (_, session) = tls.get_ref();
        Ok(session.peer_certificates().unwrap()[0].to_vec())
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .map_err(|_| "no handshake within 10 s".to_string())?
}

/// An HTTP/1.1 answer: status, headers, body.
#[derive(Debug, Clone)]
pub struct HttpsAnswer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

/// One HTTP/1.1 request over TLS to tollgate at `addr` (ALPN `http/1.1`), trusting `ca` and
/// presenting `identity`, with these headers and body; the answer, or why there was none (a
/// refused handshake, a closed connection). (reqwest is built without TLS here, to keep the
/// dependency tree as tollgate's.)
pub async fn https_request(
    addr: SocketAddr,
    ca: &str,
    identity: Option<&Pair>,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Option<&[u8]>,
) -> Result<HttpsAnswer, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut tls = connect(addr, client_config(ca, identity, &[b"http/1.1"])).await?;
        let mut request =
            format!("{method} {path} HTTP/1.1\r\nhost: {SERVER_NAME}\r\nconnection: close\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        let body = body.unwrap_or_default();
        request.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
        let mut bytes = request.into_bytes();
        bytes.extend_from_slice(body);
        tls.write_all(&bytes).await.map_err(|e| e.to_string())?;
        let mut answer = Vec::new();
        tls.read_to_end(&mut answer)
            .await
            .map_err(|e| e.to_string())?;
        parse_http1(&answer)
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .map_err(|_| "no answer within 10 s".to_string())?
}

/// An HTTP/1.1 response as read to the end of its connection (a chunked body decoded).
fn parse_http1(raw: &[u8]) -> Result<HttpsAnswer, String> {
    use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no HTTP response: {:?}", String::from_utf8_lossy(raw)))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|e| e.to_string())?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line in {head:?}"))?;
    let mut headers = HeaderMap::new();
    for line in lines {
        let (name, value) = line.split_once(':').ok_or("a header without ':'")?;
        headers.append(
            HeaderName::from_bytes(name.trim().as_bytes()).map_err(|e| e.to_string())?,
            HeaderValue::from_str(value.trim()).map_err(|e| e.to_string())?,
        );
    }
    let mut body = raw[split + 4..].to_vec();
    if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"))
    {
        let (mut rest, mut decoded) = (&body[..], Vec::new());
        loop {
            let end = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or("a chunk without its size line")?;
            let size = std::str::from_utf8(&rest[..end]).map_err(|e| e.to_string())?;
            let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|e| e.to_string())?;
            if size == 0 {
                break;
            }
            let chunk = rest
                .get(end + 2..end + 2 + size)
                .ok_or("a chunk cut short")?;
            decoded.extend_from_slice(chunk);
            rest = &rest[(end + 4 + size).min(rest.len())..];
        }
        body = decoded;
    }
    Ok(HttpsAnswer {
        status,
        headers,
        body,
    })
}
