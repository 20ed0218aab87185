//! Header rewriting: hop-by-hop stripping (both ways), forwarding headers, and token injection.

use std::net::IpAddr;

use http::header::{Entry, CONNECTION, TE, TRANSFER_ENCODING, VIA};

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Version};

/// Hop-by-hop headers of RFC 9110 §7.6.1, plus the non-standard ones proxies have always stripped.
const HOP_BY_HOP: &[&str] = &["keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "upgrade"];

/// Whether a header of this name is hop-by-hop in itself (names listed in `Connection` aside). `TE` and
/// `Transfer-Encoding` are left to the caller: they are framing, which only the caller knows how it rewrites.
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"connection") || HOP_BY_HOP.iter().any(|hop| name.eq_ignore_ascii_case(hop.as_bytes()))
}

/// Whether `Connection` header values list `name` (an option such as `close`, or a header to strip).
pub fn connection_lists<'a>(mut values: impl Iterator<Item = &'a [u8]>, name: &[u8]) -> bool {
    values.any(|value| value.split(|&b| b == b',').any(|option| option.trim_ascii().eq_ignore_ascii_case(name)))
}

/// Headers that `Connection` can never remove: the message's framing and its `Host`. A proxy that let a caller strip
/// `Content-Length` this way would forward a body without a length, which the next hop reads as another request.
pub fn never_connection_listed(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"content-length")
        || name.eq_ignore_ascii_case(b"transfer-encoding")
        || name.eq_ignore_ascii_case(b"host")
}

/// The one rule for which headers go on to the next hop, requests and responses alike (RFC 9110 §7.6.1): not a
/// hop-by-hop header, not `Transfer-Encoding` (framing, which the transport writes from the message it forwards), not
/// a header named in `Connection` (`listed_in_connection`, but see [`never_connection_listed`]), and `TE` only as
/// `trailers` (gRPC needs it).
pub fn forwarded(name: &[u8], value: &[u8], listed_in_connection: bool) -> bool {
    !(is_hop_by_hop(name)
        || name.eq_ignore_ascii_case(b"transfer-encoding")
        || (name.eq_ignore_ascii_case(b"te") && !only_trailers(value))
        || (listed_in_connection && !never_connection_listed(name)))
}

/// Removes from `headers` what [`forwarded`] does not forward.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names (no hashing) settles that.
    let any =
        headers.keys().any(|name| name == TE || name == TRANSFER_ENCODING || is_hop_by_hop(name.as_str().as_bytes()));
    if !any {
        return;
    }
    let listed: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    let dropped: Vec<HeaderName> = headers
        .iter()
        .filter(|(name, value)| !forwarded(name.as_str().as_bytes(), value.as_bytes(), listed.contains(name)))
        .map(|(name, _)| name.clone())
        .collect();
    for name in dropped {
        headers.remove(name);
    }
}

/// The `Content-Length` a response gets from tokenproxy, ours and never copied (RFC 9110 §8.6): none for a 204; for
/// a HEAD request or a 304, the length the upstream `stated` (of the representation a GET would have had); else the
/// length of the `body` as it will be sent, when it is known before it is sent (`None`: chunked, or until close).
/// The one rule for both transports.
#[inline]
pub fn response_length(status: StatusCode, head_request: bool, stated: Option<u64>, body: Option<u64>) -> Option<u64> {
    if status == StatusCode::NO_CONTENT {
        None
    } else if head_request || status == StatusCode::NOT_MODIFIED {
        stated
    } else {
        body
    }
}

/// What a `WWW-Authenticate` value says of the token sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Challenge {
    /// The token was refused as invalid (RFC 6750 §3.1 `Bearer error="invalid_token"`, or the same in a `DPoP`
    /// challenge, RFC 9449 §7.1).
    pub invalid_token: bool,
    /// The DPoP proof lacked the server's nonce (RFC 9449 §9: `DPoP error="use_dpop_nonce"`).
    pub use_dpop_nonce: bool,
    /// The value has a Bearer or DPoP challenge at all.
    pub scheme: bool,
}

/// Reads the `error` parameters of a `WWW-Authenticate` value's Bearer and DPoP challenges, whatever the status it
/// came with. A value may hold several challenges (`Basic realm="x", Bearer error="invalid_token"`): a parameter
/// counts when a Bearer or DPoP challenge precedes it (`use_dpop_nonce` only after a DPoP one).
pub fn challenge(value: &[u8]) -> Challenge {
    let mut found = Challenge::default();
    let value = value.to_ascii_lowercase();
    let dpop = find_word(&value, b"dpop");
    let Some(first) = [find_word(&value, b"bearer"), dpop].into_iter().flatten().min() else { return found };
    found.scheme = true;
    let mut offset = first;
    while let Some(at) = find(&value[offset..], b"error").map(|at| at + offset) {
        offset = at + b"error".len();
        let before = at.checked_sub(1).map(|i| value[i]);
        if before.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            continue;
        }
        let Some(after) = value[offset..].trim_ascii_start().strip_prefix(b"=") else { continue };
        let after = after.trim_ascii_start();
        let after = after.strip_prefix(b"\"").unwrap_or(after);
        let code_is = |code: &[u8]| {
            after
                .strip_prefix(code)
                .is_some_and(|end| end.first().is_none_or(|b| matches!(b, b'"' | b',' | b' ' | b'\t')))
        };
        found.invalid_token |= code_is(b"invalid_token");
        found.use_dpop_nonce |= code_is(b"use_dpop_nonce") && dpop.is_some_and(|dpop| dpop < at);
    }
    found
}

/// The position of `word` in `haystack` as a whole word (an auth scheme): at the start or after a space or comma,
/// and followed by a space or the end.
fn find_word(haystack: &[u8], word: &[u8]) -> Option<usize> {
    let mut offset = 0;
    while let Some(at) = find(&haystack[offset..], word).map(|at| at + offset) {
        let starts = at == 0 || matches!(haystack[at - 1], b' ' | b',' | b'\t');
        let ends = haystack.get(at + word.len()).is_none_or(|b| matches!(b, b' ' | b'\t'));
        if starts && ends {
            return Some(at);
        }
        offset = at + 1;
    }
    None
}

/// The position of `needle` in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// W3C Trace Context's header.
pub static TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

/// The trace id of a W3C `traceparent` value (`VERSION-TRACEID-PARENTID-FLAGS`, Trace Context §3.2): 32 lowercase hex
/// digits, not all zero, in a header whose version is not `ff` and whose parts have their lengths (a later version
/// may append fields after a `-`). `None` for anything else.
pub fn trace_id(value: &HeaderValue) -> Option<String> {
    let v = value.as_bytes();
    if v.len() < 55 {
        return None;
    }
    let hex = |part: &[u8]| part.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let well_formed = (v.len() == 55 || (v[0..2] != *b"00" && v[55] == b'-'))
        && hex(&v[0..2])
        && v[0..2] != *b"ff"
        && v[2] == b'-'
        && hex(&v[3..35])
        && v[35] == b'-'
        && hex(&v[36..52])
        && v[52] == b'-'
        && hex(&v[53..55]);
    let trace = &v[3..35];
    (well_formed && trace.iter().any(|&b| b != b'0') && v[36..52].iter().any(|&b| b != b'0'))
        .then(|| String::from_utf8_lossy(trace).into_owned())
}

/// Whether a `TE` value asks for trailers only (the one `TE` that passes a proxy: gRPC needs it).
pub fn only_trailers(te: &[u8]) -> bool {
    te.split(|&b| b == b',').all(|p| p.trim_ascii().eq_ignore_ascii_case(b"trailers"))
}

/// The `Via` element this proxy adds, by the protocol version it received.
pub fn via_element(version: Version) -> &'static str {
    match version {
        Version::HTTP_2 => "2 tokenproxy",
        Version::HTTP_10 => "1.0 tokenproxy",
        _ => "1.1 tokenproxy",
    }
}

/// Appends `element` to `Via`.
pub fn append_via(headers: &mut HeaderMap, version: Version) {
    let element = via_element(version);
    // One lookup (an entry) whether or not the request has a `Via` already.
    match headers.entry(VIA) {
        Entry::Occupied(mut via) => {
            let existing = via.get().as_bytes();
            let mut joined = Vec::with_capacity(existing.len() + 2 + element.len());
            joined.extend_from_slice(existing);
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(element.as_bytes());
            if let Ok(value) = HeaderValue::from_bytes(&joined) {
                via.insert(value);
            }
        }
        Entry::Vacant(via) => {
            via.insert(HeaderValue::from_static(element));
        }
    }
}

/// The caller's address as a header value, made once per connection.
pub fn peer_value(peer: IpAddr) -> HeaderValue {
    HeaderValue::from_str(&peer.to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// `X-Forwarded-For` (appended), `X-Forwarded-Proto` and `X-Forwarded-Host` (set) of a request from `peer`
/// (see [`peer_value`]).
pub fn add_forwarding(headers: &mut HeaderMap, peer: &HeaderValue, tls: bool, original_host: Option<HeaderValue>) {
    static XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
    static XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
    static XFH: HeaderName = HeaderName::from_static("x-forwarded-host");
    // One lookup (an entry) whether or not the request has an `X-Forwarded-For` already.
    match headers.entry(&XFF) {
        Entry::Occupied(mut xff) => {
            let appended = match xff.get().to_str() {
                Ok(existing) if !existing.trim().is_empty() => {
                    HeaderValue::from_str(&format!("{existing}, {}", peer.to_str().unwrap_or_default())).ok()
                }
                _ => None,
            };
            xff.insert(appended.unwrap_or_else(|| peer.clone()));
        }
        Entry::Vacant(xff) => {
            xff.insert(peer.clone());
        }
    }
    headers.insert(XFP.clone(), HeaderValue::from_static(if tls { "https" } else { "http" }));
    match original_host {
        Some(host) => {
            headers.insert(XFH.clone(), host);
        }
        None => {
            headers.remove(&XFH);
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn trace_ids_come_only_from_well_formed_traceparents() {
        let id = |v: &str| trace_id(&HeaderValue::from_str(v).unwrap());
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(id(good).as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(
            id("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later").as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        for bad in [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "",
            "tokenproxy",
        ] {
            assert_eq!(id(bad), None, "{bad}");
        }
    }
    use super::*;

    #[test]
    fn dpop_challenges_are_read_and_a_nonce_request_is_told_apart_from_a_refusal() {
        let nonce = challenge(
            br#"DPoP error="use_dpop_nonce", error_description="Resource server requires nonce in DPoP proof""#,
        );
        assert_eq!(nonce, Challenge { invalid_token: false, use_dpop_nonce: true, scheme: true });
        let refused = challenge(br#"DPoP algs="ES256 EdDSA", error="invalid_token""#);
        assert_eq!(refused, Challenge { invalid_token: true, use_dpop_nonce: false, scheme: true });
        let both = challenge(br#"Bearer realm="api", DPoP error=use_dpop_nonce"#);
        assert!(both.use_dpop_nonce && !both.invalid_token);
        for no in [
            r#"Bearer error="use_dpop_nonce""#,
            r#"Basic error="use_dpop_nonce""#,
            r#"DPoPx error="invalid_token""#,
            r#"DPoP error="use_dpop_nonce_x""#,
            r#"use_dpop_nonce error="invalid_token""#,
        ] {
            let found = challenge(no.as_bytes());
            assert!(!found.invalid_token && !found.use_dpop_nonce, "{no}");
        }
    }

    #[test]
    fn a_bearer_invalid_token_challenge_is_recognised() {
        for yes in [
            "Bearer error=\"invalid_token\"",
            "Bearer realm=\"api\", error=\"invalid_token\", error_description=\"The access token expired\"",
            "bearer ERROR = \"Invalid_Token\"",
            "Bearer error=invalid_token",
            "Basic realm=\"x\", Bearer error=\"invalid_token\"",
        ] {
            assert!(challenge(yes.as_bytes()).invalid_token, "{yes}");
        }
        for no in [
            "Bearer realm=\"api\"",
            "Bearer error=\"insufficient_scope\"",
            "Bearer error_description=\"invalid_token\"",
            "Bearer xerror=\"invalid_token\"",
            "Bearer error=\"invalid_token_type\"",
            "Basic error=\"invalid_token\"",
            "",
        ] {
            assert!(!challenge(no.as_bytes()).invalid_token, "{no}");
        }
    }

    #[test]
    fn strips_standard_and_connection_listed_headers() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, X-Secret-Hop".parse().unwrap());
        h.append("connection", "x-other".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("x-other", "1".parse().unwrap());
        h.insert("proxy-authorization", "Basic x".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("te", "gzip".parse().unwrap());
        h.insert("x-end-to-end", "kept".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-end-to-end"], "kept");
    }

    #[test]
    fn connection_never_removes_framing_or_host() {
        let mut h = HeaderMap::new();
        h.insert("connection", "Content-Length, host, transfer-encoding, x-gone".parse().unwrap());
        h.insert("content-length", "5".parse().unwrap());
        h.insert("host", "api.local".parse().unwrap());
        h.insert("x-gone", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["content-length"], "5");
        assert_eq!(h["host"], "api.local");
    }

    #[test]
    fn te_trailers_survives() {
        let mut h = HeaderMap::new();
        h.insert("te", "trailers".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn forwarding_headers_append_and_set() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "10.1.1.1".parse().unwrap());
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        add_forwarding(
            &mut h,
            &peer_value("127.0.0.1".parse().unwrap()),
            false,
            Some("api.local:8080".parse().unwrap()),
        );
        assert_eq!(h["x-forwarded-for"], "10.1.1.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "api.local:8080");
        append_via(&mut h, Version::HTTP_11);
        append_via(&mut h, Version::HTTP_2);
        assert_eq!(h["via"], "1.1 tokenproxy, 2 tokenproxy");
    }
}
