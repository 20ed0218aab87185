//! HTTP/1.1 upgrades (WebSocket and any other `Upgrade`): the handshake goes to the route's upstream with the token
//! on a connection of its own; a `101` answer switches both sides to a byte tunnel (`hyper::upgrade`), which lives
//! until either side closes, or no byte has passed either way for `tunnel_idle_timeout`, and is logged once when it
//! ends. Its caller's connection still counts against `max_connections` (the listener's permit is held by the
//! socket, see `crate::activity`). A refusal of the token (401, `retry_on_status`) is
//! replayed once, as for any bodiless request. HTTP/2 has no `Upgrade`; its extended CONNECT (RFC 8441) is not
//! offered (tokenproxy's h2 listener does not announce `SETTINGS_ENABLE_CONNECT_PROTOCOL`), so h2 clients use
//! HTTP/1.1 for WebSockets.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONNECTION, UPGRADE};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Response, StatusCode, Version};
use http_body::Body;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::proxy::lifecycle::{self, Attempt, Transport};
use crate::proxy::upstream::{CallerWait, UpstreamBody};
use crate::proxy::{Answer, Connection, Proxy, ProxyBody, ProxyError, Retried, Route};

/// An upgrade the caller asked for: the protocol it named, and its side of the connection once switched.
pub(super) struct Requested {
    protocol: HeaderValue,
    caller: OnUpgrade,
}

/// The upgrade an HTTP/1.1 request asks for (`Upgrade` with `Connection: upgrade`, RFC 9110 §7.8), taking the
/// caller's side of the connection out of the request; `None` for any other request.
pub(super) fn requested(parts: &mut Parts) -> Option<Requested> {
    if parts.version >= Version::HTTP_2 || !lists_upgrade(&parts.headers) {
        return None;
    }
    let protocol = parts.headers.get(UPGRADE)?.clone();
    let caller = parts.extensions.remove::<OnUpgrade>()?;
    Some(Requested { protocol, caller })
}

fn lists_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .any(|value| value.as_bytes().split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade")))
}

/// An upgrade handshake on its way: hyper's side of its lifecycle. The handshake goes once more (with a newer token
/// after a refusal, or with the upstream's DPoP nonce) only when it has no body; it holds no place among the
/// upstream's requests in flight (`max_upstream_connections`): a tunnel is counted by the listener instead.
pub(super) struct Handshake<'p> {
    proxy: &'p Proxy,
    route: &'p Route,
    deadline: Instant,
    /// The caller's body, until the first send.
    body: Option<Incoming>,
    requested: Requested,
    /// The handshake's head, kept for the one send after the first.
    saved: Option<Parts>,
    /// The upstream's answer to the last send, until it is delivered or discarded.
    response: Option<Response<Incoming>>,
}

impl<'p> Handshake<'p> {
    /// The handshake of `requested` with `body`, within `deadline`.
    pub(super) fn new(
        proxy: &'p Proxy,
        route: &'p Route,
        body: Incoming,
        requested: Requested,
        deadline: Instant,
    ) -> Handshake<'p> {
        Handshake { proxy, route, deadline, body: Some(body), requested, saved: None, response: None }
    }

    /// Forwards the handshake through the request's lifecycle and, on `101`, starts the tunnel; any other answer
    /// goes to the caller as it is.
    pub(super) async fn forward(
        mut self,
        mut parts: Parts,
        connection: &Connection,
        retried: &mut Retried,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let (proxy, route, deadline) = (self.proxy, self.route, self.deadline);
        lifecycle::forward(route, &mut parts, &mut None, connection, deadline, retried, &mut self).await?;
        let Some(mut response) = self.response.take() else {
            return Err(ProxyError::UpstreamUnreachable("no answer to the handshake was kept".into()));
        };
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Ok(super::finish(response, false, None, None));
        }
        let Requested { protocol, caller } = self.requested;
        let upstream = hyper::upgrade::on(&mut response);
        let (mut head, _) = response.into_parts();
        let protocol = head.headers.get(UPGRADE).cloned().unwrap_or(protocol);
        crate::proxy::headers::strip_hop_by_hop(&mut head.headers);
        head.headers.insert(UPGRADE, protocol.clone());
        head.headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        let ends = (caller, upstream);
        tokio::spawn(tunnel(Arc::clone(&route.name), protocol, ends, proxy.tunnel_idle_timeout, proxy.access_log));
        Ok(Response::from_parts(head, Either::Right(Full::new(Bytes::new()))))
    }
}

impl Transport for Handshake<'_> {
    type Failure = ProxyError;
    const BOUNDED: bool = false;

    async fn send(&mut self, parts: &mut Parts, attempt: &Attempt<'_>) -> Result<(), ProxyError> {
        let request = match self.body.take() {
            Some(body) => {
                super::frame_request(parts, &body);
                // The hop-by-hop headers of the caller were removed; these two are the upgrade's own, for this hop.
                parts.headers.insert(UPGRADE, self.requested.protocol.clone());
                parts.headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
                let token = attempt.token();
                let again = body.is_end_stream() && token.is_some_and(|token| Proxy::may_send_again(self.route, token));
                self.saved = again.then(|| super::copy_head(parts));
                let waiting = CallerWait::for_body(&body);
                let head = super::take_head(parts);
                attempt.request(head, UpstreamBody::Plain { body, waiting })?
            }
            None => {
                let Some(head) = self.saved.take() else {
                    return Err(ProxyError::UpstreamUnreachable("the handshake was not kept for another send".into()));
                };
                attempt.request(head, UpstreamBody::empty())?
            }
        };
        match tokio::time::timeout_at(self.deadline, self.proxy.client.upgrade(request, self.route.via())).await {
            Ok(answer) => {
                self.response = Some(answer?);
                Ok(())
            }
            Err(_) => Err(ProxyError::UpstreamTimeout(self.proxy.request_timeout)),
        }
    }

    fn answer(&mut self) -> Answer {
        let response = self.response.as_ref();
        response.map(|response| Answer::from_headers(response.status(), response.headers())).unwrap_or_default()
    }

    async fn can_resend(&mut self) -> bool {
        self.saved.is_some()
    }

    fn discard(&mut self) {
        self.response = None;
    }
}

/// Copies bytes both ways until either side closes or `idle` passes with no byte either way, then logs the tunnel
/// once.
async fn tunnel(
    route: Arc<str>,
    protocol: HeaderValue,
    (caller, upstream): (OnUpgrade, OnUpgrade),
    idle: std::time::Duration,
    log: bool,
) {
    let started = Instant::now();
    let (caller, upstream) = match tokio::try_join!(caller, upstream) {
        Ok(sides) => sides,
        Err(error) => {
            tracing::debug!(route = %route, "the upgrade did not complete: {error}");
            return;
        }
    };
    let last = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut caller = Noted::new(TokioIo::new(caller), started, Arc::clone(&last));
    let mut upstream = Noted::new(TokioIo::new(upstream), started, Arc::clone(&last));
    let copy = tokio::io::copy_bidirectional(&mut caller, &mut upstream);
    let outcome = tokio::select! {
        copied = copy => if copied.is_ok() { "closed" } else { "reset" },
        () = silence(started, &last, idle) => "idle",
    };
    if log && tracing::enabled!(target: "access", tracing::Level::INFO) {
        tracing::info!(
            target: "access",
            route = %route,
            protocol = protocol.to_str().unwrap_or("?"),
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            bytes_from_caller = caller.bytes,
            bytes_from_upstream = upstream.bytes,
            outcome,
            "upgraded connection ended"
        );
    }
}

/// Returns once `idle` has passed with no byte through a tunnel whose sides note their traffic in `last`
/// (milliseconds after `started`; see [`Noted`]).
pub(crate) async fn silence(started: Instant, last: &std::sync::atomic::AtomicU64, idle: std::time::Duration) {
    loop {
        let quiet_until = started + std::time::Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
        if Instant::now() >= quiet_until {
            return;
        }
        tokio::time::sleep_until(quiet_until).await;
    }
}

/// One side of a tunnel, noting when it last read or wrote bytes (milliseconds after `started`, in `last`) and how
/// many it read.
pub(crate) struct Noted<T> {
    io: T,
    started: Instant,
    last: Arc<std::sync::atomic::AtomicU64>,
    bytes: u64,
}

impl<T> Noted<T> {
    /// `io`, noting its traffic in `last`.
    pub(crate) fn new(io: T, started: Instant, last: Arc<std::sync::atomic::AtomicU64>) -> Noted<T> {
        Noted { io, started, last, bytes: 0 }
    }

    fn note(&self) {
        self.last.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Noted<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        let read_now = buf.filled().len() - before;
        if read_now > 0 {
            self.bytes += read_now as u64;
            self.note();
        }
        read
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Noted<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.note();
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
