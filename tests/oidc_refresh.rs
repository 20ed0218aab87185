//! Refresh-token sessions against a real OpenID provider: the `tokenproxy` binary with
//! `grant = "refresh_token"` in front of a JWT-checking upstream, redeeming rotating refresh tokens at npm
//! `oidc-provider` 9.13.3 (client `tp-rotate`, `rotateRefreshToken: true`; see `tests/idp/README.md`).
//!
//! oidc-provider consumes a refresh token at every use and, when a consumed one is presented again,
//! answers `invalid_grant` and revokes the whole grant (the newest refresh token dies too). The provider's
//! test stats remember the SHA-256 of every refresh token it redeemed, so each test can say whether
//! tokenproxy ever presented a stale one.
//!
//! - rotation across more than five refreshes with 3 s access tokens, the state file following each;
//! - a SIGTERM and a restart in the middle of the session;
//! - an abort (as kill -9) right before and right after the rotated token is written;
//! - a new seed (a new login) winning over the stored token;
//! - `tokenproxy login` (device flow, approved through the provider's control API) and `tokenproxy logout`
//!   (revocation).
//!
//! Three tests pin down defects these tests found and that are fixed: a token sent past its JWT `exp` when
//! `expires_in` overstates it, a rotated refresh token lost on SIGTERM mid-refresh, and a `tokenproxy login`
//! overridden by an unchanged seed.
//!
//! Needs `node` >= 20 and `npm` on PATH (`tests/idp/node_modules` is installed by `npm ci` on first use).

// Some helpers serve only the tests of the crash hooks (the `failpoints` feature, which scripts/test turns on).
#![cfg_attr(not(feature = "failpoints"), allow(dead_code, unused_imports))]

mod support;

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper::StatusCode;
use serde_json::Value;
use support::oidc::{sha256_hex, IdpProcess, UpstreamProcess, ROTATE_CLIENT, SESSION_SCOPE};
use support::process::ChildProcess;
use support::{eventually, spawn_tokenproxy, toml_string, write_proxy_config, TokenProxyProcess};

/// The provider's access-token lifetime in these tests (seconds).
const TOKEN_TTL: u64 = 3;
/// The name of the tokenproxy provider, hence of its state file (`state/session.json`).
const PROVIDER: &str = "session";
/// How long a tokenproxy command (or a run expected to end) may take, and a state the tests wait for to show.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Interval between two requests through the proxy while a session runs.
const TICK: Duration = Duration::from_millis(200);
/// Enough for one rotation (a refresh every ≈ 2–2.25 s with 3 s tokens), with slack for a loaded machine.
const PER_ROTATION: Duration = Duration::from_secs(6);
/// SIGABRT, what `TP_FAILPOINT` ends the process with.
const SIGABRT: i32 = 6;

/// How the provider table finds the token endpoint.
#[derive(Clone, Copy)]
enum Endpoint {
    /// `token_url = ".../token"`.
    TokenUrl,
    /// `issuer = "..."`: discovery.
    Issuer,
}

/// `[providers.session]` for tp-rotate (client_secret_basic), with the seed from `seed_file` if given,
/// and `[[routes]]` `/api` → the upstream with its token.
async fn config_body(
    idp: &IdpProcess,
    upstream: &UpstreamProcess,
    endpoint: Endpoint,
    seed: Option<&Path>,
    scope: bool,
) -> String {
    let endpoint = match endpoint {
        Endpoint::TokenUrl => format!("token_url = {}", toml_string(&idp.token_endpoint().await)),
        Endpoint::Issuer => format!("issuer = {}", toml_string(&idp.issuer)),
    };
    let seed =
        seed.map(|p| format!("refresh_token_file = {}\n", toml_string(&p.to_string_lossy()))).unwrap_or_default();
    let scope = if scope { format!("scope = {}\n", toml_string(SESSION_SCOPE)) } else { String::new() };
    format!(
        "[providers.{PROVIDER}]\n\
         {endpoint}\n\
         grant = \"refresh_token\"\n\
         client_id = {client_id}\n\
         client_secret = {client_secret}\n\
         client_auth = \"client_secret_basic\"\n\
         {seed}{scope}\
         refresh_at = 0.75\n\
         expiry_skew = \"1s\"\n\
         timeout = \"3s\"\n\n\
         [[routes]]\n\
         name = \"api\"\n\
         prefix = \"/api\"\n\
         upstream = {upstream}\n\
         strip_prefix = true\n\
         provider = \"{PROVIDER}\"\n",
        client_id = toml_string(ROTATE_CLIENT.0),
        client_secret = toml_string(ROTATE_CLIENT.1),
        upstream = toml_string(&upstream.url),
    )
}

/// One look at the state file.
#[derive(Debug, Clone)]
struct StateRecord {
    json: Value,
    refresh_token: String,
    rotations: u64,
    mode: u32,
}

impl StateRecord {
    /// The record with the refresh token redacted (for failure messages and the example in the report).
    fn redacted(&self) -> Value {
        let mut json = self.json.clone();
        json["refresh_token"] =
            Value::String(format!("<redacted, sha256 {}…>", &sha256_hex(&self.refresh_token)[..12]));
        json
    }
}

/// The state file of `path`, `None` if it does not exist; panics if it exists but is empty, is not JSON or
/// lacks a field (the store writes atomically: a reader must never see a partial record).
fn read_state(path: &Path) -> Option<StateRecord> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("cannot read {path:?}: {e}"),
    };
    let json: Value =
        serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{path:?} is not JSON ({e}); {} bytes", bytes.len()));
    let refresh_token = json["refresh_token"].as_str().unwrap_or_default().to_owned();
    assert!(!refresh_token.is_empty(), "{path:?} has no refresh_token");
    for key in ["version", "provider", "stored_at", "rotations"] {
        assert!(json.get(key).is_some(), "{path:?} lacks {key}");
    }
    assert_eq!(json["provider"], PROVIDER, "{path:?}");
    let rotations = json["rotations"].as_u64().unwrap_or_else(|| panic!("{path:?}: rotations is not a number"));
    let mode = std::fs::metadata(path).map(|m| m.permissions().mode() & 0o777).unwrap_or(0);
    Some(StateRecord { json, refresh_token, rotations, mode })
}

/// The provider, the upstream, and a directory for tokenproxy's config, seed file and state, kept across
/// several tokenproxy runs.
struct Session {
    // Field order is drop order: tokenproxy runs first (stopped ones are kept for their output, printed
    // if the test fails), then the processes they talk to, then the directory.
    proxy: Option<TokenProxyProcess>,
    stopped: Vec<TokenProxyProcess>,
    crashed: Vec<ChildProcess>,
    upstream: UpstreamProcess,
    idp: IdpProcess,
    dir: tempfile::TempDir,
    seed_file: PathBuf,
    body: String,
}

impl Session {
    /// Starts the provider and upstream, seeds a refresh token into `dir/seed.rt` (ending in a newline, as
    /// an editor or `echo` would leave it) and writes the config; tokenproxy is not started yet.
    async fn new(endpoint: Endpoint) -> (Session, support::oidc::SeededRefreshToken) {
        let idp = IdpProcess::start(TOKEN_TTL).await;
        let upstream = UpstreamProcess::start(&idp).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let seed_file = dir.path().join("seed.rt");
        let seed = idp.seed_refresh_token().await;
        std::fs::write(&seed_file, format!("{}\n", seed.refresh_token)).expect("write seed file");
        let body = config_body(&idp, &upstream, endpoint, Some(&seed_file), false).await;
        let session =
            Session { proxy: None, stopped: Vec::new(), crashed: Vec::new(), upstream, idp, dir, seed_file, body };
        (session, seed)
    }

    fn state_path(&self) -> PathBuf {
        self.dir.path().join("state").join(format!("{PROVIDER}.json"))
    }

    fn state(&self) -> Option<StateRecord> {
        read_state(&self.state_path())
    }

    fn proxy(&self) -> &TokenProxyProcess {
        self.proxy.as_ref().expect("tokenproxy is running")
    }

    /// Starts tokenproxy (with `env`) and waits until it listens.
    async fn start(&mut self, env: &[(&str, &str)]) {
        assert!(self.proxy.is_none(), "tokenproxy is already running");
        self.proxy = Some(TokenProxyProcess::start_in(self.dir.path(), &self.body, env).await);
    }

    /// Starts tokenproxy and waits until `/readyz` answers 200.
    async fn start_ready(&mut self) {
        self.start(&[]).await;
        self.proxy().wait_ready().await;
    }

    /// Stops tokenproxy with SIGTERM; it must exit 0.
    async fn stop(&mut self) {
        let mut proxy = self.proxy.take().expect("tokenproxy is running");
        let status = proxy.terminate().await;
        assert_eq!(status.code(), Some(0), "tokenproxy after SIGTERM: {status}\n{}", proxy.process().output().tail(40));
        self.stopped.push(proxy);
    }

    /// Starts tokenproxy with `TP_FAILPOINT=failpoint` and waits for it to abort there.
    #[cfg(feature = "failpoints")]
    async fn crash_at(&mut self, failpoint: &str) {
        assert!(self.proxy.is_none(), "tokenproxy is already running");
        let config = write_proxy_config(self.dir.path(), &self.body).to_string_lossy().into_owned();
        let name = format!("tokenproxy ({failpoint})");
        let mut proxy =
            spawn_tokenproxy(&name, self.dir.path(), &["run", "--config", &config], &[("TP_FAILPOINT", failpoint)]);
        let status = proxy.wait_exit_async(READY_TIMEOUT).await.unwrap_or_else(|| panic!("{name} did not exit"));
        let output = proxy.output().text();
        assert_eq!(status.signal(), Some(SIGABRT), "expected an abort at {failpoint}, got {status}:\n{output}");
        assert!(output.contains(&format!("failpoint {failpoint}")), "no failpoint message in:\n{output}");
        self.crashed.push(proxy);
    }

    /// Sends a request through the proxy every [`TICK`] (each must answer 200 from the upstream) and looks at
    /// the state file after each, until `done` holds for it; returns every distinct record seen, in order.
    async fn drive_until(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&StateRecord) -> bool,
    ) -> Vec<StateRecord> {
        let proxy = self.proxy();
        let deadline = Instant::now() + timeout;
        let mut seen: Vec<StateRecord> = Vec::new();
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let reply = proxy.get("/api/tick").await;
            assert_eq!(
                reply.status,
                StatusCode::OK,
                "request {} s after start: {} {:?}",
                proxy.started_at.elapsed().as_secs_f32(),
                reply.text(),
                reply.header("x-tokenproxy-error")
            );
            assert_eq!(reply.json()["client_id"], ROTATE_CLIENT.0, "{}", reply.text());
            if let Some(record) = self.state() {
                if seen.last().is_none_or(|last| last.refresh_token != record.refresh_token) {
                    seen.push(record.clone());
                }
                if done(&record) {
                    return seen;
                }
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; state: {:?}",
                seen.last().map(StateRecord::redacted)
            );
        }
    }

    /// `/tokens` on the admin listener.
    async fn tokens(&self) -> Value {
        let reply = self.proxy().admin_get("/tokens").await;
        assert_eq!(reply.status, StatusCode::OK, "/tokens: {}", reply.text());
        reply.json()
    }

    /// `tokenproxy_provider_permanent_failure{provider="session"}`.
    async fn permanent_failure(&self) -> Option<f64> {
        let sample = format!("tokenproxy_provider_permanent_failure{{provider=\"{PROVIDER}\"}}");
        self.proxy().metric_sample(&sample).await
    }

    /// The upstream saw only valid tokens: none missing, forged, foreign or past its JWT `exp` (oidc-provider
    /// floors `iat`, so `exp` can come up to a second before `expires_in` says; tokenproxy takes the earlier).
    async fn assert_upstream_saw_only_valid_or_recovered_tokens(&self) {
        let upstream = self.upstream.stats().await;
        assert_eq!((upstream["invalid"].as_u64(), upstream["missing"].as_u64()), (Some(0), Some(0)), "{upstream}");
        assert_eq!(upstream["expired"].as_u64(), Some(0), "a token past its JWT exp was sent: {upstream}");
        assert_eq!(upstream["unauthorized"].as_u64(), Some(0), "{upstream}");
    }
}

/// Asserts the records seen form a rotation sequence: `rotations` one more each time, a refresh token
/// never seen before each time, mode 0600 always.
fn assert_rotation_sequence(records: &[StateRecord], earlier_tokens: &mut HashSet<String>) {
    for pair in records.windows(2) {
        assert_eq!(
            pair[1].rotations,
            pair[0].rotations + 1,
            "rotations must grow by one per new refresh token: {:?} then {:?}",
            pair[0].redacted(),
            pair[1].redacted()
        );
    }
    for record in records {
        assert_eq!(record.mode, 0o600, "state file mode {:o}", record.mode);
        assert!(
            earlier_tokens.insert(record.refresh_token.clone()),
            "a refresh token came back: {:?}",
            record.redacted()
        );
    }
}

/// Asserts that none of `secrets` appears in `text` (named `what`).
fn assert_not_in(what: &str, text: &str, secrets: &HashSet<String>) {
    for secret in secrets {
        assert!(!text.contains(secret.as_str()), "{what} contains a refresh token");
    }
    assert!(!text.contains(ROTATE_CLIENT.1), "{what} contains the client secret");
}

#[tokio::test]
async fn refresh_tokens_rotate_at_every_refresh_and_the_state_file_follows() {
    let (mut s, seed) = Session::new(Endpoint::TokenUrl).await;
    s.start_ready().await;

    // The startup token call redeemed the seed: rotation 1. Then five more, every ≈ 2–2.25 s (3 s tokens,
    // refresh_at 0.75, skew min(1 s, 3 s / 4) = 0.75 s), with requests every 200 ms all along.
    let records = s.drive_until("six rotations", PER_ROTATION * 6, |r| r.rotations >= 6).await;
    let mut tokens = HashSet::from([seed.refresh_token.clone()]);
    assert_rotation_sequence(&records, &mut tokens);
    let last = records.last().expect("a state record");
    assert_eq!(last.json["version"], 1, "{}", last.redacted());
    assert_eq!(last.json["seed_sha256"], seed.sha256, "the record names the seed it started from: {}", last.redacted());
    eprintln!("state file after {} rotations (redacted):\n{:#}", last.rotations, last.redacted());

    // The provider: one unbroken chain of redemptions from the seed to the token in the state file, never a
    // stale token, never a refusal.
    let stats = s.idp.refresh_stats().await;
    assert_eq!((stats.reused, stats.invalid_grant, stats.other_error, stats.unknown), (0, 0, 0, 0), "{stats:#?}");
    let newest = stats.assert_chain_from(&seed.sha256);
    let now = s.state().expect("state file");
    assert_eq!(sha256_hex(&now.refresh_token), newest, "the state file must hold the newest refresh token");
    assert_eq!(stats.ok, now.rotations, "{stats:#?}");

    // The upstream saw valid tokens of several generations (and at most a recovered one past its `exp`).
    s.assert_upstream_saw_only_valid_or_recovered_tokens().await;
    let upstream = s.upstream.stats().await;
    assert!(upstream["clients"][ROTATE_CLIENT.0]["distinct_jti"].as_u64().unwrap_or(0) >= 5, "{upstream}");

    // /tokens reports the session (and its refreshes) and, like /metrics and the logs, no refresh token.
    let status = s.tokens().await;
    assert!(status["providers"][PROVIDER]["refreshes"].as_u64().unwrap_or(0) >= 5, "{status}");
    tokens.insert(now.refresh_token.clone());
    assert_not_in("/tokens", &status.to_string(), &tokens);
    assert_not_in("/metrics", &s.proxy().admin_get("/metrics").await.text(), &tokens);
    assert_not_in("tokenproxy's logs", &s.proxy().logs(), &tokens);
    let leftovers: Vec<String> = std::fs::read_dir(s.state_path().parent().expect("state dir"))
        .expect("state dir")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|name| name.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left in the state dir: {leftovers:?}");
}

#[tokio::test]
async fn a_restart_mid_session_continues_from_the_stored_refresh_token() {
    let (mut s, seed) = Session::new(Endpoint::Issuer).await;
    s.start_ready().await;
    let before = s.drive_until("two rotations", PER_ROTATION * 2, |r| r.rotations >= 2).await;
    s.stop().await;
    let stored = s.state().expect("state file after SIGTERM");
    let rotations_before = stored.rotations;

    // Same config, same (unchanged) seed file: the stored token wins over the seed.
    s.start_ready().await;
    let after = s.drive_until("two more rotations", PER_ROTATION * 3, |r| r.rotations >= rotations_before + 2).await;

    let mut tokens = HashSet::from([seed.refresh_token.clone()]);
    assert_rotation_sequence(&before, &mut tokens);
    let after: Vec<StateRecord> = after.into_iter().filter(|r| r.refresh_token != stored.refresh_token).collect();
    assert_rotation_sequence(&after, &mut tokens);
    assert_eq!(after.first().map(|r| r.rotations), Some(rotations_before + 1), "the count goes on across the restart");

    let stats = s.idp.refresh_stats().await;
    assert_eq!((stats.reused, stats.invalid_grant, stats.other_error), (0, 0, 0), "{stats:#?}");
    let newest = stats.assert_chain_from(&seed.sha256);
    let redemptions = stats.redemptions();
    let first_after_restart = redemptions.get(rotations_before as usize).expect("a redemption after the restart");
    assert_eq!(
        first_after_restart.sha256.as_deref(),
        Some(sha256_hex(&stored.refresh_token).as_str()),
        "after the restart tokenproxy must present the stored refresh token: {stats:#?}"
    );
    assert_eq!(sha256_hex(&s.state().expect("state file").refresh_token), newest);
    s.assert_upstream_saw_only_valid_or_recovered_tokens().await;
}

// Needs the state store's crash hooks: `cargo test --features failpoints` (scripts/test).
#[cfg(feature = "failpoints")]
#[tokio::test]
async fn an_abort_before_the_state_write_ends_the_session_with_a_clear_failure() {
    let (mut s, seed) = Session::new(Endpoint::Issuer).await;
    // A first run stores rotation 1 (the startup redemption of the seed), then stops cleanly.
    s.start_ready().await;
    s.stop().await;
    let previous = std::fs::read(s.state_path()).expect("state file after the first run");
    let stored = s.state().expect("state file");

    // The next run redeems the stored token at startup; the provider rotates it and answers; the process
    // aborts before writing the new one. The file must still be the previous record, byte for byte.
    s.crash_at("before_state_write").await;
    assert_eq!(std::fs::read(s.state_path()).expect("state file after the abort"), previous, "state file changed");
    let stats = s.idp.refresh_stats().await;
    let last = stats.log.last().expect("a refresh call");
    assert_eq!((last.status, last.sha256.clone()), (200, Some(sha256_hex(&stored.refresh_token))), "{stats:#?}");
    assert_eq!(stats.reused, 0, "{stats:#?}");

    // Restart without the failpoint: the stored token is the one the provider already consumed. oidc-provider
    // treats its second presentation as a replay: invalid_grant ("refresh token already used") AND it revokes
    // the whole grant, so the newest token (issued to the aborted process, never stored) is dead as well.
    // Nothing can save this session: tokenproxy must say so clearly and stop there.
    s.start(&[]).await;
    let readyz = eventually("/readyz 503 asking for a new login", READY_TIMEOUT, || async {
        let reply = s.proxy().admin_get("/readyz").await;
        (reply.status == StatusCode::SERVICE_UNAVAILABLE && reply.text().contains("new login")).then(|| reply.json())
    })
    .await;
    assert_eq!(readyz["ready"], false, "{readyz}");
    let status = s.tokens().await;
    let provider = &status["providers"][PROVIDER];
    assert_eq!(provider["state"], "failed", "{status}");
    assert!(provider["last_error"].to_string().contains("a new login is needed"), "{status}");
    assert_eq!(s.permanent_failure().await, Some(1.0), "tokenproxy_provider_permanent_failure");
    let reply = s.proxy().get("/api/x").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());
    assert_eq!(reply.header("x-tokenproxy-error"), Some("token_unavailable"));

    let stats = s.idp.refresh_stats().await;
    let replay = stats.log.last().expect("the replayed call");
    assert!(replay.reused, "the provider must have seen the consumed token again: {stats:#?}");
    assert_eq!(replay.error.as_deref(), Some("invalid_grant"), "{stats:#?}");
    assert_eq!(replay.detail.as_deref(), Some("refresh token already used"), "{stats:#?}");
    assert_eq!((stats.ok, stats.reused, stats.invalid_grant), (2, 1, 1), "{stats:#?}");
    stats.assert_chain_from(&seed.sha256);

    // Permanent: no retry loop (a short look; a later retry after minutes would be allowed).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(s.idp.refresh_stats().await.calls, stats.calls, "invalid_grant must not be retried in a loop");
    assert_eq!(s.upstream.stats().await["requests"], 0, "nothing may reach the upstream without a token");
}

// Needs the state store's crash hooks: `cargo test --features failpoints` (scripts/test).
#[cfg(feature = "failpoints")]
#[tokio::test]
async fn an_abort_after_the_state_write_keeps_the_session() {
    let (mut s, seed) = Session::new(Endpoint::TokenUrl).await;
    // The very first redemption (of the seed) is written, then the process aborts.
    s.crash_at("after_state_write").await;
    let stored = s.state().expect("the rotated token was stored before the abort");
    assert_eq!(stored.rotations, 1, "{}", stored.redacted());
    assert_eq!(stored.mode, 0o600);
    let stats = s.idp.refresh_stats().await;
    assert_eq!(stats.ok, 1, "{stats:#?}");
    assert_eq!(stats.assert_chain_from(&seed.sha256), sha256_hex(&stored.refresh_token), "stored = issued");

    // Restart: it goes on from the stored token; the provider never sees a stale one.
    s.start_ready().await;
    let records = s.drive_until("two more rotations", PER_ROTATION * 3, |r| r.rotations >= 3).await;
    let mut tokens = HashSet::from([seed.refresh_token.clone()]);
    assert_rotation_sequence(&records, &mut tokens);
    let stats = s.idp.refresh_stats().await;
    assert_eq!((stats.reused, stats.invalid_grant, stats.other_error), (0, 0, 0), "{stats:#?}");
    assert_eq!(stats.assert_chain_from(&seed.sha256), sha256_hex(&s.state().expect("state").refresh_token));
    assert_eq!(s.permanent_failure().await, Some(0.0), "tokenproxy_provider_permanent_failure");
}

#[tokio::test]
async fn a_new_seed_wins_over_the_stored_refresh_token() {
    let (mut s, first) = Session::new(Endpoint::Issuer).await;
    s.start_ready().await;
    s.drive_until("two rotations", PER_ROTATION * 2, |r| r.rotations >= 2).await;
    s.stop().await;
    let old = s.state().expect("state file");
    assert_eq!(old.json["seed_sha256"], first.sha256);

    // A new login: the seed file now holds a refresh token of a new grant.
    let second = s.idp.seed_refresh_token().await;
    std::fs::write(&s.seed_file, format!("{}\n", second.refresh_token)).expect("write the new seed");
    s.start_ready().await;
    let reply = s.proxy().get("/api/after-new-login").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    let stats = s.idp.refresh_stats().await;
    assert_eq!((stats.reused, stats.invalid_grant, stats.other_error), (0, 0, 0), "{stats:#?}");
    let old_grant = stats.for_grant(&first.grant_id);
    assert_eq!(
        old_grant.calls, old.rotations,
        "the stored token of the old session must not be used again: {stats:#?}"
    );
    let new_grant = stats.for_grant(&second.grant_id);
    assert!(new_grant.ok >= 1, "the new seed was never redeemed: {stats:#?}");
    let newest = new_grant.assert_chain_from(&second.sha256);
    let now = s.state().expect("state file");
    assert_eq!(now.json["seed_sha256"], second.sha256, "{}", now.redacted());
    assert_eq!(now.rotations, new_grant.ok, "rotations count from the new login: {}", now.redacted());
    assert_eq!(sha256_hex(&now.refresh_token), newest);
}

/// Runs `tokenproxy login session --config CONFIG` in `dir`: reads the verification URL and user code it
/// prints, approves the code through the provider's control API (what the user-code page plus a login and
/// consent would do) and waits for the command to succeed. Returns the id of the Grant the login created.
async fn device_login(idp: &IdpProcess, dir: &Path, config: &str) -> String {
    let mut login = spawn_tokenproxy("tokenproxy login", dir, &["login", PROVIDER, "--config", config], &[]);
    let (url, code) = eventually("the verification URL and code on stderr", READY_TIMEOUT, || {
        let text = login.output().text();
        async move {
            let line = text.lines().find(|l| l.contains("enter the code "))?;
            let url = line.split_whitespace().find(|w| w.starts_with("http://"))?.to_owned();
            let code = line.rsplit("enter the code ").next()?.trim().to_owned();
            Some((url, code))
        }
    })
    .await;
    assert_eq!(url, format!("{}/device", idp.issuer), "verification URL");
    let approved = idp.approve_device(&code).await;
    let status = login.wait_exit_async(READY_TIMEOUT).await.expect("tokenproxy login exits once approved");
    assert!(status.success(), "tokenproxy login: {status}\n{}", login.output().text());
    assert!(login.output().text().contains("Logged in"), "{}", login.output().text());
    approved["grant_id"].as_str().expect("grant_id").to_owned()
}

#[tokio::test]
async fn device_login_then_proxy_then_logout_revokes() {
    let idp = IdpProcess::start(TOKEN_TTL).await;
    let upstream = UpstreamProcess::start(&idp).await;
    let dir = tempfile::tempdir().expect("temp dir");
    // No seed: the session comes from `tokenproxy login`. The device authorization request needs `openid`.
    let body = config_body(&idp, &upstream, Endpoint::Issuer, None, true).await;
    let config_path = write_proxy_config(dir.path(), &body);
    let config = config_path.to_string_lossy().into_owned();
    let state_path = dir.path().join("state").join(format!("{PROVIDER}.json"));

    // tokenproxy login: it prints where to go and the code; the "user" approves through the provider's
    // control API, which does what the user-code page plus a login and consent would.
    let grant_id = device_login(&idp, dir.path(), &config).await;
    let stored = read_state(&state_path).expect("the login stored a refresh token");
    assert_eq!((stored.rotations, stored.mode), (0, 0o600), "{}", stored.redacted());
    assert!(stored.json.get("seed_sha256").is_none_or(Value::is_null), "{}", stored.redacted());

    // The proxy works from the stored token.
    let mut proxy = TokenProxyProcess::start_in(dir.path(), &body, &[]).await;
    proxy.wait_ready().await;
    let reply = proxy.get("/api/after-login").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["client_id"], ROTATE_CLIENT.0);
    let stats = idp.refresh_stats().await;
    let session = stats.for_grant(&grant_id);
    assert!(session.ok >= 1, "{stats:#?}");
    session.assert_chain_from(&sha256_hex(&stored.refresh_token));
    assert_eq!((stats.reused, stats.invalid_grant), (0, 0), "{stats:#?}");
    let status = proxy.terminate().await;
    assert_eq!(status.code(), Some(0), "tokenproxy after SIGTERM: {status}");

    // tokenproxy logout: revoked at the provider (RFC 7009), deleted from the store.
    let current = read_state(&state_path).expect("state file before logout");
    let mut logout = spawn_tokenproxy("tokenproxy logout", dir.path(), &["logout", PROVIDER, "--config", &config], &[]);
    let status = logout.wait_exit_async(READY_TIMEOUT).await.expect("tokenproxy logout exits");
    assert!(status.success(), "tokenproxy logout: {status}\n{}", logout.output().text());
    assert!(!state_path.exists(), "the state file must be gone after logout");
    assert_eq!(idp.stats().await["revocation"]["ok"], 1, "one revocation call");
    let reply = idp.redeem_refresh_token(&current.refresh_token).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert_eq!(reply.json()["error"], "invalid_grant", "{}", reply.text());
    let last = idp.refresh_stats().await.log.last().cloned().expect("the test's own call");
    assert_eq!(last.detail.as_deref(), Some("refresh token not found"), "revoked: {last:?}");
    drop(proxy);
}

/// A token is never sent past its JWT `exp`, even when the IdP's `expires_in` says it lives longer:
/// oidc-provider floors `iat` to a whole second, so a token fetched at s.900 expires ≈ 2.1 s after it
/// arrives while `expires_in` says 3 s. The proactive refresh is held 1.5 s at the IdP so the old token
/// stays in use across that window.
#[tokio::test]
async fn tokens_past_their_jwt_exp_are_never_sent() {
    let (mut s, _seed) = Session::new(Endpoint::TokenUrl).await;
    s.start_ready().await;
    // Wait for s.900 on the wall clock, then force a refresh.
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").subsec_millis();
    tokio::time::sleep(Duration::from_millis(u64::from((1900 - ms) % 1000))).await;
    let refresh = s.proxy().admin_post(&format!("/tokens/{PROVIDER}/refresh")).await;
    assert_eq!(refresh.status, StatusCode::OK, "{}", refresh.text());
    s.idp.delay_next(1, 1500).await;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(3000) {
        let reply = s.proxy().get("/api/edge").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let upstream = s.upstream.stats().await;
    assert_eq!(upstream["expired"], 0, "tokenproxy sent a token past its JWT exp: {upstream}");
}

/// SIGTERM while a refresh-token call is in flight: the provider has already rotated the token, so
/// tokenproxy must wait for the answer (it comes well within the provider's `timeout` and the
/// `shutdown_grace`) and store the new refresh token before it exits; the next run goes on from it.
#[tokio::test]
async fn a_sigterm_during_a_refresh_keeps_the_rotated_token() {
    let (mut s, seed) = Session::new(Endpoint::TokenUrl).await;
    s.start_ready().await;
    // The next token call (the proactive refresh, ≈ 2 s after startup) is served at once but its answer
    // reaches tokenproxy 800 ms later.
    s.idp.hold_next_answers(1, 800).await;
    eventually("the proactive refresh to reach the provider", PER_ROTATION, || async {
        (s.idp.refresh_stats().await.calls >= 2).then_some(())
    })
    .await;
    s.stop().await;

    let stats = s.idp.refresh_stats().await;
    let rotated_to = stats.assert_chain_from(&seed.sha256);
    let stored = s.state().expect("state file");
    assert_eq!(
        sha256_hex(&stored.refresh_token),
        rotated_to,
        "after SIGTERM the state file must hold the token the provider rotated to ({} rotations stored, the \
         provider made {}): {stats:#?}",
        stored.rotations,
        stats.ok
    );
    s.start_ready().await;
    let stats = s.idp.refresh_stats().await;
    assert_eq!((stats.reused, stats.invalid_grant), (0, 0), "{stats:#?}");
}

/// `tokenproxy login` while a seed is still configured (the usual case: the seed's session died, the
/// operator logs in again): the next start must use the login's refresh token.
#[tokio::test]
async fn a_device_login_wins_over_an_unchanged_seed() {
    let (mut s, seed) = Session::new(Endpoint::Issuer).await;
    s.body = config_body(&s.idp, &s.upstream, Endpoint::Issuer, Some(&s.seed_file), true).await;
    s.start_ready().await;
    s.stop().await;
    let config = s.stopped[0].config_path.to_string_lossy().into_owned();
    let login_grant = device_login(&s.idp, s.dir.path(), &config).await;
    let login = s.state().expect("the login stored a refresh token");

    s.start(&[]).await;
    let readyz = eventually("/readyz ready or failed", READY_TIMEOUT, || async {
        let reply = s.proxy().admin_get("/readyz").await;
        (reply.status == StatusCode::OK || reply.text().contains("\"failed\"")).then(|| reply.text())
    })
    .await;
    let stats = s.idp.refresh_stats().await;
    assert_eq!(stats.for_grant(&seed.grant_id).calls, 1, "the seed was redeemed again after the login: {stats:#?}");
    stats.for_grant(&login_grant).assert_chain_from(&sha256_hex(&login.refresh_token));
    assert_eq!((stats.reused, stats.invalid_grant), (0, 0), "{stats:#?}\n{readyz}");
    assert!(readyz.contains("\"ready\":true"), "{readyz}");
}
