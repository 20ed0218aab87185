//! The refresher: one background task per provider that makes every token call of that provider.
//!
//! Because one task owns all calls, single flight holds by construction: proactive, expired, 401 and manual
//! refreshes are all requests to this task, and at most one call is in flight at a time. The task sleeps until the
//! earlier of the scheduled refresh and a demand (a `Notify`), like mini-redis's expiry purger.
//!
//! Timing follows docs/configuration.md "Token timing": a token of lifetime L is usable until L − S with S = min(expiry_skew, L/4),
//! and its refresh is scheduled at min(refresh_at × L, L − S) minus a random jitter of up to 10 % of L. Failed calls
//! back off exponentially with jitter; permanent errors (the IdP refused the client or the grant) back off in minutes.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio::time::Instant;

use super::response::{TokenError, TokenResponse};
use super::slot::{lock, Token, TokenSlot};
use crate::metrics::RefreshReason;
use crate::shutdown::Shutdown;

/// Timing knobs of one provider, from its config.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Fraction of the lifetime at which the proactive refresh is due.
    pub refresh_at: f64,
    /// Never send a token this close to its expiry (capped at a quarter of its lifetime).
    pub expiry_skew: Duration,
    /// Token calls of the slot never follow each other closer than this (`min_refresh_interval`), whatever the IdP
    /// answers and whoever asks.
    pub min_interval: Duration,
}

/// When a fresh token stops being usable, and when its background refresh should start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Offset from issue time after which the token is never sent.
    pub usable_for: Duration,
    /// Offset from issue time at which the background refresh starts.
    pub refresh_after: Duration,
}

/// The most a refresh is moved ahead of the end of the token's usable window (see [`Timing::schedule`]).
const MAX_LEAD: Duration = Duration::from_secs(5);

/// Refreshes never follow each other closer than this, whatever the IdP says of lifetimes.
const MIN_REFRESH_DELAY: Duration = Duration::from_millis(100);

impl Timing {
    /// The schedule of a token of `lifetime`, with `jitter` in `[0, 1)` as the fraction of the 10 % window to subtract.
    pub fn schedule(&self, lifetime: Duration, jitter: f64) -> Schedule {
        let skew = self.expiry_skew.min(lifetime / 4);
        let usable_for = lifetime - skew;
        // Start early enough that the call can finish while the old token is still usable, even with no jitter:
        // a lead of 5 % of the lifetime, at most 5 s.
        let lead = (lifetime / 20).min(MAX_LEAD);
        let planned = lifetime.mul_f64(self.refresh_at).min(usable_for.saturating_sub(lead));
        let jitter = lifetime.mul_f64(0.1 * jitter.clamp(0.0, 1.0));
        let refresh_after = planned.saturating_sub(jitter).max(MIN_REFRESH_DELAY.min(usable_for));
        Schedule { usable_for, refresh_after }
    }
}

/// Exponential backoff with jitter between failed token calls.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
}

/// First transient retry is within this.
const TRANSIENT_BASE: Duration = Duration::from_secs(1);
/// Permanent errors are retried no sooner than this.
const PERMANENT_BASE: Duration = Duration::from_secs(60);
/// No backoff is longer than this (unless the IdP's `Retry-After` asks for it).
const BACKOFF_CAP: Duration = Duration::from_secs(300);
/// A `Retry-After` longer than this is taken as this.
const RETRY_AFTER_CAP: Duration = Duration::from_secs(3600);

impl Backoff {
    /// The delay before the next call after `error`; `random` in `[0, 1)`. `usable_for`: how long the token in
    /// use stays usable, if there is one. A transient error's retry then comes within half of that, so an outage
    /// that ends before the token runs out is always noticed in time (the retries grow denser as the end nears,
    /// never closer than [`MIN_REFRESH_DELAY`]); an IdP's own `Retry-After` is still honoured.
    pub fn next_delay(&mut self, error: &TokenError, random: f64, usable_for: Option<Duration>) -> Duration {
        let exp = 2u32.saturating_pow(self.failures.min(16));
        self.failures = self.failures.saturating_add(1);
        let delay = if error.is_permanent() {
            // "Back off to minutes": between half and all of min(cap, 60 s × 2^n).
            let ceiling = PERMANENT_BASE.saturating_mul(exp).min(BACKOFF_CAP);
            ceiling.mul_f64(0.5 + 0.5 * random)
        } else {
            // Full jitter: uniform in [0, min(cap, 1 s × 2^n)].
            let delay = TRANSIENT_BASE.saturating_mul(exp).min(BACKOFF_CAP).mul_f64(random);
            usable_for.map_or(delay, |left| delay.min(left / 2))
        };
        let delay = delay.max(MIN_REFRESH_DELAY);
        match error.retry_after() {
            Some(after) => delay.max(after.min(RETRY_AFTER_CAP)),
            None => delay,
        }
    }

    /// Forgets past failures after a success.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// The background task that makes every token call of one provider.
pub struct RefreshScheduler {
    slot: Arc<TokenSlot>,
    idp: Arc<dyn TokenFetcher>,
    timing: Timing,
    /// Fetch at startup, without waiting for a request.
    eager: bool,
    /// Where each new token is also written (`sink_file`), if anywhere.
    sink: Option<super::sink::Sink>,
    /// Traces: a call no request asked for is a root span.
    telemetry: Option<Arc<crate::telemetry::Telemetry>>,
}

/// Something that can make one token call (the IdP client; a fake in tests).
pub trait TokenFetcher: Send + Sync + 'static {
    /// Makes one token call.
    fn fetch(&self) -> futures_util::future::BoxFuture<'_, Result<TokenResponse, TokenError>>;

    /// A token to replace `current` (the one the slot holds, if any: due for refresh, refused or expired). A fetcher
    /// that shares tokens between replicas may answer with a newer shared one instead of calling; others call.
    fn fetch_after(
        &self,
        current: Option<Arc<super::slot::Token>>,
    ) -> futures_util::future::BoxFuture<'_, Result<TokenResponse, TokenError>> {
        drop(current);
        self.fetch()
    }

    /// After a token another replica obtained was taken from the shared store: bring what this fetcher keeps of its
    /// own (a refresh-token session's local copy) in step. Nothing by default.
    fn sync_shared(&self) -> futures_util::future::BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

impl RefreshScheduler {
    /// A scheduler for `slot`; `eager` fetches the first token at once.
    pub fn new(slot: Arc<TokenSlot>, idp: Arc<dyn TokenFetcher>, timing: Timing, eager: bool) -> Self {
        RefreshScheduler { slot, idp, timing, eager, sink: None, telemetry: None }
    }

    /// Also writes each new token to `sink`.
    pub fn with_sink(mut self, sink: Option<super::sink::Sink>) -> Self {
        self.sink = sink;
        self
    }

    /// Traces token calls no request asked for as root spans.
    pub fn with_telemetry(mut self, telemetry: Option<Arc<crate::telemetry::Telemetry>>) -> Self {
        self.telemetry = telemetry;
        self
    }

    /// Runs until `shutdown` is given (a `watch::Receiver<bool>` turns true, or its sender is dropped).
    pub async fn run(self, shutdown: impl Into<Shutdown>) {
        let mut shutdown = shutdown.into();
        let slot = &self.slot;
        let mut backoff = Backoff::default();
        // When the next scheduled call is due; `None` = only on demand.
        let mut next_at = self.eager.then(Instant::now);
        let mut ever_had_token = false;
        // When the last call was sent: the next one waits for `min_refresh_interval` after it.
        let mut last_call: Option<Instant> = None;
        loop {
            let sleep = async {
                match next_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let (reason, parent) = tokio::select! {
                biased;
                () = shutdown.recv() => return,
                () = slot.wake.notified() => match self.take_demand() {
                    Some(asked) => asked,
                    None => continue,
                },
                () = sleep => (self.scheduled_reason(ever_had_token), None),
            };
            // The floor, for every call whatever asked for it: an IdP answering tiny lifetimes (or a flood of
            // demands) makes at most one call per `min_refresh_interval`.
            if let Some(earliest) = last_call.map(|last| last + self.timing.min_interval) {
                if Instant::now() < earliest {
                    tokio::select! {
                        biased;
                        () = shutdown.recv() => return,
                        () = tokio::time::sleep_until(earliest) => {}
                    }
                }
            }
            last_call = Some(Instant::now());
            slot.metrics.refreshes(reason).inc();
            {
                // This call answers every demand made so far; demands made while it is in flight stay for the next
                // turn (a secret that changed during the call must not be forgotten).
                let mut status = lock(&slot.status);
                status.in_flight = true;
                *lock(&slot.demand) = Default::default();
            }
            // For IdPs that revoke the old access token when its refresh token is redeemed: from the moment the call
            // is sent, requests wait for the new token rather than send the old one.
            // (A token already held back by an earlier call whose outcome is unknown stays so.)
            let held_back = slot.latest().filter(|t| slot.wait_during_refresh && !t.is_suspended());
            if let Some(token) = &held_back {
                token.suspend();
            }
            let started_instant = Instant::now();
            let started_wall = SystemTime::now();
            // A call a traced request asked for is a span of its trace, and its HTTP request carries the span's
            // traceparent.
            let span = match (&parent, &self.telemetry) {
                (Some(parent), _) => Some(parent.token_call(&slot.name, reason.as_str())),
                (None, Some(telemetry)) => telemetry.background_token_call(&slot.name, reason.as_str()),
                (None, None) => None,
            };
            *lock(&slot.call_span) = span.as_ref().map(crate::telemetry::ChildSpan::link);
            let call = self.idp.fetch_after(slot.latest());
            let result = crate::telemetry::within_token_call(span, "token_call", call).await;
            *lock(&slot.call_span) = None;
            if let (Some(token), Err(error)) = (&held_back, &result) {
                // Nothing reached the token endpoint, or the IdP refused: the old token is as good as before (an IdP
                // outage does not stop a usable token). If the outcome is not known, it may be revoked: it stays
                // held back until a call succeeds.
                if !error.may_have_rotated() {
                    token.resume();
                }
            }
            // A call the budget refused was not made: it is not an IdP call to time or count as one.
            let budget_refused = matches!(result, Err(TokenError::BudgetExhausted { .. }));
            if !budget_refused {
                slot.metrics.token_duration.observe(started_instant.elapsed().as_secs_f64());
            }
            let mut random = rand::rng();
            match result {
                Ok(response) => {
                    slot.metrics.token_success.inc();
                    backoff.reset();
                    ever_had_token = true;
                    if response.lifetime < self.timing.min_interval {
                        tracing::warn!(
                            provider = %slot.name,
                            lifetime_ms = response.lifetime.as_millis() as u64,
                            min_refresh_interval_ms = self.timing.min_interval.as_millis() as u64,
                            "the IdP answered a token that lives shorter than min_refresh_interval: it is refreshed \
                             once per interval and requests may find none usable meanwhile; check the IdP's expires_in"
                        );
                    }
                    let mut schedule = self.timing.schedule(response.lifetime, random.random());
                    if let Some(rt_lifetime) = response.refresh_token_lifetime {
                        // Refresh before the refresh token itself expires (idle sessions of Keycloak and others).
                        schedule.refresh_after =
                            schedule.refresh_after.min(rt_lifetime.mul_f64(self.timing.refresh_at));
                    }
                    let generation = slot.latest_generation() + 1;
                    let mut token = Token::new(
                        response.access_token,
                        generation,
                        started_instant + schedule.usable_for,
                        started_wall + response.lifetime,
                        SystemTime::now(),
                    )
                    .bound_to(response.dpop);
                    token.refresh_token_expires_at = response.refresh_token_lifetime.map(|l| started_wall + l);
                    token.shared = response.shared;
                    if let Some(sink) = &self.sink {
                        sink.write(&token);
                    }
                    slot.install(token);
                    next_at = Some(started_instant + schedule.refresh_after);
                    tracing::info!(
                        provider = %slot.name,
                        generation,
                        lifetime_s = response.lifetime.as_secs(),
                        refresh_in_s = schedule.refresh_after.as_secs(),
                        reason = reason.as_str(),
                        shared = response.shared,
                        "token refreshed"
                    );
                    let mut status = lock(&slot.status);
                    status.in_flight = false;
                    status.last_error = None;
                    status.permanent_failure = false;
                    slot.metrics.permanent_failure.set(0);
                    status.backoff_until = None;
                    status.budget_exhausted = false;
                    status.last_refresh = Some(SystemTime::now());
                    status.refreshes += 1;
                }
                Err(error) => {
                    if budget_refused {
                        slot.metrics.budget_exhausted.inc();
                    } else {
                        slot.metrics.token_error.inc();
                    }
                    // The token requests are using now (one held back during a rotation is not theirs to use).
                    let usable_for =
                        slot.current().map(|token| token.usable_until.saturating_duration_since(Instant::now()));
                    let delay = backoff.next_delay(&error, random.random(), usable_for);
                    let retry_at = Instant::now() + delay;
                    next_at = Some(retry_at);
                    tracing::warn!(
                        provider = %slot.name,
                        reason = reason.as_str(),
                        permanent = error.is_permanent(),
                        retry_in_ms = delay.as_millis() as u64,
                        "token call failed: {error}"
                    );
                    let mut status = lock(&slot.status);
                    status.in_flight = false;
                    status.last_error = Some(error.to_string());
                    status.permanent_failure = error.is_permanent();
                    slot.metrics.permanent_failure.set(i64::from(error.is_permanent()));
                    status.backoff_until = Some(retry_at);
                    status.budget_exhausted = budget_refused;
                }
            }
            slot.attempts.send_modify(|n| *n += 1);
        }
    }

    /// The reason for a demand that still needs a call (and the trace of the request that asked first), clearing
    /// it; `None` if nothing is needed now.
    fn take_demand(&self) -> Option<(RefreshReason, Option<crate::telemetry::TraceHandle>)> {
        let slot = &self.slot;
        let status = lock(&slot.status);
        let mut demand = lock(&slot.demand);
        let mut taken = std::mem::take(&mut *demand);
        let parent = taken.parent.take();
        self.demand_reason(&status, &taken).map(|reason| (reason, parent))
    }

    fn demand_reason(&self, status: &super::slot::SlotStatus, taken: &super::slot::Demand) -> Option<RefreshReason> {
        let slot = &self.slot;
        if taken.manual {
            return Some(RefreshReason::Manual);
        }
        // During a backoff only the admin may force a call; requests fail fast instead.
        if status.backoff_until.is_some_and(|until| until > Instant::now()) {
            return None;
        }
        let current = slot.current();
        if let Some(generation) = taken.unauthorized {
            if current.as_ref().is_none_or(|t| t.generation <= generation) {
                return Some(RefreshReason::Unauthorized);
            }
        }
        if taken.expired && current.is_none() {
            return Some(RefreshReason::Expired);
        }
        None
    }

    fn scheduled_reason(&self, ever_had_token: bool) -> RefreshReason {
        if self.slot.current().is_some() {
            RefreshReason::Proactive
        } else if ever_had_token {
            RefreshReason::Expired
        } else {
            RefreshReason::Startup
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(refresh_at: f64, skew: u64) -> Timing {
        Timing { refresh_at, expiry_skew: Duration::from_secs(skew), min_interval: Duration::from_secs(1) }
    }

    #[test]
    fn schedule_refreshes_at_fraction_minus_jitter() {
        let s = timing(0.75, 30).schedule(Duration::from_secs(3600), 0.0);
        assert_eq!(s.usable_for, Duration::from_secs(3570));
        assert_eq!(s.refresh_after, Duration::from_secs(2700));
        let s = timing(0.75, 30).schedule(Duration::from_secs(3600), 0.999_999);
        assert!(s.refresh_after > Duration::from_secs(2340) && s.refresh_after <= Duration::from_secs(2341));
    }

    #[test]
    fn schedule_never_refreshes_after_usable_window() {
        // refresh_at = 1.0 would be at expiry: capped at L − S, minus the lead that leaves time for the call.
        let s = timing(1.0, 30).schedule(Duration::from_secs(300), 0.0);
        assert_eq!(s.usable_for, Duration::from_secs(270));
        assert_eq!(s.refresh_after, Duration::from_secs(265));
        // Short tokens: the skew is capped at a quarter of the lifetime.
        let s = timing(0.9, 30).schedule(Duration::from_secs(8), 0.5);
        assert_eq!(s.usable_for, Duration::from_secs(6));
        assert!(s.refresh_after < s.usable_for);
        for jitter in [0.0, 0.3, 0.99] {
            for lifetime in [1, 2, 5, 30, 60, 600, 86_400] {
                let s = timing(0.75, 30).schedule(Duration::from_secs(lifetime), jitter);
                assert!(s.refresh_after < s.usable_for, "lifetime {lifetime} jitter {jitter}: {s:?}");
                assert!(s.usable_for < Duration::from_secs(lifetime));
            }
        }
    }

    #[test]
    fn transient_backoff_grows_with_full_jitter_up_to_cap() {
        let err = TokenError::Timeout(Duration::from_secs(10));
        let mut b = Backoff::default();
        let ceilings: Vec<Duration> = (0..12).map(|_| b.next_delay(&err, 0.999_999, None)).collect();
        assert!(ceilings[0] <= Duration::from_secs(1));
        assert!(ceilings[3] > Duration::from_secs(7) && ceilings[3] <= Duration::from_secs(8));
        assert!(ceilings[11] <= BACKOFF_CAP && ceilings[11] > Duration::from_secs(299));
        let mut b = Backoff::default();
        assert_eq!(b.next_delay(&err, 0.0, None), MIN_REFRESH_DELAY);
        b.reset();
        assert!(b.next_delay(&err, 0.5, None) <= Duration::from_millis(500));
    }

    #[test]
    fn permanent_errors_back_off_in_minutes() {
        let err = TokenError::Rejected { status: 401, error: "invalid_client".into(), description: None };
        let mut b = Backoff::default();
        for _ in 0..10 {
            let d = b.next_delay(&err, 0.0, None);
            assert!(d >= Duration::from_secs(30), "{d:?}");
            assert!(d <= BACKOFF_CAP);
        }
    }

    #[test]
    fn a_transient_retry_comes_within_half_the_time_the_token_stays_usable() {
        let err = TokenError::Connect("connection refused".into());
        let mut b = Backoff::default();
        // Far from the end: the backoff grows as without a token.
        for _ in 0..12 {
            b.next_delay(&err, 0.999_999, Some(Duration::from_secs(3600)));
        }
        assert!(b.next_delay(&err, 0.999_999, Some(Duration::from_secs(3600))) > Duration::from_secs(299));
        // Near it: within half the time left, however many failures came before, and never busier than the floor.
        for left in [100, 10, 1] {
            let d = b.next_delay(&err, 0.999_999, Some(Duration::from_secs(left)));
            assert_eq!(d, Duration::from_secs(left) / 2, "{left} s left");
        }
        assert_eq!(b.next_delay(&err, 0.999_999, Some(Duration::from_millis(50))), MIN_REFRESH_DELAY);
        // A permanent error is not hurried (its cause needs a person), nor is an IdP's Retry-After.
        let permanent = TokenError::Rejected { status: 401, error: "invalid_client".into(), description: None };
        assert!(b.next_delay(&permanent, 0.0, Some(Duration::from_secs(10))) >= Duration::from_secs(30));
        let busy = TokenError::Status { status: 429, retry_after: Some(Duration::from_secs(42)) };
        assert_eq!(b.next_delay(&busy, 0.1, Some(Duration::from_secs(10))), Duration::from_secs(42));
    }

    #[test]
    fn retry_after_is_honoured() {
        let err = TokenError::Status { status: 429, retry_after: Some(Duration::from_secs(42)) };
        let mut b = Backoff::default();
        assert_eq!(b.next_delay(&err, 0.1, None), Duration::from_secs(42));
    }
}
