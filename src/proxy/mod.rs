//! The proxy: one request lifecycle, written once against `http` types, driven by two transports.
//!
//! A request's life is a short list of phases, each a method of [`Proxy`] (in the spirit of pingora's `ProxyHttp`):
//!
//! 1. **Request filter** ([`Proxy::admit`]): the method and path policy (TRACE and TRACK never forwarded, dot
//!    segments removed, two `Host` headers refused), then routing: CONNECT and hosts no route names are refused, so
//!    tokenproxy is never an open proxy.
//! 2. **Prepare** ([`Proxy::prepare`]): the request as the upstream will see it (URI, hop-by-hop headers stripped,
//!    forwarding headers set) and the route's `incoming_authorization` rule.
//! 3. **Credential**: the provider's current token (the hot path, taken by the lifecycle), or a wait on the single
//!    token call in flight ([`Proxy::credential`]).
//! 4. **Upstream request** ([`Proxy::upstream_target`]): the upstream URI and the header that carries the token.
//! 5. **Status decision** ([`Proxy::decide`], [`Proxy::replacement`]): deliver the response, or, on a 401 to a token
//!    we attached, get a newer token (within the 401 budget) and replay once.
//! 6. **Response filter** ([`headers::forwarded`]): which of the upstream's headers reach the caller.
//! 7. **Logging** ([`Proxy::begin`], [`Proxy::end`]): request id, metrics and the access log; a request dropped
//!    before its end (the caller went away) still lowers the in-flight gauge.
//!
//! Errors become problem+json responses in one place ([`error::ProxyError::into_parts`]).
//!
//! Phases 2 to 5 and the one replay run in [`lifecycle`], written once over a small transport trait; the two
//! transports do I/O and framing only: [`h1`] (tokenproxy's own HTTP/1.1: wire format, framing, connection driver
//! and upstream round trip) serves plain HTTP/1.1 requests to plain-HTTP upstreams (nearly all of a sidecar's) with a
//! per-worker upstream pool; [`hyper`] serves everything else (h2, TLS upstreams, HTTP/1.0, chunked or large request
//! bodies, `Expect`, upgrades, gRPC), and a connection moves from the first to the second at the first request the
//! first does not take. Upstream connections for both come from [`upstream`].

pub mod error;
pub mod h1;
pub mod headers;
pub mod hyper;
pub mod intercept;
mod lifecycle;
pub mod path;
pub mod replay;
pub mod route;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::HOST;
use http::request::Parts;
use http::{HeaderName, HeaderValue, Method, StatusCode, Version};
use tokio::time::Instant;

pub use error::{ErrorContext, ProxyBody, ProxyError};
use route::{Injection, Lookup, Route, RouteTable};
pub use upstream::{UpstreamBody, UpstreamClient};

use crate::config::IncomingAuthorization;
use crate::host_check::HostCheck;
use crate::metrics::{ReplayOutcome, RouteMetrics};
use crate::telemetry::{RequestTrace, Telemetry};
use crate::token::dpop::ProofFor;
use crate::token::{refusal, SubjectRefusal, Token, TokenSource};

/// What the proxy knows of the connection a request came on.
pub struct Connection {
    /// The caller's address.
    pub peer: SocketAddr,
    /// Whether it came over the TLS listener (or an intercepted tunnel).
    pub tls: bool,
    /// The peer's address as an `X-Forwarded-For` value, made once.
    forwarded_for: HeaderValue,
    /// Inside an intercepted tunnel ([`intercept`]).
    tunnel: Option<Box<intercept::Tunnel>>,
}

impl Connection {
    /// A new caller connection from `peer`.
    pub fn new(peer: SocketAddr, tls: bool) -> Connection {
        let forwarded_for = headers::peer_value(peer.ip());
        Connection { peer, tls, forwarded_for, tunnel: None }
    }

    /// The connection inside a tunnel intercepted for `host` ([`intercept`]) whose TLS SNI named that host (or none)
    /// when `sni_matches`.
    pub fn in_tunnel(peer: SocketAddr, host: String, sni_matches: bool) -> Connection {
        Connection { tunnel: Some(Box::new(intercept::Tunnel { host, sni_matches })), ..Connection::new(peer, true) }
    }
}

/// Settings that apply to every request.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// Request bodies up to this size are kept for a replay after a 401.
    pub replay_buffer: usize,
    /// The whole upstream round trip (and its replay) must have its response head within this.
    pub request_timeout: Duration,
    /// A tunnel with no byte either way for this long is closed.
    pub tunnel_idle_timeout: Duration,
    /// One access-log line per request.
    pub access_log: bool,
    /// Plain HTTP/1.1 requests are served by the [`h1`] transport; `false` sends every request to [`hyper`].
    pub h1_transport: bool,
    /// Traces, when telemetry is on.
    pub telemetry: Option<Arc<Telemetry>>,
    /// HTTPS interception, when a route intercepts.
    pub interceptor: Option<Arc<intercept::Interceptor>>,
}

/// The reverse proxy: routes, the upstream client and the limits that apply to every request.
pub struct Proxy {
    table: RouteTable,
    /// Which `Host` the proxy listener answers (DNS rebinding).
    hosts: HostCheck,
    /// Requests refused by `hosts`.
    misdirected: prometheus::IntCounter,
    client: Arc<UpstreamClient>,
    replay_buffer: usize,
    request_timeout: Duration,
    tunnel_idle_timeout: Duration,
    access_log: bool,
    h1_transport: bool,
    unrouted: RouteMetrics,
    telemetry: Option<Arc<Telemetry>>,
    /// HTTPS interception of routed hosts (`routes[].intercept`).
    interceptor: Option<Arc<intercept::Interceptor>>,
}

/// What the upstream URI is built from, besides the route.
struct Target {
    /// The caller's URI: its path and query.
    original: http::Uri,
    /// The query to send instead of the caller's (when the caller's own token parameter was removed).
    query: Option<String>,
    /// Attach our token (false when the route keeps the caller's own credential, or has no provider).
    attach: bool,
    /// On a route that exchanges each caller's token: this caller's tokens.
    caller_tokens: Option<Arc<dyn TokenSource>>,
}

impl Target {
    /// Where this request's token comes from: its caller's (token exchange), or the route's.
    fn tokens<'a>(&'a self, route: &'a Route) -> Option<&'a Arc<dyn TokenSource>> {
        self.caller_tokens.as_ref().or(route.tokens.as_ref())
    }
}

/// A request's bookkeeping from its arrival to its answer. Dropped before [`Proxy::end`] (the caller went away and
/// the transport cancelled the request), it still lowers the in-flight gauge and counts the request as 499.
pub struct InFlight<'p> {
    started: Instant,
    request_id: HeaderValue,
    /// What the access log needs of the request as it came, when the log is on (boxed: the bookkeeping is moved
    /// with every request, and stays small when the log is off).
    logged: Option<Box<Logged>>,
    /// The route, once found (its `inflight` gauge was raised then).
    route: Option<&'p Route>,
    ended: bool,
    /// Its trace, when telemetry is on (moved into its [`Retried`] record when that is made).
    trace: Option<Box<RequestTrace>>,
}

/// What the access log keeps of a request as it came.
struct Logged {
    method: Method,
    /// The path without its query (which may carry a token).
    path: String,
    /// The trace id of the caller's W3C `traceparent`, when it sent a valid one.
    trace_id: Option<Box<str>>,
}

/// The status counted and logged for a request whose caller went away before its answer (nginx's 499).
pub const CLIENT_CLOSED_REQUEST: StatusCode = match StatusCode::from_u16(499) {
    Ok(status) => status,
    Err(_) => StatusCode::BAD_REQUEST,
};

impl<'p> InFlight<'p> {
    /// When the request arrived.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The request's id.
    pub fn request_id(&self) -> &HeaderValue {
        &self.request_id
    }

    /// What its sends will be noted in: with the token side kept when the access log is on, and its trace.
    pub fn retried(&mut self) -> Retried {
        let mut retried = Retried::new(self.logged.is_some());
        retried.trace = self.trace.take();
        retried
    }

    /// The request's route, once found.
    pub fn route(&self) -> Option<&'p Route> {
        self.route
    }

    /// The request has a route: it is in flight on it until it ends.
    pub fn routed(&mut self, route: &'p Route) {
        route.metrics.inflight.inc();
        self.route = Some(route);
        if let Some(trace) = &self.trace {
            trace.routed(&route.name, route.upstream_authority(), route.provider.as_deref());
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        if let Some(route) = self.route {
            route.metrics.inflight.dec();
            route.metrics.count_status(CLIENT_CLOSED_REQUEST);
        }
    }
}

/// The headers that carry a token to the upstream (values sensitive).
#[derive(Debug)]
pub struct Credential<'r> {
    /// The header that carries the token.
    pub name: &'r HeaderName,
    /// Its value.
    pub value: HeaderValue,
    /// For a DPoP-bound token: the `DPoP` proof made for this request (RFC 9449 §7.1).
    pub proof: Option<HeaderValue>,
}

/// What the status decision looks at in an upstream's answer.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    /// Its status.
    pub status: StatusCode,
    /// It says `WWW-Authenticate: Bearer error="invalid_token"` (or `DPoP error="invalid_token"`).
    pub invalid_token: bool,
    /// It says `WWW-Authenticate: DPoP error="use_dpop_nonce"`: the proof lacked the upstream's nonce.
    pub use_dpop_nonce: bool,
    /// Its `DPoP-Nonce` header: the nonce the upstream wants in the next proofs.
    pub dpop_nonce: Option<HeaderValue>,
    /// A 4xx's challenge and `Date`, for the verdict on a refusal ([`refusal`](crate::token::refusal)).
    pub refused: Option<Box<refusal::Challenged>>,
}

impl Answer {
    /// An answer with `status`, its headers not looked at yet.
    #[inline]
    pub fn new(status: StatusCode) -> Answer {
        Answer { status, ..Answer::default() }
    }

    /// Looks at one header of the answer, in the order they came: the only place where an upstream's answer is read
    /// for the status decision. Only a 4xx can refuse the token (docs/configuration.md, "The 401 budget"); the
    /// `DPoP-Nonce` counts whatever the status (RFC 9449 §9).
    #[inline(always)]
    pub fn observe(&mut self, name: &[u8], value: &[u8]) {
        // Most names have neither length: one comparison each, inline.
        if name.len() == Self::CHALLENGE.len() || name.len() == Self::NONCE.len() {
            self.observe_named(name, value);
        } else if name.len() == Self::DATE.len() && self.status.is_client_error() {
            self.observe_date(name, value);
        }
    }

    const DATE: &'static [u8] = b"date";

    #[inline(never)]
    fn observe_date(&mut self, name: &[u8], value: &[u8]) {
        if name.eq_ignore_ascii_case(Self::DATE) {
            self.refused.get_or_insert_with(Box::default).date = HeaderValue::from_bytes(value).ok();
        }
    }

    const CHALLENGE: &'static [u8] = b"www-authenticate";
    const NONCE: &'static [u8] = b"dpop-nonce";

    #[inline(never)]
    fn observe_named(&mut self, name: &[u8], value: &[u8]) {
        if self.status.is_client_error() && name.eq_ignore_ascii_case(Self::CHALLENGE) {
            let found = headers::challenge(value);
            self.invalid_token |= found.invalid_token;
            self.use_dpop_nonce |= found.use_dpop_nonce;
            if found.scheme {
                self.refused.get_or_insert_with(Box::default).challenge = HeaderValue::from_bytes(value).ok();
            }
        } else if name.eq_ignore_ascii_case(Self::NONCE) {
            self.dpop_nonce = HeaderValue::from_bytes(value).ok();
        }
    }

    /// The answer of a response with `status` and `headers`.
    pub fn from_headers(status: StatusCode, headers: &http::HeaderMap) -> Answer {
        let mut answer = Answer::new(status);
        for (name, value) in headers {
            answer.observe(name.as_str().as_bytes(), value.as_bytes());
        }
        answer
    }
}

/// What to do with an upstream's response (phase 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Give it to the caller.
    Deliver,
    /// A 401 to the token of generation `rejected`: replay once with a newer token, if one can be had.
    Replay {
        /// The generation the upstream refused.
        rejected: u64,
        /// How the upstream refused it.
        why: Resend,
    },
    /// A 401 asking only for a DPoP nonce: send once more with the same token and a new proof with the nonce. The
    /// token was not refused; its generation stays.
    Nonce,
}

/// Why a request was sent to its upstream once more: the access log's `replay_reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resend {
    /// The upstream answered this status, one of the route's `retry_on_status` (401 by default): `"401"`, `"403"`…
    Status(StatusCode),
    /// Another 4xx saying `Bearer error="invalid_token"` (or `DPoP error="invalid_token"`).
    InvalidToken,
    /// A 401 asking only for the upstream's DPoP nonce (`DPoP error="use_dpop_nonce"`).
    DpopNonce,
    /// An h2 upstream refused the stream unprocessed (`REFUSED_STREAM`, or a `GOAWAY` before it).
    RefusedStream,
    /// A reused upstream connection closed before answering (a keep-alive connection the upstream had let go).
    StaleConnection,
}

impl Resend {
    /// Its name in the access log.
    pub fn as_str(&self) -> &str {
        match self {
            Resend::Status(status) => status.as_str(),
            Resend::InvalidToken => "invalid_token",
            Resend::DpopNonce => "dpop_nonce",
            Resend::RefusedStream => "refused_stream",
            Resend::StaleConnection => "stale_connection",
        }
    }
}

/// What was sent, and sent again, for one request: what the status decision needs (was it replayed already?) and
/// what the access log tells (how many sends, why a second, with which token).
#[derive(Debug, Default)]
pub struct Retried {
    /// Replayed with a newer token after a 401.
    pub replayed: bool,
    /// Sent again with the upstream's DPoP nonce.
    pub nonce: bool,
    /// The sends made to the upstream, a transport's own resends included.
    pub sends: u8,
    /// Why the request went a second time (the first resend's reason).
    pub reason: Option<Resend>,
    /// For the access log only (`None` when it is off): what the last send carried.
    pub audit: Option<Box<Audit>>,
    /// The request's trace, when telemetry is on.
    pub trace: Option<Box<RequestTrace>>,
}

/// The token side of a request, for its access-log line: kept only while the access log is on.
#[derive(Debug, Default)]
pub struct Audit {
    /// The token the last send carried.
    pub token: Option<Arc<Token>>,
    /// On a route that exchanges the caller's token: the caller's subject's fingerprint.
    pub subject: Option<String>,
}

impl Retried {
    /// Nothing sent yet; `audit`: keep what the access log tells.
    pub fn new(audit: bool) -> Retried {
        Retried { audit: audit.then(Box::default), ..Retried::default() }
    }

    /// Whether the request went more than once.
    pub fn any(&self) -> bool {
        self.replayed || self.nonce
    }

    /// Notes a send of `token`, and the transport's own `resend` within it (a second write of the same request).
    pub(crate) fn sent(&mut self, token: Option<&Arc<Token>>, resend: Option<Resend>) {
        self.sends = self.sends.saturating_add(1 + u8::from(resend.is_some()));
        if self.reason.is_none() {
            self.reason = resend;
        }
        if let Some(audit) = &mut self.audit {
            audit.token = token.cloned();
        }
    }

    /// Notes why the next send is made.
    fn resending(&mut self, why: Resend) {
        if self.reason.is_none() {
            self.reason = Some(why);
        }
    }
}

impl Proxy {
    /// A proxy over `table`, answering the hosts `hosts` admits (`misdirected` counts the others).
    pub fn new(
        table: RouteTable,
        (hosts, misdirected): (HostCheck, prometheus::IntCounter),
        client: Arc<UpstreamClient>,
        options: ProxyOptions,
        unrouted: RouteMetrics,
    ) -> Proxy {
        Proxy {
            table,
            hosts,
            misdirected,
            client,
            replay_buffer: options.replay_buffer,
            request_timeout: options.request_timeout,
            tunnel_idle_timeout: options.tunnel_idle_timeout,
            access_log: options.access_log,
            h1_transport: options.h1_transport,
            unrouted,
            telemetry: options.telemetry,
            interceptor: options.interceptor,
        }
    }

    /// Whether plain HTTP/1.1 requests are served by the [`h1`] transport (else every request goes to [`hyper`]).
    pub fn h1_transport(&self) -> bool {
        self.h1_transport
    }

    /// Serves one request that hyper parsed; never fails (errors are responses). See [`hyper_transport`].
    pub async fn handle(
        &self,
        request: http::Request<::hyper::body::Incoming>,
        connection: &Connection,
    ) -> http::Response<ProxyBody> {
        self::hyper::handle(self, request, connection).await
    }

    /// Phase 7, at the start: the request's id (taken from the caller or made), and what the access log will need.
    pub fn begin(&self, parts: &mut Parts) -> InFlight<'_> {
        let started = Instant::now();
        let request_id = request_id(&mut parts.headers);
        // Kept for the access log only: the path without its query (which may carry a token).
        let access_log = self.access_log && tracing::enabled!(target: "access", tracing::Level::INFO);
        let logged = access_log.then(|| {
            Box::new(Logged {
                method: parts.method.clone(),
                path: parts.uri.path().to_owned(),
                trace_id: parts.headers.get(&headers::TRACEPARENT).and_then(headers::trace_id).map(Into::into),
            })
        });
        let trace = self.telemetry.as_ref().and_then(|telemetry| {
            telemetry.server_span(&parts.method, parts.uri.path(), parts.version, &parts.headers).map(Box::new)
        });
        InFlight { started, request_id, logged, route: None, ended: false, trace }
    }

    /// Phase 7, at the end: a request answered with `status` after the sends in `retried`: metrics and the access
    /// log (its fields are documented in docs/configuration.md, "The access log").
    pub fn end(&self, mut in_flight: InFlight<'_>, status: StatusCode, retried: &Retried) {
        in_flight.ended = true;
        let route = in_flight.route;
        match route {
            Some(route) => {
                let metrics = &route.metrics;
                metrics.inflight.dec();
                metrics.count_status(status);
                metrics.duration.observe(in_flight.started.elapsed().as_secs_f64());
            }
            None => self.unrouted.count_status(status),
        }
        if let Some(trace) = &retried.trace {
            trace.end(status, retried.any());
        }
        if let Some(logged) = in_flight.logged.take() {
            let audit = retried.audit.as_deref();
            let traced = retried.trace.as_ref().and_then(|trace| trace.ids());
            let (trace_id, span_id) = match &traced {
                Some((trace, span)) => (Some(trace.as_str()), span.as_str()),
                None => (logged.trace_id.as_deref(), "-"),
            };
            let token = audit.and_then(|a| a.token.as_deref());
            tracing::info!(
                target: "access",
                route = route.map_or("-", |r| &r.name),
                method = %logged.method,
                path = %logged.path,
                status = status.as_u16(),
                duration_ms = in_flight.started.elapsed().as_secs_f64() * 1000.0,
                upstream = route.map_or("-", |r| r.upstream_authority()),
                replayed = retried.any(),
                replay_reason = retried.reason.as_ref().map_or("-", Resend::as_str),
                attempts = retried.sends,
                token_slot = route.and_then(|r| r.provider.as_deref()).unwrap_or("-"),
                token_fingerprint = token.map_or("-", |t| &t.fingerprint),
                token_generation = token.map_or(0, |t| t.generation),
                subject_fingerprint = audit.and_then(|a| a.subject.as_deref()).unwrap_or("-"),
                trace_id = trace_id.unwrap_or("-"),
                span_id,
                request_id = in_flight.request_id.to_str().unwrap_or("-"),
                "request"
            );
        }
    }

    /// Counts a request refused before it could be parsed into one (a framing HTTP/1.1 forbids).
    fn count_refused(&self, status: StatusCode) {
        self.unrouted.count_status(status);
    }

    /// The problem+json answer to an error serving a request on `route`.
    fn error_response(&self, route: &Route, error: ProxyError, grpc: bool) -> http::Response<ProxyBody> {
        let context = ErrorContext { grpc, ..self.error_context(Some(route), &error) };
        error.into_response(&context)
    }

    /// What the answer to `error` names: the route and its provider, when the request had a route (then the error
    /// is logged at debug level).
    fn error_context(&self, route: Option<&Route>, error: &ProxyError) -> ErrorContext {
        let Some(route) = route else { return ErrorContext::default() };
        tracing::debug!(route = %route.name, code = error.code(), "proxy error: {}", error_detail(error));
        ErrorContext { route: Some(Arc::clone(&route.name)), provider: route.provider.clone(), grpc: false }
    }

    /// Phase 1, the request filter: the method and path policy, then routing. CONNECT and hosts no route names are
    /// refused (never an open proxy); TRACE and TRACK are never forwarded (they echo the token back); two `Host`
    /// headers are refused; dot segments are removed from the path before routing ([`path`]), and the normalised
    /// path is the one forwarded.
    pub fn admit(&self, request: &mut Parts, connection: &Connection) -> Result<&Route, ProxyError> {
        // A malformed message first (the h1 transport's parser refuses it before anything else), then policy.
        if request.headers.get_all(HOST).iter().nth(1).is_some() {
            return Err(ProxyError::Malformed("more than one Host header".into()));
        }
        let method = request.method.as_str();
        if method.eq_ignore_ascii_case("TRACE") || method.eq_ignore_ascii_case("TRACK") {
            return Err(ProxyError::MethodNotAllowed(method.to_owned()));
        }
        let normalized = path::remove_dot_segments(request.uri.path())
            .map_err(|e| ProxyError::BadRequest(format!("path refused: {e}")))?;
        // Only a path that had dot segments can have had one with parameters (`..;`).
        let mut dot_parameters = false;
        if let Some(normalized) = normalized {
            dot_parameters = path::has_dot_parameters(request.uri.path());
            request.uri = with_path(&request.uri, &normalized)?;
        }
        let route = self.select_route(request)?;
        if let Some(tunnel) = connection.tunnel.as_deref() {
            Self::within_tunnel(request, route, tunnel)?;
        }
        if route.reject_encoded_slashes && path::has_encoded_slash(request.uri.path()) {
            return Err(ProxyError::BadRequest(format!("path refused: {}", path::PathError::EncodedSlash)));
        }
        if dot_parameters && route.reject_path_parameters {
            return Err(ProxyError::BadRequest(format!("path refused: {}", path::PathError::DotParameters)));
        }
        Ok(route)
    }

    /// Phase 1 inside a tunnel intercepted for `host`: the request must name that host (its `Host` or `:authority`,
    /// and the TLS SNI), else 421; only that host's routes answer, else 404.
    fn within_tunnel(request: &Parts, route: &Route, tunnel: &intercept::Tunnel) -> Result<(), ProxyError> {
        let intercept::Tunnel { host, sni_matches } = tunnel;
        let named = crate::host_check::requested_host(request.version, &request.uri, &request.headers)
            .or_else(|| request.uri.host())
            .map(route::host_without_port);
        if !sni_matches || !named.is_some_and(|named| named.eq_ignore_ascii_case(host)) {
            return Err(ProxyError::Misdirected(format!(
                "this tunnel was opened for `{host}`: the request (and the TLS server name) must name it"
            )));
        }
        if route.host() != Some(host.as_str()) {
            return Err(ProxyError::NoRoute);
        }
        Ok(())
    }

    /// Phase 1, routing.
    fn select_route(&self, request: &Parts) -> Result<&Route, ProxyError> {
        if request.method == Method::CONNECT {
            // A CONNECT this proxy intercepts is a tunnel before it gets here (src/proxy/intercept.rs), except
            // inside a tunnel.
            return Err(match self.intercepted(request) {
                Err(refused) => refused,
                Ok(_) => ProxyError::HostNotAllowed("CONNECT is refused inside an intercepted tunnel".into()),
            });
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
                let host = crate::host_check::requested_host(request.version, &request.uri, &request.headers);
                if !self.hosts.admits(host) {
                    self.misdirected.inc();
                    return Err(ProxyError::Misdirected(misdirected_detail("server")));
                }
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

    /// Phase 2: the request as the upstream will see it, minus the token.
    fn prepare<'t>(
        route: &Route,
        parts: &mut Parts,
        connection: &Connection,
        target: &'t mut Option<Target>,
    ) -> Result<&'t Target, ProxyError> {
        // The upstream's Host, set at once (one lookup, which also hands back the caller's: `Host` is never removed as
        // hop-by-hop, see headers::never_connection_listed).
        let caller_host = parts.headers.insert(HOST, route.host_header.clone());
        let authority = || parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok());
        let original_host = match parts.version {
            Version::HTTP_2 => authority(),
            _ => caller_host.or_else(authority),
        };
        let version = parts.version;
        headers::strip_hop_by_hop(&mut parts.headers);
        headers::add_forwarding(&mut parts.headers, &connection.forwarded_for, connection.tls, original_host);
        headers::append_via(&mut parts.headers, version);
        // The upstream connection's protocol is the transport's business; the request head is version-neutral.
        parts.version = Version::HTTP_11;

        let caller_credential = match &route.injection {
            Injection::Query { param } => query_has(parts.uri.query(), param),
            _ => parts.headers.contains_key(&route.credential_header),
        };
        let mut attach = route.has_tokens();
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
        // The caller's own bearer token is the subject of the token exchange: taken off the request here, whatever header
        // or parameter the route puts its own token in, so it is never forwarded; its hash keys the caller's tokens.
        let caller_tokens = match &route.exchange {
            Some(exchange) => {
                match parts.headers.remove(http::header::AUTHORIZATION).and_then(|a| exchange.for_caller(&a)) {
                    Some(tokens) => Some(tokens),
                    None => {
                        return Err(ProxyError::Subject {
                            refusal: SubjectRefusal::Missing,
                            detail: format!(
                                "route `{}` exchanges the caller's own token: send it as `Authorization: Bearer …`",
                                route.name
                            ),
                        })
                    }
                }
            }
            None => None,
        };
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
        if caller_tokens.is_some() {
            // A caller may send its bearer token in the query too (`access_token`, RFC 6750 §2.3): on a route that
            // exchanges it, it never goes upstream either.
            let current = query.as_deref().or(parts.uri.query());
            if query_has(current, SUBJECT_QUERY_PARAM) {
                query = current.map(|q| without_param(q, SUBJECT_QUERY_PARAM));
            }
        }
        // Written where the caller keeps it rather than returned: the target is large and is not moved again.
        Ok(target.insert(Target { original: parts.uri.clone(), query, attach, caller_tokens }))
    }

    /// Phase 3, when the provider has no usable token (the lifecycle takes the current one itself, the hot path): a
    /// wait for the single token call in flight.
    async fn credential(tokens: &dyn TokenSource, trace: Option<&RequestTrace>) -> Result<Arc<Token>, ProxyError> {
        let obtained = crate::telemetry::token_wait(trace, tokens.obtain(None), Result::is_err).await;
        obtained.map_err(|e| match e.refusal {
            Some(refusal) => ProxyError::Subject { refusal, detail: e.reason },
            None if e.budget_exhausted => {
                ProxyError::TokenBudgetExhausted { detail: e.to_string(), retry_after: e.retry_after }
            }
            None => ProxyError::TokenUnavailable { detail: e.to_string(), retry_after: e.retry_after },
        })
    }

    /// Phase 4: the upstream URI of a request, and the headers that carry `token` (none when the route puts it in
    /// the query, or nothing is attached); a DPoP-bound token gets a new proof for this `method` and URI.
    fn upstream_target<'r>(
        route: &'r Route,
        target: &Target,
        method: &Method,
        token: Option<&Token>,
    ) -> Result<(http::Uri, Option<Credential<'r>>), ProxyError> {
        let extra_query = token.and_then(|token| token_query(route, token));
        let uri = upstream_uri(route, target, extra_query.as_deref())?;
        let Some((name, value)) = token.map(|token| token_header(route, token)).transpose()?.flatten() else {
            return Ok((uri, None));
        };
        let proof = token.and_then(Token::dpop).map(|binding| {
            let mut htu = String::with_capacity(route.origin.len() + uri.path().len());
            htu.push_str(&route.origin);
            htu.push_str(uri.path());
            binding.key.proof(ProofFor {
                method: method.as_str(),
                url: &htu,
                origin: &route.origin,
                ath: Some(&binding.ath),
            })
        });
        Ok((uri, Some(Credential { name, value, proof })))
    }

    /// Phase 5, the status decision on the response to an attempt: a refusal of a token we attached (a status of the
    /// route's `retry_on_status`, 401 by default, or any 4xx saying `Bearer error="invalid_token"`), on a route
    /// that replays, calls for the one replay (not after a replay). A 403 to a token that a refresh call sent during
    /// the round trip may have revoked (`during_refresh = "wait"` holds it back) is such a refusal too: its replay waits
    /// for that call and makes none of its own. Counts the upstream's refusals and a replay's outcome.
    ///
    /// For a DPoP-bound token, the upstream's `DPoP-Nonce` is kept for the next proofs to it, and a 401 that only asks
    /// for that nonce (`DPoP error="use_dpop_nonce"`) is sent once more with it, the token kept: it was not refused.
    fn decide(route: &Route, answer: &Answer, token: Option<&Token>, target: &Target, retried: &Retried) -> Decision {
        if let Some(binding) = token.and_then(Token::dpop) {
            if let Some(nonce) = &answer.dpop_nonce {
                binding.key.remember_nonce(&route.origin, nonce);
            }
            if answer.use_dpop_nonce && answer.status == StatusCode::UNAUTHORIZED {
                return if retried.nonce || answer.dpop_nonce.is_none() { Decision::Deliver } else { Decision::Nonce };
            }
        }
        let replayed = retried.replayed;
        let refused_status = route.refusal(answer.status)
            || (answer.status == StatusCode::FORBIDDEN && token.is_some_and(Token::is_suspended));
        let refused = refused_status || answer.invalid_token;
        if replayed {
            Self::count_replay(route, refused);
            if refused {
                Self::explain(route, answer, token, target);
            }
            return Decision::Deliver;
        }
        if !refused {
            // A 401 or 403 with a challenge that is not a refusal to replay (`insufficient_scope`): no new token
            // fixes it; say why.
            if answer.refused.as_ref().is_some_and(|seen| seen.challenge.is_some())
                && matches!(answer.status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN)
            {
                Self::explain(route, answer, token, target);
            }
            return Decision::Deliver;
        }
        route.metrics.upstream_unauthorized.inc();
        let why = if refused_status { Resend::Status(answer.status) } else { Resend::InvalidToken };
        match token {
            Some(token) if route.retry_on_401 && route.has_tokens() => {
                Decision::Replay { rejected: token.generation, why }
            }
            _ => {
                Self::explain(route, answer, token, target);
                Decision::Deliver
            }
        }
    }

    /// The verdict on an upstream's refusal of `token` that will not be replayed ([`refusal`](crate::token::refusal)): once per token
    /// generation and route, a WARN line, the metric by reason and `/tokens`' `last_refusal`.
    #[cold]
    fn explain(route: &Route, answer: &Answer, token: Option<&Token>, target: &Target) {
        use std::sync::atomic::Ordering;
        let Some(token) = token else { return };
        if route.last_verdict.swap(token.generation, Ordering::Relaxed) == token.generation {
            return;
        }
        let seen = answer.refused.as_deref();
        let status = answer.status.as_u16();
        let verdict = refusal::judge(&route.name, status, token, &route.expects, seen, std::time::SystemTime::now());
        for reason in &verdict.reasons {
            route.metrics.refusals(*reason).inc();
        }
        let reasons: Vec<&str> = verdict.reasons.iter().map(|r| r.as_str()).collect();
        tracing::warn!(
            route = %route.name,
            status,
            generation = token.generation,
            fingerprint = %token.fingerprint,
            reasons = %reasons.join(","),
            "the upstream refused the token: {}",
            verdict.explanation
        );
        if let Some(tokens) = target.tokens(route) {
            tokens.note_refusal(verdict);
        }
    }

    /// Phase 5: whether a request carrying `token` may have to go once more, so its head and body are kept: after a
    /// 401 (`retry_on_401`), or, for a DPoP-bound token, with the upstream's nonce whatever `retry_on_401` says.
    fn may_send_again(route: &Route, token: &Token) -> bool {
        route.retry_on_401 || token.dpop().is_some()
    }

    /// Phase 5: the token for the send `decision` asks for, noted in `retried`: a newer one after a refusal (within
    /// the 401 budget), or the same one again with the upstream's DPoP nonce; `None`: the answer goes to the caller.
    async fn next_token(
        route: &Route,
        target: &Target,
        decision: Decision,
        token: Option<&Arc<Token>>,
        deadline: Instant,
        retried: &mut Retried,
    ) -> Option<Arc<Token>> {
        match decision {
            Decision::Deliver => None,
            Decision::Replay { rejected, why } => {
                let tokens = target.tokens(route)?.as_ref();
                let obtain = Self::replacement(route, tokens, rejected, deadline);
                let fresh = crate::telemetry::token_wait(retried.trace.as_deref(), obtain, Option::is_none).await;
                if fresh.is_some() {
                    retried.replayed = true;
                    retried.resending(why);
                }
                fresh
            }
            Decision::Nonce => {
                retried.nonce = true;
                retried.resending(Resend::DpopNonce);
                token.cloned()
            }
        }
    }

    /// Phase 5, the token for the one replay after a 401 to generation `rejected`: a newer token, unless the 401
    /// budget refuses a refresh now or none can be had; then the upstream's own 401 is the honest answer.
    async fn replacement(
        route: &Route,
        tokens: &dyn TokenSource,
        rejected: u64,
        deadline: Instant,
    ) -> Option<Arc<Token>> {
        let fresh = tokio::time::timeout_at(deadline, tokens.obtain(Some(rejected))).await;
        // The token call presented the IdP's client certificate as the files hold it now; a route presenting the
        // same files (`upstream_client_cert = "provider"`) looks at them now too, not at its next periodic check, so
        // that a token bound to a renewed certificate goes out with that certificate.
        if let Some(tls) = &route.tls {
            tls.recheck();
        }
        match fresh {
            Ok(Ok(fresh)) => Some(fresh),
            Ok(Err(unavailable)) if unavailable.rate_limited => {
                route.metrics.replays(ReplayOutcome::RateLimited).inc();
                None
            }
            _ => None,
        }
    }

    /// Phase 5, after the replay: counts its outcome by whether the token was refused again.
    fn count_replay(route: &Route, refused: bool) {
        if refused {
            route.metrics.upstream_unauthorized.inc();
            route.metrics.replays(ReplayOutcome::StillUnauthorized).inc();
        } else {
            route.metrics.replays(ReplayOutcome::Success).inc();
        }
    }
}

/// The detail of a 421 from the listener whose `allowed_hosts` is under `section` (the `Host` itself is not echoed).
pub fn misdirected_detail(section: &str) -> String {
    format!(
        "this listener answers only requests naming it (localhost, an IP address, a host a route names, or \
         {section}.allowed_hosts): a web page that points its own name at this machine must not reach it"
    )
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

/// The query parameter a bearer token may be sent in (RFC 6750 §2.3).
const SUBJECT_QUERY_PARAM: &str = "access_token";

/// `x-request-id`: propagated from the caller, or created, and sent upstream and back.
static X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// The request's id: the caller's `x-request-id` if it is usable, else a new one (added to the request).
fn request_id(headers: &mut http::HeaderMap) -> HeaderValue {
    if let Some(id) = headers.get(&X_REQUEST_ID).filter(|v| !v.is_empty() && v.len() <= 128) {
        return id.clone();
    }
    let id = new_request_id();
    headers.insert(X_REQUEST_ID.clone(), id.clone());
    id
}

/// A new request id: unique within the process (a counter) and across processes (a random prefix).
pub(crate) fn new_request_id() -> HeaderValue {
    use std::cell::RefCell;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    /// Ids made at once per thread: one allocation for this many requests, each id a slice of it.
    const BLOCK: u64 = 256;
    const ID: usize = 32;
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    std::thread_local! {
        static IDS: RefCell<(bytes::Bytes, usize)> = const { RefCell::new((bytes::Bytes::new(), 0)) };
    }
    IDS.with(|ids| {
        let mut ids = ids.borrow_mut();
        if ids.1 + ID > ids.0.len() {
            // Unique within the process (a counter, a block of values reserved at once) and across processes (a
            // random prefix), as 32 hex digits each.
            let hex = |n: u64| {
                let mut digits = [0u8; 16];
                for (i, digit) in digits.iter_mut().enumerate() {
                    *digit = b"0123456789abcdef"[((n >> (60 - 4 * i)) & 0xf) as usize];
                }
                digits
            };
            let prefix = hex(*PREFIX.get_or_init(rand::random));
            let first = COUNTER.fetch_add(BLOCK, Ordering::Relaxed);
            let mut block = Vec::with_capacity(BLOCK as usize * ID);
            for n in first..first + BLOCK {
                block.extend_from_slice(&prefix);
                block.extend_from_slice(&hex(n));
            }
            *ids = (bytes::Bytes::from(block), 0);
        }
        let id = ids.0.slice(ids.1..ids.1 + ID);
        ids.1 += ID;
        // Shared bytes, so that the copy kept for the response costs no allocation either.
        debug_assert!(id.iter().all(u8::is_ascii_hexdigit));
        // SAFETY: the id is 32 lowercase hex digits written above, all visible ASCII: a valid header value, so the
        // per-byte check `from_maybe_shared` would make (a third of the id's cost) is skipped.
        unsafe { HeaderValue::from_maybe_shared_unchecked(id) }
    })
}

/// The header that carries `token` on `route` (none when the route puts it in the query).
fn token_header<'r>(route: &'r Route, token: &Token) -> Result<Option<(&'r HeaderName, HeaderValue)>, ProxyError> {
    static AUTHORIZATION: HeaderName = http::header::AUTHORIZATION;
    match &route.injection {
        Injection::Bearer => Ok(Some((&AUTHORIZATION, token.authorization().expose().clone()))),
        Injection::Header { name, prefix } => {
            let raw = token.access_token().expose();
            let mut value = Vec::with_capacity(prefix.len() + raw.len());
            value.extend_from_slice(prefix.as_bytes());
            value.extend_from_slice(raw.as_bytes());
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
                .append_pair(param, token.access_token().expose().to_str().unwrap_or_default())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_unique_hex_across_blocks_and_threads() {
        let make = || (0..600).map(|_| new_request_id()).collect::<Vec<_>>();
        let mut ids = make();
        ids.extend(std::thread::spawn(make).join().expect("thread"));
        let unique: std::collections::HashSet<Vec<u8>> = ids.iter().map(|id| id.as_bytes().to_vec()).collect();
        assert_eq!(unique.len(), ids.len(), "no id is made twice");
        assert!(ids.iter().all(|id| id.len() == 32 && id.as_bytes().iter().all(u8::is_ascii_hexdigit)));
    }
}
