//! hyper's side of the upstream client: the connector (TLS upstreams through hyper-rustls, offering h2 and
//! http/1.1 by ALPN; plain ones through the [`Dial`]) and the pool settings.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::Scheme;
use http::Uri;
use hyper_rustls::{FixedServerNameResolver, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use super::{Dial, PooledClient, UpstreamStream, CONNECT_TIMEOUT, IDLE_TIMEOUT};
use crate::tls::{client_config, ClientTls, TlsError};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// HTTPS connectors with `tls`'s trust, verifying `server_name` (and sending it as SNI) instead of the URL's host when
/// it is set: one offering h2 and http/1.1 by ALPN, one offering http/1.1 only (for an upgrade, which h2 cannot carry).
fn https_connectors(tls: &ClientTls<'_>, server_name: Option<ServerName<'static>>) -> Result<(Https, Https), TlsError> {
    let config = client_config(tls)?;
    let connector = |config, http2: bool| {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config).https_only();
        let builder = match &server_name {
            Some(name) => builder.with_server_name_resolver(FixedServerNameResolver::new(name.clone())),
            None => builder,
        };
        match http2 {
            true => builder.enable_http1().enable_http2().wrap_connector(http),
            false => builder.enable_http1().wrap_connector(http),
        }
    };
    Ok((connector(config.clone(), true), connector(config, false)))
}

/// Which HTTP version a pool speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocol {
    /// HTTP/1.1 to plain upstreams; h2 or HTTP/1.1 to TLS upstreams, as ALPN decides.
    Negotiated,
    /// h2 with prior knowledge (h2c on plain TCP).
    H2PriorKnowledge,
}

/// How long an h2 connection may stay silent before a PING checks it, and how long the answer may take: a
/// connection the network lost is found and closed even while no request uses it.
const H2_KEEP_ALIVE: (Duration, Duration) = (Duration::from_secs(30), Duration::from_secs(10));

/// A hyper pool over `connector`. h2 connections size their flow-control windows from the measured bandwidth-delay
/// product (hyper's adaptive window), so one connection multiplexing a worker's requests is not held to the
/// protocol's 64 KiB default window.
pub(super) fn pooled(connector: Connector, protocol: Protocol, max_idle: usize) -> PooledClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(IDLE_TIMEOUT)
        .pool_max_idle_per_host(max_idle)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .http2_only(protocol == Protocol::H2PriorKnowledge)
        .http2_adaptive_window(true)
        .http2_keep_alive_interval(H2_KEEP_ALIVE.0)
        .http2_keep_alive_timeout(H2_KEEP_ALIVE.1)
        .build(connector)
}

/// hyper's connector: TLS upstreams through hyper-rustls, plain ones through the [`Dial`].
#[derive(Clone)]
pub(super) struct Connector {
    https: Https,
    /// For upgrades: http/1.1 only by ALPN.
    https_http1: Https,
    dial: Arc<dyn Dial>,
}

impl Connector {
    /// A connector with `tls`'s trust and `server_name` (see [`https_connectors`]).
    pub(super) fn new(
        tls: &ClientTls<'_>,
        server_name: Option<ServerName<'static>>,
        dial: Arc<dyn Dial>,
    ) -> Result<Connector, TlsError> {
        let (https, https_http1) = https_connectors(tls, server_name)?;
        Ok(Connector { https, https_http1, dial })
    }

    /// A new connection to `uri`'s upstream that speaks HTTP/1.1 whatever the upstream offers (an upgrade).
    pub(super) async fn connect_http1(&self, uri: Uri) -> Result<UpstreamIo, BoxError> {
        if uri.scheme() == Some(&Scheme::HTTPS) {
            let stream = tower_service::Service::call(&mut self.https_http1.clone(), uri).await?;
            return Ok(UpstreamIo::Tls { stream: Box::new(stream), round_trips: RoundTrips::default() });
        }
        self.plain(uri).await
    }

    fn plain(&self, uri: Uri) -> impl Future<Output = Result<UpstreamIo, BoxError>> + Send + 'static {
        let dial = Arc::clone(&self.dial);
        async move {
            let authority = uri.authority().ok_or("the upstream URI has no authority")?.clone();
            let stream = dial.dial(&authority).await.map_err(|e| format!("connecting to {authority}: {e}"))?;
            Ok(UpstreamIo::Plain { stream: TokioIo::new(stream), round_trips: RoundTrips::default() })
        }
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = UpstreamIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.https.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        if uri.scheme() == Some(&Scheme::HTTPS) {
            let connecting = self.https.call(uri);
            return Box::pin(async move {
                Ok(UpstreamIo::Tls { stream: Box::new(connecting.await?), round_trips: RoundTrips::default() })
            });
        }
        Box::pin(self.plain(uri))
    }
}

/// A connection hyper's client uses.
pub(super) enum UpstreamIo {
    Tls { stream: Box<MaybeHttpsStream<TokioIo<TcpStream>>>, round_trips: RoundTrips },
    Plain { stream: TokioIo<UpstreamStream>, round_trips: RoundTrips },
}

/// RoundTrips a hyper connection has carried (an extra of its [`Connected`]), counted by [`UpstreamClient::send`]:
/// hyper does not say whether it reused a connection.
#[derive(Debug, Clone, Default)]
pub(super) struct RoundTrips(pub(super) Arc<AtomicU64>);

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        match self {
            UpstreamIo::Tls { stream, round_trips } => stream.connected().extra(round_trips.clone()),
            UpstreamIo::Plain { round_trips, .. } => Connected::new().extra(round_trips.clone()),
        }
    }
}

impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tls { stream: s, .. } => Pin::new(&mut **s).poll_read(cx, buf),
            UpstreamIo::Plain { stream: s, .. } => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tls { stream: s, .. } => Pin::new(&mut **s).poll_write(cx, buf),
            UpstreamIo::Plain { stream: s, .. } => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tls { stream: s, .. } => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
            UpstreamIo::Plain { stream: s, .. } => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Tls { stream: s, .. } => s.is_write_vectored(),
            UpstreamIo::Plain { stream: s, .. } => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tls { stream: s, .. } => Pin::new(&mut **s).poll_flush(cx),
            UpstreamIo::Plain { stream: s, .. } => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tls { stream: s, .. } => Pin::new(&mut **s).poll_shutdown(cx),
            UpstreamIo::Plain { stream: s, .. } => Pin::new(s).poll_shutdown(cx),
        }
    }
}
