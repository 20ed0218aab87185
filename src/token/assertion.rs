//! Client assertions (RFC 7523 §2.2): how a provider with `client_auth = "private_key_jwt"` or
//! `"client_assertion"` proves who it is without a shared secret.
//!
//! With `private_key_jwt`, every token call gets a fresh JWT signed with the key in `private_key_file`: `iss` = `sub`
//! = the client id, `aud` = the token endpoint (or `assertion_audience`), a random `jti`, `iat` now and `exp` five
//! minutes later, and a `kid` header that is the RFC 7638 thumbprint of the public key unless `assertion_key_id` is
//! set, so a rotated key gets a new `kid` by itself. The key file is read at every call: a key rotated on disk is
//! used by the next one. With `client_assertion`, the JWT is one the platform minted (a Kubernetes projected
//! service-account token for workload identity federation), read from `client_assertion_file` at every call,
//! because the kubelet rotates it.
//!
//! Keys: PEM, PKCS#8 (`PRIVATE KEY`) for RSA, EC P-256/P-384 and Ed25519; PKCS#1 (`RSA PRIVATE KEY`) and SEC1
//! (`EC PRIVATE KEY`) too. Signing goes through `jsonwebtoken`; the key crates parse the PEM and give the public half
//! for the thumbprint.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use sha2::{Digest, Sha256};

use crate::config::{AssertionAlgorithm, AssertionDialect, ClientAuth, ProviderConfig, SecretError, SecretSource};

/// The `client_assertion_type` of a JWT client assertion (RFC 7523 §2.2).
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// How long a signed assertion is valid: the most RFC 7523 profiles and IdPs accept (Entra: 10 min, Okta: 1 h).
const LIFETIME_SECS: u64 = 300;

/// Why a client assertion could not be made. Messages name the file, never its content.
#[derive(Debug, thiserror::Error)]
pub enum AssertionError {
    /// The file holds no usable private key.
    #[error("{}: {reason}", path.display())]
    BadKey {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The key cannot sign with the algorithm asked for.
    #[error("{}: {reason}", path.display())]
    WrongAlgorithm {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
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

/// The kind of key a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// RSA (at least 2048 bits).
    Rsa,
    /// EC on P-256.
    P256,
    /// EC on P-384.
    P384,
    /// Ed25519.
    Ed25519,
}

impl KeyKind {
    /// The algorithm used when none is set: the one this key signs with.
    fn default_algorithm(self) -> Algorithm {
        match self {
            KeyKind::Rsa => Algorithm::RS256,
            KeyKind::P256 => Algorithm::ES256,
            KeyKind::P384 => Algorithm::ES384,
            KeyKind::Ed25519 => Algorithm::EdDSA,
        }
    }

    fn name(self) -> &'static str {
        match self {
            KeyKind::Rsa => "an RSA key",
            KeyKind::P256 => "an EC P-256 key",
            KeyKind::P384 => "an EC P-384 key",
            KeyKind::Ed25519 => "an Ed25519 key",
        }
    }
}

/// A private key read from a file: ready to sign, with its RFC 7638 thumbprint.
pub struct SigningKey {
    kind: KeyKind,
    key: EncodingKey,
    thumbprint: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("kind", &self.kind).field("thumbprint", &self.thumbprint).finish()
    }
}

impl SigningKey {
    /// What kind of key it is.
    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// The RFC 7638 JWK thumbprint (SHA-256, base64url) of the public key: the default `kid`.
    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    /// The algorithm this key signs with when `set` (the config's `assertion_algorithm`) asks for one; an error
    /// when the key cannot.
    pub fn algorithm(&self, set: Option<AssertionAlgorithm>, path: &Path) -> Result<Algorithm, AssertionError> {
        let Some(set) = set else { return Ok(self.kind.default_algorithm()) };
        let algorithm = set.algorithm();
        let fits = match self.kind {
            KeyKind::Rsa => matches!(algorithm, Algorithm::RS256 | Algorithm::PS256),
            kind => algorithm == kind.default_algorithm(),
        };
        if fits {
            Ok(algorithm)
        } else {
            Err(AssertionError::WrongAlgorithm {
                path: path.to_path_buf(),
                reason: format!("{} cannot sign {}", self.kind.name(), set.as_str()),
            })
        }
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The RFC 7638 thumbprint of a JWK given as its required members in lexicographic order (the canonical form).
fn thumbprint(members: &[(&str, &str)]) -> String {
    let json = members.iter().map(|(name, value)| format!("\"{name}\":\"{value}\"")).collect::<Vec<_>>().join(",");
    b64(&Sha256::digest(format!("{{{json}}}")))
}

/// Reads a private key file (PEM) and makes it ready to sign.
pub fn load_key(path: &Path) -> Result<SigningKey, AssertionError> {
    let text = read_small(path)?;
    parse_key(&text).map_err(|reason| AssertionError::BadKey { path: path.to_path_buf(), reason })
}

/// Reads a key or credentials file as the secret files are read: at most 64 KiB, text, trimmed.
fn read_small(path: &Path) -> Result<String, AssertionError> {
    Ok(SecretSource::File(path.to_path_buf()).read()?.expose().to_owned())
}

/// Parses a PEM private key; the error says what was found instead, never the key.
fn parse_key(text: &str) -> Result<SigningKey, String> {
    use ed25519_dalek::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _};
    use p256::elliptic_curve::sec1::ToEncodedPoint as _;
    use rsa::pkcs1::{DecodeRsaPrivateKey as _, EncodeRsaPrivateKey as _};
    use rsa::traits::PublicKeyParts as _;

    let label = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("-----BEGIN ")?.strip_suffix("-----").map(str::to_owned))
        .ok_or("no PEM block found (expected -----BEGIN PRIVATE KEY-----)")?;
    let rsa = |key: rsa::RsaPrivateKey| -> Result<SigningKey, String> {
        let bits = key.size() * 8;
        if bits < 2048 {
            return Err(format!("the RSA key has {bits} bits; at least 2048 are needed"));
        }
        let der = key.to_pkcs1_der().map_err(|e| format!("cannot encode the RSA key: {e}"))?;
        let (n, e) = (b64(&key.n().to_bytes_be()), b64(&key.e().to_bytes_be()));
        Ok(SigningKey {
            kind: KeyKind::Rsa,
            key: EncodingKey::from_rsa_der(der.as_bytes()),
            thumbprint: thumbprint(&[("e", &e), ("kty", "RSA"), ("n", &n)]),
        })
    };
    macro_rules! ec {
        ($key:expr, $kind:expr, $crv:literal) => {{
            let key = $key;
            let point = key.public_key().to_encoded_point(false);
            let (x, y) = (point.x().map(|x| b64(x)), point.y().map(|y| b64(y)));
            let (Some(x), Some(y)) = (x, y) else { return Err("the EC public key is the point at infinity".into()) };
            let der = key.to_pkcs8_der().map_err(|e| format!("cannot encode the EC key: {e}"))?;
            Ok(SigningKey {
                kind: $kind,
                key: EncodingKey::from_ec_der(der.as_bytes()),
                thumbprint: thumbprint(&[("crv", $crv), ("kty", "EC"), ("x", &x), ("y", &y)]),
            })
        }};
    }
    match label.as_str() {
        "PRIVATE KEY" => {
            if let Ok(key) = rsa::RsaPrivateKey::from_pkcs8_pem(text) {
                return rsa(key);
            }
            if let Ok(key) = p256::SecretKey::from_pkcs8_pem(text) {
                return ec!(key, KeyKind::P256, "P-256");
            }
            if let Ok(key) = p384::SecretKey::from_pkcs8_pem(text) {
                return ec!(key, KeyKind::P384, "P-384");
            }
            if let Ok(key) = ed25519_dalek::SigningKey::from_pkcs8_pem(text) {
                let der = key.to_pkcs8_der().map_err(|e| format!("cannot encode the Ed25519 key: {e}"))?;
                let x = b64(key.verifying_key().as_bytes());
                return Ok(SigningKey {
                    kind: KeyKind::Ed25519,
                    key: EncodingKey::from_ed_der(der.as_bytes()),
                    thumbprint: thumbprint(&[("crv", "Ed25519"), ("kty", "OKP"), ("x", &x)]),
                });
            }
            Err("a PKCS#8 private key of an unsupported type or curve (supported: RSA, EC P-256, EC P-384, Ed25519)"
                .into())
        }
        "RSA PRIVATE KEY" => {
            rsa(rsa::RsaPrivateKey::from_pkcs1_pem(text).map_err(|e| format!("not a valid RSA key: {e}"))?)
        }
        "EC PRIVATE KEY" => {
            if let Ok(key) = p256::SecretKey::from_sec1_pem(text) {
                return ec!(key, KeyKind::P256, "P-256");
            }
            if let Ok(key) = p384::SecretKey::from_sec1_pem(text) {
                return ec!(key, KeyKind::P384, "P-384");
            }
            Err("an EC key on an unsupported curve (supported: P-256, P-384)".into())
        }
        "ENCRYPTED PRIVATE KEY" => Err("the key is encrypted; tokenproxy needs it unencrypted (openssl pkcs8 -topk8 \
                                        -nocrypt), protected by the file's permissions"
            .into()),
        other => Err(format!("holds a `{other}` PEM block, not a private key")),
    }
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
            header.kid = Some(provider.assertion_key_id.clone().unwrap_or_else(|| key.thumbprint().to_owned()));
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

/// A Google service-account key file, as Google hands it out (the fields tokenproxy uses).
#[derive(serde::Deserialize)]
pub struct GoogleCredentials {
    /// `service_account`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// The service account: the assertion's `iss`.
    pub client_email: String,
    /// The key's id: the assertion's `kid`.
    pub private_key_id: String,
    /// The RSA private key, PKCS#8 PEM.
    private_key: String,
    /// Google's token endpoint: the assertion's `aud`.
    pub token_uri: String,
}

impl std::fmt::Debug for GoogleCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GoogleCredentials").field("client_email", &self.client_email).finish_non_exhaustive()
    }
}

/// Reads a Google service-account key file and its RSA key.
pub fn load_google(path: &Path) -> Result<(GoogleCredentials, SigningKey), AssertionError> {
    let bad = |reason: String| AssertionError::BadKey { path: path.to_path_buf(), reason };
    let text = read_small(path)?;
    // serde_json's messages name a field or a position, never a value.
    let credentials: GoogleCredentials =
        serde_json::from_str(&text).map_err(|e| bad(format!("not a Google service-account key file: {e}")))?;
    if credentials.kind.as_deref().is_some_and(|kind| kind != "service_account") {
        return Err(bad("not a service-account key (`type` is not \"service_account\")".into()));
    }
    let key = parse_key(&credentials.private_key).map_err(|reason| bad(format!("private_key: {reason}")))?;
    if key.kind != KeyKind::Rsa {
        return Err(bad("private_key: Google service-account keys are RSA".into()));
    }
    Ok((credentials, key))
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
            (key, algorithm, provider.assertion_key_id.clone())
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
            (key, algorithm, provider.assertion_key_id.clone())
        }
    };
    let mut header = Header::new(algorithm);
    header.kid = Some(kid.unwrap_or_else(|| key.thumbprint().to_owned()));
    jsonwebtoken::encode(&header, &claims, &key.key).map_err(|e| AssertionError::Signing(e.to_string()))
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
                (Some(kid), _) => format!("`{kid}` (assertion_key_id)"),
                (None, Ok(key)) => format!("`{}` (the RFC 7638 thumbprint of the key's public half)", key.thumbprint()),
                (None, Err(error)) => return Some(format!("the key could not be read: {error}")),
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

/// The SHA-256 thumbprint (base64url, as `x5t#S256` in RFC 8705 §3.1) of the first certificate in a PEM file.
pub fn certificate_thumbprint(path: &Path) -> Result<String, String> {
    CertificateThumbprints::read(path).map(|thumbprints| thumbprints.sha256)
}

/// The thumbprints of a certificate, base64url: what JWS headers name a certificate by (RFC 7515 §4.1.7–8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateThumbprints {
    /// SHA-1 of the DER: `x5t` (what Entra ID's certificate credentials are looked up by).
    pub sha1: String,
    /// SHA-256 of the DER: `x5t#S256`.
    pub sha256: String,
}

impl CertificateThumbprints {
    /// The thumbprints of the first certificate in the PEM file at `path`; the error names what is wrong.
    pub fn read(path: &Path) -> Result<CertificateThumbprints, String> {
        use rustls_pki_types::pem::PemObject;
        let cert = rustls_pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .next()
            .ok_or_else(|| format!("{}: no PEM certificate found", path.display()))?
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(CertificateThumbprints {
            sha1: b64(<sha1::Sha1 as sha1::Digest>::digest(cert.as_ref()).as_slice()),
            sha256: b64(&Sha256::digest(cert.as_ref())),
        })
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
    jsonwebtoken::encode(&header, &claims, &key.key).map_err(|e| AssertionError::Signing(e.to_string()))
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
