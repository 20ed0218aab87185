//! The Prometheus registry and typed metric handles.
//!
//! Every metric name (docs/metrics-and-alerts.md) is defined here and nowhere else. Other modules get small typed handle
//! structs ([`ProviderMetrics`], [`RouteMetrics`]) with the label values already resolved, so that recording on the
//! hot path is an atomic add rather than a label lookup.

use std::sync::{Arc, OnceLock};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Every metric tokenproxy exports (docs/metrics-and-alerts.md). A unit test keeps it equal to what the registry holds.
pub const METRIC_NAMES: &[&str] = &[
    "tokenproxy_token_requests_total",
    "tokenproxy_token_request_duration_seconds",
    "tokenproxy_token_refreshes_total",
    "tokenproxy_token_refreshes_skipped_total",
    "tokenproxy_token_expires_at_seconds",
    "tokenproxy_singleflight_waiters_total",
    "tokenproxy_refresh_wait_seconds",
    "tokenproxy_provider_permanent_failure",
    "tokenproxy_token_budget_exhausted_total",
    "tokenproxy_requests_total",
    "tokenproxy_request_duration_seconds",
    "tokenproxy_upstream_unauthorized_total",
    "tokenproxy_replays_total",
    "tokenproxy_upstream_refusals_total",
    "tokenproxy_inflight_requests",
    "tokenproxy_config_reloads_total",
    "tokenproxy_upstream_tls_reloads_total",
    "tokenproxy_exchange_cache_total",
    "tokenproxy_exchange_subjects",
    "tokenproxy_vended_tokens_total",
    "tokenproxy_misdirected_requests_total",
    "tokenproxy_open_connections",
    "tokenproxy_connections_evicted_total",
    "tokenproxy_open_tunnels",
    "tokenproxy_store_operations_total",
    "tokenproxy_store_lease_waits_total",
    "tokenproxy_store_fallbacks_total",
    "tokenproxy_store_degraded",
    "tokenproxy_build_info",
    "tokenproxy_telemetry_spans_dropped_total",
];

/// Why a token call was made (label `reason` of `tokenproxy_token_refreshes_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshReason {
    /// The first token of a provider, fetched eagerly at startup (and its retries).
    Startup,
    /// The scheduled background refresh before the token stops being usable.
    Proactive,
    /// A request found no usable token.
    Expired,
    /// An upstream answered 401 to the current token generation.
    Unauthorized,
    /// `POST /tokens/{provider}/refresh`.
    Manual,
}

impl RefreshReason {
    /// Every reason, in label order.
    pub const ALL: [RefreshReason; 5] =
        [Self::Startup, Self::Proactive, Self::Expired, Self::Unauthorized, Self::Manual];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Startup => "startup",
            Self::Proactive => "proactive",
            Self::Expired => "expired",
            Self::Unauthorized => "unauthorized",
            Self::Manual => "manual",
        }
    }
}

/// What became of a request that got a 401 from its upstream (label `outcome` of `tokenproxy_replays_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayOutcome {
    /// Replayed with a fresh token and the upstream accepted it.
    Success,
    /// Replayed with a fresh token and the upstream answered 401 again.
    StillUnauthorized,
    /// The request body could not be kept (too large or not fully read), so the 401 passed through.
    NotReplayable,
    /// The 401 came with the newest token and a 401-driven refresh was made less than the provider's
    /// `unauthorized_refresh_interval` ago: the 401 passed through, no token call was made.
    RateLimited,
}

impl ReplayOutcome {
    /// Every outcome, in label order.
    pub const ALL: [ReplayOutcome; 4] =
        [Self::Success, Self::StillUnauthorized, Self::NotReplayable, Self::RateLimited];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::StillUnauthorized => "still_unauthorized",
            Self::NotReplayable => "not_replayable",
            Self::RateLimited => "rate_limited",
        }
    }
}

/// Why an upstream refused a token, as tokenproxy explains it (label `reason` of
/// `tokenproxy_upstream_refusals_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RefusalReason {
    /// The token's `aud` does not name the audience or resource the route asked for.
    Audience,
    /// The upstream wants a scope the token lacks (`insufficient_scope`).
    Scope,
    /// The token had expired by the upstream's clock.
    Expired,
    /// The token was not valid yet by the upstream's clock (`nbf`, `iat`).
    NotYetValid,
    /// The token's `iss` is not the provider's issuer.
    Issuer,
    /// The token is bound (`cnf`) to a key or certificate the request did not prove.
    Binding,
    /// Nothing in the token or the answer explains it.
    Unknown,
}

impl RefusalReason {
    /// Every reason, in label order.
    pub const ALL: [RefusalReason; 7] =
        [Self::Audience, Self::Scope, Self::Expired, Self::NotYetValid, Self::Issuer, Self::Binding, Self::Unknown];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Audience => "audience",
            Self::Scope => "scope",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Issuer => "issuer",
            Self::Binding => "binding",
            Self::Unknown => "unknown",
        }
    }
}

/// A refresh that a limit refused (label `reason` of `tokenproxy_token_refreshes_skipped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkippedRefresh {
    /// A 401 would have caused a refresh inside `unauthorized_refresh_interval`.
    Unauthorized,
    /// `POST /tokens/{provider}/refresh` inside `manual_refresh_interval` (answered 429).
    Manual,
}

/// The process-wide registry with every tokenproxy metric.
pub struct Metrics {
    registry: Registry,
    /// Spans not exported: the queue was full, or the collector failed or did not answer in time.
    pub telemetry_spans_dropped: IntCounter,
    token_requests: IntCounterVec,
    token_request_duration: HistogramVec,
    token_refreshes: IntCounterVec,
    token_refreshes_skipped: IntCounterVec,
    token_expires_at: IntGaugeVec,
    singleflight_waiters: IntCounterVec,
    refresh_wait: HistogramVec,
    permanent_failure: IntGaugeVec,
    budget_exhausted: IntCounterVec,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    upstream_unauthorized: IntCounterVec,
    replays: IntCounterVec,
    refusals: IntCounterVec,
    inflight: IntGauge,
    config_reloads: IntCounterVec,
    upstream_tls_reloads: IntCounterVec,
    exchange_cache: IntCounterVec,
    exchange_subjects: IntGaugeVec,
    vended: IntCounterVec,
    misdirected: IntCounterVec,
    open_connections: IntGaugeVec,
    evicted: IntCounterVec,
    open_tunnels: IntGauge,
    store: StoreMetrics,
}

/// Metric handles of one listener (`proxy`, `admin`, `vending`).
#[derive(Clone)]
pub struct ListenerMetrics {
    /// Its open connections (tunnels included).
    pub open: IntGauge,
    /// Idle connections it closed to make room for a new caller at its connection limit.
    pub evicted: IntCounter,
    /// Its open tunnels (the proxy listener's upgraded connections).
    pub tunnels: Option<IntGauge>,
}

/// Metric handles of the shared store (`[state] store = "redis"`).
#[derive(Clone)]
pub struct StoreMetrics {
    operations: IntCounterVec,
    /// Token calls this replica left to another (it waited for the lease holder's token).
    pub lease_waits: IntCounter,
    /// Token calls this replica made itself because the store failed or the lease holder gave nothing in time.
    pub fallbacks: IntCounter,
    degraded: IntGaugeVec,
}

impl StoreMetrics {
    /// The counter of Redis operation `op` (get, set, lease, release, delete, decrypt) with `outcome` (ok, error).
    pub fn operation(&self, op: &str, outcome: &str) -> IntCounter {
        self.operations.with_label_values(&[op, outcome])
    }

    /// The gauge that is 1 while provider `provider`'s last use of the store failed (unavailable, or a value this
    /// replica cannot decrypt), else 0.
    pub fn degraded(&self, provider: &str) -> IntGauge {
        self.degraded.with_label_values(&[provider])
    }
}

/// Metric handles for the per-caller tokens of one token-exchange provider.
#[derive(Clone)]
pub struct ExchangeMetrics {
    /// A caller's exchanged token was in the cache and usable.
    pub hit: IntCounter,
    /// An exchange was made (or joined) for a caller.
    pub miss: IntCounter,
    /// A refused subject was answered from the negative cache, without an IdP call.
    pub refused: IntCounter,
    /// A caller's token was evicted to stay within `max_subjects`.
    pub evicted: IntCounter,
    /// A new caller was answered 429 without an exchange: the budget for new subjects was spent.
    pub throttled: IntCounter,
    /// Callers with a token in the cache.
    pub subjects: IntGauge,
}

/// Metric handles for one token provider.
#[derive(Clone)]
pub struct ProviderMetrics {
    /// IdP calls that returned a usable token.
    pub token_success: IntCounter,
    /// IdP calls that failed in any way.
    pub token_error: IntCounter,
    /// Duration of IdP calls, in seconds.
    pub token_duration: Histogram,
    refreshes: [IntCounter; 5],
    skipped: [IntCounter; 2],
    /// Unix time at which the current token expires.
    pub expires_at: IntGauge,
    /// Requests that waited on a token call already in flight.
    pub singleflight_waiters: IntCounter,
    /// How long requests waited for the token a refresh in flight brought, its token held back
    /// (`during_refresh = "wait"`).
    pub refresh_wait: Histogram,
    /// 1 while the provider's last token call failed permanently (a new login or config is needed).
    pub permanent_failure: IntGauge,
    /// Token calls not made: `max_token_calls` was spent.
    pub budget_exhausted: IntCounter,
}

impl ProviderMetrics {
    /// The refresh counter for `reason`.
    pub fn refreshes(&self, reason: RefreshReason) -> &IntCounter {
        &self.refreshes[reason as usize]
    }

    /// The counter of refreshes a limit refused, for `reason`.
    pub fn skipped(&self, reason: SkippedRefresh) -> &IntCounter {
        &self.skipped[reason as usize]
    }
}

/// Metric handles for one route.
#[derive(Clone)]
pub struct RouteMetrics {
    route: String,
    requests: IntCounterVec,
    /// `requests_total{route, status}` handles by status (100–599), resolved on first use: the hot path then adds
    /// to an atomic instead of hashing labels under a lock.
    by_status: Arc<OnceLock<Box<[OnceLock<IntCounter>]>>>,
    /// Request duration in seconds, from the request's arrival to the response head.
    pub duration: Histogram,
    /// 401s seen from the upstream.
    pub upstream_unauthorized: IntCounter,
    replays: [IntCounter; 4],
    refusals: [IntCounter; 7],
    /// Requests being served now (shared by all routes).
    pub inflight: IntGauge,
}

impl RouteMetrics {
    /// Counts one answered request with its final status.
    pub fn count_status(&self, status: http::StatusCode) {
        let table = self.by_status.get_or_init(|| (100..600).map(|_| OnceLock::new()).collect());
        match table.get(usize::from(status.as_u16()).wrapping_sub(100)) {
            Some(slot) => {
                slot.get_or_init(|| self.requests.with_label_values(&[self.route.as_str(), status.as_str()])).inc()
            }
            None => self.requests.with_label_values(&[self.route.as_str(), status.as_str()]).inc(),
        }
    }

    /// The replay counter for `outcome`.
    pub fn replays(&self, outcome: ReplayOutcome) -> &IntCounter {
        &self.replays[outcome as usize]
    }

    /// The counter of refusal verdicts giving `reason`.
    pub fn refusals(&self, reason: RefusalReason) -> &IntCounter {
        &self.refusals[reason as usize]
    }
}

/// Buckets for request and token-call durations: 0.5 ms to 30 s.
const DURATION_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

impl Metrics {
    /// Creates the registry and registers every metric, including `tokenproxy_build_info`.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition");
            registry.register(Box::new(c.clone())).expect("metric registered once");
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let opts = HistogramOpts::new(name, help).buckets(DURATION_BUCKETS.to_vec());
            let h = HistogramVec::new(opts, labels).expect("static metric definition");
            registry.register(Box::new(h.clone())).expect("metric registered once");
            h
        };
        let token_requests = counter(
            "tokenproxy_token_requests_total",
            "Calls made to an identity provider's token endpoint.",
            &["provider", "outcome"],
        );
        let token_request_duration = histogram(
            "tokenproxy_token_request_duration_seconds",
            "Duration of calls to an identity provider's token endpoint.",
            &["provider"],
        );
        let token_refreshes =
            counter("tokenproxy_token_refreshes_total", "Token refreshes started, by reason.", &["provider", "reason"]);
        let token_refreshes_skipped = counter(
            "tokenproxy_token_refreshes_skipped_total",
            "Refreshes refused by unauthorized_refresh_interval or manual_refresh_interval, by reason.",
            &["provider", "reason"],
        );
        let token_expires_at = IntGaugeVec::new(
            Opts::new("tokenproxy_token_expires_at_seconds", "Unix time at which the current token expires."),
            &["provider"],
        )
        .expect("static metric definition");
        registry.register(Box::new(token_expires_at.clone())).expect("metric registered once");
        let singleflight_waiters = counter(
            "tokenproxy_singleflight_waiters_total",
            "Requests that waited on a token call already in flight.",
            &["provider"],
        );
        let refresh_wait = histogram(
            "tokenproxy_refresh_wait_seconds",
            "Waits of requests for the token of a refresh in flight, the old one held back (during_refresh = wait).",
            &["provider"],
        );
        let permanent_failure = IntGaugeVec::new(
            Opts::new(
                "tokenproxy_provider_permanent_failure",
                "1 while the provider's last token call failed permanently (invalid_client, invalid_grant, …).",
            ),
            &["provider"],
        )
        .expect("static metric definition");
        registry.register(Box::new(permanent_failure.clone())).expect("metric registered once");
        let budget_exhausted = counter(
            "tokenproxy_token_budget_exhausted_total",
            "Token calls not made because the provider's max_token_calls was spent in the current window.",
            &["provider"],
        );
        let requests =
            counter("tokenproxy_requests_total", "Requests answered, by route and status.", &["route", "status"]);
        let request_duration =
            histogram("tokenproxy_request_duration_seconds", "Time to the response head, by route.", &["route"]);
        let upstream_unauthorized =
            counter("tokenproxy_upstream_unauthorized_total", "401 answers seen from upstreams.", &["route"]);
        let replays =
            counter("tokenproxy_replays_total", "Requests replayed after a 401, by outcome.", &["route", "outcome"]);
        let refusals = counter(
            "tokenproxy_upstream_refusals_total",
            "Explained refusals of a token by upstreams, once per token generation and route, by reason.",
            &["route", "reason"],
        );
        let inflight = IntGauge::new("tokenproxy_inflight_requests", "Requests being served now.")
            .expect("static metric definition");
        registry.register(Box::new(inflight.clone())).expect("metric registered once");
        let config_reloads = counter(
            "tokenproxy_config_reloads_total",
            "Config reloads (SIGHUP, POST /admin/reload), by outcome.",
            &["outcome"],
        );
        for outcome in ["success", "error"] {
            config_reloads.with_label_values(&[outcome]);
        }
        let upstream_tls_reloads = counter(
            "tokenproxy_upstream_tls_reloads_total",
            "Times a route's upstream TLS files (ca_file, client certificate) changed and were loaded.",
            &["route"],
        );
        let exchange_cache = counter(
            "tokenproxy_exchange_cache_total",
            "Lookups of callers' exchanged tokens (hit, miss, refused) and evictions, by provider.",
            &["provider", "event"],
        );
        let exchange_subjects = IntGaugeVec::new(
            Opts::new("tokenproxy_exchange_subjects", "Callers with an exchanged token in the cache."),
            &["provider"],
        )
        .expect("static metric definition");
        registry.register(Box::new(exchange_subjects.clone())).expect("metric registered once");
        let vended = counter(
            "tokenproxy_vended_tokens_total",
            "Tokens handed out by the vending listener, by provider.",
            &["provider"],
        );
        let misdirected = counter(
            "tokenproxy_misdirected_requests_total",
            "Requests answered 421: their Host named neither the listener nor a route nor an allowed name (DNS \
             rebinding), by listener (proxy, admin, vending).",
            &["listener"],
        );
        for listener in ["proxy", "admin", "vending"] {
            misdirected.with_label_values(&[listener]);
        }
        let open_connections = IntGaugeVec::new(
            Opts::new("tokenproxy_open_connections", "Open client connections (tunnels included), by listener."),
            &["listener"],
        )
        .expect("static metric definition");
        registry.register(Box::new(open_connections.clone())).expect("metric registered once");
        let evicted = counter(
            "tokenproxy_connections_evicted_total",
            "Idle connections closed to make room for a new caller at the connection limit, by listener.",
            &["listener"],
        );
        for listener in ["proxy", "admin", "vending"] {
            open_connections.with_label_values(&[listener]);
            evicted.with_label_values(&[listener]);
        }
        let open_tunnels = IntGauge::new("tokenproxy_open_tunnels", "Open tunnels (upgraded connections, WebSockets).")
            .expect("static metric definition");
        registry.register(Box::new(open_tunnels.clone())).expect("metric registered once");
        let single = |name: &str, help: &str| {
            let counter = IntCounter::new(name, help).expect("static metric definition");
            registry.register(Box::new(counter.clone())).expect("metric registered once");
            counter
        };
        let store = StoreMetrics {
            operations: counter(
                "tokenproxy_store_operations_total",
                "Operations on the shared store (get, set, lease, release, delete, decrypt), by outcome.",
                &["op", "outcome"],
            ),
            lease_waits: single(
                "tokenproxy_store_lease_waits_total",
                "Token calls left to another replica: this one waited for the lease holder's token.",
            ),
            fallbacks: single(
                "tokenproxy_store_fallbacks_total",
                "Token calls made without the shared store: it failed, or the lease holder gave no token in time.",
            ),
            degraded: {
                let help = "1 while a provider's last use of the shared store failed (unavailable, or a value this \
                            replica cannot decrypt; /readyz says which), else 0.";
                let gauge = IntGaugeVec::new(Opts::new("tokenproxy_store_degraded", help), &["provider"])
                    .expect("static metric definition");
                registry.register(Box::new(gauge.clone())).expect("metric registered once");
                gauge
            },
        };
        let build_info = IntGaugeVec::new(Opts::new("tokenproxy_build_info", "Build information."), &["version"])
            .expect("static metric definition");
        registry.register(Box::new(build_info.clone())).expect("metric registered once");
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let telemetry_spans_dropped = IntCounter::new(
            "tokenproxy_telemetry_spans_dropped_total",
            "Trace spans not exported: the queue was full, or the collector failed or did not answer in time.",
        )
        .expect("static metric definition");
        registry.register(Box::new(telemetry_spans_dropped.clone())).expect("metric registered once");
        Metrics {
            registry,
            telemetry_spans_dropped,
            token_requests,
            token_request_duration,
            token_refreshes,
            token_refreshes_skipped,
            token_expires_at,
            singleflight_waiters,
            refresh_wait,
            permanent_failure,
            budget_exhausted,
            requests,
            request_duration,
            upstream_unauthorized,
            replays,
            refusals,
            inflight,
            config_reloads,
            upstream_tls_reloads,
            exchange_cache,
            exchange_subjects,
            vended,
            misdirected,
            open_connections,
            evicted,
            open_tunnels,
            store,
        }
    }

    /// The counter of requests a listener (`proxy`, `admin`, `vending`) answered 421 `misdirected_request`.
    pub fn misdirected(&self, listener: &str) -> IntCounter {
        self.misdirected.with_label_values(&[listener])
    }

    /// The handles of a listener (`proxy`, `admin`, `vending`); only the proxy listener counts tunnels.
    pub fn listener(&self, name: &str) -> ListenerMetrics {
        ListenerMetrics {
            open: self.open_connections.with_label_values(&[name]),
            evicted: self.evicted.with_label_values(&[name]),
            tunnels: (name == "proxy").then(|| self.open_tunnels.clone()),
        }
    }

    /// Handles of the shared store.
    pub fn store(&self) -> StoreMetrics {
        self.store.clone()
    }

    /// The counter of a route's upstream TLS reloads.
    pub fn upstream_tls_reloads(&self, route: &str) -> IntCounter {
        self.upstream_tls_reloads.with_label_values(&[route])
    }

    /// Requests being served now.
    pub fn inflight(&self) -> i64 {
        self.inflight.get()
    }

    /// Counts a config reload; `outcome` is `success` or `error`.
    pub fn config_reloaded(&self, outcome: &str) {
        self.config_reloads.with_label_values(&[outcome]).inc();
    }

    /// Handles for provider `name`; creating them makes the series visible at zero.
    pub fn provider(&self, name: &str) -> ProviderMetrics {
        ProviderMetrics {
            token_success: self.token_requests.with_label_values(&[name, "success"]),
            token_error: self.token_requests.with_label_values(&[name, "error"]),
            token_duration: self.token_request_duration.with_label_values(&[name]),
            refreshes: RefreshReason::ALL.map(|r| self.token_refreshes.with_label_values(&[name, r.as_str()])),
            skipped: ["unauthorized", "manual"].map(|r| self.token_refreshes_skipped.with_label_values(&[name, r])),
            expires_at: self.token_expires_at.with_label_values(&[name]),
            singleflight_waiters: self.singleflight_waiters.with_label_values(&[name]),
            refresh_wait: self.refresh_wait.with_label_values(&[name]),
            permanent_failure: self.permanent_failure.with_label_values(&[name]),
            budget_exhausted: self.budget_exhausted.with_label_values(&[name]),
        }
    }

    /// Handles for the per-caller tokens of exchange provider `name`.
    pub fn exchange(&self, name: &str) -> ExchangeMetrics {
        let event = |event: &str| self.exchange_cache.with_label_values(&[name, event]);
        ExchangeMetrics {
            hit: event("hit"),
            miss: event("miss"),
            refused: event("refused"),
            evicted: event("evicted"),
            throttled: event("throttled"),
            subjects: self.exchange_subjects.with_label_values(&[name]),
        }
    }

    /// Counts a token handed out for provider `name` (the vending listener).
    pub fn vended(&self, name: &str) {
        self.vended.with_label_values(&[name]).inc();
    }

    /// Handles for route `name`.
    pub fn route(&self, name: &str) -> RouteMetrics {
        RouteMetrics {
            route: name.to_owned(),
            requests: self.requests.clone(),
            by_status: Arc::new(OnceLock::new()),
            duration: self.request_duration.with_label_values(&[name]),
            upstream_unauthorized: self.upstream_unauthorized.with_label_values(&[name]),
            replays: ReplayOutcome::ALL.map(|outcome| self.replays.with_label_values(&[name, outcome.as_str()])),
            refusals: RefusalReason::ALL.map(|reason| self.refusals.with_label_values(&[name, reason.as_str()])),
            inflight: self.inflight.clone(),
        }
    }

    /// Handles for requests that matched no route (label `route=""`).
    pub fn unrouted(&self) -> RouteMetrics {
        self.route("")
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
