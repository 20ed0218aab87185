//! The vending listener (`[vending] listen`, docs/vending.md): `GET /v1/token/{provider}` hands a provider's current
//! token to a local application that must hold it, from the same slot the proxy uses (single flight, proactive
//! refresh). Only with the header `Metadata-Flavor: tokenproxy` — a request forgery that can only choose a URL cannot
//! set it — and only for providers with `vend = true`; any other name gets the same 404 as an unknown one. On a unix
//! socket (`listen` an absolute path), the socket file's mode (0600) decides who may ask.

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

use crate::metrics::Metrics;
use crate::token::{TokenEngine, TokenSource};

/// The header every vending request must carry, and its value.
pub const FLAVOR: (&str, &str) = ("metadata-flavor", "tokenproxy");

/// The vending API over the token engine.
pub struct Vending {
    engine: Arc<ArcSwap<TokenEngine>>,
    metrics: Arc<Metrics>,
}

impl Vending {
    /// A vending API for the current engine of `engine` (it changes with reloads).
    pub fn new(engine: Arc<ArcSwap<TokenEngine>>, metrics: Arc<Metrics>) -> Vending {
        Vending { engine, metrics }
    }

    /// Answers one request.
    pub async fn handle<B>(&self, request: Request<B>) -> Response<Full<Bytes>> {
        let Some(name) = request.uri().path().strip_prefix("/v1/token/").filter(|n| !n.is_empty() && !n.contains('/'))
        else {
            return answer(StatusCode::NOT_FOUND, json!({ "error": "not found" }));
        };
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return answer(StatusCode::METHOD_NOT_ALLOWED, json!({ "error": "method not allowed" }));
        }
        // A request that came through a proxy is not a local application's (Google's metadata server refuses it too):
        // a forwarding proxy in front of this listener must not turn it into a token dispenser.
        let headers = request.headers();
        if headers.contains_key("x-forwarded-for") || headers.contains_key(http::header::FORWARDED) {
            let error = "a request that names a forwarding hop (X-Forwarded-For, Forwarded) is refused: tokens are \
                         handed only to applications on this host";
            return answer(StatusCode::FORBIDDEN, json!({ "error": error }));
        }
        let flavored =
            request.headers().get(FLAVOR.0).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(FLAVOR.1.as_bytes()));
        if !flavored {
            let error = format!("send the header `Metadata-Flavor: {}`", FLAVOR.1);
            return answer(StatusCode::FORBIDDEN, json!({ "error": error }));
        }
        let name = percent_encoding::percent_decode_str(name).decode_utf8_lossy().into_owned();
        let Some(slot) = self.engine.load().vendable(&name) else {
            return answer(StatusCode::NOT_FOUND, json!({ "error": format!("no vended provider named `{name}`") }));
        };
        match TokenSource::obtain(slot.as_ref(), None).await {
            Ok(token) => {
                self.metrics.vended(&name);
                let expires_in = token.expires_at.duration_since(SystemTime::now()).map_or(0, |d| d.as_secs());
                let access_token = token.access_token().expose().to_str().unwrap_or_default().to_owned();
                answer(
                    StatusCode::OK,
                    json!({ "access_token": access_token, "token_type": "Bearer", "expires_in": expires_in }),
                )
            }
            Err(error) => answer(StatusCode::SERVICE_UNAVAILABLE, json!({ "error": error.to_string() })),
        }
    }
}

fn answer(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Binds a unix socket at `path` (a stale socket left by a previous run is replaced; any other file is not), readable
/// and writable by this user only.
pub fn bind_unix(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    if let Ok(metadata) = std::fs::symlink_metadata(path) {
        if !metadata.file_type().is_socket() {
            return Err(std::io::Error::new(std::io::ErrorKind::AlreadyExists, "a file that is not a socket is there"));
        }
        std::fs::remove_file(path)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}
