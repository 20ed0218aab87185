//! The routing table: which route a request belongs to, and where that route sends it.
//!
//! docs/configuration.md "[[routes]]": an origin-form request matches routes whose `host` equals its Host (port ignored) and routes
//! without `host`; the longest `prefix` wins, a route with `host` before one without. An absolute-form request
//! matches only routes whose `host` equals the URI's host. Prefixes match whole path segments: `/orders` matches
//! `/orders` and `/orders/1`, not `/ordersx`.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderName, HeaderValue, Uri};

use super::upstream::slots::Slots;
use super::upstream::{RouteTls, UpstreamClient, Via};
use crate::config::{EncodedSlashes, IncomingAuthorization, Inject, PathParameters, RouteConfig, UpstreamProtocol};
use crate::metrics::{Metrics, RouteMetrics};
use crate::token::exchange::ExchangeCache;
use crate::token::refusal::Expectations;
use crate::token::{TokenBinding, TokenSource};

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
    /// `scheme://authority` of the upstream: the start of a DPoP proof's `htu`, and the key of its nonce.
    pub origin: Box<str>,
    /// The upstream URL's path, without a trailing `/` (empty for the root).
    base_path: String,
    /// The provider's name, if the route attaches tokens.
    pub provider: Option<Arc<str>>,
    /// The provider's tokens (one for every request).
    pub tokens: Option<Arc<dyn TokenSource>>,
    /// A token per caller: the provider exchanges each request's own bearer token (`tokens` is then `None`).
    pub exchange: Option<Arc<ExchangeCache>>,
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
    /// Refuse paths with a dot segment carrying path parameters (`..;`).
    pub reject_path_parameters: bool,
    /// The route's own TLS settings for its upstream (`ca_file`, `server_name`, client certificate), if it has any.
    pub tls: Option<RouteTls>,
    /// Requests go to the (plain) upstream as h2 with prior knowledge.
    h2c: bool,
    /// A gRPC `UNAUTHENTICATED` answer retires the token (`grpc_unauthenticated_refresh`).
    pub grpc_unauthenticated_refresh: bool,
    /// Requests in flight to the upstream's connection pool at once (`max_upstream_connections`), shared by the
    /// routes of one pool ([`RouteTable::new`]).
    pub upstream_slots: Arc<Slots>,
    /// The route's metric handles.
    pub metrics: RouteMetrics,
    /// What its token was asked for, to explain a refusal ([`super::verdict`]).
    pub expects: Expectations,
    /// The token generation of the last refusal explained (`u64::MAX`: none): one verdict per generation.
    pub last_verdict: AtomicU64,
}

/// Why a route could not be built (a token source missing for its provider).
#[derive(Debug, thiserror::Error)]
#[error("routes.{route}: {message}")]
pub struct RouteError {
    route: String,
    message: String,
}

impl Route {
    /// The host the route answers for, if it names one.
    pub fn host(&self) -> Option<&str> {
        self.host.as_deref()
    }

    /// Whether the route attaches a token of ours (its provider's, or each caller's exchanged one).
    pub fn has_tokens(&self) -> bool {
        self.tokens.is_some() || self.exchange.is_some()
    }

    /// Resolves a route config; `tokens` gives the token source of a provider name.
    pub fn new(
        config: &RouteConfig,
        tokens: &dyn Fn(&str) -> Option<TokenBinding>,
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
        let (tokens, exchange) = match &config.provider {
            Some(provider) => match tokens(provider) {
                Some(TokenBinding::Shared(tokens)) => (Some(tokens), None),
                Some(TokenBinding::PerCaller(exchange)) => (None, Some(exchange)),
                None => return Err(error(format!("no token source for provider `{provider}`"))),
            },
            None => (None, None),
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
        let origin = format!("{scheme}://{authority}").into_boxed_str();
        Ok(Route {
            name: Arc::from(config.name.as_str()),
            host: config.host.as_ref().map(|h| h.to_ascii_lowercase()),
            prefix: config.prefix.clone(),
            strip_prefix: config.strip_prefix,
            scheme,
            origin,
            authority,
            host_header,
            base_path: upstream.path().trim_end_matches('/').to_owned(),
            provider: config.provider.as_deref().map(Arc::from),
            tokens,
            exchange,
            injection,
            credential_header: match config.inject {
                Inject::Header => config.header_name.clone(),
                Inject::Query => http::header::AUTHORIZATION,
            },
            retry_on_401: config.retry_on_401,
            refusals: config.retry_on_status.clone().into_boxed_slice(),
            incoming_authorization: config.incoming_authorization,
            reject_encoded_slashes: config.encoded_slashes == EncodedSlashes::Reject,
            reject_path_parameters: config.path_parameters == PathParameters::Reject,
            tls,
            h2c: config.upstream_protocol == UpstreamProtocol::H2c,
            grpc_unauthenticated_refresh: config.grpc_unauthenticated_refresh,
            upstream_slots: Arc::new(Slots::new(config.max_upstream_connections)),
            metrics: metrics.route(&config.name),
            expects: Expectations {
                audiences: Vec::new(),
                issuer: None,
                presents_certificate: config.tls.client_cert.is_some(),
            },
            last_verdict: AtomicU64::new(u64::MAX),
        })
    }

    /// Whether an answer of `status` means the token was refused (`retry_on_status`, 401 by default).
    pub fn refusal(&self, status: http::StatusCode) -> bool {
        self.refusals.contains(&status.as_u16())
    }

    /// The upstream's authority when it is reached over plain HTTP/1.1 (the h1 transport's case).
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

    /// The connection pool the route's requests go through: its upstream and how it is reached (a route with TLS
    /// settings of its own has a pool of its own).
    fn pool_key(&self) -> String {
        match &self.tls {
            Some(_) => format!("route {}", self.name),
            None => format!("{}{}", self.origin, if self.h2c { " h2c" } else { "" }),
        }
    }

    /// The upstream's `host[:port]`, for logs.
    pub fn upstream_authority(&self) -> &str {
        self.authority.as_str()
    }

    /// The matching rule itself, one route at a time: the reference the index is tested against.
    #[cfg(test)]
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

/// Every route, in match order, and an index that finds a request's route in a time that does not grow with the
/// number of routes: a map from host to that host's prefixes, and the prefixes of the routes without a host. A
/// lookup tries the path's own segment boundaries, longest first, in those maps (see [`Prefixes::longest`]).
pub struct RouteTable {
    routes: Vec<Route>,
    by_host: Map<Prefixes>,
    hostless: Prefixes,
    has_hostless: bool,
}

/// The index's maps: string keys of the config, looked up with request text. Hashed with foldhash, several times
/// faster than SipHash on short keys; nothing a caller sends is ever inserted, so there is no flooding to resist.
type Map<V> = HashMap<Box<str>, V, foldhash::fast::RandomState>;

/// The prefixes of one host's routes (or of the routes without a host), each with its route's index.
#[derive(Default)]
struct Prefixes {
    /// Prefixes other than `/`.
    by_prefix: Map<usize>,
    /// `lengths[n]`: some prefix is `n` bytes long (most path boundaries need no map lookup).
    lengths: Vec<bool>,
    /// The route with prefix `/`, which matches every path.
    root: Option<usize>,
}

impl Prefixes {
    fn insert(&mut self, prefix: &str, index: usize) {
        if prefix == "/" {
            self.root.get_or_insert(index);
            return;
        }
        // The first in match order wins, as in a scan (a duplicate host and prefix is refused at config load).
        self.by_prefix.entry(Box::from(prefix)).or_insert(index);
        if self.lengths.len() <= prefix.len() {
            self.lengths.resize(prefix.len() + 1, false);
        }
        self.lengths[prefix.len()] = true;
    }

    /// The route with the longest prefix that matches `path` on whole segments: `path` itself, then `path` cut at
    /// each `/` from the right, then `/`.
    fn longest(&self, path: &str) -> Option<usize> {
        if !self.by_prefix.is_empty() {
            let bytes = path.as_bytes();
            let mut end = bytes.len();
            loop {
                if self.lengths.get(end) == Some(&true) {
                    if let Some(&index) = self.by_prefix.get(&path[..end]) {
                        return Some(index);
                    }
                }
                match bytes[..end].iter().rposition(|&b| b == b'/') {
                    Some(slash) if slash > 0 => end = slash,
                    _ => break,
                }
            }
        }
        self.root
    }
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
    /// Orders routes for matching (with a host first, then longest prefix first) and indexes them; routes that share
    /// an upstream connection pool share one bound on its requests in flight, the smallest they set.
    pub fn new(mut routes: Vec<Route>) -> RouteTable {
        let mut pools: HashMap<String, usize> = HashMap::new();
        for route in &routes {
            let limit = pools.entry(route.pool_key()).or_insert(route.upstream_slots.limit());
            *limit = (*limit).min(route.upstream_slots.limit());
        }
        let slots: HashMap<String, Arc<Slots>> =
            pools.into_iter().map(|(key, limit)| (key, Arc::new(Slots::new(limit)))).collect();
        for route in &mut routes {
            if let Some(shared) = slots.get(&route.pool_key()) {
                route.upstream_slots = Arc::clone(shared);
            }
        }
        routes.sort_by(|a, b| b.host.is_some().cmp(&a.host.is_some()).then(b.prefix.len().cmp(&a.prefix.len())));
        let mut by_host: Map<Prefixes> = Map::default();
        let mut hostless = Prefixes::default();
        for (index, route) in routes.iter().enumerate() {
            match &route.host {
                Some(host) => by_host.entry(Box::from(host.as_str())).or_default().insert(&route.prefix, index),
                None => hostless.insert(&route.prefix, index),
            }
        }
        let has_hostless = routes.iter().any(|r| r.host.is_none());
        RouteTable { routes, by_host, hostless, has_hostless }
    }

    /// The routes, in match order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The prefixes of the routes naming `host` (any case, no port).
    fn host(&self, host: &str) -> Option<&Prefixes> {
        if self.by_host.is_empty() {
            return None;
        }
        if host.bytes().any(|b| b.is_ascii_uppercase()) {
            self.by_host.get(host.to_ascii_lowercase().as_str())
        } else {
            self.by_host.get(host)
        }
    }

    /// Looks up an origin-form request by its Host header (if any) and path.
    pub fn lookup_origin(&self, host: Option<&str>, path: &str) -> Lookup<'_> {
        let named = host.map(host_without_port).and_then(|host| self.host(host));
        let found = named.and_then(|prefixes| prefixes.longest(path)).or_else(|| self.hostless.longest(path));
        match found {
            Some(index) => Lookup::Route(&self.routes[index]),
            None if named.is_some() || self.has_hostless => Lookup::NoRoute,
            None => Lookup::HostNotAllowed,
        }
    }

    /// Looks up an absolute-form request: only routes naming the URI's host qualify.
    pub fn lookup_absolute(&self, host: &str, path: &str) -> Lookup<'_> {
        match self.host(host) {
            Some(prefixes) => {
                prefixes.longest(path).map_or(Lookup::NoRoute, |index| Lookup::Route(&self.routes[index]))
            }
            None => Lookup::HostNotAllowed,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The reference: a scan of the routes in match order (how lookups were made before the index).
    fn scan<'a>(table: &'a RouteTable, host: Option<&str>, path: &str, absolute: bool) -> Lookup<'a> {
        let host = if absolute { host } else { host.map(host_without_port) };
        let mut host_known = false;
        for route in &table.routes {
            let host_ok = match (&route.host, host) {
                (None, _) => !absolute,
                (Some(rh), Some(h)) => rh.eq_ignore_ascii_case(h),
                (Some(_), None) => false,
            };
            host_known |= host_ok;
            if host_ok && route.matches_path(path) {
                return Lookup::Route(route);
            }
        }
        if host_known || (table.has_hostless && !absolute) {
            Lookup::NoRoute
        } else {
            Lookup::HostNotAllowed
        }
    }

    fn outcome(lookup: Lookup<'_>) -> String {
        match lookup {
            Lookup::Route(route) => format!("route {}", route.name),
            Lookup::NoRoute => "no route".into(),
            Lookup::HostNotAllowed => "host not allowed".into(),
        }
    }

    fn table(routes: &[(Option<&str>, String)]) -> RouteTable {
        let mut toml = String::new();
        for (i, (host, prefix)) in routes.iter().enumerate() {
            toml.push_str(&format!(
                "[[routes]]\nname = \"r{i}\"\nprefix = \"{prefix}\"\nupstream = \"http://127.0.0.1:9\"\n"
            ));
            if let Some(host) = host {
                toml.push_str(&format!("host = \"{host}\"\n"));
            }
        }
        let config = crate::config::Config::from_toml_str(&toml, "routes.toml").expect("a valid table");
        let (metrics, client) = (Metrics::new(), UpstreamClient::new(1).expect("client"));
        let none = |_: &str| None;
        RouteTable::new(config.routes.iter().map(|r| Route::new(r, &none, &metrics, &client).unwrap()).collect())
    }

    const HOSTS: [&str; 3] = ["a.example", "b.example", "[::1]"];
    const SEGMENTS: [&str; 5] = ["api", "v1", "orders", "x", "api.v2"];

    fn path() -> impl Strategy<Value = String> {
        (prop::collection::vec(prop::sample::select(&SEGMENTS[..]), 0..4), any::<bool>())
            .prop_map(|(segments, slash)| format!("/{}{}", segments.join("/"), if slash { "/" } else { "" }))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn the_index_finds_what_a_scan_in_match_order_finds(
            routes in prop::collection::vec((prop::option::of(prop::sample::select(&HOSTS[..])), path()), 1..12),
            requests in prop::collection::vec((prop::option::of(prop::sample::select(&["a.example", "A.Example:8080", "b.example:1", "c.example", "[::1]:8080", "[::1]"][..])), path()), 1..16),
        ) {
            // A duplicate host and prefix is refused at config load; keep the first.
            let mut seen = std::collections::HashSet::new();
            let routes: Vec<_> = routes
                .into_iter()
                .map(|(host, prefix)| (host, match prefix.trim_end_matches('/') { "" => "/".to_owned(), p => p.to_owned() }))
                .filter(|(host, prefix)| seen.insert((*host, prefix.clone())))
                .collect();
            let table = table(&routes);
            for (host, path) in &requests {
                prop_assert_eq!(
                    outcome(table.lookup_origin(*host, path)),
                    outcome(scan(&table, *host, path, false)),
                    "origin-form {:?} {}", host, path
                );
                if let Some(host) = host {
                    let bare = host_without_port(host);
                    prop_assert_eq!(
                        outcome(table.lookup_absolute(bare, path)),
                        outcome(scan(&table, Some(bare), path, true)),
                        "absolute-form {} {}", bare, path
                    );
                }
            }
        }
    }

    #[test]
    fn prefixes_match_whole_segments_and_the_longest_wins() {
        let table = table(&[
            (None, "/".into()),
            (None, "/orders".into()),
            (None, "/orders/archive".into()),
            (Some("a.example"), "/orders".into()),
        ]);
        let at = |host, path| outcome(table.lookup_origin(host, path));
        assert_eq!(at(None, "/ordersx"), "route r0");
        assert_eq!(at(None, "/orders"), "route r1");
        assert_eq!(at(None, "/orders/"), "route r1");
        assert_eq!(at(None, "/orders/archive/1"), "route r2");
        assert_eq!(at(None, "/orders/archived"), "route r1");
        assert_eq!(at(Some("A.EXAMPLE:8080"), "/orders/archive"), "route r3", "a host route comes first");
        assert_eq!(at(Some("a.example"), "/other"), "route r0", "then the routes without a host");
        assert_eq!(outcome(table.lookup_absolute("b.example", "/orders")), "host not allowed");
        assert_eq!(outcome(table.lookup_absolute("a.example", "/other")), "no route");
    }
}

#[cfg(test)]
mod upstream_limits {
    use super::*;

    #[test]
    fn routes_of_one_pool_share_the_smallest_bound_and_other_pools_have_their_own() {
        let toml = "[[routes]]\nname = \"a\"\nprefix = \"/a\"\nupstream = \"http://127.0.0.1:9\"\nmax_upstream_connections = 8\n\
                    [[routes]]\nname = \"b\"\nprefix = \"/b\"\nupstream = \"http://127.0.0.1:9/base\"\nmax_upstream_connections = 3\n\
                    [[routes]]\nname = \"c\"\nprefix = \"/c\"\nupstream = \"http://127.0.0.1:10\"\n\
                    [[routes]]\nname = \"d\"\nprefix = \"/d\"\nupstream = \"http://127.0.0.1:9\"\nupstream_protocol = \"h2c\"\n";
        let config = crate::config::Config::from_toml_str(toml, "routes.toml").expect("a valid table");
        let (metrics, client) = (Metrics::new(), UpstreamClient::new(1).expect("client"));
        let none = |_: &str| None;
        let table =
            RouteTable::new(config.routes.iter().map(|r| Route::new(r, &none, &metrics, &client).unwrap()).collect());
        let route = |name: &str| table.routes().iter().find(|r| &*r.name == name).unwrap();
        assert!(Arc::ptr_eq(&route("a").upstream_slots, &route("b").upstream_slots), "one pool, one bound");
        assert_eq!((route("a").upstream_slots.limit(), route("a").upstream_slots.available()), (3, 3));
        assert_eq!(route("c").upstream_slots.limit(), 256, "another upstream: the default");
        assert!(!Arc::ptr_eq(&route("a").upstream_slots, &route("d").upstream_slots), "h2c is another pool");
    }
}
