//! The proxy service: a request's life as a short list of phases.
//!
//! 1. [`Proxy::select_route`]: refuse CONNECT and hosts no route names (never an open proxy), find the route.
//! 2. [`Proxy::prepare`]: rewrite the request for the upstream (URI, hop-by-hop, forwarding headers) and apply the
//!    route's `incoming_authorization` rule.
//! 3. [`Proxy::credential`]: the provider's current token (the hot path), or a wait on the single token call.
//! 4. [`Proxy::forward`]: send it, keeping a replayable body when a 401 replay is possible.
//! 5. [`Proxy::replay_after_401`]: on a 401, invalidate that token generation, get the next token, replay once.
//! 6. [`Proxy::finish`]: strip hop-by-hop headers from the response and count it.
//!
//! Errors become problem+json responses in one place ([`error::ProxyError::into_parts`]).
//!
//! Two transports run these phases. Plain HTTP/1.1 requests to plain-HTTP upstreams, nearly all of a sidecar's, take
//! the direct path ([`serve_direct`], in `direct.rs`): one task per connection, heads parsed with `httparse`, the
//! upstream request written and its response forwarded as they come, with no per-request task, channel or buffer.
//! Everything else (h2, TLS upstreams, HTTP/1.0, chunked or large request bodies, `Expect`, `Upgrade`) is served by
//! hyper through [`Proxy::handle`]; a connection moves from the first to the second at the first request the
//! direct path does not take, with the bytes already read.

pub mod chunked;
mod direct;
pub mod error;
pub mod h1;
pub mod headers;
pub mod path;
pub mod replay;
pub mod route;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::HOST;
use http::request::Parts;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use tokio::time::Instant;

pub use direct::{serve as serve_direct, Ended};
pub use error::{ErrorContext, ProxyBody, ProxyError};
use replay::{Replay, ReplayBody};
use route::{Injection, Lookup, Route, RouteTable};
pub use upstream::{UpstreamAffinity, UpstreamBody, UpstreamClient};

use crate::config::IncomingAuthorization;
use crate::metrics::{ReplayOutcome, RouteMetrics};
use crate::token::Token;

/// What the proxy knows of the connection a request came on.
pub struct Connection {
    /// The caller's address.
    pub peer: SocketAddr,
    /// Whether it came over the TLS listener.
    pub tls: bool,
    /// The dedicated upstream connection of this (HTTP/1.1) connection.
    pub upstream: UpstreamAffinity,
    /// The peer's address as an `X-Forwarded-For` value, made once.
    forwarded_for: HeaderValue,
}

impl Connection {
    /// A new downstream connection from `peer`.
    pub fn new(peer: SocketAddr, tls: bool) -> Connection {
        let forwarded_for = headers::peer_value(peer.ip());
        Connection { peer, tls, upstream: UpstreamAffinity::default(), forwarded_for }
    }
}

/// Settings that apply to every request.
#[derive(Debug, Clone, Copy)]
pub struct ProxyOptions {
    /// Request bodies up to this size are kept for a replay after a 401.
    pub replay_buffer: usize,
    /// The whole upstream exchange (and its replay) must have its response head within this.
    pub request_timeout: Duration,
    /// One access-log line per request.
    pub access_log: bool,
}

/// The reverse proxy: routes, the upstream client and the limits that apply to every request.
pub struct Proxy {
    table: RouteTable,
    client: Arc<UpstreamClient>,
    replay_buffer: usize,
    request_timeout: Duration,
    access_log: bool,
    unrouted: RouteMetrics,
}

/// What the upstream URI is built from, besides the route.
struct Target {
    /// The caller's URI: its path and query.
    original: http::Uri,
    /// The query to send instead of the caller's (when the caller's own token parameter was removed).
    query: Option<String>,
    /// Attach our token (false when the route keeps the caller's own credential, or has no provider).
    attach: bool,
}

/// A request's bookkeeping from its arrival to its answer.
struct Exchange {
    started: Instant,
    request_id: HeaderValue,
    /// Method and path for the access log, when it is on.
    logged: Option<(Method, String)>,
}

/// The first attempt of a request that got a 401.
struct Attempt<'a> {
    token: &'a Token,
    replay: Replay,
    response: Response<Incoming>,
    /// The request's deadline, which the replay shares.
    deadline: Instant,
    /// The connection the replay goes over.
    affinity: Option<&'a UpstreamAffinity>,
}

impl Proxy {
    /// A proxy over `table`.
    pub fn new(table: RouteTable, client: Arc<UpstreamClient>, options: ProxyOptions, unrouted: RouteMetrics) -> Proxy {
        Proxy {
            table,
            client,
            replay_buffer: options.replay_buffer,
            request_timeout: options.request_timeout,
            access_log: options.access_log,
            unrouted,
        }
    }

    /// Serves one request; never fails (errors are responses).
    pub async fn handle(&self, request: Request<Incoming>, connection: &Connection) -> Response<ProxyBody> {
        let (mut parts, body) = request.into_parts();
        let exchange = self.begin(&mut parts);
        let mut replayed = false;
        let (route, mut response) = match self.admit(&mut parts) {
            Ok(route) => {
                route.metrics.inflight.inc();
                let response = match self.serve(route, parts, body, connection, exchange.started, &mut replayed).await {
                    Ok(response) => response,
                    Err(error) => Self::error_response(route, error),
                };
                (Some(route), response)
            }
            Err(error) => {
                // A request refused before routing may be malformed: where the next one starts is not known.
                let close = matches!(error, ProxyError::BadRequest(_)) && parts.version < Version::HTTP_2;
                let mut response = error.into_response(&ErrorContext::default());
                if close {
                    response.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
                }
                (None, response)
            }
        };
        response.headers_mut().insert(X_REQUEST_ID.clone(), exchange.request_id.clone());
        self.end(exchange, route, response.status(), replayed);
        response
    }

    /// The bookkeeping of a request that starts: its id (taken from the caller or made), and what the access log
    /// will need.
    fn begin(&self, parts: &mut Parts) -> Exchange {
        let started = Instant::now();
        let request_id = request_id(&mut parts.headers);
        // Kept for the access log only: the path without its query (which may carry a token).
        let access_log = self.access_log && tracing::enabled!(target: "access", tracing::Level::INFO);
        let logged = access_log.then(|| (parts.method.clone(), parts.uri.path().to_owned()));
        Exchange { started, request_id, logged }
    }

    /// The bookkeeping of a request answered with `status`: metrics (the route's `inflight` was raised when its
    /// route was found) and the access log.
    fn end(&self, exchange: Exchange, route: Option<&Route>, status: StatusCode, replayed: bool) {
        match route {
            Some(route) => {
                let metrics = &route.metrics;
                metrics.inflight.dec();
                metrics.count_status(status);
                metrics.duration.observe(exchange.started.elapsed().as_secs_f64());
            }
            None => self.unrouted.count_status(status),
        }
        if let Some((method, path)) = exchange.logged {
            tracing::info!(
                target: "access",
                route = route.map_or("-", |r| &r.name),
                method = %method,
                path = %path,
                status = status.as_u16(),
                duration_ms = exchange.started.elapsed().as_secs_f64() * 1000.0,
                upstream = route.map_or("-", |r| r.upstream_authority()),
                replayed,
                request_id = exchange.request_id.to_str().unwrap_or("-"),
                "request"
            );
        }
    }

    /// The problem+json answer to an error serving a request on `route`.
    fn error_response(route: &Route, error: ProxyError) -> Response<ProxyBody> {
        let context = Self::error_context(Some(route), &error);
        error.into_response(&context)
    }

    /// What the answer to `error` names: the route and its provider, when the request had a route (then the error
    /// is logged at debug level).
    fn error_context(route: Option<&Route>, error: &ProxyError) -> ErrorContext {
        let Some(route) = route else { return ErrorContext::default() };
        tracing::debug!(route = %route.name, code = error.code(), "proxy error: {}", error_detail(error));
        ErrorContext { route: Some(Arc::clone(&route.name)), provider: route.provider.clone() }
    }

    /// Phase 1, the request filter: the method and path policy, then routing. CONNECT and hosts no route names are
    /// refused (never an open proxy); TRACE and TRACK are never forwarded (they echo the token back); two `Host`
    /// headers are refused; dot segments are removed from the path before routing ([`path`]), and the normalised
    /// path is the one forwarded.
    fn admit(&self, request: &mut Parts) -> Result<&Route, ProxyError> {
        let method = request.method.as_str();
        if method.eq_ignore_ascii_case("TRACE") || method.eq_ignore_ascii_case("TRACK") {
            return Err(ProxyError::MethodNotAllowed(method.to_owned()));
        }
        if request.headers.get_all(HOST).iter().nth(1).is_some() {
            return Err(ProxyError::BadRequest("more than one Host header".into()));
        }
        let normalized = path::remove_dot_segments(request.uri.path())
            .map_err(|e| ProxyError::BadRequest(format!("path refused: {e}")))?;
        if let Some(normalized) = normalized {
            request.uri = with_path(&request.uri, &normalized)?;
        }
        let route = self.select_route(request)?;
        if route.reject_encoded_slashes && path::has_encoded_slash(request.uri.path()) {
            return Err(ProxyError::BadRequest(format!("path refused: {}", path::PathError::EncodedSlash)));
        }
        Ok(route)
    }

    /// Phase 1, routing.
    fn select_route(&self, request: &Parts) -> Result<&Route, ProxyError> {
        if request.method == Method::CONNECT {
            return Err(ProxyError::HostNotAllowed("CONNECT is refused: tokenproxy is not a forward proxy".into()));
        }
        let path = request.uri.path();
        let absolute_host = match request.version {
            // HTTP/2 always carries :authority; it plays the role of Host.
            Version::HTTP_2 => None,
            _ => request.uri.host(),
        };
        let lookup = match absolute_host {
            Some(host) => self.table.lookup_absolute(host, path),
            None => {
                let host = match request.version {
                    Version::HTTP_2 => request.uri.authority().map(|a| a.as_str()),
                    _ => request.headers.get(HOST).and_then(|h| h.to_str().ok()),
                };
                self.table.lookup_origin(host, path)
            }
        };
        match lookup {
            Lookup::Route(route) => Ok(route),
            Lookup::NoRoute => Err(ProxyError::NoRoute),
            Lookup::HostNotAllowed => {
                Err(ProxyError::HostNotAllowed("no route names this host; nothing was sent anywhere".into()))
            }
        }
    }

    async fn serve(
        &self,
        route: &Route,
        mut parts: Parts,
        body: Incoming,
        connection: &Connection,
        started: Instant,
        replayed: &mut bool,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        // HTTP/1.x callers send one request at a time: their upstream connection can be dedicated to them.
        let affinity = (parts.version != Version::HTTP_2).then_some(&connection.upstream);
        let deadline = started + self.request_timeout;
        let target = Self::prepare(route, &mut parts, connection)?;
        let token = match (&route.tokens, target.attach) {
            (Some(tokens), true) => Some(Self::credential(tokens.as_ref(), None).await?),
            _ => None,
        };
        let replayable = token.is_some() && route.retry_on_401;
        // Keep what a replay needs: the request head here (without the extensions, which hyper fills per
        // connection and which only cost allocations to copy), the body in ReplayBody.
        let saved = replayable.then(|| {
            let (mut head, ()) = Request::new(()).into_parts();
            head.method = parts.method.clone();
            head.version = parts.version;
            head.headers = parts.headers.clone();
            head
        });
        let (body, replay) = if replayable {
            let (body, replay) = ReplayBody::new(body, self.replay_buffer);
            (UpstreamBody::Kept { body }, replay)
        } else {
            (UpstreamBody::Plain { body }, Replay::none())
        };
        let upstream_request = Self::attach(route, &target, parts, token.as_deref(), body)?;
        let response = self.forward(upstream_request, deadline, affinity).await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(Self::finish(response));
        }
        route.metrics.upstream_unauthorized.inc();
        match (token, saved) {
            (Some(token), Some(parts)) => {
                let first = Attempt { token: &token, replay, response, deadline, affinity };
                // The rare path is boxed, so that every request's future stays small.
                Box::pin(self.replay_after_401(route, &target, parts, first, replayed)).await
            }
            _ => Ok(Self::finish(response)),
        }
    }

    /// Phase 2: the request as the upstream will see it, minus the token.
    fn prepare(route: &Route, parts: &mut Parts, connection: &Connection) -> Result<Target, ProxyError> {
        let original_host = match parts.version {
            Version::HTTP_2 => parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
            _ => parts
                .headers
                .get(HOST)
                .cloned()
                .or_else(|| parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok())),
        };
        let version = parts.version;
        headers::strip_hop_by_hop(&mut parts.headers);
        headers::add_forwarding(&mut parts.headers, &connection.forwarded_for, connection.tls, original_host);
        headers::append_via(&mut parts.headers, version);
        parts.headers.insert(HOST, route.host_header.clone());
        // The upstream connection's protocol is the client's business; the request head is version-neutral.
        parts.version = Version::HTTP_11;

        let caller_credential = match &route.injection {
            Injection::Query { param } => query_has(parts.uri.query(), param),
            _ => parts.headers.contains_key(&route.credential_header),
        };
        let mut attach = route.tokens.is_some();
        match route.incoming_authorization {
            IncomingAuthorization::Reject if caller_credential => {
                return Err(ProxyError::BadRequest(format!(
                    "route `{}` does not accept a caller's own credential: remove the `{}` {}",
                    route.name,
                    route.credential_header,
                    if matches!(route.injection, Injection::Query { .. }) { "query parameter" } else { "header" }
                )));
            }
            IncomingAuthorization::Keep if caller_credential => attach = false,
            _ => {}
        }
        let mut query = None;
        if attach {
            match &route.injection {
                Injection::Query { param } => query = parts.uri.query().map(|q| without_param(q, param)),
                Injection::Bearer => {
                    parts.headers.remove(http::header::AUTHORIZATION);
                }
                Injection::Header { name, .. } => {
                    parts.headers.remove(name);
                }
            }
        }
        Ok(Target { original: parts.uri.clone(), query, attach })
    }

    /// Phase 3: the token to attach: the current one, or a wait for the single token call in flight.
    async fn credential(
        tokens: &dyn crate::token::TokenSource,
        rejected: Option<u64>,
    ) -> Result<Arc<Token>, ProxyError> {
        if rejected.is_none() {
            if let Some(token) = tokens.current() {
                return Ok(token);
            }
        }
        tokens
            .obtain(rejected)
            .await
            .map_err(|e| ProxyError::TokenUnavailable { detail: e.to_string(), retry_after: e.retry_after })
    }

    /// Builds the upstream request with `token` attached as the route says.
    fn attach<B>(
        route: &Route,
        target: &Target,
        mut parts: Parts,
        token: Option<&Token>,
        body: B,
    ) -> Result<Request<B>, ProxyError> {
        let extra_query = token.and_then(|token| token_query(route, token));
        if let Some((name, value)) = token.map(|token| token_header(route, token)).transpose()?.flatten() {
            parts.headers.insert(name.clone(), value);
        }
        parts.uri = upstream_uri(route, target, extra_query.as_deref())?;
        Ok(Request::from_parts(parts, body))
    }

    /// Phase 4: one exchange with the upstream, bounded by the request's deadline.
    async fn forward(
        &self,
        request: Request<UpstreamBody>,
        deadline: Instant,
        affinity: Option<&UpstreamAffinity>,
    ) -> Result<Response<Incoming>, ProxyError> {
        match tokio::time::timeout_at(deadline, self.client.send(request, affinity)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) => Err(ProxyError::UpstreamUnreachable(error.to_string())),
            Err(_) => Err(ProxyError::UpstreamTimeout(self.request_timeout)),
        }
    }

    /// Phase 5: a 401 to a token we attached: refresh that generation (single flight) and replay once.
    async fn replay_after_401(
        &self,
        route: &Route,
        target: &Target,
        parts: Parts,
        first: Attempt<'_>,
        replayed: &mut bool,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let Some(tokens) = &route.tokens else { return Ok(Self::finish(first.response)) };
        let (deadline, affinity) = (first.deadline, first.affinity);
        let body = match tokio::time::timeout_at(deadline, first.replay.replay()).await {
            Ok(Some(body)) => body,
            _ => {
                route.metrics.replays(ReplayOutcome::NotReplayable).inc();
                return Ok(Self::finish(first.response));
            }
        };
        let Some(fresh) = Self::replacement(route, tokens.as_ref(), first.token.generation, deadline).await else {
            return Ok(Self::finish(first.response));
        };
        drop(first.response);
        *replayed = true;
        let request = Self::attach(route, target, parts, Some(&fresh), UpstreamBody::Replay { body })?;
        let response = self.forward(request, deadline, affinity).await?;
        Self::count_replay(route, response.status());
        Ok(Self::finish(response))
    }

    /// Phase 5, the token for the one replay after a 401 to generation `rejected`: a newer token, unless the 401
    /// budget refuses a refresh now or none can be had; then the upstream's own 401 is the honest answer.
    async fn replacement(
        route: &Route,
        tokens: &dyn crate::token::TokenSource,
        rejected: u64,
        deadline: Instant,
    ) -> Option<Arc<Token>> {
        match tokio::time::timeout_at(deadline, tokens.obtain(Some(rejected))).await {
            Ok(Ok(fresh)) => Some(fresh),
            Ok(Err(unavailable)) if unavailable.rate_limited => {
                route.metrics.replays(ReplayOutcome::RateLimited).inc();
                None
            }
            _ => None,
        }
    }

    /// Phase 5, after the replay: counts its outcome by the status it got.
    fn count_replay(route: &Route, status: StatusCode) {
        if status == StatusCode::UNAUTHORIZED {
            route.metrics.upstream_unauthorized.inc();
            route.metrics.replays(ReplayOutcome::StillUnauthorized).inc();
        } else {
            route.metrics.replays(ReplayOutcome::Success).inc();
        }
    }

    /// Phase 6: the upstream's response as the caller gets it.
    fn finish(response: Response<Incoming>) -> Response<ProxyBody> {
        let (mut parts, body) = response.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        Response::from_parts(parts, Either::Left(body))
    }
}

/// `uri` with its path replaced (its query kept).
fn with_path(uri: &http::Uri, path: &str) -> Result<http::Uri, ProxyError> {
    let mut parts = uri.clone().into_parts();
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    parts.path_and_query =
        Some(path_and_query.parse().map_err(|e| ProxyError::BadRequest(format!("cannot rebuild the path: {e}")))?);
    http::Uri::from_parts(parts).map_err(|e| ProxyError::BadRequest(format!("cannot rebuild the path: {e}")))
}

/// `x-request-id`: propagated from the caller, or created, and sent upstream and back.
static X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// The request's id: the caller's `x-request-id` if it is usable, else a new one (added to the request).
fn request_id(headers: &mut http::HeaderMap) -> HeaderValue {
    if let Some(id) = headers.get(&X_REQUEST_ID).filter(|v| !v.is_empty() && v.len() <= 128) {
        return id.clone();
    }
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(rand::random);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Unique within the process (counter) and across processes (random prefix), as 32 hex digits.
    let mut hex = [0u8; 32];
    for (i, byte) in prefix.to_be_bytes().iter().chain(n.to_be_bytes().iter()).enumerate() {
        hex[2 * i] = b"0123456789abcdef"[usize::from(byte >> 4)];
        hex[2 * i + 1] = b"0123456789abcdef"[usize::from(byte & 0xf)];
    }
    // Shared bytes (one allocation), so that the copy kept for the response costs none.
    let id =
        HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(hex)).unwrap_or_else(|_| HeaderValue::from_static("-"));
    headers.insert(X_REQUEST_ID.clone(), id.clone());
    id
}

/// The header that carries `token` on `route` (none when the route puts it in the query).
fn token_header<'r>(route: &'r Route, token: &Token) -> Result<Option<(&'r HeaderName, HeaderValue)>, ProxyError> {
    static AUTHORIZATION: HeaderName = http::header::AUTHORIZATION;
    match &route.injection {
        Injection::Bearer => Ok(Some((&AUTHORIZATION, sensitive(token.bearer.clone())))),
        Injection::Header { name, prefix } => {
            let mut value = Vec::with_capacity(prefix.len() + token.raw.len());
            value.extend_from_slice(prefix.as_bytes());
            value.extend_from_slice(token.raw.as_bytes());
            let value = HeaderValue::from_bytes(&value)
                .map_err(|_| ProxyError::BadRequest("cannot format the token header".into()))?;
            Ok(Some((name, sensitive(value))))
        }
        Injection::Query { .. } => Ok(None),
    }
}

/// The query parameter that carries `token` on `route`, encoded (none when the route puts it in a header).
fn token_query(route: &Route, token: &Token) -> Option<String> {
    match &route.injection {
        Injection::Query { param } => Some(
            form_urlencoded::Serializer::new(String::new())
                .append_pair(param, token.raw.to_str().unwrap_or_default())
                .finish(),
        ),
        _ => None,
    }
}

/// The upstream URI of `target` on `route`, with `extra_query` (the token parameter) appended.
fn upstream_uri(route: &Route, target: &Target, extra_query: Option<&str>) -> Result<http::Uri, ProxyError> {
    route
        .upstream_uri(&target.original, target.query.as_deref(), extra_query)
        .map_err(|e| ProxyError::BadRequest(format!("cannot build the upstream URI: {e}")))
}

fn sensitive(mut value: HeaderValue) -> HeaderValue {
    value.set_sensitive(true);
    value
}

fn error_detail(error: &ProxyError) -> String {
    match error {
        ProxyError::TokenUnavailable { detail, .. } => detail.clone(),
        other => format!("{other:?}"),
    }
}

/// Whether the query has parameter `name`.
fn query_has(query: Option<&str>, name: &str) -> bool {
    query.is_some_and(|q| form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k == name))
}

/// The query without parameter `name` (the caller's own token, replaced by ours).
fn without_param(query: &str, name: &str) -> String {
    query
        .split('&')
        .filter(|pair| {
            let key = pair.split('=').next().unwrap_or_default();
            form_urlencoded::parse(key.as_bytes()).next().is_none_or(|(k, _)| k != name)
        })
        .collect::<Vec<_>>()
        .join("&")
}
