//! What an identity provider answers: lenient but safe parsing of token responses, and typed errors.
//!
//! Lenient: `expires_in` as a number or a numeric string, JSON or form-urlencoded bodies, `token_type` in any case,
//! error bodies that are not JSON. Safe: a token that is not a valid header value is refused, a response body is
//! read up to 1 MiB, redirects are never followed, and no error message ever contains a token or a secret.

use std::time::{Duration, SystemTime};

use http::header::{CONTENT_TYPE, LOCATION, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, StatusCode};

use super::secrets::{AccessToken, RefreshToken};
use super::store::StoreError;
use crate::config::SecretError;

/// A token the IdP issued, with its lifetime resolved.
pub struct TokenResponse {
    /// The access token, validated as a header value.
    pub access_token: AccessToken,
    /// From `expires_in`, else the JWT `exp`, else the provider's `default_lifetime`.
    pub lifetime: Duration,
    /// The scopes granted, when the IdP says.
    pub scope: Option<String>,
    /// A new refresh token (rotation), when the IdP issued one.
    pub refresh_token: Option<RefreshToken>,
    /// The refresh token's own lifetime: `refresh_expires_in` (Keycloak) or `refresh_token_expires_in` (GitHub,
    /// Snowflake).
    pub refresh_token_lifetime: Option<Duration>,
    /// `token_type` is `DPoP` (RFC 9449 §5): the token is bound to the key whose proof the call carried.
    pub dpop_bound: bool,
    /// The key it is bound to, set by the provider's client when it sent a proof and the token is DPoP-bound.
    pub dpop: Option<std::sync::Arc<super::dpop::DpopKey>>,
    /// Read from the shared store (another replica's token call), not from this replica's own.
    pub shared: bool,
}

impl TokenResponse {
    /// A response with just a token and its lifetime (tests, fakes).
    pub fn new(access_token: HeaderValue, lifetime: Duration) -> TokenResponse {
        let access_token = AccessToken::new(access_token);
        TokenResponse {
            access_token,
            lifetime,
            scope: None,
            refresh_token: None,
            refresh_token_lifetime: None,
            dpop_bound: false,
            dpop: None,
            shared: false,
        }
    }
}

impl std::fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenResponse")
            .field("lifetime", &self.lifetime)
            .field("scope", &self.scope)
            .field("refresh_token", &self.refresh_token.as_ref().map(|_| "[redacted]"))
            .field("refresh_token_lifetime", &self.refresh_token_lifetime)
            .field("dpop", &self.dpop)
            .finish()
    }
}

/// Why a token call failed. Display never includes a token or a secret.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The IdP answered with an OAuth error (`invalid_client`, …).
    #[error("the identity provider answered {status} {error}{}", description.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Rejected {
        /// HTTP status.
        status: u16,
        /// The OAuth `error` code.
        error: String,
        /// The IdP's `error_description`, sanitized.
        description: Option<String>,
    },
    /// The IdP answered an error status without an OAuth error body.
    #[error("the identity provider answered HTTP {status}")]
    Status {
        /// HTTP status.
        status: u16,
        /// Its `Retry-After`, if any.
        retry_after: Option<Duration>,
    },
    /// The token endpoint redirected; tokenproxy never follows redirects from an IdP.
    #[error("the token endpoint answered a redirect ({status}{}); redirects are never followed: fix token_url", location.as_deref().map(|l| format!(" to {l}")).unwrap_or_default())]
    Redirect {
        /// HTTP status.
        status: u16,
        /// Where it pointed.
        location: Option<String>,
    },
    /// No answer within the provider's `timeout`.
    #[error("the token call timed out after {0:?}")]
    Timeout(Duration),
    /// Connection or TLS failure: the request was not sent.
    #[error("cannot reach the identity provider: {0}")]
    Connect(String),
    /// The connection failed after the request was sent: whether the IdP acted on it is not known.
    #[error("the connection to the identity provider failed during the call: {0}")]
    Interrupted(String),
    /// The IdP's answer could not be used.
    #[error("unusable token response: {0}")]
    Malformed(String),
    /// The client secret (or password, or seed refresh token) could not be read.
    #[error("{0}")]
    Secret(#[from] SecretError),
    /// The client assertion could not be made (`private_key_jwt`, `client_assertion`).
    #[error("client assertion: {0}")]
    Assertion(#[from] super::assertion::AssertionError),
    /// The refresh token was refused (`invalid_grant`): the session is over.
    #[error("refresh token expired or revoked: a new login is needed (`tokenproxy login {provider}` or a new refresh_token seed); the identity provider said: {cause}")]
    LoginNeeded {
        /// The provider's name.
        provider: String,
        /// What the IdP said.
        cause: Box<TokenError>,
    },
    /// The shared session was ended with `tokenproxy logout` (docs/fleet.md).
    #[error("the session of provider `{0}` was ended with `tokenproxy logout`: run `tokenproxy login {0}` (or set a new refresh_token seed) to start a new one")]
    LoggedOut(String),
    /// There is no refresh token at all.
    #[error("no refresh token for provider `{0}`: set refresh_token_file (or _env) or run `tokenproxy login {0}`")]
    NoRefreshToken(String),
    /// The state store could not be read or written (a rotated refresh token is never used before it is stored).
    #[error("{0}")]
    Store(#[from] StoreError),
    /// Discovery (`issuer`) failed or gave unusable metadata.
    #[error("discovery: {0}")]
    Discovery(String),
    /// `max_token_calls` were made in the current window: no call was made.
    #[error("the provider's budget of token calls (max_token_calls = {limit}) is spent until the window ends")]
    BudgetExhausted {
        /// The budget as configured (`600/h`).
        limit: String,
        /// Until the window ends.
        retry_after: Duration,
    },
}

/// OAuth error codes that no retry will fix: they need a config or IdP change.
const PERMANENT_ERRORS: &[&str] = &[
    "invalid_client",
    "invalid_grant",
    "unauthorized_client",
    "invalid_scope",
    "unsupported_grant_type",
    "invalid_request",
    "access_denied",
    "invalid_target",
];

impl TokenError {
    /// Whether the call may have rotated the tokens without tokenproxy getting the new ones: no answer came (a
    /// timeout, a connection lost after the request was sent), or the IdP's success could not be used or stored.
    /// An access token the call would have replaced may then be revoked. Every other failure leaves the old tokens
    /// as they were: nothing was sent (no connection, no secret, no endpoint), or the IdP answered with an error.
    pub fn may_have_rotated(&self) -> bool {
        match self {
            TokenError::Timeout(_) | TokenError::Interrupted(_) | TokenError::Malformed(_) | TokenError::Store(_) => {
                true
            }
            TokenError::Rejected { .. }
            | TokenError::Status { .. }
            | TokenError::Redirect { .. }
            | TokenError::Connect(_)
            | TokenError::Secret(_)
            | TokenError::Assertion(_)
            | TokenError::LoginNeeded { .. }
            | TokenError::LoggedOut(_)
            | TokenError::NoRefreshToken(_)
            | TokenError::Discovery(_)
            | TokenError::BudgetExhausted { .. } => false,
        }
    }

    /// Permanent errors back off in minutes instead of seconds.
    pub fn is_permanent(&self) -> bool {
        match self {
            TokenError::Rejected { error, status, .. } => {
                PERMANENT_ERRORS.contains(&error.as_str())
                    || (!matches!(error.as_str(), "temporarily_unavailable" | "server_error") && !is_transient(*status))
            }
            TokenError::Status { status, .. } => !is_transient(*status),
            TokenError::Redirect { .. }
            | TokenError::LoginNeeded { .. }
            | TokenError::LoggedOut(_)
            | TokenError::NoRefreshToken(_) => true,
            TokenError::Timeout(_)
            | TokenError::Connect(_)
            | TokenError::Interrupted(_)
            | TokenError::Malformed(_)
            | TokenError::Secret(_)
            | TokenError::Assertion(_)
            | TokenError::Store(_)
            | TokenError::Discovery(_)
            | TokenError::BudgetExhausted { .. } => false,
        }
    }

    /// What to check for the common failures (`tokenproxy check --fetch` prints it under the error).
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            TokenError::Rejected { error, .. } => match error.as_str() {
                "invalid_client" => Some(
                    "the IdP refused the client's credentials: check client_id and the secret, and client_auth \
                     (client_secret_basic sends them in an Authorization header, client_secret_post in the form; \
                     many IdPs accept only the method registered for the client)",
                ),
                "invalid_scope" => Some("a requested scope is unknown or not allowed for this client: check `scope`"),
                "unauthorized_client" => {
                    Some("this client may not use this grant: enable it for the client at the IdP (e.g. client credentials)")
                }
                "unsupported_grant_type" => Some("the IdP does not offer this grant at this endpoint: check `grant` and token_url"),
                "invalid_grant" => Some("the grant itself was refused: wrong username/password, or an expired or revoked refresh token"),
                "invalid_target" | "invalid_request" => {
                    Some("check `audience`, `resource` and `extra_params`: the IdP may want others (Entra ID: scope = \"api://APP/.default\")")
                }
                _ => None,
            },
            TokenError::Status { status: 404, .. } => Some("token_url does not exist at the IdP: check the path"),
            TokenError::Status { status: 401 | 403, .. } => Some("the IdP refused the request: check the client credentials and client_auth"),
            TokenError::Malformed(message) if message.contains("clock") => {
                Some("this machine's clock looks wrong (clock skew): check NTP")
            }
            TokenError::Connect(_) | TokenError::Interrupted(_) | TokenError::Timeout(_) => {
                Some("check the URL, DNS, firewalls and proxies; for a private CA set ca_file")
            }
            _ => None,
        }
    }

    /// The IdP's `Retry-After`, if it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            TokenError::Status { retry_after, .. } => *retry_after,
            TokenError::BudgetExhausted { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

fn is_transient(status: u16) -> bool {
    status >= 500 || status == 429 || status == 408
}

/// Parses a token endpoint's answer.
pub fn parse_response(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    default_lifetime: Duration,
) -> Result<TokenResponse, TokenError> {
    if status.is_redirection() {
        let location = headers.get(LOCATION).and_then(|v| v.to_str().ok()).map(|l| sanitize(l, 200));
        return Err(TokenError::Redirect { status: status.as_u16(), location });
    }
    let fields = parse_fields(headers, body);
    if !status.is_success() {
        let error = fields.as_ref().and_then(|f| f.get("error")).and_then(|e| e.as_str());
        return Err(match error {
            Some(error) => TokenError::Rejected {
                status: status.as_u16(),
                error: sanitize(error, 80),
                description: fields
                    .as_ref()
                    .and_then(|f| f.get("error_description"))
                    .and_then(|d| d.as_str())
                    .map(|d| sanitize(d, 300)),
            },
            None => TokenError::Status { status: status.as_u16(), retry_after: retry_after(headers) },
        });
    }
    let fields = fields.ok_or_else(|| TokenError::Malformed("the body is neither JSON nor form-urlencoded".into()))?;
    if let Some(error) = fields.get("error").and_then(|e| e.as_str()) {
        // Some IdPs answer 200 with an error body.
        return Err(TokenError::Rejected {
            status: status.as_u16(),
            error: sanitize(error, 80),
            description: fields.get("error_description").and_then(|d| d.as_str()).map(|d| sanitize(d, 300)),
        });
    }
    let token = fields
        .get("access_token")
        .and_then(|t| t.as_str())
        .ok_or_else(|| TokenError::Malformed("no access_token".into()))?;
    if token.is_empty() || !token.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(TokenError::Malformed(
            "access_token contains characters that are not allowed in a header (refused, never sent)".into(),
        ));
    }
    let access_token = HeaderValue::from_str(token)
        .map_err(|_| TokenError::Malformed("access_token is not a valid header value".into()))?;
    let kind = fields.get("token_type").and_then(|t| t.as_str());
    let dpop_bound = kind.is_some_and(|kind| kind.eq_ignore_ascii_case("dpop"));
    if let Some(kind) = kind.filter(|kind| !kind.eq_ignore_ascii_case("bearer") && !dpop_bound) {
        tracing::debug!(token_type = %sanitize(kind, 40), "token_type is not Bearer; using the token as given");
    }
    // The earlier of `expires_in` and a JWT's `exp`: IdPs that round `iat` down (oidc-provider) put `exp` up to a
    // second before `expires_in` says, and an upstream checking `exp` would refuse the token in that second.
    let lifetime = match (expires_in(fields.get("expires_in"))?, jwt_lifetime(token)?) {
        (Some(stated), Some(jwt)) => stated.min(jwt),
        (Some(stated), None) => stated,
        (None, Some(jwt)) => jwt,
        (None, None) => default_lifetime,
    };
    let scope = fields.get("scope").and_then(|s| s.as_str()).map(|s| sanitize(s, 1000));
    let refresh_token =
        fields.get("refresh_token").and_then(|t| t.as_str()).filter(|t| !t.is_empty()).map(RefreshToken::new);
    // Keycloak: refresh_expires_in (0 = offline token, no expiry); GitHub, Snowflake: refresh_token_expires_in.
    let refresh_token_lifetime =
        match fields.get("refresh_expires_in").or_else(|| fields.get("refresh_token_expires_in")) {
            Some(value) => expires_in(Some(value)).unwrap_or(None),
            None => None,
        };
    let access_token = AccessToken::new(access_token);
    Ok(TokenResponse {
        access_token,
        lifetime,
        scope,
        refresh_token,
        refresh_token_lifetime,
        dpop_bound,
        dpop: None,
        shared: false,
    })
}

/// The body as a map: JSON object, or form-urlencoded (GitHub's default).
fn parse_fields(headers: &HeaderMap, body: &[u8]) -> Option<serde_json::Map<String, serde_json::Value>> {
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(body) {
        return Some(map);
    }
    let is_form = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/x-www-form-urlencoded") || ct.starts_with("text/plain"));
    if is_form && !body.is_empty() {
        let map = form_urlencoded::parse(body)
            .map(|(k, v)| (k.into_owned(), serde_json::Value::String(v.into_owned())))
            .collect::<serde_json::Map<_, _>>();
        return (!map.is_empty()).then_some(map);
    }
    None
}

/// `expires_in` as a positive number or numeric string; 0 or absent means "not given".
fn expires_in(value: Option<&serde_json::Value>) -> Result<Option<Duration>, TokenError> {
    let seconds = match value {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::Number(n)) => n.as_f64(),
        Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
        Some(_) => None,
    };
    match seconds {
        Some(s) if s.is_finite() && s > 0.0 => Ok(Some(Duration::from_secs_f64(s.min(10.0 * 365.0 * 86_400.0)))),
        Some(0.0) => Ok(None),
        _ => Err(TokenError::Malformed("expires_in is not a positive number".into())),
    }
}

/// The remaining lifetime from a JWT's `exp`, if the token is a JWT with one.
fn jwt_lifetime(token: &str) -> Result<Option<Duration>, TokenError> {
    #[derive(serde::Deserialize)]
    struct Claims {
        exp: Option<f64>,
    }
    let Ok(claims) = jsonwebtoken::dangerous::insecure_decode_claims::<Claims>(token) else {
        return Ok(None);
    };
    let Some(exp) = claims.exp.filter(|e| e.is_finite() && *e > 0.0) else {
        return Ok(None);
    };
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    if exp <= now {
        return Err(TokenError::Malformed(
            "the token's JWT exp is already past (is this machine's clock right?)".into(),
        ));
    }
    Ok(Some(Duration::from_secs_f64(exp - now)))
}

/// `Retry-After` as seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO))
}

/// Text from an IdP made safe for logs: control characters replaced, length bounded.
fn sanitize(text: &str, max: usize) -> String {
    let mut out: String = text.chars().take(max).map(|c| if c.is_control() { ' ' } else { c }).collect();
    if text.chars().count() > max {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod dialects;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_response_never_shows_its_token() {
        let response = TokenResponse::new(HeaderValue::from_static("eyJ.secret-token"), Duration::from_secs(60));
        assert!(!format!("{response:?}").contains("secret-token"));
    }

    const DEFAULT: Duration = Duration::from_secs(300);

    fn ok(body: &str) -> Result<TokenResponse, TokenError> {
        parse_response(StatusCode::OK, &HeaderMap::new(), body.as_bytes(), DEFAULT)
    }

    fn with_content_type(ct: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_static(ct));
        h
    }

    #[test]
    fn expires_in_as_number_or_string() {
        assert_eq!(ok(r#"{"access_token":"a","expires_in":3600}"#).unwrap().lifetime, Duration::from_secs(3600));
        assert_eq!(ok(r#"{"access_token":"a","expires_in":"120"}"#).unwrap().lifetime, Duration::from_secs(120));
        assert_eq!(ok(r#"{"access_token":"a","expires_in":59.5}"#).unwrap().lifetime, Duration::from_millis(59_500));
        assert!(matches!(ok(r#"{"access_token":"a","expires_in":-5}"#), Err(TokenError::Malformed(_))));
        assert!(matches!(ok(r#"{"access_token":"a","expires_in":"soon"}"#), Err(TokenError::Malformed(_))));
    }

    #[test]
    fn missing_expires_in_uses_jwt_exp_then_default() {
        use base64::Engine;
        let exp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() + 600;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let jwt = format!("{}.{}.sig", b64(r#"{"alg":"RS256"}"#), b64(&format!(r#"{{"exp":{exp}}}"#)));
        let lifetime = ok(&format!(r#"{{"access_token":"{jwt}"}}"#)).unwrap().lifetime;
        assert!(lifetime > Duration::from_secs(595) && lifetime <= Duration::from_secs(600), "{lifetime:?}");
        assert_eq!(ok(r#"{"access_token":"opaque"}"#).unwrap().lifetime, DEFAULT);
        // Both given: the earlier wins (an IdP that floors iat states a lifetime its exp does not honour).
        let lifetime = ok(&format!(r#"{{"access_token":"{jwt}","expires_in":3600}}"#)).unwrap().lifetime;
        assert!(lifetime <= Duration::from_secs(600), "{lifetime:?}");
        let lifetime = ok(&format!(r#"{{"access_token":"{jwt}","expires_in":60}}"#)).unwrap().lifetime;
        assert_eq!(lifetime, Duration::from_secs(60));
        assert_eq!(ok(r#"{"access_token":"opaque","expires_in":0}"#).unwrap().lifetime, DEFAULT);
    }

    #[test]
    fn refuses_tokens_that_are_not_header_values() {
        for bad in [r#"{"access_token":"a\r\nX-Evil: 1"}"#, r#"{"access_token":"a b"}"#, r#"{"access_token":""}"#] {
            let err = ok(bad).unwrap_err();
            assert!(matches!(err, TokenError::Malformed(_)), "{bad}");
            assert!(!err.to_string().contains("Evil"));
        }
        assert!(matches!(ok(r#"{"token":"a"}"#), Err(TokenError::Malformed(_))));
        assert!(matches!(ok("<html>"), Err(TokenError::Malformed(_))));
    }

    #[test]
    fn form_urlencoded_responses() {
        let r = parse_response(
            StatusCode::OK,
            &with_content_type("application/x-www-form-urlencoded; charset=utf-8"),
            b"access_token=gho_abc&scope=repo&token_type=bearer",
            DEFAULT,
        )
        .unwrap();
        assert_eq!(r.access_token.expose(), "gho_abc");
        assert_eq!(r.scope.as_deref(), Some("repo"));
    }

    #[test]
    fn errors_are_classified() {
        let rejected = |status: u16, body: &str| {
            parse_response(StatusCode::from_u16(status).unwrap(), &HeaderMap::new(), body.as_bytes(), DEFAULT)
                .unwrap_err()
        };
        let e = rejected(401, r#"{"error":"invalid_client","error_description":"bad secret\nnext"}"#);
        assert!(e.is_permanent());
        assert_eq!(e.to_string(), "the identity provider answered 401 invalid_client: bad secret next");
        assert!(rejected(400, r#"{"error":"invalid_scope"}"#).is_permanent());
        assert!(!rejected(503, r#"{"error":"temporarily_unavailable"}"#).is_permanent());
        assert!(!rejected(502, "<html>bad gateway</html>").is_permanent());
        assert!(rejected(403, "forbidden").is_permanent());
        let mut headers = with_content_type("text/html");
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        let e = parse_response(StatusCode::TOO_MANY_REQUESTS, &headers, b"slow down", DEFAULT).unwrap_err();
        assert!(!e.is_permanent());
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
        let mut headers = HeaderMap::new();
        headers.insert(LOCATION, HeaderValue::from_static("https://idp/login"));
        let e = parse_response(StatusCode::FOUND, &headers, b"", DEFAULT).unwrap_err();
        assert!(e.is_permanent() && e.to_string().contains("never followed"));
        // An error inside a 200.
        assert!(ok(r#"{"error":"invalid_grant"}"#).unwrap_err().is_permanent());
    }

    #[test]
    fn retry_after_http_date() {
        let mut headers = HeaderMap::new();
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        headers.insert(RETRY_AFTER, HeaderValue::from_str(&later).unwrap());
        let d = retry_after(&headers).unwrap();
        assert!(d > Duration::from_secs(100) && d <= Duration::from_secs(120));
    }
}
