//! The request side of the IdP dialects of docs/dialects.md: parameters a provider needs in its token requests, as the
//! running proxy sends them. (The response side, one test per row and fixture, is beside the parser:
//! src/token/response/dialects.rs.)

mod support;

use support::{FakeIdp, FakeUpstream, Proxy};

/// Request-side dialects: parameters a provider needs in the token request, as the running proxy sends them.
#[tokio::test]
async fn entra_default_scope_and_auth0_audience_are_sent_as_given() {
    let (idp, upstream) = (FakeIdp::start(300).await, FakeUpstream::start().await);
    let proxy = Proxy::start(&format!(
        r#"
[providers.entra]
token_url = "{token_url}"
client_id = "11111111-2222-3333-4444-555555555555"
client_secret = "x"
client_auth = "client_secret_post"
scope = "api://orders-api/.default"
[providers.auth0]
token_url = "{token_url}"
client_id = "abc"
client_secret = "y"
client_auth = "client_secret_post"
audience = "https://orders.example.com/api"
[[routes]]
prefix = "/entra"
upstream = "{upstream}"
provider = "entra"
[[routes]]
prefix = "/auth0"
upstream = "{upstream}"
provider = "auth0"
"#,
        token_url = idp.token_url(),
        upstream = upstream.url(),
    ))
    .await;
    proxy.wait_ready().await;
    let form = |client_id: &str| {
        let calls = idp.received();
        let call = calls.iter().find(|call| call.form.contains(&("client_id".into(), client_id.into())));
        call.unwrap_or_else(|| panic!("no token call of {client_id}: {calls:?}")).form.clone()
    };
    let entra = form("11111111-2222-3333-4444-555555555555");
    assert!(entra.contains(&("scope".into(), "api://orders-api/.default".into())), "{entra:?}");
    let auth0 = form("abc");
    assert!(auth0.contains(&("audience".into(), "https://orders.example.com/api".into())), "{auth0:?}");
    proxy.stop().await;
}
