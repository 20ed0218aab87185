//! `[providers.NAME]`: token profiles, and the reading of secrets (`x`, `x_file` or `x_env`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use figment::value::Value;

use crate::keys::{self, KeyError};

use super::reader::{self, Leaf, Reader, Table};
use super::values::{http_url, is_valid_name, value_or, UrlUse, NAME_RULE};
use super::{
    AssertionAlgorithm, AssertionClaims, AssertionDialect, AssertionKeyId, ClientAuth, DpopAlgorithm, DuringRefresh,
    ExchangeConfig, ExchangeDialect, Grant, ProviderConfig, Secret, SecretError, SecretSource, SinkFormat,
    SubjectSource,
};

/// Defaults of a provider (SPEC).
mod provider_defaults {
    use std::time::Duration;

    pub(super) const REFRESH_AT: f64 = 0.75;
    pub(super) const EXPIRY_SKEW: Duration = Duration::from_secs(30);
    pub(super) const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);
    pub(super) const DEFAULT_LIFETIME: Duration = Duration::from_secs(5 * 60);
    pub(super) const TIMEOUT: Duration = Duration::from_secs(10);
    pub(super) const UNAUTHORIZED_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
    pub(super) const MANUAL_REFRESH_INTERVAL: Duration = Duration::from_secs(10);
}

/// Values of `during_refresh`.
const DURING_REFRESH: &[(&str, DuringRefresh)] =
    &[("wait", DuringRefresh::Wait), ("use_current", DuringRefresh::UseCurrent)];

/// Values of `grant`.
const GRANTS: &[(&str, Grant)] = &[
    ("client_credentials", Grant::ClientCredentials),
    ("refresh_token", Grant::RefreshToken),
    ("password", Grant::Password),
    ("jwt_bearer", Grant::JwtBearer),
    ("token_exchange", Grant::TokenExchange),
];

/// Values of `client_auth`.
const CLIENT_AUTHS: &[(&str, ClientAuth)] = &[
    ("client_secret_basic", ClientAuth::ClientSecretBasic),
    ("client_secret_post", ClientAuth::ClientSecretPost),
    ("private_key_jwt", ClientAuth::PrivateKeyJwt),
    ("tls_client_auth", ClientAuth::TlsClientAuth),
    ("self_signed_tls_client_auth", ClientAuth::SelfSignedTlsClientAuth),
    ("client_assertion", ClientAuth::ClientAssertion),
    ("none", ClientAuth::None),
];

const ASSERTION_DIALECTS: &[(&str, AssertionDialect)] = &[
    ("generic", AssertionDialect::Generic),
    ("google", AssertionDialect::Google),
    ("salesforce", AssertionDialect::Salesforce),
];

const ASSERTION_ALGORITHMS: &[(&str, AssertionAlgorithm)] = &[
    ("RS256", AssertionAlgorithm::RS256),
    ("PS256", AssertionAlgorithm::PS256),
    ("ES256", AssertionAlgorithm::ES256),
    ("ES384", AssertionAlgorithm::ES384),
    ("EdDSA", AssertionAlgorithm::EdDSA),
];

/// Token-request parameters tokenproxy sets itself; `extra_params` must not override them.
const RESERVED_PARAMS: &[&str] = &[
    "grant_type",
    "client_id",
    "client_secret",
    "client_assertion",
    "client_assertion_type",
    "refresh_token",
    "username",
    "password",
    "device_code",
    "scope",
    "audience",
    "resource",
];

/// The valid providers, and the names of all providers (valid or not) for checking route references.
pub(super) fn providers(r: &mut Reader<'_>, root: &mut Table<'_>) -> (BTreeMap<String, ProviderConfig>, Vec<String>) {
    let t = r.table(root, "providers");
    let mut providers = BTreeMap::new();
    let mut names = Vec::new();
    for (name, value) in t.entries() {
        names.push(name.clone());
        let path = t.path.key(name);
        if !is_valid_name(name) {
            r.report(&path, value.tag(), format!("invalid provider name; {NAME_RULE}"));
        }
        let Value::Dict(tag, dict) = value else {
            r.report(&path, value.tag(), format!("expected a table [providers.{name}], found {}", reader::kind(value)));
            continue;
        };
        let mut table = Table::new(path, *tag, dict);
        let provider = provider(r, name, &mut table);
        r.finish(table);
        if let Some(provider) = provider {
            providers.insert(name.clone(), provider);
        }
    }
    (providers, names)
}

/// Reads one provider; `None` when it has problems (already reported). Each part reads its keys in turn, in the order
/// the problems are reported.
fn provider(r: &mut Reader<'_>, name: &str, t: &mut Table<'_>) -> Option<ProviderConfig> {
    let before = r.problem_count();
    let endpoints = endpoints(r, t);
    let grant = value_or(r.get(t, "grant", reader::choice(GRANTS)), Grant::ClientCredentials);
    let exchange = exchange(r, t, grant);
    let jwt = jwt_bearer(r, t, grant);
    let client_id = client_id(r, t, &jwt);
    let client_auth = client_auth(r, t, &jwt);
    let client_secret = client_secret(r, t, client_auth);
    let assertion = client_assertion(r, t, client_auth, jwt.dialect);
    let owner = resource_owner(r, t, grant, jwt.dialect);
    let request = token_request(r, t, jwt.dialect);
    let timing = timing(r, t, grant);
    let tls = tls_files(r, t, client_auth);
    let holding = holding(r, t, grant, client_auth, exchange.as_ref());

    if r.problem_count() > before {
        return None;
    }
    Some(ProviderConfig {
        name: name.to_owned(),
        profile_of: None,
        exchange,
        vend: holding.vend,
        dpop: holding.dpop,
        dpop_key_file: holding.dpop_key_file,
        dpop_algorithm: holding.dpop_algorithm,
        sink_file: holding.sink_file,
        sink_format: holding.sink_format,
        token_url: endpoints
            .token_url
            .or_else(|| jwt.google.as_ref().and_then(|credentials| url::Url::parse(&credentials.token_uri).ok())),
        issuer: endpoints.issuer,
        device_authorization_endpoint: endpoints.device_authorization_endpoint,
        revocation_endpoint: endpoints.revocation_endpoint,
        grant,
        refresh_token: owner.refresh_token,
        username: owner.username,
        password: owner.password,
        client_id: client_id?,
        client_secret,
        client_auth,
        scope: request.scope,
        audience: request.audience,
        resource: request.resource,
        extra_params: request.extra_params,
        refresh_at: timing.refresh_at,
        expiry_skew: timing.expiry_skew,
        min_refresh_interval: timing.min_refresh_interval,
        default_lifetime: timing.default_lifetime,
        timeout: timing.timeout,
        max_token_calls: timing.max_token_calls,
        unauthorized_refresh_interval: timing.unauthorized_refresh_interval,
        manual_refresh_interval: timing.manual_refresh_interval,
        during_refresh: timing.during_refresh,
        ca_file: tls.ca_file,
        client_cert_file: tls.client_cert_file,
        client_key_file: tls.client_key_file,
        private_key_file: assertion.private_key_file,
        assertion_dialect: jwt.dialect_value,
        google_credentials_file: jwt.google_credentials_file,
        assertion_claims: jwt.claims,
        assertion_audience: assertion.audience,
        assertion_algorithm: assertion.algorithm,
        assertion_key_id: assertion.key_id,
        assertion_certificate_file: assertion.certificate_file,
        client_assertion: assertion.client_assertion,
    })
}

/// Where the IdP is: its token endpoint (or the issuer to discover it from), and the optional endpoints.
struct Endpoints {
    token_url: Option<url::Url>,
    issuer: Option<url::Url>,
    device_authorization_endpoint: Option<url::Url>,
    revocation_endpoint: Option<url::Url>,
}

fn endpoints(r: &mut Reader<'_>, t: &mut Table<'_>) -> Endpoints {
    let token_url = r.get(t, "token_url", |v| http_url(v, UrlUse::TokenEndpoint));
    let issuer = r.get(t, "issuer", |v| http_url(v, UrlUse::TokenEndpoint));
    // A Google service-account key file names its token endpoint.
    if !t.has("token_url") && !t.has("issuer") && !t.has("google_credentials_file") {
        r.report_missing(
            t,
            "token_url",
            "missing; set the IdP's token endpoint (token_url = \"https://idp.example/oauth2/token\") or its \
             issuer for discovery (issuer = \"https://idp.example\")",
        );
    }
    let device_authorization_endpoint =
        r.get(t, "device_authorization_endpoint", |v| http_url(v, UrlUse::TokenEndpoint));
    let revocation_endpoint = r.get(t, "revocation_endpoint", |v| http_url(v, UrlUse::TokenEndpoint));
    Endpoints {
        token_url: token_url.map(|leaf| leaf.value),
        issuer: issuer.map(|leaf| leaf.value),
        device_authorization_endpoint: device_authorization_endpoint.map(|leaf| leaf.value),
        revocation_endpoint: revocation_endpoint.map(|leaf| leaf.value),
    }
}

/// `grant = "jwt_bearer"` (RFC 7523 §2.1): the assertion is the grant, in one of three dialects.
struct JwtBearer {
    google_credentials_file: Option<PathBuf>,
    /// `assertion_dialect` as set, or as the keys imply (Google's with a Google key file).
    dialect_value: AssertionDialect,
    /// The dialect when the grant is `jwt_bearer`, else `None`.
    dialect: Option<AssertionDialect>,
    claims: AssertionClaims,
    /// The Google key file, read (dialect `google`).
    google: Option<keys::GoogleCredentials>,
}

fn jwt_bearer(r: &mut Reader<'_>, t: &mut Table<'_>, grant: Grant) -> JwtBearer {
    let google_credentials_file = r.file(t, "google_credentials_file");
    let dialect = r.get(t, "assertion_dialect", reader::choice(ASSERTION_DIALECTS));
    let claims = assertion_claims(r, t);
    let dialect_value = match (&dialect, t.has("google_credentials_file")) {
        (Some(leaf), _) => leaf.value,
        (None, true) => AssertionDialect::Google,
        (None, false) => AssertionDialect::Generic,
    };
    let mut google = None;
    if grant == Grant::JwtBearer {
        match dialect_value {
            AssertionDialect::Google => match &google_credentials_file {
                None if !t.has("google_credentials_file") => r.report_missing(
                    t,
                    "google_credentials_file",
                    "missing; assertion_dialect = \"google\" needs the service account's JSON key file",
                ),
                None => {}
                Some(leaf) => match keys::load_google(&leaf.value) {
                    Ok((credentials, _)) => google = Some(credentials),
                    Err(KeyError::Secret(SecretError::FileUnreadable { .. })) => {}
                    Err(error) => r.report_leaf(leaf, error.to_string()),
                },
            },
            _ => {
                if let Some(leaf) = &google_credentials_file {
                    r.report_leaf(leaf, "only used with assertion_dialect = \"google\"; remove it");
                }
            }
        }
    } else {
        for key in ["google_credentials_file", "assertion_dialect", "assertion_claims"] {
            if let Some(field) = t.field(key) {
                r.report_field(&field, "only used with grant = \"jwt_bearer\"; remove it");
            }
        }
    }
    JwtBearer {
        google_credentials_file: google_credentials_file.map(|leaf| leaf.value),
        dialect_value,
        dialect: (grant == Grant::JwtBearer).then_some(dialect_value),
        claims,
        google,
    }
}

/// `client_id`; a Google service account's is its e-mail address, from its key file.
fn client_id(r: &mut Reader<'_>, t: &mut Table<'_>, jwt: &JwtBearer) -> Option<String> {
    match &jwt.google {
        Some(credentials) if !t.has("client_id") => Some(credentials.client_email.clone()),
        _ if jwt.dialect == Some(AssertionDialect::Google) && !t.has("client_id") => Some(String::new()),
        _ => r
            .require(t, "client_id", "missing; set the OAuth2 client identifier", reader::non_empty_string)
            .map(|leaf| leaf.value),
    }
}

/// `client_auth`: how the client authenticates (Google's and Salesforce's flows with the assertion alone).
fn client_auth(r: &mut Reader<'_>, t: &mut Table<'_>, jwt: &JwtBearer) -> ClientAuth {
    let client_auth = r.get(t, "client_auth", reader::choice(CLIENT_AUTHS));
    let assertion_only = matches!(jwt.dialect, Some(AssertionDialect::Google | AssertionDialect::Salesforce));
    if let Some(leaf) = client_auth.as_ref().filter(|leaf| assertion_only && leaf.value != ClientAuth::None) {
        let message = format!(
            "assertion_dialect = \"{}\" authenticates with the assertion alone; remove client_auth",
            jwt.dialect_value.as_str()
        );
        r.report_leaf(leaf, message);
    }
    value_or(client_auth, if assertion_only { ClientAuth::None } else { ClientAuth::ClientSecretBasic })
}

/// `client_secret` (`_file`, `_env`): needed by the `client_secret_*` methods, refused by the others.
fn client_secret(r: &mut Reader<'_>, t: &mut Table<'_>, client_auth: ClientAuth) -> Option<SecretSource> {
    let client_secret = secret(r, t, "client_secret");
    let secret_given = ["client_secret", "client_secret_file", "client_secret_env"].iter().any(|key| t.has(key));
    match (client_auth, &client_secret) {
        (ClientAuth::ClientSecretBasic | ClientAuth::ClientSecretPost, None) if !secret_given => {
            let message = format!(
                "missing; client_auth = \"{}\" needs `client_secret`, `client_secret_file` or `client_secret_env`",
                client_auth.as_str()
            );
            r.report_missing(t, "client_secret", message);
        }
        (
            ClientAuth::None
            | ClientAuth::PrivateKeyJwt
            | ClientAuth::ClientAssertion
            | ClientAuth::TlsClientAuth
            | ClientAuth::SelfSignedTlsClientAuth,
            Some(leaf),
        ) => {
            r.report_leaf(leaf, format!("not used with client_auth = \"{}\"; remove it", client_auth.as_str()));
        }
        _ => {}
    }
    client_secret.map(|leaf| leaf.value)
}

/// Client assertions (RFC 7523 §2.2): a key that signs them, or a file the platform writes them to.
struct ClientAssertion {
    private_key_file: Option<PathBuf>,
    audience: Option<String>,
    algorithm: Option<AssertionAlgorithm>,
    key_id: AssertionKeyId,
    certificate_file: Option<PathBuf>,
    client_assertion: Option<SecretSource>,
}

fn client_assertion(
    r: &mut Reader<'_>,
    t: &mut Table<'_>,
    client_auth: ClientAuth,
    jwt_dialect: Option<AssertionDialect>,
) -> ClientAssertion {
    let private_key_file = r.file(t, "private_key_file");
    let assertion_audience = r.get(t, "assertion_audience", reader::non_empty_string);
    let assertion_algorithm = r.get(t, "assertion_algorithm", reader::choice(ASSERTION_ALGORITHMS));
    let assertion_key_id = r.get(t, "assertion_key_id", key_id);
    let assertion_certificate_file = r.file(t, "assertion_certificate_file");
    if let Some(leaf) = &assertion_certificate_file {
        if client_auth != ClientAuth::PrivateKeyJwt {
            r.report_leaf(leaf, "only used with client_auth = \"private_key_jwt\"; remove it");
        } else if let Err(error) = keys::CertificateThumbprints::read(&leaf.value) {
            r.report_leaf(leaf, error);
        }
    }
    let client_assertion = secret(r, t, "client_assertion");
    let signs_grant = matches!(jwt_dialect, Some(AssertionDialect::Generic | AssertionDialect::Salesforce));
    if client_auth == ClientAuth::PrivateKeyJwt || signs_grant {
        if !t.has("private_key_file") {
            let message = match client_auth {
                ClientAuth::PrivateKeyJwt => {
                    "missing; client_auth = \"private_key_jwt\" needs the PEM private key that signs its assertions"
                }
                _ => "missing; grant = \"jwt_bearer\" needs the PEM private key that signs its assertion",
            };
            r.report_missing(t, "private_key_file", message);
        }
        if let Some(leaf) = &private_key_file {
            // The key is read now too, so `check` tells a wrong file before the first token call does.
            match keys::load_key(&leaf.value) {
                Ok(key) => {
                    if let Some(algorithm) = &assertion_algorithm {
                        if let Err(error) = key.algorithm(Some(algorithm.value), &leaf.value) {
                            r.report_leaf(algorithm, error.to_string());
                        }
                    }
                }
                Err(KeyError::Secret(SecretError::FileUnreadable { .. })) => {}
                Err(error) => r.report_leaf(leaf, error.to_string()),
            }
        }
    } else {
        let unused = "only used with client_auth = \"private_key_jwt\" or grant = \"jwt_bearer\"; remove it";
        if let Some(leaf) = &private_key_file {
            r.report_leaf(leaf, unused);
        }
        if let Some(leaf) = &assertion_audience {
            r.report_leaf(leaf, unused);
        }
        if let Some(leaf) = &assertion_algorithm {
            r.report_leaf(leaf, unused);
        }
        if let Some(leaf) = &assertion_key_id {
            r.report_leaf(leaf, unused);
        }
    }
    match (client_auth, &client_assertion) {
        (ClientAuth::ClientAssertion, None)
            if !["client_assertion", "client_assertion_file", "client_assertion_env"].iter().any(|key| t.has(key)) =>
        {
            r.report_missing(
                t,
                "client_assertion_file",
                "missing; client_auth = \"client_assertion\" needs the file the platform writes the JWT to \
                 (e.g. a projected service-account token)",
            );
        }
        (ClientAuth::ClientAssertion, _) | (_, None) => {}
        (_, Some(leaf)) => r.report_leaf(leaf, "only used with client_auth = \"client_assertion\"; remove it"),
    }
    ClientAssertion {
        private_key_file: private_key_file.map(|leaf| leaf.value),
        audience: assertion_audience.map(|leaf| leaf.value),
        algorithm: assertion_algorithm.map(|leaf| leaf.value),
        key_id: assertion_key_id.map(|leaf| leaf.value).unwrap_or_default(),
        certificate_file: assertion_certificate_file.map(|leaf| leaf.value),
        client_assertion: client_assertion.map(|leaf| leaf.value),
    }
}

/// `assertion_key_id`: a name, or `false` for no `kid` header (`true` is the default, the key's thumbprint).
fn key_id(value: &Value) -> Result<AssertionKeyId, String> {
    match value {
        Value::Bool(_, false) => Ok(AssertionKeyId::Omitted),
        Value::Bool(_, true) => Ok(AssertionKeyId::Thumbprint),
        _ => reader::non_empty_string(value)
            .map(AssertionKeyId::Named)
            .map_err(|e| format!("{e} (the kid), or false to send no kid header")),
    }
}

/// The resource owner's credentials: a refresh token seed (`grant = "refresh_token"`), or a username and password
/// (`grant = "password"`; Salesforce's JWT bearer flow names its user too).
struct ResourceOwner {
    refresh_token: Option<SecretSource>,
    username: Option<String>,
    password: Option<SecretSource>,
}

fn resource_owner(
    r: &mut Reader<'_>,
    t: &mut Table<'_>,
    grant: Grant,
    jwt_dialect: Option<AssertionDialect>,
) -> ResourceOwner {
    // The first refresh token (a seed); rotated ones live in the state store. Optional: `tokenproxy login` can
    // put one in the store instead.
    let refresh_token = secret(r, t, "refresh_token");
    if let Some(leaf) = refresh_token.as_ref().filter(|_| grant != Grant::RefreshToken) {
        r.report_leaf(leaf, "only used with grant = \"refresh_token\"; remove it");
    }
    let username = r.get(t, "username", reader::non_empty_string);
    let password = secret(r, t, "password");
    if jwt_dialect == Some(AssertionDialect::Salesforce) {
        // Salesforce: the user the connected app acts for is the assertion's `sub`.
        if !t.has("username") {
            r.report_missing(
                t,
                "username",
                "missing; assertion_dialect = \"salesforce\" needs the Salesforce username",
            );
        }
        if let Some(leaf) = &password {
            r.report_leaf(leaf, "only used with grant = \"password\"; remove it");
        }
    } else if grant == Grant::Password {
        if !t.has("username") {
            r.report_missing(t, "username", "missing; grant = \"password\" needs the resource owner's username");
        }
        if !["password", "password_file", "password_env"].iter().any(|key| t.has(key)) {
            r.report_missing(
                t,
                "password",
                "missing; grant = \"password\" needs `password`, `password_file` or `password_env`",
            );
        }
    } else {
        if let Some(leaf) = &username {
            r.report_leaf(leaf, "only used with grant = \"password\"; remove it");
        }
        if let Some(leaf) = &password {
            r.report_leaf(leaf, "only used with grant = \"password\"; remove it");
        }
    }
    ResourceOwner {
        refresh_token: refresh_token.map(|leaf| leaf.value),
        username: username.map(|leaf| leaf.value),
        password: password.map(|leaf| leaf.value),
    }
}

/// What the token request asks for: `scope`, `audience`, `resource` and `extra_params`.
struct TokenRequestParams {
    scope: Option<String>,
    audience: Option<String>,
    resource: Option<String>,
    extra_params: BTreeMap<String, String>,
}

fn token_request(r: &mut Reader<'_>, t: &mut Table<'_>, jwt_dialect: Option<AssertionDialect>) -> TokenRequestParams {
    let scope = r.get(t, "scope", reader::non_empty_string);
    if let Some(leaf) = scope.as_ref().filter(|_| jwt_dialect == Some(AssertionDialect::Salesforce)) {
        r.report_leaf(
            leaf,
            "Salesforce's JWT bearer flow takes no scope (the connected app's scopes apply); remove it",
        );
    }
    let audience = r.get(t, "audience", reader::non_empty_string);
    let resource = r.get(t, "resource", reader::non_empty_string);
    let extra_params = extra_params(r, t, "provider");
    TokenRequestParams {
        scope: scope.map(|leaf| leaf.value),
        audience: audience.map(|leaf| leaf.value),
        resource: resource.map(|leaf| leaf.value),
        extra_params,
    }
}

/// When tokens are fetched and how many calls may be made: the refresh schedule, timeouts and the call budget.
struct ProviderTiming {
    refresh_at: f64,
    expiry_skew: Duration,
    min_refresh_interval: Duration,
    default_lifetime: Duration,
    timeout: Duration,
    max_token_calls: Option<(u64, Duration, String)>,
    unauthorized_refresh_interval: Duration,
    manual_refresh_interval: Duration,
    during_refresh: DuringRefresh,
}

fn timing(r: &mut Reader<'_>, t: &mut Table<'_>, grant: Grant) -> ProviderTiming {
    let refresh_at = r.get(t, "refresh_at", fraction);
    let expiry_skew = r.get(t, "expiry_skew", reader::positive_duration);
    let min_refresh_interval = r.get(t, "min_refresh_interval", reader::duration);
    let default_lifetime = r.get(t, "default_lifetime", reader::positive_duration);
    let timeout = r.get(t, "timeout", reader::positive_duration);
    let max_token_calls = r.get(t, "max_token_calls", call_budget);
    let unauthorized_refresh_interval = r.get(t, "unauthorized_refresh_interval", reader::duration);
    let manual_refresh_interval = r.get(t, "manual_refresh_interval", reader::duration);
    let during_refresh = r.get(t, "during_refresh", reader::choice(DURING_REFRESH));
    ProviderTiming {
        refresh_at: value_or(refresh_at, provider_defaults::REFRESH_AT),
        expiry_skew: value_or(expiry_skew, provider_defaults::EXPIRY_SKEW),
        min_refresh_interval: value_or(min_refresh_interval, provider_defaults::MIN_REFRESH_INTERVAL),
        default_lifetime: value_or(default_lifetime, provider_defaults::DEFAULT_LIFETIME),
        timeout: value_or(timeout, provider_defaults::TIMEOUT),
        max_token_calls: max_token_calls.map(|leaf| leaf.value),
        unauthorized_refresh_interval: value_or(
            unauthorized_refresh_interval,
            provider_defaults::UNAUTHORIZED_REFRESH_INTERVAL,
        ),
        manual_refresh_interval: value_or(manual_refresh_interval, provider_defaults::MANUAL_REFRESH_INTERVAL),
        // Grants whose refresh rotates a refresh token may revoke the old access token with it.
        during_refresh: value_or(
            during_refresh,
            match grant {
                Grant::RefreshToken | Grant::Password => DuringRefresh::Wait,
                _ => DuringRefresh::UseCurrent,
            },
        ),
    }
}

/// TLS to the IdP: the CA to trust, and the client certificate (`tls_client_auth` needs one).
struct TlsFiles {
    ca_file: Option<PathBuf>,
    client_cert_file: Option<PathBuf>,
    client_key_file: Option<PathBuf>,
}

fn tls_files(r: &mut Reader<'_>, t: &mut Table<'_>, client_auth: ClientAuth) -> TlsFiles {
    let ca_file = r.file(t, "ca_file");
    let client_cert_file = r.file(t, "client_cert_file");
    let client_key_file = r.file(t, "client_key_file");
    match (t.has("client_cert_file"), t.has("client_key_file")) {
        (true, false) => r.report_missing(t, "client_key_file", "missing; `client_cert_file` needs its private key"),
        (false, true) => r.report_missing(t, "client_cert_file", "missing; `client_key_file` needs its certificate"),
        (false, false) if matches!(client_auth, ClientAuth::TlsClientAuth | ClientAuth::SelfSignedTlsClientAuth) => {
            let message = format!(
                "missing; client_auth = \"{}\" authenticates with a client certificate on the TLS connection to the \
                 IdP: set client_cert_file and client_key_file",
                client_auth.as_str()
            );
            r.report_missing(t, "client_cert_file", message);
        }
        _ => {}
    }
    TlsFiles {
        ca_file: ca_file.map(|leaf| leaf.value),
        client_cert_file: client_cert_file.map(|leaf| leaf.value),
        client_key_file: client_key_file.map(|leaf| leaf.value),
    }
}

/// Who may hold the token: handed out (`vend`, docs/vending.md), or bound to a key only tokenproxy holds (DPoP,
/// docs/dpop.md). The two exclude each other.
struct Holding {
    vend: bool,
    sink_file: Option<PathBuf>,
    sink_format: SinkFormat,
    dpop: bool,
    dpop_key_file: Option<PathBuf>,
    dpop_algorithm: DpopAlgorithm,
}

fn holding(
    r: &mut Reader<'_>,
    t: &mut Table<'_>,
    grant: Grant,
    client_auth: ClientAuth,
    exchange: Option<&ExchangeConfig>,
) -> Holding {
    // Handing the raw token out (docs/vending.md).
    let vend_leaf = r.get(t, "vend", reader::boolean);
    let vend = vend_leaf.as_ref().is_some_and(|leaf| leaf.value);
    let sink_file = r.get(t, "sink_file", reader::path);
    let sink_format = r.get(t, "sink_format", reader::choice(SINK_FORMATS));
    if let Some(leaf) = &sink_file {
        if !vend {
            r.report_leaf(leaf, "sink_file hands the raw token to whoever reads the file: set vend = true to allow it");
        }
    } else if let Some(leaf) = &sink_format {
        r.report_leaf(leaf, "only used with sink_file; remove it");
    }
    let (dpop, dpop_key_file, dpop_algorithm) = dpop(r, t, grant, vend);
    if let Some(leaf) = vend_leaf.as_ref().filter(|leaf| leaf.value) {
        if matches!(client_auth, ClientAuth::TlsClientAuth | ClientAuth::SelfSignedTlsClientAuth) {
            r.report_leaf(
                leaf,
                "the tokens of a provider that authenticates with a client certificate may be bound to it (RFC 8705): \
                 they would not work in other hands, so they cannot be vended",
            );
        }
        if exchange.is_some_and(|e| e.subject == SubjectSource::Request) {
            r.report_leaf(leaf, "this provider exchanges each caller's token: it has no token of its own to vend");
        }
    }
    Holding {
        vend,
        sink_file: sink_file.map(|leaf| leaf.value),
        sink_format: value_or(sink_format, SinkFormat::Raw),
        dpop,
        dpop_key_file,
        dpop_algorithm,
    }
}

/// DPoP (docs/dpop.md): sender-constrained tokens, bound to a key only tokenproxy holds; `dpop_key_file` is read now.
fn dpop(r: &mut Reader<'_>, t: &mut Table<'_>, grant: Grant, vend: bool) -> (bool, Option<PathBuf>, DpopAlgorithm) {
    let dpop_leaf = r.get(t, "dpop", reader::boolean);
    let dpop = dpop_leaf.as_ref().is_some_and(|leaf| leaf.value);
    let dpop_key_file = r.file(t, "dpop_key_file");
    let dpop_algorithm = r.get(t, "dpop_algorithm", reader::choice(DPOP_ALGORITHMS));
    if let Some(leaf) = &dpop_algorithm {
        if !dpop {
            r.report_leaf(leaf, "only used with dpop = true; set it, or remove this key");
        } else if dpop_key_file.is_some() {
            r.report_leaf(leaf, "the key in dpop_key_file decides the algorithm: remove one of the two");
        }
    }
    if let Some(leaf) = &dpop_key_file {
        if !dpop {
            r.report_leaf(leaf, "only used with dpop = true; set it, or remove this key");
        } else {
            // Read now too, so that `check` tells a wrong file before the first token call does.
            if let Err(reason) = keys::ProofKey::load(&leaf.value) {
                r.report_leaf(leaf, format!("{}: {reason}", leaf.value.display()));
            }
        }
    }
    if let Some(leaf) = dpop_leaf.as_ref().filter(|leaf| leaf.value) {
        if matches!(grant, Grant::RefreshToken) && !t.has("dpop_key_file") {
            r.report_leaf(
                leaf,
                "a refresh-token session with DPoP needs dpop_key_file: its refresh token may be bound to the key, and \
                 a key made at startup does not survive a restart",
            );
        }
        if vend {
            r.report_leaf(
                leaf,
                "DPoP tokens are bound to a key only tokenproxy holds: they would not work in other hands, so they \
                 cannot be vended (remove vend or dpop)",
            );
        }
    }
    (dpop, dpop_key_file.map(|leaf| leaf.value), value_or(dpop_algorithm, DpopAlgorithm::Es256))
}

/// Reads the secret `key` from one of `key`, `key_file` or `key_env`, and checks it can be read now.
///
/// Exactly one form may be set in a layer. A form set in the environment replaces the forms the file sets, so
/// `TOKENPROXY_PROVIDERS__ORDERS__CLIENT_SECRET` overrides a `client_secret_file` in the file.
pub(super) fn secret(r: &mut Reader<'_>, t: &mut Table<'_>, key: &str) -> Option<Leaf<SecretSource>> {
    let keys = [key.to_owned(), format!("{key}_file"), format!("{key}_env")];
    let set: Vec<_> =
        keys.iter().enumerate().filter_map(|(form, key)| t.field(key).map(|field| (form, field))).collect();
    let from_env = set.iter().any(|(_, field)| r.is_environment(field.value.tag()));
    let set: Vec<_> = set.into_iter().filter(|(_, field)| !from_env || r.is_environment(field.value.tag())).collect();
    let (form, field) = match set.as_slice() {
        [] => return None,
        [(form, field)] => (*form, field),
        [_, (_, second), ..] => {
            let names: Vec<String> = set.iter().map(|(form, _)| format!("`{}`", keys[*form])).collect();
            let message = format!("{} are all set; set only one", and_list(&names));
            r.report_field(second, message);
            return None;
        }
    };
    let source = match form {
        0 => reader::string(field.value).map(|value| SecretSource::Inline(Secret::new(value))),
        1 => reader::path(field.value).map(SecretSource::File),
        _ => reader::string(field.value).and_then(|var| {
            if var.is_empty() || var.contains(['=', '\0']) {
                Err("must name an environment variable".to_owned())
            } else {
                Ok(SecretSource::Env(var))
            }
        }),
    };
    // The error names the file or variable, never the value.
    let source = match source {
        Ok(source) => source,
        Err(message) => {
            r.report_field(field, message);
            return None;
        }
    };
    let usable = match source.read() {
        Ok(_) => true,
        // Not there (yet): a problem, or offline a warning.
        Err(e @ (SecretError::FileUnreadable { .. } | SecretError::EnvMissing { .. })) => {
            r.report_unavailable(field, e.to_string())
        }
        Err(e) => {
            r.report_field(field, e.to_string());
            false
        }
    };
    usable.then(|| Leaf { value: source, path: field.path.clone(), tag: field.value.tag() })
}

/// "`a` and `b`", "`a`, `b` and `c`".
fn and_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [only] => only.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// `extra_params`: a table of form parameters; values may be strings, numbers or booleans.
/// `assertion_claims = { iss = "…", sub = "…", aud = "…", extra = { … } }`: strings only.
fn assertion_claims(r: &mut Reader<'_>, provider: &mut Table<'_>) -> AssertionClaims {
    let mut t = r.table(provider, "assertion_claims");
    let iss = r.get(&mut t, "iss", reader::non_empty_string).map(|leaf| leaf.value);
    let sub = r.get(&mut t, "sub", reader::non_empty_string).map(|leaf| leaf.value);
    let aud = r.get(&mut t, "aud", reader::non_empty_string).map(|leaf| leaf.value);
    let mut extra = BTreeMap::new();
    let e = r.table(&mut t, "extra");
    for (key, value) in e.entries() {
        let path = e.path.key(key);
        match value {
            Value::String(_, text) if !["iss", "sub", "aud", "exp", "iat", "jti"].contains(&key.as_str()) => {
                extra.insert(key.clone(), text.clone());
            }
            Value::String(..) => r.report(&path, value.tag(), format!("`{key}` is set by tokenproxy itself")),
            _ => r.report(&path, value.tag(), "claims here are strings"),
        }
    }
    r.finish(t);
    AssertionClaims { iss, sub, aud, extra }
}

/// Values of `sink_format`.
const SINK_FORMATS: &[(&str, SinkFormat)] = &[("raw", SinkFormat::Raw), ("json", SinkFormat::Json)];

/// Values of `dpop_algorithm`.
const DPOP_ALGORITHMS: &[(&str, DpopAlgorithm)] = &[("ES256", DpopAlgorithm::Es256), ("EdDSA", DpopAlgorithm::EdDsa)];

/// Values of `exchange_dialect`.
const EXCHANGE_DIALECTS: &[(&str, ExchangeDialect)] =
    &[("rfc8693", ExchangeDialect::Rfc8693), ("entra_obo", ExchangeDialect::EntraObo)];

/// Values of `subject_token_source`.
const SUBJECT_SOURCES: &[(&str, bool)] = &[("request", true), ("file", false)];

/// Keys of `grant = "token_exchange"` only.
const EXCHANGE_KEYS: &[&str] = &[
    "subject_token_source",
    "subject_token_file",
    "subject_token_type",
    "actor_token",
    "actor_token_file",
    "actor_token_env",
    "actor_token_type",
    "requested_token_type",
    "exchange_dialect",
    "max_subjects",
    "refused_subject_ttl",
    "exchange_new_subjects_per_second",
    "exchange_max_in_flight",
    "subject_issuer",
    "subject_jwks_uri",
    "subject_audience",
];

/// A token type: a short name of RFC 8693 §3, or a URN as is.
fn token_type(value: &Value) -> Result<String, String> {
    let name = reader::non_empty_string(value)?;
    Ok(match name.as_str() {
        "access_token" | "refresh_token" | "id_token" | "saml1" | "saml2" => {
            format!("urn:ietf:params:oauth:token-type:{name}")
        }
        "jwt" => "urn:ietf:params:oauth:token-type:jwt".to_owned(),
        _ if name.contains(':') => name,
        _ => {
            return Err(format!(
            "unknown token type `{name}` (expected access_token, jwt, id_token, refresh_token, saml1, saml2 or a URN)"
        ))
        }
    })
}

/// The keys of `grant = "token_exchange"`; reported as unused with any other grant.
fn exchange(r: &mut Reader<'_>, t: &mut Table<'_>, grant: Grant) -> Option<ExchangeConfig> {
    if grant != Grant::TokenExchange {
        for key in EXCHANGE_KEYS {
            if let Some(field) = t.field(key) {
                r.report_field(&field, "only used with grant = \"token_exchange\"; remove it");
            }
        }
        return None;
    }
    let source = r.get(t, "subject_token_source", reader::choice(SUBJECT_SOURCES));
    let file = r.file(t, "subject_token_file");
    let from_request = source.as_ref().map_or(!t.has("subject_token_file"), |leaf| leaf.value);
    let subject = match (from_request, file) {
        (true, Some(leaf)) => {
            r.report_leaf(&leaf, "only used with subject_token_source = \"file\"; the subject comes from each request");
            SubjectSource::Request
        }
        (true, None) => SubjectSource::Request,
        (false, Some(leaf)) => SubjectSource::File(leaf.value),
        (false, None) => {
            if !t.has("subject_token_file") {
                r.report_missing(
                    t,
                    "subject_token_file",
                    "missing; subject_token_source = \"file\" exchanges the token in this file (e.g. a projected \
                     service-account token)",
                );
            }
            SubjectSource::File(PathBuf::new())
        }
    };
    let subject_token_type = r.get(t, "subject_token_type", token_type);
    let actor_token = secret(r, t, "actor_token").map(|leaf| leaf.value);
    let actor_token_type = r.get(t, "actor_token_type", token_type);
    let requested_token_type = r.get(t, "requested_token_type", token_type);
    let dialect = value_or(r.get(t, "exchange_dialect", reader::choice(EXCHANGE_DIALECTS)), ExchangeDialect::Rfc8693);
    if dialect == ExchangeDialect::EntraObo {
        for key in ["actor_token", "actor_token_file", "actor_token_env", "actor_token_type", "requested_token_type"] {
            if let Some(field) = t.field(key) {
                r.report_field(
                    &field,
                    "not part of Entra's on-behalf-of request (exchange_dialect = \"entra_obo\"); remove it",
                );
            }
        }
    }
    let max_subjects = r.get(t, "max_subjects", reader::positive_count);
    let refused_subject_ttl = r.get(t, "refused_subject_ttl", reader::duration);
    let new_subjects_per_second = r.get(t, "exchange_new_subjects_per_second", |value| match reader::number(value)? {
        n if n > 0.0 && n.is_finite() => Ok(n),
        _ => Err("must be a number above 0 (new callers exchanged per second)".to_owned()),
    });
    let max_in_flight = r.get(t, "exchange_max_in_flight", reader::positive_count);
    let subject_issuer = r.get(t, "subject_issuer", |v| http_url(v, UrlUse::TokenEndpoint));
    let subject_jwks_uri = r.get(t, "subject_jwks_uri", |v| http_url(v, UrlUse::TokenEndpoint));
    let subject_audience = r.get(t, "subject_audience", reader::non_empty_string);
    if subject_issuer.is_none() {
        for key in ["subject_jwks_uri", "subject_audience"] {
            if let Some(field) = t.field(key) {
                r.report_field(&field, "only used with subject_issuer (the issuer whose JWTs the subjects are)");
            }
        }
    }
    if !matches!(subject, SubjectSource::Request) {
        for key in [
            "max_subjects",
            "refused_subject_ttl",
            "exchange_new_subjects_per_second",
            "exchange_max_in_flight",
            "subject_issuer",
            "subject_jwks_uri",
            "subject_audience",
        ] {
            if let Some(field) = t.field(key) {
                r.report_field(
                    &field,
                    "only used with subject_token_source = \"request\" (a token per caller); remove it",
                );
            }
        }
    }
    let access_token_type = "urn:ietf:params:oauth:token-type:access_token".to_owned();
    Some(ExchangeConfig {
        subject,
        subject_token_type: value_or(subject_token_type, access_token_type.clone()),
        actor_token,
        actor_token_type: value_or(actor_token_type, access_token_type),
        requested_token_type: requested_token_type.map(|leaf| leaf.value),
        dialect,
        max_subjects: max_subjects.map_or(10_000, |leaf| leaf.value as u64),
        refused_subject_ttl: value_or(refused_subject_ttl, Duration::from_secs(30)),
        new_subjects_per_second: value_or(new_subjects_per_second, 20.0),
        max_in_flight: value_or(max_in_flight, 32),
        subject_issuer: subject_issuer.map(|leaf| leaf.value),
        subject_jwks_uri: subject_jwks_uri.map(|leaf| leaf.value),
        subject_audience: subject_audience.map(|leaf| leaf.value),
    })
}

/// `max_token_calls`: `N/s`, `N/m`, `N/h` or `N/d` (N ≥ 1).
fn call_budget(value: &Value) -> Result<(u64, Duration, String), String> {
    let text = reader::non_empty_string(value)?;
    let usage = || format!("`{text}` is not a budget: write calls per window, such as \"600/h\" (s, m, h or d)");
    let (calls, window) = text.split_once('/').ok_or_else(usage)?;
    let calls: u64 = calls.trim().parse().map_err(|_| usage())?;
    let window = match window.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        "d" => Duration::from_secs(86_400),
        _ => return Err(usage()),
    };
    if calls == 0 {
        return Err("a budget of 0 calls would never let a token be fetched; remove the key to have none".into());
    }
    Ok((calls, window, text.trim().to_owned()))
}

/// `extra_params` of a provider, or of a route (`owner` says whose `scope` to set instead of a parameter).
pub(super) fn extra_params(r: &mut Reader<'_>, provider: &mut Table<'_>, owner: &str) -> BTreeMap<String, String> {
    let t = r.table(provider, "extra_params");
    let mut params = BTreeMap::new();
    for (key, value) in t.entries() {
        let path = t.path.key(key);
        if key.is_empty() {
            r.report(&path, value.tag(), "parameter names must not be empty");
            continue;
        }
        if RESERVED_PARAMS.contains(&key.as_str()) {
            let hint = match key.as_str() {
                "scope" | "audience" | "resource" => format!("; set the {owner}'s `{key}` instead"),
                _ => String::new(),
            };
            r.report(&path, value.tag(), format!("`{key}` is sent by tokenproxy itself{hint}"));
            continue;
        }
        // Values are not echoed: a parameter may well be sensitive.
        let text = match value {
            Value::String(_, s) => Some(s.clone()),
            Value::Char(_, c) => Some(c.to_string()),
            Value::Bool(_, b) => Some(b.to_string()),
            Value::Num(_, n) => n
                .to_i128()
                .map(|n| n.to_string())
                .or_else(|| n.to_u128_lossy().map(|n| n.to_string()))
                .or_else(|| n.to_f64().map(|n| n.to_string())),
            _ => None,
        };
        match text {
            Some(text) => {
                params.insert(key.clone(), text);
            }
            None => r.report(&path, value.tag(), format!("expected a string, found {}", reader::kind(value))),
        }
    }
    params
}

/// A fraction in (0, 1].
fn fraction(value: &Value) -> Result<f64, String> {
    let n = reader::number(value)?;
    if n > 0.0 && n <= 1.0 {
        Ok(n)
    } else {
        Err(format!("must be greater than 0 and at most 1 (a fraction of the token's lifetime), found {n}"))
    }
}
