//! Grants and client authentication: what goes into the body and headers of a request to the IdP, and the
//! [`GrantFetcher`] that makes the token call of each grant.
//!
//! RFC 6749 §2.3.1: with `client_secret_basic`, the client id and secret are each form-urlencoded *before* they are
//! joined with `:` and base64-encoded, so secrets with `:` or `%` work with every IdP.

use std::sync::Arc;

use base64::Engine as _;
use futures_util::future::BoxFuture;
use http::HeaderValue;

use super::idp::IdpClient;
use super::refresh::TokenFetcher;
use super::response::{TokenError, TokenResponse};
use super::session::RefreshSession;
use super::store::StateStore;
use crate::config::{
    AssertionDialect, ClientAuth, ExchangeConfig, ExchangeDialect, Grant, ProviderConfig, Secret, SecretError,
    SecretSource, SubjectSource,
};
use crate::tls::TlsError;

/// A request to the IdP ready to send: its form body and, for `client_secret_basic`, its `Authorization` header.
pub struct TokenRequest {
    /// `application/x-www-form-urlencoded` body.
    pub body: String,
    /// `Basic …` for `client_secret_basic`.
    pub authorization: Option<HeaderValue>,
}

impl std::fmt::Debug for TokenRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenRequest([redacted])")
    }
}

/// Which profile parameters (`scope`, `audience`, `resource`, `extra_params`) a request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// All of them (token requests).
    Full,
    /// None (revocation).
    Bare,
}

/// Builds a request with `params` first, then the profile parameters, then client authentication; the client
/// secret is read now, so a rotated secret file is picked up at the next call.
pub fn build_request(
    provider: &ProviderConfig,
    params: &[(&str, &str)],
    profile: Profile,
) -> Result<TokenRequest, SecretError> {
    let mut form = form_urlencoded::Serializer::new(String::new());
    for (key, value) in params {
        form.append_pair(key, value);
    }
    if profile == Profile::Full {
        if let Some(scope) = &provider.scope {
            form.append_pair("scope", scope);
        }
        if let Some(audience) = &provider.audience {
            form.append_pair("audience", audience);
        }
        if let Some(resource) = &provider.resource {
            form.append_pair("resource", resource);
        }
        for (key, value) in &provider.extra_params {
            form.append_pair(key, value);
        }
    }
    let secret = provider.client_secret.as_ref().map(|source| source.read()).transpose()?;
    let mut authorization = None;
    match provider.client_auth {
        ClientAuth::ClientSecretBasic => {
            authorization = Some(basic_authorization(&provider.client_id, secret.as_ref()));
        }
        ClientAuth::ClientSecretPost => {
            form.append_pair("client_id", &provider.client_id);
            if let Some(secret) = &secret {
                form.append_pair("client_secret", secret.expose());
            }
        }
        // `none` sends the id only; with an assertion (added by the IdP client, which knows the token endpoint, its
        // `aud`) the id goes too, as Entra and others want it.
        // With mutual TLS (RFC 8705) the certificate on the connection authenticates; the form names the client.
        ClientAuth::None
        | ClientAuth::PrivateKeyJwt
        | ClientAuth::ClientAssertion
        | ClientAuth::TlsClientAuth
        | ClientAuth::SelfSignedTlsClientAuth => {
            form.append_pair("client_id", &provider.client_id);
        }
    }
    Ok(TokenRequest { body: form.finish(), authorization })
}

/// The form of a token exchange of `subject` (RFC 8693 §2.1, or Entra's on-behalf-of request).
pub fn exchange_request(
    provider: &ProviderConfig,
    exchange: &ExchangeConfig,
    subject: &str,
) -> Result<TokenRequest, SecretError> {
    match exchange.dialect {
        ExchangeDialect::Rfc8693 => {
            let actor = exchange.actor_token.as_ref().map(|source| source.read()).transpose()?;
            let mut params = vec![
                ("grant_type", grant_type(Grant::TokenExchange)),
                ("subject_token", subject),
                ("subject_token_type", exchange.subject_token_type.as_str()),
            ];
            if let Some(actor) = &actor {
                params.extend([
                    ("actor_token", actor.expose()),
                    ("actor_token_type", exchange.actor_token_type.as_str()),
                ]);
            }
            if let Some(requested) = &exchange.requested_token_type {
                params.push(("requested_token_type", requested.as_str()));
            }
            build_request(provider, &params, Profile::Full)
        }
        ExchangeDialect::EntraObo => {
            let params = [
                ("grant_type", grant_type(Grant::JwtBearer)),
                ("assertion", subject),
                ("requested_token_use", "on_behalf_of"),
            ];
            build_request(provider, &params, Profile::Full)
        }
    }
}

/// `grant_type` value of a grant.
pub fn grant_type(grant: Grant) -> &'static str {
    match grant {
        Grant::ClientCredentials => "client_credentials",
        Grant::RefreshToken => "refresh_token",
        Grant::Password => "password",
        Grant::JwtBearer => "urn:ietf:params:oauth:grant-type:jwt-bearer",
        Grant::TokenExchange => "urn:ietf:params:oauth:grant-type:token-exchange",
    }
}

/// `Basic base64(urlencode(id) ":" urlencode(secret))`, marked sensitive so it is never printed by `Debug`.
fn basic_authorization(client_id: &str, secret: Option<&Secret>) -> HeaderValue {
    let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let pair = format!("{}:{}", encode(client_id), secret.map(|s| encode(s.expose())).unwrap_or_default());
    let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
    // Base64 output is always a valid header value.
    let mut value = HeaderValue::from_str(&format!("Basic {encoded}")).unwrap_or_else(|_| HeaderValue::from_static(""));
    value.set_sensitive(true);
    value
}

/// Makes the token call of a provider's grant: the one [`TokenFetcher`] the refresher uses in production.
pub struct GrantFetcher {
    idp: Arc<IdpClient>,
    session: Option<RefreshSession>,
}

impl GrantFetcher {
    /// A fetcher for `provider`; refresh-token sessions keep their state in `store`.
    pub fn new(provider: ProviderConfig, store: StateStore) -> Result<GrantFetcher, TlsError> {
        let session = (provider.grant == Grant::RefreshToken).then(|| RefreshSession::new(&provider, store));
        Ok(GrantFetcher { idp: Arc::new(IdpClient::new(provider)?), session })
    }

    /// The IdP client.
    pub fn idp(&self) -> &Arc<IdpClient> {
        &self.idp
    }

    /// The refresh-token session, for `grant = "refresh_token"`.
    pub fn session(&self) -> Option<&RefreshSession> {
        self.session.as_ref()
    }

    /// Keeps the refresh-token session (if this provider has one) in the shared store too (docs/fleet.md); how the
    /// store answers is kept in `health`.
    pub fn share_session(&mut self, store: Arc<super::shared::SharedStore>, health: Arc<super::shared::StoreHealth>) {
        let provider = Arc::clone(&self.idp);
        if let Some(session) = self.session.as_mut() {
            session.share(store, provider.provider(), health);
        }
    }

    /// Makes one token call.
    pub async fn fetch(&self) -> Result<TokenResponse, TokenError> {
        let provider = self.idp.provider();
        match (&self.session, provider.grant) {
            (Some(session), _) => session.refresh(&self.idp).await,
            (None, Grant::Password) => {
                let password = provider.password.as_ref().map(|p| p.read()).transpose()?;
                let username = provider.username.as_deref().unwrap_or_default();
                let password = password.as_ref().map(Secret::expose).unwrap_or_default();
                let params = [("grant_type", "password"), ("username", username), ("password", password)];
                self.idp.token_call(build_request(provider, &params, Profile::Full)?).await
            }
            (None, Grant::JwtBearer) => {
                // RFC 7523 §2.1: the assertion is the grant; its `aud` defaults to the token endpoint.
                let endpoints = self.idp.endpoints().await?;
                let assertion = super::assertion::grant_assertion(provider, endpoints.token.as_str())?;
                let params = [("grant_type", grant_type(Grant::JwtBearer)), ("assertion", assertion.as_str())];
                let request = match provider.assertion_dialect {
                    AssertionDialect::Generic => build_request(provider, &params, Profile::Full)?,
                    // Google and Salesforce take these two parameters and nothing else: the scope (Google's) is
                    // in the assertion, and the assertion is the client's authentication.
                    AssertionDialect::Google | AssertionDialect::Salesforce => {
                        let mut form = form_urlencoded::Serializer::new(String::new());
                        form.extend_pairs(params);
                        TokenRequest { body: form.finish(), authorization: None }
                    }
                };
                self.idp.token_call(request).await
            }
            (None, Grant::TokenExchange) => {
                let exchange = provider.exchange.as_ref().ok_or_else(|| TokenError::Malformed("no exchange".into()))?;
                let SubjectSource::File(path) = &exchange.subject else {
                    return Err(TokenError::Malformed("the subject token comes with each request".into()));
                };
                let subject = SecretSource::File(path.clone()).read()?;
                self.exchange(subject.expose()).await
            }
            (None, grant) => {
                let params = [("grant_type", grant_type(grant))];
                self.idp.token_call(build_request(provider, &params, Profile::Full)?).await
            }
        }
    }
}

impl GrantFetcher {
    /// Exchanges `subject` (`grant = "token_exchange"`).
    pub async fn exchange(&self, subject: &str) -> Result<TokenResponse, TokenError> {
        let provider = self.idp.provider();
        let exchange = provider.exchange.as_ref().ok_or_else(|| TokenError::Malformed("no exchange".into()))?;
        self.idp.token_call(exchange_request(provider, exchange, subject)?).await
    }
}

impl TokenFetcher for GrantFetcher {
    fn fetch(&self) -> BoxFuture<'_, Result<TokenResponse, TokenError>> {
        Box::pin(GrantFetcher::fetch(self))
    }

    fn sync_shared(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {
            if let Some(session) = &self.session {
                session.sync_from_shared().await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_form_encodes_before_base64() {
        let value = basic_authorization("my client", Some(&Secret::new("p@ss:w%rd")));
        let b64 = value.to_str().unwrap().strip_prefix("Basic ").unwrap();
        let decoded = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
        assert_eq!(String::from_utf8(decoded).unwrap(), "my+client:p%40ss%3Aw%25rd");
        assert!(value.is_sensitive());
    }
}
