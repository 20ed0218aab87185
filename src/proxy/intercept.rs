//! HTTPS interception for routed hosts (docs/local-dev.md): a `CONNECT host:port` whose host the routes intercept
//! (`intercept = true`) is answered 200, and the tunnel's TLS is terminated with a leaf of the local CA
//! ([`crate::ca`]) for that host (rustls; ALPN h2 and http/1.1). The requests inside go through the proxy's request
//! lifecycle like any other ([`Proxy::handle`]), limited to that host's routes: their `Host` (or `:authority`) and the
//! TLS SNI must be the CONNECT host, else 421 ([`Proxy::admit`]). A `CONNECT` to any other host is refused (403) and
//! nothing is dialled: tokenproxy never becomes an open proxy.
//!
//! Edges: the TLS handshake must end within `server.header_read_timeout`, each request head too; a tunnel with no
//! byte either way for `server.tunnel_idle_timeout` is closed. The tunnel rides on its caller's connection, which keeps
//! its place in `server.max_connections`. Interception is offered on a loopback listener only, unless
//! `server.allow_remote_intercept` is set. Leaves are cached per host (a host the routes name, so the cache is bounded
//! by the config) and made again a day before they expire.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use time::OffsetDateTime;

use super::{Connection, Proxy, ProxyBody, ProxyError, Retried};
use crate::ca::{CaError, LocalCa};
use crate::config::Config;

/// What the proxy intercepts, and the local CA it does it with.
pub struct Interceptor {
    ca: LocalCa,
    /// The hosts the routes intercept (lowercase DNS names).
    hosts: HashSet<String>,
    /// Whether this listener may intercept (a loopback one, or `server.allow_remote_intercept`).
    offered: bool,
    /// The TLS settings of each host intercepted so far, with the expiry of its leaf.
    configs: Mutex<HashMap<String, (Arc<rustls::ServerConfig>, OffsetDateTime)>>,
    header_read_timeout: Duration,
}

impl std::fmt::Debug for Interceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interceptor").field("hosts", &self.hosts).field("offered", &self.offered).finish()
    }
}

/// A leaf is made again when it has less than this left.
const RENEW_BEFORE: time::Duration = time::Duration::days(1);

impl Interceptor {
    /// The interceptor `config` asks for: `None` when no route intercepts; the local CA of `state.dir` must exist
    /// (made by `tokenproxy ca init`, never here).
    pub fn new(config: &Config) -> Result<Option<Interceptor>, CaError> {
        let hosts: HashSet<String> = config.intercepted_hosts().into_iter().collect();
        if hosts.is_empty() {
            return Ok(None);
        }
        let ca = LocalCa::load(&config.state.dir)?;
        for refused in hosts.iter().filter_map(|host| ca.vouches_for(host).err()) {
            tracing::warn!("routes[].intercept: CONNECTs will be refused: {refused}");
        }
        Ok(Some(Interceptor {
            ca,
            hosts,
            offered: config.server.listen.ip().is_loopback() || config.server.allow_remote_intercept,
            configs: Mutex::new(HashMap::new()),
            header_read_timeout: config.server.header_read_timeout,
        }))
    }

    /// The TLS settings for `host`: its cached leaf, or a new one.
    fn tls_for(&self, host: &str) -> Result<Arc<rustls::ServerConfig>, ProxyError> {
        let mut configs = self.configs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((config, not_after)) = configs.get(host) {
            if *not_after - OffsetDateTime::now_utc() > RENEW_BEFORE {
                return Ok(Arc::clone(config));
            }
        }
        let refused = |error: CaError| ProxyError::HostNotAllowed(format!("CONNECT is refused: {error}"));
        let leaf = self.ca.issue(host).map_err(refused)?;
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(leaf.key);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|builder| builder.with_no_client_auth().with_single_cert(vec![leaf.cert], key))
            .map_err(|e| ProxyError::HostNotAllowed(format!("CONNECT is refused: the leaf for `{host}`: {e}")))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let config = Arc::new(config);
        configs.insert(host.to_owned(), (Arc::clone(&config), leaf.not_after));
        Ok(config)
    }
}

/// The host of a `CONNECT` target (`host:port`), lowercased, when it is a DNS name.
fn connect_host(request: &http::request::Parts) -> Option<String> {
    let authority = request.uri.authority()?;
    let host = authority.host();
    (!host.starts_with('[') && host.parse::<std::net::IpAddr>().is_err()).then(|| host.to_ascii_lowercase())
}

/// What a request inside an intercepted tunnel is held to ([`Proxy::admit`]).
#[derive(Debug)]
pub struct Tunnel {
    /// The host the tunnel was opened for.
    pub host: String,
    /// Whether the TLS SNI named that host (or no host).
    pub sni_matches: bool,
}

impl Proxy {
    /// Phase 1 for a `CONNECT`: its interceptor and host, when a route intercepts that host here and the local CA may
    /// vouch for it; else why it is refused (nothing is dialled either way). Makes no certificate.
    pub(super) fn intercepted(&self, request: &http::request::Parts) -> Result<(&Interceptor, String), ProxyError> {
        const NOT_A_FORWARD_PROXY: &str = "CONNECT is refused: tokenproxy is not a forward proxy";
        let Some(interceptor) = self.interceptor.as_deref() else {
            return Err(ProxyError::HostNotAllowed(NOT_A_FORWARD_PROXY.into()));
        };
        let host = connect_host(request).filter(|host| interceptor.hosts.contains(host)).ok_or_else(|| {
            ProxyError::HostNotAllowed(format!(
                "{NOT_A_FORWARD_PROXY}; only the hosts of routes with intercept = true are intercepted"
            ))
        })?;
        if !interceptor.offered {
            return Err(ProxyError::HostNotAllowed(
                "CONNECT is refused: interception is offered on a loopback listener only (server.allow_remote_intercept)"
                    .into(),
            ));
        }
        if let Err(outside) = interceptor.ca.vouches_for(&host) {
            return Err(ProxyError::HostNotAllowed(format!("CONNECT is refused: {outside}")));
        }
        Ok((interceptor, host))
    }
}

/// Serves a `CONNECT` on the proxy listener: 200 and a tunnel when the host is intercepted ([`Proxy::intercepts`]),
/// counted and logged as a request without a route; else the proxy refuses it as any request it does not route
/// ([`Proxy::admit`] says why).
pub async fn connect(
    proxies: &Arc<ArcSwap<Proxy>>,
    request: Request<Incoming>,
    connection: &Connection,
) -> Response<ProxyBody> {
    debug_assert_eq!(request.method(), Method::CONNECT);
    let proxy = proxies.load_full();
    let (mut parts, body) = request.into_parts();
    let Ok((interceptor, host)) = proxy.intercepted(&parts) else {
        return proxy.handle(Request::from_parts(parts, body), connection).await;
    };
    let mut in_flight = proxy.begin(&mut parts);
    let retried: Retried = in_flight.retried();
    let (status, mut response) = match interceptor.tls_for(&host) {
        Ok(tls) => {
            let mut request = Request::from_parts(parts, body);
            let upgraded = hyper::upgrade::on(&mut request);
            let timeouts = (interceptor.header_read_timeout, proxy.tunnel_idle_timeout);
            tokio::spawn(tunnel(Arc::clone(proxies), upgraded, host, tls, connection.peer, timeouts));
            let empty = http_body_util::Either::Right(http_body_util::Full::new(bytes::Bytes::new()));
            (StatusCode::OK, Response::new(empty))
        }
        Err(error) => (error.status(), error.into_response(&super::ErrorContext::default())),
    };
    response.headers_mut().insert(super::X_REQUEST_ID.clone(), in_flight.request_id().clone());
    proxy.end(in_flight, status, &retried);
    response
}

/// One intercepted tunnel: TLS with the host's leaf, then HTTP/1.1 or h2 (hyper) with each request served by the
/// proxy as it is when the request arrives, on a connection that knows the tunnel's host.
async fn tunnel(
    proxies: Arc<ArcSwap<Proxy>>,
    upgraded: hyper::upgrade::OnUpgrade,
    host: String,
    tls: Arc<rustls::ServerConfig>,
    peer: SocketAddr,
    (header_read_timeout, idle): (Duration, Duration),
) {
    let Ok(upgraded) = upgraded.await else { return };
    let accept = tokio_rustls::TlsAcceptor::from(tls).accept(TokioIo::new(upgraded));
    let stream = match tokio::time::timeout(header_read_timeout, accept).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            tracing::debug!(host = %host, "intercepted tunnel: TLS handshake failed: {error}");
            return;
        }
        Err(_) => {
            tracing::debug!(host = %host, "intercepted tunnel: no TLS handshake within {header_read_timeout:?}");
            return;
        }
    };
    let sni_matches = stream.get_ref().1.server_name().is_none_or(|sni| sni.eq_ignore_ascii_case(&host));
    let connection = Arc::new(Connection::in_tunnel(peer, host, sni_matches));
    let started = tokio::time::Instant::now();
    let last = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let io = super::hyper::upgrade::Noted::new(stream, started, Arc::clone(&last));
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let (proxies, connection) = (Arc::clone(&proxies), Arc::clone(&connection));
        async move {
            let proxy = proxies.load_full();
            Ok::<_, Infallible>(proxy.handle(request, &connection).await)
        }
    });
    let builder = crate::server::hyper_builder(Some(header_read_timeout));
    let served = builder.serve_connection(TokioIo::new(io), service);
    tokio::select! {
        result = served => {
            if let Err(error) = result {
                tracing::debug!("intercepted tunnel ended: {error}");
            }
        }
        () = super::hyper::upgrade::silence(started, &last, idle) => {
            tracing::debug!("intercepted tunnel closed: idle for {idle:?}");
        }
    }
}
