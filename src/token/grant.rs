//! The [`GrantFetcher`] that makes the token call of each grant; what goes into the call is [`super::request`]'s.

use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::idp::IdpClient;
use super::refresh::TokenFetcher;
use super::response::{TokenError, TokenResponse};
use super::session::RefreshSession;
use super::store::StateStore;
use crate::config::{AssertionDialect, Grant, ProviderConfig, Secret, SecretSource, SubjectSource};
use crate::tls::TlsError;

use super::request::{build_request, exchange_request, grant_type, Profile, TokenRequest};

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
