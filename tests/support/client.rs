//! The one HTTP client of the tests: hyper-util's pooled HTTP/1.1 client (with `https` for a CA the test trusts) and
//! a timeout on every exchange; and a raw exchange of bytes, for requests no client would send.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The default bound of one exchange ([`Client::with_timeout`] changes it).
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(60);

/// A response read whole.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; panics with the status and body if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}), status {}: {}", self.status, self.text()))
    }

    /// A header's value, if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// An HTTP/1.1 client: pooled (up to 1,024 idle connections a host, each dropped after a second idle, well before a
/// server here would close it under the client), `https` URLs only with [`Client::trusting`].
#[derive(Clone)]
pub struct Client {
    inner: hyper_util::client::legacy::Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

impl Default for Client {
    fn default() -> Self {
        Self::new()
    }
}

impl Client {
    pub fn new() -> Client {
        Self::with_roots(rustls::RootCertStore::empty())
    }

    /// Like [`Client::new`], and for `https` URLs trusting the CA certificates in the PEM file `ca_file` (only).
    pub fn trusting(ca_file: &Path) -> Client {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca_file).expect("CA file") {
            roots.add(cert.expect("CA certificate")).expect("CA certificate");
        }
        Self::with_roots(roots)
    }

    /// The same client with another bound on each exchange.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    fn with_roots(roots: rustls::RootCertStore) -> Client {
        let tls =
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
        let connector =
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().build();
        let inner = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(1))
            .pool_max_idle_per_host(1024)
            .build(connector);
        Client { inner, timeout: HTTP_TIMEOUT }
    }

    /// One exchange; `Err` on a connection error or a timeout.
    pub async fn try_request(&self, request: Request<Full<Bytes>>) -> Result<Reply, String> {
        let exchange = async {
            let response = self.inner.request(request).await.map_err(|e| format!("{e:?}"))?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await.map_err(|e| format!("reading the body: {e}"))?.to_bytes();
            Ok(Reply { status: parts.status.as_u16(), headers: parts.headers, body })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| format!("no answer within {:?}", self.timeout))?
    }

    /// One exchange of `method` on `url` with `headers` and `body`; `Err` on a malformed request, a connection error
    /// or a timeout.
    pub async fn try_send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Reply, String> {
        let mut builder = Request::builder().method(method).uri(url);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder.body(Full::new(body)).map_err(|e| format!("bad request: {e}"))?;
        self.try_request(request).await
    }

    /// One exchange, panicking on a transport error.
    pub async fn send(&self, request: Request<Full<Bytes>>) -> Reply {
        let what = format!("{} {}", request.method(), request.uri());
        self.try_request(request).await.unwrap_or_else(|e| panic!("{what}: {e}"))
    }

    /// `GET`, panicking on a transport error.
    pub async fn get(&self, url: &str) -> Reply {
        self.send(Request::get(url).body(Full::default()).expect("a GET request")).await
    }

    /// `POST` with `body`, panicking on a transport error.
    pub async fn post(&self, url: &str, body: impl Into<Bytes>) -> Reply {
        self.send(Request::post(url).body(Full::new(body.into())).expect("a POST request")).await
    }

    /// `GET` expecting 200 and a JSON body.
    pub async fn get_json(&self, url: &str) -> Value {
        let reply = self.get(url).await;
        assert_eq!(reply.status, 200, "GET {url}: {}", reply.text());
        reply.json()
    }
}

/// How long [`raw_exchange`] waits for the answer to end.
pub const RAW_WITHIN: Duration = Duration::from_secs(10);

/// Sends `request` as it is on a new connection to `addr` and reads the answer until the connection ends (the request
/// should say `Connection: close`); panics if it has not ended within [`RAW_WITHIN`].
pub async fn raw_exchange(addr: SocketAddr, request: impl AsRef<[u8]>) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_ref()).await.expect("write the request");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(RAW_WITHIN, stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    read.unwrap_or_else(|_| panic!("the answer did not end within {RAW_WITHIN:?}: {text:?}")).expect("read the answer");
    text
}
