//! Refresh without a gap, against an authorization server shaped like Django OAuth Toolkit with rotation on: it
//! revokes the old access token the moment its refresh token is redeemed (and takes a while to answer the refresh),
//! and the resource it protects answers 403, not 401, to a revoked token.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::json;
use support::{json_response, spawn_server, Client, Proxy};
use tokio::sync::{watch, Notify};

/// How long the server takes to answer a refresh (its database work), the old access token already revoked.
const REFRESH_TIME: Duration = Duration::from_millis(300);

#[derive(Default)]
struct State {
    /// The refresh token the server accepts now.
    refresh: String,
    /// Access tokens the resource accepts.
    valid: HashSet<String>,
    /// Tokens issued so far.
    issued: usize,
    /// Calls to the token endpoint.
    token_calls: usize,
    /// Tells waiters each new count of token calls.
    calls: watch::Sender<usize>,
    /// Resource answers refusing a token, by the generation of the token refused.
    refused: BTreeMap<usize, usize>,
    /// Resource answers accepting a token.
    accepted: usize,
    /// Requests to `/always403`.
    forbidden: usize,
    /// Access tokens issued with this lifetime (seconds).
    expires_in: u64,
    /// Hold the next `/res-slow/` request before checking its token, until `release` is notified.
    hold: bool,
    /// Notified when a held request has arrived.
    arrived: Arc<Notify>,
    /// Lets a held request go on to its token check.
    release: Arc<Notify>,
}

/// The authorization server and its resource, on one port:
/// - `POST /token`: the refresh-token grant; redeeming the refresh token revokes every access token issued before,
///   then the answer comes [`REFRESH_TIME`] later with `tok-N` and `rt-N`;
/// - `GET /res/…`: 200 to a valid token, 403 to any other;
/// - `GET /res-bearer/…`: 200 to a valid token, else 400 with `WWW-Authenticate: Bearer error="invalid_token"`;
/// - `GET /res-slow/…`: as `/res/`, but the request armed with [`RevokingServer::hold_next`] checks its token only
///   once the test releases it (a resource that validates late);
/// - `GET /always403`: 403 to every request.
struct RevokingServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    _stop: watch::Sender<()>,
}

impl RevokingServer {
    async fn start(expires_in: u64) -> RevokingServer {
        let state = Arc::new(Mutex::new(State { refresh: "rt-seed".into(), expires_in, ..State::default() }));
        let shared = Arc::clone(&state);
        let (addr, stop) = spawn_server(move |req: Request<Incoming>| serve(Arc::clone(&shared), req)).await;
        RevokingServer { addr, state, _stop: stop }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn token_calls(&self) -> usize {
        self.state.lock().unwrap().token_calls
    }

    /// Returns once the token endpoint has been called `n` times in all.
    async fn wait_token_calls(&self, n: usize) {
        let mut calls = self.state.lock().unwrap().calls.subscribe();
        calls.wait_for(|&c| c >= n).await.expect("the server is running");
    }

    fn refused(&self) -> usize {
        self.state.lock().unwrap().refused.values().sum()
    }

    /// Holds the next `/res-slow/` request before its token check; returns (arrived, release).
    fn hold_next(&self) -> (Arc<Notify>, Arc<Notify>) {
        let mut s = self.state.lock().unwrap();
        s.hold = true;
        (Arc::clone(&s.arrived), Arc::clone(&s.release))
    }

    /// Revokes every access token (an administrator's action), without a rotation.
    fn revoke_all(&self) {
        self.state.lock().unwrap().valid.clear();
    }
}

async fn serve(state: Arc<Mutex<State>>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let bearer = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned();
    let body = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    if path == "/token" {
        let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
        let field = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str()).unwrap_or_default();
        {
            let mut s = state.lock().unwrap();
            s.token_calls += 1;
            s.calls.send_replace(s.token_calls);
            if field("grant_type") != "refresh_token" || field("refresh_token") != s.refresh {
                return json_response(StatusCode::BAD_REQUEST, json!({ "error": "invalid_grant" }));
            }
            // Redemption revokes the old access token at once, before the answer is ready.
            s.refresh.clear();
            s.valid.clear();
        }
        tokio::time::sleep(REFRESH_TIME).await;
        let mut s = state.lock().unwrap();
        s.issued += 1;
        let n = s.issued;
        s.refresh = format!("rt-{n}");
        s.valid.insert(format!("tok-{n}"));
        let body = json!({
            "access_token": format!("tok-{n}"),
            "token_type": "Bearer",
            "expires_in": s.expires_in,
            "refresh_token": format!("rt-{n}"),
        });
        return json_response(StatusCode::OK, body);
    }
    let held = {
        let mut s = state.lock().unwrap();
        let held = path.starts_with("/res-slow/") && std::mem::take(&mut s.hold);
        held.then(|| (Arc::clone(&s.arrived), Arc::clone(&s.release)))
    };
    if let Some((arrived, release)) = held {
        let released = release.notified();
        arrived.notify_one();
        released.await;
    }
    let mut s = state.lock().unwrap();
    if path == "/always403" {
        s.forbidden += 1;
        return json_response(StatusCode::FORBIDDEN, json!({ "detail": "You do not have permission." }));
    }
    if s.valid.contains(&bearer) {
        s.accepted += 1;
        return json_response(StatusCode::OK, json!({ "token": bearer }));
    }
    let generation = bearer.strip_prefix("tok-").and_then(|n| n.parse().ok()).unwrap_or(0);
    *s.refused.entry(generation).or_default() += 1;
    if path.starts_with("/res-bearer/") {
        let mut response = json_response(StatusCode::BAD_REQUEST, json!({ "detail": "bad token" }));
        let challenge = "Bearer realm=\"api\", error=\"invalid_token\", error_description=\"revoked\"";
        response.headers_mut().insert(http::header::WWW_AUTHENTICATE, challenge.parse().unwrap());
        return response;
    }
    json_response(StatusCode::FORBIDDEN, json!({ "detail": "Authentication credentials were not provided." }))
}

/// tokenproxy in front of `server` with a refresh-token session; `provider` and `route` are extra TOML lines.
async fn proxy(server: &RevokingServer, dir: &tempfile::TempDir, provider: &str, route: &str) -> Proxy {
    std::fs::write(dir.path().join("seed"), "rt-seed\n").unwrap();
    let toml = format!(
        r#"
[state]
dir = "{state}"
[providers.app]
token_url = "{url}/token"
grant = "refresh_token"
client_id = "client-1"
client_secret = "s3cret-value"
refresh_token_file = "{seed}"
{provider}
[[routes]]
name = "app"
prefix = "/"
upstream = "{url}"
provider = "app"
{route}
"#,
        state = dir.path().join("state").display(),
        seed = dir.path().join("seed").display(),
        url = server.url(),
    );
    let proxy = Proxy::start(&toml).await;
    proxy.wait_ready().await;
    proxy
}

/// What steady traffic met across rotations.
#[derive(Debug)]
struct Traffic {
    requests: usize,
    failed: usize,
    rotations: usize,
}

/// Four callers send requests one after another until the server has rotated the session `rotations` more times.
async fn steady_traffic(server: &RevokingServer, proxy: &Proxy, rotations: usize) -> Traffic {
    let first = server.token_calls();
    let done = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..4)
        .map(|caller| {
            let (done, url, client) = (Arc::clone(&done), proxy.url(&format!("/res/{caller}")), Client::new());
            tokio::spawn(async move {
                let (mut requests, mut failed) = (0, 0);
                while !done.load(Ordering::Relaxed) {
                    requests += 1;
                    if client.get(&url).await.status != 200 {
                        failed += 1;
                    }
                }
                (requests, failed)
            })
        })
        .collect();
    tokio::time::timeout(Duration::from_secs(60), server.wait_token_calls(first + rotations))
        .await
        .expect("the session rotates about once a second");
    done.store(true, Ordering::Relaxed);
    let mut traffic = Traffic { requests: 0, failed: 0, rotations: server.token_calls() - first };
    for caller in callers {
        let (requests, failed) = caller.await.unwrap();
        traffic.requests += requests;
        traffic.failed += failed;
    }
    traffic
}

/// The `q` quantile of a histogram from its buckets, interpolated within a bucket (as PromQL's `histogram_quantile`).
async fn quantile(proxy: &Proxy, name: &str, q: f64) -> f64 {
    let text = Client::new().get(&proxy.admin_url("/metrics")).await.text();
    let buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}_bucket{{")))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    let total = buckets.last().map_or(0.0, |b| b.1);
    let rank = q * total;
    let mut previous = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return previous.0;
            }
            return previous.0 + (le - previous.0) * (rank - previous.1) / (count - previous.1).max(1.0);
        }
        previous = (le, count);
    }
    f64::NAN
}

// Tokens live 2 s; `refresh_at = 0.5` rotates the session about once a second, each refresh taking 300 ms.
const FAST_ROTATION: &str = "refresh_at = 0.5";

#[tokio::test]
async fn rotations_cost_no_request_when_requests_wait_for_the_new_token() {
    let server = RevokingServer::start(2).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy(&server, &dir, FAST_ROTATION, "").await;
    let traffic = steady_traffic(&server, &proxy, 6).await;
    let waits = proxy.metric("tokenproxy_refresh_wait_seconds_count").await;
    let (p50, p99) = (
        quantile(&proxy, "tokenproxy_refresh_wait_seconds", 0.5).await,
        quantile(&proxy, "tokenproxy_refresh_wait_seconds", 0.99).await,
    );
    let mean = proxy.metric("tokenproxy_refresh_wait_seconds_sum").await / waits;
    let caught = proxy.metric("tokenproxy_replays_total").await;
    eprintln!(
        "during_refresh = wait (default): {traffic:?}; {waits} waits, mean {mean:.3} s, p50 {p50:.3} s, \
         p99 {p99:.3} s; {caught} requests in flight at a revocation replayed"
    );
    assert!(traffic.rotations >= 6, "{traffic:?}");
    assert_eq!(traffic.failed, 0, "no request fails at a rotation: {traffic:?}");
    assert!(waits >= 1.0, "requests waited for the new tokens: {waits}");
    assert!(p99 <= 1.0, "a wait is about the refresh call's time ({REFRESH_TIME:?}): p99 {p99} s");
    // The in-flight requests the IdP's revocation caught were replayed without a token call of their own.
    assert_eq!(proxy.metric("tokenproxy_token_refreshes_total{provider=\"app\",reason=\"unauthorized\"}").await, 0.0);
}

#[tokio::test]
async fn with_use_current_the_same_traffic_fails_at_every_rotation() {
    let server = RevokingServer::start(2).await;
    let dir = tempfile::tempdir().unwrap();
    let provider = format!("{FAST_ROTATION}\nduring_refresh = \"use_current\"");
    let proxy = proxy(&server, &dir, &provider, "").await;
    let traffic = steady_traffic(&server, &proxy, 6).await;
    let per_rotation = traffic.failed as f64 / traffic.rotations as f64;
    eprintln!("during_refresh = use_current: {traffic:?}; {per_rotation:.1} failed requests per rotation");
    assert!(traffic.failed > 0, "the old token, revoked at redemption, was sent during refreshes: {traffic:?}");
    assert_eq!(proxy.metric("tokenproxy_refresh_wait_seconds_count").await, 0.0);
    // The failures are the old generations' 403s, spread over the rotations.
    let refused = server.state.lock().unwrap().refused.len();
    assert!(refused >= 3, "403s at {refused} of {} rotations", traffic.rotations);
}

#[tokio::test]
async fn a_403_meaning_bad_token_gets_one_refresh_and_one_replay_per_generation() {
    let server = RevokingServer::start(300).await;
    let dir = tempfile::tempdir().unwrap();
    // No budget between refusals here: each generation shows its own refresh (the budget has its own test below).
    let proxy = proxy(&server, &dir, "unauthorized_refresh_interval = \"0s\"", "retry_on_status = [401, 403]").await;
    let client = Client::new();
    for round in 1..=3 {
        let before = server.token_calls();
        server.revoke_all();
        let requests: Vec<_> = (0..20)
            .map(|i| {
                let (client, url) = (client.clone(), proxy.url(&format!("/res/{i}")));
                tokio::spawn(async move { client.get(&url).await })
            })
            .collect();
        for request in requests {
            let reply = request.await.unwrap();
            assert_eq!(reply.status, 200, "{}", reply.text());
            assert_eq!(reply.json()["token"], format!("tok-{}", round + 1), "replayed with the new token");
        }
        assert_eq!(server.token_calls(), before + 1, "one refresh for the 20 refused requests of round {round}");
        let replays = proxy.metric("tokenproxy_replays_total{outcome=\"success\",route=\"app\"}").await;
        assert_eq!(replays, server.refused() as f64, "each refused request was replayed once");
    }
}

#[tokio::test]
async fn a_403_is_delivered_as_is_when_the_route_does_not_list_it() {
    let server = RevokingServer::start(300).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy(&server, &dir, "", "").await;
    server.revoke_all();
    let before = server.token_calls();
    let reply = Client::new().get(&proxy.url("/res/x")).await;
    assert_eq!(reply.status, 403, "retry_on_status = [401] by default: a 403 is the upstream's answer");
    assert_eq!(server.token_calls(), before);
    assert_eq!(proxy.metric("tokenproxy_replays_total").await, 0.0);
}

#[tokio::test]
async fn an_always_403_endpoint_cannot_turn_requests_into_token_calls() {
    let server = RevokingServer::start(300).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy(&server, &dir, "", "retry_on_status = [401, 403]").await;
    let client = Client::new();
    let before = server.token_calls();
    let concurrent: Vec<_> = (0..50)
        .map(|_| {
            let (client, url) = (client.clone(), proxy.url("/always403"));
            tokio::spawn(async move { client.get(&url).await.status })
        })
        .collect();
    for request in concurrent {
        assert_eq!(request.await.unwrap(), 403);
    }
    for _ in 0..50 {
        assert_eq!(client.get(&proxy.url("/always403")).await.status, 403);
    }
    let calls = server.token_calls() - before;
    eprintln!("100 requests to an always-403 endpoint with retry_on_status = [401, 403]: {calls} token call(s)");
    assert_eq!(calls, 1, "one refresh per unauthorized_refresh_interval (30 s), whatever the traffic");
    // The other paths were never disturbed: the token of the one refresh serves them.
    assert_eq!(client.get(&proxy.url("/res/x")).await.status, 200);
    assert!(
        proxy.metric("tokenproxy_token_refreshes_skipped_total{provider=\"app\",reason=\"unauthorized\"}").await > 0.0
    );
}

#[tokio::test]
async fn a_bearer_invalid_token_challenge_counts_whatever_its_status() {
    let server = RevokingServer::start(300).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy(&server, &dir, "", "").await;
    server.revoke_all();
    let before = server.token_calls();
    let reply = Client::new().get(&proxy.url("/res-bearer/x")).await;
    assert_eq!(reply.status, 200, "a 400 saying Bearer error=\"invalid_token\" is a refused token: {}", reply.text());
    assert_eq!(reply.json()["token"], "tok-2");
    assert_eq!(server.token_calls(), before + 1);
}

#[tokio::test]
async fn a_request_in_flight_when_the_refresh_revokes_its_token_is_replayed_with_the_new_one() {
    let server = RevokingServer::start(300).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy(&server, &dir, "manual_refresh_interval = \"0s\"", "").await;
    let client = Client::new();
    // A request carrying tok-1 reaches the resource, which checks the token late.
    let (arrived, release) = server.hold_next();
    let request = {
        let (client, url) = (client.clone(), proxy.url("/res-slow/x"));
        tokio::spawn(async move { client.get(&url).await })
    };
    arrived.notified().await;
    // Meanwhile a refresh is sent; the server revokes tok-1 on redemption and answers 300 ms later.
    let before = server.token_calls();
    let refresh = {
        let (client, url) = (client.clone(), proxy.admin_url("/tokens/app/refresh"));
        tokio::spawn(async move { client.post(&url, Bytes::new()).await.status })
    };
    server.wait_token_calls(before + 1).await;
    release.notify_one();
    // The 403 the revoked tok-1 met is replayed once the refresh in flight brings tok-2; no call of its own.
    let reply = request.await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["token"], "tok-2");
    assert_eq!(refresh.await.unwrap(), 200);
    assert_eq!(server.token_calls(), before + 1);
    assert_eq!(proxy.metric("tokenproxy_replays_total{outcome=\"success\",route=\"app\"}").await, 1.0);
    assert_eq!(proxy.metric("tokenproxy_token_refreshes_total{provider=\"app\",reason=\"unauthorized\"}").await, 0.0);
}
