//! A fake identity provider for refresh-token sessions: rotation with reuse detection (like Auth0 and
//! oidc-provider, a reused refresh token revokes the family), the device authorization grant, revocation,
//! the password grant and discovery metadata.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::{json_response, spawn_server};

#[derive(Default)]
struct State {
    /// The one refresh token the IdP accepts now (`None`: the family was revoked).
    valid: Option<String>,
    /// Every refresh token redeemed or revoked so far.
    spent: HashSet<String>,
    issued: usize,
    refreshes: usize,
    reused: usize,
    invalid_grant: usize,
    revoked: Vec<String>,
    /// Device flow: answers still to give before approving (error codes).
    device_script: Vec<&'static str>,
    device_polls: usize,
    password_logins: usize,
    /// Issuer written into the metadata (to test refusal of a mismatch).
    metadata_issuer: Option<String>,
    /// `refresh_expires_in` to send, if any.
    refresh_expires_in: Option<u64>,
}

/// The fake IdP.
pub struct SessionIdp {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    calls: Arc<AtomicUsize>,
    _stop: watch::Sender<()>,
}

impl SessionIdp {
    /// Starts it; access tokens live `expires_in` seconds; `seed` is the first valid refresh token.
    pub async fn start(expires_in: u64, seed: &str) -> SessionIdp {
        let state = Arc::new(Mutex::new(State { valid: Some(seed.to_owned()), ..State::default() }));
        let calls = Arc::new(AtomicUsize::new(0));
        let (shared, counter) = (Arc::clone(&state), Arc::clone(&calls));
        let addr_cell: Arc<Mutex<String>> = Arc::new(Mutex::new(String::new()));
        let issuer_cell = Arc::clone(&addr_cell);
        let (addr, stop) = spawn_server(move |req: Request<Incoming>| {
            let state = Arc::clone(&shared);
            let calls = Arc::clone(&counter);
            let issuer = issuer_cell.lock().unwrap().clone();
            async move {
                let path = req.uri().path().to_owned();
                let body = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
                let field = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap_or_default();
                let mut s = state.lock().unwrap();
                match path.as_str() {
                    "/.well-known/openid-configuration" => json_response(
                        StatusCode::OK,
                        json!({
                            "issuer": s.metadata_issuer.clone().unwrap_or_else(|| issuer.clone()),
                            "token_endpoint": format!("{issuer}/token"),
                            "device_authorization_endpoint": format!("{issuer}/device"),
                            "revocation_endpoint": format!("{issuer}/revoke"),
                        }),
                    ),
                    "/device" => json_response(
                        StatusCode::OK,
                        json!({
                            "device_code": "device-code-1",
                            "user_code": "WDJB-MJHT",
                            "verification_uri": format!("{issuer}/activate"),
                            "verification_uri_complete": format!("{issuer}/activate?user_code=WDJB-MJHT"),
                            "expires_in": 120,
                            "interval": 1,
                        }),
                    ),
                    "/revoke" => {
                        let token = field("token");
                        s.spent.insert(token.clone());
                        if s.valid.as_deref() == Some(token.as_str()) {
                            s.valid = None;
                        }
                        s.revoked.push(token);
                        Response::new(Full::new(Bytes::new()))
                    }
                    "/token" => {
                        calls.fetch_add(1, Ordering::SeqCst);
                        let expires = s.refresh_expires_in;
                        let tokens = |s: &mut State| {
                            s.issued += 1;
                            let n = s.issued;
                            let refresh = format!("rt-{n}");
                            s.valid = Some(refresh.clone());
                            let mut body = json!({
                                "access_token": format!("tok-{n}"),
                                "token_type": "bearer",
                                "expires_in": expires_in,
                                "refresh_token": refresh,
                            });
                            if let Some(e) = expires {
                                body["refresh_expires_in"] = json!(e);
                            }
                            json_response(StatusCode::OK, body)
                        };
                        match field("grant_type").as_str() {
                            "refresh_token" => {
                                let presented = field("refresh_token");
                                if s.valid.as_deref() == Some(presented.as_str()) {
                                    s.refreshes += 1;
                                    s.spent.insert(presented);
                                    tokens(&mut s)
                                } else {
                                    if s.spent.contains(&presented) {
                                        // Reuse of a rotated token: revoke the whole family.
                                        s.reused += 1;
                                        s.valid = None;
                                    }
                                    s.invalid_grant += 1;
                                    json_response(
                                        StatusCode::BAD_REQUEST,
                                        json!({ "error": "invalid_grant", "error_description": "grant request is invalid" }),
                                    )
                                }
                            }
                            "urn:ietf:params:oauth:grant-type:device_code" => {
                                s.device_polls += 1;
                                if s.device_script.is_empty() {
                                    tokens(&mut s)
                                } else {
                                    let error = s.device_script.remove(0);
                                    json_response(StatusCode::BAD_REQUEST, json!({ "error": error }))
                                }
                            }
                            "password" if field("username") == "alice" && field("password") == "wonderland" => {
                                s.password_logins += 1;
                                tokens(&mut s)
                            }
                            _ => json_response(StatusCode::BAD_REQUEST, json!({ "error": "invalid_grant" })),
                        }
                    }
                    _ => json_response(StatusCode::NOT_FOUND, json!({ "error": "not_found" })),
                }
            }
        })
        .await;
        *addr_cell.lock().unwrap() = format!("http://{addr}");
        SessionIdp { addr, state, calls, _stop: stop }
    }

    pub fn issuer(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn token_url(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// Token endpoint calls so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// A snapshot of the counters: refreshes, reused, invalid_grant, device polls, password logins.
    pub fn stats(&self) -> Value {
        let s = self.state.lock().unwrap();
        json!({
            "refreshes": s.refreshes,
            "reused": s.reused,
            "invalid_grant": s.invalid_grant,
            "device_polls": s.device_polls,
            "password_logins": s.password_logins,
            "revoked": s.revoked,
            "valid": s.valid,
        })
    }

    /// Makes `rt` the one valid refresh token (a new login at the IdP).
    pub fn new_session(&self, rt: &str) {
        self.state.lock().unwrap().valid = Some(rt.to_owned());
    }

    /// Revokes the session.
    pub fn revoke_session(&self) {
        self.state.lock().unwrap().valid = None;
    }

    /// The device flow answers these errors before approving.
    pub fn script_device(&self, errors: Vec<&'static str>) {
        self.state.lock().unwrap().device_script = errors;
    }

    /// Metadata claims this issuer (a mismatch must be refused).
    pub fn claim_issuer(&self, issuer: &str) {
        self.state.lock().unwrap().metadata_issuer = Some(issuer.to_owned());
    }

    /// Sends `refresh_expires_in`.
    pub fn refresh_expires_in(&self, seconds: u64) {
        self.state.lock().unwrap().refresh_expires_in = Some(seconds);
    }
}
