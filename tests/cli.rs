//! The `tokenproxy` binary: exit codes, config errors naming their key and source, `check`, `token`, and a graceful
//! SIGTERM with a request in flight.

mod support;

use std::process::Command;
use std::time::Duration;

use support::{eventually, tokenproxy_command, Client, FakeIdp, FakeUpstream, TokenProxyProcess};

/// `tokenproxy` with no variable of the developer's shell that would change what it does.
fn tokenproxy() -> Command {
    tokenproxy_command(&[])
}

fn write_config(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let path = dir.path().join("tokenproxy.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_reports_every_error_with_its_key_and_source() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        r#"
[providers.orders]
token_url = "/oauth2/token"
client_id = "orders"
client_secret = "hunter2-secret"
refresh_at = 1.5
[[routes]]
prefix = "/orders"
upstream = "https://orders.internal"
provider = "ordrs"
[server]
listn = "127.0.0.1:8080"
"#,
    );
    let output = tokenproxy()
        .args(["check", "--config"])
        .arg(&path)
        .env("TOKENPROXY_SERVER__MAX_CONNECTIONS", "lots")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let file = path.display().to_string();
    for expected in [
        format!("providers.orders.token_url: relative URL without a base (from {file})"),
        "providers.orders.refresh_at".to_owned(),
        "routes[0].provider: no provider named `ordrs`".to_owned(),
        "server.listn: unknown key".to_owned(),
        "did you mean `listen`".to_owned(),
        "(from TOKENPROXY_SERVER__MAX_CONNECTIONS)".to_owned(),
    ] {
        assert!(stderr.contains(&expected), "missing `{expected}` in:\n{stderr}");
    }
    assert!(!stderr.contains("hunter2-secret"));
    assert!(output.stdout.is_empty());
}

#[test]
fn check_prints_the_resolved_config_with_secrets_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        r#"
[providers.orders]
token_url = "https://idp.example/token"
client_id = "orders"
client_secret = "hunter2-secret"
[[routes]]
prefix = "/orders"
upstream = "https://orders.internal"
provider = "orders"
"#,
    );
    let output = tokenproxy().args(["check", "--config"]).arg(&path).output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("[redacted]") && !stdout.contains("hunter2-secret"), "{stdout}");
    assert!(stdout.contains("request_timeout = \"30s\""), "defaults are shown resolved:\n{stdout}");
}

#[test]
fn check_says_where_traces_go_even_when_only_the_environment_says_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, "[[routes]]\nprefix = \"/a\"\nupstream = \"http://127.0.0.1:3000\"\n");
    let check = |env: &[(&str, &str)]| {
        let mut command = tokenproxy();
        command.args(["check", "--config"]).arg(&path).env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
        for (name, value) in env {
            command.env(name, value);
        }
        let output = command.output().unwrap();
        assert_eq!(output.status.code(), Some(0));
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    assert!(!check(&[]).contains("telemetry"), "nothing said while it is off");
    let on = check(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"), ("OTEL_SERVICE_NAME", "edge")]);
    assert!(
        on.contains(
            "telemetry: traces go to http://127.0.0.1:4318/v1/traces over http/protobuf (service.name edge, sample_ratio 1)"
        ),
        "{on}"
    );
}

#[test]
fn the_example_config_is_valid() {
    let output = tokenproxy()
        .args(["check", "--config", concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml")])
        .env("ORDERS_CLIENT_SECRET", "example")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn check_offline_lints_a_config_without_its_secrets_and_plain_check_still_needs_them() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml");
    let check = |args: &[&str]| {
        let output = tokenproxy()
            .arg("check")
            .args(args)
            .args(["--config", example])
            .env_remove("ORDERS_CLIENT_SECRET")
            .output();
        let output = output.unwrap();
        (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
    };
    let (code, stderr) = check(&["--offline"]);
    assert_eq!(code, Some(0), "the example passes offline as shipped: {stderr}");
    assert!(
        stderr.contains(
            "warning: providers.orders.client_secret_env: environment variable `ORDERS_CLIENT_SECRET` is not set"
        ) && stderr.contains("not checked offline"),
        "{stderr}"
    );
    let (code, stderr) = check(&[]);
    assert_eq!(code, Some(2), "a running proxy would fail: {stderr}");
    assert!(stderr.contains("`ORDERS_CLIENT_SECRET` is not set"), "{stderr}");

    // Absent files are warnings offline; what is wrong in the file itself still fails.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenproxy.toml");
    let config = "[providers.a]\ntoken_url = \"https://idp/token\"\nclient_id = \"c\"\n\
                  client_secret_file = \"/run/secrets/absent\"\n[[routes]]\nprefix = \"/\"\nupstream = \"https://a\"\n\
                  provider = \"a\"\nca_file = \"/etc/absent-ca.pem\"\n";
    std::fs::write(&path, config).unwrap();
    let output = tokenproxy().args(["check", "--offline", "--config"]).arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("warning: providers.a.client_secret_file: cannot read secret file /run/secrets/absent"),
        "{stderr}"
    );
    assert!(stderr.contains("warning: routes[0].ca_file: cannot read /etc/absent-ca.pem"), "{stderr}");
    std::fs::write(&path, config.replace("client_id = \"c\"\n", "client_id = \"c\"\nrefresh_at = 2.0\n")).unwrap();
    let output = tokenproxy().args(["check", "--offline", "--config"]).arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("providers.a.refresh_at") && stderr.contains("1 problem"), "{stderr}");
    let both = tokenproxy().args(["check", "--offline", "--fetch", "--config"]).arg(&path).output().unwrap();
    assert_eq!(both.status.code(), Some(2), "--fetch needs the secrets: the two do not go together");
}

#[test]
fn a_missing_config_file_cannot_start() {
    let output = tokenproxy().args(["run", "--config", "/nonexistent/tokenproxy.toml"]).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/tokenproxy.toml"));
}

#[tokio::test]
async fn token_prints_only_the_token_and_check_fetch_reports_each_provider() {
    let idp = FakeIdp::start(300).await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cret-value\n").unwrap();
    let path = write_config(
        &dir,
        &format!(
            r#"
[providers.api]
token_url = "{}"
client_id = "client-1"
client_secret_file = "{}"
[providers.broken]
token_url = "http://127.0.0.1:9/token"
client_id = "client-1"
client_secret = "x"
timeout = "2s"
[[routes]]
prefix = "/"
upstream = "http://127.0.0.1:1"
provider = "api"
"#,
            idp.token_url(),
            secret.display()
        ),
    );
    let output = tokio::process::Command::from(tokenproxy())
        .args(["token", "api", "--config"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "tok-1\n");
    let basic = idp.received()[0].authorization.clone().unwrap();
    assert!(basic.starts_with("Basic "), "the secret file was read (trailing newline trimmed)");

    let output = tokio::process::Command::from(tokenproxy())
        .args(["token", "nope", "--config"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no provider named `nope`"));

    let output = tokio::process::Command::from(tokenproxy())
        .args(["check", "--fetch", "--config"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("provider api: ok, token lifetime 300s"), "{stderr}");
    assert!(stderr.contains("provider broken: FAILED: cannot reach the identity provider"), "{stderr}");
    assert!(stderr.contains("hint: check the URL, DNS"), "{stderr}");
    assert!(!stderr.contains("tok-"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits_0() {
    let idp = FakeIdp::start(300).await;
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"10s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{}",
            support::basic_config(&idp, &upstream)
        ),
    );
    // On port 0: the harness reads the bound addresses from the startup line.
    let mut proxy = TokenProxyProcess::run(&path, &[]).await;
    let client = Client::new();
    let url = proxy.url("/api/slow/long-request");
    let in_flight = tokio::spawn({
        let client = client.clone();
        async move { client.get(&url).await }
    });
    upstream.wait_requests(1).await;
    proxy.signal(libc::SIGTERM);
    // New connections are refused once the listener is closed.
    let addr = proxy.addr;
    eventually("the listener closed after SIGTERM", Duration::from_secs(10), async || {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    upstream.release_slow();
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, 200, "the in-flight request completed");
    let status = proxy.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0));
}

#[test]
fn check_warns_about_an_exposed_admin_listener_and_tokens_over_plain_http() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        r#"
[admin]
listen = "0.0.0.0:9090"
[providers.orders]
token_url = "https://idp.example/token"
client_id = "orders"
client_secret = "hunter2-secret"
[[routes]]
prefix = "/orders"
upstream = "http://orders.internal"
provider = "orders"
"#,
    );
    let output = tokenproxy().args(["check", "--config"]).arg(&path).output().unwrap();
    assert_eq!(output.status.code(), Some(0), "warnings do not fail the check");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("warning: admin.listen: 0.0.0.0:9090 is not a loopback address"), "{stderr}");
    assert!(stderr.contains("warning: routes[0].upstream: tokens of provider `orders` go over plain HTTP"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "no secret in warnings: {stderr}");
}
