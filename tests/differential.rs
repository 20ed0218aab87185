//! The h1 transport frames requests exactly as hyper does: the same bytes from a caller, fed once to
//! tokenproxy as it runs by default (its own h1 transport, handing over to hyper what it does not take) and once
//! with `server.h1_transport = false` (hyper for everything), must get the same verdict. "Same" means: the caller
//! gets the same sequence of response statuses, and the upstream receives the same parsed messages (method, target,
//! headers as a multiset, body bytes), as read by hyper's own server standing in for the upstream. Not the same
//! bytes: hyper may frame a body differently, and only what the upstream makes of them matters.
//!
//! Everything runs in memory: the caller talks to each proxy over `tokio::io::duplex`, and the proxy's upstream
//! connections are duplex streams too (through the `Dial` seam), so a case costs no socket and no real time (the
//! clock is paused: a proxy waiting for more bytes lets virtual time run to its header timeout at once).
//!
//! The cases: a seed corpus (every framing defect this project has had, and the classic desync payloads: CL.TE,
//! TE.CL, TE.TE obfuscations, duplicate, signed, hex and padded lengths, obs-fold, bare LF and CR, NUL, pipelining),
//! then generated requests (`proptest`), `TP_DIFFERENTIAL_CASES` of them (100,000 by default), shared between one
//! thread per core (`TP_DIFFERENTIAL_THREADS`), thread n drawing from seed + n; the seed is printed and can be set
//! with `TP_DIFFERENTIAL_SEED` to replay a run.
//!
//! No disagreement is allowed. Where hyper's parser alone is more lenient (a request with both `Content-Length` and
//! `Transfer-Encoding`, a header line ended by a bare LF), what hyper reads is held to the h1 transport's
//! verdict first (`proxy::h1::vet`), so both answer 400 and close.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::uri::Authority;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use tokenproxy::proxy::upstream::{Dial, UpstreamStream};
use tokenproxy::App;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------------------------
// The upstream: hyper's server, recording what it parsed
// ---------------------------------------------------------------------------------------------------------------

/// A request as the upstream parsed it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Message {
    method: String,
    target: String,
    /// Lowercased names with their values (escaped), sorted: a multiset. `x-request-id` is left out (one is made per
    /// request).
    headers: Vec<(String, String)>,
    /// The body, escaped.
    body: String,
}

/// An in-memory upstream: every dial is a new hyper HTTP/1.1 server connection that records each request it parses
/// and answers `200 ok`.
#[derive(Clone, Default)]
struct Recorder {
    log: Arc<Mutex<Vec<Message>>>,
}

impl Recorder {
    fn take(&self) -> Vec<Message> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

impl Dial for Recorder {
    fn dial<'a>(&'a self, _: &'a Authority) -> BoxFuture<'a, std::io::Result<UpstreamStream>> {
        let (near, far) = tokio::io::duplex(64 * 1024);
        let log = Arc::clone(&self.log);
        tokio::spawn(async move {
            let service = service_fn(move |request: hyper::Request<Incoming>| {
                let log = Arc::clone(&log);
                async move {
                    let (parts, body) = request.into_parts();
                    // A message the upstream did not receive whole is not one: the hyper transport streams bodies, so
                    // the upstream may see the start of a request whose caller never finished it (and then the end of
                    // the connection). It is not recorded.
                    let Ok(body) = body.collect().await else {
                        return Ok(hyper::Response::new(Full::new(Bytes::new())));
                    };
                    let body = body.to_bytes().escape_ascii().to_string();
                    let mut headers: Vec<(String, String)> = parts
                        .headers
                        .iter()
                        .filter(|(name, _)| name.as_str() != "x-request-id")
                        .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().escape_ascii().to_string()))
                        .collect();
                    headers.sort();
                    let message =
                        Message { method: parts.method.to_string(), target: parts.uri.to_string(), headers, body };
                    log.lock().unwrap().push(message);
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"ok\n"))))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(far), service).await;
        });
        Box::pin(async move { Ok(UpstreamStream::Memory(near)) })
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Two proxies, one case
// ---------------------------------------------------------------------------------------------------------------

/// What a caller and an upstream saw of one case.
#[derive(Clone)]
struct Verdict {
    /// The status of each response the caller got, in order.
    statuses: Vec<u16>,
    /// What the upstream received, in order.
    received: Vec<Message>,
    /// What the caller read, for the report of a disagreement (not compared).
    raw: String,
}

impl PartialEq for Verdict {
    fn eq(&self, other: &Verdict) -> bool {
        self.statuses == other.statuses && self.received == other.received
    }
}

impl std::fmt::Debug for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "statuses {:?}, received {:#?}\n    caller read: \"{}\"", self.statuses, self.received, self.raw)
    }
}

struct Pair {
    direct: App,
    hyper: App,
    direct_upstream: Recorder,
    hyper_upstream: Recorder,
}

const PEER: &str = "127.0.0.1:40000";

/// The config of both proxies: a route with a token, one without, a provider whose token lives for years (so that
/// virtual time never makes it refresh).
fn config(idp: &support::FakeIdp, direct: bool) -> tokenproxy::config::Config {
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nh1_transport = {direct}\nheader_read_timeout = \"5s\"\n\
         allowed_hosts = [\"a\", \"internal\"]\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n[log]\naccess = false\n\
         [providers.api]\ntoken_url = \"{}\"\nclient_id = \"c\"\nclient_secret = \"s\"\n\
         [[routes]]\nname = \"api\"\nprefix = \"/api\"\nupstream = \"http://api.upstream:8080\"\nprovider = \"api\"\n\
         strip_prefix = true\n\
         [[routes]]\nname = \"open\"\nprefix = \"/open\"\nupstream = \"http://open.upstream:8080/base\"\n\
         [[routes]]\nname = \"named\"\nhost = \"named.test\"\nupstream = \"http://named.upstream\"\nprovider = \"api\"\n\
         inject = \"query\"\n",
        idp.token_url()
    );
    tokenproxy::config::Config::from_toml_str(&toml, "differential.toml").expect("config")
}

impl Pair {
    /// Both proxies, each holding its token `tok-1` (fetched from a fake IdP of its own before the clock is paused).
    async fn start(idps: &[support::FakeIdp; 2]) -> Pair {
        let (direct_upstream, hyper_upstream) = (Recorder::default(), Recorder::default());
        let direct = App::build_with_dial(config(&idps[0], true), Arc::new(direct_upstream.clone())).expect("app");
        let hyper = App::build_with_dial(config(&idps[1], false), Arc::new(hyper_upstream.clone())).expect("app");
        for app in [&direct, &hyper] {
            let engine = app.engine();
            engine.spawn();
            let slot = engine.slot("api").expect("provider api");
            tokio::time::timeout(Duration::from_secs(20), async {
                while slot.current().is_none() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .expect("a token");
        }
        Pair { direct, hyper, direct_upstream, hyper_upstream }
    }

    async fn verdicts(&self, bytes: &[u8]) -> (Verdict, Verdict) {
        let direct = run(&self.direct, &self.direct_upstream, bytes).await;
        let hyper = run(&self.hyper, &self.hyper_upstream, bytes).await;
        (direct, hyper)
    }
}

/// Feeds `bytes` to `app` on a new connection and reads until the proxy closes it (or stays silent for a minute of
/// virtual time).
async fn run(app: &App, upstream: &Recorder, bytes: &[u8]) -> Verdict {
    upstream.take();
    let (mut caller, proxy_side) = tokio::io::duplex(256 * 1024);
    let serving = app.serve_connection(proxy_side, PEER.parse::<SocketAddr>().unwrap());
    let talking = async {
        let _ = caller.write_all(bytes).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(60), caller.read_to_end(&mut out)).await;
        drop(caller);
        out
    };
    let ((), out) = tokio::join!(serving, talking);
    Verdict { statuses: statuses(&out), received: upstream.take(), raw: out.escape_ascii().to_string() }
}

/// The status of each response in a byte stream from the proxy. Bodies here are `ok` (the upstream's) or
/// problem+json (the proxy's), neither of which holds a status line, and both end in a newline: a status line
/// always starts a line.
fn statuses(out: &[u8]) -> Vec<u16> {
    (0..out.len())
        .filter(|&p| p == 0 || out[p - 1] == b'\n')
        .filter(|&p| out[p..].starts_with(b"HTTP/1.") && out.get(p + 8) == Some(&b' '))
        .filter_map(|p| std::str::from_utf8(out.get(p + 9..p + 12)?).ok()?.parse().ok())
        .collect()
}

// ---------------------------------------------------------------------------------------------------------------
// The comparison
// ---------------------------------------------------------------------------------------------------------------

/// Response statuses that say the same thing: equal, or equal but for a final 400 on one side where the other side
/// closed without an answer (both refused the last request; hyper itself answers an unparsable pipelined head either
/// way, depending on what it has read when it parses).
fn same_statuses(a: &[u16], b: &[u16]) -> bool {
    let trimmed = |s: &[u16]| if s.last() == Some(&400) { s[..s.len() - 1].to_vec() } else { s.to_vec() };
    a == b || (a.len() + 1 == b.len() && trimmed(b) == a) || (b.len() + 1 == a.len() && trimmed(a) == b)
}

/// Checks one case: `Ok` when the verdicts agree.
fn compare(bytes: &[u8], direct: &Verdict, hyper: &Verdict) -> Result<(), String> {
    if direct.received == hyper.received && same_statuses(&direct.statuses, &hyper.statuses) {
        return Ok(());
    }
    Err(format!("verdicts differ for \"{}\"\n  direct: {direct:?}\n  hyper:  {hyper:?}", bytes.escape_ascii()))
}

// ---------------------------------------------------------------------------------------------------------------
// The seed corpus
// ---------------------------------------------------------------------------------------------------------------

fn corpus() -> Vec<Vec<u8>> {
    let smuggled = "GET /api/admin HTTP/1.1\r\nHost: internal\r\n\r\n";
    let mut cases: Vec<String> = vec![
        // The framing and policy defects this project has had, one by one.
        format!("POST /api/x HTTP/1.1\r\nHost: a\r\nConnection: content-length\r\nContent-Length: {}\r\n\r\n{smuggled}", smuggled.len()),
        format!("POST /api/x HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Content-Length\r\nContent-Length: {}\r\n\r\n{smuggled}", smuggled.len()),
        "POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello".into(),
        "POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\u{a0}\r\n\r\nhello".into(),
        "TRACE /api/x HTTP/1.1\r\nHost: a\r\n\r\n".into(),
        "TRACK /api/x HTTP/1.1\r\nHost: a\r\n\r\n".into(),
        "GET /api/../admin HTTP/1.1\r\nHost: a\r\n\r\n".into(),
        "GET /api/%2e%2e/admin HTTP/1.1\r\nHost: a\r\n\r\n".into(),
        "GET /api/..%2fadmin HTTP/1.1\r\nHost: a\r\n\r\n".into(),
        "GET /api/x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".into(),
        "POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".into(),
        // CL.TE and TE.CL.
        format!("POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG{smuggled}"),
        format!("POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\n{smuggled}\r\n0\r\n\r\n"),
        // TE.TE obfuscations.
        "POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n".into(),
        "POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n".into(),
        "POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n0\r\n\r\n".into(),
        "POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\tchunked\r\n\r\n0\r\n\r\n".into(),
        "POST /api/x HTTP/1.1\r\nHost: a\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(),
        "POST /api/x HTTP/1.1\r\nHost: a\r\nX: y\r\nTransfer-Encoding\r\n : chunked\r\n\r\n0\r\n\r\n".into(),
        "POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n".into(),
        "POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".into(),
        "POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: CHUNKED\r\n\r\n3\r\nabc\r\n0\r\n\r\n".into(),
        "POST /api/x HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(),
        // Lengths: duplicate, signed, hex, padded, lists, overflow.
        "POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc".into(),
        "POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd".into(),
        "POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc".into(),
        "POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: -3\r\n\r\nabc".into(),
        "POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 0x3\r\n\r\nabc".into(),
        "POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length:  3 \r\n\r\nabc".into(),
        "POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 3 3\r\n\r\nabc".into(),
        "POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\nabc".into(),
        "POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 000003\r\n\r\nabc".into(),
        "POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcGET /api/y HTTP/1.1\r\nHost: a\r\n\r\n".into(),
        // obs-fold, bare LF and CR, NUL.
        "GET /api/x HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n two\r\n\r\n".into(),
        "GET /api/x HTTP/1.1\nHost: a\n\n".into(),
        "GET /api/x HTTP/1.1\r\nHost: a\nX: y\r\n\r\n".into(),
        "GET /api/x HTTP/1.1\r\nHost: a\rX: y\r\n\r\n".into(),
        "GET /api/x HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n".into(),
        "GET /api/x\0 HTTP/1.1\r\nHost: a\r\n\r\n".into(),
        // Pipelining, keep-alive and close, Connection-listed headers, upgrades, Expect.
        "GET /api/1 HTTP/1.1\r\nHost: a\r\n\r\nGET /open/2 HTTP/1.1\r\nHost: a\r\n\r\nGET /api/3 HTTP/1.1\r\nHost: a\r\n\r\n".into(),
        "GET /api/1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /api/2 HTTP/1.1\r\nHost: a\r\n\r\n".into(),
        "GET /api/1 HTTP/1.1\r\nHost: a\r\nConnection: x-secret, te\r\nX-Secret: 1\r\nTE: trailers\r\n\r\n".into(),
        "GET /api/1 HTTP/1.1\r\nHost: a\r\nConnection: host\r\n\r\n".into(),
        "GET /api/ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n".into(),
        "PUT /api/x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc".into(),
        // Tokens and routes: the caller's own credential, query injection, absolute form, CONNECT, unknown hosts.
        "GET /api/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer callers\r\n\r\n".into(),
        "GET /x?access_token=callers&a=1 HTTP/1.1\r\nHost: named.test\r\n\r\n".into(),
        "GET http://named.test/x HTTP/1.1\r\nHost: named.test\r\n\r\n".into(),
        "GET http://evil.test/x HTTP/1.1\r\nHost: named.test\r\n\r\n".into(),
        "CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test:443\r\n\r\n".into(),
        "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n".into(),
        "GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n".into(),
        "HEAD /api/x HTTP/1.1\r\nHost: a\r\n\r\n".into(),
        "GET /api/x HTTP/1.0\r\nHost: a\r\n\r\n".into(),
        "GET /api/x HTTP/1.1\r\n\r\n".into(),
        "\r\nGET /api/x HTTP/1.1\r\nHost: a\r\n\r\n".into(),
        "GET /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nshort".into(),
        "GET /api/x HTTP/1.1\r\nHost: a".into(),
        "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".into(),
        "get /api/x HTTP/1.1\r\nHost: a\r\n\r\n".into(),
    ];
    cases.push(format!("GET /api/x HTTP/1.1\r\nHost: a\r\nX-Long: {}\r\n\r\n", "a".repeat(70 * 1024)));
    cases.push(format!(
        "POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n{}",
        70 * 1024,
        "b".repeat(70 * 1024)
    ));
    cases.into_iter().map(String::into_bytes).collect()
}

// ---------------------------------------------------------------------------------------------------------------
// Generated requests
// ---------------------------------------------------------------------------------------------------------------

/// A body and the `Content-Length` / `Transfer-Encoding` lines that go with it (or lie about it).
fn body_and_framing() -> impl Strategy<Value = (Vec<String>, Vec<u8>)> {
    let raw =
        proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'\r'), Just(b'\n'), Just(b'0'), Just(b' ')], 0..12);
    let smuggle = Just(b"GET /api/s HTTP/1.1\r\nHost: a\r\n\r\n".to_vec());
    let body = prop_oneof![4 => raw, 1 => smuggle];
    let length_value = prop_oneof![
        6 => Just("{n}".to_owned()),
        1 => Just("+{n}".to_owned()),
        1 => Just("-{n}".to_owned()),
        1 => Just(" {n} ".to_owned()),
        1 => Just("{n}, {n}".to_owned()),
        1 => Just("0x{n}".to_owned()),
        1 => Just("{n}\u{a0}".to_owned()),
        1 => Just("{m}".to_owned()),
        1 => Just("".to_owned()),
    ];
    let te_value = prop_oneof![
        4 => Just("chunked"),
        1 => Just("Chunked"),
        1 => Just("gzip, chunked"),
        1 => Just("chunked, gzip"),
        1 => Just("gzip"),
        1 => Just("xchunked"),
        1 => Just(" chunked"),
        1 => Just("chunked\t"),
        1 => Just("identity"),
    ];
    let te_name = prop_oneof![6 => Just("Transfer-Encoding"), 1 => Just("transfer-encoding"), 1 => Just("Transfer-Encoding "), 1 => Just("Transfer_Encoding")];
    let chunks = prop_oneof![
        4 => Just(false),
        1 => Just(true),
    ];
    (body, proptest::option::of(length_value), proptest::option::of((te_name, te_value)), chunks, 0usize..3).prop_map(
        |(body, length, te, bad_chunks, extra_lengths)| {
            let mut lines = Vec::new();
            let mut payload = body.clone();
            if let Some((name, value)) = te {
                lines.push(format!("{name}: {value}"));
                // A chunked body, well formed or not.
                payload = if bad_chunks {
                    format!("{:x}\r\n", body.len() + 1).into_bytes()
                } else {
                    format!("{:x}\r\n", body.len()).into_bytes()
                };
                if !body.is_empty() {
                    payload.extend(&body);
                    payload.extend(b"\r\n0\r\n\r\n");
                } else {
                    payload = b"0\r\n\r\n".to_vec();
                }
            }
            if let Some(value) = length {
                let n = payload.len();
                let line = value.replace("{n}", &n.to_string()).replace("{m}", &(n + 3).to_string());
                for _ in 0..=extra_lengths.min(1) {
                    lines.push(format!("Content-Length: {line}"));
                }
            }
            (lines, payload)
        },
    )
}

/// One request: method, target, version, headers, body, with a line ending that is usually CRLF.
fn request() -> impl Strategy<Value = Vec<u8>> {
    let method = prop_oneof![
        6 => Just("GET"), 6 => Just("POST"), 2 => Just("PUT"), 1 => Just("HEAD"), 1 => Just("DELETE"),
        1 => Just("TRACE"), 1 => Just("CONNECT"), 1 => Just("OPTIONS"), 1 => Just("get"), 1 => Just("G T"),
    ];
    let prefix = prop_oneof![6 => Just("/api"), 2 => Just("/open"), 1 => Just("/nope"), 1 => Just("http://named.test"), 1 => Just("*"), 1 => Just("")];
    let suffix = prop_oneof![
        6 => Just("/x"), 1 => Just(""), 1 => Just("/../x"), 1 => Just("/%2e%2e/x"), 1 => Just("/..%2fx"),
        1 => Just("/a/./b"), 1 => Just("//z"), 1 => Just("/a%2Fb"), 1 => Just("?q=1&access_token=c"),
        1 => Just("/\\x"), 1 => Just("/x y"), 1 => Just("/%00"), 1 => Just("/../../x"),
    ];
    let version = prop_oneof![12 => Just("HTTP/1.1"), 2 => Just("HTTP/1.0"), 1 => Just("HTTP/1.2"), 1 => Just("http/1.1"), 1 => Just("HTTP/2.0")];
    let header = prop_oneof![
        4 => Just("Host: a".to_owned()),
        1 => Just("Host: named.test".to_owned()),
        1 => Just("Connection: close".to_owned()),
        1 => Just("Connection: keep-alive, content-length".to_owned()),
        1 => Just("Connection: transfer-encoding, host".to_owned()),
        1 => Just("Connection: upgrade".to_owned()),
        1 => Just("Upgrade: websocket".to_owned()),
        1 => Just("Expect: 100-continue".to_owned()),
        1 => Just("TE: trailers".to_owned()),
        1 => Just("Authorization: Bearer caller".to_owned()),
        1 => Just("X-Folded: a\r\n b".to_owned()),
        1 => Just("X-Nul: a\0b".to_owned()),
        1 => Just("X-Cr: a\rb".to_owned()),
        1 => Just("X-Obs: caf\u{e9}".to_owned()),
        1 => Just("Bad Name: x".to_owned()),
        1 => Just("X-Forwarded-For: 10.0.0.1".to_owned()),
        1 => Just("Via: 1.1 elsewhere".to_owned()),
    ];
    let headers = proptest::collection::vec(header, 0..4);
    let line_end = prop_oneof![20 => Just("\r\n"), 1 => Just("\n")];
    (method, prefix, suffix, version, headers, body_and_framing(), line_end).prop_map(
        |(method, prefix, suffix, version, headers, (framing, body), end)| {
            let mut text = format!("{method} {prefix}{suffix} {version}{end}");
            for line in headers.iter().chain(framing.iter()) {
                text.push_str(line);
                text.push_str(end);
            }
            text.push_str(end);
            let mut bytes = text.into_bytes();
            bytes.extend(body);
            bytes
        },
    )
}

/// The bytes a caller sends, shown as text when a case fails.
#[derive(Clone)]
struct Case(Vec<u8>);

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "\"{}\"", self.0.escape_ascii())
    }
}

/// One to three requests on one connection, sometimes cut short.
fn case() -> impl Strategy<Value = Case> {
    (proptest::collection::vec(request(), 1..4), proptest::option::weighted(0.1, 0usize..64)).prop_map(
        |(requests, cut)| {
            let mut bytes = requests.concat();
            if let Some(cut) = cut {
                bytes.truncate(bytes.len().saturating_sub(cut));
            }
            Case(bytes)
        },
    )
}

// ---------------------------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------------------------

/// Two fake IdPs whose tokens last for years.
async fn idps() -> [support::FakeIdp; 2] {
    const YEARS: u64 = 10 * 365 * 24 * 3600;
    [support::FakeIdp::start(YEARS).await, support::FakeIdp::start(YEARS).await]
}

/// A runtime for one test, whose clock is paused once the proxies hold their tokens.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().start_paused(false).build().expect("runtime")
}

#[test]
fn the_seed_corpus_gets_the_same_verdict_from_both_transports() {
    let runtime = runtime();
    runtime.block_on(async {
        let idp = idps().await;
        let pair = Pair::start(&idp).await;
        tokio::time::pause();
        for bytes in corpus() {
            let (direct, hyper) = pair.verdicts(&bytes).await;
            if let Err(disagreement) = compare(&bytes, &direct, &hyper) {
                panic!("{disagreement}");
            }
        }
        println!("seed corpus: {} cases, all agreed", corpus().len());
    });
}

/// The seed corpus's defects, checked for what they must give, not only for agreement.
#[test]
fn each_defect_of_the_corpus_gets_the_expected_verdict() {
    let runtime = runtime();
    runtime.block_on(async {
        let idp = idps().await;
        let pair = Pair::start(&idp).await;
        tokio::time::pause();
        let cases = corpus();
        // Smuggling through Connection: one request upstream, with the body as its body.
        for case in &cases[..2] {
            let (direct, _) = pair.verdicts(case).await;
            assert_eq!(direct.statuses, [200]);
            assert_eq!(direct.received.len(), 1, "{direct:?}");
            assert!(direct.received[0].body.starts_with("GET /api/admin"), "{direct:?}");
        }
        // Signed and NBSP-padded lengths, two Host headers, a malformed chunked body: 400, nothing forwarded.
        for case in [&cases[2], &cases[3], &cases[9], &cases[10]] {
            let (direct, hyper) = pair.verdicts(case).await;
            for verdict in [&direct, &hyper] {
                assert_eq!(verdict.statuses, [400], "{}", String::from_utf8_lossy(case));
                assert!(verdict.received.is_empty() || case == &cases[10], "{verdict:?}");
            }
        }
        // TRACE and TRACK: 405, never forwarded.
        for case in &cases[4..6] {
            let (direct, hyper) = pair.verdicts(case).await;
            assert_eq!((direct.statuses.as_slice(), direct.received.len()), (&[405][..], 0));
            assert_eq!(direct, hyper);
        }
        // Dot segments: /api/../admin is /admin (no route), ..%2f is refused.
        let (direct, _) = pair.verdicts(&cases[6]).await;
        assert_eq!((direct.statuses.as_slice(), direct.received.len()), (&[404][..], 0));
        let (direct, _) = pair.verdicts(&cases[8]).await;
        assert_eq!((direct.statuses.as_slice(), direct.received.len()), (&[400][..], 0));
    });
}

/// Replays one case given as escaped text in `TP_DIFFERENTIAL_CASE` (as a failure prints it), showing both verdicts.
#[test]
fn one_case_from_the_environment() {
    let Ok(text) = std::env::var("TP_DIFFERENTIAL_CASE") else { return };
    let bytes = unescape(&text);
    let runtime = runtime();
    runtime.block_on(async {
        let idps = idps().await;
        let pair = Pair::start(&idps).await;
        tokio::time::pause();
        let (direct, hyper) = pair.verdicts(&bytes).await;
        println!("direct: {direct:?}\nhyper:  {hyper:?}");
        compare(&bytes, &direct, &hyper).unwrap();
    });
}

/// The bytes of text escaped as `escape_ascii` writes it (`\r`, `\n`, `\t`, `\\`, `\"`, `\'`, `\xNN`).
fn unescape(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match bytes.next() {
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'0') => out.push(0),
            Some(b'x') => {
                let hex: String =
                    [bytes.next().unwrap_or(b'0'), bytes.next().unwrap_or(b'0')].iter().map(|&c| c as char).collect();
                out.push(u8::from_str_radix(&hex, 16).unwrap_or(0));
            }
            Some(other) => out.push(other),
            None => out.push(b'\\'),
        }
    }
    out
}

#[test]
fn generated_requests_get_the_same_verdict_from_both_transports() {
    let cases: u32 = std::env::var("TP_DIFFERENTIAL_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let seed: u64 = std::env::var("TP_DIFFERENTIAL_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    // The cases are shared between one thread per core, each with its own pair of proxies and its own stream of
    // cases (seed + thread number): the same cases for the same seed on a machine with as many cores.
    let threads: u32 = std::env::var("TP_DIFFERENTIAL_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()).min(8) as u32);
    let threads = threads.max(1);
    println!(
        "differential: {cases} generated cases on {threads} threads, seed {seed} (TP_DIFFERENTIAL_SEED={seed} \
         TP_DIFFERENTIAL_THREADS={threads} replays this run)"
    );
    let runs: Vec<_> = (0..threads)
        .map(|n| {
            let share = cases / threads + u32::from(n < cases % threads);
            std::thread::spawn(move || generated_cases(seed.wrapping_add(u64::from(n)), share))
        })
        .collect();
    let mut failures = Vec::new();
    for (n, run) in runs.into_iter().enumerate() {
        match run.join().expect("a differential thread") {
            Ok(()) => {}
            Err(failure) => failures.push(format!(
                "thread {n} (TP_DIFFERENTIAL_SEED={} TP_DIFFERENTIAL_THREADS=1 TP_DIFFERENTIAL_CASES={} replays it): \
                 {failure}",
                seed.wrapping_add(n as u64),
                cases / threads + u32::from((n as u32) < cases % threads),
            )),
        }
    }
    println!("differential: {cases} cases run, all agreed");
    assert!(failures.is_empty(), "seed {seed}: {}", failures.join("\n"));
}

/// `cases` generated requests from `seed`, each fed to both transports: the (shrunk) disagreement, if any.
fn generated_cases(seed: u64, cases: u32) -> Result<(), String> {
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config =
        ProptestConfig { cases, failure_persistence: None, max_shrink_iters: 2_000, ..ProptestConfig::default() };
    let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes));
    let runtime = runtime();
    let (pair, _idp) = runtime.block_on(async {
        let idp = idps().await;
        let pair = Pair::start(&idp).await;
        tokio::time::pause();
        (pair, idp)
    });
    let outcome = runner.run(&case(), |Case(bytes)| {
        let (direct, hyper) = runtime.block_on(pair.verdicts(&bytes));
        compare(&bytes, &direct, &hyper).map_err(TestCaseError::fail)
    });
    outcome.map_err(|failure| failure.to_string())
}
