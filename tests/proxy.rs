//! End-to-end behaviour of the proxy against in-process fakes: single flight, 401 storms, outages, errors,
//! header rewriting and refusal of open-proxy requests.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::{basic_config, eventually, raw_exchange, Client, FakeIdp, FakeUpstream, IdpMode, Proxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_flight_500_concurrent_requests_make_one_token_call() {
    let idp = FakeIdp::start(300).await;
    idp.close(); // hold the startup token call until every request waits on it
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::start(&basic_config(&idp, &upstream)).await;
    idp.wait_calls(1).await;

    let client = Client::new();
    let requests: Vec<_> = (0..500)
        .map(|i| {
            let client = client.clone();
            let url = proxy.url(&format!("/api/item/{i}"));
            tokio::spawn(async move { client.get(&url).await })
        })
        .collect();
    // Every request is now parked on the one call in flight: wait for the proxy to say so.
    eventually("500 requests waiting", Duration::from_secs(30), async || {
        proxy.metric("tokenproxy_singleflight_waiters_total").await >= 500.0
    })
    .await;
    idp.open();
    let mut tokens = HashSet::new();
    for request in requests {
        let reply = request.await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
        tokens.insert(reply.json()["token"].as_str().unwrap().to_owned());
    }
    println!("single flight: 500 concurrent requests -> {} token call(s)", idp.calls());
    assert_eq!(idp.calls(), 1, "exactly one token call for 500 concurrent requests");
    assert_eq!(tokens, HashSet::from(["tok-1".to_owned()]));
    assert_eq!(upstream.requests(), 500);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_of_401s_refreshes_once_and_replays_each_request_once() {
    let idp = FakeIdp::start(300).await;
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::start(&basic_config(&idp, &upstream)).await;
    proxy.wait_ready().await;
    assert_eq!(idp.calls(), 1);
    upstream.revoke("tok-1");
    // All 100 first attempts arrive (with tok-1) before any answer, so each sees the 401 itself.
    upstream.hold_until(100);

    let client = Client::new();
    let requests: Vec<_> = (0..100)
        .map(|i| {
            let client = client.clone();
            let url = proxy.url(&format!("/api/orders/{i}"));
            tokio::spawn(async move { client.post(&url, format!("body of request {i}")).await })
        })
        .collect();
    for (i, request) in requests.into_iter().enumerate() {
        let reply = request.await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
        let echo = reply.json();
        assert_eq!(echo["token"], "tok-2");
        assert_eq!(echo["body"], format!("body of request {i}"), "the replayed body is intact");
    }
    println!("401 storm: 100 requests -> {} token call(s) after startup", idp.calls() - 1);
    assert_eq!(idp.calls(), 2, "one startup call and exactly one refresh for the whole storm");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 200, "each request sent twice: once with tok-1, once replayed with tok-2");
    for i in 0..100 {
        let attempts: Vec<_> = seen.iter().filter(|s| s.uri == format!("/orders/{i}")).collect();
        assert_eq!(attempts.len(), 2);
        assert!(attempts.iter().all(|s| s.body == format!("body of request {i}")));
    }
    assert_eq!(proxy.metric("tokenproxy_replays_total{outcome=\"success\",route=\"api\"}").await, 100.0);
    assert_eq!(proxy.metric("tokenproxy_upstream_unauthorized_total").await, 100.0);
    assert_eq!(proxy.metric("tokenproxy_token_refreshes_total{provider=\"api\",reason=\"unauthorized\"}").await, 1.0);
    proxy.stop().await;
}

#[tokio::test]
async fn second_401_passes_through_and_large_bodies_are_not_replayed() {
    let idp = FakeIdp::start(300).await;
    let upstream = FakeUpstream::start().await;
    let config = basic_config(&idp, &upstream).replace("[providers.api]", "[providers.api]\n");
    let proxy = Proxy::start(&format!("{config}\n")).await;
    proxy.wait_ready().await;
    let client = Client::new();

    let reply = client.get(&proxy.url("/api/always401")).await;
    assert_eq!(reply.status, 401, "the upstream's second 401 passes through");
    assert!(reply.headers.get("x-tokenproxy-error").is_none());
    assert_eq!(reply.json()["error"], "nope");
    assert_eq!(idp.calls(), 2, "one refresh for the first 401");
    assert_eq!(proxy.metric("tokenproxy_replays_total{outcome=\"still_unauthorized\",route=\"api\"}").await, 1.0);

    // A body larger than replay_buffer (64 KiB) streams through, and its 401 passes through unreplayed.
    upstream.revoke("tok-2");
    let big = vec![b'x'; 100 * 1024];
    let reply = client.post(&proxy.url("/api/upload"), big).await;
    assert_eq!(reply.status, 401);
    assert_eq!(proxy.metric("tokenproxy_replays_total{outcome=\"not_replayable\",route=\"api\"}").await, 1.0);
    assert_eq!(upstream.seen().last().unwrap().body.len(), 100 * 1024, "the body was streamed whole");
    proxy.stop().await;
}

/// An endpoint that answers 401 to everything (a permission problem reported as 401) is hammered while other paths
/// are used: one 401-driven token call per `unauthorized_refresh_interval`, and no request on another path fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_always_401_endpoint_cannot_turn_requests_into_token_calls() {
    let idp = FakeIdp::start(300).await;
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::start(&basic_config(&idp, &upstream)).await;
    proxy.wait_ready().await;
    assert_eq!(idp.calls(), 1);
    let client = Client::new();

    let requests: Vec<_> = (0..200)
        .map(|i| {
            let client = client.clone();
            let path = if i % 2 == 0 { format!("/api/always401/{i}") } else { format!("/api/orders/{i}") };
            let url = proxy.url(&path);
            tokio::spawn(async move { (path, client.get(&url).await.status) })
        })
        .collect();
    for request in requests {
        let (path, status) = request.await.unwrap();
        let expected = if path.contains("always401") { 401 } else { 200 };
        assert_eq!(status, expected, "{path}");
    }
    // And 100 more, one after another, after the burst.
    for i in 0..100 {
        assert_eq!(client.get(&proxy.url(&format!("/api/always401/after/{i}"))).await.status, 401);
    }
    println!("always-401 endpoint: 200 requests -> {} token call(s) after startup", idp.calls() - 1);
    assert_eq!(idp.calls(), 2, "one startup call and one 401-driven refresh in the interval");
    assert_eq!(proxy.metric("tokenproxy_token_refreshes_total{provider=\"api\",reason=\"unauthorized\"}").await, 1.0);
    let limited = proxy.metric("tokenproxy_replays_total{outcome=\"rate_limited\",route=\"api\"}").await;
    let skipped =
        proxy.metric("tokenproxy_token_refreshes_skipped_total{provider=\"api\",reason=\"unauthorized\"}").await;
    assert!(limited >= 100.0 && limited == skipped, "rate-limited replays {limited}, skipped refreshes {skipped}");
    let outcomes = ["success", "still_unauthorized", "not_replayable", "rate_limited"];
    let mut replays = 0.0;
    for outcome in outcomes {
        replays += proxy.metric(&format!("tokenproxy_replays_total{{outcome=\"{outcome}\",route=\"api\"}}")).await;
    }
    assert_eq!(replays, 200.0, "every 401 has one replay outcome");
    proxy.stop().await;
}

/// A revoked token is still replaced within one round trip while the budget allows, and the interval is a setting.
#[tokio::test]
async fn a_zero_unauthorized_refresh_interval_refreshes_at_every_new_generation() {
    let idp = FakeIdp::start(300).await;
    let upstream = FakeUpstream::start().await;
    let config = basic_config(&idp, &upstream)
        .replace("[providers.api]", "[providers.api]\nunauthorized_refresh_interval = \"0s\"");
    let proxy = Proxy::start(&config).await;
    proxy.wait_ready().await;
    let client = Client::new();
    for round in 1..=3 {
        upstream.revoke(&format!("tok-{round}"));
        let reply = client.get(&proxy.url("/api/x")).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.json()["token"], format!("tok-{}", round + 1));
    }
    assert_eq!(idp.calls(), 4);
    proxy.stop().await;
}

/// Forced refreshes share a minimum interval (429 with Retry-After inside it), and browsers' cross-site POSTs are
/// refused.
#[tokio::test]
async fn forced_refreshes_are_paced_and_cross_site_posts_refused() {
    let idp = FakeIdp::start(300).await;
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::start(&basic_config(&idp, &upstream)).await;
    proxy.wait_ready().await;
    let client = Client::new();
    let url = proxy.admin_url("/tokens/api/refresh");

    let cross_site = |header: &'static str, value: &'static str| {
        let mut request = Request::post(url.as_str()).body(Full::new(Bytes::new())).unwrap();
        request.headers_mut().insert(header, value.parse().unwrap());
        request
    };
    for (header, value) in [
        ("sec-fetch-site", "cross-site"),
        ("sec-fetch-site", "same-site"),
        ("origin", "http://evil.example"),
        ("origin", "null"),
    ] {
        let reply = client.send(cross_site(header, value)).await;
        assert_eq!(reply.status, 403, "{header}: {value}: {}", reply.text());
    }
    assert_eq!(idp.calls(), 1, "no refresh for a cross-site request");
    let mut statuses = Vec::new();
    for _ in 0..30 {
        let reply = client.post(&url, Bytes::new()).await;
        if reply.status == 429 {
            let retry: u64 = reply.headers["retry-after"].to_str().unwrap().parse().unwrap();
            assert!((1..=10).contains(&retry), "{retry}");
        }
        statuses.push(reply.status);
    }
    println!("30 forced refreshes -> {} token call(s)", idp.calls() - 1);
    assert_eq!(statuses[0], 200);
    assert!(statuses[1..].iter().all(|s| *s == 429), "{statuses:?}");
    assert_eq!(idp.calls(), 2, "one token call for 30 forced refreshes");
    assert_eq!(
        proxy.metric("tokenproxy_token_refreshes_skipped_total{provider=\"api\",reason=\"manual\"}").await,
        29.0
    );
    proxy.stop().await;
}

#[tokio::test]
async fn idp_outage_with_a_valid_token_fails_no_request() {
    let idp = FakeIdp::start(300).await;
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::start(&basic_config(&idp, &upstream)).await;
    proxy.wait_ready().await;
    idp.set_mode(IdpMode::Fail { status: 503, body: "maintenance".into(), retry_after: None });
    let client = Client::new();
    // A forced refresh fails against the IdP...
    let refresh = client.post(&proxy.admin_url("/tokens/api/refresh"), Bytes::new()).await;
    assert_eq!(refresh.status, 502, "{}", refresh.text());
    assert!(refresh.text().contains("HTTP 503"), "{}", refresh.text());
    // ...and every request keeps using the still-valid token.
    for i in 0..50 {
        let reply = client.get(&proxy.url(&format!("/api/during-outage/{i}"))).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.json()["token"], "tok-1");
    }
    let tokens = client.get(&proxy.admin_url("/tokens")).await.json();
    assert_eq!(tokens["providers"]["api"]["state"], "valid");
    assert!(tokens["providers"]["api"]["last_error"].as_str().unwrap().contains("503"));
    assert_eq!(client.get(&proxy.admin_url("/readyz")).await.status, 200);
    proxy.stop().await;
}

#[tokio::test]
async fn no_token_gives_503_problem_json() {
    let idp = FakeIdp::start(300).await;
    idp.set_mode(IdpMode::Fail { status: 503, body: "down".into(), retry_after: Some(30) });
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::start(&basic_config(&idp, &upstream)).await;
    idp.wait_calls(1).await;
    let client = Client::new();
    let reply = client.get(&proxy.url("/api/x")).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.headers["content-type"], "application/problem+json");
    assert_eq!(reply.headers["x-tokenproxy-error"], "token_unavailable");
    let retry_after: u64 = reply.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry_after), "Retry-After follows the IdP's backoff: {retry_after}");
    let body = reply.json();
    assert_eq!(body["type"], "urn:tokenproxy:error:token_unavailable");
    assert_eq!(body["code"], "token_unavailable");
    assert_eq!(body["status"], 503);
    assert_eq!(body["route"], "api");
    assert_eq!(body["provider"], "api");
    assert!(!reply.text().contains("s3cret-value"));
    assert_eq!(upstream.requests(), 0, "nothing was sent upstream without a token");
    let ready = client.get(&proxy.admin_url("/readyz")).await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["ready"], false);
    assert_eq!(idp.calls(), 1, "Retry-After: 30 is honoured: no second call yet");
    proxy.stop().await;
}

#[tokio::test]
async fn permanent_idp_errors_are_not_retried_in_a_loop_but_transient_ones_are() {
    let upstream = FakeUpstream::start().await;
    let permanent = FakeIdp::start(300).await;
    permanent.set_mode(IdpMode::Fail {
        status: 401,
        body: r#"{"error":"invalid_client","error_description":"client authentication failed"}"#.into(),
        retry_after: None,
    });
    let transient = FakeIdp::start(300).await;
    transient.set_mode(IdpMode::Fail { status: 502, body: "<html>bad gateway</html>".into(), retry_after: None });
    let config = format!(
        r#"
[providers.perm]
token_url = "{}"
client_id = "c"
client_secret = "s3cret-value"
[providers.trans]
token_url = "{}"
client_id = "c"
client_secret = "s3cret-value"
[[routes]]
prefix = "/perm"
upstream = "{}"
provider = "perm"
[[routes]]
prefix = "/trans"
upstream = "{}"
provider = "trans"
"#,
        permanent.token_url(),
        transient.token_url(),
        upstream.url(),
        upstream.url()
    );
    let proxy = Proxy::start(&config).await;
    // Transient: retried with a backoff that starts within a second (full jitter), so a few calls come quickly.
    transient.wait_calls(3).await;
    // Permanent: one call, then a backoff in minutes.
    assert_eq!(permanent.calls(), 1);
    let client = Client::new();
    let ready = client.get(&proxy.admin_url("/readyz")).await;
    assert_eq!(ready.status, 503);
    let body = ready.json();
    let perm_error = body["providers"]["perm"]["last_error"].as_str().unwrap();
    assert!(perm_error.contains("invalid_client") && perm_error.contains("client authentication failed"));
    assert!(body["providers"]["trans"]["last_error"].as_str().unwrap().contains("502"));
    let reply = client.get(&proxy.url("/perm/x")).await;
    assert_eq!(reply.status, 503);
    let retry_after: u64 = reply.headers["retry-after"].to_str().unwrap().parse().unwrap();
    // The first permanent backoff is 30–60 s; waiting for the transient provider's retries took up to 3 s of it.
    assert!(retry_after >= 20, "permanent errors back off in minutes: Retry-After {retry_after}");
    assert_eq!(permanent.calls(), 1, "requests do not trigger token calls during a backoff");
    assert!(!client.get(&proxy.admin_url("/metrics")).await.text().contains("s3cret-value"));
    proxy.stop().await;
}

#[tokio::test]
async fn tokens_that_are_not_header_values_are_refused() {
    let idp = FakeIdp::start(300).await;
    idp.set_mode(IdpMode::BadToken);
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::start(&basic_config(&idp, &upstream)).await;
    idp.wait_calls(1).await;
    let reply = Client::new().get(&proxy.url("/api/x")).await;
    assert_eq!(reply.status, 503);
    assert!(reply.json()["detail"].as_str().unwrap().contains("not allowed in a header"));
    assert_eq!(upstream.requests(), 0);
    proxy.stop().await;
}

#[tokio::test]
async fn client_secret_basic_and_post_send_what_rfc6749_says() {
    let idp = FakeIdp::start(300).await;
    let upstream = FakeUpstream::start().await;
    let config = format!(
        r#"
[providers.basic]
token_url = "{url}"
client_id = "my client"
client_secret = "p@ss:word"
scope = "orders.read orders.write"
audience = "https://api.example"
[providers.post]
token_url = "{url}"
client_id = "post-client"
client_secret = "post-secret"
client_auth = "client_secret_post"
resource = "urn:api"
extra_params = {{ tenant = "acme" }}
[[routes]]
prefix = "/basic"
upstream = "{up}"
provider = "basic"
[[routes]]
prefix = "/post"
upstream = "{up}"
provider = "post"
"#,
        url = idp.token_url(),
        up = upstream.url()
    );
    let proxy = Proxy::start(&config).await;
    proxy.wait_ready().await;
    let calls = idp.received();
    assert_eq!(calls.len(), 2);
    let field = |call: &support::TokenCall, k: &str| call.form.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let basic = calls.iter().find(|c| c.authorization.is_some()).expect("a call with Basic auth");
    use base64::Engine;
    let encoded = basic.authorization.as_deref().unwrap().strip_prefix("Basic ").unwrap();
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded).unwrap();
    assert_eq!(String::from_utf8(decoded).unwrap(), "my+client:p%40ss%3Aword");
    assert_eq!(field(basic, "grant_type").as_deref(), Some("client_credentials"));
    assert_eq!(field(basic, "scope").as_deref(), Some("orders.read orders.write"));
    assert_eq!(field(basic, "audience").as_deref(), Some("https://api.example"));
    assert_eq!(field(basic, "client_secret"), None);
    let post = calls.iter().find(|c| c.authorization.is_none()).expect("a call without Basic auth");
    assert_eq!(field(post, "client_id").as_deref(), Some("post-client"));
    assert_eq!(field(post, "client_secret").as_deref(), Some("post-secret"));
    assert_eq!(field(post, "resource").as_deref(), Some("urn:api"));
    assert_eq!(field(post, "tenant").as_deref(), Some("acme"));
    proxy.stop().await;
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_both_ways_and_forwarding_headers_set() {
    let idp = FakeIdp::start(300).await;
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::start(&basic_config(&idp, &upstream)).await;
    proxy.wait_ready().await;
    let request = Request::get(proxy.url("/api/hop?x=1"))
        .header("connection", "x-custom-hop")
        .header("x-custom-hop", "secret-ish")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-forwarded-for", "203.0.113.9")
        .header("authorization", "Bearer caller-token")
        .header("x-end-to-end", "yes")
        .body(Full::<Bytes>::default())
        .unwrap();
    let reply = Client::new().send(request).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let echo = reply.json();
    let h = &echo["headers"];
    assert!(h.get("x-custom-hop").is_none() && h.get("proxy-authorization").is_none(), "{h}");
    assert_eq!(h["x-end-to-end"], "yes");
    assert_eq!(h["authorization"], "Bearer tok-1", "the caller's credential is replaced by default");
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], proxy.addr.to_string());
    assert_eq!(h["via"], "1.1 tokenproxy");
    assert_eq!(h["host"], upstream.addr.to_string());
    assert_eq!(echo["uri"], "/hop?x=1", "prefix stripped, query kept");
    // Response side: the upstream's hop-by-hop headers do not reach the caller.
    assert!(reply.headers.get("x-upstream-hop").is_none());
    assert!(reply.headers.get("keep-alive").is_none());
    assert_eq!(reply.headers["x-end-to-end"], "kept");
    proxy.stop().await;
}

#[tokio::test]
async fn never_an_open_proxy() {
    let idp = FakeIdp::start(300).await;
    let upstream = FakeUpstream::start().await;
    let config = format!(
        "{}\n[[routes]]\nhost = \"orders.internal\"\nupstream = \"{}\"\nprovider = \"api\"\n",
        basic_config(&idp, &upstream),
        upstream.url()
    );
    let proxy = Proxy::start(&config).await;
    proxy.wait_ready().await;

    let answer = raw_exchange(
        proxy.addr,
        "GET http://evil.example/steal HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("x-tokenproxy-error: host_not_allowed"), "{answer}");
    // (The refusal keeps the connection open like any answer: `Connection: close` ends the exchange.)
    let connect = "CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nConnection: close\r\n\r\n";
    let answer = raw_exchange(proxy.addr, connect).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    // An absolute-form request for a host that is not a route's host does not fall back to host-less routes.
    let answer = raw_exchange(
        proxy.addr,
        "GET http://evil.example/api/x HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert_eq!(upstream.requests(), 0, "nothing was sent anywhere");

    // A configured host in absolute form (HTTP_PROXY users) is routed, with a token.
    let answer = raw_exchange(
        proxy.addr,
        "GET http://orders.internal:80/o/1 HTTP/1.1\r\nHost: orders.internal\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(upstream.seen()[0].uri, "/o/1");
    assert_eq!(upstream.seen()[0].headers["authorization"], "Bearer tok-1");
    // So is an origin-form request whose Host names it.
    let answer =
        raw_exchange(proxy.addr, "GET /o/2 HTTP/1.1\r\nHost: Orders.Internal:8080\r\nConnection: close\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let answer =
        raw_exchange(proxy.addr, "GET /nowhere HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 404") && answer.contains("no_route"), "{answer}");
    // An origin-form Host that names neither this loopback listener nor a route: a rebound web page (421).
    let answer = raw_exchange(proxy.addr, "GET /api/x HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 421") && answer.contains("misdirected_request"), "{answer}");
    proxy.stop().await;
}

#[tokio::test]
async fn routing_injection_and_incoming_authorization_modes() {
    let idp = FakeIdp::start(300).await;
    let upstream = FakeUpstream::start().await;
    let config = format!(
        r#"
[providers.api]
token_url = "{idp}"
client_id = "c"
client_secret = "s3cret-value"
[[routes]]
name = "query"
prefix = "/q"
upstream = "{up}/base"
strip_prefix = true
provider = "api"
inject = "query"
[[routes]]
name = "keep"
prefix = "/keep"
upstream = "{up}"
provider = "api"
incoming_authorization = "keep"
[[routes]]
name = "reject"
prefix = "/reject"
upstream = "{up}"
provider = "api"
incoming_authorization = "reject"
[[routes]]
name = "custom"
prefix = "/custom"
upstream = "{up}"
provider = "api"
header_name = "X-Api-Token"
scheme = ""
[[routes]]
name = "plain"
prefix = "/plain"
upstream = "{up}"
[[routes]]
name = "longer"
prefix = "/keep/longer"
upstream = "{up}/longer"
strip_prefix = true
"#,
        idp = idp.token_url(),
        up = upstream.url()
    );
    let proxy = Proxy::start(&config).await;
    proxy.wait_ready().await;
    let client = Client::new();
    let with_auth = |path: &str| {
        Request::get(proxy.url(path)).header("authorization", "Bearer mine").body(Full::<Bytes>::default()).unwrap()
    };

    let echo = client.get(&proxy.url("/q/items?access_token=callers&a=1")).await.json();
    assert_eq!(echo["uri"], "/base/items?a=1&access_token=tok-1");
    let echo = client.send(with_auth("/keep/x")).await.json();
    assert_eq!(echo["headers"]["authorization"], "Bearer mine", "keep: the caller's own credential is used");
    let echo = client.get(&proxy.url("/keep/x")).await.json();
    assert_eq!(echo["headers"]["authorization"], "Bearer tok-1", "keep: ours when the caller has none");
    let reply = client.send(with_auth("/reject/x")).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.headers["x-tokenproxy-error"], "bad_request");
    let echo = client.get(&proxy.url("/custom/x")).await.json();
    assert_eq!(echo["headers"]["x-api-token"], "tok-1");
    assert!(echo["headers"].get("authorization").is_none());
    let echo = client.get(&proxy.url("/plain/x")).await.json();
    assert!(echo["headers"].get("authorization").is_none(), "pass-through routes attach nothing");
    let echo = client.get(&proxy.url("/keep/longer/y")).await.json();
    assert_eq!(echo["uri"], "/longer/y", "the longest prefix wins");
    let echo = client.get(&proxy.url("/keepx")).await;
    assert_eq!(echo.status, 404, "prefixes match whole segments");
    proxy.stop().await;
}

#[tokio::test]
async fn unreachable_upstream_gives_502() {
    let idp = FakeIdp::start(300).await;
    let upstream = FakeUpstream::start().await;
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let config = basic_config(&idp, &upstream).replace(&upstream.url(), &format!("http://{dead_addr}"));
    let proxy = Proxy::start(&config).await;
    proxy.wait_ready().await;
    let reply = Client::new().get(&proxy.url("/api/x")).await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.headers["x-tokenproxy-error"], "upstream_unreachable");
    assert!(!reply.text().contains("tok-1"));
    proxy.stop().await;
}

#[tokio::test]
async fn slow_upstream_gives_504_after_request_timeout() {
    let idp = FakeIdp::start(300).await;
    let upstream = FakeUpstream::start().await;
    let config = format!("{}\n", basic_config(&idp, &upstream));
    let config = tokenproxy::config::Config::from_toml_str(
        &format!("[server]\nlisten = \"127.0.0.1:0\"\nrequest_timeout = \"300ms\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{config}"),
        "test.toml",
    )
    .unwrap();
    let proxy = Proxy::start_config(config).await;
    proxy.wait_ready().await;
    let reply = Client::new().get(&proxy.url("/api/slow")).await;
    assert_eq!(reply.status, 504);
    assert_eq!(reply.headers["x-tokenproxy-error"], "upstream_timeout");
    upstream.release_slow();
    proxy.stop().await;
}

#[tokio::test]
async fn admin_endpoints_never_show_a_token() {
    let idp = FakeIdp::start(300).await;
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::start(&basic_config(&idp, &upstream)).await;
    proxy.wait_ready().await;
    let client = Client::new();
    assert_eq!(client.get(&proxy.admin_url("/healthz")).await.text(), "ok\n");
    let tokens = client.get(&proxy.admin_url("/tokens")).await;
    let api = &tokens.json()["providers"]["api"];
    assert_eq!(api["state"], "valid");
    assert_eq!(api["refreshes"], 1);
    let fingerprint = api["fingerprint"].as_str().unwrap();
    assert_eq!(fingerprint.len(), 8);
    assert!(fingerprint.chars().all(|c| c.is_ascii_hexdigit()));
    assert!(api["expires_in_seconds"].as_u64().unwrap() > 290);
    assert!(api["expires_at"].as_str().unwrap().ends_with('Z'));
    let refreshed = client.post(&proxy.admin_url("/tokens/api/refresh"), Bytes::new()).await;
    assert_eq!(refreshed.status, 200);
    assert_eq!(refreshed.json()["status"]["refreshes"], 2);
    assert_eq!(client.post(&proxy.admin_url("/tokens/nope/refresh"), Bytes::new()).await.status, 404);
    assert_eq!(client.get(&proxy.url("/api/x")).await.status, 200);
    let metrics = client.get(&proxy.admin_url("/metrics")).await.text();
    // Only routes with upstream TLS files of their own have a TLS reload series (tests/upstream_tls.rs reads it), and
    // only providers that exchange each caller's token have exchange series (tests/oidc_exchange.rs reads them), and
    // only vended tokens are counted as such (tests/vending.rs), and only a shared store has operations
    // (tests/shared_store.rs).
    let specific = |name: &&&str| {
        name.contains("upstream_tls")
            || name.contains("exchange")
            || name.contains("vended")
            || name.contains("store_operations")
            || name.contains("store_degraded")
    };
    for name in tokenproxy::metrics::METRIC_NAMES.iter().filter(|name| !specific(name)) {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    for text in [tokens.text(), refreshed.text(), metrics] {
        assert!(!text.contains("tok-1") && !text.contains("tok-2") && !text.contains("s3cret-value"));
    }
    proxy.stop().await;
}

#[tokio::test]
async fn h2c_and_http1_share_the_listener() {
    let idp = FakeIdp::start(300).await;
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::start(&basic_config(&idp, &upstream)).await;
    proxy.wait_ready().await;
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let response = h2.request(Request::get(proxy.url("/api/over-h2")).body(Full::default()).unwrap()).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let seen = upstream.seen();
    assert_eq!(seen[0].uri, "/over-h2");
    assert_eq!(seen[0].headers["authorization"], "Bearer tok-1");
    assert_eq!(seen[0].headers["via"], "2 tokenproxy");
    assert_eq!(seen[0].headers["x-forwarded-host"], proxy.addr.to_string());
    proxy.stop().await;
}
