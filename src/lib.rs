//! tokenproxy: a reverse proxy that attaches fresh OAuth2 access tokens to every request.
//!
//! Module map (dependencies point one way: `config` and `metrics` import nothing of ours, `token` knows nothing of
//! `proxy`, `admin` never imports `proxy`, and only this file wires the parts together):
//! - [`config`]: figment layers → validated, typed [`config::Config`], every error with its key and source;
//! - [`metrics`]: the Prometheus registry and typed handles; the only place metric names are defined;
//! - [`tls`]: rustls server and client configurations;
//! - [`token`]: the token engine: slots, single flight, generations, the refresher tasks, the IdP client;
//! - [`proxy`]: the request path: routing, header rewriting, token injection, 401 replay, problem+json errors;
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics`, `/tokens`;
//! - [`server`]: listeners, connection limits, graceful shutdown;
//! - [`demo`]: the in-process demo IdP and upstream behind `tokenproxy demo`.

pub mod admin;
pub mod config;
pub mod demo;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod tls;
pub mod token;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::Admin;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::route::{Route, RouteTable};
use crate::proxy::{Connection, Proxy, ProxyBody, UpstreamClient};
use crate::server::{Handler, ListenerOptions};
use crate::token::{TokenEngine, TokenSource};

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
}

/// Every part of a running tokenproxy, wired from one [`Config`].
pub struct App {
    config: Config,
    metrics: Arc<Metrics>,
    engine: Arc<TokenEngine>,
    proxy: Arc<Proxy>,
}

impl App {
    /// Builds the token engine, the routes and the proxy from `config` (nothing runs yet).
    pub fn build(config: Config) -> Result<App, StartError> {
        let metrics = Arc::new(Metrics::new());
        let engine = Arc::new(
            TokenEngine::new(&config, &metrics)
                .map_err(|source| StartError::Tls { what: "providers (ca_file, client_cert_file)", source })?,
        );
        let lookup = |name: &str| engine.slot(name).map(|slot| slot as Arc<dyn TokenSource>);
        let routes = config.routes.iter().map(|r| Route::new(r, &lookup, &metrics)).collect::<Result<Vec<_>, _>>()?;
        let client = UpstreamClient::new().map_err(|source| StartError::Tls { what: "upstream TLS", source })?;
        let proxy = Arc::new(Proxy::new(
            RouteTable::new(routes),
            client,
            config.server.replay_buffer,
            config.server.request_timeout,
            metrics.unrouted(),
        ));
        Ok(App { config, metrics, engine, proxy })
    }

    /// The token engine (for the admin API and tests).
    pub fn engine(&self) -> &Arc<TokenEngine> {
        &self.engine
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
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
        let tls = match &self.config.server.tls {
            Some(tls) => {
                let config = tls::server_config(&tls.cert_file, &tls.key_file)
                    .map_err(|source| StartError::Tls { what: "server.tls", source })?;
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
            }
            None => None,
        };
        Ok(BoundApp { app: self, proxy_listener, admin_listener, tls })
    }
}

/// An [`App`] with its listeners bound, ready to run.
pub struct BoundApp {
    app: App,
    proxy_listener: TcpListener,
    admin_listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl BoundApp {
    /// The proxy listener's address (useful with port 0).
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_listener.local_addr().unwrap_or(self.app.config.server.listen)
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_listener.local_addr().unwrap_or(self.app.config.admin.listen)
    }

    /// The token engine.
    pub fn engine(&self) -> &Arc<TokenEngine> {
        &self.app.engine
    }

    /// Runs until `shutdown` completes: fetches tokens, serves, then drains within `shutdown_grace`.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let BoundApp { app, proxy_listener, admin_listener, tls } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let refreshers = app.engine.spawn(&stop_rx);
        let server = &app.config.server;
        let proxy_options = ListenerOptions {
            max_connections: server.max_connections,
            header_read_timeout: server.header_read_timeout,
            shutdown_grace: server.shutdown_grace,
            tls,
        };
        let admin_options = ListenerOptions { max_connections: 64, tls: None, ..proxy_options.clone() };
        let proxy = Arc::new(ProxyHandler(Arc::clone(&app.proxy)));
        let admin = Arc::new(AdminHandler(Admin::new(Arc::clone(&app.engine), Arc::clone(&app.metrics))));
        let proxy_task = tokio::spawn(server::serve(proxy_listener, proxy, proxy_options, stop_rx.clone()));
        let admin_task = tokio::spawn(server::serve(admin_listener, admin, admin_options, stop_rx.clone()));
        shutdown.await;
        tracing::info!("shutting down: draining in-flight requests");
        let _ = stop_tx.send(true);
        let _ = proxy_task.await;
        let _ = admin_task.await;
        for refresher in refreshers {
            refresher.abort();
        }
    }
}

struct ProxyHandler(Arc<Proxy>);

impl Handler for ProxyHandler {
    type Body = ProxyBody;

    async fn call(self: &Arc<Self>, request: Request<Incoming>, peer: SocketAddr, tls: bool) -> Response<ProxyBody> {
        self.0.handle(request, Connection { peer, tls }).await
    }
}

struct AdminHandler(Admin);

impl Handler for AdminHandler {
    type Body = Full<bytes::Bytes>;

    async fn call(self: &Arc<Self>, request: Request<Incoming>, _peer: SocketAddr, _tls: bool) -> Response<Self::Body> {
        self.0.handle(request).await
    }
}

/// An error and its chain of causes on one line (hyper's errors say little without their sources).
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Completes once `shutdown` holds `true` (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped within this statement, so callers' futures stay `Send`.
    let _ = shutdown.wait_for(|stop| *stop).await.is_ok();
}
