//! Listeners: the accept loop shared by the proxy, admin and vending listeners, with a connection limit that idle
//! connections cannot exhaust, idle and header timeouts for every connection, an optional TLS handshake, HTTP/1.1
//! and h2c on one port (hyper-util `conn::auto`), and graceful draining on shutdown.
//!
//! What hyper reads of an HTTP/1.1 connection is held to the h1 transport's framing verdicts first
//! ([`Vetted`]), so that both transports refuse the same requests.
//!
//! Each connection has an [`Activity`]: what it is doing, where the listener sees it. A housekeeping task applies the
//! timeouts to hyper's connections ([`Registry::sweep`]; the h1 transport keeps its own by the same rule), and
//! at `max_connections` the connection idle the longest is closed to make room for the new caller
//! ([`Registry::evict_longest_idle`]); only when none is idle does the new caller wait.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, StatusCode, Version};
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::activity::{Activity, Ended, Registry, Timeouts, Tracked, Watched};
use crate::proxy::h1::vet::Vetted;

/// How a listener serves its connections.
#[derive(Clone)]
pub struct ListenerOptions {
    /// Connections at once; at the limit the longest-idle one makes room, else new ones wait in the backlog.
    pub max_connections: usize,
    /// Slowloris guard and idle close (also bounds the TLS handshake): see [`Timeouts`].
    pub timeouts: Timeouts,
    /// How long in-flight requests may take to finish after shutdown starts.
    pub shutdown_grace: Duration,
    /// TLS for this listener.
    pub tls: Option<TlsAcceptor>,
    /// Its metric handles, if it has any.
    pub metrics: Option<crate::metrics::ListenerMetrics>,
}

/// A socket a listener accepts connections on: TCP, or a unix socket (the vending listener's).
pub trait Listen: Send + 'static {
    /// A connection.
    type Io: AsyncRead + AsyncWrite + AsRawFd + Unpin + Send + 'static;
    /// The next connection and its peer (a unix socket's peer is given as 127.0.0.1:0).
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Io, SocketAddr)>> + Send;
    /// `io`, registered with the reactor of the runtime this is called on (a worker's).
    fn move_to_this_runtime(io: Self::Io) -> io::Result<Self::Io>;
}

impl Listen for TcpListener {
    type Io = tokio::net::TcpStream;

    async fn accept(&self) -> io::Result<(Self::Io, SocketAddr)> {
        let (stream, peer) = TcpListener::accept(self).await?;
        let _ = stream.set_nodelay(true);
        Ok((stream, peer))
    }

    fn move_to_this_runtime(io: Self::Io) -> io::Result<Self::Io> {
        io.into_std().and_then(tokio::net::TcpStream::from_std)
    }
}

impl Listen for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;

    async fn accept(&self) -> io::Result<(Self::Io, SocketAddr)> {
        let (stream, _) = tokio::net::UnixListener::accept(self).await?;
        Ok((stream, SocketAddr::from(([127, 0, 0, 1], 0))))
    }

    fn move_to_this_runtime(io: Self::Io) -> io::Result<Self::Io> {
        io.into_std().and_then(tokio::net::UnixStream::from_std)
    }
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
    /// to hyper with the bytes already read (the proxy's h1 transport), noting each request in `activity` and
    /// applying `timeouts` to its waits. By default everything goes to hyper.
    fn serve_h1<I: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        self: &Arc<Self>,
        io: I,
        _connection: &Arc<Self::Connection>,
        _shutdown: watch::Receiver<bool>,
        _timeouts: Timeouts,
        _activity: &Activity,
    ) -> impl Future<Output = Ended<I>> + Send {
        std::future::ready(Ended::Handoff { io, buffered: bytes::Bytes::new() })
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
    /// Starts `threads` worker threads (at least one), each calling `on_start` with its index first; they stop when
    /// the pool is dropped.
    pub fn start(threads: usize, on_start: fn(usize)) -> std::io::Result<WorkerPool> {
        let mut handles = Vec::new();
        let mut stops = Vec::new();
        for i in 0..threads.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            handles.push(runtime.handle().clone());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            stops.push(stop);
            std::thread::Builder::new().name(format!("tokenproxy-worker-{i}")).spawn(move || {
                on_start(i);
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        }
        Ok(WorkerPool { handles, next: std::sync::atomic::AtomicUsize::new(0), _stop: stops })
    }

    /// Runs `work` on each worker's thread, and returns when all have.
    pub async fn on_each(&self, work: fn()) {
        let done: Vec<_> = self.handles.iter().map(|handle| handle.spawn(async move { work() })).collect();
        for task in done {
            let _ = task.await;
        }
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
                        () = crate::shutdown::stopped(&mut global) => {
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
pub async fn run_listener<L: Listen, H: Handler>(
    listener: L,
    handler: Arc<H>,
    options: ListenerOptions,
    mut shutdown: watch::Receiver<bool>,
    workers: Option<Arc<WorkerPool>>,
) {
    let builder = Arc::new(hyper_builder(None));
    let graceful = GracefulShutdown::new();
    let limit = Arc::new(Semaphore::new(options.max_connections));
    let registry = Arc::new(Registry::default());
    let local_shutdowns = workers.as_ref().map(|workers| workers.local_shutdowns(&shutdown));
    let housekeeping = tokio::spawn(housekeeping(Arc::clone(&registry), options.clone(), shutdown.clone()));
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = crate::shutdown::stopped(&mut shutdown) => break,
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
        // At the limit, a new caller is served: the connection idle the longest makes room (as nginx reuses idle
        // keep-alive connections). Only when none is idle does it wait, and the next callers with it in the backlog.
        let permit = match Arc::clone(&limit).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let Some(permit) = make_room(&limit, &registry, &options, &mut shutdown).await else { break };
                permit
            }
        };
        let activity = Arc::new(Activity::new(Some(permit)));
        registry.add(&activity);
        let worker = workers.as_ref().map(|workers| workers.next());
        let connection_shutdown = match (worker, &local_shutdowns) {
            (Some(i), Some(locals)) => locals[i].clone(),
            _ => shutdown.clone(),
        };
        let connection = connection_task::<L, H>(
            stream,
            peer,
            Arc::clone(&handler),
            Arc::clone(&builder),
            (options.tls.clone(), options.timeouts),
            (graceful.watcher(), connection_shutdown),
            (workers.is_some(), activity),
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
    // Idle connections and tunnels are closed; hyper's connections are told to finish what is in flight; the
    // h1 transport's see `shutdown` themselves. Every connection holds a permit until its socket closes.
    registry.shut_idle_and_tunnels();
    let drained = async {
        graceful.shutdown().await;
        let all = u32::try_from(options.max_connections).unwrap_or(u32::MAX);
        let _ = limit.acquire_many(all).await;
    };
    if tokio::time::timeout(options.shutdown_grace, drained).await.is_err() {
        tracing::warn!("shutdown_grace ({:?}) passed with requests still in flight", options.shutdown_grace);
    }
    housekeeping.abort();
}

/// At `max_connections`: closes the longest-idle connection and waits for a permit (a connection's end), closing
/// another if the chosen one turned busy meanwhile; `None` when shutdown begins.
async fn make_room(
    limit: &Arc<Semaphore>,
    registry: &Registry,
    options: &ListenerOptions,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    loop {
        if registry.evict_longest_idle() {
            if let Some(metrics) = &options.metrics {
                metrics.evicted.inc();
            }
        }
        tokio::select! {
            biased;
            () = crate::shutdown::stopped(shutdown) => return None,
            permit = Arc::clone(limit).acquire_owned() => return permit.ok(),
            () = tokio::time::sleep(EVICTION_RETRY) => {}
        }
    }
}

/// How long a caller waiting at `max_connections` waits before another idle connection is closed for it.
const EVICTION_RETRY: Duration = Duration::from_millis(100);

/// Applies the timeouts to hyper's connections and updates the listener's gauges, until shutdown: a pass every
/// tenth of the shorter timeout (between 20 ms and 1 s).
async fn housekeeping(registry: Arc<Registry>, options: ListenerOptions, mut shutdown: watch::Receiver<bool>) {
    let shortest = options.timeouts.header_read.min(options.timeouts.keepalive);
    let mut ticks = tokio::time::interval((shortest / 10).clamp(Duration::from_millis(20), Duration::from_secs(1)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = crate::shutdown::stopped(&mut shutdown) => return,
            _ = ticks.tick() => {
                let now = crate::activity::advance_clock();
                let swept = registry.sweep(now, &options.timeouts);
                if let Some(metrics) = &options.metrics {
                    metrics.open.set(swept.open as i64);
                    if let Some(tunnels) = &metrics.tunnels {
                        tunnels.set(swept.tunnels as i64);
                    }
                }
            }
        }
    }
}

/// hyper's server settings: HTTP/1.1 and h2c on one port; `header_read_timeout` for connections without a listener's
/// housekeeping (which applies [`Timeouts`] itself, idle waits apart from heads).
pub(crate) fn hyper_builder(header_read_timeout: Option<Duration>) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    builder
}

/// Serves one plain (unencrypted) connection the way the listener does: the handler's own h1 transport first,
/// then hyper (HTTP/1.1 and h2c) for the rest of the connection. The listener adds TLS, the connection limit, the
/// idle timeouts and graceful draining; this is for tests and embedders that bring their own connection (an
/// in-memory one, say): `header_read_timeout` bounds each request head, and an idle wait as long.
pub async fn plain_connection<H, I>(
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
    let activity = Arc::new(Activity::new(None));
    let timeouts = Timeouts { header_read: header_read_timeout, keepalive: header_read_timeout };
    // No listener asks this connection to close at shutdown: it is asked here (an idle one closes at once, one
    // with a request in flight after it).
    let ended = {
        let serving = std::pin::pin!(handler.serve_h1(io, &state, shutdown.clone(), timeouts, &activity));
        let asking = std::pin::pin!(async {
            let mut shutdown = shutdown;
            crate::shutdown::stopped(&mut shutdown).await;
            activity.ask_to_close();
        });
        match futures_util::future::select(serving, asking).await {
            futures_util::future::Either::Left((ended, _)) => ended,
            futures_util::future::Either::Right(((), serving)) => serving.await,
        }
    };
    if let Ended::Handoff { io, buffered } = ended {
        let builder = hyper_builder(Some(header_read_timeout));
        let io = TokioIo::new(Vetted::new(Rewind::new(io, buffered)));
        let _ = hyper_connection(&builder, io, handler, state, activity).await;
    }
}

/// Serves one connection to its end: TLS handshake if any, then HTTP/1.1 or h2, under the graceful watcher.
///
/// (A function returning an `async` block rather than an `async fn`, with the connection's state made before it: an
/// `async fn` keeps its arguments twice in its state, and this state is what every idle connection holds.)
#[allow(clippy::too_many_arguments)]
fn connection_task<L: Listen, H: Handler>(
    stream: L::Io,
    peer: SocketAddr,
    handler: Arc<H>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    (tls, timeouts): (Option<TlsAcceptor>, Timeouts),
    (watcher, shutdown): (hyper_util::server::graceful::Watcher, watch::Receiver<bool>),
    // The connection's permit lives in its activity, which its socket holds until it closes (a tunnel's too).
    (moved, activity): (bool, Arc<Activity>),
) -> impl Future<Output = ()> + Send {
    let state = Arc::new(handler.connection(peer, tls.is_some()));
    async move {
        // A connection handed to a worker runtime is registered with that runtime's reactor.
        let stream = if moved {
            match L::move_to_this_runtime(stream) {
                Ok(stream) => stream,
                Err(error) => {
                    tracing::debug!(%peer, "cannot move the connection to a worker: {error}");
                    return;
                }
            }
        } else {
            stream
        };
        let stream = Tracked::new(stream, Arc::clone(&activity));
        match tls {
            None => {
                let ended = handler.serve_h1(stream, &state, shutdown.clone(), timeouts, &activity).await;
                if let Ended::Handoff { io, buffered } = ended {
                    // Boxed, like the TLS branch, in a statement of its own (a temporary of an `.await` expression is
                    // kept in the state): a connection's task is as large as its largest state, and an idle plain
                    // connection served by the h1 transport should not carry hyper's.
                    let io = TokioIo::new(Vetted::new(Rewind::new(Watched::new(io, Arc::clone(&activity)), buffered)));
                    activity.set_hyper();
                    let connection = hyper_connection(&builder, io, handler, state, Arc::clone(&activity));
                    let hyper = Box::pin(drain(connection, watcher, shutdown, activity));
                    hyper.await;
                }
            }
            Some(acceptor) => {
                let tls = (&*builder, acceptor, timeouts, (watcher, shutdown));
                let serving = Box::pin(tls_connection(stream, peer, handler, state, tls, activity));
                serving.await;
            }
        }
    }
}

/// What the TLS branch needs besides the connection: hyper's settings, the acceptor, the timeouts, the graceful
/// watcher and the shutdown signal.
type TlsSettings<'a> = (
    &'a auto::Builder<TokioExecutor>,
    TlsAcceptor,
    Timeouts,
    (hyper_util::server::graceful::Watcher, watch::Receiver<bool>),
);

/// The TLS branch of [`connection_task`]: the handshake, then h2 (by ALPN) or the h1 transport and hyper.
async fn tls_connection<S, H>(
    stream: S,
    peer: SocketAddr,
    handler: Arc<H>,
    state: Arc<H::Connection>,
    (builder, acceptor, timeouts, (watcher, shutdown)): TlsSettings<'_>,
    activity: Arc<Activity>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let tls = match tokio::time::timeout(timeouts.header_read, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            tracing::debug!(%peer, "TLS handshake failed: {error}");
            return;
        }
        Err(_) => return,
    };
    // A client that chose h2 by ALPN speaks it from the first byte.
    let ended = if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
        activity.set_h2();
        Ended::Handoff { io: tls, buffered: bytes::Bytes::new() }
    } else {
        handler.serve_h1(tls, &state, shutdown.clone(), timeouts, &activity).await
    };
    if let Ended::Handoff { io, buffered } = ended {
        activity.set_hyper();
        // (h2 by ALPN passes the vetting untouched: it judges HTTP/1.1 heads only.)
        let io = TokioIo::new(Vetted::new(Rewind::new(Watched::new(io, Arc::clone(&activity)), buffered)));
        let connection = hyper_connection(builder, io, handler, state, Arc::clone(&activity));
        drain(connection, watcher, shutdown, activity).await;
    }
}

/// Serves a hyper connection to its end; when shutdown begins, or the listener finds it idle past its timeout
/// ([`Activity::closing`]), it finishes the request in flight and closes (an h2 connection sends `GOAWAY`).
/// `watcher` keeps the listener's drain waiting for it. (hyper-util's own `Watcher::watch` does not take a
/// connection that can be upgraded.) A connection that was upgraded (a WebSocket) has left hyper: its tunnel is a
/// task of its own.
async fn drain<C>(
    connection: C,
    watcher: hyper_util::server::graceful::Watcher,
    mut shutdown: watch::Receiver<bool>,
    activity: Arc<Activity>,
) where
    C: std::future::Future + GracefulClose,
{
    let _draining = watcher;
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        () = crate::shutdown::stopped(&mut shutdown) => connection.as_mut().close_gracefully(),
        () = activity.closing() => connection.as_mut().close_gracefully(),
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

fn hyper_connection<'a, H, I>(
    builder: &'a auto::Builder<TokioExecutor>,
    io: TokioIo<I>,
    handler: Arc<H>,
    state: Arc<H::Connection>,
    activity: Arc<Activity>,
) -> auto::UpgradeableConnection<
    'a,
    TokioIo<I>,
    impl hyper::service::Service<
            Request<Incoming>,
            Response = Answer<H::Body>,
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
        // The request is in flight from its head to the end of its response body (h2: each stream).
        activity.begin();
        if request.version() == Version::HTTP_2 {
            activity.set_h2();
        }
        let connect = request.method() == http::Method::CONNECT;
        // Made here, not in the future: a future dropped before its first poll ends the request too.
        let mut guard = InFlight(Some(Arc::clone(&activity)));
        async move {
            let response = handler.call(request, &state).await;
            if response.status() == StatusCode::SWITCHING_PROTOCOLS || (connect && response.status().is_success()) {
                // Its socket now carries a tunnel, which has timeouts of its own.
                if let Some(activity) = &guard.0 {
                    activity.set_tunnel();
                }
            }
            let activity = guard.0.take();
            Ok::<_, Infallible>(response.map(|body| Counted { body, in_flight: InFlight(activity) }))
        }
    });
    // `with_upgrades`: a 101 answer hands the connection to the request's upgrade (WebSockets and the like).
    builder.serve_connection_with_upgrades(io, service)
}

/// A handler's answer as hyper sends it: its body keeps the request in flight until it is sent.
type Answer<B> = Response<Counted<B>>;

/// A request in flight on a hyper connection: ends it in the connection's [`Activity`] when dropped (its response
/// body sent, or the request cancelled).
struct InFlight(Option<Arc<Activity>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(activity) = self.0.take() {
            activity.end();
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request in flight until it is sent.
    pub struct Counted<B> {
        #[pin]
        body: B,
        in_flight: InFlight,
    }
}

impl<B: Body> Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn on_each_runs_the_work_once_on_every_worker_thread_and_waits_for_all() {
        static THREADS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
        fn note_thread() {
            let name = std::thread::current().name().unwrap_or_default().to_owned();
            THREADS.lock().unwrap().push(name);
        }
        let pool = WorkerPool::start(2, |_| {}).unwrap();
        pool.on_each(note_thread).await;
        let mut threads = THREADS.lock().unwrap().clone();
        threads.sort();
        assert_eq!(threads, ["tokenproxy-worker-0", "tokenproxy-worker-1"]);
    }
}
