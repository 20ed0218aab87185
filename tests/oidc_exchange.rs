//! Tokens per caller: `grant = "token_exchange"` (RFC 8693) with the subject taken from each request, against the
//! real OpenID provider (npm `oidc-provider`, see `tests/idp/README.md`) with a token-exchange grant registered on
//! it that verifies the subject token against its own signing key. Exchanges are counted at the provider, not in
//! the proxy's metrics; the upstream records every bearer token it is sent.
//!
//! - 1,000 requests from 100 callers make exactly 100 exchanges, and the upstream never sees a caller's own token;
//! - 200 concurrent requests of one new caller make one exchange;
//! - a subject the provider refuses gets 401 `subject_token_invalid` for that caller only, and 100 more requests with
//!   it make no further exchange; a subject it may not exchange gets 403 `exchange_refused`; a request without a
//!   token gets 401 `subject_token_missing` and makes no call.
//!
//! Needs `node` >= 20 and `npm` on PATH (`tests/idp/node_modules` is installed by `npm ci` on first use).

mod support;

use std::collections::HashSet;

use hyper::body::Bytes;
use hyper::{Method, StatusCode};
use support::oidc::{IdpProcess, UpstreamProcess, BASIC_CLIENT, EXCHANGE_CLIENT, POST_CLIENT};
use support::{toml_string, Reply, TokenProxyProcess};

fn config(token_url: &str, upstream: &str) -> String {
    format!(
        "[providers.exchange]\n\
         token_url = {token_url}\n\
         grant = \"token_exchange\"\n\
         client_id = {client_id}\n\
         client_secret = {secret}\n\
         scope = \"api.read\"\n\
         timeout = \"5s\"\n\
         # 100 new callers at once: a budget for them all (the default, 20 a second, would answer most 429).\n\
         exchange_new_subjects_per_second = 200\nexchange_max_in_flight = 200\n\n\
         [[routes]]\nprefix = \"/api\"\nstrip_prefix = true\nupstream = {upstream}\nprovider = \"exchange\"\n",
        token_url = toml_string(token_url),
        client_id = toml_string(EXCHANGE_CLIENT.0),
        secret = toml_string(EXCHANGE_CLIENT.1),
        upstream = toml_string(upstream),
    )
}

async fn as_caller(proxy: &TokenProxyProcess, subject: &str) -> Reply {
    let authorization = format!("Bearer {subject}");
    proxy.request(Method::GET, "/api/x", &[("authorization", authorization.as_str())], Bytes::new()).await
}

#[tokio::test]
async fn each_caller_gets_one_exchange_and_refused_callers_cost_one_call() {
    let idp = IdpProcess::start(300).await;
    let upstream = UpstreamProcess::start(&idp).await;
    let token_url = idp.token_endpoint().await;
    let proxy = TokenProxyProcess::start(tempfile::tempdir().unwrap(), &config(&token_url, &upstream.url)).await;
    proxy.wait_ready().await;
    let exchanges = || async { idp.token_calls(EXCHANGE_CLIENT.0).await };
    assert_eq!(exchanges().await.calls, 0, "nothing to fetch ahead");

    // 100 callers, each with its own token from the provider; 10 requests each, all at once.
    let mut subjects = Vec::new();
    for _ in 0..100 {
        subjects.push(idp.client_credentials(BASIC_CLIENT).await);
    }
    let proxy_ref = &proxy;
    let requests = subjects.iter().flat_map(|subject| (0..10).map(move |_| as_caller(proxy_ref, subject)));
    for reply in futures_util::future::join_all(requests).await {
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.json()["client_id"], EXCHANGE_CLIENT.0, "the upstream got the exchanged token");
    }
    let calls = exchanges().await;
    assert_eq!((calls.calls, calls.ok), (100, 100), "exactly one exchange per caller");
    let stats = upstream.stats().await;
    assert_eq!((stats["ok"].as_u64(), stats["distinct_jti"].as_u64()), (Some(1000), Some(100)), "{stats}");
    let seen: HashSet<String> = upstream.tokens_seen().await.into_iter().collect();
    assert!(subjects.iter().all(|subject| !seen.contains(subject)), "a caller's own token reached the upstream");

    // 200 concurrent requests of one new caller: one exchange.
    let newcomer = idp.client_credentials(BASIC_CLIENT).await;
    let replies = futures_util::future::join_all((0..200).map(|_| as_caller(&proxy, &newcomer))).await;
    assert!(replies.iter().all(|reply| reply.status == StatusCode::OK));
    assert_eq!(exchanges().await.calls, 101, "200 concurrent requests of one caller, one exchange");

    // A token the provider did not issue: 401 for that caller, once asked, then answered without the provider.
    // (A character inside the signature: the last one may carry only padding bits.)
    let at = newcomer.len() - 20;
    let swap = if &newcomer[at..=at] == "A" { "B" } else { "A" };
    let forged = format!("{}{swap}{}", &newcomer[..at], &newcomer[at + 1..]);
    let reply = as_caller(&proxy, &forged).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
    assert_eq!(reply.header("x-tokenproxy-error"), Some("subject_token_invalid"));
    assert!(!reply.text().contains(&forged), "the subject is never echoed");
    for reply in futures_util::future::join_all((0..100).map(|_| as_caller(&proxy, &forged))).await {
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(exchanges().await.calls, 102, "a refused subject is remembered");
    let refused = proxy.metric_sample("tokenproxy_exchange_cache_total{event=\"refused\",provider=\"exchange\"}");
    assert_eq!(refused.await, Some(100.0), "answered from the refusal cache");
    assert_eq!(as_caller(&proxy, &newcomer).await.status, StatusCode::OK, "other callers are unaffected");

    // A subject the provider may not exchange: 403. No token at all: 401 before any call.
    let not_allowed = idp.client_credentials(POST_CLIENT).await;
    let reply = as_caller(&proxy, &not_allowed).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    assert_eq!(reply.header("x-tokenproxy-error"), Some("exchange_refused"));
    let reply = proxy.get("/api/x").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
    assert_eq!(reply.header("x-tokenproxy-error"), Some("subject_token_missing"));
    assert_eq!(exchanges().await.calls, 103);

    // /tokens counts callers, never shows them.
    let tokens = proxy.admin_get("/tokens").await.text();
    assert!(tokens.contains("\"per_caller\"") && tokens.contains("\"subjects\":101"), "{tokens}");
    assert!(subjects.iter().all(|subject| !tokens.contains(subject.as_str())));
    assert!(!proxy.logs().contains(&subjects[0]), "a caller's token in the logs");
}
