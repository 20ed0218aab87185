//! Checking a caller's JWT before exchanging it (`subject_issuer`, docs/token-exchange.md "Checking subjects
//! first"): its signature against the issuer's published keys (JWKS), `exp` (required), `nbf`, `iss`, and `aud` when
//! `subject_audience` is set. A subject that fails costs no exchange: the caller gets `401 subject_token_invalid`.
//!
//! Only asymmetric algorithms are accepted (a symmetric one would let anyone who knows a public key forge tokens).
//! The keys are fetched once and kept; a `kid` the keys do not have fetches them again, at most once per
//! [`REFETCH_INTERVAL`], so that a flood of tokens with made-up `kid`s costs the issuer one request every 30 s.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tokio::time::Instant;
use url::Url;

use super::idp::IdpClient;
use super::response::TokenError;

/// The keys are fetched again for an unknown `kid` at most this often.
pub const REFETCH_INTERVAL: Duration = Duration::from_secs(30);

/// The algorithms a subject may be signed with.
const ASYMMETRIC: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Why a subject was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubjectCheck {
    /// Not a token of the issuer, or not valid now: the caller's fault.
    Invalid(String),
    /// The issuer's keys could not be had: nobody's fault we can tell.
    Unavailable(String),
}

/// The issuer's keys, and when they were last fetched.
struct Keys {
    set: Option<Arc<JwkSet>>,
    fetched: Option<Instant>,
}

/// Checks subjects for one provider.
pub struct SubjectValidator {
    issuer: String,
    audience: Option<String>,
    /// Where the keys are: configured, or from the issuer's metadata (`jwks_uri`) on first use.
    jwks_uri: Mutex<Option<Url>>,
    client: Arc<IdpClient>,
    keys: tokio::sync::Mutex<Keys>,
}

impl SubjectValidator {
    /// A validator for subjects of `issuer`, fetching keys through `client` (the provider's IdP client: its TLS
    /// settings and timeout) from `jwks_uri`, or from the `jwks_uri` of the issuer's metadata.
    pub fn new(issuer: &Url, audience: Option<String>, jwks_uri: Option<Url>, client: Arc<IdpClient>) -> Self {
        SubjectValidator {
            issuer: issuer.as_str().trim_end_matches('/').to_owned(),
            audience,
            jwks_uri: Mutex::new(jwks_uri),
            client,
            keys: tokio::sync::Mutex::new(Keys { set: None, fetched: None }),
        }
    }

    /// `Ok` when `subject` is a valid token of the issuer now.
    pub async fn check(&self, subject: &str) -> Result<(), SubjectCheck> {
        let header = jsonwebtoken::decode_header(subject)
            .map_err(|_| SubjectCheck::Invalid("the caller's token is not a JWT".into()))?;
        if !ASYMMETRIC.contains(&header.alg) {
            return Err(SubjectCheck::Invalid(format!(
                "the caller's token is signed with {:?}; only asymmetric algorithms are accepted",
                header.alg
            )));
        }
        let key = self.key(header.kid.as_deref(), header.alg).await?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[self.issuer.as_str(), &format!("{}/", self.issuer)]);
        validation.set_required_spec_claims(&["exp", "iss"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        match &self.audience {
            Some(audience) => validation.set_audience(&[audience]),
            // jsonwebtoken refuses any `aud` when none is expected and `validate_aud` is on.
            None => validation.validate_aud = false,
        }
        jsonwebtoken::decode::<serde_json::Value>(subject, &key, &validation)
            .map(|_| ())
            .map_err(|error| SubjectCheck::Invalid(format!("the caller's token is not accepted: {error}")))
    }

    /// The key for `kid` (or the one key of a set without `kid`s), fetching the keys when needed.
    async fn key(&self, kid: Option<&str>, alg: Algorithm) -> Result<DecodingKey, SubjectCheck> {
        let mut keys = self.keys.lock().await;
        if keys.set.is_none() {
            self.fetch(&mut keys).await?;
        }
        if let Some(key) = find(keys.set.as_deref(), kid, alg) {
            return key;
        }
        // An unknown kid: the issuer may have rotated its keys. Asked again at most once per interval.
        if keys.fetched.is_none_or(|fetched| fetched.elapsed() >= REFETCH_INTERVAL) {
            self.fetch(&mut keys).await?;
            if let Some(key) = find(keys.set.as_deref(), kid, alg) {
                return key;
            }
        }
        Err(SubjectCheck::Invalid("the caller's token is signed with a key the issuer does not publish".into()))
    }

    async fn fetch(&self, keys: &mut Keys) -> Result<(), SubjectCheck> {
        keys.fetched = Some(Instant::now());
        let unavailable = |what: String| SubjectCheck::Unavailable(format!("the subject issuer's keys: {what}"));
        let uri = self.jwks_uri().await.map_err(|e| unavailable(e.to_string()))?;
        let answer = self.client.get(&uri).await.map_err(|e| unavailable(e.to_string()))?;
        if !answer.status.is_success() {
            return Err(unavailable(format!("{uri} answered HTTP {}", answer.status.as_u16())));
        }
        let set: JwkSet =
            serde_json::from_slice(&answer.body).map_err(|e| unavailable(format!("{uri} is not a JWK set: {e}")))?;
        keys.set = Some(Arc::new(set));
        Ok(())
    }

    /// The JWKS URI: configured, or read once from the issuer's metadata.
    async fn jwks_uri(&self) -> Result<Url, TokenError> {
        if let Some(uri) = self.jwks_uri.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(uri);
        }
        let metadata = Url::parse(&format!("{}/.well-known/openid-configuration", self.issuer))
            .map_err(|e| TokenError::Discovery(e.to_string()))?;
        let answer = self.client.get(&metadata).await?;
        if !answer.status.is_success() {
            return Err(TokenError::Discovery(format!("{metadata}: HTTP {}", answer.status.as_u16())));
        }
        let value: serde_json::Value =
            serde_json::from_slice(&answer.body).map_err(|e| TokenError::Discovery(format!("{metadata}: {e}")))?;
        let uri = value["jwks_uri"]
            .as_str()
            .and_then(|uri| Url::parse(uri).ok())
            .ok_or_else(|| TokenError::Discovery(format!("{metadata}: no jwks_uri")))?;
        *self.jwks_uri.lock().unwrap_or_else(|e| e.into_inner()) = Some(uri.clone());
        Ok(uri)
    }
}

/// The decoding key of `set` for `kid`, if it has it (`None`: look again after a refetch).
fn find(set: Option<&JwkSet>, kid: Option<&str>, alg: Algorithm) -> Option<Result<DecodingKey, SubjectCheck>> {
    let set = set?;
    let jwk = match kid {
        Some(kid) => set.find(kid)?,
        // No kid: only a set of one key says which.
        None if set.keys.len() == 1 => &set.keys[0],
        None => return Some(Err(SubjectCheck::Invalid("the caller's token names no key (kid)".into()))),
    };
    if jwk.common.key_algorithm.is_some_and(|declared| format!("{declared:?}") != format!("{alg:?}")) {
        return Some(Err(SubjectCheck::Invalid(
            "the caller's token is signed with another algorithm than its key's".into(),
        )));
    }
    Some(DecodingKey::from_jwk(jwk).map_err(|e| SubjectCheck::Invalid(format!("the issuer's key cannot be used: {e}"))))
}
