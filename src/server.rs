//! Listeners: the accept loop shared by the proxy and admin listeners, with a connection limit, an optional TLS
//! handshake, HTTP/1.1 and h2c on one port (hyper-util `conn::auto`), and graceful draining on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

/// How a listener serves its connections.
#[derive(Clone)]
pub struct ListenerOptions {
    /// Connections beyond this wait in the kernel's backlog.
    pub max_connections: usize,
    /// Slowloris guard: a request head must arrive within this (also bounds the TLS handshake).
    pub header_read_timeout: Duration,
    /// How long in-flight requests may take to finish after shutdown starts.
    pub shutdown_grace: Duration,
    /// TLS for this listener.
    pub tls: Option<TlsAcceptor>,
}

/// Something that answers requests with the peer's address at hand.
pub trait Handler: Send + Sync + 'static {
    /// The response body type.
    type Body: Body<Data = bytes::Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send + 'static;
    /// Answers one request.
    fn call(
        self: &Arc<Self>,
        request: Request<Incoming>,
        peer: SocketAddr,
        tls: bool,
    ) -> impl Future<Output = Response<Self::Body>> + Send;
}

/// Accepts connections on `listener` until `shutdown` turns true, then drains for at most `shutdown_grace`.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    options: ListenerOptions,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(options.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let limit = Arc::new(Semaphore::new(options.max_connections));
    loop {
        let permit = tokio::select! {
            biased;
            () = crate::stopped(&mut shutdown) => break,
            permit = Arc::clone(&limit).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            () = crate::stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and friends: back off a little instead of spinning.
                    tracing::warn!("accept failed: {error}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let handler = Arc::clone(&handler);
        let builder = Arc::clone(&builder);
        match &options.tls {
            None => {
                let connection = serve_io(&builder, TokioIo::new(stream), handler, peer, false);
                let connection = graceful.watch(connection.into_owned());
                tokio::spawn(async move {
                    let _ = connection.await;
                    drop(permit);
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let handshake_timeout = options.header_read_timeout;
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, "TLS handshake failed: {error}");
                            return;
                        }
                        Err(_) => return,
                    };
                    let connection = serve_io(&builder, TokioIo::new(tls), handler, peer, true);
                    let _ = watcher.watch(connection.into_owned()).await;
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(options.shutdown_grace, graceful.shutdown()).await.is_err() {
        tracing::warn!("shutdown_grace ({:?}) passed with requests still in flight", options.shutdown_grace);
    }
}

fn serve_io<'a, H, I>(
    builder: &'a auto::Builder<TokioExecutor>,
    io: TokioIo<I>,
    handler: Arc<H>,
    peer: SocketAddr,
    tls: bool,
) -> auto::Connection<
    'a,
    TokioIo<I>,
    impl hyper::service::Service<
            Request<Incoming>,
            Response = Response<H::Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + Send
        + 'static,
    TokioExecutor,
>
where
    H: Handler,
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request: Request<Incoming>| {
        let handler = Arc::clone(&handler);
        async move { Ok::<_, Infallible>(handler.call(request, peer, tls).await) }
    });
    builder.serve_connection(io, service)
}

/// Completes on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(term) => term,
            Err(error) => {
                tracing::warn!("cannot listen for SIGTERM: {error}");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
