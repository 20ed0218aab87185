//! The direct HTTP/1.1 path: plain HTTP/1.1 requests to plain-HTTP upstreams, served without hyper.
//!
//! A sidecar's requests are nearly all of one shape: an HTTP/1.1 request with no body or a small one, to an
//! HTTP/1.1 upstream. For those, one task per downstream connection reads the request head (parsed by `httparse`),
//! runs the same phases as the hyper path (routing, [`Proxy::prepare`], the token, the 401 replay, the error
//! responses, metrics and the access log), writes the upstream request on the connection's own upstream connection
//! and forwards the response head and body as they come: a `Content-Length` body is copied, a chunked body is passed
//! through undecoded ([`ChunkedScanner`] finds its end), a body delimited by the upstream closing is copied until then.
//! No channel, no second task, no per-message buffers: that is what lets a proxy on a small machine keep up with
//! nginx.
//!
//! Anything else is handed to hyper with the bytes already read, for the rest of the connection: HTTP/1.0, request
//! bodies that are chunked, larger than the replay buffer or announced with `Expect`, `Upgrade`, absolute-form and
//! CONNECT requests, heads that do not parse or are very large, h2c (the connection preface does not parse as
//! HTTP/1.1), and routes to TLS upstreams. Hyper then answers exactly as it would have from the first byte.

use std::io;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::request::Parts;
use http::uri::Authority;
use http::{HeaderName, HeaderValue, Method, StatusCode, Uri, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use super::chunked::{ChunkedScanner, Scan};
use super::h1::framing::{FramingError, FramingFields};
use super::headers::{connection_lists, is_hop_by_hop};
use super::upstream::connect_tcp;
use super::{
    token_header, token_query, upstream_uri, Connection, ErrorContext, Proxy, ProxyError, Route, X_REQUEST_ID,
};
use crate::token::Token;

/// A request head larger than this goes to hyper (which refuses heads beyond its own, larger, limit).
const MAX_HEAD: usize = 64 * 1024;
/// Request bodies up to this size (and up to `replay_buffer`) are read whole before the request goes upstream.
const MAX_BODY: usize = 64 * 1024;
/// An upstream response head larger than this is refused.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Headers per message, as hyper allows.
const MAX_HEADERS: usize = 100;
/// The size of the upstream read buffer, and of each read from the upstream.
const READ_SIZE: usize = 8 * 1024;
/// The room made for each read from the caller: a request head and a small body (8 KiB with its head) come in one
/// read. Only what arrives is touched, so the memory of an idle connection stays small.
const CALLER_READ_SIZE: usize = 16 * 1024;

/// How a connection served by the direct path ended.
pub enum Ended<I> {
    /// The connection is over (closed by either side, timed out, or shut down).
    Closed,
    /// The rest of the connection is hyper's: `buffered` holds the bytes already read from it.
    Handoff {
        /// The connection.
        io: I,
        /// What was read and not served, to be read again first.
        buffered: Bytes,
    },
}

/// A request head parsed from the downstream buffer, as far as the direct path needs it besides its `Parts`.
struct Parsed {
    /// The head's bytes (split off the buffer): the URI and the header values are slices of it.
    head: Bytes,
    body_len: usize,
    /// The caller sent a `Content-Length` (then the upstream gets one too, even for an empty body).
    has_length: bool,
    /// The caller asked to close the connection after this request.
    close: bool,
}

enum Parse {
    Complete(Parsed),
    Partial,
    /// Not for the direct path: hyper takes the connection from here, reading these bytes (if any were split off
    /// the buffer) first.
    Handoff(Bytes),
    /// A request HTTP/1.1 forbids (a framing that another hop could read differently, two `Host` headers): 400,
    /// and the connection closes, since where the next request would start is not known.
    Refuse(String),
}

/// Where a header's name and value are in the head.
type Span = (std::ops::Range<usize>, std::ops::Range<usize>);

/// Parses one request head at the start of `input` into `parts`, if it is complete and of the shape the direct path
/// serves. On `Complete` the head is split off `input`. `parts` keeps its header map's memory from request to
/// request, and `spans` is scratch space: a request then costs no allocation here (bar header names outside the
/// standard ones, which `http` allocates).
fn parse_request(input: &mut BytesMut, parts: &mut Parts, spans: &mut Vec<Span>) -> Parse {
    let (head_len, method, path, body_len, close) = {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        let head_len = match request.parse(input) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if input.len() < MAX_HEAD => return Parse::Partial,
            _ => return Parse::Handoff(Bytes::new()),
        };
        let (Some(method), Some(path), Some(1)) = (request.method, request.path, request.version) else {
            return Parse::Handoff(Bytes::new());
        };
        if !path.starts_with('/') || method == "CONNECT" {
            return Parse::Handoff(Bytes::new());
        }
        let Ok(method) = Method::from_bytes(method.as_bytes()) else { return Parse::Handoff(Bytes::new()) };
        let base = input.as_ptr() as usize;
        let span = |part: &[u8]| {
            let start = (part.as_ptr() as usize).wrapping_sub(base).min(head_len);
            start..(start + part.len()).min(head_len)
        };
        let mut framing = FramingFields::default();
        let mut hosts = 0;
        let mut close = false;
        let mut other_shape = false;
        spans.clear();
        for header in request.headers.iter() {
            let name = header.name.as_bytes();
            if let Err(error) = framing.add(name, header.value) {
                return Parse::Refuse(error.to_string());
            }
            if name.eq_ignore_ascii_case(b"host") {
                hosts += 1;
            }
            other_shape |= name.eq_ignore_ascii_case(b"expect") || name.eq_ignore_ascii_case(b"upgrade");
            if name.eq_ignore_ascii_case(b"connection") {
                other_shape |= connection_lists(std::iter::once(header.value), b"upgrade");
                close |= connection_lists(std::iter::once(header.value), b"close");
            }
            spans.push((span(name), span(header.value)));
        }
        if hosts > 1 {
            return Parse::Refuse("more than one Host header".into());
        }
        if framing.has_transfer_encoding() {
            if framing.length.is_some() {
                return Parse::Refuse(FramingError::LengthWithTransferEncoding.to_string());
            }
            if !framing.chunked {
                return Parse::Refuse(FramingError::NotChunked.to_string());
            }
            // A chunked body: hyper decodes it and frames it again for the upstream.
            return Parse::Handoff(Bytes::new());
        }
        let body_len = match framing.length.map(usize::try_from) {
            None => None,
            Some(Ok(n)) if n <= MAX_BODY && !other_shape => Some(n),
            // Too large for the direct path, or announced with `Expect` / an upgrade: hyper's.
            Some(_) => return Parse::Handoff(Bytes::new()),
        };
        if other_shape {
            return Parse::Handoff(Bytes::new());
        }
        (head_len, method, span(path.as_bytes()), body_len, close)
    };
    let head = input.split_to(head_len).freeze();
    let Ok(uri) = Uri::from_maybe_shared(head.slice(path)) else { return Parse::Handoff(head) };
    parts.headers.clear();
    for (name, value) in spans.iter() {
        let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(&head[name.clone()]), HeaderValue::from_maybe_shared(head.slice(value.clone())))
        else {
            return Parse::Handoff(head);
        };
        parts.headers.append(name, value);
    }
    parts.method = method;
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    Parse::Complete(Parsed { head, body_len: body_len.unwrap_or(0), has_length: body_len.is_some(), close })
}

/// One timer per connection for all its deadlines (the request head's, the request's). A tokio timer armed per wait
/// costs a wheel insertion and removal under the driver's lock, and may wake the driver; this one is set once and
/// moved only when it fires before the deadline of the wait in progress, at most once per `period`. It is polled
/// once after each move: the waker it keeps is the connection task's, the same for every wait.
struct Timer {
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// The shortest timeout a wait has: the timer then never fires after a wait's deadline.
    period: Duration,
    /// The timer holds the connection task's waker since it was last moved.
    armed: bool,
}

impl Timer {
    fn new(period: Duration) -> Timer {
        Timer { sleep: Box::pin(tokio::time::sleep(period)), period, armed: false }
    }

    /// Follows a change of the timeouts (a reload): a shorter period moves the timer closer at once.
    fn set_period(&mut self, period: Duration) {
        if period < self.period {
            self.sleep.as_mut().reset(Instant::now() + period);
            self.armed = false;
        }
        self.period = period;
    }

    /// `future`'s output, or `None` if `deadline` passes first. Only for futures of the connection's own task.
    async fn within<F: std::future::Future>(&mut self, deadline: Instant, future: F) -> Option<F::Output> {
        use std::future::Future;
        use std::task::Poll;
        let mut future = std::pin::pin!(future);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(output) = future.as_mut().poll(cx) {
                return Poll::Ready(Some(output));
            }
            loop {
                if !self.armed {
                    if self.sleep.as_mut().poll(cx).is_pending() {
                        self.armed = true;
                        return Poll::Pending;
                    }
                } else if !self.sleep.is_elapsed() {
                    return Poll::Pending;
                }
                let now = Instant::now();
                if now >= deadline {
                    return Poll::Ready(None);
                }
                self.sleep.as_mut().reset(deadline.min(now + self.period));
                self.armed = false;
            }
        })
        .await
    }
}

/// The rest of the connection for hyper: what was split off, then what is still buffered.
fn handoff<I>(io: I, head: Bytes, input: BytesMut) -> Ended<I> {
    let buffered = if head.is_empty() { input.freeze() } else { [&head[..], &input[..]].concat().into() };
    Ended::Handoff { io, buffered }
}

/// Serves `io` with the direct path for as long as its requests are of the direct path's shape.
pub async fn serve<I>(
    proxies: &arc_swap::ArcSwap<Proxy>,
    connection: &Connection,
    mut io: I,
    mut shutdown: watch::Receiver<bool>,
    header_read_timeout: Duration,
) -> Ended<I>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let mut input = BytesMut::new();
    let (mut parts, ()) = http::Request::new(()).into_parts();
    let mut spans = Vec::new();
    let mut state = DirectState { upstream: None, request: Vec::new(), response: Vec::new() };
    let mut timer = Timer::new(header_read_timeout.min(proxies.load().request_timeout));
    loop {
        if *shutdown.borrow() {
            return Ended::Closed;
        }
        // Slowloris guard, as hyper's `header_read_timeout`: the whole head (and an idle wait) within the limit.
        let head_deadline = Instant::now() + header_read_timeout;
        let parsed = loop {
            match parse_request(&mut input, &mut parts, &mut spans) {
                Parse::Complete(parsed) => break parsed,
                Parse::Handoff(head) => return handoff(io, head, input),
                Parse::Refuse(reason) => {
                    refuse(&mut io, &proxies.load(), &mut state.response, reason).await;
                    return Ended::Closed;
                }
                Parse::Partial => {}
            }
            let idle = input.is_empty();
            input.reserve(CALLER_READ_SIZE);
            let read = tokio::select! {
                biased;
                read = timer.within(head_deadline, io.read_buf(&mut input)) => read,
                _ = shutdown.changed(), if idle => return Ended::Closed,
            };
            match read {
                Some(Ok(n)) if n > 0 => {}
                _ => return Ended::Closed,
            }
        };
        let proxy = proxies.load_full();
        timer.set_period(header_read_timeout.min(proxy.request_timeout));
        let route = proxy.admit(&mut parts);
        let handoff_now = match &route {
            Ok(route) => route.plain_http_upstream().is_none() || parsed.body_len > proxy.replay_buffer,
            Err(_) => false,
        };
        if handoff_now {
            return handoff(io, parsed.head, input);
        }
        let exchange = proxy.begin(&mut parts);
        // The body, read whole: it is small, and kept for a replay.
        let body_deadline = exchange.started + proxy.request_timeout;
        while input.len() < parsed.body_len {
            input.reserve(parsed.body_len - input.len());
            match timer.within(body_deadline, io.read_buf(&mut input)).await {
                Some(Ok(n)) if n > 0 => {}
                _ => return Ended::Closed,
            }
        }
        let body = &input[..parsed.body_len];
        let close = parsed.close || *shutdown.borrow();
        let reply = Reply {
            request_id: &exchange.request_id,
            close,
            head_request: parts.method == Method::HEAD,
            deadline: body_deadline,
        };
        let (route, outcome) = match route {
            Ok(route) => {
                route.metrics.inflight.inc();
                let request = Direct { route, body, has_length: parsed.has_length, connection, reply: &reply };
                let outcome = proxy.serve_direct(&request, &mut parts, &mut state, &mut timer, &mut io).await;
                (Some(route), outcome)
            }
            Err(error) => (None, Outcome::Error(error)),
        };
        let (status, replayed, done) = match outcome {
            Outcome::Answered { status, replayed, open } => (status, replayed, !open),
            Outcome::Error(error) => {
                let context = Proxy::error_context(route, &error);
                let status = error.status();
                let written = write_error(&mut io, &mut state.response, error, &context, &reply).await;
                (status, false, written.is_err() || close)
            }
            Outcome::Broken { status } => (status, false, true),
        };
        proxy.end(exchange, route, status, replayed);
        input.advance(parsed.body_len);
        // Nothing refers to the head any more: the buffer's memory can be reused for the next request.
        parts.headers.clear();
        parts.uri = Uri::default();
        drop(parsed);
        if input.is_empty() && input.capacity() > 2 * CALLER_READ_SIZE {
            // A large message made it grow: an idle connection goes back to the usual size.
            input = BytesMut::new();
        }
        if done {
            let _ = io.shutdown().await;
            return Ended::Closed;
        }
    }
}

/// Answers a request HTTP/1.1 forbids with 400 and closes the connection.
async fn refuse<I: AsyncWrite + Unpin>(io: &mut I, proxy: &Proxy, out: &mut Vec<u8>, reason: String) {
    let request_id = super::request_id(&mut http::HeaderMap::new());
    let reply = Reply { request_id: &request_id, close: true, head_request: false, deadline: Instant::now() };
    tracing::debug!("refused a request: {reason}");
    let error = ProxyError::BadRequest(format!("{reason}: refused"));
    let _ = write_error(io, out, error, &ErrorContext::default(), &reply).await;
    proxy.unrouted.count_status(StatusCode::BAD_REQUEST);
    let _ = io.shutdown().await;
}

/// A request on the direct path, for [`Proxy::serve_direct`].
struct Direct<'a> {
    route: &'a Route,
    body: &'a [u8],
    /// The caller framed the body with `Content-Length`.
    has_length: bool,
    connection: &'a Connection,
    reply: &'a Reply<'a>,
}

/// What a connection keeps between requests.
struct DirectState {
    /// The connection's own upstream connection, idle between requests.
    upstream: Option<Upstream>,
    /// The upstream request being sent.
    request: Vec<u8>,
    /// The response head being written.
    response: Vec<u8>,
}

/// What the response to a request depends on.
struct Reply<'a> {
    request_id: &'a HeaderValue,
    /// Close the downstream connection after this response.
    close: bool,
    /// A HEAD request: no body in the response, whatever its headers say.
    head_request: bool,
    /// The request's deadline (`request_timeout` after its arrival) for the response head.
    deadline: Instant,
}

/// How serving a request on the direct path ended.
enum Outcome {
    /// A response was written (`open`: the connection can take the next request).
    Answered { status: StatusCode, replayed: bool, open: bool },
    /// Nothing was written yet: the error is the answer.
    Error(ProxyError),
    /// The response could not be completed (a side went away mid-body): the connection ends.
    Broken { status: StatusCode },
}

impl Proxy {
    /// The phases of [`Proxy::handle`] for a direct-path request; the response is written to `io`.
    async fn serve_direct<I: AsyncWrite + Unpin>(
        &self,
        request: &Direct<'_>,
        parts: &mut Parts,
        state: &mut DirectState,
        timer: &mut Timer,
        io: &mut I,
    ) -> Outcome {
        let Direct { route, body, has_length, connection, reply } = *request;
        let Some(authority) = route.plain_http_upstream() else {
            return Outcome::Error(ProxyError::UpstreamUnreachable("not a plain-HTTP upstream".into()));
        };
        // An idempotent request may go again on a new connection when a kept one turns out closed (RFC 9110 §9.2.2).
        let retryable = parts.method.is_idempotent();
        let target = match Self::prepare(route, parts, connection) {
            Ok(target) => target,
            Err(error) => return Outcome::Error(error),
        };
        let mut token = match (&route.tokens, target.attach) {
            (Some(tokens), true) => match Self::credential(tokens.as_ref(), None).await {
                Ok(token) => Some(token),
                Err(error) => return Outcome::Error(error),
            },
            _ => None,
        };
        let mut replayed = false;
        loop {
            let message = Message { parts, body, has_length };
            if let Err(error) = encode_request(&mut state.request, route, &target, &message, token.as_deref()) {
                return Outcome::Error(error);
            }
            let answer =
                round_trip(&mut state.upstream, authority, &state.request, retryable, reply, &mut state.response);
            let head = match timer.within(reply.deadline, answer).await {
                Some(Ok(head)) => head,
                Some(Err(error)) => return Outcome::Error(ProxyError::UpstreamUnreachable(error)),
                None => {
                    state.upstream = None;
                    return Outcome::Error(ProxyError::UpstreamTimeout(self.request_timeout));
                }
            };
            if replayed {
                Self::count_replay(route, head.status);
                return forward_response(io, state, head, replayed).await;
            }
            if head.status != StatusCode::UNAUTHORIZED {
                return forward_response(io, state, head, replayed).await;
            }
            route.metrics.upstream_unauthorized.inc();
            let (Some(tokens), Some(first), true) = (&route.tokens, &token, route.retry_on_401) else {
                return forward_response(io, state, head, replayed).await;
            };
            let replacement = Self::replacement(route, tokens.as_ref(), first.generation, reply.deadline);
            match timer.within(reply.deadline, replacement).await {
                Some(Some(fresh)) => {
                    discard_body(&mut state.upstream, head);
                    token = Some(fresh);
                    replayed = true;
                }
                // No newer token to be had: the upstream's own 401 is the honest answer.
                _ => return forward_response(io, state, head, replayed).await,
            }
        }
    }
}

/// A request to encode: the prepared head and the body read whole.
struct Message<'a> {
    parts: &'a Parts,
    body: &'a [u8],
    /// The caller framed the body with `Content-Length`.
    has_length: bool,
}

/// Writes the upstream request: the request line and the prepared headers, the token, the framing, the body.
///
/// The framing is ours: `Content-Length` is written from the body actually read, and no framing header of the
/// prepared head is copied. A header the caller listed in `Connection` can thus never leave a body unframed, which
/// would let the upstream read it as a second request (request smuggling).
fn encode_request(
    out: &mut Vec<u8>,
    route: &Route,
    target: &super::Target,
    message: &Message<'_>,
    token: Option<&Token>,
) -> Result<(), ProxyError> {
    let Message { parts, body, has_length } = *message;
    let extra_query = token.and_then(|token| token_query(route, token));
    let uri = upstream_uri(route, target, extra_query.as_deref())?;
    let credential = token.map(|token| token_header(route, token)).transpose()?.flatten();
    out.clear();
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        if credential.as_ref().is_some_and(|(credential, _)| *credential == name)
            || name == http::header::CONTENT_LENGTH
            || name == http::header::TRANSFER_ENCODING
        {
            continue;
        }
        put_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if let Some((name, value)) = credential {
        put_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if has_length || !body.is_empty() {
        put_header(out, b"content-length", itoa::Buffer::new().format(body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    Ok(())
}

fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn put_status_line(out: &mut Vec<u8>, status: StatusCode, reason: Option<&str>) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().or(reason).unwrap_or("Unknown").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Ends a response head with our own headers.
fn put_own_headers(out: &mut Vec<u8>, reply: &Reply<'_>, close: bool) {
    put_header(out, X_REQUEST_ID.as_str().as_bytes(), reply.request_id.as_bytes());
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes one of the proxy's own (problem+json) answers.
async fn write_error<I: AsyncWrite + Unpin>(
    io: &mut I,
    out: &mut Vec<u8>,
    error: ProxyError,
    context: &ErrorContext,
    reply: &Reply<'_>,
) -> io::Result<()> {
    let (parts, body) = error.into_parts(context);
    out.clear();
    put_status_line(out, parts.status, None);
    for (name, value) in &parts.headers {
        put_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    put_header(out, b"content-length", itoa::Buffer::new().format(body.len()).as_bytes());
    put_own_headers(out, reply, reply.close);
    if !reply.head_request {
        out.extend_from_slice(&body);
    }
    io.write_all(out).await
}

/// How an upstream response's body ends.
enum Framing {
    /// No body (HEAD, 204, 304, or `Content-Length: 0`).
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// A chunked body, passed through as it is.
    Chunked(ChunkedScanner),
    /// Until the upstream closes the connection.
    UntilClose,
}

/// An upstream response head, already rewritten for the caller into the connection's response buffer.
struct ResponseHead {
    status: StatusCode,
    framing: Framing,
    /// The upstream connection can take another request once the body is read.
    reusable: bool,
    /// The downstream connection ends after this response.
    close: bool,
}

/// The connection's own upstream connection.
struct Upstream {
    authority: Authority,
    stream: TcpStream,
    /// What was read from the upstream and not yet forwarded.
    input: BytesMut,
}

/// Why an exchange failed, and whether the upstream may not have seen the request at all.
struct Failure {
    message: String,
    /// Nothing at all came back: on a kept connection, the upstream may have closed it before reading the request.
    unanswered: bool,
}

impl Upstream {
    /// Whether the kept connection is still open as far as can be told without a system call: the reactor has seen
    /// no readiness on it (an upstream's close would have made it readable).
    fn still_open(&self) -> bool {
        if !self.input.is_empty() {
            return false;
        }
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            std::task::Poll::Pending => true,
            std::task::Poll::Ready(Err(_)) => false,
            // Readable while idle: a close, or bytes nobody asked for. A probe tells (a stale readiness is cleared).
            std::task::Poll::Ready(Ok(())) => {
                matches!(self.stream.try_read(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Reads what the upstream sent next (0 at the end of the stream). The response head's size is bounded by
    /// [`parse_response`], bodies are forwarded a read at a time.
    async fn read_more(&mut self) -> io::Result<usize> {
        self.input.reserve(READ_SIZE);
        self.stream.read_buf(&mut self.input).await
    }

    /// Sends `request` and reads the final response head (1xx heads are skipped), rewriting it into `out`.
    async fn exchange(
        &mut self,
        request: &[u8],
        reply: &Reply<'_>,
        out: &mut Vec<u8>,
    ) -> Result<ResponseHead, Failure> {
        let failed = |message: String, unanswered: bool| Failure { message, unanswered };
        if let Err(error) = self.stream.write_all(request).await {
            return Err(failed(format!("sending the request to {}: {error}", self.authority), true));
        }
        let mut answered = false;
        loop {
            match parse_response(&self.input, reply, out) {
                Ok(None) => {}
                Ok(Some((head_len, None))) => {
                    self.input.advance(head_len);
                    continue;
                }
                Ok(Some((head_len, Some(head)))) => {
                    self.input.advance(head_len);
                    return Ok(head);
                }
                Err(message) => return Err(failed(format!("{message} (upstream {})", self.authority), false)),
            }
            match self.read_more().await {
                Ok(0) => {
                    let message = format!("{} closed the connection before answering", self.authority);
                    return Err(failed(message, !answered));
                }
                Ok(_) => answered = true,
                Err(error) => {
                    let message = format!("reading the response of {}: {error}", self.authority);
                    return Err(failed(message, !answered));
                }
            }
        }
    }
}

/// Sends `request` on the kept upstream connection, or a new one, and reads the response head.
async fn round_trip(
    slot: &mut Option<Upstream>,
    authority: &Authority,
    request: &[u8],
    retryable: bool,
    reply: &Reply<'_>,
    out: &mut Vec<u8>,
) -> Result<ResponseHead, String> {
    let mut retried = false;
    loop {
        let kept = slot.take().filter(|up| up.authority == *authority && up.still_open());
        let reused = kept.is_some();
        let upstream = match kept {
            Some(upstream) => slot.insert(upstream),
            None => {
                let stream = connect_tcp(authority).await.map_err(|e| e.to_string())?;
                slot.insert(Upstream { authority: authority.clone(), stream, input: BytesMut::new() })
            }
        };
        match upstream.exchange(request, reply, out).await {
            Ok(head) => return Ok(head),
            Err(failure) => {
                *slot = None;
                if reused && retryable && failure.unanswered && !retried {
                    retried = true;
                    continue;
                }
                return Err(failure.message);
            }
        }
    }
}

/// Parses an upstream response head: `None` while incomplete; the head's length, with `None` for a 1xx to skip, or
/// the final head (then rewritten for the caller into `out`).
#[allow(clippy::type_complexity)]
fn parse_response(
    input: &[u8],
    reply: &Reply<'_>,
    out: &mut Vec<u8>,
) -> Result<Option<(usize, Option<ResponseHead>)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(input) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if input.len() < MAX_RESPONSE_HEAD => return Ok(None),
        Ok(httparse::Status::Partial) => return Err("the response head is too large".into()),
        Err(error) => return Err(format!("invalid response head: {error}")),
    };
    let code = response.code.unwrap_or_default();
    let status = StatusCode::from_u16(code).map_err(|_| format!("invalid response status {code}"))?;
    if status.is_informational() {
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err("the upstream switched protocols unasked".into());
        }
        return Ok(Some((head_len, None)));
    }
    let headers = &*response.headers;
    let connection = || headers.iter().filter(|h| h.name.eq_ignore_ascii_case("connection")).map(|h| h.value);
    let has_connection = connection().next().is_some();
    let mut fields = FramingFields::default();
    for header in headers {
        fields.add(header.name.as_bytes(), header.value).map_err(|e| format!("{e} in the response"))?;
    }
    let bodiless = reply.head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let framing = if bodiless {
        Framing::Empty
    } else if fields.has_transfer_encoding() {
        // Transfer-Encoding overrides Content-Length (RFC 9112 §6.3), which is then not forwarded.
        if fields.chunked {
            Framing::Chunked(ChunkedScanner::new())
        } else {
            Framing::UntilClose
        }
    } else {
        match fields.length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    let until_close = matches!(framing, Framing::UntilClose);
    // Both lengths at once may be an attempt at response splitting: the connection is not used again.
    let ambiguous = fields.has_transfer_encoding() && fields.length.is_some();
    let reusable =
        response.version == Some(1) && !connection_lists(connection(), b"close") && !until_close && !ambiguous;
    let close = reply.close || until_close;
    out.clear();
    put_status_line(out, status, response.reason);
    for header in headers {
        let name = header.name.as_bytes();
        let dropped = is_hop_by_hop(name)
            || name.eq_ignore_ascii_case(X_REQUEST_ID.as_str().as_bytes())
            || name.eq_ignore_ascii_case(b"content-length")
            || name.eq_ignore_ascii_case(b"transfer-encoding")
            || (name.eq_ignore_ascii_case(b"te") && !super::headers::only_trailers(header.value))
            || (has_connection && connection_lists(connection(), name));
        if !dropped {
            put_header(out, name, header.value);
        }
    }
    // The framing headers, ours: derived from the framing above, never removed by `Connection`.
    let length = match framing {
        Framing::Length(n) => Some(n),
        Framing::Empty if !bodiless => Some(0),
        // HEAD and 304 describe the representation a GET would have had: its length, when the upstream gave it.
        Framing::Empty if status != StatusCode::NO_CONTENT && !fields.has_transfer_encoding() => fields.length,
        _ => None,
    };
    if let Some(length) = length {
        put_header(out, b"content-length", itoa::Buffer::new().format(length).as_bytes());
    }
    if fields.has_transfer_encoding() && status != StatusCode::NO_CONTENT {
        // The codings as the upstream listed them: the body passes through still coded.
        for header in headers.iter().filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding")) {
            put_header(out, b"transfer-encoding", header.value);
        }
    }
    put_own_headers(out, reply, close);
    Ok(Some((head_len, Some(ResponseHead { status, framing, reusable, close }))))
}

/// Skips the body of a response that will not be forwarded (a 401 before its replay); the upstream connection is
/// kept only when the whole body is already here.
fn discard_body(slot: &mut Option<Upstream>, head: ResponseHead) {
    let Some(upstream) = slot else { return };
    let buffered = &upstream.input[..];
    let body = match head.framing {
        Framing::Empty => Some(0),
        Framing::Length(n) => usize::try_from(n).ok().filter(|&n| n <= buffered.len()),
        Framing::Chunked(mut scanner) => match scanner.scan(buffered) {
            Ok(Scan::Done(n)) => Some(n),
            _ => None,
        },
        Framing::UntilClose => None,
    };
    match body {
        Some(n) if head.reusable && n == buffered.len() => upstream.input.clear(),
        _ => *slot = None,
    }
}

/// Writes the response head (already in the state's response buffer) and copies the body as it comes.
async fn forward_response<I: AsyncWrite + Unpin>(
    io: &mut I,
    state: &mut DirectState,
    head: ResponseHead,
    replayed: bool,
) -> Outcome {
    let status = head.status;
    let Some(upstream) = state.upstream.as_mut() else { return Outcome::Broken { status } };
    let out = &mut state.response;
    let complete = match head.framing {
        Framing::Empty => io.write_all(out).await.is_ok(),
        Framing::Length(length) => copy_length(io, out, upstream, length).await,
        Framing::Chunked(scanner) => copy_chunked(io, out, upstream, scanner).await,
        Framing::UntilClose => {
            copy_until_close(io, out, upstream).await;
            state.upstream = None;
            return Outcome::Answered { status, replayed, open: false };
        }
    };
    if !complete {
        state.upstream = None;
        return Outcome::Broken { status };
    }
    if !head.reusable || !upstream.input.is_empty() {
        state.upstream = None;
    } else if upstream.input.capacity() > 2 * READ_SIZE {
        // A large response head made it grow: an idle connection goes back to the usual size.
        upstream.input = BytesMut::new();
    }
    Outcome::Answered { status, replayed, open: !head.close }
}

/// Copies a `Content-Length` body; false when either side failed before its end.
async fn copy_length<I: AsyncWrite + Unpin>(io: &mut I, out: &mut Vec<u8>, up: &mut Upstream, length: u64) -> bool {
    let mut remaining = length;
    // The first part of the body goes with the head, in one write.
    let take = |buffered: usize, remaining: u64| usize::try_from(remaining).map_or(buffered, |r| r.min(buffered));
    let first = take(up.input.len(), remaining);
    out.extend_from_slice(&up.input[..first]);
    up.input.advance(first);
    remaining -= first as u64;
    if io.write_all(out).await.is_err() {
        return false;
    }
    while remaining > 0 {
        match up.read_more().await {
            Ok(n) if n > 0 => {}
            _ => return false,
        }
        let n = take(up.input.len(), remaining);
        if io.write_all(&up.input[..n]).await.is_err() {
            return false;
        }
        up.input.advance(n);
        remaining -= n as u64;
    }
    true
}

/// Copies a chunked body as it is, up to its last chunk and trailers; false when either side failed before.
async fn copy_chunked<I: AsyncWrite + Unpin>(
    io: &mut I,
    out: &mut Vec<u8>,
    up: &mut Upstream,
    mut scanner: ChunkedScanner,
) -> bool {
    let mut first = true;
    loop {
        let buffered = &up.input[..];
        let (n, done) = match scanner.scan(buffered) {
            Ok(Scan::Done(n)) => (n, true),
            Ok(Scan::More) => (buffered.len(), false),
            Err(error) => {
                tracing::debug!(upstream = %up.authority, "{error}");
                return false;
            }
        };
        let written = if first {
            first = false;
            out.extend_from_slice(&buffered[..n]);
            io.write_all(out).await
        } else {
            io.write_all(&buffered[..n]).await
        };
        if written.is_err() {
            return false;
        }
        up.input.advance(n);
        if done {
            return true;
        }
        match up.read_more().await {
            Ok(n) if n > 0 => {}
            _ => return false,
        }
    }
}

/// Copies a body that ends when the upstream closes the connection.
async fn copy_until_close<I: AsyncWrite + Unpin>(io: &mut I, out: &mut Vec<u8>, up: &mut Upstream) {
    out.extend_from_slice(&up.input);
    up.input.clear();
    if io.write_all(out).await.is_err() {
        return;
    }
    loop {
        match up.read_more().await {
            Ok(n) if n > 0 => {}
            _ => return,
        }
        if io.write_all(&up.input).await.is_err() {
            return;
        }
        up.input.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> (Parse, Parts, BytesMut) {
        let mut input = BytesMut::from(bytes);
        let (mut parts, ()) = http::Request::new(()).into_parts();
        let parse = parse_request(&mut input, &mut parts, &mut Vec::new());
        (parse, parts, input)
    }

    fn parsed(bytes: &[u8]) -> (Parsed, Parts, BytesMut) {
        match parse(bytes) {
            (Parse::Complete(parsed), parts, rest) => (parsed, parts, rest),
            (Parse::Partial, ..) => panic!("partial: {}", bytes.escape_ascii()),
            (Parse::Handoff(_), ..) => panic!("handed off: {}", bytes.escape_ascii()),
            (Parse::Refuse(reason), ..) => panic!("refused ({reason}): {}", bytes.escape_ascii()),
        }
    }

    #[test]
    fn a_plain_request_is_parsed_with_its_body_length() {
        let bytes = b"POST /orders?id=1 HTTP/1.1\r\nHost: api.local\r\nContent-Length: 5\r\nX-Custom: a\r\n\r\nhello";
        let (request, parts, rest) = parsed(bytes);
        assert_eq!(parts.method, Method::POST);
        assert_eq!(parts.uri, "/orders?id=1");
        assert_eq!(parts.headers["host"], "api.local");
        assert_eq!(parts.headers["x-custom"], "a");
        assert_eq!((request.head.len(), request.body_len, request.close), (bytes.len() - 5, 5, false));
        assert_eq!(&rest[..], b"hello", "the head is split off, the body stays");
        assert!(parsed(b"GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n").0.close);
    }

    #[test]
    fn a_reused_header_map_holds_only_the_new_request() {
        let mut input = BytesMut::from(&b"GET /a HTTP/1.1\r\nX-One: 1\r\n\r\nGET /b HTTP/1.1\r\nX-Two: 2\r\n\r\n"[..]);
        let (mut parts, ()) = http::Request::new(()).into_parts();
        let mut spans = Vec::new();
        assert!(matches!(parse_request(&mut input, &mut parts, &mut spans), Parse::Complete(_)));
        assert_eq!((parts.uri.path(), parts.headers.len()), ("/a", 1));
        assert!(matches!(parse_request(&mut input, &mut parts, &mut spans), Parse::Complete(_)));
        assert_eq!((parts.uri.path(), parts.headers.len()), ("/b", 1));
        assert_eq!(parts.headers["x-two"], "2");
        assert!(input.is_empty());
    }

    #[test]
    fn framings_http_1_1_forbids_are_refused() {
        for bytes in [
            &b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\nx",
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxy",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
        ] {
            assert!(matches!(parse(bytes).0, Parse::Refuse(_)), "{}", bytes.escape_ascii());
        }
        let (request, ..) = parsed(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx");
        assert_eq!((request.body_len, request.has_length), (1, true), "identical lengths are one length");
    }

    #[test]
    fn an_incomplete_head_waits_for_more() {
        for bytes in [&b""[..], b"GET / HTTP/1.1\r\n", b"GET / HTTP/1.1\r\nHost: a\r\n\r"] {
            assert!(matches!(parse(bytes).0, Parse::Partial), "{}", bytes.escape_ascii());
        }
    }

    #[test]
    fn requests_of_another_shape_go_to_hyper() {
        let many_headers = format!("GET / HTTP/1.1\r\n{}\r\n", "X-A: 1\r\n".repeat(MAX_HEADERS + 1));
        let huge_head = format!("GET / HTTP/1.1\r\nX-A: {}", "a".repeat(MAX_HEAD));
        for bytes in [
            &b"GET / HTTP/1.0\r\n\r\n"[..],
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"CONNECT api.local:443 HTTP/1.1\r\nHost: api.local:443\r\n\r\n",
            b"GET http://api.local/ HTTP/1.1\r\nHost: api.local\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\nHost: api.local\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            b"GET / HTTP/1.1\r\nConnection: upgrade\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 65537\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Header: 1\r\n\r\n",
            b"\x16\x03\x01\x02\x00",
            many_headers.as_bytes(),
            huge_head.as_bytes(),
        ] {
            let (parse, _, rest) = parse(bytes);
            let Parse::Handoff(head) = parse else { panic!("not handed off: {}", bytes.escape_ascii()) };
            assert_eq!([&head[..], &rest[..]].concat(), bytes, "every byte goes to hyper");
        }
    }

    fn reply(request_id: &HeaderValue, head_request: bool) -> Reply<'_> {
        Reply { request_id, close: false, head_request, deadline: Instant::now() }
    }

    /// The head rewritten for the caller, and how its body is framed.
    fn response(bytes: &[u8], head_request: bool) -> Result<(String, ResponseHead), String> {
        let id = HeaderValue::from_static("req-1");
        let mut out = Vec::new();
        match parse_response(bytes, &reply(&id, head_request), &mut out)? {
            Some((_, Some(head))) => Ok((String::from_utf8(out).expect("text"), head)),
            other => panic!("not a final head: {:?}", other.map(|(n, _)| n)),
        }
    }

    #[test]
    fn response_heads_lose_hop_by_hop_headers_and_get_the_request_id() {
        let (head, parsed) = response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\n\
              Upgrade: h2c\r\nProxy-Authenticate: Basic\r\nX-Request-Id: theirs\r\nTrailer: X-Sum\r\nX-End: kept\r\n\r\nok",
            false,
        )
        .expect("valid");
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\nTrailer: X-Sum\r\nX-End: kept\r\ncontent-length: 2\r\nx-request-id: req-1\r\n\r\n"
        );
        assert!(matches!(parsed.framing, Framing::Length(2)) && parsed.reusable && !parsed.close);
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let framing = |bytes: &[u8], head_request| response(bytes, head_request).expect("valid").1;
        let chunked = framing(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", false);
        assert!(matches!(chunked.framing, Framing::Chunked(_)) && chunked.reusable);
        let both = framing(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 9\r\n\r\n", false);
        assert!(matches!(both.framing, Framing::Chunked(_)) && !both.reusable, "both lengths: not reused");
        let (head, _) = response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n", false)
            .expect("valid");
        assert!(!head.to_ascii_lowercase().contains("content-length"), "Content-Length dropped beside chunked: {head}");
        let until_close = framing(b"HTTP/1.1 200 OK\r\n\r\n", false);
        assert!(matches!(until_close.framing, Framing::UntilClose) && !until_close.reusable && until_close.close);
        let not_chunked_last = framing(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", false);
        assert!(matches!(not_chunked_last.framing, Framing::UntilClose));
        for (bytes, head_request) in [
            (&b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"[..], true),
            (b"HTTP/1.1 204 No Content\r\n\r\n", false),
            (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 42\r\n\r\n", false),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", false),
        ] {
            let head = framing(bytes, head_request);
            assert!(matches!(head.framing, Framing::Empty) && head.reusable, "{}", bytes.escape_ascii());
        }
        assert!(!framing(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", false).reusable);
        assert!(!framing(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false).reusable);
    }

    #[test]
    fn informational_heads_are_skipped_and_bad_heads_refused() {
        let id = HeaderValue::from_static("req-1");
        let early = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n";
        let skipped = parse_response(early, &reply(&id, false), &mut Vec::new()).expect("valid");
        assert!(matches!(skipped, Some((n, None)) if n == early.len()));
        for bytes in [
            &b"HTTP/1.1 101 Switching Protocols\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            assert!(response(bytes, false).is_err(), "{}", bytes.escape_ascii());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_timer_ends_a_wait_at_its_deadline_and_not_before() {
        let mut timer = Timer::new(Duration::from_secs(1));
        let start = Instant::now();
        assert_eq!(timer.within(start + Duration::from_secs(3), std::future::pending::<()>()).await, None);
        assert_eq!(start.elapsed(), Duration::from_secs(3), "not before the deadline, and not after");
        // Waits one after another, each finishing before its own deadline: none is cut short.
        for _ in 0..5 {
            let deadline = Instant::now() + Duration::from_secs(2);
            let work = tokio::time::sleep(Duration::from_millis(1500));
            assert_eq!(timer.within(deadline, work).await, Some(()));
        }
        let start = Instant::now();
        assert_eq!(timer.within(start + Duration::from_secs(1), std::future::pending::<()>()).await, None);
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_shorter_period_moves_the_timer_at_once() {
        let mut timer = Timer::new(Duration::from_secs(10));
        assert_eq!(timer.within(Instant::now() + Duration::from_secs(20), async { 7 }).await, Some(7));
        timer.set_period(Duration::from_millis(300));
        let start = Instant::now();
        assert_eq!(timer.within(start + Duration::from_millis(300), std::future::pending::<()>()).await, None);
        assert_eq!(start.elapsed(), Duration::from_millis(300));
    }
}
