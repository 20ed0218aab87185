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

use super::idp::IdpClient;
use super::request::{build_request, Profile};
use super::response::{TokenError, TokenResponse};
use super::secrets::RefreshToken;
use super::shared::{SharedSession, SharedStore, StoreError as SharedError, StoreHealth};
use super::store::{sha256_hex, unix, Record, StateStore};
use crate::config::{ProviderConfig, SecretSource};

/// How long a refresh waits for another process holding the store's lock.
const LOCK_WAIT: Duration = Duration::from_secs(30);

/// The refresh token to use and where it came from.
struct Current {
    refresh_token: RefreshToken,
    seed_sha256: Option<String>,
    rotations: u64,
}

/// Where a session lives in the shared store.
struct Shared {
    store: Arc<SharedStore>,
    /// The session's key.
    key: String,
    /// The key of the access token obtained with it (deleted by a logout).
    token_key: String,
    health: Arc<StoreHealth>,
}

/// One provider's refresh-token session.
pub struct RefreshSession {
    provider: String,
    seed: Option<SecretSource>,
    store: StateStore,
    /// A rotated refresh token the store has not taken yet.
    pending: Mutex<Option<Record>>,
    /// With a shared store (docs/fleet.md): the store and the session's keys in it.
    shared: Option<Shared>,
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
    /// rotation is stored in it (compare-and-swap on its version) before the new access token is used. How the store
    /// answers is kept in `health`.
    pub fn share(&mut self, store: Arc<SharedStore>, provider: &ProviderConfig, health: Arc<StoreHealth>) {
        let (key, token_key) = (store.session_key(provider), store.token_key(provider));
        self.shared = Some(Shared { store, key, token_key, health });
    }

    /// Whether the session is kept in a shared store too.
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// The state store.
    pub fn store(&self) -> &StateStore {
        &self.store
    }

    /// The configured seed (`refresh_token`, `_file`, `_env`), read now.
    fn seed(&self) -> Result<Option<RefreshToken>, TokenError> {
        Ok(self.seed.as_ref().map(SecretSource::read).transpose()?.map(|seed| RefreshToken::new(seed.expose())))
    }

    /// The refresh token to use now: the stored one, unless the configured seed changed since it was stored
    /// (a new login wins), else the seed.
    fn current(&self) -> Result<Current, TokenError> {
        let seed = self.seed()?;
        let seed_sha256 = seed.as_ref().map(|seed| sha256_hex(seed.expose()));
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
    /// local copy follows the shared one, for re-seeding a Redis that lost it. A session ended by `tokenproxy logout`
    /// stays ended (the local copy is deleted) until a login or a new seed.
    async fn current_shared(&self, shared: &Shared) -> Result<(Option<u64>, Current), TokenError> {
        let unavailable = |error: SharedError| {
            shared.health.failed(&error);
            TokenError::Connect(format!(
                "shared store: {error}; the refresh token is not redeemed without it (no risk of reuse), the current \
                 access token is used until it runs out"
            ))
        };
        let pending = self.pending_shared.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some((expected, record)) = pending {
            // Never lose a rotation: store it before anything else.
            if !shared.store.swap_session(&shared.key, expected, &record).await.map_err(unavailable)? {
                tracing::error!(provider = %self.provider, "another replica stored the session meanwhile");
            }
            *self.pending_shared.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        let found = shared.store.read_session(&shared.key).await.map_err(unavailable)?;
        shared.health.ok();
        let local = self.store.load(&self.provider)?;
        let seed_sha256 = self.seed()?.map(|seed| sha256_hex(seed.expose()));
        let Some((version, found)) = found else {
            // Nothing shared yet (or Redis lost it): this replica's copy seeds it, with the first rotation.
            return Ok((None, self.current()?));
        };
        let (stored_at, shared_seed) = match &found {
            SharedSession::Live(record) => (record.stored_at, &record.seed_sha256),
            SharedSession::LoggedOut { stored_at, seed_sha256 } => (*stored_at, seed_sha256),
        };
        let new_seed = seed_sha256.is_some() && seed_sha256 != *shared_seed;
        let newer_here = local.as_ref().is_some_and(|local| local.stored_at > stored_at);
        if new_seed || newer_here {
            return Ok((Some(version), self.current()?));
        }
        let shared = match found {
            SharedSession::Live(record) => record,
            SharedSession::LoggedOut { .. } => {
                if local.is_some() {
                    self.forget_local();
                }
                return Err(TokenError::LoggedOut(self.provider.clone()));
            }
        };
        if local.as_ref().is_none_or(|local| local.refresh_token.expose() != shared.refresh_token.expose()) {
            self.save_copy(&shared);
        }
        let current = Current {
            refresh_token: shared.refresh_token,
            seed_sha256: shared.seed_sha256,
            rotations: shared.rotations,
        };
        Ok((Some(version), current))
    }

    /// Writes `shared` as this replica's `state.dir` copy of the session.
    fn save_copy(&self, shared: &Record) {
        if let Err(error) = self.store.save(&Record { provider: self.provider.clone(), ..shared.clone() }) {
            tracing::warn!(provider = %self.provider, "the local copy of the shared session could not be written: {error}");
        }
    }

    /// Deletes this replica's `state.dir` copy of a session that was logged out (it must not seed Redis again).
    fn forget_local(&self) {
        match self.store.delete(&self.provider) {
            Ok(_) => {
                tracing::warn!(provider = %self.provider, "the session was ended with `tokenproxy logout`: the local copy is deleted")
            }
            Err(error) => {
                tracing::warn!(provider = %self.provider, "the local copy of a logged-out session could not be deleted: {error}")
            }
        }
    }

    /// Brings this replica's `state.dir` copy in step with the shared session (after it took an access token another
    /// replica obtained), so that a Redis that lost the session is seeded again from the newest copy. A newer copy here
    /// (a login) is kept.
    pub async fn sync_from_shared(&self) {
        let Some(shared) = &self.shared else { return };
        let found = match shared.store.read_session(&shared.key).await {
            Ok(Some((_, found))) => found,
            Ok(None) => return,
            Err(error) => return shared.health.failed(&error),
        };
        let local = self.store.load(&self.provider).ok().flatten();
        match found {
            SharedSession::Live(shared) => {
                let behind = local.as_ref().is_none_or(|local| {
                    local.stored_at <= shared.stored_at && local.refresh_token.expose() != shared.refresh_token.expose()
                });
                if behind {
                    self.save_copy(&shared);
                }
            }
            SharedSession::LoggedOut { stored_at, .. } => {
                if local.is_some_and(|local| local.stored_at <= stored_at) {
                    self.forget_local();
                }
            }
        }
    }

    /// Redeems the current refresh token at the IdP and stores the rotated one before returning the access token.
    pub async fn refresh(&self, idp: &IdpClient) -> Result<TokenResponse, TokenError> {
        let _lock = self.store.lock(&self.provider, LOCK_WAIT).await?;
        self.flush_pending()?;
        let (shared_version, current) = match &self.shared {
            Some(shared) => self.current_shared(shared).await?,
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
            if let Some(shared) = &self.shared {
                match shared.store.swap_session(&shared.key, shared_version, &record).await {
                    Ok(true) => {}
                    Ok(false) => {
                        // The shared one wins, and this replica's copy follows it (a copy newer than the fleet's
                        // would seed an emptied Redis with a branch of the session the fleet gave up).
                        match shared.store.read_session(&shared.key).await {
                            Ok(Some((_, SharedSession::LoggedOut { .. }))) => {
                                self.forget_local();
                                return Err(TokenError::LoggedOut(self.provider.clone()));
                            }
                            Ok(Some((_, SharedSession::Live(record)))) => self.save_copy(&record),
                            Ok(None) | Err(_) => {}
                        }
                        tracing::error!(
                            provider = %self.provider,
                            "another replica stored a rotation of this session meanwhile (its lease expired during this \
                             call?): keeping the shared one"
                        );
                        return Err(TokenError::Connect("the shared session changed during the refresh".into()));
                    }
                    Err(error) => {
                        shared.health.failed(&error);
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

    /// Stores a refresh token obtained by `tokenproxy login` (a new session, replacing any stored one), in
    /// `state.dir` and, with a shared store, in it too (replacing the fleet's session, or its logout). The configured
    /// seed, if any, is recorded as seen: only a seed that changes after the login wins over it.
    pub async fn store_login(&self, refresh_token: RefreshToken, lifetime: Option<Duration>) -> Result<(), TokenError> {
        let now = SystemTime::now();
        let seed = self.seed()?;
        let record = Record {
            version: 1,
            provider: self.provider.clone(),
            refresh_token,
            seed_sha256: seed.map(|seed| sha256_hex(seed.expose())),
            stored_at: unix(now),
            refresh_token_expires_at: lifetime.map(|l| unix(now + l)),
            rotations: 0,
        };
        self.store.save(&record)?;
        let Some(shared) = &self.shared else { return Ok(()) };
        let not_shared = |error: SharedError| {
            TokenError::Connect(format!(
                "the new session is stored in {} but not in the shared store ({error}): the other replicas do not \
                 have it; run the login again when the store is reachable",
                self.store.path(&self.provider).display()
            ))
        };
        // A session rotated by a replica between the read and the write: read again (the login replaces it anyway).
        for _ in 0..5 {
            let version = shared.store.read_session(&shared.key).await.map_err(not_shared)?.map(|(v, _)| v);
            if shared.store.swap_session(&shared.key, version, &record).await.map_err(not_shared)? {
                return Ok(());
            }
        }
        Err(not_shared(SharedError::Redis("the shared session kept changing during the login".into())))
    }

    /// The refresh tokens a logout should revoke (the shared session's, then this replica's copy if it differs),
    /// and the shared session's version (to end it with a compare-and-swap).
    pub async fn logout_targets(&self) -> Result<(Option<u64>, Vec<RefreshToken>), TokenError> {
        let mut tokens = Vec::new();
        let mut version = None;
        if let Some(shared) = &self.shared {
            let found = shared.store.read_session(&shared.key).await.map_err(|error| {
                TokenError::Connect(format!("shared store: {error}; nothing was revoked or deleted"))
            })?;
            if let Some((v, found)) = found {
                version = Some(v);
                if let SharedSession::Live(record) = found {
                    tokens.push(record.refresh_token);
                }
            }
        }
        if let Some(local) = self.store.load(&self.provider)? {
            if tokens.iter().all(|t| t.expose() != local.refresh_token.expose()) {
                tokens.push(local.refresh_token);
            }
        }
        Ok((version, tokens))
    }

    /// Ends the session after its refresh tokens were revoked: deleted from `state.dir`, and, with a shared store,
    /// marked logged out there (if its version is still `version`; `Ok(false)`: a replica rotated it meanwhile, the
    /// logout must revoke the new one) and its shared access token deleted.
    pub async fn end(&self, version: Option<u64>) -> Result<bool, TokenError> {
        if let Some(shared) = &self.shared {
            let failed = |error: SharedError| {
                TokenError::Connect(format!("the session could not be ended in the shared store: {error}"))
            };
            let seed = self.seed()?;
            let ended = shared
                .store
                .end_session(&shared.key, version, unix(SystemTime::now()), seed.map(|seed| sha256_hex(seed.expose())))
                .await
                .map_err(failed)?;
            if !ended {
                return Ok(false);
            }
            shared.store.delete(&shared.token_key).await.map_err(failed)?;
        }
        self.store.delete(&self.provider)?;
        Ok(true)
    }
}

fn is_invalid_grant(error: &TokenError) -> bool {
    matches!(error, TokenError::Rejected { error, .. } if error == "invalid_grant")
}
