//! The listeners' edges, tried as a hostile web page and a hostile peer would, with raw bytes on TCP and raw h2
//! frames: DNS rebinding (a `Host` that names neither the listener nor a route gets 421 on the proxy, admin and
//! vending listeners, and nothing is forwarded or handed out). Run on both HTTP/1.1 transports (`scripts/test` runs
//! it again with `TP_TEST_HTTP1=hyper`) and over h2c.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use support::{basic_config, eventually, raw_exchange, FakeIdp, FakeUpstream, Proxy, TokenProxyProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn status(answer: &str) -> u16 {
    answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// A proxy with a vended provider, a route without `host` at `/api` and one naming `api.example.test`, and the
/// vending listener on loopback; `server` and `admin` are extra lines of those tables.
async fn rebinding_target(idp: &FakeIdp, upstream: &FakeUpstream, server: &str, admin: &str) -> Proxy {
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server}\n[admin]\nlisten = \"127.0.0.1:0\"\n{admin}\n\
         [vending]\nlisten = \"127.0.0.1:0\"\n\
         [providers.api]\ntoken_url = \"{}\"\nclient_id = \"c\"\nclient_secret = \"s3cret-value\"\nvend = true\n\
         [[routes]]\nname = \"api\"\nprefix = \"/api\"\nupstream = \"{}\"\nprovider = \"api\"\n\
         [[routes]]\nname = \"named\"\nhost = \"api.example.test\"\nprefix = \"/\"\nupstream = \"{}\"\nprovider = \"api\"\n",
        idp.token_url(),
        upstream.url(),
        upstream.url()
    );
    let config = tokenproxy::config::Config::from_toml_str(&toml, "test.toml").unwrap();
    let proxy = Proxy::start_config(config).await;
    proxy.wait_ready().await;
    proxy
}

#[tokio::test]
async fn a_rebound_web_page_gets_421_from_every_loopback_listener_and_nothing_else() {
    let (idp, upstream) = (FakeIdp::start(300).await, FakeUpstream::start().await);
    let proxy = rebinding_target(&idp, &upstream, "", "").await;
    let vending = proxy.vending.expect("the vending listener");
    let calls = idp.calls();
    // What a page at http://evil.example:PORT sends once its name points at 127.0.0.1.
    let page = |port: u16| {
        format!(
            "Host: evil.example:{port}\r\nOrigin: http://evil.example:{port}\r\nSec-Fetch-Site: same-origin\r\n\
             Connection: close\r\n"
        )
    };
    let answer = raw_exchange(
        vending,
        &format!("GET /v1/token/api HTTP/1.1\r\n{}Metadata-Flavor: tokenproxy\r\n\r\n", page(vending.port())),
    )
    .await;
    assert_eq!(status(&answer), 421, "{answer}");
    assert!(answer.contains("misdirected_request") && !answer.contains("tok-"), "{answer}");
    for path in ["/tokens/api/refresh", "/admin/reload"] {
        let answer = raw_exchange(
            proxy.admin,
            &format!("POST {path} HTTP/1.1\r\n{}Content-Length: 0\r\n\r\n", page(proxy.admin.port())),
        )
        .await;
        assert_eq!(status(&answer), 421, "{path}: {answer}");
        assert!(answer.contains("application/problem+json"), "{answer}");
    }
    let answer = raw_exchange(proxy.addr, &format!("GET /api/x HTTP/1.1\r\n{}\r\n", page(proxy.addr.port()))).await;
    assert_eq!(status(&answer), 421, "{answer}");
    assert!(answer.contains("x-tokenproxy-error: misdirected_request"), "{answer}");
    assert_eq!(upstream.requests(), 0, "nothing was forwarded");
    assert_eq!(idp.calls(), calls, "no refresh was forced");
    assert_eq!(proxy.metric("tokenproxy_misdirected_requests_total{listener=\"vending\"}").await, 1.0);
    assert_eq!(proxy.metric("tokenproxy_misdirected_requests_total{listener=\"admin\"}").await, 2.0);
    assert_eq!(proxy.metric("tokenproxy_misdirected_requests_total{listener=\"proxy\"}").await, 1.0);
    proxy.stop().await;
}

#[tokio::test]
async fn local_names_ip_literals_and_route_hosts_pass_and_forwarded_requests_get_no_token() {
    let (idp, upstream) = (FakeIdp::start(300).await, FakeUpstream::start().await);
    let proxy = rebinding_target(&idp, &upstream, "", "").await;
    let vending = proxy.vending.expect("the vending listener");
    for host in ["localhost", "LocalHost:8080", "127.0.0.1", "[::1]:1", "10.9.8.7", "app.localhost"] {
        let answer =
            raw_exchange(proxy.addr, &format!("GET /api/x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"))
                .await;
        assert_eq!(status(&answer), 200, "{host}: {answer}");
        let answer =
            raw_exchange(vending, &format!("GET /v1/token/api HTTP/1.1\r\nHost: {host}\r\nMetadata-Flavor: tokenproxy\r\nConnection: close\r\n\r\n"))
                .await;
        assert_eq!(status(&answer), 200, "{host}: {answer}");
        let answer =
            raw_exchange(proxy.admin, &format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"))
                .await;
        assert_eq!(status(&answer), 200, "{host}: {answer}");
    }
    // A host a route names is the proxy's to answer; without a Host at all (HTTP/1.0), nothing to check.
    let answer =
        raw_exchange(proxy.addr, "GET /x HTTP/1.1\r\nHost: api.example.test:8080\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status(&answer), 200, "{answer}");
    assert_eq!(status(&raw_exchange(proxy.addr, "GET /api/x HTTP/1.0\r\n\r\n").await), 200);
    // Absolute form keeps its own rule: a host no route names is 403, as before.
    let answer = raw_exchange(
        proxy.addr,
        "GET http://evil.example/api/x HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&answer), 403, "{answer}");
    // A request that came through a forwarding proxy is not a local application's.
    for header in ["X-Forwarded-For: 127.0.0.1", "Forwarded: for=127.0.0.1"] {
        let answer = raw_exchange(
            vending,
            &format!("GET /v1/token/api HTTP/1.1\r\nHost: localhost\r\nMetadata-Flavor: tokenproxy\r\n{header}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(status(&answer), 403, "{header}: {answer}");
        assert!(!answer.contains("tok-"), "{answer}");
    }
    assert_eq!(proxy.metric("tokenproxy_misdirected_requests_total").await, 0.0);
    proxy.stop().await;
}

#[tokio::test]
async fn allowed_hosts_add_names_and_a_star_turns_the_check_off() {
    let (idp, upstream) = (FakeIdp::start(300).await, FakeUpstream::start().await);
    let server = "allowed_hosts = [\"dev.internal\", \"*.corp.test\"]";
    let proxy = rebinding_target(&idp, &upstream, server, "allowed_hosts = [\"*\"]").await;
    let get = |host: &str| format!("GET /api/x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    assert_eq!(status(&raw_exchange(proxy.addr, &get("dev.internal:8080")).await), 200);
    assert_eq!(status(&raw_exchange(proxy.addr, &get("a.corp.test")).await), 200);
    assert_eq!(status(&raw_exchange(proxy.addr, &get("evil.example")).await), 421);
    let answer =
        raw_exchange(proxy.admin, "GET /healthz HTTP/1.1\r\nHost: anything.example\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status(&answer), 200, "admin.allowed_hosts = [\"*\"]: {answer}");
    proxy.stop().await;
}

#[tokio::test]
async fn an_h2c_request_naming_another_host_in_its_authority_gets_421() {
    let (idp, upstream) = (FakeIdp::start(300).await, FakeUpstream::start().await);
    let proxy = Proxy::start(&basic_config(&idp, &upstream)).await;
    proxy.wait_ready().await;
    let port = proxy.addr.port();
    let send = |authority: String| {
        async move {
            // The connection goes to the proxy; the request names `authority`.
            let request =
                http::Request::get(format!("http://{authority}/api/x")).body(Full::<Bytes>::default()).unwrap();
            let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let (mut sender, connection) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(stream),
            )
            .await
            .unwrap();
            tokio::spawn(connection);
            let response = sender.send_request(request).await.unwrap();
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
    };
    let (status, body) = send(format!("evil.example:{port}")).await;
    assert_eq!(status, 421, "{body}");
    assert!(body.contains("misdirected_request"), "{body}");
    assert_eq!(send(format!("localhost:{port}")).await.0, 200);
    assert_eq!(upstream.requests(), 1);
    proxy.stop().await;
}

/// A proxy whose `[server]` table has `server` besides its address (route `/api` with a token).
async fn proxy_with(idp: &FakeIdp, upstream: &FakeUpstream, server: &str) -> Proxy {
    let direct = !support::hyper_only();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nh1_transport = {direct}\n{server}\n[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        basic_config(idp, upstream)
    );
    let proxy = Proxy::start_config(tokenproxy::config::Config::from_toml_str(&toml, "test.toml").unwrap()).await;
    proxy.wait_ready().await;
    proxy
}

/// The client connection preface of h2 (RFC 9113 §3.4) and an empty SETTINGS frame.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";

/// A HEADERS frame on stream 1 for `GET path` at `authority`, ending the stream (HPACK literals, no Huffman).
fn h2_get(authority: &str, path: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x86]; // :method GET, :scheme http (static table)
    for (index, value) in [(4u8, path), (1u8, authority)] {
        block.push(index); // literal without indexing, name from the static table (:path, :authority)
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    let mut frame = vec![0, 0, block.len() as u8, 0x1, 0x5, 0, 0, 0, 1]; // HEADERS, END_STREAM | END_HEADERS
    frame.extend_from_slice(&block);
    frame
}

/// Reads h2 frames until the peer closes; their types in order.
async fn h2_frames_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut bytes))
        .await
        .expect("the connection was closed")
        .ok();
    let mut types = Vec::new();
    let mut at = 0;
    while at + 9 <= bytes.len() {
        let length = usize::from(bytes[at]) << 16 | usize::from(bytes[at + 1]) << 8 | usize::from(bytes[at + 2]);
        types.push(bytes[at + 3]);
        at += 9 + length;
    }
    types
}

/// Waits for the peer to close `stream` (bounded generously: the timeouts under test are far shorter).
async fn closed(stream: &mut TcpStream) -> bool {
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await.is_ok()
}

#[tokio::test]
async fn zero_byte_connections_cannot_keep_healthz_from_answering() {
    let (idp, upstream) = (FakeIdp::start(300).await, FakeUpstream::start().await);
    let proxy = proxy_with(&idp, &upstream, "").await;
    // More connections than the admin listener serves at once (64), none of which sends a byte.
    let mut silent = Vec::new();
    for _ in 0..80 {
        silent.push(TcpStream::connect(proxy.admin).await.unwrap());
    }
    // The kubelet's probe is answered at once (the admin listener's own timeouts are 5 s: eviction, not a timeout,
    // made room).
    let probe = raw_exchange(proxy.admin, "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    let answer = tokio::time::timeout(Duration::from_secs(4), probe).await.expect("/healthz answered");
    assert_eq!(status(&answer), 200, "{answer}");
    assert!(proxy.metric("tokenproxy_connections_evicted_total{listener=\"admin\"}").await >= 1.0);
    proxy.stop().await;
}

#[tokio::test]
async fn at_max_connections_idle_h2c_connections_give_way_to_a_new_caller() {
    let (idp, upstream) = (FakeIdp::start(300).await, FakeUpstream::start().await);
    let proxy = proxy_with(&idp, &upstream, "max_connections = 20\nheader_read_timeout = \"60s\"").await;
    // Twenty connections that sent the h2 preface and an empty SETTINGS frame, and nothing more.
    let mut idle = Vec::new();
    for _ in 0..20 {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(H2_PREFACE).await.unwrap();
        idle.push(stream);
    }
    // A new caller is served (the timeouts are a minute: the longest-idle connection made room).
    let get = raw_exchange(proxy.addr, "GET /api/x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let answer = tokio::time::timeout(Duration::from_secs(5), get).await.expect("the new caller was served");
    assert_eq!(status(&answer), 200, "{answer}");
    assert!(closed(&mut idle[0]).await, "the longest idle connection was closed");
    assert!(proxy.metric("tokenproxy_connections_evicted_total{listener=\"proxy\"}").await >= 1.0);
    proxy.stop().await;
}

#[tokio::test]
async fn connections_that_send_nothing_are_closed_after_header_read_timeout() {
    let (idp, upstream) = (FakeIdp::start(300).await, FakeUpstream::start().await);
    let proxy = proxy_with(&idp, &upstream, "header_read_timeout = \"300ms\"").await;
    let mut silent = TcpStream::connect(proxy.addr).await.unwrap();
    assert!(closed(&mut silent).await, "a connection that never sends a byte is closed");
    // Also one that sent only the h2 preface: its first request head never came.
    let mut preface_only = TcpStream::connect(proxy.addr).await.unwrap();
    preface_only.write_all(H2_PREFACE).await.unwrap();
    assert!(closed(&mut preface_only).await);
    proxy.stop().await;
}

#[tokio::test]
async fn an_idle_connection_waits_keepalive_timeout_not_header_read_timeout() {
    let (idp, upstream) = (FakeIdp::start(300).await, FakeUpstream::start().await);
    let proxy = proxy_with(&idp, &upstream, "header_read_timeout = \"200ms\"\nkeepalive_timeout = \"3s\"").await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(b"GET /api/x HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    // Well past header_read_timeout, well before keepalive_timeout: the connection is still there.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stream.write_all(b"GET /api/y HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&rest).matches("HTTP/1.1 200").count(), 1, "the second request was served");
    proxy.stop().await;
}

#[tokio::test]
async fn an_idle_h2c_connection_gets_goaway_then_closes_after_keepalive_timeout() {
    let (idp, upstream) = (FakeIdp::start(300).await, FakeUpstream::start().await);
    let proxy = proxy_with(&idp, &upstream, "keepalive_timeout = \"300ms\"").await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(H2_PREFACE).await.unwrap();
    stream.write_all(&h2_get("localhost", "/api/x")).await.unwrap();
    let frames = h2_frames_until_closed(&mut stream).await;
    const HEADERS: u8 = 0x1;
    const GOAWAY: u8 = 0x7;
    let answered = frames.iter().position(|&t| t == HEADERS).expect("the request was answered");
    let goaway = frames.iter().rposition(|&t| t == GOAWAY).expect("a GOAWAY before the close");
    assert!(answered < goaway, "{frames:?}");
    assert_eq!(upstream.requests(), 1);
    proxy.stop().await;
}

/// An HTTP/1.1 upstream that answers every request's head at once and holds its body until released, counting the
/// connections it accepted and the most requests it held at once.
struct HoldingUpstream {
    addr: SocketAddr,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    held: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    most_held: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    release: tokio::sync::watch::Sender<bool>,
}

impl HoldingUpstream {
    async fn start() -> HoldingUpstream {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (release, released) = tokio::sync::watch::channel(false);
        let counters = (
            std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        );
        let (accepted, held, most_held) = counters.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                accepted.fetch_add(1, SeqCst);
                let (held, most_held, mut released) = (held.clone(), most_held.clone(), released.clone());
                tokio::spawn(async move {
                    let mut buffer = Vec::new();
                    loop {
                        let mut chunk = [0u8; 4096];
                        match stream.read(&mut chunk).await {
                            Ok(n) if n > 0 => buffer.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                        while let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                            buffer.drain(..end + 4);
                            let now = held.fetch_add(1, SeqCst) + 1;
                            most_held.fetch_max(now, SeqCst);
                            if stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n").await.is_err() {
                                return;
                            }
                            let _ = released.wait_for(|r| *r).await;
                            held.fetch_sub(1, SeqCst);
                            if stream.write_all(b"ok").await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        let (accepted, held, most_held) = counters;
        HoldingUpstream { addr, accepted, held, most_held, release }
    }

    async fn wait_held(&self, n: usize) {
        eventually(format!("the upstream to hold {n} requests"), Duration::from_secs(10), async || {
            self.held.load(std::sync::atomic::Ordering::SeqCst) >= n
        })
        .await;
    }
}

async fn bounded_proxy(idp: &FakeIdp, upstream: &HoldingUpstream, request_timeout: &str) -> Proxy {
    let direct = !support::hyper_only();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nh1_transport = {direct}\nrequest_timeout = \"{request_timeout}\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\
         [providers.api]\ntoken_url = \"{}\"\nclient_id = \"c\"\nclient_secret = \"s\"\n\
         [[routes]]\nprefix = \"/api\"\nupstream = \"http://{}\"\nprovider = \"api\"\nmax_upstream_connections = 4\n",
        idp.token_url(),
        upstream.addr
    );
    let proxy = Proxy::start_config(tokenproxy::config::Config::from_toml_str(&toml, "test.toml").unwrap()).await;
    proxy.wait_ready().await;
    proxy
}

#[tokio::test]
async fn one_h2_caller_with_many_streams_opens_at_most_max_upstream_connections() {
    let (idp, upstream) = (FakeIdp::start(300).await, HoldingUpstream::start().await);
    let proxy = bounded_proxy(&idp, &upstream, "30s").await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let mut calls = Vec::new();
    for i in 0..40 {
        let mut sender = sender.clone();
        let uri = format!("http://localhost/api/{i}");
        calls.push(tokio::spawn(async move {
            let response = sender.send_request(http::Request::get(uri).body(Full::<Bytes>::default()).unwrap()).await;
            let response = response.unwrap();
            let status = response.status().as_u16();
            assert_eq!(response.into_body().collect().await.unwrap().to_bytes(), "ok");
            status
        }));
    }
    upstream.wait_held(4).await;
    // The other 36 streams wait for a place: no fifth upstream connection is opened meanwhile.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(upstream.accepted.load(std::sync::atomic::Ordering::SeqCst), 4);
    upstream.release.send(true).unwrap();
    for call in calls {
        assert_eq!(call.await.unwrap(), 200);
    }
    // (Every response's head came at once; its body, and with it its place, was held until the release.)
    assert_eq!(upstream.most_held.load(std::sync::atomic::Ordering::SeqCst), 4);
    proxy.stop().await;
}

#[tokio::test]
async fn callers_beyond_max_upstream_connections_wait_then_get_503_upstream_busy() {
    let (idp, upstream) = (FakeIdp::start(300).await, HoldingUpstream::start().await);
    let proxy = bounded_proxy(&idp, &upstream, "1s").await;
    // Four responses stream slowly (their heads came; their bodies are held), and hold the four places.
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..6 {
        let addr = proxy.addr;
        calls.spawn(async move {
            raw_exchange(addr, &format!("GET /api/{i} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")).await
        });
    }
    // The two others wait for a place for their request_timeout, then get 503 upstream_busy.
    for _ in 0..2 {
        let answer = calls.join_next().await.unwrap().unwrap();
        assert_eq!(status(&answer), 503, "{answer}");
        assert!(answer.contains("upstream_busy") && answer.contains("retry-after: 1"), "{answer}");
    }
    assert_eq!(upstream.accepted.load(std::sync::atomic::Ordering::SeqCst), 4);
    upstream.release.send(true).unwrap();
    while let Some(answer) = calls.join_next().await {
        let answer = answer.unwrap();
        assert!(status(&answer) == 200 && answer.ends_with("ok"), "{answer}");
    }
    assert_eq!(upstream.most_held.load(std::sync::atomic::Ordering::SeqCst), 4);
    proxy.stop().await;
}

#[tokio::test]
async fn text_from_a_peer_reaches_neither_log_format_raw() {
    let (idp, upstream) = (FakeIdp::start(300).await, FakeUpstream::start().await);
    for (format, escapes) in [
        ("json", ["\\u009b", "\\u0085", "\\u2028", "\\u202e"]),
        ("pretty", ["\\u{9b}", "\\u{85}", "\\u{2028}", "\\u{202e}"]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenproxy.toml");
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[log]\nformat = \"{format}\"\n\
             access = true\n[state]\ndir = \"{}\"\n{}",
            dir.path().join("state").display(),
            basic_config(&idp, &upstream)
        );
        std::fs::write(&path, toml).unwrap();
        let mut proxy = TokenProxyProcess::run(&path, &[]).await;
        proxy.wait_ready().await;
        // A path with a C1 CSI, NEL, a line separator and a right-to-left override, and a request id with a CSI.
        let evil = "/api/a\u{9b}31mred\u{85}b\u{2028}c\u{202e}txt";
        let request =
            format!("GET {evil} HTTP/1.1\r\nHost: localhost\r\nX-Request-Id: id\u{9b}2J\r\nConnection: close\r\n\r\n");
        let answer = raw_exchange(proxy.addr, &request).await;
        assert!(status(&answer) > 0, "{answer}");
        assert_eq!(proxy.terminate().await.code(), Some(0), "clean exit");
        let log = proxy.logs();
        let access: Vec<&str> = log.lines().filter(|line| line.contains("/api/a")).collect();
        assert!(!access.is_empty(), "{format}: the access line: {log}");
        for c in ['\u{9b}', '\u{85}', '\u{2028}', '\u{202e}'] {
            assert!(!log.contains(c), "{format}: a raw U+{:04X} in the log: {log:?}", c as u32);
        }
        for escape in escapes {
            assert!(access.iter().any(|line| line.contains(escape)), "{format}: {escape} in {access:?}");
        }
        if format == "json" {
            for line in &access {
                serde_json::from_str::<serde_json::Value>(line).expect("each line is still JSON");
            }
        }
    }
}

#[tokio::test]
async fn an_idp_answering_tiny_lifetimes_gets_at_most_one_call_per_min_refresh_interval() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    // A hostile (or broken) IdP: every token lives a millisecond.
    let calls = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&calls);
    let (idp, _stop) = support::spawn_server(move |_request| {
        counted.fetch_add(1, Ordering::SeqCst);
        async {
            support::json_response(
                http::StatusCode::OK,
                serde_json::json!({ "access_token": "t", "token_type": "Bearer", "expires_in": 0.001 }),
            )
        }
    })
    .await;
    let upstream = FakeUpstream::start().await;
    let toml = format!(
        "[providers.api]\ntoken_url = \"http://{idp}/token\"\nclient_id = \"c\"\nclient_secret = \"s\"\ntimeout = \"200ms\"\n\
         [[routes]]\nprefix = \"/api\"\nupstream = \"{}\"\nprovider = \"api\"\n",
        upstream.url()
    );
    let proxy = Proxy::start(&toml).await;
    // Steady traffic for the whole measurement (the seconds can be raised to measure longer).
    let seconds: u64 = std::env::var("TP_TINY_LIFETIME_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let until = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let client = support::Client::new();
    let mut requests = 0;
    while tokio::time::Instant::now() < until {
        let _ = client.get(&proxy.url("/api/x")).await;
        requests += 1;
    }
    let made = calls.load(Ordering::SeqCst);
    println!("IdP answering expires_in 0.001: {made} token calls in {seconds} s under {requests} requests");
    assert!(made as u64 <= seconds + 1, "{made} token calls in {seconds} s");
    proxy.stop().await;
}

#[tokio::test]
async fn a_spent_token_budget_keeps_the_token_in_hand_then_answers_503_until_the_window_ends() {
    // One-second tokens and a budget of two calls an hour: the startup call and one refresh, then no more.
    let (idp, upstream) = (FakeIdp::start(1).await, FakeUpstream::start().await);
    let toml = basic_config(&idp, &upstream)
        .replace("client_secret = \"s3cret-value\"\n", "client_secret = \"s3cret-value\"\nmax_token_calls = \"2/h\"\n");
    let proxy = Proxy::start(&toml).await;
    proxy.wait_ready().await;
    idp.wait_calls(2).await;
    // The budget refuses the next refresh; once the token in hand runs out, requests get the budget's answer.
    let reply = eventually("the token to run out (503)", Duration::from_secs(10), async || {
        let reply = support::Client::new().get(&proxy.url("/api/x")).await;
        (reply.status == 503).then_some(reply)
    })
    .await;
    assert_eq!(reply.headers["x-tokenproxy-error"], "token_budget_exhausted", "{}", reply.text());
    let retry_after: u64 = reply.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=3600).contains(&retry_after), "until the hour's window ends: {retry_after}");
    assert_eq!(idp.calls(), 2, "no call beyond the budget");
    assert!(proxy.metric("tokenproxy_token_budget_exhausted_total{provider=\"api\"}").await >= 1.0);
    proxy.stop().await;
}
