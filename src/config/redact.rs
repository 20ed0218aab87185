//! How the resolved configuration is printed (`tokenproxy check`): as TOML that loads back into the same
//! configuration, with durations as `"30s"` strings, sizes as `"64KiB"` or plain bytes, and every inline secret
//! as `[redacted]` (a `_file` path or `_env` variable name is shown: it is where the secret is, not the secret).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Serialize, Serializer};
use url::Url;

use super::{
    AssertionAlgorithm, AssertionClaims, AssertionDialect, AssertionKeyId, ClientAuth, DpopAlgorithm, DuringRefresh,
    EncodedSlashes, ExchangeDialect, Grant, IncomingAuthorization, Inject, PathParameters, ProviderConfig, RedisServer,
    RouteConfig, SecretSource, SinkFormat, StateConfig, SubjectSource, UpstreamProtocol,
};

/// What `[state]` prints as: the shared store's keys only with `store = "redis"`, its password as the key it was
/// given by, never the encryption keys (only their file).
#[derive(Serialize)]
struct StateView<'a> {
    dir: &'a Path,
    #[serde(skip_serializing_if = "Option::is_none")]
    store: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_url: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_sentinels: Option<Vec<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_sentinel_master: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_username: Option<&'a str>,
    #[serde(flatten)]
    secrets: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_prefix: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    encryption_key_file: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_timeout: Option<String>,
    allow_shared_dir: bool,
}

impl Serialize for StateConfig {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let shared = self.shared.as_ref();
        StateView {
            dir: &self.dir,
            store: shared.map(|_| "redis"),
            redis_url: shared.and_then(|s| match &s.server {
                RedisServer::Url(url) => Some(url.as_str()),
                RedisServer::Sentinel { .. } => None,
            }),
            redis_sentinels: shared.and_then(|s| match &s.server {
                RedisServer::Sentinel { sentinels, .. } => Some(sentinels.iter().map(Url::as_str).collect()),
                RedisServer::Url(_) => None,
            }),
            redis_sentinel_master: shared.and_then(|s| match &s.server {
                RedisServer::Sentinel { master, .. } => Some(master.as_str()),
                RedisServer::Url(_) => None,
            }),
            redis_username: shared.and_then(|s| s.redis_username.as_deref()),
            secrets: SecretView { key: "redis_password", source: shared.and_then(|s| s.redis_password.as_ref()) }
                .entries()
                .into_iter()
                .collect(),
            key_prefix: shared.map(|s| s.key_prefix.as_str()),
            encryption_key_file: shared.map(|s| s.encryption_key_file.as_path()),
            redis_timeout: shared.map(|s| humantime::format_duration(s.timeout).to_string()),
            allow_shared_dir: self.allow_shared_dir,
        }
        .serialize(serializer)
    }
}

/// Serializes the configured providers, not the slots of route profiles (the routes' keys make those).
pub(super) fn configured_providers<S: Serializer>(
    providers: &BTreeMap<String, ProviderConfig>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_map(providers.iter().filter(|(_, provider)| provider.profile_of.is_none()))
}

/// Serializes a duration as a humantime string: `"30s"`, `"5m"`, `"1m 30s"`.
pub(super) fn duration<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&humantime::format_duration(*value).to_string())
}

/// Serializes a byte count as `"64KiB"`/`"1MiB"`/`"1GiB"` when it is a whole number of those, else as bytes.
pub(super) fn size<S: Serializer>(value: &usize, serializer: S) -> Result<S::Ok, S::Error> {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    let bytes = *value as u64;
    match UNITS.iter().find(|(unit, _)| bytes != 0 && bytes.is_multiple_of(*unit)) {
        Some((unit, name)) => serializer.serialize_str(&format!("{}{name}", bytes / unit)),
        None => serializer.serialize_u64(bytes),
    }
}

/// A secret of a section that prints itself (`telemetry.headers`): redacted, or where it is read from.
pub(super) fn secret_source<S: Serializer>(source: &Option<SecretSource>, serializer: S) -> Result<S::Ok, S::Error> {
    match source {
        None => serializer.serialize_none(),
        Some(SecretSource::Inline(secret)) => serializer.serialize_str(&secret.to_string()),
        Some(SecretSource::File(path)) => serializer.serialize_str(&format!("(from the file {})", path.display())),
        Some(SecretSource::Env(var)) => serializer.serialize_str(&format!("(from ${var})")),
    }
}

/// A secret as the key it was given by: `x = "[redacted]"`, `x_file = "path"` or `x_env = "VAR"`.
struct SecretView<'a> {
    key: &'static str,
    source: Option<&'a SecretSource>,
}

impl SecretView<'_> {
    fn entries(&self) -> Vec<(String, String)> {
        match self.source {
            None => Vec::new(),
            Some(SecretSource::Inline(secret)) => vec![(self.key.to_owned(), secret.to_string())],
            Some(SecretSource::File(path)) => vec![(format!("{}_file", self.key), path.display().to_string())],
            Some(SecretSource::Env(var)) => vec![(format!("{}_env", self.key), var.clone())],
        }
    }
}

/// What a provider prints as: secrets as the key they were given by, keys with default values included.
#[derive(Serialize)]
struct ProviderView<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    token_url: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    issuer: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    device_authorization_endpoint: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    revocation_endpoint: Option<&'a str>,
    grant: Grant,
    client_id: &'a str,
    #[serde(flatten)]
    secrets: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    username: Option<&'a str>,
    client_auth: ClientAuth,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    audience: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resource: Option<&'a str>,
    refresh_at: f64,
    #[serde(serialize_with = "duration")]
    expiry_skew: Duration,
    #[serde(serialize_with = "duration")]
    min_refresh_interval: Duration,
    #[serde(serialize_with = "duration")]
    default_lifetime: Duration,
    #[serde(serialize_with = "duration")]
    timeout: Duration,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_token_calls: Option<&'a str>,
    #[serde(serialize_with = "duration")]
    unauthorized_refresh_interval: Duration,
    #[serde(serialize_with = "duration")]
    manual_refresh_interval: Duration,
    during_refresh: DuringRefresh,
    #[serde(skip_serializing_if = "Option::is_none")]
    ca_file: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_cert_file: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_key_file: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    private_key_file: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    assertion_audience: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    assertion_algorithm: Option<AssertionAlgorithm>,
    #[serde(skip_serializing_if = "Option::is_none")]
    assertion_key_id: Option<KeyIdView<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    assertion_certificate_file: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject_token_source: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject_token_file: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject_token_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    actor_token_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    requested_token_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exchange_dialect: Option<ExchangeDialect>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_subjects: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refused_subject_ttl: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exchange_new_subjects_per_second: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exchange_max_in_flight: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject_issuer: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject_jwks_uri: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject_audience: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    vend: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    dpop: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    dpop_key_file: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dpop_algorithm: Option<DpopAlgorithm>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sink_file: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sink_format: Option<SinkFormat>,
    #[serde(skip_serializing_if = "Option::is_none")]
    assertion_dialect: Option<AssertionDialect>,
    #[serde(skip_serializing_if = "Option::is_none")]
    google_credentials_file: Option<&'a Path>,
    #[serde(skip_serializing_if = "is_default_claims")]
    assertion_claims: &'a AssertionClaims,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    extra_params: &'a BTreeMap<String, String>,
}

impl Serialize for ProviderConfig {
    /// The provider as config keys; `name` is omitted (it is the key of the table).
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let secrets = [
            SecretView { key: "client_secret", source: self.client_secret.as_ref() },
            SecretView { key: "refresh_token", source: self.refresh_token.as_ref() },
            SecretView { key: "password", source: self.password.as_ref() },
            SecretView { key: "client_assertion", source: self.client_assertion.as_ref() },
            SecretView { key: "actor_token", source: self.exchange.as_ref().and_then(|e| e.actor_token.as_ref()) },
        ]
        .iter()
        .flat_map(SecretView::entries)
        .collect();
        let exchange = self.exchange.as_ref();
        let request_exchange = exchange.filter(|e| e.subject == SubjectSource::Request);
        ProviderView {
            token_url: self.token_url.as_ref().map(|u| u.as_str()),
            issuer: self.issuer.as_ref().map(|u| u.as_str()),
            device_authorization_endpoint: self.device_authorization_endpoint.as_ref().map(|u| u.as_str()),
            revocation_endpoint: self.revocation_endpoint.as_ref().map(|u| u.as_str()),
            grant: self.grant,
            client_id: &self.client_id,
            secrets,
            username: self.username.as_deref(),
            client_auth: self.client_auth,
            scope: self.scope.as_deref(),
            audience: self.audience.as_deref(),
            resource: self.resource.as_deref(),
            refresh_at: self.refresh_at,
            expiry_skew: self.expiry_skew,
            min_refresh_interval: self.min_refresh_interval,
            default_lifetime: self.default_lifetime,
            timeout: self.timeout,
            max_token_calls: self.max_token_calls.as_ref().map(|(_, _, text)| text.as_str()),
            unauthorized_refresh_interval: self.unauthorized_refresh_interval,
            manual_refresh_interval: self.manual_refresh_interval,
            during_refresh: self.during_refresh,
            ca_file: self.ca_file.as_deref(),
            client_cert_file: self.client_cert_file.as_deref(),
            client_key_file: self.client_key_file.as_deref(),
            private_key_file: self.private_key_file.as_deref(),
            assertion_audience: self.assertion_audience.as_deref(),
            assertion_algorithm: self.assertion_algorithm,
            assertion_key_id: match &self.assertion_key_id {
                AssertionKeyId::Thumbprint => None,
                AssertionKeyId::Named(name) => Some(KeyIdView::Name(name)),
                AssertionKeyId::Omitted => Some(KeyIdView::Sent(false)),
            },
            assertion_certificate_file: self.assertion_certificate_file.as_deref(),
            subject_token_source: exchange.map(|e| match e.subject {
                SubjectSource::Request => "request",
                SubjectSource::File(_) => "file",
            }),
            subject_token_file: exchange.and_then(|e| match &e.subject {
                SubjectSource::File(path) => Some(path.as_path()),
                SubjectSource::Request => None,
            }),
            subject_token_type: exchange.map(|e| e.subject_token_type.as_str()),
            actor_token_type: exchange.filter(|e| e.actor_token.is_some()).map(|e| e.actor_token_type.as_str()),
            requested_token_type: exchange.and_then(|e| e.requested_token_type.as_deref()),
            exchange_dialect: exchange.map(|e| e.dialect),
            max_subjects: request_exchange.map(|e| e.max_subjects),
            refused_subject_ttl: request_exchange
                .map(|e| humantime::format_duration(e.refused_subject_ttl).to_string()),
            exchange_new_subjects_per_second: request_exchange.map(|e| e.new_subjects_per_second),
            exchange_max_in_flight: request_exchange.map(|e| e.max_in_flight),
            subject_issuer: request_exchange.and_then(|e| e.subject_issuer.as_ref()).map(Url::as_str),
            subject_jwks_uri: request_exchange.and_then(|e| e.subject_jwks_uri.as_ref()).map(Url::as_str),
            subject_audience: request_exchange.and_then(|e| e.subject_audience.as_deref()),
            vend: self.vend,
            dpop: self.dpop,
            dpop_key_file: self.dpop_key_file.as_deref(),
            dpop_algorithm: (self.dpop && self.dpop_key_file.is_none()).then_some(self.dpop_algorithm),
            sink_file: self.sink_file.as_deref(),
            sink_format: self.sink_file.is_some().then_some(self.sink_format),
            assertion_dialect: (self.grant == Grant::JwtBearer).then_some(self.assertion_dialect),
            google_credentials_file: self.google_credentials_file.as_deref(),
            assertion_claims: &self.assertion_claims,
            extra_params: &self.extra_params,
        }
        .serialize(serializer)
    }
}

/// What a route prints as: only the keys that apply to it, so that the output loads back without complaint.
#[derive(Serialize)]
struct RouteView<'a> {
    /// Omitted when it is the default (host + prefix), which is not a valid explicit name.
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<&'a str>,
    prefix: &'a str,
    upstream: &'a str,
    strip_prefix: bool,
    intercept: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    provider: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    inject: Option<Inject>,
    #[serde(skip_serializing_if = "Option::is_none")]
    header_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scheme: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    query_param: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_on_401: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    incoming_authorization: Option<IncomingAuthorization>,
    encoded_slashes: EncodedSlashes,
    path_parameters: PathParameters,
    #[serde(skip_serializing_if = "Option::is_none")]
    ca_file: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    server_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_cert_file: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_key_file: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_on_status: Option<&'a [u16]>,
    upstream_protocol: UpstreamProtocol,
    #[serde(skip_serializing_if = "Option::is_none")]
    grpc_unauthenticated_refresh: Option<bool>,
    max_upstream_connections: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    audience: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resource: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    extra_params: Option<&'a BTreeMap<String, String>>,
}

impl Serialize for RouteConfig {
    /// The route as config keys; token keys only when it has a provider, and only those of its `inject`.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let with_token = self.provider.is_some();
        let header = with_token && self.inject == Inject::Header;
        let query = with_token && self.inject == Inject::Query;
        let default_name = format!("{}{}", self.host.as_deref().unwrap_or(""), self.prefix);
        RouteView {
            name: (self.name != default_name).then_some(self.name.as_str()),
            host: self.host.as_deref(),
            prefix: &self.prefix,
            upstream: self.upstream.as_str(),
            strip_prefix: self.strip_prefix,
            intercept: self.intercept,
            // A route with a profile names its provider; the slot `PROVIDER[ROUTE]` is made from the keys below.
            provider: self.profile.as_ref().map(|p| p.provider.as_str()).or(self.provider.as_deref()),
            inject: with_token.then_some(self.inject),
            header_name: header.then_some(self.header_name.as_str()),
            scheme: header.then_some(self.scheme.as_str()),
            query_param: query.then_some(self.query_param.as_str()),
            retry_on_401: with_token.then_some(self.retry_on_401),
            incoming_authorization: with_token.then_some(self.incoming_authorization),
            encoded_slashes: self.encoded_slashes,
            path_parameters: self.path_parameters,
            ca_file: self.tls.ca_file.as_deref(),
            server_name: self.tls.server_name.as_deref(),
            client_cert_file: self.tls.client_cert.as_ref().map(|(cert, _)| cert.as_path()),
            client_key_file: self.tls.client_cert.as_ref().map(|(_, key)| key.as_path()),
            retry_on_status: with_token.then_some(self.retry_on_status.as_slice()),
            upstream_protocol: self.upstream_protocol,
            grpc_unauthenticated_refresh: with_token.then_some(self.grpc_unauthenticated_refresh),
            max_upstream_connections: self.max_upstream_connections,
            scope: self.profile.as_ref().and_then(|p| p.scope.as_deref()),
            audience: self.profile.as_ref().and_then(|p| p.audience.as_deref()),
            resource: self.profile.as_ref().and_then(|p| p.resource.as_deref()),
            extra_params: self.profile.as_ref().map(|p| &p.extra_params).filter(|params| !params.is_empty()),
        }
        .serialize(serializer)
    }
}

fn is_default_claims(claims: &&AssertionClaims) -> bool {
    **claims == AssertionClaims::default()
}

/// `assertion_key_id` as the TOML has it: a name, or `false`.
#[derive(Serialize)]
#[serde(untagged)]
enum KeyIdView<'a> {
    Name(&'a str),
    Sent(bool),
}
