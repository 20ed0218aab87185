//! `[[routes]]`: which requests go where with which provider's token, and the checks across routes.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv6Addr;
use std::path::PathBuf;

use figment::value::{Tag, Value};
use http::HeaderName;

use super::reader::{self, KeyPath, Leaf, Reader, Table};
use super::values::{http_url, is_valid_name, value_or, UrlUse, NAME_RULE};
use super::{
    AssertionDialect, EncodedSlashes, Grant, IncomingAuthorization, Inject, PathParameters, ProviderConfig,
    RouteConfig, RouteProfile, SubjectSource, UpstreamProtocol, UpstreamTlsConfig,
};

/// Default of `routes[N].scheme`.
const DEFAULT_SCHEME: &str = "Bearer";

/// Default of `routes[N].query_param`.
const DEFAULT_QUERY_PARAM: &str = "access_token";

/// Values of `inject`.
const INJECTS: &[(&str, Inject)] = &[("header", Inject::Header), ("query", Inject::Query)];

/// Values of `incoming_authorization`.
const INCOMING: &[(&str, IncomingAuthorization)] = &[
    ("replace", IncomingAuthorization::Replace),
    ("keep", IncomingAuthorization::Keep),
    ("reject", IncomingAuthorization::Reject),
];

/// Values of `upstream_protocol`.
const PROTOCOLS: &[(&str, UpstreamProtocol)] = &[("http1", UpstreamProtocol::Http1), ("h2c", UpstreamProtocol::H2c)];

/// Values of `encoded_slashes`.
const ENCODED_SLASHES: &[(&str, EncodedSlashes)] =
    &[("keep", EncodedSlashes::Keep), ("reject", EncodedSlashes::Reject)];

/// `max_upstream_connections` when a route does not set it.
pub const DEFAULT_MAX_UPSTREAM_CONNECTIONS: usize = 256;

/// Values of `path_parameters`.
const PATH_PARAMETERS: &[(&str, PathParameters)] =
    &[("normalize", PathParameters::Normalize), ("reject", PathParameters::Reject)];

/// Route keys that only mean something when the route attaches a token.
const TOKEN_KEYS: &[&str] = &[
    "inject",
    "header_name",
    "scheme",
    "query_param",
    "retry_on_401",
    "retry_on_status",
    "incoming_authorization",
    "grpc_unauthenticated_refresh",
    "upstream_client_cert",
    "scope",
    "audience",
    "resource",
    "extra_params",
];

/// Route keys that make a route profile: token parameters over the provider's.
const PROFILE_KEYS: &[&str] = &["scope", "audience", "resource", "extra_params"];

/// Values of `upstream_client_cert`: whose client certificate the route presents to its upstream.
const CLIENT_CERT_SOURCES: &[(&str, ())] = &[("provider", ())];

/// Route keys about TLS to the upstream, only meaningful for an `https` upstream.
const TLS_KEYS: &[&str] = &["ca_file", "server_name", "client_cert_file", "client_key_file", "upstream_client_cert"];

/// Headers that cannot carry a token: hop-by-hop (stripped on the way) or message framing.
const RESERVED_HEADERS: &[&str] = &[
    "connection",
    "content-length",
    "host",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The problem when there is no route; one line, like every problem.
const NO_ROUTES: &str =
    "no routes are defined; add at least one [[routes]] table with `upstream` (and `prefix` or `host`), e.g. [[routes]] prefix = \"/\" upstream = \"http://127.0.0.1:3000\"";

/// A route as read, with what the duplicate checks need to report on it.
struct ReadRoute {
    config: RouteConfig,
    path: KeyPath,
    tag: Tag,
    /// Where `name` was set; `None` when the name is the default (host + prefix).
    name_leaf: Option<Leaf<String>>,
}

/// The providers a route may name: all defined (`names`, valid or not) and the valid ones as read.
pub(super) struct Providers<'a> {
    pub names: &'a [String],
    pub valid: &'a BTreeMap<String, ProviderConfig>,
}

/// Reads `[[routes]]` in file order.
pub(super) fn routes(r: &mut Reader<'_>, root: &mut Table<'_>, providers: &Providers<'_>) -> Vec<RouteConfig> {
    let Some(field) = root.field("routes") else {
        r.report_missing(root, "routes", NO_ROUTES);
        return Vec::new();
    };
    let items = match field.value {
        Value::Array(_, items) if !items.is_empty() => items,
        Value::Array(..) => {
            r.report_field(&field, NO_ROUTES);
            return Vec::new();
        }
        Value::Dict(..) => {
            r.report_field(&field, "expected an array of tables; write [[routes]] (two brackets) before each route");
            return Vec::new();
        }
        other => {
            let message = format!("expected an array of tables ([[routes]]), found {}", reader::kind(other));
            r.report_field(&field, message);
            return Vec::new();
        }
    };
    let mut read = Vec::new();
    for (index, item) in items.iter().enumerate() {
        let path = field.path.index(index);
        let Value::Dict(tag, dict) = item else {
            let message = format!("expected a table, found {}", reader::kind(item));
            r.report(&path, item.tag(), message);
            continue;
        };
        let mut t = Table::new(path.clone(), *tag, dict);
        let route = route(r, &mut t, providers);
        r.finish(t);
        if let Some((config, name_leaf)) = route {
            read.push(ReadRoute { config, path, tag: *tag, name_leaf });
        }
    }
    check_duplicates(r, &read);
    read.into_iter().map(|route| route.config).collect()
}

/// Two routes with the same host and prefix, or the same name, are an error (maps: thousands of routes load fast).
fn check_duplicates(r: &mut Reader<'_>, routes: &[ReadRoute]) {
    let mut places: HashMap<(Option<&str>, &str), &ReadRoute> = HashMap::with_capacity(routes.len());
    let mut names: HashMap<&str, &ReadRoute> = HashMap::with_capacity(routes.len());
    let mut intercepts: HashMap<&str, &ReadRoute> = HashMap::new();
    for route in routes {
        let c = &route.config;
        if let Some(host) = c.host.as_deref() {
            match intercepts.get(host) {
                Some(first) if first.config.intercept != c.intercept => {
                    let message = format!(
                        "`intercept` must be the same on every route of host `{host}` ({} sets it to {})",
                        first.path, first.config.intercept
                    );
                    r.report(&route.path, route.tag, message);
                }
                Some(_) => {}
                None => {
                    intercepts.insert(host, route);
                }
            }
        }
        if let Some(first) = places.get(&(c.host.as_deref(), c.prefix.as_str())) {
            let message = format!(
                "same host and prefix (`{}{}`) as {}; only one of them could ever match",
                c.host.as_deref().unwrap_or(""),
                c.prefix,
                first.path
            );
            r.report(&route.path, route.tag, message);
            continue;
        }
        places.insert((c.host.as_deref(), c.prefix.as_str()), route);
        if let Some(first) = names.get(c.name.as_str()) {
            let message = format!("route name `{}` is already used by {}", c.name, first.path);
            match &route.name_leaf {
                Some(leaf) => r.report_leaf(leaf, message),
                None => r.report(&route.path, route.tag, message),
            }
        } else {
            names.insert(c.name.as_str(), route);
        }
    }
}

/// Reads one route; `None` when it has problems (already reported). Also returns where `name` was set.
fn route(
    r: &mut Reader<'_>,
    t: &mut Table<'_>,
    providers: &Providers<'_>,
) -> Option<(RouteConfig, Option<Leaf<String>>)> {
    let provider_names = providers.names;
    let before = r.problem_count();
    let name = r.get(t, "name", route_name);
    let host = r.get(t, "host", route_host);
    let prefix = r.get(t, "prefix", route_prefix);
    let upstream = r.require(
        t,
        "upstream",
        "missing; set the base URL requests are forwarded to, e.g. upstream = \"https://orders.internal:8443\"",
        |v| http_url(v, UrlUse::Upstream),
    );
    let strip_prefix = r.get(t, "strip_prefix", reader::boolean);
    let intercept = r.get(t, "intercept", reader::boolean);
    if let Some(leaf) = intercept.as_ref().filter(|leaf| leaf.value) {
        match &host {
            None => r.report_leaf(
                leaf,
                "needs `host`: a CONNECT is intercepted for the host a route names (docs/local-dev.md)".to_owned(),
            ),
            Some(host) if host.value.parse::<std::net::IpAddr>().is_ok() || host.value.starts_with('[') => {
                r.report_leaf(leaf, format!("`{}` is an IP address: only DNS names are intercepted", host.value))
            }
            Some(_) => {}
        }
    }
    let provider = r.get(t, "provider", reader::non_empty_string);
    if let Some(leaf) = provider.as_ref().filter(|leaf| !provider_names.contains(&leaf.value)) {
        let defined = if provider_names.is_empty() {
            "no providers are defined".to_owned()
        } else {
            format!("defined: {}", provider_names.join(", "))
        };
        let message = format!("no provider named `{}` ({defined})", leaf.value);
        r.report_leaf(leaf, message);
    }
    let inject = r.get(t, "inject", reader::choice(INJECTS));
    let header_name = r.get(t, "header_name", header_name);
    let scheme = r.get(t, "scheme", auth_scheme);
    let query_param = r.get(t, "query_param", reader::non_empty_string);
    let retry_on_401 = r.get(t, "retry_on_401", reader::boolean);
    let incoming_authorization = r.get(t, "incoming_authorization", reader::choice(INCOMING));
    let encoded_slashes = r.get(t, "encoded_slashes", reader::choice(ENCODED_SLASHES));
    let path_parameters = r.get(t, "path_parameters", reader::choice(PATH_PARAMETERS));
    let ca_file = r.file(t, "ca_file");
    let server_name = r.get(t, "server_name", server_name);
    let client_cert_file = r.file(t, "client_cert_file");
    let client_key_file = r.file(t, "client_key_file");
    match (t.has("client_cert_file"), t.has("client_key_file")) {
        (true, false) => r.report_missing(t, "client_key_file", "missing; `client_cert_file` needs its private key"),
        (false, true) => r.report_missing(t, "client_cert_file", "missing; `client_key_file` needs its certificate"),
        _ => {}
    }
    let provider_client_cert = upstream_client_cert(r, t, provider.as_ref(), providers.valid);
    let profile = profile(r, t, provider.as_ref(), providers.valid);
    let per_caller = provider
        .as_ref()
        .and_then(|leaf| providers.valid.get(&leaf.value))
        .and_then(|p| p.exchange.as_ref())
        .is_some_and(|e| e.subject == SubjectSource::Request);
    if per_caller {
        if let Some(leaf) = incoming_authorization.as_ref().filter(|l| l.value != IncomingAuthorization::Replace) {
            r.report_leaf(
                leaf,
                "this route's provider exchanges the caller's own token (subject_token_source = \"request\"): the \
                 caller's Authorization header is the subject, consumed by the exchange and never forwarded; remove it",
            );
        }
        if let Some(field) = PROFILE_KEYS.iter().find_map(|key| t.field(key)) {
            r.report_field(&field, "route profiles are not available on a provider that exchanges each caller's token");
        }
    }
    let retry_on_status = r.get(t, "retry_on_status", status_list);
    let upstream_protocol = r.get(t, "upstream_protocol", reader::choice(PROTOCOLS));
    let grpc_unauthenticated_refresh = r.get(t, "grpc_unauthenticated_refresh", reader::boolean);
    let max_upstream_connections = r.get(t, "max_upstream_connections", reader::positive_count);
    if let (Some(leaf), Some(upstream)) = (&upstream_protocol, &upstream) {
        if leaf.value == UpstreamProtocol::H2c && upstream.value.scheme() == "https" {
            r.report_leaf(leaf, "h2c is HTTP/2 over plain TCP; an https upstream gets h2 by ALPN when it offers it");
        }
    }
    if upstream.as_ref().is_some_and(|upstream| upstream.value.scheme() != "https") {
        for key in TLS_KEYS {
            if let Some(field) = t.field(key) {
                r.report_field(&field, "only used with an https upstream; this route's upstream is plain http");
            }
        }
    }
    let inject = value_or(inject, Inject::Header);
    // A DPoP token goes as `Authorization: DPoP <token>` beside its proof (RFC 9449 §7.1): nowhere else.
    if provider.as_ref().and_then(|leaf| providers.valid.get(&leaf.value)).is_some_and(|p| p.dpop) {
        let elsewhere = |key: &str| match key {
            "inject" => inject == Inject::Query,
            "header_name" => header_name.as_ref().is_some_and(|leaf| leaf.value != http::header::AUTHORIZATION),
            // `Bearer` is the default spelling (printed by `check`); the token goes as `DPoP` then.
            "scheme" => scheme.as_ref().is_some_and(|leaf| !leaf.value.eq_ignore_ascii_case(DEFAULT_SCHEME)),
            _ => true,
        };
        for key in ["inject", "header_name", "scheme", "query_param"] {
            if let Some(field) = t.field(key).filter(|_| elsewhere(key)) {
                r.report_field(
                    &field,
                    "this route's provider uses DPoP (dpop = true): its tokens go in `Authorization: DPoP …` with a \
                     proof beside them, nowhere else; remove this key",
                );
            }
        }
    }

    // Keys that would silently do nothing are errors, like unknown keys.
    if !t.has("provider") {
        for key in TOKEN_KEYS {
            if let Some(field) = t.field(key) {
                r.report_field(&field, "only used with `provider`; this route has none (a plain pass-through)");
            }
        }
    } else if inject == Inject::Query {
        for key in ["header_name", "scheme"] {
            if let Some(field) = t.field(key) {
                r.report_field(
                    &field,
                    "only used with inject = \"header\"; this route puts the token in the query (`query_param`)",
                );
            }
        }
    } else if let Some(field) = t.field("query_param") {
        r.report_field(
            &field,
            "only used with inject = \"query\"; this route puts the token in a header (`header_name`)",
        );
    }

    if r.problem_count() > before {
        return None;
    }
    let host = host.map(|leaf| leaf.value);
    let prefix = value_or(prefix, "/".to_owned());
    let default_name = format!("{}{prefix}", host.as_deref().unwrap_or(""));
    let config = RouteConfig {
        name: name.as_ref().map_or(default_name, |leaf| leaf.value.clone()),
        host,
        prefix,
        upstream: upstream?.value,
        strip_prefix: value_or(strip_prefix, false),
        intercept: value_or(intercept, false),
        provider: provider.map(|leaf| leaf.value),
        profile,
        inject,
        header_name: value_or(header_name, http::header::AUTHORIZATION),
        scheme: value_or(scheme, DEFAULT_SCHEME.to_owned()),
        query_param: value_or(query_param, DEFAULT_QUERY_PARAM.to_owned()),
        retry_on_401: value_or(retry_on_401, true),
        incoming_authorization: value_or(incoming_authorization, IncomingAuthorization::Replace),
        encoded_slashes: value_or(encoded_slashes, EncodedSlashes::Keep),
        path_parameters: value_or(path_parameters, PathParameters::Normalize),
        tls: UpstreamTlsConfig {
            ca_file: ca_file.map(|leaf| leaf.value),
            server_name: server_name.map(|leaf| leaf.value),
            client_cert: client_cert_file
                .zip(client_key_file)
                .map(|(cert, key)| (cert.value, key.value))
                .or(provider_client_cert),
        },
        retry_on_status: retry_on_status.map_or_else(|| vec![401], |leaf| leaf.value),
        upstream_protocol: value_or(upstream_protocol, UpstreamProtocol::Http1),
        grpc_unauthenticated_refresh: value_or(grpc_unauthenticated_refresh, false),
        max_upstream_connections: value_or(max_upstream_connections, DEFAULT_MAX_UPSTREAM_CONNECTIONS),
    };
    Some((config, name))
}

/// A route's token parameters over its provider's (`scope`, `audience`, `resource`, `extra_params`), checked against
/// what the provider can do. `None` when the route sets none of them (or they are reported).
fn profile(
    r: &mut Reader<'_>,
    t: &mut Table<'_>,
    provider: Option<&Leaf<String>>,
    providers: &BTreeMap<String, ProviderConfig>,
) -> Option<RouteProfile> {
    let scope = r.get(t, "scope", reader::non_empty_string);
    let audience = r.get(t, "audience", reader::non_empty_string);
    let resource = r.get(t, "resource", reader::non_empty_string);
    let extra_params =
        if t.has("extra_params") { super::providers::extra_params(r, t, "route") } else { BTreeMap::new() };
    // Without `provider` the keys are reported as token keys; an unknown or invalid provider is reported already.
    let provider = providers.get(&provider?.value)?;
    let first = PROFILE_KEYS.iter().find_map(|key| t.field(key))?;
    if provider.grant == Grant::RefreshToken {
        let message = format!(
            "a route profile gets tokens of its own from its provider, and provider `{}` holds one refresh-token \
             session (grant = \"refresh_token\") that each profile would rotate from under the others; define a \
             provider per session instead",
            provider.name
        );
        r.report_field(&first, message);
        return None;
    }
    if let Some(leaf) = scope
        .as_ref()
        .filter(|_| provider.grant == Grant::JwtBearer && provider.assertion_dialect == AssertionDialect::Salesforce)
    {
        r.report_leaf(
            leaf,
            "Salesforce's JWT bearer flow takes no scope (the connected app's scopes apply); remove it",
        );
        return None;
    }
    Some(RouteProfile {
        provider: provider.name.clone(),
        scope: scope.map(|leaf| leaf.value),
        audience: audience.map(|leaf| leaf.value),
        resource: resource.map(|leaf| leaf.value),
        extra_params,
    })
}

/// Gives every route with a profile its slot: a provider named `PROVIDER[ROUTE]` (after the first route with that
/// profile on that provider; routes with the same profile share it) with the profile's settings over the provider's.
/// A profile that changes nothing uses the provider itself.
pub(super) fn derive_profiles(providers: &mut BTreeMap<String, ProviderConfig>, routes: &mut [RouteConfig]) {
    let mut derived: Vec<(ProviderConfig, String)> = Vec::new();
    for route in routes.iter_mut() {
        let Some(profile) = &route.profile else { continue };
        let Some(base) = providers.get(&profile.provider) else { continue };
        let settings = profile.apply(base);
        if settings == *base {
            continue;
        }
        let name = match derived.iter().find(|(known, _)| *known == settings) {
            Some((_, name)) => name.clone(),
            None => {
                let name = format!("{}[{}]", profile.provider, route.name);
                derived.push((settings.clone(), name.clone()));
                name
            }
        };
        route.provider = Some(name);
    }
    for (mut settings, name) in derived {
        settings.profile_of = Some(settings.name.clone());
        settings.name.clone_from(&name);
        providers.insert(name, settings);
    }
}

/// `upstream_client_cert = "provider"`: the route presents its provider's client certificate (`client_cert_file` /
/// `client_key_file` of the provider) to the upstream, so that a token bound to that certificate (RFC 8705 §3,
/// `cnf.x5t#S256`) is accepted there. The pair is the provider's files, so a renewed certificate reaches both the
/// IdP and the upstream. Returns that pair.
fn upstream_client_cert(
    r: &mut Reader<'_>,
    t: &mut Table<'_>,
    provider: Option<&Leaf<String>>,
    providers: &BTreeMap<String, ProviderConfig>,
) -> Option<(PathBuf, PathBuf)> {
    let leaf = r.get(t, "upstream_client_cert", reader::choice(CLIENT_CERT_SOURCES))?;
    if t.has("client_cert_file") || t.has("client_key_file") {
        r.report_leaf(
            &leaf,
            "a route presents either its own client certificate (client_cert_file, client_key_file) or its \
             provider's (upstream_client_cert = \"provider\"), not both; remove one",
        );
        return None;
    }
    // Without `provider` the key is reported as a token key; an unknown or invalid provider is reported already.
    let provider = providers.get(&provider?.value)?;
    match (&provider.client_cert_file, &provider.client_key_file) {
        (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
        _ => {
            let message = format!(
                "provider `{}` has no client certificate to present; set its client_cert_file and client_key_file \
                 (with client_auth = \"tls_client_auth\" or \"self_signed_tls_client_auth\" the IdP binds tokens to it)",
                provider.name
            );
            r.report_leaf(&leaf, message);
            None
        }
    }
}

/// `server_name`: a DNS name or an IP address, as TLS verifies it.
fn server_name(value: &Value) -> Result<String, String> {
    let name = reader::non_empty_string(value)?;
    match rustls_pki_types::ServerName::try_from(name.as_str()) {
        Ok(_) => Ok(name),
        Err(_) => Err(format!("`{name}` is neither a DNS name nor an IP address")),
    }
}

/// An explicit route name.
fn route_name(value: &Value) -> Result<String, String> {
    let name = reader::string(value)?;
    if is_valid_name(&name) {
        Ok(name)
    } else {
        Err(format!("invalid route name `{name}`; {NAME_RULE}"))
    }
}

/// A host to match: lowercased, without a port; IPv6 addresses in brackets.
fn route_host(value: &Value) -> Result<String, String> {
    let host = reader::string(value)?.trim().to_ascii_lowercase();
    if host.is_empty() {
        return Err("must not be empty; remove the key to match any host".to_owned());
    }
    if host.contains('/') {
        return Err("expected a host name such as \"orders.internal\", not a URL or a path".to_owned());
    }
    if host.contains('*') {
        return Err("wildcard hosts are not supported; give each host a route of its own".to_owned());
    }
    if let Ok(ip) = host.parse::<Ipv6Addr>() {
        return Ok(format!("[{ip}]"));
    }
    let has_port = match host.strip_prefix('[') {
        Some(rest) => rest.split_once(']').is_some_and(|(_, after)| !after.is_empty()),
        None => host.contains(':'),
    };
    if has_port {
        return Err(format!(
            "give the host without a port (`{}`); the port is ignored when matching",
            host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h)
        ));
    }
    url::Host::parse(&host).map(|parsed| parsed.to_string()).map_err(|e| format!("invalid host `{host}`: {e}"))
}

/// A path prefix: starts with `/`; trailing slashes are dropped (`/orders/` is `/orders`).
fn route_prefix(value: &Value) -> Result<String, String> {
    let prefix = reader::string(value)?;
    if !prefix.starts_with('/') {
        return Err(format!("must start with `/`, e.g. \"/{}\"", prefix.trim_start_matches('/')));
    }
    if prefix.chars().any(|c| c == '?' || c == '#' || c.is_whitespace() || c.is_control()) {
        return Err("must be a plain path, without query, fragment or whitespace".to_owned());
    }
    let trimmed = prefix.trim_end_matches('/');
    Ok(if trimmed.is_empty() { "/" } else { trimmed }.to_owned())
}

/// The header that carries the token: a valid name that survives the trip upstream.
fn header_name(value: &Value) -> Result<HeaderName, String> {
    let text = reader::string(value)?;
    let name =
        HeaderName::from_bytes(text.trim().as_bytes()).map_err(|_| format!("`{text}` is not a valid header name"))?;
    if RESERVED_HEADERS.contains(&name.as_str()) {
        return Err(format!("`{name}` cannot carry a token: it is a hop-by-hop or message-framing header"));
    }
    Ok(name)
}

/// An HTTP authentication scheme (an RFC 9110 token), or empty for the raw token.
fn auth_scheme(value: &Value) -> Result<String, String> {
    let scheme = reader::string(value)?;
    let is_tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if scheme.chars().all(is_tchar) {
        Ok(scheme)
    } else {
        Err("must be an auth scheme such as \"Bearer\" (no spaces), or \"\" to send the raw token".to_owned())
    }
}

/// `retry_on_status`: a list of 4xx statuses (`[401, 403]`).
fn status_list(value: &Value) -> Result<Vec<u16>, String> {
    let Value::Array(_, items) = value else {
        return Err(format!("expected a list of statuses such as [401, 403], found {}", reader::kind(value)));
    };
    let mut statuses = Vec::with_capacity(items.len());
    for item in items {
        let status = reader::count(item).ok().and_then(|n| u16::try_from(n).ok()).filter(|n| (400..500).contains(n));
        match status {
            Some(status) => statuses.push(status),
            None => return Err("each status must be a 4xx code (the token was refused), e.g. 401 or 403".to_owned()),
        }
    }
    if statuses.is_empty() {
        return Err("an empty list replays nothing: set retry_on_401 = false instead".to_owned());
    }
    Ok(statuses)
}
