//! tokenproxy: a reverse proxy that attaches fresh OAuth2 access tokens to every request.
//!
//! Module map (dependencies point one way: `secret`, `private_file` and `metrics` import nothing of ours, `keys` only
//! `secret`, `config` only those below it (tests/layers.rs), `token` knows nothing of `proxy`, `admin` never imports
//! `proxy`, and only this file wires the parts together):
//! - [`secret`]: secret values, where they come from (inline, a file, an environment variable) and how they are read;
//! - [`keys`]: keys and certificates read from files (signing keys, Google key files, DPoP key pairs, thumbprints),
//!   for the config (which checks them at load) and the token engine (which signs with them);
//! - [`config`]: figment layers → validated, typed [`config::Config`], every error with its key and source;
//! - [`metrics`]: the Prometheus registry and typed handles; the only place metric names are defined;
//! - [`tls`]: rustls server and client configurations;
//! - [`token`]: the token engine: slots, single flight, generations, the refresher tasks, the IdP client, and why an
//!   upstream refused a token (`token::refusal`);
//! - [`telemetry`]: OpenTelemetry traces: the spans of a request, W3C trace context, the bounded OTLP export;
//! - [`proxy`]: the request path: its phases (routing, method and path policy, header rewriting, token injection, the
//!   401 replay, problem+json errors) run by one lifecycle over two transports that do I/O only, `proxy::h1`
//!   (tokenproxy's own HTTP/1.1, for plain requests) and `proxy::hyper` (the rest), over one upstream client with a
//!   bounded per-worker pool;
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics`, `/tokens`;
//! - [`server`]: listeners, connection limits, graceful shutdown;
//! - `handlers`: what each listener serves (the proxy; the admin and vending APIs behind their `Host` checks);
//! - [`shutdown`]: the signal every long-running task listens for; `error_chain`: an error and its causes on one line;
//! - [`demo`]: the in-process demo IdP and upstream behind `tokenproxy demo`;
//! - [`probe`]: `tokenproxy check --probe ROUTE`, one request handed to an [`App`] built for that route alone.

pub mod activity;
pub mod admin;
pub mod ca;
pub mod config;
pub mod demo;
mod error_chain;
mod handlers;
pub mod host_check;
pub mod keys;
pub mod logging;
pub mod metrics;
pub mod private_file;
pub mod probe;
pub mod proxy;
pub mod secret;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod vending;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::activity::Timeouts;
use crate::admin::{Admin, Reload};
use crate::config::Config;
use crate::config::VendingListen;
use crate::handlers::{HostChecked, ListenerHosts, ProxyHandler};
use crate::host_check::HostCheck;
use crate::metrics::Metrics;
use crate::proxy::route::{Route, RouteTable};
use crate::proxy::{Proxy, ProxyOptions, UpstreamClient};
use crate::server::ListenerOptions;
use crate::shutdown::Shutdown;
use crate::token::TokenEngine;

/// Why tokenproxy could not start (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// `server.listen` or `admin.listen`.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The vending listener's unix socket could not be made.
    #[error("cannot listen on the unix socket {} (vending.listen): {source}", path.display())]
    Socket {
        /// The socket's path.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A route intercepts, and the local CA cannot be used.
    #[error("routes[].intercept: {0}")]
    Intercept(String),
    /// TLS material could not be loaded.
    #[error("{what}: {source}")]
    Tls {
        /// The config key at fault.
        what: &'static str,
        /// The problem.
        source: tls::TlsError,
    },
    /// A route could not be built.
    #[error(transparent)]
    Route(#[from] proxy::route::RouteError),
    /// Telemetry could not be started (the message names the key or variable at fault).
    #[error("{0}")]
    Telemetry(String),
}

/// Every part of a running tokenproxy, wired from one [`Config`].
pub struct App {
    config: Config,
    /// Where a reload reads the config again (`None`: built from text, reload is refused).
    config_path: Option<PathBuf>,
    metrics: Arc<Metrics>,
    engine: Arc<ArcSwap<TokenEngine>>,
    proxy: Arc<ArcSwap<Proxy>>,
    client: Arc<UpstreamClient>,
    /// Traces (`[telemetry]`, applied at startup only); `None`: off.
    telemetry: Option<Arc<telemetry::Telemetry>>,
}

impl App {
    /// Builds the token engine, the routes and the proxy from `config` (nothing runs yet).
    pub fn build(config: Config) -> Result<App, StartError> {
        Self::build_with_dial(config, Arc::new(proxy::upstream::TcpDial))
    }

    /// [`App::build`], with plain upstream connections opened by `dial` (tests put an in-memory upstream here).
    pub fn build_with_dial(config: Config, dial: Arc<dyn proxy::upstream::Dial>) -> Result<App, StartError> {
        let metrics = Arc::new(Metrics::new());
        let engine = TokenEngine::new(&config, &metrics)
            .map_err(|source| StartError::Tls { what: "providers (ca_file, client_cert_file)", source })?;
        let client = UpstreamClient::with_dial(config.server.max_idle_upstream_connections, dial)
            .map_err(|source| StartError::Tls { what: "upstream TLS", source })?;
        let client = Arc::new(client);
        let telemetry = telemetry::Telemetry::start(&config.telemetry, metrics.telemetry_spans_dropped.clone())
            .map_err(|e| StartError::Telemetry(e.to_string()))?;
        let proxy = build_proxy(&config, &engine, &client, &metrics, telemetry.as_ref())?;
        Ok(App {
            config,
            config_path: None,
            metrics,
            engine: Arc::new(ArcSwap::from_pointee(engine)),
            proxy: Arc::new(ArcSwap::from_pointee(proxy)),
            client,
            telemetry,
        })
    }

    /// Lets SIGHUP and `POST /admin/reload` re-read the config from `path`.
    pub fn reload_from(mut self, path: impl Into<PathBuf>) -> App {
        self.config_path = Some(path.into());
        self
    }

    /// The current token engine (for the admin API and tests).
    pub fn engine(&self) -> Arc<TokenEngine> {
        self.engine.load_full()
    }

    /// Starts the token engine's background work (startup calls, proactive refreshes), traced when telemetry is on.
    pub fn spawn_engine(&self) {
        self.engine.load().spawn_traced(self.telemetry.as_ref());
    }

    /// Exports the spans finished so far, when telemetry is on (at most `within`).
    pub async fn flush_telemetry(&self, within: Duration) {
        if let Some(telemetry) = &self.telemetry {
            telemetry.flush(within).await;
        }
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Serves one caller connection as the proxy listener does (the h1 transport, then hyper), until it ends:
    /// for tests and embedders that bring their own connection. Tokens come from the engine, which must be running
    /// ([`TokenEngine::spawn`]).
    pub async fn serve_connection<I>(&self, io: I, peer: SocketAddr)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let handler = Arc::new(ProxyHandler(Arc::clone(&self.proxy)));
        let (_never, shutdown) = watch::channel(false);
        server::plain_connection(io, peer, handler, self.config.server.header_read_timeout, shutdown).await;
    }

    /// One summary line per route and provider: what this config will do.
    pub fn summary(&self) -> Vec<String> {
        summary(&self.config)
    }

    /// Binds the proxy and admin listeners of the config.
    pub async fn bind(self) -> Result<BoundApp, StartError> {
        let proxy_addr = self.config.server.listen;
        let admin_addr = self.config.admin.listen;
        let proxy_listener = TcpListener::bind(proxy_addr).await.map_err(|source| StartError::Bind {
            addr: proxy_addr,
            what: "server.listen",
            source,
        })?;
        let admin_listener = TcpListener::bind(admin_addr).await.map_err(|source| StartError::Bind {
            addr: admin_addr,
            what: "admin.listen",
            source,
        })?;
        let vending_listener = match &self.config.vending.listen {
            Some(VendingListen::Tcp(addr)) => {
                Some(VendingListener::Tcp(TcpListener::bind(addr).await.map_err(|source| StartError::Bind {
                    addr: *addr,
                    what: "vending.listen",
                    source,
                })?))
            }
            Some(VendingListen::Unix(path)) => Some(VendingListener::Unix(
                vending::bind_unix(path).map_err(|source| StartError::Socket { path: path.clone(), source })?,
                path.clone(),
            )),
            None => None,
        };
        let tls = match &self.config.server.tls {
            Some(tls) => {
                let config = tls::server_config(&tls.cert_file, &tls.key_file)
                    .map_err(|source| StartError::Tls { what: "server.tls", source })?;
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
            }
            None => None,
        };
        Ok(BoundApp { app: self, proxy_listener, admin_listener, vending_listener, tls })
    }
}

fn build_proxy(
    config: &Config,
    engine: &TokenEngine,
    client: &Arc<UpstreamClient>,
    metrics: &Metrics,
    telemetry: Option<&Arc<telemetry::Telemetry>>,
) -> Result<Proxy, StartError> {
    let lookup = |name: &str| engine.binding(name);
    let routes =
        config.routes.iter().map(|r| Route::new(r, &lookup, metrics, client)).collect::<Result<Vec<_>, _>>()?;
    let mut routes = routes;
    for route in &mut routes {
        let provider = route.provider.as_deref().and_then(|name| config.providers.get(name));
        if let Some(provider) = provider {
            route.expects.audiences = provider.audience.iter().chain(&provider.resource).cloned().collect();
            route.expects.issuer = provider.issuer.as_ref().map(|issuer| issuer.to_string());
        }
    }
    let route_hosts = config.routes.iter().filter_map(|route| route.host.as_deref());
    let hosts = HostCheck::new(config.server.listen, config.server.allowed_hosts.as_deref(), route_hosts);
    Ok(Proxy::new(
        RouteTable::new(routes),
        (hosts, metrics.misdirected("proxy")),
        Arc::clone(client),
        ProxyOptions {
            replay_buffer: config.server.replay_buffer,
            request_timeout: config.server.request_timeout,
            tunnel_idle_timeout: config.server.tunnel_idle_timeout,
            access_log: config.log.access,
            h1_transport: config.server.h1_transport,
            telemetry: telemetry.cloned(),
            interceptor: proxy::intercept::Interceptor::new(config)
                .map_err(|e| StartError::Intercept(e.to_string()))?
                .map(Arc::new),
        },
        metrics.unrouted(),
    ))
}

fn summary(config: &Config) -> Vec<String> {
    let mut lines = Vec::new();
    for route in &config.routes {
        let matcher = match (&route.host, route.prefix.as_str()) {
            (Some(host), "/") => format!("host {host}"),
            (Some(host), prefix) => format!("host {host} prefix {prefix}"),
            (None, prefix) => format!("prefix {prefix}"),
        };
        let token = match &route.provider {
            Some(p) => format!("token of provider {p}"),
            None => "no token (pass-through)".to_owned(),
        };
        lines.push(format!(
            "route {}: {matcher} -> {}{} with {token}",
            route.name,
            route.upstream,
            if route.strip_prefix { " (prefix stripped)" } else { "" }
        ));
    }
    for (name, provider) in &config.providers {
        let endpoint = match (&provider.token_url, &provider.issuer) {
            (Some(url), _) => url.to_string(),
            (None, Some(issuer)) => format!("discovered from {issuer}"),
            (None, None) => "?".to_owned(),
        };
        lines.push(format!(
            "provider {name}: {} grant as client {} ({}) at {endpoint}{}",
            provider.grant.as_str(),
            provider.client_id,
            provider.client_auth.as_str(),
            provider.scope.as_deref().map(|s| format!(", scope \"{s}\"")).unwrap_or_default()
        ));
    }
    lines
}

/// Reloads the config of a running app (SIGHUP, `POST /admin/reload`).
struct AppReloader {
    path: Option<PathBuf>,
    running: Config,
    metrics: Arc<Metrics>,
    engine: Arc<ArcSwap<TokenEngine>>,
    proxy: Arc<ArcSwap<Proxy>>,
    client: Arc<UpstreamClient>,
    telemetry: Option<Arc<telemetry::Telemetry>>,
    /// One reload at a time.
    lock: std::sync::Mutex<()>,
}

impl Reload for AppReloader {
    fn reload(&self) -> Result<String, Vec<String>> {
        let _one_at_a_time = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let outcome = self.try_reload();
        let label = if outcome.is_ok() { "success" } else { "error" };
        self.metrics.config_reloaded(label);
        match &outcome {
            Ok(summary) => tracing::info!("config reloaded: {summary}"),
            Err(errors) => {
                tracing::error!("config reload refused, the running config is kept:");
                for error in errors {
                    tracing::error!("  {error}");
                }
            }
        }
        outcome
    }
}

impl AppReloader {
    fn try_reload(&self) -> Result<String, Vec<String>> {
        let Some(path) = &self.path else {
            return Err(vec!["this tokenproxy was started without a config file: nothing to reload".to_owned()]);
        };
        let config = Config::load(path).map_err(|error| match error {
            config::ConfigError::Invalid(problems) => problems.iter().map(ToString::to_string).collect(),
            other => vec![other.to_string()],
        })?;
        let old = self.engine.load_full();
        let (engine, changes) = old.rebuild(&config, &self.metrics).map_err(|e| vec![e.to_string()])?;
        let proxy = build_proxy(&config, &engine, &self.client, &self.metrics, self.telemetry.as_ref())
            .map_err(|e| vec![e.to_string()])?;
        let restart_needed = restart_needed(&self.running, &config);
        // Routes switch atomically: a request sees the old table or the new one, never a mix.
        self.engine.store(Arc::new(engine));
        self.engine.load().spawn_traced(self.telemetry.as_ref());
        self.proxy.store(Arc::new(proxy));
        for key in &restart_needed {
            tracing::warn!("{key} changed: it takes effect at the next restart");
        }
        Ok(format!(
            "{} route(s); providers kept with their tokens: [{}], started: [{}], removed: [{}]{}",
            config.routes.len(),
            changes.kept.join(", "),
            changes.started.join(", "),
            changes.removed.join(", "),
            if restart_needed.is_empty() {
                String::new()
            } else {
                format!("; needs a restart: {}", restart_needed.join(", "))
            }
        ))
    }
}

/// Settings a reload cannot apply to a running process.
fn restart_needed(running: &Config, new: &Config) -> Vec<&'static str> {
    let (a, b) = (&running.server, &new.server);
    let mut keys = Vec::new();
    if a.listen != b.listen {
        keys.push("server.listen");
    }
    if a.tls.as_ref().map(|t| (&t.cert_file, &t.key_file)) != b.tls.as_ref().map(|t| (&t.cert_file, &t.key_file)) {
        keys.push("server.tls");
    }
    if a.max_connections != b.max_connections {
        keys.push("server.max_connections");
    }
    if a.header_read_timeout != b.header_read_timeout {
        keys.push("server.header_read_timeout");
    }
    if a.keepalive_timeout != b.keepalive_timeout {
        keys.push("server.keepalive_timeout");
    }
    if a.shutdown_grace != b.shutdown_grace {
        keys.push("server.shutdown_grace");
    }
    if a.worker_threads != b.worker_threads {
        keys.push("server.worker_threads");
    }
    if a.max_idle_upstream_connections != b.max_idle_upstream_connections {
        keys.push("server.max_idle_upstream_connections");
    }
    if running.admin.listen != new.admin.listen {
        keys.push("admin.listen");
    }
    if running.admin.allowed_hosts != new.admin.allowed_hosts {
        keys.push("admin.allowed_hosts");
    }
    if running.vending.listen != new.vending.listen {
        keys.push("vending.listen");
    }
    if running.vending.allowed_hosts != new.vending.allowed_hosts {
        keys.push("vending.allowed_hosts");
    }
    if running.log.format != new.log.format || running.log.level != new.log.level {
        keys.push("log");
    }
    keys
}

/// An [`App`] with its listeners bound, ready to run.
pub struct BoundApp {
    app: App,
    proxy_listener: TcpListener,
    admin_listener: TcpListener,
    vending_listener: Option<VendingListener>,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// The vending listener, on TCP or on a unix socket (with its path, removed at shutdown).
enum VendingListener {
    Tcp(TcpListener),
    Unix(tokio::net::UnixListener, std::path::PathBuf),
}

/// Connections the admin (and vending) listener serves at once.
const ADMIN_CONNECTIONS: usize = 64;

/// The admin (and vending) listener's timeouts: a request head within 5 s, and an idle connection closed after 5 s.
const ADMIN_TIMEOUTS: Timeouts = Timeouts { header_read: Duration::from_secs(5), keepalive: Duration::from_secs(5) };

/// How often `*_file` secrets are checked for a change.
const SECRET_FILE_CHECK: Duration = Duration::from_secs(2);

impl BoundApp {
    /// The proxy listener's address (useful with port 0).
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_listener.local_addr().unwrap_or(self.app.config.server.listen)
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_listener.local_addr().unwrap_or(self.app.config.admin.listen)
    }

    /// The vending listener's address, when there is one.
    pub fn vending_addr(&self) -> Option<SocketAddr> {
        match &self.vending_listener {
            Some(VendingListener::Tcp(listener)) => listener.local_addr().ok(),
            _ => None,
        }
    }

    /// The current token engine.
    pub fn engine(&self) -> Arc<TokenEngine> {
        self.app.engine()
    }

    /// Runs until `shutdown` completes: fetches tokens, serves connections on the calling runtime, then drains
    /// within `shutdown_grace`.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        self.run_with(shutdown, RunOptions::default()).await
    }

    /// [`BoundApp::run`] with options: worker runtimes for the proxy's connections, reload on SIGHUP.
    pub async fn run_with(self, shutdown: impl Future<Output = ()> + Send, options: RunOptions) {
        let RunOptions { workers, reload_on_sighup } = options;
        let BoundApp { app, proxy_listener, admin_listener, vending_listener, tls } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let stop = Shutdown::new(stop_rx.clone());
        app.spawn_engine();
        let reloader = Arc::new(AppReloader {
            path: app.config_path.clone(),
            running: app.config.clone(),
            metrics: Arc::clone(&app.metrics),
            engine: Arc::clone(&app.engine),
            proxy: Arc::clone(&app.proxy),
            client: Arc::clone(&app.client),
            telemetry: app.telemetry.clone(),
            lock: std::sync::Mutex::new(()),
        });
        let server = &app.config.server;
        let proxy_options = ListenerOptions {
            max_connections: server.max_connections,
            timeouts: Timeouts { header_read: server.header_read_timeout, keepalive: server.keepalive_timeout },
            shutdown_grace: server.shutdown_grace,
            tls,
            metrics: Some(app.metrics.listener("proxy")),
        };
        // The admin listener answers the kubelet's probes whatever other connections do: short timeouts, and idle
        // connections give way at its limit.
        let admin_options = ListenerOptions {
            max_connections: ADMIN_CONNECTIONS,
            timeouts: ADMIN_TIMEOUTS,
            shutdown_grace: server.shutdown_grace,
            tls: None,
            metrics: Some(app.metrics.listener("admin")),
        };
        let vending_options =
            ListenerOptions { metrics: Some(app.metrics.listener("vending")), ..admin_options.clone() };
        let proxy = Arc::new(ProxyHandler(Arc::clone(&app.proxy)));
        let admin_hosts = HostCheck::new(app.config.admin.listen, app.config.admin.allowed_hosts.as_deref(), []);
        let admin = Arc::new(HostChecked(
            Admin::new(
                Arc::clone(&app.engine),
                Arc::clone(&app.metrics),
                Some(Arc::clone(&reloader) as Arc<dyn Reload>),
            ),
            ListenerHosts::new(admin_hosts, &app.metrics, "admin"),
        ));
        let proxy_task =
            tokio::spawn(server::run_listener(proxy_listener, proxy, proxy_options, stop_rx.clone(), workers.clone()));
        let admin_task =
            tokio::spawn(server::run_listener(admin_listener, admin, admin_options, stop_rx.clone(), None));
        let vending_task = vending_listener.map(|listener| {
            let vending = |hosts| {
                let api = vending::Vending::new(Arc::clone(&app.engine), Arc::clone(&app.metrics));
                Arc::new(HostChecked(api, ListenerHosts::new(hosts, &app.metrics, "vending")))
            };
            match listener {
                VendingListener::Tcp(listener) => {
                    let allowed = app.config.vending.allowed_hosts.as_deref();
                    let hosts = listener.local_addr().map_or_else(
                        |_| HostCheck::new(SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0)), allowed, []),
                        |addr| HostCheck::new(addr, allowed, []),
                    );
                    tokio::spawn(server::run_listener(listener, vending(hosts), vending_options, stop_rx.clone(), None))
                }
                // A unix socket has no Host to rebind: its file mode decides who may ask.
                VendingListener::Unix(listener, path) => {
                    let serving = server::run_listener(
                        listener,
                        vending(HostCheck::off()),
                        vending_options,
                        stop_rx.clone(),
                        None,
                    );
                    tokio::spawn(async move {
                        serving.await;
                        let _ = std::fs::remove_file(&path);
                    })
                }
            }
        });
        tokio::spawn(token::watch_secret_files(Arc::clone(&app.engine), SECRET_FILE_CHECK, stop.clone()));
        tokio::spawn(return_memory_when_idle(Arc::clone(&app.metrics), workers, stop.clone()));
        if reload_on_sighup {
            tokio::spawn(reload_on_hangup(Arc::clone(&reloader), stop));
        }
        shutdown.await;
        tracing::info!("shutting down: draining in-flight requests");
        let _ = stop_tx.send(true);
        let _ = proxy_task.await;
        let _ = admin_task.await;
        if let Some(task) = vending_task {
            let _ = task.await;
        }
        app.engine.load_full().shutdown().await;
        app.flush_telemetry(Duration::from_secs(5)).await;
    }
}

/// How [`BoundApp::run_with`] runs.
#[derive(Default)]
pub struct RunOptions {
    /// Serve the proxy's connections on these worker runtimes (else on the calling runtime).
    pub workers: Option<Arc<server::WorkerPool>>,
    /// Reload the config on SIGHUP (needs [`App::reload_from`]).
    pub reload_on_sighup: bool,
}

/// Gives memory freed after a burst back to the OS once no request is in flight.
///
/// glibc's malloc keeps freed memory in its arenas: after 10,000 connections closed, a proxy idling at 20 MB stayed
/// at 340 MB (tests/cold_start.rs). `malloc_trim` returns it; it runs only when idle, so it never adds latency under
/// load: within a second or two of the last request of a burst, and every 10 s while idle. Before it, each worker
/// frees the request buffers it kept for the next requests (the h1 transport's spares: tens of KiB per request that
/// was in flight at once). (musl's allocator, in the static image, returns memory by itself.)
async fn return_memory_when_idle(
    metrics: Arc<Metrics>,
    workers: Option<Arc<server::WorkerPool>>,
    mut shutdown: Shutdown,
) {
    const IDLE_EVERY: u32 = 10;
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Seconds since the last trim; a tick that saw requests in flight makes the next idle one trim at once.
    let mut since_trim = 0;
    let mut busy = false;
    loop {
        tokio::select! {
            () = shutdown.recv() => return,
            _ = ticks.tick() => {
                since_trim += 1;
                if metrics.inflight() != 0 {
                    busy = true;
                    continue;
                }
                if !busy && since_trim < IDLE_EVERY {
                    continue;
                }
                (busy, since_trim) = (false, 0);
                if let Some(workers) = &workers {
                    workers.on_each(proxy::h1::connection::release_spares).await;
                }
                #[cfg(all(target_os = "linux", target_env = "gnu"))]
                // SAFETY: malloc_trim has no preconditions.
                let _ = tokio::task::spawn_blocking(|| unsafe { libc::malloc_trim(0) }).await;
            }
        }
    }
}

/// Reloads on every SIGHUP until shutdown.
async fn reload_on_hangup(reloader: Arc<AppReloader>, mut shutdown: Shutdown) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP: reload with POST /admin/reload instead");
            return;
        };
        loop {
            tokio::select! {
                () = shutdown.recv() => return,
                Some(()) = hangups.recv() => {
                    let reloader = Arc::clone(&reloader);
                    let _ = tokio::task::spawn_blocking(move || reloader.reload()).await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (reloader, shutdown);
    }
}
