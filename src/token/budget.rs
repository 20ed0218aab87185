//! `max_token_calls`: a ceiling on a provider's calls to its token endpoint, whatever happens (docs/configuration.md,
//! "The token budget"). IdPs such as Auth0 meter tokens per client: one bug or one attack must not spend the month's
//! quota.
//!
//! Calls are counted in clock-aligned windows (`600/h`: from each full hour to the next), every call to the token
//! endpoint (startup, proactive, forced, after a 401, an exchange). With a shared store the count is the fleet's
//! (Redis `INCR` of one key per window, which expires after it); when the store fails, each replica counts its own
//! calls against the whole budget and says so once. A call beyond the budget is not made: the caller gets
//! [`TokenError::BudgetExhausted`] with the time to the window's end.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::response::TokenError;
use super::shared::SharedStore;

/// The budget of one provider.
pub struct CallBudget {
    limit: u64,
    window: Duration,
    /// As configured (`600/h`), for messages.
    text: String,
    /// The window this replica counted in, and its count.
    local: Mutex<(u64, u64)>,
    /// With a shared store: where the fleet counts, and the key prefix of this provider's windows.
    shared: OnceLock<(Arc<SharedStore>, String)>,
    /// The store failed and this replica counts alone (warned once).
    alone: std::sync::atomic::AtomicBool,
}

impl CallBudget {
    /// `limit` calls per `window`; `text` is the setting as written.
    pub fn new(limit: u64, window: Duration, text: &str) -> CallBudget {
        CallBudget {
            limit,
            window: window.max(Duration::from_secs(1)),
            text: text.to_owned(),
            local: Mutex::new((0, 0)),
            shared: OnceLock::new(),
            alone: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Counts the fleet's calls in `store`, under keys starting with `key`.
    pub fn share(&self, store: Arc<SharedStore>, key: String) {
        let _ = self.shared.set((store, key));
    }

    /// Takes one call from the budget, or says until when there is none.
    pub async fn take(&self) -> Result<(), TokenError> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let window = self.window.as_secs();
        let index = now.as_secs() / window;
        let left = Duration::from_secs((index + 1) * window).saturating_sub(now);
        let count = match self.shared.get() {
            Some((store, key)) => match store.count_call(&format!("{key}:{index}"), window * 2).await {
                Ok(count) => {
                    self.alone.store(false, std::sync::atomic::Ordering::Relaxed);
                    count
                }
                Err(error) => {
                    if !self.alone.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        tracing::warn!(
                            "max_token_calls: the shared store cannot count the fleet's calls ({error}): this replica \
                             counts its own against the whole budget until it can"
                        );
                    }
                    self.count_locally(index)
                }
            },
            None => self.count_locally(index),
        };
        if count > self.limit {
            return Err(TokenError::BudgetExhausted {
                limit: self.text.clone(),
                retry_after: left.max(Duration::from_secs(1)),
            });
        }
        Ok(())
    }

    fn count_locally(&self, index: u64) -> u64 {
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        if local.0 != index {
            *local = (index, 0);
        }
        local.1 += 1;
        local.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn calls_beyond_the_budget_are_refused_until_the_window_ends() {
        let budget = CallBudget::new(3, Duration::from_secs(3600), "3/h");
        for _ in 0..3 {
            budget.take().await.expect("within the budget");
        }
        match budget.take().await {
            Err(TokenError::BudgetExhausted { limit, retry_after }) => {
                assert_eq!(limit, "3/h");
                assert!(retry_after <= Duration::from_secs(3600) && retry_after >= Duration::from_secs(1));
            }
            other => panic!("{other:?}"),
        }
        // A new window starts a new count.
        assert_eq!(budget.count_locally(u64::MAX), 1);
    }
}
