use super::*;
use crate::keys::{jwk_thumbprint, KeyKind};

fn rsa_pem(pkcs1: bool) -> (String, rsa::RsaPublicKey) {
    use rsa::pkcs1::EncodeRsaPrivateKey as _;
    use rsa::pkcs8::EncodePrivateKey as _;
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
    let pem = if pkcs1 {
        key.to_pkcs1_pem(Default::default()).unwrap().to_string()
    } else {
        key.to_pkcs8_pem(Default::default()).unwrap().to_string()
    };
    (pem, key.to_public_key())
}

fn p256_pem(seed: u8) -> String {
    use p256::pkcs8::EncodePrivateKey as _;
    p256::SecretKey::from_slice(&[seed; 32]).unwrap().to_pkcs8_pem(Default::default()).unwrap().to_string()
}

fn decode(assertion: &str, key: &jsonwebtoken::DecodingKey, alg: Algorithm, aud: &str) -> (Header, serde_json::Value) {
    let mut validation = jsonwebtoken::Validation::new(alg);
    validation.set_audience(&[aud]);
    validation.set_required_spec_claims(&["exp", "iat", "iss", "sub", "aud", "jti"]);
    let data = jsonwebtoken::decode::<serde_json::Value>(assertion, key, &validation).unwrap();
    (data.header, data.claims)
}

#[test]
fn an_rsa_key_signs_rs256_or_ps256_with_its_thumbprint_as_kid() {
    use rsa::pkcs1::EncodeRsaPublicKey as _;
    use rsa::traits::PublicKeyParts as _;
    for pkcs1 in [false, true] {
        let (pem, public) = rsa_pem(pkcs1);
        let key = SigningKey::from_pem(&pem).unwrap();
        assert_eq!(key.kind(), KeyKind::Rsa);
        let n = b64(&public.n().to_bytes_be());
        assert_eq!(key.thumbprint(), jwk_thumbprint(&[("e", "AQAB"), ("kty", "RSA"), ("n", &n)]));
        let decoding = jsonwebtoken::DecodingKey::from_rsa_der(public.to_pkcs1_der().unwrap().as_bytes());
        for alg in [Algorithm::RS256, Algorithm::PS256] {
            let assertion = sign(&key, alg, None, "client-1", "https://idp.example/token").unwrap();
            let (header, claims) = decode(&assertion, &decoding, alg, "https://idp.example/token");
            assert_eq!(header.kid.as_deref(), Some(key.thumbprint()));
            assert_eq!((claims["iss"].as_str(), claims["sub"].as_str()), (Some("client-1"), Some("client-1")));
            let (iat, exp) = (claims["iat"].as_u64().unwrap(), claims["exp"].as_u64().unwrap());
            assert_eq!(exp - iat, 300, "valid five minutes: short-lived, as RFC 7523 profiles want");
        }
    }
}

#[test]
fn ec_and_ed25519_keys_sign_with_their_own_algorithm() {
    use p256::pkcs8::EncodePrivateKey as _;
    let p256 = SigningKey::from_pem(&p256_pem(7)).unwrap();
    assert_eq!((p256.kind(), p256.algorithm(None, Path::new("k")).unwrap()), (KeyKind::P256, Algorithm::ES256));
    let secret = p256::SecretKey::from_slice(&[7; 32]).unwrap();
    let point = p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&secret.public_key(), false);
    let decoding = jsonwebtoken::DecodingKey::from_ec_der(point.as_bytes());
    let assertion = sign(&p256, Algorithm::ES256, Some("my-kid"), "c", "aud").unwrap();
    let (header, _) = decode(&assertion, &decoding, Algorithm::ES256, "aud");
    assert_eq!(header.kid.as_deref(), Some("my-kid"), "assertion_key_id wins over the thumbprint");

    // SEC1 (`EC PRIVATE KEY`) reads as the same key.
    let sec1 = secret.to_sec1_pem(Default::default()).unwrap();
    assert_eq!(SigningKey::from_pem(&sec1).unwrap().thumbprint(), p256.thumbprint());

    let p384 = p384::SecretKey::from_slice(&[9; 48]).unwrap().to_pkcs8_pem(Default::default()).unwrap();
    let p384 = SigningKey::from_pem(&p384).unwrap();
    assert_eq!((p384.kind(), p384.algorithm(None, Path::new("k")).unwrap()), (KeyKind::P384, Algorithm::ES384));
    assert!(sign(&p384, Algorithm::ES384, None, "c", "aud").is_ok());

    let ed = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    let ed_pem = ed25519_dalek::pkcs8::EncodePrivateKey::to_pkcs8_pem(&ed, Default::default()).unwrap();
    let key = SigningKey::from_pem(&ed_pem).unwrap();
    assert_eq!((key.kind(), key.algorithm(None, Path::new("k")).unwrap()), (KeyKind::Ed25519, Algorithm::EdDSA));
    let x = b64(ed.verifying_key().as_bytes());
    assert_eq!(key.thumbprint(), jwk_thumbprint(&[("crv", "Ed25519"), ("kty", "OKP"), ("x", &x)]));
    let decoding = jsonwebtoken::DecodingKey::from_ed_der(ed.verifying_key().as_bytes());
    let assertion = sign(&key, Algorithm::EdDSA, None, "c", "aud").unwrap();
    decode(&assertion, &decoding, Algorithm::EdDSA, "aud");
}

#[test]
fn every_assertion_is_fresh() {
    let key = SigningKey::from_pem(&p256_pem(5)).unwrap();
    let a = sign(&key, Algorithm::ES256, None, "c", "aud").unwrap();
    let b = sign(&key, Algorithm::ES256, None, "c", "aud").unwrap();
    let jti = |jwt: &str| {
        let payload = jwt.split('.').nth(1).unwrap();
        let claims: serde_json::Value =
            serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        claims["jti"].as_str().unwrap().to_owned()
    };
    assert_ne!(jti(&a), jti(&b), "an IdP refuses a reused jti");
    assert!(jti(&a).len() >= 22, "128 random bits");
}

#[test]
fn a_platform_assertion_is_read_at_every_call_and_must_look_like_a_jwt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    std::fs::write(&path, "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln\n").unwrap();
    let source = SecretSource::File(path.clone());
    assert_eq!(read_assertion(&source).unwrap(), "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln");
    std::fs::write(&path, "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ5In0.c2ln").unwrap();
    assert_eq!(read_assertion(&source).unwrap(), "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ5In0.c2ln", "the kubelet rotated it");
    std::fs::write(&path, "a secret that is not a JWT").unwrap();
    let error = read_assertion(&source).unwrap_err().to_string();
    assert!(error.contains("does not hold a JWT") && !error.contains("a secret that"), "{error}");
}

/// A P-256 key and its self-signed certificate, made with `openssl req -x509 -newkey ec` for this test; the expected
/// thumbprints are `openssl x509 -fingerprint -sha1` / `-sha256`, base64url.
const CREDENTIAL_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgJKif2KVHRknP1lr8
IaIUe+V3QkUGdApbBF54lc/906qhRANCAARIct+vCQtzOrcQCHGdOQ/WY917M/c/
kSU7ZjJ4T+slq7aPzK38gDOPLxJ1EVMX+A2+aRH2IqAErnsAnWi5uo22
-----END PRIVATE KEY-----
";
const CREDENTIAL_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBrDCCAVOgAwIBAgIUPEg59vqtMWTIo0R2JwbWeH+jYwowCgYIKoZIzj0EAwIw
KzEpMCcGA1UEAwwgdG9rZW5wcm94eS10ZXN0LWVudHJhLWNyZWRlbnRpYWwwIBcN
MjYxMTI3MDcxMjQzWhgPMjEyNjExMDMwNzEyNDNaMCsxKTAnBgNVBAMMIHRva2Vu
cHJveHktdGVzdC1lbnRyYS1jcmVkZW50aWFsMFkwEwYHKoZIzj0CAQYIKoZIzj0D
AQcDQgAESHLfrwkLczq3EAhxnTkP1mPdezP3P5ElO2YyeE/rJau2j8yt/IAzjy8S
dRFTF/gNvmkR9iKgBK57AJ1oubqNtqNTMFEwHQYDVR0OBBYEFMz3A+nfNW019BZH
tZXi8Lyg5tGxMB8GA1UdIwQYMBaAFMz3A+nfNW019BZHtZXi8Lyg5tGxMA8GA1Ud
EwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDRwAwRAIgakniltxvR9yjNngC5rc6ssWg
jYlcWVm3BjPy/5yLAa0CIEC0+pSRofpxVIEcaNtNrP0sFkyF5K+sZFdmuRaaNFj1
-----END CERTIFICATE-----
";

#[test]
fn a_certificate_credential_puts_its_thumbprints_in_the_header() {
    use p256::pkcs8::{DecodePrivateKey as _, EncodePublicKey as _};
    let dir = tempfile::tempdir().unwrap();
    let (key, cert) = (dir.path().join("entra.key"), dir.path().join("entra.crt"));
    std::fs::write(&key, CREDENTIAL_KEY).unwrap();
    std::fs::write(&cert, CREDENTIAL_CERT).unwrap();
    let toml = format!(
        "[providers.graph]\ntoken_url = \"https://login.example/tenant/oauth2/v2.0/token\"\nclient_id = \"app\"\n\
         client_auth = \"private_key_jwt\"\nprivate_key_file = {key:?}\nassertion_certificate_file = {cert:?}\n\
         [[routes]]\nupstream = \"http://127.0.0.1:1\"\nprovider = \"graph\"\n"
    );
    let config = crate::config::Config::from_toml_str(&toml, "t").unwrap();
    let provider = &config.providers["graph"];
    let token_url = "https://login.example/tenant/oauth2/v2.0/token";
    let assertion = client_assertion(provider, token_url).unwrap().unwrap();
    let public = p256::SecretKey::from_pkcs8_pem(CREDENTIAL_KEY).unwrap().public_key();
    let public = public.to_public_key_pem(Default::default()).unwrap();
    let decoding = jsonwebtoken::DecodingKey::from_ec_pem(public.as_bytes()).unwrap();
    let (header, claims) = decode(&assertion, &decoding, Algorithm::ES256, token_url);
    assert_eq!(header.x5t.as_deref(), Some("teC010r9TiruaYPgeBE6u1U3Eew"));
    assert_eq!(header.x5t_s256.as_deref(), Some("P7E9Nojd9ETM5cyYwsAsBTIAFQnf5uUSS5sAXndV8Z8"));
    assert_eq!((claims["iss"].as_str(), claims["sub"].as_str()), (Some("app"), Some("app")));
    assert!(header.kid.is_some(), "the kid stays (other IdPs use it)");
    let hint = refusal_hint(provider, Some(token_url)).unwrap();
    assert!(hint.contains("x5t `teC010r9TiruaYPgeBE6u1U3Eew`"), "a refusal names the thumbprints sent: {hint}");

    // What is not a certificate is named at load.
    std::fs::write(&cert, CREDENTIAL_KEY).unwrap();
    let error = crate::config::Config::from_toml_str(&toml, "t").unwrap_err().to_string();
    assert!(
        error.contains("providers.graph.assertion_certificate_file:") && error.contains("no PEM certificate found")
    );
    assert!(!error.contains("MIGHAgEA"), "{error}");
}
