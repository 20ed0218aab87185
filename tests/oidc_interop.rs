//! Interop with a real OpenID provider: the `tokenproxy` binary in front of a JWT-checking upstream,
//! getting client_credentials tokens from npm `oidc-provider` 9.13.3 (see `tests/idp/README.md`).
//!
//! - both client authentication methods (client_secret_basic from a secret file, client_secret_post
//!   inline) yield tokens the upstream accepts;
//! - tokens of a 5 s lifetime are refreshed ahead of expiry across several lifetimes, with about one
//!   token call per refresh, no request ever carrying an expired token, and `/tokens` leaking nothing;
//! - a client the provider refuses (`invalid_client`) keeps `/readyz` at 503 and its route answers a
//!   `token_unavailable` problem, while other providers keep working.
//!
//! Needs `node` >= 20 and `npm` on PATH (`tests/idp/node_modules` is installed by `npm ci` on first use).

mod support;

use std::collections::HashSet;
use std::time::Duration;

use hyper::body::Bytes;
use hyper::{Method, StatusCode};
use serde_json::Value;
use support::oidc::{IdpProcess, UpstreamProcess, BASIC_CLIENT, POST_CLIENT};
use support::{eventually, toml_string, TokenProxyProcess};

/// How long a provider may take to hold a valid token.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// One `[providers.NAME]` table for a client_credentials client of the test provider.
fn provider_toml(name: &str, token_url: &str, client_id: &str, client_auth: &str, secret: &str) -> String {
    format!(
        "[providers.{name}]\n\
         token_url = {token_url}\n\
         grant = \"client_credentials\"\n\
         client_id = {client_id}\n\
         {secret}\n\
         client_auth = {client_auth}\n\
         scope = \"api.read api.write\"\n\
         refresh_at = 0.75\n\
         expiry_skew = \"1s\"\n\
         timeout = \"3s\"\n\n",
        token_url = toml_string(token_url),
        client_id = toml_string(client_id),
        client_auth = toml_string(client_auth),
    )
}

/// One `[[routes]]` entry from `prefix` to `upstream`, with `provider`'s token.
fn route_toml(name: &str, prefix: &str, upstream: &str, provider: &str, strip_prefix: bool) -> String {
    format!(
        "[[routes]]\n\
         name = {name}\n\
         prefix = {prefix}\n\
         upstream = {upstream}\n\
         strip_prefix = {strip_prefix}\n\
         provider = {provider}\n\n",
        name = toml_string(name),
        prefix = toml_string(prefix),
        upstream = toml_string(upstream),
        provider = toml_string(provider),
    )
}

/// The provider, the upstream, and tokenproxy with two providers: `basic` (tp-basic,
/// client_secret_basic, secret from a file ending in a newline) on route `/basic` (prefix stripped) and
/// `post` (tp-post, client_secret_post, inline secret) on route `/post` (prefix kept).
struct Harness {
    // Field order is drop order: the proxy goes first, then the processes it talks to.
    proxy: TokenProxyProcess,
    upstream: UpstreamProcess,
    idp: IdpProcess,
}

impl Harness {
    async fn start(token_ttl_secs: u64) -> Harness {
        let idp = IdpProcess::start(token_ttl_secs).await;
        let upstream = UpstreamProcess::start(&idp).await;
        let token_url = idp.token_endpoint().await;

        let dir = tempfile::tempdir().expect("temp dir");
        let secret_file = dir.path().join("tp-basic.secret");
        std::fs::write(&secret_file, format!("{}\n", BASIC_CLIENT.1)).expect("write secret file");

        let mut config = String::new();
        config += &provider_toml(
            "basic",
            &token_url,
            BASIC_CLIENT.0,
            "client_secret_basic",
            &format!("client_secret_file = {}", toml_string(&secret_file.to_string_lossy())),
        );
        config += &provider_toml(
            "post",
            &token_url,
            POST_CLIENT.0,
            "client_secret_post",
            &format!("client_secret = {}", toml_string(POST_CLIENT.1)),
        );
        config += &route_toml("basic", "/basic", &upstream.url, "basic", true);
        config += &route_toml("post", "/post", &upstream.url, "post", false);

        let proxy = TokenProxyProcess::start(dir, &config).await;
        proxy.wait_ready().await;
        Harness { proxy, upstream, idp }
    }
}

/// `/tokens` on the admin listener.
async fn admin_tokens(proxy: &TokenProxyProcess) -> Value {
    let reply = proxy.admin_get("/tokens").await;
    assert_eq!(reply.status, StatusCode::OK, "/tokens: {}", reply.text());
    reply.json()
}

/// Asserts that `text` (named `what`) contains none of `tokens` (nor their signatures) and no secret.
fn assert_no_secrets(what: &str, text: &str, tokens: &HashSet<String>) {
    for secret in [BASIC_CLIENT.1, POST_CLIENT.1] {
        assert!(!text.contains(secret), "{what} contains the client secret {secret:?}");
    }
    for token in tokens {
        assert!(!text.contains(token.as_str()), "{what} contains an access token");
        if let Some(signature) = token.rsplit('.').next().filter(|s| s.len() >= 32) {
            assert!(!text.contains(signature), "{what} contains an access token's signature");
        }
    }
}

#[tokio::test]
async fn both_client_auth_methods_get_tokens_the_upstream_accepts() {
    // A long lifetime: no refresh during this test, so the counts below are exact.
    let h = Harness::start(300).await;

    let reply = h.proxy.get("/basic/hello?x=1").await;
    assert_eq!(reply.status, StatusCode::OK, "/basic: {}", reply.text());
    let seen = reply.json();
    assert_eq!(seen["client_id"], BASIC_CLIENT.0, "{seen}");
    assert_eq!(seen["path"], "/hello?x=1", "strip_prefix = true: {seen}");

    let reply = h
        .proxy
        .request(Method::POST, "/post/items", &[("content-type", "text/plain")], Bytes::from_static(b"payload"))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "/post: {}", reply.text());
    let seen = reply.json();
    assert_eq!(seen["client_id"], POST_CLIENT.0, "{seen}");
    assert_eq!(seen["method"], "POST", "{seen}");
    assert_eq!(seen["path"], "/post/items", "strip_prefix = false: {seen}");

    // The caller's own Authorization is replaced (incoming_authorization defaults to "replace").
    let reply = h
        .proxy
        .request(Method::GET, "/basic/own-auth", &[("authorization", "Bearer not-a-real-token")], Bytes::new())
        .await;
    assert_eq!(reply.status, StatusCode::OK, "caller's Authorization must be replaced: {}", reply.text());

    let upstream = h.upstream.stats().await;
    assert_eq!(upstream["ok"], 3, "upstream: {upstream}");
    assert_eq!(upstream["unauthorized"], 0, "upstream: {upstream}");
    assert_eq!(upstream["clients"][BASIC_CLIENT.0]["ok"], 2, "upstream: {upstream}");
    assert_eq!(upstream["clients"][POST_CLIENT.0]["ok"], 1, "upstream: {upstream}");

    // The provider refuses a client that authenticates with a method other than its registered one,
    // so these 200s already prove the method; the per-method counts say it outright.
    let idp = h.idp.stats().await;
    for (client, method) in [(BASIC_CLIENT.0, "client_secret_basic"), (POST_CLIENT.0, "client_secret_post")] {
        let entry = &idp["clients"][client];
        let methods = entry["auth_methods"].as_object().unwrap_or_else(|| panic!("{client} never called: {idp}"));
        assert_eq!(methods.keys().collect::<Vec<_>>(), vec![method], "{client} must use {method}: {idp}");
        assert_eq!(entry["error"], 0, "{client}: {idp}");
        assert_eq!(entry["ok"], 1, "one startup token for {client}, no more: {idp}");
    }
}

#[tokio::test]
async fn tokens_are_refreshed_ahead_of_expiry_across_several_lifetimes() {
    // Must match provider_toml(): refresh_at = 0.75, expiry_skew = "1s".
    const LIFETIME_SECS: f64 = 5.0;
    const REFRESH_AT: f64 = 0.75;
    const EXPIRY_SKEW_SECS: f64 = 1.0;
    const TICK: Duration = Duration::from_millis(200);
    const TICKS: u32 = 85; // ≈ 17 s: more than three lifetimes
    let h = Harness::start(LIFETIME_SECS as u64).await;

    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for tick in 0..TICKS {
        ticker.tick().await;
        let (basic, post) = tokio::join!(h.proxy.get("/basic/tick"), h.proxy.get("/post/tick"));
        for (route, reply) in [("/basic", basic), ("/post", post)] {
            assert_eq!(
                reply.status,
                StatusCode::OK,
                "{route} at tick {tick} ({:?} after start): {} {:?}",
                h.proxy.started_at.elapsed(),
                reply.text(),
                reply.header("x-tokenproxy-error"),
            );
        }
    }

    // The upstream never saw an expired (or otherwise bad) token, and saw several generations.
    let upstream = h.upstream.stats().await;
    assert_eq!(upstream["expired"], 0, "a request carried an expired token: {upstream}");
    assert_eq!(upstream["unauthorized"], 0, "upstream: {upstream}");
    assert_eq!(upstream["ok"], u64::from(TICKS) * 2, "upstream: {upstream}");

    // About one token call per refresh. The earliest a refresh may start (SPEC, Token timing) is
    // min(refresh_at·L, L − S) − 10 % of L = min(3.75, 4) − 0.5 = 3.25 s after the previous token
    // arrived, so in `elapsed` seconds there are at most 1 + elapsed / 3.25 calls (one slack for a
    // refresh racing this read). And every token fetched was used, save at most the newest one.
    let skew = EXPIRY_SKEW_SECS.min(LIFETIME_SECS / 4.0);
    let shortest_refresh_interval = (REFRESH_AT * LIFETIME_SECS).min(LIFETIME_SECS - skew) - 0.1 * LIFETIME_SECS;
    for (client, _) in [BASIC_CLIENT, POST_CLIENT] {
        let calls = h.idp.token_calls(client).await;
        let elapsed = h.proxy.started_at.elapsed().as_secs_f64();
        let max_calls = 2 + (elapsed / shortest_refresh_interval).floor() as u64;
        let distinct = upstream["clients"][client]["distinct_jti"].as_u64().unwrap_or(0);
        assert!(distinct >= 3, "{client}: only {distinct} distinct tokens reached the upstream: {upstream}");
        assert_eq!(calls.error + calls.injected, 0, "{client}: refused token calls: {calls:?}");
        assert!(calls.ok >= 3, "{client}: {calls:?}");
        assert!(
            calls.ok <= max_calls,
            "{client}: {} token calls in {elapsed:.1} s, at most {max_calls} expected",
            calls.ok
        );
        assert!(
            calls.ok <= distinct + 1,
            "{client}: {} token calls but only {distinct} tokens were ever used",
            calls.ok
        );
    }

    // /tokens: every provider valid, refreshed several times, with a fingerprint.
    let tokens = eventually("both providers 'valid' in /tokens", Duration::from_secs(3), || async {
        let body = admin_tokens(&h.proxy).await;
        let valid = ["basic", "post"].iter().all(|p| body["providers"][*p]["state"] == "valid");
        valid.then_some(body)
    })
    .await;
    for provider in ["basic", "post"] {
        let status = &tokens["providers"][provider];
        let refreshes = status["refreshes"].as_u64().unwrap_or_else(|| panic!("no refreshes for {provider}: {tokens}"));
        assert!(refreshes >= 3, "{provider}: refreshes {refreshes}: {tokens}");
        let fingerprint = status["fingerprint"].as_str().unwrap_or_else(|| panic!("no fingerprint: {tokens}"));
        assert!(
            fingerprint.len() == 8 && fingerprint.chars().all(|c| c.is_ascii_hexdigit()),
            "{provider}: fingerprint {fingerprint:?} is not 8 hex digits"
        );
    }

    // The fingerprint is the first 8 hex of SHA-256 of the token being sent: compare it with what the
    // upstream received, on a request made while the fingerprint did not change.
    for (provider, route, client) in [("basic", "/basic/fp", BASIC_CLIENT.0), ("post", "/post/fp", POST_CLIENT.0)] {
        let mut matched = false;
        for _ in 0..5 {
            let before = admin_tokens(&h.proxy).await["providers"][provider]["fingerprint"].clone();
            let reply = h.proxy.get(route).await;
            assert_eq!(reply.status, StatusCode::OK, "{route}: {}", reply.text());
            let after = admin_tokens(&h.proxy).await["providers"][provider]["fingerprint"].clone();
            if before != after {
                continue; // a refresh happened in between: look again
            }
            let stats = h.upstream.stats().await;
            let sha = stats["clients"][client]["last_token_sha256"].as_str().unwrap_or_default().to_owned();
            let fingerprint = before.as_str().unwrap_or_default().to_ascii_lowercase();
            assert!(
                sha.starts_with(&fingerprint),
                "{provider}: fingerprint {fingerprint} but the token sent hashes to {sha}"
            );
            matched = true;
            break;
        }
        assert!(matched, "{provider}: the fingerprint changed on every one of 5 looks");
    }

    // No token and no secret anywhere tokenproxy reports: admin output and its own logs.
    let seen: HashSet<String> = h.upstream.tokens_seen().await.into_iter().collect();
    assert!(seen.len() >= 6, "the upstream saw {} tokens", seen.len());
    assert_no_secrets("/tokens", &admin_tokens(&h.proxy).await.to_string(), &seen);
    for path in ["/readyz", "/metrics"] {
        assert_no_secrets(path, &h.proxy.admin_get(path).await.text(), &seen);
    }
    assert_no_secrets("tokenproxy's logs", &h.proxy.logs(), &seen);
}

#[tokio::test]
async fn a_client_the_provider_refuses_keeps_readyz_503_and_its_route_answers_token_unavailable() {
    const WRONG_SECRET: &str = "not-the-tp-basic-secret";
    let idp = IdpProcess::start(300).await;
    let upstream = UpstreamProcess::start(&idp).await;
    let token_url = idp.token_endpoint().await;

    let mut config = String::new();
    config += &provider_toml(
        "wrong",
        &token_url,
        BASIC_CLIENT.0,
        "client_secret_basic",
        &format!("client_secret = {}", toml_string(WRONG_SECRET)),
    );
    config += &provider_toml(
        "post",
        &token_url,
        POST_CLIENT.0,
        "client_secret_post",
        &format!("client_secret = {}", toml_string(POST_CLIENT.1)),
    );
    config += &route_toml("wrong", "/wrong", &upstream.url, "wrong", true);
    config += &route_toml("post", "/post", &upstream.url, "post", true);
    let proxy = TokenProxyProcess::start(tempfile::tempdir().expect("temp dir"), &config).await;

    let readyz = |what: &'static str| {
        let proxy = &proxy;
        async move {
            let reply = proxy.admin_get("/readyz").await;
            assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "/readyz {what}: {}", reply.text());
            reply.json()
        }
    };
    // last_error's shape is the implementation's (a string or an object): look at its JSON text.
    let refused = |body: &Value| body["providers"]["wrong"]["last_error"].to_string().contains("invalid_client");

    let body = eventually("/readyz to report invalid_client for 'wrong'", Duration::from_secs(10), || async {
        let body = readyz("while the provider refuses the client").await;
        refused(&body).then_some(body)
    })
    .await;
    assert_eq!(body["ready"], false, "{body}");

    let reply = proxy.get("/wrong/anything").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "/wrong: {}", reply.text());
    assert_eq!(reply.header("x-tokenproxy-error"), Some("token_unavailable"), "{:?}", reply.headers);
    let content_type = reply.header("content-type").unwrap_or_default();
    assert!(content_type.starts_with("application/problem+json"), "content-type {content_type:?}");
    assert!(reply.header("retry-after").is_some(), "503 token_unavailable without Retry-After: {:?}", reply.headers);
    let problem = reply.json();
    assert_eq!(problem["code"], "token_unavailable", "{problem}");
    assert_eq!(problem["status"], 503, "{problem}");
    assert_eq!(problem["provider"], "wrong", "{problem}");
    assert!(!reply.text().contains(WRONG_SECRET), "the problem body shows the secret: {problem}");

    // The other provider is unaffected, and nothing was sent upstream for the refused one.
    eventually("'post' to hold a valid token", READY_TIMEOUT, || async {
        (admin_tokens(&proxy).await["providers"]["post"]["state"] == "valid").then_some(())
    })
    .await;
    let reply = proxy.get("/post/fine").await;
    assert_eq!(reply.status, StatusCode::OK, "/post: {}", reply.text());
    let stats = upstream.stats().await;
    assert_eq!(stats["requests"], 1, "only the /post request may reach the upstream: {stats}");

    // It stays that way: readiness keeps failing on the same cause (a short observation window).
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let body = readyz("after the refusal").await;
        assert!(refused(&body), "last_error of 'wrong' lost invalid_client: {body}");
    }

    // invalid_client is permanent: not retried in a loop (a handful of calls at most, none accepted).
    let calls = idp.token_calls(BASIC_CLIENT.0).await;
    assert_eq!(calls.ok, 0, "{calls:?}");
    assert!((1..=6).contains(&calls.error), "token calls for the refused client: {calls:?}");

    let readyz_text = proxy.admin_get("/readyz").await.text();
    let tokens_text = proxy.admin_get("/tokens").await.text();
    for (what, text) in [("/readyz", readyz_text.as_str()), ("/tokens", tokens_text.as_str()), ("logs", &proxy.logs())]
    {
        assert!(!text.contains(WRONG_SECRET), "{what} shows the configured secret");
        assert!(!text.contains(POST_CLIENT.1), "{what} shows the post client's secret");
    }
}

#[tokio::test]
async fn route_profiles_get_one_token_per_audience_from_one_client() {
    const SECOND: &str = "urn:tokenproxy:test-api-2";
    let idp = IdpProcess::start(300).await;
    let first = UpstreamProcess::start(&idp).await;
    let second = UpstreamProcess::start_for_audience(&idp, SECOND).await;
    let token_url = idp.token_endpoint().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = provider_toml(
        "basic",
        &token_url,
        BASIC_CLIENT.0,
        "client_secret_basic",
        &format!("client_secret = {}", toml_string(BASIC_CLIENT.1)),
    );
    config += &route_toml("orders", "/orders", &first.url, "basic", true);
    // Two routes with the same profile (another resource, so another `aud`) share one slot.
    for (name, prefix) in [("reports", "/reports"), ("reports-v2", "/v2/reports")] {
        config += &route_toml(name, prefix, &second.url, "basic", true)
            .replace("provider = \"basic\"\n", &format!("provider = \"basic\"\nresource = {}\n", toml_string(SECOND)));
    }
    let proxy = TokenProxyProcess::start(dir, &config).await;
    proxy.wait_ready().await;

    // Concurrent requests on every route: one token call per slot.
    let requests = (0..20).flat_map(|i| {
        ["/orders/x", "/reports/x", "/v2/reports/x"].map(|route| {
            let proxy = &proxy;
            async move { (route, i, proxy.get(route).await) }
        })
    });
    for (route, i, reply) in futures_util::future::join_all(requests).await {
        assert_eq!(reply.status, StatusCode::OK, "{route} #{i}: {}", reply.text());
        assert_eq!(reply.json()["client_id"], BASIC_CLIENT.0);
    }
    let calls = idp.token_calls(BASIC_CLIENT.0).await;
    assert_eq!((calls.calls, calls.ok), (2, 2), "one client, one token call per audience");
    for (upstream, expected) in [(&first, 20), (&second, 40)] {
        let stats = upstream.stats().await;
        assert_eq!((stats["ok"].as_u64(), stats["invalid"].as_u64()), (Some(expected), Some(0)), "{stats}");
        assert_eq!(stats["distinct_jti"], 1, "each upstream saw one token, for its own aud: {stats}");
    }

    // The profile's slot is named PROVIDER[ROUTE] in /tokens, in metrics, and can be refreshed by that name.
    let tokens = admin_tokens(&proxy).await;
    let names: Vec<&String> = tokens["providers"].as_object().expect("providers").keys().collect();
    assert_eq!(names, ["basic", "basic[reports]"], "{tokens}");
    let metric =
        proxy.metric_sample("tokenproxy_token_requests_total{outcome=\"success\",provider=\"basic[reports]\"}");
    assert_eq!(metric.await, Some(1.0));
    let refresh = proxy.admin_post("/tokens/basic%5Breports%5D/refresh").await;
    assert_eq!(refresh.status, StatusCode::OK, "{}", refresh.text());
    assert_eq!(idp.token_calls(BASIC_CLIENT.0).await.calls, 3);
}
