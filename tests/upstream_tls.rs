//! TLS to upstreams per route (docs/upstream-tls.md), against TLS upstreams made here with rcgen certificates: a
//! private CA instead of the web roots, `server_name` for an upstream reached by IP, client certificates (mTLS), the
//! handshake failures each told in words as 502 `upstream_unreachable`, and the files rotated while requests flow.

mod support;

use std::path::Path;
use std::time::Duration;

use support::tls::{write_atomically, Ca, TlsUpstream};
use support::{eventually, Client, FakeIdp, Proxy};

fn provider(idp: &FakeIdp) -> String {
    format!("[providers.api]\ntoken_url = \"{}\"\nclient_id = \"c\"\nclient_secret = \"s\"\n", idp.token_url())
}

/// A route `NAME` on prefix `/NAME` to `upstream`, with `extra` TOML lines.
fn route(name: &str, upstream: std::net::SocketAddr, extra: &[(&str, &Path)], more: &str) -> String {
    let mut text = format!(
        "[[routes]]\nname = \"{name}\"\nprefix = \"/{name}\"\nupstream = \"https://{upstream}\"\nprovider = \"api\"\n\
         strip_prefix = true\n{more}"
    );
    for (key, path) in extra {
        text.push_str(&format!("{key} = \"{}\"\n", path.display()));
    }
    text
}

async fn failure(client: &Client, proxy: &Proxy, path: &str) -> String {
    let reply = client.get(&proxy.url(path)).await;
    assert_eq!(reply.status, 502, "{path}: {}", reply.text());
    assert_eq!(reply.headers["x-tokenproxy-error"], "upstream_unreachable");
    reply.json()["detail"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn private_ca_server_name_and_client_certificate_each_do_their_part_and_failures_say_which() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, client_ca, stranger_ca) = (Ca::new("upstream CA"), Ca::new("client CA"), Ca::new("stranger CA"));
    let upstream = TlsUpstream::start(&ca.leaf(&["orders.internal"]), &[&client_ca]).await;
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let (cert, key) = client_ca.client("orders-client").write(dir.path(), "client");
    let (stranger_cert, stranger_key) = stranger_ca.client("stranger").write(dir.path(), "stranger");
    let expired_ca = Ca::new("expired CA");
    let expired = expired_ca.leaf_with("expired", &["127.0.0.1"], |params| {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    let expired_upstream = TlsUpstream::start(&expired, &[]).await;
    let http1_upstream = TlsUpstream::start(&ca.leaf(&["orders.internal"]), &[]).await;
    http1_upstream.offer_http1_only();
    let expired_ca_file = dir.path().join("expired-ca.pem");
    std::fs::write(&expired_ca_file, expired_ca.pem()).unwrap();

    let idp = FakeIdp::start(300).await;
    let name = "server_name = \"orders.internal\"\n";
    let a = upstream.addr;
    let config = [
        provider(&idp),
        route("mtls", a, &[("ca_file", &ca_file), ("client_cert_file", &cert), ("client_key_file", &key)], name),
        route("nocert", a, &[("ca_file", &ca_file)], name),
        route(
            "stranger",
            a,
            &[("ca_file", &ca_file), ("client_cert_file", &stranger_cert), ("client_key_file", &stranger_key)],
            name,
        ),
        route("noname", a, &[("ca_file", &ca_file), ("client_cert_file", &cert), ("client_key_file", &key)], ""),
        route("webroots", a, &[("client_cert_file", &cert), ("client_key_file", &key)], name),
        route("expired", expired_upstream.addr, &[("ca_file", &expired_ca_file)], ""),
        route("http1", http1_upstream.addr, &[("ca_file", &ca_file)], name),
    ]
    .concat();
    let proxy = Proxy::start(&config).await;
    proxy.wait_ready().await;
    let client = Client::new();

    // Everything right: the 401 replay over h2, the SNI and the client certificate as configured.
    let reply = client.get(&proxy.url("/mtls/x")).await;
    assert_eq!((reply.status, reply.text().as_str()), (200, "HTTP/2.0 Bearer tok-2"));
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2, "the first attempt and its replay: {seen:?}");
    for request in &seen {
        assert_eq!(request.sni.as_deref(), Some("orders.internal"), "server_name is sent as SNI");
        assert_eq!(request.client_cn.as_deref(), Some("orders-client"));
        // The host goes in `:authority` alone: a `Host` header beside it makes nginx (before 1.25) answer 400.
        assert_eq!(request.authority, Some(a.to_string()), "{request:?}");
        assert!(request.hosts.is_empty(), "an h2 request carries no Host header: {request:?}");
    }

    // Over HTTP/1.1 on TLS (ALPN), the host is a Host header, once.
    let reply = client.get(&proxy.url("/http1/x")).await;
    assert_eq!((reply.status, reply.text().as_str()), (200, "HTTP/1.1 Bearer tok-2"));
    let seen = http1_upstream.seen();
    assert_eq!(seen[0].hosts, [http1_upstream.addr.to_string()], "{seen:?}");

    let detail = failure(&client, &proxy, "/nocert/x").await;
    assert!(detail.contains("requires a client certificate") && detail.contains("client_cert_file"), "{detail}");
    let detail = failure(&client, &proxy, "/stranger/x").await;
    assert!(detail.contains("refused the route's client certificate"), "{detail}");
    let detail = failure(&client, &proxy, "/noname/x").await;
    assert!(detail.contains("name mismatch") && detail.contains("server_name"), "{detail}");
    let detail = failure(&client, &proxy, "/webroots/x").await;
    assert!(detail.contains("not signed by a trusted CA") && detail.contains("web roots"), "{detail}");
    let detail = failure(&client, &proxy, "/expired/x").await;
    assert!(detail.contains("expired"), "{detail}");
    assert_eq!(upstream.seen().len(), 2, "no failed handshake let a request through");
    assert!(expired_upstream.seen().is_empty());
    for secret in ["tok-", "BEGIN", "PRIVATE"] {
        assert!(!detail.contains(secret));
    }
    proxy.stop().await;
}

#[tokio::test]
async fn a_rotated_ca_bundle_and_client_certificate_are_used_without_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let (old_ca, new_ca) = (Ca::new("old upstream CA"), Ca::new("new upstream CA"));
    let (old_client_ca, new_client_ca) = (Ca::new("old client CA"), Ca::new("new client CA"));
    // During the rotation the upstream accepts client certificates from both client CAs.
    let upstream = TlsUpstream::start(&old_ca.leaf(&["127.0.0.1"]), &[&old_client_ca, &new_client_ca]).await;
    let ca_file = dir.path().join("ca.pem");
    write_atomically(&ca_file, &old_ca.pem());
    let (cert, key) = old_client_ca.client("client-1").write(dir.path(), "client");
    let idp = FakeIdp::start(300).await;
    let config = provider(&idp)
        + &route(
            "rotating",
            upstream.addr,
            &[("ca_file", &ca_file), ("client_cert_file", &cert), ("client_key_file", &key)],
            "",
        );
    let proxy = Proxy::start(&config).await;
    proxy.wait_ready().await;
    let client = Client::new();
    let reloads = "tokenproxy_upstream_tls_reloads_total{route=\"rotating\"}";
    let (mut sent, mut failed) = (0, 0);
    let send = async |sent: &mut usize, failed: &mut usize| {
        let reply = client.get(&proxy.url("/rotating/x")).await;
        *sent += 1;
        *failed += usize::from(reply.status != 200);
    };
    for _ in 0..20 {
        send(&mut sent, &mut failed).await;
    }
    let before = upstream.seen();
    assert!(before.iter().all(|s| s.client_cn.as_deref() == Some("client-1")));
    let old_connections: Vec<usize> = before.iter().map(|s| s.connection).collect();

    // A half-done rotation (a new certificate, its key not written yet) is not loaded: the old pair keeps working.
    // The files are looked at once a second on the request path, so requests keep flowing until a change is in use.
    let next = new_client_ca.client("client-2");
    write_atomically(&cert, &next.cert.pem());
    write_atomically(&ca_file, &(old_ca.pem() + &new_ca.pem()));
    let mut rounds = 0..;
    let round = eventually("the new files to be loaded", Duration::from_secs(10), async || {
        let round = rounds.next().expect("a next round");
        send(&mut sent, &mut failed).await;
        if round == 60 {
            write_atomically(&key, &next.key.serialize_pem());
        }
        (proxy.metric(reloads).await >= 1.0).then_some(round)
    })
    .await;
    assert!(round >= 60, "the half pair (new certificate, old key) was never loaded; the whole pair was");
    assert_eq!(proxy.metric(reloads).await, 1.0);
    let switched = upstream.seen().len();
    for _ in 0..20 {
        send(&mut sent, &mut failed).await;
    }
    for request in &upstream.seen()[switched..] {
        assert_eq!(request.client_cn.as_deref(), Some("client-2"), "the new client certificate only");
        assert!(!old_connections.contains(&request.connection), "no connection of the old files is used again");
    }

    // The upstream moves to the new CA, and the bundle drops the old one: new connections verify the new chain.
    upstream.replace(&new_ca.leaf(&["127.0.0.1"]), &[&new_client_ca]);
    let last_connection = upstream.seen().iter().map(|s| s.connection).max().unwrap();
    write_atomically(&ca_file, &new_ca.pem());
    eventually("the new bundle to be loaded", Duration::from_secs(10), async || {
        if proxy.metric(reloads).await >= 2.0 {
            return true;
        }
        send(&mut sent, &mut failed).await;
        false
    })
    .await;
    let switched = upstream.seen();
    for _ in 0..20 {
        send(&mut sent, &mut failed).await;
    }
    assert_eq!(failed, 0, "no failed request of {sent} across the rotation");
    let after = &upstream.seen()[switched.len()..];
    assert_eq!(after.len(), 20);
    assert!(after.iter().all(|s| s.connection > last_connection), "a new connection, verified against the new CA");
    proxy.stop().await;
}
