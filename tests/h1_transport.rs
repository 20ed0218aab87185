//! The proxy's HTTP/1.1 wire behaviour, pinned at the byte and TCP level so that a rewrite of the HTTP/1.1 path
//! can be checked against it.
//!
//! Both ends are raw TCP written here: the caller is a [`RawClient`] that writes exact bytes and parses what comes
//! back (status, headers, and a body framed by Content-Length, chunked coding or the end of the connection), and
//! the upstream is a [`RawUpstream`] that answers with scripted bytes and records each request as it came off the
//! wire (request line, headers, body, and which upstream TCP connection carried it).
//!
//! What is pinned is what a client or an upstream relies on: keep-alive and pipelining on one client connection,
//! one upstream connection per client connection, message framing both ways (Content-Length, chunked with
//! extensions and trailers, close-delimited, HEAD, 204, 304, 1xx), the headers the proxy adds, strips and injects,
//! the one replay after a 401, the proxy's own errors, and the cases the fast path hands to hyper (HTTP/1.0,
//! chunked request bodies, `Expect: 100-continue`, bodies larger than the replay buffer). Not pinned: header case
//! and order, reason phrases, `Date`, and whether 1xx responses are forwarded.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{FakeIdp, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Upper bound of every wait in these tests; each wait normally takes milliseconds.
const WAIT: Duration = Duration::from_secs(5);

/// The Host header the raw client sends (any host matches the host-less routes used here).
const CLIENT_HOST: &str = "localhost";

// ---------------------------------------------------------------------------------------------------------------
// HTTP/1.1 message parsing shared by both raw ends
// ---------------------------------------------------------------------------------------------------------------

/// A message head as it came off the wire: the start line and the header fields in order, names as sent.
#[derive(Clone, Debug)]
struct Head {
    start: String,
    fields: Vec<(String, String)>,
}

impl Head {
    fn parse(bytes: &[u8]) -> Head {
        let text = std::str::from_utf8(bytes).unwrap_or_else(|_| panic!("a head that is not UTF-8: {bytes:?}"));
        let mut lines = text.split("\r\n");
        let start = lines.next().unwrap_or_default().to_owned();
        let fields = lines
            .filter(|line| !line.is_empty())
            .map(|line| {
                let (name, value) = line.split_once(':').unwrap_or_else(|| panic!("a malformed header line: {line:?}"));
                (name.to_owned(), value.trim().to_owned())
            })
            .collect();
        Head { start, fields }
    }

    /// The first value of header `name` (case-insensitive).
    fn get(&self, name: &str) -> Option<&str> {
        self.fields.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (case-insensitive), in order.
    fn all(&self, name: &str) -> Vec<&str> {
        self.fields.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
    }

    /// Whether `Transfer-Encoding` ends in `chunked`.
    fn is_chunked(&self) -> bool {
        self.all("transfer-encoding")
            .iter()
            .flat_map(|v| v.split(','))
            .last()
            .is_some_and(|coding| coding.trim().eq_ignore_ascii_case("chunked"))
    }

    fn content_length(&self) -> Option<usize> {
        self.get("content-length").map(|v| v.parse().unwrap_or_else(|_| panic!("a bad Content-Length: {v:?}")))
    }
}

/// A TCP stream with a read buffer: reads heads, lines and bodies, keeping what follows for the next message.
struct Wire {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Wire {
    fn new(stream: TcpStream) -> Wire {
        Wire { stream, buf: Vec::with_capacity(16 * 1024) }
    }

    /// Reads more into the buffer; 0 at the end of the stream (a reset counts as an end).
    async fn fill(&mut self) -> usize {
        self.buf.reserve(64 * 1024);
        match self.stream.read_buf(&mut self.buf).await {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
            Err(e) => panic!("read failed: {e}"),
        }
    }

    /// The next head, or `None` when the stream ends cleanly before one starts.
    async fn read_head(&mut self) -> Option<Head> {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = Head::parse(&self.buf[..end]);
                self.buf.drain(..end + 4);
                return Some(head);
            }
            if self.fill().await == 0 {
                assert!(
                    self.buf.is_empty(),
                    "the stream ended inside a head: {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
                return None;
            }
        }
    }

    async fn read_line(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 2);
                return line;
            }
            assert!(self.fill().await > 0, "the stream ended inside a line");
        }
    }

    async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.fill().await > 0, "the stream ended after {} of {n} body bytes", self.buf.len());
        }
        self.buf.drain(..n).collect()
    }

    /// A chunked body, decoded: its data and its trailer fields.
    async fn read_chunked(&mut self) -> (Vec<u8>, Vec<(String, String)>) {
        let mut body = Vec::new();
        loop {
            let line = self.read_line().await;
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16).unwrap_or_else(|_| panic!("a bad chunk-size line: {line:?}"));
            if size == 0 {
                break;
            }
            body.extend(self.read_exact(size).await);
            assert_eq!(self.read_exact(2).await, b"\r\n", "a chunk not followed by CRLF");
        }
        let mut trailers = Vec::new();
        loop {
            let line = self.read_line().await;
            if line.is_empty() {
                return (body, trailers);
            }
            let (name, value) = line.split_once(':').unwrap_or_else(|| panic!("a bad trailer line: {line:?}"));
            trailers.push((name.to_owned(), value.trim().to_owned()));
        }
    }

    async fn read_to_end(&mut self) -> Vec<u8> {
        while self.fill().await > 0 {}
        std::mem::take(&mut self.buf)
    }
}

/// `pieces` in chunked coding, each piece one chunk, then the last chunk (no trailers).
fn chunked(pieces: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in pieces {
        out.extend(format!("{:x}\r\n", piece.len()).as_bytes());
        out.extend(*piece);
        out.extend(b"\r\n");
    }
    out.extend(b"0\r\n\r\n");
    out
}

/// `len` bytes of a pattern that shows shifted, dropped or repeated bytes.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

// ---------------------------------------------------------------------------------------------------------------
// The raw upstream: scripted answers, a record of what it received
// ---------------------------------------------------------------------------------------------------------------

/// One request as the raw upstream read it.
#[derive(Clone, Debug)]
struct Received {
    /// Which accepted upstream connection carried it (1, 2, …).
    connection: usize,
    head: Head,
    /// The body, decoded when it came chunked.
    body: Vec<u8>,
}

impl Received {
    /// The request line, e.g. `GET /x HTTP/1.1`.
    fn request_line(&self) -> &str {
        &self.head.start
    }

    fn target(&self) -> &str {
        self.head.start.split(' ').nth(1).unwrap_or_default()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.get(name)
    }
}

/// What the raw upstream writes back for one request.
struct Answer {
    bytes: Vec<u8>,
    /// Close the connection after writing (without saying so, unless `bytes` does).
    close: bool,
}

impl Answer {
    /// Exactly these bytes.
    fn raw(bytes: impl Into<Vec<u8>>) -> Answer {
        Answer { bytes: bytes.into(), close: false }
    }

    /// `status_line` (e.g. `HTTP/1.1 200 OK`), `headers`, and `body` with its Content-Length.
    fn with_length(status_line: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
        let mut bytes = format!("{status_line}\r\n").into_bytes();
        for (name, value) in headers {
            bytes.extend(format!("{name}: {value}\r\n").as_bytes());
        }
        bytes.extend(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
        bytes.extend(body);
        Answer::raw(bytes)
    }

    /// 200 with a text body.
    fn ok(body: impl AsRef<[u8]>) -> Answer {
        Answer::with_length("HTTP/1.1 200 OK", &[("Content-Type", "text/plain")], body.as_ref())
    }

    fn then_close(mut self) -> Answer {
        self.close = true;
        self
    }
}

type Script = Arc<dyn Fn(&Received) -> Answer + Send + Sync>;

/// A raw HTTP/1.1 upstream on 127.0.0.1:0.
struct RawUpstream {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    connections: Arc<AtomicUsize>,
    /// The ids of connections this upstream closed (after an answer with `close`, or at the peer's end).
    closed: mpsc::UnboundedReceiver<usize>,
    accept: tokio::task::JoinHandle<()>,
}

impl RawUpstream {
    /// Answers every request with `script`; a request announcing `Expect: 100-continue` gets `100 Continue` first.
    async fn start(script: impl Fn(&Received) -> Answer + Send + Sync + 'static) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
        let addr = listener.local_addr().expect("local addr");
        let received = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (closed_tx, closed) = mpsc::unbounded_channel();
        let script: Script = Arc::new(script);
        let (log, count) = (Arc::clone(&received), Arc::clone(&connections));
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let id = count.fetch_add(1, Ordering::SeqCst) + 1;
                let (script, log, closed_tx) = (Arc::clone(&script), Arc::clone(&log), closed_tx.clone());
                tokio::spawn(async move {
                    serve_upstream_connection(Wire::new(stream), id, script, log).await;
                    let _ = closed_tx.send(id);
                });
            }
        });
        RawUpstream { addr, received, connections, closed, accept }
    }

    /// Answers every request 200 with the body `METHOD TARGET`.
    async fn echo_target() -> RawUpstream {
        RawUpstream::start(|r| Answer::ok(r.request_line().rsplit_once(' ').map_or("", |(m, _)| m))).await
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far, in order.
    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Upstream TCP connections accepted so far.
    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Waits until this upstream has closed a connection, and returns its id.
    async fn wait_closed(&mut self) -> usize {
        tokio::time::timeout(WAIT, self.closed.recv()).await.expect("an upstream connection closed").expect("open")
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn serve_upstream_connection(mut wire: Wire, id: usize, script: Script, log: Arc<Mutex<Vec<Received>>>) {
    while let Some(head) = wire.read_head().await {
        let expects_continue = head.get("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
        if expects_continue && wire.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err() {
            return;
        }
        let body = if head.is_chunked() {
            wire.read_chunked().await.0
        } else {
            let length = head.content_length().unwrap_or(0);
            wire.read_exact(length).await
        };
        let request = Received { connection: id, head, body };
        let answer = script(&request);
        log.lock().unwrap().push(request);
        if wire.stream.write_all(&answer.bytes).await.is_err() || answer.close {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The raw client
// ---------------------------------------------------------------------------------------------------------------

/// How a response's body was delimited on the wire.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Framing {
    /// No body by the rules (HEAD, 204, 304).
    Bodiless,
    ContentLength,
    Chunked,
    /// Read until the proxy closed the connection.
    Close,
}

/// A response as the raw client read it.
#[derive(Debug)]
struct Reply {
    /// e.g. `HTTP/1.1`.
    version: String,
    status: u16,
    head: Head,
    body: Vec<u8>,
    trailers: Vec<(String, String)>,
    framing: Framing,
    /// Statuses of the 1xx responses that came before this one.
    interim: Vec<u16>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.get(name)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts this is one of the proxy's own problem+json errors with `code`.
    fn assert_problem(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{}", self.text());
        assert_eq!(self.header("content-type"), Some("application/problem+json"));
        assert_eq!(self.header("x-tokenproxy-error"), Some(code));
        let body: serde_json::Value = serde_json::from_slice(&self.body).expect("a JSON problem body");
        assert_eq!(body["code"], code);
        assert_eq!(body["status"], status);
        assert_eq!(body["type"], format!("urn:tokenproxy:error:{code}"));
    }
}

/// A GET request for `path` with `extra` header lines (each ending in CRLF).
fn get(path: &str, extra: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {CLIENT_HOST}\r\n{extra}\r\n").into_bytes()
}

/// A request with a Content-Length body.
fn with_body(method: &str, path: &str, extra: &str, body: &[u8]) -> Vec<u8> {
    let mut bytes =
        format!("{method} {path} HTTP/1.1\r\nHost: {CLIENT_HOST}\r\nContent-Length: {}\r\n{extra}\r\n", body.len())
            .into_bytes();
    bytes.extend(body);
    bytes
}

/// A raw HTTP/1.1 connection to the proxy.
struct RawClient {
    wire: Wire,
}

impl RawClient {
    async fn connect(proxy: &Proxy) -> RawClient {
        let stream =
            tokio::time::timeout(WAIT, TcpStream::connect(proxy.addr)).await.expect("connect").expect("connect");
        RawClient { wire: Wire::new(stream) }
    }

    async fn send(&mut self, bytes: &[u8]) {
        tokio::time::timeout(WAIT, self.wire.stream.write_all(bytes)).await.expect("write in time").expect("write");
    }

    /// Sends `request` and reads the response to it (`method` tells whether a body can follow).
    async fn exchange(&mut self, method: &str, request: &[u8]) -> Reply {
        self.send(request).await;
        self.read_reply(method).await
    }

    /// `GET path` and its response.
    async fn get(&mut self, path: &str) -> Reply {
        self.exchange("GET", &get(path, "")).await
    }

    /// The next final response (1xx responses before it are recorded in [`Reply::interim`]).
    async fn read_reply(&mut self, method: &str) -> Reply {
        tokio::time::timeout(WAIT, self.read_reply_unbounded(method)).await.expect("a response in time")
    }

    async fn read_reply_unbounded(&mut self, method: &str) -> Reply {
        let mut interim = Vec::new();
        loop {
            let head = self.wire.read_head().await.expect("a response, not the end of the connection");
            let mut start = head.start.splitn(3, ' ');
            let version = start.next().unwrap_or_default().to_owned();
            let status: u16 = start.next().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{:?}", head.start));
            if (100..200).contains(&status) && status != 101 {
                interim.push(status);
                continue;
            }
            let (body, trailers, framing) = if method == "HEAD" || status == 204 || status == 304 {
                (Vec::new(), Vec::new(), Framing::Bodiless)
            } else if head.is_chunked() {
                let (body, trailers) = self.wire.read_chunked().await;
                (body, trailers, Framing::Chunked)
            } else if let Some(length) = head.content_length() {
                (self.wire.read_exact(length).await, Vec::new(), Framing::ContentLength)
            } else {
                (self.wire.read_to_end().await, Vec::new(), Framing::Close)
            };
            return Reply { version, status, head, body, trailers, framing, interim };
        }
    }

    /// Asserts the proxy closes the connection without sending anything more.
    async fn assert_closed(&mut self) {
        let rest = tokio::time::timeout(WAIT, self.wire.read_to_end()).await.expect("the proxy closes the connection");
        assert!(rest.is_empty(), "bytes after the last response: {:?}", String::from_utf8_lossy(&rest));
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Configuration and startup
// ---------------------------------------------------------------------------------------------------------------

/// The provider `api` (client credentials at `idp`).
fn provider(idp: &FakeIdp) -> String {
    format!(
        "[providers.api]\ntoken_url = \"{}\"\nclient_id = \"client-1\"\nclient_secret = \"s3cret-value\"\n",
        idp.token_url()
    )
}

/// A route `name` for `prefix` to `upstream` with a token from `api`, plus `extra` TOML lines.
fn route(name: &str, prefix: &str, upstream: &str, extra: &str) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\nprefix = \"{prefix}\"\nupstream = \"{upstream}\"\nprovider = \"api\"\n{extra}\n"
    )
}

/// The usual setup: route `api`, `/api` → `upstream`, prefix stripped.
fn api_config(idp: &FakeIdp, upstream: &RawUpstream) -> String {
    format!("{}{}", provider(idp), route("api", "/api", &upstream.url(), "strip_prefix = true"))
}

/// Starts tokenproxy with `config` and waits until it holds a token.
async fn start(config: &str) -> Proxy {
    let proxy = Proxy::start(config).await;
    proxy.wait_ready().await;
    proxy
}

/// A fake IdP, an upstream and a proxy routing `/api` to it.
async fn setup(upstream: RawUpstream) -> (FakeIdp, RawUpstream, Proxy) {
    let idp = FakeIdp::start(300).await;
    let proxy = start(&api_config(&idp, &upstream)).await;
    (idp, upstream, proxy)
}

// ---------------------------------------------------------------------------------------------------------------
// Keep-alive, pipelining, forwarding headers
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn keep_alive_requests_share_one_upstream_connection_and_carry_token_and_forwarding_headers() {
    let (_idp, upstream, proxy) = setup(RawUpstream::echo_target().await).await;
    let mut client = RawClient::connect(&proxy).await;

    let first = client.get("/api/one").await;
    let second = client.exchange("GET", &get("/api/two", "X-Request-Id: caller-id-2\r\n")).await;
    let third = client.get("/api/three").await;

    for (reply, body) in [(&first, "GET /one"), (&second, "GET /two"), (&third, "GET /three")] {
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.version, "HTTP/1.1");
        assert_eq!(reply.text(), body);
        assert!(reply.header("x-request-id").is_some_and(|id| !id.is_empty()), "{:?}", reply.head);
    }
    assert_eq!(second.header("x-request-id"), Some("caller-id-2"), "the caller's own request id comes back");
    assert_ne!(first.header("x-request-id"), third.header("x-request-id"));

    let received = upstream.received();
    assert_eq!(received.len(), 3);
    assert_eq!(upstream.connections(), 1, "one upstream connection for one keep-alive client connection");
    let upstream_host = upstream.addr.to_string();
    for (request, line) in received.iter().zip(["GET /one HTTP/1.1", "GET /two HTTP/1.1", "GET /three HTTP/1.1"]) {
        assert_eq!(request.request_line(), line, "origin form, HTTP/1.1");
        assert_eq!(request.head.all("authorization"), ["Bearer tok-1"]);
        assert_eq!(request.head.all("host"), [upstream_host.as_str()]);
        assert_eq!(request.header("x-forwarded-for"), Some("127.0.0.1"));
        assert_eq!(request.header("x-forwarded-proto"), Some("http"));
        assert_eq!(request.header("x-forwarded-host"), Some(CLIENT_HOST));
        assert!(request.header("via").is_some_and(|v| v.contains("1.1 tokenproxy")), "{:?}", request.head);
        assert!(request.header("x-request-id").is_some_and(|id| !id.is_empty()), "{:?}", request.head);
    }
    assert_eq!(received[1].header("x-request-id"), Some("caller-id-2"), "the caller's id goes upstream");
    assert_eq!(received[0].header("x-request-id"), first.header("x-request-id"), "a made id goes both ways");
    proxy.stop().await;
}

#[tokio::test]
async fn pipelined_requests_get_their_responses_in_order() {
    let upstream =
        RawUpstream::start(|r| Answer::ok(format!("{} body={}", r.request_line(), String::from_utf8_lossy(&r.body))))
            .await;
    let (_idp, upstream, proxy) = setup(upstream).await;
    let mut client = RawClient::connect(&proxy).await;

    // Three requests in one write, the middle one with a body.
    let mut burst = get("/api/p1", "");
    burst.extend(with_body("POST", "/api/p2", "Content-Type: text/plain\r\n", b"middle body"));
    burst.extend(get("/api/p3", ""));
    client.send(&burst).await;

    let replies = [client.read_reply("GET").await, client.read_reply("POST").await, client.read_reply("GET").await];
    let expected = ["GET /p1 HTTP/1.1 body=", "POST /p2 HTTP/1.1 body=middle body", "GET /p3 HTTP/1.1 body="];
    for (reply, body) in replies.iter().zip(expected) {
        assert_eq!(reply.status, 200);
        assert_eq!(reply.text(), body);
    }
    let targets: Vec<_> = upstream.received().iter().map(|r| r.target().to_owned()).collect();
    assert_eq!(targets, ["/p1", "/p2", "/p3"]);
    // Still usable afterwards.
    assert_eq!(client.get("/api/p4").await.text(), "GET /p4 HTTP/1.1 body=");
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------------------------
// Response framing
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn chunked_response_with_extensions_and_trailer_arrives_whole_and_the_connection_stays_usable() {
    let upstream = RawUpstream::start(|r| match r.target() {
        "/chunked" => Answer::raw(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n\
             5;name=value\r\nhello\r\n\
             7;flag\r\n, world\r\n\
             1A\r\n and twenty-six more bytes\r\n\
             0\r\nX-Checksum: abc123\r\n\r\n",
        ),
        _ => Answer::ok("after"),
    })
    .await;
    let (_idp, upstream, proxy) = setup(upstream).await;
    let mut client = RawClient::connect(&proxy).await;

    let reply = client.get("/api/chunked").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "hello, world and twenty-six more bytes");
    assert!(
        matches!(reply.framing, Framing::Chunked | Framing::ContentLength),
        "a keep-alive response must be self-delimiting: {:?}",
        reply.framing
    );
    let after = client.get("/api/next").await;
    assert_eq!((after.status, after.text().as_str()), (200, "after"), "the connection is still usable");
    assert_eq!(upstream.connections(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn chunked_response_trailers_reach_a_client_that_accepts_them() {
    let upstream = RawUpstream::start(|_| {
        Answer::raw(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n\
             5\r\nhello\r\n0\r\nX-Checksum: abc123\r\n\r\n",
        )
    })
    .await;
    let (_idp, upstream, proxy) = setup(upstream).await;
    let mut client = RawClient::connect(&proxy).await;

    let reply = client.exchange("GET", &get("/api/with-trailer", "TE: trailers\r\n")).await;
    assert_eq!((reply.status, reply.text().as_str()), (200, "hello"));
    assert_eq!(upstream.received()[0].header("te"), Some("trailers"), "TE: trailers goes upstream");
    assert_eq!(reply.framing, Framing::Chunked, "trailers need the chunked coding");
    let checksum = reply.trailers.iter().find(|(name, _)| name.eq_ignore_ascii_case("x-checksum"));
    assert_eq!(checksum.map(|(_, value)| value.as_str()), Some("abc123"), "{:?}", reply.trailers);
    proxy.stop().await;
}

#[tokio::test]
async fn close_delimited_response_arrives_whole() {
    let body = pattern(100 * 1024);
    let served = body.clone();
    let upstream = RawUpstream::start(move |_| {
        let mut bytes =
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n".to_vec();
        bytes.extend(&served);
        Answer::raw(bytes).then_close()
    })
    .await;
    let (_idp, _upstream, proxy) = setup(upstream).await;
    let mut client = RawClient::connect(&proxy).await;

    let reply = client.get("/api/until-eof").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.len(), body.len());
    assert!(reply.body == body, "the close-delimited body arrives intact");
    // Framed (chunked) and the client connection kept, or close-delimited and the connection ended: both let the
    // client know where the body ends. `read_reply` read a close-delimited body to the end of the connection.
    assert!(matches!(reply.framing, Framing::Chunked | Framing::Close), "{:?}", reply.framing);
    proxy.stop().await;
}

#[tokio::test]
async fn head_response_keeps_its_content_length_without_body_and_the_connection_stays_usable() {
    let upstream = RawUpstream::start(|r| {
        if r.request_line().starts_with("HEAD ") {
            Answer::raw("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1234\r\n\r\n")
        } else {
            Answer::ok("the get")
        }
    })
    .await;
    let (_idp, upstream, proxy) = setup(upstream).await;
    let mut client = RawClient::connect(&proxy).await;

    let head = client.exchange("HEAD", b"HEAD /api/doc HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("1234"), "HEAD keeps the upstream's Content-Length");
    assert!(head.header("transfer-encoding").is_none());
    // No body bytes: the next response must start right after the head.
    let get = client.get("/api/doc").await;
    assert_eq!((get.status, get.text().as_str()), (200, "the get"));
    assert_eq!(upstream.received()[0].request_line(), "HEAD /doc HTTP/1.1");
    proxy.stop().await;
}

#[tokio::test]
async fn no_content_and_not_modified_have_no_body_and_the_connection_stays_usable() {
    let upstream = RawUpstream::start(|r| match r.target() {
        "/204" => Answer::raw("HTTP/1.1 204 No Content\r\nX-Kind: none\r\n\r\n"),
        // A 304 may state the representation's length: it still has no body.
        "/304" => Answer::raw("HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nContent-Length: 42\r\n\r\n"),
        _ => Answer::ok("fine"),
    })
    .await;
    let (_idp, upstream, proxy) = setup(upstream).await;
    let mut client = RawClient::connect(&proxy).await;

    let no_content = client.get("/api/204").await;
    assert_eq!(no_content.status, 204);
    assert_eq!(no_content.header("x-kind"), Some("none"));
    assert!(no_content.header("transfer-encoding").is_none(), "{:?}", no_content.head);
    assert_eq!(client.get("/api/ok").await.text(), "fine");

    let not_modified = client.exchange("GET", &get("/api/304", "If-None-Match: \"v1\"\r\n")).await;
    assert_eq!(not_modified.status, 304);
    assert_eq!(not_modified.header("etag"), Some("\"v1\""));
    assert!(not_modified.header("transfer-encoding").is_none(), "{:?}", not_modified.head);
    assert_eq!(client.get("/api/ok").await.text(), "fine", "nothing was taken for a body");
    assert_eq!(upstream.received()[2].header("if-none-match"), Some("\"v1\""));
    assert_eq!(upstream.connections(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn large_content_length_response_arrives_intact() {
    let body = pattern(1024 * 1024);
    let served = body.clone();
    let upstream =
        RawUpstream::start(move |_| Answer::with_length("HTTP/1.1 200 OK", &[("Content-Type", "x/bin")], &served))
            .await;
    let (_idp, _upstream, proxy) = setup(upstream).await;
    let mut client = RawClient::connect(&proxy).await;

    let reply = client.get("/api/big").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.len(), body.len());
    assert!(reply.body == body, "1 MiB arrives byte for byte");
    assert_eq!(client.get("/api/big").await.body.len(), body.len(), "and again on the same connection");
    proxy.stop().await;
}

#[tokio::test]
async fn large_chunked_response_in_many_chunks_arrives_intact() {
    let body = pattern(1024 * 1024);
    // Chunks of varied sizes (1 byte to ~4 KiB), so that chunk boundaries fall anywhere in the proxy's reads.
    let mut pieces = Vec::new();
    let mut at = 0;
    let mut size = 1;
    while at < body.len() {
        let end = (at + size).min(body.len());
        pieces.push(&body[at..end]);
        at = end;
        size = (size * 7 + 13) % 4093 + 1;
    }
    let mut response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    response.extend(chunked(&pieces));
    let upstream = RawUpstream::start(move |_| Answer::raw(response.clone())).await;
    let (_idp, _upstream, proxy) = setup(upstream).await;
    let mut client = RawClient::connect(&proxy).await;

    let reply = client.get("/api/big-chunked").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.len(), body.len());
    assert!(reply.body == body, "1 MiB in {} chunks arrives byte for byte", pieces.len());
    assert_eq!(client.get("/api/again").await.body.len(), body.len(), "and again on the same connection");
    proxy.stop().await;
}

#[tokio::test]
async fn informational_103_before_the_final_response_is_not_taken_for_it() {
    let upstream = RawUpstream::start(|_| {
        Answer::raw(
            "HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n\
             HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal",
        )
    })
    .await;
    let (_idp, _upstream, proxy) = setup(upstream).await;
    let mut client = RawClient::connect(&proxy).await;

    let reply = client.get("/api/hints").await;
    assert_eq!((reply.status, reply.text().as_str()), (200, "final"));
    assert!(reply.interim.iter().all(|s| *s == 103), "only the upstream's 1xx, if any: {:?}", reply.interim);
    assert_eq!(client.get("/api/hints").await.text(), "final", "the connection is still usable");
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------------------------
// Request bodies and the 401 replay
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn post_body_is_sent_exactly_and_replayed_once_with_a_new_token_after_401() {
    let upstream = RawUpstream::start(|r| match r.header("authorization") {
        Some("Bearer tok-1") => Answer::with_length(
            "HTTP/1.1 401 Unauthorized",
            &[("WWW-Authenticate", "Bearer error=\"invalid_token\""), ("Content-Type", "application/json")],
            br#"{"error":"invalid_token"}"#,
        ),
        auth => Answer::ok(format!("{} bytes with {}", r.body.len(), auth.unwrap_or("nothing"))),
    })
    .await;
    let (idp, upstream, proxy) = setup(upstream).await;
    let mut client = RawClient::connect(&proxy).await;
    let body = pattern(8 * 1024);

    let reply = client.exchange("POST", &with_body("POST", "/api/orders", "Content-Type: x/bin\r\n", &body)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), "8192 bytes with Bearer tok-2", "the client gets the replay's response");
    assert!(reply.header("www-authenticate").is_none(), "nothing of the first answer leaks into the reply");

    let received = upstream.received();
    assert_eq!(received.len(), 2, "one attempt and exactly one replay");
    for (attempt, token) in received.iter().zip(["Bearer tok-1", "Bearer tok-2"]) {
        assert_eq!(attempt.request_line(), "POST /orders HTTP/1.1");
        assert_eq!(attempt.header("authorization"), Some(token));
        assert_eq!(attempt.header("content-type"), Some("x/bin"));
        assert!(attempt.body == body, "the body goes upstream exactly, both times");
    }
    assert_eq!(idp.calls(), 2, "the startup token and one refresh");
    assert_eq!(proxy.metric("tokenproxy_replays_total{outcome=\"success\",route=\"api\"}").await, 1.0);
    assert_eq!(proxy.metric("tokenproxy_upstream_unauthorized_total{route=\"api\"}").await, 1.0);

    let after = client.get("/api/after").await;
    assert_eq!(after.text(), "0 bytes with Bearer tok-2", "the connection is usable after the replay");
    proxy.stop().await;
}

#[tokio::test]
async fn chunked_request_body_reaches_the_upstream_whole() {
    let upstream = RawUpstream::start(|r| Answer::ok(format!("got {} bytes", r.body.len()))).await;
    let (_idp, upstream, proxy) = setup(upstream).await;
    let mut client = RawClient::connect(&proxy).await;

    let mut request =
        format!("POST /api/stream HTTP/1.1\r\nHost: {CLIENT_HOST}\r\nTransfer-Encoding: chunked\r\n\r\n").into_bytes();
    request.extend(b"4;ext=1\r\nabcd\r\n3\r\nefg\r\n");
    request.extend(chunked(&[b"hij", b"klmnop"]));
    let reply = client.exchange("POST", &request).await;
    assert_eq!((reply.status, reply.text().as_str()), (200, "got 16 bytes"));
    assert_eq!(upstream.received()[0].body, b"abcdefghijklmnop");
    assert_eq!(client.get("/api/next").await.status, 200, "the connection is still usable");
    proxy.stop().await;
}

#[tokio::test]
async fn expect_100_continue_gets_100_continue_then_the_response() {
    let upstream = RawUpstream::start(|r| Answer::ok(format!("got {}", String::from_utf8_lossy(&r.body)))).await;
    let (_idp, upstream, proxy) = setup(upstream).await;
    let mut client = RawClient::connect(&proxy).await;

    client
        .send(
            format!(
                "PUT /api/thing HTTP/1.1\r\nHost: {CLIENT_HOST}\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
    // The client holds its body back until told to continue.
    let interim = tokio::time::timeout(WAIT, client.wire.read_head()).await.expect("100 Continue in time");
    let interim = interim.expect("an interim response");
    assert!(interim.start.starts_with("HTTP/1.1 100"), "{:?}", interim.start);
    client.send(b"hello").await;
    let reply = client.read_reply("PUT").await;
    assert_eq!((reply.status, reply.text().as_str()), (200, "got hello"));
    assert_eq!(upstream.received()[0].body, b"hello");
    assert_eq!(client.get("/api/next").await.status, 200, "the connection is still usable");
    proxy.stop().await;
}

#[tokio::test]
async fn body_larger_than_the_replay_buffer_reaches_the_upstream_intact() {
    let upstream = RawUpstream::start(|r| Answer::ok(format!("got {} bytes", r.body.len()))).await;
    let (_idp, upstream, proxy) = setup(upstream).await;
    let mut client = RawClient::connect(&proxy).await;
    let body = pattern(100 * 1024);

    let reply = client.exchange("POST", &with_body("POST", "/api/upload", "", &body)).await;
    assert_eq!((reply.status, reply.text().as_str()), (200, "got 102400 bytes"));
    let received = &upstream.received()[0];
    assert!(received.body == body, "100 KiB arrive byte for byte");
    assert_eq!(received.header("content-length"), Some("102400"), "a Content-Length body is not re-chunked");
    assert!(received.header("transfer-encoding").is_none());
    assert_eq!(client.get("/api/next").await.status, 200, "the connection is still usable");
    proxy.stop().await;
}

#[tokio::test]
async fn plain_request_then_chunked_post_on_one_connection_both_succeed_in_order() {
    let upstream =
        RawUpstream::start(|r| Answer::ok(format!("{} {}", r.target(), String::from_utf8_lossy(&r.body)))).await;
    let (_idp, upstream, proxy) = setup(upstream).await;
    let mut client = RawClient::connect(&proxy).await;

    assert_eq!(client.get("/api/first").await.text(), "/first ");
    let mut post =
        format!("POST /api/second HTTP/1.1\r\nHost: {CLIENT_HOST}\r\nTransfer-Encoding: chunked\r\n\r\n").into_bytes();
    post.extend(chunked(&[b"part one, ", b"part two"]));
    let reply = client.exchange("POST", &post).await;
    assert_eq!((reply.status, reply.text().as_str()), (200, "/second part one, part two"));
    assert_eq!(client.get("/api/third").await.text(), "/third ");
    let targets: Vec<_> = upstream.received().iter().map(|r| r.target().to_owned()).collect();
    assert_eq!(targets, ["/first", "/second", "/third"]);
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------------------------
// Connection management
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn connection_close_request_gets_its_response_then_the_proxy_closes() {
    let (_idp, _upstream, proxy) = setup(RawUpstream::echo_target().await).await;
    let mut client = RawClient::connect(&proxy).await;

    let reply = client.exchange("GET", &get("/api/last", "Connection: close\r\n")).await;
    assert_eq!((reply.status, reply.text().as_str()), (200, "GET /last"));
    client.assert_closed().await;
    proxy.stop().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_at_shutdown_without_waiting_for_the_grace() {
    let (_idp, _upstream, proxy) = setup(RawUpstream::echo_target().await).await;
    let mut client = RawClient::connect(&proxy).await;
    let reply = client.get("/api/one").await;
    assert_eq!((reply.status, reply.text().as_str()), (200, "GET /one"));
    // Between requests: nothing in flight, so the drain has nothing to wait for (shutdown_grace is 20 s).
    assert!(tokio::time::timeout(WAIT, proxy.stop()).await.is_ok(), "the drain waited for an idle connection");
    client.assert_closed().await;
}

#[tokio::test]
async fn http_1_0_request_gets_an_unchunked_response_and_the_connection_closes() {
    // The upstream answers chunked, which an HTTP/1.0 client cannot read.
    let upstream = RawUpstream::start(|_| {
        let mut bytes = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        bytes.extend(chunked(&[b"for an ", b"old client"]));
        Answer::raw(bytes)
    })
    .await;
    let (_idp, upstream, proxy) = setup(upstream).await;
    let mut client = RawClient::connect(&proxy).await;

    let reply =
        client.exchange("GET", format!("GET /api/old HTTP/1.0\r\nHost: {CLIENT_HOST}\r\n\r\n").as_bytes()).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "for an old client");
    assert!(reply.header("transfer-encoding").is_none(), "never chunked to HTTP/1.0: {:?}", reply.head);
    if reply.framing != Framing::Close {
        client.assert_closed().await;
    }
    let request = &upstream.received()[0];
    assert_eq!(request.request_line(), "GET /old HTTP/1.1");
    assert_eq!(request.header("authorization"), Some("Bearer tok-1"));
    assert!(request.header("via").is_some_and(|v| v.contains("1.0 tokenproxy")), "{:?}", request.head);
    proxy.stop().await;
}

#[tokio::test]
async fn upstream_closing_an_idle_connection_does_not_fail_the_next_request() {
    // The upstream answers the first request, then closes that connection without announcing it.
    let upstream = RawUpstream::start(|r| {
        let answer = Answer::ok(format!("on connection {}", r.connection));
        if r.connection == 1 {
            answer.then_close()
        } else {
            answer
        }
    })
    .await;
    let (_idp, mut upstream, proxy) = setup(upstream).await;
    let mut client = RawClient::connect(&proxy).await;

    assert_eq!(client.get("/api/first").await.text(), "on connection 1");
    assert_eq!(upstream.wait_closed().await, 1);
    let second = client.get("/api/second").await;
    assert_eq!((second.status, second.text().as_str()), (200, "on connection 2"), "{:?}", second.head);
    assert_eq!(upstream.connections(), 2);
    assert_eq!(upstream.received().len(), 2);
    proxy.stop().await;
}

/// An upstream that answers the first request on its first connection, then closes that connection on reading the
/// next one without answering it: the race every keep-alive client meets when an upstream times out an idle
/// connection just as a request goes out on it.
async fn upstream_dropping_the_second_request_on_its_first_connection() -> RawUpstream {
    let on_first = Arc::new(AtomicUsize::new(0));
    RawUpstream::start(move |r| {
        if r.connection == 1 && on_first.fetch_add(1, Ordering::SeqCst) == 1 {
            return Answer::raw(Vec::new()).then_close();
        }
        Answer::ok(format!("{} on connection {}", r.head.start.split(' ').next().unwrap_or_default(), r.connection))
    })
    .await
}

#[tokio::test]
async fn an_idempotent_request_lost_on_a_kept_connection_is_sent_once_more_on_a_new_one() {
    let (_idp, upstream, proxy) = setup(upstream_dropping_the_second_request_on_its_first_connection().await).await;
    let mut client = RawClient::connect(&proxy).await;

    assert_eq!(client.get("/api/first").await.text(), "GET on connection 1");
    let second = client.get("/api/second").await;
    assert_eq!((second.status, second.text().as_str()), (200, "GET on connection 2"), "{:?}", second.head);
    let targets: Vec<(usize, String)> =
        upstream.received().iter().map(|r| (r.connection, r.target().to_owned())).collect();
    assert_eq!(
        targets,
        [(1, "/first".to_owned()), (1, "/second".to_owned()), (2, "/second".to_owned())],
        "sent on the kept connection, then once more on a new one"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_post_lost_on_a_kept_connection_is_not_sent_twice() {
    let (_idp, upstream, proxy) = setup(upstream_dropping_the_second_request_on_its_first_connection().await).await;
    let mut client = RawClient::connect(&proxy).await;

    assert_eq!(client.get("/api/first").await.text(), "GET on connection 1");
    let post = client.exchange("POST", &with_body("POST", "/api/order", "", b"one order")).await;
    post.assert_problem(502, "upstream_unreachable");
    assert_eq!(upstream.received().len(), 2, "the POST reached the upstream once and was not sent again");
    // The caller's connection survives the error, and the next request takes a new upstream connection.
    assert_eq!(client.get("/api/after").await.text(), "GET on connection 2");
    proxy.stop().await;
}

#[tokio::test]
async fn upstream_announcing_connection_close_is_not_reused() {
    let upstream = RawUpstream::start(|r| {
        Answer::with_length(
            "HTTP/1.1 200 OK",
            &[("Connection", "close")],
            format!("on connection {}", r.connection).as_bytes(),
        )
        .then_close()
    })
    .await;
    let (_idp, upstream, proxy) = setup(upstream).await;
    let mut client = RawClient::connect(&proxy).await;

    let first = client.get("/api/first").await;
    assert_eq!(first.text(), "on connection 1");
    let second = client.get("/api/second").await;
    assert_eq!((second.status, second.text().as_str()), (200, "on connection 2"));
    assert_eq!(upstream.connections(), 2);
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------------------------
// Headers
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn hop_by_hop_headers_are_dropped_both_ways() {
    let upstream = RawUpstream::start(|_| {
        Answer::with_length(
            "HTTP/1.1 200 OK",
            &[
                ("Connection", "X-Up-Hop"),
                ("X-Up-Hop", "1"),
                ("Keep-Alive", "timeout=5"),
                ("Proxy-Authenticate", "Basic realm=\"upstream\""),
                ("Upgrade", "h2c"),
                ("X-End-To-End", "kept"),
            ],
            b"ok",
        )
    })
    .await;
    let (_idp, upstream, proxy) = setup(upstream).await;
    let mut client = RawClient::connect(&proxy).await;

    let reply = client
        .exchange(
            "GET",
            &get(
                "/api/hop",
                "Connection: keep-alive, X-Drop\r\nX-Drop: 1\r\nKeep-Alive: timeout=5\r\n\
                 Proxy-Authorization: Basic Zm9vOmJhcg==\r\nTE: gzip\r\nX-End-To-End: yes\r\n",
            ),
        )
        .await;
    assert_eq!((reply.status, reply.text().as_str()), (200, "ok"));
    for name in ["x-up-hop", "keep-alive", "proxy-authenticate", "upgrade"] {
        assert!(reply.header(name).is_none(), "{name} reached the client: {:?}", reply.head);
    }
    assert!(reply.head.all("connection").iter().all(|v| !v.to_ascii_lowercase().contains("x-up-hop")));
    assert_eq!(reply.header("x-end-to-end"), Some("kept"));

    let request = &upstream.received()[0];
    for name in ["x-drop", "keep-alive", "proxy-authorization", "te"] {
        assert!(request.header(name).is_none(), "{name} reached the upstream: {:?}", request.head);
    }
    assert!(request.head.all("connection").iter().all(|v| !v.to_ascii_lowercase().contains("x-drop")));
    assert_eq!(request.header("x-end-to-end"), Some("yes"));
    assert_eq!(client.get("/api/next").await.status, 200, "the connection is still usable");
    proxy.stop().await;
}

#[tokio::test]
async fn query_injection_and_strip_prefix_shape_the_upstream_request_line() {
    let idp = FakeIdp::start(300).await;
    let upstream = RawUpstream::echo_target().await;
    let base = format!("{}/base", upstream.url());
    let config = format!(
        "{}{}{}{}",
        provider(&idp),
        route("query", "/q", &base, "strip_prefix = true\ninject = \"query\""),
        route("api", "/api", &upstream.url(), "strip_prefix = true"),
        route("kept", "/kept", &upstream.url(), "")
    );
    let proxy = start(&config).await;
    let mut client = RawClient::connect(&proxy).await;

    let cases = [
        ("/q/items?access_token=callers&a=1", "GET /base/items?a=1&access_token=tok-1 HTTP/1.1"),
        ("/q/items", "GET /base/items?access_token=tok-1 HTTP/1.1"),
        ("/api/v1/x?y=2&z", "GET /v1/x?y=2&z HTTP/1.1"),
        ("/api", "GET / HTTP/1.1"),
        ("/kept/a%20b?x=%2F", "GET /kept/a%20b?x=%2F HTTP/1.1"),
    ];
    for (path, _) in cases {
        assert_eq!(client.get(path).await.status, 200, "{path}");
    }
    let received = upstream.received();
    for ((path, line), request) in cases.iter().zip(&received) {
        assert_eq!(request.request_line(), *line, "for {path}");
    }
    assert!(received[0].header("authorization").is_none(), "query injection attaches no header");
    assert_eq!(received[2].header("authorization"), Some("Bearer tok-1"));
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------------------------
// The proxy's own errors
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn unreachable_upstream_gives_502_problem_and_the_connection_stays_usable() {
    let idp = FakeIdp::start(300).await;
    let upstream = RawUpstream::echo_target().await;
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let config = format!(
        "{}{}{}",
        provider(&idp),
        route("dead", "/dead", &format!("http://{dead_addr}"), ""),
        route("api", "/api", &upstream.url(), "strip_prefix = true")
    );
    let proxy = start(&config).await;
    let mut client = RawClient::connect(&proxy).await;

    let reply = client.get("/dead/x").await;
    reply.assert_problem(502, "upstream_unreachable");
    assert!(!reply.text().contains("tok-1"));
    assert_eq!(client.get("/dead/y").await.status, 502, "the client connection survives the error");
    assert_eq!(client.get("/api/z").await.text(), "GET /z", "and serves a routable request");
    proxy.stop().await;
}

#[tokio::test]
async fn no_route_gives_404_problem_and_the_connection_stays_usable() {
    let (_idp, upstream, proxy) = setup(RawUpstream::echo_target().await).await;
    let mut client = RawClient::connect(&proxy).await;

    let reply = client.get("/elsewhere/x").await;
    reply.assert_problem(404, "no_route");
    assert!(reply.header("x-request-id").is_some());
    assert_eq!(client.get("/api/z").await.text(), "GET /z", "the connection is still usable");
    assert_eq!(upstream.received().len(), 1, "nothing was sent upstream for the unrouted request");
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------------------------
// Framing the caller cannot bend
// ---------------------------------------------------------------------------------------------------------------

/// A request whose body is itself a request, with the body's `Content-Length` listed in `Connection`: the upstream
/// must receive exactly one request, whose body is those bytes, framed by the length the proxy read.
#[tokio::test]
async fn connection_listing_content_length_cannot_smuggle_a_second_request() {
    let upstream = RawUpstream::start(|r| Answer::ok(format!("{} got {} bytes", r.target(), r.body.len()))).await;
    let (_idp, upstream, proxy) = setup(upstream).await;
    let smuggled = b"GET /admin HTTP/1.1\r\nHost: internal.example\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n";
    for (i, connection) in ["content-length", "keep-alive, Content-Length", "Content-Length, host"].iter().enumerate() {
        let mut client = RawClient::connect(&proxy).await;
        let request = with_body("POST", "/api/x", &format!("Connection: {connection}\r\n"), smuggled);
        let reply = client.exchange("POST", &request).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.text(), format!("/x got {} bytes", smuggled.len()));
        // A second request from the same caller: with the hole, the upstream would answer the smuggled one here.
        assert_eq!(client.get("/api/next").await.text(), "/next got 0 bytes");
        let received = upstream.received();
        assert_eq!(received.len(), 2 * (i + 1), "only the caller's requests reached the upstream: {received:#?}");
        let post = &received[2 * i];
        assert_eq!(post.request_line(), "POST /x HTTP/1.1");
        assert_eq!(post.body, smuggled, "the body arrives as a body");
        assert_eq!(post.head.all("content-length"), [smuggled.len().to_string().as_str()]);
        assert_eq!(post.head.all("host"), [upstream.addr.to_string().as_str()], "Host is ours, exactly once");
        assert!(received.iter().all(|r| r.target() != "/admin"), "{received:#?}");
    }
    proxy.stop().await;
}

/// An upstream listing `Content-Length` in `Connection`: the caller still gets the length, and the next response on
/// the same connection starts where it should.
#[tokio::test]
async fn a_response_keeps_its_framing_whatever_connection_lists() {
    let upstream = RawUpstream::start(|r| {
        let body = format!("hello {}", r.target());
        Answer::raw(format!(
            "HTTP/1.1 200 OK\r\nConnection: content-length, transfer-encoding, X-Hop\r\nX-Hop: 1\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        ))
    })
    .await;
    let (_idp, _upstream, proxy) = setup(upstream).await;
    let mut client = RawClient::connect(&proxy).await;
    let mut both = get("/api/a", "");
    both.extend(get("/api/b", ""));
    client.send(&both).await;
    for path in ["/a", "/b"] {
        let reply = client.read_reply("GET").await;
        assert_eq!(reply.framing, Framing::ContentLength, "{:?}", reply.head);
        assert_eq!(reply.header("content-length"), Some(format!("{}", 6 + path.len()).as_str()));
        assert_eq!(reply.text(), format!("hello {path}"));
        assert!(reply.header("x-hop").is_none());
    }
    proxy.stop().await;
}

/// Requests whose framing another hop could read differently, or with two `Host` headers: 400 from the proxy, the
/// connection closed, nothing sent upstream.
#[tokio::test]
async fn requests_http_1_1_forbids_get_400_and_the_connection_closes() {
    let (_idp, upstream, proxy) = setup(RawUpstream::echo_target().await).await;
    let cases: &[&[u8]] = &[
        b"POST /api/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: +5\r\n\r\nhello",
        b"POST /api/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\xa0\r\n\r\nhello",
        b"POST /api/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0x5\r\n\r\nhello",
        b"POST /api/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5, 5\r\n\r\nhello",
        b"POST /api/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"POST /api/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /api/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        b"POST /api/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip\r\n\r\nhello",
        b"POST /api/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked, gzip\r\n\r\nhello",
        b"GET /api/x HTTP/1.1\r\nHost: localhost\r\nHost: b\r\n\r\n",
        b"GET /api/x HTTP/1.1\r\nHost: localhost\nX: y\r\n\r\n",
    ];
    for case in cases {
        // On hyper too: what hyper reads is held to the h1 transport's verdict first (src/proxy/h1/vet.rs).
        let mut client = RawClient::connect(&proxy).await;
        let mut bytes = case.to_vec();
        bytes.extend(get("/api/after", ""));
        let reply = client.exchange("POST", &bytes).await;
        if support::hyper_only() {
            // hyper answers malformed heads itself: 400, without a problem body.
            assert_eq!(reply.status, 400, "{}", case.escape_ascii());
        } else {
            reply.assert_problem(400, "bad_request");
        }
        assert_eq!(reply.header("connection"), Some("close"), "{}", case.escape_ascii());
        client.assert_closed().await;
    }
    assert!(upstream.received().is_empty(), "nothing reached the upstream: {:#?}", upstream.received());
    // Repeated identical lengths are one length (RFC 9110 §8.6), as hyper reads them.
    let mut client = RawClient::connect(&proxy).await;
    let same = b"POST /api/same HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello";
    assert_eq!(client.exchange("POST", same).await.text(), "POST /same");
    assert_eq!(upstream.received()[0].head.all("content-length"), ["5"]);
    proxy.stop().await;
}

/// An upstream response with a signed or padded length is refused (502), never forwarded with its length.
#[tokio::test]
async fn a_response_with_a_malformed_length_is_refused() {
    let upstream = RawUpstream::start(|r| match r.target() {
        "/signed" => Answer::raw("HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello").then_close(),
        "/conflict" => {
            Answer::raw("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 4\r\n\r\nhello").then_close()
        }
        _ => Answer::ok("fine"),
    })
    .await;
    let (_idp, _upstream, proxy) = setup(upstream).await;
    let mut client = RawClient::connect(&proxy).await;
    for path in ["/api/signed", "/api/conflict"] {
        let reply = client.get(path).await;
        reply.assert_problem(502, "upstream_unreachable");
        assert!(reply.text().to_ascii_lowercase().contains("content-length"), "{}", reply.text());
    }
    assert_eq!(client.get("/api/ok").await.text(), "fine", "the caller's connection stays usable");
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------------------------
// Where a token may go: methods and paths
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn trace_and_track_are_answered_405_and_never_forwarded() {
    let (_idp, upstream, proxy) = setup(RawUpstream::echo_target().await).await;
    let mut client = RawClient::connect(&proxy).await;
    for method in ["TRACE", "TRACK", "trace"] {
        let reply =
            client.exchange(method, format!("{method} /api/x HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes()).await;
        reply.assert_problem(405, "method_not_allowed");
        assert!(!reply.text().contains("tok-1"));
    }
    assert_eq!(client.get("/api/after").await.text(), "GET /after", "the connection stays usable");
    assert_eq!(upstream.received().len(), 1, "only the GET reached the upstream");
    proxy.stop().await;
}

#[tokio::test]
async fn dot_segments_are_removed_before_routing_and_the_normalised_path_is_forwarded() {
    let idp = FakeIdp::start(300).await;
    let upstream = RawUpstream::echo_target().await;
    let config = format!(
        "{}{}{}",
        provider(&idp),
        route("api", "/api", &upstream.url(), "strip_prefix = true"),
        route("strict", "/strict", &upstream.url(), "encoded_slashes = \"reject\"\npath_parameters = \"reject\"")
    );
    let proxy = start(&config).await;
    let mut client = RawClient::connect(&proxy).await;

    // Climbing out of /api lands where no route is: nothing is forwarded, with or without encoding.
    for path in ["/api/../admin", "/api/%2e%2e/admin", "/api/%2E%2E/admin", "/api/./../admin"] {
        client.get(path).await.assert_problem(404, "no_route");
    }
    // A path that would climb above `/`, or where a dot segment meets an encoded separator: 400.
    for path in ["/../api/x", "/api/../../x", "/api/..%2fadmin", "/api/%2e%2e%5cadmin", "/api/..%5C..%5Cadmin"] {
        client.get(path).await.assert_problem(400, "bad_request");
    }
    // Dot segments inside the route are removed and the normalised path goes upstream.
    assert_eq!(client.get("/api/a/../b/./c?q=1").await.text(), "GET /b/c?q=1");
    assert_eq!(client.get("/api/x/%2e%2e/y").await.text(), "GET /y");
    // A dot segment with path parameters is one (Tomcat and Jetty read `..;` as `..`): `/api/..;/admin` is not
    // forwarded on the api route with its token; on a route that refuses them, 400.
    client.get("/api/..;/admin").await.assert_problem(404, "no_route");
    assert_eq!(client.get("/api/x/..;jsessionid=1/y").await.text(), "GET /y");
    client.get("/strict/x/..;/y").await.assert_problem(400, "bad_request");
    assert_eq!(client.get("/api/x;v=1/y").await.text(), "GET /x;v=1/y", "other path parameters stay");
    // Encoded slashes stay as they are by default, and are refused where the route says so.
    assert_eq!(client.get("/api/projects/group%2Fname").await.text(), "GET /projects/group%2Fname");
    client.get("/strict/projects/group%2Fname").await.assert_problem(400, "bad_request");
    assert_eq!(client.get("/strict/plain").await.text(), "GET /strict/plain");
    let targets: Vec<String> = upstream.received().iter().map(|r| r.target().to_owned()).collect();
    assert_eq!(targets, ["/b/c?q=1", "/y", "/y", "/x;v=1/y", "/projects/group%2Fname", "/strict/plain"]);
    proxy.stop().await;
}

/// A chunked request body that turns out malformed after part of it went upstream: the caller's fault, 400, and the
/// connection closes (where the next request would start is not known).
#[tokio::test]
async fn a_malformed_chunked_body_is_the_callers_fault() {
    let (_idp, upstream, proxy) = setup(RawUpstream::echo_target().await).await;
    let mut client = RawClient::connect(&proxy).await;
    let request = format!(
        "POST /api/x HTTP/1.1\r\nHost: {CLIENT_HOST}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nbad\r\n0\r\n\r\n"
    );
    let reply = client.exchange("POST", request.as_bytes()).await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    reply.assert_problem(400, "bad_request");
    assert!(reply.text().contains("request body"), "{}", reply.text());
    client.assert_closed().await;
    assert!(upstream.received().is_empty(), "the upstream never received a complete message");
    proxy.stop().await;
}
