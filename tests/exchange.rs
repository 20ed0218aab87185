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
