//! The token engine: one [`TokenSlot`] and one [`RefreshScheduler`] task per provider.
//!
//! - [`slot`]: the token ([`Token`]) and its slot: generations, the hot-path read and the single-flight rendezvous;
//! - [`refresh`]: the per-provider task that makes every token call, its schedule and backoff;
//! - [`grant`]: grant types and client authentication (what a token request carries);
//! - [`idp`]: HTTP to the identity provider and lenient, safe response parsing.
//!
//! The proxy sees the engine only through [`TokenSource`], so its tests can hand it a fake.

pub mod assertion;
pub mod budget;
pub mod device;
pub mod dpop;
pub mod exchange;
pub mod grant;
pub mod idp;
pub mod refresh;
pub mod refusal;
pub mod request;
pub mod response;
pub mod secrets;
pub mod session;
pub mod shared;
pub mod sink;
pub mod slot;
pub mod store;
pub mod subject;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use tokio::sync::watch;

pub use grant::GrantFetcher;
pub use idp::IdpClient;
pub use refresh::{RefreshScheduler, Timing, TokenFetcher};
pub use response::{TokenError, TokenResponse};
pub use secrets::{AccessToken, RefreshToken};
pub use slot::{RefreshLimits, SlotStatus, SubjectRefusal, Token, TokenSlot, TokenUnavailable};
pub use store::StateStore;

use crate::config::{Config, DuringRefresh, ProviderConfig, SecretSource, SubjectSource};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::tls::TlsError;

/// What the proxy needs of a provider's tokens.
pub trait TokenSource: Send + Sync + 'static {
    /// The usable token now, if any, without waiting: the hot path.
    fn current(&self) -> Option<Arc<Token>>;
    /// Waits (single flight, bounded by the provider's timeout) for a usable token. With `rejected = Some(g)`, an
    /// upstream refused generation `g`: it is invalidated and only a newer token is returned.
    fn obtain(&self, rejected: Option<u64>) -> BoxFuture<'_, Result<Arc<Token>, TokenUnavailable>>;
    /// For a caller's own tokens (token exchange): the fingerprint of the caller's subject token, as the access log
    /// shows it (the first 8 hex digits of its SHA-256; never the token). `None` for a provider's tokens.
    fn subject_fingerprint(&self) -> Option<String> {
        None
    }
    /// Keeps the verdict on an upstream's refusal of one of these tokens, for `/tokens` (`last_refusal`).
    fn note_refusal(&self, _verdict: crate::token::refusal::Verdict) {}
}

impl TokenSource for TokenSlot {
    #[inline]
    fn current(&self) -> Option<Arc<Token>> {
        TokenSlot::current(self)
    }

    fn obtain(&self, rejected: Option<u64>) -> BoxFuture<'_, Result<Arc<Token>, TokenUnavailable>> {
        Box::pin(TokenSlot::obtain(self, rejected))
    }

    fn note_refusal(&self, verdict: crate::token::refusal::Verdict) {
        TokenSlot::note_refusal(self, verdict);
    }
}

/// How a route gets its tokens.
#[derive(Clone)]
pub enum TokenBinding {
    /// One token for every request (the provider's slot, or a route profile's).
    Shared(Arc<dyn TokenSource>),
    /// A token per caller: each request's own bearer token exchanged (`grant = "token_exchange"`, subject from the
    /// request).
    PerCaller(Arc<exchange::ExchangeCache>),
}

/// One provider of the engine: its slot, its fetcher, and the refresher task that serves it.
struct Provider {
    config: ProviderConfig,
    slot: Arc<TokenSlot>,
    fetcher: Arc<dyn TokenFetcher>,
    timing: Timing,
    /// Stops the refresher task; sent when the provider is dropped (removed by a reload, or at shutdown).
    stop: watch::Sender<bool>,
    started: AtomicBool,
    /// The refresher task, awaited at shutdown so that a refresh in flight (and its rotated refresh token) completes.
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// SHA-256 of each `*_file` secret as last read, to notice a rotated Kubernetes Secret.
    secret_files: Mutex<Option<Vec<String>>>,
    /// With a shared store: how its last use went.
    store_health: Option<Arc<shared::StoreHealth>>,
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// A provider's token calls for one command of the command line (`token`, `login`, `logout`, `check --fetch`).
/// With a shared store they go through it as in the running proxy: the session is read from and written to it, and
/// a token is the fleet's shared one or obtained under the lease, so a refresh token is never redeemed beside the
/// fleet (which would end a session at IdPs that detect reuse).
pub struct CommandFetcher {
    grant: Arc<GrantFetcher>,
    fetcher: Arc<dyn TokenFetcher>,
}

impl CommandFetcher {
    /// The fetcher of `provider`, with `config`'s state store (and shared store, if any).
    pub fn new(config: &Config, provider: &ProviderConfig) -> Result<CommandFetcher, String> {
        let grant =
            GrantFetcher::new(provider.clone(), StateStore::new(&config.state.dir)).map_err(|e| e.to_string())?;
        let metrics = Metrics::new().store();
        let store =
            config.state.shared.as_ref().map(|settings| Arc::new(shared::SharedStore::new(settings, metrics.clone())));
        let (grant, fetcher, _) = through_store(grant, store.as_ref(), provider, &metrics);
        Ok(CommandFetcher { grant, fetcher })
    }

    /// The provider's grant (its IdP client and session).
    pub fn grant(&self) -> &GrantFetcher {
        &self.grant
    }

    /// One token: the shared store's, or a token call.
    pub async fn fetch(&self) -> Result<TokenResponse, TokenError> {
        self.fetcher.fetch().await
    }
}

/// `grant`'s token calls for `provider`: through `store` when there is one and the provider's tokens may be shared
/// (its refresh-token session kept there too), with how the store serves it; else `grant`'s own.
fn through_store(
    mut grant: GrantFetcher,
    store: Option<&Arc<shared::SharedStore>>,
    provider: &ProviderConfig,
    metrics: &crate::metrics::StoreMetrics,
) -> (Arc<GrantFetcher>, Arc<dyn TokenFetcher>, Option<Arc<shared::StoreHealth>>) {
    // The budget of token calls is the fleet's whatever the provider shares (a DPoP provider's calls count too).
    if let (Some(store), Some(budget)) = (store, grant.idp().budget()) {
        budget.share(Arc::clone(store), store.budget_key(provider));
    }
    let Some(store) = store.filter(|_| shared::shareable(provider)) else {
        let grant = Arc::new(grant);
        return (Arc::clone(&grant), grant, None);
    };
    let health = Arc::new(shared::StoreHealth::new(provider, metrics));
    grant.share_session(Arc::clone(store), Arc::clone(&health));
    let grant = Arc::new(grant);
    let fetcher = shared::SharedFetcher::new(Arc::clone(&grant) as _, Arc::clone(store), provider, Arc::clone(&health));
    (grant, Arc::new(fetcher), Some(health))
}

/// Every provider's slot and refresher.
pub struct TokenEngine {
    providers: BTreeMap<String, Arc<Provider>>,
    /// Providers that exchange each caller's own token: no slot, a cache of tokens per caller.
    exchanges: BTreeMap<String, (ProviderConfig, Arc<exchange::ExchangeCache>)>,
    /// Providers that routes use: fetched at startup, counted for readiness.
    routed: BTreeSet<String>,
    state_dir: PathBuf,
    /// The shared store's settings the providers were built with.
    shared_settings: Option<crate::config::SharedStoreConfig>,
}

/// What a reload did to the providers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ProviderChanges {
    /// Unchanged: kept with their tokens.
    pub kept: Vec<String>,
    /// New or changed: a new slot fetches a new token.
    pub started: Vec<String>,
    /// Gone: their refreshers stop.
    pub removed: Vec<String>,
}

impl TokenEngine {
    /// Builds a slot and an IdP client for every provider of `config` (nothing runs until [`TokenEngine::spawn`]).
    pub fn new(config: &Config, metrics: &Metrics) -> Result<TokenEngine, TlsError> {
        Self::reusing(None, config, metrics).map(|(engine, _)| engine)
    }

    /// The engine for a reloaded `config`: providers whose settings (and state directory) did not change are kept,
    /// with their tokens and refreshers; others are built anew.
    pub fn rebuild(&self, config: &Config, metrics: &Metrics) -> Result<(TokenEngine, ProviderChanges), TlsError> {
        Self::reusing(Some(self), config, metrics)
    }

    fn reusing(
        old: Option<&TokenEngine>,
        config: &Config,
        metrics: &Metrics,
    ) -> Result<(TokenEngine, ProviderChanges), TlsError> {
        let routed: BTreeSet<String> = config.routes.iter().filter_map(|r| r.provider.clone()).collect();
        // One connection for the providers this build makes (kept providers keep theirs).
        let shared =
            config.state.shared.as_ref().map(|settings| Arc::new(shared::SharedStore::new(settings, metrics.store())));
        let mut changes = ProviderChanges::default();
        let mut providers = BTreeMap::new();
        let mut exchanges = BTreeMap::new();
        for (name, provider) in &config.providers {
            if let Some(settings) = provider.exchange.as_ref().filter(|e| e.subject == SubjectSource::Request) {
                let kept = old
                    .and_then(|old| old.exchanges.get(name))
                    .filter(|(config, _)| config == provider)
                    .map(|(_, cache)| Arc::clone(cache));
                let cache = match kept {
                    Some(cache) => {
                        changes.kept.push(name.clone());
                        cache
                    }
                    None => {
                        changes.started.push(name.clone());
                        let fetcher =
                            Arc::new(GrantFetcher::new(provider.clone(), StateStore::new(&config.state.dir))?);
                        if let (Some(store), Some(budget)) = (&shared, fetcher.idp().budget()) {
                            budget.share(Arc::clone(store), store.budget_key(provider));
                        }
                        exchange::ExchangeCache::new(
                            provider,
                            settings,
                            fetcher,
                            metrics.provider(name),
                            metrics.exchange(name),
                        )
                    }
                };
                exchanges.insert(name.clone(), (provider.clone(), cache));
                continue;
            }
            let same = old
                .filter(|old| old.state_dir == config.state.dir && old.shared_settings == config.state.shared)
                .and_then(|old| old.providers.get(name))
                .filter(|p| p.config == *provider);
            if let Some(kept) = same {
                providers.insert(name.clone(), Arc::clone(kept));
                changes.kept.push(name.clone());
                continue;
            }
            let limits = RefreshLimits {
                unauthorized_interval: provider.unauthorized_refresh_interval,
                manual_interval: provider.manual_refresh_interval,
            };
            let slot = TokenSlot::new(name, metrics.provider(name), provider.timeout)
                .with_limits(limits)
                .waiting_during_refresh(provider.during_refresh == DuringRefresh::Wait);
            let slot = Arc::new(slot);
            let timing = Timing {
                refresh_at: provider.refresh_at,
                expiry_skew: provider.expiry_skew,
                min_interval: provider.min_refresh_interval,
            };
            let store = StateStore::new(&config.state.dir);
            let grant = GrantFetcher::new(provider.clone(), store)?;
            let (_, fetcher, store_health) = through_store(grant, shared.as_ref(), provider, &metrics.store());
            let (stop, _) = watch::channel(false);
            let entry = Provider {
                config: provider.clone(),
                slot,
                fetcher,
                timing,
                stop,
                started: AtomicBool::new(false),
                task: Mutex::new(None),
                // The baseline is what the config load read, so a change right after startup is not missed.
                secret_files: Mutex::new(Some(secret_file_fingerprints(provider))),
                store_health,
            };
            providers.insert(name.clone(), Arc::new(entry));
            changes.started.push(name.clone());
        }
        if let Some(old) = old {
            changes.removed = old
                .providers
                .keys()
                .chain(old.exchanges.keys())
                .filter(|n| !providers.contains_key(*n) && !exchanges.contains_key(*n))
                .cloned()
                .collect();
        }
        let engine = TokenEngine {
            providers,
            exchanges,
            routed,
            state_dir: config.state.dir.clone(),
            shared_settings: config.state.shared.clone(),
        };
        Ok((engine, changes))
    }

    /// Starts the refresher of every provider not running yet; routed providers fetch their first token at once,
    /// and a kept provider that a route now uses gets one if it has none.
    pub fn spawn(&self) {
        self.spawn_traced(None);
    }

    /// [`TokenEngine::spawn`], the token calls no request asked for traced as root spans of `telemetry`.
    pub fn spawn_traced(&self, telemetry: Option<&Arc<crate::telemetry::Telemetry>>) {
        for (name, p) in &self.providers {
            let routed = self.routed.contains(name);
            if p.started.swap(true, Ordering::SeqCst) {
                if routed && p.slot.latest().is_none() {
                    p.slot.request_refresh();
                }
                continue;
            }
            let sink = p.config.sink_file.as_ref().map(|path| sink::Sink::new(name, path, p.config.sink_format));
            // A provider whose token is written to a file is fetched at startup even without a route.
            let eager = routed || sink.is_some();
            let scheduler = RefreshScheduler::new(Arc::clone(&p.slot), Arc::clone(&p.fetcher), p.timing, eager)
                .with_sink(sink)
                .with_telemetry(telemetry.cloned());
            let task = tokio::spawn(scheduler.run(Shutdown::new(p.stop.subscribe())));
            *p.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        }
    }

    /// Stops every refresher, letting a token call in flight finish (and store a rotated refresh token): at most
    /// the longest provider `timeout`, plus a second for the store.
    pub async fn shutdown(&self) {
        let mut tasks = Vec::new();
        let mut longest = std::time::Duration::ZERO;
        for p in self.providers.values() {
            p.stop.send_replace(true);
            longest = longest.max(p.config.timeout);
            tasks.extend(p.task.lock().unwrap_or_else(|e| e.into_inner()).take());
        }
        let all = futures_util::future::join_all(tasks);
        if tokio::time::timeout(longest + std::time::Duration::from_secs(1), all).await.is_err() {
            tracing::warn!("a token call was still in flight at shutdown");
        }
    }

    /// The slot of provider `name`.
    pub fn slot(&self, name: &str) -> Option<Arc<TokenSlot>> {
        self.providers.get(name).map(|p| Arc::clone(&p.slot))
    }

    /// The slot of provider `name` if its token may be handed out (`vend = true`).
    pub fn vendable(&self, name: &str) -> Option<Arc<TokenSlot>> {
        self.providers.get(name).filter(|p| p.config.vend).map(|p| Arc::clone(&p.slot))
    }

    /// How routes naming provider `name` get their tokens.
    pub fn binding(&self, name: &str) -> Option<TokenBinding> {
        if let Some((_, cache)) = self.exchanges.get(name) {
            return Some(TokenBinding::PerCaller(Arc::clone(cache)));
        }
        self.slot(name).map(|slot| TokenBinding::Shared(slot as Arc<dyn TokenSource>))
    }

    /// The providers that exchange each caller's token: name, cache, and whether a route uses it.
    pub fn exchanges(&self) -> impl Iterator<Item = (&str, &Arc<exchange::ExchangeCache>, bool)> {
        self.exchanges.iter().map(|(name, (_, cache))| (name.as_str(), cache, self.routed.contains(name)))
    }

    /// How provider `name`'s last use of the shared store went (`None`: it does not use one).
    pub fn store_health(&self, name: &str) -> Option<&shared::StoreHealth> {
        self.providers.get(name).and_then(|p| p.store_health.as_deref())
    }

    /// Every provider: name, slot, and whether a route uses it.
    pub fn providers(&self) -> impl Iterator<Item = (&str, &Arc<TokenSlot>, bool)> {
        self.providers.iter().map(|(name, p)| (name.as_str(), &p.slot, self.routed.contains(name)))
    }

    /// Re-reads every `*_file` secret and refreshes at once the providers whose secret files changed (a rotated
    /// Kubernetes Secret), even during a backoff: a new secret is the likely fix of an `invalid_client`.
    /// Returns the providers refreshed.
    pub fn check_secret_files(&self) -> Vec<String> {
        let mut changed = Vec::new();
        for (name, p) in &self.providers {
            let now = secret_file_fingerprints(&p.config);
            let mut last = p.secret_files.lock().unwrap_or_else(|e| e.into_inner());
            match last.as_ref() {
                Some(before) if *before != now => {
                    tracing::info!(provider = %name, "a secret file changed: refreshing the token");
                    p.slot.request_refresh();
                    changed.push(name.clone());
                }
                _ => {}
            }
            *last = Some(now);
        }
        changed
    }
}

/// SHA-256 of each `*_file` secret of a provider ("-" when unreadable), in a fixed order.
fn secret_file_fingerprints(provider: &ProviderConfig) -> Vec<String> {
    [&provider.client_secret, &provider.password, &provider.refresh_token]
        .into_iter()
        .flatten()
        .filter(|source| matches!(source, SecretSource::File(_)))
        .map(|source| source.read().map_or_else(|_| "-".to_owned(), |secret| store::sha256_hex(secret.expose())))
        .collect()
}

/// Checks the secret files of the current engine every `period` until `shutdown`.
pub async fn watch_secret_files(
    engine: Arc<arc_swap::ArcSwap<TokenEngine>>,
    period: std::time::Duration,
    mut shutdown: Shutdown,
) {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.recv() => return,
            _ = ticks.tick() => {
                let engine = engine.load_full();
                // Reading a few small files: off the async threads.
                let _ = tokio::task::spawn_blocking(move || engine.check_secret_files()).await;
            }
        }
    }
}
