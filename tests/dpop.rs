//! DPoP (RFC 9449) against in-process fakes that verify every proof as a server would (signature with the key in
//! the proof's header, `htm`, `htu`, `ath`, unique `jti`, the key the token is bound to) and can ask for nonces:
//! the token call's proof and the IdP's `use_dpop_nonce`, a new proof per request on both transports (HTTP/1.1
//! direct, h2c through hyper), the upstream's nonce challenge answered with the same token, and the 401 replay with a
//! new token and a new proof. The real provider's side is in tests/oidc_dpop.rs.

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use support::{eventually, json_response, spawn_server, Client, Proxy};

/// A proof checked as a server checks it: its claims and the thumbprint of the key that signed it.
#[derive(Debug, Clone)]
struct Proof {
    jkt: String,
    claims: Value,
}

fn verify(proof: &str) -> Result<Proof, String> {
    let header = jsonwebtoken::decode_header(proof).map_err(|e| format!("header: {e}"))?;
    if header.typ.as_deref() != Some("dpop+jwt") {
        return Err(format!("typ {:?}", header.typ));
    }
    let jwk = header.jwk.ok_or("no jwk")?;
    let key = jsonwebtoken::DecodingKey::from_jwk(&jwk).map_err(|e| format!("jwk: {e}"))?;
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    let claims = jsonwebtoken::decode::<Value>(proof, &key, &validation).map_err(|e| format!("signature: {e}"))?.claims;
    let jkt = jwk.thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256).map_err(|e| e.to_string())?;
    Ok(Proof { jkt, claims })
}

fn ath(token: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(token.as_bytes()))
}

fn with_header(mut response: Response<Full<Bytes>>, name: &'static str, value: &str) -> Response<Full<Bytes>> {
    response.headers_mut().insert(name, value.parse().unwrap());
    response
}

/// An IdP that issues `tok-N` as DPoP tokens only for a valid proof, and asks for its nonce when told to.
struct DpopIdp {
    url: String,
    state: Arc<IdpState>,
    _stop: tokio::sync::watch::Sender<()>,
}

#[derive(Default)]
struct IdpState {
    calls: AtomicUsize,
    nonce: Mutex<Option<String>>,
    /// Per call: the proof as verified (or why not).
    proofs: Mutex<Vec<Result<Proof, String>>>,
}

impl DpopIdp {
    async fn start() -> DpopIdp {
        let state = Arc::new(IdpState::default());
        let shared = Arc::clone(&state);
        let url = Arc::new(Mutex::new(String::new()));
        let url_in = Arc::clone(&url);
        let (addr, stop) = spawn_server(move |req: Request<Incoming>| {
            let (state, url) = (Arc::clone(&shared), url_in.lock().unwrap().clone());
            async move {
                let proof = req.headers().get("dpop").map(|v| v.to_str().unwrap().to_owned());
                let _ = req.into_body().collect().await;
                let n = state.calls.fetch_add(1, Ordering::SeqCst) + 1;
                let checked = proof.ok_or_else(|| "no proof".to_owned()).and_then(|p| verify(&p)).and_then(|proof| {
                    let c = &proof.claims;
                    if c["htm"] != "POST" || c["htu"] != url.as_str() || c.get("ath").is_some() {
                        return Err(format!("claims {c}"));
                    }
                    Ok(proof)
                });
                state.proofs.lock().unwrap().push(checked.clone());
                let Ok(proof) = checked else {
                    return json_response(StatusCode::BAD_REQUEST, json!({"error": "invalid_dpop_proof"}));
                };
                if let Some(nonce) = state.nonce.lock().unwrap().clone() {
                    if proof.claims["nonce"] != nonce.as_str() {
                        let answer = json_response(StatusCode::BAD_REQUEST, json!({"error": "use_dpop_nonce"}));
                        return with_header(answer, "dpop-nonce", &nonce);
                    }
                }
                json_response(
                    StatusCode::OK,
                    json!({"access_token": format!("tok-{n}"), "token_type": "DPoP", "expires_in": 300}),
                )
            }
        })
        .await;
        *url.lock().unwrap() = format!("http://{addr}/token");
        let url = url.lock().unwrap().clone();
        DpopIdp { url, state, _stop: stop }
    }

    fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    fn proofs(&self) -> Vec<Result<Proof, String>> {
        self.state.proofs.lock().unwrap().clone()
    }
}

/// One request as the upstream judged it.
#[derive(Debug, Clone)]
struct Judged {
    status: u16,
    token: String,
    jti: String,
    nonce: Option<String>,
    /// The caller's own `DPoP` header got through (it must not).
    callers_proof: bool,
}

/// An upstream that accepts `Authorization: DPoP tok-N` only with a valid proof for this request, bound to the key
/// the IdP saw, and a nonce when it asks for one.
struct DpopUpstream {
    url: String,
    state: Arc<UpstreamState>,
    _stop: tokio::sync::watch::Sender<()>,
}

#[derive(Default)]
struct UpstreamState {
    jkt: Mutex<Option<String>>,
    nonce: Mutex<Option<String>>,
    revoked: Mutex<HashSet<String>>,
    jtis: Mutex<HashSet<String>>,
    judged: Mutex<Vec<Judged>>,
    errors: Mutex<Vec<String>>,
}

impl DpopUpstream {
    async fn start() -> DpopUpstream {
        let state = Arc::new(UpstreamState::default());
        let shared = Arc::clone(&state);
        let origin = Arc::new(Mutex::new(String::new()));
        let origin_in = Arc::clone(&origin);
        let (addr, stop) = spawn_server(move |req: Request<Incoming>| {
            let (state, origin) = (Arc::clone(&shared), origin_in.lock().unwrap().clone());
            async move {
                let (parts, body) = req.into_parts();
                let _ = body.collect().await;
                let header = |name: &str| parts.headers.get_all(name).iter().map(|v| v.to_str().unwrap().to_owned());
                let proofs: Vec<String> = header("dpop").collect();
                let authorization = header("authorization").next().unwrap_or_default();
                let refuse = |why: String| {
                    state.errors.lock().unwrap().push(why.clone());
                    let answer = json_response(StatusCode::UNAUTHORIZED, json!({"error": why}));
                    with_header(answer, "www-authenticate", "DPoP error=\"invalid_dpop_proof\"")
                };
                let Some(token) = authorization.strip_prefix("DPoP ").map(str::to_owned) else {
                    return refuse(format!("not the DPoP scheme: {authorization}"));
                };
                let [proof] = proofs.as_slice() else { return refuse(format!("{} proofs", proofs.len())) };
                let proof = match verify(proof) {
                    Ok(proof) => proof,
                    Err(why) => return refuse(why),
                };
                let c = &proof.claims;
                let htu = format!("{origin}{}", parts.uri.path());
                if c["htm"] != parts.method.as_str() || c["htu"] != htu.as_str() || c["ath"] != ath(&token).as_str() {
                    return refuse(format!("claims {c} for {} {htu}", parts.method));
                }
                if state.jkt.lock().unwrap().as_deref() != Some(proof.jkt.as_str()) {
                    return refuse("not the key the token is bound to".into());
                }
                let jti = c["jti"].as_str().unwrap_or_default().to_owned();
                if !state.jtis.lock().unwrap().insert(jti.clone()) {
                    return refuse(format!("jti {jti} replayed"));
                }
                let nonce = c["nonce"].as_str().map(str::to_owned);
                let callers_proof = header("x-callers-proof").next().is_some_and(|p| proofs.contains(&p));
                let judge =
                    |status: u16| Judged { status, token: token.clone(), jti, nonce: nonce.clone(), callers_proof };
                let wanted = state.nonce.lock().unwrap().clone();
                if let Some(wanted) = wanted.filter(|wanted| nonce.as_deref() != Some(wanted)) {
                    state.judged.lock().unwrap().push(judge(401));
                    let answer = json_response(StatusCode::UNAUTHORIZED, json!({"error": "use_dpop_nonce"}));
                    let answer = with_header(answer, "www-authenticate", "DPoP error=\"use_dpop_nonce\"");
                    return with_header(answer, "dpop-nonce", &wanted);
                }
                if state.revoked.lock().unwrap().contains(&token) {
                    state.judged.lock().unwrap().push(judge(401));
                    let answer = json_response(StatusCode::UNAUTHORIZED, json!({"error": "invalid_token"}));
                    return with_header(answer, "www-authenticate", "DPoP error=\"invalid_token\"");
                }
                state.judged.lock().unwrap().push(judge(200));
                json_response(StatusCode::OK, json!({"token": token}))
            }
        })
        .await;
        *origin.lock().unwrap() = format!("http://{addr}");
        let url = origin.lock().unwrap().clone();
        DpopUpstream { url, state, _stop: stop }
    }

    fn judged(&self) -> Vec<Judged> {
        self.state.judged.lock().unwrap().clone()
    }

    fn errors(&self) -> Vec<String> {
        self.state.errors.lock().unwrap().clone()
    }
}

fn config(idp: &DpopIdp, upstream: &DpopUpstream) -> String {
    format!(
        "[providers.api]\ntoken_url = \"{}\"\nclient_id = \"gw\"\nclient_secret = \"s3cret-value\"\ndpop = true\n\n\
         [[routes]]\nprefix = \"/\"\nupstream = \"{}\"\nprovider = \"api\"\n",
        idp.url, upstream.url
    )
}

/// How the caller talks to the proxy: plain HTTP/1.1 (the h1 transport) or h2c (hyper's).
#[derive(Debug, Clone, Copy)]
enum Caller {
    Http1,
    H2c,
}

async fn call(caller: Caller, method: &str, url: &str, body: &'static str) -> (u16, Value) {
    let request = Request::builder()
        .method(method)
        .uri(url)
        // A caller's own proof never reaches the upstream next to ours.
        .header("dpop", "callers.own.proof")
        .header("x-callers-proof", "callers.own.proof")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    let builder = hyper_util::client::legacy::Client::builder(TokioExecutor::new());
    let client = match caller {
        Caller::Http1 => builder.build_http(),
        Caller::H2c => hyper_util::client::legacy::Client::builder(TokioExecutor::new()).http2_only(true).build_http(),
    };
    let response = client.request(request).await.expect("the proxy answers");
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn every_request_carries_a_new_proof_for_itself_bound_to_the_key_of_the_token_call() {
    let (idp, upstream) = (DpopIdp::start().await, DpopUpstream::start().await);
    let proxy = Proxy::start(&config(&idp, &upstream)).await;
    proxy.wait_ready().await;
    let jkt = idp.proofs()[0].clone().expect("the token call carried a valid proof").jkt;
    *upstream.state.jkt.lock().unwrap() = Some(jkt.clone());
    for caller in [Caller::Http1, Caller::H2c] {
        for (method, path, body) in [("GET", "/orders/7?expand=1#x", ""), ("POST", "/orders", "{\"n\":1}")] {
            let (status, answer) = call(caller, method, &proxy.url(path), body).await;
            assert_eq!(status, 200, "{caller:?} {method} {path}: {:?}", upstream.errors());
            assert_eq!(answer["token"], "tok-1");
        }
    }
    let judged = upstream.judged();
    assert_eq!(judged.len(), 4);
    assert!(judged.iter().all(|j| !j.callers_proof), "the caller's DPoP header is replaced by ours");
    assert_eq!(judged.iter().map(|j| &j.jti).collect::<HashSet<_>>().len(), 4, "a new jti every time");
    assert_eq!(idp.calls(), 1, "one token, many proofs");
    // /tokens says how the token is sent, and which key it is bound to (a public thumbprint).
    let tokens: Value = Client::new().get(&proxy.admin_url("/tokens")).await.json();
    assert_eq!(tokens["providers"]["api"]["token_type"], "DPoP", "{tokens}");
    assert_eq!(tokens["providers"]["api"]["dpop_jkt"], jkt.as_str());
    proxy.stop().await;
}

#[tokio::test]
async fn the_idps_nonce_is_asked_for_once_and_used_by_the_next_call() {
    let (idp, upstream) = (DpopIdp::start().await, DpopUpstream::start().await);
    *idp.state.nonce.lock().unwrap() = Some("idp-nonce-1".into());
    let proxy = Proxy::start(&config(&idp, &upstream)).await;
    proxy.wait_ready().await;
    let proofs = idp.proofs();
    assert_eq!(proofs.len(), 2, "one refused for want of the nonce, one with it");
    assert!(proofs[0].as_ref().unwrap().claims.get("nonce").is_none());
    assert_eq!(proofs[1].as_ref().unwrap().claims["nonce"], "idp-nonce-1");
    assert_ne!(proofs[0].as_ref().unwrap().claims["jti"], proofs[1].as_ref().unwrap().claims["jti"]);
    // The next token call (a refresh asked for by the admin API) sends the nonce it knows at once.
    let reply = Client::new().post(&proxy.admin_url("/tokens/api/refresh"), "").await;
    assert!((200..300).contains(&reply.status), "{}", reply.text());
    eventually("a third token call", std::time::Duration::from_secs(10), async || idp.calls() >= 3).await;
    assert_eq!(idp.proofs()[2].as_ref().unwrap().claims["nonce"], "idp-nonce-1");
    proxy.stop().await;
}

#[tokio::test]
async fn an_upstreams_nonce_challenge_is_answered_with_the_same_token_and_a_refusal_with_a_new_one() {
    let (idp, upstream) = (DpopIdp::start().await, DpopUpstream::start().await);
    let proxy = Proxy::start(&config(&idp, &upstream)).await;
    proxy.wait_ready().await;
    *upstream.state.jkt.lock().unwrap() = Some(idp.proofs()[0].clone().unwrap().jkt);
    for (round, caller) in [Caller::Http1, Caller::H2c].into_iter().enumerate() {
        // The upstream starts asking for a nonce: one challenge, one send again with it, the same token.
        let nonce = format!("upstream-nonce-{round}");
        *upstream.state.nonce.lock().unwrap() = Some(nonce.clone());
        let before = upstream.judged().len();
        let (status, _) = call(caller, "POST", &proxy.url("/orders"), "{\"n\":2}").await;
        assert_eq!(status, 200, "{caller:?}: {:?}", upstream.errors());
        let judged = &upstream.judged()[before..];
        assert_eq!(judged.len(), 2, "{judged:?}");
        assert_eq!(judged[0].status, 401);
        assert_ne!(judged[0].nonce.as_deref(), Some(nonce.as_str()));
        assert_eq!((judged[1].status, judged[1].nonce.as_deref()), (200, Some(nonce.as_str())));
        assert_eq!(judged[0].token, judged[1].token, "a nonce challenge does not retire the token");
        // Known now: the next request sends it at once.
        let (status, _) = call(caller, "GET", &proxy.url("/orders"), "").await;
        assert_eq!(status, 200);
        assert_eq!(upstream.judged().len(), before + 3);
        assert_eq!(upstream.judged().last().unwrap().nonce.as_deref(), Some(nonce.as_str()));
    }
    assert_eq!(idp.calls(), 1, "nonce challenges made no token call");

    // The token is refused: a new token, and the replay's proof is new and bound to it.
    upstream.state.revoked.lock().unwrap().insert("tok-1".into());
    let before = upstream.judged().len();
    let (status, answer) = call(Caller::Http1, "GET", &proxy.url("/orders"), "").await;
    assert_eq!(status, 200);
    assert_eq!(answer["token"], "tok-2");
    let judged = &upstream.judged()[before..];
    assert_eq!(
        judged.iter().map(|j| (j.status, j.token.as_str())).collect::<Vec<_>>(),
        [(401, "tok-1"), (200, "tok-2")]
    );
    assert_ne!(judged[0].jti, judged[1].jti);
    assert!(upstream.errors().is_empty(), "every proof verified: {:?}", upstream.errors());
    proxy.stop().await;
}
