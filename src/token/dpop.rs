//! DPoP (RFC 9449): proofs of possession for sender-constrained tokens (docs/dpop.md).
//!
//! A provider with `dpop = true` holds one key pair: loaded from `dpop_key_file` (PEM: EC P-256, P-384 or Ed25519), or
//! made at startup (P-256, or Ed25519 with `dpop_algorithm = "EdDSA"`). Every token call carries a proof (`htm` POST,
//! `htu` the token endpoint); a token the IdP issues with `token_type: DPoP` is bound to the key (`cnf.jkt`, the key's
//! RFC 7638 thumbprint) and goes to the upstream as `Authorization: DPoP <token>` with a new proof for each request and
//! each replay: `htm` and `htu` of the request as the upstream receives it (`htu` without query and fragment), `iat`, a
//! random `jti`, and `ath`, the token's SHA-256. Servers may demand a nonce of their own in proofs (`DPoP-Nonce`); the
//! last one each origin gave is kept and put in the next proof to it.
//!
//! The key pair itself (reading, signing) is [`crate::keys::ProofKey`]; this module makes the proofs and keeps the
//! nonces.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use http::HeaderValue;
use sha2::{Digest, Sha256};

use crate::keys::{DpopAlgorithm, ProofKey};

/// The request header a proof goes in.
pub static DPOP: http::HeaderName = http::HeaderName::from_static("dpop");
/// The response header a server's nonce comes in.
pub static DPOP_NONCE: http::HeaderName = http::HeaderName::from_static("dpop-nonce");

/// The longest nonce kept: a server's nonce is opaque, but not a place for a megabyte.
const MAX_NONCE: usize = 1024;

/// A DPoP key: it signs proofs, and keeps the nonces servers asked for. Its `Debug` shows only the thumbprint.
pub struct DpopKey {
    key: ProofKey,
    /// The last nonce each origin (`scheme://authority`) asked for.
    nonces: Mutex<HashMap<String, Arc<str>>>,
}

impl std::fmt::Debug for DpopKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpopKey").field("alg", &self.algorithm()).field("jkt", &self.thumbprint()).finish()
    }
}

/// What a proof is for.
#[derive(Debug, Clone, Copy)]
pub struct ProofFor<'a> {
    /// The request's method (`htm`).
    pub method: &'a str,
    /// The request's URI without query and fragment (`htu`).
    pub url: &'a str,
    /// The origin (`scheme://authority`) whose nonce goes in the proof.
    pub origin: &'a str,
    /// `ath` (the token's SHA-256, base64url), for requests that carry a token.
    pub ath: Option<&'a str>,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// `ath`: the base64url SHA-256 of an access token.
pub fn token_hash(token: &[u8]) -> String {
    b64(&Sha256::digest(token))
}

impl DpopKey {
    /// A new P-256 key (ES256), made from the operating system's randomness.
    pub fn generate() -> DpopKey {
        DpopKey::generate_for(DpopAlgorithm::Es256)
    }

    /// A new key for `algorithm` (`dpop_algorithm`), made from the operating system's randomness.
    pub fn generate_for(algorithm: DpopAlgorithm) -> DpopKey {
        DpopKey::with_key(ProofKey::generate(algorithm))
    }

    /// Reads a PEM private key (PKCS#8 `PRIVATE KEY`, or SEC1 `EC PRIVATE KEY`): EC P-256, P-384 or Ed25519. The
    /// error says what is wrong, never the key.
    pub fn load(path: &Path) -> Result<DpopKey, String> {
        ProofKey::load(path).map(DpopKey::with_key)
    }

    /// A DPoP key that signs with `key`, no nonce known yet.
    pub fn with_key(key: ProofKey) -> DpopKey {
        DpopKey { key, nonces: Mutex::new(HashMap::new()) }
    }

    /// The JWS algorithm of its proofs.
    pub fn algorithm(&self) -> &'static str {
        self.key.algorithm()
    }

    /// The RFC 7638 thumbprint of the public key: `cnf.jkt` of the tokens bound to it (safe to show).
    pub fn thumbprint(&self) -> &str {
        self.key.thumbprint()
    }

    /// A new proof for one request (a header value, sensitive: it is bound to the token through `ath`).
    pub fn proof(&self, to: ProofFor<'_>) -> HeaderValue {
        #[derive(serde::Serialize)]
        struct Claims<'a> {
            jti: &'a str,
            htm: &'a str,
            htu: &'a str,
            iat: u64,
            #[serde(skip_serializing_if = "Option::is_none")]
            ath: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            nonce: Option<&'a str>,
        }
        let jti = b64(&rand::random::<[u8; 16]>());
        let iat = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let nonce = self.nonce(to.origin);
        let claims = Claims { jti: &jti, htm: to.method, htu: to.url, iat, ath: to.ath, nonce: nonce.as_deref() };
        // Serialising a struct of strings and a number cannot fail.
        let claims = serde_json::to_vec(&claims).unwrap_or_default();
        let header = self.key.header();
        let mut jws = String::with_capacity(header.len() + claims.len() * 4 / 3 + 100);
        jws.push_str(header);
        jws.push('.');
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(&claims, &mut jws);
        let signature = self.key.sign(jws.as_bytes());
        jws.push('.');
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(&signature, &mut jws);
        // Base64url and dots only: always a valid header value.
        let mut value = HeaderValue::from_maybe_shared(bytes::Bytes::from(jws))
            .unwrap_or_else(|_| HeaderValue::from_static("invalid"));
        value.set_sensitive(true);
        value
    }

    /// The nonce `origin` asked for last, if any.
    pub fn nonce(&self, origin: &str) -> Option<Arc<str>> {
        self.nonces.lock().unwrap_or_else(|e| e.into_inner()).get(origin).cloned()
    }

    /// Keeps the nonce `origin` gave (a `DPoP-Nonce` header); one that is not visible ASCII or is too long is
    /// ignored. Returns whether it is new.
    pub fn remember_nonce(&self, origin: &str, nonce: &HeaderValue) -> bool {
        let Ok(nonce) = nonce.to_str() else { return false };
        if nonce.is_empty() || nonce.len() > MAX_NONCE || !nonce.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return false;
        }
        let mut nonces = self.nonces.lock().unwrap_or_else(|e| e.into_inner());
        if nonces.get(origin).is_some_and(|known| &**known == nonce) {
            return false;
        }
        nonces.insert(origin.to_owned(), Arc::from(nonce));
        true
    }
}

/// `scheme://authority` of a URL, the key of its nonce.
pub fn origin_of(url: &url::Url) -> String {
    url.origin().ascii_serialization()
}

/// A URL without query and fragment (`htu`).
pub fn htu_of(url: &url::Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    url.set_fragment(None);
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    /// Verifies a proof with the key in its own header, as a server does, and returns its header and claims.
    fn verify(proof: &HeaderValue) -> (serde_json::Value, serde_json::Value) {
        let proof = proof.to_str().unwrap();
        let header = jsonwebtoken::decode_header(proof).unwrap();
        assert_eq!(header.typ.as_deref(), Some("dpop+jwt"));
        let jwk = header.jwk.clone().expect("jwk in the header");
        let key = DecodingKey::from_jwk(&jwk).unwrap();
        let mut validation = Validation::new(header.alg);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        let claims = jsonwebtoken::decode::<serde_json::Value>(proof, &key, &validation).unwrap().claims;
        let raw_header = proof.split('.').next().unwrap();
        let header: serde_json::Value =
            serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(raw_header).unwrap())
                .unwrap();
        (header, claims)
    }

    #[test]
    fn a_proof_verifies_with_its_own_key_and_carries_the_request_and_token() {
        let key = DpopKey::generate();
        let ath = token_hash(b"tok-1");
        let to =
            ProofFor { method: "GET", url: "http://127.0.0.1:9/a/b", origin: "http://127.0.0.1:9", ath: Some(&ath) };
        let (header, claims) = verify(&key.proof(to));
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["jwk"]["kty"], "EC");
        assert!(header["jwk"].get("d").is_none(), "the private part never leaves");
        assert_eq!(claims["htm"], "GET");
        assert_eq!(claims["htu"], "http://127.0.0.1:9/a/b");
        assert_eq!(claims["ath"], ath);
        assert!(claims.get("nonce").is_none());
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert!(claims["iat"].as_u64().unwrap().abs_diff(now) <= 2);
        // jsonwebtoken's own thumbprint of the header's key is the one tokens are bound to.
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(header["jwk"].clone()).unwrap();
        assert_eq!(jwk.thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256).unwrap(), key.thumbprint());
        let jtis: std::collections::HashSet<String> =
            (0..100).map(|_| verify(&key.proof(to)).1["jti"].as_str().unwrap().to_owned()).collect();
        assert_eq!(jtis.len(), 100, "every proof has its own jti");
    }

    #[test]
    fn a_key_made_for_eddsa_signs_eddsa_proofs_that_verify_with_its_own_key() {
        let key = DpopKey::generate_for(DpopAlgorithm::EdDsa);
        assert_eq!(key.algorithm(), "EdDSA");
        let to = ProofFor { method: "GET", url: "https://api.example/a", origin: "https://api.example", ath: None };
        let (header, claims) = verify(&key.proof(to));
        assert_eq!((header["alg"].as_str(), header["jwk"]["kty"].as_str()), (Some("EdDSA"), Some("OKP")));
        assert!(header["jwk"].get("d").is_none(), "the private part never leaves");
        assert_eq!(claims["htu"], "https://api.example/a");
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(header["jwk"].clone()).unwrap();
        assert_eq!(jwk.thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256).unwrap(), key.thumbprint());
        assert_ne!(DpopKey::generate_for(DpopAlgorithm::EdDsa).thumbprint(), key.thumbprint(), "a new key each time");
    }

    #[test]
    fn a_nonce_goes_to_its_own_origin_only_and_odd_ones_are_ignored() {
        let key = DpopKey::generate();
        assert!(key.remember_nonce("https://api.example", &HeaderValue::from_static("n-1")));
        assert!(!key.remember_nonce("https://api.example", &HeaderValue::from_static("n-1")), "not new");
        assert!(!key.remember_nonce("https://api.example", &HeaderValue::from_static("has space")));
        let long = HeaderValue::from_str(&"x".repeat(MAX_NONCE + 1)).unwrap();
        assert!(!key.remember_nonce("https://api.example", &long));
        let to = |origin| ProofFor { method: "POST", url: "https://api.example/t", origin, ath: None };
        assert_eq!(verify(&key.proof(to("https://api.example"))).1["nonce"], "n-1");
        assert!(verify(&key.proof(to("https://other.example"))).1.get("nonce").is_none());
        assert!(verify(&key.proof(to("https://api.example"))).1.get("ath").is_none());
    }

    #[test]
    fn keys_of_each_curve_make_proofs_that_verify() {
        use ed25519_dalek::pkcs8::EncodePrivateKey as _;
        let parse = |pem: &str| DpopKey::with_key(ProofKey::from_pem(pem).unwrap());
        let p384 = p384::SecretKey::from_bytes(&[9u8; 48].into()).unwrap();
        let key = parse(&p384.to_pkcs8_pem(Default::default()).unwrap());
        assert_eq!(key.algorithm(), "ES384");
        let to = ProofFor { method: "GET", url: "http://h/", origin: "http://h", ath: None };
        assert_eq!(verify(&key.proof(to)).0["alg"], "ES384");
        let ed = ed25519_dalek::SigningKey::from_bytes(&[3u8; 32]);
        let key = parse(&ed.to_pkcs8_pem(Default::default()).unwrap());
        assert_eq!(key.algorithm(), "EdDSA");
        let (header, _) = verify(&key.proof(to));
        assert_eq!(header["jwk"]["crv"], "Ed25519");
        assert!(format!("{key:?}").contains("jkt"));
    }

    #[test]
    fn htu_leaves_out_query_and_fragment() {
        let url = url::Url::parse("https://idp.example:8443/oauth2/token?x=1#f").unwrap();
        assert_eq!(htu_of(&url), "https://idp.example:8443/oauth2/token");
        assert_eq!(origin_of(&url), "https://idp.example:8443");
    }
}
