//! The token engine: one [`TokenSlot`] and one [`RefreshScheduler`] task per provider.
//!
//! - [`cache`]: slots, generations, the hot-path read and the single-flight rendezvous;
//! - [`refresh`]: the per-provider task that makes every token call, its schedule and backoff;
//! - [`grant`]: grant types and client authentication (what a token request carries);
//! - [`idp`]: HTTP to the identity provider and lenient, safe response parsing.
//!
//! The proxy sees the engine only through [`TokenSource`], so its tests can hand it a fake.

pub mod cache;
pub mod device;
pub mod grant;
pub mod idp;
pub mod refresh;
pub mod response;
pub mod session;
pub mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use cache::{SlotStatus, Token, TokenSlot, TokenUnavailable};
pub use grant::GrantFetcher;
pub use idp::IdpClient;
pub use refresh::{RefreshScheduler, Timing, TokenFetcher};
pub use response::{TokenError, TokenResponse};
pub use store::StateStore;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::tls::TlsError;

/// What the proxy needs of a provider's tokens.
pub trait TokenSource: Send + Sync + 'static {
    /// The usable token now, if any, without waiting: the hot path.
    fn current(&self) -> Option<Arc<Token>>;
    /// Waits (single flight, bounded by the provider's timeout) for a usable token. With `rejected = Some(g)`, an
    /// upstream refused generation `g`: it is invalidated and only a newer token is returned.
    fn obtain(&self, rejected: Option<u64>) -> BoxFuture<'_, Result<Arc<Token>, TokenUnavailable>>;
}

impl TokenSource for TokenSlot {
    #[inline]
    fn current(&self) -> Option<Arc<Token>> {
        TokenSlot::current(self)
    }

    fn obtain(&self, rejected: Option<u64>) -> BoxFuture<'_, Result<Arc<Token>, TokenUnavailable>> {
        Box::pin(TokenSlot::obtain(self, rejected))
    }
}

/// One provider of the engine.
struct Provider {
    slot: Arc<TokenSlot>,
    fetcher: Arc<dyn TokenFetcher>,
    timing: Timing,
    /// A route uses it: fetch at startup and count it for readiness.
    routed: bool,
}

/// Every provider's slot and refresher.
pub struct TokenEngine {
    providers: BTreeMap<String, Provider>,
}

impl TokenEngine {
    /// Builds a slot and an IdP client for every provider of `config`.
    pub fn new(config: &Config, metrics: &Metrics) -> Result<TokenEngine, TlsError> {
        let routed: BTreeSet<&str> = config.routes.iter().filter_map(|r| r.provider.as_deref()).collect();
        let mut providers = BTreeMap::new();
        for (name, provider) in &config.providers {
            let slot = Arc::new(TokenSlot::new(name, metrics.provider(name), provider.timeout));
            let timing = Timing { refresh_at: provider.refresh_at, expiry_skew: provider.expiry_skew };
            let store = StateStore::new(&config.state.dir);
            let fetcher: Arc<dyn TokenFetcher> = Arc::new(GrantFetcher::new(provider.clone(), store)?);
            providers.insert(name.clone(), Provider { slot, fetcher, timing, routed: routed.contains(name.as_str()) });
        }
        Ok(TokenEngine { providers })
    }

    /// Starts one refresher task per provider; routed providers fetch their first token at once.
    pub fn spawn(&self, shutdown: &watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
        self.providers
            .values()
            .map(|p| {
                let scheduler = RefreshScheduler::new(Arc::clone(&p.slot), Arc::clone(&p.fetcher), p.timing, p.routed);
                tokio::spawn(scheduler.run(shutdown.clone()))
            })
            .collect()
    }

    /// The slot of provider `name`.
    pub fn slot(&self, name: &str) -> Option<Arc<TokenSlot>> {
        self.providers.get(name).map(|p| Arc::clone(&p.slot))
    }

    /// Every provider: name, slot, and whether a route uses it.
    pub fn providers(&self) -> impl Iterator<Item = (&str, &Arc<TokenSlot>, bool)> {
        self.providers.iter().map(|(name, p)| (name.as_str(), &p.slot, p.routed))
    }
}
