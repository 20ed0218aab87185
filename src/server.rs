//! Listeners: the accept loop shared by the proxy and admin listeners, with a connection limit, an optional TLS
//! handshake, HTTP/1.1 and h2c on one port (hyper-util `conn::auto`), and graceful draining on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
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

use crate::proxy::Ended;

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

/// Something that answers requests, with per-connection state at hand.
pub trait Handler: Send + Sync + 'static {
    /// The response body type.
    type Body: Body<Data = bytes::Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send + 'static;
    /// What the handler keeps per connection (the peer's address, an upstream connection, …).
    type Connection: Send + Sync + 'static;
    /// Called once per accepted connection.
    fn connection(&self, peer: SocketAddr, tls: bool) -> Self::Connection;
    /// Answers one request.
    fn call(
        self: &Arc<Self>,
        request: Request<Incoming>,
        connection: &Arc<Self::Connection>,
    ) -> impl Future<Output = Response<Self::Body>> + Send;

    /// Serves a new connection's HTTP/1.1 requests itself for as long as it can, and hands the rest of the connection
    /// to hyper with the bytes already read (see `proxy::direct`). By default everything goes to hyper.
    fn serve_direct<I: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        self: &Arc<Self>,
        io: I,
        _connection: &Arc<Self::Connection>,
        _shutdown: watch::Receiver<bool>,
        _header_read_timeout: Duration,
    ) -> impl Future<Output = crate::proxy::Ended<I>> + Send {
        std::future::ready(crate::proxy::Ended::Handoff { io, buffered: bytes::Bytes::new() })
    }
}

/// Runtimes that serve connections: one `current_thread` tokio runtime per thread, fed round-robin by the accept
/// loop. On a small machine shared with the upstream and the load, this beats a work-stealing runtime: no task
/// migration, no cross-thread wake-ups, and each connection's upstream connection lives on the same thread.
pub struct WorkerPool {
    handles: Vec<tokio::runtime::Handle>,
    next: std::sync::atomic::AtomicUsize,
    _stop: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl WorkerPool {
    /// Starts `threads` worker threads (at least one); they stop when the pool is dropped.
    pub fn start(threads: usize) -> std::io::Result<WorkerPool> {
        let mut handles = Vec::new();
        let mut stops = Vec::new();
        for i in 0..threads.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            handles.push(runtime.handle().clone());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            stops.push(stop);
            std::thread::Builder::new().name(format!("tokenproxy-worker-{i}")).spawn(move || {
                crate::proxy::UpstreamClient::set_worker(i);
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        }
        Ok(WorkerPool { handles, next: std::sync::atomic::AtomicUsize::new(0), _stop: stops })
    }

    /// The next worker, round-robin.
    fn next(&self) -> usize {
        self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.handles.len()
    }

    /// One receiver of `shutdown` per worker, fed on that worker's thread: a worker's connections then watch for
    /// shutdown without sharing a lock with the other workers' connections.
    fn local_shutdowns(&self, shutdown: &watch::Receiver<bool>) -> Vec<watch::Receiver<bool>> {
        self.handles
            .iter()
            .map(|handle| {
                let (local, receiver) = watch::channel(*shutdown.borrow());
                let mut global = shutdown.clone();
                handle.spawn(async move {
                    tokio::select! {
                        () = crate::stopped(&mut global) => {
                            let _ = local.send(true);
                        }
                        () = local.closed() => {}
                    }
                });
                receiver
            })
            .collect()
    }
}

/// Accepts connections on `listener` until `shutdown` turns true, then drains for at most `shutdown_grace`.
/// Connections are served on `workers` when given, else on the calling runtime.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    options: ListenerOptions,
    mut shutdown: watch::Receiver<bool>,
    workers: Option<Arc<WorkerPool>>,
) {
    let builder = Arc::new(hyper_builder(options.header_read_timeout));
    let graceful = GracefulShutdown::new();
    let limit = Arc::new(Semaphore::new(options.max_connections));
    let local_shutdowns = workers.as_ref().map(|workers| workers.local_shutdowns(&shutdown));
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
        let worker = workers.as_ref().map(|workers| workers.next());
        let connection_shutdown = match (worker, &local_shutdowns) {
            (Some(i), Some(locals)) => locals[i].clone(),
            _ => shutdown.clone(),
        };
        let connection = serve_connection(
            stream,
            peer,
            Arc::clone(&handler),
            Arc::clone(&builder),
            options.tls.clone(),
            options.header_read_timeout,
            (graceful.watcher(), connection_shutdown),
            (workers.is_some(), permit),
        );
        match (&workers, worker) {
            (Some(workers), Some(i)) => {
                workers.handles[i].spawn(connection);
            }
            _ => {
                tokio::spawn(connection);
            }
        }
    }
    drop(listener);
    // Hyper's connections are told to finish; the direct path's see `shutdown` themselves. Every connection holds a
    // permit until it ends.
    let drained = async {
        graceful.shutdown().await;
        let all = u32::try_from(options.max_connections).unwrap_or(u32::MAX);
        let _ = limit.acquire_many(all).await;
    };
    if tokio::time::timeout(options.shutdown_grace, drained).await.is_err() {
        tracing::warn!("shutdown_grace ({:?}) passed with requests still in flight", options.shutdown_grace);
    }
}

/// hyper's server settings: HTTP/1.1 and h2c on one port, the slowloris guard on request heads.
fn hyper_builder(header_read_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    builder
}

/// Serves one plain (unencrypted) connection the way the listener does: the handler's own HTTP/1.1 transport first,
/// then hyper (HTTP/1.1 and h2c) for the rest of the connection. The listener adds TLS, the connection limit and
/// graceful draining; this is for tests and embedders that bring their own connection (an in-memory one, say).
pub async fn serve_plain<H, I>(
    io: I,
    peer: SocketAddr,
    handler: Arc<H>,
    header_read_timeout: Duration,
    shutdown: watch::Receiver<bool>,
) where
    H: Handler,
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let state = Arc::new(handler.connection(peer, false));
    if let Ended::Handoff { io, buffered } = handler.serve_direct(io, &state, shutdown, header_read_timeout).await {
        let builder = hyper_builder(header_read_timeout);
        let _ = serve_io(&builder, TokioIo::new(Rewind::new(io, buffered)), handler, state).await;
    }
}

/// Serves one connection to its end: TLS handshake if any, then HTTP/1.1 or h2, under the graceful watcher.
#[allow(clippy::too_many_arguments)]
async fn serve_connection<H: Handler>(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    handler: Arc<H>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    tls: Option<TlsAcceptor>,
    header_read_timeout: Duration,
    (watcher, shutdown): (hyper_util::server::graceful::Watcher, watch::Receiver<bool>),
    // The connection's permit is held until the function returns. (Spawning `async { serve_connection(..).await;
    // drop(permit) }` instead would keep two copies of this future's state in the task.)
    (moved, _permit): (bool, tokio::sync::OwnedSemaphorePermit),
) {
    // A connection handed to a worker runtime is registered with that runtime's reactor.
    let stream = if moved {
        match stream.into_std().and_then(tokio::net::TcpStream::from_std) {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(%peer, "cannot move the connection to a worker: {error}");
                return;
            }
        }
    } else {
        stream
    };
    let state = Arc::new(handler.connection(peer, tls.is_some()));
    match tls {
        None => {
            let ended = handler.serve_direct(stream, &state, shutdown.clone(), header_read_timeout).await;
            if let Ended::Handoff { io, buffered } = ended {
                // Boxed, like the TLS branch, in a statement of its own (a temporary of an `.await` expression is kept
                // in the state): a connection's task is as large as its largest state, and an idle plain connection
                // served by the HTTP/1.1 transport should not carry hyper's.
                let connection = serve_io(&builder, TokioIo::new(Rewind::new(io, buffered)), handler, state);
                let hyper = Box::pin(drain(connection, watcher, shutdown));
                hyper.await;
            }
        }
        Some(acceptor) => {
            let tls = (&*builder, acceptor, header_read_timeout, (watcher, shutdown));
            let serving = Box::pin(serve_tls(stream, peer, handler, state, tls));
            serving.await;
        }
    }
}

/// What the TLS branch needs besides the connection: hyper's settings, the acceptor, the head timeout, the graceful
/// watcher and the shutdown signal.
type TlsSettings<'a> = (
    &'a auto::Builder<TokioExecutor>,
    TlsAcceptor,
    Duration,
    (hyper_util::server::graceful::Watcher, watch::Receiver<bool>),
);

/// The TLS branch of [`serve_connection`]: the handshake, then h2 (by ALPN) or the HTTP/1.1 transport and hyper.
async fn serve_tls<H: Handler>(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    handler: Arc<H>,
    state: Arc<H::Connection>,
    (builder, acceptor, header_read_timeout, (watcher, shutdown)): TlsSettings<'_>,
) {
    let tls = match tokio::time::timeout(header_read_timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            tracing::debug!(%peer, "TLS handshake failed: {error}");
            return;
        }
        Err(_) => return,
    };
    // A client that chose h2 by ALPN speaks it from the first byte.
    let ended = if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
        Ended::Handoff { io: tls, buffered: bytes::Bytes::new() }
    } else {
        handler.serve_direct(tls, &state, shutdown.clone(), header_read_timeout).await
    };
    if let Ended::Handoff { io, buffered } = ended {
        let connection = serve_io(builder, TokioIo::new(Rewind::new(io, buffered)), handler, state);
        drain(connection, watcher, shutdown).await;
    }
}

/// Serves a hyper connection to its end; when shutdown begins, it finishes the request in flight and closes (an h2
/// connection sends `GOAWAY`). `watcher` keeps the listener's drain waiting for it. (hyper-util's own
/// `Watcher::watch` does not take a connection that can be upgraded.) A connection that was upgraded (a WebSocket)
/// has left hyper: its tunnel is a task of its own.
async fn drain<C>(connection: C, watcher: hyper_util::server::graceful::Watcher, mut shutdown: watch::Receiver<bool>)
where
    C: std::future::Future + GracefulClose,
{
    let _draining = watcher;
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        () = crate::stopped(&mut shutdown) => connection.as_mut().close_gracefully(),
    }
    let _ = connection.await;
}

/// A connection that can be asked to finish what is in flight and close.
trait GracefulClose {
    fn close_gracefully(self: Pin<&mut Self>);
}

impl<I, S, E, B> GracefulClose for auto::UpgradeableConnection<'_, I, S, E>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: 'static,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn close_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// A connection with bytes already read from it put back in front.
pub struct Rewind<I> {
    prefix: bytes::Bytes,
    io: I,
}

impl<I> Rewind<I> {
    /// `io`, to be read after `prefix`.
    pub fn new(io: I, prefix: bytes::Bytes) -> Rewind<I> {
        Rewind { prefix, io }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

fn serve_io<'a, H, I>(
    builder: &'a auto::Builder<TokioExecutor>,
    io: TokioIo<I>,
    handler: Arc<H>,
    state: Arc<H::Connection>,
) -> auto::UpgradeableConnection<
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
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(handler.call(request, &state).await) }
    });
    // `with_upgrades`: a 101 answer hands the connection to the request's upgrade (WebSockets and the like).
    builder.serve_connection_with_upgrades(io, service)
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
