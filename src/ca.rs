//! The local certificate authority of HTTPS interception (docs/local-dev.md).
//!
//! It is made only by `tokenproxy ca init` ([`LocalCa::init`]), never at startup, and lives in `state.dir`: the key
//! (`ca-key.pem`, ECDSA P-256) and the certificate (`ca.pem`, two years) are written as every private file is
//! ([`crate::private_file`]: `O_EXCL|O_NOFOLLOW`, mode 0600, renamed into place), beside a `.gitignore` holding `*`
//! (the default `state.dir` is relative and may sit in a git work tree).
//!
//! The certificate carries critical X.509 name constraints (RFC 5280 §4.2.1.10): the permitted DNS subtrees are the
//! host names the intercepting routes name, and every IPv4 and IPv6 address is excluded (without that exclusion a
//! certificate for an IP address would be unconstrained). A DNS constraint also permits the name's subdomains. A
//! client that trusts this CA therefore trusts it for those names only, even if its key leaked. Leaves
//! ([`LocalCa::issue`]: P-256, seven days, serverAuth) are issued for a permitted name only.

use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose, NameConstraints, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use crate::private_file::{writable_by_others, write_private};

/// The CA certificate's file in `state.dir`.
pub const CERT_FILE: &str = "ca.pem";
/// The CA key's file in `state.dir`.
pub const KEY_FILE: &str = "ca-key.pem";
/// How long the CA is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(2 * 365 * 24 * 3600);
/// How long a leaf is valid.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);
/// How far back a certificate's validity starts (a client whose clock is a little behind still accepts it).
const BACKDATE: Duration = Duration::from_secs(3600);

/// What went wrong with the local CA; the message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// No CA in the directory.
    #[error("no local CA in {0} (`tokenproxy ca init` makes one)")]
    Missing(PathBuf),
    /// `init` without `--force` over an existing CA.
    #[error("a local CA is already in {0}; `tokenproxy ca init --force` replaces it")]
    Exists(PathBuf),
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        error: std::io::Error,
    },
    /// A file is not what `ca init` writes (or the CA has expired).
    #[error("{path}: {what}; `tokenproxy ca init --force` makes a new CA")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// A host name the CA cannot be made for, or will not issue for.
    #[error("`{0}`: {1}")]
    Name(String, String),
    /// rcgen refused to make a key or certificate.
    #[error("cannot make the certificate: {0}")]
    Make(#[from] rcgen::Error),
}

/// A leaf certificate and its key, for one host name.
pub struct Leaf {
    /// The certificate (DER).
    pub cert: CertificateDer<'static>,
    /// Its key (PKCS #8 DER).
    pub key: PrivatePkcs8KeyDer<'static>,
    /// When it stops being valid.
    pub not_after: OffsetDateTime,
}

/// The local CA, loaded.
pub struct LocalCa {
    cert_pem: String,
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    permitted: Vec<String>,
    not_after: OffsetDateTime,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa").field("permitted", &self.permitted).field("not_after", &self.not_after).finish()
    }
}

/// `host` lowercased, if it is a DNS name a CA may be constrained to: letters, digits, hyphens and dots, labels of 1
/// to 63 characters, at least one dot or `localhost`, not an IP address, no wildcard.
pub fn dns_name(host: &str) -> Result<String, CaError> {
    let refuse = |why: &str| Err(CaError::Name(host.to_owned(), why.to_owned()));
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    if name.parse::<std::net::IpAddr>().is_ok() {
        return refuse("an IP address is never intercepted (only DNS names are)");
    }
    if name.is_empty() || name.len() > 253 {
        return refuse("not a DNS name");
    }
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if !name.split('.').all(label_ok) {
        return refuse("not a DNS name (letters, digits, hyphens and dots; no wildcard)");
    }
    Ok(name)
}

/// Whether `host` is `name` or one of its subdomains (what a DNS name constraint permits).
fn within(host: &str, name: &str) -> bool {
    host == name || host.strip_suffix(name).is_some_and(|rest| rest.ends_with('.'))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |error| CaError::Io { path: path.to_owned(), error }
}

impl LocalCa {
    /// Makes a CA in `dir` constrained to `hosts` and writes it there (see the module docs); an existing CA is
    /// replaced only with `force`. `dir` is created (0700) when missing, and refused when others may write to it.
    pub fn init(dir: &Path, hosts: &[String], force: bool) -> Result<LocalCa, CaError> {
        let mut permitted = hosts.iter().map(|host| dns_name(host)).collect::<Result<Vec<_>, _>>()?;
        permitted.sort();
        permitted.dedup();
        if permitted.is_empty() {
            return Err(CaError::Name(
                String::new(),
                "no route intercepts a host (`intercept = true` with `host`): the CA would vouch for nothing".into(),
            ));
        }
        if !dir.exists() {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io(dir))?;
        }
        if let Some(mode) = writable_by_others(dir) {
            return Err(CaError::Io {
                path: dir.to_owned(),
                error: std::io::Error::other(format!(
                    "others may write to it (mode {mode:o}): a key is never kept there"
                )),
            });
        }
        let (cert_path, key_path) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
        if !force && (cert_path.exists() || key_path.exists()) {
            return Err(CaError::Exists(dir.to_owned()));
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "tokenproxy local CA");
        name.push(DnType::OrganizationName, "tokenproxy (local development)");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_VALIDITY;
        params.name_constraints = Some(NameConstraints {
            permitted_subtrees: permitted.iter().map(|name| GeneralSubtree::DnsName(name.clone())).collect(),
            excluded_subtrees: vec![
                GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])),
                GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])),
            ],
        });
        let cert = params.self_signed(&key)?;
        let gitignore = dir.join(".gitignore");
        write_private(&gitignore, b"*\n").map_err(io(&gitignore))?;
        // The key first: a CA certificate is never left without its key.
        write_private(&key_path, key.serialize_pem().as_bytes()).map_err(io(&key_path))?;
        write_private(&cert_path, cert.pem().as_bytes()).map_err(io(&cert_path))?;
        Self::load(dir)
    }

    /// Loads the CA `ca init` wrote in `dir`: its key must match its certificate, and the certificate must be a CA's,
    /// still valid, with name constraints.
    pub fn load(dir: &Path) -> Result<LocalCa, CaError> {
        let (cert_path, key_path) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
        let read = |path: &Path| match std::fs::read_to_string(path) {
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Err(CaError::Missing(dir.to_owned())),
            other => other.map_err(io(path)),
        };
        let (cert_pem, key_pem) = (read(&cert_path)?, read(&key_path)?);
        let invalid = |path: &Path, what: &str| CaError::Invalid { path: path.to_owned(), what: what.to_owned() };
        let key = KeyPair::from_pem(&key_pem).map_err(|_| invalid(&key_path, "not a PEM private key"))?;
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map_err(|_| invalid(&cert_path, "not a PEM certificate"))?;
        let cert: CertificateDer<'static> = der;
        let (_, x509) =
            x509_parser::parse_x509_certificate(&cert).map_err(|_| invalid(&cert_path, "not an X.509 certificate"))?;
        if !x509.is_ca() {
            return Err(invalid(&cert_path, "not a CA certificate"));
        }
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(invalid(&key_path, "this key is not the CA certificate's"));
        }
        let not_after = x509.validity().not_after.to_datetime();
        if not_after <= OffsetDateTime::now_utc() {
            return Err(invalid(&cert_path, &format!("the CA expired on {}", not_after.date())));
        }
        let constraints = x509.name_constraints().ok().flatten();
        let permitted: Vec<String> = constraints
            .iter()
            .flat_map(|c| c.value.permitted_subtrees.iter().flatten())
            .filter_map(|subtree| match subtree.base {
                x509_parser::extensions::GeneralName::DNSName(name) => Some(name.to_ascii_lowercase()),
                _ => None,
            })
            .collect();
        if permitted.is_empty() || !constraints.is_some_and(|c| c.critical) {
            return Err(invalid(&cert_path, "the CA has no critical DNS name constraints"));
        }
        drop(x509);
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(CaError::Make)?;
        Ok(LocalCa { cert_pem, cert, issuer, permitted, not_after })
    }

    /// The CA certificate, PEM (what clients are told to trust).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The DNS names the CA is constrained to (each with its subdomains).
    pub fn permitted(&self) -> &[String] {
        &self.permitted
    }

    /// When the CA stops being valid.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// `host` as a DNS name the CA may vouch for, or why not (the message says what to do).
    pub fn vouches_for(&self, host: &str) -> Result<String, CaError> {
        let name = dns_name(host)?;
        if !self.permitted.iter().any(|permitted| within(&name, permitted)) {
            return Err(CaError::Name(
                name,
                format!(
                    "outside the local CA's name constraints ({}); `tokenproxy ca init --force` makes a CA for the \
                     hosts the routes intercept now",
                    self.permitted.join(", ")
                ),
            ));
        }
        Ok(name)
    }

    /// A new leaf for `host` (a new P-256 key, seven days, serverAuth); refused for a name outside the constraints.
    pub fn issue(&self, host: &str) -> Result<Leaf, CaError> {
        let name = self.vouches_for(host)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::new(vec![name.clone()])?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - BACKDATE;
        params.not_after = (now + LEAF_VALIDITY).min(self.not_after);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Leaf {
            cert: cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            not_after: params.not_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn hosts(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn init_writes_a_private_key_a_gitignore_and_refuses_to_replace_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let ca = LocalCa::init(&state, &hosts(&["API.example.com", "api.example.com", "login.test"]), false).unwrap();
        assert_eq!(ca.permitted(), ["api.example.com", "login.test"]);
        let mode = |name: &str| std::fs::metadata(state.join(name)).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(KEY_FILE), mode(CERT_FILE)), (0o600, 0o600));
        assert_eq!(std::fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(std::fs::read_to_string(state.join(".gitignore")).unwrap(), "*\n");
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let days = (ca.not_after() - OffsetDateTime::now_utc()).whole_days();
        assert!((729..=730).contains(&days), "{days}");
        let again = LocalCa::init(&state, &hosts(&["other.test"]), false).unwrap_err();
        assert!(matches!(again, CaError::Exists(_)), "{again}");
        let reloaded = LocalCa::load(&state).unwrap();
        assert_eq!((reloaded.cert(), reloaded.permitted()), (ca.cert(), ca.permitted()), "untouched");
        let forced = LocalCa::init(&state, &hosts(&["other.test"]), true).unwrap();
        assert_eq!(LocalCa::load(&state).unwrap().permitted(), forced.permitted());
        assert_eq!(forced.permitted(), ["other.test"]);
    }

    #[test]
    fn planted_files_are_replaced_never_written_through_and_a_shared_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
        // Someone planted symlinks where the key and the certificate go, pointing at a file of theirs.
        let theirs = dir.path().join("theirs");
        std::fs::write(&theirs, "their file\n").unwrap();
        for name in [KEY_FILE, CERT_FILE] {
            std::os::unix::fs::symlink(&theirs, state.join(name)).unwrap();
        }
        LocalCa::init(&state, &hosts(&["api.example.com"]), true).unwrap();
        assert_eq!(std::fs::read_to_string(&theirs).unwrap(), "their file\n", "never written through");
        for name in [KEY_FILE, CERT_FILE] {
            let meta = std::fs::symlink_metadata(state.join(name)).unwrap();
            assert!(meta.file_type().is_file() && meta.permissions().mode() & 0o777 == 0o600, "{name}");
        }
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        let refused = LocalCa::init(&shared, &hosts(&["api.example.com"]), false).unwrap_err().to_string();
        assert!(refused.contains("others may write to it"), "{refused}");
        assert!(!shared.join(KEY_FILE).exists());
    }

    #[test]
    fn only_dns_names_are_taken_and_a_leaf_only_within_the_constraints() {
        let dir = tempfile::tempdir().unwrap();
        for refused in ["10.0.0.1", "::1", "*.example.com", "a..b", "-a.test", ""] {
            assert!(LocalCa::init(dir.path(), &hosts(&[refused]), false).is_err(), "{refused}");
        }
        assert!(LocalCa::init(dir.path(), &[], false).is_err(), "a CA for nothing");
        let ca = LocalCa::init(dir.path(), &hosts(&["api.example.com"]), false).unwrap();
        assert!(
            ca.vouches_for("api.example.com").is_ok()
                && ca.vouches_for("v2.api.example.com").is_ok()
                && ca.vouches_for("API.example.com.").is_ok()
        );
        assert!(
            ca.vouches_for("evil.example").is_err()
                && ca.vouches_for("xapi.example.com").is_err()
                && ca.vouches_for("example.com").is_err()
        );
        assert!(ca.vouches_for("127.0.0.1").is_err());
        let refused = ca.issue("evil.example").err().unwrap().to_string();
        assert!(refused.contains("tokenproxy ca init --force") && refused.contains("api.example.com"), "{refused}");
        assert!(ca.issue("127.0.0.1").is_err());
        let leaf = ca.issue("api.example.com").unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(&leaf.cert).unwrap();
        assert!(!x509.is_ca());
        let days = (leaf.not_after - OffsetDateTime::now_utc()).whole_days();
        assert!((6..=7).contains(&days), "{days}");
    }

    #[test]
    fn a_planted_or_broken_ca_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(LocalCa::load(dir.path()), Err(CaError::Missing(_))));
        LocalCa::init(dir.path(), &hosts(&["api.example.com"]), false).unwrap();
        // Another CA's key beside this certificate.
        let other = tempfile::tempdir().unwrap();
        LocalCa::init(other.path(), &hosts(&["api.example.com"]), false).unwrap();
        std::fs::copy(other.path().join(KEY_FILE), dir.path().join(KEY_FILE)).unwrap();
        let error = LocalCa::load(dir.path()).unwrap_err().to_string();
        assert!(error.contains("not the CA certificate's") && error.contains("--force"), "{error}");
        // A CA without name constraints (someone's own, planted) is never used.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.path().join(KEY_FILE), key.serialize_pem()).unwrap();
        std::fs::write(dir.path().join(CERT_FILE), cert.pem()).unwrap();
        let error = LocalCa::load(dir.path()).unwrap_err().to_string();
        assert!(error.contains("no critical DNS name constraints"), "{error}");
    }

    #[test]
    fn a_verifier_refuses_leaves_the_ca_key_signs_outside_its_constraints() {
        use rustls::client::danger::ServerCertVerifier as _;
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::init(dir.path(), &hosts(&["api.example.com"]), false).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert().clone()).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(std::sync::Arc::new(roots), provider)
                .build()
                .unwrap();
        let verify = |cert: &CertificateDer<'static>, name: &str| {
            let name = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
            verifier.verify_server_cert(cert, &[], &name, &[], rustls_pki_types::UnixTime::now())
        };
        let leaf = ca.issue("api.example.com").unwrap();
        verify(&leaf.cert, "api.example.com").unwrap();
        // Leaves forged with the CA's own key, as a thief of the key would: for another name, and for an address.
        let key = KeyPair::from_pem(&std::fs::read_to_string(dir.path().join(KEY_FILE)).unwrap()).unwrap();
        let issuer = Issuer::from_ca_cert_der(ca.cert(), key).unwrap();
        let forge = |san: rcgen::SanType| {
            let mut params = CertificateParams::default();
            params.subject_alt_names = vec![san];
            params.signed_by(&KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap(), &issuer).unwrap().der().clone()
        };
        let evil = forge(rcgen::SanType::DnsName("evil.example".try_into().unwrap()));
        let refused = verify(&evil, "evil.example").unwrap_err().to_string();
        assert!(refused.contains("NameConstraintViolation"), "{refused}");
        let address = forge(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let refused = verify(&address, "127.0.0.1").unwrap_err().to_string();
        assert!(refused.contains("NameConstraintViolation"), "{refused}");
    }
}
