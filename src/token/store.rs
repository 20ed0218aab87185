//! The state store: rotated refresh tokens, one JSON file per provider in `state.dir`.
//!
//! Losing a rotated refresh token ends a session, and so does a corrupt file, so every write is atomic, durable and
//! private ([`crate::private_file`]: a temporary file nobody can guess or plant, mode 0600, fsync'd, renamed over the
//! old one, the directory fsync'd). A crash at any point leaves either the old file or the new one, never a torn or
//! empty one.
//! An advisory lock (`PROVIDER.lock`) keeps two processes sharing the directory (the proxy and `tokenproxy token`,
//! or replicas on one volume) from using one refresh token twice.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use sha2::{Digest, Sha256};

use super::secrets::RefreshToken;

/// Why the state store could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O error on a file of the store.
    #[error("state store {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file exists but is not a state record (it is never overwritten silently).
    #[error("state store {}: unreadable record ({message}); move it away to start a new session", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong (never the file's content).
        message: String,
    },
    /// Another process held the lock for too long.
    #[error("state store {}: still locked by another process after {:?}", path.display(), waited)]
    Locked {
        /// The lock file.
        path: PathBuf,
        /// How long we waited.
        waited: Duration,
    },
}

/// What the store keeps for one provider.
#[derive(Clone, Deserialize)]
pub struct Record {
    /// Format version.
    pub version: u32,
    /// The provider's name.
    pub provider: String,
    /// The current refresh token.
    pub refresh_token: RefreshToken,
    /// SHA-256 (hex) of the configured seed refresh token this session started from, if any: a different seed
    /// means a new login, which wins over the stored token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed_sha256: Option<String>,
    /// When the refresh token was stored (Unix seconds).
    pub stored_at: u64,
    /// When the refresh token itself expires (Unix seconds), when the IdP said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token_expires_at: Option<u64>,
    /// How many rotations this session has seen.
    #[serde(default)]
    pub rotations: u64,
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("provider", &self.provider)
            .field("stored_at", &self.stored_at)
            .field("rotations", &self.rotations)
            .finish_non_exhaustive()
    }
}

/// SHA-256 of a secret, hex-encoded (for recognising a seed without storing it twice).
pub fn sha256_hex(secret: &str) -> String {
    Sha256::digest(secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Unix seconds of `time`.
pub fn unix(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The embedded state store: a directory of per-provider records.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

/// A held advisory lock; released on drop.
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

impl StateStore {
    /// A store in `dir` (created, mode 0700, on first write).
    pub fn new(dir: impl Into<PathBuf>) -> StateStore {
        StateStore { dir: dir.into() }
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The record file of `provider`.
    pub fn path(&self, provider: &str) -> PathBuf {
        self.dir.join(format!("{provider}.json"))
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
        move |source| StoreError::Io { path: path.to_owned(), source }
    }

    fn ensure_dir(&self) -> Result<(), StoreError> {
        if self.dir.is_dir() {
            return Ok(());
        }
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&self.dir).map_err(Self::io(&self.dir))
    }

    /// The record of `provider`, if there is one.
    pub fn load(&self, provider: &str) -> Result<Option<Record>, StoreError> {
        let path = self.path(provider);
        let text = match fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::Io { path, source: e }),
        };
        let record: Record = serde_json::from_slice(&text).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            // serde_json's message names a line and column, not the content.
            message: e.to_string(),
        })?;
        if record.refresh_token.expose().is_empty() {
            return Err(StoreError::Corrupt { path, message: "empty refresh token".into() });
        }
        Ok(Some(record))
    }

    /// Writes the record of `provider` atomically and durably (see the module docs).
    pub fn save(&self, record: &Record) -> Result<(), StoreError> {
        self.ensure_dir()?;
        let path = self.path(&record.provider);
        let mut json = serde_json::to_vec_pretty(&RecordOnDisk(record))
            .map_err(|e| StoreError::Corrupt { path: path.clone(), message: e.to_string() })?;
        json.push(b'\n');
        failpoint("before_state_write").map_err(Self::io(&path))?;
        crate::private_file::write_private(&path, &json).map_err(Self::io(&path))?;
        failpoint("after_state_write").map_err(Self::io(&path))?;
        Ok(())
    }

    /// Deletes the record of `provider` (after a logout).
    pub fn delete(&self, provider: &str) -> Result<bool, StoreError> {
        let path = self.path(provider);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StoreError::Io { path, source: e }),
        }
    }

    /// Takes the advisory lock of `provider`, waiting up to `wait` for another process to release it.
    pub async fn lock(&self, provider: &str, wait: Duration) -> Result<StoreLock, StoreError> {
        self.ensure_dir()?;
        let path = self.dir.join(format!("{provider}.lock"));
        let mut options = OpenOptions::new();
        options.write(true).create(true).truncate(false);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(&path).map_err(Self::io(&path))?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(StoreLock { _file: file }),
                Err(fs::TryLockError::WouldBlock) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(fs::TryLockError::WouldBlock) => return Err(StoreError::Locked { path, waited: wait }),
                Err(fs::TryLockError::Error(source)) => return Err(StoreError::Io { path, source }),
            }
        }
    }
}

/// A record as written to disk: the refresh token in clear (the file is 0600), unlike its `Serialize` elsewhere.
struct RecordOnDisk<'a>(&'a Record);

impl Serialize for RecordOnDisk<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let r = self.0;
        let mut s = serializer.serialize_struct("Record", 7)?;
        s.serialize_field("version", &r.version)?;
        s.serialize_field("provider", &r.provider)?;
        s.serialize_field("refresh_token", r.refresh_token.expose())?;
        if let Some(seed) = &r.seed_sha256 {
            s.serialize_field("seed_sha256", seed)?;
        }
        s.serialize_field("stored_at", &r.stored_at)?;
        if let Some(expires) = r.refresh_token_expires_at {
            s.serialize_field("refresh_token_expires_at", &expires)?;
        }
        s.serialize_field("rotations", &r.rotations)?;
        s.end()
    }
}

/// Test hook for crash tests, only in builds with the `failpoints` feature (the test command's; a release build has
/// no trace of it). Named outside the `TOKENPROXY_` config prefix on purpose: `TP_FAILPOINT=NAME` aborts the process
/// (as `kill -9` would) at that point; `TP_FAILPOINT=NAME:error` makes the first pass through it fail with an I/O
/// error instead.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
fn failpoint(_name: &str) -> std::io::Result<()> {
    Ok(())
}

/// See the other `failpoint`.
#[cfg(feature = "failpoints")]
fn failpoint(name: &str) -> std::io::Result<()> {
    static FAILPOINT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let Some(configured) = FAILPOINT.get_or_init(|| std::env::var("TP_FAILPOINT").ok()).as_deref() else {
        return Ok(());
    };
    if configured == name {
        eprintln!("tokenproxy: failpoint {name}: aborting");
        std::process::abort();
    }
    let fires = configured.strip_suffix(":error") == Some(name);
    if fires && !FIRED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return Err(std::io::Error::other(format!("failpoint {name}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(rt: &str) -> Record {
        Record {
            version: 1,
            provider: "p".into(),
            refresh_token: RefreshToken::new(rt),
            seed_sha256: None,
            stored_at: 1,
            refresh_token_expires_at: None,
            rotations: 0,
        }
    }

    #[test]
    fn save_load_roundtrip_with_private_modes() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("state"));
        assert!(store.load("p").unwrap().is_none());
        store.save(&record("rt-1")).unwrap();
        store.save(&record("rt-2")).unwrap();
        assert_eq!(store.load("p").unwrap().unwrap().refresh_token.expose(), "rt-2");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(fs::metadata(store.path("p")).unwrap().permissions().mode() & 0o777, 0o600);
            assert_eq!(fs::metadata(store.dir()).unwrap().permissions().mode() & 0o777, 0o700);
        }
        let leftovers: Vec<_> = fs::read_dir(store.dir()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("p.json")], "no temp file left behind");
        assert!(!format!("{:?}", store.load("p").unwrap()).contains("rt-2"));
        assert!(store.delete("p").unwrap());
        assert!(store.load("p").unwrap().is_none());
    }

    #[test]
    fn a_corrupt_or_empty_record_is_an_error_not_a_silent_reset() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path());
        fs::write(store.path("p"), b"").unwrap();
        assert!(matches!(store.load("p"), Err(StoreError::Corrupt { .. })));
        fs::write(store.path("p"), b"{\"version\":1,\"provider\":\"p\",\"refresh_token\":\"\",\"stored_at\":1}")
            .unwrap();
        let err = store.load("p").unwrap_err();
        assert!(err.to_string().contains("empty refresh token"));
    }

    #[tokio::test]
    async fn the_lock_excludes_a_second_holder() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path());
        let held = store.lock("p", Duration::from_millis(10)).await.unwrap();
        assert!(matches!(store.lock("p", Duration::from_millis(120)).await, Err(StoreError::Locked { .. })));
        drop(held);
        store.lock("p", Duration::from_millis(10)).await.unwrap();
    }
}
