//! Tokens per caller: `grant = "token_exchange"` with `subject_token_source = "request"` (docs/token-exchange.md).
//!
//! Each caller's bearer token (the subject) is exchanged at the IdP for a token the upstream accepts. Exchanged tokens
//! live in a bounded cache keyed by the SHA-256 of the subject (never the subject itself), each entry expiring when
//! its token stops being usable — and never after the subject's own `exp` when the subject is a JWT. At most
//! `max_subjects` callers are kept, the least recently used evicted first, so a new caller is always admitted.
//!
//! One exchange per subject at a time: concurrent requests of one caller wait for the same exchange, which runs in a
//! task of its own, so a caller that goes away neither cancels it nor causes a second one; different callers never
//! wait on each other. A subject the IdP refused is remembered (by hash) for `refused_subject_ttl` and answered
//! without an IdP call; a 401 from the upstream to a caller's token makes at most one new exchange for that caller per
//! `unauthorized_refresh_interval`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use http::HeaderValue;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::grant::GrantFetcher;
use super::refresh::Timing;
use super::response::TokenError;
use super::slot::{lock, SubjectRefusal, Token, TokenUnavailable};
use super::subject::{SubjectCheck, SubjectValidator};
use super::TokenSource;
use crate::config::{ExchangeConfig, ProviderConfig};
use crate::metrics::{ExchangeMetrics, ProviderMetrics};

/// The SHA-256 of a subject token: the only form in which it is kept.
pub type SubjectKey = [u8; 32];

type Exchange = Shared<BoxFuture<'static, Result<Arc<Token>, TokenUnavailable>>>;

/// The exchanged tokens of one provider, per caller.
pub struct ExchangeCache {
    name: Arc<str>,
    fetcher: Arc<GrantFetcher>,
    timing: Timing,
    timeout: Duration,
    unauthorized_interval: Duration,
    tokens: moka::sync::Cache<SubjectKey, Arc<Token>, KeyHasher>,
    /// Subjects the IdP refused, with why.
    refused: moka::sync::Cache<SubjectKey, SubjectRefusal, KeyHasher>,
    /// A subject was ever refused: until then, a cache hit does not look in `refused`.
    any_refused: AtomicBool,
    /// The verdict on the last refusal of a caller's exchanged token by an upstream (`/tokens`).
    last_refusal: std::sync::Mutex<Option<crate::token::refusal::Verdict>>,
    /// Subjects whose token an upstream refused lately: no second exchange for them inside the interval.
    forced: moka::sync::Cache<SubjectKey, (), KeyHasher>,
    inflight: Mutex<HashMap<SubjectKey, Exchange>>,
    /// What new subjects may cost the IdP: checked before any exchange of a subject not in the cache.
    budget: Budget,
    /// With `subject_issuer`: subjects are checked as that issuer's JWTs before any exchange.
    validator: Option<SubjectValidator>,
    generation: AtomicU64,
    /// Whether the token endpoint answered at the last exchange (readiness).
    reachable: AtomicBool,
    metrics: ProviderMetrics,
    cache_metrics: ExchangeMetrics,
}

/// Entries expire when their token stops being usable (moka's clock is its own: hits are checked again on read).
struct UsableUntil;

impl moka::Expiry<SubjectKey, Arc<Token>> for UsableUntil {
    fn expire_after_create(&self, _key: &SubjectKey, token: &Arc<Token>, _now: std::time::Instant) -> Option<Duration> {
        Some(token.usable_until.saturating_duration_since(Instant::now()))
    }

    fn expire_after_update(
        &self,
        key: &SubjectKey,
        token: &Arc<Token>,
        now: std::time::Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, token, now)
    }
}

impl ExchangeCache {
    /// The cache of `provider` (`grant = "token_exchange"`, subject from the request).
    pub fn new(
        provider: &ProviderConfig,
        exchange: &ExchangeConfig,
        fetcher: Arc<GrantFetcher>,
        metrics: ProviderMetrics,
        cache_metrics: ExchangeMetrics,
    ) -> Arc<ExchangeCache> {
        let evicted = cache_metrics.evicted.clone();
        let tokens = moka::sync::Cache::builder()
            .max_capacity(exchange.max_subjects)
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .expire_after(UsableUntil)
            .eviction_listener(move |_key, _token, cause| {
                if cause == moka::notification::RemovalCause::Size {
                    evicted.inc();
                }
            })
            .build_with_hasher(KeyHasher::default());
        let refused = moka::sync::Cache::builder()
            .max_capacity(exchange.max_subjects)
            .time_to_live(exchange.refused_subject_ttl.max(Duration::from_millis(1)))
            .build_with_hasher(KeyHasher::default());
        let forced = moka::sync::Cache::builder()
            .max_capacity(exchange.max_subjects)
            .time_to_live(provider.unauthorized_refresh_interval.max(Duration::from_millis(1)))
            .build_with_hasher(KeyHasher::default());
        let validator = exchange.subject_issuer.as_ref().map(|issuer| {
            let audience = exchange.subject_audience.clone();
            SubjectValidator::new(issuer, audience, exchange.subject_jwks_uri.clone(), Arc::clone(fetcher.idp()))
        });
        Arc::new(ExchangeCache {
            name: Arc::from(provider.name.as_str()),
            fetcher,
            timing: Timing {
                refresh_at: provider.refresh_at,
                expiry_skew: provider.expiry_skew,
                min_interval: provider.min_refresh_interval,
            },
            timeout: provider.timeout,
            unauthorized_interval: provider.unauthorized_refresh_interval,
            tokens,
            refused,
            any_refused: AtomicBool::new(false),
            last_refusal: std::sync::Mutex::new(None),
            forced,
            inflight: Mutex::new(HashMap::new()),
            budget: Budget::new(exchange.new_subjects_per_second, exchange.max_in_flight),
            validator,
            generation: AtomicU64::new(0),
            reachable: AtomicBool::new(true),
            metrics,
            cache_metrics,
        })
    }

    /// The provider's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the token endpoint answered at the last exchange (true before the first).
    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    /// Callers with a token in the cache now.
    pub fn subjects(&self) -> u64 {
        self.tokens.run_pending_tasks();
        self.tokens.entry_count()
    }

    /// Puts `token` in the cache as the exchange of `subject` would (benches, tests).
    pub fn install(&self, subject: &str, token: Token) {
        self.tokens.insert(subject_key(subject), Arc::new(token));
    }

    /// The token source for one request whose caller sent `authorization` (`Bearer <subject>`); `None` when it is
    /// not a bearer token. The header value is kept as it is (a reference count, no copy of the subject).
    pub fn for_caller(self: &Arc<Self>, authorization: &HeaderValue) -> Option<Arc<dyn TokenSource>> {
        let key = subject_key(bearer_subject(authorization)?);
        Some(Arc::new(SubjectTokens { cache: Arc::clone(self), key, authorization: authorization.clone() }))
    }

    /// Keeps the IdP's refusal of a subject; from the first one on, cache hits look for refusals too.
    fn note_refused(&self, key: SubjectKey, refusal: SubjectRefusal) {
        self.any_refused.store(true, Ordering::Release);
        self.refused.insert(key, refusal);
    }

    /// The verdict on the last refusal of a caller's exchanged token by an upstream.
    pub fn last_refusal(&self) -> Option<crate::token::refusal::Verdict> {
        super::slot::lock(&self.last_refusal).clone()
    }

    /// The caller's usable token from the cache, if any.
    fn hit(&self, key: &SubjectKey) -> Option<Arc<Token>> {
        let token = self.tokens.get(key).filter(|token| token.is_usable(Instant::now()))?;
        self.cache_metrics.hit.inc();
        Some(token)
    }

    fn unavailable(&self, reason: String, refusal: Option<SubjectRefusal>, rate_limited: bool) -> TokenUnavailable {
        TokenUnavailable {
            provider: Arc::clone(&self.name),
            reason,
            retry_after: None,
            rate_limited,
            refusal,
            budget_exhausted: false,
        }
    }

    /// The caller's token: from the cache, or the one exchange in flight for this subject (started if none is).
    /// `rejected`: the generation an upstream refused, if that is why we ask.
    async fn obtain(
        self: &Arc<Self>,
        key: SubjectKey,
        subject: &str,
        rejected: Option<u64>,
    ) -> Result<Arc<Token>, TokenUnavailable> {
        if let Some(refusal) = self.refused.get(&key) {
            self.cache_metrics.refused.inc();
            return Err(self.unavailable(refusal_reason(refusal).into(), Some(refusal), false));
        }
        match rejected {
            None => {
                if let Some(token) = self.hit(&key) {
                    return Ok(token);
                }
            }
            Some(generation) => {
                if let Some(token) = self.tokens.get(&key).filter(|token| token.generation != generation) {
                    if token.is_usable(Instant::now()) {
                        return Ok(token); // another request of this caller got a newer one already
                    }
                }
                // The 401 budget, per caller: one forced exchange per interval.
                if !self.unauthorized_interval.is_zero() && self.forced.contains_key(&key) {
                    return Err(self.unavailable(
                        "the upstream refused this caller's token again within unauthorized_refresh_interval".into(),
                        None,
                        true,
                    ));
                }
                self.forced.insert(key, ());
                self.tokens.invalidate(&key);
            }
        }
        // A subject that is not a valid token of its issuer costs no exchange (and is remembered as refused).
        if let Some(validator) = &self.validator {
            match validator.check(subject).await {
                Ok(()) => {}
                Err(SubjectCheck::Invalid(reason)) => {
                    self.note_refused(key, SubjectRefusal::Invalid);
                    self.cache_metrics.refused.inc();
                    return Err(self.unavailable(reason, Some(SubjectRefusal::Invalid), false));
                }
                Err(SubjectCheck::Unavailable(reason)) => return Err(self.unavailable(reason, None, false)),
            }
        }
        self.cache_metrics.miss.inc();
        let exchange = {
            let mut inflight = lock(&self.inflight);
            match inflight.get(&key) {
                Some(exchange) => {
                    self.metrics.singleflight_waiters.inc();
                    exchange.clone()
                }
                None => {
                    // A subject not in the cache costs an IdP call: within the budget, or refused at once.
                    if !self.budget.admit(inflight.len(), Instant::now()) {
                        drop(inflight);
                        self.cache_metrics.throttled.inc();
                        let refusal = SubjectRefusal::Throttled;
                        return Err(self.unavailable(refusal_reason(refusal).into(), Some(refusal), false));
                    }
                    let cache = Arc::clone(self);
                    let subject: Arc<str> = Arc::from(subject);
                    // The exchange runs on its own task: it joins the trace of the request that asked for it.
                    let parent = crate::telemetry::current_request();
                    let task = tokio::spawn(async move {
                        let span = parent.as_ref().map(|parent| parent.token_exchange(&cache.name));
                        let exchanged = cache.exchange(key, &subject);
                        let result = crate::telemetry::within_token_call(span, "token_exchange", exchanged).await;
                        lock(&cache.inflight).remove(&key);
                        result
                    });
                    let name = Arc::clone(&self.name);
                    let exchange = async move {
                        task.await.unwrap_or_else(|error| {
                            Err(TokenUnavailable {
                                provider: name,
                                reason: format!("the exchange task failed: {error}"),
                                retry_after: None,
                                rate_limited: false,
                                refusal: None,
                                budget_exhausted: false,
                            })
                        })
                    }
                    .boxed()
                    .shared();
                    inflight.insert(key, exchange.clone());
                    exchange
                }
            }
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => {
                Err(self.unavailable(format!("the token exchange timed out after {:?}", self.timeout), None, false))
            }
        }
    }

    /// One exchange of `subject` at the IdP; the token (or the refusal) is cached before it is returned.
    async fn exchange(&self, key: SubjectKey, subject: &str) -> Result<Arc<Token>, TokenUnavailable> {
        let started = Instant::now();
        let started_wall = SystemTime::now();
        let result = tokio::time::timeout(self.timeout, self.fetcher.exchange(subject))
            .await
            .unwrap_or(Err(TokenError::Timeout(self.timeout)));
        self.metrics.token_duration.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(response) => {
                self.metrics.token_success.inc();
                self.reachable.store(true, Ordering::Relaxed);
                let schedule = self.timing.schedule(response.lifetime, 0.0);
                let mut usable_until = started + schedule.usable_for;
                // An exchanged token never outlives its subject.
                if let Some(left) =
                    jwt_exp(subject).map(|exp| exp.duration_since(SystemTime::now()).unwrap_or_default())
                {
                    usable_until = usable_until.min(Instant::now() + left);
                }
                let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
                let token = Arc::new(
                    Token::new(
                        response.access_token,
                        generation,
                        usable_until,
                        started_wall + response.lifetime,
                        SystemTime::now(),
                    )
                    .bound_to(response.dpop),
                );
                self.tokens.insert(key, Arc::clone(&token));
                // Evictions happen now rather than at some later write (an exchange is rare next to the hits), so
                // the bound holds and the gauge is exact.
                self.tokens.run_pending_tasks();
                self.cache_metrics.subjects.set(self.tokens.entry_count() as i64);
                tracing::debug!(provider = %self.name, generation, "exchanged a caller's token");
                Ok(token)
            }
            Err(TokenError::BudgetExhausted { limit, retry_after }) => {
                // No call was made: the provider's budget is spent until its window ends.
                self.metrics.budget_exhausted.inc();
                let error = TokenError::BudgetExhausted { limit, retry_after };
                Err(TokenUnavailable {
                    retry_after: Some(retry_after),
                    budget_exhausted: true,
                    ..self.unavailable(error.to_string(), None, false)
                })
            }
            Err(error) => {
                self.metrics.token_error.inc();
                let refusal = match &error {
                    TokenError::Rejected { error: code, .. } if code == "invalid_grant" => {
                        Some(SubjectRefusal::Invalid)
                    }
                    TokenError::Rejected { error: code, .. }
                        if ["invalid_target", "unauthorized_client", "access_denied", "invalid_scope"]
                            .contains(&code.as_str()) =>
                    {
                        Some(SubjectRefusal::Refused)
                    }
                    _ => None,
                };
                self.reachable.store(
                    !matches!(error, TokenError::Connect(_) | TokenError::Timeout(_) | TokenError::Interrupted(_)),
                    Ordering::Relaxed,
                );
                if let Some(refusal) = refusal {
                    self.note_refused(key, refusal);
                    tracing::info!(provider = %self.name, "the identity provider refused a caller's token: {error}");
                } else {
                    tracing::warn!(provider = %self.name, "token exchange failed: {error}");
                }
                Err(self.unavailable(error.to_string(), refusal, false))
            }
        }
    }
}

/// What new subjects may cost the IdP: a token bucket (`rate` per second, a burst of as many) and a bound on the
/// exchanges in flight. Callers already in the cache never reach it.
struct Budget {
    rate: f64,
    in_flight: usize,
    /// Tokens in the bucket, and when they were counted.
    bucket: Mutex<(f64, Instant)>,
}

impl Budget {
    fn new(rate: f64, in_flight: usize) -> Budget {
        Budget { rate, in_flight, bucket: Mutex::new((rate.max(1.0), Instant::now())) }
    }

    /// Whether one more exchange may start now, `in_flight` being in flight; takes a token when it may.
    fn admit(&self, in_flight: usize, now: Instant) -> bool {
        if in_flight >= self.in_flight {
            return false;
        }
        let mut bucket = lock(&self.bucket);
        let (tokens, since) = *bucket;
        let burst = self.rate.max(1.0);
        let tokens = (tokens + now.saturating_duration_since(since).as_secs_f64() * self.rate).min(burst);
        if tokens < 1.0 {
            *bucket = (tokens, now);
            return false;
        }
        *bucket = (tokens - 1.0, now);
        true
    }
}

/// What the caller is told about a refused subject (never the subject itself).
fn refusal_reason(refusal: SubjectRefusal) -> &'static str {
    match refusal {
        SubjectRefusal::Missing => "the request carries no bearer token to exchange",
        SubjectRefusal::Invalid => "the identity provider refused the caller's token (invalid_grant)",
        SubjectRefusal::Refused => "the identity provider refused the exchange for the caller's token",
        SubjectRefusal::Throttled => {
            "too many new callers to exchange just now (exchange_new_subjects_per_second, exchange_max_in_flight): \
             retry shortly"
        }
    }
}

/// The token of an `Authorization: Bearer …` value (any case of the scheme), if it is one: `Bearer`, a space, and the
/// rest without the blanks around it. (By bytes: a header value is visible ASCII, spaces and tabs.)
pub fn bearer_subject(value: &HeaderValue) -> Option<&str> {
    let value = value.to_str().ok()?;
    let (scheme, token) = (value.get(..6)?, value.get(7..)?);
    let token = token.trim_ascii();
    (value.as_bytes()[6] == b' ' && scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The hasher of the caches' keys: SHA-256 digests of callers' tokens, hashed again with a per-process random seed
/// (a caller cannot aim its subjects at one bucket), more cheaply than the standard library's SipHash.
type KeyHasher = foldhash::quality::RandomState;

/// The SHA-256 of a subject token.
pub fn subject_key(subject: &str) -> SubjectKey {
    Sha256::digest(subject.as_bytes()).into()
}

/// The `exp` of a subject that is a JWT (unverified: the IdP verifies it; this only bounds our cache).
fn jwt_exp(subject: &str) -> Option<SystemTime> {
    let mut parts = subject.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&payload).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(claims.get("exp")?.as_u64()?))
}

/// The token source of one request: its caller's tokens.
struct SubjectTokens {
    cache: Arc<ExchangeCache>,
    key: SubjectKey,
    /// The caller's `Authorization` value, `Bearer <subject>`.
    authorization: HeaderValue,
}

impl TokenSource for SubjectTokens {
    fn current(&self) -> Option<Arc<Token>> {
        if self.cache.any_refused.load(Ordering::Acquire) && self.cache.refused.contains_key(&self.key) {
            return None;
        }
        self.cache.hit(&self.key)
    }

    fn obtain(&self, rejected: Option<u64>) -> BoxFuture<'_, Result<Arc<Token>, TokenUnavailable>> {
        let subject = bearer_subject(&self.authorization).unwrap_or_default();
        Box::pin(self.cache.obtain(self.key, subject, rejected))
    }

    fn note_refusal(&self, verdict: crate::token::refusal::Verdict) {
        *super::slot::lock(&self.cache.last_refusal) = Some(verdict);
    }

    fn subject_fingerprint(&self) -> Option<String> {
        // The key is the subject's SHA-256: its first 4 bytes, as a token's fingerprint in `/tokens`.
        Some(self.key[..4].iter().map(|b| format!("{b:02x}")).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_subject_is_read_as_the_plain_definition_reads_it() {
        // The plain definition: the scheme before the first space, `bearer` in any case; the rest, trimmed, not empty.
        fn plain(value: &HeaderValue) -> Option<&str> {
            let (scheme, token) = value.to_str().ok()?.split_once(' ')?;
            let token = token.trim();
            (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
        }
        let values = [
            "Bearer abc",
            "bearer abc",
            "BEARER  abc  ",
            "Bearer\tabc",
            "Bearer",
            "Bearer ",
            "Bearer  ",
            "Bearer \t",
            "Bearerx abc",
            "Basic abc",
            "Bear abc",
            "",
            " Bearer abc",
            "Bearer a b",
            "Bearer abc\t",
            "DPoP abc",
            "Bearer é",
        ];
        for value in values {
            let Ok(header) = HeaderValue::from_bytes(value.as_bytes()) else { continue };
            assert_eq!(bearer_subject(&header), plain(&header), "{value:?}");
        }
        let opaque = HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap();
        assert_eq!(bearer_subject(&opaque), None);
    }

    #[test]
    fn a_jwt_subject_bounds_the_cache_entry_and_other_subjects_do_not() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"sub":"u","exp":2000000000}"#);
        assert_eq!(
            jwt_exp(&format!("eyJhbGciOiJSUzI1NiJ9.{payload}.c2ln")),
            Some(UNIX_EPOCH + Duration::from_secs(2_000_000_000))
        );
        assert_eq!(jwt_exp("an-opaque-token"), None);
        assert_eq!(jwt_exp("a.b.c"), None);
        assert_ne!(subject_key("a"), subject_key("b"));
    }
}
