//! OpenTelemetry traces (docs/telemetry.md) against an in-test OTLP/HTTP receiver that decodes what it gets with
//! `opentelemetry-proto`: a request that waited for its token and was replayed after a 401 gives one trace (server
//! span, `token.wait`, two attempts with the second's `http.request.resend_count`), continuing the caller's
//! `traceparent`, and the upstream sees each attempt as its parent; `sample_ratio = 0` with an unsampled caller exports
//! nothing and forwards its `traceparent` as it came; a collector answering 503 costs no request, and the spans it
//! refused are counted. Runs on both HTTP/1.1 transports (`TP_TEST_HTTP1`).

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use support::{eventually, spawn_server, Client, FakeIdp, FakeUpstream, Proxy};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// The receiver: every span it was sent (with its resource's `service.name`), or 503 to everything.
struct Collector {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
    /// Each export's path and content type, as `PATH TYPE` (checked by the test, not in the handler, where a panic
    /// would only look like a failed export).
    exports: Arc<Mutex<Vec<String>>>,
    url: String,
    _stop: tokio::sync::watch::Sender<()>,
}

async fn collector(status: StatusCode) -> Collector {
    let spans: Arc<Mutex<Vec<(String, Span)>>> = Arc::default();
    let exports: Arc<Mutex<Vec<String>>> = Arc::default();
    let (kept, seen) = (Arc::clone(&spans), Arc::clone(&exports));
    let (addr, stop) = spawn_server(move |request: Request<hyper::body::Incoming>| {
        let (kept, seen) = (Arc::clone(&kept), Arc::clone(&seen));
        async move {
            let content_type = request.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("-");
            seen.lock().unwrap().push(format!("{} {content_type}", request.uri().path()));
            let body = request.into_body().collect().await.unwrap().to_bytes();
            if status == StatusCode::OK {
                keep(ExportTraceServiceRequest::decode(body).expect("an OTLP trace export"), &kept);
            }
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = status;
            response.headers_mut().insert("content-type", "application/x-protobuf".parse().unwrap());
            response
        }
    })
    .await;
    Collector { spans, exports, url: format!("http://{addr}"), _stop: stop }
}

impl Collector {
    /// Asserts that exports came, each an OTLP/HTTP protobuf post to `/v1/traces`.
    fn got_otlp_exports(&self) {
        let exports = self.exports.lock().unwrap().clone();
        assert!(!exports.is_empty(), "no export reached the collector");
        assert!(exports.iter().all(|e| e == "/v1/traces application/x-protobuf"), "{exports:?}");
    }
}

/// Keeps the spans of `export`, each with its resource's `service.name`.
fn keep(export: ExportTraceServiceRequest, kept: &Mutex<Vec<(String, Span)>>) {
    for resource in export.resource_spans {
        let service = resource
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                AnyValue::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for scope in resource.scope_spans {
            kept.lock().unwrap().extend(scope.spans.into_iter().map(|span| (service.clone(), span)));
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|kv| kv.key == key).and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
        AnyValue::StringValue(s) => Some(s.clone()),
        AnyValue::IntValue(i) => Some(i.to_string()),
        AnyValue::BoolValue(b) => Some(b.to_string()),
        _ => None,
    })
}

fn config(idp: &FakeIdp, upstream: &FakeUpstream, collector: &str, telemetry: &str) -> String {
    format!(
        "[telemetry]\notlp_endpoint = \"{collector}\"\nservice_name = \"edge-gw\"\n{telemetry}\n\
         [telemetry.resource_attributes]\n\"deployment.environment\" = \"test\"\n\
         [providers.api]\ntoken_url = \"{}\"\nclient_id = \"c\"\nclient_secret = \"s3cret\"\n\
         [[routes]]\nname = \"orders\"\nprefix = \"/api\"\nupstream = \"{}\"\nprovider = \"api\"\n",
        idp.token_url(),
        upstream.url()
    )
}

async fn get(client: &Client, url: String, traceparent: &str) -> u16 {
    let request = Request::get(url).header("traceparent", traceparent).body(Full::new(Bytes::new())).unwrap();
    client.send(request).await.status
}

#[tokio::test]
async fn a_waited_and_replayed_request_is_one_trace_that_continues_the_callers() {
    let (idp, upstream, collector) =
        (FakeIdp::start(300).await, FakeUpstream::start().await, collector(StatusCode::OK).await);
    // The IdP holds its answer: the first request waits for the startup token call.
    idp.close();
    let proxy = Proxy::start(&config(&idp, &upstream, &collector.url, "")).await;
    upstream.revoke("tok-1");
    let client = Client::new();
    let caller = format!("00-{TRACE}-{CALLER_SPAN}-01");
    // The startup call is in flight (held by the IdP) when the request comes: the request waits for it.
    idp.wait_calls(1).await;
    let request = get(&client, proxy.url("/api/orders?secret=1"), &caller);
    let opened = async {
        eventually("the request waiting for the startup call", Duration::from_secs(10), async || {
            proxy.metric("tokenproxy_singleflight_waiters_total{provider=\"api\"}").await >= 1.0
        })
        .await;
        idp.open();
    };
    let (status, ()) = tokio::join!(request, opened);
    assert_eq!(status, 200, "replayed with tok-2");

    let spans = eventually("the server span exported", Duration::from_secs(10), async || {
        let spans = collector.spans.lock().unwrap().clone();
        spans.iter().any(|(_, s)| s.kind == 2).then_some(spans)
    })
    .await;
    let spans: Vec<Span> = spans
        .into_iter()
        .map(|(service, span)| {
            assert_eq!(service, "edge-gw");
            span
        })
        .collect();
    let named = |name: &str| spans.iter().filter(|s| s.name == name).cloned().collect::<Vec<_>>();
    let server = named("GET orders").pop().unwrap_or_else(|| panic!("no server span named `GET orders`: {spans:#?}"));
    assert_eq!(hex(&server.trace_id), TRACE, "the caller's trace is continued");
    assert_eq!(hex(&server.parent_span_id), CALLER_SPAN);
    assert_eq!(attribute(&server, "http.route").as_deref(), Some("orders"));
    assert_eq!(attribute(&server, "url.path").as_deref(), Some("/api/orders"), "never the query");
    assert_eq!(attribute(&server, "http.response.status_code").as_deref(), Some("200"));
    assert_eq!(attribute(&server, "tokenproxy.provider").as_deref(), Some("api"));
    assert_eq!(attribute(&server, "tokenproxy.replayed").as_deref(), Some("true"));
    let waits = named("token.wait");
    assert_eq!(waits.len(), 2, "for the first token, and for the replay's newer one: {waits:#?}");
    assert!(waits.iter().all(|wait| wait.parent_span_id == server.span_id));
    let mut attempts = named("GET");
    attempts.sort_by_key(|s| s.start_time_unix_nano);
    assert_eq!(attempts.len(), 2, "{attempts:#?}");
    assert!(
        attempts.iter().all(|a| a.parent_span_id == server.span_id && a.kind == 3),
        "client spans under the server span"
    );
    assert_eq!(attribute(&attempts[0], "http.response.status_code").as_deref(), Some("401"));
    assert_eq!(attribute(&attempts[0], "http.request.resend_count"), None);
    assert_eq!(attribute(&attempts[1], "http.request.resend_count").as_deref(), Some("1"));
    assert_eq!(attribute(&attempts[1], "http.response.status_code").as_deref(), Some("200"));
    // The replay's token call was asked for by this request: a span of its trace, and its traceparent went to the IdP.
    // (A startup call no request asked for is a trace of its own.)
    let all_calls = named("token.call");
    let calls: Vec<Span> = all_calls.iter().filter(|c| hex(&c.trace_id) == TRACE).cloned().collect();
    let call = calls.iter().find(|c| attribute(c, "tokenproxy.reason").as_deref() == Some("unauthorized"));
    let call = call.unwrap_or_else(|| panic!("no token.call span for the replay: {spans:#?}"));
    assert!(calls.iter().all(|c| c.parent_span_id == server.span_id), "{calls:#?}");
    assert_eq!(attribute(call, "tokenproxy.provider").as_deref(), Some("api"));
    assert_eq!(attribute(call, "tokenproxy.outcome").as_deref(), Some("success"));
    // The first wait was for the startup call: a trace of its own (no request asked for it), linked from the wait.
    let mut waits = named("token.wait");
    waits.sort_by_key(|w| w.start_time_unix_nano);
    let startup = all_calls.iter().find(|c| hex(&c.trace_id) != TRACE).expect("the startup call's own trace");
    assert_eq!(attribute(startup, "tokenproxy.reason").as_deref(), Some("startup"));
    assert!(
        waits[0].links.iter().any(|l| l.trace_id == startup.trace_id && l.span_id == startup.span_id),
        "the wait links to the call it waited for: {:?}",
        waits[0].links
    );
    let received = idp.received();
    assert_eq!(received.len(), 2);
    assert_eq!(received[1].traceparent, Some(format!("00-{TRACE}-{}-01", hex(&call.span_id))));
    for traced in received.iter().filter_map(|c| c.traceparent.as_deref()) {
        let of = |c: &Span| format!("00-{}-{}-01", hex(&c.trace_id), hex(&c.span_id));
        assert!(all_calls.iter().any(|c| traced == of(c)), "{traced}");
    }
    // The upstream saw each attempt as its parent, in the caller's trace.
    let seen: Vec<String> =
        upstream.seen().iter().map(|s| s.headers["traceparent"].to_str().unwrap().to_owned()).collect();
    let expected: Vec<String> = attempts.iter().map(|a| format!("00-{TRACE}-{}-01", hex(&a.span_id))).collect();
    assert_eq!(seen, expected);
    for span in &spans {
        for kv in &span.attributes {
            let text = format!("{:?}", kv.value);
            assert!(!text.contains("tok-") && !text.contains("s3cret") && !text.contains("secret=1"), "{kv:?}");
        }
    }
    collector.got_otlp_exports();
    proxy.stop().await;
}

#[tokio::test]
async fn an_unsampled_caller_at_ratio_zero_exports_nothing_and_its_traceparent_passes_as_it_came() {
    let (idp, upstream, collector) =
        (FakeIdp::start(300).await, FakeUpstream::start().await, collector(StatusCode::OK).await);
    let proxy = Proxy::start(&config(&idp, &upstream, &collector.url, "sample_ratio = 0")).await;
    let client = Client::new();
    let unsampled = format!("00-{TRACE}-{CALLER_SPAN}-00");
    assert_eq!(get(&client, proxy.url("/api/a"), &unsampled).await, 200);
    assert_eq!(upstream.seen()[0].headers["traceparent"], unsampled.as_str(), "forwarded unchanged");
    // And a request with no traceparent at ratio 0 gets none.
    assert_eq!(client.get(&proxy.url("/api/b")).await.status, 200);
    assert!(upstream.seen()[1].headers.get("traceparent").is_none());
    // A sampled caller is always continued, whatever the ratio.
    let sampled = format!("00-{TRACE}-{CALLER_SPAN}-01");
    assert_eq!(get(&client, proxy.url("/api/c"), &sampled).await, 200);
    let continued = upstream.seen()[2].headers["traceparent"].to_str().unwrap().to_owned();
    assert!(continued.starts_with(&format!("00-{TRACE}-")) && !continued.contains(CALLER_SPAN), "{continued}");
    eventually("the sampled request's spans", Duration::from_secs(10), async || {
        collector.spans.lock().unwrap().iter().any(|(_, s)| s.kind == 2)
    })
    .await;
    let spans = collector.spans.lock().unwrap().clone();
    assert!(spans.iter().all(|(_, s)| hex(&s.trace_id) == TRACE), "only the sampled caller's trace: {spans:?}");
    assert_eq!(spans.iter().filter(|(_, s)| s.kind == 2).count(), 1, "one server span: the unsampled ones made none");
    collector.got_otlp_exports();
    proxy.stop().await;
}

#[tokio::test]
async fn a_collector_answering_503_costs_no_request_and_its_spans_are_counted_as_dropped() {
    let (idp, upstream, collector) =
        (FakeIdp::start(300).await, FakeUpstream::start().await, collector(StatusCode::SERVICE_UNAVAILABLE).await);
    let proxy = Proxy::start(&config(&idp, &upstream, &collector.url, "")).await;
    proxy.wait_ready().await;
    let client = Client::new();
    for i in 0..20 {
        assert_eq!(client.get(&proxy.url(&format!("/api/{i}"))).await.status, 200);
    }
    let dropped = eventually("spans counted as dropped", Duration::from_secs(15), async || {
        let dropped = proxy.metric("tokenproxy_telemetry_spans_dropped_total").await;
        (dropped >= 40.0).then_some(dropped)
    })
    .await;
    // The drops are the collector's refusals, not exports that never left.
    collector.got_otlp_exports();
    println!("spans dropped while the collector answered 503: {dropped}");
    proxy.stop().await;
}

#[tokio::test]
async fn a_callers_token_exchange_is_a_span_of_its_request() {
    let (idp, upstream, collector) =
        (FakeIdp::start(300).await, FakeUpstream::start().await, collector(StatusCode::OK).await);
    let config = format!(
        "[telemetry]\notlp_endpoint = \"{}\"\n[providers.ex]\ntoken_url = \"{}\"\ngrant = \"token_exchange\"\n\
         client_id = \"gw\"\nclient_secret = \"s3cret\"\naudience = \"orders\"\n\
         [[routes]]\nname = \"orders\"\nprefix = \"/api\"\nupstream = \"{}\"\nprovider = \"ex\"\n",
        collector.url,
        idp.token_url(),
        upstream.url()
    );
    let proxy = Proxy::start(&config).await;
    let request = Request::get(proxy.url("/api/x"))
        .header("traceparent", format!("00-{TRACE}-{CALLER_SPAN}-01"))
        .header("authorization", "Bearer caller-subject")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(Client::new().send(request).await.status, 200);
    let spans = eventually("the exchange's spans", Duration::from_secs(10), async || {
        let spans: Vec<Span> = collector.spans.lock().unwrap().iter().map(|(_, s)| s.clone()).collect();
        (spans.iter().any(|s| s.kind == 2) && spans.iter().any(|s| s.name == "token.exchange")).then_some(spans)
    })
    .await;
    let server = spans.iter().find(|s| s.kind == 2).unwrap();
    let exchange = spans.iter().find(|s| s.name == "token.exchange").unwrap();
    assert_eq!(exchange.parent_span_id, server.span_id);
    assert_eq!(attribute(exchange, "tokenproxy.outcome").as_deref(), Some("success"));
    let traced = idp.received()[0].traceparent.clone();
    assert_eq!(traced, Some(format!("00-{TRACE}-{}-01", hex(&exchange.span_id))), "the IdP's call carries the span");
    for span in &spans {
        assert!(!format!("{:?}", span.attributes).contains("caller-subject"), "never the subject");
    }
    collector.got_otlp_exports();
    proxy.stop().await;
}

#[tokio::test]
async fn the_last_requests_spans_are_exported_before_the_process_exits() {
    let (idp, upstream, collector) =
        (FakeIdp::start(300).await, FakeUpstream::start().await, collector(StatusCode::OK).await);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenproxy.toml");
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        config(&idp, &upstream, &collector.url, "")
    );
    std::fs::write(&path, config).unwrap();
    let mut proxy = support::TokenProxyProcess::run(&path, &[]).await;
    proxy.wait_ready().await;
    let caller = format!("00-{TRACE}-{CALLER_SPAN}-01");
    assert_eq!(get(&Client::new(), proxy.url("/api/last"), &caller).await, 200);
    // Stopped at once: the spans are still in the export queue (a batch waits up to a second for more).
    assert_eq!(proxy.terminate().await.code(), Some(0));
    let spans = collector.spans.lock().unwrap().clone();
    assert!(spans.iter().any(|(_, s)| s.kind == 2 && hex(&s.trace_id) == TRACE), "exported before the exit: {spans:?}");
    // The startup token call, which no request asked for, is a trace of its own.
    let startup = spans.iter().map(|(_, s)| s).find(|s| s.name == "token.call");
    let startup = startup.unwrap_or_else(|| panic!("no token.call span: {spans:?}"));
    assert!(startup.parent_span_id.is_empty() && hex(&startup.trace_id) != TRACE, "a root span: {startup:?}");
    collector.got_otlp_exports();
    assert_eq!(attribute(startup, "tokenproxy.reason").as_deref(), Some("startup"));
    assert_eq!(
        idp.received()[0].traceparent,
        Some(format!("00-{}-{}-01", hex(&startup.trace_id), hex(&startup.span_id)))
    );
}

/// An OTLP/gRPC receiver (tonic, `opentelemetry-proto`'s service): the spans, and each export's `x-api-key`.
#[cfg(feature = "otlp-grpc")]
#[derive(Clone, Default)]
struct GrpcCollector {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
    keys: Arc<Mutex<Vec<String>>>,
}

#[cfg(feature = "otlp-grpc")]
#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService for GrpcCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<
        tonic::Response<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse>,
        tonic::Status,
    > {
        let key = request.metadata().get("x-api-key").and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
        self.keys.lock().unwrap().push(key);
        keep(request.into_inner(), &self.spans);
        Ok(tonic::Response::new(Default::default()))
    }
}

#[cfg(feature = "otlp-grpc")]
#[tokio::test]
async fn over_grpc_the_spans_and_the_collectors_headers_reach_a_grpc_collector() {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
    let receiver = GrpcCollector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = futures_util::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    });
    let server = tonic::transport::Server::builder().add_service(TraceServiceServer::new(receiver.clone()));
    tokio::spawn(server.serve_with_incoming(incoming));
    let (idp, upstream) = (FakeIdp::start(300).await, FakeUpstream::start().await);
    let grpc = "otlp_protocol = \"grpc\"\nheaders = \"x-api-key=k1\"";
    let proxy = Proxy::start(&config(&idp, &upstream, &format!("http://{addr}"), grpc)).await;
    let caller = format!("00-{TRACE}-{CALLER_SPAN}-01");
    assert_eq!(get(&Client::new(), proxy.url("/api/orders"), &caller).await, 200);
    let spans = eventually("the request's spans over gRPC", Duration::from_secs(10), async || {
        let spans = receiver.spans.lock().unwrap().clone();
        (spans.iter().any(|(_, s)| s.kind == 2) && spans.iter().any(|(_, s)| s.kind == 3 && s.name == "GET"))
            .then_some(spans)
    })
    .await;
    let (service, server) = spans.iter().find(|(_, s)| s.kind == 2).unwrap();
    assert_eq!(
        (service.as_str(), server.name.as_str(), hex(&server.trace_id)),
        ("edge-gw", "GET orders", TRACE.into())
    );
    let attempt = spans.iter().map(|(_, s)| s).find(|s| s.kind == 3 && s.name == "GET").unwrap();
    assert_eq!(attempt.parent_span_id, server.span_id);
    assert_eq!(
        upstream.seen()[0].headers["traceparent"].to_str().unwrap(),
        format!("00-{TRACE}-{}-01", hex(&attempt.span_id))
    );
    let keys = receiver.keys.lock().unwrap().clone();
    assert!(!keys.is_empty() && keys.iter().all(|k| k == "k1"), "telemetry.headers as gRPC metadata: {keys:?}");
    assert_eq!(proxy.metric("tokenproxy_telemetry_spans_dropped_total").await, 0.0);
    proxy.stop().await;
}
