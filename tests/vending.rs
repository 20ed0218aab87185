//! Handing the raw token to applications that need it (docs/vending.md). `sink_file`: the file holds the token the
//! proxy itself sends, is readable by its owner only, is replaced at every refresh without a reader ever seeing part
//! of one, and is written only for a provider that allows it (`vend = true`). The vending listener: the same token,
//! only with `Metadata-Flavor: tokenproxy`, only for vended providers (others look unknown), only on loopback unless
//! allowed, every read counted.

mod support;

use std::os::unix::fs::PermissionsExt as _;

use bytes::Bytes;
use support::{Client, FakeIdp, FakeUpstream, Proxy};

fn config(idp: &FakeIdp, upstream: &FakeUpstream, sink: &std::path::Path, format: &str) -> String {
    format!(
        "[providers.api]\ntoken_url = \"{}\"\nclient_id = \"c\"\nclient_secret = \"s3cret-value\"\nmanual_refresh_interval = \"0s\"\nmin_refresh_interval = \"0s\"\n\
         vend = true\nsink_file = \"{}\"\nsink_format = \"{format}\"\n\
         [[routes]]\nprefix = \"/api\"\nupstream = \"{}\"\nprovider = \"api\"\n",
        idp.token_url(),
        sink.display(),
        upstream.url()
    )
}

#[tokio::test]
async fn the_sink_file_holds_the_token_the_proxy_sends_and_is_replaced_whole_at_every_refresh() {
    let (idp, upstream) = (FakeIdp::start(300).await, FakeUpstream::start().await);
    let dir = tempfile::tempdir().unwrap();
    let sink = dir.path().join("api.token");
    let proxy = Proxy::start(&config(&idp, &upstream, &sink, "raw")).await;
    proxy.wait_ready().await;
    assert_eq!(std::fs::read_to_string(&sink).unwrap(), "tok-1", "the raw token, no newline");
    assert_eq!(std::fs::metadata(&sink).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(Client::new().get(&proxy.url("/api/x")).await.status, 200);
    assert_eq!(upstream.seen().last().unwrap().headers["authorization"], "Bearer tok-1", "the same token");

    // A reader polling the file while the token is refreshed 20 times only ever sees a whole token.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (sink, stop) = (sink.clone(), std::sync::Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut reads = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let text = std::fs::read_to_string(&sink).expect("the file is always there");
                let whole =
                    text.strip_prefix("tok-").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
                assert!(whole, "a reader saw {text:?}");
                reads += 1;
            }
            reads
        })
    };
    for _ in 0..20 {
        let refreshed = Client::new().post(&proxy.admin_url("/tokens/api/refresh"), Bytes::new()).await;
        assert_eq!(refreshed.status, 200, "{}", refreshed.text());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.join().expect("the reader saw only whole tokens");
    assert!(reads > 0);
    assert_eq!(std::fs::read_to_string(&sink).unwrap(), "tok-21");
    assert_eq!(std::fs::metadata(&sink).unwrap().permissions().mode() & 0o777, 0o600);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers, [std::ffi::OsString::from("api.token")], "no temporary file left behind");
    proxy.stop().await;
}

#[tokio::test]
async fn the_json_sink_says_when_the_token_expires() {
    let (idp, upstream) = (FakeIdp::start(300).await, FakeUpstream::start().await);
    let dir = tempfile::tempdir().unwrap();
    let sink = dir.path().join("api.json");
    let proxy = Proxy::start(&config(&idp, &upstream, &sink, "json")).await;
    proxy.wait_ready().await;
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&sink).unwrap()).unwrap();
    assert_eq!((json["access_token"].as_str(), json["token_type"].as_str()), (Some("tok-1"), Some("Bearer")));
    let expires_at = humantime::parse_rfc3339(json["expires_at"].as_str().unwrap()).unwrap();
    let left = expires_at.duration_since(std::time::SystemTime::now()).unwrap().as_secs();
    assert!((290..=300).contains(&left), "{left}");
    proxy.stop().await;
}

#[test]
fn a_token_is_handed_out_only_where_it_is_allowed_and_useful() {
    let provider = |keys: &str| {
        format!(
            "[providers.api]\ntoken_url = \"https://idp.example/token\"\nclient_id = \"c\"\n{keys}\n\
             [[routes]]\nprefix = \"/\"\nupstream = \"https://a.internal\"\nprovider = \"api\"\n"
        )
    };
    let error = |keys: &str| tokenproxy::config::Config::from_toml_str(&provider(keys), "t").unwrap_err().to_string();
    assert!(error("client_secret = \"s\"\nsink_file = \"/run/token\"")
        .contains("providers.api.sink_file: sink_file hands the raw token to whoever reads the file: set vend = true"));
    let cert = "client_auth = \"tls_client_auth\"\nclient_cert_file = \"/etc/hosts\"\nclient_key_file = \"/etc/hosts\"\nvend = true";
    assert!(error(cert)
        .contains("providers.api.vend: the tokens of a provider that authenticates with a client certificate"));
    let ok = tokenproxy::config::Config::from_toml_str(
        &provider("client_secret = \"s\"\nvend = true\nsink_file = \"/run/t\""),
        "t",
    );
    let printed = ok.unwrap().to_redacted_toml();
    assert!(printed.contains("vend = true") && printed.contains("sink_file = \"/run/t\""), "{printed}");
}

#[tokio::test]
async fn the_vending_listener_hands_out_the_proxys_token_only_when_asked_right() {
    let (idp, upstream) = (FakeIdp::start(300).await, FakeUpstream::start().await);
    let toml = format!(
        "[vending]\nlisten = \"127.0.0.1:0\"\n\
         [providers.api]\ntoken_url = \"{url}\"\nclient_id = \"c\"\nclient_secret = \"s3cret-value\"\nvend = true\n\
         [providers.private]\ntoken_url = \"{url}\"\nclient_id = \"p\"\nclient_secret = \"s3cret-value\"\n\
         [[routes]]\nprefix = \"/api\"\nupstream = \"{up}\"\nprovider = \"api\"\n\
         [[routes]]\nprefix = \"/private\"\nupstream = \"{up}\"\nprovider = \"private\"\n",
        url = idp.token_url(),
        up = upstream.url()
    );
    let proxy = Proxy::start(&toml).await;
    proxy.wait_ready().await;
    let vending = proxy.vending.expect("a vending listener");
    let client = Client::new();
    let ask = |path: &str, flavor: Option<&str>| {
        let mut request = http::Request::get(format!("http://{vending}{path}"));
        if let Some(flavor) = flavor {
            request = request.header("metadata-flavor", flavor);
        }
        client.send(request.body(http_body_util::Full::new(Bytes::new())).unwrap())
    };
    let reply = ask("/v1/token/api", Some("tokenproxy")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.headers["cache-control"], "no-store");
    let body = reply.json();
    assert_eq!(
        (body["token_type"].as_str(), body["expires_in"].as_u64().map(|s| s > 290)),
        (Some("Bearer"), Some(true))
    );
    assert_eq!(Client::new().get(&proxy.url("/api/x")).await.status, 200);
    let sent = upstream.seen().last().unwrap().headers["authorization"].to_str().unwrap().to_owned();
    assert_eq!(sent, format!("Bearer {}", body["access_token"].as_str().unwrap()), "the token the proxy sends");

    // Without the header (what a forged request can do): refused. A provider not vended looks like an unknown one.
    assert_eq!(ask("/v1/token/api", None).await.status, 403);
    assert_eq!(ask("/v1/token/api", Some("Google")).await.status, 403);
    let private = ask("/v1/token/private", Some("tokenproxy")).await;
    let unknown = ask("/v1/token/nope", Some("tokenproxy")).await;
    assert_eq!((private.status, unknown.status), (404, 404));
    assert!(!private.text().contains("tok-"), "{}", private.text());
    assert_eq!(proxy.metric("tokenproxy_vended_tokens_total{provider=\"api\"}").await, 1.0);
    assert_eq!(idp.calls(), 2, "no token call of its own: the proxy's slots");
    proxy.stop().await;

    // Only loopback, unless allowed.
    let remote =
        "[vending]\nlisten = \"0.0.0.0:9091\"\n[[routes]]\nprefix = \"/\"\nupstream = \"http://127.0.0.1:9\"\n";
    let error = tokenproxy::config::Config::from_toml_str(remote, "t").unwrap_err().to_string();
    assert!(
        error.contains("vending.listen: the vending listener hands out raw tokens: it listens on a loopback address")
    );
    let allowed = remote.replace("9091\"", "9091\"\nallow_remote = true");
    assert!(tokenproxy::config::Config::from_toml_str(&allowed, "t").is_ok());
}

#[tokio::test]
async fn the_vending_listener_can_be_a_unix_socket_only_its_owner_may_use() {
    let (idp, upstream) = (FakeIdp::start(300).await, FakeUpstream::start().await);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vending.sock");
    let toml = format!(
        "[vending]\nlisten = \"{}\"\n\
         [providers.api]\ntoken_url = \"{}\"\nclient_id = \"c\"\nclient_secret = \"s3cret-value\"\nvend = true\n\
         [[routes]]\nprefix = \"/api\"\nupstream = \"{}\"\nprovider = \"api\"\n",
        socket.display(),
        idp.token_url(),
        upstream.url()
    );
    let proxy = Proxy::start(&toml).await;
    proxy.wait_ready().await;
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600);
    let stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    let request = http::Request::get("/v1/token/api")
        .header("host", "localhost")
        .header("metadata-flavor", "tokenproxy")
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = http_body_util::BodyExt::collect(response.into_body()).await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["access_token"], "tok-1");
    proxy.stop().await;
    assert!(!socket.exists(), "the socket file is removed at shutdown");
}

#[tokio::test]
async fn planted_links_and_open_files_never_receive_the_sink_token() {
    let (idp, upstream) = (FakeIdp::start(300).await, FakeUpstream::start().await);
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let sink = dir.path().join("api.token");
    // A symlink at the name the temporary file used to have, and a world-readable file at the final name.
    let stolen = dir.path().join("stolen");
    std::os::unix::fs::symlink(&stolen, dir.path().join(".api.token.tmp")).unwrap();
    std::fs::write(&sink, "planted").unwrap();
    std::fs::set_permissions(&sink, std::fs::Permissions::from_mode(0o666)).unwrap();
    let proxy = Proxy::start(&config(&idp, &upstream, &sink, "raw")).await;
    proxy.wait_ready().await;
    assert_eq!(std::fs::read_to_string(&sink).unwrap(), "tok-1");
    assert_eq!(std::fs::metadata(&sink).unwrap().permissions().mode() & 0o777, 0o600, "0600, whatever was there");
    assert!(!stolen.exists(), "the planted link was not followed");
    // A directory others can write is named in check's warnings.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let toml = format!("[server]\nlisten = \"127.0.0.1:0\"\n{}", config(&idp, &upstream, &sink, "raw"));
    let warnings = tokenproxy::config::Config::from_toml_str(&toml, "test.toml").unwrap().warnings();
    assert!(warnings.iter().any(|w| w.starts_with("providers.api.sink_file:") && w.contains("0777")), "{warnings:?}");
    proxy.stop().await;
}
