//! The `tokenproxy` command line: parse arguments, set up logging, call into the library, map errors to exit codes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokenproxy::config::{Config, ConfigError, LogConfig, LogFormat};
use tokenproxy::token::IdpClient;
use tokenproxy::{demo, App};

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
        #[arg(long)]
        fetch: bool,
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

/// Exit code when the proxy cannot start.
const EXIT_START: u8 = 1;
/// Exit code for an invalid config.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => {
            let config = match load(&config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            init_tracing(&config.log);
            let Some(runtime) = runtime(config.server.worker_threads) else { return ExitCode::from(EXIT_START) };
            runtime.block_on(run(config))
        }
        Command::Demo { listen, admin_listen } => {
            init_tracing(&LogConfig { format: LogFormat::Pretty, level: "info".into() });
            let Some(runtime) = runtime(None) else { return ExitCode::from(EXIT_START) };
            runtime.block_on(run_demo(listen, admin_listen))
        }
        Command::Check { config, fetch } => {
            let config = match load(&config) {
                Ok(config) => config,
                Err(_) => return ExitCode::from(EXIT_CONFIG),
            };
            print!("{}", config.to_redacted_toml());
            if !fetch {
                return ExitCode::SUCCESS;
            }
            let Some(runtime) = runtime(Some(1)) else { return ExitCode::from(EXIT_START) };
            runtime.block_on(check_fetch(&config))
        }
        Command::Token { provider, config } => {
            let config = match load(&config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            let Some(runtime) = runtime(Some(1)) else { return ExitCode::from(EXIT_START) };
            runtime.block_on(print_token(&config, &provider))
        }
    }
}

/// Loads the config, printing its errors on stderr; the exit code says whether it was unreadable or invalid.
fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|error| {
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
    })
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn runtime(worker_threads: Option<usize>) -> Option<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = worker_threads {
        builder.worker_threads(n.max(1));
    }
    builder.build().map_err(|e| eprintln!("tokenproxy: cannot start the runtime: {e}")).ok()
}

fn init_tracing(log: &LogConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match log.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Pretty => builder.compact().init(),
    }
}

async fn run(config: Config) -> ExitCode {
    let app = match App::build(config) {
        Ok(app) => app,
        Err(error) => {
            eprintln!("tokenproxy: {error}");
            return ExitCode::from(EXIT_START);
        }
    };
    let bound = match app.bind().await {
        Ok(bound) => bound,
        Err(error) => {
            eprintln!("tokenproxy: {error}");
            return ExitCode::from(EXIT_START);
        }
    };
    tracing::info!(proxy = %bound.proxy_addr(), admin = %bound.admin_addr(), "tokenproxy listening");
    bound.run(tokenproxy::server::shutdown_signal()).await;
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

async fn check_fetch(config: &Config) -> ExitCode {
    let mut failed = 0;
    for (name, provider) in &config.providers {
        let outcome = match IdpClient::new(provider.clone()) {
            Ok(client) => client.fetch().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok(token) => eprintln!(
                "provider {name}: ok, token lifetime {}s, scope {}",
                token.lifetime.as_secs(),
                token.scope.as_deref().unwrap_or("(not stated)")
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

async fn print_token(config: &Config, name: &str) -> ExitCode {
    let Some(provider) = config.providers.get(name) else {
        let known: Vec<&str> = config.providers.keys().map(String::as_str).collect();
        eprintln!("tokenproxy: no provider named `{name}` (defined: {})", known.join(", "));
        return ExitCode::from(EXIT_START);
    };
    let client = match IdpClient::new(provider.clone()) {
        Ok(client) => Arc::new(client),
        Err(error) => {
            eprintln!("tokenproxy: provider {name}: {error}");
            return ExitCode::from(EXIT_START);
        }
    };
    match client.fetch().await {
        Ok(token) => match token.access_token.to_str() {
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
