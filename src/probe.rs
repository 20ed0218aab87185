//! `tokenproxy check --probe ROUTE`: one request through one route, sent by the proxy itself.
//!
//! The app is built from the config cut down to the route and its provider, so that no other provider makes a token
//! call, and nothing is bound or written (no listener, no vending, no `sink_file`). The route's token is got through
//! the token engine as a request gets it (a token call, or the exchange of the caller's token given with
//! `--subject-token-file`), then one request is handed to the proxy over an in-memory connection
//! ([`App::serve_connection`]): its path, headers, token injection, DPoP proofs, client certificate and one replay
//! are the proxy's own rules, not a copy. The report gives the status, the time each step took and, when the
//! upstream refused the token, the verdict the proxy made of it ([`crate::token::refusal`]).

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{AUTHORIZATION, HOST};
use http::{HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;

use crate::config::{Config, RouteConfig};
use crate::logging::{escape_peer_text, Escape};
use crate::metrics::ReplayOutcome;
use crate::secret::SecretSource;
use crate::token::refusal::Verdict;
use crate::token::{Token, TokenBinding, TokenSource};
use crate::{App, StartError};

/// What to probe.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The route's name.
    pub route: String,
    /// The request's method.
    pub method: Method,
    /// The path (and query) after the route's prefix: `""`, `/health`, `/x?a=1`.
    pub path: String,
    /// For a route whose provider exchanges each caller's token: the file holding the caller's token.
    pub subject_token_file: Option<PathBuf>,
}

/// Why the probe could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No route has that name.
    #[error("no route named `{name}` (defined: {})", .known.join(", "))]
    UnknownRoute {
        /// The name asked for.
        name: String,
        /// The routes' names.
        known: Vec<String>,
    },
    /// The route exchanges each caller's token and none was given.
    #[error(
        "route `{route}` exchanges each caller's own token (provider `{provider}`, subject_token_source = \
         \"request\"): give the caller's token to exchange with --subject-token-file FILE"
    )]
    SubjectTokenNeeded {
        /// The route.
        route: String,
        /// Its provider.
        provider: String,
    },
    /// A caller's token was given to a route that does not exchange one.
    #[error(
        "route `{route}` does not exchange a caller's token: --subject-token-file is for routes whose provider has \
         grant = \"token_exchange\" with subject_token_source = \"request\""
    )]
    SubjectTokenUnused {
        /// The route.
        route: String,
    },
    /// The caller's token could not be read, or cannot be sent.
    #[error("--subject-token-file: {0}")]
    SubjectToken(String),
    /// The app could not be built.
    #[error(transparent)]
    Start(#[from] StartError),
}

/// What the probe found.
#[derive(Debug)]
pub struct Report {
    /// The route's name.
    pub route: String,
    /// The request's method.
    pub method: Method,
    /// The path sent to the proxy: the route's prefix and the probe's path.
    pub path: String,
    /// The route's upstream.
    pub upstream: String,
    /// The token step.
    pub token: TokenStep,
    /// The request step.
    pub sent: Sent,
}

/// How the route's token was got.
#[derive(Debug)]
pub enum TokenStep {
    /// The route attaches no token (no provider).
    PassThrough,
    /// A token.
    Got {
        /// How long it took.
        took: Duration,
        /// The provider (the token slot's name, as `/tokens` shows it).
        provider: String,
        /// The token, as `/tokens` shows it (never the token itself).
        token: TokenFacts,
        /// For an exchange of a caller's token: the subject's fingerprint.
        subject: Option<String>,
    },
    /// None could be had.
    Failed {
        /// How long it took.
        took: Duration,
        /// The provider.
        provider: String,
        /// Why (the provider's last error).
        reason: String,
    },
}

/// What may be shown of a token.
#[derive(Debug, Clone)]
pub struct TokenFacts {
    /// The first 8 hex digits of its SHA-256.
    pub fingerprint: String,
    /// Its generation.
    pub generation: u64,
    /// The time left until it expires, when it was got (whole seconds, rounded).
    pub expires_in: u64,
    /// The thumbprint of the DPoP key it is bound to.
    pub dpop_key: Option<String>,
    /// It was read from the shared store.
    pub shared: bool,
}

impl TokenFacts {
    fn of(token: &Token) -> TokenFacts {
        TokenFacts {
            fingerprint: token.fingerprint.clone(),
            generation: token.generation,
            expires_in: token
                .expires_at
                .duration_since(std::time::SystemTime::now())
                .map_or(0, |left| left.as_secs_f64().round() as u64),
            dpop_key: token.dpop().map(|binding| binding.key.thumbprint().to_owned()),
            shared: token.shared,
        }
    }
}

/// The request step.
#[derive(Debug)]
pub enum Sent {
    /// Not sent: the route's token could not be had.
    NotSent,
    /// Sent, and no answer came.
    Failed {
        /// How long it took.
        took: Duration,
        /// What went wrong.
        error: String,
    },
    /// Answered.
    Answered(Box<Answer>),
}

/// The proxy's answer to the request.
#[derive(Debug)]
pub struct Answer {
    /// Its status.
    pub status: StatusCode,
    /// From the request's start to the answer's head (a replay and its token call included).
    pub took: Duration,
    /// Its `x-request-id`, which the upstream received too.
    pub request_id: Option<String>,
    /// tokenproxy's own error (`x-tokenproxy-error`), with the problem's `detail`.
    pub proxy_error: Option<(String, String)>,
    /// The request was replayed once with a new token after a refusal; that token, if it is still usable.
    pub replayed: Option<Option<TokenFacts>>,
    /// The verdict on the upstream's refusal of the token.
    pub verdict: Option<Verdict>,
}

impl Report {
    /// Whether the answer was a 2xx or a 3xx.
    pub fn succeeded(&self) -> bool {
        matches!(&self.sent, Sent::Answered(answer) if answer.status.is_success() || answer.status.is_redirection())
    }

    /// The report as lines of text, with `config_load` the time the config took to load; no token, no secret, and
    /// peer text escaped.
    pub fn lines(&self, config_load: Duration) -> Vec<String> {
        let mut lines = Vec::new();
        let outcome = match &self.sent {
            Sent::NotSent => "not sent: no token".to_owned(),
            Sent::Failed { .. } => "no answer".to_owned(),
            Sent::Answered(answer) => {
                format!("{} {}", answer.status.as_u16(), answer.status.canonical_reason().unwrap_or_default())
                    .trim_end()
                    .to_owned()
            }
        };
        lines.push(format!("route {}: {} {} -> {outcome}", self.route, self.method, self.path));
        lines.push(step("config", config_load, ""));
        match &self.token {
            TokenStep::PassThrough => {
                lines.push("  token     none: the route has no provider (pass-through)".to_owned())
            }
            TokenStep::Got { took, provider, token, subject } => {
                let mut text = format!("provider {provider}");
                if let Some(subject) = subject {
                    let _ = write!(text, ", exchanged for the caller's token (subject fingerprint {subject})");
                }
                let _ = write!(text, ", {}", facts(token));
                lines.push(step("token", *took, &text));
            }
            TokenStep::Failed { took, provider, reason } => {
                lines.push(step("token", *took, &format!("provider {provider}: FAILED: {reason}")));
            }
        }
        match &self.sent {
            Sent::NotSent => {}
            Sent::Failed { took, error } => lines.push(step("upstream", *took, &format!("FAILED: {error}"))),
            Sent::Answered(answer) => {
                let mut text = self.upstream.clone();
                if let Some(replayed) = &answer.replayed {
                    text.push_str(", replayed once after a refusal with a new token");
                    if let Some(token) = replayed {
                        let _ = write!(text, " ({})", facts(token));
                    }
                }
                if let Some(id) = &answer.request_id {
                    let _ = write!(text, ", x-request-id {id}");
                }
                lines.push(step("upstream", answer.took, &text));
                if let Some((code, detail)) = &answer.proxy_error {
                    lines.push(format!("  tokenproxy's own answer: {code}: {detail}"));
                } else if let Some(verdict) = &answer.verdict {
                    let reasons: Vec<&str> = verdict.reasons.iter().map(|r| r.as_str()).collect();
                    lines.push(format!("  refused: {}: {}", reasons.join(", "), verdict.explanation));
                } else if matches!(answer.status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN)
                    && !matches!(self.token, TokenStep::PassThrough)
                {
                    lines.push(format!(
                        "  refused: not explained: the answer carries no Bearer or DPoP challenge and {} is not in \
                         the route's retry_on_status",
                        answer.status.as_u16()
                    ));
                }
            }
        }
        lines.into_iter().map(|line| escape_peer_text(&line, Escape::Text).into_owned()).collect()
    }
}

/// `  NAME     12.3 ms  TEXT`.
fn step(name: &str, took: Duration, text: &str) -> String {
    let line = format!("  {name:<8} {:>8.1} ms  {text}", took.as_secs_f64() * 1000.0);
    line.trim_end().to_owned()
}

fn facts(token: &TokenFacts) -> String {
    let mut text = format!(
        "fingerprint {}, generation {}, expires in {} s",
        token.fingerprint, token.generation, token.expires_in
    );
    if let Some(key) = &token.dpop_key {
        let _ = write!(text, ", DPoP-bound to key {key}");
    }
    if token.shared {
        text.push_str(", from the shared store");
    }
    text
}

/// The path a request to `prefix` + `path` has: `/orders` + `/health` (or `health`) → `/orders/health`, `/` + `""`
/// → `/`.
pub fn request_path(prefix: &str, path: &str) -> String {
    let slash = if path.is_empty() || path.starts_with(['/', '?']) { "" } else { "/" };
    let joined = format!("{}{slash}{path}", prefix.trim_end_matches('/'));
    match joined.as_bytes().first() {
        Some(b'/') => joined,
        _ => format!("/{joined}"),
    }
}

/// Probes `probe.route` of `config`: gets its token, sends the request, and says what came back.
pub async fn run(config: &Config, probe: &Probe) -> Result<Report, ProbeError> {
    let Some(route) = config.routes.iter().find(|route| route.name == probe.route) else {
        return Err(ProbeError::UnknownRoute {
            name: probe.route.clone(),
            known: config.routes.iter().map(|route| route.name.clone()).collect(),
        });
    };
    let per_caller =
        route.provider.as_ref().and_then(|name| config.providers.get(name)).is_some_and(|p| p.per_caller());
    let subject = match (&probe.subject_token_file, per_caller) {
        (None, true) => {
            let provider = route.provider.clone().unwrap_or_default();
            return Err(ProbeError::SubjectTokenNeeded { route: route.name.clone(), provider });
        }
        (Some(_), false) => return Err(ProbeError::SubjectTokenUnused { route: route.name.clone() }),
        (Some(file), true) => Some(caller_authorization(file)?),
        (None, false) => None,
    };
    let app = App::build(only(config, route))?;
    let engine = app.engine();
    app.spawn_engine();
    let path = request_path(&route.prefix, &probe.path);
    let mut report = Report {
        route: route.name.clone(),
        method: probe.method.clone(),
        path: path.clone(),
        upstream: route.upstream.to_string(),
        token: TokenStep::PassThrough,
        sent: Sent::NotSent,
    };
    // The route's tokens, as a request on it gets them: the provider's, or those of this caller.
    let binding = route.provider.as_ref().and_then(|provider| Some((provider.clone(), engine.binding(provider)?)));
    let source: Option<(String, Arc<dyn TokenSource>)> = match &binding {
        Some((provider, TokenBinding::Shared(source))) => Some((provider.clone(), Arc::clone(source))),
        Some((provider, TokenBinding::PerCaller(cache))) => {
            subject.as_ref().and_then(|subject| cache.for_caller(subject)).map(|source| (provider.clone(), source))
        }
        None => None,
    };
    let mut first = None;
    if let Some((provider, source)) = &source {
        let started = Instant::now();
        match source.obtain(None).await {
            Ok(token) => {
                report.token = TokenStep::Got {
                    took: started.elapsed(),
                    provider: provider.clone(),
                    token: TokenFacts::of(&token),
                    subject: source.subject_fingerprint(),
                };
                first = Some(token.generation);
            }
            Err(unavailable) => {
                report.token = TokenStep::Failed {
                    took: started.elapsed(),
                    provider: provider.clone(),
                    reason: unavailable.reason,
                };
                engine.shutdown().await;
                return Ok(report);
            }
        }
    }
    let host = route.host.clone().unwrap_or_else(|| "localhost".to_owned());
    let started = Instant::now();
    report.sent = match send(&app, &probe.method, &path, &host, subject).await {
        Ok(answer) => {
            let took = started.elapsed();
            let routed = app.metrics().route(&route.name);
            let replayed = [ReplayOutcome::Success, ReplayOutcome::StillUnauthorized]
                .iter()
                .any(|outcome| routed.replays(*outcome).get() > 0)
                .then(|| {
                    let current = source.as_ref().and_then(|(_, source)| source.current());
                    current.filter(|token| Some(token.generation) != first).map(|token| TokenFacts::of(&token))
                });
            // The proxy keeps its verdict on a refusal where `/tokens` shows it (`last_refusal`).
            let verdict = match &binding {
                Some((provider, TokenBinding::Shared(_))) => {
                    engine.slot(provider).and_then(|slot| slot.status().last_refusal)
                }
                Some((_, TokenBinding::PerCaller(cache))) => cache.last_refusal(),
                None => None,
            };
            Sent::Answered(Box::new(Answer { took, replayed, verdict, ..answer }))
        }
        Err(error) => Sent::Failed { took: started.elapsed(), error },
    };
    engine.shutdown().await;
    // The probe's spans, when telemetry is on, reach the collector before the command exits.
    app.flush_telemetry(std::time::Duration::from_secs(5)).await;
    Ok(report)
}

/// `config` with `route` its only route and the route's provider its only provider, whose token is written nowhere;
/// the proxy's `Host` check is a loopback listener's, without TLS.
fn only(config: &Config, route: &RouteConfig) -> Config {
    let mut config = config.clone();
    config.routes.retain(|r| r.name == route.name);
    // The probe's request comes over a plain connection, never through a tunnel: no local CA is needed.
    for route in &mut config.routes {
        route.intercept = false;
    }
    config.providers.retain(|name, _| route.provider.as_ref() == Some(name));
    for provider in config.providers.values_mut() {
        provider.sink_file = None;
    }
    config.server.listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    config.server.tls = None;
    config.vending.listen = None;
    config
}

/// `Bearer <the caller's token>` from `file` (read as a secret file is: trimmed, at most 64 KiB).
fn caller_authorization(file: &std::path::Path) -> Result<HeaderValue, ProbeError> {
    let subject = SecretSource::File(file.to_path_buf()).read().map_err(|e| ProbeError::SubjectToken(e.to_string()))?;
    let mut value = HeaderValue::try_from(format!("Bearer {}", subject.expose()))
        .map_err(|_| ProbeError::SubjectToken(format!("{} holds characters a header cannot carry", file.display())))?;
    value.set_sensitive(true);
    // A value the proxy would not take as a caller's token is refused here, not probed as if the route had none.
    if crate::token::exchange::bearer_subject(&value).is_none() {
        return Err(ProbeError::SubjectToken(format!("{} does not hold a token a caller could send", file.display())));
    }
    Ok(value)
}

/// The largest body of tokenproxy's own error read for its `detail`.
const PROBLEM_LIMIT: usize = 64 * 1024;

/// Sends the request to the proxy over an in-memory connection, and reads the answer's head (and the body of
/// tokenproxy's own error).
async fn send(
    app: &App,
    method: &Method,
    path: &str,
    host: &str,
    authorization: Option<HeaderValue>,
) -> Result<Answer, String> {
    let (caller, proxy_side) = tokio::io::duplex(64 * 1024);
    let serving = std::pin::pin!(app.serve_connection(proxy_side, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))));
    let asking = std::pin::pin!(async move {
        let (mut sender, connection) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(caller))
            .await
            .map_err(|e| e.to_string())?;
        let connection = tokio::spawn(connection);
        let mut request = http::Request::builder().method(method.clone()).uri(path).header(HOST, host);
        if let Some(authorization) = authorization {
            request = request.header(AUTHORIZATION, authorization);
        }
        let request = request.body(Empty::new()).map_err(|e| e.to_string())?;
        let outcome = async {
            let response = sender.send_request(request).await.map_err(|e| crate::error_chain::error_chain(&e))?;
            let header =
                |name: &str| response.headers().get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            let request_id = header("x-request-id");
            let code = header("x-tokenproxy-error");
            let status = response.status();
            let proxy_error = match code {
                Some(code) => {
                    let body = Limited::new(response.into_body(), PROBLEM_LIMIT).collect().await;
                    let problem = body.ok().and_then(|body| serde_json::from_slice(&body.to_bytes()).ok());
                    let detail = problem
                        .as_ref()
                        .and_then(|problem: &serde_json::Value| problem["detail"].as_str())
                        .unwrap_or_default()
                        .to_owned();
                    Some((code, detail))
                }
                None => None,
            };
            Ok(Answer { status, took: Duration::ZERO, request_id, proxy_error, replayed: None, verdict: None })
        }
        .await;
        connection.abort();
        outcome
    });
    match futures_util::future::select(asking, serving).await {
        futures_util::future::Either::Left((outcome, _)) => outcome,
        // The proxy closed the connection: the answer, if any, is on its way to the caller's side.
        futures_util::future::Either::Right(((), asking)) => asking.await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_is_the_prefix_and_the_probes_path() {
        assert_eq!(request_path("/orders", "/health"), "/orders/health");
        assert_eq!(request_path("/orders", "health"), "/orders/health");
        assert_eq!(request_path("/orders", ""), "/orders");
        assert_eq!(request_path("/orders", "?a=1"), "/orders?a=1");
        assert_eq!(request_path("/", "/health"), "/health");
        assert_eq!(request_path("/", ""), "/");
        assert_eq!(request_path("/", "?a=1"), "/?a=1");
    }

    #[test]
    fn peer_text_is_printed_escaped_and_a_refusal_without_a_verdict_says_why() {
        let report = Report {
            route: "orders".into(),
            method: Method::GET,
            path: "/orders".into(),
            upstream: "http://127.0.0.1:1/".into(),
            token: TokenStep::Got {
                took: Duration::from_millis(3),
                provider: "orders".into(),
                token: TokenFacts {
                    fingerprint: "1a2b3c4d".into(),
                    generation: 1,
                    expires_in: 300,
                    dpop_key: None,
                    shared: false,
                },
                subject: None,
            },
            sent: Sent::Answered(Box::new(Answer {
                status: StatusCode::FORBIDDEN,
                took: Duration::from_millis(2),
                request_id: Some("id\u{9b}31m\u{202e}".into()),
                proxy_error: None,
                replayed: None,
                verdict: None,
            })),
        };
        let lines = report.lines(Duration::from_micros(1500));
        assert_eq!(lines[0], "route orders: GET /orders -> 403 Forbidden");
        assert_eq!(lines[1], "  config        1.5 ms");
        assert_eq!(
            lines[2],
            "  token         3.0 ms  provider orders, fingerprint 1a2b3c4d, generation 1, expires in 300 s"
        );
        assert_eq!(lines[3], "  upstream      2.0 ms  http://127.0.0.1:1/, x-request-id id\\u{9b}31m\\u{202e}");
        assert!(lines[4].starts_with("  refused: not explained: the answer carries no Bearer or DPoP challenge"));
        assert!(!report.succeeded());
    }
}
