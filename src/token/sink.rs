//! `sink_file`: a provider's token written to a file on every refresh, for tools that read a token from a file
//! (docs/vending.md). The file is replaced atomically (written beside it, then renamed over it), so a reader never
//! sees part of a token, and it is readable by its owner only (mode 0600).

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use super::cache::Token;
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
        if let Err(error) = replace(&self.path, &content) {
            tracing::warn!(provider = %self.provider, path = %self.path.display(), "cannot write sink_file: {error}");
        }
    }
}

/// Writes `content` to a new file beside `path` (mode 0600) and renames it over `path`.
fn replace(path: &Path, content: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temporary = path.with_file_name(format!(".{name}.tmp"));
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temporary)?;
    file.write_all(content)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temporary, path)
}
