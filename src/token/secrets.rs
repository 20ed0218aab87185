//! The token engine's own secrets, declared as every secret is ([`crate::secret`]): the access tokens it hands the
//! proxy and the refresh tokens of its sessions.

use http::HeaderValue;

crate::secret::secret_type! {
    /// An access token: a secret from the moment it is parsed, and a sensitive header value from construction (hyper
    /// keeps sensitive values out of HTTP/2's compression tables), read only through [`AccessToken::expose`], so
    /// every place that puts it on the wire says so.
    pub struct AccessToken(HeaderValue);
}

impl AccessToken {
    /// A token, marked sensitive.
    pub fn new(mut value: HeaderValue) -> AccessToken {
        value.set_sensitive(true);
        AccessToken(value)
    }
}

crate::secret::secret_type! {
    /// A refresh token: the IdP's (rotated ones), the state store's, or the configured seed's once read.
    #[derive(PartialEq, Eq)]
    pub struct RefreshToken(String) exposed as str;
}

impl RefreshToken {
    /// Wraps a refresh token.
    pub fn new(value: impl Into<String>) -> RefreshToken {
        RefreshToken(value.into())
    }
}

impl<'de> serde::Deserialize<'de> for RefreshToken {
    /// Reads a refresh token from stored state (the state store's records).
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        <String as serde::Deserialize>::deserialize(deserializer).map(RefreshToken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_access_token_never_shows_itself_and_is_sensitive() {
        let token = AccessToken::new(HeaderValue::from_static("eyJ.secret-token"));
        assert_eq!(format!("{token:?} {token}"), "AccessToken([redacted]) [redacted]");
        assert!(token.expose().is_sensitive());
        assert_eq!(token.expose(), "eyJ.secret-token");
    }

    #[test]
    fn a_refresh_token_never_shows_itself_and_reads_back_from_stored_state() {
        let token = RefreshToken::new("rt-secret");
        assert_eq!(format!("{token:?} {token}"), "RefreshToken([redacted]) [redacted]");
        assert_eq!(token.expose(), "rt-secret");
        let stored: RefreshToken = serde_json::from_str("\"rt-secret\"").unwrap();
        assert_eq!(stored, token);
    }
}
