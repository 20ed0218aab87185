//! The hyper transport: requests that hyper parsed (h2 callers, HTTP/1.0, chunked or large bodies, `Expect`,
//! upgrades, routes to TLS upstreams, and every request when `server.direct_http1 = false`), sent through hyper's
//! client ([`UpstreamClient::send`]). hyper frames both sides; the phases are the proxy's ([`Proxy`]).
//!
//! A request body streams to the upstream as it comes, and is kept (up to `replay_buffer`) by [`ReplayBody`] so that
//! the request can be replayed after a 401. When the caller goes away (an h2 `RST_STREAM`, a closed connection),
//! hyper drops the request's future: the upstream exchange is dropped with it and its [`super::Exchange`] still
//! lowers the in-flight gauge.

use std::sync::Arc;

use super::upstream::slots::OwnedPlace;
use http::header::CONTENT_LENGTH;
use http::request::Parts;
use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::Body;
use http_body_util::Either;
use hyper::body::Incoming;
use tokio::time::Instant;

use super::grpc::{self, ResponseBody, UnauthenticatedWatch};
use super::h1::framing::parse_length;
use super::replay::{Replay, ReplayBody};
use super::upgrade;
use super::upstream::{may_retry, CallerWait, UpstreamBody, UpstreamError};
use super::{
    Answer, Connection, Decision, ErrorContext, Proxy, ProxyBody, ProxyError, Retried, Route, Target, X_REQUEST_ID,
};
use crate::metrics::ReplayOutcome;
use crate::token::Token;

/// Serves one request; never fails (errors are responses).
pub async fn handle(proxy: &Proxy, request: Request<Incoming>, connection: &Connection) -> Response<ProxyBody> {
    let (mut parts, body) = request.into_parts();
    let mut exchange = proxy.begin(&mut parts);
    let mut replayed = false;
    let grpc = grpc::is_grpc(&parts.headers);
    // A gRPC caller's error goes as HTTP 200 with a grpc-status: metrics and the access log count the HTTP status
    // the error has.
    let mut error_status = None;
    let mut response = match proxy.admit(&mut parts) {
        Ok(route) => {
            exchange.routed(route);
            let started = exchange.started();
            match forward(proxy, route, parts, body, connection, started, &mut replayed).await {
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
    response.headers_mut().insert(X_REQUEST_ID.clone(), exchange.request_id().clone());
    proxy.end(exchange, error_status.unwrap_or(response.status()), replayed);
    response
}

/// The first attempt of a request that got a 401.
struct Attempt {
    /// Its place among the upstream's requests in flight.
    place: OwnedPlace,
    token: Arc<Token>,
    replay: Replay,
    response: Response<Incoming>,
    /// The request's deadline, which the replay shares.
    deadline: Instant,
    /// The request is a HEAD (its response has no body, whatever its length says).
    head_request: bool,
    /// The request is a gRPC call.
    grpc: bool,
}

/// Phases 2 to 6 for one request.
async fn forward(
    proxy: &Proxy,
    route: &Route,
    mut parts: Parts,
    body: Incoming,
    connection: &Connection,
    started: Instant,
    replayed: &mut bool,
) -> Result<Response<ProxyBody>, ProxyError> {
    let deadline = started + proxy.request_timeout;
    let grpc = grpc::is_grpc(&parts.headers);
    let head_request = parts.method == Method::HEAD;
    let requested = upgrade::requested(&mut parts);
    let target = Proxy::prepare(route, &mut parts, connection)?;
    frame_request(&mut parts, &body);
    let token = match (target.tokens(route), target.attach) {
        (Some(tokens), true) => Some(Proxy::credential(tokens.as_ref(), None).await?),
        _ => None,
    };
    if let Some(requested) = requested {
        let handshake = upgrade::Handshake { parts, body, token, requested, deadline };
        return Box::pin(upgrade::forward(proxy, route, &target, handshake, replayed)).await;
    }
    let replayable = token.as_deref().is_some_and(|token| Proxy::may_send_again(route, token));
    // A bodiless idempotent request may go once more if its connection turns out stale (`may_retry`); any request
    // whose body is known (none, or kept) may go once more if the upstream refused it unprocessed.
    let bodiless = body.is_end_stream();
    let resendable = parts.method.is_idempotent() && bodiless;
    // Keep what a replay or a second send needs: the request head here (without the extensions, which hyper fills
    // per connection and which only cost allocations to copy), the body in ReplayBody.
    let saved = (replayable || bodiless).then(|| copy_head(&parts));
    let waiting = CallerWait::for_body(&body);
    let (body, mut replay) = if replayable {
        let (body, replay) = ReplayBody::new(body, proxy.replay_buffer);
        (UpstreamBody::Kept { body, waiting: waiting.clone() }, replay)
    } else {
        (UpstreamBody::Plain { body, waiting: waiting.clone() }, Replay::none())
    };
    let upstream_request = attach(route, &target, parts, token.as_deref(), body)?;
    let place = upstream_place(route, deadline).await?;
    let response = match send(proxy, route, upstream_request, deadline, resendable).await {
        // The upstream was still waiting for the caller's body: the caller's delay, not the upstream's.
        Err(Failure::Error(ProxyError::UpstreamTimeout(after))) if waiting.is_some_and(|w| w.waiting()) => {
            return Err(ProxyError::RequestTimeout(after));
        }
        Err(Failure::Resend { reused, detail }) => match (&saved, may_retry(reused, true, false, true)) {
            (Some(head), true) => {
                tracing::debug!(route = %route.name, "sending once more on a new connection: {detail}");
                let again = attach(route, &target, copy_head(head), token.as_deref(), UpstreamBody::empty())?;
                send(proxy, route, again, deadline, false).await.map_err(Failure::into_error)?
            }
            _ => return Err(ProxyError::UpstreamUnreachable(detail)),
        },
        Err(Failure::Unprocessed(detail)) => {
            // Sent again with its head and its body: none, or the kept one (waited for within the request's
            // deadline: hyper may still hold the first attempt's body for a moment).
            let Some(head) = &saved else { return Err(ProxyError::UpstreamUnreachable(detail)) };
            let body = if bodiless {
                Some(UpstreamBody::empty())
            } else {
                let kept = std::mem::replace(&mut replay, Replay::none()).replay();
                tokio::time::timeout_at(deadline, kept).await.ok().flatten().map(|body| {
                    // Kept whole, it can go a third time after a 401; with a rest to stream, only this once.
                    if let Some(copy) = body.try_clone() {
                        replay = Replay::ready(copy);
                    }
                    UpstreamBody::Replay { body }
                })
            };
            let Some(body) = body else { return Err(ProxyError::UpstreamUnreachable(detail)) };
            tracing::debug!(route = %route.name, "sending once more, the upstream did not process it: {detail}");
            let again = attach(route, &target, copy_head(head), token.as_deref(), body)?;
            send(proxy, route, again, deadline, false).await.map_err(Failure::into_error)?
        }
        Err(other) => return Err(other.into_error()),
        Ok(response) => response,
    };
    let watch = grpc.then(|| unauthenticated_watch(route, &target, token.as_deref())).flatten();
    let decision = Proxy::decide(route, &answer(&response, token.as_deref()), token.as_deref(), Retried::default());
    match (decision, token, saved) {
        (Decision::Deliver, _, _) | (_, None, _) | (_, _, None) => {
            Ok(finish(response, head_request, watch, Some(place)))
        }
        (decision, Some(token), Some(parts)) => {
            let first = Attempt { place, token, replay, response, deadline, head_request, grpc };
            // The rare path is boxed, so that every request's future stays small.
            Box::pin(replay_after_401(proxy, route, &target, parts, first, decision, replayed)).await
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

/// What the status decision looks at in a response to `token` (its `DPoP-Nonce` only for a DPoP-bound token: other
/// requests do not pay for the lookup).
pub(super) fn answer(response: &Response<Incoming>, token: Option<&Token>) -> Answer {
    let dpop_nonce = token
        .filter(|token| token.dpop().is_some())
        .and_then(|_| response.headers().get(&crate::token::dpop::DPOP_NONCE).cloned());
    // Only a 4xx can be a refusal of the token (docs/configuration.md, "The 401 budget").
    let mut answer = Answer { status: response.status(), dpop_nonce, ..Answer::default() };
    if response.status().is_client_error() {
        for value in response.headers().get_all(http::header::WWW_AUTHENTICATE) {
            let found = super::headers::challenge(value.as_bytes());
            answer.invalid_token |= found.invalid_token;
            answer.use_dpop_nonce |= found.use_dpop_nonce;
        }
    }
    answer
}

/// A copy of a request head without its extensions.
pub(super) fn copy_head(parts: &Parts) -> Parts {
    let (mut head, ()) = Request::new(()).into_parts();
    head.method = parts.method.clone();
    head.version = parts.version;
    head.headers = parts.headers.clone();
    head
}

/// Why an exchange failed: an error to answer, or a request the upstream did not answer, which may go once more.
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
/// `Content-Length: 0`, as the HTTP/1.1 transport writes it.
fn frame_request(parts: &mut Parts, body: &Incoming) {
    let had_length = parts.headers.remove(CONTENT_LENGTH).is_some();
    if had_length && body.is_end_stream() {
        parts.headers.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
    }
}

/// Phase 4: the upstream request with `token` attached as the route says.
pub(super) fn attach<B>(
    route: &Route,
    target: &Target,
    mut parts: Parts,
    token: Option<&Token>,
    body: B,
) -> Result<Request<B>, ProxyError> {
    let (uri, credential) = Proxy::upstream_target(route, target, &parts.method, token)?;
    if let Some(credential) = credential {
        parts.headers.insert(credential.name.clone(), credential.value);
        if let Some(proof) = credential.proof {
            parts.headers.insert(crate::token::dpop::DPOP.clone(), proof);
        }
    }
    parts.uri = uri;
    Ok(Request::from_parts(parts, body))
}

/// One exchange with the upstream, bounded by the request's deadline (`resendable`: the request could go once
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
        // The caller's body was malformed or cut short: the caller's fault.
        Ok(Err(UpstreamError::CallerBody(detail))) => Err(Failure::Error(ProxyError::Malformed(detail))),
        Ok(Err(UpstreamError::Failed(detail))) => Err(Failure::Error(ProxyError::UpstreamUnreachable(detail))),
        Ok(Err(UpstreamError::Unanswered { detail, reused })) => Err(Failure::Resend { reused, detail }),
        Ok(Err(UpstreamError::Unprocessed(detail))) => Err(Failure::Unprocessed(detail)),
        Err(_) => Err(Failure::Error(ProxyError::UpstreamTimeout(proxy.request_timeout))),
    }
}

/// Phase 5: a 401 to a token we attached: a newer token (within the 401 budget), and the one replay; or, for a
/// DPoP-bound token, a 401 asking for the upstream's nonce: the same token again with a proof carrying it. At most
/// one of each (a third send needs the body kept whole).
async fn replay_after_401(
    proxy: &Proxy,
    route: &Route,
    target: &Target,
    parts: Parts,
    first: Attempt,
    mut decision: Decision,
    replayed: &mut bool,
) -> Result<Response<ProxyBody>, ProxyError> {
    let Attempt { place, mut token, replay, mut response, deadline, head_request, grpc } = first;
    let mut body = match tokio::time::timeout_at(deadline, replay.replay()).await {
        Ok(Some(body)) => body,
        _ => {
            route.metrics.replays(ReplayOutcome::NotReplayable).inc();
            return Ok(finish(response, head_request, None, Some(place)));
        }
    };
    let mut retried = Retried::default();
    loop {
        let Some(next) = Proxy::next_token(route, target, decision, Some(&token), deadline, &mut retried).await else {
            break;
        };
        let copy = body.try_clone();
        drop(response);
        *replayed = true;
        let request = attach(route, target, copy_head(&parts), Some(&next), UpstreamBody::Replay { body })?;
        response = send(proxy, route, request, deadline, false).await.map_err(Failure::into_error)?;
        token = next;
        decision = Proxy::decide(route, &answer(&response, Some(&token)), Some(&token), retried);
        match copy {
            Some(copy) => body = copy,
            None => break,
        }
    }
    // As for a first attempt, only an answer to a request that went out again is watched for gRPC's UNAUTHENTICATED.
    let watch = (grpc && retried.any()).then(|| unauthenticated_watch(route, target, Some(&token))).flatten();
    Ok(finish(response, head_request, watch, Some(place)))
}

/// A request's place among the requests in flight to its upstream (`max_upstream_connections`): at once, or when one
/// ends before the request's deadline; else 503 `upstream_busy`.
async fn upstream_place(route: &Route, deadline: Instant) -> Result<OwnedPlace, ProxyError> {
    match route.upstream_slots.try_owned() {
        Some(place) => Ok(place),
        None => tokio::time::timeout_at(deadline, route.upstream_slots.owned())
            .await
            .map_err(|_| ProxyError::UpstreamBusy(route.upstream_slots.limit())),
    }
}

/// Phase 6: the upstream's response as the caller gets it: headers as [`super::headers::forwarded`] says, and its
/// length ours, never copied: the length of the body hyper read, or for HEAD and 304 the upstream's, as a number.
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
    super::headers::strip_hop_by_hop(&mut parts.headers);
    let stated = parts.headers.remove(CONTENT_LENGTH).and_then(|value| parse_length(value.as_bytes()));
    let length = if head_request || parts.status == StatusCode::NOT_MODIFIED {
        stated
    } else if parts.status == StatusCode::NO_CONTENT {
        None
    } else {
        body.size_hint().exact()
    };
    if let Some(length) = length {
        parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
    }
    Response::from_parts(parts, Either::Left(ResponseBody::new(body, watch, place)))
}
