//! Harness for tests against a real OpenID provider: the npm `oidc-provider` in `tests/idp/server.mjs` and a
//! JWT-checking upstream in `tests/idp/upstream.mjs`, with the real `tokenproxy` binary between them
//! ([`super::TokenProxyProcess`]); and the soak those tests share.
//!
//! Every process listens on 127.0.0.1 only, is killed when its handle drops, and the Node ones also exit
//! when their stdin (a pipe this process holds) closes, so a test that dies leaves nothing running.
//! Output of each child is captured and printed only when the test fails.
//!
//! Needs `node` (>= 20) and `npm` on PATH; `tests/idp/node_modules` is installed with `npm ci` on first
//! use (once per machine, guarded against concurrent tests and test binaries).
//!
//! The shapes of the control APIs' answers live in `oidc_api.rs`, re-exported from here.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::Value;

use super::client::{Client, Reply};
use super::process::{ChildProcess, ReadyLine, TokenProxyProcess};

#[path = "oidc_api.rs"]
mod oidc_api;
pub use oidc_api::*;

/// The resource (JWT `aud`) the test provider issues tokens for.
pub const TEST_AUDIENCE: &str = "urn:tokenproxy:test-api";
/// client_id / secret of the provider's client_secret_basic client.
pub const BASIC_CLIENT: (&str, &str) = ("tp-basic", "tp-basic-secret");
/// client_id / secret of the provider's client_secret_post client.
pub const POST_CLIENT: (&str, &str) = ("tp-post", "tp-post-secret");
/// client_id / secret of the provider's session client (client_secret_basic): rotating refresh tokens,
/// device flow, revocation.
pub const ROTATE_CLIENT: (&str, &str) = ("tp-rotate", "tp-rotate-secret");
/// client_id / secret of the provider's token-exchange client (RFC 8693 grant registered on the provider).
pub const EXCHANGE_CLIENT: (&str, &str) = ("tp-exchange", "tp-exchange-secret");
/// The client whose tokens must be DPoP-bound (`dpop_bound_access_tokens`): client_secret_basic, client_credentials.
pub const DPOP_CLIENT: (&str, &str) = ("tp-dpop", "tp-dpop-secret");
/// The scope a seeded or device-approved session of [`ROTATE_CLIENT`] holds.
pub const SESSION_SCOPE: &str = "openid offline_access api.read";

/// `tests/idp`, where the Node harness lives.
pub fn idp_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("idp")
}

// ---- node_modules ------------------------------------------------------------------------------

fn node_modules_installed(dir: &Path) -> bool {
    let modules = dir.join("node_modules");
    let hidden_lock = modules.join(".package-lock.json");
    let complete = hidden_lock.is_file()
        && modules.join("oidc-provider").join("package.json").is_file()
        && modules.join("jose").join("package.json").is_file();
    if !complete {
        return false;
    }
    // npm ci writes the hidden lockfile last; a package-lock.json newer than it means the lockfile
    // changed since (a version bump pulled in), so install again.
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    match (mtime(&hidden_lock), mtime(&dir.join("package-lock.json"))) {
        (Some(installed), Some(locked)) => installed >= locked,
        _ => false,
    }
}

/// Removes the cross-process install lock when dropped.
struct InstallLock(PathBuf);

impl Drop for InstallLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Makes sure `tests/idp/node_modules` matches `package-lock.json`, running `npm ci` if not.
///
/// A `OnceLock` serialises the tests of one binary; a lock directory under `CARGO_TARGET_TMPDIR`
/// (`create_dir` is atomic) serialises test binaries. `npm ci` is idempotent, so a stale lock (older
/// than five minutes, from a killed run) is simply taken over.
pub fn ensure_node_modules() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let dir = idp_dir();
        if node_modules_installed(&dir) {
            return;
        }
        let lock_path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tokenproxy-idp-npm-ci.lock");
        let deadline = Instant::now() + Duration::from_secs(600);
        let _lock = loop {
            match std::fs::create_dir_all(lock_path.parent().expect("lock has a parent"))
                .and_then(|()| std::fs::create_dir(&lock_path))
            {
                Ok(()) => break InstallLock(lock_path.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if node_modules_installed(&dir) {
                        return;
                    }
                    let age = std::fs::metadata(&lock_path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| SystemTime::now().duration_since(t).ok());
                    if age.is_some_and(|age| age > Duration::from_secs(300)) {
                        let _ = std::fs::remove_dir(&lock_path);
                        continue;
                    }
                    assert!(Instant::now() < deadline, "timed out waiting for another `npm ci` ({lock_path:?})");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("cannot create {lock_path:?}: {e}"),
            }
        };
        if node_modules_installed(&dir) {
            return;
        }
        let output = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run `npm ci` in {dir:?} (Node.js >= 20 and npm must be on PATH): {e}"));
        assert!(
            output.status.success() && node_modules_installed(&dir),
            "`npm ci` in {dir:?} failed ({}):\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
    });
}

// ---- the Node children -------------------------------------------------------------------------

/// The URL in a Node child's `READY URL` line.
fn node_ready_line(line: &str) -> Option<String> {
    line.strip_prefix("READY ").map(|rest| rest.trim().to_owned())
}

/// Spawns `node SCRIPT` (`command`) as `name` and waits for its READY line; returns the process and the URL it
/// printed. Panics with its output if it exits first.
async fn start_node(name: &str, command: Command) -> (ChildProcess, String) {
    tokio::task::spawn_blocking(ensure_node_modules).await.expect("npm ci task");
    let mut process = ChildProcess::spawn(name, command, Some(ReadyLine { stdout: true, parse: node_ready_line }));
    match process.ready().await {
        Ok(url) => (process, url),
        Err(status) => panic!("{name} exited before it was ready ({status:?}):\n{}", process.output().tail(60)),
    }
}

fn node_command(script: &str) -> Command {
    let mut command = Command::new("node");
    command.arg(script).current_dir(idp_dir());
    command
}

// ---- the OpenID provider -----------------------------------------------------------------------

/// `node tests/idp/server.mjs`: oidc-provider 9.13.3 on 127.0.0.1, issuer `http://127.0.0.1:PORT`.
pub struct IdpProcess {
    process: ChildProcess,
    /// `http://127.0.0.1:PORT`, also the base URL of its control API (`/_test/...`).
    pub issuer: String,
    http: Client,
}

impl IdpProcess {
    /// Starts the provider with access tokens living `ttl_secs` seconds.
    pub async fn start(ttl_secs: u64) -> IdpProcess {
        let mut command = node_command("server.mjs");
        command.env("IDP_TOKEN_TTL", ttl_secs.to_string()).env_remove("IDP_PORT");
        let (process, issuer) = start_node("idp (server.mjs)", command).await;
        IdpProcess { process, issuer, http: Client::new() }
    }

    /// Starts the provider over HTTPS with mutual TLS (the HTTPS mode of `tests/idp/server.mjs`): its certificate
    /// `server` (cert, key) for 127.0.0.1, client certificates verified against `client_ca`, `self_signed` the
    /// certificate of `tp-mtls-self`. `ca_file` is what the test's own client trusts (the CA of `server`).
    pub async fn start_https(
        ttl_secs: u64,
        server: (&Path, &Path),
        client_ca: &Path,
        self_signed: &Path,
        ca_file: &Path,
    ) -> IdpProcess {
        let mut command = node_command("server.mjs");
        command
            .env("IDP_TOKEN_TTL", ttl_secs.to_string())
            .env_remove("IDP_PORT")
            .env("IDP_TLS_CERT", server.0)
            .env("IDP_TLS_KEY", server.1)
            .env("IDP_TLS_CLIENT_CA", client_ca)
            .env("IDP_SELF_SIGNED_CERT", self_signed);
        let (process, issuer) = start_node("idp (server.mjs, https)", command).await;
        assert!(issuer.starts_with("https://"), "{issuer}");
        IdpProcess { process, issuer, http: Client::trusting(ca_file) }
    }

    /// The SHA-256 thumbprints (base64url, as `x5t#S256`) of the client certificates `client_id`'s /token calls
    /// came with, in order ("-" for none); HTTPS mode only.
    pub async fn cert_thumbprints(&self, client_id: &str) -> Vec<String> {
        let stats = self.stats().await;
        let list = stats["clients"][client_id]["cert_thumbprints"].as_array().cloned().unwrap_or_default();
        list.iter().map(|t| t.as_str().unwrap_or("?").to_owned()).collect()
    }

    /// `GET /_test/client-key`: the private key (PKCS#8 PEM) of a private_key_jwt client, and its `kid` (the RFC
    /// 7638 thumbprint the provider registered for it).
    pub async fn client_key(&self, client_id: &str) -> (String, String) {
        let key = self.http.get_json(&format!("{}/_test/client-key?client={client_id}", self.issuer)).await;
        let field = |name: &str| key[name].as_str().unwrap_or_else(|| panic!("no {name} in {key}")).to_owned();
        (field("private_key_pem"), field("kid"))
    }

    /// `POST /_test/rotate-client-key`: a new key for `tp-jwt-rotate` (the provider serves only its public half
    /// from then on); its PEM and `kid`.
    pub async fn rotate_client_key(&self) -> (String, String) {
        let reply = self.http.post(&format!("{}/_test/rotate-client-key", self.issuer), Bytes::new()).await;
        assert_eq!(reply.status, StatusCode::OK, "rotate-client-key: {}", reply.text());
        let key = reply.json();
        let field = |name: &str| key[name].as_str().unwrap_or_else(|| panic!("no {name} in {key}")).to_owned();
        (field("private_key_pem"), field("kid"))
    }

    /// The provider's discovery document.
    pub async fn discovery(&self) -> Value {
        self.http.get_json(&format!("{}/.well-known/openid-configuration", self.issuer)).await
    }

    /// `token_endpoint` from the discovery document (`http://127.0.0.1:PORT/token`).
    pub async fn token_endpoint(&self) -> String {
        let doc = self.discovery().await;
        doc["token_endpoint"].as_str().unwrap_or_else(|| panic!("no token_endpoint in {doc}")).to_owned()
    }

    /// `GET /_test/stats`: `{"total", "clients": {ID: {calls, ok, error, injected, statuses, auth_methods}}, …}`.
    pub async fn stats(&self) -> Value {
        self.http.get_json(&format!("{}/_test/stats", self.issuer)).await
    }

    /// The /token call counts for one client_id (zero if it never called).
    pub async fn token_calls(&self, client_id: &str) -> TokenCalls {
        let stats = self.stats().await;
        let entry = &stats["clients"][client_id];
        let n = |key: &str| entry[key].as_u64().unwrap_or(0);
        TokenCalls { calls: n("calls"), ok: n("ok"), error: n("error"), injected: n("injected") }
    }

    /// `POST /_test/fail`: the next `count` /token calls answer `status`.
    pub async fn fail_next(&self, count: u32, status: u16) {
        let url = format!("{}/_test/fail?count={count}&status={status}", self.issuer);
        let reply = self.http.post(&url, Bytes::new()).await;
        assert_eq!(reply.status, StatusCode::OK, "{url}: {}", reply.text());
    }

    /// `POST /_test/delay`: the next `count` /token calls are held `ms` milliseconds.
    pub async fn delay_next(&self, count: u32, ms: u64) {
        let url = format!("{}/_test/delay?count={count}&ms={ms}", self.issuer);
        let reply = self.http.post(&url, Bytes::new()).await;
        assert_eq!(reply.status, StatusCode::OK, "{url}: {}", reply.text());
    }

    /// `POST /_test/hold-answer`: the next `count` /token calls are served at once but their answers are
    /// held `ms` milliseconds (the provider has acted; a client that gives up meanwhile never learns it).
    pub async fn hold_next_answers(&self, count: u32, ms: u64) {
        let url = format!("{}/_test/hold-answer?count={count}&ms={ms}", self.issuer);
        let reply = self.http.post(&url, Bytes::new()).await;
        assert_eq!(reply.status, StatusCode::OK, "{url}: {}", reply.text());
    }

    /// `POST /_test/dpop?require_nonce=…`: whether the provider requires its nonce in DPoP proofs.
    pub async fn require_dpop_nonce(&self, require: bool) {
        let url = format!("{}/_test/dpop?require_nonce={}", self.issuer, u8::from(require));
        let reply = self.http.post(&url, Bytes::new()).await;
        assert_eq!(reply.status, StatusCode::OK, "{url}: {}", reply.text());
    }

    /// `POST /_test/reset`: zero the counters, drop pending failures and delays.
    pub async fn reset(&self) {
        let reply = self.http.post(&format!("{}/_test/reset", self.issuer), Bytes::new()).await;
        assert_eq!(reply.status, StatusCode::OK, "reset: {}", reply.text());
    }

    /// `POST /_test/seed-refresh-token`: a fresh refresh token for [`ROTATE_CLIENT`], as a login would
    /// have produced (a new Grant, through the provider's own models).
    pub async fn seed_refresh_token(&self) -> SeededRefreshToken {
        let url = format!("{}/_test/seed-refresh-token", self.issuer);
        let reply = self.http.post(&url, Bytes::new()).await;
        assert_eq!(reply.status, StatusCode::OK, "{url}: {}", reply.text());
        serde_json::from_value(reply.json()).unwrap_or_else(|e| panic!("{url}: {e}: {}", reply.text()))
    }

    /// `POST /_test/approve-device?user_code=…`: approves a pending device login as the user would.
    pub async fn approve_device(&self, user_code: &str) -> Value {
        let url = format!("{}/_test/approve-device?user_code={user_code}", self.issuer);
        let reply = self.http.post(&url, Bytes::new()).await;
        assert_eq!(reply.status, StatusCode::OK, "{url}: {}", reply.text());
        reply.json()
    }

    /// What the provider did with `grant_type=refresh_token` calls (`refresh` in `/_test/stats`).
    pub async fn refresh_stats(&self) -> RefreshStats {
        let stats = self.stats().await;
        serde_json::from_value(stats["refresh"].clone()).unwrap_or_else(|e| panic!("refresh stats: {e}: {stats}"))
    }

    /// An access token for `client` (client_secret_basic) straight from the token endpoint, not through tokenproxy:
    /// a caller's own token, for the tests of token exchange.
    /// [`POST_CLIENT`] sends its secret in the form, every other client with HTTP Basic.
    pub async fn client_credentials(&self, client: (&str, &str)) -> String {
        let post = client.0 == POST_CLIENT.0;
        let mut form = vec![("grant_type", "client_credentials"), ("scope", "api.read")];
        if post {
            form.extend([("client_id", client.0), ("client_secret", client.1)]);
        }
        let body: String = form_urlencoded_pairs(&form);
        let basic = basic_auth(client.0, client.1);
        let mut headers = vec![("content-type", "application/x-www-form-urlencoded")];
        if !post {
            headers.push(("authorization", basic.as_str()));
        }
        let url = self.token_endpoint().await;
        let reply = self
            .http
            .try_send(Method::POST, &url, &headers, Bytes::from(body))
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(reply.status, StatusCode::OK, "{url}: {}", reply.text());
        reply.json()["access_token"].as_str().expect("access_token").to_owned()
    }

    /// Redeems `refresh_token` at the token endpoint as [`ROTATE_CLIENT`] itself (not through tokenproxy).
    pub async fn redeem_refresh_token(&self, refresh_token: &str) -> Reply {
        let body: String = form_urlencoded_pairs(&[("grant_type", "refresh_token"), ("refresh_token", refresh_token)]);
        let basic = basic_auth(ROTATE_CLIENT.0, ROTATE_CLIENT.1);
        let headers = [("content-type", "application/x-www-form-urlencoded"), ("authorization", basic.as_str())];
        let url = self.token_endpoint().await;
        self.http
            .try_send(Method::POST, &url, &headers, Bytes::from(body))
            .await
            .unwrap_or_else(|e| panic!("POST {url}: {e}"))
    }

    /// The child process (output, pid).
    pub fn process(&self) -> &ChildProcess {
        &self.process
    }
}

// ---- the protected upstream --------------------------------------------------------------------

/// `node tests/idp/upstream.mjs ISSUER`: answers 200 `{client_id, jti, exp, method, path}` for a valid
/// token of the provider (signature via its JWKS, iss, aud, typ at+jwt, exp with zero tolerance), 401
/// otherwise, and counts what it saw.
pub struct UpstreamProcess {
    process: ChildProcess,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    http: Client,
}

impl UpstreamProcess {
    /// Starts an upstream trusting `idp`'s tokens.
    pub async fn start(idp: &IdpProcess) -> UpstreamProcess {
        let mut command = node_command("upstream.mjs");
        command.arg(&idp.issuer).env_remove("UPSTREAM_PORT");
        let (process, url) = start_node("upstream (upstream.mjs)", command).await;
        UpstreamProcess { process, url, http: Client::new() }
    }

    /// Starts an upstream accepting tokens for `audience` instead of [`TEST_AUDIENCE`].
    pub async fn start_for_audience(idp: &IdpProcess, audience: &str) -> UpstreamProcess {
        let mut command = node_command("upstream.mjs");
        command.arg(&idp.issuer).env_remove("UPSTREAM_PORT").env("UPSTREAM_AUDIENCE", audience);
        let (process, url) = start_node(&format!("upstream (upstream.mjs, aud {audience})"), command).await;
        UpstreamProcess { process, url, http: Client::new() }
    }

    /// Starts an upstream over HTTPS (the HTTPS mode of `tests/idp/upstream.mjs`), with certificate `server` (cert,
    /// key) for 127.0.0.1, asking for client certificates from `client_ca` and checking certificate-bound tokens
    /// against the one presented. `ca_file` is trusted by it (for the issuer's HTTPS) and by the test's client.
    pub async fn start_https(
        idp: &IdpProcess,
        server: (&Path, &Path),
        client_ca: &Path,
        ca_file: &Path,
    ) -> UpstreamProcess {
        let mut command = node_command("upstream.mjs");
        command
            .arg(&idp.issuer)
            .env_remove("UPSTREAM_PORT")
            .env("UPSTREAM_TLS_CERT", server.0)
            .env("UPSTREAM_TLS_KEY", server.1)
            .env("UPSTREAM_TLS_CLIENT_CA", client_ca)
            .env("NODE_EXTRA_CA_CERTS", ca_file);
        let (process, url) = start_node("upstream (upstream.mjs, https)", command).await;
        assert!(url.starts_with("https://"), "{url}");
        UpstreamProcess { process, url, http: Client::trusting(ca_file) }
    }

    /// `GET /_test/stats`: `{requests, ok, unauthorized, missing, invalid, expired, distinct_jti,
    /// clients: {ID: {ok, expired, distinct_jti, last_jti, last_token_sha256}}}`.
    pub async fn stats(&self) -> Value {
        self.http.get_json(&format!("{}/_test/stats", self.url)).await
    }

    /// Every distinct bearer token the upstream was sent, valid or not.
    pub async fn tokens_seen(&self) -> Vec<String> {
        let body = self.http.get_json(&format!("{}/_test/tokens", self.url)).await;
        body["tokens"]
            .as_array()
            .unwrap_or_else(|| panic!("no tokens array in {body}"))
            .iter()
            .filter_map(|t| t.as_str().map(str::to_owned))
            .collect()
    }

    /// `POST /_test/reset`.
    pub async fn reset(&self) {
        let reply = self.http.post(&format!("{}/_test/reset", self.url), Bytes::new()).await;
        assert_eq!(reply.status, StatusCode::OK, "reset: {}", reply.text());
    }

    /// `POST /_test/dpop-nonce`: require the upstream's nonce in DPoP proofs (or not), with a new nonce if `rotate`.
    pub async fn dpop_nonce(&self, require: bool, rotate: bool) {
        let url = format!("{}/_test/dpop-nonce?require={}&rotate={}", self.url, u8::from(require), u8::from(rotate));
        let reply = self.http.post(&url, Bytes::new()).await;
        assert_eq!(reply.status, StatusCode::OK, "{url}: {}", reply.text());
    }

    /// `POST /_test/reject-next?count=N`: the next `count` API requests are refused with 401 invalid_token.
    pub async fn reject_next(&self, count: u32) {
        let url = format!("{}/_test/reject-next?count={count}", self.url);
        let reply = self.http.post(&url, Bytes::new()).await;
        assert_eq!(reply.status, StatusCode::OK, "{url}: {}", reply.text());
    }

    /// The child process (output, pid).
    pub fn process(&self) -> &ChildProcess {
        &self.process
    }
}

// ---- the soak ----------------------------------------------------------------------------------

/// How long [`soak`] runs: `TP_SOAK_SECS` seconds, 600 by default.
pub fn soak_seconds() -> u64 {
    std::env::var("TP_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(600)
}

/// The soak of the client-authentication tests (for the numbers in docs/no-shared-secrets.md): a request a second on
/// each route `/NAME/x` of `methods` (`(NAME, method, client_id)`) for [`soak_seconds`], every one answered 200; then
/// prints the token calls each client made and fails on any the provider refused. Returns how many requests it sent.
pub async fn soak(proxy: &TokenProxyProcess, idp: &IdpProcess, methods: &[(&str, &str, &str)]) -> u64 {
    let seconds = soak_seconds();
    let started = tokio::time::Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut requests = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        ticker.tick().await;
        for (name, _, _) in methods {
            let reply = proxy.get(&format!("/{name}/x")).await;
            assert_eq!(reply.status, StatusCode::OK, "/{name} after {:?}: {}", started.elapsed(), reply.text());
            requests += 1;
        }
    }
    let stats = idp.stats().await;
    for (_, method, client) in methods {
        let entry = &stats["clients"][client];
        println!(
            "soak: {method}: {} token calls in {seconds} s with 30 s tokens ({} refused)",
            entry["ok"], entry["error"]
        );
        assert_eq!(entry["error"], 0, "{method}: {entry}");
    }
    println!("soak: {requests} requests, all 200");
    requests
}
