//! `tokenproxy demo`: the proxy on its embedded default, with an in-process demo IdP and upstream.
//!
//! The demo IdP issues HS256 JWTs that live 30 seconds to the client `demo-client` / `demo-secret`; the demo upstream
//! checks them (401 when missing, forged or expired) and echoes what it received, showing the token only by its
//! claims and fingerprint. Everything listens on 127.0.0.1; the proxy's refresh log lines show tokens being renewed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{Config, ConfigError};
use crate::server::{run_listener, Handler, ListenerOptions};

/// The demo's client id.
pub const CLIENT_ID: &str = "demo-client";
/// The demo's client secret (a demo value, not a secret).
pub const CLIENT_SECRET: &str = "demo-secret";
/// Lifetime of the demo IdP's tokens.
pub const TOKEN_TTL: Duration = Duration::from_secs(30);
const AUDIENCE: &str = "demo-api";

/// The demo IdP and upstream, running on loopback ports.
pub struct DemoServices {
    /// The IdP's token endpoint.
    pub token_url: String,
    /// The upstream's base URL.
    pub upstream_url: String,
    /// Tokens issued so far.
    pub issued: Arc<AtomicU64>,
    _stop: watch::Sender<bool>,
}

/// Starts the demo IdP and upstream on 127.0.0.1 (ephemeral ports); they stop when the result is dropped.
pub async fn start_services() -> std::io::Result<DemoServices> {
    let key: [u8; 32] = rand::random();
    let (stop, stopped) = watch::channel(false);
    let options = ListenerOptions {
        max_connections: 1024,
        timeouts: crate::activity::Timeouts {
            header_read: Duration::from_secs(10),
            keepalive: Duration::from_secs(60),
        },
        shutdown_grace: Duration::from_secs(1),
        tls: None,
        metrics: None,
    };
    let issued = Arc::new(AtomicU64::new(0));
    let idp_listener = TcpListener::bind("127.0.0.1:0").await?;
    let upstream_listener = TcpListener::bind("127.0.0.1:0").await?;
    let token_url = format!("http://{}/token", idp_listener.local_addr()?);
    let upstream_url = format!("http://{}", upstream_listener.local_addr()?);
    let idp = Arc::new(DemoIdp { key: EncodingKey::from_secret(&key), issued: Arc::clone(&issued) });
    let upstream = Arc::new(DemoUpstream { key: DecodingKey::from_secret(&key) });
    tokio::spawn(run_listener(idp_listener, idp, options.clone(), stopped.clone(), None));
    tokio::spawn(run_listener(upstream_listener, upstream, options, stopped, None));
    Ok(DemoServices { token_url, upstream_url, issued, _stop: stop })
}

/// The demo's proxy config: a route `/` with the demo provider, and `/raw` without one (to see the 401).
pub fn config(services: &DemoServices, listen: SocketAddr, admin_listen: SocketAddr) -> Result<Config, ConfigError> {
    let toml = format!(
        r#"
[server]
listen = "{listen}"
[admin]
listen = "{admin_listen}"
[state]
dir = "./tokenproxy-state"
[providers.demo]
token_url = "{token_url}"
client_id = "{CLIENT_ID}"
client_secret = "{CLIENT_SECRET}"
scope = "demo.read"
expiry_skew = "5s"
[[routes]]
name = "raw"
prefix = "/raw"
upstream = "{upstream}"
strip_prefix = true
[[routes]]
name = "demo"
prefix = "/"
upstream = "{upstream}"
provider = "demo"
"#,
        token_url = services.token_url,
        upstream = services.upstream_url,
    );
    Config::from_toml_str(&toml, "the embedded demo config")
}

/// What `tokenproxy demo` prints once it listens.
pub fn banner(proxy: SocketAddr, admin: SocketAddr) -> String {
    format!(
        "tokenproxy demo: proxy on http://{proxy}, admin on http://{admin}\n\
         The demo IdP issues 30-second tokens; watch the log refresh them before they expire.\n\n\
         Try:\n\
         \x20 curl -s http://{proxy}/hello                      # token attached: the upstream says 200 and echoes it\n\
         \x20 curl -s http://{proxy}/raw/hello                  # route without a provider: the upstream says 401\n\
         \x20 curl -s http://{proxy}/hello -H 'Authorization: Bearer forged'   # replaced by a valid token\n\
         \x20 curl -s http://{admin}/tokens                     # token state, expiry, fingerprint (never the token)\n\
         \x20 curl -s http://{admin}/readyz\n\
         \x20 curl -s -X POST http://{admin}/tokens/demo/refresh  # force a refresh\n\
         \x20 curl -s http://{admin}/metrics | grep tokenproxy_token\n\n\
         Press Ctrl-C to stop.\n"
    )
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    aud: String,
    scope: String,
    iat: u64,
    exp: u64,
    jti: u64,
}

struct DemoIdp {
    key: EncodingKey,
    issued: Arc<AtomicU64>,
}

impl DemoIdp {
    /// The client id if the request authenticates as the demo client (Basic or form), else `None`.
    fn authenticate(&self, authorization: Option<&HeaderValue>, form: &[(String, String)]) -> bool {
        use base64::Engine as _;
        let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        if let Some(basic) = authorization.and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Basic ")) {
            let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(basic.trim()) else { return false };
            let decoded = String::from_utf8_lossy(&decoded).into_owned();
            let Some((id, secret)) = decoded.split_once(':') else { return false };
            let unescape =
                |s: &str| form_urlencoded::parse(format!("x={s}").as_bytes()).next().map(|(_, v)| v.into_owned());
            return unescape(id).as_deref() == Some(CLIENT_ID) && unescape(secret).as_deref() == Some(CLIENT_SECRET);
        }
        field("client_id") == Some(CLIENT_ID) && field("client_secret") == Some(CLIENT_SECRET)
    }
}

fn json_reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

async fn read_body(body: Incoming) -> Option<Bytes> {
    Limited::new(body, 64 * 1024).collect().await.ok().map(|c| c.to_bytes())
}

impl Handler for DemoIdp {
    type Body = Full<Bytes>;
    type Connection = ();

    fn connection(&self, _peer: SocketAddr, _tls: bool) {}

    async fn call(self: &Arc<Self>, request: Request<Incoming>, _connection: &Arc<()>) -> Response<Full<Bytes>> {
        if request.method() != Method::POST || request.uri().path() != "/token" {
            return json_reply(StatusCode::NOT_FOUND, json!({ "error": "not_found" }));
        }
        let authorization = request.headers().get(AUTHORIZATION).cloned();
        let Some(body) = read_body(request.into_body()).await else {
            return json_reply(StatusCode::BAD_REQUEST, json!({ "error": "invalid_request" }));
        };
        let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
        if form.iter().find(|(k, _)| k == "grant_type").map(|(_, v)| v.as_str()) != Some("client_credentials") {
            return json_reply(StatusCode::BAD_REQUEST, json!({ "error": "unsupported_grant_type" }));
        }
        if !self.authenticate(authorization.as_ref(), &form) {
            return json_reply(StatusCode::UNAUTHORIZED, json!({ "error": "invalid_client" }));
        }
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let jti = self.issued.fetch_add(1, Ordering::Relaxed) + 1;
        let claims = Claims {
            iss: "tokenproxy-demo-idp".into(),
            sub: CLIENT_ID.into(),
            aud: AUDIENCE.into(),
            scope: "demo.read".into(),
            iat: now,
            exp: now + TOKEN_TTL.as_secs(),
            jti,
        };
        match jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.key) {
            Ok(token) => json_reply(
                StatusCode::OK,
                json!({ "access_token": token, "token_type": "Bearer", "expires_in": TOKEN_TTL.as_secs(), "scope": "demo.read" }),
            ),
            Err(_) => json_reply(StatusCode::INTERNAL_SERVER_ERROR, json!({ "error": "server_error" })),
        }
    }
}

struct DemoUpstream {
    key: DecodingKey,
}

impl Handler for DemoUpstream {
    type Body = Full<Bytes>;
    type Connection = ();

    fn connection(&self, _peer: SocketAddr, _tls: bool) {}

    async fn call(self: &Arc<Self>, request: Request<Incoming>, _connection: &Arc<()>) -> Response<Full<Bytes>> {
        let token = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[AUDIENCE]);
        validation.leeway = 0;
        let verified = match token.as_deref() {
            None => Err("no bearer token".to_owned()),
            Some(token) => jsonwebtoken::decode::<Claims>(token, &self.key, &validation)
                .map(|data| data.claims)
                .map_err(|e| format!("invalid token: {e}")),
        };
        let claims = match verified {
            Ok(claims) => claims,
            Err(why) => {
                let mut response = json_reply(StatusCode::UNAUTHORIZED, json!({ "error": "unauthorized", "why": why }));
                response.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"demo\""));
                return response;
            }
        };
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let headers: serde_json::Map<String, serde_json::Value> = request
            .headers()
            .iter()
            .filter(|(name, _)| *name != AUTHORIZATION)
            .map(|(name, value)| (name.to_string(), json!(String::from_utf8_lossy(value.as_bytes()))))
            .collect();
        let method = request.method().to_string();
        let uri = request.uri().to_string();
        let body_len = read_body(request.into_body()).await.map_or(0, |b| b.len());
        json_reply(
            StatusCode::OK,
            json!({
                "upstream": "tokenproxy demo upstream",
                "method": method,
                "uri": uri,
                "headers": headers,
                "body_bytes": body_len,
                "token": { "verified": true, "sub": claims.sub, "jti": claims.jti, "expires_in_seconds": claims.exp.saturating_sub(now) },
            }),
        )
    }
}
