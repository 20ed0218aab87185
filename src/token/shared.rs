//! The shared store (`[state] store = "redis"`, docs/fleet.md): replicas share their access tokens, and one of them
//! makes each token call.
//!
//! A provider's token lives under `PREFIX:token:PROVIDER:HASH`, where HASH is a SHA-256 of every setting that shapes
//! the token (token URL or issuer, client id, grant, client authentication, scope, audience, resource, extra
//! parameters; never a secret), so two replicas with different settings never share. The value is encrypted
//! (AES-256-GCM, the Redis key as associated data, a random nonce per write): who can read Redis cannot read tokens.
//!
//! A replica that needs a token ([`SharedFetcher`]) first reads the shared one, and uses it unless it is the very
//! token the replica wants replaced (refused by an upstream, or due for refresh) or is itself due for refresh. Else it
//! takes the lease (`SET NX PX` with a random fencing value, released only by its holder), reads once more (another
//! replica may have made its call and released the lease since), makes the token call and stores the result; the others poll for that result while the lease is held, up to the provider's `timeout`, and
//! make their own call if none comes (a holder that died lets its lease expire). Every Redis operation has a short
//! timeout (`redis_timeout`); when Redis fails, the replica makes its own call, as without a shared store.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use futures_util::future::BoxFuture;
use http::HeaderValue;
use sha2::{Digest, Sha256};

use super::refresh::TokenFetcher;
use super::response::{TokenError, TokenResponse};
use super::slot::Token;
use super::store::Record;
use crate::config::{Grant, ProviderConfig, RedisServer, SharedStoreConfig};
use crate::metrics::StoreMetrics;

/// The version byte that starts every stored value.
const FORMAT: u8 = 1;
/// How often a replica waiting for the lease holder's token looks again.
const POLL: Duration = Duration::from_millis(50);

/// A connection to Redis with the keys that encrypt what goes in it.
pub struct SharedStore {
    /// Where Redis is and how to log in (read at each new connection: a rotated password file is taken then).
    config: SharedStoreConfig,
    /// Connected on first use, and again after a failure (the manager reconnects by itself afterwards).
    connection: tokio::sync::Mutex<Option<redis::aio::ConnectionManager>>,
    /// The first encrypts; all are tried to decrypt (key rotation without downtime).
    keys: Vec<Aes256Gcm>,
    timeout: Duration,
    metrics: StoreMetrics,
}

/// Why a Redis operation did not give an answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis did not answer in time.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Redis answered with an error, or the connection failed.
    #[error("redis: {0}")]
    Redis(String),
    /// A stored value does not open with any key of `encryption_key_file` (another key, or tampered with).
    #[error(
        "{0} cannot be decrypted with encryption_key_file (another key, or tampered with): not used, and not \
             overwritten by this replica"
    )]
    Undecryptable(&'static str),
}

/// How one provider's last use of the shared store went: `/readyz` and `/tokens` show it, and the gauge
/// `tokenproxy_store_degraded` follows it.
pub struct StoreHealth {
    problem: std::sync::Mutex<Option<StoreProblem>>,
    degraded: prometheus::IntGauge,
    /// A refresh-token session: it does not rotate without the store.
    exclusive: bool,
}

/// What went wrong with the shared store, and since when.
#[derive(Debug, Clone)]
pub struct StoreProblem {
    /// A value this replica cannot decrypt (else: Redis failed or did not answer in time).
    pub undecryptable: bool,
    /// What failed, and what this replica does meanwhile.
    pub detail: String,
    /// The first failure of this run of failures.
    pub since: SystemTime,
}

impl StoreHealth {
    /// The health of `provider`'s use of the store, its gauge from `metrics`.
    pub fn new(provider: &ProviderConfig, metrics: &StoreMetrics) -> StoreHealth {
        let degraded = metrics.degraded(&provider.name);
        degraded.set(0);
        StoreHealth { problem: Default::default(), degraded, exclusive: provider.grant == Grant::RefreshToken }
    }

    /// The store answered.
    pub fn ok(&self) {
        let mut problem = self.problem.lock().unwrap_or_else(|e| e.into_inner());
        if problem.take().is_some() {
            self.degraded.set(0);
        }
    }

    /// The store failed with `error`.
    pub fn failed(&self, error: &StoreError) {
        let undecryptable = matches!(error, StoreError::Undecryptable(_));
        let consequence = match (self.exclusive, undecryptable) {
            (true, true) => {
                "this replica redeems no refresh token of its own for the session (it keeps any access token it holds \
                 until it runs out)"
            }
            (true, false) => {
                "the session's refresh token is not redeemed without the store (no risk of reuse): the current access \
                 token is used until it runs out"
            }
            (false, _) => "this replica makes its own token calls",
        };
        let mut problem = self.problem.lock().unwrap_or_else(|e| e.into_inner());
        let since =
            problem.as_ref().filter(|p| p.undecryptable == undecryptable).map_or_else(SystemTime::now, |p| p.since);
        *problem = Some(StoreProblem { undecryptable, detail: format!("{error}; {consequence}"), since });
        self.degraded.set(1);
    }

    /// The problem of the last use, if it failed.
    pub fn problem(&self) -> Option<StoreProblem> {
        self.problem.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A token as stored: what a replica needs to use it by its own timing rules.
#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    access_token: String,
    /// Unix milliseconds.
    obtained_at: u64,
    /// Unix milliseconds.
    expires_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl SharedStore {
    /// A store for `config`. Nothing is connected, nor any credential read, until the first operation: what fails
    /// then (Redis, its password file, the Sentinels) is a store that does not answer, with what that implies (a
    /// session is never redeemed without it).
    pub fn new(config: &SharedStoreConfig, metrics: StoreMetrics) -> SharedStore {
        let keys = config.encryption_keys.iter().map(|key| Aes256Gcm::new(key.expose().into())).collect();
        SharedStore {
            config: config.clone(),
            connection: tokio::sync::Mutex::new(None),
            keys,
            timeout: config.timeout,
            metrics,
        }
    }

    /// A client of the Redis server: the one of `redis_url`, or the master the Sentinels name now.
    async fn client(&self) -> Result<redis::Client, String> {
        use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
        match &self.config.server {
            RedisServer::Url(url) => redis::Client::open(self.config.connection_info(url)?).map_err(|e| e.to_string()),
            RedisServer::Sentinel { sentinels, master } => {
                let mut node =
                    SentinelNodeConnectionInfo::default().set_redis_connection_info(self.config.redis_settings()?);
                if sentinels.iter().all(|url| url.scheme() == "rediss") {
                    node = node.set_tls_mode(redis::TlsMode::Secure);
                }
                let urls: Vec<&str> = sentinels.iter().map(url::Url::as_str).collect();
                let mut client = SentinelClient::build(urls, master, Some(node), SentinelServerType::Master)
                    .map_err(|e| format!("redis_sentinels: {e}"))?;
                client.async_get_client().await.map_err(|e| format!("redis_sentinels: {e}"))
            }
        }
    }

    async fn connection(&self) -> Result<redis::aio::ConnectionManager, StoreError> {
        let mut held = self.connection.lock().await;
        if let Some(connection) = held.as_ref() {
            return Ok(connection.clone());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        let connect = async {
            let client = self.client().await?;
            redis::aio::ConnectionManager::new_with_config(client, config).await.map_err(|e| e.to_string())
        };
        let connection = tokio::time::timeout(self.timeout, connect)
            .await
            .map_err(|_| StoreError::Timeout(self.timeout))?
            .map_err(StoreError::Redis)?;
        *held = Some(connection.clone());
        Ok(connection)
    }

    /// Runs one command, bounded by the store's timeout, and counts it. A connection that fails (Redis restarted, or
    /// came back) is dropped and the command tried once more on a new one; a slow answer is not tried again.
    async fn run<T: redis::FromRedisValue>(&self, op: &'static str, command: redis::Cmd) -> Result<T, StoreError> {
        let once = async || {
            let mut connection = self.connection().await?;
            match tokio::time::timeout(self.timeout, command.query_async::<T>(&mut connection)).await {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(e)) => {
                    *self.connection.lock().await = None;
                    Err(StoreError::Redis(e.to_string()))
                }
                Err(_) => Err(StoreError::Timeout(self.timeout)),
            }
        };
        let outcome = match once().await {
            Err(StoreError::Redis(_)) => once().await,
            outcome => outcome,
        };
        self.metrics.operation(op, if outcome.is_ok() { "ok" } else { "error" }).inc();
        outcome
    }

    /// The start of the Redis keys that count `provider`'s token calls (`max_token_calls`), one per window.
    pub fn budget_key(&self, provider: &ProviderConfig) -> String {
        format!("{}:calls:{}", self.config.key_prefix, provider.name)
    }

    /// Counts one call in `key` (created with a lifetime of `ttl_seconds`) and says how many there are now.
    pub async fn count_call(&self, key: &str, ttl_seconds: u64) -> Result<u64, StoreError> {
        let count: u64 = self.run("budget", redis::cmd("INCR").arg(key).clone()).await?;
        if count == 1 {
            self.run::<()>("budget", redis::cmd("EXPIRE").arg(key).arg(ttl_seconds).clone()).await?;
        }
        Ok(count)
    }

    /// The Redis key of `provider`'s token.
    pub fn token_key(&self, provider: &ProviderConfig) -> String {
        format!("{}:token:{}:{}", self.config.key_prefix, provider.name, settings_hash(provider))
    }

    fn seal(&self, key: &str, plain: &[u8]) -> Option<Vec<u8>> {
        let cipher = self.keys.first()?;
        let nonce: [u8; 12] = rand::random();
        let sealed = cipher.encrypt(&Nonce::from(nonce), Payload { msg: plain, aad: key.as_bytes() }).ok()?;
        let mut value = Vec::with_capacity(1 + nonce.len() + sealed.len());
        value.push(FORMAT);
        value.extend_from_slice(&nonce);
        value.extend_from_slice(&sealed);
        Some(value)
    }

    /// The plain text of a stored value, if one of the keys opens it (and it was stored under this very key).
    fn open(&self, key: &str, value: &[u8]) -> Option<Vec<u8>> {
        let (&format, rest) = value.split_first()?;
        if format != FORMAT || rest.len() < 12 {
            return None;
        }
        let (nonce, sealed) = rest.split_at(12);
        let nonce = Nonce::from(<[u8; 12]>::try_from(nonce).ok()?);
        self.keys.iter().find_map(|cipher| cipher.decrypt(&nonce, Payload { msg: sealed, aad: key.as_bytes() }).ok())
    }

    /// The shared token under `key`: `Ok(None)` when there is none, or none this replica can open (counted, logged).
    async fn read(&self, key: &str) -> Result<Option<Stored>, StoreError> {
        let value: Option<Vec<u8>> = self.run("get", redis::cmd("GET").arg(key).clone()).await?;
        let Some(value) = value else { return Ok(None) };
        match self.open(key, &value).and_then(|plain| serde_json::from_slice::<Stored>(&plain).ok()) {
            Some(stored) => Ok(Some(stored)),
            None => Err(self.undecryptable(key, "the shared token")),
        }
    }

    /// Counts and logs a value under `key` that does not open.
    fn undecryptable(&self, key: &str, what: &'static str) -> StoreError {
        let error = StoreError::Undecryptable(what);
        self.metrics.operation("decrypt", "error").inc();
        tracing::error!(key, "{error}");
        error
    }

    async fn write(&self, key: &str, stored: &Stored) -> Result<(), StoreError> {
        let plain = serde_json::to_vec(stored).map_err(|e| StoreError::Redis(e.to_string()))?;
        let value = self.seal(key, &plain).ok_or_else(|| StoreError::Redis("no encryption key".into()))?;
        let ttl = stored.expires_at.saturating_sub(unix_ms(SystemTime::now())).max(1);
        self.run::<()>("set", redis::cmd("SET").arg(key).arg(value).arg("PX").arg(ttl).clone()).await
    }

    /// Takes the lease `key` for `ttl` with `fence` (random) if nobody holds it.
    async fn lease(&self, key: &str, fence: &str, ttl: Duration) -> Result<bool, StoreError> {
        let ttl = ttl.as_millis().max(1) as u64;
        let answer: Option<String> =
            self.run("lease", redis::cmd("SET").arg(key).arg(fence).arg("NX").arg("PX").arg(ttl).clone()).await?;
        Ok(answer.is_some())
    }

    /// Releases the lease `key` if `fence` still holds it (a holder that outlived its lease frees no one else's).
    async fn release(&self, key: &str, fence: &str) -> Result<(), StoreError> {
        const RELEASE: &str =
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";
        let command = redis::cmd("EVAL").arg(RELEASE).arg(1).arg(key).arg(fence).clone();
        self.run::<i64>("release", command).await.map(|_| ())
    }
}

/// A refresh-token session as stored in Redis (encrypted), beside its version (`v`, in clear, for the
/// compare-and-swap).
#[derive(serde::Serialize, serde::Deserialize)]
struct SessionState {
    #[serde(default)]
    refresh_token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seed_sha256: Option<String>,
    stored_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token_expires_at: Option<u64>,
    rotations: u64,
    /// Ended by `tokenproxy logout` (the refresh token is then empty).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    logged_out: bool,
}

/// A shared refresh-token session.
#[derive(Debug, Clone)]
pub enum SharedSession {
    /// The refresh token to redeem.
    Live(Record),
    /// Ended by `tokenproxy logout` at `stored_at` (Unix seconds): no replica redeems its own copy of it; a login or a
    /// changed seed starts a new one.
    LoggedOut {
        /// When.
        stored_at: u64,
        /// The configured seed the session had (a seed that changes after the logout starts a new session).
        seed_sha256: Option<String>,
    },
}

/// Sets a session if its version is still the one read (`""`: there was none); answers 1 if it did.
const SESSION_CAS: &str = "local v = redis.call('HGET', KEYS[1], 'v') \
     if (v == false and ARGV[1] == '') or v == ARGV[1] then \
       redis.call('HSET', KEYS[1], 'v', ARGV[2], 'data', ARGV[3]) return 1 end return 0";

impl SharedStore {
    /// The Redis key of `provider`'s refresh-token session.
    pub fn session_key(&self, provider: &ProviderConfig) -> String {
        format!("{}:session:{}:{}", self.config.key_prefix, provider.name, settings_hash(provider))
    }

    /// The shared session under `key` and its version; `Ok(None)` when there is none. A value this replica cannot
    /// open is an error: the session is then neither used nor overwritten here.
    pub async fn read_session(&self, key: &str) -> Result<Option<(u64, SharedSession)>, StoreError> {
        let values: Vec<Option<Vec<u8>>> =
            self.run("get", redis::cmd("HMGET").arg(key).arg("v").arg("data").clone()).await?;
        let (Some(Some(version)), Some(Some(data))) = (values.first(), values.get(1)) else { return Ok(None) };
        let version = std::str::from_utf8(version).ok().and_then(|v| v.parse::<u64>().ok());
        let state = self.open(key, data).and_then(|plain| serde_json::from_slice::<SessionState>(&plain).ok());
        let (Some(version), Some(state)) = (version, state) else {
            return Err(self.undecryptable(key, "the shared refresh-token session"));
        };
        let session = match state.logged_out {
            true => SharedSession::LoggedOut { stored_at: state.stored_at, seed_sha256: state.seed_sha256 },
            false => SharedSession::Live(Record {
                version: 1,
                provider: String::new(),
                refresh_token: super::secrets::RefreshToken::new(state.refresh_token),
                seed_sha256: state.seed_sha256,
                stored_at: state.stored_at,
                refresh_token_expires_at: state.refresh_token_expires_at,
                rotations: state.rotations,
            }),
        };
        Ok(Some((version, session)))
    }

    /// Stores `record` as the session under `key` if its version is still `expected` (`None`: there was none).
    /// `Ok(false)`: another replica stored one meanwhile.
    pub async fn swap_session(&self, key: &str, expected: Option<u64>, record: &Record) -> Result<bool, StoreError> {
        let state = SessionState {
            refresh_token: record.refresh_token.expose().to_owned(),
            seed_sha256: record.seed_sha256.clone(),
            stored_at: record.stored_at,
            refresh_token_expires_at: record.refresh_token_expires_at,
            rotations: record.rotations,
            logged_out: false,
        };
        self.swap_state(key, expected, &state).await
    }

    /// Marks the session under `key` as ended by a logout at `stored_at` (Unix seconds), if its version is still
    /// `expected`; `Ok(false)`: it changed meanwhile.
    pub async fn end_session(
        &self,
        key: &str,
        expected: Option<u64>,
        stored_at: u64,
        seed_sha256: Option<String>,
    ) -> Result<bool, StoreError> {
        let state = SessionState {
            refresh_token: String::new(),
            seed_sha256,
            stored_at,
            refresh_token_expires_at: None,
            rotations: 0,
            logged_out: true,
        };
        self.swap_state(key, expected, &state).await
    }

    async fn swap_state(&self, key: &str, expected: Option<u64>, state: &SessionState) -> Result<bool, StoreError> {
        let plain = serde_json::to_vec(state).map_err(|e| StoreError::Redis(e.to_string()))?;
        let sealed = self.seal(key, &plain).ok_or_else(|| StoreError::Redis("no encryption key".into()))?;
        let expected_text = expected.map(|v| v.to_string()).unwrap_or_default();
        let next = expected.unwrap_or(0) + 1;
        let command =
            redis::cmd("EVAL").arg(SESSION_CAS).arg(1).arg(key).arg(expected_text).arg(next).arg(sealed).clone();
        Ok(self.run::<i64>("set", command).await? == 1)
    }

    /// Deletes `key` (the shared access token of a session that was logged out).
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.run::<i64>("delete", redis::cmd("DEL").arg(key).clone()).await.map(|_| ())
    }
}

/// Whether a provider's tokens may be shared between replicas: not sender-constrained ones (bound to this replica's
/// key or certificate), not tokens exchanged from a subject each replica reads for itself. Refresh-token sessions
/// are: their refresh token lives in the store too, redeemed only by the lease holder.
pub fn shareable(provider: &ProviderConfig) -> bool {
    use crate::config::ClientAuth;
    matches!(provider.grant, Grant::ClientCredentials | Grant::Password | Grant::JwtBearer | Grant::RefreshToken)
        && provider.exchange.is_none()
        && !provider.dpop
        && !matches!(provider.client_auth, ClientAuth::TlsClientAuth | ClientAuth::SelfSignedTlsClientAuth)
}

/// SHA-256 (first 16 hex digits) of the settings that shape a provider's token; never a secret.
fn settings_hash(p: &ProviderConfig) -> String {
    let settings = serde_json::json!({
        "token_url": p.token_url.as_ref().map(|u| u.as_str()),
        "issuer": p.issuer.as_ref().map(|u| u.as_str()),
        "client_id": p.client_id,
        "grant": p.grant,
        "client_auth": p.client_auth,
        "username": p.username,
        "scope": p.scope,
        "audience": p.audience,
        "resource": p.resource,
        "extra_params": p.extra_params,
    });
    let digest = Sha256::digest(settings.to_string().as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// A provider's token calls through the shared store.
pub struct SharedFetcher {
    inner: Arc<dyn TokenFetcher>,
    store: Arc<SharedStore>,
    name: String,
    key: String,
    lease_key: String,
    refresh_at: f64,
    /// How long a replica waits for the lease holder's token (the provider's `timeout`).
    wait: Duration,
    /// A refresh-token session: its refresh token is redeemed under the lease only, never by a replica on its own
    /// (two redemptions of one refresh token end the session at IdPs that detect reuse).
    exclusive: bool,
    health: Arc<StoreHealth>,
}

impl SharedFetcher {
    /// `inner`'s calls for `provider`, shared through `store`; how they go is kept in `health`.
    pub fn new(
        inner: Arc<dyn TokenFetcher>,
        store: Arc<SharedStore>,
        provider: &ProviderConfig,
        health: Arc<StoreHealth>,
    ) -> SharedFetcher {
        let key = store.token_key(provider);
        SharedFetcher {
            inner,
            lease_key: format!("{key}:lease"),
            key,
            store,
            name: provider.name.clone(),
            refresh_at: provider.refresh_at,
            wait: provider.timeout,
            exclusive: provider.grant == Grant::RefreshToken,
            health,
        }
    }

    /// The shared token, if this replica should use it instead of `current` (the token it holds).
    fn adoptable(&self, stored: Stored, current: Option<&HeaderValue>) -> Option<TokenResponse> {
        let now = unix_ms(SystemTime::now());
        let lifetime = stored.expires_at.saturating_sub(stored.obtained_at);
        let due = stored.obtained_at + (lifetime as f64 * self.refresh_at) as u64;
        if now >= due || current.is_some_and(|current| current.as_bytes() == stored.access_token.as_bytes()) {
            return None;
        }
        let token = HeaderValue::from_str(&stored.access_token).ok()?;
        let mut response = TokenResponse::new(token, Duration::from_millis(stored.expires_at - now));
        response.scope = stored.scope;
        response.shared = true;
        Some(response)
    }

    /// The shared token, if this replica should take it (a session's local copy is then brought in step).
    async fn look(&self, current: Option<&HeaderValue>) -> Result<Option<TokenResponse>, StoreError> {
        let adopted = self.store.read(&self.key).await?.and_then(|stored| self.adoptable(stored, current));
        self.health.ok();
        if adopted.is_some() && self.exclusive {
            self.inner.sync_shared().await;
        }
        Ok(adopted)
    }

    /// The store failed: noted in the provider's health, and [`Self::own_call`].
    async fn store_failed(&self, error: StoreError) -> Result<TokenResponse, TokenError> {
        self.health.failed(&error);
        self.own_call(&error).await
    }

    /// Without the store (`why`): this replica's own call, except for a session, whose refresh token is redeemed only
    /// under the lease (two redemptions of one refresh token end it).
    async fn own_call(&self, why: &(dyn std::fmt::Display + Sync)) -> Result<TokenResponse, TokenError> {
        self.store.metrics.fallbacks.inc();
        if self.exclusive {
            tracing::warn!(provider = %self.name, "shared store unavailable ({why}): the session's refresh token is not redeemed without the lease");
            return Err(TokenError::Connect(format!(
                "the shared store is unavailable ({why}): the refresh token is redeemed only under its lease, so this \
                 replica keeps its current access token and tries again"
            )));
        }
        tracing::warn!(provider = %self.name, "shared store unavailable ({why}): making this replica's own token call");
        self.inner.fetch().await
    }

    /// As the lease holder: the token call, and its token shared; the lease released.
    async fn call_and_share(&self, fence: &str) -> Result<TokenResponse, TokenError> {
        let result = self.inner.fetch().await;
        if let Ok(response) = &result {
            let now = SystemTime::now();
            let stored = Stored {
                access_token: response.access_token.expose().to_str().unwrap_or_default().to_owned(),
                obtained_at: unix_ms(now),
                expires_at: unix_ms(now + response.lifetime),
                scope: response.scope.clone(),
            };
            if let Err(error) = self.store.write(&self.key, &stored).await {
                tracing::warn!(provider = %self.name, "the new token could not be shared: {error}");
                self.health.failed(&error);
            }
        }
        self.release(fence).await;
        result
    }

    /// Releases the lease this replica holds with `fence`; one the store does not release expires.
    async fn release(&self, fence: &str) {
        if let Err(error) = self.store.release(&self.lease_key, fence).await {
            tracing::debug!(provider = %self.name, "the lease could not be released (it expires): {error}");
        }
    }

    /// With the lease: the token another replica shared since this one looked (it made its call, shared the token and
    /// released the lease in between), else the call. Without this second look, two replicas starting together each
    /// made a call.
    async fn as_holder(&self, fence: &str, current: Option<&HeaderValue>) -> Result<TokenResponse, TokenError> {
        match self.look(current).await {
            Ok(Some(response)) => {
                self.release(fence).await;
                Ok(response)
            }
            Ok(None) => self.call_and_share(fence).await,
            // The lease is this replica's: its call is the fleet's, shared if the store answers again.
            Err(error) => {
                self.health.failed(&error);
                self.call_and_share(fence).await
            }
        }
    }

    async fn fetch_through(&self, current: Option<Arc<Token>>) -> Result<TokenResponse, TokenError> {
        let current = current.as_ref().map(|token| token.access_token().expose());
        match self.look(current).await {
            Ok(Some(response)) => return Ok(response),
            Ok(None) => {}
            Err(error) => return self.store_failed(error).await,
        }
        // Random, and naming this process (for an operator looking at a lease that outlived its holder).
        let fence = format!("{}:{:032x}", std::process::id(), rand::random::<u128>());
        let deadline = tokio::time::Instant::now() + self.wait;
        let mut waited = false;
        loop {
            match self.store.lease(&self.lease_key, &fence, self.wait + Duration::from_secs(1)).await {
                Ok(true) => return self.as_holder(&fence, current).await,
                Ok(false) if !waited => {
                    self.store.metrics.lease_waits.inc();
                    waited = true;
                }
                Ok(false) => {}
                Err(error) => return self.store_failed(error).await,
            }
            // Another replica is making the call: its token, when it comes.
            tokio::time::sleep(POLL).await;
            match self.look(current).await {
                Ok(Some(response)) => return Ok(response),
                Ok(None) => {}
                Err(error) => return self.store_failed(error).await,
            }
            if tokio::time::Instant::now() >= deadline {
                return self.own_call(&"the lease holder gave no token within the provider's timeout").await;
            }
        }
    }
}

impl TokenFetcher for SharedFetcher {
    fn fetch(&self) -> BoxFuture<'_, Result<TokenResponse, TokenError>> {
        Box::pin(self.fetch_through(None))
    }

    fn fetch_after(&self, current: Option<Arc<Token>>) -> BoxFuture<'_, Result<TokenResponse, TokenError>> {
        Box::pin(self.fetch_through(current))
    }
}
