//! Files that hold a token or a key, written so that nobody else on the machine can read them or redirect them.
//!
//! One way for every such file (the sink file, the state store's records): a new file beside the final one, under a
//! name nobody can guess (so nothing can be planted there first), created with `O_CREAT|O_EXCL|O_NOFOLLOW` (so a
//! symlink or a file someone planted is never followed or reused) and mode 0600 from its creation, written, fsync'd,
//! renamed over the final name (which replaces a symlink planted there rather than writing through it), and the
//! directory fsync'd. A crash at any point leaves the old file or the new one, never a torn one.

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

/// Writes `content` to `path` as the module docs say.
pub fn write_private(path: &Path, content: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
    let (temporary, mut file) = loop {
        let temporary = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&temporary)
        {
            Ok(file) => break (temporary, file),
            // 64 random bits taken: another name.
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(error) => return Err(error),
        }
    };
    let written = file.write_all(content).and_then(|()| file.sync_all());
    drop(file);
    let renamed = written.and_then(|()| std::fs::rename(&temporary, path));
    if renamed.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    renamed?;
    File::open(dir).and_then(|dir| dir.sync_all())
}

/// The mode of `dir` when group or others may write to it (they could then plant or replace files in it), else
/// `None` (also when it does not exist).
pub fn writable_by_others(dir: &Path) -> Option<u32> {
    let mode = std::fs::metadata(dir).ok()?.permissions().mode() & 0o7777;
    (mode & 0o022 != 0).then_some(mode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn a_planted_symlink_or_open_file_is_replaced_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, "untouched").unwrap();
        let path = dir.path().join("p.token");
        std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
        write_private(&path, b"secret").unwrap();
        assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "untouched", "the link's target was not written");
        assert!(!std::fs::symlink_metadata(&path).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        // A world-writable file planted at the final name is replaced by one only its owner reads.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "planted").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        write_private(&path, b"secret2").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "secret2");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 2, "no temporary file is left: {left:?}");
    }

    #[test]
    fn a_directory_others_can_write_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(writable_by_others(dir.path()), None);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert_eq!(writable_by_others(dir.path()), Some(0o1777));
        assert_eq!(writable_by_others(&dir.path().join("absent")), None);
    }
}
