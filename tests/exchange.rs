//! Tokens per caller (`grant = "token_exchange"`, subject from the request) against an in-process fake IdP that
//! records every form and an upstream that can refuse a token: what an exchange sends, the 401 replay and its budget
//! per caller, a cached token that ran out, and the bound on cached callers. The real provider's side is in
//! tests/oidc_exchange.rs.

mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::{Client, FakeIdp, FakeUpstream, Proxy, Reply};

fn config(idp: &FakeIdp, upstream: &FakeUpstream, extra: &str) -> String {
    format!(
        "[providers.ex]\ntoken_url = \"{}\"\ngrant = \"token_exchange\"\nclient_id = \"gw\"\nclient_secret = \"s3cret-value\"\n\
         audience = \"orders\"\nexpiry_skew = \"1s\"\n{extra}\n\
         [[routes]]\nprefix = \"/api\"\nupstream = \"{}\"\nprovider = \"ex\"\n",
        idp.token_url(),
        upstream.url()
    )
}

async fn as_caller(proxy: &Proxy, subject: &str) -> Reply {
    let request = Request::get(proxy.url("/api/x"))
        .header("authorization", format!("Bearer {subject}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    Client::new().send(request).await
}

#[tokio::test]
async fn an_exchange_sends_the_subject_and_a_401_exchanges_again_once_per_interval() {
    let (idp, upstream) = (FakeIdp::start(300).await, FakeUpstream::start().await);
    let proxy = Proxy::start(&config(&idp, &upstream, "")).await;
    assert_eq!(as_caller(&proxy, "caller-a").await.status, 200);
    let form = &idp.received()[0].form;
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    assert_eq!(field("grant_type"), Some("urn:ietf:params:oauth:grant-type:token-exchange"));
    assert_eq!(field("subject_token"), Some("caller-a"));
    assert_eq!(field("subject_token_type"), Some("urn:ietf:params:oauth:token-type:access_token"));
    assert_eq!(field("audience"), Some("orders"));
    assert_eq!(upstream.seen().last().unwrap().headers["authorization"], "Bearer tok-1", "the exchanged token");

    // The upstream refuses that caller's token: one new exchange, one replay with its token.
    upstream.revoke("tok-1");
    assert_eq!(as_caller(&proxy, "caller-a").await.status, 200);
    assert_eq!(idp.calls(), 2);
    assert_eq!(upstream.seen().last().unwrap().headers["authorization"], "Bearer tok-2");
    // Refused again within unauthorized_refresh_interval (30 s): no third exchange, the upstream's 401 goes back.
    upstream.revoke("tok-2");
    let reply = as_caller(&proxy, "caller-a").await;
    assert_eq!(reply.status, 401);
    assert!(reply.headers.get("x-tokenproxy-error").is_none(), "the upstream's own answer");
    assert_eq!(idp.calls(), 2);
    // Another caller is not held to caller-a's budget.
    assert_eq!(as_caller(&proxy, "caller-b").await.status, 200);
    assert_eq!(idp.calls(), 3);
    assert!(upstream.seen().iter().all(|seen| !seen.headers["authorization"].to_str().unwrap().contains("caller-")));
    proxy.stop().await;
}

#[tokio::test]
async fn a_cached_token_that_ran_out_is_exchanged_again_not_an_error() {
    let (idp, upstream) = (FakeIdp::start(1).await, FakeUpstream::start().await);
    let proxy = Proxy::start(&config(&idp, &upstream, "")).await;
    assert_eq!(as_caller(&proxy, "caller-a").await.status, 200);
    assert_eq!(as_caller(&proxy, "caller-a").await.status, 200);
    assert_eq!(idp.calls(), 1, "a hit while it is usable");
    // The passage of time is what is tested: a 1 s token is usable for 0.75 s (skew capped at a quarter).
    tokio::time::sleep(std::time::Duration::from_millis(1_000)).await;
    assert_eq!(as_caller(&proxy, "caller-a").await.status, 200);
    assert_eq!(idp.calls(), 2, "exchanged again once it ran out");
    assert_eq!(upstream.seen().last().unwrap().headers["authorization"], "Bearer tok-2");
    proxy.stop().await;
}

#[tokio::test]
async fn max_subjects_bounds_the_cache_and_evicts_the_least_recently_used() {
    let (idp, upstream) = (FakeIdp::start(300).await, FakeUpstream::start().await);
    let proxy = Proxy::start(&config(&idp, &upstream, "max_subjects = 2")).await;
    for caller in ["a", "b", "a", "c"] {
        assert_eq!(as_caller(&proxy, caller).await.status, 200);
    }
    assert_eq!(idp.calls(), 3, "a was a hit");
    assert_eq!(proxy.metric("tokenproxy_exchange_cache_total{event=\"evicted\",provider=\"ex\"}").await, 1.0);
    assert_eq!(proxy.metric("tokenproxy_exchange_subjects").await, 2.0);
    // b was the least recently used: evicted, so it is exchanged again; a is still cached.
    assert_eq!(as_caller(&proxy, "a").await.status, 200);
    assert_eq!(idp.calls(), 3);
    assert_eq!(as_caller(&proxy, "b").await.status, 200);
    assert_eq!(idp.calls(), 4);
    let tokens = Client::new().get(&proxy.admin_url("/tokens")).await.json();
    assert_eq!(tokens["providers"]["ex"]["subjects"], 2, "{tokens}");
    proxy.stop().await;
}

#[tokio::test]
async fn entra_on_behalf_of_sends_the_callers_token_as_the_assertion() {
    let (idp, upstream) = (FakeIdp::start(300).await, FakeUpstream::start().await);
    let obo = config(&idp, &upstream, "exchange_dialect = \"entra_obo\"")
        .replace("audience = \"orders\"", "scope = \"api://orders/.default\"");
    let proxy = Proxy::start(&obo).await;
    assert_eq!(as_caller(&proxy, "eyJ.caller.token").await.status, 200);
    let call = &idp.received()[0];
    let form: Vec<(&str, &str)> = call.form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(
        form,
        [
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("assertion", "eyJ.caller.token"),
            ("requested_token_use", "on_behalf_of"),
            ("scope", "api://orders/.default"),
        ],
        "Entra's on-behalf-of request, the client authenticating with HTTP Basic"
    );
    assert!(call.authorization.as_deref().is_some_and(|a| a.starts_with("Basic ")));
    proxy.stop().await;
}

#[tokio::test]
async fn the_subject_never_reaches_the_upstream_whatever_the_route_injects() {
    let (idp, upstream) = (FakeIdp::start(300).await, FakeUpstream::start().await);
    for inject in ["inject = \"header\"\nheader_name = \"x-api-token\"", "inject = \"query\"\nquery_param = \"token\""]
    {
        let toml = format!("{}{inject}\n", config(&idp, &upstream, ""));
        let proxy = Proxy::start(&toml).await;
        assert_eq!(as_caller(&proxy, "caller-secret-subject").await.status, 200);
        let seen = upstream.seen().pop().unwrap();
        assert!(seen.headers.get("authorization").is_none(), "{inject}: the subject was forwarded: {:?}", seen.headers);
        let everything = format!("{} {:?}", seen.uri, seen.headers);
        assert!(!everything.contains("caller-secret-subject"), "{inject}: {everything}");
        assert!(everything.contains("tok-"), "{inject}: the exchanged token goes where the route says: {everything}");
        // The same caller with its token in the query too (RFC 6750 §2.3): that copy is not forwarded either.
        let request = Request::get(proxy.url("/api/x?a=1&access_token=caller-secret-subject&b=2"))
            .header("authorization", "Bearer caller-secret-subject")
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(Client::new().send(request).await.status, 200);
        let in_query = upstream.seen().pop().unwrap();
        assert!(!in_query.uri.to_string().contains("caller-secret-subject"), "{inject}: {}", in_query.uri);
        assert!(in_query.uri.to_string().contains("a=1") && in_query.uri.to_string().contains("b=2"));
        proxy.stop().await;
    }
}

/// Requests per second of one caller already in the cache, sending `n` requests one after another.
async fn cached_rate(proxy: &Proxy, n: usize) -> f64 {
    let client = Client::new();
    let started = std::time::Instant::now();
    for _ in 0..n {
        let request = Request::get(proxy.url("/api/x"))
            .header("authorization", "Bearer known-caller")
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(client.send(request).await.status, 200, "a cached caller is never throttled");
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// Eight callers sending requests as fast as they can, the n-th with `Bearer {subject(n)}`, until `total` are sent
/// or `stop` is set; each task returns how many it sent and how many of them were answered 429 `exchange_throttled`.
fn flood(
    proxy: &Proxy,
    total: usize,
    subject: fn(usize) -> String,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<(usize, usize)>> {
    use std::sync::atomic::Ordering;
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    (0..8)
        .map(|_| {
            let (url, sent, stop) = (proxy.url("/api/x"), std::sync::Arc::clone(&sent), std::sync::Arc::clone(stop));
            tokio::spawn(async move {
                let client = Client::new();
                let (mut mine, mut throttled) = (0, 0);
                loop {
                    let n = sent.fetch_add(1, Ordering::SeqCst);
                    if n >= total || stop.load(Ordering::SeqCst) {
                        return (mine, throttled);
                    }
                    mine += 1;
                    let request = Request::get(&url)
                        .header("authorization", format!("Bearer {}", subject(n)))
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                    let reply = client.send(request).await;
                    if reply.status == 429 {
                        assert_eq!(reply.headers["x-tokenproxy-error"], "exchange_throttled");
                        assert_eq!(reply.headers["retry-after"], "1");
                        throttled += 1;
                    }
                }
            })
        })
        .collect()
}

#[tokio::test]
async fn garbage_subjects_spend_the_budget_for_new_callers_not_the_idp_and_cached_callers_pass() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (idp, upstream) = (FakeIdp::start(300).await, FakeUpstream::start().await);
    // The default budget: 20 new subjects a second (a burst of 20), 32 in flight.
    let proxy = Proxy::start(&config(&idp, &upstream, "")).await;
    assert_eq!(as_caller(&proxy, "known-caller").await.status, 200);
    let alone = cached_rate(&proxy, 300).await;
    // The reference: a cached caller's rate while eight other callers, all cached too, send as fast as they can (the
    // machine's cores are shared nine ways whatever the subjects are).
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let started = std::time::Instant::now();
    let busy = flood(&proxy, usize::MAX, |_| "known-caller".to_owned(), &stop);
    let beside_cached = cached_rate(&proxy, 300).await;
    stop.store(true, Ordering::SeqCst);
    let mut cached_sent = 0;
    for task in busy {
        let (sent, throttled) = task.await.unwrap();
        assert_eq!(throttled, 0, "a cached caller is never throttled");
        cached_sent += sent;
    }
    let cached_flood_rate = cached_sent as f64 / started.elapsed().as_secs_f64();
    let before = idp.calls();
    // Garbage subjects (TP_GARBAGE_SUBJECTS, 400 by default), each new, as fast as 8 callers can send them.
    let total: usize = std::env::var("TP_GARBAGE_SUBJECTS").ok().and_then(|n| n.parse().ok()).unwrap_or(400);
    let started = std::time::Instant::now();
    let garbage = flood(&proxy, total, |n| format!("bad-{n}"), &std::sync::Arc::new(AtomicBool::new(false)));
    // The cached caller meanwhile.
    let during = cached_rate(&proxy, 300).await;
    let mut throttled = 0;
    for task in garbage {
        throttled += task.await.unwrap().1;
    }
    let seconds = started.elapsed().as_secs_f64();
    let exchanges = idp.calls() - before;
    println!(
        "{total} garbage subjects in {seconds:.2} s: {exchanges} exchanges (budget: 20 + 20 x {seconds:.2} s), \
         {throttled} answered 429; a cached caller: {alone:.0} req/s alone, {beside_cached:.0} req/s beside 8 cached \
         callers ({cached_flood_rate:.0} req/s), {during:.0} req/s beside the 8 garbage callers ({:.0} req/s)",
        total as f64 / seconds
    );
    assert!(exchanges as f64 <= 20.0 + 20.0 * seconds + 1.0, "{exchanges} exchanges in {seconds:.2} s");
    assert_eq!(exchanges + throttled, total, "every garbage subject was exchanged within the budget or refused");
    let ready = Client::new().get(&proxy.admin_url("/readyz")).await;
    assert_eq!(ready.status, 200, "readiness does not depend on callers' exchanges: {}", ready.text());
    assert_eq!(
        proxy.metric("tokenproxy_exchange_cache_total{event=\"throttled\",provider=\"ex\"}").await,
        throttled as f64
    );
    proxy.stop().await;
}

/// An ES256 key of the subjects' issuer: its PKCS#8 PEM (to sign) and its public JWK with `kid`.
fn issuer_key(seed: u8, kid: &str) -> (String, serde_json::Value) {
    use base64::Engine as _;
    use p256::elliptic_curve::sec1::ToEncodedPoint as _;
    use p256::pkcs8::EncodePrivateKey as _;
    let secret = p256::SecretKey::from_slice(&[seed; 32]).unwrap();
    let pem = secret.to_pkcs8_pem(Default::default()).unwrap().to_string();
    let point = secret.public_key().to_encoded_point(false);
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let jwk = serde_json::json!({
        "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
        "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap()),
    });
    (pem, jwk)
}

/// A subject signed with `pem` (ES256, `kid`) carrying `claims`.
fn subject(pem: &str, kid: &str, claims: serde_json::Value) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_ec_pem(pem.as_bytes()).unwrap()).unwrap()
}

#[tokio::test]
async fn subjects_that_are_not_valid_jwts_of_their_issuer_cost_no_exchange() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (idp, upstream) = (FakeIdp::start(300).await, FakeUpstream::start().await);
    let (pem, jwk) = issuer_key(11, "k1");
    let (other_pem, _) = issuer_key(12, "k2");
    let fetched = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&fetched);
    let (jwks, _stop) = support::spawn_server(move |_| {
        counted.fetch_add(1, Ordering::SeqCst);
        let keys = serde_json::json!({ "keys": [jwk.clone()] });
        async move { support::json_response(http::StatusCode::OK, keys) }
    })
    .await;
    let issuer = "https://issuer.example";
    let extra = format!(
        "subject_issuer = \"{issuer}\"\nsubject_jwks_uri = \"http://{jwks}/jwks\"\nsubject_audience = \"gateway\"\n"
    );
    let proxy = Proxy::start(&config(&idp, &upstream, &extra)).await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = |iss: &str, aud: &str, exp: u64, nbf: u64| serde_json::json!({ "iss": iss, "aud": aud, "sub": "alice", "exp": exp, "nbf": nbf });
    let valid = subject(&pem, "k1", claims(issuer, "gateway", now + 600, now - 10));
    assert_eq!(as_caller(&proxy, &valid).await.status, 200);
    assert_eq!(idp.calls(), 1, "a valid subject is exchanged");
    let hs256 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims(issuer, "gateway", now + 600, now - 10),
        &jsonwebtoken::EncodingKey::from_secret(b"anything"),
    )
    .unwrap();
    for (what, bad) in [
        ("not a JWT", "bad-1".to_owned()),
        ("expired", subject(&pem, "k1", claims(issuer, "gateway", now - 120, now - 600))),
        ("not yet valid", subject(&pem, "k1", claims(issuer, "gateway", now + 600, now + 300))),
        ("another issuer", subject(&pem, "k1", claims("https://evil.example", "gateway", now + 600, now - 10))),
        ("another audience", subject(&pem, "k1", claims(issuer, "someone-else", now + 600, now - 10))),
        ("a key the issuer does not publish", subject(&other_pem, "k1", claims(issuer, "gateway", now + 600, now))),
        ("a symmetric algorithm", hs256),
    ] {
        let reply = as_caller(&proxy, &bad).await;
        assert_eq!(reply.status, 401, "{what}: {}", reply.text());
        assert_eq!(reply.headers["x-tokenproxy-error"], "subject_token_invalid", "{what}");
    }
    assert_eq!(idp.calls(), 1, "no subject that failed reached the IdP");
    // Made-up key ids: the keys are fetched again at most once per 30 s, however many come.
    let before = fetched.load(Ordering::SeqCst);
    for n in 0..20 {
        let made_up = subject(&other_pem, &format!("kid-{n}"), claims(issuer, "gateway", now + 600, now - 10));
        assert_eq!(as_caller(&proxy, &made_up).await.status, 401);
    }
    assert!(fetched.load(Ordering::SeqCst) - before <= 1, "{} fetches", fetched.load(Ordering::SeqCst) - before);
    assert_eq!(idp.calls(), 1);
    proxy.stop().await;

    // The issuer's keys cannot be had: 503 token_unavailable, no exchange.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let extra = format!("subject_issuer = \"{issuer}\"\nsubject_jwks_uri = \"http://{closed}/jwks\"\n");
    let proxy = Proxy::start(&config(&idp, &upstream, &extra)).await;
    let reply = as_caller(&proxy, &valid).await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.headers["x-tokenproxy-error"], "token_unavailable");
    assert_eq!(idp.calls(), 1);
    proxy.stop().await;
}
