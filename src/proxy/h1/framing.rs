//! How an HTTP/1.1 message's body is delimited (RFC 9112 §6), decided from its header fields with hyper's rules.
//!
//! `Content-Length` is ASCII digits only: `str::parse` would take `+5`, and a value another hop reads differently
//! is how requests are smuggled (pingora's `v1/common.rs` makes the same point). Repeated `Content-Length` fields
//! must agree. `Transfer-Encoding` is chunked when its last coding is `chunked`.

/// Why a message's framing is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// A `Content-Length` that is not a plain decimal number (or overflows).
    #[error("invalid Content-Length")]
    InvalidLength,
    /// `Content-Length` fields with different values.
    #[error("conflicting Content-Length values")]
    ConflictingLengths,
    /// A request with both `Content-Length` and `Transfer-Encoding` (RFC 9112 §6.1: a classic desync).
    #[error("both Content-Length and Transfer-Encoding")]
    LengthWithTransferEncoding,
    /// A request `Transfer-Encoding` whose last coding is not `chunked` (its length cannot be known).
    #[error("Transfer-Encoding whose last coding is not chunked")]
    NotChunked,
}

/// A `Content-Length` value: one or more ASCII digits, nothing else, no overflow.
pub fn parse_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| match b {
        b'0'..=b'9' => n.checked_mul(10)?.checked_add(u64::from(b - b'0')),
        _ => None,
    })
}

/// Accumulates the framing fields of one message, field by field; the verdict comes once all are seen (with both
/// `Content-Length` and `Transfer-Encoding`, the second decides whatever the first says).
#[derive(Debug, Default, Clone)]
pub struct FramingFields {
    length: Option<u64>,
    length_error: Option<FramingError>,
    lengths: usize,
    transfer_encodings: usize,
    chunked: bool,
}

impl FramingFields {
    /// Takes one header field into account; other fields are ignored.
    pub fn add(&mut self, name: &[u8], value: &[u8]) {
        // Most fields are neither: their length says so without a comparison.
        if name.len() != 14 && name.len() != 17 {
            return;
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            self.lengths += 1;
            if self.length_error.is_some() {
                return;
            }
            match (parse_length(value), self.length) {
                (None, _) => self.length_error = Some(FramingError::InvalidLength),
                (Some(length), Some(seen)) if seen != length => {
                    self.length_error = Some(FramingError::ConflictingLengths)
                }
                (Some(length), _) => self.length = Some(length),
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.transfer_encodings += 1;
            self.chunked = last_coding_is_chunked(value);
        }
    }

    /// The agreed `Content-Length` (`None` without one), or why the fields are refused.
    pub fn length(&self) -> Result<Option<u64>, FramingError> {
        match self.length_error {
            Some(error) => Err(error),
            None => Ok(self.length),
        }
    }

    /// Whether the message has a `Content-Length` field, valid or not.
    pub fn has_length(&self) -> bool {
        self.lengths > 0
    }

    /// Whether the message has a `Transfer-Encoding`.
    pub fn has_transfer_encoding(&self) -> bool {
        self.transfer_encodings > 0
    }

    /// Whether the last coding of the last `Transfer-Encoding` field is `chunked`.
    pub fn chunked(&self) -> bool {
        self.chunked
    }
}

/// Whether the last coding of a `Transfer-Encoding` value is `chunked`.
pub fn last_coding_is_chunked(value: &[u8]) -> bool {
    value.rsplit(|&b| b == b',').next().is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_digits_only() {
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(parse_length(b"0042"), Some(42));
        assert_eq!(parse_length(b"18446744073709551615"), Some(u64::MAX));
        for bad in [&b""[..], b"+5", b"-1", b" 5", b"5 ", b"5\xa0", b"0x10", b"1e3", b"5,5", b"18446744073709551616"] {
            assert_eq!(parse_length(bad), None, "{}", bad.escape_ascii());
        }
    }

    #[test]
    fn repeated_lengths_must_agree() {
        let mut fields = FramingFields::default();
        fields.add(b"Content-Length", b"5");
        fields.add(b"content-length", b"5");
        assert_eq!(fields.length(), Ok(Some(5)));
        fields.add(b"CONTENT-LENGTH", b"6");
        assert_eq!(fields.length(), Err(FramingError::ConflictingLengths));
        let mut fields = FramingFields::default();
        fields.add(b"Content-Length", b"+5");
        assert_eq!((fields.length(), fields.has_length()), (Err(FramingError::InvalidLength), true));
        assert_eq!(FramingFields::default().length(), Ok(None));
    }

    #[test]
    fn chunked_is_the_last_coding_of_the_last_field() {
        let mut fields = FramingFields::default();
        fields.add(b"Transfer-Encoding", b"gzip, chunked");
        assert!(fields.chunked() && fields.has_transfer_encoding());
        fields.add(b"Transfer-Encoding", b"gzip");
        assert!(!fields.chunked());
        assert!(last_coding_is_chunked(b"chunked"));
        assert!(last_coding_is_chunked(b"identity ,  CHUNKED "));
        assert!(!last_coding_is_chunked(b"chunked, gzip"));
        assert!(!last_coding_is_chunked(b"xchunked"));
    }
}
