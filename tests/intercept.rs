//! HTTPS interception for routed hosts (docs/local-dev.md): `tokenproxy ca init` makes a local CA constrained to the
//! intercepted hosts, and a client using tokenproxy as its HTTPS proxy (curl, here) reaches the real `https://` URL
//! with the token attached upstream, over HTTP/1.1 and h2 inside the tunnel. A CONNECT to any other host is refused
//! and nothing is dialled; a request inside a tunnel that names another host is 421; leaves the CA key signs for a
//! name or an address outside its constraints are refused by curl and by Python's ssl module. Runs on both HTTP/1.1
//! transports (`TP_TEST_HTTP1`): CONNECT always goes to hyper.

mod support;

use std::path::Path;
use std::process::Command;

use support::tls::{Ca, TlsUpstream};
use support::{tokenproxy_command, FakeIdp, Proxy};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const HOST: &str = "api.example.test";

/// A config with an intercepting route for [`HOST`] to `upstream` (trusted through `ca_file`), its state in `state`.
fn config(idp: &FakeIdp, upstream: &TlsUpstream, ca_file: &Path, state: &Path) -> String {
    format!(
        "[state]\ndir = {state:?}\n\
         [providers.api]\ntoken_url = \"{}\"\nclient_id = \"c\"\nclient_secret = \"s\"\n\
         [[routes]]\nname = \"api\"\nhost = \"{HOST}\"\nintercept = true\nupstream = \"https://{}\"\nprovider = \"api\"\n\
         ca_file = {ca_file:?}\nserver_name = \"orders.internal\"\n",
        idp.token_url(),
        upstream.addr
    )
}

/// A TLS upstream (its CA written in `dir`) and an IdP.
async fn parts(dir: &Path) -> (TlsUpstream, std::path::PathBuf, FakeIdp) {
    let upstream_ca = Ca::new("upstream CA");
    let upstream = TlsUpstream::start(&upstream_ca.leaf(&["orders.internal"]), &[]).await;
    let upstream_ca_file = dir.join("upstream-ca.pem");
    std::fs::write(&upstream_ca_file, upstream_ca.pem()).unwrap();
    (upstream, upstream_ca_file, FakeIdp::start(300).await)
}

/// Runs curl with `args` through `proxy` (its HTTPS proxy), trusting `ca`: (exit code, stdout, stderr).
async fn curl(proxy: &Proxy, ca: &Path, args: &[&str]) -> (i32, String, String) {
    let mut command = tokio::process::Command::new("curl");
    command
        .args(["-sS", "--max-time", "10", "--proxy", &format!("http://{}", proxy.addr), "--cacert"])
        .arg(ca)
        .args(args)
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy");
    let output = command.output().await.expect("curl runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn curl_reaches_the_real_https_url_through_the_proxy_with_the_token_attached() {
    let dir = tempfile::tempdir().unwrap();
    let (upstream, upstream_ca_file, idp) = parts(dir.path()).await;
    let state = dir.path().join("state");
    let toml = config(&idp, &upstream, &upstream_ca_file, &state);
    let config_file = dir.path().join("tokenproxy.toml");
    std::fs::write(&config_file, &toml).unwrap();

    // Without a CA, an intercepting config does not start (the CA is made only on request).
    let missing = tokenproxy::App::build(tokenproxy::config::Config::from_toml_str(&toml, "t.toml").unwrap());
    let missing = missing.err().expect("no CA, no start").to_string();
    assert!(missing.contains("tokenproxy ca init"), "{missing}");

    let cli = |args: &[&str]| {
        let mut command: Command = tokenproxy_command(args);
        command.arg("--config").arg(&config_file).current_dir(dir.path());
        command.output().unwrap()
    };
    let init = cli(&["ca", "init"]);
    let said = String::from_utf8_lossy(&init.stderr).into_owned();
    assert_eq!(init.status.code(), Some(0), "{said}");
    assert!(said.contains(&state.display().to_string()) && said.contains(HOST), "{said}");
    let again = cli(&["ca", "init"]);
    assert_eq!(again.status.code(), Some(1), "a second init without --force is refused");
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    let printed = cli(&["ca", "print"]);
    assert_eq!(printed.status.code(), Some(0));
    let pem = String::from_utf8(printed.stdout).unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    let ca_file = dir.path().join("tokenproxy-ca.pem");
    std::fs::write(&ca_file, &pem).unwrap();

    let proxy = Proxy::start(&toml).await;
    proxy.wait_ready().await;
    let url = format!("https://{HOST}/orders/42");
    // The first token (tok-1) is refused by the upstream: refreshed and replayed inside the tunnel too.
    let (code, body, err) = curl(&proxy, &ca_file, &["--http1.1", &url]).await;
    assert_eq!((code, body.as_str()), (0, "HTTP/2.0 Bearer tok-2"), "{err}");
    let (code, body, err) = curl(&proxy, &ca_file, &["--http2", "-w", " %{http_version}", &url]).await;
    assert_eq!((code, body.as_str()), (0, "HTTP/2.0 Bearer tok-2 2"), "h2 inside the tunnel: {err}");
    // Keep-alive inside one tunnel: two requests, one CONNECT.
    let connects = proxy.metric("tokenproxy_requests_total{route=\"\",status=\"200\"}").await;
    let (code, body, err) = curl(&proxy, &ca_file, &["--http1.1", &url, &url]).await;
    assert_eq!((code, body.as_str()), (0, "HTTP/2.0 Bearer tok-2HTTP/2.0 Bearer tok-2"), "{err}");
    let after = proxy.metric("tokenproxy_requests_total{route=\"\",status=\"200\"}").await;
    assert_eq!(after - connects, 1.0, "one tunnel for both requests");

    // Inside the tunnel, only the CONNECT host: another Host is 421.
    let (code, body, _) =
        curl(&proxy, &ca_file, &["--http1.1", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Host: other.test", &url])
            .await;
    assert_eq!((code, body.as_str()), (0, "421"));

    // Any other host: 403 to the CONNECT, and nothing is dialled.
    let seen = upstream.seen().len();
    let (code, _, err) = curl(&proxy, &ca_file, &["https://other.test/x"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("403"), "{err}");
    assert_eq!(upstream.seen().len(), seen);
    proxy.stop().await;
}

/// The raw CONNECT answers, on both HTTP/1.1 transports: 200 for an intercepted host at any port, 403 for another
/// host or an address, and the listener goes on answering plain requests.
#[tokio::test]
async fn a_connect_is_answered_by_its_host_on_both_transports() {
    let dir = tempfile::tempdir().unwrap();
    let (upstream, upstream_ca_file, idp) = parts(dir.path()).await;
    let state = dir.path().join("state");
    tokenproxy::ca::LocalCa::init(&state, &[HOST.to_owned()], false).unwrap();
    // A second intercepted host, added after the CA was made: outside its constraints until `ca init --force`.
    let toml = config(&idp, &upstream, &upstream_ca_file, &state)
        + &format!(
            "[[routes]]\nhost = \"new.example.test\"\nintercept = true\nupstream = \"https://{}\"\n",
            upstream.addr
        );
    let proxy = Proxy::start(&toml).await;
    for (target, status, says) in [
        (format!("{HOST}:443"), "200", ""),
        (format!("{HOST}:8443"), "200", ""),
        ("API.Example.Test:443".to_owned(), "200", ""),
        ("other.test:443".to_owned(), "403", "intercept = true"),
        ("127.0.0.1:443".to_owned(), "403", "not a forward proxy"),
        (format!("{}", upstream.addr), "403", "not a forward proxy"),
        ("new.example.test:443".to_owned(), "403", "tokenproxy ca init --force"),
    ] {
        let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes()).await.unwrap();
        let mut head = vec![0u8; 4096];
        let n = stream.read(&mut head).await.unwrap();
        let head = String::from_utf8_lossy(&head[..n]).into_owned();
        assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "CONNECT {target}: {head}");
        assert!(head.contains(says), "CONNECT {target}: {head}");
    }
    assert!(upstream.seen().is_empty(), "no CONNECT dialled anything");
    proxy.stop().await;
}

/// Leaves signed with the local CA's key (as a thief of the key would sign them) for a name outside its constraints
/// and for an IP address: curl and Python's ssl module, trusting the CA, refuse both.
#[tokio::test]
async fn real_clients_refuse_leaves_outside_the_cas_constraints() {
    let dir = tempfile::tempdir().unwrap();
    let ca = tokenproxy::ca::LocalCa::init(dir.path(), &[HOST.to_owned()], false).unwrap();
    let ca_file = dir.path().join("tokenproxy-ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.path().join("ca-key.pem")).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_der(ca.cert(), key).unwrap();
    for (san, name) in [
        (rcgen::SanType::DnsName("evil.example".try_into().unwrap()), "evil.example"),
        (rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()), "127.0.0.1"),
        (rcgen::SanType::DnsName(HOST.try_into().unwrap()), HOST),
    ] {
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![san];
        let cert = params.signed_by(&leaf_key, &issuer).unwrap();
        let leaf = support::tls::Leaf { cert, key: leaf_key };
        let server = TlsUpstream::start(&leaf, &[]).await;
        let port = server.addr.port();
        let curl = tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "10", "--noproxy", "*", "--cacert"])
            .arg(&ca_file)
            .args(["--resolve", &format!("{name}:{port}:127.0.0.1"), &format!("https://{name}:{port}/")])
            .output()
            .await
            .unwrap();
        let python = tokio::process::Command::new("python3")
            .args([
                "-c",
                "import socket, ssl, sys\n\
                 ctx = ssl.create_default_context(cafile=sys.argv[1])\n\
                 try:\n    ctx.wrap_socket(socket.create_connection(('127.0.0.1', int(sys.argv[3])), timeout=10), server_hostname=sys.argv[2]).close()\n\
                 except ssl.SSLCertVerificationError as e:\n    print(e.verify_message); sys.exit(3)\n",
            ])
            .arg(&ca_file)
            .arg(name)
            .arg(port.to_string())
            .output()
            .await
            .unwrap();
        let why = format!("{}{}", String::from_utf8_lossy(&curl.stderr), String::from_utf8_lossy(&python.stdout));
        if name == HOST {
            assert_eq!((curl.status.code(), python.status.code()), (Some(0), Some(0)), "{name}: {why}");
        } else {
            assert_eq!(curl.status.code(), Some(60), "curl: certificate refused for {name}: {why}");
            assert_eq!(python.status.code(), Some(3), "python: certificate refused for {name}: {why}");
            // OpenSSL's words for a name outside the CA's permitted subtrees or inside its excluded ones.
            assert!(why.contains("subtree violation"), "{name}: {why}");
        }
    }
}

/// A tunnel whose caller never starts TLS is closed after `header_read_timeout`, and one that sends plain HTTP instead
/// of a TLS handshake at once: neither holds its connection until `tunnel_idle_timeout` (5 minutes).
#[tokio::test]
async fn a_tunnel_without_a_tls_handshake_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let (upstream, upstream_ca_file, idp) = parts(dir.path()).await;
    let state = dir.path().join("state");
    tokenproxy::ca::LocalCa::init(&state, &[HOST.to_owned()], false).unwrap();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nheader_read_timeout = \"300ms\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        config(&idp, &upstream, &upstream_ca_file, &state)
    );
    let proxy = Proxy::start_config(tokenproxy::config::Config::from_toml_str(&toml, "t.toml").unwrap()).await;
    for first in [&b""[..], b"GET /orders HTTP/1.1\r\nHost: api.example.test\r\n\r\n"] {
        let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(format!("CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n").as_bytes()).await.unwrap();
        let mut buffer = vec![0u8; 4096];
        let n = stream.read(&mut buffer).await.unwrap();
        assert!(buffer[..n].starts_with(b"HTTP/1.1 200 "), "{}", String::from_utf8_lossy(&buffer[..n]));
        stream.write_all(first).await.unwrap();
        // The guard is far above the timeout; the assertion is that the tunnel ends at all.
        let closed = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while let Ok(n) = stream.read(&mut buffer).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "the tunnel stayed open after {:?}", String::from_utf8_lossy(first));
    }
    assert!(upstream.seen().is_empty());
    proxy.stop().await;
}
