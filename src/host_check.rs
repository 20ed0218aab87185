//! Which `Host` a listener answers: the defence against DNS rebinding.
//!
//! A web page the developer visits can rebind its own name to 127.0.0.1 and then talk to a loopback listener as
//! same-origin, reading what it answers: the vending listener's tokens, the admin listener's refreshes and reloads,
//! every API the proxy reaches with its token. Such a request names the page's host (`Host: evil.example:8080`); a
//! request from a local program names the listener (`localhost`, `127.0.0.1`) or a host a route names. So a listener
//! on a loopback address answers only a `Host` that is an IP literal (rebinding needs a DNS name), `localhost` or a
//! `*.localhost` name, a host its routes name, or a name of its `allowed_hosts`; anything else gets 421
//! `misdirected_request` before anything is read or forwarded (docs/configuration.md, "Which hosts a listener
//! answers"). A listener on another address (a pod IP, `0.0.0.0`) checks only when `allowed_hosts` is set: a gateway
//! reached by its Service name keeps working. `allowed_hosts = ["*"]` turns the check off.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use http::{HeaderMap, Uri, Version};

/// The names one listener answers, or nothing to check.
#[derive(Debug, Clone, Default)]
pub struct HostCheck {
    /// `None`: every `Host` passes.
    names: Option<Names>,
}

/// The names a checking listener answers besides IP literals and `localhost`, lowercased.
#[derive(Debug, Clone, Default)]
struct Names {
    /// The `Host` values local callers send most (`127.0.0.1:8080`, `localhost:8080`), compared whole first.
    usual: Vec<Box<str>>,
    /// Exact names.
    exact: Vec<Box<str>>,
    /// `*.example.com` as `.example.com`: any name under it.
    suffixes: Vec<Box<str>>,
}

impl HostCheck {
    /// A check that lets every `Host` pass.
    pub fn off() -> HostCheck {
        HostCheck { names: None }
    }

    /// The check of a listener on `listen`: `allowed` is its `allowed_hosts` when set (`["*"]`: no check), `named`
    /// the hosts its routes name. On a loopback address it checks; elsewhere only when `allowed` is set.
    pub fn new<'a>(
        listen: SocketAddr,
        allowed: Option<&'a [String]>,
        named: impl IntoIterator<Item = &'a str>,
    ) -> HostCheck {
        let checks = match allowed {
            Some(list) => !list.iter().any(|name| name == "*"),
            None => is_loopback(listen.ip()),
        };
        if !checks {
            return HostCheck::off();
        }
        let mut names = Names::default();
        if listen.port() != 0 {
            names.usual = vec![listen.to_string().into(), format!("localhost:{}", listen.port()).into()];
        }
        for name in allowed.unwrap_or_default().iter().map(String::as_str).chain(named) {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            match name.strip_prefix('*') {
                Some(suffix) if suffix.starts_with('.') => names.suffixes.push(suffix.into()),
                _ => names.exact.push(name.into()),
            }
        }
        HostCheck { names: Some(names) }
    }

    /// Whether this listener checks `Host` at all.
    pub fn is_on(&self) -> bool {
        self.names.is_some()
    }

    /// Whether a request naming `host` (a `Host` value or an h2 `:authority`, with or without its port) may be
    /// answered. A request without one passes (a browser always sends one).
    #[inline]
    pub fn admits(&self, host: Option<&str>) -> bool {
        match (&self.names, host) {
            (None, _) | (_, None) => true,
            (Some(names), Some(host)) => names.admit(host),
        }
    }
}

impl Names {
    #[inline]
    fn admit(&self, host: &str) -> bool {
        self.usual.iter().any(|usual| usual.as_bytes() == host.as_bytes()) || self.admit_any(host)
    }

    fn admit_any(&self, host: &str) -> bool {
        if let Some(literal) = host.strip_prefix('[') {
            // An IPv6 literal, `[::1]:8080`.
            return literal.split(']').next().is_some_and(|ip| ip.parse::<Ipv6Addr>().is_ok());
        }
        let name = match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        };
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.bytes().next().is_some_and(|b| b.is_ascii_digit()) && name.parse::<Ipv4Addr>().is_ok() {
            return true;
        }
        if name.eq_ignore_ascii_case("localhost") || ends_with_ignore_case(name, ".localhost") {
            return true;
        }
        self.exact.iter().any(|allowed| allowed.eq_ignore_ascii_case(name))
            || self.suffixes.iter().any(|suffix| ends_with_ignore_case(name, suffix) && name.len() > suffix.len())
    }
}

/// Whether `ip` is a loopback address (127.0.0.0/8, ::1, or 127.0.0.0/8 mapped into IPv6).
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// The host a request names in origin form: its `:authority` on h2, else its `Host` header (`None` without one, or
/// when it is not text).
pub fn requested_host<'a>(version: Version, uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    match version {
        Version::HTTP_2 | Version::HTTP_3 => uri.authority().map(|authority| authority.as_str()),
        _ => headers.get(http::header::HOST).and_then(|host| host.to_str().ok()),
    }
}

fn ends_with_ignore_case(name: &str, suffix: &str) -> bool {
    name.len() >= suffix.len() && name.as_bytes()[name.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback(allowed: Option<&[&str]>, named: &[&str]) -> HostCheck {
        let allowed: Option<Vec<String>> = allowed.map(|list| list.iter().map(|s| s.to_string()).collect());
        HostCheck::new(SocketAddr::from(([127, 0, 0, 1], 8080)), allowed.as_deref(), named.iter().copied())
    }

    #[test]
    fn a_loopback_listener_answers_its_own_names_and_refuses_others() {
        let check = loopback(None, &["api.example.com"]);
        for host in [
            "127.0.0.1",
            "127.0.0.1:8080",
            "10.1.2.3:80",
            "[::1]:8080",
            "[::1]",
            "localhost",
            "LOCALHOST:9090",
            "localhost.",
            "app.localhost:3000",
            "api.example.com",
            "API.Example.com:443",
        ] {
            assert!(check.admits(Some(host)), "{host}");
        }
        assert!(check.admits(None), "no Host");
        for host in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "evillocalhost",
            "127.0.0.1.evil.example",
            "1.2.3",
            "[not-an-ip]:80",
            "example.com",
            "",
        ] {
            assert!(!check.admits(Some(host)), "{host}");
        }
    }

    #[test]
    fn allowed_hosts_add_names_and_wildcards_and_a_star_turns_the_check_off() {
        let check = loopback(Some(&["dev.internal", "*.corp.example"]), &[]);
        assert!(check.admits(Some("dev.internal:8080")));
        assert!(check.admits(Some("a.corp.example")));
        assert!(check.admits(Some("a.b.Corp.Example")));
        assert!(!check.admits(Some("corp.example")), "the wildcard is for names under it");
        assert!(!check.admits(Some("xcorp.example")));
        assert!(!check.admits(Some("evil.example")));
        let off = loopback(Some(&["*"]), &[]);
        assert!(!off.is_on());
        assert!(off.admits(Some("evil.example")));
    }

    #[test]
    fn other_addresses_check_only_when_allowed_hosts_is_set() {
        for ip in [IpAddr::from([0, 0, 0, 0]), IpAddr::from([10, 0, 0, 7]), "::".parse().unwrap()] {
            let listen = SocketAddr::new(ip, 8080);
            assert!(!HostCheck::new(listen, None, ["a.example"]).is_on(), "{listen}");
            let named = HostCheck::new(listen, Some(&["gateway.svc".to_owned()]), []);
            assert!(named.admits(Some("gateway.svc:8080")));
            assert!(!named.admits(Some("evil.example")));
            assert!(named.admits(Some("10.0.0.7:8080")), "probes by pod IP keep working");
        }
        assert!(HostCheck::new("[::1]:1".parse().unwrap(), None, []).is_on());
        assert!(HostCheck::new("[::ffff:127.0.0.1]:1".parse().unwrap(), None, []).is_on());
        assert!(HostCheck::new(SocketAddr::from(([127, 0, 0, 53], 1)), None, []).is_on());
    }
}
