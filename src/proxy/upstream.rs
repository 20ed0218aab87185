//! The upstream client: one small interface in front of two ways to reach an upstream.
//!
//! - A downstream HTTP/1.1 connection to a plain-HTTP upstream gets a dedicated upstream connection
//!   ([`UpstreamAffinity`]): requests on a downstream connection come one at a time, so one upstream connection
//!   per downstream connection is always free when the next request comes. It saves the pool's checkout and return
//!   on every request and keeps the connection on the downstream connection's thread.
//! - Everything else (h2 callers, TLS upstreams) goes through hyper-util's pooled client, which speaks h2 to
//!   upstreams that offer it by ALPN.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::replay::{BufferedBody, ReplayBody};
use crate::tls::{client_config, ClientTls, TlsError};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

pin_project_lite::pin_project! {
    /// The body of a request sent upstream.
    #[project = UpstreamBodyProj]
    pub enum UpstreamBody {
        /// The caller's body, streamed as is.
        Plain { #[pin] body: Incoming },
        /// The caller's body, streamed and kept for a replay.
        Kept { #[pin] body: ReplayBody<Incoming> },
        /// A replay of a kept body.
        Replay { #[pin] body: BufferedBody },
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            UpstreamBodyProj::Plain { body } => body.poll_frame(cx).map_err(Into::into),
            UpstreamBodyProj::Kept { body } => body.poll_frame(cx).map_err(Into::into),
            UpstreamBodyProj::Replay { body } => body.poll_frame(cx).map_err(|e| match e {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Plain { body } => body.is_end_stream(),
            UpstreamBody::Kept { body } => body.is_end_stream(),
            UpstreamBody::Replay { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Plain { body } => body.size_hint(),
            UpstreamBody::Kept { body } => body.size_hint(),
            UpstreamBody::Replay { body } => body.size_hint(),
        }
    }
}

/// Why an upstream exchange failed before a response head arrived.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UpstreamError(String);

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;
type PooledClient = Client<Connector, UpstreamBody>;

/// A pooled client over `connector`.
fn pooled(connector: Connector) -> PooledClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}

/// Sends requests to upstreams over keep-alive connections: dedicated per downstream connection, or pooled.
pub struct UpstreamClient {
    connector: Connector,
    /// The pool of the threads that are not workers.
    client: PooledClient,
    /// One pool per worker thread, made on first use: a pooled connection's task runs on the thread that opened it,
    /// so a pool shared by the workers would wake other threads on every request.
    per_worker: Box<[std::sync::OnceLock<PooledClient>]>,
}

/// Worker threads with a pool of their own; a worker beyond them shares the pool of the threads that are not workers.
const WORKER_POOLS: usize = 64;

std::thread_local! {
    /// This thread's worker index (see [`UpstreamClient::set_worker`]).
    static WORKER: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// The dedicated upstream connection of one downstream HTTP/1.1 connection.
#[derive(Default)]
pub struct UpstreamAffinity {
    idle: std::sync::Mutex<Option<Dedicated>>,
}

struct Dedicated {
    authority: Authority,
    sender: http1::SendRequest<UpstreamBody>,
}

impl UpstreamAffinity {
    /// The idle connection to `authority`, if there is one.
    fn take(&self, authority: &Authority) -> Option<http1::SendRequest<UpstreamBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        match idle.take() {
            Some(d) if d.authority == *authority && !d.sender.is_closed() => Some(d.sender),
            _ => None,
        }
    }

    /// Keeps `sender` for the next request (only after a response head arrived on it).
    fn keep(&self, authority: Authority, sender: http1::SendRequest<UpstreamBody>) {
        *self.idle.lock().unwrap_or_else(|e| e.into_inner()) = Some(Dedicated { authority, sender });
    }
}

/// How long a fresh upstream connection may take to establish.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl UpstreamClient {
    /// A client trusting the webpki roots.
    pub fn new() -> Result<UpstreamClient, TlsError> {
        let tls = client_config(&ClientTls::default())?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = pooled(connector.clone());
        let per_worker = (0..WORKER_POOLS).map(|_| std::sync::OnceLock::new()).collect();
        Ok(UpstreamClient { connector, client, per_worker })
    }

    /// Marks the calling thread as worker `index`: its requests then use a pool of their own.
    pub fn set_worker(index: usize) {
        WORKER.with(|worker| worker.set(Some(index)));
    }

    /// The pool of the calling thread.
    fn pool(&self) -> &PooledClient {
        match WORKER.with(std::cell::Cell::get).and_then(|index| self.per_worker.get(index)) {
            // The same connector (and TLS configuration), a pool of its own.
            Some(slot) => slot.get_or_init(|| pooled(self.connector.clone())),
            None => &self.client,
        }
    }

    /// Sends one request and returns the response head with its streaming body. With `affinity` (a downstream
    /// HTTP/1.1 connection) and a plain-HTTP upstream, the request goes over that connection's dedicated upstream
    /// connection.
    pub async fn send(
        &self,
        request: Request<UpstreamBody>,
        affinity: Option<&UpstreamAffinity>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let dedicated = affinity.filter(|_| request.uri().scheme() == Some(&Scheme::HTTP));
        let (Some(affinity), Some(authority)) = (dedicated, request.uri().authority().cloned()) else {
            // Boxed: the pooled path is the less common one, and its future is large.
            return Box::pin(self.pool().request(request)).await.map_err(|e| UpstreamError(crate::error_chain(&e)));
        };
        let mut request = request;
        // On a connection of our own the request goes in origin form (`GET /path`), with the Host header the
        // proxy already set, as the pooled client does.
        let mut origin_form = http::uri::Parts::default();
        origin_form.path_and_query = request.uri().path_and_query().cloned();
        *request.uri_mut() = http::Uri::from_parts(origin_form).unwrap_or_else(|_| http::Uri::from_static("/"));
        if let Some(mut sender) = affinity.take(&authority) {
            // The previous exchange on it is over (the caller sent this request after reading the last response),
            // unless the upstream closed it meanwhile: then the request comes back unsent and takes a new connection.
            if sender.ready().await.is_ok() {
                match sender.try_send_request(request).await {
                    Ok(response) => {
                        affinity.keep(authority, sender);
                        return Ok(response);
                    }
                    Err(mut error) => match error.take_message() {
                        Some(unsent) => request = unsent,
                        None => return Err(UpstreamError(crate::error_chain(&error.into_error()))),
                    },
                }
            }
        }
        // Boxed: a new connection is made once per downstream connection, not per request.
        let mut sender = Box::pin(connect(&authority)).await?;
        sender.ready().await.map_err(|e| UpstreamError(crate::error_chain(&e)))?;
        let response = sender.send_request(request).await.map_err(|e| UpstreamError(crate::error_chain(&e)))?;
        affinity.keep(authority, sender);
        Ok(response)
    }
}

/// A new HTTP/1.1 connection to a plain-HTTP upstream; its connection task runs on the current runtime.
async fn connect(authority: &Authority) -> Result<http1::SendRequest<UpstreamBody>, UpstreamError> {
    let stream = connect_tcp(authority).await?;
    let (sender, connection) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| UpstreamError(crate::error_chain(&e)))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!("upstream connection ended: {error}");
        }
    });
    Ok(sender)
}

/// A new TCP connection to a plain-HTTP upstream, with `TCP_NODELAY`.
pub(super) async fn connect_tcp(authority: &Authority) -> Result<tokio::net::TcpStream, UpstreamError> {
    let port = authority.port_u16().unwrap_or(80);
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect((host, port)))
        .await
        .map_err(|_| UpstreamError(format!("connecting to {authority} timed out after {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| UpstreamError(format!("connecting to {authority}: {e}")))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_thread_has_a_pool_of_its_own() {
        let client = std::sync::Arc::new(UpstreamClient::new().expect("client"));
        assert!(std::ptr::eq(client.pool(), &client.client), "a thread that is no worker uses the shared pool");
        let on_worker = |index| {
            let client = std::sync::Arc::clone(&client);
            std::thread::spawn(move || {
                UpstreamClient::set_worker(index);
                let pool: *const PooledClient = client.pool();
                assert!(std::ptr::eq(pool, client.pool()), "the same pool on every call");
                pool as usize
            })
            .join()
            .expect("worker thread")
        };
        let (first, second) = (on_worker(0), on_worker(1));
        assert_ne!(first, second);
        assert_ne!(first, &client.client as *const PooledClient as usize);
        assert_eq!(on_worker(0), first, "a worker index keeps its pool");
        assert_eq!(on_worker(WORKER_POOLS), &client.client as *const PooledClient as usize, "beyond them: shared");
    }
}
