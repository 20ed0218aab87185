//! gRPC callers (docs/configuration.md, "gRPC"): the proxy's own errors as a gRPC status in a trailers-only
//! response (as linkerd2-proxy answers them), and an `UNAUTHENTICATED` status from the upstream seen where it comes,
//! in the trailers, so that it can retire the token (`grpc_unauthenticated_refresh`).
//!
//! A gRPC status cannot be replayed like a 401: it usually arrives after the response body, when the caller has
//! already read the answer. It only makes the next calls use a new token.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};

use crate::token::TokenSource;

/// `grpc-status`.
pub static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// `grpc-message`.
pub static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// The gRPC status codes the proxy answers with (grpc/doc/statuscodes.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    /// The call reached nothing that could act on it in time.
    DeadlineExceeded = 4,
    /// The request was not acceptable.
    InvalidArgument = 3,
    /// The host is not served.
    PermissionDenied = 7,
    /// A limit was hit.
    ResourceExhausted = 8,
    /// No route (or a method the proxy never forwards).
    Unimplemented = 12,
    /// A token, or the upstream, could not be had: the caller may retry.
    Unavailable = 14,
    /// The upstream refused the credentials.
    Unauthenticated = 16,
}

/// Whether a request is a gRPC call: `content-type: application/grpc` or `application/grpc+…` (`;` parameters
/// allowed); not gRPC-Web, whose callers read HTTP statuses.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(CONTENT_TYPE) else { return false };
    let value = value.as_bytes();
    const GRPC: &[u8] = b"application/grpc";
    value.len() >= GRPC.len()
        && value[..GRPC.len()].eq_ignore_ascii_case(GRPC)
        && matches!(value.get(GRPC.len()), None | Some(b'+' | b';'))
}

/// What `grpc-message` percent-encodes: controls, non-ASCII and `%` itself (the gRPC HTTP/2 protocol spec).
const MESSAGE: &AsciiSet = &CONTROLS.add(b'%');

/// Turns a problem response head into the trailers-only gRPC answer: HTTP 200 with `grpc-status` and
/// `grpc-message` in the headers and no body. `x-tokenproxy-error` and `retry-after` stay.
pub fn trailers_only(head: &mut http::response::Parts, code: Code, message: &str) {
    head.status = http::StatusCode::OK;
    head.headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    head.headers.insert(GRPC_STATUS.clone(), HeaderValue::from(u16::from(code as u8)));
    let encoded = utf8_percent_encode(message, MESSAGE).to_string();
    if let Ok(value) = HeaderValue::from_str(&encoded) {
        head.headers.insert(GRPC_MESSAGE.clone(), value);
    }
}

/// Retires a token generation when the upstream answers a call made with it `UNAUTHENTICATED`.
pub struct UnauthenticatedWatch {
    /// The route's tokens.
    pub tokens: Arc<dyn TokenSource>,
    /// The generation the call carried.
    pub generation: u64,
    /// `tokenproxy_upstream_unauthorized_total` of the route.
    pub unauthorized: prometheus::IntCounter,
}

impl UnauthenticatedWatch {
    /// Looks at a trailers-only head or at trailers: `grpc-status: 16` retires the generation (a new token is
    /// fetched in the background, within the provider's 401 budget), once.
    pub fn check(&mut self, headers: &HeaderMap) -> bool {
        if headers.get(&GRPC_STATUS).map(HeaderValue::as_bytes) != Some(b"16") {
            return false;
        }
        self.unauthorized.inc();
        let (tokens, generation) = (Arc::clone(&self.tokens), self.generation);
        // The budget, the single flight and the backoff are the token source's: the same as a 401's.
        tokio::spawn(async move {
            let _ = tokens.obtain(Some(generation)).await;
        });
        true
    }
}

pin_project_lite::pin_project! {
    /// An upstream's response body as the caller gets it, its trailers looked at when the route asks.
    pub struct ResponseBody {
        #[pin]
        body: Incoming,
        watch: Option<Box<UnauthenticatedWatch>>,
        // The request's place among the upstream's requests in flight (`max_upstream_connections`), until the body
        // is sent.
        place: Option<crate::proxy::upstream::slots::OwnedPlace>,
    }
}

impl ResponseBody {
    /// The body, with `watch` looking at its trailers, holding `place` until it is sent.
    pub fn new(
        body: Incoming,
        watch: Option<Box<UnauthenticatedWatch>>,
        place: Option<crate::proxy::upstream::slots::OwnedPlace>,
    ) -> ResponseBody {
        ResponseBody { body, watch, place }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    #[inline]
    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.project();
        let frame = ready!(this.body.poll_frame(cx));
        if let (Some(Ok(frame)), Some(watch)) = (&frame, this.watch.as_mut()) {
            if let Some(trailers) = frame.trailers_ref() {
                watch.check(trailers);
                *this.watch = None;
            }
        }
        Poll::Ready(frame)
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_content_types_are_told_from_grpc_web_and_others() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_TYPE, HeaderValue::from_str(value).unwrap());
            is_grpc(&headers)
        };
        for yes in ["application/grpc", "application/grpc+proto", "Application/GRPC+json", "application/grpc;charset=x"]
        {
            assert!(with(yes), "{yes}");
        }
        for no in ["application/grpc-web", "application/grpc-web+proto", "application/json", "application/grp", ""] {
            assert!(!with(no), "{no}");
        }
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn the_trailers_only_answer_carries_an_encoded_message_and_no_problem_body_type() {
        let (mut head, ()) = http::Response::new(()).into_parts();
        head.status = http::StatusCode::SERVICE_UNAVAILABLE;
        trailers_only(&mut head, Code::Unavailable, "token: 100% gone\nété");
        assert_eq!(head.status, 200);
        assert_eq!(head.headers[CONTENT_TYPE], "application/grpc");
        assert_eq!(head.headers[&GRPC_STATUS], "14");
        assert_eq!(head.headers[&GRPC_MESSAGE], "token: 100%25 gone%0A%C3%A9t%C3%A9");
    }
}
