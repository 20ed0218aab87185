//! Upstream connections: one interface, two ways to use a connection, one bound on what is kept idle.
//!
//! - The h1 transport (`h1`) writes and reads upstream messages itself: it checks a plain connection out of a
//!   pool of this worker thread ([`UpstreamClient::checkout`]), and gives it back when the response is complete
//!   ([`UpstreamClient::checkin`]). The pool is a thread-local list per upstream: checkout and return are a `Vec`
//!   pop and push on the worker's own thread, with no lock and no atomic. A burst opens what it needs (HTTP/1.1 has
//!   one request in flight per connection); only idle connections beyond `max_idle_upstream_connections` per upstream
//!   and worker are closed, as nginx's `keepalive` does.
//! - The hyper transport (h2 callers, TLS upstreams, what the h1 transport hands over) sends through
//!   hyper-util's pooled client, one per worker thread, bounded the same way; it speaks h2 to TLS upstreams that
//!   offer it by ALPN.
//!
//! Plain connections are opened by a [`Dial`]: TCP in production, an in-memory upstream in tests, so that the same
//! code paths run in both.

mod body;
mod connector;
pub mod slots;
mod tls;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::tls::{ClientTls, TlsError};
pub use body::{CallerBodyError, CallerWait, UpstreamBody};
use connector::{pooled, Connector, Protocol, RoundTrips};
pub use tls::RouteTls;

/// Why an upstream round trip failed before a response head arrived.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The upstream could not be reached, or failed the round trip.
    #[error("{0}")]
    Failed(String),
    /// The caller's body failed while it was being sent.
    #[error("{0}")]
    CallerBody(String),
    /// The upstream refused the request without acting on it: an h2 stream above the last stream id of a GOAWAY
    /// (a server shutting down or recycling its connection, as nginx does every `keepalive_requests`), or reset
    /// with `REFUSED_STREAM`. RFC 9113 §8.7: it may be sent again whatever its method.
    #[error("{0}")]
    Unprocessed(String),
    /// The request was written and the connection closed without any answer.
    #[error("{detail}")]
    Unanswered {
        /// What happened.
        detail: String,
        /// The connection had served a round trip before this one.
        reused: bool,
    },
}

/// Opens plain (unencrypted) connections to upstreams: TCP in production; tests put an in-memory upstream here.
pub trait Dial: Send + Sync + 'static {
    /// A new connection to `authority`.
    fn dial<'a>(&'a self, authority: &'a Authority) -> BoxFuture<'a, io::Result<UpstreamStream>>;
}

/// How long a fresh upstream connection may take to establish.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// TCP with `TCP_NODELAY`, within [`CONNECT_TIMEOUT`].
pub struct TcpDial;

impl Dial for TcpDial {
    fn dial<'a>(&'a self, authority: &'a Authority) -> BoxFuture<'a, io::Result<UpstreamStream>> {
        Box::pin(async move {
            let port = authority.port_u16().unwrap_or(80);
            let host = authority.host().trim_start_matches('[').trim_end_matches(']');
            let stream =
                tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port))).await.map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, format!("timed out after {CONNECT_TIMEOUT:?}"))
                })??;
            let _ = stream.set_nodelay(true);
            Ok(UpstreamStream::Tcp(stream))
        })
    }
}

/// A plain connection to an upstream.
#[derive(Debug)]
pub enum UpstreamStream {
    /// A TCP connection.
    Tcp(TcpStream),
    /// An in-memory connection (tests).
    Memory(DuplexStream),
}

impl UpstreamStream {
    /// Whether an idle connection is still open as far as can be told without waiting: nothing to read (an
    /// upstream's close, or bytes nobody asked for, would be). For TCP this asks the reactor first, so a connection
    /// with no readiness costs no system call.
    fn idle_and_open(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self {
            UpstreamStream::Tcp(stream) => match stream.poll_read_ready(&mut cx) {
                Poll::Pending => true,
                Poll::Ready(Err(_)) => false,
                // Readable while idle: a close, or bytes nobody asked for. A probe tells (a stale readiness is cleared).
                Poll::Ready(Ok(())) => {
                    matches!(stream.try_read(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
                }
            },
            UpstreamStream::Memory(stream) => {
                let mut byte = [0u8; 1];
                let mut buf = ReadBuf::new(&mut byte);
                Pin::new(stream).poll_read(&mut cx, &mut buf).is_pending()
            }
        }
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Memory(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Memory(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Memory(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Tcp(s) => s.is_write_vectored(),
            UpstreamStream::Memory(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Memory(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Memory(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A plain HTTP/1.1 connection to one upstream, checked out of the pool for one round trip.
#[derive(Debug)]
pub struct PlainConnection {
    /// The upstream it goes to.
    pub authority: Authority,
    /// The connection.
    pub stream: UpstreamStream,
    /// It came from the pool (it served a round trip before), rather than being opened for this one.
    pub reused: bool,
    /// When it went back to the pool.
    idle_since: Instant,
    /// The client it belongs to.
    owner: u64,
}

/// What is known of a request that failed on an upstream connection without a response head.
#[derive(Debug, Clone, Copy)]
pub struct FailedSend {
    /// The connection had served a round trip before (it came from the pool).
    pub reused: bool,
    /// The request was written, so the upstream may have acted on it.
    pub written: bool,
    /// Some bytes came back.
    pub answered: bool,
    /// The request's method is idempotent (RFC 9110 §9.2.2).
    pub idempotent: bool,
}

/// Whether a request that failed on a connection may be sent once more on a new one: only when the connection was
/// reused (a fresh one failing says the upstream is the problem) and the upstream cannot have acted on it: it was
/// never written, or nothing at all came back and the method is idempotent (RFC 9110 §9.2.2). The one rule for every
/// transport; hyper's client applies the first half itself (`retry_canceled_requests`).
pub fn may_retry(failed: FailedSend) -> bool {
    failed.reused && (!failed.written || (!failed.answered && failed.idempotent))
}

/// Whether an h2 stream error says the upstream never processed the stream (RFC 9113 §8.7): a GOAWAY from the
/// upstream fails with this error exactly the streams above its last stream id (those below it end normally, or with
/// a broken pipe when the connection is lost), and `REFUSED_STREAM` is the upstream's own word for it.
fn refused_unprocessed(error: &h2::Error) -> bool {
    error.is_remote() && (error.is_go_away() || error.reason() == Some(h2::Reason::REFUSED_STREAM))
}

/// Idle connections of the h1 transport on this thread: per client and upstream, most recently used last.
struct IdlePool {
    upstreams: Vec<(u64, Authority, VecDeque<PlainConnection>)>,
}

std::thread_local! {
    static IDLE: RefCell<IdlePool> = const { RefCell::new(IdlePool { upstreams: Vec::new() }) };
    /// This thread's worker index (see [`UpstreamClient::set_worker`]).
    static WORKER: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// A pooled connection idle longer than this is closed rather than used (hyper's pool uses 90 s too).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Worker threads with a hyper pool of their own; a worker beyond them shares the pool of the non-worker threads.
const WORKER_POOLS: usize = 64;

/// Sends requests to upstreams; see the module docs.
pub struct UpstreamClient {
    id: u64,
    dial: Arc<dyn Dial>,
    max_idle: usize,
    /// HTTP/1.1 to plain upstreams, h2 or HTTP/1.1 by ALPN to TLS ones.
    pools: WorkerPools,
    /// h2 with prior knowledge to plain upstreams (`upstream_protocol = "h2c"`).
    h2c: WorkerPools,
}

/// hyper pools of one kind: one per worker thread, made on first use (a pooled connection's task runs on the thread
/// that opened it, so a pool shared by the workers would wake other threads on every request; with h2, each worker
/// multiplexes its requests on a connection of its own), and one for the threads that are not workers.
struct WorkerPools {
    connector: Connector,
    protocol: Protocol,
    max_idle: usize,
    shared: PooledClient,
    per_worker: Box<[std::sync::OnceLock<PooledClient>]>,
}

impl WorkerPools {
    fn new(connector: Connector, protocol: Protocol, max_idle: usize) -> WorkerPools {
        let shared = pooled(connector.clone(), protocol, max_idle);
        let per_worker = (0..WORKER_POOLS).map(|_| std::sync::OnceLock::new()).collect();
        WorkerPools { connector, protocol, max_idle, shared, per_worker }
    }

    /// The pool of the calling thread.
    fn pool(&self) -> &PooledClient {
        match WORKER.with(std::cell::Cell::get).and_then(|index| self.per_worker.get(index)) {
            Some(slot) => slot.get_or_init(|| pooled(self.connector.clone(), self.protocol, self.max_idle)),
            None => &self.shared,
        }
    }
}

/// Which pool a request goes through.
#[derive(Clone, Copy)]
pub enum Via<'a> {
    /// The proxy's pools: HTTP/1.1 to plain upstreams, ALPN to TLS ones.
    Shared,
    /// h2 with prior knowledge to a plain upstream.
    H2c,
    /// The route's own TLS settings.
    Tls(&'a RouteTls),
}

type PooledClient = Client<Connector, UpstreamBody>;

impl UpstreamClient {
    /// A client dialing TCP and trusting the webpki roots, keeping at most `max_idle` idle connections per upstream
    /// and worker thread.
    pub fn new(max_idle: usize) -> Result<UpstreamClient, TlsError> {
        Self::with_dial(max_idle, Arc::new(TcpDial))
    }

    /// A client whose plain connections come from `dial`.
    pub fn with_dial(max_idle: usize, dial: Arc<dyn Dial>) -> Result<UpstreamClient, TlsError> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let connector = Connector::new(&ClientTls::default(), None, Arc::clone(&dial))?;
        let pools = WorkerPools::new(connector.clone(), Protocol::Negotiated, max_idle);
        let h2c = WorkerPools::new(connector, Protocol::H2PriorKnowledge, max_idle);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        Ok(UpstreamClient { id, dial, max_idle, pools, h2c })
    }

    /// Marks the calling thread as worker `index`: its hyper requests then use a pool of their own.
    pub fn set_worker(index: usize) {
        WORKER.with(|worker| worker.set(Some(index)));
    }

    /// A hyper pool of its own for a route with TLS settings of its own (`routes[].ca_file`, `server_name`,
    /// `client_cert_file`); `reloads` counts its pool's replacements after the files changed.
    pub fn route_tls(
        &self,
        route: &str,
        settings: &crate::config::UpstreamTlsConfig,
        reloads: prometheus::IntCounter,
    ) -> Result<RouteTls, TlsError> {
        RouteTls::new(route, settings, Arc::clone(&self.dial), self.max_idle, reloads)
    }

    /// Sends one request through hyper (`via` the pool the route uses) and returns the response head with its
    /// streaming body.
    ///
    /// With `watch_reuse` (a request that could be sent again), a failure tells whether the connection had served a
    /// round trip before ([`UpstreamError::Unanswered`]), for [`may_retry`]; hyper's client itself sends again a
    /// request that a reused connection never took.
    pub async fn send(
        &self,
        mut request: Request<UpstreamBody>,
        via: Via<'_>,
        watch_reuse: bool,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let (route_pool, tls) = match via {
            Via::Tls(tls) => (Some(tls.client()), Some(tls)),
            Via::Shared | Via::H2c => (None, None),
        };
        let pool = match (&route_pool, via) {
            (Some(route), _) => &route.pool,
            (None, Via::H2c) => self.h2c.pool(),
            (None, _) => self.pools.pool(),
        };
        // A connection that may speak h2 (prior knowledge, or ALPN on TLS) gets the host from the URI's authority
        // as `:authority`, and must not also carry a `Host` header: RFC 9113 §8.3.1 lets a server refuse the pair
        // and nginx before 1.25 does (400 "duplicate host header"). hyper-util's pool writes `Host` from the same
        // authority on the HTTP/1.1 connections among them; plain-HTTP upstreams keep the header they were given.
        if !matches!(via, Via::Shared) || request.uri().scheme() == Some(&http::uri::Scheme::HTTPS) {
            request.headers_mut().remove(http::header::HOST);
        }
        let captured = watch_reuse.then(|| hyper_util::client::legacy::connect::capture_connection(&mut request));
        let result = pool.request(request).await;
        // Count the round trip on its connection, whatever its outcome: the next one on it is a reuse.
        let round_trips_before = captured.as_ref().and_then(|captured| {
            let metadata = captured.connection_metadata();
            let mut extensions = http::Extensions::new();
            metadata.as_ref()?.get_extras(&mut extensions);
            Some(extensions.get::<RoundTrips>()?.0.fetch_add(1, Ordering::Relaxed))
        });
        result.map_err(|error| {
            // A TLS failure is told in words, and never sent again: a client certificate refused after the request
            // was written (TLS 1.3) looks like a connection closed without an answer.
            if let Some(detail) = tls::describe_failure(&error, tls) {
                return UpstreamError::Failed(detail);
            }
            let chain = crate::error_chain::error_chain(&error);
            let mut unanswered = false;
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
            while let Some(cause) = source {
                if cause.is::<CallerBodyError>() {
                    return UpstreamError::CallerBody(chain);
                }
                if cause.downcast_ref::<h2::Error>().is_some_and(refused_unprocessed) {
                    return UpstreamError::Unprocessed(chain);
                }
                if let Some(error) = cause.downcast_ref::<hyper::Error>() {
                    // Closed before a response head came; or lost (reset, broken pipe) before it: on h2, a server
                    // closing right after its GOAWAY can take the GOAWAY with it.
                    unanswered |= error.is_incomplete_message()
                        || std::error::Error::source(error).is_some_and(|source| source.is::<io::Error>());
                }
                source = cause.source();
            }
            match round_trips_before {
                Some(before) if unanswered => UpstreamError::Unanswered { detail: chain, reused: before > 0 },
                _ => UpstreamError::Failed(chain),
            }
        })
    }

    /// Sends an upgrade request (a WebSocket handshake) on a new HTTP/1.1 connection of its own, kept for the
    /// upgrade: a `101` answer's connection is handed over by [`hyper::upgrade::on`] on the response.
    pub async fn upgrade(
        &self,
        mut request: Request<UpstreamBody>,
        via: Via<'_>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let route;
        let connector = match via {
            Via::Shared => &self.pools.connector,
            Via::Tls(tls) => {
                route = tls.client();
                &route.connector
            }
            Via::H2c => {
                return Err(UpstreamError::Failed(
                    "the route speaks h2c to its upstream: an HTTP/1.1 upgrade cannot pass".into(),
                ))
            }
        };
        let tls = match via {
            Via::Tls(tls) => Some(tls),
            _ => None,
        };
        let failed = |error: &(dyn std::error::Error + 'static)| {
            UpstreamError::Failed(
                tls::describe_failure(error, tls).unwrap_or_else(|| crate::error_chain::error_chain(error)),
            )
        };
        let io = connector.connect_http1(request.uri().clone()).await.map_err(|e| failed(&*e))?;
        // hyper's connection-level client writes the target as it is given: the handshake goes in origin form, as
        // every other request (RFC 9112 §3.2.1); an upstream that routes on the path refuses the absolute form. The
        // request carries the upstream's `Host` already (`Proxy::prepare`).
        *request.uri_mut() = origin_form(request.uri());
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.map_err(|e| failed(&e))?;
        tokio::spawn(async move {
            let _ = connection.with_upgrades().await;
        });
        sender.send_request(request).await.map_err(|e| failed(&e))
    }

    /// An idle connection to `authority` from this thread's pool, if one is still open (`now`: the caller's clock
    /// reading, to spare a second one).
    pub fn checkout(&self, authority: &Authority, now: Instant) -> Option<PlainConnection> {
        IDLE.with(|idle| {
            let mut idle = idle.borrow_mut();
            // Route authorities are canonical: an exact comparison (not `Authority`'s case-insensitive one) will do.
            let list =
                idle.upstreams.iter_mut().find(|(id, a, _)| *id == self.id && a.as_str() == authority.as_str())?;
            while let Some(mut connection) = list.2.pop_back() {
                if now.duration_since(connection.idle_since) < IDLE_TIMEOUT && connection.stream.idle_and_open() {
                    connection.reused = true;
                    return Some(connection);
                }
            }
            None
        })
    }

    /// Gives a connection whose round trip completed back to this thread's pool (closed when the pool is full);
    /// `now`: when its round trip ended, or a little before.
    pub fn checkin(&self, mut connection: PlainConnection, now: Instant) {
        if connection.owner != self.id || self.max_idle == 0 {
            return;
        }
        connection.idle_since = now;
        IDLE.with(|idle| {
            let mut idle = idle.borrow_mut();
            let authority = connection.authority.as_str();
            let position = idle.upstreams.iter().position(|(id, a, _)| *id == self.id && a.as_str() == authority);
            let list = match position {
                Some(i) => &mut idle.upstreams[i].2,
                None => {
                    idle.upstreams.push((self.id, connection.authority.clone(), VecDeque::new()));
                    &mut idle.upstreams.last_mut().expect("just pushed").2
                }
            };
            if list.len() >= self.max_idle {
                // The longest idle one goes: it is the likeliest to be closed by the upstream soon.
                list.pop_front();
            }
            list.push_back(connection);
        });
    }

    /// A new plain connection to `authority`.
    pub async fn connect(&self, authority: &Authority) -> Result<PlainConnection, UpstreamError> {
        let stream = self
            .dial
            .dial(authority)
            .await
            .map_err(|e| UpstreamError::Failed(format!("connecting to {authority}: {e}")))?;
        Ok(PlainConnection {
            authority: authority.clone(),
            stream,
            reused: false,
            idle_since: Instant::now(),
            owner: self.id,
        })
    }

    /// Idle connections this thread's pool holds for `authority` (for tests and the benchmark's checks).
    pub fn idle_connections(&self, authority: &Authority) -> usize {
        IDLE.with(|idle| {
            idle.borrow().upstreams.iter().find(|(id, a, _)| *id == self.id && a == authority).map_or(0, |l| l.2.len())
        })
    }
}

/// `uri`'s path and query alone (`/` when it has none).
fn origin_form(uri: &http::Uri) -> http::Uri {
    match uri.path_and_query() {
        Some(path_and_query) => http::Uri::from(path_and_query.clone()),
        None => http::Uri::from_static("/"),
    }
}

impl Drop for UpstreamClient {
    fn drop(&mut self) {
        // This thread's idle connections of this client go with it (other threads' go when they next look).
        let id = self.id;
        let _ = IDLE.try_with(|idle| {
            if let Ok(mut idle) = idle.try_borrow_mut() {
                idle.upstreams.retain(|(owner, _, _)| *owner != id);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_thread_has_a_hyper_pool_of_its_own() {
        let client = Arc::new(UpstreamClient::new(8).expect("client"));
        let pools = &client.pools;
        assert!(std::ptr::eq(pools.pool(), &pools.shared), "a thread that is no worker uses the shared pool");
        let on_worker = |index| {
            let client = Arc::clone(&client);
            std::thread::spawn(move || {
                UpstreamClient::set_worker(index);
                let pool: *const PooledClient = client.pools.pool();
                assert!(std::ptr::eq(pool, client.pools.pool()), "the same pool on every call");
                pool as usize
            })
            .join()
            .expect("worker thread")
        };
        let (first, second) = (on_worker(0), on_worker(1));
        assert_ne!(first, second);
        assert_ne!(first, &pools.shared as *const PooledClient as usize);
        assert_eq!(on_worker(0), first, "a worker index keeps its pool");
        assert_eq!(on_worker(WORKER_POOLS), &pools.shared as *const PooledClient as usize, "beyond them: shared");
    }

    /// A dialer of in-memory connections whose far ends are kept, so they stay open.
    struct Memory(std::sync::Mutex<Vec<DuplexStream>>);

    impl Dial for Memory {
        fn dial<'a>(&'a self, _: &'a Authority) -> BoxFuture<'a, io::Result<UpstreamStream>> {
            let (near, far) = tokio::io::duplex(64);
            self.0.lock().unwrap().push(far);
            Box::pin(async move { Ok(UpstreamStream::Memory(near)) })
        }
    }

    #[tokio::test]
    async fn the_pool_keeps_at_most_max_idle_open_connections_per_upstream() {
        let dial = Arc::new(Memory(std::sync::Mutex::new(Vec::new())));
        let client = UpstreamClient::with_dial(2, Arc::clone(&dial) as Arc<dyn Dial>).expect("client");
        let (a, b): (Authority, Authority) = ("a:80".parse().unwrap(), "b:80".parse().unwrap());
        assert!(client.checkout(&a, Instant::now()).is_none());
        let mut burst = Vec::new();
        for _ in 0..5 {
            burst.push(client.connect(&a).await.unwrap());
        }
        for connection in burst {
            client.checkin(connection, Instant::now());
        }
        assert_eq!(client.idle_connections(&a), 2, "the idle surplus beyond the bound is closed");
        assert_eq!(client.idle_connections(&b), 0);
        let reused = client.checkout(&a, Instant::now()).expect("an idle connection");
        assert!(reused.reused);
        // An upstream that closed an idle connection: it is not handed out.
        dial.0.lock().unwrap().clear();
        assert!(client.checkout(&a, Instant::now()).is_none(), "closed connections are dropped at checkout");
        // Another client's pool is its own, even on the same thread.
        let other = UpstreamClient::with_dial(2, dial as Arc<dyn Dial>).expect("client");
        other.checkin(reused, Instant::now());
        assert_eq!(other.idle_connections(&a), 0, "a connection goes back only to its own client");
    }

    #[test]
    fn a_request_is_retried_only_where_the_upstream_cannot_have_acted_on_it() {
        let reused = FailedSend { reused: true, written: true, answered: false, idempotent: true };
        assert!(may_retry(FailedSend { written: false, idempotent: false, ..reused }), "never written: any method");
        assert!(may_retry(reused), "written, nothing back, idempotent");
        assert!(!may_retry(FailedSend { idempotent: false, ..reused }), "a POST that may have been processed");
        assert!(!may_retry(FailedSend { answered: true, ..reused }), "an answer came back");
        let fresh = FailedSend { reused: false, written: false, ..reused };
        assert!(!may_retry(fresh), "a fresh connection failing: the upstream is the problem");
    }
}
