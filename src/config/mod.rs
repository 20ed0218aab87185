//! Configuration: built-in defaults, then the TOML file, then `TOKENPROXY_` environment variables (figment
//! layers), read into a typed [`Config`] with URLs, [`Duration`]s, byte counts and secret newtypes. The merged
//! tree is walked key by key, so every problem is reported at once, each with its dotted key and the file or
//! environment variable it came from, and an unknown key (a typo) is an error rather than a silent no-op.
//! Secrets are never part of an error message or of the printed configuration. This module imports only the
//! modules below it: [`crate::secret`] (secret values and their sources), [`crate::keys`] (keys and certificates
//! are read at load, so `check` tells a wrong file) and [`crate::private_file`] (is a directory safe).

mod layers;
mod providers;
mod reader;
mod redact;
mod resolve;
mod routes;
#[cfg(test)]
mod tests;
mod values;
pub use values::server_url_text;
mod warnings;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use url::Url;

pub use crate::keys::{AssertionAlgorithm, DpopAlgorithm, EncryptionKey};
pub use crate::secret::{Secret, SecretError, SecretSource};

/// The environment variable that names the config file for the CLI; it is not a config key.
pub const CONFIG_FILE_VARIABLE: &str = "TOKENPROXY_CONFIG";

/// The whole resolved configuration of one tokenproxy process.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// The proxy listener and its limits.
    pub server: ServerConfig,
    /// The admin listener (`/healthz`, `/readyz`, `/metrics`, `/tokens`).
    pub admin: AdminConfig,
    /// Log output.
    pub log: LogConfig,
    /// Local persistent state (rotated refresh tokens).
    pub state: StateConfig,
    /// The token vending listener (docs/vending.md); off unless `[vending] listen` is set.
    pub vending: VendingConfig,
    /// OpenTelemetry traces (docs/telemetry.md); off unless an OTLP endpoint is configured.
    pub telemetry: TelemetryConfig,
    /// Token providers, keyed by provider name: those configured, and one `PROVIDER[ROUTE]` per distinct route
    /// profile (see [`RouteConfig::profile`]; not printed, the routes' keys are).
    #[serde(serialize_with = "redact::configured_providers")]
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Routes, in file order.
    pub routes: Vec<RouteConfig>,
    /// Secrets and files that could not be had where the config was checked offline (`check --offline`), one
    /// line each; always empty otherwise.
    #[serde(skip)]
    pub unavailable: Vec<String>,
}

/// `[server]`: the proxy listener.
#[derive(Debug, Clone, Serialize)]
pub struct ServerConfig {
    /// Address the proxy listens on (`server.listen`).
    pub listen: SocketAddr,
    /// TLS for the proxy listener; plain HTTP when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTls>,
    /// Deadline for one whole upstream exchange.
    #[serde(serialize_with = "redact::duration")]
    pub request_timeout: Duration,
    /// Deadline for a request's head, from a new connection's accept or from the head's first byte (slowloris
    /// guard).
    #[serde(serialize_with = "redact::duration")]
    pub header_read_timeout: Duration,
    /// How long a connection with no request in flight waits for the next one (h2: GOAWAY, then close).
    #[serde(serialize_with = "redact::duration")]
    pub keepalive_timeout: Duration,
    /// A tunnel (an upgraded connection) with no byte either way for this long is closed.
    #[serde(serialize_with = "redact::duration")]
    pub tunnel_idle_timeout: Duration,
    /// Maximum number of concurrent client connections (at least 1).
    pub max_connections: usize,
    /// Request bodies up to this many bytes are kept so they can be replayed after a 401; 0 disables replay.
    #[serde(serialize_with = "redact::size")]
    pub replay_buffer: usize,
    /// Drain time after SIGTERM before in-flight requests are dropped.
    #[serde(serialize_with = "redact::duration")]
    pub shutdown_grace: Duration,
    /// Runtime worker threads (`server.worker_threads`); `None` means one per available core but one, at least one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_threads: Option<usize>,
    /// Idle upstream connections kept per upstream and worker thread; beyond them, idle ones are closed.
    pub max_idle_upstream_connections: usize,
    /// Plain HTTP/1.1 requests to plain-HTTP upstreams are served by the h1 transport (tokenproxy's own HTTP/1.1);
    /// `false` serves every request with the hyper transport (`server.h1_transport`).
    pub h1_transport: bool,
    /// Interception (`routes[].intercept`) on a listener that is not on a loopback address.
    pub allow_remote_intercept: bool,
    /// The config set `h1_transport` under its old name, `direct_http1` (a warning; never printed back).
    #[serde(skip)]
    pub h1_transport_old_key: bool,
    /// Names the listener answers besides IP literals, `localhost` and the routes' hosts (`server.allowed_hosts`;
    /// `["*"]`: any); `None`: checked on a loopback address only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_hosts: Option<Vec<String>>,
}

/// `[server.tls]`: certificate chain and private key of the proxy listener (PEM files).
#[derive(Debug, Clone, Serialize)]
pub struct ServerTls {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key of the leaf certificate.
    pub key_file: PathBuf,
}

/// `[admin]`: the admin listener.
#[derive(Debug, Clone, Serialize)]
pub struct AdminConfig {
    /// Address the admin endpoints listen on.
    pub listen: SocketAddr,
    /// Names the admin listener answers besides IP literals and `localhost` (`admin.allowed_hosts`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_hosts: Option<Vec<String>>,
}

/// `vending.listen`: a TCP address, or the path of a unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VendingListen {
    /// An IP address and port.
    Tcp(SocketAddr),
    /// A unix socket at this absolute path (created mode 0600).
    Unix(PathBuf),
}

impl Serialize for VendingListen {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            VendingListen::Tcp(addr) => serializer.collect_str(addr),
            VendingListen::Unix(path) => serializer.collect_str(&path.display()),
        }
    }
}

/// `[vending]`: the listener that hands raw tokens to applications (docs/vending.md).
#[derive(Debug, Clone, Default, Serialize)]
pub struct VendingConfig {
    /// Where it listens; none (the default): no listener.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<VendingListen>,
    /// Allow an address other than loopback.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub allow_remote: bool,
    /// Names the vending listener answers besides IP literals and `localhost` (`vending.allowed_hosts`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_hosts: Option<Vec<String>>,
}

/// `log.format`: how log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable, coloured when writing to a terminal.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// `[log]`: log output.
#[derive(Debug, Clone, Serialize)]
pub struct LogConfig {
    /// Line format.
    pub format: LogFormat,
    /// Level filter: a level (`info`) or `RUST_LOG` directive syntax (`info,tokenproxy=debug`).
    pub level: String,
    /// One access-log line per proxied request (at level info, target `access`).
    pub access: bool,
}

/// `[telemetry]`: OpenTelemetry traces exported over OTLP (docs/telemetry.md). Applied at startup only.
#[derive(Debug, Clone, Serialize)]
pub struct TelemetryConfig {
    /// The collector's base URL (`/v1/traces` is appended); none: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, else telemetry is off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// `http/protobuf` or `grpc` (a build with the `otlp-grpc` feature); none: `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`
    /// or `OTEL_EXPORTER_OTLP_PROTOCOL`, else `http/protobuf`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_protocol: Option<OtlpProtocol>,
    /// `service.name`; none: `OTEL_SERVICE_NAME`, else `tokenproxy`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    /// The share of traces started here that are sampled (a sampled caller's trace is always continued).
    pub sample_ratio: f64,
    /// Resource attributes, over `OTEL_RESOURCE_ATTRIBUTES`'.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub resource_attributes: BTreeMap<String, String>,
    /// Headers for the collector (`key=value,key2=value2`, as `OTEL_EXPORTER_OTLP_HEADERS`): a secret.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "redact::secret_source")]
    pub headers: Option<SecretSource>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            otlp_protocol: None,
            service_name: None,
            sample_ratio: 1.0,
            resource_attributes: BTreeMap::new(),
            headers: None,
        }
    }
}

/// What a build without the `otlp-grpc` feature says of `grpc` (from `telemetry.otlp_protocol` or the environment).
pub const NO_GRPC: &str = "gRPC export needs a build with the `otlp-grpc` feature; this one sends http/protobuf";

/// Values of `telemetry.otlp_protocol` and of `OTEL_EXPORTER_OTLP_PROTOCOL`, as OTLP names them.
pub const OTLP_PROTOCOLS: &[(&str, OtlpProtocol)] =
    &[("http/protobuf", OtlpProtocol::HttpProtobuf), ("grpc", OtlpProtocol::Grpc)];

impl OtlpProtocol {
    /// Its name, as OTLP (and the config) writes it.
    pub fn as_str(self) -> &'static str {
        OTLP_PROTOCOLS.iter().find(|(_, protocol)| *protocol == self).map_or("?", |(name, _)| name)
    }

    /// The protocol `name` names.
    pub fn named(name: &str) -> Option<OtlpProtocol> {
        OTLP_PROTOCOLS.iter().find(|(known, _)| *known == name).map(|(_, protocol)| *protocol)
    }
}

/// How spans go to the collector (`telemetry.otlp_protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum OtlpProtocol {
    /// OTLP over HTTP, protobuf bodies (`http/protobuf`).
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    /// OTLP over gRPC.
    #[serde(rename = "grpc")]
    Grpc,
}

/// `[state]`: the embedded store, and the shared one.
#[derive(Debug, Clone)]
pub struct StateConfig {
    /// Directory of the embedded store (rotated refresh tokens; files 0600, written atomically).
    pub dir: PathBuf,
    /// `store = "redis"`: the shared store of a fleet of replicas (docs/fleet.md).
    pub shared: Option<SharedStoreConfig>,
    /// Accept a `dir` that group or others may write to (`state.allow_shared_dir`).
    pub allow_shared_dir: bool,
}

/// `[state]` with `store = "redis"`: where replicas share their tokens (docs/fleet.md).
#[derive(Clone, PartialEq)]
pub struct SharedStoreConfig {
    /// Where Redis is: one server, or the Sentinels that know which server is the master.
    pub server: RedisServer,
    /// The ACL user, if any.
    pub redis_username: Option<String>,
    /// The password (`redis_password`, `_file`, `_env`), if any.
    pub redis_password: Option<SecretSource>,
    /// Every key tokenproxy writes starts with this and a colon.
    pub key_prefix: String,
    /// Base64 32-byte keys, one per line: the first encrypts, all decrypt.
    pub encryption_key_file: PathBuf,
    /// The keys of `encryption_key_file` as read at load (never printed).
    pub encryption_keys: Vec<EncryptionKey>,
    /// The longest one Redis operation may take.
    pub timeout: Duration,
}

impl std::fmt::Debug for SharedStoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedStoreConfig")
            .field("server", &self.server)
            .field("redis_username", &self.redis_username)
            .field("key_prefix", &self.key_prefix)
            .field("encryption_key_file", &self.encryption_key_file)
            .field("encryption_keys", &self.encryption_keys.len())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Where the shared store's Redis is (`redis_url`, or `redis_sentinels` with `redis_sentinel_master`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisServer {
    /// One server: a `redis://` or `rediss://` (TLS) URL, without credentials.
    Url(Url),
    /// Redis Sentinel: the Sentinels' URLs (`rediss://`: TLS to them and to the master) and the master's name.
    Sentinel {
        /// `redis://` or `rediss://` URLs of Sentinels, without credentials.
        sentinels: Vec<Url>,
        /// The name the Sentinels monitor the master by.
        master: String,
    },
}

impl RedisServer {
    /// Every URL tokenproxy connects to directly.
    pub fn urls(&self) -> &[Url] {
        match self {
            RedisServer::Url(url) => std::slice::from_ref(url),
            RedisServer::Sentinel { sentinels, .. } => sentinels,
        }
    }
}

impl SharedStoreConfig {
    /// The Redis settings of the connection (the username and the password, read now).
    pub fn redis_settings(&self) -> Result<redis::RedisConnectionInfo, String> {
        let mut settings = redis::RedisConnectionInfo::default();
        if let Some(username) = &self.redis_username {
            settings = settings.set_username(username);
        }
        if let Some(password) = &self.redis_password {
            let password = password.read().map_err(|e| e.to_string())?;
            settings = settings.set_password(password.expose());
        }
        Ok(settings)
    }

    /// How to connect to the server at `url`: the URL with the username and password (read now).
    pub fn connection_info(&self, url: &Url) -> Result<redis::ConnectionInfo, String> {
        use redis::IntoConnectionInfo as _;
        let info = url.as_str().into_connection_info().map_err(|e| format!("{url}: {e}"))?;
        let mut settings = info.redis_settings().clone();
        if let Some(username) = &self.redis_username {
            settings = settings.set_username(username);
        }
        if let Some(password) = &self.redis_password {
            let password = password.read().map_err(|e| e.to_string())?;
            settings = settings.set_password(password.expose());
        }
        Ok(info.set_redis_settings(settings))
    }
}

/// `providers.NAME.grant`: the OAuth2 grant used to get tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    /// RFC 6749 §4.4.
    ClientCredentials,
    /// RFC 6749 §6, with rotated refresh tokens persisted in `[state]`.
    RefreshToken,
    /// RFC 6749 §4.3 (resource owner password).
    Password,
    /// RFC 7523 JWT bearer assertion.
    JwtBearer,
    /// RFC 8693 token exchange.
    TokenExchange,
}

/// `providers.NAME.client_auth`: how the client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// HTTP Basic with client_id and client_secret.
    ClientSecretBasic,
    /// client_id and client_secret in the form body.
    ClientSecretPost,
    /// RFC 7523 client assertion signed with a private key.
    PrivateKeyJwt,
    /// RFC 8705 §2.1 mutual TLS with a certificate from a CA the IdP trusts.
    TlsClientAuth,
    /// RFC 8705 §2.2 mutual TLS with a self-signed certificate the IdP has registered for the client.
    SelfSignedTlsClientAuth,
    /// RFC 7523 client assertion minted by the platform (`client_assertion_file`), e.g. a Kubernetes projected
    /// service-account token for workload identity federation.
    ClientAssertion,
    /// A public client: client_id only.
    None,
}

/// `providers.NAME.assertion_dialect`: the claims of a `grant = "jwt_bearer"` assertion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AssertionDialect {
    /// `iss`/`sub`/`aud` from `assertion_claims` (defaults: the client id, the client id, the token endpoint).
    Generic,
    /// A Google service account (`google_credentials_file`).
    Google,
    /// Salesforce's JWT bearer flow (`client_id` = the consumer key, `username`).
    Salesforce,
}

impl AssertionDialect {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AssertionDialect::Generic => "generic",
            AssertionDialect::Google => "google",
            AssertionDialect::Salesforce => "salesforce",
        }
    }
}

/// `providers.NAME.assertion_claims`: the claims of a generic `jwt_bearer` assertion (and Google's `sub`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AssertionClaims {
    /// `iss` (default: the client id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// `sub` (default: the client id; Google: the user to act for, none by default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// `aud` (default: `assertion_audience`, then the token endpoint).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// More claims, as strings.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, String>,
}

/// The `kid` header of the client assertions a provider signs (`assertion_key_id`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AssertionKeyId {
    /// The RFC 7638 thumbprint of the public key (the default): a rotated key gets a new `kid` by itself.
    #[default]
    Thumbprint,
    /// A name the IdP registered the key under.
    Named(String),
    /// No `kid` header (`assertion_key_id = false`): for an IdP that registered the key without one and matches
    /// a `kid` strictly.
    Omitted,
}

impl AssertionKeyId {
    /// The header's value for a key with `thumbprint`, or `None` when it is left out.
    pub fn header(&self, thumbprint: &str) -> Option<String> {
        match self {
            AssertionKeyId::Thumbprint => Some(thumbprint.to_owned()),
            AssertionKeyId::Named(name) => Some(name.clone()),
            AssertionKeyId::Omitted => None,
        }
    }
}

/// `[providers.NAME]`: one token profile.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderConfig {
    /// The provider's name (its key under `[providers]`), used in routes, metrics and the admin API; for a route
    /// profile's slot, `PROVIDER[ROUTE]`.
    pub name: String,
    /// For a route profile's slot: the configured provider it derives from. `None` for configured providers.
    pub profile_of: Option<String>,
    /// `grant = "token_exchange"`: the exchange's settings.
    pub exchange: Option<ExchangeConfig>,
    /// The raw token may be handed out (`vend = true`): written to `sink_file`.
    pub vend: bool,
    /// DPoP (RFC 9449, docs/dpop.md): token calls and requests carry proofs of possession of a key (`dpop = true`).
    pub dpop: bool,
    /// The DPoP key (PEM: EC P-256, P-384 or Ed25519); without it, a key is made at startup.
    pub dpop_key_file: Option<PathBuf>,
    /// The algorithm of the DPoP key made at startup (`dpop_algorithm`; a `dpop_key_file`'s key decides its own).
    pub dpop_algorithm: DpopAlgorithm,
    /// Every new token is written to this file (mode 0600, replaced atomically).
    pub sink_file: Option<PathBuf>,
    /// What `sink_file` holds.
    pub sink_format: SinkFormat,
    /// The IdP's token endpoint (absolute http or https URL); when absent, discovered from `issuer`.
    pub token_url: Option<Url>,
    /// The IdP's issuer, for RFC 8414 / OpenID Connect discovery of its endpoints.
    pub issuer: Option<Url>,
    /// RFC 8628 device authorization endpoint (`tokenproxy login`); discovered from `issuer` when absent.
    pub device_authorization_endpoint: Option<Url>,
    /// RFC 7009 revocation endpoint (`tokenproxy logout`); discovered from `issuer` when absent.
    pub revocation_endpoint: Option<Url>,
    /// The grant used to get tokens.
    pub grant: Grant,
    /// `grant = "refresh_token"`: the first refresh token (rotated ones are kept in the state store).
    pub refresh_token: Option<SecretSource>,
    /// `grant = "password"`: the resource owner's username.
    pub username: Option<String>,
    /// `grant = "password"`: the resource owner's password.
    pub password: Option<SecretSource>,
    /// The OAuth2 client identifier.
    pub client_id: String,
    /// Where the client secret comes from (`client_secret`, `client_secret_file` or `client_secret_env`).
    pub client_secret: Option<SecretSource>,
    /// How the client authenticates at the token endpoint.
    pub client_auth: ClientAuth,
    /// `scope` parameter sent with token requests.
    pub scope: Option<String>,
    /// `audience` parameter sent with token requests.
    pub audience: Option<String>,
    /// `resource` parameter (RFC 8707) sent with token requests.
    pub resource: Option<String>,
    /// Further form parameters sent with token requests.
    pub extra_params: BTreeMap<String, String>,
    /// Proactive refresh at this fraction of a token's lifetime, in (0, 1].
    pub refresh_at: f64,
    /// A token is never sent this close to its expiry (capped at a quarter of its lifetime).
    pub expiry_skew: Duration,
    /// Token calls of one slot never follow each other closer than this, whatever the IdP answers.
    pub min_refresh_interval: Duration,
    /// Lifetime assumed when the IdP gives neither `expires_in` nor a JWT `exp` claim.
    pub default_lifetime: Duration,
    /// Deadline for one token call.
    pub timeout: Duration,
    /// A ceiling on calls to the token endpoint (`max_token_calls = "600/h"`): calls, window, and the setting as
    /// written.
    pub max_token_calls: Option<(u64, Duration, String)>,
    /// At most one refresh driven by upstream 401s per this interval (0: no limit).
    pub unauthorized_refresh_interval: Duration,
    /// Forced refreshes (`POST /tokens/{provider}/refresh`) no closer together than this (0: no limit).
    pub manual_refresh_interval: Duration,
    /// What requests do while a refresh call is in flight.
    pub during_refresh: DuringRefresh,
    /// PEM CA bundle trusted for TLS to the IdP (instead of the built-in web roots).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate presented to the IdP.
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of `client_cert_file`.
    pub client_key_file: Option<PathBuf>,
    /// `private_key_jwt`: the PEM private key that signs the client assertions (read at every token call).
    pub private_key_file: Option<PathBuf>,
    /// `private_key_jwt`: the assertion's `aud` when not the token endpoint.
    pub assertion_audience: Option<String>,
    /// `private_key_jwt`: the JWS algorithm when not the key's own (RS256 for RSA keys; PS256 may be set).
    pub assertion_algorithm: Option<AssertionAlgorithm>,
    /// `private_key_jwt` (and the `jwt_bearer` grant): the assertion's `kid` header.
    pub assertion_key_id: AssertionKeyId,
    /// `private_key_jwt`: the certificate of `private_key_file` as the IdP has it; its thumbprints go in the
    /// assertion's header as `x5t` and `x5t#S256` (Entra ID finds a certificate credential by them).
    pub assertion_certificate_file: Option<PathBuf>,
    /// `grant = "jwt_bearer"`: whose claims the assertion carries.
    pub assertion_dialect: AssertionDialect,
    /// `grant = "jwt_bearer"`, Google dialect: the service-account key file.
    pub google_credentials_file: Option<PathBuf>,
    /// `grant = "jwt_bearer"`: claims of the assertion (`iss`, `sub`, extra ones).
    pub assertion_claims: AssertionClaims,
    /// `client_assertion`: where the platform-minted JWT is (`client_assertion_file` / `_env`), read at every call.
    pub client_assertion: Option<SecretSource>,
}

impl ProviderConfig {
    /// Whether it exchanges each caller's own token (`grant = "token_exchange"`, `subject_token_source =
    /// "request"`): it has no token of its own, only the exchanges of its callers' tokens.
    pub fn per_caller(&self) -> bool {
        self.exchange.as_ref().is_some_and(|exchange| exchange.subject == SubjectSource::Request)
    }
}

/// `grant = "token_exchange"` (RFC 8693, or Entra's on-behalf-of): where the subject token comes from and what the
/// exchange asks for (docs/token-exchange.md).
#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeConfig {
    /// Where the subject token comes from.
    pub subject: SubjectSource,
    /// `subject_token_type` URN.
    pub subject_token_type: String,
    /// `actor_token`, when the exchange is a delegation.
    pub actor_token: Option<SecretSource>,
    /// `actor_token_type` URN.
    pub actor_token_type: String,
    /// `requested_token_type` URN, when set.
    pub requested_token_type: Option<String>,
    /// The form the exchange takes.
    pub dialect: ExchangeDialect,
    /// At most this many callers' exchanged tokens are kept (least recently used evicted first).
    pub max_subjects: u64,
    /// A subject the IdP refused is answered without an IdP call for this long.
    pub refused_subject_ttl: Duration,
    /// New subjects (not in the cache) exchanged per second at most, in a token bucket of the same burst.
    pub new_subjects_per_second: f64,
    /// Exchanges in flight at once at most.
    pub max_in_flight: usize,
    /// Subjects are checked first as JWTs of this issuer (`subject_issuer`), when set.
    pub subject_issuer: Option<Url>,
    /// Where that issuer's keys are (`subject_jwks_uri`); else its metadata's `jwks_uri`.
    pub subject_jwks_uri: Option<Url>,
    /// The audience a subject must name (`subject_audience`), when set.
    pub subject_audience: Option<String>,
}

/// `providers.NAME.subject_token_source`.
#[derive(Debug, Clone, PartialEq)]
pub enum SubjectSource {
    /// The caller's own bearer token (`Authorization: Bearer …` of each request): a token per caller.
    Request,
    /// A file re-read at every exchange (a Kubernetes service-account token exchanged at an STS).
    File(PathBuf),
}

/// `providers.NAME.exchange_dialect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExchangeDialect {
    /// RFC 8693: `grant_type=urn:ietf:params:oauth:grant-type:token-exchange`, `subject_token`, …
    Rfc8693,
    /// Entra ID on-behalf-of: `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`, `assertion`,
    /// `requested_token_use=on_behalf_of`.
    EntraObo,
}

/// `providers.NAME.sink_format`: what `sink_file` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkFormat {
    /// The token alone, no newline.
    #[default]
    Raw,
    /// `{"access_token", "token_type", "expires_at"}`.
    Json,
}

/// `providers.NAME.during_refresh`: what requests do while a refresh call is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DuringRefresh {
    /// Keep sending the current token until the new one arrives (the IdP revokes nothing when it issues one).
    UseCurrent,
    /// Stop using the current token once the call is sent, and wait for the new one: for IdPs that revoke the old
    /// access token when its refresh token is redeemed. The default for grants that rotate refresh tokens.
    Wait,
}

/// `routes[N].inject`: where the token goes in the upstream request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Inject {
    /// A header, by default `Authorization: Bearer TOKEN`.
    Header,
    /// A query parameter, by default `?access_token=TOKEN`.
    Query,
}

/// `routes[N].upstream_protocol`: how requests go to a plain-HTTP upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 (an `https` upstream: h2 or HTTP/1.1, as ALPN decides).
    Http1,
    /// HTTP/2 with prior knowledge over plain TCP (gRPC backends in a cluster).
    H2c,
}

/// `routes[N].incoming_authorization`: what happens to an `Authorization` header the caller sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IncomingAuthorization {
    /// Drop the caller's header and attach tokenproxy's token.
    Replace,
    /// Use the caller's own header if present, else attach tokenproxy's token.
    Keep,
    /// Refuse requests that carry their own header.
    Reject,
}

/// `[[routes]]`: which requests go where, with which provider's token.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Name used in metrics, logs and errors; default: host + prefix.
    pub name: String,
    /// Host the route answers for: lowercased, without a port.
    pub host: Option<String>,
    /// Path prefix: starts with `/`, no trailing `/` unless it is `/`.
    pub prefix: String,
    /// Upstream base URL: http or https, no query, no fragment.
    pub upstream: Url,
    /// Remove `prefix` from the path before forwarding.
    pub strip_prefix: bool,
    /// A `CONNECT` to `host` is accepted and its TLS terminated with a leaf of the local CA; the requests inside go
    /// through this host's routes (docs/local-dev.md).
    pub intercept: bool,
    /// Provider whose token is attached (the slot's name: `PROVIDER[ROUTE]` for a route with a profile); `None` for
    /// a plain pass-through route.
    pub provider: Option<String>,
    /// Token parameters of this route over its provider's (`scope`, `audience`, `resource`, `extra_params`): the
    /// route's tokens come from a slot of their own, shared by the routes with the same profile on that provider.
    pub profile: Option<RouteProfile>,
    /// Where the token goes.
    pub inject: Inject,
    /// Header that carries the token when `inject` is `Header`.
    pub header_name: http::HeaderName,
    /// Scheme written before the token in the header; empty means the raw token.
    pub scheme: String,
    /// Query parameter that carries the token when `inject` is `Query`.
    pub query_param: String,
    /// On a 401 from the upstream, refresh the token and replay the request once.
    pub retry_on_401: bool,
    /// What happens to an `Authorization` header the caller sent.
    pub incoming_authorization: IncomingAuthorization,
    /// Whether paths with an encoded `/` or `\\` (`%2F`, `%5C`) are forwarded or refused.
    pub encoded_slashes: EncodedSlashes,
    /// Paths with a dot segment carrying path parameters (`..;x`).
    pub path_parameters: PathParameters,
    /// TLS to the route's HTTPS upstream.
    pub tls: UpstreamTlsConfig,
    /// HTTP/1.1 or h2c to a plain-HTTP upstream.
    pub upstream_protocol: UpstreamProtocol,
    /// A gRPC `UNAUTHENTICATED` status (in trailers, or a trailers-only answer) retires the token like a 401, under
    /// the same budget; the call itself is not replayed.
    pub grpc_unauthenticated_refresh: bool,
    /// Upstream statuses that mean "the token was refused" (besides any answer with `WWW-Authenticate: Bearer
    /// error="invalid_token"`): a refresh and one replay follow, as for 401.
    pub retry_on_status: Vec<u16>,
    /// Requests in flight to the route's upstream at once, per process (HTTP/1.1: connections in use); routes that
    /// share an upstream connection pool share the smallest value they set.
    pub max_upstream_connections: usize,
}

/// A route's token parameters over its provider's (docs/configuration.md, "Route profiles").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteProfile {
    /// The configured provider the route names.
    pub provider: String,
    /// `scope` instead of the provider's.
    pub scope: Option<String>,
    /// `audience` instead of the provider's.
    pub audience: Option<String>,
    /// `resource` instead of the provider's.
    pub resource: Option<String>,
    /// Form parameters added to (or replacing those of) the provider's `extra_params`.
    pub extra_params: BTreeMap<String, String>,
}

impl RouteProfile {
    /// The provider's settings with this profile's over them, named `name`.
    pub fn apply(&self, provider: &ProviderConfig) -> ProviderConfig {
        let mut derived = provider.clone();
        if self.scope.is_some() {
            derived.scope.clone_from(&self.scope);
        }
        if self.audience.is_some() {
            derived.audience.clone_from(&self.audience);
        }
        if self.resource.is_some() {
            derived.resource.clone_from(&self.resource);
        }
        derived.extra_params.extend(self.extra_params.iter().map(|(k, v)| (k.clone(), v.clone())));
        derived
    }
}

/// TLS settings of a route's HTTPS upstream (docs/upstream-tls.md).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamTlsConfig {
    /// PEM CA bundle trusted instead of the built-in web roots.
    pub ca_file: Option<PathBuf>,
    /// The name the upstream's certificate is verified against, and sent as SNI, instead of the URL's host.
    pub server_name: Option<String>,
    /// PEM client certificate and its key, presented to the upstream (mutual TLS).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl UpstreamTlsConfig {
    /// Whether the route has TLS settings of its own (else it uses the shared pool, trusting the web roots).
    pub fn is_custom(&self) -> bool {
        self != &UpstreamTlsConfig::default()
    }
}

/// `routes[N].encoded_slashes`: paths with `%2F` or `%5C`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EncodedSlashes {
    /// Forwarded as they are (an API may put `%2F` inside a segment).
    Keep,
    /// Refused with 400 `bad_request`.
    Reject,
}

/// `routes[N].path_parameters`: a dot segment with path parameters (`..;x`, which servlet containers read as `..`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathParameters {
    /// Removed as the dot segment it is (`/api/..;/admin` is routed and forwarded as `/admin`).
    Normalize,
    /// Refused with 400 `bad_request`.
    Reject,
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read at all.
    #[error("cannot read config file {}: {source}", path.display())]
    Unreadable {
        /// The file as it was given.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The configuration was read but is invalid; every problem found is listed.
    #[error("{}", Problems(.0))]
    Invalid(Vec<Problem>),
}

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The dotted key at fault, e.g. `providers.orders.token_url` or `routes[2].provider`.
    pub key: String,
    /// What is wrong, and how to fix it when that is not obvious. Never contains a secret.
    pub message: String,
    /// Where the value came from: the config file as given, the environment variable, or `default`.
    pub source: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A syntax error of the TOML text is not about one key.
        if self.key.is_empty() {
            write!(f, "{} (from {})", self.message, self.source)
        } else {
            write!(f, "{}: {} (from {})", self.key, self.message, self.source)
        }
    }
}

/// Displays problems one per line.
struct Problems<'a>(&'a [Problem]);

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl Config {
    /// The hosts of the routes that intercept (`intercept = true`), each once.
    pub fn intercepted_hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> =
            self.routes.iter().filter(|route| route.intercept).filter_map(|route| route.host.clone()).collect();
        hosts.sort();
        hosts.dedup();
        hosts
    }

    /// Defaults → TOML file → `TOKENPROXY_` environment (`__` between levels). Missing/unreadable file → Unreadable.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Unreadable { path: path.to_owned(), source })?;
        let figment = layers::figment(&text, layers::Origin::File(path), true)?;
        resolve::config(&figment, &path.display().to_string(), false)
    }

    /// Like [`Config::load`], for a machine without the secrets (a CI pipeline): a secret file or `*_file` that is
    /// not there, or a `*_env` variable that is not set, is listed in [`Config::unavailable`] instead of being a
    /// problem. Everything else is checked as `load` checks it.
    pub fn load_offline(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Unreadable { path: path.to_owned(), source })?;
        let figment = layers::figment(&text, layers::Origin::File(path), true)?;
        resolve::config(&figment, &path.display().to_string(), true)
    }

    /// Defaults → the given TOML text (no environment): used by `demo` and tests. `source_name` names it in errors.
    pub fn from_toml_str(toml: &str, source_name: &str) -> Result<Config, ConfigError> {
        let figment = layers::figment(toml, layers::Origin::Named(source_name), false)?;
        resolve::config(&figment, source_name, false)
    }

    /// The resolved config as TOML with every secret shown as "[redacted]" (durations as "30s" strings, sizes
    /// as bytes or "64KiB"); it loads back into the same configuration, secrets aside.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# the configuration could not be rendered as TOML: {e}\n"))
    }
}

impl Default for ServerConfig {
    /// The SPEC defaults: 127.0.0.1:8080, 30s, 10s, 10000 connections, 64KiB, 20s.
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
            tls: None,
            request_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(60),
            tunnel_idle_timeout: Duration::from_secs(300),
            max_connections: 10_000,
            replay_buffer: 64 * 1024,
            shutdown_grace: Duration::from_secs(20),
            worker_threads: None,
            max_idle_upstream_connections: 128,
            h1_transport: true,
            allow_remote_intercept: false,
            h1_transport_old_key: false,
            allowed_hosts: None,
        }
    }
}

impl Default for AdminConfig {
    /// The SPEC default: 127.0.0.1:9090.
    fn default() -> Self {
        AdminConfig { listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 9090)), allowed_hosts: None }
    }
}

impl Default for LogConfig {
    /// The SPEC default: pretty, info.
    fn default() -> Self {
        LogConfig { format: LogFormat::Pretty, level: "info".to_owned(), access: true }
    }
}

impl Default for StateConfig {
    /// The SPEC default: `./tokenproxy-state`.
    fn default() -> Self {
        StateConfig { dir: PathBuf::from("./tokenproxy-state"), shared: None, allow_shared_dir: false }
    }
}

impl LogFormat {
    /// The config spelling, e.g. `json`.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Pretty => "pretty",
            LogFormat::Json => "json",
        }
    }
}

impl Grant {
    /// The config spelling, e.g. `client_credentials`.
    pub fn as_str(self) -> &'static str {
        match self {
            Grant::ClientCredentials => "client_credentials",
            Grant::RefreshToken => "refresh_token",
            Grant::Password => "password",
            Grant::JwtBearer => "jwt_bearer",
            Grant::TokenExchange => "token_exchange",
        }
    }
}

impl ClientAuth {
    /// The config spelling, e.g. `client_secret_basic`.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientAuth::ClientSecretBasic => "client_secret_basic",
            ClientAuth::ClientSecretPost => "client_secret_post",
            ClientAuth::PrivateKeyJwt => "private_key_jwt",
            ClientAuth::TlsClientAuth => "tls_client_auth",
            ClientAuth::SelfSignedTlsClientAuth => "self_signed_tls_client_auth",
            ClientAuth::ClientAssertion => "client_assertion",
            ClientAuth::None => "none",
        }
    }
}

impl Inject {
    /// The config spelling, e.g. `header`.
    pub fn as_str(self) -> &'static str {
        match self {
            Inject::Header => "header",
            Inject::Query => "query",
        }
    }
}

impl IncomingAuthorization {
    /// The config spelling, e.g. `replace`.
    pub fn as_str(self) -> &'static str {
        match self {
            IncomingAuthorization::Replace => "replace",
            IncomingAuthorization::Keep => "keep",
            IncomingAuthorization::Reject => "reject",
        }
    }
}
