//! Why an upstream refused a token (docs/metrics-and-alerts.md, "Why an upstream refused a token"): an IdP that
//! issues JWTs with the wrong `aud`, a short `scope`, another `iss`, a lifetime the upstream's clock (10 minutes ahead)
//! has already passed, or a certificate binding the route does not present, and an opaque token; upstreams that
//! refuse each. The verdict shows in `/tokens` (`last_refusal`) and in `tokenproxy_upstream_refusals_total{route,
//! reason}`, once per token generation and route, and never carries the token or its subject. Runs on both HTTP/1.1
//! transports (`TP_TEST_HTTP1`).

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};
use support::{json_response, spawn_server, Client, Proxy};

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A JWT with `claims` (its signature is not checked by anyone here).
fn jwt(claims: Value) -> String {
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    format!("{}.{}.c2lnbmF0dXJl", b64(br#"{"alg":"RS256","typ":"at+jwt"}"#), b64(claims.to_string().as_bytes()))
}

/// An IdP whose token for client `C` is the JWT (or opaque token) the test chose for it; its issuer is its own URL (the
/// `Host` it is called at), and it answers discovery.
async fn idp() -> (std::net::SocketAddr, tokio::sync::watch::Sender<()>) {
    spawn_server(|request: Request<hyper::body::Incoming>| async move {
        let host = request.headers().get("host").and_then(|h| h.to_str().ok()).unwrap_or_default().to_owned();
        let base = format!("http://{host}");
        let path = request.uri().path().to_owned();
        if path.ends_with("openid-configuration") || path.ends_with("oauth-authorization-server") {
            return json_response(StatusCode::OK, json!({ "issuer": base, "token_endpoint": format!("{base}/token") }));
        }
        // client_secret_basic: the client id is in `Authorization: Basic base64(id:secret)`.
        let basic = request.headers().get("authorization").and_then(|h| h.to_str().ok()?.strip_prefix("Basic "));
        let decoded = basic.and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok()).unwrap_or_default();
        let client = String::from_utf8_lossy(&decoded).split(':').next().unwrap_or_default().to_owned();
        let t = now();
        let mut claims = json!({ "iss": base, "aud": "https://api.example", "sub": "subject-never-shown",
            "iat": t - 5, "exp": t + 300, "scope": "orders.read" });
        let token = match client.as_str() {
            "aud" => {
                claims["aud"] = json!("https://other.example");
                jwt(claims)
            }
            "iss" => {
                claims["iss"] = json!("https://rogue.example");
                jwt(claims)
            }
            "bound" => {
                // Certificate-bound (RFC 8705), but the route presents no client certificate to its upstream.
                claims["cnf"] = json!({ "x5t#S256": "bwcK0esc1ErjaVVGDFWDpxB_uRfK-QyG3AhANCSQjNs" });
                jwt(claims)
            }
            "opaque" => "opaque-token-value".to_owned(),
            _ => jwt(claims),
        };
        json_response(StatusCode::OK, json!({ "access_token": token, "token_type": "Bearer", "expires_in": 300 }))
    })
    .await
}

/// An upstream refusing every request: `/scope…` with 403 insufficient_scope, `/clock…` with a 401 dated 10 minutes
/// ahead, anything else with `401 Bearer error="invalid_token"`.
async fn upstream() -> (std::net::SocketAddr, tokio::sync::watch::Sender<()>) {
    spawn_server(|request: Request<hyper::body::Incoming>| async move {
        let path = request.uri().path().to_owned();
        let mut response = Response::builder();
        if path.starts_with("/scope") {
            response = response.status(StatusCode::FORBIDDEN).header(
                "www-authenticate",
                "Bearer error=\"insufficient_scope\", scope=\"orders.read orders.write\", error_description=\"writes need orders.write\"",
            );
        } else {
            response = response.status(StatusCode::UNAUTHORIZED).header("www-authenticate", "Bearer error=\"invalid_token\"");
        }
        if path.starts_with("/clock") {
            let ahead = SystemTime::now() + Duration::from_secs(600);
            response = response.header("date", httpdate::fmt_http_date(ahead));
        }
        response.body(Full::new(Bytes::new())).unwrap()
    })
    .await
}

#[tokio::test]
async fn each_refusal_is_explained_in_tokens_and_the_metric() {
    let (idp_addr, _idp) = idp().await;
    let (up, _up) = upstream().await;
    let base = format!("http://{idp_addr}");
    let mut config = String::new();
    for (name, client, path) in [
        ("aud", "aud", "aud"),
        ("scope", "good", "scope"),
        ("clock", "good", "clock"),
        ("iss", "iss", "iss"),
        ("opaque", "opaque", "opaque"),
        ("bound", "bound", "bound"),
    ] {
        config += &format!(
            "[providers.{name}]\ntoken_url = \"{base}/token\"\nissuer = \"{base}\"\nclient_id = \"{client}\"\n\
             client_secret = \"s3cret\"\naudience = \"https://api.example\"\n\
             [[routes]]\nname = \"{name}\"\nprefix = \"/{path}\"\nstrip_prefix = false\nupstream = \"http://{up}\"\nprovider = \"{name}\"\n"
        );
    }
    let proxy = Proxy::start(&config).await;
    let client = Client::new();
    for path in ["/aud/x", "/scope/x", "/clock/x", "/iss/x", "/opaque/x", "/bound/x"] {
        let status = client.get(&proxy.url(path)).await.status;
        assert!(status == 401 || status == 403, "{path}: {status}");
        // Once per token generation and route: a second refusal of the same token adds nothing.
        client.get(&proxy.url(path)).await;
    }
    let tokens: Value = client.get(&proxy.admin_url("/tokens")).await.json();
    let text = tokens.to_string();
    for (provider, reason, status, cites) in [
        ("aud", "audience", 401, "`https://other.example`"),
        ("scope", "scope", 403, "missing `orders.write`"),
        ("clock", "expired", 401, "s ahead of this machine's"),
        ("iss", "issuer", 401, "`https://rogue.example`"),
        ("opaque", "unknown", 401, "not a JWT"),
        ("bound", "binding", 401, "cnf.x5t#S256"),
    ] {
        let refusal = &tokens["providers"][provider]["last_refusal"];
        assert_eq!(refusal["reasons"], json!([reason]), "{provider}: {refusal}");
        assert_eq!((refusal["route"].as_str(), refusal["status"].as_u64()), (Some(provider), Some(status)));
        let explanation = refusal["explanation"].as_str().unwrap_or_default();
        assert!(explanation.contains(cites), "{provider}: {explanation}");
        let metric = format!("tokenproxy_upstream_refusals_total{{reason=\"{reason}\",route=\"{provider}\"}}");
        assert_eq!(proxy.metric(&metric).await, 1.0, "{metric}, once per token generation and route");
    }
    assert_eq!(proxy.metric("tokenproxy_upstream_refusals_total{reason=\"unknown\",route=\"aud\"}").await, 0.0);
    assert!(!text.contains("subject-never-shown") && !text.contains("opaque-token-value"), "{text}");
    proxy.stop().await;
}
