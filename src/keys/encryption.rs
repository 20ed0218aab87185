//! The shared store's encryption keys (`state.encryption_key_file`): base64 32-byte AES-256 keys, one per line.

use std::path::Path;

use base64::Engine as _;

use crate::secret::SecretSource;

crate::secret::secret_type! {
    /// An AES-256 key that encrypts tokens at rest in the shared store.
    #[derive(PartialEq, Eq)]
    pub struct EncryptionKey([u8; 32]);
}

impl EncryptionKey {
    /// Wraps a key.
    pub fn new(key: [u8; 32]) -> EncryptionKey {
        EncryptionKey(key)
    }
}

/// The keys of an `encryption_key_file`: base64 32-byte keys, one per line (blank lines and `#` comments skipped);
/// the first encrypts, all decrypt. The error names the file and the line, never a key.
pub fn read_encryption_keys(path: &Path) -> Result<Vec<EncryptionKey>, String> {
    let text = SecretSource::File(path.to_path_buf()).read().map_err(|e| e.to_string())?;
    let mut keys = Vec::new();
    for (n, line) in text.expose().lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(line)
            .map_err(|_| format!("{}: line {} is not base64", path.display(), n + 1))?;
        let key: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
            format!("{}: line {} holds {} bytes; a key is 32 (AES-256)", path.display(), n + 1, b.len())
        })?;
        keys.push(EncryptionKey(key));
    }
    if keys.is_empty() {
        return Err(format!("{}: no key (base64 32-byte keys, one per line)", path.display()));
    }
    Ok(keys)
}
