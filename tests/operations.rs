//! Running it in production: config reload keeping tokens, rotated secret files, JSON logs with access lines,
//! and a whole scenario checked for leaks of any token, secret, private key or signed assertion into logs, metrics
//! or the admin API.

mod support;

use std::time::Duration;

use bytes::Bytes;
use support::session_idp::SessionIdp;
use support::{eventually, Client, FakeIdp, FakeUpstream, IdpMode, Proxy, TokenProxyProcess};

const LISTEN: &str = "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n";

fn provider(name: &str, idp: &FakeIdp, extra: &str) -> String {
    format!(
        "[providers.{name}]\ntoken_url = \"{}\"\nclient_id = \"{name}-client\"\nclient_secret = \"{name}-s3cret\"\n{extra}\n",
        idp.token_url()
    )
}

fn route(prefix: &str, upstream: &FakeUpstream, provider: &str) -> String {
    format!(
        "[[routes]]\nprefix = \"{prefix}\"\nupstream = \"{}\"\nstrip_prefix = true\nprovider = \"{provider}\"\n",
        upstream.url()
    )
}

/// Waits until `/metrics` has the sample `line` (name, labels and value).
async fn wait_metric(proxy: &TokenProxyProcess, line: &str) {
    eventually(format!("`{line}` in /metrics"), Duration::from_secs(20), async || {
        proxy.admin_get("/metrics").await.text().lines().any(|l| l == line)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_unchanged_providers_tokens_and_refuses_a_bad_config() {
    let (idp_a, idp_b) = (FakeIdp::start(300).await, FakeIdp::start(300).await);
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenproxy.toml");
    std::fs::write(&path, format!("{LISTEN}{}{}", provider("a", &idp_a, ""), route("/a", &upstream, "a"))).unwrap();
    let proxy = TokenProxyProcess::run(&path, &[]).await;
    proxy.wait_ready().await;
    let client = Client::new();
    let url = |p: &str| proxy.url(p);
    assert_eq!(client.get(&url("/a/x")).await.json()["token"], "tok-1");
    let fingerprint = client.get(&proxy.admin_url("/tokens")).await.json()["providers"]["a"]["fingerprint"].clone();

    // Reload with SIGHUP: provider a unchanged, provider b and route /b added.
    let config = format!(
        "{LISTEN}{}{}{}{}",
        provider("a", &idp_a, ""),
        provider("b", &idp_b, ""),
        route("/a", &upstream, "a"),
        route("/b", &upstream, "b")
    );
    std::fs::write(&path, config).unwrap();
    proxy.signal(libc::SIGHUP);
    wait_metric(&proxy, "tokenproxy_config_reloads_total{outcome=\"success\"} 1").await;
    proxy.wait_ready().await;
    assert_eq!(idp_a.calls(), 1, "provider a kept its token: no new token call");
    let tokens = client.get(&proxy.admin_url("/tokens")).await.json();
    assert_eq!(tokens["providers"]["a"]["fingerprint"], fingerprint);
    assert_eq!(client.get(&url("/a/x")).await.json()["token"], "tok-1");
    assert_eq!(client.get(&url("/b/x")).await.json()["token"], "tok-1");
    assert_eq!(idp_b.calls(), 1);

    // A bad config is refused with every error, and the running one is kept.
    std::fs::write(&path, "[server]\nlisten = \"127.0.0.1:0\"\nbogus = 1\n[[routes]]\nprefix = \"/c\"\n").unwrap();
    let refused = client.post(&proxy.admin_url("/admin/reload"), Bytes::new()).await;
    assert_eq!(refused.status, 400, "{}", refused.text());
    let errors = refused.json()["errors"].to_string();
    assert!(errors.contains("server.bogus") && errors.contains("routes[0].upstream"), "{errors}");
    assert_eq!(client.get(&url("/b/x")).await.status, 200, "the old routes still serve");
    wait_metric(&proxy, "tokenproxy_config_reloads_total{outcome=\"error\"} 1").await;

    // A changed provider gets a new token; a removed route stops matching.
    let config = format!("{LISTEN}{}{}", provider("a", &idp_a, "scope = \"more\""), route("/a", &upstream, "a"));
    std::fs::write(&path, config).unwrap();
    let reloaded = client.post(&proxy.admin_url("/admin/reload"), Bytes::new()).await;
    assert_eq!(reloaded.status, 200, "{}", reloaded.text());
    let summary = reloaded.json()["summary"].as_str().unwrap().to_owned();
    assert!(summary.contains("started: [a]") && summary.contains("removed: [b]"), "{summary}");
    proxy.wait_ready().await;
    assert_eq!(client.get(&url("/a/x")).await.json()["token"], "tok-2");
    assert_eq!(client.get(&url("/b/x")).await.status, 404);
}

#[tokio::test]
async fn a_rotated_secret_file_is_used_at_once_even_after_invalid_client() {
    let idp = FakeIdp::start(300).await;
    idp.set_mode(IdpMode::Fail { status: 401, body: r#"{"error":"invalid_client"}"#.into(), retry_after: None });
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client-secret");
    std::fs::write(&secret, "old-secret\n").unwrap();
    let config = format!(
        "[providers.api]\ntoken_url = \"{}\"\nclient_id = \"c\"\nclient_secret_file = \"{}\"\n{}",
        idp.token_url(),
        secret.display(),
        route("/api", &upstream, "api")
    );
    let proxy = Proxy::start(&config).await;
    idp.wait_calls(1).await;
    // invalid_client backs off for minutes; the operator fixes the secret (Kubernetes swaps the mounted file).
    idp.set_mode(IdpMode::Issue { expires_in: 300 });
    let replacement = dir.path().join("client-secret.new");
    std::fs::write(&replacement, "new-secret\n").unwrap();
    std::fs::rename(&replacement, &secret).unwrap();
    idp.wait_calls(2).await;
    proxy.wait_ready().await;
    use base64::Engine;
    let basic = idp.received()[1].authorization.clone().unwrap();
    let decoded = base64::engine::general_purpose::STANDARD.decode(basic.strip_prefix("Basic ").unwrap()).unwrap();
    assert_eq!(String::from_utf8(decoded).unwrap(), "c:new-secret");
    assert_eq!(Client::new().get(&proxy.url("/api/x")).await.json()["token"], "tok-2");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_have_access_lines_and_no_token_or_secret_anywhere() {
    let idp = FakeIdp::start(300).await;
    let sessions = SessionIdp::start(300, "rt-seed-abcdef").await;
    let owners = SessionIdp::start(300, "unused").await;
    let signer = FakeIdp::start(300).await;
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("seed"), "rt-seed-abcdef\n").unwrap();
    // A private_key_jwt provider: its key and its signed assertions must not show anywhere either.
    let key_pem = {
        use p256::pkcs8::EncodePrivateKey as _;
        p256::SecretKey::from_slice(&[21; 32]).unwrap().to_pkcs8_pem(Default::default()).unwrap().to_string()
    };
    let key_file = dir.path().join("signer.pem");
    std::fs::write(&key_file, &key_pem).unwrap();
    std::fs::set_permissions(&key_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let path = dir.path().join("tokenproxy.toml");
    let config = format!(
        r#"{LISTEN}
[log]
format = "json"
level = "debug"
[state]
dir = "{state}"
{cc}
[providers.session]
token_url = "{session_url}"
grant = "refresh_token"
client_id = "session-client"
client_secret = "session-s3cret"
refresh_token_file = "{seed}"
[providers.owner]
token_url = "{owner_url}"
grant = "password"
client_id = "owner-client"
client_secret = "owner-s3cret"
username = "alice"
password = "wonderland"
[providers.signer]
token_url = "{signer_url}"
client_id = "signer-client"
client_auth = "private_key_jwt"
private_key_file = "{key_file}"
{r1}{r2}{r3}{r4}
[[routes]]
prefix = "/q"
upstream = "{up}"
provider = "cc"
inject = "query"
"#,
        state = dir.path().join("state").display(),
        cc = provider("cc", &idp, ""),
        session_url = sessions.token_url(),
        owner_url = owners.token_url(),
        seed = dir.path().join("seed").display(),
        r1 = route("/cc", &upstream, "cc"),
        r2 = route("/session", &upstream, "session"),
        r3 = route("/owner", &upstream, "owner"),
        r4 = route("/signer", &upstream, "signer"),
        signer_url = signer.token_url(),
        key_file = key_file.display(),
        up = upstream.url(),
    );
    std::fs::write(&path, config).unwrap();
    let mut proxy = TokenProxyProcess::run(&path, &[("RUST_LOG", "debug")]).await;
    proxy.wait_ready().await;
    let client = Client::new();
    let url = |p: &str| proxy.url(p);
    for p in ["/cc/a?secret=1", "/session/b", "/owner/c", "/q/d?x=1", "/signer/e"] {
        assert_eq!(client.get(&url(p)).await.status, 200, "{p}");
    }
    // A 401 and its replay, a forced refresh (rotation), a request with the caller's own request id.
    upstream.revoke("tok-1");
    assert_eq!(client.get(&url("/cc/replayed")).await.status, 200);
    assert_eq!(client.post(&proxy.admin_url("/tokens/session/refresh"), Bytes::new()).await.status, 200);
    let request = http::Request::get(url("/cc/with-id"))
        .header("x-request-id", "req-42")
        .body(http_body_util::Full::<Bytes>::default())
        .unwrap();
    let reply = client.send(request).await;
    assert_eq!(reply.headers["x-request-id"], "req-42");
    assert_eq!(upstream.seen().last().unwrap().headers["x-request-id"], "req-42");
    let admin_text = [
        client.get(&proxy.admin_url("/metrics")).await.text(),
        client.get(&proxy.admin_url("/tokens")).await.text(),
        client.get(&proxy.admin_url("/readyz")).await.text(),
    ]
    .join("\n");
    let status = proxy.terminate().await;
    assert_eq!(status.code(), Some(0), "clean exit");
    let logs = proxy.logs();

    // Every line is one JSON object with timestamp, level and message.
    let mut access = Vec::new();
    for line in logs.lines() {
        let entry: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(entry["timestamp"].is_string() && entry["level"].is_string(), "{line}");
        assert!(entry["message"].is_string(), "{line}");
        if entry["target"] == "access" {
            access.push(entry);
        }
    }
    assert!(access.len() >= 6, "{access:?}");
    let replayed = access.iter().find(|a| a["path"] == "/cc/replayed").expect("access line of the replay");
    assert_eq!(replayed["replayed"], true);
    assert_eq!(replayed["status"], 200);
    assert_eq!(replayed["route"], "/cc");
    assert_eq!(replayed["method"], "GET");
    assert!(replayed["duration_ms"].is_number() && replayed["upstream"].is_string());
    assert!(replayed["request_id"].as_str().unwrap().len() >= 16);
    assert!(access.iter().any(|a| a["request_id"] == "req-42"));
    assert!(access.iter().all(|a| !a["path"].as_str().unwrap().contains('?')), "paths are logged without query");

    // No access token, refresh token, client secret or password, anywhere.
    let mut secrets: Vec<String> = vec![
        "cc-s3cret".into(),
        "session-s3cret".into(),
        "owner-s3cret".into(),
        "wonderland".into(),
        "rt-seed-abcdef".into(),
    ];
    for seen in upstream.seen() {
        if let Some(auth) = seen.headers.get("authorization") {
            secrets.push(auth.to_str().unwrap().trim_start_matches("Bearer ").to_owned());
        }
        if let Some((_, token)) = seen.uri.split_once("access_token=") {
            secrets.push(token.to_owned());
        }
    }
    let stats = sessions.stats();
    secrets.push(stats["valid"].as_str().unwrap().to_owned());
    secrets.push(owners.stats()["valid"].as_str().unwrap().to_owned());
    secrets.extend(["rt-1", "rt-2"].map(String::from));
    // The private key, line by line, and every assertion it signed (whole, and its signature alone).
    secrets.extend(key_pem.lines().filter(|line| !line.starts_with("-----")).map(String::from));
    let assertions: Vec<String> = signer
        .received()
        .iter()
        .flat_map(|call| call.form.iter().filter(|(k, _)| k == "client_assertion").map(|(_, v)| v.clone()))
        .collect();
    assert!(!assertions.is_empty(), "the signer provider made its token call with an assertion");
    for assertion in assertions {
        secrets.push(assertion.rsplit('.').next().unwrap().to_owned());
        secrets.push(assertion);
    }
    assert!(secrets.len() > 10);
    for secret in &secrets {
        assert!(!logs.contains(secret.as_str()), "`{secret}` leaked into the logs");
        assert!(!admin_text.contains(secret.as_str()), "`{secret}` leaked into metrics or the admin API");
    }
}
