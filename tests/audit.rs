//! The access log's audit fields (docs/configuration.md, "The access log"), on both HTTP/1.1 transports: which token
//! slot, token (fingerprint and generation, as `/tokens` shows them) and caller (the subject's fingerprint under token
//! exchange) a request went out with, how many sends it took and why a second was made (`401` and a new token;
//! `dpop_nonce` and the same token), and the caller's trace id. No token, subject or proof appears in any line.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use support::{json_response, spawn_server, Client, FakeIdp, FakeUpstream, TokenProxyProcess};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// An IdP issuing DPoP-bound tokens `dpop-1`, `dpop-2`… (the proof of the token call is not checked here).
async fn dpop_idp() -> (std::net::SocketAddr, tokio::sync::watch::Sender<()>) {
    let issued = Arc::new(AtomicUsize::new(0));
    spawn_server(move |_request: Request<hyper::body::Incoming>| {
        let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            json_response(
                StatusCode::OK,
                json!({ "access_token": format!("dpop-{n}"), "token_type": "DPoP", "expires_in": 300 }),
            )
        }
    })
    .await
}

/// An upstream that wants its DPoP nonce: a proof without `nonce` gets `401 DPoP error="use_dpop_nonce"`.
async fn nonce_upstream() -> (std::net::SocketAddr, tokio::sync::watch::Sender<()>) {
    spawn_server(|request: Request<hyper::body::Incoming>| async move {
        let proof = request.headers().get("dpop").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        let claims = proof.split('.').nth(1).unwrap_or_default();
        let claims: Value = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(claims)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        if claims["nonce"] == "n-1" {
            return json_response(StatusCode::OK, json!({ "ok": true }));
        }
        Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header("www-authenticate", "DPoP error=\"use_dpop_nonce\"")
            .header("dpop-nonce", "n-1")
            .body(Full::new(Bytes::new()))
            .unwrap()
    })
    .await
}

fn fingerprint(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())[..4].iter().map(|b| format!("{b:02x}")).collect()
}

async fn get(client: &Client, url: String, headers: &[(&str, &str)]) -> u16 {
    let mut request = Request::get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    client.send(request.body(Full::new(Bytes::new())).unwrap()).await.status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_lines_say_which_token_and_caller_and_why_a_request_went_twice() {
    for h1_transport in [true, false] {
        let idp = FakeIdp::start(300).await;
        let upstream = FakeUpstream::start().await;
        let (dpop_idp, _dpop_idp_stop) = dpop_idp().await;
        let (nonce_upstream, _nonce_upstream_stop) = nonce_upstream().await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenproxy.toml");
        let config = format!(
            r#"[server]
listen = "127.0.0.1:0"
h1_transport = {h1_transport}
[admin]
listen = "127.0.0.1:0"
[log]
format = "json"
[providers.cc]
token_url = "{idp}"
client_id = "c"
client_secret = "cc-s3cret"
[providers.ex]
token_url = "{idp}"
grant = "token_exchange"
client_id = "gw"
client_secret = "ex-s3cret"
audience = "orders"
[providers.bound]
token_url = "http://{dpop_idp}/token"
client_id = "d"
client_secret = "d-s3cret"
dpop = true
dpop_algorithm = "EdDSA"
[[routes]]
prefix = "/cc"
upstream = "{up}"
provider = "cc"
[[routes]]
prefix = "/ex"
upstream = "{up}"
provider = "ex"
[[routes]]
prefix = "/dpop"
upstream = "http://{nonce_upstream}"
provider = "bound"
"#,
            idp = idp.token_url(),
            up = upstream.url(),
        );
        std::fs::write(&path, config).unwrap();
        let mut proxy = TokenProxyProcess::run(&path, &[]).await;
        proxy.wait_ready().await;
        let client = Client::new();
        let traceparent = format!("00-{TRACE_ID}-00f067aa0ba902b7-01");

        // Plain, with the caller's trace; then a 401 to that token and its replay with a new one.
        assert_eq!(get(&client, proxy.url("/cc/plain"), &[("traceparent", &traceparent)]).await, 200);
        let first = upstream.seen().last().unwrap().headers["authorization"].to_str().unwrap().to_owned();
        upstream.revoke(first.strip_prefix("Bearer ").unwrap());
        assert_eq!(get(&client, proxy.url("/cc/replayed"), &[]).await, 200);
        // A caller's own token, exchanged.
        assert_eq!(
            get(&client, proxy.url("/ex/exchanged"), &[("authorization", "Bearer caller-subject-1")]).await,
            200
        );
        let exchanged = upstream.seen().last().unwrap().headers["authorization"].to_str().unwrap().to_owned();
        // DPoP: the upstream asks for its nonce; the same token goes again with it.
        assert_eq!(get(&client, proxy.url("/dpop/bound"), &[]).await, 200);

        let tokens: Value = client.get(&proxy.admin_url("/tokens")).await.json();
        let token_of = |provider: &str| {
            let entry = &tokens["providers"][provider];
            let fingerprint = entry["fingerprint"].as_str().unwrap_or_else(|| panic!("{provider}: {tokens}"));
            (fingerprint.to_owned(), entry["generation"].clone())
        };
        assert_eq!(proxy.terminate().await.code(), Some(0));
        let logs = proxy.logs();
        let access: Vec<Value> = logs
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|entry| entry["target"] == "access")
            .collect();
        let line = |path: &str| {
            let found = access.iter().find(|a| a["path"] == path);
            found.unwrap_or_else(|| panic!("h1_transport={h1_transport}: no access line for {path}: {logs}")).clone()
        };
        let transport = format!("h1_transport = {h1_transport}");

        let plain = line("/cc/plain");
        assert_eq!(plain["token_slot"], "cc", "{transport}: {plain}");
        assert_eq!(
            plain["token_fingerprint"],
            fingerprint(first.strip_prefix("Bearer ").unwrap()),
            "{transport}: {plain}"
        );
        assert_eq!(plain["token_generation"], 1, "{transport}: {plain}");
        assert_eq!(
            (plain["attempts"].clone(), plain["replayed"].clone()),
            (json!(1), json!(false)),
            "{transport}: {plain}"
        );
        assert_eq!(plain["replay_reason"], "-", "{transport}: {plain}");
        assert_eq!((plain["trace_id"].as_str(), plain["subject_fingerprint"].as_str()), (Some(TRACE_ID), Some("-")));

        let replayed = line("/cc/replayed");
        let (fingerprint_now, generation_now) = token_of("cc");
        assert_eq!(replayed["replayed"], true, "{transport}: {replayed}");
        assert_eq!(replayed["replay_reason"], "401", "{transport}: {replayed}");
        assert_eq!(replayed["attempts"], 2, "{transport}: {replayed}");
        assert_eq!(
            replayed["token_fingerprint"],
            fingerprint_now.as_str(),
            "the delivered send's token, as /tokens shows it"
        );
        assert_eq!(replayed["token_generation"], generation_now, "{transport}: {replayed}");
        assert_eq!(replayed["trace_id"], "-", "no traceparent, no trace id");

        let exchange = line("/ex/exchanged");
        assert_eq!(exchange["token_slot"], "ex", "{transport}: {exchange}");
        assert_eq!(exchange["subject_fingerprint"], fingerprint("caller-subject-1"), "{transport}: {exchange}");
        assert_eq!(exchange["token_fingerprint"], fingerprint(exchanged.strip_prefix("Bearer ").unwrap()));
        assert_eq!(exchange["attempts"], 1, "{transport}: {exchange}");

        let bound = line("/dpop/bound");
        let (dpop_fingerprint, _) = token_of("bound");
        assert_eq!(bound["token_slot"], "bound", "{transport}: {bound}");
        assert_eq!(bound["token_fingerprint"], dpop_fingerprint.as_str(), "{transport}: {bound}");
        assert_eq!(bound["token_generation"], 1, "the nonce did not retire the token: {bound}");
        assert_eq!((bound["replay_reason"].as_str(), bound["attempts"].as_u64()), (Some("dpop_nonce"), Some(2)));
        assert_eq!(bound["replayed"], true, "{transport}: {bound}");

        // Never a token or a subject in a line.
        for secret in [first.as_str(), exchanged.as_str(), "caller-subject-1", "dpop-1", "cc-s3cret", "ex-s3cret"] {
            let secret = secret.strip_prefix("Bearer ").unwrap_or(secret);
            assert!(!logs.contains(secret), "{transport}: `{secret}` in the logs:\n{logs}");
        }
    }
}

#[tokio::test]
async fn with_telemetry_on_the_access_line_names_the_server_span() {
    let idp = FakeIdp::start(300).await;
    let upstream = FakeUpstream::start().await;
    // An upstream that refuses every token: the refusal's WARN line is logged while the request is served.
    let (refusing, _stop) = spawn_server(|_request: Request<hyper::body::Incoming>| async {
        Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header("www-authenticate", "Bearer error=\"invalid_token\"")
            .body(Full::new(Bytes::new()))
            .unwrap()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenproxy.toml");
    // No collector listens there: spans are dropped, requests are not affected.
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[log]\nformat = \"json\"\n\
         [telemetry]\notlp_endpoint = \"http://127.0.0.1:9\"\n\
         [providers.cc]\ntoken_url = \"{}\"\nclient_id = \"c\"\nclient_secret = \"cc-s3cret\"\n\
         [[routes]]\nprefix = \"/cc\"\nupstream = \"{}\"\nprovider = \"cc\"\n\
         [[routes]]\nprefix = \"/refused\"\nupstream = \"http://{refusing}\"\nprovider = \"cc\"\n",
        idp.token_url(),
        upstream.url()
    );
    std::fs::write(&path, config).unwrap();
    let mut proxy = TokenProxyProcess::run(&path, &[]).await;
    proxy.wait_ready().await;
    let client = Client::new();
    let traceparent = format!("00-{TRACE_ID}-00f067aa0ba902b7-01");
    assert_eq!(get(&client, proxy.url("/cc/traced"), &[("traceparent", &traceparent)]).await, 200);
    let sent = upstream.seen().last().unwrap().headers["traceparent"].to_str().unwrap().to_owned();
    assert_eq!(get(&client, proxy.url("/refused/x"), &[("traceparent", &traceparent)]).await, 401);
    assert_eq!(proxy.terminate().await.code(), Some(0));
    let logs = proxy.logs();
    let line = logs
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|entry| entry["target"] == "access" && entry["path"] == "/cc/traced")
        .unwrap_or_else(|| panic!("no access line: {logs}"));
    assert_eq!(line["trace_id"], TRACE_ID, "the caller's trace, continued: {line}");
    let span_id = line["span_id"].as_str().unwrap_or_default();
    assert!(span_id.len() == 16 && span_id.chars().all(|c| c.is_ascii_hexdigit()), "{line}");
    assert_ne!(span_id, "00f067aa0ba902b7", "the server span's own id, not the caller's");
    assert!(
        sent.starts_with(&format!("00-{TRACE_ID}-")) && !sent.contains(span_id),
        "the upstream's parent is the attempt: {sent}"
    );
    // Every line a traced request's work logs carries its ids (the refusal's WARN line here); others carry none.
    let entries: Vec<Value> = logs.lines().filter_map(|line| serde_json::from_str::<Value>(line).ok()).collect();
    let refused = entries
        .iter()
        .find(|entry| entry["target"] == "access" && entry["path"] == "/refused/x")
        .unwrap_or_else(|| panic!("no access line: {logs}"));
    let warning = entries
        .iter()
        .find(|entry| {
            entry["level"] == "WARN" && entry["message"].as_str().unwrap_or_default().contains("refused the token")
        })
        .unwrap_or_else(|| panic!("no refusal line: {logs}"));
    assert_eq!((&warning["trace_id"], &warning["span_id"]), (&refused["trace_id"], &refused["span_id"]), "{warning}");
    assert_ne!(refused["span_id"], line["span_id"], "each request its own server span");
    let keys: Vec<&String> = warning.as_object().unwrap().keys().collect();
    assert_eq!(keys.iter().filter(|k| k.as_str() == "trace_id").count(), 1, "{warning}");
    let untraced = entries.iter().filter(|entry| entry["target"] != "access" && *entry != warning);
    assert!(untraced.clone().all(|entry| entry.get("trace_id").is_none()), "lines of no request carry no ids");
    assert!(untraced.count() > 0);
}
