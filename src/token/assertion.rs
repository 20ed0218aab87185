//! Client assertions (RFC 7523 §2.2): how a provider with `client_auth = "private_key_jwt"` or
//! `"client_assertion"` proves who it is without a shared secret.
//!
//! With `private_key_jwt`, every token call gets a fresh JWT signed with the key in `private_key_file`: `iss` = `sub`
//! = the client id, `aud` = the token endpoint (or `assertion_audience`), a random `jti`, `iat` now and `exp` five
//! minutes later, and a `kid` header that is the RFC 7638 thumbprint of the public key unless `assertion_key_id` names
//! another (or is `false`: no `kid`), so a rotated key gets a new `kid` by itself. The key file is read at every call: a key rotated on disk is
//! used by the next one. With `client_assertion`, the JWT is one the platform minted (a Kubernetes projected
//! service-account token for workload identity federation), read from `client_assertion_file` at every call,
//! because the kubelet rotates it.
//!
//! Keys (PEM, PKCS#8 for RSA, EC P-256/P-384 and Ed25519; PKCS#1 and SEC1 too) and certificates are read by
//! [`crate::keys`]; signing goes through `jsonwebtoken`.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, Header};

use crate::config::{AssertionDialect, AssertionKeyId, ClientAuth, ProviderConfig, SecretError, SecretSource};
use crate::keys::{certificate_thumbprint, load_google, load_key, CertificateThumbprints, KeyError, SigningKey};

/// The `client_assertion_type` of a JWT client assertion (RFC 7523 §2.2).
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// How long a signed assertion is valid: the most RFC 7523 profiles and IdPs accept (Entra: 10 min, Okta: 1 h).
const LIFETIME_SECS: u64 = 300;

/// Why a client assertion could not be made. Messages name the file, never its content.
#[derive(Debug, thiserror::Error)]
pub enum AssertionError {
    /// The key file could not be read or holds no key that can sign.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// Signing failed.
    #[error("signing the client assertion failed: {0}")]
    Signing(String),
    /// The assertion file (`client_assertion_file`) does not hold a JWT.
    #[error("{}: {reason}", path.display())]
    BadAssertion {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The assertion source could not be read (a secret source).
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// `assertion_certificate_file` holds no usable certificate (the message names the file).
    #[error("assertion_certificate_file: {0}")]
    Certificate(String),
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The claims of a client assertion.
#[derive(serde::Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    jti: String,
    iat: u64,
    exp: u64,
}

/// Makes the `client_assertion` for one token call to `token_endpoint`, or `None` when the provider's client
/// authentication uses none.
pub fn client_assertion(provider: &ProviderConfig, token_endpoint: &str) -> Result<Option<String>, AssertionError> {
    match provider.client_auth {
        ClientAuth::PrivateKeyJwt => {
            let Some(path) = &provider.private_key_file else { return Ok(None) };
            let key = load_key(path)?;
            let algorithm = key.algorithm(provider.assertion_algorithm, path)?;
            let aud = provider.assertion_audience.as_deref().unwrap_or(token_endpoint);
            let mut header = Header::new(algorithm);
            header.kid = provider.assertion_key_id.header(key.thumbprint());
            if let Some(path) = &provider.assertion_certificate_file {
                let thumbprints = CertificateThumbprints::read(path).map_err(AssertionError::Certificate)?;
                header.x5t = Some(thumbprints.sha1);
                header.x5t_s256 = Some(thumbprints.sha256);
            }
            sign_with_header(header, &key, &provider.client_id, aud).map(Some)
        }
        ClientAuth::ClientAssertion => {
            let Some(source) = &provider.client_assertion else { return Ok(None) };
            let assertion = read_assertion(source)?;
            Ok(Some(assertion))
        }
        _ => Ok(None),
    }
}

/// The assertion of a `grant = "jwt_bearer"` token call (RFC 7523 §2.1), in the provider's dialect; `token_endpoint`
/// is the default `aud` of the generic dialect.
pub fn grant_assertion(provider: &ProviderConfig, token_endpoint: &str) -> Result<String, AssertionError> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut claims = serde_json::Map::new();
    let mut put = |name: &str, value: serde_json::Value| {
        claims.insert(name.to_owned(), value);
    };
    let (key, algorithm, kid) = match provider.assertion_dialect {
        AssertionDialect::Google => {
            let path = provider.google_credentials_file.as_deref().unwrap_or(Path::new(""));
            let (credentials, key) = load_google(path)?;
            // Google's service-account flow: iss, scope, aud = token_uri, iat, exp = iat + 3600; sub to act for a
            // user of the domain (domain-wide delegation).
            put("iss", credentials.client_email.clone().into());
            if let Some(scope) = &provider.scope {
                put("scope", scope.clone().into());
            }
            put("aud", credentials.token_uri.clone().into());
            if let Some(subject) = &provider.assertion_claims.sub {
                put("sub", subject.clone().into());
            }
            put("iat", now.into());
            put("exp", (now + 3600).into());
            (key, Algorithm::RS256, Some(credentials.private_key_id))
        }
        AssertionDialect::Salesforce => {
            let path = provider.private_key_file.as_deref().unwrap_or(Path::new(""));
            let key = load_key(path)?;
            let algorithm = key.algorithm(provider.assertion_algorithm, path)?;
            // Salesforce's JWT bearer flow: iss = the connected app's consumer key, sub = the user, aud = the login
            // host, exp within 3 minutes.
            put("iss", provider.client_id.clone().into());
            put("sub", provider.username.clone().unwrap_or_default().into());
            let aud = provider.assertion_audience.as_deref().unwrap_or(SALESFORCE_LOGIN);
            put("aud", aud.into());
            put("exp", (now + 180).into());
            let kid = provider.assertion_key_id.header(key.thumbprint());
            (key, algorithm, kid)
        }
        AssertionDialect::Generic => {
            let path = provider.private_key_file.as_deref().unwrap_or(Path::new(""));
            let key = load_key(path)?;
            let algorithm = key.algorithm(provider.assertion_algorithm, path)?;
            let set = &provider.assertion_claims;
            for (name, value) in &set.extra {
                put(name, value.clone().into());
            }
            put("iss", set.iss.clone().unwrap_or_else(|| provider.client_id.clone()).into());
            put("sub", set.sub.clone().unwrap_or_else(|| provider.client_id.clone()).into());
            let aud = set.aud.as_deref().or(provider.assertion_audience.as_deref()).unwrap_or(token_endpoint);
            put("aud", aud.into());
            put("jti", random_jti().into());
            put("iat", now.into());
            put("exp", (now + LIFETIME_SECS).into());
            let kid = provider.assertion_key_id.header(key.thumbprint());
            (key, algorithm, kid)
        }
    };
    let mut header = Header::new(algorithm);
    header.kid = kid;
    jsonwebtoken::encode(&header, &claims, key.encoding_key()).map_err(|e| AssertionError::Signing(e.to_string()))
}

/// Salesforce's login host: the default `aud` of its JWT bearer assertions (a sandbox uses test.salesforce.com).
pub const SALESFORCE_LOGIN: &str = "https://login.salesforce.com";

/// What to check when the IdP refused a client assertion or certificate (`invalid_client`), with the values this
/// client sent: the `kid` and `aud` are public, the key never shows.
pub fn refusal_hint(provider: &ProviderConfig, token_endpoint: Option<&str>) -> Option<String> {
    match provider.client_auth {
        ClientAuth::PrivateKeyJwt => {
            let path = provider.private_key_file.as_ref()?;
            let mut kid = match (&provider.assertion_key_id, load_key(path)) {
                (AssertionKeyId::Named(kid), _) => format!("`{kid}` (assertion_key_id)"),
                (AssertionKeyId::Omitted, _) => "left out (assertion_key_id = false)".to_owned(),
                (AssertionKeyId::Thumbprint, Ok(key)) => format!(
                    "`{}` (the RFC 7638 thumbprint of the key's public half; if the IdP registered the key without a \
                     kid and matches kids strictly, set assertion_key_id = false, or set it to the IdP's kid)",
                    key.thumbprint()
                ),
                (AssertionKeyId::Thumbprint, Err(error)) => return Some(format!("the key could not be read: {error}")),
            };
            match provider.assertion_certificate_file.as_deref().map(CertificateThumbprints::read) {
                Some(Ok(thumbprints)) => {
                    kid += &format!(
                        ", its x5t `{}` and x5t#S256 `{}` (assertion_certificate_file: it must be the certificate of \
                     private_key_file)",
                        thumbprints.sha1, thumbprints.sha256
                    )
                }
                Some(Err(error)) => kid += &format!(" (assertion_certificate_file: {error})"),
                None => {}
            }
            let aud = match (&provider.assertion_audience, token_endpoint) {
                (Some(aud), _) => format!("`{aud}` (assertion_audience)"),
                (None, Some(endpoint)) => format!("`{endpoint}` (the token endpoint)"),
                (None, None) => "the token endpoint".to_owned(),
            };
            Some(format!(
                "the IdP refused the signed client assertion. Check that it has the public half of private_key_file \
                 registered for client `{}` (its JWKS or certificate; the assertion's kid is {kid}), that it expects \
                 aud {aud} (some IdPs want their issuer: set assertion_audience), and that this machine's clock is \
                 right (iat and exp are now and now + 5 min)",
                provider.client_id
            ))
        }
        ClientAuth::TlsClientAuth | ClientAuth::SelfSignedTlsClientAuth => {
            let presented = match provider.client_cert_file.as_deref().map(certificate_thumbprint) {
                Some(Ok(thumbprint)) => format!(" (the certificate presented has x5t#S256 `{thumbprint}`)"),
                Some(Err(error)) => format!(" (client_cert_file cannot be read: {error})"),
                None => String::new(),
            };
            Some(format!(
                "the IdP refused the client certificate{presented}: check that it trusts the CA that issued \
                 client_cert_file (tls_client_auth) or has this very certificate registered \
                 (self_signed_tls_client_auth) for client `{}`, that the subject it expects matches the \
                 certificate's, and that the certificate has not expired",
                provider.client_id
            ))
        }
        ClientAuth::ClientAssertion => Some(
            "the IdP refused the platform's assertion (client_assertion_file): check the federated credential the \
             IdP has for this client (issuer, subject and audience must match the token's iss, sub and aud) and \
             that the file is being refreshed (an expired token is refused)"
                .to_owned(),
        ),
        _ => None,
    }
}

/// Signs a fresh assertion: `iss` = `sub` = `client_id`, a random `jti`, five minutes of validity.
pub fn sign(
    key: &SigningKey,
    algorithm: Algorithm,
    kid: Option<&str>,
    client_id: &str,
    aud: &str,
) -> Result<String, AssertionError> {
    let mut header = Header::new(algorithm);
    header.kid = Some(kid.unwrap_or(key.thumbprint()).to_owned());
    sign_with_header(header, key, client_id, aud)
}

/// Signs a fresh assertion (claims as [`sign`]) under `header`.
fn sign_with_header(header: Header, key: &SigningKey, client_id: &str, aud: &str) -> Result<String, AssertionError> {
    let iat = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let claims = Claims { iss: client_id, sub: client_id, aud, jti: random_jti(), iat, exp: iat + LIFETIME_SECS };
    jsonwebtoken::encode(&header, &claims, key.encoding_key()).map_err(|e| AssertionError::Signing(e.to_string()))
}

fn random_jti() -> String {
    let bytes: [u8; 16] = rand::random();
    b64(&bytes)
}

/// Reads a platform-minted assertion (a JWT: three base64url parts); trimmed.
fn read_assertion(source: &SecretSource) -> Result<String, AssertionError> {
    let assertion = source.read()?;
    let text = assertion.expose();
    let parts: Vec<&str> = text.split('.').collect();
    let jwt_like = parts.len() == 3
        && parts[..2].iter().all(|p| !p.is_empty())
        && parts.iter().all(|p| p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    if !jwt_like {
        let path = match source {
            SecretSource::File(path) => path.clone(),
            _ => std::path::PathBuf::from("client_assertion"),
        };
        return Err(AssertionError::BadAssertion {
            path,
            reason: "does not hold a JWT (three base64url parts separated by dots)".into(),
        });
    }
    Ok(text.to_owned())
}

#[cfg(test)]
mod tests;
