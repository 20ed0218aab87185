//! The HTTP/1.1 connection driver: I/O and framing for plain HTTP/1.1 requests to plain-HTTP upstreams, with the
//! request's phases taken from [`Proxy`].
//!
//! One task per caller connection reads the request head, reads a small body whole, writes the upstream request on
//! a connection from the worker's pool ([`UpstreamClient::checkout`]) and forwards the response head and body as
//! they come: a `Content-Length` body is copied, a chunked body is passed through undecoded ([`ChunkedScanner`]
//! finds its end), a body delimited by the upstream closing is copied until then. No channel, no second task.
//!
//! An idle connection holds no buffer: what a request needs ([`Scratch`]: the read buffers, the parsed head, the
//! encoding buffers) is taken from a per-thread list when its first bytes arrive and given back when it is answered,
//! and its upstream connection goes back to the pool. While the upstream prepares its answer, the caller's side is
//! watched: a caller that goes away cancels the round trip (and its upstream connection is closed, not pooled).
//!
//! Everything else is handed to hyper with the bytes already read, for the rest of the connection (see
//! [`super::Parse::Handoff`]), and so are routes to TLS upstreams. Hyper then answers exactly as it would have from
//! the first byte.

use std::cell::RefCell;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::request::Parts;
use http::{Method, StatusCode, Uri};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

use super::round_trip::{discard_body, forward_response, round_trip, Buffers, Outcome, READ_SIZE};
use super::{encode_error, encode_request, parse_request, Parse, ReplyTo, ResponseHead, Span, UpstreamRequest};
#[cfg(doc)]
use crate::activity::Registry;
use crate::activity::{Activity, Ended, Timeouts};
use crate::proxy::lifecycle::{self, Attempt, Transport};
use crate::proxy::upstream::{PlainConnection, UpstreamClient};
use crate::proxy::{Answer, Connection, Proxy, ProxyError, Resend, Retried, Route, CLIENT_CLOSED_REQUEST};
use http::uri::Authority;

/// The room made for each read from the caller: a request head and a small body (8 KiB with its head) come in one
/// read.
const CALLER_READ_SIZE: usize = 16 * 1024;
/// Spare [`Scratch`]es a thread keeps for the next requests; beyond them, they are freed.
const SPARE_SCRATCH: usize = 256;
/// While the upstream prepares its answer, at most this much of the caller's next requests is read ahead.
const READ_AHEAD: usize = 64 * 1024;

/// What a request in progress needs; kept on a per-thread list between requests, so that an idle connection holds
/// none of it and a busy one allocates nothing per request.
struct Scratch {
    /// What the caller sent and was not served yet.
    input: BytesMut,
    /// The request head, parsed.
    parts: Parts,
    /// Where the head's fields are, while parsing.
    spans: Vec<Span>,
    /// The upstream request being written.
    request: Vec<u8>,
    /// The response head being written.
    response: Vec<u8>,
    /// What the upstream sent and was not forwarded yet.
    upstream_input: BytesMut,
}

std::thread_local! {
    // Boxed: a connection then holds a pointer while it reads ahead, not the struct itself.
    #[allow(clippy::vec_box)]
    static SPARE: RefCell<Vec<Box<Scratch>>> = const { RefCell::new(Vec::new()) };
}

impl Scratch {
    /// A spare one of this thread, or a new one.
    fn take() -> Box<Scratch> {
        SPARE.with(|spare| spare.borrow_mut().pop()).unwrap_or_else(|| {
            let (parts, ()) = http::Request::new(()).into_parts();
            Box::new(Scratch {
                input: BytesMut::new(),
                parts,
                spans: Vec::new(),
                request: Vec::new(),
                response: Vec::new(),
                upstream_input: BytesMut::new(),
            })
        })
    }

    /// Keeps it for the next request of this thread, unless a large message made it grow or enough are kept.
    fn give_back(mut self: Box<Scratch>) {
        let small = self.input.capacity() <= 2 * CALLER_READ_SIZE
            && self.upstream_input.capacity() <= 2 * READ_SIZE
            && self.request.capacity() <= 2 * CALLER_READ_SIZE
            && self.response.capacity() <= 2 * READ_SIZE
            && self.parts.headers.capacity() <= 128;
        if !small {
            return;
        }
        // Each is usually empty already (an idle read gives back what it took unused): clearing a header map costs
        // a pass over its table even then.
        self.input.clear();
        self.upstream_input.clear();
        if !self.parts.headers.is_empty() {
            self.parts.headers.clear();
            self.parts.uri = Uri::default();
        }
        let _ = SPARE.try_with(|spare| {
            let mut spare = spare.borrow_mut();
            if spare.len() < SPARE_SCRATCH {
                spare.push(self);
            }
        });
    }
}

/// Frees the [`Scratch`]es this thread keeps for its next requests (when the proxy is idle: the next request takes
/// a new one).
pub fn release_spares() {
    let _ = SPARE.try_with(|spare| std::mem::take(&mut *spare.borrow_mut()));
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
    /// (A future of its own rather than an `async fn`: it holds `future`, the deadline and a reference, nothing
    /// twice, and every wait of a connection is one of these.)
    fn within<F: std::future::Future>(&mut self, deadline: Instant, future: F) -> Within<'_, F> {
        Within { future, timer: self, deadline }
    }

    /// Polls the timer for a wait whose deadline is `deadline`: ready when it has passed.
    fn poll_deadline(&mut self, deadline: Instant, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        use std::future::Future;
        use std::task::Poll;
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
                return Poll::Ready(());
            }
            self.sleep.as_mut().reset(deadline.min(now + self.period));
            self.armed = false;
        }
    }
}

pin_project_lite::pin_project! {
    /// A wait of [`Timer::within`].
    struct Within<'a, F> {
        #[pin]
        future: F,
        timer: &'a mut Timer,
        deadline: Instant,
    }
}

impl<F: std::future::Future> std::future::Future for Within<'_, F> {
    type Output = Option<F::Output>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        let this = self.project();
        if let Poll::Ready(output) = this.future.poll(cx) {
            return Poll::Ready(Some(output));
        }
        this.timer.poll_deadline(*this.deadline, cx).map(|()| None)
    }
}

/// The rest of the connection for hyper: what was split off, then what is still buffered.
fn handoff<I>(io: I, head: Bytes, scratch: Option<Box<Scratch>>) -> Ended<I> {
    let input = scratch.map(|s| s.input).unwrap_or_default();
    let buffered = if head.is_empty() { input.freeze() } else { [&head[..], &input[..]].concat().into() };
    Ended::Handoff { io, buffered }
}

/// Waits for an idle connection's next bytes without holding a buffer: a [`Scratch`] is taken for each attempt to
/// read and given back when nothing came. `None` at the end of the stream or on an error.
async fn read_idle<I: AsyncRead + Unpin>(io: &mut I) -> Option<Box<Scratch>> {
    use std::future::Future;
    use std::task::Poll;
    std::future::poll_fn(|cx| {
        let mut scratch = Scratch::take();
        scratch.input.reserve(CALLER_READ_SIZE);
        let read = std::pin::pin!(io.read_buf(&mut scratch.input)).poll(cx);
        match read {
            Poll::Pending => {
                scratch.give_back();
                Poll::Pending
            }
            Poll::Ready(Ok(n)) if n > 0 => Poll::Ready(Some(scratch)),
            Poll::Ready(_) => {
                scratch.give_back();
                Poll::Ready(None)
            }
        }
    })
    .await
}

/// Serves `io`'s requests for as long as they are of this transport's shape, noting each in `activity` (what the
/// listener's eviction looks at); with `server.h1_transport = false`, hands the connection to hyper at once.
///
/// (A function returning an `async` block rather than an `async fn`: an `async fn` keeps its arguments twice in its
/// state, as they came and as the body's locals, and this state is what every idle connection holds.)
#[allow(clippy::manual_async_fn)]
pub fn drive<'a, 'b, 'c, I>(
    proxies: &'a arc_swap::ArcSwap<Proxy>,
    connection: &'b Connection,
    mut io: I,
    shutdown: watch::Receiver<bool>,
    timeouts: Timeouts,
    activity: &'c Activity,
) -> impl std::future::Future<Output = Ended<I>> + Send + use<'a, 'b, 'c, I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send,
{
    async move {
        if !proxies.load().h1_transport() {
            return Ended::Handoff { io, buffered: Bytes::new() };
        }
        let mut scratch: Option<Box<Scratch>> = None;
        let mut timer = Timer::new(timeouts.header_read.min(proxies.load().request_timeout));
        let mut served = false;
        // At shutdown the listener asks every connection to close ([`Registry::shut_idle_and_tunnels`]): one wait
        // for that, registered once for the whole connection (a future made per idle read would register and
        // unregister a waiter each request). `stopping` answers whether shutdown has begun, between requests.
        let stopping = shutdown;
        let mut stop = std::pin::pin!(activity.closing());
        loop {
            if *stopping.borrow() {
                return Ended::Closed;
            }
            // The rule of `Activity::deadline`: the first request's head within `header_read_timeout` of the accept; after
            // a request, the next one's first byte within `keepalive_timeout`, its whole head within `header_read_timeout`
            // of that byte (slowloris guard).
            let idle_deadline = Instant::now() + timeouts.idle(served);
            let mut head_deadline = (!served).then_some(idle_deadline);
            let parsed = loop {
                if let Some(s) = scratch.as_mut().filter(|s| !s.input.is_empty()) {
                    match parse_request(&mut s.input, &mut s.parts, &mut s.spans) {
                        Parse::Complete(parsed) => break parsed,
                        Parse::Handoff(head) => return handoff(io, head, scratch),
                        Parse::Refuse(reason) => {
                            // Boxed, in a statement of its own: a rare path that would otherwise grow every connection.
                            let refusal = Box::pin(refuse(&mut io, proxies, &mut s.response, reason));
                            refusal.await;
                            return Ended::Closed;
                        }
                        Parse::Partial => {}
                    }
                }
                match scratch.as_mut().filter(|s| !s.input.is_empty()) {
                    Some(s) => {
                        s.input.reserve(CALLER_READ_SIZE);
                        let deadline = *head_deadline.get_or_insert_with(|| Instant::now() + timeouts.header_read);
                        match timer.within(deadline, io.read_buf(&mut s.input)).await {
                            Some(Ok(n)) if n > 0 => {}
                            _ => return Ended::Closed,
                        }
                    }
                    None => {
                        if let Some(s) = scratch.take() {
                            s.give_back();
                        }
                        let read = tokio::select! {
                            biased;
                            read = timer.within(idle_deadline, read_idle(&mut io)) => read,
                            () = &mut stop => return Ended::Closed,
                        };
                        match read {
                            Some(Some(s)) => scratch = Some(s),
                            _ => return Ended::Closed,
                        }
                    }
                }
            };
            let Some(s) = scratch.as_mut() else { return Ended::Closed };
            let close = *stopping.borrow();
            // Boxed: what a request needs while in flight is allocated per request, so that an idle connection's task
            // stays small (its future is as large as its largest state).
            let settings = (timeouts.header_read, close);
            // In flight from its complete head to its answer (a request handed to hyper is hyper's from there).
            activity.begin();
            served = true;
            // (In a statement of its own: a temporary of an `.await` expression is kept in the state.)
            let request = Box::pin(serve_request(proxies, connection, parsed, s, &mut timer, &mut io, settings));
            let step = request.await;
            activity.end();
            match step {
                Step::Next => {}
                Step::Handoff(head) => return handoff(io, head, scratch),
                Step::Close => {
                    let _ = io.shutdown().await;
                    if let Some(s) = scratch.take() {
                        s.give_back();
                    }
                    return Ended::Closed;
                }
            }
        }
    }
}

/// What a connection does after a request.
enum Step {
    /// Reads the next request.
    Next,
    /// Closes.
    Close,
    /// Hands the rest of the connection to hyper, this request's head (split off the buffer) first.
    Handoff(Bytes),
}

/// One request whose head was parsed: its phases and I/O, up to its answer. `closing`: the connection closes after
/// it (shutdown has begun).
async fn serve_request<I: AsyncRead + AsyncWrite + Unpin>(
    proxies: &arc_swap::ArcSwap<Proxy>,
    connection: &Connection,
    parsed: super::RequestHead,
    s: &mut Scratch,
    timer: &mut Timer,
    io: &mut I,
    (header_read_timeout, closing): (Duration, bool),
) -> Step {
    let proxy = proxies.load_full();
    timer.set_period(header_read_timeout.min(proxy.request_timeout));
    let mut in_flight = proxy.begin(&mut s.parts);
    let route = proxy.admit(&mut s.parts, connection);
    if let Ok(route) = route {
        if route.plain_http_upstream().is_none() || parsed.body_len > proxy.replay_buffer {
            return Step::Handoff(parsed.head);
        }
        in_flight.routed(route);
    }
    let close = parsed.close || closing;
    let mut retried = in_flight.retried();
    let request_id = in_flight.request_id();
    let head_request = s.parts.method == Method::HEAD;
    let (status, done) = match route {
        Err(error) => {
            // Refused before routing: answered at once, without waiting for a body. A malformed request, or a
            // body not read yet, ends the connection (where the next request starts is not known).
            let close = close || error.ends_connection() || s.input.len() < parsed.body_len;
            let reply = ReplyTo { request_id, close, head_request };
            write_error(io, &mut s.response, &proxy, None, error, &reply).await
        }
        Ok(route) => 'answered: {
            // The body, read whole: it is small, and kept for a replay.
            let deadline = in_flight.started() + proxy.request_timeout;
            while s.input.len() < parsed.body_len {
                s.input.reserve(parsed.body_len - s.input.len());
                match timer.within(deadline, io.read_buf(&mut s.input)).await {
                    Some(Ok(n)) if n > 0 => {}
                    Some(_) => return Step::Close,
                    None => {
                        // The body did not come in time; where the next request would start is unknown.
                        let error = ProxyError::RequestTimeout(proxy.request_timeout);
                        let reply = ReplyTo { request_id, close: true, head_request };
                        let (status, _) = write_error(io, &mut s.response, &proxy, Some(route), error, &reply).await;
                        break 'answered (status, true);
                    }
                }
            }
            let reply = ReplyTo { request_id, close, head_request };
            let request = Request {
                route,
                body_len: parsed.body_len,
                has_length: parsed.has_length,
                connection,
                reply: &reply,
                deadline,
            };
            match forward(&proxy, &request, s, timer, io, &mut retried).await {
                Outcome::Answered { status, open } => (status, !open),
                Outcome::Error(error) => write_error(io, &mut s.response, &proxy, Some(route), error, &reply).await,
                Outcome::Broken { status } => (status, true),
                Outcome::Gone => (CLIENT_CLOSED_REQUEST, true),
            }
        }
    };
    proxy.end(in_flight, status, &retried);
    // A request refused before its body came ends the connection; the body is skipped only when it is here.
    let body = parsed.body_len.min(s.input.len());
    s.input.advance(body);
    // Nothing refers to the head any more: the buffer's memory can be reused for the next request.
    s.parts.headers.clear();
    s.parts.uri = Uri::default();
    drop(parsed);
    if done {
        Step::Close
    } else {
        Step::Next
    }
}

/// Answers a request HTTP/1.1 forbids with 400 and closes the connection.
async fn refuse<I: AsyncWrite + Unpin>(
    io: &mut I,
    proxies: &arc_swap::ArcSwap<Proxy>,
    out: &mut Vec<u8>,
    reason: String,
) {
    let request_id = crate::proxy::new_request_id();
    let reply = ReplyTo { request_id: &request_id, close: true, head_request: false };
    tracing::debug!("refused a request: {reason}");
    let error = ProxyError::Malformed(format!("{reason}: refused"));
    let proxy = proxies.load();
    let (status, _) = write_error(io, out, &proxy, None, error, &reply).await;
    proxy.count_refused(status);
    let _ = io.shutdown().await;
}

/// Writes the proxy's own answer to `error` on a request of `route` (problem+json, see [`ProxyError::into_parts`]):
/// its status, and whether the connection ends after it (the reply says so, or the write failed).
async fn write_error<I: AsyncWrite + Unpin>(
    io: &mut I,
    out: &mut Vec<u8>,
    proxy: &Proxy,
    route: Option<&Route>,
    error: ProxyError,
    reply: &ReplyTo<'_>,
) -> (StatusCode, bool) {
    let context = proxy.error_context(route, &error);
    let status = error.status();
    let (head, body) = error.into_parts(&context);
    encode_error(out, &head, &body, reply);
    let written = io.write_all(out).await;
    (status, written.is_err() || reply.close)
}

/// A request read whole, for [`forward`].
struct Request<'a> {
    route: &'a Route,
    body_len: usize,
    /// The caller framed the body with `Content-Length`.
    has_length: bool,
    connection: &'a Connection,
    reply: &'a ReplyTo<'a>,
    /// `request_timeout` after the request's arrival: the response head must have come by then.
    deadline: Instant,
}

/// A request's lifecycle ([`lifecycle::forward`]) with this transport's I/O; the response is written to `io`.
async fn forward<I: AsyncRead + AsyncWrite + Unpin>(
    proxy: &Proxy,
    request: &Request<'_>,
    s: &mut Scratch,
    timer: &mut Timer,
    io: &mut I,
    retried: &mut Retried,
) -> Outcome {
    let Request { route, body_len, has_length, connection, reply, deadline } = *request;
    let Some(authority) = route.plain_http_upstream() else {
        return Outcome::Error(ProxyError::UpstreamUnreachable("not a plain-HTTP upstream".into()));
    };
    let Scratch { input, parts, request: encoded, response, upstream_input, .. } = s;
    let mut upstream = Upstream {
        client: &proxy.client,
        // The pool's clock reading for this request: its start (`request_timeout` before its deadline).
        started: deadline.checked_sub(proxy.request_timeout).unwrap_or(deadline),
        authority,
        connection: None,
        idempotent: parts.method.is_idempotent(),
        body: (body_len, has_length),
        reply,
        deadline,
        request_timeout: proxy.request_timeout,
        timer,
        io,
        input,
        encoded,
        response,
        upstream_input,
        head: None,
        resent: false,
    };
    let delivery = match lifecycle::forward(route, parts, &mut None, connection, deadline, retried, &mut upstream).await
    {
        Ok(delivery) => delivery,
        Err(outcome) => return outcome,
    };
    // The place among the upstream's requests in flight is held until the response is forwarded.
    let _place = delivery.place;
    let Some(head) = upstream.head.take() else {
        return Outcome::Error(ProxyError::UpstreamUnreachable("no response was kept".into()));
    };
    let pool = (upstream.connection.take(), upstream.client, upstream.started);
    forward_response(upstream.io, upstream.response, upstream.upstream_input, pool, head).await
}

/// This transport's side of a request's lifecycle: the upstream connection (from the worker's pool) and the
/// request's buffers. The body was read whole, so the request can always go again.
struct Upstream<'a, I> {
    client: &'a UpstreamClient,
    /// The pool's clock reading for this request.
    started: Instant,
    authority: &'a Authority,
    connection: Option<PlainConnection>,
    idempotent: bool,
    /// The body's length, and whether the caller framed it with `Content-Length`.
    body: (usize, bool),
    reply: &'a ReplyTo<'a>,
    deadline: Instant,
    request_timeout: Duration,
    timer: &'a mut Timer,
    io: &'a mut I,
    /// What the caller sent: the body, then what is read ahead of its next requests.
    input: &'a mut BytesMut,
    /// The upstream request, encoded.
    encoded: &'a mut Vec<u8>,
    /// The response head rewritten for the caller.
    response: &'a mut Vec<u8>,
    /// What the upstream sent and was not forwarded yet.
    upstream_input: &'a mut BytesMut,
    /// The response head of the last send, until it is forwarded or discarded.
    head: Option<ResponseHead>,
    /// The last send wrote the request again on a new connection (the pooled one had gone stale).
    resent: bool,
}

impl<I: AsyncRead + AsyncWrite + Unpin> Transport for Upstream<'_, I> {
    type Failure = Outcome;
    const BOUNDED: bool = true;

    async fn send(&mut self, parts: &mut Parts, attempt: &Attempt<'_>) -> Result<(), Outcome> {
        attempt.trace_into(&mut parts.headers);
        let (uri, credential) = attempt.upstream(&parts.method)?;
        let (body_len, has_length) = self.body;
        let message = UpstreamRequest {
            method: &parts.method,
            target: uri.path_and_query().map_or("/", |p| p.as_str()),
            headers: &parts.headers,
            credential,
            body: &self.input[..body_len],
            has_length,
        };
        encode_request(self.encoded, &message);
        let mut buffers = Buffers { response: self.response, upstream_input: self.upstream_input };
        let sent = round_trip(
            (self.client, self.started),
            self.authority,
            &mut self.connection,
            self.encoded,
            self.idempotent,
            (self.reply, &mut self.resent),
            &mut buffers,
        );
        match self.timer.within(self.deadline, watch_caller(sent, self.io, self.input)).await {
            Some(Some(Ok(head))) => {
                self.head = Some(head);
                Ok(())
            }
            Some(Some(Err(error))) => Err(Outcome::Error(ProxyError::UpstreamUnreachable(error))),
            Some(None) => Err(Outcome::Gone),
            None => Err(Outcome::Error(ProxyError::UpstreamTimeout(self.request_timeout))),
        }
    }

    fn answer(&mut self) -> Answer {
        self.head.as_mut().map(|head| std::mem::take(&mut head.answer)).unwrap_or_default()
    }

    async fn can_resend(&mut self) -> bool {
        true
    }

    fn discard(&mut self) {
        if let Some(head) = self.head.take() {
            discard_body(&mut self.connection, self.upstream_input, head);
        }
    }

    fn resent(&mut self) -> Option<Resend> {
        std::mem::take(&mut self.resent).then_some(Resend::StaleConnection)
    }
}

/// `work`'s outcome, or `None` if the caller closes its connection first. The caller's next bytes (pipelined
/// requests) are read ahead into `input` meanwhile, up to [`READ_AHEAD`].
async fn watch_caller<F, T, I>(work: F, io: &mut I, input: &mut BytesMut) -> Option<T>
where
    F: std::future::Future<Output = T>,
    I: AsyncRead + Unpin,
{
    let caller = async {
        while input.len() < READ_AHEAD {
            input.reserve(4096);
            match io.read_buf(input).await {
                Ok(n) if n > 0 => {}
                _ => return,
            }
        }
        std::future::pending::<()>().await;
    };
    tokio::select! {
        biased;
        outcome = work => Some(outcome),
        () = caller => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[tokio::test]
    async fn an_idle_read_holds_no_scratch_and_a_busy_one_reuses_them() {
        let (mut caller, mut proxy_side) = tokio::io::duplex(1024);
        let spare = || SPARE.with(|s| s.borrow().len());
        Scratch::take().give_back();
        let before = spare();
        let mut read = std::pin::pin!(read_idle(&mut proxy_side));
        assert!(futures_util::FutureExt::now_or_never(read.as_mut()).is_none());
        assert_eq!(spare(), before, "the scratch tried for the read went back while nothing came");
        caller.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let scratch = read.await.expect("bytes");
        assert_eq!(&scratch.input[..], b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(spare(), before - 1, "a spare one was taken, none allocated");
        scratch.give_back();
        assert_eq!(spare(), before);
        // When the proxy is idle, the spares are freed; the next request makes a new one.
        release_spares();
        assert_eq!(spare(), 0);
        Scratch::take().give_back();
        assert_eq!(spare(), 1);
    }
}
