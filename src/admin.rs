//! The admin listener: `/healthz`, `/readyz`, `/metrics`, `/tokens`, `POST /tokens/{provider}/refresh`.
//!
//! Readiness is a latch over the providers that routes use: ready once each holds a usable token. Nothing here
//! ever shows a token or a secret: `/tokens` gives a fingerprint (first 8 hex digits of the token's SHA-256).

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Map, Value};

use crate::metrics::Metrics;
use crate::token::{SlotStatus, TokenEngine, TokenSlot};

/// Something that reloads the configuration (implemented where the parts are wired: `lib.rs`).
pub trait Reload: Send + Sync + 'static {
    /// Reloads; `Ok` with a summary of what changed, or every error (the running config is then kept).
    fn reload(&self) -> Result<String, Vec<String>>;
}

/// The admin API over the token engine and the metrics registry.
pub struct Admin {
    engine: Arc<ArcSwap<TokenEngine>>,
    metrics: Arc<Metrics>,
    reload: Option<Arc<dyn Reload>>,
}

impl Admin {
    /// An admin API for the current engine of `engine` (it changes with reloads).
    pub fn new(engine: Arc<ArcSwap<TokenEngine>>, metrics: Arc<Metrics>, reload: Option<Arc<dyn Reload>>) -> Admin {
        Admin { engine, metrics, reload }
    }

    /// Answers one admin request.
    pub async fn handle<B>(&self, request: Request<B>) -> Response<Full<Bytes>> {
        let path = request.uri().path();
        let method = request.method();
        if method == Method::POST {
            if let Some(why) = cross_site(request.headers()) {
                let body = json!({ "error": format!("cross-site request refused: {why}") });
                return json_response(StatusCode::FORBIDDEN, &body);
            }
        }
        match (method, path) {
            (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n".to_owned()),
            (&Method::GET | &Method::HEAD, "/readyz") => self.readyz(),
            (&Method::GET | &Method::HEAD, "/metrics") => {
                text(StatusCode::OK, "text/plain; version=0.0.4", self.metrics.encode())
            }
            (&Method::GET | &Method::HEAD, "/tokens") => {
                let engine = self.engine.load();
                let mut providers: Map<String, Value> = engine
                    .providers()
                    .map(|(name, slot, _)| {
                        let mut entry = describe(slot);
                        add_store_health(&mut entry, engine.store_health(name));
                        (name.to_owned(), entry)
                    })
                    .collect();
                for (name, cache, _) in engine.exchanges() {
                    providers.insert(name.to_owned(), describe_exchange(cache));
                }
                json_response(StatusCode::OK, &json!({ "providers": providers }))
            }
            (&Method::POST, "/admin/reload") => self.reload().await,
            (_, "/admin/reload") => method_not_allowed("POST"),
            (_, "/healthz" | "/readyz" | "/metrics" | "/tokens") => method_not_allowed("GET, HEAD"),
            (_, _) => match refresh_target(path) {
                Some(name) if method == Method::POST => self.refresh(&name).await,
                Some(_) => method_not_allowed("POST"),
                None => json_response(StatusCode::NOT_FOUND, &json!({ "error": "not found", "path": path })),
            },
        }
    }

    async fn reload(&self) -> Response<Full<Bytes>> {
        let Some(reload) = self.reload.clone() else {
            return json_response(
                StatusCode::CONFLICT,
                &json!({ "reloaded": false, "errors": ["reload is not available"] }),
            );
        };
        // Reading and validating the config touches the file system: off the async threads.
        match tokio::task::spawn_blocking(move || reload.reload()).await {
            Ok(Ok(summary)) => json_response(StatusCode::OK, &json!({ "reloaded": true, "summary": summary })),
            Ok(Err(errors)) => json_response(StatusCode::BAD_REQUEST, &json!({ "reloaded": false, "errors": errors })),
            Err(_) => json_response(StatusCode::INTERNAL_SERVER_ERROR, &json!({ "reloaded": false })),
        }
    }

    fn readyz(&self) -> Response<Full<Bytes>> {
        let mut ready = true;
        let mut providers = Map::new();
        let engine = self.engine.load();
        for (name, slot, routed) in engine.providers() {
            if !routed {
                continue;
            }
            // A refresh that holds the old token back briefly (`during_refresh = "wait"`) does not make it unready,
            // nor does a shared store that fails while the token in hand is usable (docs/fleet.md "Failure modes").
            let health = engine.store_health(name);
            let usable = slot.serving();
            ready &= usable;
            let status = slot.status();
            let mut entry = json!({ "state": state(slot, &status), "ready": usable, "last_error": status.last_error });
            add_store_health(&mut entry, health);
            providers.insert(name.to_owned(), entry);
        }
        // A provider that exchanges each caller's token has nothing to fetch ahead, and a caller's failing exchange
        // (a garbage subject, a slow IdP) is that caller's error: readiness never depends on it, or any caller could
        // take the whole proxy out of its Service. Whether the last exchange reached the IdP is shown, not counted.
        for (name, cache, routed) in engine.exchanges() {
            if routed {
                let entry = json!({ "state": "per_caller", "ready": true, "reachable": cache.reachable() });
                providers.insert(name.to_owned(), entry);
            }
        }
        let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        json_response(status, &json!({ "ready": ready, "providers": providers }))
    }

    async fn refresh(&self, name: &str) -> Response<Full<Bytes>> {
        if self.engine.load().exchanges().any(|(exchange, _, _)| exchange == name) {
            let error =
                format!("provider `{name}` exchanges each caller's own token: there is no token of its own to refresh");
            return json_response(StatusCode::CONFLICT, &json!({ "provider": name, "error": error }));
        }
        let Some(slot) = self.engine.load().slot(name) else {
            return json_response(StatusCode::NOT_FOUND, &json!({ "error": format!("no provider named `{name}`") }));
        };
        let status = match slot.refresh_now().await {
            Ok(_) => StatusCode::OK,
            Err(refused) if refused.rate_limited => {
                let seconds = refused.retry_after.map_or(1, |d| d.as_secs_f64().ceil().max(1.0) as u64);
                let body = json!({ "provider": name, "error": refused.reason, "retry_after_seconds": seconds });
                let mut response = json_response(StatusCode::TOO_MANY_REQUESTS, &body);
                response.headers_mut().insert(RETRY_AFTER, HeaderValue::from(seconds));
                return response;
            }
            Err(_) => StatusCode::BAD_GATEWAY,
        };
        json_response(status, &json!({ "provider": name, "status": describe(&slot) }))
    }
}

/// Why a POST looks like a browser's cross-site request, if it does. A bare cross-site POST (a form, `fetch` with
/// `mode: "no-cors"`) needs no CORS preflight, so a web page could otherwise force token refreshes or reloads: a
/// browser says where a request comes from in `Sec-Fetch-Site`, and in `Origin`, which must then name the admin
/// listener itself. Tools such as curl send neither and pass.
fn cross_site(headers: &http::HeaderMap) -> Option<String> {
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.to_str().unwrap_or("?");
        if !site.eq_ignore_ascii_case("same-origin") && !site.eq_ignore_ascii_case("none") {
            return Some(format!("Sec-Fetch-Site: {site}"));
        }
    }
    let origin = headers.get(http::header::ORIGIN)?;
    let host = headers.get(http::header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin.to_str().ok().and_then(|o| o.split_once("://")).map(|(_, rest)| rest);
    match (origin_host, host) {
        (Some(origin_host), Some(host)) if origin_host.eq_ignore_ascii_case(host) => None,
        _ => Some(format!("Origin: {}", origin.to_str().unwrap_or("?"))),
    }
}

/// `/tokens/{provider}/refresh` → `provider`, percent-decoded (a route profile's slot `orders[reports]` comes as
/// `orders%5Breports%5D`).
fn refresh_target(path: &str) -> Option<String> {
    let name = path.strip_prefix("/tokens/")?.strip_suffix("/refresh")?;
    let name = percent_encoding::percent_decode_str(name).decode_utf8().ok()?;
    (!name.is_empty() && !name.contains('/')).then(|| name.into_owned())
}

/// `/tokens` of a provider that exchanges each caller's token: how many callers have one (never a token or a hash).
fn describe_exchange(cache: &crate::token::exchange::ExchangeCache) -> Value {
    let last_refusal = cache.last_refusal();
    json!({
        "state": "per_caller",
        "subjects": cache.subjects(),
        "reachable": cache.reachable(),
        "last_refusal": last_refusal.as_ref().map(describe_refusal),
    })
}

/// `valid`, `refreshing`, `expired` or `failed`.
fn state(slot: &TokenSlot, status: &SlotStatus) -> &'static str {
    if status.in_flight {
        "refreshing"
    } else if slot.current().is_some() {
        "valid"
    } else if status.last_error.is_some() {
        "failed"
    } else {
        "expired"
    }
}

fn describe(slot: &TokenSlot) -> Value {
    let status = slot.status();
    let token = slot.latest();
    let now = SystemTime::now();
    json!({
        "state": state(slot, &status),
        "expires_at": token.as_ref().map(|t| rfc3339(t.expires_at)),
        "expires_in_seconds": token.as_ref().map(|t| t.expires_at.duration_since(now).map_or(0, |d| d.as_secs())),
        "last_refresh": status.last_refresh.map(rfc3339),
        "last_error": status.last_error,
        "refreshes": status.refreshes,
        "generation": token.as_ref().map_or(0, |t| t.generation),
        "fingerprint": token.as_ref().map(|t| t.fingerprint.clone()),
        "token_type": token.as_ref().map(|t| if t.dpop().is_some() { "DPoP" } else { "Bearer" }),
        "dpop_jkt": token.as_ref().and_then(|t| t.dpop()).map(|binding| binding.key.thumbprint()),
        "refresh_token_expires_at": token.as_ref().and_then(|t| t.refresh_token_expires_at).map(rfc3339),
        "source": token.as_ref().map(|t| if t.shared { "shared store" } else { "own call" }),
        "permanent_failure": status.permanent_failure,
        "last_refusal": status.last_refusal.as_ref().map(describe_refusal),
    })
}

/// `last_refusal`: the verdict on an upstream's last refusal of the provider's token.
fn describe_refusal(verdict: &crate::token::refusal::Verdict) -> Value {
    json!({
        "route": verdict.route,
        "status": verdict.status,
        "at": rfc3339(verdict.at),
        "reasons": verdict.reasons.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
        "explanation": verdict.explanation,
    })
}

/// With a shared store: `shared_store` ("ok", "unavailable" or "undecryptable") and, when it failed, what failed
/// since when and what this replica does meanwhile.
fn add_store_health(entry: &mut Value, health: Option<&crate::token::shared::StoreHealth>) {
    let Some(health) = health else { return };
    let problem = health.problem();
    entry["shared_store"] = json!(match &problem {
        None => "ok",
        Some(problem) if problem.undecryptable => "undecryptable",
        Some(_) => "unavailable",
    });
    if let Some(problem) = problem {
        entry["shared_store_error"] = json!(problem.detail);
        entry["shared_store_failing_since"] = json!(rfc3339(problem.since));
    }
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    text(status, "application/json", format!("{body}\n"))
}

fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = json_response(StatusCode::METHOD_NOT_ALLOWED, &json!({ "error": "method not allowed" }));
    response.headers_mut().insert(ALLOW, HeaderValue::from_static(allow));
    response
}
