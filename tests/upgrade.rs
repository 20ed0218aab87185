//! WebSockets through tokenproxy (src/proxy/hyper/upgrade.rs), with tokio-tungstenite on both ends: the token on the
//! handshake, the one replay after a 401 to it, 1,000 messages echoed through the tunnel, an upstream's refusal
//! passed on as it is, and an upgrade to a host no route names refused before anything is sent.

mod support;

use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use support::{eventually, FakeIdp, Proxy};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::Message;

/// A WebSocket echo server on 127.0.0.1 that requires `Authorization: Bearer tok-N` with N ≥ 2 on the handshake
/// (401 to `tok-1`, 403 without a token); it records every handshake's `Authorization`. Like Node's `ws` with a
/// `path` and most frameworks, it routes on the request target: a handshake in absolute form gets 400.
async fn echo_upstream() -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handshakes = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&handshakes);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                // The callback's type is tungstenite's, large error and all.
                #[allow(clippy::result_large_err)]
                let check = |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
                    let token = request.headers().get("authorization").map(|v| v.to_str().unwrap().to_owned());
                    seen.lock().unwrap().push(token.clone().unwrap_or_default());
                    let origin_form = request.uri().scheme().is_none() && request.uri().path().starts_with('/');
                    let status = match token.as_deref() {
                        _ if !origin_form => 400,
                        Some("Bearer tok-1") => 401,
                        Some(t) if t.starts_with("Bearer tok-") => return Ok(response),
                        _ => 403,
                    };
                    let mut refusal = ErrorResponse::new(Some("refused".to_owned()));
                    *refusal.status_mut() = http::StatusCode::from_u16(status).unwrap();
                    Err(refusal)
                };
                let Ok(mut socket) = tokio_tungstenite::accept_hdr_async(stream, check).await else { return };
                while let Some(Ok(message)) = socket.next().await {
                    if message.is_close() {
                        break;
                    }
                    if socket.send(message).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, handshakes)
}

fn config(idp: &FakeIdp, upstream: std::net::SocketAddr) -> String {
    format!(
        "[providers.api]\ntoken_url = \"{}\"\nclient_id = \"c\"\nclient_secret = \"s\"\n\
         [[routes]]\nname = \"ws\"\nhost = \"ws.local\"\nprefix = \"/ws\"\nstrip_prefix = true\n\
         upstream = \"http://{upstream}\"\nprovider = \"api\"\n\
         [[routes]]\nname = \"open\"\nhost = \"ws.local\"\nprefix = \"/open\"\nupstream = \"http://{upstream}\"\n",
        idp.token_url()
    )
}

#[tokio::test]
async fn a_websocket_gets_the_token_on_its_handshake_the_401_replay_and_1000_echoed_messages() {
    let idp = FakeIdp::start(300).await;
    let (upstream, handshakes) = echo_upstream().await;
    let proxy = Proxy::start(&config(&idp, upstream)).await;
    proxy.wait_ready().await;

    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let request = http::Request::get("ws://ws.local/ws/echo")
        .header("host", "ws.local")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", tokio_tungstenite::tungstenite::handshake::client::generate_key())
        .body(())
        .unwrap();
    let (mut socket, response) = tokio_tungstenite::client_async(request, stream).await.expect("the handshake");
    assert_eq!(response.status(), 101);
    assert_eq!(*handshakes.lock().unwrap(), ["Bearer tok-1", "Bearer tok-2"], "refused once, replayed once");

    for i in 0..1_000 {
        socket.send(Message::text(format!("message {i}"))).await.unwrap();
    }
    for i in 0..1_000 {
        let echoed = socket.next().await.expect("an echo").unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), format!("message {i}"));
    }
    socket.close(None).await.unwrap();
    assert_eq!(proxy.metric("tokenproxy_replays_total{outcome=\"success\",route=\"ws\"}").await, 1.0);
    assert_eq!(proxy.metric("tokenproxy_requests_total{route=\"ws\",status=\"101\"}").await, 1.0);
    assert_eq!(idp.calls(), 2);
    proxy.stop().await;
}

/// A raw HTTP/1.1 upgrade request, and the status line of the answer.
async fn raw_upgrade(proxy: &Proxy, host: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = stream.read(&mut answer).await.unwrap();
    String::from_utf8_lossy(&answer[..n]).lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn refusals_pass_through_and_an_upgrade_to_an_unnamed_host_goes_nowhere() {
    let idp = FakeIdp::start(300).await;
    let (upstream, handshakes) = echo_upstream().await;
    let proxy = Proxy::start(&config(&idp, upstream)).await;
    proxy.wait_ready().await;

    // A Host no route names, on a loopback listener: a rebound web page's (421), nothing sent.
    assert_eq!(raw_upgrade(&proxy, "elsewhere.example", "/ws/echo").await, "HTTP/1.1 421 Misdirected Request");
    assert!(handshakes.lock().unwrap().is_empty(), "nothing was sent anywhere");

    // A route without a token: the upstream refuses the handshake, and the caller gets that refusal as it is.
    assert_eq!(raw_upgrade(&proxy, "ws.local", "/open/echo").await, "HTTP/1.1 403 Forbidden");
    assert_eq!(*handshakes.lock().unwrap(), [""], "no token on a route without a provider");
    assert_eq!(proxy.metric("tokenproxy_requests_total{route=\"open\",status=\"403\"}").await, 1.0);
    // The raw handshake of a WebSocket client, through the token route.
    assert_eq!(raw_upgrade(&proxy, "WS.local:80", "/ws/echo").await, "HTTP/1.1 101 Switching Protocols");
    proxy.stop().await;
}

/// tokenproxy in front of the echo upstream with `server` keys of its own.
async fn start_with(idp: &FakeIdp, upstream: std::net::SocketAddr, server: &str) -> Proxy {
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server}\n[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        config(idp, upstream)
    );
    let proxy = Proxy::start_config(tokenproxy::config::Config::from_toml_str(&toml, "test.toml").unwrap()).await;
    proxy.wait_ready().await;
    proxy
}

/// A WebSocket through the proxy (its handshake replayed once: the echo upstream refuses `tok-1`).
async fn open_tunnel(proxy: &Proxy) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let request = http::Request::get("ws://ws.local/ws/echo")
        .header("host", "ws.local")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", tokio_tungstenite::tungstenite::handshake::client::generate_key())
        .body(())
        .unwrap();
    tokio_tungstenite::client_async(request, stream).await.expect("the handshake").0
}

#[tokio::test]
async fn tunnels_count_against_max_connections_and_are_never_evicted() {
    let idp = FakeIdp::start(300).await;
    let (upstream, _) = echo_upstream().await;
    let proxy = start_with(&idp, upstream, "max_connections = 3").await;
    let mut tunnels = Vec::new();
    for _ in 0..3 {
        tunnels.push(open_tunnel(&proxy).await);
    }
    // A fourth caller waits: every connection is a tunnel, and a tunnel is never closed to make room.
    let fourth = tokio::spawn({
        let addr = proxy.addr;
        async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            stream.write_all(b"GET /open/x HTTP/1.1\r\nHost: ws.local\r\nConnection: close\r\n\r\n").await.unwrap();
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer).await;
            String::from_utf8_lossy(&answer).into_owned()
        }
    });
    eventually("the three tunnels counted", std::time::Duration::from_secs(10), async || {
        proxy.metric("tokenproxy_open_tunnels").await == 3.0
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(!fourth.is_finished(), "the fourth caller was served while three tunnels held every connection");
    for tunnel in &mut tunnels {
        tunnel.send(Message::text("still here")).await.unwrap();
        assert_eq!(tunnel.next().await.unwrap().unwrap().into_text().unwrap().as_str(), "still here");
    }
    // One tunnel ends: the fourth caller gets its place.
    tunnels.pop().unwrap().close(None).await.unwrap();
    let answer = tokio::time::timeout(std::time::Duration::from_secs(10), fourth).await.expect("served").unwrap();
    assert!(answer.starts_with("HTTP/1.1 "), "{answer}");
    proxy.stop().await;
}

#[tokio::test]
async fn a_tunnel_with_no_byte_either_way_is_closed_after_tunnel_idle_timeout() {
    let idp = FakeIdp::start(300).await;
    let (upstream, _) = echo_upstream().await;
    let proxy = start_with(&idp, upstream, "tunnel_idle_timeout = \"300ms\"").await;
    let mut tunnel = open_tunnel(&proxy).await;
    // Bytes keep it open…
    for _ in 0..4 {
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        tunnel.send(Message::text("ping")).await.unwrap();
        assert!(tunnel.next().await.unwrap().is_ok());
    }
    // …silence closes it.
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), tunnel.next()).await.expect("closed");
    assert!(!matches!(ended, Some(Ok(Message::Text(_)))), "{ended:?}");
    proxy.stop().await;
}
