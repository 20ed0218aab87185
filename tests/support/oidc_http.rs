//! HTTP and small helpers for the tests against a real OpenID provider (see `oidc.rs`, which re-exports
//! everything here): the shapes of what the provider's control API answers, a plain HTTP/1 client with a
//! timeout on every exchange, polling, TOML quoting, free ports, hashing.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::future::Future;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::HeaderMap;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde_json::Value;

/// Upper bound for one HTTP exchange made by a test.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(15);
/// Interval between two polls of a condition (readiness, counters).
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

// ---- what the provider's control API answers -------------------------------------------------------

/// Counts of /token calls the provider saw for one client_id.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenCalls {
    /// All calls.
    pub calls: u64,
    /// Calls answered 2xx.
    pub ok: u64,
    /// Calls the provider refused (4xx/5xx), injected failures excluded.
    pub error: u64,
    /// Calls answered with a failure injected through `/_test/fail`.
    pub injected: u64,
}

/// A refresh token made by `POST /_test/seed-refresh-token`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct SeededRefreshToken {
    /// The token.
    pub refresh_token: String,
    /// Its SHA-256, hex (how the provider's stats name it).
    pub sha256: String,
    /// The Grant it belongs to.
    pub grant_id: String,
}

/// The provider's view of the refresh_token grant calls (before any injected failure replaced an answer).
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct RefreshStats {
    /// All calls with grant_type=refresh_token.
    pub calls: u64,
    /// Calls that rotated the token and issued an access token.
    pub ok: u64,
    /// Calls answered invalid_grant.
    pub invalid_grant: u64,
    /// Calls answered with another error.
    pub other_error: u64,
    /// Presentations of a refresh token an earlier call had already redeemed.
    pub reused: u64,
    /// Presentations of a refresh token this provider never issued.
    pub unknown: u64,
    /// Every call, in order.
    pub log: Vec<RefreshCall>,
}

/// One refresh_token grant call as the provider saw it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct RefreshCall {
    /// SHA-256 of the presented refresh token.
    pub sha256: Option<String>,
    /// HTTP status the provider answered.
    pub status: u16,
    /// `error` of the answer.
    pub error: Option<String>,
    /// oidc-provider's own reason (`error_detail`), e.g. "refresh token already used".
    pub detail: Option<String>,
    /// The Grant the token belonged to, when the provider found it.
    pub grant_id: Option<String>,
    /// Whether the presented token had already been redeemed.
    pub reused: bool,
    /// SHA-256 of the refresh token issued in exchange.
    pub rotated_to: Option<String>,
}

impl RefreshStats {
    /// Only the calls on tokens of `grant_id` (a seed's or a device login's session).
    pub fn for_grant(&self, grant_id: &str) -> RefreshStats {
        let log: Vec<RefreshCall> =
            self.log.iter().filter(|c| c.grant_id.as_deref() == Some(grant_id)).cloned().collect();
        let count = |f: &dyn Fn(&RefreshCall) -> bool| log.iter().filter(|c| f(c)).count() as u64;
        RefreshStats {
            calls: log.len() as u64,
            ok: count(&|c| c.status == 200),
            invalid_grant: count(&|c| c.error.as_deref() == Some("invalid_grant")),
            other_error: count(&|c| c.status != 200 && c.error.as_deref() != Some("invalid_grant")),
            reused: count(&|c| c.reused),
            unknown: 0,
            log,
        }
    }

    /// The successful calls, in order.
    pub fn redemptions(&self) -> Vec<&RefreshCall> {
        self.log.iter().filter(|c| c.status == 200).collect()
    }

    /// Asserts that the successful calls form one chain from `first` (SHA-256 of the refresh token the
    /// first one presented): each presents the token the previous one issued, and none presents a token
    /// twice. Returns the SHA-256 of the newest token.
    pub fn assert_chain_from(&self, first: &str) -> String {
        let mut expected = first.to_owned();
        let mut presented = std::collections::HashSet::new();
        for (i, call) in self.redemptions().into_iter().enumerate() {
            let sha = call.sha256.clone().unwrap_or_default();
            assert_eq!(sha, expected, "redemption #{i} did not present the newest refresh token: {self:#?}");
            assert!(presented.insert(sha), "redemption #{i} presented a refresh token twice: {self:#?}");
            expected = call.rotated_to.clone().unwrap_or_else(|| panic!("redemption #{i} did not rotate: {self:#?}"));
        }
        expected
    }
}

/// `application/x-www-form-urlencoded` of `pairs`.
pub fn form_urlencoded_pairs(pairs: &[(&str, &str)]) -> String {
    let mut form = form_urlencoded::Serializer::new(String::new());
    for (key, value) in pairs {
        form.append_pair(key, value);
    }
    form.finish()
}

/// `Basic base64(id:secret)` (RFC 6749 §2.3.1; the test clients' ids and secrets need no escaping).
pub fn basic_auth(id: &str, secret: &str) -> String {
    use base64::Engine as _;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}")))
}

/// SHA-256 of `text`, hex (as the provider's stats and tokenproxy's `seed_sha256` name tokens).
pub fn sha256_hex(text: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

// ---- config helpers ------------------------------------------------------------------------------

/// Quotes `s` as a TOML basic string.
pub fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A free port on 127.0.0.1 at the time of the call (bound to port 0, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0: {e}"))
}

// ---- HTTP ----------------------------------------------------------------------------------------

/// An answer, fully read.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status code.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Reply {
    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; panics with the body if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}), status {}: {}", self.status, self.text()))
    }

    /// A header's value, if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// An HTTP/1 client (hyper-util's pooled legacy client) with a timeout on every exchange; `https` URLs only with
/// [`HttpClient::trusting`].
#[derive(Clone)]
pub struct HttpClient {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpClient {
    /// A client whose idle connections are dropped after a second, well before any server here would
    /// close them under it.
    pub fn new() -> HttpClient {
        Self::with_roots(rustls::RootCertStore::empty())
    }

    /// Like [`HttpClient::new`], and for `https` URLs trusting the CA certificates in the PEM file `ca_file` (only).
    pub fn trusting(ca_file: &std::path::Path) -> HttpClient {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca_file).expect("CA file") {
            roots.add(cert.expect("CA certificate")).expect("CA certificate");
        }
        Self::with_roots(roots)
    }

    fn with_roots(roots: rustls::RootCertStore) -> HttpClient {
        let tls =
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
        let connector =
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().build();
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(1))
            .build(connector);
        HttpClient { client }
    }

    /// One exchange; `Err` on a connection error, a malformed URL or a timeout.
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
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| format!("{e:?}"))?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await.map_err(|e| format!("reading body: {e}"))?.to_bytes();
            Ok(Reply { status: parts.status, headers: parts.headers, body })
        };
        tokio::time::timeout(HTTP_TIMEOUT, exchange).await.map_err(|_| format!("no answer within {HTTP_TIMEOUT:?}"))?
    }

    /// `GET`, panicking on a transport error.
    pub async fn get(&self, url: &str) -> Reply {
        self.try_send(Method::GET, url, &[], Bytes::new()).await.unwrap_or_else(|e| panic!("GET {url}: {e}"))
    }

    /// `POST` with `body`, panicking on a transport error.
    pub async fn post(&self, url: &str, body: Bytes) -> Reply {
        self.try_send(Method::POST, url, &[], body).await.unwrap_or_else(|e| panic!("POST {url}: {e}"))
    }

    /// `GET` expecting 200 and a JSON body.
    pub async fn get_json(&self, url: &str) -> Value {
        let reply = self.get(url).await;
        assert_eq!(reply.status, StatusCode::OK, "GET {url}: {}", reply.text());
        reply.json()
    }
}

// ---- waiting -------------------------------------------------------------------------------------

/// Polls `probe` every [`POLL_INTERVAL`] until it returns `Some`, and returns that; panics naming
/// `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
