//! `tokenproxy login` and `tokenproxy logout`: start a refresh-token session with the OAuth 2.0 device
//! authorization grant (RFC 8628), and end one with token revocation (RFC 7009).

use std::time::Duration;

use super::grant::GrantFetcher;
use super::request::{build_request, Profile};
use super::response::TokenError;
use super::secrets::RefreshToken;

/// What the user must do to approve the login.
#[derive(Debug, Clone)]
pub struct DevicePrompt {
    /// Where to go.
    pub verification_uri: String,
    /// The same with the code filled in, when the IdP offers it.
    pub verification_uri_complete: Option<String>,
    /// The code to enter.
    pub user_code: String,
    /// How long the code is valid.
    pub expires_in: Duration,
}

/// Why a login or logout failed.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The provider's grant is not `refresh_token`.
    #[error("provider `{0}` does not use grant = \"refresh_token\": there is no session to log in to or out of")]
    NotRefreshTokenGrant(String),
    /// The IdP has no device authorization endpoint.
    #[error("provider `{0}` has no device_authorization_endpoint (set it, or an issuer whose metadata has one)")]
    NoDeviceEndpoint(String),
    /// The device authorization request failed.
    #[error("device authorization request failed: {0}")]
    Authorization(String),
    /// The user denied the request (`access_denied`).
    #[error("the login was denied at the identity provider")]
    Denied,
    /// The code expired before the user approved it (`expired_token`).
    #[error("the code expired before the login was approved; run the command again")]
    Expired,
    /// The IdP issued tokens but no refresh token.
    #[error("the identity provider issued no refresh token: allow the refresh_token grant (or offline_access scope) for this client")]
    NoRefreshToken,
    /// A token call failed.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// Revocation failed; the refresh token was kept so the logout can be retried.
    #[error("revocation failed ({0}); the refresh token was kept: try again")]
    Revocation(String),
}

/// The outcome of a logout.
#[derive(Debug, PartialEq, Eq)]
pub enum Logout {
    /// Revoked at the IdP and deleted from the store.
    Revoked,
    /// Deleted from the store; the IdP has no revocation endpoint, so it stays valid there until it expires.
    DeletedOnly,
    /// There was no session.
    NothingStored,
}

/// RFC 8628 §3.2 answer.
#[derive(serde::Deserialize)]
struct DeviceAuthorization {
    device_code: String,
    user_code: String,
    #[serde(alias = "verification_url")]
    verification_uri: String,
    verification_uri_complete: Option<String>,
    expires_in: Option<u64>,
    interval: Option<u64>,
}

const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// Runs the device authorization grant: `prompt` is called once with what the user must do; the call returns once
/// the refresh token is stored (or the login failed).
pub async fn login(fetcher: &GrantFetcher, prompt: impl FnOnce(&DevicePrompt)) -> Result<(), LoginError> {
    let idp = fetcher.idp();
    let provider = idp.provider();
    let session = fetcher.session().ok_or_else(|| LoginError::NotRefreshTokenGrant(provider.name.clone()))?;
    let endpoints = idp.endpoints().await?;
    let endpoint = endpoints.device_authorization.ok_or_else(|| LoginError::NoDeviceEndpoint(provider.name.clone()))?;
    let request = build_request(provider, &[], Profile::Full).map_err(TokenError::from)?;
    let answer = idp.post_form(&endpoint, &request).await?;
    if !answer.status.is_success() {
        let detail = String::from_utf8_lossy(&answer.body).chars().take(300).collect::<String>();
        return Err(LoginError::Authorization(format!("HTTP {}: {detail}", answer.status.as_u16())));
    }
    let authorization: DeviceAuthorization =
        serde_json::from_slice(&answer.body).map_err(|e| LoginError::Authorization(format!("unusable answer: {e}")))?;
    let expires_in = Duration::from_secs(authorization.expires_in.unwrap_or(600));
    prompt(&DevicePrompt {
        verification_uri: authorization.verification_uri.clone(),
        verification_uri_complete: authorization.verification_uri_complete.clone(),
        user_code: authorization.user_code.clone(),
        expires_in,
    });
    let deadline = tokio::time::Instant::now() + expires_in;
    let mut interval = Duration::from_secs(authorization.interval.unwrap_or(5).max(1));
    loop {
        tokio::time::sleep(interval).await;
        if tokio::time::Instant::now() >= deadline {
            return Err(LoginError::Expired);
        }
        let params = [("grant_type", DEVICE_CODE_GRANT), ("device_code", authorization.device_code.as_str())];
        let request = build_request(provider, &params, Profile::Bare).map_err(TokenError::from)?;
        match idp.token_call(request).await {
            Ok(response) => {
                let refresh_token = response.refresh_token.ok_or(LoginError::NoRefreshToken)?;
                session.store_login(refresh_token, response.refresh_token_lifetime).await?;
                return Ok(());
            }
            Err(TokenError::Rejected { error, .. }) => match error.as_str() {
                "authorization_pending" => {}
                // RFC 8628 §3.5: slow_down adds 5 seconds to the interval, for this and all later requests.
                "slow_down" => interval += Duration::from_secs(5),
                "access_denied" => return Err(LoginError::Denied),
                "expired_token" => return Err(LoginError::Expired),
                _ => return Err(LoginError::Token(TokenError::Rejected { status: 400, error, description: None })),
            },
            // Transient trouble while polling: keep polling until the code expires.
            Err(error) if !error.is_permanent() => tracing::warn!("polling the token endpoint: {error}"),
            Err(error) => return Err(error.into()),
        }
    }
}

/// Revokes the session's refresh token (RFC 7009) and deletes it from the store; with a shared store, the fleet's
/// session is revoked and marked logged out there, so that no replica redeems or re-seeds its own copy.
pub async fn logout(fetcher: &GrantFetcher) -> Result<Logout, LoginError> {
    let idp = fetcher.idp();
    let provider = idp.provider();
    let session = fetcher.session().ok_or_else(|| LoginError::NotRefreshTokenGrant(provider.name.clone()))?;
    let revocation = idp.endpoints().await?.revocation;
    let mut revoked_any = false;
    // A replica may rotate the session between the read and the end: then its new refresh token is revoked too.
    for _ in 0..5 {
        let (version, tokens) = session.logout_targets().await?;
        if tokens.is_empty() && version.is_none() {
            return Ok(if revoked_any { Logout::Revoked } else { Logout::NothingStored });
        }
        if let Some(endpoint) = &revocation {
            for token in &tokens {
                revoke(fetcher, endpoint, token).await?;
                revoked_any = true;
            }
        }
        if session.end(version).await? {
            return Ok(match (&revocation, tokens.is_empty() && !revoked_any) {
                (_, true) => Logout::NothingStored,
                (Some(_), false) => Logout::Revoked,
                (None, false) => Logout::DeletedOnly,
            });
        }
    }
    Err(LoginError::Token(TokenError::Connect("the shared session kept changing during the logout: try again".into())))
}

async fn revoke(fetcher: &GrantFetcher, endpoint: &url::Url, token: &RefreshToken) -> Result<(), LoginError> {
    let idp = fetcher.idp();
    let params = [("token", token.expose()), ("token_type_hint", "refresh_token")];
    let request = build_request(idp.provider(), &params, Profile::Bare).map_err(TokenError::from)?;
    let answer = idp.post_form(endpoint, &request).await.map_err(|e| LoginError::Revocation(e.to_string()))?;
    if answer.status.is_success() {
        Ok(())
    } else {
        Err(LoginError::Revocation(format!("HTTP {}", answer.status.as_u16())))
    }
}
