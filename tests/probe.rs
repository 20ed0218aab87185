//! `tokenproxy check --probe ROUTE`: the binary gets the route's token, sends one request through the route as the
//! proxy does, and reports the status, each step's time and, on a refusal, the verdict: against a fake IdP that
//! records every form, an echoing upstream, and an upstream that answers `403 insufficient_scope` to a JWT lacking a
//! scope. Also: an unknown route, a token-exchange route with and without `--subject-token-file`, and that no token
//! (or caller's token) is ever printed.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;
use sha2::{Digest, Sha256};
use support::{json_response, spawn_server, tokenproxy_command, write_proxy_config, FakeIdp, FakeUpstream, IdpMode};

/// What one command printed, and how it exited.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// `tokenproxy ARGS… --config tokenproxy.toml` in `dir`.
async fn tokenproxy(dir: &Path, args: &[&str]) -> Run {
    let mut command = tokio::process::Command::from(tokenproxy_command(args));
    command.args(["--config", "tokenproxy.toml"]).current_dir(dir);
    let output = command.output().await.expect("run tokenproxy");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The fingerprint `/tokens` gives `token`: the first 8 hex digits of its SHA-256.
fn fingerprint(token: &str) -> String {
    Sha256::digest(token.as_bytes())[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// A provider `orders` at `token_url` and its route `orders` (`/orders`, prefix stripped) to `upstream`, and a
/// pass-through route named by default (`/raw`).
fn orders(token_url: &str, upstream: &str) -> String {
    format!(
        "[providers.orders]\ntoken_url = \"{token_url}\"\nclient_id = \"client-1\"\nclient_secret = \"s3cret-value\"\n\
         [[routes]]\nname = \"orders\"\nprefix = \"/orders\"\nstrip_prefix = true\nupstream = \"{upstream}\"\n\
         provider = \"orders\"\n\
         [[routes]]\nprefix = \"/raw\"\nupstream = \"{upstream}\"\n"
    )
}

#[tokio::test]
async fn a_probe_answered_2xx_exits_0_and_reports_the_status_and_each_step() {
    let (idp, upstream) = (FakeIdp::start(300).await, FakeUpstream::start().await);
    let dir = tempfile::tempdir().unwrap();
    write_proxy_config(dir.path(), &orders(&idp.token_url(), &upstream.url()));

    let run = tokenproxy(dir.path(), &["check", "--probe", "orders", "--path", "/health"]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines[0], "route orders: GET /orders/health -> 200 OK", "{}", run.stderr);
    assert!(lines[1].starts_with("  config ") && lines[1].ends_with(" ms"), "{}", run.stderr);
    assert!(lines[2].starts_with("  token "), "{}", run.stderr);
    assert!(
        lines[2].contains(&format!(
            "provider orders, fingerprint {}, generation 1, expires in 300 s",
            fingerprint("tok-1")
        )),
        "{}",
        run.stderr
    );
    assert!(lines[3].starts_with("  upstream ") && lines[3].contains(&upstream.url()), "{}", run.stderr);
    assert_eq!(lines.len(), 4, "nothing more on a 2xx: {}", run.stderr);
    // The proxy's own request: the prefix stripped, the token attached, sent once, after one token call.
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!((seen[0].method.as_str(), seen[0].uri.as_str()), ("GET", "/health"));
    assert_eq!(seen[0].headers["authorization"], "Bearer tok-1");
    let request_id = seen[0].headers["x-request-id"].to_str().unwrap();
    assert!(lines[3].ends_with(&format!("x-request-id {request_id}")), "{}", run.stderr);
    assert_eq!(idp.calls(), 1);
    assert!(run.stdout.contains("[providers.orders]"), "check still prints the resolved config");
    assert!(!run.stdout.contains("tok-1") && !run.stderr.contains("tok-1"), "never the token");

    // Another method, and a query.
    let run = tokenproxy(dir.path(), &["check", "--probe", "orders", "--method", "post", "--path", "items?x=1"]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stderr.starts_with("route orders: POST /orders/items?x=1 -> 200 OK\n"), "{}", run.stderr);
    let seen = upstream.seen();
    assert_eq!((seen[1].method.as_str(), seen[1].uri.as_str()), ("POST", "/items?x=1"));
}

#[tokio::test]
async fn a_refused_replay_exits_1_and_shows_the_new_token_and_the_verdict() {
    let (idp, upstream) = (FakeIdp::start(300).await, FakeUpstream::start().await);
    let dir = tempfile::tempdir().unwrap();
    write_proxy_config(dir.path(), &orders(&idp.token_url(), &upstream.url()));

    // `/always401…` refuses every token, without a challenge: one replay with a new token, refused too.
    let run = tokenproxy(dir.path(), &["check", "--probe", "orders", "--path", "/always401"]).await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(run.stderr.starts_with("route orders: GET /orders/always401 -> 401 Unauthorized\n"), "{}", run.stderr);
    assert!(
        run.stderr.contains(&format!(
            "replayed once after a refusal with a new token (fingerprint {}, generation 2",
            fingerprint("tok-2")
        )),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("  refused: unknown: the token is not a JWT (opaque)"), "{}", run.stderr);
    assert_eq!((idp.calls(), upstream.requests()), (2, 2));
    assert!(!run.stderr.contains("tok-"), "never a token: {}", run.stderr);
}

#[tokio::test]
async fn a_token_that_cannot_be_had_is_reported_and_nothing_is_sent() {
    let (idp, upstream) = (FakeIdp::start(300).await, FakeUpstream::start().await);
    // The IdP's text carries a C1 control (a CSI that terminals obey): it never reaches the terminal.
    let body = json!({ "error": "invalid_client", "error_description": "unknown client\u{9b}31m" }).to_string();
    idp.set_mode(IdpMode::Fail { status: 401, body, retry_after: None });
    let dir = tempfile::tempdir().unwrap();
    write_proxy_config(dir.path(), &orders(&idp.token_url(), &upstream.url()));

    let run = tokenproxy(dir.path(), &["check", "--probe", "orders"]).await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(run.stderr.starts_with("route orders: GET /orders -> not sent: no token\n"), "{}", run.stderr);
    let token = run.stderr.lines().find(|line| line.starts_with("  token ")).unwrap_or_default();
    assert!(token.contains("provider orders: FAILED: ") && token.contains("invalid_client"), "{}", run.stderr);
    assert!(token.contains("unknown client") && !run.stderr.contains('\u{9b}'), "{}", run.stderr);
    assert_eq!((idp.calls(), upstream.requests()), (1, 0));
}

/// A JWT with `claims` (nobody checks its signature here).
fn jwt(claims: serde_json::Value) -> String {
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    format!("{}.{}.c2lnbmF0dXJl", b64(br#"{"alg":"RS256","typ":"at+jwt"}"#), b64(claims.to_string().as_bytes()))
}

#[tokio::test]
async fn a_403_insufficient_scope_exits_1_with_the_verdict_naming_the_missing_scope() {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let token = jwt(json!({ "iss": "https://idp.example", "aud": "api", "sub": "subject-never-shown",
        "iat": now - 5, "exp": now + 300, "scope": "a" }));
    let issued = token.clone();
    let (idp, _idp) = spawn_server(move |_: Request<hyper::body::Incoming>| {
        let token = issued.clone();
        async move { json_response(StatusCode::OK, json!({ "access_token": token, "expires_in": 300 })) }
    })
    .await;
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&requests);
    let (upstream, _upstream) = spawn_server(move |_: Request<hyper::body::Incoming>| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move {
            Response::builder()
                .status(StatusCode::FORBIDDEN)
                .header("www-authenticate", "Bearer error=\"insufficient_scope\", scope=\"a b\"")
                .body(Full::new(Bytes::new()))
                .unwrap()
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    write_proxy_config(dir.path(), &orders(&format!("http://{idp}/token"), &format!("http://{upstream}")));

    let run = tokenproxy(dir.path(), &["check", "--probe", "orders"]).await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(run.stderr.starts_with("route orders: GET /orders -> 403 Forbidden\n"), "{}", run.stderr);
    let refused = run.stderr.lines().find(|line| line.starts_with("  refused: ")).unwrap_or_default();
    assert_eq!(
        refused, "  refused: scope: the upstream wants scope `a` `b` and the token has `a` (missing `b`)",
        "{}",
        run.stderr
    );
    assert_eq!(requests.load(Ordering::SeqCst), 1, "insufficient_scope is not replayed");
    for secret in [token.as_str(), "subject-never-shown", "s3cret-value"] {
        assert!(!run.stderr.contains(secret) && !run.stdout.contains(secret), "{secret} printed");
    }
}

#[tokio::test]
async fn an_unknown_route_or_a_misused_flag_is_an_error_that_says_what_to_do() {
    let (idp, upstream) = (FakeIdp::start(300).await, FakeUpstream::start().await);
    let dir = tempfile::tempdir().unwrap();
    write_proxy_config(dir.path(), &orders(&idp.token_url(), &upstream.url()));

    let run = tokenproxy(dir.path(), &["check", "--probe", "nope"]).await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("no route named `nope` (defined: orders, /raw)"), "{}", run.stderr);

    let subject = dir.path().join("subject");
    std::fs::write(&subject, "caller-token\n").unwrap();
    let file = subject.to_str().unwrap();
    let run = tokenproxy(dir.path(), &["check", "--probe", "orders", "--subject-token-file", file]).await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("route `orders` does not exchange a caller's token"), "{}", run.stderr);

    // The flags of --probe without it: a usage error.
    let run = tokenproxy(dir.path(), &["check", "--path", "/health"]).await;
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("--probe"), "{}", run.stderr);
    assert_eq!((idp.calls(), upstream.requests()), (0, 0), "nothing was sent");
}

#[tokio::test]
async fn an_exchange_route_needs_the_callers_token_and_exchanges_the_one_given() {
    let (idp, upstream) = (FakeIdp::start(300).await, FakeUpstream::start().await);
    let dir = tempfile::tempdir().unwrap();
    write_proxy_config(
        dir.path(),
        &format!(
            "[providers.ex]\ntoken_url = \"{}\"\ngrant = \"token_exchange\"\nclient_id = \"gw\"\n\
             client_secret = \"s3cret-value\"\naudience = \"orders\"\n\
             [[routes]]\nname = \"ex\"\nprefix = \"/ex\"\nupstream = \"{}\"\nprovider = \"ex\"\n",
            idp.token_url(),
            upstream.url()
        ),
    );

    let run = tokenproxy(dir.path(), &["check", "--probe", "ex"]).await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("route `ex` exchanges each caller's own token")
            && run.stderr.contains("with --subject-token-file FILE"),
        "{}",
        run.stderr
    );
    assert_eq!(idp.calls(), 0);

    let subject = dir.path().join("subject");
    std::fs::write(&subject, "caller-token-a\n").unwrap();
    let run =
        tokenproxy(dir.path(), &["check", "--probe", "ex", "--subject-token-file", subject.to_str().unwrap()]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let form = &idp.received()[0].form;
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    assert_eq!(field("grant_type"), Some("urn:ietf:params:oauth:grant-type:token-exchange"));
    assert_eq!(field("subject_token"), Some("caller-token-a"), "the file's token, trimmed");
    assert_eq!(idp.calls(), 1, "one exchange: the request used its token");
    assert_eq!(upstream.seen()[0].headers["authorization"], "Bearer tok-1", "the exchanged token, not the caller's");
    assert!(
        run.stderr.contains(&format!(
            "provider ex, exchanged for the caller's token (subject fingerprint {}), fingerprint {}",
            fingerprint("caller-token-a"),
            fingerprint("tok-1")
        )),
        "{}",
        run.stderr
    );
    for secret in ["caller-token-a", "tok-1"] {
        assert!(!run.stderr.contains(secret) && !run.stdout.contains(secret), "{secret} printed");
    }
}

#[tokio::test]
async fn a_dpop_route_is_probed_with_a_proof_of_the_key_its_token_is_bound_to() {
    let (idp, _idp) = spawn_server(|_: Request<hyper::body::Incoming>| async {
        json_response(StatusCode::OK, json!({ "access_token": "dpop-tok", "token_type": "DPoP", "expires_in": 300 }))
    })
    .await;
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorded = Arc::clone(&seen);
    let (upstream, _upstream) = spawn_server(move |request: Request<hyper::body::Incoming>| {
        recorded.lock().unwrap().push(request.headers().clone());
        async { json_response(StatusCode::OK, json!({})) }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = orders(&format!("http://{idp}/token"), &format!("http://{upstream}"))
        .replace("client_secret = \"s3cret-value\"\n", "client_secret = \"s3cret-value\"\ndpop = true\n");
    write_proxy_config(dir.path(), &config);

    let run = tokenproxy(dir.path(), &["check", "--probe", "orders", "--path", "/x"]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let headers = seen.lock().unwrap()[0].clone();
    assert_eq!(headers["authorization"], "DPoP dpop-tok");
    // The proof, checked as a resource server checks it: signed by the key in its header, for this request and token.
    let proof = headers["dpop"].to_str().unwrap();
    let header = jsonwebtoken::decode_header(proof).unwrap();
    let jwk = header.jwk.expect("the proof's key");
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    let key = jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap();
    let claims = jsonwebtoken::decode::<serde_json::Value>(proof, &key, &validation).unwrap().claims;
    let ath = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(b"dpop-tok"));
    assert_eq!((claims["htm"].as_str(), claims["ath"].as_str()), (Some("GET"), Some(ath.as_str())));
    assert_eq!(claims["htu"], format!("http://{upstream}/x"));
    let jkt = jwk.thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256).unwrap();
    assert!(run.stderr.contains(&format!("DPoP-bound to key {jkt}")), "{}", run.stderr);
    assert!(!run.stderr.contains("dpop-tok"), "never the token: {}", run.stderr);
}
