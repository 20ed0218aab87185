//! The hyper transport end to end: the 401 replay for an h2c caller and for a TLS upstream that speaks h2 (trusted
//! through the route's `ca_file`, with certificates made here by rcgen), and callers that hang up while the upstream
//! stalls, over HTTP/1.1 (both transports) and h2 (`RST_STREAM`): the exchange is cancelled, the upstream connection
//! closed and `tokenproxy_inflight_requests` back to 0.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::tls::{Ca, TlsUpstream};
use support::{basic_config, eventually, FakeIdp, FakeUpstream, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

/// Waits until `tokenproxy_inflight_requests` is `n`.
async fn wait_inflight(proxy: &Proxy, n: f64) {
    eventually(format!("the in-flight gauge at {n}"), WAIT, async || {
        proxy.metric("tokenproxy_inflight_requests").await == n
    })
    .await;
}

#[tokio::test]
async fn an_h2c_caller_gets_the_one_replay_after_a_401() {
    let idp = FakeIdp::start(300).await;
    let upstream = FakeUpstream::start().await;
    let proxy = Proxy::start(&basic_config(&idp, &upstream)).await;
    proxy.wait_ready().await;
    upstream.revoke("tok-1");
    let h2 = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).http2_only(true).build_http();
    let request = Request::post(proxy.url("/api/orders")).body(Full::new(Bytes::from("an h2 body"))).unwrap();
    let response = h2.request(request).await.unwrap();
    assert_eq!((response.version(), response.status()), (http::Version::HTTP_2, StatusCode::OK));
    let body: serde_json::Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["token"], "tok-2");
    assert_eq!(body["body"], "an h2 body", "the replayed body is intact");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2, "the first attempt and its replay");
    assert_eq!(seen[0].headers["authorization"], "Bearer tok-1");
    assert_eq!(seen[1].headers["authorization"], "Bearer tok-2");
    assert_eq!(proxy.metric("tokenproxy_replays_total{outcome=\"success\",route=\"api\"}").await, 1.0);
    assert_eq!(idp.calls(), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn a_tls_upstream_trusted_through_ca_file_gets_the_replay_over_h2() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("tokenproxy test CA");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let upstream = TlsUpstream::start(&ca.leaf(&["127.0.0.1"]), &[]).await;
    let addr = upstream.addr;
    let seen = || upstream.seen().iter().map(|s| format!("{} {}", s.version, s.authorization)).collect::<Vec<_>>();
    let idp = FakeIdp::start(300).await;
    let config = format!(
        "[providers.api]\ntoken_url = \"{}\"\nclient_id = \"c\"\nclient_secret = \"s\"\n\
         [[routes]]\nname = \"private\"\nprefix = \"/private\"\nupstream = \"https://{addr}\"\nprovider = \"api\"\n\
         strip_prefix = true\nca_file = \"{}\"\n\
         [[routes]]\nname = \"public\"\nprefix = \"/public\"\nupstream = \"https://{addr}\"\nprovider = \"api\"\n",
        idp.token_url(),
        ca_file.display()
    );
    let proxy = Proxy::start(&config).await;
    proxy.wait_ready().await;
    let client = support::Client::new();

    let reply = client.get(&proxy.url("/private/x")).await;
    assert_eq!((reply.status, reply.text().as_str()), (200, "HTTP/2.0 Bearer tok-2"), "replayed over h2");
    assert_eq!(seen(), ["HTTP/2.0 Bearer tok-1", "HTTP/2.0 Bearer tok-2"]);
    assert_eq!(proxy.metric("tokenproxy_replays_total{outcome=\"success\",route=\"private\"}").await, 1.0);

    // Without the route's CA bundle, the private CA is not trusted: 502, and nothing reaches the upstream.
    let reply = client.get(&proxy.url("/public/x")).await;
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert_eq!(reply.headers["x-tokenproxy-error"], "upstream_unreachable");
    assert!(reply.text().to_ascii_lowercase().contains("certificate"), "{}", reply.text());
    assert_eq!(seen().len(), 2);
    proxy.stop().await;
}

/// An upstream that accepts connections and reads requests but never answers; it reports each connection it sees
/// closed by the proxy.
async fn stalled_upstream() -> (SocketAddr, mpsc::UnboundedReceiver<()>, mpsc::UnboundedReceiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (got_request, requests) = mpsc::unbounded_channel();
    let (closed, closes) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (got_request, closed) = (got_request.clone(), closed.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let _ = got_request.send(());
                        }
                    }
                }
                let _ = closed.send(());
            });
        }
    });
    (addr, requests, closes)
}

async fn start_with_stalled_upstream() -> (FakeIdp, Proxy, mpsc::UnboundedReceiver<()>, mpsc::UnboundedReceiver<()>) {
    let (addr, requests, closes) = stalled_upstream().await;
    let idp = FakeIdp::start(300).await;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrequest_timeout = \"60s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [providers.api]\ntoken_url = \"{}\"\nclient_id = \"c\"\nclient_secret = \"s\"\n\
         [[routes]]\nname = \"api\"\nprefix = \"/\"\nupstream = \"http://{addr}\"\nprovider = \"api\"\n",
        idp.token_url()
    );
    let config = tokenproxy::config::Config::from_toml_str(&config, "test.toml").unwrap();
    let proxy = Proxy::start_config(config).await;
    proxy.wait_ready().await;
    (idp, proxy, requests, closes)
}

#[tokio::test]
async fn a_caller_hanging_up_cancels_its_upstream_exchange_on_both_http1_transports() {
    let (_idp, proxy, mut requests, mut closes) = start_with_stalled_upstream().await;
    // A plain request (the h1 transport), a chunked one and an HTTP/1.0 one (both handed to hyper).
    let cases: [&[u8]; 3] = [
        b"GET /stall HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"POST /stall HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"GET /stall HTTP/1.0\r\nHost: localhost\r\n\r\n",
    ];
    for case in cases {
        let mut caller = TcpStream::connect(proxy.addr).await.unwrap();
        caller.write_all(case).await.unwrap();
        tokio::time::timeout(WAIT, requests.recv()).await.expect("the request reached the upstream");
        wait_inflight(&proxy, 1.0).await;
        drop(caller);
        tokio::time::timeout(WAIT, closes.recv()).await.expect("the upstream connection is closed");
        wait_inflight(&proxy, 0.0).await;
    }
    assert_eq!(proxy.metric("tokenproxy_requests_total{route=\"api\",status=\"499\"}").await, 3.0);
    proxy.stop().await;
}

#[tokio::test]
async fn an_h2_caller_resetting_its_stream_cancels_the_upstream_exchange() {
    let (_idp, proxy, mut requests, mut closes) = start_with_stalled_upstream().await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = Request::get(format!("http://{}/stall", proxy.addr)).body(Full::default()).unwrap();
    let pending = tokio::spawn(async move {
        let _ = sender.send_request(request).await;
    });
    tokio::time::timeout(WAIT, requests.recv()).await.expect("the request reached the upstream");
    wait_inflight(&proxy, 1.0).await;
    // Dropping the response future resets the stream (RST_STREAM); the h2 connection itself stays up.
    pending.abort();
    tokio::time::timeout(WAIT, closes.recv()).await.expect("the upstream connection is closed");
    wait_inflight(&proxy, 0.0).await;
    proxy.stop().await;
}
