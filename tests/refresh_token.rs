//! Refresh-token sessions, the password grant, discovery, and `tokenproxy login` / `logout`, against a fake IdP
//! that rotates refresh tokens and revokes the whole family when a rotated one is reused.

// Some helpers serve only the tests of the crash hooks (the `failpoints` feature, which scripts/test turns on).
#![cfg_attr(not(feature = "failpoints"), allow(dead_code, unused_imports))]

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use support::session_idp::SessionIdp;
use support::{eventually, spawn_tokenproxy, tokenproxy_command, Client, FakeUpstream, Proxy, TokenProxyProcess};

fn record(state: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(state.join("api.json")).expect("state file");
    serde_json::from_str(&text).expect("state file is JSON")
}

fn session_config(token_endpoint: &str, seed_file: &Path, state: &Path, upstream: &FakeUpstream) -> String {
    format!(
        r#"
[state]
dir = "{state}"
[providers.api]
{token_endpoint}
grant = "refresh_token"
client_id = "client-1"
client_secret = "s3cret-value"
refresh_token_file = "{seed}"
# Forced refreshes one after another drive the rotations here.
manual_refresh_interval = "0s"
[[routes]]
prefix = "/api"
upstream = "{up}"
strip_prefix = true
provider = "api"
"#,
        state = state.display(),
        seed = seed_file.display(),
        up = upstream.url()
    )
}

struct Setup {
    idp: SessionIdp,
    upstream: FakeUpstream,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn new() -> Setup {
        let idp = SessionIdp::start(300, "rt-seed").await;
        let upstream = FakeUpstream::start().await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("seed"), "rt-seed\n").unwrap();
        Setup { idp, upstream, dir }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn config(&self) -> String {
        let endpoint = format!("token_url = \"{}\"", self.idp.token_url());
        session_config(&endpoint, &self.dir.path().join("seed"), &self.state(), &self.upstream)
    }
}

#[tokio::test]
async fn rotated_refresh_tokens_are_stored_and_never_reused() {
    let setup = Setup::new().await;
    let proxy = Proxy::start(&setup.config()).await;
    proxy.wait_ready().await;
    let client = Client::new();
    assert_eq!(client.get(&proxy.url("/api/x")).await.json()["token"], "tok-1");
    let stored = record(&setup.state());
    assert_eq!(stored["refresh_token"], "rt-1");
    assert_eq!(stored["rotations"], 1);
    assert!(stored["seed_sha256"].as_str().unwrap().len() == 64);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(setup.state().join("api.json")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    for n in 2..=6 {
        let refreshed = client.post(&proxy.admin_url("/tokens/api/refresh"), Bytes::new()).await;
        assert_eq!(refreshed.status, 200, "{}", refreshed.text());
        assert_eq!(record(&setup.state())["refresh_token"], format!("rt-{n}"));
        assert_eq!(client.get(&proxy.url("/api/x")).await.json()["token"], format!("tok-{n}"));
    }
    let stats = setup.idp.stats();
    assert_eq!(stats["refreshes"], 6);
    assert_eq!(stats["reused"], 0, "a rotated refresh token was sent again");
    assert_eq!(stats["invalid_grant"], 0);
    let tokens = client.get(&proxy.admin_url("/tokens")).await.text();
    assert!(!tokens.contains("rt-"), "no refresh token in /tokens: {tokens}");
    proxy.stop().await;

    // A restart continues from the stored token, not the seed (which the IdP would take as reuse).
    let proxy = Proxy::start(&setup.config()).await;
    proxy.wait_ready().await;
    assert_eq!(client.get(&proxy.url("/api/x")).await.json()["token"], "tok-7");
    assert_eq!(setup.idp.stats()["reused"], 0);
    assert_eq!(record(&setup.state())["rotations"], 7);
    proxy.stop().await;
}

#[tokio::test]
async fn a_changed_seed_is_a_new_login_and_wins_over_the_store() {
    let setup = Setup::new().await;
    let proxy = Proxy::start(&setup.config()).await;
    proxy.wait_ready().await;
    proxy.stop().await;
    assert_eq!(record(&setup.state())["refresh_token"], "rt-1");
    // A new login elsewhere: the IdP now accepts only rt-new, and the seed file says so.
    setup.idp.new_session("rt-new");
    std::fs::write(setup.dir.path().join("seed"), "rt-new\n").unwrap();
    let proxy = Proxy::start(&setup.config()).await;
    proxy.wait_ready().await;
    assert_eq!(record(&setup.state())["refresh_token"], "rt-2");
    assert_eq!(record(&setup.state())["rotations"], 1, "a new session starts counting again");
    assert_eq!(setup.idp.stats()["invalid_grant"], 0);
    proxy.stop().await;
}

#[tokio::test]
async fn invalid_grant_ends_the_session_with_a_clear_error_and_an_alertable_metric() {
    let setup = Setup::new().await;
    setup.idp.revoke_session();
    let proxy = Proxy::start(&setup.config()).await;
    let client = Client::new();
    let ready = eventually("a last_error in /readyz", Duration::from_secs(10), async || {
        let ready = client.get(&proxy.admin_url("/readyz")).await;
        ready.json()["providers"]["api"]["last_error"].is_string().then_some(ready)
    })
    .await;
    assert_eq!(ready.status, 503);
    let error = ready.json()["providers"]["api"]["last_error"].as_str().unwrap().to_owned();
    assert!(error.contains("refresh token expired or revoked: a new login is needed"), "{error}");
    assert_eq!(ready.json()["providers"]["api"]["state"], "failed");
    assert_eq!(proxy.metric("tokenproxy_provider_permanent_failure{provider=\"api\"}").await, 1.0);
    assert!(proxy.metric("tokenproxy_token_requests_total{outcome=\"error\",provider=\"api\"}").await >= 1.0);
    let reply = client.get(&proxy.url("/api/x")).await;
    assert_eq!(reply.status, 503);
    assert!(reply.json()["detail"].as_str().unwrap().contains("new login"));
    assert_eq!(setup.idp.calls(), 1, "not retried in a loop");
    assert!(!setup.state().join("api.json").exists(), "nothing stored from a failed session");
    proxy.stop().await;
}

#[tokio::test]
async fn refresh_token_expiry_is_shown_and_bounds_the_schedule() {
    let setup = Setup::new().await;
    setup.idp.refresh_expires_in(1800);
    let proxy = Proxy::start(&setup.config()).await;
    proxy.wait_ready().await;
    let tokens = Client::new().get(&proxy.admin_url("/tokens")).await.json();
    assert!(tokens["providers"]["api"]["refresh_token_expires_at"].as_str().unwrap().ends_with('Z'));
    let stored = record(&setup.state());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let expires = stored["refresh_token_expires_at"].as_u64().unwrap();
    assert!(expires > now + 1700 && expires <= now + 1800);
    proxy.stop().await;
}

#[tokio::test]
async fn discovery_finds_the_token_endpoint_and_refuses_another_issuer() {
    let setup = Setup::new().await;
    let endpoint = format!("issuer = \"{}\"", setup.idp.issuer());
    let config = session_config(&endpoint, &setup.dir.path().join("seed"), &setup.state(), &setup.upstream);
    let proxy = Proxy::start(&config).await;
    proxy.wait_ready().await;
    proxy.stop().await;

    let other = SessionIdp::start(300, "rt-seed").await;
    other.claim_issuer("https://impostor.example");
    let endpoint = format!("issuer = \"{}\"", other.issuer());
    let config =
        session_config(&endpoint, &setup.dir.path().join("seed"), &setup.dir.path().join("s2"), &setup.upstream);
    let proxy = Proxy::start(&config).await;
    let client = Client::new();
    let error = eventually("a last_error in /readyz", Duration::from_secs(10), async || {
        let ready = client.get(&proxy.admin_url("/readyz")).await.json();
        ready["providers"]["api"]["last_error"].as_str().map(str::to_owned)
    })
    .await;
    assert!(error.contains("impostor.example") && error.contains("refusing"), "{error}");
    assert_eq!(other.calls(), 0, "no token request went to an unverified endpoint");
    proxy.stop().await;
}

#[tokio::test]
async fn password_grant_sends_the_resource_owner_credentials() {
    let idp = SessionIdp::start(300, "unused").await;
    let upstream = FakeUpstream::start().await;
    let config = format!(
        r#"
[providers.api]
token_url = "{}"
grant = "password"
client_id = "client-1"
client_secret = "s3cret-value"
username = "alice"
password = "wonderland"
[[routes]]
prefix = "/"
upstream = "{}"
provider = "api"
"#,
        idp.token_url(),
        upstream.url()
    );
    let proxy = Proxy::start(&config).await;
    proxy.wait_ready().await;
    assert_eq!(Client::new().get(&proxy.url("/x")).await.json()["token"], "tok-1");
    assert_eq!(idp.stats()["password_logins"], 1);
    proxy.stop().await;
}

// Needs the state store's crash hooks: `cargo test --features failpoints` (scripts/test).
#[cfg(feature = "failpoints")]
#[tokio::test]
async fn a_failed_state_write_keeps_the_rotated_token_and_stores_it_first_next_time() {
    let setup = Setup::new().await;
    let config = setup.dir.path().join("tokenproxy.toml");
    let listen = "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n";
    std::fs::write(&config, format!("{listen}{}", setup.config())).unwrap();
    // The first write of a rotated refresh token fails (as on a full disk): rt-1 then exists only in memory, its
    // access token is not used, and the next attempt stores rt-1 before redeeming it.
    let proxy = TokenProxyProcess::run(&config, &[("TP_FAILPOINT", "before_state_write:error")]).await;
    proxy.wait_ready().await;
    let stored = record(&setup.state());
    assert_eq!(stored["refresh_token"], "rt-2");
    assert_eq!(stored["rotations"], 2);
    let stats = setup.idp.stats();
    assert_eq!(stats["refreshes"], 2);
    assert_eq!(stats["reused"], 0, "rt-1 was kept, not lost: the seed was never sent again");
    assert_eq!(stats["invalid_grant"], 0);
    let metrics = Client::new().get(&proxy.admin_url("/metrics")).await.text();
    assert!(metrics.contains("tokenproxy_token_requests_total{outcome=\"error\",provider=\"api\"} 1"), "{metrics}");
}

fn tokenproxy(args: &[&str], config: &Path) -> tokio::process::Command {
    let mut command = tokenproxy_command(args);
    command.arg("--config").arg(config);
    tokio::process::Command::from(command)
}

#[tokio::test]
async fn login_with_the_device_grant_then_logout_revokes() {
    let setup = Setup::new().await;
    setup.idp.revoke_session();
    setup.idp.script_device(vec!["authorization_pending", "slow_down"]);
    let config_path = setup.dir.path().join("tokenproxy.toml");
    let config = format!(
        r#"
[state]
dir = "{state}"
[providers.api]
issuer = "{issuer}"
grant = "refresh_token"
client_id = "client-1"
client_secret = "s3cret-value"
scope = "offline_access api"
[[routes]]
prefix = "/"
upstream = "{up}"
provider = "api"
"#,
        state = setup.state().display(),
        issuer = setup.idp.issuer(),
        up = setup.upstream.url()
    );
    std::fs::write(&config_path, &config).unwrap();
    let started = std::time::Instant::now();
    let output = tokenproxy(&["login", "api"], &config_path).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("WDJB-MJHT") && stderr.contains("/activate"), "{stderr}");
    assert_eq!(setup.idp.stats()["device_polls"], 3, "pending, slow_down, then approved");
    // interval 1 s, then slow_down adds 5 s: at least 1 + 6 + 6 s... minus nothing: ≥ 7 s in all.
    assert!(started.elapsed() >= Duration::from_secs(7), "slow_down was honoured: {:?}", started.elapsed());
    assert_eq!(record(&setup.state())["refresh_token"], "rt-1");

    // The proxy runs from the stored session.
    let proxy = Proxy::start(&config).await;
    proxy.wait_ready().await;
    proxy.stop().await;
    let stored = record(&setup.state())["refresh_token"].as_str().unwrap().to_owned();

    let output = tokenproxy(&["logout", "api"], &config_path).output().await.unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(setup.idp.stats()["revoked"], serde_json::json!([stored]));
    assert!(!setup.state().join("api.json").exists());
    assert!(setup.idp.stats()["valid"].is_null(), "the session is dead at the IdP too");
}

// Needs the state store's crash hooks: `cargo test --features failpoints` (scripts/test).
#[cfg(feature = "failpoints")]
#[tokio::test]
async fn killed_between_the_idp_answer_and_the_write_never_leaves_a_corrupt_state_file() {
    let listen = "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n";
    for failpoint in ["before_state_write", "after_state_write"] {
        let setup = Setup::new().await;
        let config = setup.dir.path().join("tokenproxy.toml");
        std::fs::write(&config, format!("{listen}{}", setup.config())).unwrap();
        let config_arg = config.to_string_lossy().into_owned();
        let args = ["run", "--config", &config_arg];
        let name = format!("tokenproxy ({failpoint})");
        let mut child = spawn_tokenproxy(&name, setup.dir.path(), &args, &[("TP_FAILPOINT", failpoint)]);
        // The IdP answers (rt-seed → rt-1) and the process dies at the failpoint, as under kill -9.
        let status = child.wait_exit_async(Duration::from_secs(20)).await.expect("it ends at the failpoint");
        assert!(!status.success(), "{failpoint}: aborted");
        assert_eq!(setup.idp.stats()["valid"], "rt-1", "{failpoint}: the IdP rotated");
        let leftovers: Vec<String> = std::fs::read_dir(setup.state())
            .map(|dir| dir.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        match failpoint {
            "before_state_write" => {
                assert!(!setup.state().join("api.json").exists(), "no partial file: {leftovers:?}");
                // Restart: the stored token never came; the seed was already rotated away, and the IdP says so.
                let proxy = TokenProxyProcess::run(&config, &[]).await;
                let client = Client::new();
                let (status, error) = eventually("a last_error in /readyz", Duration::from_secs(10), async || {
                    let ready = client.get(&proxy.admin_url("/readyz")).await;
                    let error = ready.json()["providers"]["api"]["last_error"].as_str().map(str::to_owned);
                    error.map(|error| (ready.status, error))
                })
                .await;
                assert_eq!(status, 503);
                assert!(error.contains("a new login is needed"), "{error}");
            }
            _ => {
                assert_eq!(record(&setup.state())["refresh_token"], "rt-1", "the stored record is whole");
                let proxy = TokenProxyProcess::run(&config, &[]).await;
                proxy.wait_ready().await;
                assert_eq!(record(&setup.state())["refresh_token"], "rt-2");
                assert_eq!(setup.idp.stats()["reused"], 0);
            }
        }
    }
}

#[tokio::test]
async fn planted_links_and_files_in_the_state_dir_never_redirect_a_refresh_token() {
    use std::os::unix::fs::PermissionsExt as _;
    let setup = Setup::new().await;
    let state = setup.state();
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    // What a co-tenant plants: a symlink at the name the temporary file used to have (a fixed one). Files planted at
    // the final name, or at any name, are replaced, never written through (src/private_file.rs's tests).
    let stolen = setup.dir.path().join("stolen");
    std::os::unix::fs::symlink(&stolen, state.join(".api.json.tmp")).unwrap();
    let proxy = Proxy::start(&setup.config()).await;
    proxy.wait_ready().await;
    assert_eq!(record(&state)["refresh_token"], "rt-1");
    assert!(!stolen.exists(), "the planted link was not followed");
    assert_eq!(std::fs::metadata(state.join("api.json")).unwrap().permissions().mode() & 0o777, 0o600);
    proxy.stop().await;

    // A state directory others can write is refused (unless allow_shared_dir), naming the key.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let refused = tokenproxy::config::Config::from_toml_str(&setup.config(), "test.toml").unwrap_err().to_string();
    assert!(refused.contains("state.dir") && refused.contains("0777"), "{refused}");
    let config = setup.config().replacen("[state]\n", "[state]\nallow_shared_dir = true\n", 1);
    let config = tokenproxy::config::Config::from_toml_str(&config, "test.toml").unwrap();
    assert!(config.warnings().iter().any(|w| w.starts_with("state.dir:")), "{:?}", config.warnings());
}
