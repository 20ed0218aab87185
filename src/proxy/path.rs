//! The path policy: dot segments are removed before routing (RFC 3986 §5.2.4), so that `/api/../admin` is routed,
//! checked and forwarded as `/admin`, the way the upstream will read it.
//!
//! A dot segment may be percent-encoded (`%2e%2e`): it is removed the same way. A path that would climb above `/` is
//! refused, and so is a segment in which a dot segment meets an encoded slash or backslash (`..%2f`, `%2e%2e%5c`),
//! since servers disagree on whether that is one segment or two. Other encoded slashes stay as they are (APIs such as
//! GitLab's put `%2F` inside a segment) unless a route sets `encoded_slashes = "reject"`.
//!
//! A dot segment with path parameters (`..;x`, `.;`) is a dot segment too: Tomcat and Jetty drop the parameters and
//! then read `..`, so `/api/..;/admin` reaches `/admin` behind them. It is removed like `..` (or refused where a route
//! sets `path_parameters = "reject"`).

/// Why a path is refused (the detail of a 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// More `..` segments than there are segments above them.
    #[error("the path climbs above `/`")]
    AboveRoot,
    /// `..%2f`, `%2e%2e%5c`, `.\`: a dot segment joined to another by an encoded separator.
    #[error("a dot segment meets an encoded slash or backslash")]
    DotWithEncodedSlash,
    /// An encoded `/` or `\` on a route that refuses them.
    #[error("encoded slashes are refused on this route (encoded_slashes = \"reject\")")]
    EncodedSlash,
    /// A dot segment with path parameters (`..;x`) on a route that refuses them.
    #[error("a dot segment with path parameters (`..;`) is refused on this route (path_parameters = \"reject\")")]
    DotParameters,
}

/// The path with its dot segments removed: `None` when it has none (nearly every request), else the new path.
pub fn remove_dot_segments(path: &str) -> Result<Option<String>, PathError> {
    if !needs_a_look(path) {
        return Ok(None);
    }
    let mut out: Vec<&str> = Vec::new();
    let mut changed = false;
    let mut ends_in_dot = false;
    // A path starts with `/`: the first piece is empty.
    for segment in path.split('/').skip(1) {
        ends_in_dot = false;
        match dots(segment) {
            Some(1) => {
                changed = true;
                ends_in_dot = true;
            }
            Some(2) => {
                out.pop().ok_or(PathError::AboveRoot)?;
                changed = true;
                ends_in_dot = true;
            }
            _ => {
                if has_encoded_separator(segment) && pieces(segment).any(|piece| dots(piece).is_some()) {
                    return Err(PathError::DotWithEncodedSlash);
                }
                out.push(segment);
            }
        }
    }
    if !changed {
        return Ok(None);
    }
    let mut normalized = String::with_capacity(path.len());
    for segment in &out {
        normalized.push('/');
        normalized.push_str(segment);
    }
    // `/a/b/..` is the directory `/a/`: the trailing slash stays (RFC 3986 §5.2.4).
    if ends_in_dot || normalized.is_empty() {
        normalized.push('/');
    }
    Ok(Some(normalized))
}

/// Whether the path has an encoded `/` or `\` (for `encoded_slashes = "reject"`).
pub fn has_encoded_slash(path: &str) -> bool {
    path.contains('%') && has_encoded_separator(path)
}

/// Cheap test: only a path with `/.`, `%` or `\` can have a dot segment or an encoded separator. One pass over
/// the bytes (a substring search would set up a searcher on every request for a two-byte needle).
fn needs_a_look(path: &str) -> bool {
    let mut after_slash = false;
    path.as_bytes().iter().any(|&b| {
        let hit = b == b'%' || b == b'\\' || (after_slash && b == b'.');
        after_slash = b == b'/';
        hit
    })
}

/// Whether the path has a dot segment with path parameters (`..;x`, `.;`), for `path_parameters = "reject"`.
pub fn has_dot_parameters(path: &str) -> bool {
    path.contains(';') && path.split('/').any(|segment| segment.contains(';') && dots(segment).is_some())
}

/// `Some(n)` when `segment` is a dot segment of `n` dots (`.`, `..`, raw or as `%2e`), with or without path
/// parameters after them (`..;jsessionid=x`: servlet containers read it as `..`).
fn dots(segment: &str) -> Option<usize> {
    let bytes = segment.as_bytes();
    let mut i = 0;
    let mut n = 0;
    while i < bytes.len() {
        if bytes[i] == b'.' {
            i += 1;
        } else if bytes[i] == b'%' && bytes.get(i + 1) == Some(&b'2') && matches!(bytes.get(i + 2), Some(b'e' | b'E')) {
            i += 3;
        } else if bytes[i] == b';' {
            break;
        } else {
            return None;
        }
        n += 1;
    }
    (1..=2).contains(&n).then_some(n)
}

fn has_encoded_separator(segment: &str) -> bool {
    let bytes = segment.as_bytes();
    bytes.contains(&b'\\')
        || bytes.windows(3).any(|w| {
            w[0] == b'%' && (w[1] == b'2' && matches!(w[2], b'f' | b'F') || w[1] == b'5' && matches!(w[2], b'c' | b'C'))
        })
}

/// The pieces of a segment between its encoded separators (`%2f`, `%5c`) and raw backslashes.
fn pieces(segment: &str) -> impl Iterator<Item = &str> {
    let bytes = segment.as_bytes();
    let mut start = 0;
    let mut i = 0;
    std::iter::from_fn(move || {
        if start > bytes.len() {
            return None;
        }
        while i < bytes.len() {
            let width = match &bytes[i..] {
                [b'\\', ..] => 1,
                [b'%', b'2', b'f' | b'F', ..] | [b'%', b'5', b'c' | b'C', ..] => 3,
                _ => 0,
            };
            if width > 0 {
                let piece = &segment[start..i];
                i += width;
                start = i;
                return Some(piece);
            }
            i += 1;
        }
        let piece = &segment[start..];
        start = bytes.len() + 1;
        Some(piece)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normalized(path: &str) -> String {
        match remove_dot_segments(path) {
            Ok(Some(new)) => new,
            Ok(None) => path.to_owned(),
            Err(e) => panic!("{path}: {e}"),
        }
    }

    #[test]
    fn the_cheap_test_misses_no_path_that_has_a_dot_segment_or_an_escape() {
        // Every path of up to 6 bytes over the characters that matter, against the plain definition.
        let alphabet = [b'/', b'.', b'%', b'\\', b'a'];
        let mut paths = vec![Vec::new()];
        for _ in 0..6 {
            let longer: Vec<Vec<u8>> =
                paths.iter().flat_map(|p: &Vec<u8>| alphabet.iter().map(move |&c| [&p[..], &[c]].concat())).collect();
            for path in &longer {
                let path = std::str::from_utf8(path).expect("ascii");
                let plain = path.contains('%') || path.contains('\\') || path.contains("/.");
                assert_eq!(needs_a_look(path), plain, "{path:?}");
            }
            paths = longer;
        }
    }

    #[test]
    fn dot_segments_are_removed() {
        for (path, expected) in [
            ("/api/x", "/api/x"),
            ("/api/../admin", "/admin"),
            ("/api/./x", "/api/x"),
            ("/api/%2e%2e/admin", "/admin"),
            ("/api/%2E./admin", "/admin"),
            ("/api/.%2e/admin", "/admin"),
            ("/api/%2e/x", "/api/x"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a/..", "/"),
            ("/..a/.b/a../...", "/..a/.b/a../..."),
            ("/.well-known/openid-configuration", "/.well-known/openid-configuration"),
            ("/a//b/../c", "/a//c"),
            ("/a%2Fb/c", "/a%2Fb/c"),
            ("/", "/"),
            ("/api/..;/admin", "/admin"),
            ("/api/x/..;jsessionid=1/y", "/api/y"),
            ("/api/.;x/y", "/api/y"),
            ("/api/%2e%2e;/admin", "/admin"),
            ("/api/x;y=1/z", "/api/x;y=1/z"),
            ("/api/...;/z", "/api/...;/z"),
            ("/api/;/z", "/api/;/z"),
        ] {
            assert_eq!(normalized(path), expected, "{path}");
        }
        assert_eq!(remove_dot_segments("/api/x").unwrap(), None, "no copy when nothing changes");
    }

    #[test]
    fn climbing_above_the_root_and_dots_with_encoded_slashes_are_refused() {
        for path in ["/..", "/../admin", "/api/../../etc/passwd", "/%2e%2e/x"] {
            assert_eq!(remove_dot_segments(path), Err(PathError::AboveRoot), "{path}");
        }
        for path in
            ["/api/..%2fadmin", "/api/..%2Fadmin", "/api/%2e%2e%5cadmin", "/api/..\\admin", "/x/a%2f..%2fb", "/x/.%5c"]
        {
            assert_eq!(remove_dot_segments(path), Err(PathError::DotWithEncodedSlash), "{path}");
        }
    }

    #[test]
    fn segments_split_at_encoded_separators() {
        let split: Vec<&str> = pieces("a%2fb%5C%2e%2e\\c").collect();
        assert_eq!(split, ["a", "b", "%2e%2e", "c"]);
        assert_eq!(pieces("plain").collect::<Vec<_>>(), ["plain"]);
        assert_eq!(pieces("x%2f").collect::<Vec<_>>(), ["x", ""]);
    }

    #[test]
    fn dot_segments_with_parameters_are_seen() {
        assert!(has_dot_parameters("/api/..;/admin"));
        assert!(has_dot_parameters("/a/.;x"));
        assert!(has_dot_parameters("/a/%2e%2e;x/b"));
        assert!(!has_dot_parameters("/a/b;c=1"));
        assert!(!has_dot_parameters("/a/../b"));
        assert_eq!(remove_dot_segments("/..;/x"), Err(PathError::AboveRoot));
    }

    #[test]
    fn encoded_slashes_are_seen() {
        assert!(has_encoded_slash("/projects/group%2Fname"));
        assert!(has_encoded_slash("/a%5cb"));
        assert!(!has_encoded_slash("/a%20b/c"));
    }
}
