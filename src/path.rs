//! Path canonicalisation: the one form of a request path the gateway judges.
//!
//! The gateway decides on one canonical form of the path and forwards that
//! same form, so a scope check cannot be bypassed with `/api/../admin`,
//! `//admin`, `%2e%2e` or an encoded slash: the backend sees exactly the path
//! the gateway judged. Config route paths go through the same function, so
//! this module sits below both `config` and `route`.

/// Why a request path was refused before routing (answered with 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path must start with `/`")]
    NotAbsolute,
    #[error("encoded `/`, `\\` or NUL in path")]
    EncodedSeparator,
    #[error("malformed percent-encoding in path")]
    BadEncoding,
    #[error("`..` climbs above the root")]
    AboveRoot,
    /// Strict mode: `;` (raw or encoded) starts path parameters that Java
    /// servers strip (`/admin;x` is `/admin` to Tomcat, `..;` climbs).
    #[error("`;` in path")]
    Semicolon,
    /// Strict mode: `%25` followed by hex, decoded twice by some backends.
    #[error("double percent-encoding in path")]
    DoubleEncoded,
    /// Strict mode: encoded bytes that are not UTF-8 (overlong `%c0%ae` is
    /// `.` to lax decoders) or encoded control characters.
    #[error("encoded bytes in path are not UTF-8 text")]
    NotText,
    /// Strict mode: a segment ending in a dot or white space (`/admin.`,
    /// `/admin%20`), which Windows and some frameworks trim.
    #[error("path segment ends in a dot or white space")]
    TrailingDotOrSpace,
}

/// Refuses, in strict mode (`server.strict_paths`, the default), the path
/// forms that backends read differently from the canonical form the gateway
/// judges. Runs on the raw path, before [`normalize_path`]; costs one pass
/// over a path with no `%` or `;`.
pub fn check_strict(raw: &str) -> Result<(), PathError> {
    let bytes = raw.as_bytes();
    if !bytes.iter().any(|&b| matches!(b, b'%' | b';' | b'.')) {
        return Ok(());
    }
    // Percent-decode everything to judge the text a lax backend would see.
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b';' => return Err(PathError::Semicolon),
            b'%' => {
                let value = bytes
                    .get(i + 1..i + 3)
                    .and_then(|hex| std::str::from_utf8(hex).ok())
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                    .ok_or(PathError::BadEncoding)?;
                if value == b';' {
                    return Err(PathError::Semicolon);
                }
                if value.is_ascii_control() {
                    return Err(PathError::NotText);
                }
                decoded.push(value);
                i += 3;
            }
            b => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    // Decoded once, an escape still there (`%252e` -> `%2e`, and
    // `%25%32%65` too) is what a second decoding would act on.
    if decoded.windows(3).any(|w| w[0] == b'%' && w[1].is_ascii_hexdigit() && w[2].is_ascii_hexdigit()) {
        return Err(PathError::DoubleEncoded);
    }
    let text = std::str::from_utf8(&decoded).map_err(|_| PathError::NotText)?;
    let trailing = |segment: &str| {
        !matches!(segment, "." | "..") && segment.ends_with(|c: char| c == '.' || c.is_whitespace())
    };
    if text.split('/').any(trailing) {
        return Err(PathError::TrailingDotOrSpace);
    }
    Ok(())
}

/// Canonical form of a request path:
/// - percent-encoded unreserved characters (`A-Za-z0-9-._~`) are decoded, so
///   `%2e%2e` is seen as `..`; other escapes are kept, with uppercase hex;
/// - encoded `/`, `\` and NUL are refused (backends disagree on them);
/// - a literal `\` is refused for the same reason;
/// - empty segments (`//`) and `.` segments are removed, `..` resolved;
///   climbing above the root is refused.
///
/// A trailing slash is kept (`/a/` and `/a` are different resources to many APIs).
pub fn normalize_path(raw: &str) -> Result<String, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if is_already_normal(raw) {
        return Ok(raw.to_owned());
    }
    let decoded = decode_unreserved(raw)?;
    let mut segments: Vec<&str> = Vec::new();
    let mut parts = decoded.split('/').skip(1).peekable();
    let mut trailing_slash = false;
    while let Some(segment) = parts.next() {
        let last = parts.peek().is_none();
        match segment {
            "" | "." => trailing_slash = last,
            ".." => {
                segments.pop().ok_or(PathError::AboveRoot)?;
                trailing_slash = last;
            }
            s => {
                segments.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(out)
}

/// The common case, checked in one pass without allocating: no escapes, no
/// backslash, no empty, `.` or `..` segment. Such a path is its own normal form.
fn is_already_normal(raw: &str) -> bool {
    let bytes = raw.as_bytes();
    if bytes.iter().any(|&b| b == b'%' || b == b'\\') {
        return false;
    }
    // Segments after the leading `/`; a trailing `/` leaves one empty last
    // segment, which normalisation keeps.
    let mut segments = raw[1..].split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        if matches!(segment, "." | "..") || (segment.is_empty() && !last) {
            return false;
        }
    }
    true
}

fn decode_unreserved(raw: &str) -> Result<String, PathError> {
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(PathError::BadEncoding)?;
                let value = std::str::from_utf8(hex)
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or(PathError::BadEncoding)?;
                match value {
                    b'/' | b'\\' | 0 => return Err(PathError::EncodedSeparator),
                    b if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') => {
                        out.push(b as char)
                    }
                    b => {
                        out.push('%');
                        out.push_str(&format!("{b:02X}"));
                    }
                }
                i += 3;
            }
            b'\\' => return Err(PathError::EncodedSeparator),
            _ => {
                // hyper hands us ASCII, but config paths may hold any text:
                // copy the run up to the next `%` or `\` whole, so a
                // multi-byte character stays one (a byte pushed as a `char`
                // would be re-encoded as Latin-1: `é` became `Ã©`, found by
                // the normalize_path fuzzer).
                let run = raw[i..].find(['%', '\\']).map_or(raw.len(), |n| i + n);
                out.push_str(&raw[i..run]);
                i = run;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_mode_refuses_forms_backends_read_differently() {
        for (raw, want) in [
            ("/admin;x", PathError::Semicolon),
            ("/api/..;/admin", PathError::Semicolon),
            ("/api/%3B/admin", PathError::Semicolon),
            ("/api/%252e%252e/admin", PathError::DoubleEncoded),
            ("/api/%25%32%65", PathError::DoubleEncoded),
            ("/api/%c0%ae%c0%ae/admin", PathError::NotText),
            ("/api/%ff", PathError::NotText),
            ("/api/%0d%0aX:1", PathError::NotText),
            ("/admin.", PathError::TrailingDotOrSpace),
            ("/admin./x", PathError::TrailingDotOrSpace),
            ("/admin%20", PathError::TrailingDotOrSpace),
            ("/admin%2e", PathError::TrailingDotOrSpace),
            ("/a/.../b", PathError::TrailingDotOrSpace),
            ("/a%zz", PathError::BadEncoding),
        ] {
            assert_eq!(check_strict(raw), Err(want), "{raw}");
        }
        for raw in [
            "/",
            "/api/users",
            "/a/./b",
            "/a/../b",
            "/a%c3%a9",
            "/a%20b",
            "/v1.2/x",
            "/.well-known/x",
            "/a%25",
        ] {
            assert_eq!(check_strict(raw), Ok(()), "{raw}");
        }
    }

    #[test]
    fn normalisation_closes_traversal_tricks() {
        for (raw, want) in [
            ("/", "/"),
            ("/api/users", "/api/users"),
            ("/api/users/", "/api/users/"),
            ("//admin", "/admin"),
            ("/api/../admin", "/admin"),
            ("/api/%2e%2e/admin", "/admin"),
            ("/api/%2E%2E/admin", "/admin"),
            ("/api/./x", "/api/x"),
            ("/api/x/..", "/api/"),
            ("/a%7Eb", "/a~b"),
            ("/a%20b", "/a%20b"),
            ("/a%c3%a9", "/a%C3%A9"),
            ("/api//x", "/api/x"),
            ("/café/%25", "/café/%25"),
            ("/ünï/./%41", "/ünï/A"),
        ] {
            assert_eq!(normalize_path(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn the_fast_path_agrees_with_the_full_normalisation() {
        for raw in
            ["/", "/a", "/a/", "/a/b.c/d", "/a//b", "/a/./b", "/a/..", "/.", "//", "/a/.b", "/..a/b", "/a%41"]
        {
            if is_already_normal(raw) {
                let full = decode_unreserved(raw).ok().map(|d| d == raw);
                assert_eq!(full, Some(true), "{raw}");
                // And a second normalisation changes nothing.
                assert_eq!(normalize_path(raw).as_deref(), Ok(raw), "{raw}");
            }
        }
        assert!(is_already_normal("/api/v1/orders/"));
        assert!(!is_already_normal("/api//orders"));
        assert!(!is_already_normal("/api/./orders"));
    }

    #[test]
    fn normalisation_refuses_what_backends_read_differently() {
        assert_eq!(normalize_path("/api%2fadmin"), Err(PathError::EncodedSeparator));
        assert_eq!(normalize_path("/api%5Cadmin"), Err(PathError::EncodedSeparator));
        assert_eq!(normalize_path("/api\\admin"), Err(PathError::EncodedSeparator));
        assert_eq!(normalize_path("/a%00"), Err(PathError::EncodedSeparator));
        assert_eq!(normalize_path("/a%2"), Err(PathError::BadEncoding));
        assert_eq!(normalize_path("/a%zz"), Err(PathError::BadEncoding));
        assert_eq!(normalize_path("/.."), Err(PathError::AboveRoot));
        assert_eq!(normalize_path("/a/../../b"), Err(PathError::AboveRoot));
        assert_eq!(normalize_path("a"), Err(PathError::NotAbsolute));
    }

    proptest::proptest! {
        /// Normalising never panics, and a normalised path is its own normal
        /// form, so the gateway decides on exactly what it forwards.
        #[test]
        fn normalisation_is_total_and_idempotent(tail in "[a-zA-Z0-9./%\\\\_~-]{0,40}") {
            let raw = format!("/{tail}");
            if let Ok(normal) = normalize_path(&raw) {
                proptest::prop_assert_eq!(normalize_path(&normal), Ok(normal.clone()));
                proptest::prop_assert!(!normal.contains("//") && !normal.contains("/./") && !normal.contains("/../"));
            }
        }
    }
}
