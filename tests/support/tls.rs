//! Certificates made here by rcgen, and a TLS upstream that records what each connection presented (SNI, client
//! certificate) and which connection carried each request.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

/// A certificate authority.
pub struct Ca {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    cert: rcgen::Certificate,
}

/// A certificate signed by a [`Ca`], with its key.
pub struct Leaf {
    pub cert: rcgen::Certificate,
    pub key: rcgen::KeyPair,
}

impl Ca {
    /// A new CA whose common name is `name`.
    pub fn new(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Ca { params, key, cert }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    pub fn der(&self) -> CertificateDer<'static> {
        CertificateDer::from(self.cert.der().to_vec())
    }

    /// A certificate for `names` (DNS names or IP addresses) with common name `cn`, `edit` applied to its params.
    pub fn leaf_with(&self, cn: &str, names: &[&str], edit: impl FnOnce(&mut rcgen::CertificateParams)) -> Leaf {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        edit(&mut params);
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        Leaf { cert: params.signed_by(&key, &issuer).unwrap(), key }
    }

    /// A server certificate for `names`.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        self.leaf_with(names.first().copied().unwrap_or("leaf"), names, |_| {})
    }

    /// A client certificate with common name `cn`.
    pub fn client(&self, cn: &str) -> Leaf {
        self.leaf_with(cn, &[], |params| {
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        })
    }
}

impl Leaf {
    /// A self-signed client certificate with common name `cn` (RFC 8705 §2.2: registered with the IdP as is).
    pub fn self_signed(cn: &str) -> Leaf {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        Leaf { cert: params.self_signed(&key).unwrap(), key }
    }

    /// The certificate's SHA-256 thumbprint, base64url without padding: `x5t#S256` (RFC 8705 §3.1).
    pub fn thumbprint(&self) -> String {
        use base64::Engine as _;
        use sha2::Digest as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(self.cert.der()))
    }

    /// Writes `NAME.crt` and `NAME.key` into `dir` (replacing them by rename, as a rotation does).
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
        write_atomically(&cert, &self.cert.pem());
        write_atomically(&key, &self.key.serialize_pem());
        (cert, key)
    }

    fn der(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let cert = CertificateDer::from(self.cert.der().to_vec());
        (vec![cert], PrivateKeyDer::try_from(self.key.serialize_der()).unwrap())
    }
}

/// Replaces `path` with `text` by writing a temporary file and renaming it over `path`.
pub fn write_atomically(path: &Path, text: &str) {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

/// What the upstream saw of one request.
#[derive(Debug, Clone)]
pub struct TlsSeen {
    /// The connection it came on (numbered from 1 in accept order).
    pub connection: usize,
    /// The SNI the client sent.
    pub sni: Option<String>,
    /// The common name of the client certificate presented, if any.
    pub client_cn: Option<String>,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// The `Authorization` header.
    pub authorization: String,
    /// Every `Host` header of the request, in order (an h2 request names its host in `:authority` and should
    /// carry no `Host`: nginx before 1.25 answers 400 to both at once).
    pub hosts: Vec<String>,
    /// The request's `:authority` (h2) or the authority of its target.
    pub authority: Option<String>,
}

/// A TLS upstream on 127.0.0.1 offering h2 and http/1.1; answers 401 to `Bearer tok-1`, else 200 with
/// `VERSION AUTHORIZATION`. Its certificate and the client CAs it requires can be replaced while it runs.
pub struct TlsUpstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<TlsSeen>>>,
    config: Arc<Mutex<Arc<rustls::ServerConfig>>>,
}

/// A server config presenting `leaf`, requiring a client certificate from one of `client_cas` when there are any.
pub fn server_config(leaf: &Leaf, client_cas: &[&Ca]) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = if client_cas.is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        for ca in client_cas {
            roots.add(ca.der()).unwrap();
        }
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build().unwrap();
        builder.with_client_cert_verifier(verifier)
    };
    let (certs, key) = leaf.der();
    let mut config = builder.with_single_cert(certs, key).unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

/// The common name of a certificate made here.
pub fn common_name(der: &CertificateDer<'_>) -> Option<String> {
    // The test certificates' only common name is the last printable string of their subject; a DER scan for the
    // CN attribute (OID 2.5.4.3) finds it without an X.509 parser.
    let bytes = der.as_ref();
    let oid = [0x06, 0x03, 0x55, 0x04, 0x03];
    let at = bytes.windows(oid.len()).rposition(|w| w == oid)? + oid.len();
    let len = *bytes.get(at + 1)? as usize;
    String::from_utf8(bytes.get(at + 2..at + 2 + len)?.to_vec()).ok()
}

impl TlsUpstream {
    /// Serves with `leaf`, requiring a client certificate from one of `client_cas` when there are any.
    pub async fn start(leaf: &Leaf, client_cas: &[&Ca]) -> TlsUpstream {
        let config = Arc::new(Mutex::new(server_config(leaf, client_cas)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (log, current) = (Arc::clone(&seen), Arc::clone(&config));
        let connections = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&current.lock().unwrap()));
                let log = Arc::clone(&log);
                let connection = connections.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else { return };
                    let (_, session) = tls.get_ref();
                    let sni = session.server_name().map(str::to_owned);
                    let client_cn = session.peer_certificates().and_then(|certs| common_name(certs.first()?));
                    let service = service_fn(move |request: Request<Incoming>| {
                        let log = Arc::clone(&log);
                        let (sni, client_cn) = (sni.clone(), client_cn.clone());
                        async move {
                            let authorization = request
                                .headers()
                                .get("authorization")
                                .map(|v| v.to_str().unwrap().to_owned())
                                .unwrap_or_default();
                            let version = format!("{:?}", request.version());
                            let hosts = request
                                .headers()
                                .get_all("host")
                                .iter()
                                .map(|v| v.to_str().unwrap().to_owned())
                                .collect();
                            let authority = request.uri().authority().map(|a| a.as_str().to_owned());
                            log.lock().unwrap().push(TlsSeen {
                                hosts,
                                authority,
                                connection,
                                sni,
                                client_cn,
                                version: version.clone(),
                                authorization: authorization.clone(),
                            });
                            let status =
                                if authorization == "Bearer tok-1" { StatusCode::UNAUTHORIZED } else { StatusCode::OK };
                            let mut response =
                                Response::new(Full::new(Bytes::from(format!("{version} {authorization}"))));
                            *response.status_mut() = status;
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        TlsUpstream { addr, seen, config }
    }

    /// From now on, new connections get `leaf` and must present a certificate from one of `client_cas`.
    pub fn replace(&self, leaf: &Leaf, client_cas: &[&Ca]) {
        *self.config.lock().unwrap() = server_config(leaf, client_cas);
    }

    /// From now on, new connections are offered `http/1.1` alone by ALPN.
    pub fn offer_http1_only(&self) {
        let mut config = self.config.lock().unwrap();
        let mut http1 = rustls::ServerConfig::clone(&config);
        http1.alpn_protocols = vec![b"http/1.1".to_vec()];
        *config = Arc::new(http1);
    }

    pub fn seen(&self) -> Vec<TlsSeen> {
        self.seen.lock().unwrap().clone()
    }
}
