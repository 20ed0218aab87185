//! Turns the merged tree into a typed [`Config`], section by section, applying the SPEC defaults for absent keys;
//! providers and routes have files of their own.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use figment::value::{Tag, Value};
use figment::{Figment, Profile, Provider};
use url::Url;

use super::reader::{self, KeyPath, Leaf, Reader, Table};
use super::values::{server_url, value_or};
use super::{providers, routes};
use super::{
    AdminConfig, Config, ConfigError, LogConfig, LogFormat, Problem, RedisServer, ServerConfig, ServerTls,
    SharedStoreConfig, StateConfig, TelemetryConfig, VendingConfig, VendingListen,
};

/// Values of `log.format`.
const LOG_FORMATS: &[(&str, LogFormat)] = &[("pretty", LogFormat::Pretty), ("json", LogFormat::Json)];

/// Reads and checks the whole configuration; every problem found is returned at once. `offline`: secrets and files
/// that cannot be had here are warnings (in [`Config::unavailable`]), not problems.
pub(super) fn config(figment: &Figment, root_source: &str, offline: bool) -> Result<Config, ConfigError> {
    let mut data = figment.data().map_err(|e| {
        ConfigError::Invalid(vec![Problem {
            key: String::new(),
            message: format!("cannot merge the configuration layers: {}", e.kind),
            source: root_source.to_owned(),
        }])
    })?;
    let root_dict = data.remove(&Profile::Default).unwrap_or_default();
    let mut r = Reader::new(figment, root_source);
    if offline {
        r = r.offline();
    }
    let mut root = Table::new(KeyPath::default(), Tag::Default, &root_dict);

    let (server, server_listen) = server(&mut r, &mut root);
    let (admin, admin_listen) = admin(&mut r, &mut root);
    if server.listen == admin.listen && server.listen.port() != 0 {
        // Report at whichever of the two the user set (one of them must differ from its default).
        if let Some(leaf) = admin_listen.as_ref().or(server_listen.as_ref()) {
            r.report_leaf(leaf, "the admin listener needs an address of its own; it equals server.listen");
        }
    }
    let log = log(&mut r, &mut root);
    let state = state(&mut r, &mut root);
    let vending = vending(&mut r, &mut root, &[server.listen, admin.listen]);
    let telemetry = telemetry(&mut r, &mut root);
    let (mut providers, provider_names) = providers::providers(&mut r, &mut root);
    let mut routes =
        routes::routes(&mut r, &mut root, &routes::Providers { names: &provider_names, valid: &providers });
    routes::derive_profiles(&mut providers, &mut routes);
    r.finish(root);

    let unavailable = r.take_unavailable();
    let problems = r.into_problems();
    if !problems.is_empty() {
        return Err(ConfigError::Invalid(problems));
    }
    Ok(Config { server, admin, log, state, vending, telemetry, providers, routes, unavailable })
}

/// `[server]`.
fn server(r: &mut Reader<'_>, root: &mut Table<'_>) -> (ServerConfig, Option<Leaf<SocketAddr>>) {
    let d = ServerConfig::default();
    let mut t = r.table(root, "server");
    let listen = r.get(&mut t, "listen", reader::socket_addr);
    let tls = server_tls(r, &mut t);
    let server = ServerConfig {
        listen: listen.as_ref().map_or(d.listen, |leaf| leaf.value),
        tls,
        request_timeout: value_or(r.get(&mut t, "request_timeout", reader::positive_duration), d.request_timeout),
        header_read_timeout: value_or(
            r.get(&mut t, "header_read_timeout", reader::positive_duration),
            d.header_read_timeout,
        ),
        keepalive_timeout: value_or(r.get(&mut t, "keepalive_timeout", reader::positive_duration), d.keepalive_timeout),
        tunnel_idle_timeout: value_or(
            r.get(&mut t, "tunnel_idle_timeout", reader::positive_duration),
            d.tunnel_idle_timeout,
        ),
        max_connections: value_or(r.get(&mut t, "max_connections", reader::positive_count), d.max_connections),
        replay_buffer: value_or(r.get(&mut t, "replay_buffer", reader::size), d.replay_buffer),
        shutdown_grace: value_or(r.get(&mut t, "shutdown_grace", reader::duration), d.shutdown_grace),
        worker_threads: r.get(&mut t, "worker_threads", reader::positive_count).map(|leaf| leaf.value),
        max_idle_upstream_connections: value_or(
            r.get(&mut t, "max_idle_upstream_connections", reader::count),
            d.max_idle_upstream_connections,
        ),
        h1_transport: d.h1_transport,
        allow_remote_intercept: value_or(
            r.get(&mut t, "allow_remote_intercept", reader::boolean),
            d.allow_remote_intercept,
        ),
        h1_transport_old_key: false,
        allowed_hosts: r.get(&mut t, "allowed_hosts", host_names).map(|leaf| leaf.value),
    };
    // `direct_http1` is the old name of `h1_transport`, still read.
    let mut server = server;
    let old = r.get(&mut t, "direct_http1", reader::boolean);
    match (r.get(&mut t, "h1_transport", reader::boolean), old) {
        (Some(_), Some(old)) => {
            r.report_leaf(&old, "the old name of h1_transport, which is also set: keep h1_transport only".to_owned())
        }
        (Some(new), None) => server.h1_transport = new.value,
        (None, Some(old)) => (server.h1_transport, server.h1_transport_old_key) = (old.value, true),
        (None, None) => {}
    }
    r.finish(t);
    (server, listen)
}

/// `[server.tls]`: absent means plain HTTP.
fn server_tls(r: &mut Reader<'_>, server: &mut Table<'_>) -> Option<ServerTls> {
    let mut t = r.table(server, "tls");
    if !t.is_present() {
        return None;
    }
    let cert_file = r.require_file(&mut t, "cert_file", "missing; a TLS listener needs its PEM certificate chain");
    let key_file = r.require_file(&mut t, "key_file", "missing; a TLS listener needs its PEM private key");
    r.finish(t);
    Some(ServerTls { cert_file: cert_file?.value, key_file: key_file?.value })
}

/// `[admin]`.
fn admin(r: &mut Reader<'_>, root: &mut Table<'_>) -> (AdminConfig, Option<Leaf<SocketAddr>>) {
    let d = AdminConfig::default();
    let mut t = r.table(root, "admin");
    let listen = r.get(&mut t, "listen", reader::socket_addr);
    let allowed_hosts = r.get(&mut t, "allowed_hosts", host_names).map(|leaf| leaf.value);
    r.finish(t);
    let admin = AdminConfig { listen: listen.as_ref().map_or(d.listen, |leaf| leaf.value), allowed_hosts };
    (admin, listen)
}

/// `[vending]`.
fn vending(r: &mut Reader<'_>, root: &mut Table<'_>, taken: &[SocketAddr]) -> VendingConfig {
    let mut t = r.table(root, "vending");
    let listen = r.get(&mut t, "listen", |value| match reader::path(value) {
        Ok(path) if path.is_absolute() => Ok(VendingListen::Unix(path)),
        _ => reader::socket_addr(value)
            .map(VendingListen::Tcp)
            .map_err(|e| format!("{e}, or the absolute path of a unix socket (\"/run/tokenproxy/vending.sock\")")),
    });
    let allow_remote = value_or(r.get(&mut t, "allow_remote", reader::boolean), false);
    let allowed_hosts = r.get(&mut t, "allowed_hosts", host_names).map(|leaf| leaf.value);
    if let Some(Leaf { value: VendingListen::Tcp(addr), path, tag }) = &listen {
        let leaf = Leaf { value: *addr, path: path.clone(), tag: *tag };
        let leaf = &leaf;
        if !leaf.value.ip().is_loopback() && !allow_remote {
            r.report_leaf(
                leaf,
                "the vending listener hands out raw tokens: it listens on a loopback address (127.0.0.1, [::1]) unless \
                 allow_remote = true is set",
            );
        } else if leaf.value.port() != 0 && taken.contains(&leaf.value) {
            r.report_leaf(
                leaf,
                "the vending listener needs an address of its own; it equals server.listen or admin.listen",
            );
        }
    }
    r.finish(t);
    VendingConfig { listen: listen.map(|leaf| leaf.value), allow_remote, allowed_hosts }
}

/// `allowed_hosts`: a list of host names (`api.example.com`), wildcards for the names under one (`*.example.com`), or
/// `["*"]` for any.
fn host_names(value: &Value) -> Result<Vec<String>, String> {
    let Value::Array(_, items) = value else {
        return Err(format!(
            "expected a list of host names such as [\"dev.example.com\", \"*.corp.example\"], found {}",
            reader::kind(value)
        ));
    };
    let names = items.iter().map(reader::non_empty_string).collect::<Result<Vec<_>, _>>()?;
    for name in &names {
        let bare = name.strip_prefix("*.").unwrap_or(name);
        let valid = name == "*"
            || (!bare.is_empty()
                && bare.split('.').all(|label| {
                    !label.is_empty() && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                }));
        if !valid {
            return Err(format!(
                "`{name}` is not a host name: use names without scheme or port (\"dev.example.com\"), \
                 \"*.example.com\" for the names under one, or [\"*\"] alone to answer any Host"
            ));
        }
    }
    if names.len() > 1 && names.iter().any(|name| name == "*") {
        return Err("\"*\" answers any Host: it stands alone, [\"*\"]".into());
    }
    Ok(names)
}

/// `[log]`.
fn log(r: &mut Reader<'_>, root: &mut Table<'_>) -> LogConfig {
    let d = LogConfig::default();
    let mut t = r.table(root, "log");
    let log = LogConfig {
        format: value_or(r.get(&mut t, "format", reader::choice(LOG_FORMATS)), d.format),
        level: value_or(r.get(&mut t, "level", reader::non_empty_string), d.level),
        access: value_or(r.get(&mut t, "access", reader::boolean), d.access),
    };
    r.finish(t);
    log
}

/// `[telemetry]`.
fn telemetry(r: &mut Reader<'_>, root: &mut Table<'_>) -> TelemetryConfig {
    let d = TelemetryConfig::default();
    let mut t = r.table(root, "telemetry");
    let otlp_endpoint = r.get(&mut t, "otlp_endpoint", |value| {
        super::values::http_url(value, super::values::UrlUse::Upstream).map(|url| url.to_string())
    });
    let otlp_protocol = r.get(&mut t, "otlp_protocol", reader::choice(super::OTLP_PROTOCOLS));
    #[cfg(not(feature = "otlp-grpc"))]
    if let Some(leaf) = &otlp_protocol {
        if leaf.value == super::OtlpProtocol::Grpc {
            r.report_leaf(leaf, super::NO_GRPC);
        }
    }
    let sample_ratio = r.get(&mut t, "sample_ratio", |value| {
        let ratio = reader::number(value)?;
        if (0.0..=1.0).contains(&ratio) {
            Ok(ratio)
        } else {
            Err("a share of traces, from 0 to 1".to_owned())
        }
    });
    let service_name = r.get(&mut t, "service_name", reader::non_empty_string).map(|leaf| leaf.value);
    let mut resource_attributes = BTreeMap::new();
    let a = r.table(&mut t, "resource_attributes");
    for (key, value) in a.entries() {
        match reader::string(value) {
            Ok(text) => {
                resource_attributes.insert(key.clone(), text);
            }
            Err(e) => r.report(&a.path.key(key), value.tag(), e),
        }
    }
    let headers = super::providers::secret(r, &mut t, "headers").map(|leaf| leaf.value);
    let telemetry = TelemetryConfig {
        otlp_endpoint: otlp_endpoint.map(|leaf| leaf.value),
        otlp_protocol: otlp_protocol.map(|leaf| leaf.value),
        service_name,
        sample_ratio: value_or(sample_ratio, d.sample_ratio),
        resource_attributes,
        headers,
    };
    r.finish(t);
    telemetry
}

/// `[state]`.
fn state(r: &mut Reader<'_>, root: &mut Table<'_>) -> StateConfig {
    let d = StateConfig::default();
    let mut t = r.table(root, "state");
    let dir_leaf = r.get(&mut t, "dir", reader::path);
    let allow_shared_dir = value_or(r.get(&mut t, "allow_shared_dir", reader::boolean), false);
    // Refresh tokens are written there: a directory others can write lets them plant or replace files in it.
    if let Some(mode) = crate::private_file::writable_by_others(dir_leaf.as_ref().map_or(&d.dir, |leaf| &leaf.value)) {
        if !allow_shared_dir {
            let message = format!(
                "the directory is writable by group or others (mode {mode:04o}), who could plant or replace the files \
                 that hold refresh tokens: chmod 700 it, point dir at a subdirectory tokenproxy creates (mode 0700), \
                 or set allow_shared_dir = true"
            );
            match &dir_leaf {
                Some(leaf) => r.report_leaf(leaf, message),
                None => r.report(&t.path.key("dir"), t.tag, message),
            }
        }
    }
    let dir = value_or(dir_leaf, d.dir);
    let store = r.get(&mut t, "store", reader::choice(STORES));
    let shared = match store.map(|leaf| leaf.value) {
        Some(Store::Redis) => shared_store(r, &mut t),
        _ => {
            for key in SHARED_KEYS {
                if let Some(field) = t.field(key) {
                    r.report_field(&field, "only used with store = \"redis\"; remove it (or set store)");
                }
            }
            None
        }
    };
    r.finish(t);
    StateConfig { dir, shared, allow_shared_dir }
}

/// Values of `state.store`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    Embedded,
    Redis,
}

const STORES: &[(&str, Store)] = &[("embedded", Store::Embedded), ("redis", Store::Redis)];

/// The keys of the shared store.
const SHARED_KEYS: &[&str] = &[
    "redis_url",
    "redis_sentinels",
    "redis_sentinel_master",
    "redis_username",
    "redis_password",
    "redis_password_file",
    "redis_password_env",
    "key_prefix",
    "encryption_key_file",
    "redis_timeout",
];

/// `store = "redis"`: the shared store's settings (docs/fleet.md).
fn shared_store(r: &mut Reader<'_>, t: &mut Table<'_>) -> Option<SharedStoreConfig> {
    let before = r.problem_count();
    let server = redis_server(r, t);
    let redis_username = r.get(t, "redis_username", reader::non_empty_string);
    let redis_password = providers::secret(r, t, "redis_password");
    let key_prefix = r.get(t, "key_prefix", key_prefix);
    let timeout = r.get(t, "redis_timeout", reader::positive_duration);
    let key_file = r.require_file(
        t,
        "encryption_key_file",
        "missing; store = \"redis\" needs the keys that encrypt tokens at rest: a file of base64 32-byte keys, one \
         per line (make one with `head -c 32 /dev/urandom | base64`)",
    );
    let keys = key_file.as_ref().and_then(|leaf| match crate::keys::read_encryption_keys(&leaf.value) {
        Ok(keys) => Some(keys),
        Err(message) => {
            r.report_leaf(leaf, message);
            None
        }
    });
    if r.problem_count() > before {
        return None;
    }
    Some(SharedStoreConfig {
        server: server?,
        redis_username: redis_username.map(|leaf| leaf.value),
        redis_password: redis_password.map(|leaf| leaf.value),
        key_prefix: value_or(key_prefix, "tokenproxy".to_owned()),
        encryption_key_file: key_file?.value,
        encryption_keys: keys?,
        timeout: value_or(timeout, Duration::from_millis(250)),
    })
}

/// `redis_url`, or `redis_sentinels` with `redis_sentinel_master`: where Redis is.
fn redis_server(r: &mut Reader<'_>, t: &mut Table<'_>) -> Option<RedisServer> {
    if !t.has("redis_sentinels") && !t.has("redis_sentinel_master") {
        let missing = "missing; store = \"redis\" needs the server, e.g. redis_url = \"rediss://redis.internal:6380\" \
                       (or redis_sentinels and redis_sentinel_master for Redis Sentinel)";
        return r.require(t, "redis_url", missing, redis_url).map(|leaf| RedisServer::Url(leaf.value));
    }
    if t.has("redis_url") {
        let _ = (r.get(t, "redis_sentinels", |_| Ok(())), r.get(t, "redis_sentinel_master", |_| Ok(())));
        let url = r.get(t, "redis_url", |_| Ok(()))?;
        r.report_leaf(&url, "set either redis_url (one server) or redis_sentinels (Redis Sentinel), not both");
        return None;
    }
    let sentinels = r.require(
        t,
        "redis_sentinels",
        "missing; redis_sentinel_master needs the Sentinels that know it, e.g. redis_sentinels = \
         [\"redis://sentinel-0.redis:26379\", \"redis://sentinel-1.redis:26379\"]",
        sentinel_urls,
    );
    let master = r.require(
        t,
        "redis_sentinel_master",
        "missing; redis_sentinels needs the name they monitor the master by, e.g. redis_sentinel_master = \"mymaster\"",
        reader::non_empty_string,
    );
    Some(RedisServer::Sentinel { sentinels: sentinels?.value, master: master?.value })
}

/// `redis_sentinels`: a non-empty list of `redis://` or `rediss://` URLs, all of one scheme.
fn sentinel_urls(value: &Value) -> Result<Vec<Url>, String> {
    let Value::Array(_, items) = value else {
        return Err(format!(
            "expected a list of Sentinel URLs such as [\"redis://sentinel-0.redis:26379\"], found {}",
            reader::kind(value)
        ));
    };
    let urls = items.iter().map(redis_url).collect::<Result<Vec<_>, _>>()?;
    match urls.first() {
        None => Err("an empty list: name at least one Sentinel".into()),
        Some(first) if urls.iter().any(|url| url.scheme() != first.scheme()) => {
            Err("mixes redis:// and rediss://: the Sentinels and the master are all reached with TLS or all without"
                .into())
        }
        Some(_) => Ok(urls),
    }
}

/// `redis_url`: `redis://` or `rediss://`, with a host, without credentials (they go in `redis_username` and
/// `redis_password*`, so that the URL can be printed).
fn redis_url(value: &Value) -> Result<Url, String> {
    server_url(
        value,
        (["redis", "rediss"], "a redis:// or rediss:// URL"),
        "set redis_username and redis_password_file (or _env)",
    )
}

/// `key_prefix`: letters, digits, `_`, `-`, `.` and `:`.
fn key_prefix(value: &Value) -> Result<String, String> {
    let prefix = reader::non_empty_string(value)?;
    if prefix.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':')) {
        Ok(prefix)
    } else {
        Err("use letters, digits, `_`, `-`, `.` and `:` only".into())
    }
}
