//! Settings that are valid but risky: `tokenproxy check` prints them (exit 0) and `run` logs them at startup.

use url::{Host, Url};

use super::{Config, RedisServer};

impl Config {
    /// Valid settings a demanding operator would want to be told about, each naming its key: an admin listener on
    /// a non-loopback address (it has no authentication), and tokens or secrets sent over plain HTTP to a host that
    /// is not a loopback address.
    ///
    /// Offline (`check --offline`), the secrets and files that could not be had come first.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = self.unavailable.clone();
        if self.server.h1_transport_old_key {
            warnings.push(
                "server.direct_http1: deprecated, the key is now server.h1_transport (same values); the old name still \
                 works"
                    .to_owned(),
            );
        }
        if !self.admin.listen.ip().is_loopback() {
            warnings.push(format!(
                "admin.listen: {} is not a loopback address, and the admin API has no authentication (it forces token \
                 refreshes and reloads the config); keep it on 127.0.0.1, or let only the kubelet and Prometheus reach it{}",
                self.admin.listen,
                if self.admin.allowed_hosts.is_none() {
                    " (and set admin.allowed_hosts to have the Host of its requests checked)"
                } else {
                    ""
                }
            ));
        }
        // A loopback listener answers only a Host that names it (DNS rebinding); another address checks only with
        // allowed_hosts, so that a gateway reached by its Service name keeps working.
        let vending = match self.vending.listen {
            Some(super::VendingListen::Tcp(addr)) => Some(addr),
            _ => None,
        };
        for (key, listen, allowed) in [
            ("server", Some(self.server.listen), &self.server.allowed_hosts),
            ("vending", vending, &self.vending.allowed_hosts),
        ] {
            if let Some(listen) = listen.filter(|listen| !listen.ip().is_loopback() && allowed.is_none()) {
                warnings.push(format!(
                    "{key}.listen: on {listen}, not a loopback address, the Host of requests is not checked: set \
                     {key}.allowed_hosts to the names callers use (IP addresses and localhost always pass) to refuse \
                     others with 421"
                ));
            }
        }
        for (name, provider) in &self.providers {
            for (key, url) in [("token_url", &provider.token_url), ("issuer", &provider.issuer)] {
                if let Some(url) = url.as_ref().filter(|url| plain_http_off_machine(url)) {
                    warnings.push(format!(
                        "providers.{name}.{key}: the client's credentials and its tokens go over plain HTTP to {}, \
                         which is not a loopback address; use https",
                        url.host_str().unwrap_or("?")
                    ));
                }
            }
        }
        for (name, provider) in &self.providers {
            if let Some(path) = &provider.private_key_file {
                if let Some(mode) = world_readable(path) {
                    warnings.push(format!(
                        "providers.{name}.private_key_file: {} is readable by every user of this machine (mode \
                         {mode:04o}); make it readable by tokenproxy alone (chmod 600; Kubernetes mounts Secrets 0440 \
                         or as set by defaultMode)",
                        path.display()
                    ));
                }
            }
        }
        // Token files are written so that nothing planted beside them is followed (src/private_file.rs), but a
        // directory others can write still lets them delete or replace what is there.
        for (name, provider) in &self.providers {
            let Some(dir) = provider.sink_file.as_deref().and_then(std::path::Path::parent) else { continue };
            let dir = if dir.as_os_str().is_empty() { std::path::Path::new(".") } else { dir };
            if let Some(mode) = crate::private_file::writable_by_others(dir) {
                warnings.push(format!(
                    "providers.{name}.sink_file: its directory {} is writable by group or others (mode {mode:04o}), who \
                     can delete or replace the token file; use a directory only tokenproxy and its readers can write",
                    dir.display()
                ));
            }
        }
        if self.state.allow_shared_dir {
            if let Some(mode) = crate::private_file::writable_by_others(&self.state.dir) {
                warnings.push(format!(
                    "state.dir: {} is writable by group or others (mode {mode:04o}; allowed by allow_shared_dir), who \
                     can delete or replace the files that hold refresh tokens",
                    self.state.dir.display()
                ));
            }
        }
        if let Some(shared) = &self.state.shared {
            if let Some(mode) = world_readable(&shared.encryption_key_file) {
                warnings.push(format!(
                    "state.encryption_key_file: {} is readable by every user of this machine (mode {mode:04o}); make \
                     it readable by tokenproxy alone (chmod 600)",
                    shared.encryption_key_file.display()
                ));
            }
            let key = match shared.server {
                RedisServer::Url(_) => "state.redis_url",
                RedisServer::Sentinel { .. } => "state.redis_sentinels",
            };
            if let Some(url) = shared.server.urls().iter().find(|url| url.scheme() == "redis" && off_machine(url)) {
                warnings.push(format!(
                    "{key}: Redis at {} is reached without TLS; tokens are encrypted in it, but its password \
                     and the traffic are not: use rediss://",
                    url.host_str().unwrap_or("?")
                ));
            }
        }
        for (i, route) in self.routes.iter().enumerate() {
            if let Some(provider) = route.provider.as_ref().filter(|_| plain_http_off_machine(&route.upstream)) {
                warnings.push(format!(
                    "routes[{i}].upstream: tokens of provider `{provider}` go over plain HTTP to {}, which is not a \
                     loopback address; use https",
                    route.upstream.host_str().unwrap_or("?")
                ));
            }
        }
        warnings
    }
}

/// An `http://` URL to a host that is not this machine.
fn plain_http_off_machine(url: &Url) -> bool {
    url.scheme() == "http" && off_machine(url)
}

/// Whether the URL's host is not this machine.
fn off_machine(url: &Url) -> bool {
    match url.host() {
        Some(Host::Ipv4(ip)) => !ip.is_loopback(),
        Some(Host::Ipv6(ip)) => !ip.is_loopback(),
        Some(Host::Domain(domain)) => !domain.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// The file's permission bits when others may read it (the world bit).
fn world_readable(path: &std::path::Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o7777;
    (mode & 0o004 != 0).then_some(mode)
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    #[test]
    fn risky_settings_are_named_and_safe_ones_are_not() {
        let toml = r#"
[admin]
listen = "0.0.0.0:9090"
[providers.remote]
token_url = "http://idp.example/token"
client_id = "c"
client_secret = "s"
[providers.local]
token_url = "http://127.0.0.1:8081/token"
client_id = "c"
client_secret = "s"
[[routes]]
prefix = "/a"
upstream = "http://orders.internal"
provider = "remote"
[[routes]]
prefix = "/b"
upstream = "http://localhost:3000"
provider = "local"
[[routes]]
prefix = "/c"
upstream = "http://plain.internal"
[[routes]]
prefix = "/d"
upstream = "https://secure.internal"
provider = "remote"
"#;
        let warnings = Config::from_toml_str(toml, "t.toml").expect("valid").warnings();
        let keys: Vec<&str> = warnings.iter().map(|w| w.split(':').next().unwrap()).collect();
        assert_eq!(keys, ["admin.listen", "providers.remote.token_url", "routes[0].upstream"], "{warnings:#?}");
        let quiet = "[providers.p]\ntoken_url = \"https://idp/t\"\nclient_id = \"c\"\nclient_secret = \"s\"\n\
                     [[routes]]\nupstream = \"http://127.0.0.1:3000\"\nprovider = \"p\"\n";
        assert!(Config::from_toml_str(quiet, "t.toml").expect("valid").warnings().is_empty());
    }
}
