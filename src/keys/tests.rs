use std::path::Path;

use super::*;

/// RFC 7638 §3.1: the example RSA key and its thumbprint.
const RFC_7638_N: &str = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";

#[test]
fn the_thumbprint_is_rfc_7638s() {
    assert_eq!(
        jwk_thumbprint(&[("e", "AQAB"), ("kty", "RSA"), ("n", RFC_7638_N)]),
        "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    );
}

fn p256_pem(seed: u8) -> String {
    use p256::pkcs8::EncodePrivateKey as _;
    p256::SecretKey::from_slice(&[seed; 32]).unwrap().to_pkcs8_pem(Default::default()).unwrap().to_string()
}

#[test]
fn a_key_that_cannot_sign_the_algorithm_set_is_refused() {
    let key = SigningKey::from_pem(&p256_pem(5)).unwrap();
    let error = key.algorithm(Some(AssertionAlgorithm::RS256), Path::new("/keys/ec.pem")).unwrap_err();
    assert_eq!(error.to_string(), "/keys/ec.pem: an EC P-256 key cannot sign RS256");
    assert!(key.algorithm(Some(AssertionAlgorithm::ES256), Path::new("k")).is_ok());
}

#[test]
fn what_is_not_a_usable_private_key_is_named_without_its_content() {
    let cases = [
        ("", "no PEM block found"),
        (
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
            "holds a `CERTIFICATE` PEM block, not a private key",
        ),
        ("-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----\n", "holds a `PUBLIC KEY` PEM block"),
        ("-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n", "the key is encrypted"),
        ("-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n", "unsupported type or curve"),
    ];
    for (pem, expected) in cases {
        let error = SigningKey::from_pem(pem).unwrap_err();
        assert!(error.contains(expected), "{pem:?}: {error}");
    }
}

#[test]
fn a_key_file_is_read_as_a_secret_file_and_its_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.pem");
    let error = load_key(&path).unwrap_err();
    assert!(matches!(error, KeyError::Secret(crate::secret::SecretError::FileUnreadable { .. })), "{error}");
    std::fs::write(&path, "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n").unwrap();
    let error = load_key(&path).unwrap_err().to_string();
    assert_eq!(error, format!("{}: holds a `CERTIFICATE` PEM block, not a private key", path.display()));
    std::fs::write(&path, p256_pem(4)).unwrap();
    assert_eq!(load_key(&path).unwrap().kind(), KeyKind::P256);
    assert_eq!(ProofKey::load(&path).unwrap().algorithm(), "ES256", "a DPoP key reads from the same file");
    let error = load_google(&path).unwrap_err().to_string();
    assert!(error.starts_with(&format!("{}: not a Google service-account key file", path.display())), "{error}");
    assert!(!error.contains("MIG"), "{error}");
}
