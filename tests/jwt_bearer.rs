//! `grant = "jwt_bearer"` (RFC 7523 §2.1) against fakes that check every claim the way the real services do: a Google
//! token endpoint fed a service-account JSON key in Google's exact format, a Salesforce one, and a generic one with
//! client authentication on top. Each fake verifies the assertion's signature with the public half of a key made
//! here, its `alg`, `kid`, `iss`, `sub`, `aud`, lifetime and scope, and that the form carries what the service takes
//! and nothing more; a wrong audience is refused as Salesforce refuses it.

mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{json, Value};
use support::{Client, FakeUpstream, Proxy};
use tokio::net::TcpListener;

/// What a token call must look like for the fake to issue a token; `Err` is the refusal's description.
type Check = dyn Fn(&BTreeMap<String, String>, Option<&str>) -> Result<(), String> + Send + Sync;

/// A token endpoint on 127.0.0.1 that issues `PREFIX-N` tokens (expires_in 3599, as Google) to calls `check` accepts
/// and answers 400 `invalid_grant` to the others.
struct TokenEndpoint {
    addr: SocketAddr,
    calls: Arc<Mutex<Vec<Result<(), String>>>>,
}

impl TokenEndpoint {
    async fn start(prefix: &'static str, check: Arc<Check>) -> TokenEndpoint {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&calls);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (log, check) = (Arc::clone(&log), Arc::clone(&check));
                let service = service_fn(move |request: Request<Incoming>| {
                    let (log, check) = (Arc::clone(&log), Arc::clone(&check));
                    async move {
                        let authorization =
                            request.headers().get("authorization").map(|v| v.to_str().unwrap().to_owned());
                        let body = request.into_body().collect().await.unwrap().to_bytes();
                        let form: BTreeMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
                        let verdict = check(&form, authorization.as_deref());
                        let mut calls = log.lock().unwrap();
                        calls.push(verdict.clone());
                        let (status, answer) = match verdict {
                            Ok(()) => (
                                StatusCode::OK,
                                json!({"access_token": format!("{prefix}-{}", calls.len()), "expires_in": 3599, "token_type": "Bearer"}),
                            ),
                            Err(why) => {
                                (StatusCode::BAD_REQUEST, json!({"error": "invalid_grant", "error_description": why}))
                            }
                        };
                        let response = Response::builder()
                            .status(status)
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(answer.to_string())))
                            .unwrap();
                        Ok::<_, Infallible>(response)
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TokenEndpoint { addr, calls }
    }

    fn url(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    fn calls(&self) -> Vec<Result<(), String>> {
        self.calls.lock().unwrap().clone()
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Verifies `assertion`'s signature and returns its header and claims (audience and lifetime checked by the caller).
fn verify(assertion: &str, key: &DecodingKey, alg: Algorithm) -> Result<(jsonwebtoken::Header, Value), String> {
    let mut validation = Validation::new(alg);
    validation.validate_aud = false;
    validation.set_required_spec_claims(&["exp"]);
    let data = jsonwebtoken::decode::<Value>(assertion, key, &validation).map_err(|e| format!("signature: {e}"))?;
    Ok((data.header, data.claims))
}

fn require(ok: bool, why: &str) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(why.to_owned())
    }
}

fn rsa_key() -> (String, DecodingKey) {
    use rsa::pkcs1::EncodeRsaPublicKey as _;
    use rsa::pkcs8::EncodePrivateKey as _;
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
    let pem = key.to_pkcs8_pem(Default::default()).unwrap().to_string();
    let public = DecodingKey::from_rsa_der(key.to_public_key().to_pkcs1_der().unwrap().as_bytes());
    (pem, public)
}

const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

async fn through_proxy(config: &str, upstream: &FakeUpstream) -> (u16, String) {
    let proxy = Proxy::start(config).await;
    let reply = Client::new().get(&proxy.url("/api/x")).await;
    let seen = upstream.seen();
    let authorization =
        seen.last().and_then(|s| s.headers.get("authorization")).map(|v| v.to_str().unwrap().to_owned());
    proxy.stop().await;
    (reply.status, authorization.unwrap_or_default())
}

fn route(upstream: &FakeUpstream, provider: &str) -> String {
    format!("[[routes]]\nprefix = \"/api\"\nupstream = \"{}\"\nprovider = \"{provider}\"\n", upstream.url())
}

#[tokio::test]
async fn a_google_service_account_key_file_is_all_it_takes() {
    let (pem, public) = rsa_key();
    let scope = "https://www.googleapis.com/auth/cloud-platform";
    let email = "tokenproxy-test@tp-test.iam.gserviceaccount.com";
    let key_id = "0123456789abcdef0123456789abcdef01234567";
    let token_uri = Arc::new(Mutex::new(String::new()));
    let expected_aud = Arc::clone(&token_uri);
    let check: Arc<Check> = Arc::new(move |form, authorization| {
        require(authorization.is_none(), "no client authentication besides the assertion")?;
        let keys: Vec<&str> = form.keys().map(String::as_str).collect();
        require(keys == ["assertion", "grant_type"], "the form is grant_type and assertion, nothing else")?;
        require(form["grant_type"] == JWT_BEARER, "grant_type")?;
        let (header, claims) = verify(&form["assertion"], &public, Algorithm::RS256)?;
        require(header.kid.as_deref() == Some(key_id), "kid = private_key_id")?;
        require(claims["iss"] == email, "iss = client_email")?;
        require(claims["scope"] == scope, "scope in the assertion")?;
        require(claims["aud"] == *expected_aud.lock().unwrap(), "aud = token_uri")?;
        require(claims.get("sub").is_none(), "no sub without domain-wide delegation")?;
        let (iat, exp) = (claims["iat"].as_u64().unwrap_or(0), claims["exp"].as_u64().unwrap_or(0));
        require(iat.abs_diff(now()) <= 60 && exp > iat && exp - iat <= 3600, "iat now, exp within an hour")
    });
    let google = TokenEndpoint::start("ya29.test", check).await;
    *token_uri.lock().unwrap() = google.url();

    // The key file exactly as Google's console hands it out.
    let credentials = json!({
        "type": "service_account",
        "project_id": "tp-test",
        "private_key_id": key_id,
        "private_key": pem,
        "client_email": email,
        "client_id": "112233445566778899000",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": google.url(),
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": "https://www.googleapis.com/robot/v1/metadata/x509/tokenproxy-test%40tp-test.iam.gserviceaccount.com",
        "universe_domain": "googleapis.com"
    });
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sa.json");
    std::fs::write(&file, serde_json::to_string_pretty(&credentials).unwrap()).unwrap();

    let upstream = FakeUpstream::start().await;
    // No token_url, no client_id, no client authentication: the key file has them all.
    let config = format!(
        "[providers.gcp]\ngrant = \"jwt_bearer\"\ngoogle_credentials_file = \"{}\"\nscope = \"{scope}\"\n{}",
        file.display(),
        route(&upstream, "gcp")
    );
    let parsed = tokenproxy::config::Config::from_toml_str(&config, "t").unwrap();
    assert_eq!(parsed.providers["gcp"].client_id, email);
    assert_eq!(parsed.providers["gcp"].token_url.as_ref().map(|u| u.to_string()), Some(google.url()));
    let printed = toml::to_string(&parsed).unwrap();
    assert!(!printed.contains("BEGIN") && printed.contains("google_credentials_file"), "{printed}");

    let (status, authorization) = through_proxy(&config, &upstream).await;
    assert_eq!(google.calls(), [Ok(())]);
    assert_eq!((status, authorization.as_str()), (200, "Bearer ya29.test-1"));
}

#[tokio::test]
async fn salesforce_gets_its_claims_and_refuses_a_wrong_audience() {
    let (pem, public) = rsa_key();
    let check: Arc<Check> = Arc::new(move |form, authorization| {
        require(authorization.is_none(), "no client authentication besides the assertion")?;
        let keys: Vec<&str> = form.keys().map(String::as_str).collect();
        require(keys == ["assertion", "grant_type"], "the form is grant_type and assertion, nothing else")?;
        let (_, claims) = verify(&form["assertion"], &public, Algorithm::RS256)?;
        require(claims["iss"] == "3MVG9consumer.key", "iss = the consumer key")?;
        require(claims["sub"] == "integration@example.com", "sub = the username")?;
        require(claims["aud"] == "https://test.salesforce.com", "audience is invalid")?;
        require(claims.get("scope").is_none(), "no scope")?;
        let exp = claims["exp"].as_u64().unwrap_or(0);
        require(exp > now() && exp <= now() + 180, "exp within 3 minutes")
    });
    let salesforce = TokenEndpoint::start("00Dtest", check).await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("sf.pem");
    std::fs::write(&key, &pem).unwrap();
    let upstream = FakeUpstream::start().await;
    let config = |aud: &str| {
        format!(
            "[providers.sf]\ngrant = \"jwt_bearer\"\nassertion_dialect = \"salesforce\"\ntoken_url = \"{}\"\n\
             client_id = \"3MVG9consumer.key\"\nusername = \"integration@example.com\"\nprivate_key_file = \"{}\"\n\
             assertion_audience = \"{aud}\"\ntimeout = \"2s\"\n{}",
            salesforce.url(),
            key.display(),
            route(&upstream, "sf")
        )
    };
    let (status, authorization) = through_proxy(&config("https://test.salesforce.com"), &upstream).await;
    assert_eq!((status, authorization.as_str()), (200, "Bearer 00Dtest-1"));
    assert_eq!(salesforce.calls(), [Ok(())]);

    // login.salesforce.com for a sandbox user: refused, the route answers 503 token_unavailable.
    let proxy = Proxy::start(&config("https://login.salesforce.com")).await;
    let reply = Client::new().get(&proxy.url("/api/x")).await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert!(reply.text().contains("invalid_grant"), "{}", reply.text());
    assert_eq!(salesforce.calls().last(), Some(&Err("audience is invalid".to_owned())));
    proxy.stop().await;

    // What Salesforce does not take is refused at load.
    let with_scope = config("https://test.salesforce.com").replace("timeout", "scope = \"api\"\ntimeout");
    let error = tokenproxy::config::Config::from_toml_str(&with_scope, "t").unwrap_err().to_string();
    assert!(error.contains("providers.sf.scope: Salesforce's JWT bearer flow takes no scope"), "{error}");
}

#[tokio::test]
async fn a_generic_assertion_carries_the_claims_set_and_the_client_authenticates_on_top() {
    use p256::pkcs8::EncodePrivateKey as _;
    let secret = p256::SecretKey::from_slice(&[11; 32]).unwrap();
    let pem = secret.to_pkcs8_pem(Default::default()).unwrap().to_string();
    let point = p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&secret.public_key(), false);
    let public = DecodingKey::from_ec_der(point.as_bytes());
    let token_url = Arc::new(Mutex::new(String::new()));
    let aud = Arc::clone(&token_url);
    let jtis = Arc::new(Mutex::new(std::collections::HashSet::new()));
    let check: Arc<Check> = Arc::new(move |form, authorization| {
        require(authorization.is_some_and(|a| a.starts_with("Basic ")), "client_secret_basic on top")?;
        require(form["grant_type"] == JWT_BEARER && form["scope"] == "reports.read", "grant_type and scope")?;
        let (_, claims) = verify(&form["assertion"], &public, Algorithm::ES256)?;
        require(claims["iss"] == "tp-generic" && claims["sub"] == "svc-42", "iss = client_id, sub as set")?;
        require(claims["aud"] == *aud.lock().unwrap(), "aud = the token endpoint")?;
        require(claims["tenant"] == "acme", "extra claims")?;
        let jti = claims["jti"].as_str().unwrap_or_default().to_owned();
        require(jtis.lock().unwrap().insert(jti), "a fresh jti")
    });
    let idp = TokenEndpoint::start("generic", check).await;
    *token_url.lock().unwrap() = idp.url();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("ec.pem");
    std::fs::write(&key, &pem).unwrap();
    let upstream = FakeUpstream::start().await;
    let config = format!(
        "[providers.svc]\ngrant = \"jwt_bearer\"\ntoken_url = \"{}\"\nclient_id = \"tp-generic\"\nclient_secret = \"s\"\n\
         private_key_file = \"{}\"\nscope = \"reports.read\"\nassertion_claims = {{ sub = \"svc-42\", extra = {{ tenant = \"acme\" }} }}\n{}",
        idp.url(),
        key.display(),
        route(&upstream, "svc")
    );
    let (status, authorization) = through_proxy(&config, &upstream).await;
    assert_eq!((status, authorization.as_str()), (200, "Bearer generic-1"));
    // A second proxy, a second call: a fresh assertion (the fake refuses a jti it has seen).
    let (status, _) = through_proxy(&config, &upstream).await;
    assert_eq!(status, 200);
    assert_eq!(idp.calls(), [Ok(()), Ok(())]);
}
