//! Certificate thumbprints: what JWS headers (`x5t`, `x5t#S256`) and RFC 8705 (`cnf.x5t#S256`) name a certificate by.

use std::path::Path;

use sha2::{Digest, Sha256};

use super::b64;

/// The SHA-256 thumbprint (base64url, as `x5t#S256` in RFC 8705 §3.1) of the first certificate in a PEM file.
pub fn certificate_thumbprint(path: &Path) -> Result<String, String> {
    CertificateThumbprints::read(path).map(|thumbprints| thumbprints.sha256)
}

/// The thumbprints of a certificate, base64url: what JWS headers name a certificate by (RFC 7515 §4.1.7–8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateThumbprints {
    /// SHA-1 of the DER: `x5t` (what Entra ID's certificate credentials are looked up by).
    pub sha1: String,
    /// SHA-256 of the DER: `x5t#S256`.
    pub sha256: String,
}

impl CertificateThumbprints {
    /// The thumbprints of the first certificate in the PEM file at `path`; the error names what is wrong.
    pub fn read(path: &Path) -> Result<CertificateThumbprints, String> {
        use rustls_pki_types::pem::PemObject;
        let cert = rustls_pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .next()
            .ok_or_else(|| format!("{}: no PEM certificate found", path.display()))?
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(CertificateThumbprints {
            sha1: b64(<sha1::Sha1 as sha1::Digest>::digest(cert.as_ref()).as_slice()),
            sha256: b64(&Sha256::digest(cert.as_ref())),
        })
    }
}
