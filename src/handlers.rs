//! The [`Handler`]s of the listeners: what the server calls for each connection and request of the proxy, admin
//! and vending listeners. They adapt the proxy, the admin API and the vending API to the server's trait; the admin
//! and vending listeners check `Host` first (the proxy's check is a phase of the proxy).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::activity::{Activity, Ended, Timeouts};
use crate::admin::Admin;
use crate::host_check::{self, HostCheck};
use crate::metrics::Metrics;
use crate::proxy::{self, Connection, Proxy, ProxyBody};
use crate::server::Handler;
use crate::vending::Vending;

/// The proxy listener's handler: each request goes to the proxy as it is when the request arrives.
pub(crate) struct ProxyHandler(pub(crate) Arc<ArcSwap<Proxy>>);

impl Handler for ProxyHandler {
    type Body = ProxyBody;
    type Connection = Connection;

    fn connection(&self, peer: SocketAddr, tls: bool) -> Connection {
        Connection::new(peer, tls)
    }

    async fn call(self: &Arc<Self>, request: Request<Incoming>, connection: &Arc<Connection>) -> Response<ProxyBody> {
        // A CONNECT is a tunnel when a route intercepts its host, else refused (src/proxy/intercept.rs).
        if request.method() == http::Method::CONNECT {
            return proxy::intercept::connect(&self.0, request, connection).await;
        }
        // The routes as they are when the request arrives; a reload does not change them under it.
        let proxy = self.0.load_full();
        proxy.handle(request, connection).await
    }

    fn serve_h1<'a, 'b, 'c, I: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        self: &'a Arc<Self>,
        io: I,
        connection: &'b Arc<Connection>,
        shutdown: watch::Receiver<bool>,
        timeouts: Timeouts,
        activity: &'c Activity,
    ) -> impl Future<Output = Ended<I>> + Send + use<'a, 'b, 'c, I> {
        // The transport's own future, not one wrapping it: every idle connection holds it.
        proxy::h1::connection::drive(&self.0, connection, io, shutdown, timeouts, activity)
    }
}

/// What the admin and vending listeners serve: an API that answers every request with a small body.
pub(crate) trait Api: Send + Sync + 'static {
    /// The answer to `request`.
    fn handle(&self, request: Request<Incoming>) -> impl Future<Output = Response<Full<bytes::Bytes>>> + Send;
}

impl Api for Admin {
    fn handle(&self, request: Request<Incoming>) -> impl Future<Output = Response<Full<bytes::Bytes>>> + Send {
        Admin::handle(self, request)
    }
}

impl Api for Vending {
    fn handle(&self, request: Request<Incoming>) -> impl Future<Output = Response<Full<bytes::Bytes>>> + Send {
        Vending::handle(self, request)
    }
}

/// The admin or vending listener's handler: its API behind the listener's `Host` check.
pub(crate) struct HostChecked<A>(pub(crate) A, pub(crate) ListenerHosts);

impl<A: Api> Handler for HostChecked<A> {
    type Body = Full<bytes::Bytes>;
    type Connection = ();

    fn connection(&self, _peer: SocketAddr, _tls: bool) {}

    async fn call(self: &Arc<Self>, request: Request<Incoming>, _connection: &Arc<()>) -> Response<Self::Body> {
        match self.1.refuse(&request) {
            Some(refusal) => refusal,
            None => self.0.handle(request).await,
        }
    }
}

/// The `Host` check of the admin or vending listener (the proxy's is a phase of the proxy: `Proxy::admit`).
pub(crate) struct ListenerHosts {
    check: HostCheck,
    refused: prometheus::IntCounter,
    /// The config section of the listener (`admin`, `vending`).
    section: &'static str,
}

impl ListenerHosts {
    pub(crate) fn new(check: HostCheck, metrics: &Metrics, section: &'static str) -> ListenerHosts {
        ListenerHosts { check, refused: metrics.misdirected(section), section }
    }

    /// The 421 problem+json answer to a request whose `Host` this listener does not answer (counted), if it does not.
    fn refuse<B>(&self, request: &Request<B>) -> Option<Response<Full<bytes::Bytes>>> {
        let host = host_check::requested_host(request.version(), request.uri(), request.headers());
        if self.check.admits(host) {
            return None;
        }
        self.refused.inc();
        let error = proxy::ProxyError::Misdirected(proxy::misdirected_detail(self.section));
        let (parts, body) = error.into_parts(&proxy::ErrorContext::default());
        Some(Response::from_parts(parts, Full::new(body)))
    }
}
