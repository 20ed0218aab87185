//! The rules of values that several sections share: names, URLs, and a leaf's value or its default.

use figment::value::Value;
use url::Url;

use super::reader::{self, Leaf};

/// What names of providers and routes may contain.
pub(super) const NAME_RULE: &str = "names may only contain letters, digits, `_`, `.` and `-`";

/// Provider and route names: `[A-Za-z0-9_.-]+`.
pub(super) fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// The value of a leaf, or `default` when it is absent or invalid (invalid ones are already reported).
pub(super) fn value_or<T>(leaf: Option<Leaf<T>>, default: T) -> T {
    leaf.map_or(default, |leaf| leaf.value)
}

/// What a URL is for: the rules differ a little.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum UrlUse {
    /// An IdP's token endpoint.
    TokenEndpoint,
    /// A route's upstream.
    Upstream,
}

/// An absolute http(s) URL with a host, without credentials or fragment (and for upstreams, without a query).
pub(super) fn http_url(value: &Value, purpose: UrlUse) -> Result<Url, String> {
    let url = server_url(value, (["http", "https"], "an http:// or https:// URL"), "secrets have keys of their own")?;
    if url.fragment().is_some() {
        return Err("must not have a #fragment".to_owned());
    }
    if purpose == UrlUse::Upstream && url.query().is_some() {
        return Err("must not have a ?query; each request's own query is forwarded".to_owned());
    }
    Ok(url)
}

/// An absolute URL of one of `schemes` (which `expected` names), with a host and without credentials (`instead`: where
/// they go). The URL is not echoed: it may carry credentials.
pub(super) fn server_url(value: &Value, kinds: ([&str; 2], &str), instead: &str) -> Result<Url, String> {
    server_url_text(&reader::string(value)?, kinds, instead)
}

/// [`server_url`] for a URL given as text (an environment variable's, say).
pub fn server_url_text(text: &str, (schemes, expected): ([&str; 2], &str), instead: &str) -> Result<Url, String> {
    let url = Url::parse(text.trim()).map_err(|e| e.to_string())?;
    if !schemes.contains(&url.scheme()) {
        return Err(format!("must be {expected} (found scheme `{}`)", url.scheme()));
    }
    if url.host().is_none() {
        return Err("must name a host".to_owned());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("must not contain credentials (user:password@); {instead}"));
    }
    Ok(url)
}
