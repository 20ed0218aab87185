//! What the real OpenID provider's control API answers, and the small helpers of the requests to it (see `oidc.rs`,
//! which re-exports everything here).

// ---- what the provider's control API answers -------------------------------------------------------

/// Counts of /token calls the provider saw for one client_id.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenCalls {
    /// All calls.
    pub calls: u64,
    /// Calls answered 2xx.
    pub ok: u64,
    /// Calls the provider refused (4xx/5xx), injected failures excluded.
    pub error: u64,
    /// Calls answered with a failure injected through `/_test/fail`.
    pub injected: u64,
}

/// A refresh token made by `POST /_test/seed-refresh-token`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct SeededRefreshToken {
    /// The token.
    pub refresh_token: String,
    /// Its SHA-256, hex (how the provider's stats name it).
    pub sha256: String,
    /// The Grant it belongs to.
    pub grant_id: String,
}

/// The provider's view of the refresh_token grant calls (before any injected failure replaced an answer).
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct RefreshStats {
    /// All calls with grant_type=refresh_token.
    pub calls: u64,
    /// Calls that rotated the token and issued an access token.
    pub ok: u64,
    /// Calls answered invalid_grant.
    pub invalid_grant: u64,
    /// Calls answered with another error.
    pub other_error: u64,
    /// Presentations of a refresh token an earlier call had already redeemed.
    pub reused: u64,
    /// Presentations of a refresh token this provider never issued.
    pub unknown: u64,
    /// Every call, in order.
    pub log: Vec<RefreshCall>,
}

/// One refresh_token grant call as the provider saw it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct RefreshCall {
    /// SHA-256 of the presented refresh token.
    pub sha256: Option<String>,
    /// HTTP status the provider answered.
    pub status: u16,
    /// `error` of the answer.
    pub error: Option<String>,
    /// oidc-provider's own reason (`error_detail`), e.g. "refresh token already used".
    pub detail: Option<String>,
    /// The Grant the token belonged to, when the provider found it.
    pub grant_id: Option<String>,
    /// Whether the presented token had already been redeemed.
    pub reused: bool,
    /// SHA-256 of the refresh token issued in exchange.
    pub rotated_to: Option<String>,
}

impl RefreshStats {
    /// Only the calls on tokens of `grant_id` (a seed's or a device login's session).
    pub fn for_grant(&self, grant_id: &str) -> RefreshStats {
        let log: Vec<RefreshCall> =
            self.log.iter().filter(|c| c.grant_id.as_deref() == Some(grant_id)).cloned().collect();
        let count = |f: &dyn Fn(&RefreshCall) -> bool| log.iter().filter(|c| f(c)).count() as u64;
        RefreshStats {
            calls: log.len() as u64,
            ok: count(&|c| c.status == 200),
            invalid_grant: count(&|c| c.error.as_deref() == Some("invalid_grant")),
            other_error: count(&|c| c.status != 200 && c.error.as_deref() != Some("invalid_grant")),
            reused: count(&|c| c.reused),
            unknown: 0,
            log,
        }
    }

    /// The successful calls, in order.
    pub fn redemptions(&self) -> Vec<&RefreshCall> {
        self.log.iter().filter(|c| c.status == 200).collect()
    }

    /// Asserts that the successful calls form one chain from `first` (SHA-256 of the refresh token the
    /// first one presented): each presents the token the previous one issued, and none presents a token
    /// twice. Returns the SHA-256 of the newest token.
    pub fn assert_chain_from(&self, first: &str) -> String {
        let mut expected = first.to_owned();
        let mut presented = std::collections::HashSet::new();
        for (i, call) in self.redemptions().into_iter().enumerate() {
            let sha = call.sha256.clone().unwrap_or_default();
            assert_eq!(sha, expected, "redemption #{i} did not present the newest refresh token: {self:#?}");
            assert!(presented.insert(sha), "redemption #{i} presented a refresh token twice: {self:#?}");
            expected = call.rotated_to.clone().unwrap_or_else(|| panic!("redemption #{i} did not rotate: {self:#?}"));
        }
        expected
    }
}

/// `application/x-www-form-urlencoded` of `pairs`.
pub fn form_urlencoded_pairs(pairs: &[(&str, &str)]) -> String {
    let mut form = form_urlencoded::Serializer::new(String::new());
    for (key, value) in pairs {
        form.append_pair(key, value);
    }
    form.finish()
}

/// `Basic base64(id:secret)` (RFC 6749 §2.3.1; the test clients' ids and secrets need no escaping).
pub fn basic_auth(id: &str, secret: &str) -> String {
    use base64::Engine as _;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}")))
}

/// SHA-256 of `text`, hex (as the provider's stats and tokenproxy's `seed_sha256` name tokens).
pub fn sha256_hex(text: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}
