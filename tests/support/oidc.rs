//! Harness for tests against a real OpenID provider: the npm `oidc-provider` in `tests/idp/server.mjs`,
//! a JWT-checking upstream in `tests/idp/upstream.mjs`, and the real `tokenproxy` binary between them.
//!
//! Every process listens on 127.0.0.1 only, is killed when its handle drops, and the Node ones also exit
//! when their stdin (a pipe this process holds) closes, so a test that dies leaves nothing running.
//! Output of each child is captured and printed only when the test fails.
//!
//! Needs `node` (>= 20) and `npm` on PATH; `tests/idp/node_modules` is installed with `npm ci` on first
//! use (once per machine, guarded against concurrent tests and test binaries).
#![allow(dead_code)]

use std::fmt::Write as _;
use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::HeaderMap;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde_json::Value;

/// How long a Node process may take to print its READY line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long tokenproxy may take to answer on its admin listener after it was spawned.
pub const PROXY_START_TIMEOUT: Duration = Duration::from_secs(20);
/// Upper bound for one HTTP exchange made by a test.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(15);
/// Interval between two polls of a condition (readiness, counters).
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The resource (JWT `aud`) the test provider issues tokens for.
pub const TEST_AUDIENCE: &str = "urn:tokenproxy:test-api";
/// client_id / secret of the provider's client_secret_basic client.
pub const BASIC_CLIENT: (&str, &str) = ("tp-basic", "tp-basic-secret");
/// client_id / secret of the provider's client_secret_post client.
pub const POST_CLIENT: (&str, &str) = ("tp-post", "tp-post-secret");

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

/// Counts of /token calls the provider saw for one client_id.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenCalls {
    /// All calls.
    pub calls: u64,
    /// Calls answered 2xx.
    pub ok: u64,
    /// Calls the provider refused (4xx/5xx), injected failures excluded.
    pub error: u64,
    /// Calls answered with a failure injected through `/_test/fail`.
    pub injected: u64,
}

/// `node tests/idp/server.mjs`: oidc-provider 9.13.3 on 127.0.0.1, issuer `http://127.0.0.1:PORT`.
pub struct IdpProcess {
    process: ChildProcess,
    /// `http://127.0.0.1:PORT`, also the base URL of its control API (`/_test/...`).
    pub issuer: String,
    http: HttpClient,
}

impl IdpProcess {
    /// Starts the provider with client credentials access tokens living `ttl_secs` seconds.
    pub async fn start(ttl_secs: u64) -> IdpProcess {
        tokio::task::spawn_blocking(ensure_node_modules).await.expect("npm ci task");
        let mut command = node_command("server.mjs");
        command.env("IDP_TOKEN_TTL", ttl_secs.to_string()).env_remove("IDP_PORT");
        let (mut process, rx) = ChildProcess::spawn("idp (server.mjs)", command, Some("READY "));
        let issuer = process.wait_ready(rx).await;
        IdpProcess { process, issuer, http: HttpClient::new() }
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

    /// `POST /_test/reset`: zero the counters, drop pending failures and delays.
    pub async fn reset(&self) {
        let reply = self.http.post(&format!("{}/_test/reset", self.issuer), Bytes::new()).await;
        assert_eq!(reply.status, StatusCode::OK, "reset: {}", reply.text());
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

    /// The child process (output, pid).
    pub fn process(&self) -> &ChildProcess {
        &self.process
    }
}

// ---- tokenproxy ----------------------------------------------------------------------------------

/// Quotes `s` as a TOML basic string.
pub fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A free port on 127.0.0.1 at the time of the call (bound to port 0, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0: {e}"))
}

/// The real `tokenproxy run --config FILE`, with its config in a temporary directory.
pub struct TokenProxyProcess {
    process: ChildProcess,
    /// Base URL of the proxy listener.
    pub proxy_url: String,
    /// Base URL of the admin listener.
    pub admin_url: String,
    /// The config file written for this run.
    pub config_path: PathBuf,
    /// When the process was spawned (for rate bounds on token calls).
    pub started_at: Instant,
    http: HttpClient,
    _dir: tempfile::TempDir,
}

impl TokenProxyProcess {
    /// Writes `[server]`, `[admin]`, `[log]` and `[state]` (ports picked here) followed by `body` (the
    /// providers and routes) to `dir/tokenproxy.toml`, starts tokenproxy on it and waits until its admin
    /// listener answers `/healthz`. If the process exits with status 1 (it could not start: most likely
    /// a port taken by someone else between picking and binding) it is tried again on new ports, up to
    /// three times.
    pub async fn start(dir: tempfile::TempDir, body: &str) -> TokenProxyProcess {
        let config_path = dir.path().join("tokenproxy.toml");
        let state_dir = dir.path().join("state");
        let http = HttpClient::new();
        let mut attempt = 1;
        loop {
            let (proxy_port, admin_port) = (free_port(), free_port());
            let config = format!(
                "[server]\nlisten = \"127.0.0.1:{proxy_port}\"\nrequest_timeout = \"10s\"\nshutdown_grace = \"1s\"\n\n\
                 [admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\n\
                 [log]\nformat = \"pretty\"\nlevel = \"info,tokenproxy=debug\"\n\n\
                 [state]\ndir = {}\n\n{body}",
                toml_string(&state_dir.to_string_lossy()),
            );
            std::fs::write(&config_path, &config).unwrap_or_else(|e| panic!("cannot write {config_path:?}: {e}"));

            let mut command = Command::new(env!("CARGO_BIN_EXE_tokenproxy"));
            command.arg("run").arg("--config").arg(&config_path).current_dir(dir.path());
            // The test's config alone decides: no TOKENPROXY_* override from the developer's shell.
            for (key, _) in std::env::vars_os() {
                if key.to_string_lossy().starts_with("TOKENPROXY_") {
                    command.env_remove(key);
                }
            }
            let started_at = Instant::now();
            let (mut process, _) = ChildProcess::spawn(format!("tokenproxy (attempt {attempt})"), command, None);
            let admin_url = format!("http://127.0.0.1:{admin_port}");
            match wait_admin_up(&http, &mut process, &admin_url).await {
                Ok(()) => {
                    return TokenProxyProcess {
                        process,
                        proxy_url: format!("http://127.0.0.1:{proxy_port}"),
                        admin_url,
                        config_path,
                        started_at,
                        http,
                        _dir: dir,
                    };
                }
                Err(status) if status.code() == Some(1) && attempt < 3 => {
                    eprintln!(
                        "tokenproxy could not start ({status}), retrying on new ports:\n{}",
                        process.output.tail(20)
                    );
                    attempt += 1;
                }
                Err(status) => panic!(
                    "tokenproxy exited at startup ({status}); config:\n{config}\noutput:\n{}",
                    process.output.tail(80)
                ),
            }
        }
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

// ---- HTTP ----------------------------------------------------------------------------------------

/// An answer, fully read.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status code.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Reply {
    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; panics with the body if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}), status {}: {}", self.status, self.text()))
    }

    /// A header's value, if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A plain HTTP/1 client (hyper-util's pooled legacy client) with a timeout on every exchange.
#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpClient {
    /// A client whose idle connections are dropped after a second, well before any server here would
    /// close them under it.
    pub fn new() -> HttpClient {
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(1))
            .build_http();
        HttpClient { client }
    }

    /// One exchange; `Err` on a connection error, a malformed URL or a timeout.
    pub async fn try_send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Reply, String> {
        let mut builder = Request::builder().method(method).uri(url);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder.body(Full::new(body)).map_err(|e| format!("bad request: {e}"))?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| format!("{e:?}"))?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await.map_err(|e| format!("reading body: {e}"))?.to_bytes();
            Ok(Reply { status: parts.status, headers: parts.headers, body })
        };
        tokio::time::timeout(HTTP_TIMEOUT, exchange).await.map_err(|_| format!("no answer within {HTTP_TIMEOUT:?}"))?
    }

    /// `GET`, panicking on a transport error.
    pub async fn get(&self, url: &str) -> Reply {
        self.try_send(Method::GET, url, &[], Bytes::new()).await.unwrap_or_else(|e| panic!("GET {url}: {e}"))
    }

    /// `POST` with `body`, panicking on a transport error.
    pub async fn post(&self, url: &str, body: Bytes) -> Reply {
        self.try_send(Method::POST, url, &[], body).await.unwrap_or_else(|e| panic!("POST {url}: {e}"))
    }

    /// `GET` expecting 200 and a JSON body.
    pub async fn get_json(&self, url: &str) -> Value {
        let reply = self.get(url).await;
        assert_eq!(reply.status, StatusCode::OK, "GET {url}: {}", reply.text());
        reply.json()
    }
}

// ---- waiting -------------------------------------------------------------------------------------

/// Polls `probe` every [`POLL_INTERVAL`] until it returns `Some`, and returns that; panics naming
/// `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
