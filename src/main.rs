//! The `tokenproxy` command line: parse arguments, set up logging, call into the library, map errors to exit codes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use tokenproxy::config::{Config, ConfigError, LogConfig, LogFormat};
use tokenproxy::logging::{Escape, EscapingWriter, WithTraceIds};
use tokenproxy::probe::Probe;
use tokenproxy::server::WorkerPool;
use tokenproxy::token::device::{self, Logout};
use tokenproxy::token::response::TokenError;
use tokenproxy::token::CommandFetcher;
use tokenproxy::{demo, App, RunOptions};

#[derive(Parser)]
#[command(
    name = "tokenproxy",
    version,
    about = "A reverse proxy that attaches fresh OAuth2 access tokens to every request"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// Config file (default: $TOKENPROXY_CONFIG, then ./tokenproxy.toml).
        #[arg(long, short, env = "TOKENPROXY_CONFIG", default_value = "tokenproxy.toml")]
        config: PathBuf,
    },
    /// Run the proxy on its embedded default: a demo IdP and a demo upstream, all on 127.0.0.1.
    Demo {
        /// Proxy listener.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Admin listener.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_listen: SocketAddr,
    },
    /// Validate the config and print it resolved, secrets redacted.
    Check {
        /// Config file (default: $TOKENPROXY_CONFIG, then ./tokenproxy.toml).
        #[arg(long, short, env = "TOKENPROXY_CONFIG", default_value = "tokenproxy.toml")]
        config: PathBuf,
        /// Also get one token from every provider and report each outcome.
        #[arg(long, conflicts_with = "offline")]
        fetch: bool,
        /// For a machine without the secrets (CI): an unset `*_env` variable or a missing `*_file` is a warning,
        /// not an error; everything else is checked.
        #[arg(long)]
        offline: bool,
        /// Get ROUTE's token, send one request through the route as the proxy does, and report the status, the time
        /// of each step and, when the upstream refused the token, why (exit 0 on a 2xx or 3xx, else 1).
        #[arg(long, value_name = "ROUTE", conflicts_with_all = ["offline", "fetch"])]
        probe: Option<String>,
        /// With --probe: the path (and query) after the route's prefix (default: the prefix itself).
        #[arg(long, requires = "probe", value_parser = probe_path)]
        path: Option<String>,
        /// With --probe: the request's method (default: GET).
        #[arg(long, requires = "probe", value_parser = probe_method)]
        method: Option<http::Method>,
        /// With --probe on a route that exchanges each caller's token: the file holding the caller's token.
        #[arg(long, value_name = "FILE", requires = "probe")]
        subject_token_file: Option<PathBuf>,
    },
    /// Start a refresh-token session for PROVIDER with the device authorization grant (RFC 8628).
    Login {
        /// The provider's name (its grant must be "refresh_token").
        provider: String,
        /// Config file (default: $TOKENPROXY_CONFIG, then ./tokenproxy.toml).
        #[arg(long, short, env = "TOKENPROXY_CONFIG", default_value = "tokenproxy.toml")]
        config: PathBuf,
    },
    /// End PROVIDER's refresh-token session: revoke the refresh token (RFC 7009) and delete it from the state store.
    Logout {
        /// The provider's name.
        provider: String,
        /// Config file (default: $TOKENPROXY_CONFIG, then ./tokenproxy.toml).
        #[arg(long, short, env = "TOKENPROXY_CONFIG", default_value = "tokenproxy.toml")]
        config: PathBuf,
    },
    /// The local CA of HTTPS interception (routes with `intercept = true`; docs/local-dev.md).
    Ca {
        #[command(subcommand)]
        action: CaAction,
    },
    /// Print one valid access token for PROVIDER on stdout, and nothing else.
    Token {
        /// The provider's name.
        provider: String,
        /// Config file (default: $TOKENPROXY_CONFIG, then ./tokenproxy.toml).
        #[arg(long, short, env = "TOKENPROXY_CONFIG", default_value = "tokenproxy.toml")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum CaAction {
    /// Make the local CA in `state.dir`, constrained to the hosts the intercepting routes name.
    Init {
        /// Config file (default: $TOKENPROXY_CONFIG, then ./tokenproxy.toml).
        #[arg(long, short, env = "TOKENPROXY_CONFIG", default_value = "tokenproxy.toml")]
        config: PathBuf,
        /// Replace the CA already there (after the intercepted hosts changed, say).
        #[arg(long)]
        force: bool,
    },
    /// Print the local CA's certificate (PEM) on stdout: what clients are told to trust.
    Print {
        /// Config file (default: $TOKENPROXY_CONFIG, then ./tokenproxy.toml).
        #[arg(long, short, env = "TOKENPROXY_CONFIG", default_value = "tokenproxy.toml")]
        config: PathBuf,
    },
}

/// Exit code when the proxy cannot start (or a command fails, or a probe's answer is not a 2xx or 3xx).
const EXIT_START: u8 = 1;
/// Exit code for an invalid config.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();

    match cli.command {
        Command::Run { config: path } => {
            let config = match load(&path) {
                Ok(config) => config,
                Err(code) => return code,
            };
            init_tracing(&config.log);
            let Some(runtime) = runtime() else { return ExitCode::from(EXIT_START) };
            let Some(workers) = workers(config.server.worker_threads) else { return ExitCode::from(EXIT_START) };
            runtime.block_on(run(config, path, workers))
        }
        Command::Demo { listen, admin_listen } => {
            init_tracing(&LogConfig { format: LogFormat::Pretty, level: "info".into(), access: true });
            let Some(runtime) = runtime() else { return ExitCode::from(EXIT_START) };
            runtime.block_on(run_demo(listen, admin_listen))
        }
        Command::Check { config, fetch, offline, probe, path, method, subject_token_file } => {
            let started = Instant::now();
            let loaded = if offline { load_offline(&config) } else { load(&config) };
            let loaded_in = started.elapsed();
            let config = match loaded {
                Ok(config) => config,
                Err(_) => return ExitCode::from(EXIT_CONFIG),
            };
            print!("{}", config.to_redacted_toml());
            for warning in config.warnings() {
                eprintln!("tokenproxy: warning: {warning}");
            }
            // Telemetry may come from the OTEL_* environment alone, which the printed config does not show.
            match tokenproxy::telemetry::resolve(&config.telemetry, &|name| std::env::var(name).ok()) {
                Ok(Some(resolved)) => eprintln!(
                    "tokenproxy: telemetry: traces go to {} over {} (service.name {}, sample_ratio {})",
                    resolved.endpoint,
                    resolved.protocol.as_str(),
                    resolved.service_name,
                    config.telemetry.sample_ratio
                ),
                Ok(None) => {}
                Err(error) => {
                    eprintln!("tokenproxy: {error}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            }
            // Interception needs the local CA, made for the hosts the routes intercept now.
            let intercepted = config.intercepted_hosts();
            if !intercepted.is_empty() {
                match tokenproxy::ca::LocalCa::load(&config.state.dir) {
                    Ok(ca) => {
                        for refused in intercepted.iter().filter_map(|host| ca.vouches_for(host).err()) {
                            eprintln!("tokenproxy: warning: routes[].intercept: {refused}");
                        }
                    }
                    Err(error) => eprintln!("tokenproxy: warning: routes[].intercept: {error}"),
                }
            }
            let probe = probe.map(|route| Probe {
                route,
                method: method.unwrap_or(http::Method::GET),
                path: path.unwrap_or_default(),
                subject_token_file,
            });
            if !fetch && probe.is_none() {
                return ExitCode::SUCCESS;
            }
            let Some(runtime) = runtime() else { return ExitCode::from(EXIT_START) };
            match probe {
                Some(probe) => runtime.block_on(check_probe(&config, &probe, loaded_in)),
                None => runtime.block_on(check_fetch(&config)),
            }
        }
        Command::Ca { action } => ca(action),
        Command::Token { provider, config } => one_provider(&config, &provider, print_token),
        Command::Login { provider, config } => one_provider(&config, &provider, login),
        Command::Logout { provider, config } => one_provider(&config, &provider, logout),
    }
}

/// `tokenproxy ca init` and `ca print`. The config is read without its secrets (the CA needs none).
fn ca(action: CaAction) -> ExitCode {
    use tokenproxy::ca::LocalCa;
    let path = match &action {
        CaAction::Init { config, .. } | CaAction::Print { config } => config,
    };
    let config = match load_offline(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let dir = std::path::absolute(&config.state.dir).unwrap_or_else(|_| config.state.dir.clone());
    let made = match action {
        CaAction::Print { .. } => LocalCa::load(&dir).map(|ca| print!("{}", ca.cert_pem())),
        CaAction::Init { force, .. } => LocalCa::init(&dir, &config.intercepted_hosts(), force).map(|ca| {
            eprintln!(
                "tokenproxy: local CA made in {} for {} (and their subdomains), valid until {}",
                dir.display(),
                ca.permitted().join(", "),
                ca.not_after().date()
            );
            eprintln!(
                "tokenproxy: trust it with `tokenproxy ca print > tokenproxy-ca.pem` (docs/local-dev.md shows where)"
            );
        }),
    };
    match made {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tokenproxy: {error}");
            ExitCode::from(EXIT_START)
        }
    }
}

/// Loads the config, printing its errors on stderr; the exit code says whether it was unreadable or invalid.
fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(report)
}

/// Like [`load`], without the secrets: what cannot be had here becomes a warning (`check --offline`).
fn load_offline(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load_offline(path).map_err(report)
}

/// Prints a config error on stderr; the exit code says whether it was unreadable or invalid.
fn report(error: ConfigError) -> ExitCode {
    match &error {
        ConfigError::Invalid(problems) => {
            eprintln!("tokenproxy: invalid configuration ({} problem{}):", problems.len(), plural(problems.len()));
            for problem in problems {
                eprintln!("  {problem}");
            }
        }
        other => eprintln!("tokenproxy: {other}"),
    }
    match error {
        ConfigError::Invalid(_) => ExitCode::from(EXIT_CONFIG),
        _ => ExitCode::from(EXIT_START),
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// The control runtime (token refreshers, admin listener, accept loop, signals): one thread is plenty. The
/// proxy's connections run on a [`WorkerPool`] of `server.worker_threads` threads.
fn runtime() -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| eprintln!("tokenproxy: cannot start the runtime: {e}"))
        .ok()
}

/// `server.worker_threads` worker runtimes; by default one per available core but one (at least one). A sidecar
/// shares its cores with the application beside it: a busy thread on every core competes with it and costs tail
/// latency (on 2 cores shared with the load and the upstream, 2 threads gave a p99 1.03–1.7× nginx's, 1 thread
/// 0.82–1.05×; docs/benchmarks.md). `available_parallelism` follows a container's CPU limit.
fn workers(threads: Option<usize>) -> Option<Arc<WorkerPool>> {
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1)));
    // Each worker's upstream connections of the h1 transport are pooled on its thread.
    WorkerPool::start(threads, tokenproxy::proxy::UpstreamClient::set_worker)
        .map(Arc::new)
        .map_err(|e| eprintln!("tokenproxy: cannot start the worker threads: {e}"))
        .ok()
}

fn init_tracing(log: &LogConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Every line is escaped as it is written: no text from a peer reaches the log raw (src/logging.rs).
    let escape = match log.format {
        LogFormat::Json => Escape::Json,
        LogFormat::Pretty => Escape::Text,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(move || EscapingWriter::new(std::io::stderr(), escape))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match log.format {
        // A traced request's lines carry its trace_id and span_id (src/logging.rs).
        LogFormat::Json => builder
            .json()
            .event_format(WithTraceIds(tracing_subscriber::fmt::format().json().flatten_event(true)))
            .init(),
        LogFormat::Pretty => builder.compact().init(),
    }
}

async fn run(config: Config, path: PathBuf, workers: Arc<WorkerPool>) -> ExitCode {
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let app = match App::build(config) {
        Ok(app) => app.reload_from(path),
        Err(error) => {
            eprintln!("tokenproxy: {error}");
            return ExitCode::from(EXIT_START);
        }
    };
    for line in app.summary() {
        tracing::info!("{line}");
    }
    let bound = match app.bind().await {
        Ok(bound) => bound,
        Err(error) => {
            eprintln!("tokenproxy: {error}");
            return ExitCode::from(EXIT_START);
        }
    };
    tracing::info!(proxy = %bound.proxy_addr(), admin = %bound.admin_addr(), "tokenproxy listening");
    let options = RunOptions { workers: Some(workers), reload_on_sighup: true };
    bound.run_with(tokenproxy::server::shutdown_signal(), options).await;
    ExitCode::SUCCESS
}

async fn run_demo(listen: SocketAddr, admin_listen: SocketAddr) -> ExitCode {
    let services = match demo::start_services().await {
        Ok(services) => services,
        Err(error) => {
            eprintln!("tokenproxy demo: cannot start the demo services: {error}");
            return ExitCode::from(EXIT_START);
        }
    };
    let config = match demo::config(&services, listen, admin_listen) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("tokenproxy demo: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let bound = match App::build(config) {
        Ok(app) => match app.bind().await {
            Ok(bound) => bound,
            Err(error) => {
                eprintln!("tokenproxy demo: {error} (use --listen / --admin-listen to move it)");
                return ExitCode::from(EXIT_START);
            }
        },
        Err(error) => {
            eprintln!("tokenproxy demo: {error}");
            return ExitCode::from(EXIT_START);
        }
    };
    println!("{}", demo::banner(bound.proxy_addr(), bound.admin_addr()));
    bound.run(tokenproxy::server::shutdown_signal()).await;
    ExitCode::SUCCESS
}

/// Why `token` and `check --fetch` cannot act for a provider that exchanges each caller's token.
const PER_CALLER: &str = "it exchanges each caller's own token (subject_token_source = \"request\"), so it has no \
                          token of its own; its token endpoint is called per caller by the running proxy";

async fn check_fetch(config: &Config) -> ExitCode {
    let mut failed = 0;
    for (name, provider) in &config.providers {
        if provider.per_caller() {
            eprintln!("provider {name}: not fetched: {PER_CALLER}");
            continue;
        }
        let outcome = match CommandFetcher::new(config, provider) {
            Ok(fetcher) => match fetcher.fetch().await {
                Ok(token) => Ok(token),
                Err(e) => {
                    let refused = matches!(&e, TokenError::Rejected { error, .. } if error == "invalid_client");
                    let endpoint = match refused {
                        true => {
                            fetcher.grant().idp().endpoints().await.ok().map(|endpoints| endpoints.token.to_string())
                        }
                        false => None,
                    };
                    let assertion_hint = refused
                        .then(|| tokenproxy::token::assertion::refusal_hint(provider, endpoint.as_deref()))
                        .flatten();
                    Err(match assertion_hint.as_deref().or(e.hint()) {
                        Some(hint) => format!("{e}\n    hint: {hint}"),
                        None => e.to_string(),
                    })
                }
            },
            Err(e) => Err(e),
        };
        match outcome {
            Ok(token) => eprintln!(
                "provider {name}: ok, token lifetime {}s, scope {}{}",
                token.lifetime.as_secs(),
                token.scope.as_deref().unwrap_or("(not stated)"),
                match (&token.dpop, provider.dpop) {
                    (Some(key), _) => format!(", DPoP-bound to key {} ({})", key.thumbprint(), key.algorithm()),
                    (None, true) => ", a bearer token: the IdP did not bind it to the DPoP key".to_owned(),
                    (None, false) => String::new(),
                }
            ),
            Err(error) => {
                failed += 1;
                eprintln!("provider {name}: FAILED: {error}");
            }
        }
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_START)
    }
}

/// `--path`: a path (and query) that can follow the route's prefix.
fn probe_path(text: &str) -> Result<String, String> {
    let path = tokenproxy::probe::request_path("/", text);
    match http::uri::PathAndQuery::try_from(path.as_str()) {
        Ok(_) if !text.contains('#') => Ok(text.to_owned()),
        _ => Err("not a path and query of a URL (visible ASCII, no fragment; percent-encode the rest)".to_owned()),
    }
}

/// `--method`: an HTTP method, in any case.
fn probe_method(text: &str) -> Result<http::Method, String> {
    http::Method::from_bytes(text.to_ascii_uppercase().as_bytes()).map_err(|_| "not an HTTP method".to_owned())
}

/// `check --probe`: one request through the route, reported on stderr (as `--fetch` reports).
async fn check_probe(config: &Config, probe: &Probe, loaded_in: Duration) -> ExitCode {
    match tokenproxy::probe::run(config, probe).await {
        Ok(report) => {
            for line in report.lines(loaded_in) {
                eprintln!("{line}");
            }
            if report.succeeded() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_START)
            }
        }
        Err(error) => {
            eprintln!("tokenproxy: {error}");
            ExitCode::from(EXIT_START)
        }
    }
}

/// Loads the config and runs `command` for one of its providers (`token`, `login`, `logout`).
fn one_provider<F, Fut>(path: &std::path::Path, name: &str, command: F) -> ExitCode
where
    F: FnOnce(CommandFetcher) -> Fut,
    Fut: std::future::Future<Output = ExitCode>,
{
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    if matches!(config.log.format, LogFormat::Json) || std::env::var_os("RUST_LOG").is_some() {
        init_tracing(&config.log);
    }
    let Some(provider) = config.providers.get(name) else {
        let known: Vec<&str> = config.providers.keys().map(String::as_str).collect();
        eprintln!("tokenproxy: no provider named `{name}` (defined: {})", known.join(", "));
        return ExitCode::from(EXIT_START);
    };
    if provider.per_caller() {
        eprintln!("tokenproxy: provider {name}: {PER_CALLER}");
        return ExitCode::from(EXIT_START);
    }
    let fetcher = match CommandFetcher::new(&config, provider) {
        Ok(fetcher) => fetcher,
        Err(error) => {
            eprintln!("tokenproxy: provider {name}: {error}");
            return ExitCode::from(EXIT_START);
        }
    };
    let Some(runtime) = runtime() else { return ExitCode::from(EXIT_START) };
    runtime.block_on(command(fetcher))
}

async fn print_token(fetcher: CommandFetcher) -> ExitCode {
    let name = &fetcher.grant().idp().provider().name;
    if fetcher.grant().idp().provider().dpop {
        eprintln!(
            "tokenproxy: provider {name}: it uses DPoP (dpop = true): its tokens are bound to a key only the proxy \
             holds and are useless in other hands; call the API through the proxy instead"
        );
        return ExitCode::from(EXIT_START);
    }
    match fetcher.fetch().await {
        Ok(token) => match token.access_token.expose().to_str() {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            Err(_) => ExitCode::from(EXIT_START),
        },
        Err(error) => {
            eprintln!("tokenproxy: provider {name}: {error}");
            ExitCode::from(EXIT_START)
        }
    }
}

async fn login(fetcher: CommandFetcher) -> ExitCode {
    let fetcher = fetcher.grant();
    let name = fetcher.idp().provider().name.clone();
    let outcome = device::login(fetcher, |prompt| {
        eprintln!("To sign in, open {} and enter the code {}", prompt.verification_uri, prompt.user_code);
        if let Some(complete) = &prompt.verification_uri_complete {
            eprintln!("(or open {complete})");
        }
        eprintln!("Waiting for approval (the code expires in {} s)…", prompt.expires_in.as_secs());
    })
    .await;
    match outcome {
        Ok(()) => {
            let store = fetcher.session().map(|s| s.store().path(&name));
            let shared = fetcher.session().is_some_and(|s| s.is_shared());
            eprintln!(
                "Logged in: the refresh token of provider {name} is stored in {}{}",
                store.map(|p| p.display().to_string()).unwrap_or_default(),
                if shared { " and in the shared store, for every replica" } else { "" }
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("tokenproxy login {name}: {error}");
            ExitCode::from(EXIT_START)
        }
    }
}

async fn logout(fetcher: CommandFetcher) -> ExitCode {
    let fetcher = fetcher.grant();
    let name = fetcher.idp().provider().name.clone();
    let shared = fetcher.session().is_some_and(|s| s.is_shared());
    match device::logout(fetcher).await {
        Ok(Logout::Revoked) => eprintln!(
            "Logged out: the refresh token of {name} was revoked and deleted{}",
            if shared { ", and the session ended in the shared store for every replica" } else { "" }
        ),
        Ok(Logout::DeletedOnly) => eprintln!(
            "Logged out locally: the refresh token of {name} was deleted, but the provider has no revocation \
             endpoint, so it stays valid at the IdP until it expires"
        ),
        Ok(Logout::NothingStored) => eprintln!("No stored session for {name}: nothing to do"),
        Err(error) => {
            eprintln!("tokenproxy logout {name}: {error}");
            return ExitCode::from(EXIT_START);
        }
    }
    ExitCode::SUCCESS
}
