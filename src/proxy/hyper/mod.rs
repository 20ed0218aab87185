//! The hyper transport: requests that hyper parsed (h2 callers, HTTP/1.0, chunked or large bodies, `Expect`,
//! upgrades, routes to TLS upstreams, and every request when `server.h1_transport = false`), sent through hyper's
//! client ([`UpstreamClient::send`]). hyper frames both sides; the phases are the proxy's ([`Proxy`]).
//!
//! A request body streams to the upstream as it comes, and is kept (up to `replay_buffer`) by [`ReplayBody`] so that
//! the request can be replayed after a 401. When the caller goes away (an h2 `RST_STREAM`, a closed connection),
//! hyper drops the request's future: the upstream round trip is dropped with it and its [`crate::proxy::InFlight`] still
//! lowers the in-flight gauge.

pub mod grpc;
pub(crate) mod upgrade;

use http::header::CONTENT_LENGTH;
use http::request::Parts;
use http::{HeaderValue, Method, Request, Response, Version};
use http_body::Body;
use http_body_util::Either;
use hyper::body::Incoming;
use tokio::time::Instant;

use self::grpc::{ResponseBody, UnauthenticatedWatch};
use crate::proxy::h1::framing::parse_length;
use crate::proxy::lifecycle::{self, Attempt, Transport};
use crate::proxy::replay::{BufferedBody, Replay, ReplayBody};
use crate::proxy::upstream::slots::OwnedPlace;
use crate::proxy::upstream::{may_retry, CallerWait, FailedSend, UpstreamBody, UpstreamError};
use crate::proxy::{
    Answer, Connection, ErrorContext, Proxy, ProxyBody, ProxyError, Resend, Retried, Route, Target, X_REQUEST_ID,
};
use crate::token::Token;

/// Serves one request; never fails (errors are responses).
pub async fn handle(proxy: &Proxy, request: Request<Incoming>, connection: &Connection) -> Response<ProxyBody> {
    let (mut parts, body) = request.into_parts();
    let mut in_flight = proxy.begin(&mut parts);
    let grpc = grpc::is_grpc(&parts.headers);
    // A gRPC caller's error goes as HTTP 200 with a grpc-status: metrics and the access log count the HTTP status
    // the error has.
    let mut error_status = None;
    let admitted = proxy.admit(&mut parts, connection);
    if let Ok(route) = admitted {
        in_flight.routed(route);
    }
    let mut retried = in_flight.retried();
    let mut response = match admitted {
        Ok(route) => {
            let started = in_flight.started();
            match forward(proxy, route, parts, body, connection, started, &mut retried).await {
                Ok(response) => response,
                Err(error) => {
                    error_status = Some(error.status());
                    proxy.error_response(route, error, grpc)
                }
            }
        }
        Err(error) => {
            // A request refused before routing may be malformed: where the next one starts is not known.
            let close = error.ends_connection() && parts.version < Version::HTTP_2;
            error_status = Some(error.status());
            let mut response = error.into_response(&ErrorContext { grpc, ..ErrorContext::default() });
            if close {
                response.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }
    };
    response.headers_mut().insert(X_REQUEST_ID.clone(), in_flight.request_id().clone());
    proxy.end(in_flight, error_status.unwrap_or(response.status()), &retried);
    response
}

/// Phases 2 to 6 for one request: the lifecycle ([`lifecycle::forward`]) with hyper's I/O, or an upgrade's.
async fn forward(
    proxy: &Proxy,
    route: &Route,
    mut parts: Parts,
    body: Incoming,
    connection: &Connection,
    started: Instant,
    retried: &mut Retried,
) -> Result<Response<ProxyBody>, ProxyError> {
    let deadline = started + proxy.request_timeout;
    let grpc = grpc::is_grpc(&parts.headers);
    let head_request = parts.method == Method::HEAD;
    if let Some(requested) = upgrade::requested(&mut parts) {
        let handshake = upgrade::Handshake::new(proxy, route, body, requested, deadline);
        return Box::pin(handshake.forward(parts, connection, retried)).await;
    }
    let mut transport = Hyper {
        proxy,
        route,
        deadline,
        body: Some(body),
        saved: None,
        replay: Replay::none(),
        next: None,
        response: None,
        resent: None,
    };
    let mut target = None;
    let delivered =
        lifecycle::forward(route, &mut parts, &mut target, connection, deadline, retried, &mut transport).await;
    let delivery = delivered?;
    // Only an answer the decision delivers (not a refusal left without its replay) is watched for gRPC's
    // UNAUTHENTICATED.
    let watch = (grpc && (delivery.decided() || retried.any()))
        .then(|| unauthenticated_watch(route, target.as_ref()?, delivery.token.as_deref()))
        .flatten();
    let response = transport.response.ok_or_else(|| ProxyError::UpstreamUnreachable("no response was kept".into()))?;
    Ok(finish(response, head_request, watch, delivery.place))
}

/// hyper's side of a request's lifecycle: the caller's body, streamed by the first send and kept (up to
/// `replay_buffer`, by [`ReplayBody`]) when the request may have to go once more, and the request head kept for that.
struct Hyper<'p> {
    proxy: &'p Proxy,
    route: &'p Route,
    deadline: Instant,
    /// The caller's body, until the first send.
    body: Option<Incoming>,
    /// The request head, kept for a later send (without its extensions, which hyper fills per connection and which
    /// only cost allocations to copy).
    saved: Option<Parts>,
    /// The body kept by the first send, or a copy of the last one sent: the next send's.
    replay: Replay,
    /// The next send's body, once had.
    next: Option<BufferedBody>,
    /// The upstream's response to the last send, until it is delivered or discarded.
    response: Option<Response<Incoming>>,
    /// The last send wrote the request a second time, and why.
    resent: Option<Resend>,
}

impl Transport for Hyper<'_> {
    type Failure = ProxyError;
    const BOUNDED: bool = true;

    async fn send(&mut self, parts: &mut Parts, attempt: &Attempt<'_>) -> Result<(), ProxyError> {
        self.response = Some(self.send_once(parts, attempt).await?);
        Ok(())
    }

    fn answer(&mut self) -> Answer {
        self.response
            .as_ref()
            .map(|response| Answer::from_headers(response.status(), response.headers()))
            .unwrap_or_default()
    }

    async fn can_resend(&mut self) -> bool {
        if self.saved.is_none() {
            return false;
        }
        if self.next.is_none() {
            // Waited for within the request's deadline: hyper may still hold the body sent last for a moment.
            let replay = std::mem::replace(&mut self.replay, Replay::none());
            self.next = tokio::time::timeout_at(self.deadline, replay.replay()).await.ok().flatten();
        }
        self.next.is_some()
    }

    fn discard(&mut self) {
        self.response = None;
    }

    fn resent(&mut self) -> Option<Resend> {
        self.resent.take()
    }
}

impl Hyper<'_> {
    /// One send: the first streams the caller's body, a later one sends the request kept.
    async fn send_once(&mut self, parts: &mut Parts, attempt: &Attempt<'_>) -> Result<Response<Incoming>, ProxyError> {
        if let Some(body) = self.body.take() {
            return self.first(parts, attempt, body).await;
        }
        let (Some(head), Some(body)) = (&self.saved, self.next.take()) else {
            return Err(ProxyError::UpstreamUnreachable("the request was not kept for another send".into()));
        };
        // Kept whole, it can go once more; with a rest to stream, only this once.
        if let Some(copy) = body.try_clone() {
            self.replay = Replay::ready(copy);
        }
        let request = attempt.request(copy_head(head), UpstreamBody::Replay { body })?;
        send(self.proxy, self.route, request, self.deadline, false).await.map_err(Failure::into_error)
    }

    /// The first send: the caller's body streams to the upstream (kept if the request may go once more). A request
    /// the upstream did not answer on a reused connection goes once more at once, if its body is known (none, or
    /// kept): a bodiless idempotent one whose connection turned out stale ([`may_retry`]), or any the upstream refused
    /// unprocessed.
    async fn first(
        &mut self,
        parts: &mut Parts,
        attempt: &Attempt<'_>,
        body: Incoming,
    ) -> Result<Response<Incoming>, ProxyError> {
        let (proxy, route, deadline) = (self.proxy, self.route, self.deadline);
        frame_request(parts, &body);
        let replayable = attempt.token().is_some_and(|token| Proxy::may_send_again(route, token));
        let bodiless = body.is_end_stream();
        let resendable = parts.method.is_idempotent() && bodiless;
        self.saved = (replayable || bodiless).then(|| copy_head(parts));
        let waiting = CallerWait::for_body(&body);
        let body = if replayable {
            let (body, replay) = ReplayBody::new(body, proxy.replay_buffer);
            self.replay = replay;
            UpstreamBody::Kept { body, waiting: waiting.clone() }
        } else {
            UpstreamBody::Plain { body, waiting: waiting.clone() }
        };
        let request = attempt.request(take_head(parts), body)?;
        match send(proxy, route, request, deadline, resendable).await {
            Ok(response) => Ok(response),
            // The upstream was still waiting for the caller's body: the caller's delay, not the upstream's.
            Err(Failure::Error(ProxyError::UpstreamTimeout(after))) if waiting.is_some_and(|w| w.waiting()) => {
                Err(ProxyError::RequestTimeout(after))
            }
            // Written, and the connection closed with no byte back: hyper reports it for a bodiless idempotent request.
            Err(Failure::Resend { reused, detail }) => {
                let failed = FailedSend { reused, written: true, answered: false, idempotent: true };
                match (&self.saved, may_retry(failed)) {
                    (Some(head), true) => {
                        tracing::debug!(route = %route.name, "sending once more on a new connection: {detail}");
                        self.resent = Some(Resend::StaleConnection);
                        let again = attempt.request(copy_head(head), UpstreamBody::empty())?;
                        send(proxy, route, again, deadline, false).await.map_err(Failure::into_error)
                    }
                    _ => Err(ProxyError::UpstreamUnreachable(detail)),
                }
            }
            Err(Failure::Unprocessed(detail)) => {
                // Sent again with its head and its body: none, or the kept one (waited for within the request's
                // deadline: hyper may still hold the first attempt's body for a moment).
                let Some(head) = &self.saved else { return Err(ProxyError::UpstreamUnreachable(detail)) };
                let body = if bodiless {
                    Some(UpstreamBody::empty())
                } else {
                    let kept = std::mem::replace(&mut self.replay, Replay::none()).replay();
                    tokio::time::timeout_at(deadline, kept).await.ok().flatten().map(|body| {
                        // Kept whole, it can go a third time after a 401; with a rest to stream, only this once.
                        if let Some(copy) = body.try_clone() {
                            self.replay = Replay::ready(copy);
                        }
                        UpstreamBody::Replay { body }
                    })
                };
                let Some(body) = body else { return Err(ProxyError::UpstreamUnreachable(detail)) };
                tracing::debug!(route = %route.name, "sending once more, the upstream did not process it: {detail}");
                self.resent = Some(Resend::RefusedStream);
                let again = attempt.request(copy_head(head), body)?;
                send(proxy, route, again, deadline, false).await.map_err(Failure::into_error)
            }
            Err(other) => Err(other.into_error()),
        }
    }
}

/// For a gRPC call carrying `token` on a route with `grpc_unauthenticated_refresh`: what retires the token when the
/// call is answered `UNAUTHENTICATED`.
fn unauthenticated_watch(route: &Route, target: &Target, token: Option<&Token>) -> Option<Box<UnauthenticatedWatch>> {
    let (tokens, token) = (target.tokens(route)?, token?);
    route.grpc_unauthenticated_refresh.then(|| {
        Box::new(UnauthenticatedWatch {
            tokens: std::sync::Arc::clone(tokens),
            generation: token.generation,
            unauthorized: route.metrics.upstream_unauthorized.clone(),
        })
    })
}

/// A copy of a request head without its extensions.
pub(super) fn copy_head(parts: &Parts) -> Parts {
    let (mut head, ()) = Request::new(()).into_parts();
    head.method = parts.method.clone();
    head.version = parts.version;
    head.headers = parts.headers.clone();
    head
}

/// The request head, taken out of `parts` (which keeps an empty one).
pub(super) fn take_head(parts: &mut Parts) -> Parts {
    std::mem::replace(parts, Request::new(()).into_parts().0)
}

/// Why a round trip failed: an error to answer, or a request the upstream did not answer, which may go once more.
enum Failure {
    Error(ProxyError),
    Resend {
        reused: bool,
        detail: String,
    },
    /// Refused unprocessed by the upstream ([`UpstreamError::Unprocessed`]): may go once more, any method.
    Unprocessed(String),
}

impl Failure {
    fn into_error(self) -> ProxyError {
        match self {
            Failure::Error(error) => error,
            Failure::Resend { detail, .. } | Failure::Unprocessed(detail) => ProxyError::UpstreamUnreachable(detail),
        }
    }
}

/// The request's framing, ours: the caller's `Content-Length` is never copied; hyper's client derives the length from
/// the body it reads (or chunks a body of unknown length), and a caller's explicit empty body keeps its
/// `Content-Length: 0`, as the h1 transport writes it.
pub(super) fn frame_request(parts: &mut Parts, body: &Incoming) {
    let had_length = parts.headers.remove(CONTENT_LENGTH).is_some();
    if had_length && body.is_end_stream() {
        parts.headers.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
    }
}

/// One round trip to the upstream, bounded by the request's deadline (`resendable`: the request could go once
/// more, so a connection that closed without answering is reported as such).
async fn send(
    proxy: &Proxy,
    route: &Route,
    request: Request<UpstreamBody>,
    deadline: Instant,
    resendable: bool,
) -> Result<Response<Incoming>, Failure> {
    match tokio::time::timeout_at(deadline, proxy.client.send(request, route.via(), resendable)).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(UpstreamError::Unanswered { detail, reused })) => Err(Failure::Resend { reused, detail }),
        Ok(Err(UpstreamError::Unprocessed(detail))) => Err(Failure::Unprocessed(detail)),
        Ok(Err(error)) => Err(Failure::Error(error.into())),
        Err(_) => Err(Failure::Error(ProxyError::UpstreamTimeout(proxy.request_timeout))),
    }
}

/// Phase 6: the upstream's response as the caller gets it: headers as [`crate::proxy::headers::forwarded`] says, and its
/// length ours, never copied ([`crate::proxy::headers::response_length`]).
/// `watch` looks for a gRPC `UNAUTHENTICATED` in a trailers-only head or in the trailers; `place` (the request's
/// among the upstream's requests in flight) is held until the body is sent.
pub(super) fn finish(
    response: Response<Incoming>,
    head_request: bool,
    mut watch: Option<Box<UnauthenticatedWatch>>,
    place: Option<OwnedPlace>,
) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    if watch.as_mut().is_some_and(|watch| watch.check(&parts.headers)) {
        watch = None;
    }
    crate::proxy::headers::strip_hop_by_hop(&mut parts.headers);
    let stated = parts.headers.remove(CONTENT_LENGTH).and_then(|value| parse_length(value.as_bytes()));
    let length = crate::proxy::headers::response_length(parts.status, head_request, stated, body.size_hint().exact());
    if let Some(length) = length {
        parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
    }
    Response::from_parts(parts, Either::Left(ResponseBody::new(body, watch, place)))
}
