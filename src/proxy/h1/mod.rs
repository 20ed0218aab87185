//! The HTTP/1.1 wire format (RFC 9112): request and response heads parsed with `httparse`, message framing decided
//! with hyper's rules ([`framing`], [`chunked`]), and upstream requests and caller responses encoded.
//!
//! Framing headers are always derived from the parsed message and written here, never copied from a peer, and a
//! header listed in `Connection` can never remove `Content-Length`, `Transfer-Encoding` or `Host`. The connection
//! driver that uses this ([`connection`]) does I/O only; the request's phases are the proxy's ([`super::Proxy`]).

pub mod chunked;
pub mod connection;
pub mod framing;
mod round_trip;
pub mod vet;

use bytes::{Bytes, BytesMut};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, Version};

use self::chunked::ChunkedScanner;
use self::framing::{FramingError, FramingFields};
use super::headers::{connection_lists, forwarded, response_length};
use super::{Answer, Credential};
use crate::token::dpop::DPOP;

/// A request head larger than this goes to hyper (which refuses heads beyond its own, larger, limit).
pub const MAX_HEAD: usize = 64 * 1024;
/// Request bodies up to this size (and up to `replay_buffer`) are read whole before the request goes upstream.
pub const MAX_BODY: usize = 64 * 1024;
/// An upstream response head larger than this is refused.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Headers per message, as hyper allows.
pub const MAX_HEADERS: usize = 100;

/// Room for [`MAX_HEADERS`] parsed headers, left uninitialised: httparse writes the ones it parses, and filling
/// 100 empty headers first cost a few hundred instructions per message.
#[inline]
pub(crate) fn uninit_headers<'b>() -> [std::mem::MaybeUninit<httparse::Header<'b>>; MAX_HEADERS] {
    [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS]
}

/// A request head parsed from the caller's buffer, as far as the connection driver needs it besides its `Parts`.
#[derive(Debug)]
pub struct RequestHead {
    /// The head's bytes (split off the buffer): the URI and the header values are slices of it.
    pub head: Bytes,
    /// The body's length (0 without `Content-Length`).
    pub body_len: usize,
    /// The caller sent a `Content-Length` (then the upstream gets one too, even for an empty body).
    pub has_length: bool,
    /// The caller asked to close the connection after this request.
    pub close: bool,
}

/// The outcome of parsing a request head.
#[derive(Debug)]
pub enum Parse {
    /// A complete head of the shape this transport serves.
    Complete(RequestHead),
    /// More bytes are needed.
    Partial,
    /// Not for this transport: hyper takes the connection from here, reading these bytes (if any were split off the
    /// buffer) first. HTTP/1.0, chunked bodies, bodies over [`MAX_BODY`], `Expect`, upgrades, absolute-form and
    /// `*` targets, CONNECT, and heads `httparse` refuses (hyper answers those 400 itself).
    Handoff(Bytes),
    /// A request HTTP/1.1 forbids, or one another hop could frame differently: 400, and the connection closes, since
    /// where the next request would start is not known.
    Refuse(String),
}

/// Where a header's name and value are in the head.
pub type Span = (std::ops::Range<usize>, std::ops::Range<usize>);

/// Parses one request head at the start of `input` into `parts`. On `Complete` the head is split off `input`.
/// `parts` keeps its header map's memory from request to request, and `spans` is scratch space: a request then costs
/// no allocation here (bar header names outside the standard ones, which `http` allocates).
pub fn parse_request(input: &mut BytesMut, parts: &mut Parts, spans: &mut Vec<Span>) -> Parse {
    let (head_len, method, path, body_len, close) = {
        let mut headers = uninit_headers();
        let mut request = httparse::Request::new(&mut []);
        let head_len = match request.parse_with_uninit_headers(input, &mut headers) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if input.len() < MAX_HEAD => return Parse::Partial,
            _ => return Parse::Handoff(Bytes::new()),
        };
        // A line ended by a bare LF: `httparse` (and hyper's parser) accept it, but a server in front of tokenproxy
        // that does not may see another message. Stricter than RFC 9112 §2.2 requires; what hyper reads is held to
        // the same rule ([`vet`]).
        if has_bare_lf(&input[..head_len]) {
            return Parse::Refuse("a header line ends in a bare LF".into());
        }
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
            framing.add(name, header.value);
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
        let length = match request_body(&framing, hosts) {
            Ok(RequestBody::Length(length)) => length,
            // A chunked body: hyper decodes it and frames it again for the upstream.
            Ok(RequestBody::Chunked) => return Parse::Handoff(Bytes::new()),
            Err(reason) => return Parse::Refuse(reason),
        };
        let body_len = match length.map(usize::try_from) {
            None => None,
            Some(Ok(n)) if n <= MAX_BODY && !other_shape => Some(n),
            // Too large to be read whole, or announced with `Expect` / an upgrade: hyper's.
            Some(_) => return Parse::Handoff(Bytes::new()),
        };
        if other_shape {
            return Parse::Handoff(Bytes::new());
        }
        (head_len, method, span(path.as_bytes()), body_len, close)
    };
    let head = input.split_to(head_len).freeze();
    let Ok(uri) = Uri::from_maybe_shared(head.slice(path)) else { return Parse::Handoff(head) };
    // Usually empty already (the connection driver clears it after each request): clearing a header map costs a pass
    // over its table even then.
    if !parts.headers.is_empty() {
        parts.headers.clear();
    }
    for (name, value) in spans.iter() {
        let Ok(name) = HeaderName::from_bytes(&head[name.clone()]) else {
            return Parse::Handoff(head);
        };
        let value = head.slice(value.clone());
        debug_assert!(HeaderValue::from_bytes(&value).is_ok(), "httparse let through {value:?}");
        // SAFETY: httparse accepted these bytes as a field value: tab, 0x20-0x7e and 0x80-0xff only, the very set
        // `HeaderValue` checks for (`tests::httparse_and_header_value_accept_the_same_bytes` holds both to it).
        let value = unsafe { HeaderValue::from_maybe_shared_unchecked(value) };
        parts.headers.append(name, value);
    }
    parts.method = method;
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    Parse::Complete(RequestHead { head, body_len: body_len.unwrap_or(0), has_length: body_len.is_some(), close })
}

/// How a request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestBody {
    /// By `Content-Length` (`None`: the request has none, so no body).
    Length(Option<u64>),
    /// By chunked coding.
    Chunked,
}

/// The verdict on a request head's framing, from its framing fields and its number of `Host` fields: how its body
/// is delimited, or why HTTP/1.1 forbids it (two `Host`s, `Content-Length` with `Transfer-Encoding`, a last coding
/// other than chunked, a bad or conflicting length). One rule for both transports: the h1 transport's parser
/// and [`vet`], which holds hyper's HTTP/1.1 input to it.
#[inline]
pub fn request_body(framing: &FramingFields, hosts: usize) -> Result<RequestBody, String> {
    if hosts > 1 {
        return Err("more than one Host header".into());
    }
    if framing.has_transfer_encoding() {
        if framing.has_length() {
            return Err(FramingError::LengthWithTransferEncoding.to_string());
        }
        if !framing.chunked() {
            return Err(FramingError::NotChunked.to_string());
        }
        return Ok(RequestBody::Chunked);
    }
    framing.length().map(RequestBody::Length).map_err(|error| error.to_string())
}

/// Whether a line of `head` ends in LF without CR.
fn has_bare_lf(head: &[u8]) -> bool {
    head.iter().enumerate().any(|(i, &b)| b == b'\n' && (i == 0 || head[i - 1] != b'\r'))
}

/// An upstream request: what [`encode_request`] writes.
pub struct UpstreamRequest<'a> {
    /// The method.
    pub method: &'a Method,
    /// The origin-form target (path and query).
    pub target: &'a str,
    /// The prepared headers (framing headers among them are not copied).
    pub headers: &'a HeaderMap,
    /// The headers that carry the token, written instead of any header of those names in `headers`.
    pub credential: Option<Credential<'a>>,
    /// The body, read whole.
    pub body: &'a [u8],
    /// The caller framed the body with `Content-Length`.
    pub has_length: bool,
}

/// Writes an upstream request: the request line and the prepared headers, the token, the framing, the body.
///
/// `Content-Length` is written from the body actually read, and no framing header of the prepared head is copied:
/// a header the caller listed in `Connection` can never leave a body unframed, which would let the upstream read it
/// as a second request (request smuggling).
pub fn encode_request(out: &mut Vec<u8>, request: &UpstreamRequest<'_>) {
    out.clear();
    out.extend_from_slice(request.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(request.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let credential_name = request.credential.as_ref().map(|credential| credential.name);
    let proof = request.credential.as_ref().and_then(|credential| credential.proof.as_ref());
    for (name, value) in request.headers {
        if Some(name) == credential_name
            || (proof.is_some() && name == DPOP)
            || name == http::header::CONTENT_LENGTH
            || name == http::header::TRANSFER_ENCODING
        {
            continue;
        }
        put_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if let Some(credential) = &request.credential {
        put_header(out, credential.name.as_str().as_bytes(), credential.value.as_bytes());
    }
    if let Some(proof) = proof {
        put_header(out, DPOP.as_str().as_bytes(), proof.as_bytes());
    }
    if request.has_length || !request.body.is_empty() {
        put_header(out, b"content-length", itoa::Buffer::new().format(request.body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(request.body);
}

/// Writes one header line.
pub fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    let line = name.len() + value.len() + 4;
    out.reserve(line);
    let start = out.len();
    // SAFETY: `reserve` made room for `line` more bytes after `start`; the four copies below write exactly those
    // bytes (none of the sources is `out` itself: it is borrowed mutably), so every byte up to the new length is
    // initialised when the length is set.
    unsafe {
        let at = out.as_mut_ptr().add(start);
        std::ptr::copy_nonoverlapping(name.as_ptr(), at, name.len());
        std::ptr::copy_nonoverlapping(b": ".as_ptr(), at.add(name.len()), 2);
        std::ptr::copy_nonoverlapping(value.as_ptr(), at.add(name.len() + 2), value.len());
        std::ptr::copy_nonoverlapping(b"\r\n".as_ptr(), at.add(name.len() + 2 + value.len()), 2);
        out.set_len(start + line);
    }
}

/// Writes a status line.
pub fn put_status_line(out: &mut Vec<u8>, status: StatusCode, reason: Option<&str>) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().or(reason).unwrap_or("Unknown").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// What the response to a request depends on.
pub struct ReplyTo<'a> {
    /// The request's id, sent back in `x-request-id`.
    pub request_id: &'a HeaderValue,
    /// Close the caller's connection after this response.
    pub close: bool,
    /// A HEAD request: no body in the response, whatever its headers say.
    pub head_request: bool,
}

/// Ends a response head with the proxy's own headers.
fn put_own_headers(out: &mut Vec<u8>, reply: &ReplyTo<'_>, close: bool) {
    put_header(out, super::X_REQUEST_ID.as_str().as_bytes(), reply.request_id.as_bytes());
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes one of the proxy's own answers (a problem+json head and body).
pub fn encode_error(out: &mut Vec<u8>, head: &http::response::Parts, body: &[u8], reply: &ReplyTo<'_>) {
    out.clear();
    put_status_line(out, head.status, None);
    for (name, value) in &head.headers {
        put_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    put_header(out, b"content-length", itoa::Buffer::new().format(body.len()).as_bytes());
    put_own_headers(out, reply, reply.close);
    if !reply.head_request {
        out.extend_from_slice(body);
    }
}

/// How an upstream response's body ends.
#[derive(Debug)]
pub enum Framing {
    /// No body (HEAD, 204, 304, or `Content-Length: 0`).
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// A chunked body, passed through as it is.
    Chunked(ChunkedScanner),
    /// Until the upstream closes the connection.
    UntilClose,
}

/// An upstream response head, already rewritten for the caller into the response buffer.
#[derive(Debug)]
pub struct ResponseHead {
    /// The status.
    pub status: StatusCode,
    /// How its body ends.
    pub framing: Framing,
    /// The upstream connection can take another request once the body is read.
    pub reusable: bool,
    /// The caller's connection ends after this response.
    pub close: bool,
    /// What the status decision looks at.
    pub answer: Answer,
}

/// A parsed upstream response head: a 1xx to skip, or the final head.
pub type ParsedResponse = Option<(usize, Option<ResponseHead>)>;

/// Parses an upstream response head: `None` while incomplete; the head's length, with `None` for a 1xx to skip, or
/// the final head (then rewritten for the caller into `out`).
pub fn parse_response(input: &[u8], reply: &ReplyTo<'_>, out: &mut Vec<u8>) -> Result<ParsedResponse, String> {
    let mut headers = uninit_headers();
    let mut response = httparse::Response::new(&mut []);
    let head_len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        input,
        &mut headers,
    ) {
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
    let mut answer = Answer::new(status);
    for header in headers {
        fields.add(header.name.as_bytes(), header.value);
        answer.observe(header.name.as_bytes(), header.value);
    }
    // Transfer-Encoding overrides Content-Length (RFC 9112 §6.3): a length is only checked without it.
    let stated = if fields.has_transfer_encoding() {
        None
    } else {
        fields.length().map_err(|e| format!("{e} in the response"))?
    };
    let bodiless = reply.head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let framing = if bodiless {
        Framing::Empty
    } else if fields.has_transfer_encoding() {
        // Transfer-Encoding overrides Content-Length (RFC 9112 §6.3), which is then not forwarded.
        if fields.chunked() {
            Framing::Chunked(ChunkedScanner::new())
        } else {
            Framing::UntilClose
        }
    } else {
        match stated {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    let until_close = matches!(framing, Framing::UntilClose);
    // Both lengths at once may be an attempt at response splitting: the connection is not used again.
    let ambiguous = fields.has_transfer_encoding() && fields.has_length();
    let reusable =
        response.version == Some(1) && !connection_lists(connection(), b"close") && !until_close && !ambiguous;
    let close = reply.close || until_close;
    out.clear();
    put_status_line(out, status, response.reason);
    for header in headers {
        let name = header.name.as_bytes();
        let ours = name.eq_ignore_ascii_case(b"content-length")
            || name.eq_ignore_ascii_case(super::X_REQUEST_ID.as_str().as_bytes());
        // `Connection` is looked at only when the response has one (rarely), and only for headers still in question.
        if !ours && forwarded(name, header.value, has_connection && connection_lists(connection(), name)) {
            put_header(out, name, header.value);
        }
    }
    // The framing headers, ours: derived from the framing above.
    let body = match framing {
        Framing::Length(n) => Some(n),
        Framing::Empty => Some(0),
        Framing::Chunked(_) | Framing::UntilClose => None,
    };
    if let Some(length) = response_length(status, reply.head_request, stated, body) {
        put_header(out, b"content-length", itoa::Buffer::new().format(length).as_bytes());
    }
    if fields.has_transfer_encoding() && status != StatusCode::NO_CONTENT {
        // The codings as the upstream listed them: the body passes through still coded.
        for header in headers.iter().filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding")) {
            put_header(out, b"transfer-encoding", header.value);
        }
    }
    put_own_headers(out, reply, close);
    Ok(Some((head_len, Some(ResponseHead { status, framing, reusable, close, answer }))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn httparse_and_header_value_accept_the_same_bytes() {
        // parse_request builds header values unchecked from what httparse accepted: the two must agree on every
        // byte, alone and inside a value.
        for byte in 0..=255u8 {
            if byte == b'\r' || byte == b'\n' {
                continue;
            }
            // Short, and long enough for httparse's vectorised scan, the byte at its start, middle and end.
            for (before, after) in [(1, 1), (40, 40), (70, 3)] {
                let value = [&vec![b'a'; before][..], &[byte], &vec![b'b'; after]].concat();
                let message = [&b"GET / HTTP/1.1\r\nx: "[..], &value, b"\r\n\r\n"].concat();
                let mut headers = [httparse::EMPTY_HEADER; 4];
                let parsed = httparse::Request::new(&mut headers).parse(&message).map(|s| s.is_complete());
                let accepted = HeaderValue::from_bytes(&value).is_ok();
                assert_eq!(parsed == Ok(true), accepted, "byte {byte:#04x} after {before} bytes");
            }
        }
    }

    #[test]
    fn a_header_line_is_written_whole_whatever_room_the_buffer_has() {
        for capacity in [0, 1, 7, 64] {
            for (name, value) in [(&b"x"[..], &b""[..]), (b"content-length", b"42"), (b"authorization", &[b'a'; 300])] {
                let mut out = Vec::with_capacity(capacity);
                out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
                put_header(&mut out, name, value);
                put_header(&mut out, b"via", b"1.1 tokenproxy");
                let expected = [b"HTTP/1.1 200 OK\r\n", name, b": ", value, b"\r\nvia: 1.1 tokenproxy\r\n"].concat();
                assert_eq!(out, expected);
            }
        }
    }

    fn parse(bytes: &[u8]) -> (Parse, Parts, BytesMut) {
        let mut input = BytesMut::from(bytes);
        let (mut parts, ()) = http::Request::new(()).into_parts();
        let parse = parse_request(&mut input, &mut parts, &mut Vec::new());
        (parse, parts, input)
    }

    fn parsed(bytes: &[u8]) -> (RequestHead, Parts, BytesMut) {
        match parse(bytes) {
            (Parse::Complete(parsed), parts, rest) => (parsed, parts, rest),
            (other, ..) => panic!("{other:?}: {}", bytes.escape_ascii()),
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
    fn an_incomplete_head_waits_for_more() {
        for bytes in [&b""[..], b"GET / HTTP/1.1\r\n", b"GET / HTTP/1.1\r\nHost: a\r\n\r"] {
            assert!(matches!(parse(bytes).0, Parse::Partial), "{}", bytes.escape_ascii());
        }
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
            b"GET / HTTP/1.1\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\n\n",
        ] {
            assert!(matches!(parse(bytes).0, Parse::Refuse(_)), "{}", bytes.escape_ascii());
        }
        let (request, ..) = parsed(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx");
        assert_eq!((request.body_len, request.has_length), (1, true), "identical lengths are one length");
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
            b"GET / HTTP/1.1\r\nX-Folded: a\r\n b\r\n\r\n",
            b"GET / HTTP/1.1\r\nX-Nul: a\0b\r\n\r\n",
            b"\x16\x03\x01\x02\x00",
            many_headers.as_bytes(),
            huge_head.as_bytes(),
        ] {
            let (parse, _, rest) = parse(bytes);
            let Parse::Handoff(head) = parse else { panic!("not handed off: {}", bytes.escape_ascii()) };
            assert_eq!([&head[..], &rest[..]].concat(), bytes, "every byte goes to hyper");
        }
    }

    #[test]
    fn the_upstream_request_is_framed_from_the_body_read() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("up:80"));
        headers.insert("content-length", HeaderValue::from_static("999"));
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        headers.insert("authorization", HeaderValue::from_static("Basic caller"));
        let token = HeaderValue::from_static("Bearer ours");
        let request = UpstreamRequest {
            method: &Method::POST,
            target: "/x?y=1",
            headers: &headers,
            credential: Some(Credential { name: &http::header::AUTHORIZATION, value: token, proof: None }),
            body: b"hello",
            has_length: true,
        };
        let mut out = Vec::new();
        encode_request(&mut out, &request);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /x?y=1 HTTP/1.1\r\nhost: up:80\r\nauthorization: Bearer ours\r\ncontent-length: 5\r\n\r\nhello"
        );
        let mut out = Vec::new();
        let empty = UpstreamRequest { body: b"", has_length: false, credential: None, ..request };
        encode_request(&mut out, &empty);
        assert!(
            !String::from_utf8(out).unwrap().contains("content-length"),
            "no body, no length unless the caller sent one"
        );
    }

    fn reply(request_id: &HeaderValue, head_request: bool) -> ReplyTo<'_> {
        ReplyTo { request_id, close: false, head_request }
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
        // HEAD and 304 keep the length of the representation.
        let (head, _) = response(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 42\r\n\r\n", false).expect("valid");
        assert!(head.contains("content-length: 42\r\n"), "{head}");
        let (head, _) = response(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", true).expect("valid");
        assert!(head.contains("content-length: 1234\r\n"), "{head}");
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
            b"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            assert!(response(bytes, false).is_err(), "{}", bytes.escape_ascii());
        }
    }
}
