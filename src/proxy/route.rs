//! The routing table: which route a request belongs to, and where that route sends it.
//!
//! docs/configuration.md "[[routes]]": an origin-form request matches routes whose `host` equals its Host (port ignored) and routes
//! without `host`; the longest `prefix` wins, a route with `host` before one without. An absolute-form request
//! matches only routes whose `host` equals the URI's host. Prefixes match whole path segments: `/orders` matches
//! `/orders` and `/orders/1`, not `/ordersx`.

use std::sync::Arc;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderName, HeaderValue, Uri};

use super::upstream::{RouteTls, UpstreamClient, Via};
use crate::config::{EncodedSlashes, IncomingAuthorization, Inject, RouteConfig, UpstreamProtocol};
use crate::metrics::{Metrics, RouteMetrics};
use crate::token::TokenSource;

/// How a route attaches its token.
#[derive(Debug, Clone)]
pub enum Injection {
    /// `Authorization: Bearer <token>` (the preformatted common case).
    Bearer,
    /// A header `name: [scheme ]<token>`; `scheme` empty means the raw token.
    Header {
        /// The header.
        name: HeaderName,
        /// Text before the token, with its trailing space; empty for the raw token.
        prefix: String,
    },
    /// A query parameter.
    Query {
        /// The parameter name.
        param: String,
    },
}

/// One route, resolved for serving.
pub struct Route {
    /// The route's name (metrics, logs, errors).
    pub name: Arc<str>,
    host: Option<String>,
    prefix: String,
    strip_prefix: bool,
    scheme: Scheme,
    authority: Authority,
    /// The upstream's `Host` header value.
    pub host_header: HeaderValue,
    /// The upstream URL's path, without a trailing `/` (empty for the root).
    base_path: String,
    /// The provider's name, if the route attaches tokens.
    pub provider: Option<Arc<str>>,
    /// The provider's tokens.
    pub tokens: Option<Arc<dyn TokenSource>>,
    /// How the token is attached.
    pub injection: Injection,
    /// The header the caller's own credential would be in (for `incoming_authorization`).
    pub credential_header: HeaderName,
    /// Replay once after a 401.
    pub retry_on_401: bool,
    /// The statuses that mean the token was refused (`retry_on_status`).
    refusals: Box<[u16]>,
    /// What to do with a caller's own credential.
    pub incoming_authorization: IncomingAuthorization,
    /// Refuse paths with an encoded `/` or `\\`.
    pub reject_encoded_slashes: bool,
    /// The route's own TLS settings for its upstream (`ca_file`, `server_name`, client certificate), if it has any.
    pub tls: Option<RouteTls>,
    /// Requests go to the (plain) upstream as h2 with prior knowledge.
    h2c: bool,
    /// A gRPC `UNAUTHENTICATED` answer retires the token (`grpc_unauthenticated_refresh`).
    pub grpc_unauthenticated_refresh: bool,
    /// The route's metric handles.
    pub metrics: RouteMetrics,
}

/// Why a route could not be built (a token source missing for its provider).
#[derive(Debug, thiserror::Error)]
#[error("routes.{route}: {message}")]
pub struct RouteError {
    route: String,
    message: String,
}

impl Route {
    /// Resolves a route config; `tokens` gives the token source of a provider name.
    pub fn new(
        config: &RouteConfig,
        tokens: &dyn Fn(&str) -> Option<Arc<dyn TokenSource>>,
        metrics: &Metrics,
        client: &UpstreamClient,
    ) -> Result<Route, RouteError> {
        let error = |message: String| RouteError { route: config.name.clone(), message };
        let upstream = &config.upstream;
        let scheme = if upstream.scheme() == "https" { Scheme::HTTPS } else { Scheme::HTTP };
        let host = upstream.host_str().ok_or_else(|| error("upstream has no host".into()))?;
        let authority_text = match upstream.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        let authority: Authority = authority_text.parse().map_err(|e| error(format!("upstream authority: {e}")))?;
        let host_header =
            HeaderValue::from_str(authority.as_str()).map_err(|e| error(format!("upstream authority: {e}")))?;
        let tokens = match &config.provider {
            Some(provider) => {
                Some(tokens(provider).ok_or_else(|| error(format!("no token source for provider `{provider}`")))?)
            }
            None => None,
        };
        let injection = match config.inject {
            Inject::Query => Injection::Query { param: config.query_param.clone() },
            Inject::Header
                if config.header_name == http::header::AUTHORIZATION
                    && config.scheme.eq_ignore_ascii_case("bearer") =>
            {
                Injection::Bearer
            }
            Inject::Header => Injection::Header {
                name: config.header_name.clone(),
                prefix: if config.scheme.is_empty() { String::new() } else { format!("{} ", config.scheme) },
            },
        };
        let tls = (scheme == Scheme::HTTPS && config.tls.is_custom())
            .then(|| client.route_tls(&config.name, &config.tls, metrics.upstream_tls_reloads(&config.name)))
            .transpose()
            .map_err(|e| error(format!("upstream TLS: {e}")))?;
        Ok(Route {
            name: Arc::from(config.name.as_str()),
            host: config.host.as_ref().map(|h| h.to_ascii_lowercase()),
            prefix: config.prefix.clone(),
            strip_prefix: config.strip_prefix,
            scheme,
            authority,
            host_header,
            base_path: upstream.path().trim_end_matches('/').to_owned(),
            provider: config.provider.as_deref().map(Arc::from),
            tokens,
            injection,
            credential_header: match config.inject {
                Inject::Header => config.header_name.clone(),
                Inject::Query => http::header::AUTHORIZATION,
            },
            retry_on_401: config.retry_on_401,
            refusals: config.retry_on_status.clone().into_boxed_slice(),
            incoming_authorization: config.incoming_authorization,
            reject_encoded_slashes: config.encoded_slashes == EncodedSlashes::Reject,
            tls,
            h2c: config.upstream_protocol == UpstreamProtocol::H2c,
            grpc_unauthenticated_refresh: config.grpc_unauthenticated_refresh,
            metrics: metrics.route(&config.name),
        })
    }

    /// Whether an answer of `status` means the token was refused (`retry_on_status`, 401 by default).
    pub fn refusal(&self, status: http::StatusCode) -> bool {
        self.refusals.contains(&status.as_u16())
    }

    /// The upstream's authority when it is reached over plain HTTP/1.1 (the direct path's case).
    pub fn plain_http_upstream(&self) -> Option<&Authority> {
        (self.scheme == Scheme::HTTP && !self.h2c).then_some(&self.authority)
    }

    /// The pool the hyper transport sends this route's requests through.
    pub fn via(&self) -> Via<'_> {
        match &self.tls {
            Some(tls) => Via::Tls(tls),
            None if self.h2c => Via::H2c,
            None => Via::Shared,
        }
    }

    /// The upstream's `host[:port]`, for logs.
    pub fn upstream_authority(&self) -> &str {
        self.authority.as_str()
    }

    fn matches_path(&self, path: &str) -> bool {
        self.prefix == "/"
            || (path.starts_with(self.prefix.as_str())
                && matches!(path.as_bytes().get(self.prefix.len()), None | Some(b'/')))
    }

    /// The upstream URI for a request path and query (`extra_query` is appended, already encoded).
    pub fn upstream_uri(
        &self,
        original: &Uri,
        query_override: Option<&str>,
        extra_query: Option<&str>,
    ) -> Result<Uri, http::Error> {
        let keeps_path = self.base_path.is_empty() && (!self.strip_prefix || self.prefix == "/");
        if let Some(unchanged) = original.path_and_query().filter(|_| keeps_path && query_override.is_none()) {
            if extra_query.is_none() {
                // The common sidecar case: the caller's path and query go upstream as they are (no copy).
                return Uri::builder()
                    .scheme(self.scheme.clone())
                    .authority(self.authority.clone())
                    .path_and_query(unchanged.clone())
                    .build();
            }
        }
        let path = original.path();
        let query = query_override.or(original.query());
        let rest =
            if self.strip_prefix && self.prefix != "/" { &path[self.prefix.len().min(path.len())..] } else { path };
        let mut target = String::with_capacity(self.base_path.len() + rest.len() + 1 + query.map_or(0, str::len) + 64);
        target.push_str(&self.base_path);
        if !rest.starts_with('/') {
            target.push('/');
        }
        target.push_str(rest);
        let query = query.filter(|q| !q.is_empty());
        if query.is_some() || extra_query.is_some() {
            target.push('?');
        }
        if let Some(q) = query {
            target.push_str(q);
        }
        if let Some(extra) = extra_query {
            if query.is_some() {
                target.push('&');
            }
            target.push_str(extra);
        }
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(PathAndQuery::try_from(target)?)
            .build()
    }
}

/// Every route, in match order.
pub struct RouteTable {
    routes: Vec<Route>,
    has_hostless: bool,
}

/// The result of looking a request up.
pub enum Lookup<'a> {
    /// This route serves it.
    Route(&'a Route),
    /// No route for this path (404 `no_route`).
    NoRoute,
    /// No route names this host (403 `host_not_allowed`).
    HostNotAllowed,
}

/// `host[:port]` → `host`, lowercased comparison left to the caller.
pub fn host_without_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

impl RouteTable {
    /// Orders routes for matching: with a host first, then longest prefix first.
    pub fn new(mut routes: Vec<Route>) -> RouteTable {
        routes.sort_by(|a, b| b.host.is_some().cmp(&a.host.is_some()).then(b.prefix.len().cmp(&a.prefix.len())));
        let has_hostless = routes.iter().any(|r| r.host.is_none());
        RouteTable { routes, has_hostless }
    }

    /// The routes, in match order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Looks up an origin-form request by its Host header (if any) and path.
    pub fn lookup_origin(&self, host: Option<&str>, path: &str) -> Lookup<'_> {
        let host = host.map(host_without_port);
        let mut host_known = false;
        for route in &self.routes {
            let host_ok = match (&route.host, host) {
                (None, _) => true,
                (Some(rh), Some(h)) => rh.eq_ignore_ascii_case(h),
                (Some(_), None) => false,
            };
            host_known |= host_ok;
            if host_ok && route.matches_path(path) {
                return Lookup::Route(route);
            }
        }
        if host_known || self.has_hostless {
            Lookup::NoRoute
        } else {
            Lookup::HostNotAllowed
        }
    }

    /// Looks up an absolute-form request: only routes naming the URI's host qualify.
    pub fn lookup_absolute(&self, host: &str, path: &str) -> Lookup<'_> {
        let mut host_known = false;
        for route in &self.routes {
            if route.host.as_deref().is_some_and(|rh| rh.eq_ignore_ascii_case(host)) {
                host_known = true;
                if route.matches_path(path) {
                    return Lookup::Route(route);
                }
            }
        }
        if host_known {
            Lookup::NoRoute
        } else {
            Lookup::HostNotAllowed
        }
    }
}
