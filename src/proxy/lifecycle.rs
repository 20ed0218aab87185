//! The request lifecycle, written once: a routed request's phases from its preparation to the response that goes
//! to the caller, with the one replay, over any transport.
//!
//! [`forward`] runs phases 2 to 5 of [`Proxy`] in order: prepare the request, get the credential, take a place among
//! the upstream's requests in flight, then send and decide, sending once more when the decision asks for it (a newer
//! token after a refusal, or the upstream's DPoP nonce) and the transport still has the request. A transport
//! ([`Transport`]) only does I/O and framing: it sends a prepared request and keeps the upstream's response head,
//! says what the status decision needs of that head, and keeps the request for a second send or says it cannot.
//! Every rule of the loop (which answer is a refusal, which token comes next, when to stop) lives here and in the
//! phase methods it calls; `tests::the_loop_has_one_home` fails if a transport grows its own.

use std::sync::Arc;

use http::request::Parts;
use http::Method;
use tokio::time::Instant;

use super::upstream::slots::OwnedPlace;
use super::{Answer, Connection, Credential, Decision, Proxy, ProxyError, Resend, Retried, Route, Target};
use crate::metrics::ReplayOutcome;
use crate::telemetry::{ChildSpan, RequestTrace};
use crate::token::Token;

/// What a transport does for the lifecycle: send a prepared request, keep the upstream's response head until it is
/// delivered or discarded, read what the decision needs of it, and keep the request for the next send. Static
/// dispatch: the lifecycle is compiled once per transport. The head stays in the transport (it is not moved through
/// the loop's results): the caller takes it from there once the lifecycle has settled on it.
pub(crate) trait Transport {
    /// How a send fails: the proxy's own error, or what only the transport knows (the caller went away).
    type Failure: From<ProxyError>;
    /// Whether a request holds a place among the upstream's requests in flight (`max_upstream_connections`) until
    /// its response is delivered; an upgrade's tunnel does not.
    const BOUNDED: bool;

    /// Sends the request: `parts` as prepared, with the URI and credential of `attempt`, and keeps the upstream's
    /// response head. Called once per send; the transport keeps what it needs of the request for a later one.
    async fn send(&mut self, parts: &mut Parts, attempt: &Attempt<'_>) -> Result<(), Self::Failure>;

    /// What the status decision looks at in the response head kept by the last send.
    fn answer(&mut self) -> Answer;

    /// Whether the request can go once more after the kept response (its body is still to be had).
    async fn can_resend(&mut self) -> bool;

    /// Drops the kept response: it will not be delivered (a new send follows).
    fn discard(&mut self);

    /// Whether the last send wrote the request a second time on its own (a stale keep-alive connection, a refused
    /// h2 stream), and why; asked once after each send.
    fn resent(&mut self) -> Option<Resend> {
        None
    }
}

/// One send of a request: where it goes and with which token.
pub(crate) struct Attempt<'a> {
    route: &'a Route,
    target: &'a Target,
    token: Option<&'a Token>,
    /// Its span, when the request is traced.
    span: Option<&'a ChildSpan>,
}

impl<'a> Attempt<'a> {
    /// The token this send carries.
    pub(crate) fn token(&self) -> Option<&'a Token> {
        self.token
    }

    /// Phase 4: the upstream URI and the headers that carry the token (a DPoP-bound token gets a new proof each time
    /// this is called: a transport that writes the request again on a new connection calls it again).
    pub(crate) fn upstream(&self, method: &Method) -> Result<(http::Uri, Option<Credential<'a>>), ProxyError> {
        Proxy::upstream_target(self.route, self.target, method, self.token)
    }

    /// Puts this send's `traceparent` in `headers` when its trace is sampled: the upstream's parent span is this
    /// send's (an unsampled caller's `traceparent` is left as it came).
    pub(crate) fn trace_into(&self, headers: &mut http::HeaderMap) {
        if let Some(span) = self.span {
            span.inject(headers);
        }
    }

    /// The upstream request: `parts` with the URI and the credential of this send, and `body`.
    pub(crate) fn request<B>(&self, mut parts: Parts, body: B) -> Result<http::Request<B>, ProxyError> {
        self.trace_into(&mut parts.headers);
        let (uri, credential) = self.upstream(&parts.method)?;
        if let Some(credential) = credential {
            parts.headers.insert(credential.name.clone(), credential.value);
            if let Some(proof) = credential.proof {
                parts.headers.insert(crate::token::dpop::DPOP.clone(), proof);
            }
        }
        parts.uri = uri;
        Ok(http::Request::from_parts(parts, body))
    }
}

/// What the lifecycle settled on, beside the response head the transport keeps for delivery.
pub(crate) struct Delivery {
    /// The token its request carried.
    pub token: Option<Arc<Token>>,
    /// The request's place among the upstream's requests in flight, held until the response is delivered.
    pub place: Option<OwnedPlace>,
    /// The status decision on it: `Deliver`, or a refusal that could not be replayed.
    pub last: Decision,
}

impl Delivery {
    /// Whether the response is the one the decision chose to deliver (not a refusal left without its replay).
    pub fn decided(&self) -> bool {
        self.last == Decision::Deliver
    }
}

/// Phases 2 to 5 for a routed request: prepare it, attach the credential, hold a place among the upstream's
/// requests in flight, send it and decide on the answer, and send it again once if the decision asks. `retried`
/// notes what was sent again, even when a later send fails; `target` receives where the request goes and where its
/// tokens come from (left in the caller's hands rather than moved back with the answer).
///
/// A traced request's work runs with its trace and span ids, which its JSON log lines carry ([`crate::logging`]);
/// the boxed future is made for traced requests only.
pub(crate) fn forward<'a, T: Transport>(
    route: &'a Route,
    parts: &'a mut Parts,
    target: &'a mut Option<Target>,
    connection: &'a Connection,
    deadline: Instant,
    retried: &'a mut Retried,
    transport: &'a mut T,
) -> impl std::future::Future<Output = Result<Delivery, T::Failure>> + 'a {
    use futures_util::future::Either;
    let ids = retried.trace.as_deref().and_then(RequestTrace::log_ids);
    let work = phases(route, parts, target, connection, deadline, retried, transport);
    match ids {
        Some(ids) => Either::Left(Box::pin(crate::logging::with_trace_ids(ids, work))),
        None => Either::Right(work),
    }
}

/// [`forward`]'s phases.
async fn phases<T: Transport>(
    route: &Route,
    parts: &mut Parts,
    target: &mut Option<Target>,
    connection: &Connection,
    deadline: Instant,
    retried: &mut Retried,
    transport: &mut T,
) -> Result<Delivery, T::Failure> {
    let target = Proxy::prepare(route, parts, connection, target)?;
    if let (Some(audit), Some(tokens)) = (&mut retried.audit, &target.caller_tokens) {
        audit.subject = tokens.subject_fingerprint();
    }
    let mut token = match (target.tokens(route), target.attach) {
        // The current token at once (no future is made for it), else a wait for one.
        (Some(tokens), true) => Some(match tokens.current() {
            Some(token) => token,
            None => Proxy::credential(tokens.as_ref(), retried.trace.as_deref()).await?,
        }),
        _ => None,
    };
    let place = match T::BOUNDED {
        // A free place at once (no future is made for it), else a wait for one.
        true => Some(match route.upstream_slots.try_owned() {
            Some(place) => place,
            None => wait_for_place(route, deadline).await?,
        }),
        false => None,
    };
    loop {
        let span = retried
            .trace
            .as_deref()
            .map(|trace| trace.attempt(route.upstream_authority(), &parts.method, retried.sends));
        let attempt = Attempt { route, target, token: token.as_deref(), span: span.as_ref() };
        if let Err(failure) = transport.send(parts, &attempt).await {
            retried.sent(token.as_ref(), transport.resent());
            if let Some(span) = span {
                span.end(Some("upstream"));
            }
            return Err(failure);
        }
        retried.sent(token.as_ref(), transport.resent());
        let answer = transport.answer();
        if let Some(span) = span {
            span.answered(answer.status);
        }
        let last = Proxy::decide(route, &answer, token.as_deref(), target, retried);
        // Most answers go to the caller as they are: no future is made for them.
        if last == Decision::Deliver {
            return Ok(Delivery { token, place, last });
        }
        if !transport.can_resend().await {
            if !retried.any() {
                route.metrics.replays(ReplayOutcome::NotReplayable).inc();
            }
            return Ok(Delivery { token, place, last });
        }
        // No newer token to be had (or the 401 budget refuses one): the upstream's own answer is the honest one.
        let Some(next) = Proxy::next_token(route, target, last, token.as_ref(), deadline, retried).await else {
            return Ok(Delivery { token, place, last });
        };
        transport.discard();
        token = Some(next);
    }
}

/// A request's place among the requests in flight to its upstream (`max_upstream_connections`) when none was free:
/// when one ends before the request's deadline; else 503 `upstream_busy`.
async fn wait_for_place(route: &Route, deadline: Instant) -> Result<OwnedPlace, ProxyError> {
    tokio::time::timeout_at(deadline, route.upstream_slots.owned())
        .await
        .map_err(|_| ProxyError::UpstreamBusy(route.upstream_slots.limit()))
}

#[cfg(test)]
mod tests {
    /// The status decision and the choice of the next token are called from this module only: a transport that
    /// calls them has grown a second copy of the loop.
    #[test]
    fn the_loop_has_one_home() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut offenders = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).expect("src is readable") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let relative = path.strip_prefix(&root).expect("under src").to_string_lossy().replace('\\', "/");
                if path.extension().is_none_or(|e| e != "rs") || relative == "proxy/lifecycle.rs" {
                    continue;
                }
                let text = std::fs::read_to_string(&path).expect("readable");
                for call in ["Proxy::decide(", "Proxy::next_token(", "Proxy::replacement(", "Proxy::credential("] {
                    if text.contains(call) {
                        offenders.push(format!("{relative} calls {call}"));
                    }
                }
            }
        }
        assert!(offenders.is_empty(), "the lifecycle's loop is written again: {offenders:?}");
    }
}
