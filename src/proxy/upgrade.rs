//! HTTP/1.1 upgrades (WebSocket and any other `Upgrade`): the handshake goes to the route's upstream with the token
//! on a connection of its own; a `101` answer switches both sides to a byte tunnel (`hyper::upgrade`), which lives
//! until either side closes and is logged once when it does. A refusal of the token (401, `retry_on_status`) is
//! replayed once, as for any bodiless request. HTTP/2 has no `Upgrade`; its extended CONNECT (RFC 8441) is not
//! offered (tokenproxy's h2 listener does not announce `SETTINGS_ENABLE_CONNECT_PROTOCOL`), so h2 clients use
//! HTTP/1.1 for WebSockets.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONNECTION, UPGRADE};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Response, StatusCode, Version};
use http_body::Body;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::upstream::{CallerWait, UpstreamBody, UpstreamError};
use super::{Proxy, ProxyBody, ProxyError, Retried, Route, Target};
use crate::token::Token;

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

/// The handshake to forward: the request as prepared (hop-by-hop headers gone), its body, the token and deadline.
pub(super) struct Handshake {
    pub parts: Parts,
    pub body: Incoming,
    pub token: Option<Arc<Token>>,
    pub requested: Requested,
    pub deadline: Instant,
}

/// Forwards an upgrade handshake and, on `101`, starts the tunnel; any other answer goes to the caller as it is.
pub(super) async fn forward(
    proxy: &Proxy,
    route: &Route,
    target: &Target,
    handshake: Handshake,
    replayed: &mut bool,
) -> Result<Response<ProxyBody>, ProxyError> {
    let Handshake { mut parts, body, token, requested, deadline } = handshake;
    // The hop-by-hop headers of the caller were removed; these two are the upgrade's own, for this hop.
    parts.headers.insert(UPGRADE, requested.protocol.clone());
    parts.headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    let replayable = body.is_end_stream() && token.as_deref().is_some_and(|token| Proxy::may_send_again(route, token));
    let head = replayable.then(|| super::hyper_transport::copy_head(&parts));
    let waiting = CallerWait::for_body(&body);
    let request =
        super::hyper_transport::attach(route, target, parts, token.as_deref(), UpstreamBody::Plain { body, waiting })?;
    let mut response = send(proxy, route, request, deadline).await?;
    let decision = Proxy::decide(
        route,
        &super::hyper_transport::answer(&response, token.as_deref()),
        token.as_deref(),
        Retried::default(),
    );
    // One more send at most: with a newer token after a 401, or with the upstream's DPoP nonce.
    let mut retried = Retried::default();
    let again = match head {
        Some(head) => Proxy::next_token(route, target, decision, token.as_ref(), deadline, &mut retried)
            .await
            .map(|fresh| (head, fresh)),
        None => None,
    };
    if let Some((head, fresh)) = again {
        *replayed = true;
        drop(response);
        let again = super::hyper_transport::attach(route, target, head, Some(&fresh), UpstreamBody::empty())?;
        response = send(proxy, route, again, deadline).await?;
        Proxy::decide(route, &super::hyper_transport::answer(&response, Some(&fresh)), Some(&fresh), retried);
    }
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(super::hyper_transport::finish(response, false, None));
    }
    let upstream = hyper::upgrade::on(&mut response);
    let (mut head, _) = response.into_parts();
    let protocol = head.headers.get(UPGRADE).cloned().unwrap_or(requested.protocol);
    super::headers::strip_hop_by_hop(&mut head.headers);
    head.headers.insert(UPGRADE, protocol.clone());
    head.headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    tokio::spawn(tunnel(Arc::clone(&route.name), protocol, requested.caller, upstream, proxy.access_log));
    Ok(Response::from_parts(head, Either::Right(Full::new(Bytes::new()))))
}

async fn send(
    proxy: &Proxy,
    route: &Route,
    request: http::Request<UpstreamBody>,
    deadline: Instant,
) -> Result<Response<Incoming>, ProxyError> {
    match tokio::time::timeout_at(deadline, proxy.client.upgrade(request, route.via())).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(UpstreamError::CallerBody(detail))) => Err(ProxyError::Malformed(detail)),
        Ok(Err(
            UpstreamError::Failed(detail)
            | UpstreamError::Unprocessed(detail)
            | UpstreamError::Unanswered { detail, .. },
        )) => Err(ProxyError::UpstreamUnreachable(detail)),
        Err(_) => Err(ProxyError::UpstreamTimeout(proxy.request_timeout)),
    }
}

/// Copies bytes both ways until either side closes, then logs the tunnel once.
async fn tunnel(route: Arc<str>, protocol: HeaderValue, caller: OnUpgrade, upstream: OnUpgrade, log: bool) {
    let started = Instant::now();
    let (caller, upstream) = match tokio::try_join!(caller, upstream) {
        Ok(sides) => sides,
        Err(error) => {
            tracing::debug!(route = %route, "the upgrade did not complete: {error}");
            return;
        }
    };
    let (mut caller, mut upstream) = (TokioIo::new(caller), TokioIo::new(upstream));
    let copied = tokio::io::copy_bidirectional(&mut caller, &mut upstream).await;
    if log && tracing::enabled!(target: "access", tracing::Level::INFO) {
        let (from_caller, from_upstream) = copied.as_ref().map_or((0, 0), |&(a, b)| (a, b));
        tracing::info!(
            target: "access",
            route = %route,
            protocol = protocol.to_str().unwrap_or("?"),
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            bytes_from_caller = from_caller,
            bytes_from_upstream = from_upstream,
            outcome = if copied.is_ok() { "closed" } else { "reset" },
            "upgraded connection ended"
        );
    }
}
