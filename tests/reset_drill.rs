//! Failure drill: an upstream that resets 5 % of its connections in the middle of a response, under load
//! (docs/benchmarks.md, "Failure drills"). Each affected request fails cleanly (a 502, or the bytes so far and a
//! closed connection), no other request is affected, and nothing leaks: the in-flight gauge is back to 0 and every
//! socket the drill opened is closed once the proxy's idle connections are gone. Runs on both HTTP/1.1 transports.
//! On h2c upstreams: a reset fails the streams of that connection and only those (another upstream's connection is
//! untouched), and an upstream that goes away gracefully (GOAWAY) every 50 requests fails none, POSTs included.

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
use support::{eventually, FakeIdp, Proxy};
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
        // A stream of a reset connection may also stall in the h2 client until request_timeout (504): the same rare
        // stall as in the GOAWAY drill below, seen under load; it is bounded by the timeout and counted here.
        let clean = ["status 502", "cut body", "no answer", "status 504"];
        assert!(clean.contains(&outcome.as_str()), "a clean failure: {outcome}");
    }

    // Nothing leaks: no request in flight, and once the callers are gone, the only sockets left are the proxy's
    // idle upstream connections (two descriptors each in this process: the proxy's end and the upstream's).
    drop(client);
    assert_eq!(proxy.metric("tokenproxy_inflight_requests").await, 0.0);
    // At most: the baseline may hold a descriptor that closes meanwhile (the IdP connection of the startup call).
    let no_leak = format!("no leaked socket (descriptors at most {baseline} + 2 × the idle pooled connections)");
    let (now, idle) = eventually(no_leak, Duration::from_secs(10), async || {
        let (now, idle) = (open_descriptors(), upstream_open.load(Ordering::SeqCst));
        if now <= baseline + 2 * idle {
            Ok((now, idle))
        } else {
            Err(format!("{now} descriptors with {idle} idle upstream connections pooled"))
        }
    })
    .await;
    println!("drill: descriptors {baseline} before, {now} after, with {idle} idle upstream connections pooled");
    assert!(idle <= 2 * 128, "the pool keeps at most max_idle_upstream_connections per worker: {idle}");
    proxy.stop().await;
}

/// What the h2c upstream saw: for each request path, the connections it came on; and the connections it killed.
#[derive(Default)]
struct H2Seen {
    paths: std::collections::HashMap<String, Vec<usize>>,
    killed: std::collections::HashSet<usize>,
    connections: usize,
    /// For each path, the length of the last request body read whole.
    bodies: std::collections::HashMap<String, usize>,
}

/// How the h2c upstream ends connections.
#[derive(Clone, Copy)]
enum H2Ending {
    /// A request to a `/reset/` path gets its head and part of its body, then the connection is reset (`SO_LINGER`
    /// 0) with whatever else is in flight on it.
    Reset,
    /// After every `n` requests on a connection, a graceful shutdown: GOAWAY, the streams in flight finish.
    GoAwayEvery(usize),
}

/// A server connection that closes as nginx's `lingering_close` does: after its last write, what the client still
/// sends is read and dropped for a while, so that it does not make the kernel reset the connection and take the
/// server's last frames (a GOAWAY, the end of a response) with it.
struct Lingering(Option<tokio::net::TcpStream>);

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(mut stream) = self.0.take() else { return };
        tokio::spawn(async move {
            let _ = stream.shutdown().await;
            let mut sink = [0u8; 4096];
            let drain = async { while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {} };
            let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
        });
    }
}

impl tokio::io::AsyncRead for Lingering {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(self.0.as_mut().expect("open")).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Lingering {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(self.0.as_mut().expect("open")).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(self.0.as_mut().expect("open")).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(self.0.as_mut().expect("open")).poll_shutdown(cx)
    }
}

/// An h2-only (prior knowledge) upstream on 127.0.0.1 answering `BODY` bytes in two chunks, ending connections as
/// `ending` says.
async fn h2c_upstream(ending: H2Ending) -> (SocketAddr, Arc<std::sync::Mutex<H2Seen>>) {
    use hyper::body::Frame;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(H2Seen::default()));
    let log = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            if matches!(ending, H2Ending::Reset) {
                // Every close of this upstream's connections is a kill: a reset, not an orderly close.
                let _ = stream.set_zero_linger();
            }
            let id = {
                let mut seen = log.lock().unwrap();
                seen.connections += 1;
                seen.connections
            };
            let kill = Arc::new(tokio::sync::Notify::new());
            let served = Arc::new(AtomicUsize::new(0));
            let (log, on_kill, count) = (Arc::clone(&log), Arc::clone(&kill), Arc::clone(&served));
            let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let path = request.uri().path().to_owned();
                log.lock().unwrap().paths.entry(path.clone()).or_default().push(id);
                count.fetch_add(1, Ordering::SeqCst);
                let reset = matches!(ending, H2Ending::Reset) && path.contains("/reset/");
                if reset {
                    log.lock().unwrap().killed.insert(id);
                }
                let kill = Arc::clone(&on_kill);
                let log = Arc::clone(&log);
                let body = request.into_body();
                let chunks = futures_util::stream::unfold(0, move |step| {
                    let kill = Arc::clone(&kill);
                    async move {
                        match step {
                            0 => Some((
                                Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![b'x'; BODY / 2]))),
                                1,
                            )),
                            1 if reset => {
                                kill.notify_one();
                                futures_util::future::pending::<()>().await;
                                None
                            }
                            1 => {
                                // The second half comes a little later, so that streams overlap on the connection.
                                tokio::task::yield_now().await;
                                Some((Ok(Frame::data(Bytes::from(vec![b'y'; BODY - BODY / 2]))), 2))
                            }
                            _ => None,
                        }
                    }
                });
                async move {
                    if let Ok(body) = body.collect().await {
                        log.lock().unwrap().bodies.insert(path, body.to_bytes().len());
                    }
                    Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::StreamBody::new(chunks)))
                }
            });
            tokio::spawn(async move {
                let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(Lingering(Some(stream))), service);
                tokio::pin!(connection);
                let mut going_away = false;
                loop {
                    tokio::select! {
                        _ = connection.as_mut() => break,
                        // Dropping the connection closes the socket: with SO_LINGER 0, a reset.
                        () = kill.notified() => break,
                        () = tokio::time::sleep(Duration::from_millis(1)), if !going_away => {
                            if let H2Ending::GoAwayEvery(n) = ending {
                                if served.load(Ordering::SeqCst) >= n {
                                    going_away = true;
                                    connection.as_mut().graceful_shutdown();
                                }
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, seen)
}

fn h2c_config(idp: &FakeIdp, upstreams: &[(&str, SocketAddr)]) -> String {
    let mut config =
        format!("[providers.api]\ntoken_url = \"{}\"\nclient_id = \"c\"\nclient_secret = \"s\"\n", idp.token_url());
    for (name, upstream) in upstreams {
        config += &format!(
            "[[routes]]\nname = \"{name}\"\nprefix = \"/{name}\"\nstrip_prefix = true\nupstream = \"http://{upstream}\"\n\
             upstream_protocol = \"h2c\"\nprovider = \"api\"\n"
        );
    }
    config
}

/// Requests through the proxy to `paths` (route prefix and upstream path), 32 at a time; each outcome with its path,
/// and the bodies of the error answers.
async fn drive(proxy: &Proxy, paths: Vec<(&'static str, String)>) -> (Vec<(String, String)>, Vec<String>) {
    let client = HyperClient::builder(TokioExecutor::new()).build_http::<http_body_util::Full<Bytes>>();
    let details = Arc::new(std::sync::Mutex::new(Vec::new()));
    let outcomes = futures_util::stream::iter(paths)
        .map(|(prefix, path)| {
            let client = client.clone();
            let details = Arc::clone(&details);
            let url = proxy.url(&format!("{prefix}{path}"));
            async move {
                // A path with `/post/` is a POST with a 100-byte body.
                let request = if path.contains("/post/") {
                    http::Request::post(url).body(http_body_util::Full::new(Bytes::from(vec![b'p'; 100])))
                } else {
                    http::Request::get(url).body(http_body_util::Full::default())
                };
                let request = request.unwrap();
                let outcome = match client.request(request).await {
                    Err(_) => "no answer".to_owned(),
                    Ok(response) if response.status() != 200 => {
                        let status = response.status().as_u16();
                        let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        details.lock().unwrap().push(String::from_utf8_lossy(&body).into_owned());
                        format!("status {status}")
                    }
                    Ok(response) => match response.into_body().collect().await.map(|body| body.to_bytes().len()) {
                        Ok(BODY) => "complete".to_owned(),
                        Ok(length) => format!("short body {length}"),
                        Err(_) => "cut body".to_owned(),
                    },
                };
                (path, outcome)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let details = details.lock().unwrap().clone();
    (outcomes, details)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_upstream_reset_fails_the_streams_of_that_connection_and_only_those() {
    let idp = FakeIdp::start(300).await;
    // Two h2c upstreams, one connection each at a time: `/resets` resets its connection on every 100th of its
    // requests, `/calm` never does.
    let (resetting, seen) = h2c_upstream(H2Ending::Reset).await;
    let (calm, calm_seen) = h2c_upstream(H2Ending::GoAwayEvery(usize::MAX)).await;
    // A short request_timeout bounds the rare stream that stalls on a reset connection (see below).
    let full = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrequest_timeout = \"5s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        h2c_config(&idp, &[("resets", resetting), ("calm", calm)])
    );
    let proxy = Proxy::start_config(tokenproxy::config::Config::from_toml_str(&full, "test.toml").unwrap()).await;
    proxy.wait_ready().await;

    let total = 4000;
    let paths = (0..total)
        .map(|i| match i % 2 {
            0 if i % 200 == 198 => ("/resets", format!("/reset/{i}")),
            0 => ("/resets", format!("/ok/{i}")),
            _ => ("/calm", format!("/ok/{i}")),
        })
        .collect();
    let (outcomes, details) = drive(&proxy, paths).await;
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let calm_paths = std::mem::take(&mut calm_seen.lock().unwrap().paths);
    let (mut failed, mut complete) = (std::collections::BTreeMap::new(), 0);
    for (path, outcome) in &outcomes {
        if calm_paths.contains_key(path) {
            assert_eq!(outcome, "complete", "{path}: a request to the other upstream was affected");
            continue;
        }
        if outcome == "complete" {
            assert!(!path.starts_with("/reset/"), "a reset response never looks complete");
            complete += 1;
            continue;
        }
        // A failed request was only ever on connections that were reset (or never reached the upstream).
        let connections = seen.paths.get(path).map(Vec::as_slice).unwrap_or_default();
        assert!(
            connections.iter().all(|c| seen.killed.contains(c)),
            "{path} failed ({outcome}) but was on a connection never reset: {connections:?}, reset: {:?}",
            seen.killed
        );
        // A 504 is the rare stream that stalls in the h2 client until request_timeout: bounded just below.
        assert!(
            ["status 502", "status 504", "cut body", "no answer"].contains(&outcome.as_str()),
            "a clean failure: {outcome}"
        );
        *failed.entry(outcome.clone()).or_insert(0) += 1;
    }
    let failures: usize = failed.values().sum();
    let stalled = failed.get("status 504").copied().unwrap_or(0);
    assert!(stalled <= total / 2 / 100, "{stalled} streams stalled until request_timeout");
    let mut reasons = std::collections::BTreeMap::new();
    for detail in &details {
        *reasons
            .entry(detail.split("\"detail\":\"").nth(1).unwrap_or(detail).split('"').next().unwrap_or_default())
            .or_insert(0) += 1;
    }
    println!("drill: 502 details {reasons:?}");
    println!(
        "drill: h2c upstream resetting its connection on 1 in 100 requests: {} requests to it over {} connections, \
         {} reset; {complete} complete, failed {failed:?}; {} requests to another h2c upstream meanwhile, all complete",
        total / 2,
        seen.connections,
        seen.killed.len(),
        calm_paths.len()
    );
    assert!(seen.killed.len() >= 10, "the drill reset connections: {}", seen.killed.len());
    // What a reset can take with it: the streams in flight on its connection (at most the drill's 32 at a time).
    assert!(failures <= seen.killed.len() * 32, "{failures} failed for {} resets", seen.killed.len());
    assert_eq!(calm_paths.len(), total / 2);
    assert_eq!(proxy.metric("tokenproxy_inflight_requests").await, 0.0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_upstream_going_away_gracefully_fails_no_request() {
    let idp = FakeIdp::start(300).await;
    let (upstream, seen) = h2c_upstream(H2Ending::GoAwayEvery(50)).await;
    // A short request_timeout bounds the rare stream that stalls (see below).
    let full = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrequest_timeout = \"5s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        h2c_config(&idp, &[("api", upstream)])
    );
    let proxy = Proxy::start_config(tokenproxy::config::Config::from_toml_str(&full, "test.toml").unwrap()).await;
    proxy.wait_ready().await;

    let total = 2000;
    // Half GETs, half POSTs with a body: a stream the upstream refused unprocessed goes again whatever its method.
    let paths = (0..total).map(|i| ("/api", format!("/{}/{i}", if i % 2 == 0 { "ok" } else { "post" }))).collect();
    let (outcomes, details) = drive(&proxy, paths).await;
    let failed: Vec<_> = outcomes.iter().filter(|(_, outcome)| outcome != "complete").collect();
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let connections = seen.connections;
    let twice = seen.paths.values().filter(|on| on.len() > 1).count();
    println!(
        "drill: h2c upstream sending GOAWAY after every 50 requests: {total} requests (half POSTs) over {connections} \
         connections, {} failed; {twice} sent twice (refused unprocessed, or lost with their connection)",
        failed.len()
    );
    let bodies = seen.bodies;
    assert!(connections >= total / 50 / 2, "the upstream went away and the proxy reconnected: {connections}");
    // No request refused by a GOAWAY fails: each is sent again. What remains is a stall of the h2 client, seen in
    // about 1 run in 15 under load (a few streams of one connection never answered nor failed, until
    // request_timeout: 504); it is bounded here, and documented in docs/configuration.md.
    let stalled = failed.iter().filter(|(_, outcome)| outcome == "status 504").count();
    assert!(
        failed.len() == stalled && stalled <= total / 100,
        "{} of {total} failed, e.g. {:?} {:?}",
        failed.len(),
        &failed[..failed.len().min(5)],
        details
    );
    for (path, _) in outcomes.iter().filter(|(_, outcome)| outcome == "complete") {
        let expected = if path.contains("/post/") { 100 } else { 0 };
        assert_eq!(bodies.get(path), Some(&expected), "{path}: the upstream read its whole body");
    }
    assert_eq!(proxy.metric("tokenproxy_inflight_requests").await, 0.0);
    proxy.stop().await;
}
