//! Allocations per proxied request: a deterministic measure of the request path's user-space work (timings on a
//! shared 2-core machine are noisy; allocation counts are not).
//!
//! Runs in one process: a tiny upstream, a tiny IdP, tokenproxy, and one keep-alive client connection. It counts
//! allocations for N requests straight to the upstream, then for N requests through tokenproxy; the difference is
//! what tokenproxy adds per request. Then it opens idle keep-alive connections (one request each) and reports the
//! heap tokenproxy keeps per idle connection (live bytes, not RSS: no allocator slack, no kernel buffers).
//! `cargo bench --bench allocations`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
/// Bytes allocated and not freed.
static LIVE: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

// SAFETY: forwards to the system allocator, counting on the way.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const REQUESTS: u64 = 2000;

/// A server on 127.0.0.1:0 that answers every request with `body`.
async fn serve(body: &'static str) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(move |request: hyper::Request<Incoming>| async move {
                    let _ = request.into_body().collect().await;
                    let mut response = hyper::Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                    response.headers_mut().insert("content-type", http::HeaderValue::from_static("application/json"));
                    Ok::<_, Infallible>(response)
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    addr
}

/// Sends `n` GETs for `path` and reads their answers.
async fn run(sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>, path: &str, n: u64) {
    for _ in 0..n {
        sender.ready().await.expect("ready");
        let request = hyper::Request::get(path)
            .header("host", "localhost")
            .header("user-agent", "alloc-bench")
            .body(Full::default())
            .expect("request");
        let response = sender.send_request(request).await.expect("response");
        assert!(response.status().is_success(), "{}", response.status());
        let _ = response.into_body().collect().await.expect("body");
    }
}

/// Allocations and bytes per request for `REQUESTS` GETs to `addr` over one keep-alive connection.
async fn measure(addr: std::net::SocketAddr, path: &str) -> (f64, f64) {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(connection);
    run(&mut sender, path, 200).await;
    let (a0, b0) = (ALLOCATIONS.load(Ordering::Relaxed), BYTES.load(Ordering::Relaxed));
    run(&mut sender, path, REQUESTS).await;
    let (a1, b1) = (ALLOCATIONS.load(Ordering::Relaxed), BYTES.load(Ordering::Relaxed));
    ((a1 - a0) as f64 / REQUESTS as f64, (b1 - b0) as f64 / REQUESTS as f64)
}

/// Live heap tokenproxy keeps per idle connection: `n` callers (plain sockets, which hold no heap) each send one
/// request, read its answer, and stay connected; the heap grown meanwhile, over `n`.
async fn idle_heap(proxy: std::net::SocketAddr, n: usize) -> f64 {
    use std::io::{Read, Write};
    let settle = || async {
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let mut callers = Vec::with_capacity(n);
    let mut buf = vec![0u8; 4096];
    settle().await;
    let before = LIVE.load(Ordering::Relaxed);
    for _ in 0..n {
        let mut caller = std::net::TcpStream::connect(proxy).expect("connect");
        caller.set_nonblocking(true).expect("non-blocking");
        caller.write_all(b"GET /x HTTP/1.1\r\nHost: bench\r\n\r\n").expect("write");
        let mut got = 0;
        loop {
            match caller.read(&mut buf[got..]) {
                Ok(0) => panic!("the proxy closed the connection"),
                Ok(read) => got += read,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => tokio::task::yield_now().await,
                Err(e) => panic!("read: {e}"),
            }
            let text = String::from_utf8_lossy(&buf[..got]);
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text[..end]
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0);
                if got >= end + 4 + length {
                    break;
                }
            }
        }
        callers.push(caller);
    }
    settle().await;
    let after = LIVE.load(Ordering::Relaxed);
    drop(callers);
    (after - before) as f64 / n as f64
}

fn main() {
    // `cargo test --benches` runs benches with `--bench` absent: do the work either way (it takes a second).
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let upstream = serve("{\"ok\":true}").await;
        let idp = serve("{\"access_token\":\"bench-token\",\"token_type\":\"Bearer\",\"expires_in\":86400}").await;
        // ALLOC_ROUTE_EXTRA adds keys to the route (e.g. "retry_on_401 = false") to price one feature.
        let extra = std::env::var("ALLOC_ROUTE_EXTRA").unwrap_or_default();
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[log]\naccess = false\n\
             [providers.p]\ntoken_url = \"http://{idp}/token\"\nclient_id = \"c\"\nclient_secret = \"s\"\n\
             [[routes]]\nprefix = \"/\"\nupstream = \"http://{upstream}\"\nprovider = \"p\"\n{extra}"
        );
        let config = tokenproxy::config::Config::from_toml_str(&toml, "bench.toml").expect("config");
        let bound = tokenproxy::App::build(config).expect("build").bind().await.expect("bind");
        let proxy = bound.proxy_addr();
        let slot = bound.engine().slot("p").expect("slot");
        tokio::spawn(bound.run(std::future::pending()));
        while slot.current().is_none() {
            tokio::task::yield_now().await;
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let (direct_allocs, direct_bytes) = measure(upstream, "/x").await;
        let (proxied_allocs, proxied_bytes) = measure(proxy, "/x").await;
        println!(
            "allocations per request: direct {direct_allocs:.1} ({direct_bytes:.0} B), through tokenproxy \
             {proxied_allocs:.1} ({proxied_bytes:.0} B): tokenproxy adds {:.1} allocations, {:.0} B",
            proxied_allocs - direct_allocs,
            proxied_bytes - direct_bytes
        );
        let per_connection = idle_heap(proxy, 1000).await;
        println!(
            "heap kept per idle keep-alive connection (1,000 connections, one request each): {per_connection:.0} B"
        );
    });
}
