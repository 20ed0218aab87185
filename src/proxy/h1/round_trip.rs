//! The upstream side of the h1 transport: one round trip on a pooled connection (the request written, the final
//! response head read and rewritten for the caller, the one retry on a new connection that [`may_retry`] allows),
//! and the response forwarded to the caller as it comes: a `Content-Length` body copied, a chunked body passed through
//! undecoded ([`ChunkedScanner`] finds its end), a body delimited by the upstream closing copied until then.

use std::io;

use bytes::{Buf, BytesMut};
use http::uri::Authority;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::chunked::{ChunkedScanner, Scan};
use super::{parse_response, Framing, ReplyTo, ResponseHead};
use crate::proxy::upstream::{may_retry, FailedSend, PlainConnection, UpstreamClient};
use crate::proxy::ProxyError;

/// The size of each read from the upstream.
pub(super) const READ_SIZE: usize = 8 * 1024;

/// How serving a request ended.
pub(super) enum Outcome {
    /// A response was written (`open`: the connection can take the next request).
    Answered { status: StatusCode, open: bool },
    /// Nothing was written yet: the error is the answer.
    Error(ProxyError),
    /// The response could not be completed (a side went away mid-body): the connection ends.
    Broken { status: StatusCode },
    /// The caller went away before the response head came: the round trip was cancelled.
    Gone,
}

impl From<ProxyError> for Outcome {
    fn from(error: ProxyError) -> Outcome {
        Outcome::Error(error)
    }
}

/// Why a round trip on one upstream connection failed.
struct Failure {
    message: String,
    /// The request was written (so the upstream may have acted on it).
    written: bool,
    /// Something came back.
    answered: bool,
}

/// Sends `request` on a pooled connection (or a new one) and reads the final response head into `s`; a request the
/// upstream cannot have acted on goes once more on a new connection ([`may_retry`]).
pub(super) async fn round_trip(
    (client, now): (&UpstreamClient, Instant),
    authority: &Authority,
    slot: &mut Option<PlainConnection>,
    request: &[u8],
    idempotent: bool,
    (reply, retried): (&ReplyTo<'_>, &mut bool),
    s: &mut Buffers<'_>,
) -> Result<ResponseHead, String> {
    *retried = false;
    loop {
        let pooled = if *retried { None } else { slot.take().or_else(|| client.checkout(authority, now)) };
        let mut upstream = match pooled {
            Some(upstream) => upstream,
            // Boxed: a new connection is the rarer case, and its future is large.
            None => Box::pin(client.connect(authority)).await.map_err(|e| e.to_string())?,
        };
        s.upstream_input.clear();
        match send_and_read_head(&mut upstream, request, reply, s).await {
            Ok(head) => {
                *slot = Some(upstream);
                return Ok(head);
            }
            Err(failure) => {
                let Failure { written, answered, .. } = failure;
                if !*retried && may_retry(FailedSend { reused: upstream.reused, written, answered, idempotent }) {
                    *retried = true;
                    continue;
                }
                return Err(failure.message);
            }
        }
    }
}

/// The buffers an upstream round trip writes to (a request's scratch space).
pub(super) struct Buffers<'a> {
    /// The response head rewritten for the caller.
    pub(super) response: &'a mut Vec<u8>,
    /// What the upstream sent and was not forwarded yet.
    pub(super) upstream_input: &'a mut BytesMut,
}

/// Reads what the upstream sent next (0 at the end of the stream).
async fn read_more(upstream: &mut PlainConnection, input: &mut BytesMut) -> io::Result<usize> {
    input.reserve(READ_SIZE);
    upstream.stream.read_buf(input).await
}

/// Sends `request` and reads the final response head (1xx heads are skipped), rewriting it for the caller.
async fn send_and_read_head(
    upstream: &mut PlainConnection,
    request: &[u8],
    reply: &ReplyTo<'_>,
    s: &mut Buffers<'_>,
) -> Result<ResponseHead, Failure> {
    let authority = &upstream.authority;
    if let Err(error) = upstream.stream.write_all(request).await {
        let message = format!("sending the request to {authority}: {error}");
        return Err(Failure { message, written: false, answered: false });
    }
    let mut answered = false;
    loop {
        match parse_response(s.upstream_input, reply, s.response) {
            Ok(None) => {}
            Ok(Some((head_len, None))) => {
                s.upstream_input.advance(head_len);
                continue;
            }
            Ok(Some((head_len, Some(head)))) => {
                s.upstream_input.advance(head_len);
                return Ok(head);
            }
            Err(message) => {
                let message = format!("{message} (upstream {})", upstream.authority);
                return Err(Failure { message, written: true, answered: true });
            }
        }
        match read_more(upstream, s.upstream_input).await {
            Ok(0) => {
                let message = format!("{} closed the connection before answering", upstream.authority);
                return Err(Failure { message, written: true, answered });
            }
            Ok(_) => answered = true,
            Err(error) => {
                let message = format!("reading the response of {}: {error}", upstream.authority);
                return Err(Failure { message, written: true, answered });
            }
        }
    }
}

/// Skips the body of a response that will not be forwarded (a 401 before its replay); the upstream connection is
/// kept for the replay only when the whole body is already here.
pub(super) fn discard_body(slot: &mut Option<PlainConnection>, input: &mut BytesMut, head: ResponseHead) {
    let buffered = &input[..];
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
        Some(n) if head.reusable && n == buffered.len() => input.clear(),
        _ => *slot = None,
    }
}

/// Writes the response head (`out`, already rewritten) and copies the body as it comes from `input` and the
/// connection; the upstream connection goes back to the pool when the response is complete and the connection
/// reusable.
pub(super) async fn forward_response<I: AsyncWrite + Unpin>(
    io: &mut I,
    out: &mut Vec<u8>,
    input: &mut BytesMut,
    (slot, client, now): (Option<PlainConnection>, &UpstreamClient, Instant),
    head: ResponseHead,
) -> Outcome {
    let status = head.status;
    let Some(mut upstream) = slot else { return Outcome::Broken { status } };
    let complete = match head.framing {
        Framing::Empty => io.write_all(out).await.is_ok(),
        Framing::Length(length) => copy_length(io, out, &mut upstream, input, length).await,
        Framing::Chunked(scanner) => copy_chunked(io, out, &mut upstream, input, scanner).await,
        Framing::UntilClose => {
            copy_until_close(io, out, &mut upstream, input).await;
            return Outcome::Answered { status, open: false };
        }
    };
    if !complete {
        return Outcome::Broken { status };
    }
    if head.reusable && input.is_empty() {
        client.checkin(upstream, now);
    }
    Outcome::Answered { status, open: !head.close }
}

/// Copies a `Content-Length` body; false when either side failed before its end.
async fn copy_length<I: AsyncWrite + Unpin>(
    io: &mut I,
    out: &mut Vec<u8>,
    up: &mut PlainConnection,
    input: &mut BytesMut,
    length: u64,
) -> bool {
    let mut remaining = length;
    // The first part of the body goes with the head, in one write.
    let take = |buffered: usize, remaining: u64| usize::try_from(remaining).map_or(buffered, |r| r.min(buffered));
    let first = take(input.len(), remaining);
    out.extend_from_slice(&input[..first]);
    input.advance(first);
    remaining -= first as u64;
    if io.write_all(out).await.is_err() {
        return false;
    }
    while remaining > 0 {
        match read_more(up, input).await {
            Ok(n) if n > 0 => {}
            _ => return false,
        }
        let n = take(input.len(), remaining);
        if io.write_all(&input[..n]).await.is_err() {
            return false;
        }
        input.advance(n);
        remaining -= n as u64;
    }
    true
}

/// Copies a chunked body as it is, up to its last chunk and trailers; false when either side failed before.
async fn copy_chunked<I: AsyncWrite + Unpin>(
    io: &mut I,
    out: &mut Vec<u8>,
    up: &mut PlainConnection,
    input: &mut BytesMut,
    mut scanner: ChunkedScanner,
) -> bool {
    let mut first = true;
    loop {
        let buffered = &input[..];
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
        input.advance(n);
        if done {
            return true;
        }
        match read_more(up, input).await {
            Ok(n) if n > 0 => {}
            _ => return false,
        }
    }
}

/// Copies a body that ends when the upstream closes the connection.
async fn copy_until_close<I: AsyncWrite + Unpin>(
    io: &mut I,
    out: &mut Vec<u8>,
    up: &mut PlainConnection,
    input: &mut BytesMut,
) {
    out.extend_from_slice(input);
    input.clear();
    if io.write_all(out).await.is_err() {
        return;
    }
    loop {
        match read_more(up, input).await {
            Ok(n) if n > 0 => {}
            _ => return,
        }
        if io.write_all(input).await.is_err() {
            return;
        }
        input.clear();
    }
}
