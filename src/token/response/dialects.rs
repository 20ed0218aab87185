//! Every IdP dialect of docs/dialects.md, one test per row, driven by the response bodies in
//! tests/fixtures/dialects/: written by hand from each provider's documentation, not recorded from a live IdP. A row
//! added to the docs without a fixture (or the reverse) fails `table_matches_fixtures`. (The request side, as the
//! running proxy sends it, is tests/dialects.rs.)

use std::path::PathBuf;
use std::time::Duration;

use super::{parse_response, TokenError};
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue, StatusCode};
use serde_json::Value;

const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dialects")
}

fn run(name: &str) {
    let text = std::fs::read_to_string(fixtures().join(format!("{name}.json"))).expect("fixture");
    let case: Value = serde_json::from_str(&text).expect("fixture is JSON");
    let body = match &case["body"] {
        Value::String(raw) => raw.clone().into_bytes(),
        other => serde_json::to_vec(other).unwrap(),
    };
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_str(case["content_type"].as_str().unwrap()).unwrap());
    let status = StatusCode::from_u16(case["status"].as_u64().unwrap() as u16).unwrap();
    let expect = &case["expect"];
    let result = parse_response(status, &headers, &body, DEFAULT_LIFETIME);
    if let Some(code) = expect["error"].as_str() {
        match result {
            Err(error @ TokenError::Rejected { .. }) => {
                assert!(matches!(&error, TokenError::Rejected { error, .. } if error == code), "{name}: {error}");
                assert_eq!(error.is_permanent(), expect["permanent"].as_bool().unwrap(), "{name}: {error}");
            }
            other => panic!("{name}: expected the OAuth error {code}, got {other:?}"),
        }
        return;
    }
    if let Some(status) = expect["status_error"].as_u64() {
        match result {
            Err(error @ TokenError::Status { .. }) => {
                assert!(error.to_string().contains(&status.to_string()));
                assert_eq!(error.is_permanent(), expect["permanent"].as_bool().unwrap(), "{name}");
                assert!(!error.to_string().contains("html"), "{name}: the body is not echoed");
            }
            other => panic!("{name}: expected an HTTP status error, got {other:?}"),
        }
        return;
    }
    let response = result.unwrap_or_else(|e| panic!("{name}: {e}"));
    if let Some(seconds) = expect["lifetime_secs"].as_u64() {
        assert_eq!(response.lifetime, Duration::from_secs(seconds), "{name}");
    }
    if expect["lifetime_from_jwt"].as_bool() == Some(true) {
        assert!(response.lifetime > Duration::from_secs(365 * 86_400), "{name}: the JWT exp was used");
    }
    if let Some(scope) = expect["scope"].as_str() {
        assert_eq!(response.scope.as_deref(), Some(scope), "{name}");
    }
    assert_eq!(response.refresh_token.is_some(), expect["refresh_token"].as_bool().unwrap_or(false), "{name}");
    let rt_lifetime = response.refresh_token_lifetime.map(|d| d.as_secs());
    assert_eq!(rt_lifetime, expect["refresh_token_lifetime_secs"].as_u64(), "{name}");
    let debug = format!("{response:?}");
    assert!(!debug.contains(response.access_token.expose().to_str().unwrap()), "{name}: Debug shows no token");
}

macro_rules! dialect {
    ($($name:ident),* $(,)?) => {
        $( #[test] fn $name() { run(stringify!($name)); } )*
        const ROWS: &[&str] = &[$(stringify!($name)),*];
    };
}

dialect!(
    rfc6749_standard,
    expires_in_string,
    entra_v2_ext_expires_in,
    salesforce_no_expires_in_jwt,
    salesforce_no_expires_in_opaque,
    github_form_urlencoded,
    github_app_refresh_token_expires_in,
    keycloak_refresh_expires_in,
    keycloak_offline_token,
    snowflake_refresh_token_expires_in,
    auth0_rotation,
    token_type_uppercase,
    error_json_invalid_client,
    error_only_code,
    error_html_gateway,
    error_form_urlencoded,
    error_temporarily_unavailable,
);

#[test]
fn table_matches_fixtures() {
    let mut files: Vec<String> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().path().file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let mut rows: Vec<String> = ROWS.iter().map(|s| s.to_string()).collect();
    rows.sort();
    assert_eq!(files, rows, "every fixture has a test and every test a fixture");
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/dialects.md")).unwrap();
    for row in ROWS {
        assert!(doc.contains(&format!("`{row}`")), "docs/dialects.md has no row for `{row}`");
    }
}
