//! The proxy's own errors, and the one place where they become HTTP responses (RFC 9457 problem details).
//!
//! Every such response has `content-type: application/problem+json` and `x-tokenproxy-error: CODE`, so a caller can
//! tell them from an upstream's answers. Nothing here ever holds a token or a secret.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};

use super::hyper::grpc::{self, ResponseBody};

/// The body of every proxied response: the upstream's, streamed, or one of ours.
pub type ProxyBody = Either<ResponseBody, Full<Bytes>>;

/// The header that marks the proxy's own error responses.
pub static X_TOKENPROXY_ERROR: HeaderName = HeaderName::from_static("x-tokenproxy-error");

/// An error the proxy answers itself.
#[derive(Debug)]
pub enum ProxyError {
    /// No valid token could be had for the route's provider.
    TokenUnavailable {
        /// Why, safe to show.
        detail: String,
        /// When to try again.
        retry_after: Option<Duration>,
    },
    /// The caller's own token (the subject of a token exchange) got no token: missing, refused by the IdP.
    Subject {
        /// Why.
        refusal: crate::token::SubjectRefusal,
        /// Safe to show (never the token).
        detail: String,
    },
    /// The provider's `max_token_calls` is spent, and no usable token is in hand.
    TokenBudgetExhausted {
        /// Why, safe to show.
        detail: String,
        /// When the window ends.
        retry_after: Option<Duration>,
    },
    /// Connect or TLS to the upstream failed.
    UpstreamUnreachable(String),
    /// `max_upstream_connections` requests were in flight to the upstream for the whole `request_timeout`.
    UpstreamBusy(usize),
    /// `request_timeout` passed while the upstream had the whole request.
    UpstreamTimeout(Duration),
    /// `request_timeout` passed while the caller had not sent all of its request body.
    RequestTimeout(Duration),
    /// No route matches.
    NoRoute,
    /// Absolute-form, CONNECT, or a Host no route names.
    HostNotAllowed(String),
    /// A `Host` that names neither this loopback listener nor a route nor an allowed name (DNS rebinding).
    Misdirected(String),
    /// A request a route or the path policy refuses.
    BadRequest(String),
    /// A request HTTP/1.1 forbids (two `Host` headers, a framing another hop could read differently, a body that
    /// is not valid chunked coding): 400 too, and the connection ends, since where the next request starts is not
    /// known.
    Malformed(String),
    /// A method that is never forwarded (TRACE, TRACK: they would echo the token back).
    MethodNotAllowed(String),
}

impl From<super::upstream::UpstreamError> for ProxyError {
    /// The one mapping of an upstream round trip's failure to the caller's answer (for a transport that sends no more):
    /// the caller's own body failing is the caller's fault (400, and the connection ends); anything else is 502.
    fn from(error: super::upstream::UpstreamError) -> ProxyError {
        use super::upstream::UpstreamError;
        match error {
            UpstreamError::CallerBody(detail) => ProxyError::Malformed(detail),
            UpstreamError::Failed(detail)
            | UpstreamError::Unprocessed(detail)
            | UpstreamError::Unanswered { detail, .. } => ProxyError::UpstreamUnreachable(detail),
        }
    }
}

/// Where an error happened, for the problem body.
#[derive(Debug, Default, Clone)]
pub struct ErrorContext {
    /// The route's name.
    pub route: Option<Arc<str>>,
    /// The provider's name.
    pub provider: Option<Arc<str>>,
    /// The caller speaks gRPC: the error goes as a gRPC status (trailers-only), not as problem+json.
    pub grpc: bool,
}

impl ProxyError {
    /// The gRPC status a gRPC caller gets for this error (its trailers-only answer).
    pub fn grpc_code(&self) -> grpc::Code {
        use grpc::Code;
        match self {
            ProxyError::TokenUnavailable { .. }
            | ProxyError::TokenBudgetExhausted { .. }
            | ProxyError::UpstreamUnreachable(_)
            | ProxyError::UpstreamBusy(_) => Code::Unavailable,
            ProxyError::UpstreamTimeout(_) | ProxyError::RequestTimeout(_) => Code::DeadlineExceeded,
            ProxyError::HostNotAllowed(_) | ProxyError::Misdirected(_) => Code::PermissionDenied,
            ProxyError::Subject { refusal: crate::token::SubjectRefusal::Refused, .. } => Code::PermissionDenied,
            ProxyError::Subject { refusal: crate::token::SubjectRefusal::Throttled, .. } => Code::Unavailable,
            ProxyError::Subject { .. } => Code::Unauthenticated,
            ProxyError::NoRoute | ProxyError::MethodNotAllowed(_) => Code::Unimplemented,
            ProxyError::BadRequest(_) | ProxyError::Malformed(_) => Code::InvalidArgument,
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::TokenUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Subject { refusal: crate::token::SubjectRefusal::Refused, .. } => StatusCode::FORBIDDEN,
            ProxyError::Subject { refusal: crate::token::SubjectRefusal::Throttled, .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ProxyError::Subject { .. } => StatusCode::UNAUTHORIZED,
            ProxyError::UpstreamUnreachable(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamBusy(_) | ProxyError::TokenBudgetExhausted { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::HostNotAllowed(_) => StatusCode::FORBIDDEN,
            ProxyError::Misdirected(_) => StatusCode::MISDIRECTED_REQUEST,
            ProxyError::BadRequest(_) | ProxyError::Malformed(_) => StatusCode::BAD_REQUEST,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// Whether an HTTP/1.x connection ends after this error is answered: a malformed request leaves unknown where the
    /// next one starts.
    pub fn ends_connection(&self) -> bool {
        matches!(self, ProxyError::Malformed(_))
    }

    /// The stable error code (docs/troubleshooting.md, "Errors the proxy returns").
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::TokenUnavailable { .. } => "token_unavailable",
            ProxyError::Subject { refusal, .. } => match refusal {
                crate::token::SubjectRefusal::Missing => "subject_token_missing",
                crate::token::SubjectRefusal::Invalid => "subject_token_invalid",
                crate::token::SubjectRefusal::Refused => "exchange_refused",
                crate::token::SubjectRefusal::Throttled => "exchange_throttled",
            },
            ProxyError::UpstreamUnreachable(_) => "upstream_unreachable",
            ProxyError::UpstreamBusy(_) => "upstream_busy",
            ProxyError::TokenBudgetExhausted { .. } => "token_budget_exhausted",
            ProxyError::UpstreamTimeout(_) => "upstream_timeout",
            ProxyError::RequestTimeout(_) => "request_timeout",
            ProxyError::NoRoute => "no_route",
            ProxyError::HostNotAllowed(_) => "host_not_allowed",
            ProxyError::Misdirected(_) => "misdirected_request",
            ProxyError::BadRequest(_) | ProxyError::Malformed(_) => "bad_request",
            ProxyError::MethodNotAllowed(_) => "method_not_allowed",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            ProxyError::TokenUnavailable { .. } => "No valid access token is available for this route",
            ProxyError::Subject { .. } => "The caller's token cannot be exchanged for this route",
            ProxyError::UpstreamUnreachable(_) => "The upstream could not be reached",
            ProxyError::UpstreamBusy(_) => "Too many requests are in flight to the upstream",
            ProxyError::TokenBudgetExhausted { .. } => "The provider's budget of token calls is spent",
            ProxyError::UpstreamTimeout(_) => "The upstream did not answer in time",
            ProxyError::RequestTimeout(_) => "The request body did not arrive in time",
            ProxyError::NoRoute => "No route matches this request",
            ProxyError::HostNotAllowed(_) => "This host is not served by tokenproxy",
            ProxyError::Misdirected(_) => "This listener does not answer for this host",
            ProxyError::BadRequest(_) => "Bad request",
            ProxyError::Malformed(_) => "Malformed request",
            ProxyError::MethodNotAllowed(_) => "This method is not forwarded",
        }
    }

    fn detail(&self) -> String {
        match self {
            ProxyError::TokenUnavailable { detail, .. }
            | ProxyError::TokenBudgetExhausted { detail, .. }
            | ProxyError::Subject { detail, .. } => detail.clone(),
            ProxyError::UpstreamUnreachable(detail) => detail.clone(),
            ProxyError::UpstreamBusy(limit) => format!(
                "{limit} requests were in flight to this upstream (max_upstream_connections) for the whole \
                 request_timeout"
            ),
            ProxyError::UpstreamTimeout(after) => format!("no response within request_timeout ({after:?})"),
            ProxyError::RequestTimeout(after) => {
                format!("the request body was not complete within request_timeout ({after:?})")
            }
            ProxyError::NoRoute => "no configured route matches this host and path".to_owned(),
            ProxyError::HostNotAllowed(detail) | ProxyError::Misdirected(detail) => detail.clone(),
            ProxyError::BadRequest(detail) | ProxyError::Malformed(detail) => detail.clone(),
            ProxyError::MethodNotAllowed(method) => {
                format!("{method} is never forwarded: an upstream would echo the request, token included")
            }
        }
    }

    /// The problem+json response for this error.
    pub fn into_response(self, context: &ErrorContext) -> Response<ProxyBody> {
        let (parts, body) = self.into_parts(context);
        Response::from_parts(parts, Either::Right(Full::new(body)))
    }

    /// The problem+json response for this error, as its head and its body.
    pub fn into_parts(self, context: &ErrorContext) -> (http::response::Parts, Bytes) {
        let status = self.status();
        let code = self.code();
        let mut body = serde_json::json!({
            "type": format!("urn:tokenproxy:error:{code}"),
            "title": self.title(),
            "status": status.as_u16(),
            "detail": self.detail(),
            "code": code,
        });
        if let Some(route) = &context.route {
            body["route"] = serde_json::Value::from(route.as_ref());
        }
        if let Some(provider) = &context.provider {
            body["provider"] = serde_json::Value::from(provider.as_ref());
        }
        let (mut parts, ()) = Response::new(()).into_parts();
        parts.status = status;
        let headers = &mut parts.headers;
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        headers.insert(X_TOKENPROXY_ERROR.clone(), HeaderValue::from_static(code));
        match &self {
            ProxyError::TokenUnavailable { retry_after, .. } | ProxyError::TokenBudgetExhausted { retry_after, .. } => {
                let seconds = retry_after.map_or(1, |d| d.as_secs_f64().ceil().max(1.0) as u64);
                headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
            }
            ProxyError::UpstreamBusy(_)
            | ProxyError::Subject { refusal: crate::token::SubjectRefusal::Throttled, .. } => {
                headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        if context.grpc {
            let message = format!("{}: {}", self.title(), self.detail());
            grpc::trailers_only(&mut parts, self.grpc_code(), &message);
            return (parts, Bytes::new());
        }
        // A final newline: the body reads well in a terminal (`curl`), and a response never runs into the next.
        (parts, Bytes::from(format!("{body}\n")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::hyper::grpc::Code;

    #[test]
    fn every_proxy_error_has_the_grpc_status_a_grpc_client_acts_on() {
        let unavailable = ProxyError::TokenUnavailable { detail: String::new(), retry_after: None };
        assert_eq!(unavailable.grpc_code(), Code::Unavailable);
        assert_eq!(ProxyError::UpstreamUnreachable(String::new()).grpc_code(), Code::Unavailable);
        let after = std::time::Duration::from_secs(1);
        assert_eq!(ProxyError::UpstreamTimeout(after).grpc_code(), Code::DeadlineExceeded);
        assert_eq!(ProxyError::RequestTimeout(after).grpc_code(), Code::DeadlineExceeded);
        assert_eq!(ProxyError::HostNotAllowed(String::new()).grpc_code(), Code::PermissionDenied);
        assert_eq!(ProxyError::NoRoute.grpc_code(), Code::Unimplemented);
        assert_eq!(ProxyError::BadRequest(String::new()).grpc_code(), Code::InvalidArgument);
        assert_eq!(Code::ResourceExhausted as u8, 8);
    }
}
