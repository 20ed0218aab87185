//! Keys and certificates read from files: the PEM private keys that sign client and grant assertions (RSA, EC
//! P-256/P-384, Ed25519), Google service-account key files, DPoP key pairs, the shared store's encryption keys, and
//! the thumbprints that name a public key (RFC 7638) or a certificate (`x5t`, `x5t#S256`).
//!
//! Both the configuration (which reads every key at load, so `check` tells a wrong file before the first token call
//! does) and the token engine (which signs with them) use this module, so it sits below both: it imports nothing of
//! tokenproxy but [`crate::secret`]. Files are read as secret files are (at most 64 KiB, text, trimmed); every error
//! names the file and what is wrong with it, never its content.

mod certificate;
mod encryption;
mod proof;
mod signing;

use base64::Engine as _;
use sha2::{Digest, Sha256};

pub use certificate::{certificate_thumbprint, CertificateThumbprints};
pub use encryption::{read_encryption_keys, EncryptionKey};
pub use proof::{DpopAlgorithm, ProofKey};
pub use signing::{load_google, load_key, AssertionAlgorithm, GoogleCredentials, KeyError, KeyKind, SigningKey};

/// Base64url without padding, as JOSE writes binary values.
pub(crate) fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The RFC 7638 thumbprint of a JWK given as its required members in lexicographic order (the canonical form).
pub(crate) fn jwk_thumbprint(members: &[(&str, &str)]) -> String {
    let json = members.iter().map(|(name, value)| format!("\"{name}\":\"{value}\"")).collect::<Vec<_>>().join(",");
    b64(&Sha256::digest(format!("{{{json}}}")))
}

/// The label of the first PEM block in `text` (`PRIVATE KEY`, `EC PRIVATE KEY`, …).
fn pem_label(text: &str) -> Result<String, &'static str> {
    text.lines()
        .find_map(|line| line.trim().strip_prefix("-----BEGIN ")?.strip_suffix("-----").map(str::to_owned))
        .ok_or("no PEM block found (expected -----BEGIN PRIVATE KEY-----)")
}

#[cfg(test)]
mod tests;
