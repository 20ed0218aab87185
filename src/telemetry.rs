//! OpenTelemetry traces (docs/telemetry.md): a server span per proxied request, a child span per upstream attempt and
//! per wait for a token, W3C `traceparent` continued from the caller and sent to the upstream, exported over OTLP
//! (HTTP, protobuf) by the `opentelemetry-otlp` exporter through a hyper client of our own.
//!
//! Export never blocks or slows a request: a finished span goes into a bounded queue ([`QUEUE`] spans) or, when the
//! queue is full, is dropped and counted (`tokenproxy_telemetry_spans_dropped_total`); one task on the runtime sends
//! batches of up to [`BATCH`] spans, at most [`DELAY`] after the first of them, each export bounded by
//! [`EXPORT_TIMEOUT`] (a batch that fails or times out is dropped and counted too). With telemetry off, the request
//! path only tests one `Option`, and a caller's `traceparent` passes through untouched.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector, HttpClient, HttpError};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter as _, SpanProcessor};
use opentelemetry_sdk::Resource;
use tokio::sync::mpsc;

use crate::config::{OtlpProtocol, TelemetryConfig, NO_GRPC};

/// Finished spans waiting for export, at most.
pub const QUEUE: usize = 2048;
/// Spans per export, at most.
pub const BATCH: usize = 512;
/// How long a span waits for others before its batch is sent.
pub const DELAY: Duration = Duration::from_secs(1);
/// One export's limit.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// The collector's answer is read up to this size (it says only whether it took the spans).
const ANSWER_LIMIT: usize = 64 * 1024;

/// Why telemetry could not be started (the message names the key or variable at fault).
#[derive(Debug, thiserror::Error)]
#[error("telemetry: {0}")]
pub struct TelemetryError(String);

/// The tracer and what it needs to continue and propagate traces; one per process.
#[derive(Debug)]
pub struct Telemetry {
    /// The export task's queue, for a flush.
    queue: mpsc::Sender<Item>,
    tracer: SdkTracer,
    /// Kept for as long as telemetry runs (the SDK shuts its processors down when the last handle goes).
    _provider: SdkTracerProvider,
    propagator: TraceContextPropagator,
    /// `sample_ratio = 0`: a request without a caller's trace is never sampled (and costs one header lookup).
    no_new_traces: bool,
}

/// What telemetry's configuration comes to once the `OTEL_*` environment is read: `None` when it is off.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// Where spans go: the URL they are posted to (`…/v1/traces`), or the gRPC collector's.
    pub endpoint: String,
    /// How they go.
    pub protocol: OtlpProtocol,
    /// `service.name`.
    pub service_name: String,
}

/// Resolves the endpoint, the protocol and the service name: `telemetry.*` keys win over `OTEL_*` variables (the
/// `TOKENPROXY_*` variables are config keys already); `OTEL_SDK_DISABLED=true` turns telemetry off unless
/// `otlp_endpoint` is set. Over HTTP, `/v1/traces` is appended to a base endpoint (`otlp_endpoint`,
/// `OTEL_EXPORTER_OTLP_ENDPOINT`); over gRPC every endpoint is used as it is, as the OTLP exporter specification says.
pub fn resolve(
    config: &TelemetryConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Resolved>, TelemetryError> {
    let var = |name: &str| env(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
    if config.otlp_endpoint.is_none() && var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    let protocol = match config.otlp_protocol {
        Some(protocol) => protocol,
        None => match ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"]
            .into_iter()
            .find_map(|name| var(name).map(|value| (name, value)))
        {
            None => OtlpProtocol::HttpProtobuf,
            Some((name, value)) => match OtlpProtocol::named(&value) {
                Some(OtlpProtocol::Grpc) if !cfg!(feature = "otlp-grpc") => {
                    return Err(TelemetryError(format!("{name} `{value}`: {NO_GRPC}")))
                }
                Some(protocol) => protocol,
                None => {
                    return Err(TelemetryError(format!(
                        "{name} `{value}`: tokenproxy exports over `http/protobuf` or `grpc`"
                    )))
                }
            },
        },
    };
    let base = |url: &str| match protocol {
        OtlpProtocol::HttpProtobuf => format!("{}/v1/traces", url.trim_end_matches('/')),
        OtlpProtocol::Grpc => url.to_owned(),
    };
    // A variable's URL is checked as the key's is: it is printed and logged, so it may not carry credentials.
    let checked = |name: &str, url: String| {
        let kinds = (["http", "https"], "an http:// or https:// URL");
        crate::config::server_url_text(&url, kinds, "send them with OTEL_EXPORTER_OTLP_HEADERS")
            .map(|_| url)
            .map_err(|e| TelemetryError(format!("{name}: {e}")))
    };
    let endpoint = match &config.otlp_endpoint {
        Some(url) => base(url),
        None => match var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            Some(full) => checked("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", full)?,
            None => match var("OTEL_EXPORTER_OTLP_ENDPOINT") {
                Some(url) => base(&checked("OTEL_EXPORTER_OTLP_ENDPOINT", url)?),
                None => return Ok(None),
            },
        },
    };
    let service_name =
        config.service_name.clone().or_else(|| var("OTEL_SERVICE_NAME")).unwrap_or_else(|| "tokenproxy".to_owned());
    Ok(Some(Resolved { endpoint, protocol, service_name }))
}

impl Telemetry {
    /// Starts telemetry as `config` and the environment say (`None`: it is off). Must run on the runtime: the export
    /// task is spawned on it. `dropped` counts spans that were not exported.
    pub fn start(
        config: &TelemetryConfig,
        dropped: prometheus::IntCounter,
    ) -> Result<Option<Arc<Telemetry>>, TelemetryError> {
        let Some(resolved) = resolve(config, &|name| std::env::var(name).ok())? else { return Ok(None) };
        let mut headers = HashMap::new();
        if let Some(source) = &config.headers {
            let text = source.read().map_err(|e| TelemetryError(format!("telemetry.headers: {e}")))?;
            for pair in text.expose().split(',').filter(|p| !p.trim().is_empty()) {
                let Some((name, value)) = pair.split_once('=') else {
                    return Err(TelemetryError(
                        "telemetry.headers: expected name=value pairs separated by commas".into(),
                    ));
                };
                let value = percent_encoding::percent_decode_str(value.trim()).decode_utf8_lossy().into_owned();
                headers.insert(name.trim().to_owned(), value);
            }
        }
        let mut exporter = match resolved.protocol {
            OtlpProtocol::HttpProtobuf => {
                let client = ExportClient::new().map_err(|e| TelemetryError(format!("the HTTPS client: {e}")))?;
                opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_http_client(client)
                    .with_endpoint(resolved.endpoint.clone())
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_timeout(EXPORT_TIMEOUT)
                    .with_headers(headers)
                    .build()
            }
            #[cfg(feature = "otlp-grpc")]
            OtlpProtocol::Grpc => grpc_exporter(&resolved.endpoint, headers)?,
            #[cfg(not(feature = "otlp-grpc"))]
            OtlpProtocol::Grpc => return Err(TelemetryError(NO_GRPC.to_owned())),
        }
        .map_err(|e| TelemetryError(format!("telemetry.otlp_endpoint `{}`: {e}", resolved.endpoint)))?;
        let resource = Resource::builder()
            .with_service_name(resolved.service_name.clone())
            .with_attributes(config.resource_attributes.iter().map(|(k, v)| KeyValue::new(k.clone(), v.clone())))
            .build();
        exporter.set_resource(&resource);
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(export(rx, exporter, dropped.clone()));
        let provider = SdkTracerProvider::builder()
            .with_span_processor(Queue { tx: tx.clone(), dropped })
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sample_ratio))))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("tokenproxy");
        tracing::info!(endpoint = %resolved.endpoint, service = %resolved.service_name, "telemetry: exporting traces");
        let no_new_traces = config.sample_ratio <= 0.0;
        let propagator = TraceContextPropagator::new();
        Ok(Some(Arc::new(Telemetry { queue: tx, tracer, _provider: provider, propagator, no_new_traces })))
    }

    /// The server span of a request with `headers` (continuing the caller's `traceparent`): named by its method
    /// until its route is known.
    pub fn server_span(
        self: &Arc<Self>,
        method: &http::Method,
        path: &str,
        version: http::Version,
        headers: &HeaderMap,
    ) -> Option<RequestTrace> {
        if self.no_new_traces && !headers.contains_key(&crate::proxy::headers::TRACEPARENT) {
            return None;
        }
        let parent = self.propagator.extract(&HeaderExtractor(headers));
        let mut span = self
            .tracer
            .span_builder(method_name(method))
            .with_kind(SpanKind::Server)
            .start_with_context(&self.tracer, &parent);
        // Not sampled (the caller's trace is not, or the ratio said no): nothing more is done for the request, and the
        // caller's traceparent goes on as it came.
        if !span.is_recording() {
            return None;
        }
        let version = match version {
            http::Version::HTTP_2 => "2",
            http::Version::HTTP_10 => "1.0",
            _ => "1.1",
        };
        span.set_attributes([
            KeyValue::new("http.request.method", method_name(method)),
            KeyValue::new("url.path", path.to_owned()),
            KeyValue::new("network.protocol.version", version),
        ]);
        Some(RequestTrace { telemetry: Arc::clone(self), cx: parent.with_span(span), method: method.clone() })
    }

    /// The root span of a token call no request asked for (at startup, a proactive refresh, a forced one), when the
    /// ratio samples it.
    pub fn background_token_call(self: &Arc<Self>, provider: &str, reason: &'static str) -> Option<ChildSpan> {
        let attributes =
            vec![KeyValue::new("tokenproxy.provider", provider.to_owned()), KeyValue::new("tokenproxy.reason", reason)];
        let root = Context::new();
        let span = self
            .tracer
            .span_builder("token.call")
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &root);
        span.is_recording().then(|| ChildSpan { cx: root.with_span(span) })
    }

    /// Exports the spans finished so far, waiting at most `within` (at shutdown: the last requests' spans are not
    /// left in the queue).
    pub async fn flush(&self, within: Duration) {
        let (done, flushed) = tokio::sync::oneshot::channel();
        let flush = async {
            if self.queue.send(Item::Flush(done)).await.is_ok() {
                let _ = flushed.await;
            }
        };
        if tokio::time::timeout(within, flush).await.is_err() {
            tracing::warn!("telemetry: the last spans were not exported within {within:?}");
        }
    }
}

tokio::task_local! {
    /// The trace of the request a future runs for (set around its waits for a token), so that the token call it
    /// triggers is a child of its server span.
    static REQUEST: TraceHandle;
    /// The span of the token call a future makes, so that the call's HTTP request carries its `traceparent`.
    static TOKEN_CALL: Context;
}

/// A request's trace, as the token engine keeps it for the call the request triggered.
#[derive(Debug, Clone)]
pub struct TraceHandle {
    telemetry: Arc<Telemetry>,
    cx: Context,
    /// The request's `token.wait` span, while it waits.
    wait: Option<Context>,
}

/// A token call's span, as the requests that wait for it link to it.
pub type CallLink = opentelemetry::trace::SpanContext;

impl TraceHandle {
    /// Links the request's `token.wait` span to the token call in flight it waits for (single flight: the call is
    /// another request's, or a background one).
    pub fn link_to_call(&self, call: &CallLink) {
        if let Some(wait) = &self.wait {
            wait.span().add_link(call.clone(), Vec::new());
        }
    }

    /// The span of a token call of `provider` (made for `reason`) under this request's server span.
    pub fn token_call(&self, provider: &str, reason: &'static str) -> ChildSpan {
        self.client_span("token.call", provider, reason)
    }

    /// The span of the token exchange of this request's caller, with `provider`.
    pub fn token_exchange(&self, provider: &str) -> ChildSpan {
        self.client_span("token.exchange", provider, "exchange")
    }

    fn client_span(&self, name: &'static str, provider: &str, reason: &'static str) -> ChildSpan {
        let attributes =
            vec![KeyValue::new("tokenproxy.provider", provider.to_owned()), KeyValue::new("tokenproxy.reason", reason)];
        child_of(&self.telemetry, &self.cx, name.into(), SpanKind::Client, attributes)
    }
}

/// A span started now under the span of `cx`.
fn child_of(
    telemetry: &Arc<Telemetry>,
    cx: &Context,
    name: std::borrow::Cow<'static, str>,
    kind: SpanKind,
    attributes: Vec<KeyValue>,
) -> ChildSpan {
    let tracer = &telemetry.tracer;
    let span = tracer.span_builder(name).with_kind(kind).with_attributes(attributes).start_with_context(tracer, cx);
    ChildSpan { cx: cx.with_span(span) }
}

/// The trace of the request this future runs for, if it is traced (see [`token_wait`]).
pub fn current_request() -> Option<TraceHandle> {
    REQUEST.try_with(TraceHandle::clone).ok()
}

/// Runs `work`, a request's wait for a token, as a `token.wait` span of its trace (when it is traced): a token call it
/// triggers joins that trace, and a call in flight it waits for is linked to the span. `failed` says whether the
/// wait came back without a token (`error.type = token_unavailable`).
pub async fn token_wait<F: std::future::Future>(
    trace: Option<&RequestTrace>,
    work: F,
    failed: impl FnOnce(&F::Output) -> bool,
) -> F::Output {
    let Some(trace) = trace else { return work.await };
    let span = trace.token_wait();
    let mut handle = trace.handle();
    handle.wait = Some(span.cx.clone());
    let output = REQUEST.scope(handle, work).await;
    let error = failed(&output).then_some("token_unavailable");
    span.end(error);
    output
}

/// Runs `work` (a token call or exchange) under `span`: its HTTP request carries the span's `traceparent`
/// ([`inject_token_call`]); the span then notes the outcome (`tokenproxy.outcome`, and `error.type = failure` when
/// `work` failed) and ends.
pub async fn within_token_call<T, E>(
    span: Option<ChildSpan>,
    failure: &'static str,
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let Some(span) = span else { return work.await };
    let result = TOKEN_CALL.scope(span.cx.clone(), work).await;
    span.set(KeyValue::new("tokenproxy.outcome", if result.is_ok() { "success" } else { "error" }));
    span.end(result.is_err().then_some(failure));
    result
}

/// Puts the running token call's `traceparent` in `headers`, when it is traced and sampled.
pub fn inject_token_call(headers: &mut HeaderMap) {
    let _ = TOKEN_CALL.try_with(|cx| inject(cx, headers));
}

/// Puts the `traceparent` (and `tracestate`) of `cx`'s span in `headers`, when it is sampled: the next hop's parent is
/// that span. An unsampled trace's `traceparent` stays as the caller sent it.
fn inject(cx: &Context, headers: &mut HeaderMap) {
    if cx.span().span_context().is_sampled() {
        TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
    }
}

/// A method's name, without an allocation for the standard ones.
fn method_name(method: &http::Method) -> std::borrow::Cow<'static, str> {
    use http::Method;
    let known: &'static str = match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => return std::borrow::Cow::Owned(method.as_str().to_owned()),
    };
    std::borrow::Cow::Borrowed(known)
}

/// The trace of one request: its server span's context.
#[derive(Debug)]
pub struct RequestTrace {
    telemetry: Arc<Telemetry>,
    cx: Context,
    method: http::Method,
}

impl RequestTrace {
    /// What the token engine keeps of this trace for the token call the request triggers.
    pub fn handle(&self) -> TraceHandle {
        TraceHandle { telemetry: Arc::clone(&self.telemetry), cx: self.cx.clone(), wait: None }
    }

    /// The server span's trace and span ids, when it is sampled (for the access log).
    pub fn ids(&self) -> Option<(String, String)> {
        let span = self.cx.span();
        let context = span.span_context();
        context.is_sampled().then(|| (context.trace_id().to_string(), context.span_id().to_string()))
    }

    /// [`Self::ids`] for the log lines the request's work writes (not formatted until a line is written).
    pub fn log_ids(&self) -> Option<crate::logging::TraceIds> {
        let span = self.cx.span();
        let context = span.span_context();
        let ids = crate::logging::TraceIds { trace_id: context.trace_id(), span_id: context.span_id() };
        context.is_sampled().then_some(ids)
    }

    /// The span of one send to the upstream at `server` (`resend_count`: the sends before it).
    pub fn attempt(&self, server: &str, method: &http::Method, resend_count: u8) -> ChildSpan {
        let mut attributes = vec![
            KeyValue::new("http.request.method", method_name(method)),
            KeyValue::new("server.address", server.to_owned()),
        ];
        if resend_count > 0 {
            attributes.push(KeyValue::new("http.request.resend_count", i64::from(resend_count)));
        }
        child_of(&self.telemetry, &self.cx, method_name(method), SpanKind::Client, attributes)
    }

    /// The span of a wait for a token call in flight.
    pub fn token_wait(&self) -> ChildSpan {
        child_of(&self.telemetry, &self.cx, "token.wait".into(), SpanKind::Internal, Vec::new())
    }

    /// Names the server span after the route (`METHOD ROUTE`) and notes its provider.
    pub fn routed(&self, route: &str, server: &str, provider: Option<&str>) {
        let span = self.cx.span();
        span.update_name(format!("{} {route}", self.method.as_str()));
        span.set_attribute(KeyValue::new("http.route", route.to_owned()));
        span.set_attribute(KeyValue::new("server.address", server.to_owned()));
        if let Some(provider) = provider {
            span.set_attribute(KeyValue::new("tokenproxy.provider", provider.to_owned()));
        }
    }

    /// Ends the server span with the status the caller got.
    pub fn end(&self, status: http::StatusCode, replayed: bool) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new("http.response.status_code", i64::from(status.as_u16())));
        span.set_attribute(KeyValue::new("tokenproxy.replayed", replayed));
        if status.is_server_error() {
            span.set_attribute(KeyValue::new("error.type", status.as_str().to_owned()));
            span.set_status(Status::error(""));
        }
        span.end();
    }
}

/// A span under a request's server span.
#[derive(Debug)]
pub struct ChildSpan {
    cx: Context,
}

impl ChildSpan {
    /// Puts this span's `traceparent` (and `tracestate`) in `headers`, when it is sampled: the next hop's parent is
    /// this span. An unsampled trace's `traceparent` stays as the caller sent it.
    pub fn inject(&self, headers: &mut HeaderMap) {
        inject(&self.cx, headers);
    }

    /// What a request waiting for this token call links its `token.wait` span to.
    pub fn link(&self) -> CallLink {
        self.cx.span().span_context().clone()
    }

    /// Sets an attribute.
    pub fn set(&self, attribute: KeyValue) {
        self.cx.span().set_attribute(attribute);
    }

    /// Ends an upstream attempt's span with the upstream's `status`.
    pub fn answered(self, status: http::StatusCode) {
        self.set(KeyValue::new("http.response.status_code", i64::from(status.as_u16())));
        let error = status.is_server_error().then(|| status.as_str().to_owned());
        self.end(error.as_deref());
    }

    /// Ends the span; `error`: what failed (`error.type`).
    pub fn end(self, error: Option<&str>) {
        let span = self.cx.span();
        if let Some(error) = error {
            span.set_attribute(KeyValue::new("error.type", error.to_owned()));
            span.set_status(Status::error(""));
        }
        span.end();
    }
}

/// The gRPC exporter (tonic, rustls with the webpki roots) for `endpoint`, sending `headers` as metadata.
#[cfg(feature = "otlp-grpc")]
fn grpc_exporter(
    endpoint: &str,
    headers: HashMap<String, String>,
) -> Result<Result<opentelemetry_otlp::SpanExporter, opentelemetry_otlp::ExporterBuildError>, TelemetryError> {
    use opentelemetry_otlp::WithTonicConfig as _;
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        let invalid = || TelemetryError(format!("telemetry.headers: `{name}` is not a valid gRPC metadata entry"));
        let key = http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid())?;
        map.insert(key, HeaderValue::from_str(&value).map_err(|_| invalid())?);
    }
    Ok(opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.to_owned())
        .with_protocol(opentelemetry_otlp::Protocol::Grpc)
        .with_timeout(EXPORT_TIMEOUT)
        .with_metadata(tonic::metadata::MetadataMap::from_headers(map))
        .with_tls_config(tonic::transport::ClientTlsConfig::new().with_webpki_roots())
        .build())
}

/// What the export task's queue holds: finished spans, and a request to send what came before at once.
#[derive(Debug)]
enum Item {
    Span(Box<SpanData>),
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// The span processor: finished spans go to the export task's bounded queue, or are dropped and counted.
#[derive(Debug)]
struct Queue {
    tx: mpsc::Sender<Item>,
    dropped: prometheus::IntCounter,
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.tx.try_send(Item::Span(Box::new(span))).is_err() {
            self.dropped.inc();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// The export task: batches of up to [`BATCH`] spans, sent one at a time (the exporter is never called
/// concurrently), each within [`EXPORT_TIMEOUT`]; what fails is dropped and counted.
async fn export(
    mut rx: mpsc::Receiver<Item>,
    exporter: opentelemetry_otlp::SpanExporter,
    dropped: prometheus::IntCounter,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut flushed = None;
    while let Some(first) = rx.recv().await {
        match first {
            Item::Span(span) => batch.push(*span),
            Item::Flush(done) => flushed = Some(done),
        }
        let deadline = tokio::time::Instant::now() + DELAY;
        while batch.len() < BATCH && flushed.is_none() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Item::Span(span))) => batch.push(*span),
                Ok(Some(Item::Flush(done))) => flushed = Some(done),
                Ok(None) | Err(_) => break,
            }
        }
        if batch.is_empty() {
            if let Some(done) = flushed.take() {
                let _ = done.send(());
            }
            continue;
        }
        let count = batch.len() as u64;
        match tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(std::mem::take(&mut batch))).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                dropped.inc_by(count);
                tracing::debug!("telemetry: {count} spans not exported: {error}");
            }
            Err(_) => {
                dropped.inc_by(count);
                tracing::debug!("telemetry: {count} spans not exported: the collector did not answer in time");
            }
        }
        if let Some(done) = flushed.take() {
            let _ = done.send(());
        }
    }
}

/// The exporter's HTTP client: hyper over rustls (the system's roots), HTTP/1.1 and h2.
#[derive(Debug, Clone)]
struct ExportClient {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl ExportClient {
    fn new() -> Result<ExportClient, crate::tls::TlsError> {
        let tls = crate::tls::client_config(&crate::tls::ClientTls {
            ca_file: None,
            only_ca_file: false,
            client_cert: None,
        })?;
        let connector = crate::tls::https_connector(tls, EXPORT_TIMEOUT);
        Ok(ExportClient { client: Client::builder(TokioExecutor::new()).build(connector) })
    }
}

#[async_trait::async_trait]
impl HttpClient for ExportClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (mut parts, body) = request.into_parts();
        parts.headers.entry(http::header::USER_AGENT).or_insert(HeaderValue::from_static("tokenproxy"));
        let response = self.client.request(Request::from_parts(parts, Full::new(body))).await?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, ANSWER_LIMIT).collect().await?.to_bytes();
        Ok(Response::from_parts(parts, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_wins_over_otel_variables_and_sdk_disabled_turns_only_the_environment_off() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned())
        };
        let off = TelemetryConfig::default();
        assert_eq!(resolve(&off, &env(&[])).unwrap(), None, "nothing configured: off");
        let base =
            env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318/"), ("OTEL_SERVICE_NAME", "orders-gw")]);
        let resolved = resolve(&off, &base).unwrap().unwrap();
        assert_eq!(
            (resolved.endpoint.as_str(), resolved.service_name.as_str()),
            ("http://127.0.0.1:4318/v1/traces", "orders-gw")
        );
        let full = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://b:4318/custom"),
        ]);
        assert_eq!(
            resolve(&off, &full).unwrap().unwrap().endpoint,
            "http://b:4318/custom",
            "the traces variable is used as is"
        );
        let configured = TelemetryConfig {
            otlp_endpoint: Some("http://127.0.0.1:9999".into()),
            service_name: Some("edge".into()),
            ..TelemetryConfig::default()
        };
        let resolved = resolve(&configured, &base).unwrap().unwrap();
        assert_eq!(
            (resolved.endpoint.as_str(), resolved.service_name.as_str()),
            ("http://127.0.0.1:9999/v1/traces", "edge")
        );
        let disabled = env(&[("OTEL_SDK_DISABLED", "true"), ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4318")]);
        assert_eq!(resolve(&off, &disabled).unwrap(), None);
        assert!(resolve(&configured, &disabled).unwrap().is_some(), "a configured endpoint is the operator's word");
        assert_eq!(
            resolve(&off, &env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4318")])).unwrap().unwrap().service_name,
            "tokenproxy"
        );
    }

    #[test]
    fn the_protocol_comes_from_the_config_then_the_otel_variables_and_grpc_takes_endpoints_as_they_are() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned())
        };
        let off = TelemetryConfig::default();
        let protocol = |vars: &[(&str, &str)]| {
            let lookup = |name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned());
            resolve(&off, &lookup).map(|r| r.map(|r| (r.endpoint, r.protocol))).map_err(|e| e.to_string())
        };
        let base = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317");
        assert_eq!(
            protocol(&[base, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")]),
            Ok(Some(("http://127.0.0.1:4317/v1/traces".into(), OtlpProtocol::HttpProtobuf)))
        );
        assert_eq!(
            protocol(&[base, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]),
            Err(
                "telemetry: OTEL_EXPORTER_OTLP_PROTOCOL `http/json`: tokenproxy exports over `http/protobuf` or `grpc`"
                    .into()
            )
        );
        let grpc = protocol(&[
            base,
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
        ]);
        #[cfg(feature = "otlp-grpc")]
        assert_eq!(grpc, Ok(Some(("http://127.0.0.1:4317".into(), OtlpProtocol::Grpc))), "the traces variable wins");
        #[cfg(not(feature = "otlp-grpc"))]
        assert_eq!(grpc, Err(format!("telemetry: OTEL_EXPORTER_OTLP_TRACES_PROTOCOL `grpc`: {NO_GRPC}")));
        let leaky = protocol(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://user:hunter2@collector.example")]);
        let refused = leaky.unwrap_err();
        assert!(refused.contains("OTEL_EXPORTER_OTLP_ENDPOINT") && refused.contains("credentials"), "{refused}");
        assert!(!refused.contains("hunter2"), "the URL is never echoed: {refused}");
        let configured = TelemetryConfig {
            otlp_endpoint: Some("http://127.0.0.1:4317/".into()),
            otlp_protocol: Some(OtlpProtocol::HttpProtobuf),
            ..TelemetryConfig::default()
        };
        let resolved = resolve(&configured, &env(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")])).unwrap().unwrap();
        assert_eq!(resolved.protocol, OtlpProtocol::HttpProtobuf, "the config wins");
        #[cfg(feature = "otlp-grpc")]
        {
            let grpc = TelemetryConfig { otlp_protocol: Some(OtlpProtocol::Grpc), ..configured };
            assert_eq!(resolve(&grpc, &env(&[])).unwrap().unwrap().endpoint, "http://127.0.0.1:4317/");
        }
    }
}
