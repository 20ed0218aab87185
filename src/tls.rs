//! rustls configurations: the optional TLS listener, and the client side for upstreams and identity providers.
//!
//! Everything uses the `ring` provider (smaller binary, builds with gcc alone). Client configs trust the webpki
//! roots plus an optional extra CA file, and can present a client certificate (mTLS to an IdP).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WantsClientCert;
use rustls::{ClientConfig, ConfigBuilder, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A TLS setup problem, naming the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A TLS server name that is neither a DNS name nor an IP address.
    #[error("server name: {0}")]
    Name(String),
    /// rustls refused the configuration (e.g. a key that does not match its certificate).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |message: String| TlsError::Pem { path: path.to_owned(), message };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_error("no PEM certificate found".into()));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem { path: path.to_owned(), message: e.to_string() })
}

/// A server config for the TLS listener, offering h2 and http/1.1 by ALPN.
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certificates(cert_file)?, private_key(key_file)?)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Where a client config's trust and identity come from.
#[derive(Debug, Default, Clone)]
pub struct ClientTls<'a> {
    /// Extra CA certificates to trust besides the webpki roots.
    pub ca_file: Option<&'a Path>,
    /// Trust only `ca_file`, not the webpki roots (a private upstream needs no public CA).
    pub only_ca_file: bool,
    /// Client certificate and key to present.
    pub client_cert: Option<(&'a Path, &'a Path)>,
}

/// A connector for HTTP and HTTPS URLs (HTTP/1.1 and h2 by ALPN) with the TLS settings `tls`, connecting within
/// `connect_timeout`: how tokenproxy reaches an IdP or a telemetry collector.
pub fn https_connector(
    tls: ClientConfig,
    connect_timeout: std::time::Duration,
) -> hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector> {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http)
}

/// A client config (webpki roots + optional CA file + optional client certificate). ALPN is left to the connector.
pub fn client_config(tls: &ClientTls<'_>) -> Result<ClientConfig, TlsError> {
    let mut roots = if tls.only_ca_file && tls.ca_file.is_some() {
        RootCertStore::empty()
    } else {
        RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() }
    };
    if let Some(ca_file) = tls.ca_file {
        for cert in certificates(ca_file)? {
            roots
                .add(cert)
                .map_err(|e| TlsError::Pem { path: ca_file.to_owned(), message: format!("bad CA certificate: {e}") })?;
        }
    }
    let builder: ConfigBuilder<ClientConfig, WantsClientCert> = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match tls.client_cert {
        Some((cert, key)) => builder.with_client_auth_cert(certificates(cert)?, private_key(key)?)?,
        None => builder.with_no_client_auth(),
    })
}

/// What identifies a file's content without reading it: a replaced file (a rename, the kubelet's symlink swap) has
/// a new inode, a rewritten one a new length or modification time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp(Vec<Option<(u64, u64, u64, std::time::SystemTime)>>);

impl FileStamp {
    /// The stamp of `paths` now (`None` for a file that cannot be looked at).
    pub fn of(paths: &[&std::path::Path]) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp(
            paths
                .iter()
                .map(|path| {
                    let m = std::fs::metadata(path).ok()?;
                    Some((m.dev(), m.ino(), m.len(), m.modified().ok()?))
                })
                .collect(),
        )
    }
}
