//! `client_auth = "tls_client_auth"` (RFC 8705 §2.1): the client authenticates to the IdP with a certificate on the
//! TLS connection and names itself with `client_id` in the form; no secret goes anywhere. Against an HTTPS token
//! endpoint (rcgen CA) that requires a client certificate from the client CA and records what each call presented.
//! A renewed certificate is presented by the next token call, without a reload.

mod support;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::tls::{common_name, server_config, Ca};
use support::{Client, FakeUpstream, Proxy};
use tokio::net::TcpListener;

/// What one token call presented: the client certificate's common name and the form.
type Call = (Option<String>, Vec<(String, String)>);

#[tokio::test]
async fn the_client_certificate_authenticates_and_no_secret_is_sent() {
    let (server_ca, client_ca) = (Ca::new("idp CA"), Ca::new("client CA"));
    let config = server_config(&server_ca.leaf(&["127.0.0.1"]), &[&client_ca]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
    let log = Arc::clone(&calls);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&config));
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else { return };
                let cn = tls.get_ref().1.peer_certificates().and_then(|certs| common_name(certs.first()?));
                let service = service_fn(move |request: Request<Incoming>| {
                    let (log, cn) = (Arc::clone(&log), cn.clone());
                    async move {
                        let body = request.into_body().collect().await.unwrap().to_bytes();
                        let form = form_urlencoded::parse(&body).into_owned().collect();
                        let mut calls = log.lock().unwrap();
                        calls.push((cn, form));
                        let token = format!(
                            r#"{{"access_token":"mtls-{}","token_type":"Bearer","expires_in":300}}"#,
                            calls.len()
                        );
                        let mut response = Response::new(Full::new(Bytes::from(token)));
                        response.headers_mut().insert("content-type", "application/json".parse().unwrap());
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });

    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("idp-ca.pem");
    std::fs::write(&ca_file, server_ca.pem()).unwrap();
    let (cert, key) = client_ca.client("orders-mtls").write(dir.path(), "client");
    let upstream = FakeUpstream::start().await;
    let provider = format!(
        "[providers.mtls]\ntoken_url = \"https://{addr}/token\"\nclient_id = \"orders-mtls\"\n\
         client_auth = \"tls_client_auth\"\nmanual_refresh_interval = \"0s\"\nca_file = \"{}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
        ca_file.display(),
        cert.display(),
        key.display()
    );
    let route = format!("[[routes]]\nprefix = \"/api\"\nupstream = \"{}\"\nprovider = \"mtls\"\n", upstream.url());
    let proxy = Proxy::start(&(provider.clone() + &route)).await;
    let reply = Client::new().get(&proxy.url("/api/x")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = upstream.seen();
    assert_eq!(seen.last().unwrap().headers["authorization"], "Bearer mtls-1");
    let first = calls.lock().unwrap().clone();
    assert_eq!(first.len(), 1);
    let (cn, form) = &first[0];
    assert_eq!(cn.as_deref(), Some("orders-mtls"), "the client certificate was presented");
    let keys: Vec<&str> = form.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["grant_type", "client_id"], "the form names the client, with nothing secret: {form:?}");

    // A renewed certificate (its files replaced, as cert-manager does) is used by the next token call, no reload.
    client_ca.client("orders-mtls-renewed").write(dir.path(), "client");
    let refresh = Client::new().post(&format!("http://{}/tokens/mtls/refresh", proxy.admin), Bytes::new()).await;
    assert_eq!(refresh.status, 200, "{}", refresh.text());
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1].0.as_deref(), Some("orders-mtls-renewed"), "the next call presents the renewed certificate");
    proxy.stop().await;

    // Without a certificate there is nothing to authenticate with: refused at load, naming the key.
    let bare = provider.lines().filter(|l| !l.starts_with("client_cert_file") && !l.starts_with("client_key_file"));
    let bare = bare.collect::<Vec<_>>().join("\n") + "\n" + &route;
    let error = tokenproxy::config::Config::from_toml_str(&bare, "t").unwrap_err().to_string();
    assert!(
        error.contains("providers.mtls.client_cert_file: missing; client_auth = \"tls_client_auth\" authenticates with a client certificate"),
        "{error}"
    );
    let with_secret = provider.replacen("\nclient_auth", "\nclient_secret = \"s\"\nclient_auth", 1) + &route;
    let error = tokenproxy::config::Config::from_toml_str(&with_secret, "t").unwrap_err().to_string();
    assert!(error.contains("providers.mtls.client_secret: not used with client_auth = \"tls_client_auth\""), "{error}");
}
