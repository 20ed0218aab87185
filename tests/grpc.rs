//! h2c upstreams (`upstream_protocol = "h2c"`) and gRPC callers, against an h2-only hyper upstream that records what
//! it received: HTTP/1.1 and h2 callers multiplexed on one upstream connection with the 401 replay; the proxy's
//! errors as a gRPC status in a trailers-only answer; trailers and `TE: trailers` passing both ways; and a gRPC
//! `UNAUTHENTICATED` in the trailers retiring the token (`grpc_unauthenticated_refresh`) without a replay.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{Client, FakeIdp, IdpMode, Proxy};
use tokio::net::TcpListener;

/// What the upstream saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    version: http::Version,
    authorization: String,
    te: Option<String>,
    trailers: Option<HeaderMap>,
    /// Every `Host` header (an h2 request should carry none: its host is `:authority`).
    hosts: Vec<String>,
    authority: Option<String>,
}

type Frames = StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

fn frames(data: &'static str, trailers: &[(&'static str, &str)]) -> Frames {
    let mut map = HeaderMap::new();
    for (name, value) in trailers {
        map.insert(*name, HeaderValue::from_str(value).unwrap());
    }
    StreamBody::new(futures_util::stream::iter(vec![Ok(Frame::data(Bytes::from(data))), Ok(Frame::trailers(map))]))
}

/// An h2-only (prior knowledge) upstream on 127.0.0.1: `/replay` answers 401 to `tok-1`; `/unauthenticated`
/// answers a body and `grpc-status: 16` in the trailers; everything else `VERSION AUTHORIZATION` with trailers
/// `grpc-status: 0` and `x-echo` = the request's `x-request-trailer` trailer.
struct H2cUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicUsize>,
}

impl H2cUpstream {
    async fn start() -> H2cUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (log, count) = (Arc::clone(&seen), Arc::clone(&connections));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let log = Arc::clone(&log);
                let service = service_fn(move |request: Request<Incoming>| {
                    let log = Arc::clone(&log);
                    async move {
                        let (parts, body) = request.into_parts();
                        let collected = body.collect().await.unwrap();
                        let trailers = collected.trailers().cloned();
                        let authorization = parts.headers.get("authorization").map_or("", |v| v.to_str().unwrap());
                        let echo = trailers.as_ref().and_then(|t| t.get("x-request-trailer")).cloned();
                        log.lock().unwrap().push(Seen {
                            path: parts.uri.path().to_owned(),
                            version: parts.version,
                            authorization: authorization.to_owned(),
                            te: parts.headers.get("te").map(|v| v.to_str().unwrap().to_owned()),
                            trailers,
                            hosts: parts
                                .headers
                                .get_all("host")
                                .iter()
                                .map(|v| v.to_str().unwrap().to_owned())
                                .collect(),
                            authority: parts.uri.authority().map(|a| a.as_str().to_owned()),
                        });
                        let text: &'static str =
                            Box::leak(format!("{:?} {authorization}", parts.version).into_boxed_str());
                        let response = match parts.uri.path() {
                            "/replay" if authorization == "Bearer tok-1" => {
                                Response::builder().status(StatusCode::UNAUTHORIZED).body(frames("refused", &[]))
                            }
                            "/unauthenticated" => Response::builder()
                                .header("content-type", "application/grpc")
                                .body(frames(text, &[("grpc-status", "16"), ("grpc-message", "token revoked")])),
                            _ => {
                                let echo = echo.as_ref().map_or("", |v| v.to_str().unwrap());
                                Response::builder()
                                    .header("content-type", "application/grpc")
                                    .body(frames(text, &[("grpc-status", "0"), ("x-echo", echo)]))
                            }
                        };
                        Ok::<_, Infallible>(response.unwrap())
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        H2cUpstream { addr, seen, connections }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn config(idp: &FakeIdp, upstream: &H2cUpstream) -> String {
    format!(
        "[providers.api]\ntoken_url = \"{}\"\nclient_id = \"c\"\nclient_secret = \"s\"\n\
         [[routes]]\nname = \"h2c\"\nprefix = \"/h2c\"\nstrip_prefix = true\nupstream = \"http://{}\"\n\
         upstream_protocol = \"h2c\"\nprovider = \"api\"\n\
         [[routes]]\nname = \"grpc\"\nprefix = \"/grpc\"\nstrip_prefix = true\nupstream = \"http://{}\"\n\
         upstream_protocol = \"h2c\"\nprovider = \"api\"\ngrpc_unauthenticated_refresh = true\n",
        idp.token_url(),
        upstream.addr,
        upstream.addr
    )
}

/// An h2c client of the proxy (a gRPC caller's transport).
fn h2_client<B>() -> HyperClient<hyper_util::client::legacy::connect::HttpConnector, B>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    HyperClient::builder(TokioExecutor::new()).http2_only(true).build_http()
}

fn grpc_request<B>(proxy: &Proxy, path: &str, body: B) -> Request<B> {
    Request::post(proxy.url(path))
        .header("content-type", "application/grpc+proto")
        .header("te", "trailers")
        .body(body)
        .unwrap()
}

#[tokio::test]
async fn http1_and_h2_callers_reach_an_h2c_upstream_on_one_connection_with_the_401_replay() {
    let idp = FakeIdp::start(300).await;
    let upstream = H2cUpstream::start().await;
    let proxy = Proxy::start(&config(&idp, &upstream)).await;
    proxy.wait_ready().await;

    let reply = Client::new().get(&proxy.url("/h2c/replay")).await;
    assert_eq!((reply.status, reply.text().as_str()), (200, "HTTP/2.0 Bearer tok-2"), "an HTTP/1.1 caller, replayed");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|s| s.version == http::Version::HTTP_2 && s.path == "/replay"));
    assert_eq!((seen[0].authorization.as_str(), seen[1].authorization.as_str()), ("Bearer tok-1", "Bearer tok-2"));
    assert_eq!(proxy.metric("tokenproxy_replays_total{outcome=\"success\",route=\"h2c\"}").await, 1.0);

    let client = h2_client::<Empty<Bytes>>();
    let calls = (0..50).map(|i| {
        let request = Request::get(proxy.url(&format!("/h2c/many/{i}"))).body(Empty::new()).unwrap();
        let response = client.request(request);
        async move {
            let response = response.await.unwrap();
            let status = response.status();
            (status, response.into_body().collect().await.unwrap().to_bytes())
        }
    });
    for (status, body) in futures_util::future::join_all(calls).await {
        assert_eq!((status, body.as_ref()), (StatusCode::OK, b"HTTP/2.0 Bearer tok-2".as_ref()));
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 52);
    for request in &seen {
        // The host goes in `:authority` alone: a `Host` header beside it makes nginx (before 1.25) answer 400.
        assert_eq!(request.authority, Some(upstream.addr.to_string()), "{request:?}");
        assert!(request.hosts.is_empty(), "an h2 request carries no Host header: {request:?}");
    }
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 1, "the calls share one multiplexed h2c connection");
    proxy.stop().await;
}

#[tokio::test]
async fn trailers_and_te_trailers_pass_both_ways() {
    let idp = FakeIdp::start(300).await;
    let upstream = H2cUpstream::start().await;
    let proxy = Proxy::start(&config(&idp, &upstream)).await;
    proxy.wait_ready().await;
    let client = h2_client::<Frames>();
    let request = grpc_request(&proxy, "/h2c/orders.Orders/Get", frames("message", &[("x-request-trailer", "abc")]));
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("the upstream's trailers reach the caller");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-echo"], "abc", "the caller's trailers reached the upstream");
    let seen = upstream.seen();
    assert_eq!(seen[0].te.as_deref(), Some("trailers"), "strict gRPC servers require TE: trailers");
    assert_eq!(seen[0].trailers.as_ref().unwrap()["x-request-trailer"], "abc");
    proxy.stop().await;
}

/// The answer to a gRPC call that the proxy refused: HTTP 200, the status in the headers, no body, no trailers.
async fn grpc_error(response: Response<Incoming>) -> (String, String, String) {
    assert_eq!(response.status(), StatusCode::OK, "gRPC errors travel in a 200");
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "application/grpc");
    let collected = response.into_body().collect().await.unwrap();
    assert!(collected.trailers().is_none(), "trailers-only: the status is in the headers");
    assert!(collected.to_bytes().is_empty());
    let text = |name: &str| headers.get(name).map_or(String::new(), |v| v.to_str().unwrap().to_owned());
    (text("grpc-status"), text("grpc-message"), text("x-tokenproxy-error"))
}

#[tokio::test]
async fn grpc_callers_get_the_proxys_errors_as_a_grpc_status() {
    let idp = FakeIdp::start(300).await;
    idp.set_mode(IdpMode::Fail { status: 503, body: "{}".into(), retry_after: None });
    let upstream = H2cUpstream::start().await;
    let proxy = Proxy::start(&config(&idp, &upstream)).await;
    let client = h2_client::<Full<Bytes>>();

    let response = client.request(grpc_request(&proxy, "/h2c/orders.Orders/Get", Full::default())).await.unwrap();
    let (status, message, code) = grpc_error(response).await;
    assert_eq!((status.as_str(), code.as_str()), ("14", "token_unavailable"), "UNAVAILABLE: {message}");
    assert!(message.starts_with("No valid access token"), "{message}");

    let response = client.request(grpc_request(&proxy, "/nowhere/x.Y/Z", Full::default())).await.unwrap();
    let (status, _, code) = grpc_error(response).await;
    assert_eq!((status.as_str(), code.as_str()), ("12", "no_route"), "UNIMPLEMENTED");

    // gRPC-Web callers read HTTP statuses: problem+json for them.
    let mut request = grpc_request(&proxy, "/h2c/orders.Orders/Get", Full::default());
    request.headers_mut().insert("content-type", HeaderValue::from_static("application/grpc-web+proto"));
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    assert!(upstream.seen().is_empty());
    // Metrics count the error's HTTP status, not the 200 the gRPC answer travels in.
    assert_eq!(proxy.metric("tokenproxy_requests_total{route=\"h2c\",status=\"503\"}").await, 2.0);
    proxy.stop().await;
}

#[tokio::test]
async fn grpc_unauthenticated_in_trailers_retires_the_token_only_where_asked_and_is_never_replayed() {
    let idp = FakeIdp::start(300).await;
    let upstream = H2cUpstream::start().await;
    let proxy = Proxy::start(&config(&idp, &upstream)).await;
    proxy.wait_ready().await;
    let client = h2_client::<Full<Bytes>>();
    let call = async |path: &str| {
        let response = client.request(grpc_request(&proxy, path, Full::new(Bytes::from("m")))).await.unwrap();
        let collected = response.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap_or_default();
        (String::from_utf8(collected.to_bytes().to_vec()).unwrap(), trailers)
    };

    // A route without grpc_unauthenticated_refresh passes the status on and keeps its token.
    let (body, trailers) = call("/h2c/unauthenticated").await;
    assert_eq!((body.as_str(), trailers["grpc-status"].to_str().unwrap()), ("HTTP/2.0 Bearer tok-1", "16"));
    assert_eq!(call("/h2c/x").await.0, "HTTP/2.0 Bearer tok-1");
    assert_eq!(idp.calls(), 1);

    // With it, the caller still gets the upstream's answer (no replay), and the token is retired behind it.
    let (body, trailers) = call("/grpc/unauthenticated").await;
    assert_eq!((body.as_str(), trailers["grpc-status"].to_str().unwrap()), ("HTTP/2.0 Bearer tok-1", "16"));
    tokio::time::timeout(Duration::from_secs(10), idp.wait_calls(2)).await.expect("one token call");
    assert_eq!(call("/grpc/x").await.0, "HTTP/2.0 Bearer tok-2");
    assert_eq!(upstream.seen().iter().filter(|s| s.path == "/unauthenticated").count(), 2, "no replay");
    assert_eq!(proxy.metric("tokenproxy_upstream_unauthorized_total{route=\"grpc\"}").await, 1.0);
    assert_eq!(idp.calls(), 2);
    proxy.stop().await;
}
