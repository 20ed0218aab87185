//! Why an upstream refused a token: the verdict tokenproxy gives when an upstream answers 401 or 403 with a Bearer
//! or DPoP challenge to a token it will not replay (already renewed, or a refusal no new token fixes).
//!
//! The token's claims are decoded when it is a JWT, **without** checking its signature: the verdict explains, it never
//! authorises, and the claims never leave the process except as the verdict. They are compared with what the route
//! asked for (`audience`/`resource`), what the upstream said (`WWW-Authenticate: Bearer error="insufficient_scope"
//! scope="…"`, `error_description`, its `Date`), the provider's `issuer`, and the binding (`cnf`) the request proved.
//! Explanations cite `aud`, `scope`/`scp`, `iss`, `exp`/`nbf` and the clock offset, never `sub` or other claims.
//! docs/metrics-and-alerts.md ("Why an upstream refused a token") documents the reasons. The proxy calls [`judge`]
//! when its status decision delivers such a refusal.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use http::HeaderValue;
use serde_json::Value;

use super::Token;
use crate::metrics::RefusalReason;

/// What a 4xx answer said that the verdict looks at.
#[derive(Debug, Clone, Default)]
pub struct Challenged {
    /// Its `WWW-Authenticate` value with a Bearer or DPoP challenge.
    pub challenge: Option<HeaderValue>,
    /// Its `Date`.
    pub date: Option<HeaderValue>,
}

/// What the route's token was asked for: the provider's (or route profile's) settings.
#[derive(Debug, Clone, Default)]
pub struct Expectations {
    /// `audience` or `resource`, each a value the token's `aud` should hold.
    pub audiences: Vec<String>,
    /// The provider's `issuer`.
    pub issuer: Option<String>,
    /// The route presents a client certificate to its upstream (a certificate-bound token can be proved).
    pub presents_certificate: bool,
}

/// The verdict on one refusal.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// The route.
    pub route: String,
    /// The upstream's status.
    pub status: u16,
    /// When.
    pub at: SystemTime,
    /// The reasons found (at least one: `unknown` when none).
    pub reasons: Vec<RefusalReason>,
    /// One sentence per reason, naming the claims and values compared.
    pub explanation: String,
}

/// Judges the refusal `status` (with `seen`) of `token` on `route`.
pub fn judge(
    route: &str,
    status: u16,
    token: &Token,
    expects: &Expectations,
    seen: Option<&Challenged>,
    now: SystemTime,
) -> Verdict {
    let claims = claims(token.access_token().expose().to_str().unwrap_or_default());
    let challenge = seen.and_then(|s| s.challenge.as_ref()).map(|v| params(v.as_bytes())).unwrap_or_default();
    let upstream_now =
        seen.and_then(|s| s.date.as_ref()).and_then(|d| httpdate::parse_http_date(d.to_str().ok()?).ok());
    let mut reasons = BTreeSet::new();
    let mut said = Vec::new();
    let param = |name: &str| challenge.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());

    if let Some(claims) = &claims {
        let aud: Vec<&str> = match &claims["aud"] {
            Value::String(one) => vec![one.as_str()],
            Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let missing: Vec<&str> =
            expects.audiences.iter().map(String::as_str).filter(|wanted| !aud.contains(wanted)).collect();
        if !missing.is_empty() {
            reasons.insert(RefusalReason::Audience);
            said.push(format!("the token's aud is {} but the route asked for {}", list(&aud), list(&missing)));
        }
        if let (Some(issuer), Some(iss)) = (&expects.issuer, claims["iss"].as_str()) {
            if iss.trim_end_matches('/') != issuer.trim_end_matches('/') {
                reasons.insert(RefusalReason::Issuer);
                said.push(format!("the token's iss is `{iss}`, not the provider's issuer `{issuer}`"));
            }
        }
        let clock = upstream_now.unwrap_or(now);
        let whose = if upstream_now.is_some() { "the upstream's clock (its Date)" } else { "this machine's clock" };
        let offset = upstream_now.map(|theirs| signed_seconds(theirs, now));
        let skew = match offset {
            Some(offset) if offset != 0 => format!(
                "; the upstream's clock is {} s {} this machine's",
                offset.abs(),
                if offset > 0 { "ahead of" } else { "behind" }
            ),
            _ => String::new(),
        };
        if let Some(exp) = claims["exp"].as_u64().map(epoch) {
            if clock >= exp {
                reasons.insert(RefusalReason::Expired);
                said.push(format!("by {whose} the token expired {} s ago (exp){skew}", signed_seconds(clock, exp)));
            }
        }
        if let Some(nbf) = claims["nbf"].as_u64().or(claims["iat"].as_u64()).map(epoch) {
            if clock < nbf {
                let claim = if claims["nbf"].is_u64() { "nbf" } else { "iat" };
                reasons.insert(RefusalReason::NotYetValid);
                said.push(format!(
                    "by {whose} the token is valid only in {} s ({claim}){skew}",
                    signed_seconds(nbf, clock)
                ));
            }
        }
        let cnf = &claims["cnf"];
        if cnf["jkt"].is_string() && token.dpop().is_none() {
            reasons.insert(RefusalReason::Binding);
            said.push("the token is bound to a DPoP key (cnf.jkt) but was sent without a proof".to_owned());
        }
        if cnf["x5t#S256"].is_string() && !expects.presents_certificate {
            reasons.insert(RefusalReason::Binding);
            said.push(
                "the token is bound to a client certificate (cnf.x5t#S256) that the route does not present to its \
                 upstream (routes[].client_cert_file, or upstream_client_cert = \"provider\")"
                    .to_owned(),
            );
        }
    }
    if param("error") == Some("insufficient_scope") {
        let has: BTreeSet<&str> = claims.as_ref().map(token_scopes).unwrap_or_default();
        let wanted: Vec<&str> = param("scope").map(|s| s.split_whitespace().collect()).unwrap_or_default();
        let missing: Vec<&str> = wanted.iter().copied().filter(|s| !has.contains(s)).collect();
        reasons.insert(RefusalReason::Scope);
        said.push(match (wanted.is_empty(), claims.is_some()) {
            (false, true) => format!(
                "the upstream wants scope {} and the token has {} (missing {})",
                list(&wanted),
                list(&has.iter().copied().collect::<Vec<_>>()),
                list(&missing)
            ),
            (false, false) => format!("the upstream wants scope {} (insufficient_scope)", list(&wanted)),
            (true, _) => "the upstream says the token's scope is insufficient (insufficient_scope)".to_owned(),
        });
    }
    if reasons.is_empty() {
        reasons.insert(RefusalReason::Unknown);
        said.push(match claims {
            Some(_) => "nothing in the token's aud, scope, iss, exp, nbf or cnf explains it".to_owned(),
            None => "the token is not a JWT (opaque): only the upstream or the IdP can say why".to_owned(),
        });
    }
    if let Some(description) = param("error_description") {
        said.push(format!("the upstream says: {}", description.escape_debug()));
    }
    Verdict {
        route: route.to_owned(),
        status,
        at: now,
        reasons: reasons.into_iter().collect(),
        explanation: said.join("; "),
    }
}

/// The claims of a JWT (its payload, decoded, unverified), or `None` for anything else.
fn claims(token: &str) -> Option<Value> {
    let mut parts = token.split('.');
    let (_, payload, _, None) = (parts.next()?, parts.next()?, parts.next()?, parts.next()) else { return None };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    serde_json::from_slice::<Value>(&bytes).ok().filter(Value::is_object)
}

/// The token's scopes: `scope` (space-separated) or `scp` (a string or an array, as Entra ID and Okta write it).
fn token_scopes(claims: &Value) -> BTreeSet<&str> {
    match (&claims["scope"], &claims["scp"]) {
        (Value::String(scope), _) | (_, Value::String(scope)) => scope.split_whitespace().collect(),
        (_, Value::Array(scp)) => scp.iter().filter_map(Value::as_str).collect(),
        _ => BTreeSet::new(),
    }
}

/// The `name=value` parameters of a challenge (quoted or not), names in lower case.
fn params(value: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(value);
    let mut out = Vec::new();
    let mut rest = text.as_ref();
    while let Some(eq) = rest.find('=') {
        let name = rest[..eq].rsplit([' ', ',', '\t']).next().unwrap_or("").trim().to_ascii_lowercase();
        let after = rest[eq + 1..].trim_start();
        let (value, next) = match after.strip_prefix('"') {
            Some(quoted) => {
                let end = quoted.find('"').unwrap_or(quoted.len());
                (quoted[..end].to_owned(), &quoted[(end + 1).min(quoted.len())..])
            }
            None => {
                let end = after.find([',', ' ']).unwrap_or(after.len());
                (after[..end].to_owned(), &after[end..])
            }
        };
        if !name.is_empty() {
            out.push((name, value));
        }
        rest = next;
    }
    out
}

fn epoch(seconds: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(seconds)
}

/// `a - b` in whole seconds, signed.
fn signed_seconds(a: SystemTime, b: SystemTime) -> i64 {
    match a.duration_since(b) {
        Ok(ahead) => i64::try_from(ahead.as_secs()).unwrap_or(i64::MAX),
        Err(behind) => -i64::try_from(behind.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

fn list(values: &[&str]) -> String {
    match values {
        [] => "none".to_owned(),
        _ => values.iter().map(|v| format!("`{}`", v.escape_debug())).collect::<Vec<_>>().join(" "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::secrets::AccessToken;

    fn jwt(claims: Value) -> Token {
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let raw = format!("{}.{}.sig", b64(br#"{"alg":"RS256"}"#), b64(claims.to_string().as_bytes()));
        let now = SystemTime::now();
        Token::new(AccessToken::new(HeaderValue::from_str(&raw).unwrap()), 1, tokio::time::Instant::now(), now, now)
    }

    fn seen(challenge: &str, date: Option<SystemTime>) -> Challenged {
        Challenged {
            challenge: Some(HeaderValue::from_str(challenge).unwrap()),
            date: date.map(|d| HeaderValue::from_str(&httpdate::fmt_http_date(d)).unwrap()),
        }
    }

    fn expects() -> Expectations {
        Expectations {
            audiences: vec!["https://api.example".into()],
            issuer: Some("https://idp.example/".into()),
            presents_certificate: false,
        }
    }

    #[test]
    fn each_reason_is_found_and_explained_with_the_claims_compared() {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).unwrap().as_secs();
        let good = serde_json::json!({"aud": "https://api.example", "iss": "https://idp.example", "exp": secs + 300,
            "iat": secs - 10, "scope": "orders.read", "sub": "secret-subject"});
        let bearer = seen("Bearer realm=\"api\"", None);
        let v = judge("r", 401, &jwt(good.clone()), &expects(), Some(&bearer), now);
        assert_eq!(v.reasons, [RefusalReason::Unknown], "{}", v.explanation);

        let mut wrong_aud = good.clone();
        wrong_aud["aud"] = serde_json::json!(["other", "another"]);
        let v = judge("r", 401, &jwt(wrong_aud), &expects(), Some(&bearer), now);
        assert_eq!(v.reasons, [RefusalReason::Audience]);
        assert!(v.explanation.contains("`other` `another`") && v.explanation.contains("`https://api.example`"));

        let scope = seen(
            "Bearer error=\"insufficient_scope\", scope=\"orders.read orders.write\", error_description=\"need write\"",
            None,
        );
        let v = judge("r", 403, &jwt(good.clone()), &expects(), Some(&scope), now);
        assert_eq!(v.reasons, [RefusalReason::Scope]);
        assert!(
            v.explanation.contains("missing `orders.write`") && v.explanation.contains("need write"),
            "{}",
            v.explanation
        );

        let ahead = seen("Bearer error=\"invalid_token\"", Some(now + Duration::from_secs(600)));
        let v = judge("r", 401, &jwt(good.clone()), &expects(), Some(&ahead), now);
        assert_eq!(v.reasons, [RefusalReason::Expired]);
        assert!(v.explanation.contains("ahead of this machine's"), "{}", v.explanation);
        let behind = seen("Bearer error=\"invalid_token\"", Some(now - Duration::from_secs(600)));
        let v = judge("r", 401, &jwt(good.clone()), &expects(), Some(&behind), now);
        assert_eq!(v.reasons, [RefusalReason::NotYetValid], "{}", v.explanation);

        let mut other_iss = good.clone();
        other_iss["iss"] = "https://evil.example".into();
        other_iss["cnf"] = serde_json::json!({"x5t#S256": "abc"});
        let v = judge("r", 401, &jwt(other_iss), &expects(), Some(&bearer), now);
        assert_eq!(v.reasons, [RefusalReason::Issuer, RefusalReason::Binding], "{}", v.explanation);

        let opaque = Token::new(
            AccessToken::new(HeaderValue::from_static("opaque-token")),
            1,
            tokio::time::Instant::now(),
            now,
            now,
        );
        let v = judge("r", 401, &opaque, &expects(), Some(&bearer), now);
        assert_eq!(v.reasons, [RefusalReason::Unknown]);
        assert!(v.explanation.contains("not a JWT"));

        // Never the subject or the token.
        let v = judge("r", 401, &jwt(good), &expects(), Some(&scope), now);
        assert!(!v.explanation.contains("secret-subject") && !v.explanation.contains("sig"), "{}", v.explanation);
    }
}
