//! Secret values and where they come from: inline, a file (re-read by the token engine when it changes), or an
//! environment variable. A [`Secret`] never prints its value; errors name the file or variable, never the value.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize, Serializer};

/// What every secret prints as.
pub(crate) const REDACTED: &str = "[redacted]";

/// Secret files larger than this are refused: a secret is a few hundred bytes, a bigger file is a wrong path.
const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// Declares a secret type, the one way every secret of tokenproxy is declared (as oauth2-rs's `new_secret_type!`): a
/// newtype whose value is private, whose `Debug` prints `Name([redacted])` and `Display` `[redacted]`, and whose
/// value is read only through `expose()`, so every place that puts a secret on the wire (or in a private file) says
/// so. Its constructor is the declaring module's: a token becomes a sensitive header value, a string is taken as is.
///
/// ```ignore
/// secret_type! {
///     /// A refresh token.
///     pub struct RefreshToken(String) exposed as str;
/// }
/// ```
macro_rules! secret_type {
    ($(#[$attr:meta])* $vis:vis struct $name:ident($inner:ty) exposed as $exposed:ty;) => {
        $(#[$attr])*
        #[derive(Clone)]
        $vis struct $name($inner);

        impl $name {
            /// The secret itself: only to put it where it belongs (the wire, a private file), never in a log.
            #[inline]
            pub fn expose(&self) -> &$exposed {
                &self.0
            }
        }

        impl ::std::fmt::Debug for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(concat!(stringify!($name), "([redacted])"))
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str($crate::secret::REDACTED)
            }
        }
    };
    ($(#[$attr:meta])* $vis:vis struct $name:ident($inner:ty);) => {
        $crate::secret::secret_type! { $(#[$attr])* $vis struct $name($inner) exposed as $inner; }
    };
}
pub(crate) use secret_type;

secret_type! {
    /// A secret value of the configuration (client secret, password, actor token, a refresh token seed): `Debug`,
    /// `Display` and `Serialize` show `[redacted]`.
    #[derive(PartialEq, Eq)]
    pub struct Secret(String) exposed as str;
}

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

/// Where a secret comes from: the `x`, `x_file` or `x_env` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// Given inline in the configuration (`x`).
    Inline(Secret),
    /// Read from this file, surrounding whitespace trimmed (`x_file`).
    File(PathBuf),
    /// Read from this environment variable (`x_env`).
    Env(String),
}

/// Why a secret could not be read. Names the file or variable, never the value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The inline value is empty.
    #[error("the secret is empty")]
    EmptyInline,
    /// The secret file could not be read.
    #[error("cannot read secret file {}: {source}", path.display())]
    FileUnreadable {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The secret file is larger than a secret can be.
    #[error("secret file {} is larger than {MAX_SECRET_FILE_BYTES} bytes", path.display())]
    FileTooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The secret file is not UTF-8 text.
    #[error("secret file {} is not UTF-8 text", path.display())]
    FileNotText {
        /// The file.
        path: PathBuf,
    },
    /// The secret file holds nothing but whitespace.
    #[error("secret file {} is empty", path.display())]
    FileEmpty {
        /// The file.
        path: PathBuf,
    },
    /// The environment variable is not set.
    #[error("environment variable `{var}` is not set")]
    EnvMissing {
        /// The variable.
        var: String,
    },
    /// The environment variable is not valid Unicode.
    #[error("environment variable `{var}` is not valid UTF-8")]
    EnvNotText {
        /// The variable.
        var: String,
    },
    /// The environment variable is set but empty.
    #[error("environment variable `{var}` is empty")]
    EnvEmpty {
        /// The variable.
        var: String,
    },
}

impl SecretSource {
    /// Reads the secret now: a file is read and trimmed of surrounding whitespace, a variable is looked up.
    pub fn read(&self) -> Result<Secret, SecretError> {
        match self {
            SecretSource::Inline(secret) if secret.expose().is_empty() => Err(SecretError::EmptyInline),
            SecretSource::Inline(secret) => Ok(secret.clone()),
            SecretSource::File(path) => read_file(path),
            SecretSource::Env(var) => match std::env::var(var) {
                Ok(value) if value.is_empty() => Err(SecretError::EnvEmpty { var: var.clone() }),
                Ok(value) => Ok(Secret(value)),
                Err(std::env::VarError::NotPresent) => Err(SecretError::EnvMissing { var: var.clone() }),
                Err(std::env::VarError::NotUnicode(_)) => Err(SecretError::EnvNotText { var: var.clone() }),
            },
        }
    }
}

/// Reads a secret file, at most [`MAX_SECRET_FILE_BYTES`], trimmed.
fn read_file(path: &Path) -> Result<Secret, SecretError> {
    let unreadable = |source| SecretError::FileUnreadable { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(unreadable)?;
    let mut bytes = Vec::new();
    // One byte more than allowed tells "too large" from "exactly at the limit".
    file.take(MAX_SECRET_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(unreadable)?;
    if bytes.len() as u64 > MAX_SECRET_FILE_BYTES {
        return Err(SecretError::FileTooLarge { path: path.to_path_buf() });
    }
    let text = String::from_utf8(bytes).map_err(|_| SecretError::FileNotText { path: path.to_path_buf() })?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(SecretError::FileEmpty { path: path.to_path_buf() });
    }
    Ok(Secret(trimmed.to_owned()))
}

impl<'de> Deserialize<'de> for Secret {
    /// Reads a secret from stored state (the state store's records).
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret)
    }
}
