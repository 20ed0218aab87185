//! DPoP key pairs (RFC 9449): read from a PEM file (EC P-256, P-384 or Ed25519) or made at startup (P-256 or
//! Ed25519), ready to sign proofs. The key crates read the PEM and give the public half; aws-lc-rs signs (the proof
//! header is encoded once per key), not `jsonwebtoken`, which parses the key again at every signature: a proof is
//! made per request.

use std::path::Path;

use super::{b64, jwk_thumbprint, pem_label};
use crate::secret::SecretSource;

/// `providers.NAME.dpop_algorithm`: the key a provider with `dpop = true` makes at startup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum DpopAlgorithm {
    /// ECDSA on P-256 (`ES256`): accepted by every DPoP server.
    #[default]
    #[serde(rename = "ES256")]
    Es256,
    /// Ed25519 (`EdDSA`): proofs signed in about 60 % of ES256's time, for servers that accept it.
    #[serde(rename = "EdDSA")]
    EdDsa,
}

/// A key as the key crates read it (PEM, the public half for the JWK), before aws-lc-rs takes it for signing.
enum Key {
    P256(p256::ecdsa::SigningKey),
    P384(p384::ecdsa::SigningKey),
    Ed25519(ed25519_dalek::SigningKey),
}

/// The signing half, in aws-lc-rs: a proof is made for every request, and its signatures are the fastest of the
/// crates compared (ring, aws-lc-rs, RustCrypto; docs/dpop.md, "Cost").
enum Signer {
    Ecdsa(aws_lc_rs::signature::EcdsaKeyPair),
    Ed25519(aws_lc_rs::signature::Ed25519KeyPair),
}

/// A key pair that signs DPoP proofs, with the proof header that carries its public half. Its `Debug` shows only the
/// algorithm and the thumbprint.
pub struct ProofKey {
    signer: Signer,
    rng: aws_lc_rs::rand::SystemRandom,
    alg: &'static str,
    /// The proof header, base64url-encoded once: `typ`, `alg` and the public `jwk`.
    header: String,
    /// The RFC 7638 thumbprint of the public key (`cnf.jkt` of the tokens bound to it).
    thumbprint: String,
}

impl std::fmt::Debug for ProofKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProofKey").field("alg", &self.alg).field("jkt", &self.thumbprint).finish()
    }
}

impl ProofKey {
    /// A new key for `algorithm` (P-256 for ES256, Ed25519 for EdDSA), made from the operating system's randomness.
    pub fn generate(algorithm: DpopAlgorithm) -> ProofKey {
        // Always of `algorithm`: every 32-byte seed is an Ed25519 key and nearly every 32-byte string a P-256 scalar;
        // the loop only guards against the others.
        loop {
            let bytes: [u8; 32] = rand::random();
            let key = match algorithm {
                DpopAlgorithm::EdDsa => Some(Key::Ed25519(ed25519_dalek::SigningKey::from_bytes(&bytes))),
                DpopAlgorithm::Es256 => p256::ecdsa::SigningKey::from_bytes(&bytes.into()).ok().map(Key::P256),
            };
            if let Some(key) = key {
                if let Ok(key) = ProofKey::new(key) {
                    return key;
                }
            }
        }
    }

    /// Reads a PEM private key (PKCS#8 `PRIVATE KEY`, or SEC1 `EC PRIVATE KEY`): EC P-256, P-384 or Ed25519. The
    /// error says what is wrong, never the key.
    pub fn load(path: &Path) -> Result<ProofKey, String> {
        let text = SecretSource::File(path.to_path_buf()).read().map_err(|e| e.to_string())?;
        Self::from_pem(text.expose())
    }

    /// Parses a PEM private key, as [`ProofKey::load`] reads it.
    pub fn from_pem(text: &str) -> Result<ProofKey, String> {
        use ed25519_dalek::pkcs8::DecodePrivateKey as _;
        let label = pem_label(text)?;
        let key = match label.as_str() {
            "PRIVATE KEY" => {
                if let Ok(key) = p256::SecretKey::from_pkcs8_pem(text) {
                    Key::P256(key.into())
                } else if let Ok(key) = p384::SecretKey::from_pkcs8_pem(text) {
                    Key::P384(key.into())
                } else if let Ok(key) = ed25519_dalek::SigningKey::from_pkcs8_pem(text) {
                    Key::Ed25519(key)
                } else {
                    return Err("not an EC P-256, P-384 or Ed25519 key (DPoP keys are one of these; RSA keys make \
                                proofs too large to send with every request)"
                        .into());
                }
            }
            "EC PRIVATE KEY" => {
                if let Ok(key) = p256::SecretKey::from_sec1_pem(text) {
                    Key::P256(key.into())
                } else if let Ok(key) = p384::SecretKey::from_sec1_pem(text) {
                    Key::P384(key.into())
                } else {
                    return Err("an EC key on a curve other than P-256 and P-384".into());
                }
            }
            "RSA PRIVATE KEY" => return Err("an RSA key: DPoP keys here are EC P-256, P-384 or Ed25519".into()),
            other => return Err(format!("a `{other}` PEM block, not a private key")),
        };
        ProofKey::new(key)
    }

    fn new(key: Key) -> Result<ProofKey, String> {
        use aws_lc_rs::signature::{
            EcdsaKeyPair, Ed25519KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING,
        };
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let refused = |e: aws_lc_rs::error::KeyRejected| format!("the key is refused by the signer: {e}");
        let ecdsa = |signing: &'static aws_lc_rs::signature::EcdsaSigningAlgorithm, private: &[u8], public: &[u8]| {
            EcdsaKeyPair::from_private_key_and_public_key(signing, private, public).map(Signer::Ecdsa)
        };
        let (alg, jwk, thumbprint, signer) = match &key {
            Key::P256(key) => {
                let point = key.verifying_key().to_encoded_point(false);
                let signer =
                    ecdsa(&ECDSA_P256_SHA256_FIXED_SIGNING, &key.to_bytes(), point.as_bytes()).map_err(refused)?;
                let (jwk, thumbprint) = ec_jwk("P-256", point.x().map(|x| b64(x)), point.y().map(|y| b64(y)));
                ("ES256", jwk, thumbprint, signer)
            }
            Key::P384(key) => {
                let point = key.verifying_key().to_encoded_point(false);
                let signer =
                    ecdsa(&ECDSA_P384_SHA384_FIXED_SIGNING, &key.to_bytes(), point.as_bytes()).map_err(refused)?;
                let (jwk, thumbprint) = ec_jwk("P-384", point.x().map(|x| b64(x)), point.y().map(|y| b64(y)));
                ("ES384", jwk, thumbprint, signer)
            }
            Key::Ed25519(key) => {
                let public = key.verifying_key();
                let signer =
                    Ed25519KeyPair::from_seed_and_public_key(key.as_bytes(), public.as_bytes()).map_err(refused)?;
                let x = b64(public.as_bytes());
                let thumbprint = jwk_thumbprint(&[("crv", "Ed25519"), ("kty", "OKP"), ("x", &x)]);
                let jwk = serde_json::json!({"crv": "Ed25519", "kty": "OKP", "x": x});
                ("EdDSA", jwk, thumbprint, Signer::Ed25519(signer))
            }
        };
        let header = serde_json::json!({"typ": "dpop+jwt", "alg": alg, "jwk": jwk});
        let header = b64(header.to_string().as_bytes());
        Ok(ProofKey { signer, rng, alg, header, thumbprint })
    }

    /// The JWS algorithm of its proofs.
    pub fn algorithm(&self) -> &'static str {
        self.alg
    }

    /// The RFC 7638 thumbprint of the public key: `cnf.jkt` of the tokens bound to it (safe to show).
    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    /// The proof header (`typ`, `alg` and the public `jwk`), base64url-encoded: the first part of every proof.
    pub fn header(&self) -> &str {
        &self.header
    }

    /// The JWS signature of `message` (ECDSA: `r || s`, fixed size).
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        match &self.signer {
            // Fails only if the system's random source does; a proof without a signature is refused by the server.
            Signer::Ecdsa(key) => key.sign(&self.rng, message).map(|s| s.as_ref().to_vec()).unwrap_or_default(),
            Signer::Ed25519(key) => key.sign(message).as_ref().to_vec(),
        }
    }
}

/// The JWK and thumbprint of an EC public key.
fn ec_jwk(crv: &str, x: Option<String>, y: Option<String>) -> (serde_json::Value, String) {
    // A signing key's public point is never the point at infinity.
    let (x, y) = (x.unwrap_or_default(), y.unwrap_or_default());
    let thumbprint = jwk_thumbprint(&[("crv", crv), ("kty", "EC"), ("x", &x), ("y", &y)]);
    (serde_json::json!({"crv": crv, "kty": "EC", "x": x, "y": y}), thumbprint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_load_from_pem_for_each_curve_and_rsa_is_refused_with_a_reason() {
        use ed25519_dalek::pkcs8::EncodePrivateKey as _;
        let p256 = p256::SecretKey::from_bytes(&[7u8; 32].into()).unwrap();
        let key = ProofKey::from_pem(&p256.to_pkcs8_pem(Default::default()).unwrap()).unwrap();
        assert_eq!(key.algorithm(), "ES256");
        let sec1 = p256.to_sec1_pem(Default::default()).unwrap();
        assert_eq!(ProofKey::from_pem(&sec1).unwrap().thumbprint(), key.thumbprint());
        let p384 = p384::SecretKey::from_bytes(&[9u8; 48].into()).unwrap();
        let key = ProofKey::from_pem(&p384.to_pkcs8_pem(Default::default()).unwrap()).unwrap();
        assert_eq!(key.algorithm(), "ES384");
        let ed = ed25519_dalek::SigningKey::from_bytes(&[3u8; 32]);
        let key = ProofKey::from_pem(&ed.to_pkcs8_pem(Default::default()).unwrap()).unwrap();
        assert_eq!(key.algorithm(), "EdDSA");
        assert!(ProofKey::from_pem("-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n")
            .unwrap_err()
            .contains("RSA"));
        assert!(ProofKey::from_pem("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
            .unwrap_err()
            .contains("CERTIFICATE"));
        assert!(ProofKey::from_pem("hello").unwrap_err().contains("no PEM block"));
        assert!(format!("{key:?}").contains("jkt"));
    }
}
