//! Refresh-token sessions (`grant = "refresh_token"`): keep one user session alive for months across rotations.
//!
//! Rotation makes this fragile: each use of a refresh token may return a new one and kill the old one, and using an
//! old one twice makes some IdPs (Auth0, oidc-provider) revoke the whole family. So:
//! - the refresher task is the only caller in this process (single flight), and an advisory lock in the state
//!   store keeps other processes on the same directory out while a refresh is under way;
//! - the refresh token is read from the store at every refresh (another process may have rotated it);
//! - a rotated refresh token is written to the store, atomically and durably, *before* the new access token is
//!   returned for use; if the write fails, the new refresh token is kept in memory and written before anything else
//!   happens at the next attempt, and the access token is not used;
//! - `invalid_grant` ends the session: a permanent failure that asks for a new login.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use super::grant::{build_request, Profile};
use super::idp::IdpClient;
use super::response::{TokenError, TokenResponse};
use super::store::{sha256_hex, unix, Record, StateStore};
use crate::config::{ProviderConfig, Secret, SecretSource};

/// How long a refresh waits for another process holding the store's lock.
const LOCK_WAIT: Duration = Duration::from_secs(30);

/// The refresh token to use and where it came from.
struct Current {
    refresh_token: Secret,
    seed_sha256: Option<String>,
    rotations: u64,
}

/// One provider's refresh-token session.
pub struct RefreshSession {
    provider: String,
    seed: Option<SecretSource>,
    store: StateStore,
    /// A rotated refresh token the store has not taken yet.
    pending: Mutex<Option<Record>>,
}

impl RefreshSession {
    /// A session for `provider`, its state kept in `store`.
    pub fn new(provider: &ProviderConfig, store: StateStore) -> RefreshSession {
        RefreshSession {
            provider: provider.name.clone(),
            seed: provider.refresh_token.clone(),
            store,
            pending: Mutex::new(None),
        }
    }

    /// The state store.
    pub fn store(&self) -> &StateStore {
        &self.store
    }

    /// The refresh token to use now: the stored one, unless the configured seed changed since it was stored
    /// (a new login wins), else the seed.
    fn current(&self) -> Result<Current, TokenError> {
        let seed = self.seed.as_ref().map(SecretSource::read).transpose()?;
        let seed_sha256 = seed.as_ref().map(sha256_hex);
        match (self.store.load(&self.provider)?, seed) {
            (Some(record), None) => Ok(Current {
                refresh_token: record.refresh_token,
                seed_sha256: record.seed_sha256,
                rotations: record.rotations,
            }),
            (Some(record), Some(_)) if record.seed_sha256 == seed_sha256 => Ok(Current {
                refresh_token: record.refresh_token,
                seed_sha256: record.seed_sha256,
                rotations: record.rotations,
            }),
            (stored, Some(seed)) => {
                if stored.is_some() {
                    tracing::info!(provider = %self.provider, "the configured refresh token changed since the stored one: using the new one (a new login)");
                }
                Ok(Current { refresh_token: seed, seed_sha256, rotations: 0 })
            }
            (None, None) => Err(TokenError::NoRefreshToken(self.provider.clone())),
        }
    }

    /// Stores a rotated refresh token that an earlier attempt could not store.
    fn flush_pending(&self) -> Result<(), TokenError> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(record) = pending.as_ref() {
            self.store.save(record)?;
            *pending = None;
        }
        Ok(())
    }

    /// Redeems the current refresh token at the IdP and stores the rotated one before returning the access token.
    pub async fn refresh(&self, idp: &IdpClient) -> Result<TokenResponse, TokenError> {
        let _lock = self.store.lock(&self.provider, LOCK_WAIT).await?;
        self.flush_pending()?;
        let current = self.current()?;
        let params = [("grant_type", "refresh_token"), ("refresh_token", current.refresh_token.expose())];
        let request = build_request(idp.provider(), &params, Profile::Full)?;
        let response = match idp.token_call(request).await {
            Ok(response) => response,
            Err(error @ TokenError::Rejected { .. }) if is_invalid_grant(&error) => {
                return Err(TokenError::LoginNeeded { provider: self.provider.clone(), cause: Box::new(error) });
            }
            Err(error) => return Err(error),
        };
        let now = SystemTime::now();
        let rotated = response.refresh_token.clone();
        let expires_at = response.refresh_token_lifetime.map(|lifetime| unix(now + lifetime));
        if rotated.is_some() || expires_at.is_some() {
            let record = Record {
                version: 1,
                provider: self.provider.clone(),
                rotations: current.rotations + u64::from(rotated.is_some()),
                refresh_token: rotated.unwrap_or(current.refresh_token),
                seed_sha256: current.seed_sha256,
                stored_at: unix(now),
                refresh_token_expires_at: expires_at,
            };
            if let Err(error) = self.store.save(&record) {
                // Never lose it: keep it for the next attempt, and do not use this access token meanwhile.
                *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = Some(record);
                return Err(error.into());
            }
        }
        Ok(response)
    }

    /// Stores a refresh token obtained by `tokenproxy login` (a new session, replacing any stored one). The
    /// configured seed, if any, is recorded as seen: only a seed that changes after the login wins over it.
    pub fn store_login(&self, refresh_token: Secret, lifetime: Option<Duration>) -> Result<(), TokenError> {
        let now = SystemTime::now();
        let seed = self.seed.as_ref().map(SecretSource::read).transpose()?;
        let record = Record {
            version: 1,
            provider: self.provider.clone(),
            refresh_token,
            seed_sha256: seed.as_ref().map(sha256_hex),
            stored_at: unix(now),
            refresh_token_expires_at: lifetime.map(|l| unix(now + l)),
            rotations: 0,
        };
        Ok(self.store.save(&record)?)
    }

    /// The refresh token a logout should revoke (the stored one, else the seed), if any.
    pub fn refresh_token_for_logout(&self) -> Result<Option<Secret>, TokenError> {
        match self.current() {
            Ok(current) => Ok(Some(current.refresh_token)),
            Err(TokenError::NoRefreshToken(_)) => Ok(None),
            Err(error) => Err(error),
        }
    }
}

fn is_invalid_grant(error: &TokenError) -> bool {
    matches!(error, TokenError::Rejected { error, .. } if error == "invalid_grant")
}
