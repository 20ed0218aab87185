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

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::grant::{build_request, Profile};
use super::idp::IdpClient;
use super::response::{TokenError, TokenResponse};
use super::shared::SharedStore;
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
    /// With a shared store (docs/fleet.md): the store and the session's key in it.
    shared: Option<(Arc<SharedStore>, String)>,
    /// A rotated refresh token the shared store has not taken yet, with the version it replaces.
    pending_shared: Mutex<Option<(Option<u64>, Record)>>,
}

impl RefreshSession {
    /// A session for `provider`, its state kept in `store`.
    pub fn new(provider: &ProviderConfig, store: StateStore) -> RefreshSession {
        RefreshSession {
            provider: provider.name.clone(),
            seed: provider.refresh_token.clone(),
            store,
            pending: Mutex::new(None),
            shared: None,
            pending_shared: Mutex::new(None),
        }
    }

    /// Keeps the session in the shared store too: the refresh token is read from it at every refresh, and each
    /// rotation is stored in it (compare-and-swap on its version) before the new access token is used.
    pub fn share(&mut self, store: Arc<SharedStore>, key: String) {
        self.shared = Some((store, key));
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

    /// The refresh token to use now with a shared store, and the shared version it replaces. The shared session is
    /// used unless this replica has a newer one (a `tokenproxy login` here, or a configured seed that changed); the
    /// local copy follows the shared one, for re-seeding a Redis that lost it.
    async fn current_shared(&self, store: &SharedStore, key: &str) -> Result<(Option<u64>, Current), TokenError> {
        let unavailable = |error: super::shared::StoreError| {
            TokenError::Connect(format!(
                "the shared store is unavailable ({error}): the refresh token is not redeemed (no risk of reuse); the \
                 current access token is used until it runs out"
            ))
        };
        let pending = self.pending_shared.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some((expected, record)) = pending {
            // Never lose a rotation: store it before anything else.
            if !store.swap_session(key, expected, &record).await.map_err(unavailable)? {
                tracing::error!(provider = %self.provider, "another replica stored the session meanwhile");
            }
            *self.pending_shared.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        let shared = store.read_session(key).await.map_err(unavailable)?;
        let local = self.store.load(&self.provider)?;
        let seed_sha256 = self.seed.as_ref().map(SecretSource::read).transpose()?.as_ref().map(sha256_hex);
        let Some((version, shared)) = shared else {
            // Nothing shared yet (or Redis lost it): this replica's copy seeds it, with the first rotation.
            return Ok((None, self.current()?));
        };
        let new_seed = seed_sha256.is_some() && seed_sha256 != shared.seed_sha256;
        let newer_here = local.as_ref().is_some_and(|local| local.stored_at > shared.stored_at);
        if new_seed || newer_here {
            return Ok((Some(version), self.current()?));
        }
        if local.as_ref().is_none_or(|local| local.refresh_token.expose() != shared.refresh_token.expose()) {
            let copy = Record { provider: self.provider.clone(), ..shared.clone() };
            if let Err(error) = self.store.save(&copy) {
                tracing::warn!(provider = %self.provider, "the local copy of the shared session could not be written: {error}");
            }
        }
        let current = Current {
            refresh_token: shared.refresh_token,
            seed_sha256: shared.seed_sha256,
            rotations: shared.rotations,
        };
        Ok((Some(version), current))
    }

    /// Brings this replica's `state.dir` copy in step with the shared session (after it took an access token another
    /// replica obtained), so that a Redis that lost the session is seeded again from the newest copy. A newer copy here
    /// (a login) is kept.
    pub async fn sync_from_shared(&self) {
        let Some((store, key)) = &self.shared else { return };
        let Ok(Some((_, shared))) = store.read_session(key).await else { return };
        let local = self.store.load(&self.provider).ok().flatten();
        let behind = local.as_ref().is_none_or(|local| {
            local.stored_at <= shared.stored_at && local.refresh_token.expose() != shared.refresh_token.expose()
        });
        if behind {
            if let Err(error) = self.store.save(&Record { provider: self.provider.clone(), ..shared }) {
                tracing::warn!(provider = %self.provider, "the local copy of the shared session could not be written: {error}");
            }
        }
    }

    /// Redeems the current refresh token at the IdP and stores the rotated one before returning the access token.
    pub async fn refresh(&self, idp: &IdpClient) -> Result<TokenResponse, TokenError> {
        let _lock = self.store.lock(&self.provider, LOCK_WAIT).await?;
        self.flush_pending()?;
        let (shared_version, current) = match &self.shared {
            Some((store, key)) => self.current_shared(store, key).await?,
            None => (None, self.current()?),
        };
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
            if let Some((store, key)) = &self.shared {
                match store.swap_session(key, shared_version, &record).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::error!(
                            provider = %self.provider,
                            "another replica stored a rotation of this session meanwhile (its lease expired during this \
                             call?): keeping the shared one"
                        );
                        return Err(TokenError::Connect("the shared session changed during the refresh".into()));
                    }
                    Err(error) => {
                        // Stored before anything else at the next attempt; this access token is not used meanwhile.
                        *self.pending_shared.lock().unwrap_or_else(|e| e.into_inner()) = Some((shared_version, record));
                        return Err(TokenError::Connect(format!(
                            "the rotated refresh token is not shared yet: {error}"
                        )));
                    }
                }
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
