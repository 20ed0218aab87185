//! Unit tests of configuration loading: defaults, layering, every-error reporting, secrets and the redacted print.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Jail;

use super::*;

mod routes;

/// The smallest valid configuration: one pass-through route.
const MINIMAL: &str = r#"
[[routes]]
upstream = "http://127.0.0.1:3000"
"#;

fn load(toml: &str) -> Result<Config, ConfigError> {
    Config::from_toml_str(toml, "tokenproxy.toml")
}

/// The problems of an invalid configuration, one display line each.
fn problems(result: Result<Config, ConfigError>) -> Vec<String> {
    match result {
        Err(ConfigError::Invalid(problems)) => problems.iter().map(ToString::to_string).collect(),
        Err(other) => panic!("expected Invalid, got {other}"),
        Ok(config) => panic!("expected Invalid, got {config:#?}"),
    }
}

/// Runs `f` in a figment jail: its own working directory, environment restored afterwards, one jail at a time.
#[allow(clippy::result_large_err)] // the closure's error type is figment's, fixed by `Jail`
fn in_jail(f: impl FnOnce(&mut Jail)) {
    Jail::expect_with(|jail| {
        f(jail);
        Ok(())
    });
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A TOML string literal for `s`.
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// A temporary file holding `contents`.
fn temp_file(contents: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(contents.as_bytes()).unwrap();
    file
}

/// A provider `orders` with an inline secret, a route using it, and `extra` appended to the provider.
fn with_provider(extra: &str) -> String {
    format!(
        r#"
[providers.orders]
token_url = "https://idp.example/oauth2/token"
client_id = "orders-client"
client_secret = "s3cret-value"
{extra}

[[routes]]
prefix = "/orders"
upstream = "https://orders.internal:8443"
provider = "orders"
"#
    )
}

#[test]
fn defaults_apply_to_a_minimal_config() {
    let config = load(MINIMAL).unwrap();
    let server = &config.server;
    assert_eq!(server.listen, addr("127.0.0.1:8080"));
    assert!(server.tls.is_none());
    assert_eq!(server.request_timeout, Duration::from_secs(30));
    assert_eq!(server.header_read_timeout, Duration::from_secs(10));
    assert_eq!(server.max_connections, 10_000);
    assert_eq!(server.replay_buffer, 64 * 1024);
    assert_eq!(server.shutdown_grace, Duration::from_secs(20));
    assert_eq!(server.worker_threads, None);
    assert_eq!(config.admin.listen, addr("127.0.0.1:9090"));
    assert_eq!(config.log.format, LogFormat::Pretty);
    assert_eq!(config.log.level, "info");
    assert_eq!(config.state.dir, PathBuf::from("./tokenproxy-state"));
    assert!(config.providers.is_empty());

    let [route] = config.routes.as_slice() else { panic!("one route expected: {:?}", config.routes) };
    assert_eq!(route.name, "/");
    assert_eq!(route.host, None);
    assert_eq!(route.prefix, "/");
    assert_eq!(route.upstream.as_str(), "http://127.0.0.1:3000/");
    assert!(!route.strip_prefix);
    assert_eq!(route.provider, None);
    assert_eq!(route.inject, Inject::Header);
    assert_eq!(route.header_name, http::header::AUTHORIZATION);
    assert_eq!(route.scheme, "Bearer");
    assert_eq!(route.query_param, "access_token");
    assert!(route.retry_on_401);
    assert_eq!(route.retry_on_status, [401]);
    assert_eq!(route.incoming_authorization, IncomingAuthorization::Replace);
}

#[test]
fn provider_defaults() {
    let config = load(&with_provider("")).unwrap();
    let orders = &config.providers["orders"];
    assert_eq!(orders.name, "orders");
    assert_eq!(orders.grant, Grant::ClientCredentials);
    assert_eq!(orders.client_auth, ClientAuth::ClientSecretBasic);
    assert_eq!(orders.refresh_at, 0.75);
    assert_eq!(orders.expiry_skew, Duration::from_secs(30));
    assert_eq!(orders.default_lifetime, Duration::from_secs(300));
    assert_eq!(orders.timeout, Duration::from_secs(10));
    assert_eq!(orders.scope, None);
    assert!(orders.extra_params.is_empty());
    assert_eq!(orders.client_secret, Some(SecretSource::Inline(Secret::new("s3cret-value"))));
    assert_eq!(orders.during_refresh, DuringRefresh::UseCurrent, "issuing a client-credentials token revokes nothing");
}

#[test]
fn during_refresh_waits_by_default_for_grants_that_rotate_refresh_tokens() {
    let seeded = with_provider("grant = \"refresh_token\"\nrefresh_token = \"rt-seed\"");
    assert_eq!(load(&seeded).unwrap().providers["orders"].during_refresh, DuringRefresh::Wait);
    let password = with_provider("grant = \"password\"\nusername = \"svc\"\npassword = \"pw\"");
    assert_eq!(load(&password).unwrap().providers["orders"].during_refresh, DuringRefresh::Wait);
    let chosen =
        with_provider("grant = \"refresh_token\"\nrefresh_token = \"rt-seed\"\nduring_refresh = \"use_current\"");
    assert_eq!(load(&chosen).unwrap().providers["orders"].during_refresh, DuringRefresh::UseCurrent);
    assert_eq!(
        problems(load(&with_provider("during_refresh = \"block\""))),
        ["providers.orders.during_refresh: unknown value `block` (expected one of: wait, use_current) (from tokenproxy.toml)"]
    );
}

#[test]
fn retry_on_status_takes_4xx_statuses_on_routes_with_a_token() {
    let route =
        |line: &str| with_provider("").replace("provider = \"orders\"", &format!("provider = \"orders\"\n{line}"));
    let config = load(&route("retry_on_status = [401, 403]")).unwrap();
    assert_eq!(config.routes[0].retry_on_status, [401, 403]);
    for (line, problem) in [
        ("retry_on_status = [401, 500]", "each status must be a 4xx code (the token was refused), e.g. 401 or 403"),
        (
            "retry_on_status = [\"forbidden\"]",
            "each status must be a 4xx code (the token was refused), e.g. 401 or 403",
        ),
        ("retry_on_status = []", "an empty list replays nothing: set retry_on_401 = false instead"),
        ("retry_on_status = 403", "expected a list of statuses such as [401, 403], found a number"),
    ] {
        assert_eq!(
            problems(load(&route(line))),
            [format!("routes[0].retry_on_status: {problem} (from tokenproxy.toml)")],
            "{line}"
        );
    }
    let plain = "[[routes]]\nprefix = \"/\"\nupstream = \"http://127.0.0.1:3000\"\nretry_on_status = [403]\n";
    assert_eq!(
        problems(load(plain)),
        ["routes[0].retry_on_status: only used with `provider`; this route has none (a plain pass-through) (from tokenproxy.toml)"]
    );
}

#[test]
fn the_example_config_loads() {
    in_jail(|jail| {
        jail.set_env("ORDERS_CLIENT_SECRET", "from-the-environment");
        let config = Config::from_toml_str(include_str!("../../config.example.toml"), "config.example.toml").unwrap();
        let orders = &config.providers["orders"];
        assert_eq!(orders.token_url.as_ref().unwrap().as_str(), "https://idp.example/oauth2/token");
        assert_eq!(orders.client_id, "orders-client");
        assert_eq!(orders.client_secret, Some(SecretSource::Env("ORDERS_CLIENT_SECRET".into())));
        assert_eq!(orders.scope.as_deref(), Some("orders.read orders.write"));
        let [route] = config.routes.as_slice() else { panic!("one route expected") };
        assert_eq!(route.name, "orders");
        assert_eq!(route.prefix, "/orders");
        assert!(route.strip_prefix);
        assert_eq!(route.provider.as_deref(), Some("orders"));
        assert_eq!(route.header_name, http::header::AUTHORIZATION);
        // Every value the example spells out is the default.
        let defaults = load(MINIMAL).unwrap();
        assert_eq!(config.server.listen, defaults.server.listen);
        assert_eq!(config.server.replay_buffer, defaults.server.replay_buffer);
        assert_eq!(config.server.shutdown_grace, defaults.server.shutdown_grace);
        assert_eq!(config.admin.listen, defaults.admin.listen);
        assert_eq!(config.state.dir, defaults.state.dir);
    });
}

#[test]
fn the_example_config_names_a_missing_secret_variable() {
    in_jail(|_| {
        let lines = problems(Config::from_toml_str(include_str!("../../config.example.toml"), "config.example.toml"));
        assert_eq!(
            lines,
            [
                "providers.orders.client_secret_env: environment variable `ORDERS_CLIENT_SECRET` is not set (from config.example.toml)"
            ]
        );
    });
}

#[test]
fn the_spec_example_error() {
    let toml = with_provider("").replace("https://idp.example/oauth2/token", "/oauth2/token");
    assert_eq!(
        problems(load(&toml)),
        ["providers.orders.token_url: relative URL without a base (from tokenproxy.toml)"]
    );
}

#[test]
fn the_environment_overrides_the_file() {
    in_jail(|jail| {
        jail.create_file(
            "tokenproxy.toml",
            r#"
            [server]
            listen = "127.0.0.1:8080"
            max_connections = 100

            [providers.orders]
            token_url = "https://idp.example/oauth2/token"
            client_id = "from-file"
            client_secret_file = "/nonexistent/secret"

            [[routes]]
            prefix = "/orders"
            upstream = "https://orders.internal"
            provider = "orders"
            "#,
        )
        .unwrap();
        jail.set_env("TOKENPROXY_SERVER__LISTEN", "0.0.0.0:8081");
        jail.set_env("TOKENPROXY_SERVER__MAX_CONNECTIONS", "5");
        jail.set_env("TOKENPROXY_LOG__FORMAT", "json");
        // A string key keeps the variable's exact text, leading zeros and all.
        jail.set_env("TOKENPROXY_PROVIDERS__ORDERS__CLIENT_ID", "007");
        // The environment's inline secret replaces the file's `client_secret_file`.
        jail.set_env("TOKENPROXY_PROVIDERS__ORDERS__CLIENT_SECRET", "s3cret");
        jail.set_env("TOKENPROXY_PROVIDERS__ORDERS__EXTRA_PARAMS", "{tenant = \"acme\"}");
        jail.set_env("TOKENPROXY_PROVIDERS__ORDERS__REFRESH_AT", "0.5");
        // Names the file for the CLI; not a key.
        jail.set_env("TOKENPROXY_CONFIG", "elsewhere.toml");

        let config = Config::load(Path::new("tokenproxy.toml")).unwrap();
        assert_eq!(config.server.listen, addr("0.0.0.0:8081"));
        assert_eq!(config.server.max_connections, 5);
        assert_eq!(config.log.format, LogFormat::Json);
        let orders = &config.providers["orders"];
        assert_eq!(orders.client_id, "007");
        assert_eq!(orders.client_secret, Some(SecretSource::Inline(Secret::new("s3cret"))));
        assert_eq!(orders.extra_params.get("tenant").map(String::as_str), Some("acme"));
        assert_eq!(orders.refresh_at, 0.5);
    });
}

#[test]
fn errors_name_the_environment_variable() {
    in_jail(|jail| {
        jail.create_file("tokenproxy.toml", &with_provider("")).unwrap();
        jail.set_env("TOKENPROXY_SERVER__LISTEN", "localhost:8080");
        jail.set_env("TOKENPROXY_SERVER__REQUEST_TIMEOUT", "30");
        jail.set_env("TOKENPROXY_PROVIDERS__ORDERS__CLIENT_SECRET", "");
        jail.set_env("TOKENPROXY_PROVIDERS__ORDERS__TOKEN_ULR", "https://idp.example/token");
        let lines = problems(Config::load(Path::new("tokenproxy.toml")));
        assert_eq!(
            lines,
            [
                "server.listen: invalid address `localhost:8080`; expected an IP address and port such as \"127.0.0.1:8080\" or \"[::]:8080\" (host names are not resolved here) (from TOKENPROXY_SERVER__LISTEN)",
                "server.request_timeout: invalid duration `30` (time unit needed, for example 30sec or 30ms); durations are strings such as \"250ms\", \"30s\" or \"5m\" (from TOKENPROXY_SERVER__REQUEST_TIMEOUT)",
                "providers.orders.client_secret: the secret is empty (from TOKENPROXY_PROVIDERS__ORDERS__CLIENT_SECRET)",
                "providers.orders.token_ulr: unknown key; did you mean `token_url`? (from TOKENPROXY_PROVIDERS__ORDERS__TOKEN_ULR)",
            ]
        );
    });
}

#[test]
fn a_missing_key_is_blamed_on_the_layer_that_has_its_table() {
    in_jail(|jail| {
        let toml = with_provider("").replace("client_id = \"orders-client\"\n", "");
        jail.create_file("tokenproxy.toml", &toml).unwrap();
        // Merged into the file's table: the missing key is still the file's.
        jail.set_env("TOKENPROXY_PROVIDERS__ORDERS__SCOPE", "orders.read");
        // A provider made by the environment alone: its missing keys are blamed on the variable that made it.
        jail.set_env("TOKENPROXY_PROVIDERS__BILLING__CLIENT_ID", "billing");
        let lines = problems(Config::load(Path::new("tokenproxy.toml")));
        assert_eq!(
            lines,
            [
                "providers.billing.token_url: missing; set the IdP's token endpoint (token_url = \"https://idp.example/oauth2/token\") or its issuer for discovery (issuer = \"https://idp.example\") (from TOKENPROXY_PROVIDERS__BILLING__CLIENT_ID)",
                "providers.billing.client_secret: missing; client_auth = \"client_secret_basic\" needs `client_secret`, `client_secret_file` or `client_secret_env` (from TOKENPROXY_PROVIDERS__BILLING__CLIENT_ID)",
                "providers.orders.client_id: missing; set the OAuth2 client identifier (from tokenproxy.toml)",
            ]
        );
    });
}

#[test]
fn every_problem_is_reported_at_once() {
    let toml = r#"
        [server]
        request_timeout = 30
        max_connections = 0
        replay_buffer = "lots"

        [log]
        format = "jsno"

        [providers.orders]
        token_url = "ftp://idp.example/token"
        grant = "token_exchange"
        client_id = 1234
        refresh_at = 1.5

        [providers.billing]
        issuer = "https://idp.example"
        grant = "password"
        client_id = "billing"
        client_auth = "none"

        [[routes]]
        prefix = "orders"
        upstream = "https://orders.internal?x=1"
        provider = "orders"

        [[routes]]
        host = "Billing.Internal:8443"
        upstream = "https://billing.internal"
        provider = "ordrs"
    "#;
    assert_eq!(
        problems(load(toml)),
        [
            "server.request_timeout: a bare number has no unit; durations are strings such as \"250ms\", \"30s\" or \"5m\" (from tokenproxy.toml)",
            "server.max_connections: must be at least 1 (from tokenproxy.toml)",
            "server.replay_buffer: expected a size, found `lots`; sizes are byte counts or strings such as \"64KiB\" or \"1MiB\" (from tokenproxy.toml)",
            "log.format: unknown value `jsno` (expected one of: pretty, json); did you mean `json`? (from tokenproxy.toml)",
            "providers.billing.username: missing; grant = \"password\" needs the resource owner's username (from tokenproxy.toml)",
            "providers.billing.password: missing; grant = \"password\" needs `password`, `password_file` or `password_env` (from tokenproxy.toml)",
            "providers.orders.token_url: must be an http:// or https:// URL (found scheme `ftp`) (from tokenproxy.toml)",
            "providers.orders.client_id: expected a string, found a number; quote it (from tokenproxy.toml)",
            "providers.orders.client_secret: missing; client_auth = \"client_secret_basic\" needs `client_secret`, `client_secret_file` or `client_secret_env` (from tokenproxy.toml)",
            "providers.orders.refresh_at: must be greater than 0 and at most 1 (a fraction of the token's lifetime), found 1.5 (from tokenproxy.toml)",
            "routes[0].prefix: must start with `/`, e.g. \"/orders\" (from tokenproxy.toml)",
            "routes[0].upstream: must not have a ?query; each request's own query is forwarded (from tokenproxy.toml)",
            "routes[1].host: give the host without a port (`billing.internal`); the port is ignored when matching (from tokenproxy.toml)",
            "routes[1].provider: no provider named `ordrs` (defined: billing, orders) (from tokenproxy.toml)",
        ]
    );
}

#[test]
fn unknown_keys_are_errors_with_suggestions() {
    let toml = r#"
        [server]
        listn = "127.0.0.1:8080"

        [provider.orders]
        token_url = "https://idp.example/token"

        [[routes]]
        upstream = "http://127.0.0.1:3000"
        strip_prefx = true
        colour = "blue"
    "#;
    assert_eq!(
        problems(load(toml)),
        [
            "server.listn: unknown key; did you mean `listen`? (from tokenproxy.toml)",
            "routes[0].colour: unknown key (known here: name, host, prefix, upstream, strip_prefix, intercept, provider, inject, header_name, scheme, query_param, retry_on_401, incoming_authorization, encoded_slashes, path_parameters, ca_file, server_name, client_cert_file, client_key_file, upstream_client_cert, scope, audience, resource, retry_on_status, upstream_protocol, grpc_unauthenticated_refresh, max_upstream_connections, extra_params) (from tokenproxy.toml)",
            "routes[0].strip_prefx: unknown key; did you mean `strip_prefix`? (from tokenproxy.toml)",
            "provider: unknown key; did you mean `providers`? (from tokenproxy.toml)",
        ]
    );
}

#[test]
fn a_secret_file_is_read_and_trimmed() {
    let file = temp_file("  s3cret-from-file\n\n");
    let source = SecretSource::File(file.path().to_owned());
    assert_eq!(source.read().unwrap().expose(), "s3cret-from-file");

    let toml = with_provider("").replace(
        "client_secret = \"s3cret-value\"",
        &format!("client_secret_file = {}", quoted(&file.path().display().to_string())),
    );
    let config = load(&toml).unwrap();
    assert_eq!(config.providers["orders"].client_secret, Some(SecretSource::File(file.path().to_owned())));
}

#[test]
fn unreadable_or_empty_secrets_are_errors_that_name_the_file_or_variable() {
    let empty = temp_file(" \n");
    let empty_path = empty.path().display().to_string();
    let toml = with_provider("")
        .replace("client_secret = \"s3cret-value\"", &format!("client_secret_file = {}", quoted(&empty_path)));
    assert_eq!(
        problems(load(&toml)),
        [format!("providers.orders.client_secret_file: secret file {empty_path} is empty (from tokenproxy.toml)")]
    );

    let toml = with_provider("")
        .replace("client_secret = \"s3cret-value\"", "client_secret_file = \"/nonexistent/tokenproxy/secret\"");
    let lines = problems(load(&toml));
    assert_eq!(lines.len(), 1);
    assert!(
        lines[0].starts_with(
            "providers.orders.client_secret_file: cannot read secret file /nonexistent/tokenproxy/secret: "
        ),
        "{lines:?}"
    );

    let toml = with_provider("").replace("\"s3cret-value\"", "\"\"");
    assert_eq!(problems(load(&toml)), ["providers.orders.client_secret: the secret is empty (from tokenproxy.toml)"]);

    let missing = SecretSource::Env("TOKENPROXY_TEST_SURELY_UNSET_VARIABLE".into());
    assert_eq!(
        missing.read().unwrap_err().to_string(),
        "environment variable `TOKENPROXY_TEST_SURELY_UNSET_VARIABLE` is not set"
    );
}

#[test]
fn two_forms_of_one_secret_are_an_error() {
    let toml = with_provider("client_secret_env = \"ORDERS_SECRET\"");
    assert_eq!(
        problems(load(&toml)),
        ["providers.orders.client_secret_env: `client_secret` and `client_secret_env` are all set; set only one (from tokenproxy.toml)"]
    );
}

#[test]
fn secrets_never_print() {
    let secret = Secret::new("hunter2");
    assert_eq!(format!("{secret}"), "[redacted]");
    assert_eq!(format!("{secret:?}"), "Secret([redacted])");
    let source = SecretSource::Inline(secret.clone());
    assert!(!format!("{source:?}").contains("hunter2"));
    assert_eq!(serde_json::to_string(&secret).unwrap(), "\"[redacted]\"");
    assert_eq!(secret.expose(), "hunter2");

    let config = load(&with_provider("")).unwrap();
    assert!(!format!("{config:?}").contains("s3cret-value"));
}

#[test]
fn a_toml_syntax_error_does_not_echo_the_line() {
    let toml = "[providers.orders]\nclient_secret = \"hunter2\n";
    let lines = problems(load(toml));
    assert_eq!(lines.len(), 1);
    assert!(lines[0].starts_with("invalid TOML at line 2, column "), "{lines:?}");
    assert!(lines[0].ends_with("(from tokenproxy.toml)"), "{lines:?}");
    assert!(!lines[0].contains("hunter2"), "{lines:?}");
    assert!(!lines[0].contains('\n'), "{lines:?}");
}

#[test]
fn the_redacted_toml_hides_secrets_and_loads_back() {
    let secret_file = temp_file("file-secret\n");
    let toml = format!(
        r#"
        [server]
        replay_buffer = "1MiB"
        request_timeout = "1m 30s"
        worker_threads = 2

        [providers.orders]
        token_url = "https://idp.example/oauth2/token"
        client_id = "orders-client"
        client_secret = "s3cret-value"
        scope = "orders.read"
        extra_params = {{ tenant = "acme" }}

        [providers.billing]
        token_url = "https://idp.example/oauth2/token"
        client_id = "billing-client"
        client_secret_file = {}

        [[routes]]
        prefix = "/orders"
        upstream = "https://orders.internal:8443"
        provider = "orders"
        inject = "query"

        [[routes]]
        host = "billing.internal"
        upstream = "https://billing.internal"
        provider = "billing"

        [[routes]]
        prefix = "/public"
        upstream = "http://127.0.0.1:3000"
        "#,
        quoted(&secret_file.path().display().to_string())
    );
    let config = load(&toml).unwrap();
    let printed = config.to_redacted_toml();
    assert!(!printed.contains("s3cret-value"), "{printed}");
    assert!(!printed.contains("file-secret"), "{printed}");
    assert!(printed.contains("client_secret = \"[redacted]\""), "{printed}");
    assert!(printed.contains("replay_buffer = \"1MiB\""), "{printed}");
    assert!(printed.contains("request_timeout = \"1m 30s\""), "{printed}");
    assert!(printed.contains("expiry_skew = \"30s\""), "{printed}");
    printed.parse::<toml::Table>().unwrap();

    // It loads back into the same configuration, the inline secret aside.
    let reloaded = load(&printed).unwrap_or_else(|e| panic!("{e}\n{printed}"));
    assert_eq!(reloaded.to_redacted_toml(), printed);
    assert_eq!(reloaded.providers["orders"].client_secret, Some(SecretSource::Inline(Secret::new("[redacted]"))));
    assert_eq!(reloaded.server.replay_buffer, 1024 * 1024);
    assert_eq!(reloaded.server.request_timeout, Duration::from_secs(90));
    assert_eq!(reloaded.routes[1].name, "billing.internal/");
}

#[test]
fn load_reports_an_unreadable_file() {
    match Config::load(Path::new("/nonexistent/tokenproxy.toml")) {
        Err(ConfigError::Unreadable { path, .. }) => {
            assert_eq!(path, PathBuf::from("/nonexistent/tokenproxy.toml"))
        }
        other => panic!("expected Unreadable, got {other:?}"),
    }
}

#[test]
fn sizes_and_durations() {
    let toml =
        format!("[server]\nreplay_buffer = 4096\nshutdown_grace = \"0s\"\nheader_read_timeout = \"250ms\"\n{MINIMAL}");
    let config = load(&toml).unwrap();
    assert_eq!(config.server.replay_buffer, 4096);
    assert_eq!(config.server.shutdown_grace, Duration::ZERO);
    assert_eq!(config.server.header_read_timeout, Duration::from_millis(250));

    let toml = format!("[server]\nreplay_buffer = \"64KB\"\nrequest_timeout = \"0s\"\n{MINIMAL}");
    assert_eq!(problems(load(&toml)), ["server.request_timeout: must be greater than zero (from tokenproxy.toml)"]);
}

#[test]
fn unsupported_features_and_missing_store_settings_are_refused_not_ignored() {
    let toml = with_provider("grant = \"token_exchange\"\nrefresh_token = \"rt\"\nclient_cert_file = \"/etc/hosts\"")
        + "\n[state]\nstore = \"redis\"\n";
    assert_eq!(
        problems(load(&toml)),
        [
            "state.redis_url: missing; store = \"redis\" needs the server, e.g. redis_url = \"rediss://redis.internal:6380\" (or redis_sentinels and redis_sentinel_master for Redis Sentinel) (from tokenproxy.toml)",
            "state.encryption_key_file: missing; store = \"redis\" needs the keys that encrypt tokens at rest: a file of base64 32-byte keys, one per line (make one with `head -c 32 /dev/urandom | base64`) (from tokenproxy.toml)",
            "providers.orders.refresh_token: only used with grant = \"refresh_token\"; remove it (from tokenproxy.toml)",
            "providers.orders.client_key_file: missing; `client_cert_file` needs its private key (from tokenproxy.toml)",
        ]
    );
}

/// A provider `orders` authenticating with `client_auth` and `extra` (no secret), and a route using it.
fn with_assertion_provider(client_auth: &str, extra: &str) -> String {
    with_provider(&format!("client_auth = \"{client_auth}\"\n{extra}"))
        .replace("client_secret = \"s3cret-value\"\n", "")
}

#[test]
fn private_key_jwt_needs_a_usable_key_and_its_keys_belong_to_it() {
    use p256::pkcs8::EncodePrivateKey as _;
    let ec = p256::SecretKey::from_slice(&[7; 32]).unwrap().to_pkcs8_pem(Default::default()).unwrap();
    let key = temp_file(&ec);
    let key_line = format!("private_key_file = {}", quoted(&key.path().to_string_lossy()));
    let config = load(&with_assertion_provider(
        "private_key_jwt",
        &format!("{key_line}\nassertion_audience = \"https://idp.example\""),
    ))
    .unwrap();
    let orders = &config.providers["orders"];
    assert_eq!((orders.client_auth, orders.private_key_file.as_deref()), (ClientAuth::PrivateKeyJwt, Some(key.path())));
    assert_eq!(orders.assertion_audience.as_deref(), Some("https://idp.example"));
    let printed = toml::to_string(&config).unwrap();
    assert!(printed.contains("private_key_file = ") && !printed.contains("BEGIN"), "{printed}");
    // A key others may read is worth a warning (a temp file is 0600).
    assert!(!config.warnings().iter().any(|w| w.contains("private_key_file")), "{:?}", config.warnings());
    std::fs::set_permissions(key.path(), std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let config = load(&with_assertion_provider("private_key_jwt", &key_line)).unwrap();
    let warning = config.warnings().into_iter().find(|w| w.contains("private_key_file")).expect("a warning");
    assert!(warning.contains("readable by every user of this machine (mode 0644)"), "{warning}");

    let cert = temp_file("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n");
    let cert_line = format!("private_key_file = {}", quoted(&cert.path().to_string_lossy()));
    let problems_of = |client_auth: &str, extra: &str| problems(load(&with_assertion_provider(client_auth, extra)));
    assert_eq!(
        problems_of("private_key_jwt", ""),
        ["providers.orders.private_key_file: missing; client_auth = \"private_key_jwt\" needs the PEM private key that signs its assertions (from tokenproxy.toml)"]
    );
    assert_eq!(
        problems_of("private_key_jwt", &cert_line),
        [format!("providers.orders.private_key_file: {}: holds a `CERTIFICATE` PEM block, not a private key (from tokenproxy.toml)", cert.path().display())]
    );
    assert_eq!(
        problems_of("private_key_jwt", &format!("{key_line}\nassertion_algorithm = \"RS256\"")),
        [format!(
            "providers.orders.assertion_algorithm: {}: an EC P-256 key cannot sign RS256 (from tokenproxy.toml)",
            key.path().display()
        )]
    );
    assert_eq!(
        problems_of("client_secret_post", &format!("client_secret = \"s\"\n{key_line}\nassertion_key_id = \"k1\"")),
        [
            "providers.orders.private_key_file: only used with client_auth = \"private_key_jwt\" or grant = \"jwt_bearer\"; remove it (from tokenproxy.toml)",
            "providers.orders.assertion_key_id: only used with client_auth = \"private_key_jwt\" or grant = \"jwt_bearer\"; remove it (from tokenproxy.toml)",
        ]
    );
    // assertion_key_id: a name, false (no kid header), true (the default, the thumbprint); nothing else.
    for (value, expected) in [
        ("\"k1\"", AssertionKeyId::Named("k1".into())),
        ("false", AssertionKeyId::Omitted),
        ("true", AssertionKeyId::Thumbprint),
    ] {
        let config =
            load(&with_assertion_provider("private_key_jwt", &format!("{key_line}\nassertion_key_id = {value}")));
        assert_eq!(config.unwrap().providers["orders"].assertion_key_id, expected, "{value}");
    }
    assert_eq!(
        load(&with_assertion_provider("private_key_jwt", &key_line)).unwrap().providers["orders"].assertion_key_id,
        AssertionKeyId::Thumbprint
    );
    assert_eq!(
        problems_of("private_key_jwt", &format!("{key_line}\nassertion_key_id = 3")),
        ["providers.orders.assertion_key_id: expected a string, found a number; quote it (the kid), or false to send no kid header (from tokenproxy.toml)"]
    );
    assert_eq!(
        problems_of("private_key_jwt", &format!("{key_line}\nclient_secret = \"s\"")),
        ["providers.orders.client_secret: not used with client_auth = \"private_key_jwt\"; remove it (from tokenproxy.toml)"]
    );
}

#[test]
fn client_assertion_needs_its_file_and_offline_only_warns_when_it_is_not_there_yet() {
    let token = temp_file("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln");
    let line = format!("client_assertion_file = {}", quoted(&token.path().to_string_lossy()));
    let config = load(&with_assertion_provider("client_assertion", &line)).unwrap();
    assert_eq!(config.providers["orders"].client_auth, ClientAuth::ClientAssertion);
    assert_eq!(
        problems(load(&with_assertion_provider("client_assertion", ""))),
        ["providers.orders.client_assertion_file: missing; client_auth = \"client_assertion\" needs the file the platform writes the JWT to (e.g. a projected service-account token) (from tokenproxy.toml)"]
    );
    // The kubelet writes the projected token when the pod starts: a pipeline linting the config has none.
    let absent = "client_assertion_file = \"/var/run/secrets/tokens/azure-identity-token\"";
    let key_absent = "private_key_file = \"/etc/tokenproxy/keys/orders.pem\"";
    assert!(load(&with_assertion_provider("client_assertion", absent)).is_err());
    assert!(load(&with_assertion_provider("private_key_jwt", key_absent)).is_err());
    // In a jail: loading reads the environment, which other tests' jails set.
    in_jail(|_| {
        for (auth, line) in [("client_assertion", absent), ("private_key_jwt", key_absent)] {
            let file = temp_file(&with_assertion_provider(auth, line));
            let config = Config::load_offline(file.path()).unwrap();
            assert!(config.warnings().iter().any(|w| w.contains("providers.orders.")), "{:?}", config.warnings());
        }
    });
}

#[test]
fn names_and_listeners_are_checked() {
    let toml = r#"
        [admin]
        listen = "127.0.0.1:8080"

        [providers."my idp"]
        token_url = "https://idp.example/token"
        client_id = "x"
        client_auth = "none"
        extra_params = { grant_type = "password", scope = "a" }

        [[routes]]
        name = "with space"
        upstream = "http://127.0.0.1:3000"
    "#;
    assert_eq!(
        problems(load(toml)),
        [
            "admin.listen: the admin listener needs an address of its own; it equals server.listen (from tokenproxy.toml)",
            "providers.my idp: invalid provider name; names may only contain letters, digits, `_`, `.` and `-` (from tokenproxy.toml)",
            "providers.my idp.extra_params.grant_type: `grant_type` is sent by tokenproxy itself (from tokenproxy.toml)",
            "providers.my idp.extra_params.scope: `scope` is sent by tokenproxy itself; set the provider's `scope` instead (from tokenproxy.toml)",
            "routes[0].name: invalid route name `with space`; names may only contain letters, digits, `_`, `.` and `-` (from tokenproxy.toml)",
        ]
    );
}

#[test]
fn problem_display_and_error_display() {
    let error = ConfigError::Invalid(vec![
        Problem { key: "a.b".into(), message: "bad".into(), source: "x.toml".into() },
        Problem { key: "c".into(), message: "worse".into(), source: "TOKENPROXY_C".into() },
    ]);
    assert_eq!(error.to_string(), "a.b: bad (from x.toml)\nc: worse (from TOKENPROXY_C)");
}

#[test]
fn suggestions_are_close_matches_only() {
    let known = ["listen", "request_timeout", "max_connections"];
    assert_eq!(reader::suggest("listn", known), Some("listen"));
    assert_eq!(reader::suggest("LISTEN", known), Some("listen"));
    assert_eq!(reader::suggest("request_timoeut", known), Some("request_timeout"));
    assert_eq!(reader::suggest("colour", known), None);
}

#[test]
fn route_tls_keys_need_an_https_upstream_a_valid_name_and_a_whole_key_pair() {
    let (cert, key) = (temp_file("cert"), temp_file("key"));
    let route = |upstream: &str, keys: &str| format!("[[routes]]\nprefix = \"/\"\nupstream = \"{upstream}\"\n{keys}");
    let pair = format!(
        "server_name = \"orders.internal\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"",
        cert.path().display(),
        key.path().display()
    );
    let config = load(&route("https://10.0.0.7:8443", &pair)).unwrap();
    let tls = &config.routes[0].tls;
    assert_eq!(tls.server_name.as_deref(), Some("orders.internal"));
    assert_eq!(tls.client_cert, Some((cert.path().to_owned(), key.path().to_owned())));
    assert!(tls.is_custom());
    assert!(!load(&route("https://a", "")).unwrap().routes[0].tls.is_custom());
    assert!(load(&route("https://a", "server_name = \"10.0.0.7\"")).is_ok(), "an IP address is a name TLS verifies");

    assert_eq!(
        problems(load(&route("http://a", &pair))),
        [
            "routes[0].server_name: only used with an https upstream; this route's upstream is plain http (from tokenproxy.toml)",
            "routes[0].client_cert_file: only used with an https upstream; this route's upstream is plain http (from tokenproxy.toml)",
            "routes[0].client_key_file: only used with an https upstream; this route's upstream is plain http (from tokenproxy.toml)",
        ]
    );
    let lone_cert = format!("client_cert_file = \"{}\"", cert.path().display());
    assert_eq!(
        problems(load(&route("https://a", &lone_cert))),
        ["routes[0].client_key_file: missing; `client_cert_file` needs its private key (from tokenproxy.toml)"]
    );
    assert_eq!(
        problems(load(&route("https://a", "server_name = \"not a name\""))),
        ["routes[0].server_name: `not a name` is neither a DNS name nor an IP address (from tokenproxy.toml)"]
    );
}

#[test]
fn upstream_client_cert_provider_presents_the_providers_pair_and_never_beside_the_routes_own() {
    let (cert, key) = (temp_file("cert"), temp_file("key"));
    let (cert, key) = (quoted(&cert.path().display().to_string()), quoted(&key.path().display().to_string()));
    let config = |provider_keys: &str, route_keys: &str, upstream: &str| {
        format!(
            "[providers.mtls]\ntoken_url = \"https://idp.example/token\"\nclient_id = \"c\"\n{provider_keys}\n\
             [[routes]]\nprefix = \"/\"\nupstream = \"{upstream}\"\nprovider = \"mtls\"\n{route_keys}\n"
        )
    };
    let provider_pair =
        format!("client_auth = \"tls_client_auth\"\nclient_cert_file = {cert}\nclient_key_file = {key}");
    let bound = "upstream_client_cert = \"provider\"";
    let loaded = load(&config(&provider_pair, bound, "https://api.internal")).unwrap();
    let pair = loaded.providers["mtls"].client_cert_file.clone().zip(loaded.providers["mtls"].client_key_file.clone());
    assert!(pair.is_some());
    assert_eq!(loaded.routes[0].tls.client_cert, pair, "the route presents the provider's files");

    let own_pair = format!("client_cert_file = {cert}\nclient_key_file = {key}\n{bound}");
    assert_eq!(
        problems(load(&config(&provider_pair, &own_pair, "https://api.internal"))),
        ["routes[0].upstream_client_cert: a route presents either its own client certificate (client_cert_file, \
          client_key_file) or its provider's (upstream_client_cert = \"provider\"), not both; remove one (from tokenproxy.toml)"]
    );
    let secret = "client_secret = \"s\"";
    assert_eq!(
        problems(load(&config(secret, bound, "https://api.internal"))),
        ["routes[0].upstream_client_cert: provider `mtls` has no client certificate to present; set its \
          client_cert_file and client_key_file (with client_auth = \"tls_client_auth\" or \
          \"self_signed_tls_client_auth\" the IdP binds tokens to it) (from tokenproxy.toml)"]
    );
    assert_eq!(
        problems(load(&config(&provider_pair, bound, "http://api.internal"))),
        ["routes[0].upstream_client_cert: only used with an https upstream; this route's upstream is plain http \
          (from tokenproxy.toml)"]
    );
    assert_eq!(
        problems(load(&config(&provider_pair, "upstream_client_cert = \"route\"", "https://api.internal"))),
        ["routes[0].upstream_client_cert: unknown value `route` (expected one of: provider) (from tokenproxy.toml)"]
    );
}

#[test]
fn route_profiles_get_a_slot_each_shared_by_equal_profiles_and_print_as_route_keys() {
    let toml = r#"
[providers.api]
token_url = "https://idp.example/token"
client_id = "c"
client_secret = "s"
scope = "base"
extra_params = { tenant = "acme", region = "eu" }

[[routes]]
name = "plain"
prefix = "/plain"
upstream = "https://a.internal"
provider = "api"

[[routes]]
name = "reports"
prefix = "/reports"
upstream = "https://r.internal"
provider = "api"
audience = "https://reports.internal"
extra_params = { region = "us" }

[[routes]]
name = "reports-v2"
prefix = "/v2/reports"
upstream = "https://r.internal"
provider = "api"
audience = "https://reports.internal"
extra_params = { region = "us" }

[[routes]]
name = "same"
prefix = "/same"
upstream = "https://a.internal"
provider = "api"
scope = "base"
"#;
    let config = load(toml).unwrap();
    let slots: Vec<&str> = config.routes.iter().map(|r| r.provider.as_deref().unwrap()).collect();
    assert_eq!(
        slots,
        ["api", "api[reports]", "api[reports]", "api"],
        "equal profiles share; a no-op one is the provider"
    );
    assert_eq!(config.providers.keys().collect::<Vec<_>>(), ["api", "api[reports]"]);
    let derived = &config.providers["api[reports]"];
    assert_eq!((derived.name.as_str(), derived.profile_of.as_deref()), ("api[reports]", Some("api")));
    assert_eq!(derived.audience.as_deref(), Some("https://reports.internal"));
    assert_eq!(derived.scope.as_deref(), Some("base"), "what the route does not set is the provider's");
    let params: Vec<(&str, &str)> = derived.extra_params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(params, [("region", "us"), ("tenant", "acme")], "the route's parameters over the provider's");
    assert_eq!(derived.client_secret, config.providers["api"].client_secret, "one client");

    // Printed, the profile is route keys again and loads back to the same slots.
    let printed = toml::to_string(&config).unwrap();
    assert!(!printed.contains("api[reports]"), "{printed}");
    let again = load(&printed).unwrap();
    assert_eq!(again.providers.keys().collect::<Vec<_>>(), ["api", "api[reports]"]);
    let mut reloaded = again.providers["api[reports]"].clone();
    reloaded.client_secret.clone_from(&derived.client_secret); // printed as [redacted]
    assert_eq!(reloaded, *derived);
}

#[test]
fn route_profiles_are_refused_where_they_cannot_work() {
    let route = |provider_keys: &str, route_keys: &str| {
        format!(
            "[providers.p]\ntoken_url = \"https://idp.example/token\"\nclient_id = \"c\"\n{provider_keys}\n\
             [[routes]]\nprefix = \"/\"\nupstream = \"https://a.internal\"\nprovider = \"p\"\n{route_keys}\n"
        )
    };
    assert_eq!(
        problems(load(&route(
            "grant = \"refresh_token\"\nrefresh_token = \"r\"\nclient_secret = \"s\"",
            "audience = \"x\""
        ))),
        ["routes[0].audience: a route profile gets tokens of its own from its provider, and provider `p` holds one \
          refresh-token session (grant = \"refresh_token\") that each profile would rotate from under the others; \
          define a provider per session instead (from tokenproxy.toml)"]
    );
    assert_eq!(
        problems(load(&route("client_secret = \"s\"", "extra_params = { scope = \"a\" }"))),
        ["routes[0].extra_params.scope: `scope` is sent by tokenproxy itself; set the route's `scope` instead (from tokenproxy.toml)"]
    );
    let plain = "[[routes]]\nprefix = \"/\"\nupstream = \"https://a.internal\"\nscope = \"a\"\n";
    assert_eq!(
        problems(load(plain)),
        ["routes[0].scope: only used with `provider`; this route has none (a plain pass-through) (from tokenproxy.toml)"]
    );
}

#[test]
fn token_exchange_reads_its_subject_from_the_request_or_a_file() {
    let provider = |keys: &str| {
        format!(
            "[providers.ex]\ntoken_url = \"https://sts.example/token\"\ngrant = \"token_exchange\"\nclient_id = \"c\"\n\
             client_secret = \"s\"\n{keys}\n[[routes]]\nprefix = \"/\"\nupstream = \"https://a.internal\"\nprovider = \"ex\"\n"
        )
    };
    let config = load(&provider("audience = \"api\"")).unwrap();
    let exchange = config.providers["ex"].exchange.clone().unwrap();
    assert_eq!(exchange.subject, SubjectSource::Request, "the caller's token by default");
    assert_eq!(exchange.subject_token_type, "urn:ietf:params:oauth:token-type:access_token");
    assert_eq!((exchange.max_subjects, exchange.refused_subject_ttl), (10_000, Duration::from_secs(30)));
    assert_eq!(exchange.dialect, ExchangeDialect::Rfc8693);
    let printed = toml::to_string(&config).unwrap();
    assert!(printed.contains("subject_token_source = \"request\""), "{printed}");
    assert!(load(&printed).is_ok(), "{printed}");

    let token = temp_file("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln");
    let file =
        format!("subject_token_file = {}\nsubject_token_type = \"jwt\"", quoted(&token.path().to_string_lossy()));
    let exchange = load(&provider(&file)).unwrap().providers["ex"].exchange.clone().unwrap();
    assert_eq!(exchange.subject, SubjectSource::File(token.path().to_owned()));
    assert_eq!(exchange.subject_token_type, "urn:ietf:params:oauth:token-type:jwt");

    assert_eq!(
        problems(load(&provider("subject_token_source = \"file\""))),
        ["providers.ex.subject_token_file: missing; subject_token_source = \"file\" exchanges the token in this file \
          (e.g. a projected service-account token) (from tokenproxy.toml)"]
    );
    assert_eq!(
        problems(load(&provider("exchange_dialect = \"entra_obo\"\nrequested_token_type = \"jwt\"\nsubject_token_type = \"saml3\""))),
        [
            "providers.ex.subject_token_type: unknown token type `saml3` (expected access_token, jwt, id_token, refresh_token, saml1, saml2 or a URN) (from tokenproxy.toml)",
            "providers.ex.requested_token_type: not part of Entra's on-behalf-of request (exchange_dialect = \"entra_obo\"); remove it (from tokenproxy.toml)",
        ]
    );
    // The caller's Authorization header is the subject: a route cannot keep it or refuse it.
    let keep = provider("") + "incoming_authorization = \"keep\"\n";
    let problems = problems(load(&keep));
    assert_eq!(problems.len(), 1);
    assert!(problems[0]
        .starts_with("routes[0].incoming_authorization: this route's provider exchanges the caller's own token"));
    let unused = with_provider("max_subjects = 5");
    assert!(load(&unused).unwrap_err().to_string().contains("max_subjects: only used with grant = \"token_exchange\""));
}

#[test]
fn offline_an_absent_secret_or_file_is_a_warning_and_a_directory_still_a_problem() {
    // In a jail: loading reads the environment, which other tests' jails set (it failed once when one did).
    in_jail(|_| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenproxy.toml");
        let config = |cert: &str| {
            format!(
                "[server.tls]\ncert_file = \"{cert}\"\nkey_file = \"/absent/key.pem\"\n\
             [providers.orders]\ntoken_url = \"https://idp.example/token\"\nclient_id = \"c\"\n\
             client_secret_env = \"TOKENPROXY_TEST_UNSET_VARIABLE\"\n\
             [[routes]]\nprefix = \"/\"\nupstream = \"https://api.example\"\nprovider = \"orders\"\n"
            )
        };
        std::fs::write(&path, config("/absent/cert.pem")).unwrap();
        let offline = Config::load_offline(&path).unwrap();
        assert_eq!(offline.unavailable.len(), 3, "{:?}", offline.unavailable);
        assert!(offline.unavailable[0].starts_with("server.tls.cert_file: cannot read /absent/cert.pem"));
        assert!(offline.unavailable[2].starts_with(
            "providers.orders.client_secret_env: environment variable `TOKENPROXY_TEST_UNSET_VARIABLE` is not set"
        ));
        assert_eq!(offline.warnings()[..3], offline.unavailable[..]);
        assert_eq!(problems(Config::load(&path)).len(), 3, "online, each is a problem");

        std::fs::write(&path, config(&dir.path().display().to_string())).unwrap();
        let problems = problems(Config::load_offline(&path));
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("is not a file"), "{problems:?}");
    });
}

#[test]
fn h2c_is_for_plain_upstreams_and_grpc_refresh_for_token_routes() {
    let route = |upstream: &str, keys: &str| format!("[[routes]]\nprefix = \"/\"\nupstream = \"{upstream}\"\n{keys}");
    let config = load(&route("http://grpc.internal:50051", "upstream_protocol = \"h2c\"")).unwrap();
    assert_eq!(config.routes[0].upstream_protocol, UpstreamProtocol::H2c);
    assert_eq!(load(&route("https://a", "")).unwrap().routes[0].upstream_protocol, UpstreamProtocol::Http1);
    assert_eq!(
        problems(load(&route("https://a", "upstream_protocol = \"h2c\""))),
        ["routes[0].upstream_protocol: h2c is HTTP/2 over plain TCP; an https upstream gets h2 by ALPN when it offers it (from tokenproxy.toml)"]
    );
    assert_eq!(
        problems(load(&route("http://a", "grpc_unauthenticated_refresh = true"))),
        ["routes[0].grpc_unauthenticated_refresh: only used with `provider`; this route has none (a plain pass-through) (from tokenproxy.toml)"]
    );
}

#[test]
fn dpop_keys_are_checked_and_its_tokens_go_nowhere_but_authorization() {
    let config = |provider_keys: &str, route_keys: &str| {
        format!(
            "[providers.p]\ntoken_url = \"https://idp.example/token\"\nclient_id = \"c\"\nclient_secret = \"s\"\n\
             dpop = true\n{provider_keys}\n[[routes]]\nprefix = \"/\"\nupstream = \"https://a.internal\"\n\
             provider = \"p\"\n{route_keys}"
        )
    };
    let loaded = load(&config("", "inject = \"header\"\nheader_name = \"authorization\"")).unwrap();
    assert!(loaded.providers["p"].dpop && loaded.providers["p"].dpop_key_file.is_none());
    let printed = toml::to_string(&loaded).unwrap();
    assert!(printed.contains("dpop = true"), "{printed}");
    assert!(load(&printed).is_ok(), "{printed}");

    let pem = {
        use p256::pkcs8::EncodePrivateKey as _;
        p256::SecretKey::from_bytes(&[7u8; 32].into()).unwrap().to_pkcs8_pem(Default::default()).unwrap()
    };
    let p256 = temp_file(&pem);
    let key = format!("dpop_key_file = {}", quoted(&p256.path().to_string_lossy()));
    assert_eq!(load(&config(&key, "")).unwrap().providers["p"].dpop_key_file.as_deref(), Some(p256.path()));
    let rsa = temp_file("-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n");
    let rsa_path = rsa.path().to_string_lossy().into_owned();
    let problems_of = |provider_keys: &str, route_keys: &str| problems(load(&config(provider_keys, route_keys)));
    assert_eq!(
        problems_of(&format!("dpop_key_file = {}", quoted(&rsa_path)), ""),
        [format!(
            "providers.p.dpop_key_file: {rsa_path}: an RSA key: DPoP keys here are EC P-256, P-384 or Ed25519 (from tokenproxy.toml)"
        )]
    );
    assert_eq!(
        problems_of("vend = true", ""),
        ["providers.p.dpop: DPoP tokens are bound to a key only tokenproxy holds: they would not work in other hands, \
          so they cannot be vended (remove vend or dpop) (from tokenproxy.toml)"]
    );
    for route_keys in ["inject = \"query\"", "header_name = \"x-token\"", "scheme = \"Token\""] {
        let found = problems_of("", route_keys);
        assert_eq!(found.len(), 1, "{route_keys}: {found:?}");
        assert!(found[0].contains("provider uses DPoP"), "{found:?}");
    }
    let session = "grant = \"refresh_token\"\nrefresh_token = \"rt\"";
    assert!(problems_of(session, "")[0].contains("needs dpop_key_file"));
    let unused = format!(
        "[providers.p]\ntoken_url = \"https://idp.example/token\"\nclient_id = \"c\"\nclient_secret = \"s\"\n\
         dpop_key_file = {}\n",
        quoted(&p256.path().to_string_lossy())
    );
    assert_eq!(
        problems(load(&unused))[0],
        "providers.p.dpop_key_file: only used with dpop = true; set it, or remove this key (from tokenproxy.toml)"
    );

    // The key made at startup: ES256 unless dpop_algorithm says EdDSA; a key file decides its own.
    assert_eq!(load(&config("", "")).unwrap().providers["p"].dpop_algorithm, DpopAlgorithm::Es256);
    let eddsa = load(&config("dpop_algorithm = \"EdDSA\"", "")).unwrap();
    assert_eq!(eddsa.providers["p"].dpop_algorithm, DpopAlgorithm::EdDsa);
    let printed = toml::to_string(&eddsa).unwrap();
    assert!(printed.contains("dpop_algorithm = \"EdDSA\""), "{printed}");
    assert_eq!(load(&printed).unwrap().providers["p"].dpop_algorithm, DpopAlgorithm::EdDsa);
    assert_eq!(
        problems_of(&format!("{key}\ndpop_algorithm = \"EdDSA\""), ""),
        ["providers.p.dpop_algorithm: the key in dpop_key_file decides the algorithm: remove one of the two \
          (from tokenproxy.toml)"]
    );
    assert!(problems_of("dpop_algorithm = \"ES384\"", "")[0].starts_with("providers.p.dpop_algorithm:"));
}

#[test]
fn the_shared_store_needs_its_server_and_keys_and_never_prints_them() {
    use base64::Engine as _;
    let keys = temp_file(&format!(
        "# rotated 2026-11\n{}\n{}\n",
        base64::engine::general_purpose::STANDARD.encode([1u8; 32]),
        base64::engine::general_purpose::STANDARD.encode([2u8; 32])
    ));
    let state = |extra: &str| {
        format!(
            "[state]\nstore = \"redis\"\nredis_url = \"rediss://redis.internal:6380\"\nencryption_key_file = {}\n{extra}\n{MINIMAL}",
            quoted(&keys.path().to_string_lossy())
        )
    };
    let config = load(&state("redis_username = \"tp\"\nredis_password = \"hunter2-secret\"")).unwrap();
    let shared = config.state.shared.clone().expect("the shared store");
    let read: Vec<[u8; 32]> = shared.encryption_keys.iter().map(|key| *key.expose()).collect();
    assert_eq!(read, [[1u8; 32], [2u8; 32]], "the first encrypts, both decrypt");
    assert_eq!((shared.key_prefix.as_str(), shared.timeout), ("tokenproxy", Duration::from_millis(250)));
    let printed = toml::to_string(&config).unwrap();
    assert!(printed.contains("store = \"redis\"") && printed.contains("redis_password = \"[redacted]\""), "{printed}");
    assert!(!printed.contains("hunter2") && !format!("{shared:?}").contains("hunter2"), "{printed}");

    let with_password_in_url = format!(
        "[state]\nstore = \"redis\"\nredis_url = \"redis://:pw@redis.internal\"\nencryption_key_file = {}\n{MINIMAL}",
        quoted(&keys.path().to_string_lossy())
    );
    assert_eq!(
        problems(load(&with_password_in_url)),
        ["state.redis_url: must not contain credentials (user:password@); set redis_username and redis_password_file (or _env) (from tokenproxy.toml)"]
    );
    let short = temp_file(&base64::engine::general_purpose::STANDARD.encode([1u8; 16]));
    let toml = format!(
        "[state]\nstore = \"redis\"\nredis_url = \"redis://127.0.0.1\"\nencryption_key_file = {}\n{MINIMAL}",
        quoted(&short.path().to_string_lossy())
    );
    assert!(problems(load(&toml))[0].contains("holds 16 bytes; a key is 32"), "{:?}", problems(load(&toml)));
    let stray = format!("[state]\nredis_url = \"redis://127.0.0.1\"\n{MINIMAL}");
    assert!(problems(load(&stray))[0].contains("only used with store = \"redis\""));
}

#[test]
fn a_shared_store_warns_of_an_open_key_file_and_plain_redis_off_machine() {
    use base64::Engine as _;
    use std::os::unix::fs::PermissionsExt as _;
    let keys = temp_file(&base64::engine::general_purpose::STANDARD.encode([1u8; 32]));
    std::fs::set_permissions(keys.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let toml = format!(
        "[state]\nstore = \"redis\"\nredis_url = \"redis://redis.internal:6379\"\nencryption_key_file = {}\n\
         [providers.session]\ntoken_url = \"https://idp.example/token\"\ngrant = \"refresh_token\"\nclient_id = \"c\"\nclient_secret = \"s\"\n\
         refresh_token = \"rt\"\n\
         [[routes]]\nprefix = \"/\"\nupstream = \"https://a.internal\"\nprovider = \"session\"\n",
        quoted(&keys.path().to_string_lossy())
    );
    let warnings = load(&toml).unwrap().warnings();
    let keys_of: Vec<&str> = warnings.iter().map(|w| w.split(':').next().unwrap()).collect();
    assert_eq!(keys_of, ["state.encryption_key_file", "state.redis_url"], "{warnings:#?}");
    assert!(!warnings.iter().any(|w| w.contains("  ")), "one space between words: {warnings:#?}");
    let safe = toml.replace("redis://redis.internal", "rediss://redis.internal");
    std::fs::set_permissions(keys.path(), std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(load(&safe).unwrap().warnings().is_empty());
}

#[test]
fn a_shared_store_behind_sentinel_names_its_sentinels_and_master() {
    use base64::Engine as _;
    let keys = temp_file(&base64::engine::general_purpose::STANDARD.encode([1u8; 32]));
    let state = |server: &str| {
        format!(
            "[state]\nstore = \"redis\"\n{server}\nencryption_key_file = {}\n{MINIMAL}",
            quoted(&keys.path().to_string_lossy())
        )
    };
    let sentinels = "redis_sentinels = [\"rediss://s0.internal:26379\", \"rediss://s1.internal:26379\"]\n\
                     redis_sentinel_master = \"tokens\"";
    let config = load(&state(sentinels)).unwrap();
    let shared = config.state.shared.clone().expect("the shared store");
    match &shared.server {
        super::RedisServer::Sentinel { sentinels, master } => {
            assert_eq!(master, "tokens");
            assert_eq!(
                sentinels.iter().map(|u| u.as_str()).collect::<Vec<_>>(),
                ["rediss://s0.internal:26379", "rediss://s1.internal:26379"]
            );
        }
        other => panic!("{other:?}"),
    }
    // Printed, it loads back the same.
    let printed = toml::to_string(&config).unwrap();
    assert!(!printed.contains("redis_url"), "{printed}");
    let reloaded = load(&printed).unwrap();
    assert_eq!(reloaded.state.shared.unwrap().server, shared.server);

    let cases = [
        (
            "redis_url = \"redis://127.0.0.1\"\nredis_sentinels = [\"redis://127.0.0.1:26379\"]\nredis_sentinel_master = \"m\"",
            "state.redis_url: set either redis_url (one server) or redis_sentinels (Redis Sentinel), not both",
        ),
        ("redis_sentinels = [\"redis://127.0.0.1:26379\"]", "state.redis_sentinel_master: missing; redis_sentinels needs"),
        ("redis_sentinel_master = \"m\"", "state.redis_sentinels: missing; redis_sentinel_master needs"),
        ("redis_sentinels = []\nredis_sentinel_master = \"m\"", "state.redis_sentinels: an empty list"),
        (
            "redis_sentinels = [\"redis://a:26379\", \"rediss://b:26379\"]\nredis_sentinel_master = \"m\"",
            "state.redis_sentinels: mixes redis:// and rediss://",
        ),
        (
            "redis_sentinels = [\"redis://u:pw@a:26379\"]\nredis_sentinel_master = \"m\"",
            "state.redis_sentinels: must not contain credentials (user:password@)",
        ),
        ("", "state.redis_url: missing; store = \"redis\" needs the server"),
    ];
    for (server, expected) in cases {
        let found = problems(load(&state(server)));
        assert!(found.len() == 1 && found[0].starts_with(expected), "{server}: {found:?}");
    }
    // Plain Sentinels on another machine: the same warning as a plain redis_url.
    let plain = load(&state(&sentinels.replace("rediss://", "redis://"))).unwrap();
    assert!(
        plain.warnings().iter().any(|w| w.starts_with("state.redis_sentinels: Redis at s0.internal")),
        "{:?}",
        plain.warnings()
    );
}

#[test]
fn allowed_hosts_are_host_names_wildcards_or_a_lone_star() {
    let config = load(&format!(
        "[server]\nallowed_hosts = [\"dev.example.com\", \"*.corp.example\"]\n[admin]\nallowed_hosts = [\"*\"]\n{MINIMAL}"
    ))
    .unwrap();
    assert_eq!(config.server.allowed_hosts.unwrap(), ["dev.example.com", "*.corp.example"]);
    assert_eq!(config.admin.allowed_hosts.unwrap(), ["*"]);
    assert_eq!(config.vending.allowed_hosts, None);
    let refused = |list: &str| problems(load(&format!("[server]\nallowed_hosts = {list}\n{MINIMAL}")));
    assert_eq!(
        refused("[\"http://dev.example.com:8080\"]"),
        ["server.allowed_hosts: `http://dev.example.com:8080` is not a host name: use names without scheme or port \
          (\"dev.example.com\"), \"*.example.com\" for the names under one, or [\"*\"] alone to answer any Host (from \
          tokenproxy.toml)"]
    );
    assert_eq!(
        refused("[\"*\", \"a.example\"]"),
        ["server.allowed_hosts: \"*\" answers any Host: it stands alone, [\"*\"] (from tokenproxy.toml)"]
    );
    assert_eq!(
        refused("\"a.example\"")[0].split(',').next().unwrap(),
        "server.allowed_hosts: expected a list of host names such as [\"dev.example.com\""
    );
    assert!(refused("[\"\"]")[0].contains("must not be empty"));
}

#[test]
fn max_token_calls_is_calls_per_window() {
    let with = |budget: &str| {
        load(&format!(
            "[providers.p]\ntoken_url = \"https://idp.example/token\"\nclient_id = \"c\"\nclient_secret = \"s\"\n\
             max_token_calls = {budget}\n{MINIMAL}"
        ))
    };
    let config = with("\"600/h\"").unwrap();
    assert_eq!(config.providers["p"].max_token_calls, Some((600, Duration::from_secs(3600), "600/h".to_owned())));
    assert_eq!(with("\"5/s\"").unwrap().providers["p"].max_token_calls.as_ref().unwrap().1, Duration::from_secs(1));
    for bad in ["\"600\"", "\"600/w\"", "\"x/h\"", "\"0/h\"", "600"] {
        let problems = problems(with(bad));
        assert!(problems[0].starts_with("providers.p.max_token_calls: "), "{bad}: {problems:?}");
    }
}

#[test]
fn the_h1_transport_switch_is_read_under_its_old_name_with_a_warning() {
    let config = load(&format!("[server]\nh1_transport = false\n{MINIMAL}")).unwrap();
    assert!(!config.server.h1_transport);
    assert!(config.warnings().iter().all(|w| !w.contains("direct_http1")));
    let old = load(&format!("[server]\ndirect_http1 = false\n{MINIMAL}")).unwrap();
    assert!(!old.server.h1_transport, "the old name still works");
    assert!(old.warnings().iter().any(|w| w.starts_with("server.direct_http1: deprecated")), "{:?}", old.warnings());
    let both = problems(load(&format!("[server]\ndirect_http1 = false\nh1_transport = true\n{MINIMAL}")));
    assert!(both.iter().any(|p| p.starts_with("server.direct_http1: the old name of h1_transport")), "{both:?}");
}

#[test]
fn telemetry_keys_are_read_and_checked() {
    let config = load(&format!(
        "{MINIMAL}\n[telemetry]\notlp_endpoint = \"http://127.0.0.1:4318\"\nservice_name = \"edge\"\nsample_ratio = 0.25\n\
         headers = \"api-key=k1\"\n[telemetry.resource_attributes]\n\"deployment.environment\" = \"prod\"\n"
    ))
    .unwrap();
    let t = &config.telemetry;
    assert_eq!(t.otlp_endpoint.as_deref(), Some("http://127.0.0.1:4318/"));
    assert_eq!((t.service_name.as_deref(), t.sample_ratio), (Some("edge"), 0.25));
    assert_eq!(t.resource_attributes["deployment.environment"], "prod");
    assert!(matches!(&t.headers, Some(SecretSource::Inline(_))));
    assert!(!config.to_redacted_toml().contains("k1"), "the collector's headers never print");
    assert!(load(MINIMAL).unwrap().telemetry.otlp_endpoint.is_none(), "off by default");
    let problems_of = |extra: &str| problems(load(&format!("{MINIMAL}\n[telemetry]\n{extra}\n")));
    assert_eq!(
        problems_of("sample_ratio = 1.5"),
        ["telemetry.sample_ratio: a share of traces, from 0 to 1 (from tokenproxy.toml)"]
    );
    #[cfg(not(feature = "otlp-grpc"))]
    assert_eq!(
        problems_of("otlp_protocol = \"grpc\""),
        ["telemetry.otlp_protocol: gRPC export needs a build with the `otlp-grpc` feature; this one sends http/protobuf (from tokenproxy.toml)"]
    );
    #[cfg(feature = "otlp-grpc")]
    assert_eq!(
        load(&format!("{MINIMAL}\n[telemetry]\notlp_protocol = \"grpc\"\n")).unwrap().telemetry.otlp_protocol,
        Some(OtlpProtocol::Grpc)
    );
    assert_eq!(problems_of("otlp_protocol = \"http/json\"").len(), 1);
    assert_eq!(problems_of("otlp_endpoint = \"ftp://x\"").len(), 1);
    assert_eq!(problems_of("sampling = 1").len(), 1, "an unknown key is an error");
}

#[test]
fn intercept_needs_a_dns_host_and_the_same_value_on_every_route_of_that_host() {
    let route = |extra: &str| format!("[[routes]]\nupstream = \"https://api.example.com\"\n{extra}\n");
    let config = load(
        &(route("host = \"api.example.com\"\nintercept = true")
            + &route("host = \"api.example.com\"\nprefix = \"/v2\"\nintercept = true")
            + &route("host = \"other.example.com\"")),
    )
    .unwrap();
    assert_eq!(config.intercepted_hosts(), ["api.example.com"]);
    assert!(!config.server.allow_remote_intercept, "off by default");
    assert_eq!(
        problems(load(&route("prefix = \"/a\"\nintercept = true"))),
        ["routes[0].intercept: needs `host`: a CONNECT is intercepted for the host a route names (docs/local-dev.md) (from tokenproxy.toml)"]
    );
    assert_eq!(
        problems(load(&route("host = \"10.0.0.1\"\nintercept = true"))),
        ["routes[0].intercept: `10.0.0.1` is an IP address: only DNS names are intercepted (from tokenproxy.toml)"]
    );
    let mixed =
        route("host = \"api.example.com\"\nintercept = true") + &route("host = \"api.example.com\"\nprefix = \"/v2\"");
    assert_eq!(
        problems(load(&mixed)),
        ["routes[1]: `intercept` must be the same on every route of host `api.example.com` (routes[0] sets it to true) (from tokenproxy.toml)"]
    );
}
