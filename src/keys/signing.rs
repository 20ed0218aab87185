//! Private keys that sign JWTs (client assertions, RFC 7523 grant assertions): PEM, PKCS#8 (`PRIVATE KEY`) for RSA,
//! EC P-256/P-384 and Ed25519; PKCS#1 (`RSA PRIVATE KEY`) and SEC1 (`EC PRIVATE KEY`) too; and Google
//! service-account key files, whose RSA key sits in a JSON document. The key crates parse the PEM and give the public
//! half for the thumbprint; signing goes through `jsonwebtoken`.

use std::path::Path;

use jsonwebtoken::{Algorithm, EncodingKey};
use serde::Serialize;

use super::{b64, jwk_thumbprint, pem_label};
use crate::secret::{Secret, SecretError, SecretSource};

/// Why a key file could not be used. Messages name the file, never its content.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file holds no usable private key.
    #[error("{}: {reason}", path.display())]
    BadKey {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The key cannot sign with the algorithm asked for.
    #[error("{}: {reason}", path.display())]
    WrongAlgorithm {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The file could not be read (as a secret file).
    #[error(transparent)]
    Secret(#[from] SecretError),
}

/// `providers.NAME.assertion_algorithm`: the JWS algorithm of a `private_key_jwt` assertion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum AssertionAlgorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// RSASSA-PSS with SHA-256.
    PS256,
    /// ECDSA on P-256 with SHA-256.
    ES256,
    /// ECDSA on P-384 with SHA-384.
    ES384,
    /// Ed25519.
    EdDSA,
}

impl AssertionAlgorithm {
    /// The config spelling (the JWS `alg`).
    pub fn as_str(self) -> &'static str {
        match self {
            AssertionAlgorithm::RS256 => "RS256",
            AssertionAlgorithm::PS256 => "PS256",
            AssertionAlgorithm::ES256 => "ES256",
            AssertionAlgorithm::ES384 => "ES384",
            AssertionAlgorithm::EdDSA => "EdDSA",
        }
    }

    /// The `jsonwebtoken` algorithm.
    pub fn algorithm(self) -> Algorithm {
        match self {
            AssertionAlgorithm::RS256 => Algorithm::RS256,
            AssertionAlgorithm::PS256 => Algorithm::PS256,
            AssertionAlgorithm::ES256 => Algorithm::ES256,
            AssertionAlgorithm::ES384 => Algorithm::ES384,
            AssertionAlgorithm::EdDSA => Algorithm::EdDSA,
        }
    }
}

/// The kind of key a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// RSA (at least 2048 bits).
    Rsa,
    /// EC on P-256.
    P256,
    /// EC on P-384.
    P384,
    /// Ed25519.
    Ed25519,
}

impl KeyKind {
    /// The algorithm used when none is set: the one this key signs with.
    fn default_algorithm(self) -> Algorithm {
        match self {
            KeyKind::Rsa => Algorithm::RS256,
            KeyKind::P256 => Algorithm::ES256,
            KeyKind::P384 => Algorithm::ES384,
            KeyKind::Ed25519 => Algorithm::EdDSA,
        }
    }

    fn name(self) -> &'static str {
        match self {
            KeyKind::Rsa => "an RSA key",
            KeyKind::P256 => "an EC P-256 key",
            KeyKind::P384 => "an EC P-384 key",
            KeyKind::Ed25519 => "an Ed25519 key",
        }
    }
}

/// A private key read from a file: ready to sign, with its RFC 7638 thumbprint.
pub struct SigningKey {
    kind: KeyKind,
    key: EncodingKey,
    thumbprint: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("kind", &self.kind).field("thumbprint", &self.thumbprint).finish()
    }
}

impl SigningKey {
    /// What kind of key it is.
    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// The RFC 7638 JWK thumbprint (SHA-256, base64url) of the public key: the default `kid`.
    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    /// The key as `jsonwebtoken` signs with it.
    pub fn encoding_key(&self) -> &EncodingKey {
        &self.key
    }

    /// The algorithm this key signs with when `set` (the config's `assertion_algorithm`) asks for one; an error
    /// when the key cannot.
    pub fn algorithm(&self, set: Option<AssertionAlgorithm>, path: &Path) -> Result<Algorithm, KeyError> {
        let Some(set) = set else { return Ok(self.kind.default_algorithm()) };
        let algorithm = set.algorithm();
        let fits = match self.kind {
            KeyKind::Rsa => matches!(algorithm, Algorithm::RS256 | Algorithm::PS256),
            kind => algorithm == kind.default_algorithm(),
        };
        if fits {
            Ok(algorithm)
        } else {
            Err(KeyError::WrongAlgorithm {
                path: path.to_path_buf(),
                reason: format!("{} cannot sign {}", self.kind.name(), set.as_str()),
            })
        }
    }

    /// Parses a PEM private key; the error says what was found instead, never the key.
    pub fn from_pem(text: &str) -> Result<SigningKey, String> {
        use ed25519_dalek::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _};
        use p256::elliptic_curve::sec1::ToEncodedPoint as _;
        use rsa::pkcs1::{DecodeRsaPrivateKey as _, EncodeRsaPrivateKey as _};
        use rsa::traits::PublicKeyParts as _;

        let label = pem_label(text)?;
        let rsa = |key: rsa::RsaPrivateKey| -> Result<SigningKey, String> {
            let bits = key.size() * 8;
            if bits < 2048 {
                return Err(format!("the RSA key has {bits} bits; at least 2048 are needed"));
            }
            let der = key.to_pkcs1_der().map_err(|e| format!("cannot encode the RSA key: {e}"))?;
            let (n, e) = (b64(&key.n().to_bytes_be()), b64(&key.e().to_bytes_be()));
            Ok(SigningKey {
                kind: KeyKind::Rsa,
                key: EncodingKey::from_rsa_der(der.as_bytes()),
                thumbprint: jwk_thumbprint(&[("e", &e), ("kty", "RSA"), ("n", &n)]),
            })
        };
        macro_rules! ec {
            ($key:expr, $kind:expr, $crv:literal) => {{
                let key = $key;
                let point = key.public_key().to_encoded_point(false);
                let (x, y) = (point.x().map(|x| b64(x)), point.y().map(|y| b64(y)));
                let (Some(x), Some(y)) = (x, y) else {
                    return Err("the EC public key is the point at infinity".into());
                };
                let der = key.to_pkcs8_der().map_err(|e| format!("cannot encode the EC key: {e}"))?;
                Ok(SigningKey {
                    kind: $kind,
                    key: EncodingKey::from_ec_der(der.as_bytes()),
                    thumbprint: jwk_thumbprint(&[("crv", $crv), ("kty", "EC"), ("x", &x), ("y", &y)]),
                })
            }};
        }
        match label.as_str() {
            "PRIVATE KEY" => {
                if let Ok(key) = rsa::RsaPrivateKey::from_pkcs8_pem(text) {
                    return rsa(key);
                }
                if let Ok(key) = p256::SecretKey::from_pkcs8_pem(text) {
                    return ec!(key, KeyKind::P256, "P-256");
                }
                if let Ok(key) = p384::SecretKey::from_pkcs8_pem(text) {
                    return ec!(key, KeyKind::P384, "P-384");
                }
                if let Ok(key) = ed25519_dalek::SigningKey::from_pkcs8_pem(text) {
                    let der = key.to_pkcs8_der().map_err(|e| format!("cannot encode the Ed25519 key: {e}"))?;
                    let x = b64(key.verifying_key().as_bytes());
                    return Ok(SigningKey {
                        kind: KeyKind::Ed25519,
                        key: EncodingKey::from_ed_der(der.as_bytes()),
                        thumbprint: jwk_thumbprint(&[("crv", "Ed25519"), ("kty", "OKP"), ("x", &x)]),
                    });
                }
                Err("a PKCS#8 private key of an unsupported type or curve (supported: RSA, EC P-256, EC P-384, \
                     Ed25519)"
                    .into())
            }
            "RSA PRIVATE KEY" => {
                rsa(rsa::RsaPrivateKey::from_pkcs1_pem(text).map_err(|e| format!("not a valid RSA key: {e}"))?)
            }
            "EC PRIVATE KEY" => {
                if let Ok(key) = p256::SecretKey::from_sec1_pem(text) {
                    return ec!(key, KeyKind::P256, "P-256");
                }
                if let Ok(key) = p384::SecretKey::from_sec1_pem(text) {
                    return ec!(key, KeyKind::P384, "P-384");
                }
                Err("an EC key on an unsupported curve (supported: P-256, P-384)".into())
            }
            "ENCRYPTED PRIVATE KEY" => Err("the key is encrypted; tokenproxy needs it unencrypted (openssl pkcs8 \
                                            -topk8 -nocrypt), protected by the file's permissions"
                .into()),
            other => Err(format!("holds a `{other}` PEM block, not a private key")),
        }
    }
}

/// Reads a private key file (PEM) and makes it ready to sign.
pub fn load_key(path: &Path) -> Result<SigningKey, KeyError> {
    let text = read_small(path)?;
    SigningKey::from_pem(text.expose()).map_err(|reason| KeyError::BadKey { path: path.to_path_buf(), reason })
}

/// Reads a key or credentials file as the secret files are read: at most 64 KiB, text, trimmed.
fn read_small(path: &Path) -> Result<Secret, KeyError> {
    Ok(SecretSource::File(path.to_path_buf()).read()?)
}

/// A Google service-account key file, as Google hands it out (the fields tokenproxy uses).
#[derive(serde::Deserialize)]
pub struct GoogleCredentials {
    /// `service_account`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// The service account: the assertion's `iss`.
    pub client_email: String,
    /// The key's id: the assertion's `kid`.
    pub private_key_id: String,
    /// The RSA private key, PKCS#8 PEM.
    private_key: Secret,
    /// Google's token endpoint: the assertion's `aud`.
    pub token_uri: String,
}

impl std::fmt::Debug for GoogleCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GoogleCredentials").field("client_email", &self.client_email).finish_non_exhaustive()
    }
}

/// Reads a Google service-account key file and its RSA key.
pub fn load_google(path: &Path) -> Result<(GoogleCredentials, SigningKey), KeyError> {
    let bad = |reason: String| KeyError::BadKey { path: path.to_path_buf(), reason };
    let text = read_small(path)?;
    // serde_json's messages name a field or a position, never a value.
    let credentials: GoogleCredentials =
        serde_json::from_str(text.expose()).map_err(|e| bad(format!("not a Google service-account key file: {e}")))?;
    if credentials.kind.as_deref().is_some_and(|kind| kind != "service_account") {
        return Err(bad("not a service-account key (`type` is not \"service_account\")".into()));
    }
    let key = SigningKey::from_pem(credentials.private_key.expose())
        .map_err(|reason| bad(format!("private_key: {reason}")))?;
    if key.kind != KeyKind::Rsa {
        return Err(bad("private_key: Google service-account keys are RSA".into()));
    }
    Ok((credentials, key))
}
