//! The per-request hot path: reading the current token and rewriting a request's headers with it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Version};
use tokenproxy::metrics::Metrics;
use tokenproxy::proxy::headers;
use tokenproxy::token::{Token, TokenSlot};

fn slot() -> Arc<TokenSlot> {
    let metrics = Metrics::new();
    let slot = Arc::new(TokenSlot::new("bench", metrics.provider("bench"), Duration::from_secs(10)));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let _guard = runtime.enter();
    let raw = HeaderValue::from_static("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJiZW5jaCJ9.c2lnbmF0dXJl");
    let far = tokio::time::Instant::now() + Duration::from_secs(3600);
    slot.install(Token::new(raw, 1, far, SystemTime::now() + Duration::from_secs(3600), SystemTime::now()));
    slot
}

fn request_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "localhost:8080"),
        ("user-agent", "curl/8.5.0"),
        ("accept", "*/*"),
        ("content-type", "application/json"),
        ("x-request-id", "4bf92f3577b34da6a3ce929d0e0e4736"),
        ("connection", "keep-alive"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    h
}

fn hot_path(c: &mut Criterion) {
    let slot = slot();
    c.bench_function("token read (current token, usable check)", |b| b.iter(|| black_box(slot.current())));
    let template = request_headers();
    c.bench_function("header rewrite + token injection", |b| {
        b.iter(|| {
            let mut h = template.clone();
            headers::strip_hop_by_hop(&mut h);
            let host = h.get("host").cloned();
            headers::add_forwarding(&mut h, [127, 0, 0, 1].into(), false, host);
            headers::append_via(&mut h, Version::HTTP_11);
            if let Some(token) = slot.current() {
                h.insert(http::header::AUTHORIZATION, token.bearer.clone());
            }
            black_box(h)
        })
    });
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
