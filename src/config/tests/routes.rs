//! Unit tests of `[[routes]]`: normalisation, default names, duplicates, and keys that would do nothing.

use super::{load, problems, IncomingAuthorization, Inject};

#[test]
fn a_config_without_routes_says_how_to_add_one() {
    let lines = problems(load("[log]\nlevel = \"debug\"\n"));
    assert_eq!(lines.len(), 1);
    assert!(lines[0].starts_with("routes: no routes are defined; add at least one"), "{lines:?}");
    assert!(!lines[0].contains('\n'), "{lines:?}");
    assert!(lines[0].contains("[[routes]]"), "{lines:?}");
    assert!(lines[0].ends_with("(from tokenproxy.toml)"), "{lines:?}");

    let lines = problems(load("[routes]\nupstream = \"http://127.0.0.1:3000\"\n"));
    assert_eq!(
        lines,
        ["routes: expected an array of tables; write [[routes]] (two brackets) before each route (from tokenproxy.toml)"]
    );
}

#[test]
fn routes_are_normalised_and_named() {
    let toml = r#"
        [[routes]]
        host = "Orders.Internal"
        upstream = "http://127.0.0.1:3001"

        [[routes]]
        prefix = "/orders/"
        upstream = "http://127.0.0.1:3002"

        [[routes]]
        host = "orders.internal"
        prefix = "/api"
        upstream = "http://127.0.0.1:3003"

        [[routes]]
        host = "::1"
        upstream = "http://127.0.0.1:3004"
    "#;
    let config = load(toml).unwrap();
    let routes: Vec<_> =
        config.routes.iter().map(|r| (r.name.as_str(), r.host.as_deref(), r.prefix.as_str())).collect();
    assert_eq!(
        routes,
        [
            ("orders.internal/", Some("orders.internal"), "/"),
            ("/orders", None, "/orders"),
            ("orders.internal/api", Some("orders.internal"), "/api"),
            ("[::1]/", Some("[::1]"), "/"),
        ]
    );
}

#[test]
fn duplicate_routes_are_errors() {
    let toml = r#"
        [[routes]]
        prefix = "/orders"
        upstream = "http://127.0.0.1:3001"

        [[routes]]
        prefix = "/orders/"
        upstream = "http://127.0.0.1:3002"

        [[routes]]
        name = "a"
        prefix = "/a"
        upstream = "http://127.0.0.1:3003"

        [[routes]]
        name = "a"
        prefix = "/b"
        upstream = "http://127.0.0.1:3004"
    "#;
    assert_eq!(
        problems(load(toml)),
        [
            "routes[1]: same host and prefix (`/orders`) as routes[0]; only one of them could ever match (from tokenproxy.toml)",
            "routes[3].name: route name `a` is already used by routes[2] (from tokenproxy.toml)",
        ]
    );
}

#[test]
fn route_keys_that_would_do_nothing_are_errors() {
    let toml = r#"
        [providers.orders]
        token_url = "https://idp.example/token"
        client_id = "orders"
        client_auth = "none"

        [[routes]]
        prefix = "/a"
        upstream = "http://127.0.0.1:3001"
        inject = "query"

        [[routes]]
        prefix = "/b"
        upstream = "http://127.0.0.1:3002"
        provider = "orders"
        inject = "query"
        header_name = "X-Token"

        [[routes]]
        prefix = "/c"
        upstream = "http://127.0.0.1:3003"
        provider = "orders"
        query_param = "token"
        header_name = "Content-Length"
        scheme = "Bearer token"
    "#;
    assert_eq!(
        problems(load(toml)),
        [
            "routes[0].inject: only used with `provider`; this route has none (a plain pass-through) (from tokenproxy.toml)",
            "routes[1].header_name: only used with inject = \"header\"; this route puts the token in the query (`query_param`) (from tokenproxy.toml)",
            "routes[2].header_name: `content-length` cannot carry a token: it is a hop-by-hop or message-framing header (from tokenproxy.toml)",
            "routes[2].scheme: must be an auth scheme such as \"Bearer\" (no spaces), or \"\" to send the raw token (from tokenproxy.toml)",
            "routes[2].query_param: only used with inject = \"query\"; this route puts the token in a header (`header_name`) (from tokenproxy.toml)",
        ]
    );
}

#[test]
fn query_injection_and_raw_tokens() {
    let toml = r#"
        [providers.orders]
        token_url = "https://idp.example/token"
        client_id = "orders"
        client_auth = "none"

        [[routes]]
        prefix = "/q"
        upstream = "http://127.0.0.1:3001"
        provider = "orders"
        inject = "query"
        query_param = "token"

        [[routes]]
        prefix = "/h"
        upstream = "http://127.0.0.1:3002"
        provider = "orders"
        header_name = "X-Api-Token"
        scheme = ""
        incoming_authorization = "keep"
        retry_on_401 = false
    "#;
    let config = load(toml).unwrap();
    assert_eq!(config.providers["orders"].client_secret, None);
    let (q, h) = (&config.routes[0], &config.routes[1]);
    assert_eq!((q.inject, q.query_param.as_str()), (Inject::Query, "token"));
    assert_eq!(h.header_name.as_str(), "x-api-token");
    assert_eq!(h.scheme, "");
    assert_eq!(h.incoming_authorization, IncomingAuthorization::Keep);
    assert!(!h.retry_on_401);
}
