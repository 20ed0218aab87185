//! The hyper transport: requests that hyper parsed (h2 callers, HTTP/1.0, chunked or large bodies, `Expect`,
//! upgrades, routes to TLS upstreams, and every request when `server.direct_http1 = false`), sent through hyper's
//! client ([`UpstreamClient::send`]). hyper frames both sides; the phases are the proxy's ([`Proxy`]).
//!
//! A request body streams to the upstream as it comes, and is kept (up to `replay_buffer`) by [`ReplayBody`] so that
//! the request can be replayed after a 401. When the caller goes away (an h2 `RST_STREAM`, a closed connection),
//! hyper drops the request's future: the upstream exchange is dropped with it and its [`super::Exchange`] still
//! lowers the in-flight gauge.

use http::request::Parts;
use http::{HeaderValue, Request, Response, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use tokio::time::Instant;

use super::replay::{Replay, ReplayBody};
use super::upstream::{UpstreamBody, UpstreamError};
use super::{Connection, Decision, ErrorContext, Proxy, ProxyBody, ProxyError, Route, Target, X_REQUEST_ID};
use crate::metrics::ReplayOutcome;
use crate::token::Token;

/// Serves one request; never fails (errors are responses).
pub async fn handle(proxy: &Proxy, request: Request<Incoming>, connection: &Connection) -> Response<ProxyBody> {
    let (mut parts, body) = request.into_parts();
    let mut exchange = proxy.begin(&mut parts);
    let mut replayed = false;
    let mut response = match proxy.admit(&mut parts) {
        Ok(route) => {
            exchange.routed(route);
            let started = exchange.started();
            match forward(proxy, route, parts, body, connection, started, &mut replayed).await {
                Ok(response) => response,
                Err(error) => proxy.error_response(route, error),
            }
        }
        Err(error) => {
            // A request refused before routing may be malformed: where the next one starts is not known.
            let close = matches!(error, ProxyError::BadRequest(_)) && parts.version < Version::HTTP_2;
            let mut response = error.into_response(&ErrorContext::default());
            if close {
                response.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }
    };
    response.headers_mut().insert(X_REQUEST_ID.clone(), exchange.request_id().clone());
    proxy.end(exchange, response.status(), replayed);
    response
}

/// The first attempt of a request that got a 401.
struct Attempt<'a> {
    token: &'a Token,
    replay: Replay,
    response: Response<Incoming>,
    /// The request's deadline, which the replay shares.
    deadline: Instant,
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
    let target = Proxy::prepare(route, &mut parts, connection)?;
    let token = match (&route.tokens, target.attach) {
        (Some(tokens), true) => Some(Proxy::credential(tokens.as_ref(), None).await?),
        _ => None,
    };
    let replayable = token.is_some() && route.retry_on_401;
    // Keep what a replay needs: the request head here (without the extensions, which hyper fills per connection
    // and which only cost allocations to copy), the body in ReplayBody.
    let saved = replayable.then(|| {
        let (mut head, ()) = Request::new(()).into_parts();
        head.method = parts.method.clone();
        head.version = parts.version;
        head.headers = parts.headers.clone();
        head
    });
    let (body, replay) = if replayable {
        let (body, replay) = ReplayBody::new(body, proxy.replay_buffer);
        (UpstreamBody::Kept { body }, replay)
    } else {
        (UpstreamBody::Plain { body }, Replay::none())
    };
    let upstream_request = attach(route, &target, parts, token.as_deref(), body)?;
    let response = send(proxy, upstream_request, deadline).await?;
    let Decision::Replay { .. } = Proxy::decide(route, response.status(), token.as_deref(), false) else {
        return Ok(finish(response));
    };
    match (token, saved) {
        (Some(token), Some(parts)) => {
            let first = Attempt { token: &token, replay, response, deadline };
            // The rare path is boxed, so that every request's future stays small.
            Box::pin(replay_after_401(proxy, route, &target, parts, first, replayed)).await
        }
        _ => Ok(finish(response)),
    }
}

/// Phase 4: the upstream request with `token` attached as the route says.
fn attach<B>(
    route: &Route,
    target: &Target,
    mut parts: Parts,
    token: Option<&Token>,
    body: B,
) -> Result<Request<B>, ProxyError> {
    let (uri, credential) = Proxy::upstream_target(route, target, token)?;
    if let Some((name, value)) = credential {
        parts.headers.insert(name.clone(), value);
    }
    parts.uri = uri;
    Ok(Request::from_parts(parts, body))
}

/// One exchange with the upstream, bounded by the request's deadline.
async fn send(
    proxy: &Proxy,
    request: Request<UpstreamBody>,
    deadline: Instant,
) -> Result<Response<Incoming>, ProxyError> {
    match tokio::time::timeout_at(deadline, proxy.client.send(request)).await {
        Ok(Ok(response)) => Ok(response),
        // The caller's body was malformed or cut short: the caller's fault.
        Ok(Err(UpstreamError::CallerBody(detail))) => Err(ProxyError::BadRequest(detail)),
        Ok(Err(UpstreamError::Failed(detail))) => Err(ProxyError::UpstreamUnreachable(detail)),
        Err(_) => Err(ProxyError::UpstreamTimeout(proxy.request_timeout)),
    }
}

/// Phase 5: a 401 to a token we attached: a newer token (within the 401 budget), and the one replay.
async fn replay_after_401(
    proxy: &Proxy,
    route: &Route,
    target: &Target,
    parts: Parts,
    first: Attempt<'_>,
    replayed: &mut bool,
) -> Result<Response<ProxyBody>, ProxyError> {
    let Some(tokens) = &route.tokens else { return Ok(finish(first.response)) };
    let deadline = first.deadline;
    let body = match tokio::time::timeout_at(deadline, first.replay.replay()).await {
        Ok(Some(body)) => body,
        _ => {
            route.metrics.replays(ReplayOutcome::NotReplayable).inc();
            return Ok(finish(first.response));
        }
    };
    let Some(fresh) = Proxy::replacement(route, tokens.as_ref(), first.token.generation, deadline).await else {
        return Ok(finish(first.response));
    };
    drop(first.response);
    *replayed = true;
    let request = attach(route, target, parts, Some(&fresh), UpstreamBody::Replay { body })?;
    let response = send(proxy, request, deadline).await?;
    Proxy::decide(route, response.status(), Some(&fresh), true);
    Ok(finish(response))
}

/// Phase 6: the upstream's response as the caller gets it: headers as [`super::headers::forwarded`] says; hyper
/// frames the body.
fn finish(response: Response<Incoming>) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    super::headers::strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, Either::Left(body))
}
