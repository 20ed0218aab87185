//! The upstream client: one small interface in front of hyper-util's pooled client, so it can be swapped.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

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

/// Sends requests to upstreams over pooled keep-alive connections (HTTP/1.1, or h2 when TLS ALPN selects it).
pub struct UpstreamClient {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, UpstreamBody>,
}

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
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Ok(UpstreamClient { client })
    }

    /// Sends one request and returns the response head with its streaming body.
    pub async fn send(&self, request: Request<UpstreamBody>) -> Result<Response<Incoming>, UpstreamError> {
        self.client.request(request).await.map_err(|e| UpstreamError(crate::error_chain(&e)))
    }
}
