//! The per-request hot path: reading the current token and rewriting a request's headers with it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Version};
use tokenproxy::metrics::Metrics;
use tokenproxy::proxy::headers;
use tokenproxy::proxy::route::{Lookup, Route, RouteTable};
use tokenproxy::token::{AccessToken, Token, TokenSlot};

fn slot() -> Arc<TokenSlot> {
    let metrics = Metrics::new();
    let slot = Arc::new(TokenSlot::new("bench", metrics.provider("bench"), Duration::from_secs(10)));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let _guard = runtime.enter();
    let raw = HeaderValue::from_static("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJiZW5jaCJ9.c2lnbmF0dXJl");
    let far = tokio::time::Instant::now() + Duration::from_secs(3600);
    slot.install(Token::new(
        AccessToken::new(raw),
        1,
        far,
        SystemTime::now() + Duration::from_secs(3600),
        SystemTime::now(),
    ));
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
    let peer = headers::peer_value([127, 0, 0, 1].into());
    c.bench_function("header rewrite + token injection", |b| {
        b.iter(|| {
            let mut h = template.clone();
            headers::strip_hop_by_hop(&mut h);
            let host = h.get("host").cloned();
            headers::add_forwarding(&mut h, &peer, false, host);
            headers::append_via(&mut h, Version::HTTP_11);
            if let Some(token) = slot.current() {
                h.insert(http::header::AUTHORIZATION, token.authorization().expose().clone());
            }
            black_box(h)
        })
    });
}

/// A table of `n` routes as a gateway for many tenants has them: half by path prefix (`/tenant-I/api`), half by
/// host (`tenantI.example`), in that order.
fn table(n: usize) -> RouteTable {
    let mut toml = String::new();
    for i in 0..n {
        if i % 2 == 0 {
            toml.push_str(&format!("[[routes]]\nprefix = \"/tenant-{i}/api\"\nupstream = \"http://127.0.0.1:9000\"\n"));
        } else {
            toml.push_str(&format!("[[routes]]\nhost = \"tenant{i}.example\"\nupstream = \"http://127.0.0.1:9000\"\n"));
        }
    }
    let config = tokenproxy::config::Config::from_toml_str(&toml, "bench.toml").expect("bench config");
    let metrics = Metrics::new();
    let none = |_: &str| None;
    let client = tokenproxy::proxy::UpstreamClient::new(1).expect("client");
    RouteTable::new(config.routes.iter().map(|r| Route::new(r, &none, &metrics, &client).expect("route")).collect())
}

/// Route lookup with 1 and 5,000 routes, for the first- and the last-listed route of each kind: the cost must not
/// grow with the table (docs/benchmarks.md).
fn routing(c: &mut Criterion) {
    let mut group = c.benchmark_group("route lookup");
    for n in [1, 5_000] {
        let table = table(n);
        let last_prefix = format!("/tenant-{}/api/orders/42", (n - 1) / 2 * 2);
        let last_host = format!("tenant{}.example:8080", n.saturating_sub(1) / 2 * 2 + 1);
        let mut cases = vec![("first prefix", "localhost:8080".to_owned(), "/tenant-0/api/orders/42".to_owned())];
        if n > 1 {
            cases.push(("last prefix", "localhost:8080".to_owned(), last_prefix));
            cases.push(("first host", "tenant1.example:8080".to_owned(), "/orders/42".to_owned()));
            cases.push(("last host", last_host, "/orders/42".to_owned()));
        }
        for (case, host, path) in cases {
            assert!(matches!(table.lookup_origin(Some(&host), &path), Lookup::Route(_)), "{case} of {n}");
            group.bench_function(format!("{n} routes, {case}"), |b| {
                b.iter(|| {
                    black_box(matches!(table.lookup_origin(Some(black_box(&host)), black_box(&path)), Lookup::Route(_)))
                })
            });
        }
    }
    group.finish();
}

/// The per-request cost of a route that exchanges each caller's token, on a cache hit: the subject's SHA-256, the
/// caller's token source, the moka lookup and the usable check (docs/token-exchange.md).
fn exchange_hit(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let _guard = runtime.enter();
    let toml = "[providers.ex]\ntoken_url = \"http://127.0.0.1:9/token\"\ngrant = \"token_exchange\"\n\
                client_id = \"c\"\nclient_secret = \"s\"\n[[routes]]\nprefix = \"/\"\n\
                upstream = \"http://127.0.0.1:9000\"\nprovider = \"ex\"\n";
    let config = tokenproxy::config::Config::from_toml_str(toml, "bench.toml").expect("bench config");
    let metrics = Metrics::new();
    let engine = tokenproxy::token::TokenEngine::new(&config, &metrics).expect("engine");
    let Some(tokenproxy::token::TokenBinding::PerCaller(cache)) = engine.binding("ex") else { panic!("per caller") };
    let far = tokio::time::Instant::now() + Duration::from_secs(3600);
    let subjects: Vec<String> = (0..1_000)
        .map(|i| format!("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJjYWxsZXItey{i:04}In0.c2lnbmF0dXJlLW9mLWEtY2FsbGVy"))
        .collect();
    for (i, subject) in subjects.iter().enumerate() {
        let raw = HeaderValue::from_str(&format!("exchanged-{i}")).unwrap();
        let token =
            Token::new(AccessToken::new(raw), 1, far, SystemTime::now() + Duration::from_secs(3600), SystemTime::now());
        cache.install(subject, token);
    }
    let authorizations: Vec<HeaderValue> =
        subjects.iter().map(|s| HeaderValue::from_str(&format!("Bearer {s}")).unwrap()).collect();
    let mut next = 0;
    c.bench_function("exchange cache hit (1,000 callers: hash + lookup + usable check)", |b| {
        b.iter(|| {
            next = (next + 1) % subjects.len();
            let tokens = cache.for_caller(black_box(&authorizations[next])).expect("a bearer token");
            black_box(tokens.current().expect("a hit"))
        })
    });
}

/// What DPoP adds to a request (RFC 9449): one proof, signed for this request's method and URL, bound to the token.
fn dpop_proof(c: &mut Criterion) {
    use tokenproxy::token::dpop::{token_hash, DpopKey, ProofFor};
    let token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJiZW5jaCIsImNuZiI6eyJqa3QiOiIwIn19.c2lnbmF0dXJl";
    let ath = token_hash(token.as_bytes());
    let to = ProofFor {
        method: "GET",
        url: "http://127.0.0.1:9000/orders/7",
        origin: "http://127.0.0.1:9000",
        ath: Some(&ath),
    };
    let p256 = DpopKey::generate();
    c.bench_function("DPoP proof per request (ES256: claims, sign, encode)", |b| {
        b.iter(|| black_box(p256.proof(black_box(to))))
    });
    let ed25519 = {
        use ed25519_dalek::pkcs8::EncodePrivateKey as _;
        let pem = ed25519_dalek::SigningKey::from_bytes(&[5u8; 32]).to_pkcs8_pem(Default::default()).unwrap();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), pem.as_bytes()).unwrap();
        DpopKey::load(file.path()).unwrap()
    };
    c.bench_function("DPoP proof per request (EdDSA: claims, sign, encode)", |b| {
        b.iter(|| black_box(ed25519.proof(black_box(to))))
    });
}

/// HTTPS interception: a new leaf for a host (P-256 key, signed by the local CA), made on the first CONNECT to it.
fn intercept_leaf(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let ca = tokenproxy::ca::LocalCa::init(dir.path(), &["api.example.test".to_owned()], false).unwrap();
    c.bench_function("interception leaf (P-256 key, signed by the local CA)", |b| {
        b.iter(|| black_box(ca.issue("api.example.test").unwrap()))
    });
}

criterion_group!(benches, hot_path, routing, exchange_hit, dpop_proof, intercept_leaf);
criterion_main!(benches);
