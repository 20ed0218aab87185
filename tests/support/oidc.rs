//! Harness for tests against a real OpenID provider: the npm `oidc-provider` in `tests/idp/server.mjs`,
//! a JWT-checking upstream in `tests/idp/upstream.mjs`, and the real `tokenproxy` binary between them.
//!
//! Every process listens on 127.0.0.1 only, is killed when its handle drops, and the Node ones also exit
//! when their stdin (a pipe this process holds) closes, so a test that dies leaves nothing running.
//! Output of each child is captured and printed only when the test fails.
//!
//! Needs `node` (>= 20) and `npm` on PATH; `tests/idp/node_modules` is installed with `npm ci` on first
//! use (once per machine, guarded against concurrent tests and test binaries).
//!
//! The HTTP client, polling and the shapes of the control APIs' answers live in `oidc_http.rs`, re-exported
//! from here: a test declares `mod support { pub mod oidc; }` and uses `support::oidc::…` for everything.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use hyper::body::Bytes;
use hyper::{Method, StatusCode};
use serde_json::Value;

#[path = "oidc_http.rs"]
mod oidc_http;
pub use oidc_http::*;

/// How long a Node process may take to print its READY line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long tokenproxy may take to answer on its admin listener after it was spawned.
pub const PROXY_START_TIMEOUT: Duration = Duration::from_secs(20);

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

// ---- child processes ---------------------------------------------------------------------------

/// Output a child printed, kept to show when a test fails.
#[derive(Clone, Default)]
pub struct CapturedOutput(Arc<Mutex<String>>);

impl CapturedOutput {
    fn push_line(&self, line: &str) {
        let mut text = self.0.lock().unwrap_or_else(|e| e.into_inner());
        text.push_str(line);
        text.push('\n');
    }

    /// Everything captured so far.
    pub fn text(&self) -> String {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The last `n` lines captured so far.
    pub fn tail(&self, n: usize) -> String {
        let text = self.text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Copies a child's stream into the buffer, line by line, on a thread of its own. The first line
    /// starting with `ready_prefix` (if any) goes to `ready` instead.
    fn drain<R: Read + Send + 'static>(
        &self,
        stream: R,
        label: &'static str,
        ready_prefix: Option<&'static str>,
        mut ready: Option<tokio::sync::oneshot::Sender<String>>,
    ) {
        let this = self.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut raw = Vec::new();
            loop {
                raw.clear();
                match reader.read_until(b'\n', &mut raw) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&raw);
                let line = line.trim_end_matches(['\r', '\n']);
                if let (Some(prefix), Some(_)) = (ready_prefix, ready.as_ref()) {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(rest.trim().to_owned());
                        }
                        continue;
                    }
                }
                this.push_line(&format!("[{label}] {line}"));
            }
        });
    }
}

/// A child process that is killed (and reaped) when dropped; its output is printed if the test failed.
pub struct ChildProcess {
    name: String,
    child: Child,
    output: CapturedOutput,
}

impl ChildProcess {
    /// Spawns `command` with stdin, stdout and stderr piped. stdin stays open as long as this handle
    /// lives. stdout lines starting with `ready_prefix` are delivered through the returned receiver.
    fn spawn(
        name: impl Into<String>,
        mut command: Command,
        ready_prefix: Option<&'static str>,
    ) -> (Self, tokio::sync::oneshot::Receiver<String>) {
        let name = name.into();
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().unwrap_or_else(|e| panic!("cannot spawn {name} ({command:?}): {e}"));
        let output = CapturedOutput::default();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        output.drain(stdout, "stdout", ready_prefix, ready_prefix.map(|_| tx));
        output.drain(stderr, "stderr", None, None);
        (ChildProcess { name, child, output }, rx)
    }

    /// Waits for the READY line; panics with the child's output if it exits or times out first.
    async fn wait_ready(&mut self, rx: tokio::sync::oneshot::Receiver<String>) -> String {
        match tokio::time::timeout(READY_TIMEOUT, rx).await {
            Ok(Ok(url)) => url,
            Ok(Err(_)) => {
                // stdout closed without READY: the process is exiting; give it a moment to be reaped.
                let status = self.wait_exit(Duration::from_secs(2));
                panic!("{} exited before it was ready ({status:?}):\n{}", self.name, self.output.tail(60));
            }
            Err(_) => panic!("{} did not print READY within {READY_TIMEOUT:?}:\n{}", self.name, self.output.tail(60)),
        }
    }

    fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                _ => return None,
            }
        }
    }

    /// Waits up to `limit` for the process to exit, without blocking the runtime.
    pub async fn wait_exit_async(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
                _ => return None,
            }
        }
    }

    /// Sends `signal` (a name such as `TERM`) to the process.
    pub fn signal(&self, signal: &str) {
        let number = match signal {
            "TERM" => libc::SIGTERM,
            "HUP" => libc::SIGHUP,
            "INT" => libc::SIGINT,
            "KILL" => libc::SIGKILL,
            other => panic!("unknown signal {other}"),
        };
        // SAFETY: kill(2) with the pid of a child we started and a valid signal number.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, number) };
        assert_eq!(rc, 0, "kill -{signal} {} failed", self.child.id());
    }

    /// The exit status, if the process has already exited.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process printed so far.
    pub fn output(&self) -> &CapturedOutput {
        &self.output
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- {} (pid {}) output, last 200 lines -----", self.name, self.child.id());
            eprintln!("{}", self.output.tail(200));
            eprintln!("----- end of {} output -----", self.name);
        }
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
    http: HttpClient,
}

impl IdpProcess {
    /// Starts the provider with access tokens living `ttl_secs` seconds.
    pub async fn start(ttl_secs: u64) -> IdpProcess {
        tokio::task::spawn_blocking(ensure_node_modules).await.expect("npm ci task");
        let mut command = node_command("server.mjs");
        command.env("IDP_TOKEN_TTL", ttl_secs.to_string()).env_remove("IDP_PORT");
        let (mut process, rx) = ChildProcess::spawn("idp (server.mjs)", command, Some("READY "));
        let issuer = process.wait_ready(rx).await;
        IdpProcess { process, issuer, http: HttpClient::new() }
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
        tokio::task::spawn_blocking(ensure_node_modules).await.expect("npm ci task");
        let mut command = node_command("server.mjs");
        command
            .env("IDP_TOKEN_TTL", ttl_secs.to_string())
            .env_remove("IDP_PORT")
            .env("IDP_TLS_CERT", server.0)
            .env("IDP_TLS_KEY", server.1)
            .env("IDP_TLS_CLIENT_CA", client_ca)
            .env("IDP_SELF_SIGNED_CERT", self_signed);
        let (mut process, rx) = ChildProcess::spawn("idp (server.mjs, https)", command, Some("READY "));
        let issuer = process.wait_ready(rx).await;
        assert!(issuer.starts_with("https://"), "{issuer}");
        IdpProcess { process, issuer, http: HttpClient::trusting(ca_file) }
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
    http: HttpClient,
}

impl UpstreamProcess {
    /// Starts an upstream trusting `idp`'s tokens.
    pub async fn start(idp: &IdpProcess) -> UpstreamProcess {
        tokio::task::spawn_blocking(ensure_node_modules).await.expect("npm ci task");
        let mut command = node_command("upstream.mjs");
        command.arg(&idp.issuer).env_remove("UPSTREAM_PORT");
        let (mut process, rx) = ChildProcess::spawn("upstream (upstream.mjs)", command, Some("READY "));
        let url = process.wait_ready(rx).await;
        UpstreamProcess { process, url, http: HttpClient::new() }
    }

    /// Starts an upstream accepting tokens for `audience` instead of [`TEST_AUDIENCE`].
    pub async fn start_for_audience(idp: &IdpProcess, audience: &str) -> UpstreamProcess {
        tokio::task::spawn_blocking(ensure_node_modules).await.expect("npm ci task");
        let mut command = node_command("upstream.mjs");
        command.arg(&idp.issuer).env_remove("UPSTREAM_PORT").env("UPSTREAM_AUDIENCE", audience);
        let (mut process, rx) =
            ChildProcess::spawn(format!("upstream (upstream.mjs, aud {audience})"), command, Some("READY "));
        let url = process.wait_ready(rx).await;
        UpstreamProcess { process, url, http: HttpClient::new() }
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
        tokio::task::spawn_blocking(ensure_node_modules).await.expect("npm ci task");
        let mut command = node_command("upstream.mjs");
        command
            .arg(&idp.issuer)
            .env_remove("UPSTREAM_PORT")
            .env("UPSTREAM_TLS_CERT", server.0)
            .env("UPSTREAM_TLS_KEY", server.1)
            .env("UPSTREAM_TLS_CLIENT_CA", client_ca)
            .env("NODE_EXTRA_CA_CERTS", ca_file);
        let (mut process, rx) = ChildProcess::spawn("upstream (upstream.mjs, https)", command, Some("READY "));
        let url = process.wait_ready(rx).await;
        assert!(url.starts_with("https://"), "{url}");
        UpstreamProcess { process, url, http: HttpClient::trusting(ca_file) }
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

// ---- tokenproxy ----------------------------------------------------------------------------------

/// The real `tokenproxy run --config FILE`, with its config in a directory (a temporary one it owns, or
/// one the test keeps across several runs).
pub struct TokenProxyProcess {
    process: ChildProcess,
    /// Base URL of the proxy listener.
    pub proxy_url: String,
    /// Base URL of the admin listener.
    pub admin_url: String,
    /// The config file written for this run.
    pub config_path: PathBuf,
    /// `[state] dir` of the config: `DIR/state`.
    pub state_dir: PathBuf,
    /// When the process was spawned (for rate bounds on token calls).
    pub started_at: Instant,
    http: HttpClient,
    _dir: Option<tempfile::TempDir>,
}

/// Writes `[server]`, `[admin]` (on the given ports), `[log]` and `[state]` (`dir/state`) followed by
/// `body` (the providers and routes) to `dir/tokenproxy.toml`; returns the path and the text.
pub fn write_proxy_config(dir: &Path, body: &str, proxy_port: u16, admin_port: u16) -> (PathBuf, String) {
    let config_path = dir.join("tokenproxy.toml");
    let state_dir = dir.join("state");
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{proxy_port}\"\nrequest_timeout = \"10s\"\nshutdown_grace = \"1s\"\n\n\
         [admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\n\
         [log]\nformat = \"pretty\"\nlevel = \"info,tokenproxy=debug\"\n\n\
         [state]\ndir = {}\n\n{body}",
        toml_string(&state_dir.to_string_lossy()),
    );
    std::fs::write(&config_path, &config).unwrap_or_else(|e| panic!("cannot write {config_path:?}: {e}"));
    (config_path, config)
}

/// `tokenproxy ARGS…` run in `dir`, with no `TOKENPROXY_*` variable from the developer's shell (the
/// test's config alone decides) and `env` added.
pub fn tokenproxy_command(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tokenproxy"));
    command.args(args).current_dir(dir);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TOKENPROXY_") {
            command.env_remove(key);
        }
    }
    for (key, value) in env {
        command.env(key, value);
    }
    command
}

/// Spawns `tokenproxy ARGS…` (see [`tokenproxy_command`]) as a [`ChildProcess`] named `name`: for the
/// one-shot commands (`login`, `logout`, `token`).
pub fn spawn_tokenproxy(name: &str, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> ChildProcess {
    ChildProcess::spawn(name, tokenproxy_command(dir, args, env), None).0
}

impl TokenProxyProcess {
    /// Writes the config (see [`write_proxy_config`], ports picked here) to `dir/tokenproxy.toml`, starts
    /// tokenproxy on it and waits until its admin listener answers `/healthz`. If the process exits with
    /// status 1 (it could not start: most likely a port taken by someone else between picking and binding)
    /// it is tried again on new ports, up to three times.
    pub async fn start(dir: tempfile::TempDir, body: &str) -> TokenProxyProcess {
        let mut proxy = Self::start_in(dir.path(), body, &[]).await;
        proxy._dir = Some(dir);
        proxy
    }

    /// As [`TokenProxyProcess::start`] in a directory the caller keeps (a later run can use the same
    /// config and state), with `env` added to tokenproxy's environment.
    pub async fn start_in(dir: &Path, body: &str, env: &[(&str, &str)]) -> TokenProxyProcess {
        let mut attempt = 1;
        loop {
            let mut proxy = Self::spawn_in(dir, body, env, &format!("tokenproxy (attempt {attempt})"));
            match wait_admin_up(&proxy.http, &mut proxy.process, &proxy.admin_url).await {
                Ok(()) => return proxy,
                Err(status) if status.code() == Some(1) && attempt < 3 => {
                    eprintln!(
                        "tokenproxy could not start ({status}), retrying on new ports:\n{}",
                        proxy.process.output.tail(20)
                    );
                    attempt += 1;
                }
                Err(status) => panic!(
                    "tokenproxy exited at startup ({status}); config:\n{}\noutput:\n{}",
                    std::fs::read_to_string(&proxy.config_path).unwrap_or_default(),
                    proxy.process.output.tail(80)
                ),
            }
        }
    }

    /// Writes the config on fresh ports and spawns `tokenproxy run` on it, without waiting for anything
    /// (for a run expected to die early, e.g. at a failpoint).
    pub fn spawn_in(dir: &Path, body: &str, env: &[(&str, &str)], name: &str) -> TokenProxyProcess {
        let (proxy_port, admin_port) = (free_port(), free_port());
        let (config_path, _) = write_proxy_config(dir, body, proxy_port, admin_port);
        let config_arg = config_path.to_string_lossy().into_owned();
        let command = tokenproxy_command(dir, &["run", "--config", &config_arg], env);
        let started_at = Instant::now();
        let (process, _) = ChildProcess::spawn(name, command, None);
        TokenProxyProcess {
            process,
            proxy_url: format!("http://127.0.0.1:{proxy_port}"),
            admin_url: format!("http://127.0.0.1:{admin_port}"),
            config_path,
            state_dir: dir.join("state"),
            started_at,
            http: HttpClient::new(),
            _dir: None,
        }
    }

    /// SIGTERM, then waits (up to 10 s) for the exit and returns its status.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.process.signal("TERM");
        self.wait_exit(Duration::from_secs(10)).await
    }

    /// Waits up to `limit` for the process to exit by itself; panics with its output if it does not.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        match self.process.wait_exit_async(limit).await {
            Some(status) => status,
            None => panic!("tokenproxy did not exit within {limit:?}:\n{}", self.process.output.tail(60)),
        }
    }

    /// The state store's record of `provider` (`state/PROVIDER.json`).
    pub fn state_file(&self, provider: &str) -> PathBuf {
        self.state_dir.join(format!("{provider}.json"))
    }

    /// The value of the `/metrics` sample of `name` with exactly `labels` (in any order), e.g.
    /// `("tokenproxy_replays_total", &[("route", "api"), ("outcome", "success")])`; `None` if absent.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let text = self.admin_get("/metrics").await.text();
        let mut wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        wanted.sort();
        text.lines().filter(|line| !line.starts_with('#')).find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((metric, rest)) => (metric, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            let mut have: Vec<String> = label_text.split(',').filter(|l| !l.is_empty()).map(str::to_owned).collect();
            have.sort();
            (metric == name && have == wanted).then(|| value.parse().unwrap_or_else(|e| panic!("{line:?}: {e}")))
        })
    }

    /// Polls `GET /readyz` until it answers 200, and returns its body.
    pub async fn wait_ready(&self, timeout: Duration) -> Value {
        let url = format!("{}/readyz", self.admin_url);
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.http.try_send(Method::GET, &url, &[], Bytes::new()).await {
                Ok(reply) if reply.status == StatusCode::OK => return reply.json(),
                Ok(reply) => format!("{} {}", reply.status, reply.text()),
                Err(e) => e,
            };
            assert!(Instant::now() < deadline, "{url} did not answer 200 within {timeout:?}; last answer: {last}");
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// A request to the proxy listener; `path_and_query` starts with `/`.
    pub async fn request(&self, method: Method, path_and_query: &str, headers: &[(&str, &str)], body: Bytes) -> Reply {
        let url = format!("{}{path_and_query}", self.proxy_url);
        self.http
            .try_send(method, &url, headers, body)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}\n{}", self.process.output.tail(40)))
    }

    /// `GET` on the proxy listener.
    pub async fn get(&self, path_and_query: &str) -> Reply {
        self.request(Method::GET, path_and_query, &[], Bytes::new()).await
    }

    /// `GET` on the admin listener.
    pub async fn admin_get(&self, path: &str) -> Reply {
        self.http.get(&format!("{}{path}", self.admin_url)).await
    }

    /// `POST` (empty body) on the admin listener.
    pub async fn admin_post(&self, path: &str) -> Reply {
        self.http.post(&format!("{}{path}", self.admin_url), Bytes::new()).await
    }

    /// Everything tokenproxy printed so far (stdout and stderr).
    pub fn logs(&self) -> String {
        self.process.output.text()
    }

    /// The child process.
    pub fn process(&mut self) -> &mut ChildProcess {
        &mut self.process
    }
}

/// Polls `GET /healthz` until it answers 200; `Err` with the exit status if the process exits first.
async fn wait_admin_up(http: &HttpClient, process: &mut ChildProcess, admin_url: &str) -> Result<(), ExitStatus> {
    let url = format!("{admin_url}/healthz");
    let deadline = Instant::now() + PROXY_START_TIMEOUT;
    loop {
        if let Some(status) = process.try_exit_status() {
            return Err(status);
        }
        if let Ok(reply) = http.try_send(Method::GET, &url, &[], Bytes::new()).await {
            if reply.status == StatusCode::OK {
                return Ok(());
            }
        }
        assert!(
            Instant::now() < deadline,
            "tokenproxy's admin listener did not answer {url} within {PROXY_START_TIMEOUT:?}:\n{}",
            process.output.tail(80)
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
