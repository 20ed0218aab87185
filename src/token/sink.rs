//! `sink_file`: a provider's token written to a file on every refresh, for tools that read a token from a file
//! (docs/vending.md). The file is replaced atomically and privately ([`crate::private_file`]): a reader never sees
//! part of a token, it is readable by its owner only (mode 0600), and nothing planted in its directory redirects it.

use std::path::{Path, PathBuf};

use super::slot::Token;
use crate::config::SinkFormat;

/// Where and how a provider's tokens are written.
#[derive(Debug, Clone)]
pub struct Sink {
    provider: String,
    path: PathBuf,
    format: SinkFormat,
}

impl Sink {
    /// The sink of `provider` at `path`.
    pub fn new(provider: &str, path: &Path, format: SinkFormat) -> Sink {
        Sink { provider: provider.to_owned(), path: path.to_owned(), format }
    }

    /// Writes `token`; a failure is logged (the proxy keeps using the token) and tried again at the next refresh.
    pub fn write(&self, token: &Token) {
        let content = match self.format {
            SinkFormat::Raw => token.access_token().expose().as_bytes().to_vec(),
            SinkFormat::Json => serde_json::json!({
                "access_token": token.access_token().expose().to_str().unwrap_or_default(),
                "token_type": "Bearer",
                "expires_at": humantime::format_rfc3339_seconds(token.expires_at).to_string(),
            })
            .to_string()
            .into_bytes(),
        };
        if let Err(error) = crate::private_file::write_private(&self.path, &content) {
            tracing::warn!(provider = %self.provider, path = %self.path.display(), "cannot write sink_file: {error}");
        }
    }
}
