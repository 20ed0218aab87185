//! The listener: TLS (rustls, h2 and HTTP/1.1 by ALPN) and the slowloris guard.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use support::{basic_config, FakeIdp, FakeUpstream, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn tls_listener_serves_h2_and_http1_by_alpn() {
    let idp = FakeIdp::start(300).await;
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ntls = {{ cert_file = \"{}\", key_file = \"{}\" }}\n[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        cert_file.display(),
        key_file.display(),
        basic_config(&idp, &upstream)
    );
    let config = tokenproxy::config::Config::from_toml_str(&toml, "test.toml").unwrap();
    let proxy = Proxy::start_config(config).await;
    proxy.wait_ready().await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    for (h2, version) in [(true, http::Version::HTTP_2), (false, http::Version::HTTP_11)] {
        let tls =
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
        let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_only();
        let connector = if h2 { builder.enable_http2().build() } else { builder.enable_http1().build() };
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(h2)
            .build::<_, Full<Bytes>>(connector);
        let url = format!("https://localhost:{}/api/secure", proxy.addr.port());
        let response = client.request(http::Request::get(url).body(Full::default()).unwrap()).await.unwrap();
        assert_eq!(response.version(), version);
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(echo["headers"]["x-forwarded-proto"], "https");
        assert_eq!(echo["headers"]["authorization"], "Bearer tok-1");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn a_request_head_that_never_completes_is_cut_off() {
    let idp = FakeIdp::start(300).await;
    let upstream = FakeUpstream::start().await;
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nheader_read_timeout = \"300ms\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        basic_config(&idp, &upstream)
    );
    let proxy = Proxy::start_config(tokenproxy::config::Config::from_toml_str(&toml, "test.toml").unwrap()).await;
    proxy.wait_ready().await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(b"GET /api/x HTTP/1.1\r\nHost: localhost\r\nX-Slow: ").await.unwrap();
    let mut answer = Vec::new();
    // The proxy closes the connection (with or without a 408) long before this generous bound.
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the slow connection was closed")
        .ok();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    assert_eq!(upstream.requests(), 0);
    proxy.stop().await;
}
