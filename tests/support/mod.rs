//! What the tests share. Here: the fakes (an identity provider and an upstream, each a hyper server on 127.0.0.1
//! port 0 that counts, stalls and fails on command) and tokenproxy started in-process ([`Proxy`]). Beside it: the one
//! HTTP client ([`client`]), the one polling helper ([`wait`]), the one way to run the binary ([`process`]), the real
//! OpenID provider's harness ([`oidc`]), Redis, TLS material, Markdown reading and the metrics registry as a scrape
//! shows it ([`metrics`]).
#![allow(dead_code, unused_imports)]

pub mod client;
pub mod markdown;
pub mod metrics;
pub mod oidc;
pub mod process;
pub mod redis;
pub mod session_idp;
pub mod tls;
pub mod wait;

pub use client::{raw_exchange, Client, Reply};
pub use process::{spawn_tokenproxy, tokenproxy_command, write_proxy_config, TokenProxyProcess};
pub use wait::eventually;

use std::collections::HashSet;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch, Notify};

/// Starts a hyper HTTP/1.1 server on 127.0.0.1:0 with `handler`; it stops when the returned sender is dropped.
pub async fn spawn_server<F, Fut>(handler: F) -> (SocketAddr, watch::Sender<()>)
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
    let addr = listener.local_addr().expect("local addr");
    let (stop_tx, mut stop_rx) = watch::channel(());
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                _ = stop_rx.changed() => return,
            };
            let handler = Arc::clone(&handler);
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let handler = Arc::clone(&handler);
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    _ = conn => {}
                    _ = stop.changed() => {}
                }
            });
        }
    });
    (addr, stop_tx)
}

pub fn json_response(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert("content-type", "application/json".parse().unwrap());
    response
}

/// What the fake IdP answers to the next token calls.
#[derive(Clone, Debug)]
pub enum IdpMode {
    /// `{"access_token": "tok-N", "expires_in": ttl}`.
    Issue { expires_in: u64 },
    /// This status with this body (and `Retry-After` if set).
    Fail { status: u16, body: String, retry_after: Option<u64> },
    /// A token with characters that are not allowed in a header.
    BadToken,
}

/// One token call as the fake IdP received it.
#[derive(Clone, Debug)]
pub struct TokenCall {
    pub authorization: Option<String>,
    pub form: Vec<(String, String)>,
    /// Its W3C `traceparent`, when the call was traced.
    pub traceparent: Option<String>,
}

/// A fake identity provider.
pub struct FakeIdp {
    pub addr: SocketAddr,
    state: Arc<IdpState>,
    _stop: watch::Sender<()>,
}

struct IdpState {
    mode: Mutex<IdpMode>,
    calls: AtomicUsize,
    received: Mutex<Vec<TokenCall>>,
    call_seen: Notify,
    /// While closed, token calls wait before answering.
    gate: watch::Sender<bool>,
}

impl FakeIdp {
    /// Issues `tok-1`, `tok-2`, … living `expires_in` seconds.
    pub async fn start(expires_in: u64) -> FakeIdp {
        let state = Arc::new(IdpState {
            mode: Mutex::new(IdpMode::Issue { expires_in }),
            calls: AtomicUsize::new(0),
            received: Mutex::new(Vec::new()),
            call_seen: Notify::new(),
            gate: watch::Sender::new(true),
        });
        let shared = Arc::clone(&state);
        let (addr, stop) = spawn_server(move |req: Request<Incoming>| {
            let state = Arc::clone(&shared);
            async move {
                let authorization = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
                let traceparent = req.headers().get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_owned);
                let body = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                let form = form_urlencoded::parse(&body).into_owned().collect();
                let n = state.calls.fetch_add(1, Ordering::SeqCst) + 1;
                state.received.lock().unwrap().push(TokenCall { authorization, form, traceparent });
                state.call_seen.notify_waiters();
                let mut gate = state.gate.subscribe();
                let _ = gate.wait_for(|open| *open).await;
                let mode = state.mode.lock().unwrap().clone();
                match mode {
                    IdpMode::Issue { expires_in } => json_response(
                        StatusCode::OK,
                        json!({ "access_token": format!("tok-{n}"), "token_type": "Bearer", "expires_in": expires_in }),
                    ),
                    IdpMode::Fail { status, body, retry_after } => {
                        let mut response = Response::new(Full::new(Bytes::from(body)));
                        *response.status_mut() = StatusCode::from_u16(status).unwrap();
                        if let Some(after) = retry_after {
                            response.headers_mut().insert("retry-after", after.into());
                        }
                        response
                    }
                    IdpMode::BadToken => json_response(
                        StatusCode::OK,
                        json!({ "access_token": "evil\r\nX-Injected: 1", "expires_in": 300 }),
                    ),
                }
            }
        })
        .await;
        FakeIdp { addr, state, _stop: stop }
    }

    /// The token endpoint URL.
    pub fn token_url(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// Token calls received so far.
    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// Every token call received so far.
    pub fn received(&self) -> Vec<TokenCall> {
        self.state.received.lock().unwrap().clone()
    }

    /// Changes what the next calls get.
    pub fn set_mode(&self, mode: IdpMode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    /// Holds answers until [`FakeIdp::open`].
    pub fn close(&self) {
        self.state.gate.send_replace(false);
    }

    /// Releases held answers.
    pub fn open(&self) {
        self.state.gate.send_replace(true);
    }

    /// Waits until at least `n` calls were received (panics after 20 s).
    pub async fn wait_calls(&self, n: usize) {
        let wait = async {
            loop {
                let seen = self.state.call_seen.notified();
                if self.calls() >= n {
                    return;
                }
                seen.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(20), wait)
            .await
            .unwrap_or_else(|_| panic!("the IdP saw {} calls, expected {n}", self.calls()));
    }
}

/// A fake upstream: echoes what it received as JSON, rejects revoked tokens with 401.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    state: Arc<UpstreamState>,
    _stop: watch::Sender<()>,
}

/// One request as the fake upstream received it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

struct UpstreamState {
    revoked: Mutex<HashSet<String>>,
    seen: Mutex<Vec<Seen>>,
    requests: AtomicUsize,
    request_seen: Notify,
    /// Requests wait until this many have arrived (a barrier), when set.
    barrier: Mutex<Option<usize>>,
    barrier_reached: watch::Sender<bool>,
    /// Requests to paths starting with /slow wait until released.
    slow_gate: watch::Sender<bool>,
}

impl FakeUpstream {
    /// Starts the upstream.
    pub async fn start() -> FakeUpstream {
        let state = Arc::new(UpstreamState {
            revoked: Mutex::new(HashSet::new()),
            seen: Mutex::new(Vec::new()),
            requests: AtomicUsize::new(0),
            request_seen: Notify::new(),
            barrier: Mutex::new(None),
            barrier_reached: watch::Sender::new(false),
            slow_gate: watch::Sender::new(false),
        });
        let shared = Arc::clone(&state);
        let (addr, stop) = spawn_server(move |req: Request<Incoming>| {
            let state = Arc::clone(&shared);
            async move {
                let (parts, body) = req.into_parts();
                let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                let seen = Seen {
                    method: parts.method.to_string(),
                    uri: parts.uri.to_string(),
                    headers: parts.headers.clone(),
                    body: body.clone(),
                };
                state.seen.lock().unwrap().push(seen);
                let n = state.requests.fetch_add(1, Ordering::SeqCst) + 1;
                state.request_seen.notify_waiters();
                if let Some(target) = *state.barrier.lock().unwrap() {
                    if n >= target {
                        state.barrier_reached.send_replace(true);
                    }
                }
                if state.barrier.lock().unwrap().is_some() {
                    let mut reached = state.barrier_reached.subscribe();
                    let _ = reached.wait_for(|r| *r).await;
                }
                if parts.uri.path().starts_with("/slow") {
                    let mut gate = state.slow_gate.subscribe();
                    let _ = gate.wait_for(|open| *open).await;
                }
                let auth = parts.headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
                let token = auth.strip_prefix("Bearer ").unwrap_or_default().to_owned();
                if state.revoked.lock().unwrap().contains(&token) {
                    let mut response = json_response(StatusCode::UNAUTHORIZED, json!({ "error": "invalid_token" }));
                    response
                        .headers_mut()
                        .insert("www-authenticate", "Bearer error=\"invalid_token\"".parse().unwrap());
                    return response;
                }
                if parts.uri.path().starts_with("/always401") {
                    return json_response(StatusCode::UNAUTHORIZED, json!({ "error": "nope" }));
                }
                let headers: serde_json::Map<String, Value> = parts
                    .headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), json!(String::from_utf8_lossy(v.as_bytes()))))
                    .collect();
                let mut response = json_response(
                    StatusCode::OK,
                    json!({
                        "method": parts.method.to_string(),
                        "uri": parts.uri.to_string(),
                        "headers": headers,
                        "body": String::from_utf8_lossy(&body),
                        "token": token,
                    }),
                );
                if parts.uri.path().starts_with("/hop") {
                    let h = response.headers_mut();
                    h.insert("connection", "x-upstream-hop".parse().unwrap());
                    h.insert("x-upstream-hop", "1".parse().unwrap());
                    h.insert("keep-alive", "timeout=5".parse().unwrap());
                    h.insert("x-end-to-end", "kept".parse().unwrap());
                }
                response
            }
        })
        .await;
        FakeUpstream { addr, state, _stop: stop }
    }

    /// Base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers 401 to `token` from now on.
    pub fn revoke(&self, token: &str) {
        self.state.revoked.lock().unwrap().insert(token.to_owned());
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Requests seen so far.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Makes requests wait until `n` have arrived.
    pub fn hold_until(&self, n: usize) {
        *self.state.barrier.lock().unwrap() = Some(n);
        self.state.barrier_reached.send_replace(false);
    }

    /// Lets requests to `/slow…` answer.
    pub fn release_slow(&self) {
        self.state.slow_gate.send_replace(true);
    }

    /// Waits until at least `n` requests arrived (panics after 20 s).
    pub async fn wait_requests(&self, n: usize) {
        let wait = async {
            loop {
                let seen = self.state.request_seen.notified();
                if self.requests() >= n {
                    return;
                }
                seen.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(20), wait)
            .await
            .unwrap_or_else(|_| panic!("the upstream saw {} requests, expected {n}", self.requests()));
    }
}

/// Whether this run serves every request with hyper (`TP_TEST_HTTP1=hyper`), so that the HTTP/1.1 suites test the
/// hyper transport too. Tests of behaviour only the h1 transport has (its stricter verdicts, its connection
/// reuse) ask this.
pub fn hyper_only() -> bool {
    std::env::var("TP_TEST_HTTP1").is_ok_and(|v| v == "hyper")
}

/// tokenproxy running in-process on ports chosen by the OS.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// The vending listener, when the config has one.
    pub vending: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    /// Starts tokenproxy with `toml` (its [server]/[admin] listen on port 0 unless the TOML says otherwise).
    pub async fn start(toml: &str) -> Proxy {
        let full = format!("[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{toml}");
        let config = tokenproxy::config::Config::from_toml_str(&full, "test.toml")
            .unwrap_or_else(|e| panic!("test config invalid: {e}\n{full}"));
        Self::start_config(config).await
    }

    /// Starts tokenproxy with a ready config. With `TP_TEST_HTTP1=hyper` in the environment, every request is served
    /// by hyper (`server.h1_transport = false`): `scripts/test` runs the HTTP/1.1 suites a second time that way.
    pub async fn start_config(mut config: tokenproxy::config::Config) -> Proxy {
        if hyper_only() {
            config.server.h1_transport = false;
        }
        let app = tokenproxy::App::build(config).expect("build");
        let bound = app.bind().await.expect("bind");
        let addr = bound.proxy_addr();
        let admin = bound.admin_addr();
        let vending = bound.vending_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(bound.run(async move {
            let _ = stopped.await;
        }));
        Proxy { addr, admin, vending, stop: Some(stop), task: Some(task) }
    }

    /// `http://proxy{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `http://admin{path}`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Waits until `/readyz` answers 200 (panics after [`READY_WITHIN`]), and returns its body.
    pub async fn wait_ready(&self) -> Value {
        wait_ready(&Client::new(), &self.admin_url("/readyz")).await
    }

    /// A metric's value from `/metrics`: the sum of the samples of `name_and_labels` (a name, or a name with its
    /// labels as printed, e.g. `tokenproxy_replays_total{outcome="success",route="api"}`), 0 when absent.
    pub async fn metric(&self, name_and_labels: &str) -> f64 {
        self.metric_sample(name_and_labels).await.unwrap_or(0.0)
    }

    /// As [`Proxy::metric`], `None` when no sample has that name and labels.
    pub async fn metric_sample(&self, name_and_labels: &str) -> Option<f64> {
        metric_sample(&Client::new().get(&self.admin_url("/metrics")).await.text(), name_and_labels)
    }

    /// Stops it and waits for the drain to finish.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A provider + route TOML block for `provider` at `idp` and a route `/api` → `upstream`.
pub fn basic_config(idp: &FakeIdp, upstream: &FakeUpstream) -> String {
    format!(
        r#"
[providers.api]
token_url = "{}"
client_id = "client-1"
client_secret = "s3cret-value"
[[routes]]
name = "api"
prefix = "/api"
upstream = "{}"
strip_prefix = true
provider = "api"
"#,
        idp.token_url(),
        upstream.url()
    )
}

/// How long tokenproxy may take to be ready (`/readyz` 200).
pub const READY_WITHIN: Duration = Duration::from_secs(20);

/// Waits until the readiness URL `url` answers 200, and returns its body (panics after [`READY_WITHIN`], with the
/// last answer).
pub async fn wait_ready(client: &Client, url: &str) -> Value {
    eventually(format!("{url} to answer 200"), READY_WITHIN, async || {
        match client.try_send(Method::GET, url, &[], Bytes::new()).await {
            Ok(reply) if reply.status == 200 => Ok(reply.json()),
            Ok(reply) => Err(format!("{} {}", reply.status, reply.text())),
            Err(error) => Err(error),
        }
    })
    .await
}

/// The value of a sample in Prometheus text: the sum of the lines of `name_and_labels` (a metric name, or a name
/// with its labels as printed); `None` when no line has it.
pub fn metric_sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|sum, value| sum + value)
}

/// Quotes `s` as a TOML basic string.
pub fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
