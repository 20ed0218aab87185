//! DPoP (RFC 9449) against the real OpenID provider (npm `oidc-provider` with `features.dPoP` and a nonce secret,
//! see `tests/idp/README.md`) and an upstream that verifies every proof with the key in its header and checks `htm`,
//! `htu`, `ath`, `jti` replay and that the token's `cnf.jkt` is that key's thumbprint:
//!
//! - the client registered with `dpop_bound_access_tokens` gets tokens only with a proof: the first token call is
//!   asked for the provider's nonce and made again with it;
//! - every request goes with a new proof the upstream accepts; the upstream's nonce challenges (at first use and
//!   after a rotation) are answered with the same token, no token call;
//! - a refused token is replaced and the replay carries a new proof for the new token; refused while the nonce
//!   rotated, the replay is challenged too and sent a third time with the new token and the nonce.
//!
//! Needs `node` >= 20 and `npm` on PATH (`tests/idp/node_modules` is installed by `npm ci` on first use).

mod support;

use std::collections::HashSet;

use hyper::body::Bytes;
use hyper::{Method, StatusCode};
use serde_json::Value;
use support::oidc::{IdpProcess, UpstreamProcess, DPOP_CLIENT};
use support::{toml_string, TokenProxyProcess};

fn config(token_url: &str, upstream: &str) -> String {
    format!(
        "[providers.bound]\n\
         token_url = {token_url}\n\
         client_id = {client_id}\n\
         client_secret = {secret}\n\
         dpop = true\n\
         timeout = \"5s\"\n\
         unauthorized_refresh_interval = \"0s\"\n\n\
         [[routes]]\nprefix = \"/api\"\nstrip_prefix = true\nupstream = {upstream}\nprovider = \"bound\"\n",
        token_url = toml_string(token_url),
        client_id = toml_string(DPOP_CLIENT.0),
        secret = toml_string(DPOP_CLIENT.1),
        upstream = toml_string(upstream),
    )
}

fn count(stats: &Value, key: &str) -> u64 {
    stats[key].as_u64().unwrap_or_else(|| panic!("no {key} in {stats}"))
}

#[tokio::test]
async fn dpop_bound_tokens_go_with_a_fresh_proof_every_time_and_nonces_are_answered() {
    let idp = IdpProcess::start(300).await;
    idp.require_dpop_nonce(true).await;
    let upstream = UpstreamProcess::start(&idp).await;
    let token_url = idp.token_endpoint().await;
    let proxy = TokenProxyProcess::start(tempfile::tempdir().unwrap(), &config(&token_url, &upstream.url)).await;
    proxy.wait_ready().await;

    // The first token call was asked for the provider's nonce, and made again with it: two proofs of one key.
    let client = &idp.stats().await["clients"][DPOP_CLIENT.0];
    assert_eq!((client["calls"].as_u64(), client["ok"].as_u64()), (Some(2), Some(1)), "{client}");
    assert_eq!(client["use_dpop_nonce"].as_u64(), Some(1), "{client}");
    let jkts: Vec<&str> = client["dpop_jkts"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    let tokens = proxy.admin_get("/tokens").await.json();
    let jkt = tokens["providers"]["bound"]["dpop_jkt"].as_str().unwrap_or_else(|| panic!("{tokens}")).to_owned();
    assert_eq!(jkts, [jkt.as_str(), jkt.as_str()]);
    assert_eq!(tokens["providers"]["bound"]["token_type"], "DPoP");

    // Requests of both transports' kinds: each with a new proof for its own method and URL.
    for n in 0..20 {
        let (method, body) = if n % 2 == 0 { (Method::GET, Bytes::new()) } else { (Method::POST, Bytes::from("{}")) };
        let reply = proxy.request(method, &format!("/api/orders/{n}?page=2"), &[], body).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.json()["client_id"], DPOP_CLIENT.0);
    }
    let stats = upstream.stats().await;
    assert_eq!((count(&stats, "dpop_ok"), count(&stats, "dpop_distinct_jti")), (20, 20), "{stats}");
    for refusal in ["dpop_invalid", "dpop_replay", "dpop_missing", "dpop_jkt_mismatch"] {
        assert_eq!(count(&stats, refusal), 0, "{refusal}: {stats}");
    }
    assert_eq!(stats["dpop_jkts"], serde_json::json!([jkt]));

    // The upstream starts asking for its nonce, then rotates it: one challenge each, answered with the same token.
    for round in 0..2 {
        upstream.dpop_nonce(true, true).await;
        for _ in 0..5 {
            assert_eq!(proxy.get("/api/orders").await.status, StatusCode::OK);
        }
        assert_eq!(count(&upstream.stats().await, "dpop_nonce_challenges"), round + 1);
    }
    let log = upstream.stats().await["dpop_log"].as_array().unwrap().clone();
    let tokens_sent: HashSet<&str> = log.iter().filter_map(|entry| entry["token_sha256"].as_str()).collect();
    assert_eq!(tokens_sent.len(), 1, "nonce challenges never cost the token: {log:?}");
    assert_eq!(idp.token_calls(DPOP_CLIENT.0).await.calls, 2, "nor a token call");

    // The token is refused: one token call, and the replay's proof is new and for the new token.
    upstream.reject_next(1).await;
    let reply = proxy.get("/api/orders").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let log = upstream.stats().await["dpop_log"].as_array().unwrap().clone();
    let (refused, replay) = (&log[log.len() - 2], &log[log.len() - 1]);
    assert_eq!((refused["status"].as_u64(), replay["status"].as_u64()), (Some(401), Some(200)), "{log:?}");
    assert_ne!(refused["jti"], replay["jti"]);
    assert_ne!(refused["token_sha256"], replay["token_sha256"], "a new token");
    assert_eq!(idp.token_calls(DPOP_CLIENT.0).await.ok, 2);

    // Both at once (the token refused, and the nonce rotated): the replay with a new token is challenged for the new
    // nonce and sent a third time, with that token and the nonce.
    upstream.dpop_nonce(true, true).await;
    upstream.reject_next(1).await;
    let reply = proxy.get("/api/orders").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let log = upstream.stats().await["dpop_log"].as_array().unwrap().clone();
    let last: Vec<(Option<u64>, Option<&str>)> =
        log[log.len() - 3..].iter().map(|e| (e["status"].as_u64(), e["token_sha256"].as_str())).collect();
    let (old, new) = (replay["token_sha256"].as_str(), last[1].1);
    assert_ne!(old, new);
    assert_eq!(last, [(Some(401), old), (Some(401), new), (Some(200), new)], "{log:?}");
    assert_eq!(idp.token_calls(DPOP_CLIENT.0).await.ok, 3);
    let stats = upstream.stats().await;
    assert_eq!((count(&stats, "dpop_replay"), count(&stats, "dpop_invalid")), (0, 0), "{stats}");
}

#[tokio::test]
async fn an_eddsa_key_made_at_startup_gets_bound_tokens_from_the_real_idp_and_its_proofs_pass_upstream() {
    let idp = IdpProcess::start(300).await;
    let upstream = UpstreamProcess::start(&idp).await;
    let token_url = idp.token_endpoint().await;
    let config =
        config(&token_url, &upstream.url).replace("dpop = true\n", "dpop = true\ndpop_algorithm = \"EdDSA\"\n");
    assert!(config.contains("EdDSA"));
    let proxy = TokenProxyProcess::start(tempfile::tempdir().unwrap(), &config).await;
    proxy.wait_ready().await;

    let tokens = proxy.admin_get("/tokens").await.json();
    assert_eq!(tokens["providers"]["bound"]["token_type"], "DPoP", "{tokens}");
    let jkt = tokens["providers"]["bound"]["dpop_jkt"].as_str().unwrap_or_else(|| panic!("{tokens}")).to_owned();
    let client = &idp.stats().await["clients"][DPOP_CLIENT.0];
    let jkts: Vec<&str> = client["dpop_jkts"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(!jkts.is_empty() && jkts.iter().all(|j| *j == jkt), "the IdP bound the token to the EdDSA key: {client}");
    for n in 0..5 {
        let reply = proxy.get(&format!("/api/orders/{n}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    let stats = upstream.stats().await;
    assert_eq!((count(&stats, "dpop_ok"), count(&stats, "dpop_invalid")), (5, 0), "{stats}");
    assert_eq!(stats["dpop_jkts"], serde_json::json!([jkt]));
}
