//! Grants and client authentication: what goes into the body and headers of a request to the IdP (the fetchers of
//! [`super::grant`], the refresh sessions and the device flow build it here; [`super::idp`] sends it).
//!
//! RFC 6749 §2.3.1: with `client_secret_basic`, the client id and secret are each form-urlencoded *before* they are
//! joined with `:` and base64-encoded, so secrets with `:` or `%` work with every IdP.

use base64::Engine as _;
use http::HeaderValue;

use crate::config::{ClientAuth, ExchangeConfig, ExchangeDialect, Grant, ProviderConfig, Secret, SecretError};

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
pub(super) fn basic_authorization(client_id: &str, secret: Option<&Secret>) -> HeaderValue {
    let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let pair = format!("{}:{}", encode(client_id), secret.map(|s| encode(s.expose())).unwrap_or_default());
    let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
    // Base64 output is always a valid header value.
    let mut value = HeaderValue::from_str(&format!("Basic {encoded}")).unwrap_or_else(|_| HeaderValue::from_static(""));
    value.set_sensitive(true);
    value
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
