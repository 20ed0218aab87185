//! HTTP to the identity provider: token calls with client authentication, form posts to its other endpoints
//! (device authorization, revocation), and discovery of those endpoints from an `issuer` (OpenID Connect Discovery,
//! falling back to RFC 8414), cached and fetched again after a failure. Redirects are never followed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use url::Url;

use super::assertion;
use super::budget::CallBudget;
use super::dpop::{self, DpopKey, ProofFor};
use super::request::TokenRequest;
use super::response::{parse_response, TokenError, TokenResponse};
use crate::config::ProviderConfig;
use crate::tls::{client_config, ClientTls, FileStamp, TlsError};

/// The largest answer we read from an IdP.
const MAX_RESPONSE: usize = 1 << 20;

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The endpoints of a provider, from its config or from discovery.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// The token endpoint.
    pub token: Url,
    /// RFC 8628 device authorization endpoint.
    pub device_authorization: Option<Url>,
    /// RFC 7009 revocation endpoint.
    pub revocation: Option<Url>,
}

/// An answer read whole.
#[derive(Debug)]
pub struct FormAnswer {
    /// HTTP status.
    pub status: StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    /// Body (at most 1 MiB).
    pub body: Bytes,
}

/// The HTTP client of one provider.
pub struct IdpClient {
    provider: ProviderConfig,
    /// The client, the stamp of the TLS files it was built from, and the last stamp that failed to load.
    client: Mutex<(FileStamp, HttpsClient, Option<FileStamp>)>,
    discovered: Mutex<Option<Arc<Endpoints>>>,
    /// The DPoP key (`dpop = true`): every token call carries a proof of it.
    dpop: Option<Arc<DpopKey>>,
    /// `max_token_calls`: every call to the token endpoint takes from it first.
    budget: Option<CallBudget>,
}

impl IdpClient {
    /// A client for `provider`, with its own TLS settings.
    pub fn new(provider: ProviderConfig) -> Result<IdpClient, TlsError> {
        let stamp = FileStamp::of(&tls_files(&provider));
        let client = build_client(&provider)?;
        let dpop = match (provider.dpop, &provider.dpop_key_file) {
            (false, _) => None,
            (true, Some(path)) => {
                Some(Arc::new(DpopKey::load(path).map_err(|message| TlsError::Pem { path: path.clone(), message })?))
            }
            (true, None) => Some(Arc::new(DpopKey::generate_for(provider.dpop_algorithm))),
        };
        let budget =
            provider.max_token_calls.as_ref().map(|(calls, window, text)| CallBudget::new(*calls, *window, text));
        Ok(IdpClient {
            provider,
            client: Mutex::new((stamp, client, None)),
            discovered: Mutex::new(None),
            dpop,
            budget,
        })
    }

    /// The provider's budget of token calls, when it has one.
    pub fn budget(&self) -> Option<&CallBudget> {
        self.budget.as_ref()
    }

    /// The provider's DPoP key, when it uses DPoP.
    pub fn dpop_key(&self) -> Option<&Arc<DpopKey>> {
        self.dpop.as_ref()
    }

    /// The HTTP client, rebuilt first when a TLS file (CA bundle, client certificate or key) changed since it was
    /// built: a renewed certificate is used by the next call, and the connections made with the old one are dropped
    /// with the old client. A pair that cannot be loaded (half written) keeps the old client until it can.
    fn client(&self) -> HttpsClient {
        let files = tls_files(&self.provider);
        let mut current = self.client.lock().unwrap_or_else(|e| e.into_inner());
        if !files.is_empty() {
            let stamp = FileStamp::of(&files);
            if stamp != current.0 && current.2.as_ref() != Some(&stamp) {
                match build_client(&self.provider) {
                    Ok(client) => {
                        tracing::info!(provider = %self.provider.name, "the IdP's TLS files changed: using them from now on");
                        *current = (stamp, client, None);
                    }
                    Err(error) => {
                        tracing::warn!(
                            provider = %self.provider.name,
                            "the IdP's TLS files changed but cannot be loaded yet (keeping the previous ones): {error}"
                        );
                        current.2 = Some(stamp);
                    }
                }
            }
        }
        current.1.clone()
    }

    /// The provider this client serves.
    pub fn provider(&self) -> &ProviderConfig {
        &self.provider
    }

    /// The provider's endpoints: configured ones win; the others come from discovery when `issuer` is set.
    pub async fn endpoints(&self) -> Result<Endpoints, TokenError> {
        let p = &self.provider;
        let Some(issuer) = &p.issuer else {
            let token =
                p.token_url.clone().ok_or_else(|| TokenError::Discovery("no token_url and no issuer".into()))?;
            return Ok(Endpoints {
                token,
                device_authorization: p.device_authorization_endpoint.clone(),
                revocation: p.revocation_endpoint.clone(),
            });
        };
        let cached = self.discovered.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let discovered = match cached {
            Some(endpoints) => endpoints,
            None => {
                let endpoints = Arc::new(self.discover(issuer).await?);
                *self.discovered.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&endpoints));
                endpoints
            }
        };
        Ok(Endpoints {
            token: p.token_url.clone().unwrap_or_else(|| discovered.token.clone()),
            device_authorization: p
                .device_authorization_endpoint
                .clone()
                .or_else(|| discovered.device_authorization.clone()),
            revocation: p.revocation_endpoint.clone().or_else(|| discovered.revocation.clone()),
        })
    }

    /// Forgets discovered endpoints, so the next call discovers them again (after a failed call).
    pub fn forget_discovery(&self) {
        *self.discovered.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    async fn discover(&self, issuer: &Url) -> Result<Endpoints, TokenError> {
        let mut last_error = None;
        for url in discovery_urls(issuer) {
            let answer = match self.bounded(self.send(Method::GET, &url, None, None, None)).await {
                Ok(answer) => answer,
                Err(e) => {
                    last_error = Some(format!("{url}: {e}"));
                    continue;
                }
            };
            if !answer.status.is_success() {
                last_error = Some(format!("{url}: HTTP {}", answer.status.as_u16()));
                continue;
            }
            let endpoints =
                parse_metadata(issuer, &answer.body).map_err(|e| TokenError::Discovery(format!("{url}: {e}")))?;
            tracing::info!(provider = %self.provider.name, token_endpoint = %endpoints.token, "discovered the identity provider's endpoints");
            return Ok(endpoints);
        }
        Err(TokenError::Discovery(last_error.unwrap_or_else(|| "no metadata URL".into())))
    }

    /// One token call with `request`, bounded by the provider's `timeout`.
    pub async fn token_call(&self, request: TokenRequest) -> Result<TokenResponse, TokenError> {
        // Every call to the token endpoint, whatever asked for it, takes from the budget first.
        if let Some(budget) = &self.budget {
            budget.take().await?;
        }
        let result = self
            .bounded(async {
                let endpoints = self.endpoints().await?;
                let origin = self.dpop.as_ref().map(|_| dpop::origin_of(&endpoints.token));
                let htu = self.dpop.as_ref().map(|_| dpop::htu_of(&endpoints.token));
                let mut nonce_retried = false;
                loop {
                    let assertion = self.client_assertion(&endpoints)?;
                    let proof = self.dpop.as_ref().map(|key| {
                        key.proof(ProofFor {
                            method: "POST",
                            url: htu.as_deref().unwrap_or_default(),
                            origin: origin.as_deref().unwrap_or_default(),
                            ath: None,
                        })
                    });
                    let answer = self
                        .send(Method::POST, &endpoints.token, Some(&request), assertion.as_deref(), proof.as_ref())
                        .await?;
                    // RFC 9449 §8: the IdP's nonce, for this proof's retry and for the next calls.
                    let nonce = match (&self.dpop, answer.headers.get(&dpop::DPOP_NONCE)) {
                        (Some(key), Some(nonce)) => {
                            key.remember_nonce(origin.as_deref().unwrap_or_default(), nonce);
                            true
                        }
                        _ => false,
                    };
                    let parsed =
                        parse_response(answer.status, &answer.headers, &answer.body, self.provider.default_lifetime);
                    match parsed {
                        Err(TokenError::Rejected { error, .. })
                            if error == "use_dpop_nonce" && nonce && !nonce_retried =>
                        {
                            tracing::debug!(provider = %self.provider.name, "the IdP asks for a DPoP nonce: calling again with it");
                            nonce_retried = true;
                        }
                        Ok(mut response) => {
                            self.bind(&mut response);
                            return Ok(response);
                        }
                        Err(error) => return Err(error),
                    }
                }
            })
            .await;
        if matches!(&result, Err(e) if !e.is_permanent() || matches!(e, TokenError::Status { status: 404, .. })) {
            self.forget_discovery();
        }
        result
    }

    /// Marks a DPoP-bound token with the key it is bound to.
    fn bind(&self, response: &mut TokenResponse) {
        match (&self.dpop, response.dpop_bound) {
            (Some(key), true) => response.dpop = Some(Arc::clone(key)),
            (None, true) => tracing::warn!(
                provider = %self.provider.name,
                "the IdP issued a DPoP-bound token (token_type DPoP) without a proof: upstreams will likely refuse it \
                 as a bearer token; set dpop = true on this provider"
            ),
            (Some(_), false) => tracing::debug!(
                provider = %self.provider.name,
                "the IdP issued a bearer token despite the DPoP proof: sending it as a bearer token"
            ),
            (None, false) => {}
        }
    }

    /// A GET of `url` (a subject issuer's metadata or keys), with the provider's TLS settings, bounded by its
    /// `timeout`.
    pub async fn get(&self, url: &Url) -> Result<FormAnswer, TokenError> {
        self.bounded(self.send(Method::GET, url, None, None, None)).await
    }

    /// A form POST to one of the provider's endpoints (device authorization, revocation), with client auth.
    pub async fn post_form(&self, url: &Url, request: &TokenRequest) -> Result<FormAnswer, TokenError> {
        self.bounded(async {
            let assertion = self.client_assertion(&self.endpoints().await?)?;
            self.send(Method::POST, url, Some(request), assertion.as_deref(), None).await
        })
        .await
    }

    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, TokenError>>,
    ) -> Result<T, TokenError> {
        let timeout = self.provider.timeout;
        tokio::time::timeout(timeout, call).await.unwrap_or(Err(TokenError::Timeout(timeout)))
    }

    /// A fresh client assertion for a form to the provider (RFC 7523 §2.2: its `aud` is the token endpoint,
    /// whichever endpoint the form goes to), when the provider authenticates with one.
    fn client_assertion(&self, endpoints: &Endpoints) -> Result<Option<String>, TokenError> {
        Ok(assertion::client_assertion(&self.provider, endpoints.token.as_str())?)
    }

    async fn send(
        &self,
        method: Method,
        url: &Url,
        form: Option<&TokenRequest>,
        client_assertion: Option<&str>,
        dpop_proof: Option<&http::HeaderValue>,
    ) -> Result<FormAnswer, TokenError> {
        let mut builder = Request::builder()
            .method(method)
            .uri(url.as_str())
            .header(ACCEPT, "application/json")
            .header(USER_AGENT, concat!("tokenproxy/", env!("CARGO_PKG_VERSION")));
        if let Some(proof) = dpop_proof {
            builder = builder.header(&dpop::DPOP, proof.clone());
        }
        if let Some(headers) = builder.headers_mut() {
            crate::telemetry::inject_token_call(headers);
        }
        let body = match form {
            Some(form) => {
                builder = builder.header(CONTENT_TYPE, "application/x-www-form-urlencoded");
                if let Some(authorization) = &form.authorization {
                    builder = builder.header(AUTHORIZATION, authorization.clone());
                }
                let mut body = form.body.clone();
                if let Some(assertion) = client_assertion {
                    // Appended after the pairs already there, with the `&` between.
                    let mut form = form_urlencoded::Serializer::for_suffix(std::mem::take(&mut body), 0);
                    form.append_pair("client_assertion_type", assertion::ASSERTION_TYPE);
                    form.append_pair("client_assertion", assertion);
                    body = form.finish();
                }
                Bytes::from(body)
            }
            None => Bytes::new(),
        };
        let request =
            builder.body(Full::new(body)).map_err(|e| TokenError::Connect(format!("invalid URL {url}: {e}")))?;
        let response = self.client().request(request).await.map_err(|e| {
            // A connect error means nothing was sent; any other failure may come after the IdP read the request.
            if e.is_connect() {
                TokenError::Connect(crate::error_chain::error_chain(&e))
            } else {
                TokenError::Interrupted(crate::error_chain::error_chain(&e))
            }
        })?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| TokenError::Interrupted(format!("reading the response: {e}")))?
            .to_bytes();
        Ok(FormAnswer { status: parts.status, headers: parts.headers, body })
    }
}

/// The TLS files of a provider's connections to its IdP.
fn tls_files(provider: &ProviderConfig) -> Vec<&std::path::Path> {
    [&provider.ca_file, &provider.client_cert_file, &provider.client_key_file]
        .into_iter()
        .flatten()
        .map(|p| p.as_path())
        .collect()
}

/// An HTTP client for the provider's IdP with its TLS settings as its files say now.
fn build_client(provider: &ProviderConfig) -> Result<HttpsClient, TlsError> {
    let client_cert = match (&provider.client_cert_file, &provider.client_key_file) {
        (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
        _ => None,
    };
    let tls = client_config(&ClientTls { ca_file: provider.ca_file.as_deref(), only_ca_file: false, client_cert })?;
    let connector = crate::tls::https_connector(tls, provider.timeout);
    Ok(Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(60)).build(connector))
}

/// OpenID Connect Discovery first, then RFC 8414 (which puts the well-known segment before the issuer's path).
fn discovery_urls(issuer: &Url) -> Vec<Url> {
    let path = issuer.path().trim_end_matches('/');
    let mut oidc = issuer.clone();
    oidc.set_path(&format!("{path}/.well-known/openid-configuration"));
    let mut oauth = issuer.clone();
    oauth.set_path(&format!("/.well-known/oauth-authorization-server{path}"));
    vec![oidc, oauth]
}

/// Reads authorization server metadata, refusing metadata for another issuer (RFC 8414 §3.3).
fn parse_metadata(issuer: &Url, body: &[u8]) -> Result<Endpoints, String> {
    #[derive(serde::Deserialize)]
    struct Metadata {
        issuer: String,
        token_endpoint: Option<String>,
        device_authorization_endpoint: Option<String>,
        revocation_endpoint: Option<String>,
    }
    let metadata: Metadata =
        serde_json::from_slice(body).map_err(|e| format!("not authorization server metadata: {e}"))?;
    let same = metadata.issuer.trim_end_matches('/') == issuer.as_str().trim_end_matches('/');
    if !same {
        return Err(format!(
            "the metadata is for issuer `{}`, not `{}`; refusing it (a misconfigured or impersonating server)",
            metadata.issuer.chars().take(200).collect::<String>(),
            issuer
        ));
    }
    let url = |name: &str, value: Option<String>| -> Result<Option<Url>, String> {
        value
            .map(|v| {
                let url = Url::parse(&v).map_err(|e| format!("{name}: {e}"))?;
                if matches!(url.scheme(), "http" | "https") {
                    Ok(url)
                } else {
                    Err(format!("{name}: not an http(s) URL"))
                }
            })
            .transpose()
    };
    Ok(Endpoints {
        token: url("token_endpoint", metadata.token_endpoint)?.ok_or("the metadata has no token_endpoint")?,
        device_authorization: url("device_authorization_endpoint", metadata.device_authorization_endpoint)?,
        revocation: url("revocation_endpoint", metadata.revocation_endpoint)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_urls_follow_oidc_then_rfc8414() {
        let urls = discovery_urls(&Url::parse("https://idp.example/realms/main/").unwrap());
        assert_eq!(urls[0].as_str(), "https://idp.example/realms/main/.well-known/openid-configuration");
        assert_eq!(urls[1].as_str(), "https://idp.example/.well-known/oauth-authorization-server/realms/main");
        let urls = discovery_urls(&Url::parse("https://idp.example").unwrap());
        assert_eq!(urls[0].as_str(), "https://idp.example/.well-known/openid-configuration");
        assert_eq!(urls[1].as_str(), "https://idp.example/.well-known/oauth-authorization-server");
    }

    #[test]
    fn metadata_for_another_issuer_is_refused() {
        let issuer = Url::parse("https://idp.example").unwrap();
        let good = br#"{"issuer":"https://idp.example","token_endpoint":"https://idp.example/token","revocation_endpoint":"https://idp.example/revoke"}"#;
        let endpoints = parse_metadata(&issuer, good).unwrap();
        assert_eq!(endpoints.token.as_str(), "https://idp.example/token");
        assert_eq!(endpoints.revocation.unwrap().as_str(), "https://idp.example/revoke");
        assert!(endpoints.device_authorization.is_none());
        let evil = br#"{"issuer":"https://evil.example","token_endpoint":"https://evil.example/token"}"#;
        assert!(parse_metadata(&issuer, evil).unwrap_err().contains("refusing"));
        assert!(parse_metadata(&issuer, br#"{"issuer":"https://idp.example"}"#)
            .unwrap_err()
            .contains("token_endpoint"));
        let bad = br#"{"issuer":"https://idp.example","token_endpoint":"file:///etc/passwd"}"#;
        assert!(parse_metadata(&issuer, bad).is_err());
    }
}
