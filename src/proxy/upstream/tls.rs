//! A route's own TLS to its upstream (docs/upstream-tls.md): the CA bundle it trusts instead of the web roots, the
//! name it verifies, the client certificate it presents; a hyper pool of its own (two routes with different TLS
//! settings never share a connection), swapped for a new one when the files change on disk; and a handshake failure
//! told in words.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::{AlertDescription, CertificateError};
use rustls_pki_types::ServerName;
use tokio::time::Instant;

use super::connector::{pooled, Connector, Protocol};
use super::{Dial, PooledClient};
use crate::config::UpstreamTlsConfig;
use crate::tls::{ClientTls, FileStamp, TlsError};

/// How often, at most, a route's TLS files are looked at for a change (on the request path: one `stat` per file).
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// A route's TLS settings and the hyper pool built from them; see the module docs.
pub struct RouteTls {
    route: Arc<str>,
    settings: UpstreamTlsConfig,
    server_name: Option<ServerName<'static>>,
    dial: Arc<dyn Dial>,
    max_idle: usize,
    client: ArcSwap<RouteClient>,
    /// The files' stamp the pool was built from, and the last stamp that failed to load (reported once).
    stamps: Mutex<(FileStamp, Option<FileStamp>)>,
    /// Milliseconds after `epoch` before which the files are not looked at again.
    next_check: AtomicU64,
    epoch: Instant,
    reloads: prometheus::IntCounter,
}

impl RouteTls {
    /// Reads the route's TLS files and builds its pool.
    pub(super) fn new(
        route: &str,
        settings: &UpstreamTlsConfig,
        dial: Arc<dyn Dial>,
        max_idle: usize,
        reloads: prometheus::IntCounter,
    ) -> Result<RouteTls, TlsError> {
        let server_name = match &settings.server_name {
            Some(name) => Some(ServerName::try_from(name.clone()).map_err(|e| TlsError::Name(e.to_string()))?),
            None => None,
        };
        let stamp = FileStamp::of(&files(settings));
        let client = build(settings, server_name.clone(), &dial, max_idle)?;
        Ok(RouteTls {
            route: Arc::from(route),
            settings: settings.clone(),
            server_name,
            dial,
            max_idle,
            client: ArcSwap::from_pointee(client),
            stamps: Mutex::new((stamp, None)),
            next_check: AtomicU64::new(CHECK_INTERVAL.as_millis() as u64),
            epoch: Instant::now(),
            reloads,
        })
    }

    /// The pool to send through: the current one, or a new one when the files changed since it was built (looked
    /// at no more often than [`CHECK_INTERVAL`]). Connections of a replaced pool are not used again; a round trip
    /// in flight on one finishes.
    pub(super) fn client(&self) -> Arc<RouteClient> {
        let now = self.epoch.elapsed().as_millis() as u64;
        let due = self.next_check.load(Ordering::Relaxed);
        if now >= due
            && self
                .next_check
                .compare_exchange(due, now + CHECK_INTERVAL.as_millis() as u64, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.reload_if_changed();
        }
        self.client.load_full()
    }

    /// Looks at the files now, whenever they were last looked at (before the replay after a 401: rare).
    pub fn recheck(&self) {
        self.reload_if_changed();
    }

    /// Builds a new pool if the files changed; a change that does not load (a certificate without its new key yet)
    /// keeps the current pool, is reported once, and is tried again at the next change.
    fn reload_if_changed(&self) {
        let stamp = FileStamp::of(&files(&self.settings));
        let mut stamps = self.stamps.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if stamp == stamps.0 || stamps.1.as_ref() == Some(&stamp) {
            return;
        }
        match build(&self.settings, self.server_name.clone(), &self.dial, self.max_idle) {
            Ok(client) => {
                self.client.store(Arc::new(client));
                *stamps = (stamp, None);
                self.reloads.inc();
                tracing::info!(route = %self.route, "upstream TLS files changed; new connections use them");
            }
            Err(error) => {
                stamps.1 = Some(stamp);
                tracing::warn!(route = %self.route, "upstream TLS files changed but cannot be used, keeping the previous ones: {error}");
            }
        }
    }

    /// Whether the route presents a client certificate.
    pub(super) fn has_client_cert(&self) -> bool {
        self.settings.client_cert.is_some()
    }
}

/// The files a route's TLS settings name.
fn files(settings: &UpstreamTlsConfig) -> Vec<&Path> {
    let mut files: Vec<&Path> = settings.ca_file.iter().map(PathBuf::as_path).collect();
    if let Some((cert, key)) = &settings.client_cert {
        files.extend([cert.as_path(), key.as_path()]);
    }
    files
}

/// What a route's TLS files were made into: its pool, and its connector (for upgrades, which go on connections of
/// their own).
pub(super) struct RouteClient {
    pub(super) pool: PooledClient,
    pub(super) connector: Connector,
}

/// A hyper pool whose connector uses `settings` (read from the files now).
fn build(
    settings: &UpstreamTlsConfig,
    server_name: Option<ServerName<'static>>,
    dial: &Arc<dyn Dial>,
    max_idle: usize,
) -> Result<RouteClient, TlsError> {
    let tls = ClientTls {
        ca_file: settings.ca_file.as_deref(),
        only_ca_file: true,
        client_cert: settings.client_cert.as_ref().map(|(cert, key)| (cert.as_path(), key.as_path())),
    };
    let connector = Connector::new(&tls, server_name, Arc::clone(dial))?;
    Ok(RouteClient { pool: pooled(connector.clone(), Protocol::Negotiated, max_idle), connector })
}

/// What a TLS failure says about the upstream, in words a user can act on, without secrets; `None` when `error`'s
/// chain holds no TLS error.
pub(super) fn describe_failure(error: &(dyn std::error::Error + 'static), tls: Option<&RouteTls>) -> Option<String> {
    let mut source = Some(error);
    while let Some(cause) = source {
        // An I/O error's `source` skips the error it wraps (hyper-rustls wraps tokio-rustls's, which wraps rustls's).
        let mut inner = cause;
        while let Some(wrapped) = inner.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            inner = wrapped;
        }
        if let Some(rustls) = inner.downcast_ref::<rustls::Error>() {
            return Some(describe(rustls, tls));
        }
        source = cause.source();
    }
    // h2 keeps only the text of an I/O error: an alert received after the handshake (a client certificate refused
    // under TLS 1.3) arrives as such.
    let chain = crate::error_chain::error_chain(error);
    let (_, alert) = chain.split_once("received fatal alert: ")?;
    let alert = alert.split(|c: char| !c.is_ascii_alphanumeric()).next().unwrap_or_default();
    let description = CLIENT_CERTIFICATE_ALERTS.iter().find(|a| format!("{a:?}") == alert)?;
    Some(describe(&rustls::Error::AlertReceived(*description), tls))
}

/// The alerts with which an upstream refuses (or asks for) a client certificate.
const CLIENT_CERTIFICATE_ALERTS: [AlertDescription; 8] = [
    AlertDescription::CertificateRequired,
    AlertDescription::BadCertificate,
    AlertDescription::UnknownCA,
    AlertDescription::CertificateUnknown,
    AlertDescription::CertificateExpired,
    AlertDescription::CertificateRevoked,
    AlertDescription::UnsupportedCertificate,
    AlertDescription::AccessDenied,
];

fn describe(error: &rustls::Error, tls: Option<&RouteTls>) -> String {
    let trust = match tls.and_then(|tls| tls.settings.ca_file.as_deref()) {
        Some(ca_file) => format!("the route's ca_file {}", ca_file.display()),
        None => "the built-in web roots; a private CA needs routes[].ca_file".to_owned(),
    };
    let what = match error {
        rustls::Error::InvalidCertificate(certificate) => match certificate {
            CertificateError::UnknownIssuer => {
                format!("the upstream's certificate is not signed by a trusted CA (trusted: {trust})")
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                let source = match tls.and_then(|tls| tls.settings.server_name.as_deref()) {
                    Some(_) => "the route's server_name",
                    None => "the upstream URL's host; routes[].server_name sets another",
                };
                match certificate {
                    CertificateError::NotValidForNameContext { expected, presented } => {
                        // rustls writes the names as `DnsName("a")` / `IpAddress(..)`: keep what is quoted.
                        let names: Vec<&str> =
                            presented.iter().map(|name| name.split('"').nth(1).unwrap_or(name)).collect();
                        format!(
                            "name mismatch: the upstream's certificate is not valid for {} ({source}); it names {}",
                            expected.to_str(),
                            names.join(", ")
                        )
                    }
                    _ => format!(
                        "name mismatch: the upstream's certificate is not valid for the name verified ({source})"
                    ),
                }
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the upstream's certificate has expired".to_owned()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the upstream's certificate is not valid yet (check the clocks)".to_owned()
            }
            CertificateError::Revoked => "the upstream's certificate is revoked".to_owned(),
            other => format!("the upstream's certificate was refused: {other}"),
        },
        rustls::Error::AlertReceived(alert) if CLIENT_CERTIFICATE_ALERTS.contains(alert) => {
            if tls.is_some_and(RouteTls::has_client_cert) {
                format!("the upstream refused the route's client certificate (alert {alert:?})")
            } else {
                format!(
                    "the upstream requires a client certificate (alert {alert:?}); set routes[].client_cert_file and client_key_file"
                )
            }
        }
        rustls::Error::PeerIncompatible(_) | rustls::Error::NoApplicationProtocol => {
            format!("no TLS version, cipher or protocol in common with the upstream ({error})")
        }
        other => format!("{other}"),
    };
    format!("TLS with the upstream failed: {what}")
}
