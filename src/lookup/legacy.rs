//! Reading look-up input into a safe path relative to `watch.root`.
//!
//! The input is what remains after the HTTP query string was decoded once (docs/contract.md, "How
//! look-up input is read"): the string nginx used to receive. It takes one of three forms:
//!
//! | form | example | what is checked |
//! | --- | --- | --- |
//! | legacy path | `/record/a/b.mp4` | must lie under `legacy_prefix` |
//! | path relative to the root | `a/b.mp4` | nothing beyond the rules below |
//! | whole URL | `http://10.1.2.3:8080/record/a/b.mp4?x=1#f` | its path must lie under `legacy_prefix` |
//!
//! The rules, in the order they are applied:
//!
//! 1. More than [`MAX_INPUT_LEN`] bytes of input is refused ([`BadPath::TooLong`], which the HTTP
//!    layer answers with 414). A NUL byte anywhere is refused.
//! 2. A whole URL is recognised by `scheme://` (RFC 3986 scheme characters). Its authority is
//!    split off: user info is dropped, the port is checked to be a number and dropped, and the
//!    host is returned lower-cased in [`Legacy::host`] (IPv6 literals keep their brackets, as in
//!    a URL; zone identifiers are not accepted). A URL without a path names no file.
//! 3. In every form the query (`?…`) and fragment (`#…`) are cut off at the first literal `?` or
//!    `#`. A name that contains those characters arrives encoded (`%3F`, `%23`).
//! 4. The path is percent-decoded once into raw bytes. Any byte may result, including non-UTF-8;
//!    `+` stays a plus (this is a path, not a form). A `%` not followed by two hex digits is
//!    refused ([`BadPath::BadEscape`]), and so is a decoded NUL.
//! 5. **An encoded slash (`%2F`) is a separator**, exactly like `/`. A Linux file name cannot
//!    contain `/`, so `%2F` cannot be part of a name; nginx also decodes it before it maps the
//!    URI to a file. Splitting only after decoding also means that no encoding of `..` can slip
//!    past the check below.
//! 6. The decoded path is split on `/`. Empty and `.` segments are dropped (`//` and `/./`
//!    collapse). **Any `..` segment is refused**, even one that would stay inside the root:
//!    nothing the recording server writes is named that way, and refusing is simpler to trust
//!    than resolving. Each segment may have at most [`MAX_COMPONENT_LEN`] bytes.
//! 7. Whether the path is absolute is decided after decoding (a leading `%2F` counts). **An
//!    absolute path must lie under `legacy_prefix`**, matched segment by segment against the
//!    decoded path (`/recordings/x` is not under `/record`); the prefix is then removed.
//!    Anything else absolute, such as `/etc/passwd`, is refused ([`BadPath::OutsidePrefix`]). An
//!    empty prefix or `/` means nginx served the root at `/`, so every absolute path is under it.
//! 8. What remains must name something: an empty path, or one that is only the prefix, is
//!    refused ([`BadPath::Empty`]).
//!
//! The result contains only normal components (no root, no `.`, no `..`, no NUL), so joining it
//! onto `watch.root` cannot leave the root. Whether the file exists, is a symlink, or is
//! excluded is for the caller to decide.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

/// Longest input accepted, in bytes (Linux `PATH_MAX`).
pub const MAX_INPUT_LEN: usize = 4096;
/// Longest single path component accepted, in bytes (Linux `NAME_MAX`).
pub const MAX_COMPONENT_LEN: usize = 255;

/// A look-up input that was read successfully.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Legacy {
    /// The host of a whole-URL input, lower-cased, without port or user info; `None` for a bare
    /// path. Kept so that a look-up naming another recording host can be routed there later.
    pub host: Option<String>,
    /// The file's path relative to `watch.root`: only normal components, never empty, possibly
    /// not UTF-8.
    pub rel: PathBuf,
}

/// Why look-up input was refused. Every variant is answered as `bad_path` (or 414 for
/// [`BadPath::TooLong`] on the legacy route).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadPath {
    #[error("empty path: the input names no file under the root")]
    Empty,
    #[error("input is {len} bytes, more than the limit of {max}", max = MAX_INPUT_LEN)]
    TooLong { len: usize },
    #[error("a path component is {len} bytes, more than the limit of {max}", max = MAX_COMPONENT_LEN)]
    ComponentTooLong { len: usize },
    #[error("malformed percent escape at byte {offset} of the path")]
    BadEscape { offset: usize },
    #[error("the path contains a NUL byte")]
    Nul,
    #[error("the path contains a '..' segment, which could leave the root")]
    DotDot,
    #[error("absolute path is not under the legacy prefix {prefix:?}")]
    OutsidePrefix { prefix: String },
    #[error("malformed URL: {0}")]
    BadUrl(&'static str),
}

impl BadPath {
    /// A short, stable name for the reason, for JSON answers and metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            BadPath::Empty => "empty",
            BadPath::TooLong { .. } => "too_long",
            BadPath::ComponentTooLong { .. } => "component_too_long",
            BadPath::BadEscape { .. } => "bad_escape",
            BadPath::Nul => "nul",
            BadPath::DotDot => "dot_dot",
            BadPath::OutsidePrefix { .. } => "outside_prefix",
            BadPath::BadUrl(_) => "bad_url",
        }
    }

    /// True when the input was refused for its length alone (HTTP 414 on the legacy route).
    pub fn is_too_long(&self) -> bool {
        matches!(self, BadPath::TooLong { .. })
    }
}

/// Reads look-up input (see the module documentation for the rules) into a path relative to
/// the root, and the host when the input was a whole URL.
pub fn parse_legacy(input: &[u8], legacy_prefix: &str) -> Result<Legacy, BadPath> {
    let (host, decoded) = host_and_path(input)?;
    let absolute = decoded.first() == Some(&b'/');

    // One pass over the segments: every one is checked, an absolute path's first ones must be
    // the prefix's, the rest are joined into `rel`. Malformed segments are reported before a
    // prefix mismatch, wherever they are.
    let mut prefix = legacy_prefix
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .map(str::as_bytes);
    let mut expected = if absolute { prefix.next() } else { None };
    let mut outside = false;
    let mut rel = Vec::with_capacity(decoded.len());
    for segment in decoded.split(|&b| b == b'/') {
        match segment {
            b"" | b"." => continue,
            b".." => return Err(BadPath::DotDot),
            _ if segment.len() > MAX_COMPONENT_LEN => {
                return Err(BadPath::ComponentTooLong { len: segment.len() });
            }
            _ => {}
        }
        if outside {
            continue;
        }
        if let Some(want) = expected {
            if segment == want {
                expected = prefix.next();
            } else {
                outside = true;
            }
            continue;
        }
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(segment);
    }
    if outside || expected.is_some() {
        return Err(BadPath::OutsidePrefix {
            prefix: legacy_prefix.to_owned(),
        });
    }
    if rel.is_empty() {
        return Err(BadPath::Empty);
    }
    Ok(Legacy {
        host,
        rel: PathBuf::from(OsString::from_vec(rel)),
    })
}

/// The host of a whole-URL input, and the input's path without query or fragment,
/// percent-decoded once.
fn host_and_path(input: &[u8]) -> Result<(Option<String>, Vec<u8>), BadPath> {
    if input.len() > MAX_INPUT_LEN {
        return Err(BadPath::TooLong { len: input.len() });
    }
    if input.contains(&0) {
        return Err(BadPath::Nul);
    }
    let (host, target) = match after_scheme(input) {
        Some(rest) => split_authority(rest)?,
        None => (None, input),
    };
    let path = match target.iter().position(|&b| b == b'?' || b == b'#') {
        Some(end) => &target[..end],
        None => target,
    };
    Ok((host, percent_decode(path)?))
}

/// If `input` starts with `scheme://`, the part after `://`.
fn after_scheme(input: &[u8]) -> Option<&[u8]> {
    let first = input.first()?;
    if !first.is_ascii_alphabetic() {
        return None;
    }
    let end = input
        .iter()
        .position(|&b| !(b.is_ascii_alphanumeric() || b == b'+' || b == b'-' || b == b'.'))?;
    input[end..].strip_prefix(b"://")
}

/// Splits `authority/path…` into the lower-cased host (if any) and the rest, which is empty or
/// starts with `/`, `?` or `#`.
fn split_authority(rest: &[u8]) -> Result<(Option<String>, &[u8]), BadPath> {
    let end = rest
        .iter()
        .position(|&b| b == b'/' || b == b'?' || b == b'#')
        .unwrap_or(rest.len());
    let (authority, target) = rest.split_at(end);
    let host_port = match authority.iter().rposition(|&b| b == b'@') {
        Some(at) => &authority[at + 1..],
        None => authority,
    };

    let (host, port) = if host_port.first() == Some(&b'[') {
        let close = host_port
            .iter()
            .position(|&b| b == b']')
            .ok_or(BadPath::BadUrl("unterminated IPv6 address"))?;
        let inner = &host_port[1..close];
        if inner.is_empty()
            || !inner
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return Err(BadPath::BadUrl("invalid IPv6 address"));
        }
        let after = &host_port[close + 1..];
        let port = match after.split_first() {
            None => None,
            Some((b':', port)) => Some(port),
            Some(_) => return Err(BadPath::BadUrl("unexpected text after IPv6 address")),
        };
        (&host_port[..=close], port)
    } else {
        match host_port.iter().position(|&b| b == b':') {
            Some(colon) => (&host_port[..colon], Some(&host_port[colon + 1..])),
            None => (host_port, None),
        }
    };

    if let Some(port) = port {
        let valid = port.len() <= 5
            && port.iter().all(u8::is_ascii_digit)
            && port.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0')) <= 65535;
        if !valid {
            return Err(BadPath::BadUrl("invalid port"));
        }
    }

    if host.is_empty() {
        return Ok((None, target));
    }
    let host_ok = host.first() == Some(&b'[')
        || host
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'));
    if !host_ok {
        return Err(BadPath::BadUrl("invalid host"));
    }
    let host = String::from_utf8_lossy(host).to_ascii_lowercase();
    Ok((Some(host), target))
}

/// Percent-decodes `path` once. Malformed escapes and decoded NUL bytes are refused.
fn percent_decode(path: &[u8]) -> Result<Vec<u8>, BadPath> {
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while let Some(&b) = path.get(i) {
        if b == b'%' {
            let hi = path.get(i + 1).and_then(|&c| hex_value(c));
            let lo = path.get(i + 2).and_then(|&c| hex_value(c));
            let (Some(hi), Some(lo)) = (hi, lo) else {
                return Err(BadPath::BadEscape { offset: i });
            };
            let byte = hi << 4 | lo;
            if byte == 0 {
                return Err(BadPath::Nul);
            }
            out.push(byte);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    Ok(out)
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Checks the promises [`parse_legacy`] makes about a successful result; shared by the unit
/// tests and the fuzz target. Returns a description of the first broken promise.
#[doc(hidden)]
pub fn check_invariants(result: &Result<Legacy, BadPath>) -> Result<(), String> {
    use std::path::Component;
    let Ok(legacy) = result else {
        return Ok(());
    };
    if legacy.rel.as_os_str().is_empty() {
        return Err("empty rel".into());
    }
    if legacy.rel.as_os_str().as_bytes().contains(&0) {
        return Err(format!("NUL in {:?}", legacy.rel));
    }
    if legacy.rel.as_os_str().len() > MAX_INPUT_LEN {
        return Err(format!("rel longer than the input limit: {:?}", legacy.rel));
    }
    for component in legacy.rel.components() {
        match component {
            Component::Normal(name) => {
                let bytes = name.as_bytes();
                if bytes == b".." || bytes == b"." || bytes.contains(&b'/') {
                    return Err(format!("bad component {name:?} in {:?}", legacy.rel));
                }
                if bytes.len() > MAX_COMPONENT_LEN {
                    return Err(format!("overlong component in {:?}", legacy.rel));
                }
            }
            other => return Err(format!("{other:?} in {:?}", legacy.rel)),
        }
    }
    if let Some(host) = &legacy.host {
        let bracketed = host.starts_with('[') && host.ends_with(']');
        if host.is_empty()
            || host.bytes().any(|b| b.is_ascii_uppercase())
            || (!bracketed && host.contains(':'))
        {
            return Err(format!("bad host {host:?}"));
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::ffi::OsStr;
    use std::path::Path;

    /// The segment handling as first written (a vector of segments, then the prefix): the
    /// one-pass version must agree with it on every input.
    fn reference(input: &[u8], legacy_prefix: &str) -> Result<Legacy, BadPath> {
        let (host, decoded) = host_and_path(input)?;
        let absolute = decoded.first() == Some(&b'/');
        let mut segments = Vec::new();
        for segment in decoded.split(|&b| b == b'/') {
            match segment {
                b"" | b"." => {}
                b".." => return Err(BadPath::DotDot),
                _ if segment.len() > MAX_COMPONENT_LEN => {
                    return Err(BadPath::ComponentTooLong { len: segment.len() });
                }
                _ => segments.push(segment),
            }
        }
        let mut rest: &[&[u8]] = &segments;
        if absolute {
            for expected in legacy_prefix
                .split('/')
                .filter(|s| !s.is_empty() && *s != ".")
            {
                match rest.split_first() {
                    Some((first, tail)) if *first == expected.as_bytes() => rest = tail,
                    _ => {
                        return Err(BadPath::OutsidePrefix {
                            prefix: legacy_prefix.to_owned(),
                        });
                    }
                }
            }
        }
        if rest.is_empty() {
            return Err(BadPath::Empty);
        }
        let rel: PathBuf = rest.iter().map(|s| OsStr::from_bytes(s)).collect();
        Ok(Legacy { host, rel })
    }

    #[test]
    fn one_pass_agrees_with_the_reference() {
        let alphabet: &[&[u8]] = &[
            b"/",
            b"/",
            b"/",
            b".",
            b"..",
            b"%2e",
            b"%2E",
            b"%2f",
            b"%",
            b"%zz",
            b"record",
            b"rec",
            b"a",
            b"b c",
            b"\xff",
            b"?",
            b"#",
            b"http://h",
            b"://",
            b"@",
            b":80",
            b"%00",
            b"\0",
            b"x".repeat(300).leak(),
        ];
        let prefixes = ["/record", "/", "", "/a/./b", "record/"];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..200_000 {
            let mut input = Vec::new();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            for _ in 0..(x % 9) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                input.extend_from_slice(alphabet[(x % alphabet.len() as u64) as usize]);
            }
            let prefix = prefixes[(x >> 40) as usize % prefixes.len()];
            assert_eq!(
                parse_legacy(&input, prefix),
                reference(&input, prefix),
                "{:?} under {prefix:?}",
                String::from_utf8_lossy(&input)
            );
        }
    }

    fn ok(input: &str) -> Legacy {
        ok_bytes(input.as_bytes(), "/record")
    }

    fn ok_bytes(input: &[u8], prefix: &str) -> Legacy {
        match parse_legacy(input, prefix) {
            Ok(legacy) => {
                check_invariants(&Ok(legacy.clone())).unwrap();
                legacy
            }
            Err(e) => panic!(
                "{:?} with prefix {prefix:?} refused: {e}",
                String::from_utf8_lossy(input)
            ),
        }
    }

    fn rel(input: &str) -> PathBuf {
        ok(input).rel
    }

    fn bad(input: &str) -> BadPath {
        bad_with(input, "/record")
    }

    fn bad_with(input: &str, prefix: &str) -> BadPath {
        match parse_legacy(input.as_bytes(), prefix) {
            Ok(legacy) => panic!("{input:?} accepted as {legacy:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn spec_example() {
        // docs/contract.md: `a+b %.mp4` is `/record/a+b%20%25.mp4` in a legacy URL.
        let legacy = ok("/record/a+b%20%25.mp4");
        assert_eq!(legacy.rel, Path::new("a+b %.mp4"));
        assert_eq!(legacy.host, None);
    }

    #[test]
    fn three_forms() {
        assert_eq!(rel("/record/a/b.mp4"), Path::new("a/b.mp4"));
        assert_eq!(rel("a/b.mp4"), Path::new("a/b.mp4"));
        let legacy = ok("http://10.1.2.3:8080/record/a/b.mp4?x=1#f");
        assert_eq!(legacy.rel, Path::new("a/b.mp4"));
        assert_eq!(legacy.host.as_deref(), Some("10.1.2.3"));
    }

    #[test]
    fn relative_paths_are_under_the_root_not_the_prefix() {
        assert_eq!(rel("record/a.mp4"), Path::new("record/a.mp4"));
        assert_eq!(rel("etc/passwd"), Path::new("etc/passwd"));
    }

    #[test]
    fn chinese_names() {
        // 录像/会议.mp4 percent-encoded as UTF-8.
        let input = "/record/%E5%BD%95%E5%83%8F/%E4%BC%9A%E8%AE%AE.mp4";
        assert_eq!(rel(input), Path::new("录像/会议.mp4"));
        // Unencoded UTF-8 is taken as it is.
        assert_eq!(rel("/record/录像/会议.mp4"), Path::new("录像/会议.mp4"));
    }

    #[test]
    fn encoded_hash_question_mark_and_percent() {
        assert_eq!(rel("/record/a%23b%3Fc%25d.mp4"), Path::new("a#b?c%d.mp4"));
        assert_eq!(rel("/record/a%23b.mp4#frag"), Path::new("a#b.mp4"));
        assert_eq!(rel("/record/a.mp4?%zz"), Path::new("a.mp4"));
    }

    #[test]
    fn plus_stays_plus_and_double_encoding_decodes_once() {
        assert_eq!(rel("/record/a+b.mp4"), Path::new("a+b.mp4"));
        assert_eq!(rel("/record/a%2Bb.mp4"), Path::new("a+b.mp4"));
        // Decoded once only: `%252e%252e` is a file literally named `%2e%2e`.
        assert_eq!(rel("/record/%252e%252e/x"), Path::new("%2e%2e/x"));
        assert_eq!(rel("/record/%2520"), Path::new("%20"));
    }

    #[test]
    fn non_utf8_names() {
        let legacy = ok("/record/%FF%FEname.mp4");
        assert_eq!(legacy.rel.as_os_str().as_bytes(), b"\xff\xfename.mp4");
        let legacy = ok_bytes(b"/record/raw\xe9.mp4", "/record");
        assert_eq!(legacy.rel.as_os_str().as_bytes(), b"raw\xe9.mp4");
    }

    #[test]
    fn encoded_slash_is_a_separator() {
        assert_eq!(rel("/record/a%2Fb.mp4"), Path::new("a/b.mp4"));
        assert_eq!(rel("/record%2Fa%2fb.mp4"), Path::new("a/b.mp4"));
        assert_eq!(rel("%2Frecord%2Fa.mp4"), Path::new("a.mp4"));
        assert!(matches!(
            bad("%2Fetc%2Fpasswd"),
            BadPath::OutsidePrefix { .. }
        ));
    }

    #[test]
    fn slashes_and_dots_collapse() {
        assert_eq!(rel("/record//a///b.mp4"), Path::new("a/b.mp4"));
        assert_eq!(rel("/record/./a/./b.mp4"), Path::new("a/b.mp4"));
        assert_eq!(rel("//record/a.mp4"), Path::new("a.mp4"));
        assert_eq!(rel("/./record/a.mp4"), Path::new("a.mp4"));
        assert_eq!(rel("/record/%2e/a.mp4"), Path::new("a.mp4"));
        assert_eq!(rel("/record/a/"), Path::new("a"));
        assert_eq!(rel("./a.mp4"), Path::new("a.mp4"));
        // Names that merely contain dots are names.
        assert_eq!(
            rel("/record/.../..a/a../.hidden"),
            Path::new(".../..a/a../.hidden")
        );
    }

    #[test]
    fn every_spelling_of_dot_dot_is_refused() {
        let cases = [
            "/record/../etc/passwd",
            "/record/a/../b.mp4",
            "/record/..",
            "/record/a/..",
            "../x",
            "..",
            "a/../../x",
            "/record/%2e%2e/x",
            "/record/%2E%2E/x",
            "/record/%2E./x",
            "/record/.%2e/x",
            "/record/%2e%2E",
            "/record/a%2F..%2Fb",
            "/record/a%2f%2e%2e%2fb",
            "/record/..%2Fetc",
            "%2e%2e/x",
            "%2e%2e%2fx",
            "/record/./../x",
            "/record//..//x",
            "http://h/record/../x",
            "http://h/record/%2e%2e/x",
            "http://h/record/a/%2E%2E",
        ];
        for case in cases {
            assert_eq!(bad(case), BadPath::DotDot, "{case}");
        }
        // The prefix-only traversal is refused before any prefix check.
        assert_eq!(bad("/../record/x"), BadPath::DotDot);
        assert_eq!(bad("/record/../record/x"), BadPath::DotDot);
    }

    #[test]
    fn nul_is_refused() {
        assert_eq!(bad("/record/a%00.mp4"), BadPath::Nul);
        assert_eq!(bad("/record/a\0.mp4"), BadPath::Nul);
        assert_eq!(bad("/record/a.mp4?\0"), BadPath::Nul);
        assert_eq!(bad("a%00"), BadPath::Nul);
    }

    #[test]
    fn malformed_escapes_are_refused() {
        assert_eq!(bad("/record/a%zz.mp4"), BadPath::BadEscape { offset: 9 });
        assert_eq!(bad("/record/a.mp4%"), BadPath::BadEscape { offset: 13 });
        assert_eq!(bad("/record/a.mp4%4"), BadPath::BadEscape { offset: 13 });
        assert_eq!(bad("/record/%4g"), BadPath::BadEscape { offset: 8 });
        assert_eq!(bad("/record/%%41"), BadPath::BadEscape { offset: 8 });
        assert_eq!(bad("/record/%.."), BadPath::BadEscape { offset: 8 });
        assert_eq!(bad("%"), BadPath::BadEscape { offset: 0 });
        assert!(matches!(
            bad("http://h/record/%"),
            BadPath::BadEscape { .. }
        ));
    }

    #[test]
    fn empty_and_prefix_only_are_refused() {
        for case in [
            "",
            "/record",
            "/record/",
            "/record//./",
            ".",
            "./",
            "?x=1",
            "#f",
            "http://h",
            "http://h/record",
            "http://h/record/?x",
            "http://h?x=/record/a",
        ] {
            assert_eq!(bad(case), BadPath::Empty, "{case:?}");
        }
    }

    #[test]
    fn absolute_paths_outside_the_prefix_are_refused() {
        for case in [
            "/etc/passwd",
            "/recordings/x.mp4",
            "/recor/x.mp4",
            "/x/record/a.mp4",
            "/RECORD/a.mp4",
            "http://h/etc/passwd",
            "http://h/recordings/a.mp4",
            // The bare root is not under the prefix either.
            "/",
            "//",
            "http://h/",
        ] {
            assert!(matches!(bad(case), BadPath::OutsidePrefix { .. }), "{case}");
        }
        let e = bad("/etc/passwd");
        assert_eq!(
            e.to_string(),
            "absolute path is not under the legacy prefix \"/record\""
        );
        assert_eq!(e.reason(), "outside_prefix");
    }

    #[test]
    fn prefix_is_matched_on_decoded_segments() {
        assert_eq!(rel("/rec%6Frd/a.mp4"), Path::new("a.mp4"));
        assert_eq!(rel("/record%2Fa.mp4"), Path::new("a.mp4"));
    }

    #[test]
    fn prefix_spellings() {
        for prefix in ["/record", "/record/", "record", "//record/./"] {
            assert_eq!(ok_bytes(b"/record/a.mp4", prefix).rel, Path::new("a.mp4"));
        }
        assert_eq!(
            ok_bytes(b"/media/rec/a.mp4", "/media/rec").rel,
            Path::new("a.mp4")
        );
        assert!(matches!(
            bad_with("/media/a.mp4", "/media/rec"),
            BadPath::OutsidePrefix { .. }
        ));
        assert_eq!(bad_with("/media/rec", "/media/rec"), BadPath::Empty);
    }

    #[test]
    fn empty_prefix_serves_the_root_at_slash() {
        for prefix in ["", "/"] {
            assert_eq!(ok_bytes(b"/a/b.mp4", prefix).rel, Path::new("a/b.mp4"));
            assert_eq!(
                ok_bytes(b"/record/a.mp4", prefix).rel,
                Path::new("record/a.mp4")
            );
            assert_eq!(
                ok_bytes(b"/etc/passwd", prefix).rel,
                Path::new("etc/passwd")
            );
            assert_eq!(
                ok_bytes(b"http://h:1/a.mp4", prefix).rel,
                Path::new("a.mp4")
            );
            assert_eq!(bad_with("/", prefix), BadPath::Empty);
            assert_eq!(bad_with("/../etc/passwd", prefix), BadPath::DotDot);
        }
    }

    #[test]
    fn overlong_input_and_components() {
        let long = format!("/record/{}", "a/".repeat(2100));
        assert_eq!(bad(&long), BadPath::TooLong { len: long.len() });
        assert!(bad(&long).is_too_long());
        // 4096 bytes exactly is accepted.
        let exact = format!("/record/{}", "ab/".repeat(1362));
        let exact = format!("{exact}{}", "x".repeat(4096 - exact.len()));
        assert_eq!(exact.len(), 4096);
        assert!(parse_legacy(exact.as_bytes(), "/record").is_ok());

        let name = "n".repeat(255);
        assert_eq!(rel(&format!("/record/{name}")), Path::new(&name));
        let name = "n".repeat(256);
        assert_eq!(
            bad(&format!("/record/{name}")),
            BadPath::ComponentTooLong { len: 256 }
        );
        // The limit applies to the decoded bytes: 255 `%41` escapes decode to 255 bytes.
        assert_eq!(
            rel(&format!("/record/{}", "%41".repeat(255)))
                .as_os_str()
                .len(),
            255
        );
        assert_eq!(
            bad(&format!("/record/{}", "%41".repeat(256))),
            BadPath::ComponentTooLong { len: 256 }
        );
        // A long prefix segment in the query does not count.
        assert!(
            parse_legacy(
                format!("/record/a?{}", "q".repeat(300)).as_bytes(),
                "/record"
            )
            .is_ok()
        );
    }

    #[test]
    fn whole_urls() {
        let cases: &[(&str, Option<&str>, &str)] = &[
            (
                "http://10.1.2.3/record/a/b.mp4",
                Some("10.1.2.3"),
                "a/b.mp4",
            ),
            (
                "https://Rec-01.Example.COM:443/record/a.mp4",
                Some("rec-01.example.com"),
                "a.mp4",
            ),
            ("http://[::1]:8080/record/a.mp4", Some("[::1]"), "a.mp4"),
            (
                "http://[2001:DB8::1]/record/a.mp4",
                Some("[2001:db8::1]"),
                "a.mp4",
            ),
            (
                "http://[::ffff:10.0.0.1]:80/record/a.mp4",
                Some("[::ffff:10.0.0.1]"),
                "a.mp4",
            ),
            ("http://user:pw@host:81/record/a.mp4", Some("host"), "a.mp4"),
            ("http://us@er@host/record/a.mp4", Some("host"), "a.mp4"),
            ("http://host:/record/a.mp4", Some("host"), "a.mp4"),
            ("HTTP://HOST/record/a.mp4", Some("host"), "a.mp4"),
            ("rtmp+x.y-z://host/record/a.mp4", Some("host"), "a.mp4"),
            ("file:///record/a.mp4", None, "a.mp4"),
            ("http://h/record/a.mp4?x=1#f", Some("h"), "a.mp4"),
            ("http://h/record/a.mp4#f?x", Some("h"), "a.mp4"),
            ("http://h/record/a%3Fb.mp4?x=/../..", Some("h"), "a?b.mp4"),
            ("http://h/record/a%20b.mp4", Some("h"), "a b.mp4"),
        ];
        for (input, host, path) in cases {
            let legacy = ok(input);
            assert_eq!(legacy.host.as_deref(), *host, "{input}");
            assert_eq!(legacy.rel, Path::new(path), "{input}");
        }
    }

    #[test]
    fn malformed_urls() {
        for case in [
            "http://[::1/record/a.mp4",
            "http://[zz]/record/a.mp4",
            "http://[]/record/a.mp4",
            "http://[::1]x/record/a.mp4",
            "http://h:80x/record/a.mp4",
            "http://h:65536/record/a.mp4",
            "http://h:123456/record/a.mp4",
            "http://h%41/record/a.mp4",
            "http://h h/record/a.mp4",
            "http://h:1:2/record/a.mp4",
        ] {
            assert!(matches!(bad(case), BadPath::BadUrl(_)), "{case}");
        }
    }

    #[test]
    fn things_that_look_like_urls_but_are_not() {
        // No `://`: a relative path whose first segment has a colon.
        assert_eq!(rel("http:/record/a.mp4"), Path::new("http:/record/a.mp4"));
        assert_eq!(rel("c:a.mp4"), Path::new("c:a.mp4"));
        assert_eq!(rel("1http://h/a"), Path::new("1http:/h/a"));
        // Encoded `://` is not a scheme either.
        assert_eq!(rel("http%3A%2F%2Fh/a"), Path::new("http:/h/a"));
    }

    #[test]
    fn display_messages_are_clear() {
        assert_eq!(
            BadPath::Empty.to_string(),
            "empty path: the input names no file under the root"
        );
        assert_eq!(
            BadPath::TooLong { len: 5000 }.to_string(),
            "input is 5000 bytes, more than the limit of 4096"
        );
        assert_eq!(
            BadPath::BadEscape { offset: 3 }.to_string(),
            "malformed percent escape at byte 3 of the path"
        );
        assert_eq!(BadPath::DotDot.reason(), "dot_dot");
    }

    /// Same invariants as the fuzz target, over seeded pseudo-random inputs built from pieces
    /// that tend to matter (separators, dots, escapes, URL syntax) and from raw bytes.
    #[test]
    fn invariants_hold_for_generated_inputs() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};

        const PIECES: &[&[u8]] = &[
            b"/",
            b"//",
            b".",
            b"..",
            b"%2e",
            b"%2E",
            b"%2f",
            b"%2F",
            b"%25",
            b"%00",
            b"%",
            b"%z",
            b"%4",
            b"a",
            b"record",
            b"/record",
            b"/record/",
            b"http://",
            b"HTTPS://",
            b"h",
            b"[::1]",
            b"[",
            b"]",
            b":8080",
            b":",
            b"@",
            b"?",
            b"#",
            b"\0",
            b"+",
            b" ",
            b"%20",
            b"\xe5\xbd\x95",
            b"\xff",
            b"%FF",
            b"%E5%BD%95",
            b"\\",
            b"..%2f",
            b"%2e.",
        ];
        let prefixes = ["/record", "", "/", "/a/b", "record/"];
        let mut rng = StdRng::seed_from_u64(0x5eed_1e9a);
        let mut accepted = 0;
        for round in 0..6000 {
            let mut input = Vec::new();
            if round % 3 == 0 {
                let len = rng.random_range(0..64);
                input.extend((0..len).map(|_| rng.random::<u8>()));
            } else {
                for _ in 0..rng.random_range(0..24) {
                    input.extend_from_slice(PIECES[rng.random_range(0..PIECES.len())]);
                }
            }
            if round % 97 == 0 {
                input.extend(std::iter::repeat_n(b'x', rng.random_range(200..4200)));
            }
            let prefix = prefixes[rng.random_range(0..prefixes.len())];
            let result = parse_legacy(&input, prefix);
            if let Err(why) = check_invariants(&result) {
                panic!(
                    "{:?} with prefix {prefix:?}: {why}",
                    String::from_utf8_lossy(&input)
                );
            }
            if let Ok(legacy) = &result {
                accepted += 1;
                // Nothing accepted can name a `..` after any further decoding either way.
                assert!(
                    !legacy
                        .rel
                        .as_os_str()
                        .as_bytes()
                        .split(|&b| b == b'/')
                        .any(|s| s == b"..")
                );
            }
        }
        // The generator must exercise the success path too, not only refusals.
        assert!(accepted > 500, "only {accepted} inputs accepted");
    }
}
