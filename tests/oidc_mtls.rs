//! Mutual-TLS client authentication (RFC 8705 §2) and certificate-bound access tokens (§3) against the real OpenID
//! provider (npm `oidc-provider`, served over HTTPS by `tests/idp/server.mjs` with its `features.mTLS`; see
//! `tests/idp/README.md`), with an HTTPS upstream (`tests/idp/upstream.mjs`) that verifies every token against the
//! provider's JWKS and accepts a bound token (`cnf.x5t#S256`) only on a connection presenting that certificate.
//!
//! - `tls_client_auth`: a certificate from the test CA with the subject the provider has registered authenticates;
//!   the token it gets is bound to it, and a route with `upstream_client_cert = "provider"` presents the same
//!   certificate, so the upstream takes it. The negative controls: the same token through a route presenting another
//!   certificate of the same CA, or none, is refused. A renewed certificate is presented by the next token call and
//!   by the route, and its tokens are bound to it.
//! - `self_signed_tls_client_auth`: the self-signed certificate registered in the client's JWKS (`x5c`)
//!   authenticates; another certificate is refused, and `check --fetch` gives the thumbprint it presented.
//!
//! Needs `node` >= 20 and `npm` on PATH (`tests/idp/node_modules` is installed by `npm ci` on first use).

mod support;

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use hyper::StatusCode;
use support::oidc::{soak, IdpProcess, UpstreamProcess};
use support::tls::{Ca, Leaf};
use support::{spawn_tokenproxy, toml_string, TokenProxyProcess};

/// A test CA, the provider and the upstream serving HTTPS with certificates from it, and the self-signed
/// certificate the provider has registered for `tp-mtls-self`.
struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
    ca_file: PathBuf,
    self_signed: Leaf,
    idp: IdpProcess,
    upstream: UpstreamProcess,
}

impl Pki {
    async fn start(lifetime_secs: u64) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("tokenproxy test CA");
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let idp_pair = ca.leaf(&["127.0.0.1"]).write(dir.path(), "idp");
        let upstream_pair = ca.leaf(&["127.0.0.1"]).write(dir.path(), "upstream");
        let self_signed = Leaf::self_signed("tokenproxy-self");
        let (self_signed_cert, _) = self_signed.write(dir.path(), "self");
        let idp =
            IdpProcess::start_https(lifetime_secs, (&idp_pair.0, &idp_pair.1), &ca_file, &self_signed_cert, &ca_file)
                .await;
        let upstream =
            UpstreamProcess::start_https(&idp, (&upstream_pair.0, &upstream_pair.1), &ca_file, &ca_file).await;
        Pki { dir, ca, ca_file, self_signed, idp, upstream }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A provider `name` authenticating as `client_id` with `client_auth` and the pair `cert` (`cert.crt`/`.key`).
    fn provider(&self, name: &str, client_id: &str, client_auth: &str, cert: &str) -> String {
        format!(
            "[providers.{name}]\n\
             token_url = {token_url}\n\
             client_id = \"{client_id}\"\n\
             client_auth = \"{client_auth}\"\n\
             ca_file = {ca}\n\
             client_cert_file = {cert_file}\n\
             client_key_file = {key_file}\n\
             scope = \"api.read\"\n\
             refresh_at = 0.5\n\
             expiry_skew = \"1s\"\n\
             timeout = \"3s\"\n\
             unauthorized_refresh_interval = \"0s\"\n\
             manual_refresh_interval = \"0s\"\n\n",
            token_url = toml_string(&format!("{}/token", self.idp.issuer)),
            ca = toml_string(&self.ca_file.to_string_lossy()),
            cert_file = toml_string(&self.path(&format!("{cert}.crt")).to_string_lossy()),
            key_file = toml_string(&self.path(&format!("{cert}.key")).to_string_lossy()),
        )
    }

    /// A route `/NAME` to the upstream with `provider`'s token and the TLS keys `tls` (besides `ca_file`).
    fn route(&self, name: &str, provider: &str, tls: &str) -> String {
        format!(
            "[[routes]]\nname = \"{name}\"\nprefix = \"/{name}\"\nstrip_prefix = true\nupstream = {}\n\
             provider = \"{provider}\"\nca_file = {}\n{tls}\n\n",
            toml_string(&self.upstream.url),
            toml_string(&self.ca_file.to_string_lossy()),
        )
    }

    fn pem_line(leaf: &Leaf) -> String {
        leaf.key.serialize_pem().lines().nth(1).unwrap().to_owned()
    }
}

/// The `cnf.x5t#S256` of a JWT access token (unverified: the upstream verified it).
fn bound_thumbprint(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&payload).ok()?;
    claims["cnf"]["x5t#S256"].as_str().map(str::to_owned)
}

#[tokio::test]
async fn tls_client_auth_tokens_are_bound_to_the_certificate_the_route_presents_and_refused_with_another() {
    const LIFETIME_SECS: u64 = 3;
    let pki = Pki::start(LIFETIME_SECS).await;
    let client = pki.ca.client("tokenproxy-mtls");
    client.write(pki.dir.path(), "client");
    pki.ca.client("someone-else").write(pki.dir.path(), "other");
    let (other_cert, other_key) = (pki.path("other.crt"), pki.path("other.key"));

    let mut config = pki.provider("mtls", "tp-mtls", "tls_client_auth", "client");
    config += &pki.route("bound", "mtls", "upstream_client_cert = \"provider\"");
    config += &pki.route(
        "other",
        "mtls",
        &format!(
            "client_cert_file = {}\nclient_key_file = {}",
            toml_string(&other_cert.to_string_lossy()),
            toml_string(&other_key.to_string_lossy())
        ),
    );
    config += &pki.route("nocert", "mtls", "");
    let proxy = TokenProxyProcess::start_in(pki.dir.path(), &config, &[]).await;
    proxy.wait_ready().await;

    // Three lifetimes of traffic: every request is accepted, each refresh authenticated by the certificate.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3 * LIFETIME_SECS);
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    let mut sent = 0;
    while tokio::time::Instant::now() < deadline {
        ticker.tick().await;
        let reply = proxy.get("/bound/x").await;
        assert_eq!(reply.status, StatusCode::OK, "{}\n{}", reply.text(), proxy.logs());
        assert_eq!(reply.json()["client_id"], "tp-mtls");
        sent += 1;
    }
    let stats = pki.idp.stats().await;
    let entry = &stats["clients"]["tp-mtls"];
    let methods = entry["auth_methods"].as_object().unwrap_or_else(|| panic!("tp-mtls never called: {stats}"));
    assert_eq!(methods.keys().collect::<Vec<_>>(), vec!["tls_client_auth"], "{stats}");
    assert_eq!(entry["error"], 0, "no token call refused: {stats}");
    let calls = entry["ok"].as_u64().unwrap();
    assert!((4..=12).contains(&calls), "one call at startup and one per refresh: {calls}; {stats}");
    let thumbprints = pki.idp.cert_thumbprints("tp-mtls").await;
    assert!(thumbprints.iter().all(|t| *t == client.thumbprint()), "{thumbprints:?} vs {}", client.thumbprint());

    let upstream = pki.upstream.stats().await;
    assert_eq!(upstream["clients"]["tp-mtls"]["cnf_ok"], sent, "each request a bound token, accepted: {upstream}");
    assert_eq!(upstream["unauthorized"], 0, "{upstream}");
    let tokens = pki.upstream.tokens_seen().await;
    assert!(!tokens.is_empty());
    for token in &tokens {
        assert_eq!(bound_thumbprint(token).as_deref(), Some(client.thumbprint().as_str()), "the token is bound");
    }

    // The negative controls: the same provider's bound token, presented with another certificate or none, is refused
    // by the upstream (and again after the one refresh and replay a 401 gets).
    for route in ["/other/x", "/nocert/x"] {
        let reply = proxy.get(route).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{route}: {}", reply.text());
    }
    let upstream = pki.upstream.stats().await;
    assert_eq!(upstream["cnf_mismatch"], 4, "two requests, each replayed once: {upstream}");
    assert_eq!(upstream["invalid"], 0, "refused for the certificate only: {upstream}");

    // A renewed certificate (new key, same subject): the next token call presents it, its token is bound to it, and
    // the route presents it too: accepted, without a reload.
    let renewed = pki.ca.client("tokenproxy-mtls");
    renewed.write(pki.dir.path(), "client");
    let refresh = proxy.admin_post("/tokens/mtls/refresh").await;
    assert_eq!(refresh.status, StatusCode::OK, "{}", refresh.text());
    assert_eq!(pki.idp.cert_thumbprints("tp-mtls").await.last(), Some(&renewed.thumbprint()));
    pki.upstream.reset().await;
    for _ in 0..3 {
        let reply = proxy.get("/bound/x").await;
        assert_eq!(reply.status, StatusCode::OK, "{}\n{}", reply.text(), proxy.logs());
    }
    let upstream = pki.upstream.stats().await;
    assert_eq!(upstream["clients"]["tp-mtls"]["cnf_ok"], 3, "{upstream}");
    for token in pki.upstream.tokens_seen().await.iter().filter(|t| bound_thumbprint(t).is_some()) {
        if bound_thumbprint(token) != Some(renewed.thumbprint()) {
            // Only a token the route sent before it looked at the renewed files, refused and replayed.
            assert_eq!(upstream["cnf_mismatch"], 1, "{upstream}");
        }
    }

    let logs = proxy.logs();
    for leaf in [&client, &renewed] {
        assert!(!logs.contains(&Pki::pem_line(leaf)), "a private key in the logs");
    }
}

#[tokio::test]
async fn self_signed_tls_client_auth_registered_certificate_authenticates_another_is_refused_with_its_thumbprint() {
    let pki = Pki::start(300).await;
    let mut config = pki.provider("selfsigned", "tp-mtls-self", "self_signed_tls_client_auth", "self");
    config += &pki.route("selfsigned", "selfsigned", "upstream_client_cert = \"provider\"");
    let proxy = TokenProxyProcess::start_in(pki.dir.path(), &config, &[]).await;
    proxy.wait_ready().await;
    for _ in 0..3 {
        let reply = proxy.get("/selfsigned/x").await;
        assert_eq!(reply.status, StatusCode::OK, "{}\n{}", reply.text(), proxy.logs());
        assert_eq!(reply.json()["client_id"], "tp-mtls-self");
    }
    let stats = pki.idp.stats().await;
    let entry = &stats["clients"]["tp-mtls-self"];
    let methods = entry["auth_methods"].as_object().unwrap_or_else(|| panic!("never called: {stats}"));
    assert_eq!(methods.keys().collect::<Vec<_>>(), vec!["self_signed_tls_client_auth"], "{stats}");
    assert_eq!((entry["ok"].as_u64(), entry["error"].as_u64()), (Some(1), Some(0)), "one token call: {stats}");
    assert_eq!(pki.idp.cert_thumbprints("tp-mtls-self").await, [pki.self_signed.thumbprint()]);
    let upstream = pki.upstream.stats().await;
    assert_eq!(upstream["clients"]["tp-mtls-self"]["cnf_ok"], 3, "{upstream}");
    drop(proxy);

    // Another self-signed certificate is not the registered one: refused, and `check --fetch` says which it presented.
    let stranger = Leaf::self_signed("tokenproxy-self");
    stranger.write(pki.dir.path(), "stranger");
    let config = pki.provider("selfsigned", "tp-mtls-self", "self_signed_tls_client_auth", "stranger")
        + &pki.route("selfsigned", "selfsigned", "");
    std::fs::write(pki.path("check.toml"), config).unwrap();
    let mut check =
        spawn_tokenproxy("check --fetch", pki.dir.path(), &["check", "--fetch", "--config", "check.toml"], &[]);
    let status = check.wait_exit_async(Duration::from_secs(20)).await.expect("check --fetch exits");
    let output = check.output().text();
    assert!(!status.success(), "{output}");
    assert!(output.contains("invalid_client"), "{output}");
    assert!(
        output.contains("refused the client certificate")
            && output.contains(&format!("x5t#S256 `{}`", stranger.thumbprint())),
        "the hint names the certificate presented: {output}"
    );
    assert!(!output.contains(&Pki::pem_line(&stranger)), "the key is never printed: {output}");
}

/// A soak for the numbers in docs/no-shared-secrets.md: both mutual-TLS methods side by side, 30-second bound tokens
/// (`refresh_at` 0.75) for `TP_SOAK_SECS` (default 600) seconds, a request per second on each through a route that
/// presents the provider's certificate; prints the token calls each made and fails on any refused call or failed
/// request. Not in the suite (ten minutes): `cargo test --test oidc_mtls -- --ignored --nocapture`.
#[tokio::test]
#[ignore]
async fn soak_both_mtls_methods_with_30_second_tokens() {
    let pki = Pki::start(30).await;
    pki.ca.client("tokenproxy-mtls").write(pki.dir.path(), "client");
    let mut config = String::new();
    for (name, client_id, method, cert) in [
        ("mtls", "tp-mtls", "tls_client_auth", "client"),
        ("selfsigned", "tp-mtls-self", "self_signed_tls_client_auth", "self"),
    ] {
        config += &pki.provider(name, client_id, method, cert).replace("refresh_at = 0.5", "refresh_at = 0.75");
        config += &pki.route(name, name, "upstream_client_cert = \"provider\"");
    }
    let proxy = TokenProxyProcess::start_in(pki.dir.path(), &config, &[]).await;
    proxy.wait_ready().await;
    let methods =
        [("mtls", "tls_client_auth", "tp-mtls"), ("selfsigned", "self_signed_tls_client_auth", "tp-mtls-self")];
    soak(&proxy, &pki.idp, &methods).await;
    let upstream = pki.upstream.stats().await;
    println!("soak: upstream cnf_ok {}, cnf_mismatch {}", upstream["cnf_ok"], upstream["cnf_mismatch"]);
    assert_eq!(upstream["cnf_mismatch"], 0, "{upstream}");
}
