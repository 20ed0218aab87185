//! Failure drill: an upstream that resets 5 % of its connections in the middle of a response, under load
//! (docs/benchmarks.md, "Failure drills"). Each affected request fails cleanly (a 502, or the bytes so far and a
//! closed connection), no other request is affected, and nothing leaks: the in-flight gauge is back to 0 and every
//! socket the drill opened is closed once the proxy's idle connections are gone. Runs on both HTTP/1.1 transports.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use support::{FakeIdp, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const BODY: usize = 2000;

/// A keep-alive HTTP/1.1 upstream answering `BODY` bytes; to a path with `/reset/` it sends the head and half the
/// body, then resets the connection (`SO_LINGER` 0). `open` counts its connections still open.
async fn resetting_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let open = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&open);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let count = Arc::clone(&count);
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut input = Vec::new();
                let mut buf = [0u8; 4096];
                'connection: loop {
                    let end = loop {
                        if let Some(at) = input.windows(4).position(|w| w == b"\r\n\r\n") {
                            break at + 4;
                        }
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break 'connection,
                            Ok(n) => input.extend_from_slice(&buf[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&input[..end]).into_owned();
                    input.drain(..end);
                    let reset = head.lines().next().is_some_and(|line| line.contains("/reset/"));
                    let response_head = format!("HTTP/1.1 200 OK\r\nContent-Length: {BODY}\r\n\r\n");
                    let body = vec![b'x'; if reset { BODY / 2 } else { BODY }];
                    if stream.write_all(response_head.as_bytes()).await.is_err()
                        || stream.write_all(&body).await.is_err()
                    {
                        break;
                    }
                    if reset {
                        let _ = stream.set_zero_linger();
                        break 'connection;
                    }
                }
                drop(stream);
                count.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, open)
}

fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|dir| dir.count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_resetting_5_percent_of_connections_fails_those_requests_only_and_leaks_nothing() {
    let idp = FakeIdp::start(300).await;
    let (upstream, upstream_open) = resetting_upstream().await;
    let config = format!(
        "[providers.api]\ntoken_url = \"{}\"\nclient_id = \"c\"\nclient_secret = \"s\"\n\
         [[routes]]\nname = \"api\"\nprefix = \"/api\"\nupstream = \"http://{upstream}\"\nprovider = \"api\"\n",
        idp.token_url()
    );
    let proxy = Proxy::start(&config).await;
    proxy.wait_ready().await;
    let baseline = open_descriptors();

    let client = HyperClient::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let total = 2000;
    let outcomes = futures_util::stream::iter(0..total)
        .map(|i| {
            let client = client.clone();
            let reset = i % 20 == 0;
            let url = proxy.url(&format!("/api/{}/{i}", if reset { "reset" } else { "ok" }));
            async move {
                let request = http::Request::get(url).body(Empty::new()).unwrap();
                let outcome = match client.request(request).await {
                    Err(_) => "no answer".to_owned(),
                    Ok(response) if response.status() != 200 => format!("status {}", response.status().as_u16()),
                    Ok(response) => match response.into_body().collect().await.map(|body| body.to_bytes().len()) {
                        Ok(BODY) => "complete".to_owned(),
                        Ok(length) => format!("short body {length}"),
                        Err(_) => "cut body".to_owned(),
                    },
                };
                (reset, outcome)
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let mut affected = std::collections::BTreeMap::new();
    for (reset, outcome) in &outcomes {
        if *reset {
            *affected.entry(outcome.clone()).or_insert(0) += 1;
        } else {
            assert_eq!(outcome, "complete", "a request on a healthy connection was affected");
        }
    }
    let resets = total / 20;
    println!(
        "drill: upstream resetting 5 % of connections mid-response: {total} requests, {resets} reset: {affected:?}"
    );
    assert!(!affected.contains_key("complete"), "a reset response never looks complete: {affected:?}");
    for outcome in affected.keys() {
        // A 502 when the reset came before the head reached the caller; else the caller's connection closes: with
        // the bytes so far, or (hyper writes a head with the first body bytes) before a head was sent.
        assert!(["status 502", "cut body", "no answer"].contains(&outcome.as_str()), "a clean failure: {outcome}");
    }

    // Nothing leaks: no request in flight, and once the callers are gone, the only sockets left are the proxy's
    // idle upstream connections (two descriptors each in this process: the proxy's end and the upstream's).
    drop(client);
    assert_eq!(proxy.metric("tokenproxy_inflight_requests").await, 0.0);
    let settled = async {
        // At most: the baseline may hold a descriptor that closes meanwhile (the IdP connection of the startup call).
        while open_descriptors() > baseline + 2 * upstream_open.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let settled = tokio::time::timeout(Duration::from_secs(10), settled).await;
    let (now, idle) = (open_descriptors(), upstream_open.load(Ordering::SeqCst));
    println!("drill: descriptors {baseline} before, {now} after, with {idle} idle upstream connections pooled");
    assert!(settled.is_ok(), "sockets leaked: {now} descriptors, baseline {baseline} + 2 × {idle} pooled");
    assert!(idle <= 2 * 128, "the pool keeps at most max_idle_upstream_connections per worker: {idle}");
    proxy.stop().await;
}
