//! Object keys: `storage.key_template` rendered for one file.
//!
//! Placeholders are `{node}` (the node name) and `{path}` (the file's path relative to the watch
//! root, `/`-separated). `{path}` is required, so two files never share a key. Keys are
//! deterministic: the same file always maps to the same key, so a restart or a retry overwrites
//! rather than duplicates.
//!
//! A rendered key never starts with `/` and never has a `.` or `..` segment (between slashes):
//! some stores and every file-system-backed one would resolve those, so a key could name an
//! object outside this node's prefix. Configuration refuses templates and node names that could
//! produce one ([`KeyTemplate::check_node`]), and [`KeyTemplate::render`] refuses them again.
//!
//! Object keys must be UTF-8. A file name that is not valid UTF-8 keeps its valid parts and
//! writes each byte of an invalid sequence as `%XX` (upper-case hex); the journal stores the
//! key, so look-ups find the object by the file's real path.

use std::fmt::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::util::fs::Identity;

/// S3 and OSS refuse keys over 1024 bytes.
pub const MAX_KEY_BYTES: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Lit(String),
    Node,
    Path,
}

/// A parsed `storage.key_template`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    pieces: Vec<Piece>,
}

impl KeyTemplate {
    pub fn parse(template: &str) -> Result<KeyTemplate, String> {
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut rest = template;
        while let Some(c) = rest.chars().next() {
            match c {
                '{' => {
                    let Some(end) = rest.find('}') else {
                        return Err(format!("unclosed '{{' in {template:?}"));
                    };
                    let name = &rest[1..end];
                    let piece = match name {
                        "node" => Piece::Node,
                        "path" => Piece::Path,
                        other => {
                            return Err(format!(
                                "unknown placeholder {{{other}}} in {template:?}; known: {{node}}, {{path}}"
                            ));
                        }
                    };
                    if !lit.is_empty() {
                        pieces.push(Piece::Lit(std::mem::take(&mut lit)));
                    }
                    pieces.push(piece);
                    rest = &rest[end + 1..];
                }
                '}' => return Err(format!("unmatched '}}' in {template:?}")),
                c => {
                    lit.push(c);
                    rest = &rest[c.len_utf8()..];
                }
            }
        }
        if !lit.is_empty() {
            pieces.push(Piece::Lit(lit));
        }
        if pieces.iter().filter(|p| **p == Piece::Path).count() != 1 {
            return Err(format!(
                "must contain {{path}} exactly once (so every file has its own key), got {template:?}"
            ));
        }
        if let Some(Piece::Lit(first)) = pieces.first()
            && first.starts_with('/')
        {
            return Err(format!("must not start with '/', got {template:?}"));
        }
        Ok(KeyTemplate { pieces })
    }

    /// The key for `rel` (relative to the watch root) on `node`.
    pub fn render(&self, node: &str, rel: &Path) -> Result<String, String> {
        let path_len = rel.as_os_str().len();
        let mut key = String::with_capacity(
            self.pieces
                .iter()
                .map(|p| match p {
                    Piece::Lit(s) => s.len(),
                    Piece::Node => node.len(),
                    Piece::Path => path_len,
                })
                .sum(),
        );
        for piece in &self.pieces {
            match piece {
                Piece::Lit(s) => key.push_str(s),
                Piece::Node => key.push_str(node),
                Piece::Path => push_path(&mut key, rel),
            }
        }
        if key.len() > MAX_KEY_BYTES {
            return Err(format!(
                "object key would be {} bytes; the store allows {MAX_KEY_BYTES}",
                key.len()
            ));
        }
        check_key(&key)?;
        Ok(key)
    }

    /// Checks that this template renders safe keys for `node` (a valid `node.name`: no `/`).
    /// Every segment that holds part of `{path}` is safe whatever the path, since a path
    /// component is never empty, `.` or `..`; so one sample path shows whether the literal text
    /// and the node name can form a `.` or `..` segment.
    pub fn check_node(&self, node: &str) -> Result<(), String> {
        if node.is_empty() || node.contains('/') || node == "." || node == ".." {
            return Err(format!(
                "node name {node:?} cannot be part of an object key"
            ));
        }
        self.render(node, Path::new("x")).map(|_| ())
    }

    /// The literal text before `{path}` with `{node}` filled in: every key of this node starts
    /// with it (used to find this node's stray multipart uploads).
    pub fn prefix(&self, node: &str) -> String {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Lit(s) => out.push_str(s),
                Piece::Node => out.push_str(node),
                Piece::Path => break,
            }
        }
        out
    }
}

/// User metadata naming the exact file version an object was made from:
/// `generation:dev:inode:size:mtime_ns`. After a crash between completing an upload and
/// recording it, a HEAD that shows this (and the right size) proves the object is already
/// this file, so it is not uploaded again.
pub const SOURCE_META: &str = "ro-source";

pub fn source_tag(generation: i64, id: &Identity) -> String {
    format!(
        "{generation}:{}:{}:{}:{}",
        id.dev, id.ino, id.size, id.mtime_ns
    )
}

fn push_path(key: &mut String, rel: &Path) {
    let bytes = rel.as_os_str().as_bytes();
    for chunk in bytes.utf8_chunks() {
        key.push_str(chunk.valid());
        for b in chunk.invalid() {
            let _ = write!(key, "%{b:02X}");
        }
    }
}

/// A key must not start with `/` nor have a `.` or `..` segment.
fn check_key(key: &str) -> Result<(), String> {
    if key.starts_with('/') {
        return Err(format!("object key {key:?} would start with '/'"));
    }
    if key.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(format!(
            "object key {key:?} would have a '.' or '..' segment"
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn renders_node_and_path() {
        let t = KeyTemplate::parse("{node}/{path}").unwrap();
        assert_eq!(
            t.render("rec-01", Path::new("2026/a b#?%+中.mp4")).unwrap(),
            "rec-01/2026/a b#?%+中.mp4"
        );
        assert_eq!(t.prefix("rec-01"), "rec-01/");
        let t = KeyTemplate::parse("archive/{node}-{path}").unwrap();
        assert_eq!(t.render("n", Path::new("x")).unwrap(), "archive/n-x");
        assert_eq!(t.prefix("n"), "archive/n-");
    }

    #[test]
    fn non_utf8_bytes_are_escaped() {
        let t = KeyTemplate::parse("{path}").unwrap();
        let rel = Path::new(OsStr::from_bytes(b"a\xffb\xc3.mp4"));
        assert_eq!(t.render("n", rel).unwrap(), "a%FFb%C3.mp4");
    }

    #[test]
    fn rejects_bad_templates() {
        for bad in [
            "{node}",
            "{path}{path}",
            "{pth}",
            "{path",
            "a}{path}",
            "/{path}",
        ] {
            assert!(KeyTemplate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn never_renders_dot_segments_or_a_leading_slash() {
        // These templates parse, and with them (or with a node named `..`) keys had `.` or `..`
        // segments: a key could climb out of the node's prefix. The key_template fuzz target
        // checks the same property for any template, node and path.
        for template in [
            "../{path}",
            "a/./{path}",
            "{path}/..",
            "{node}/../{path}",
            ".{node}/{path}",
        ] {
            let t = KeyTemplate::parse(template).unwrap();
            assert!(
                t.check_node("n").is_err() || template == ".{node}/{path}",
                "{template}"
            );
        }
        let t = KeyTemplate::parse(".{node}/{path}").unwrap();
        assert!(t.check_node(".").is_err());
        assert!(t.render(".", Path::new("a")).is_err());
        let t = KeyTemplate::parse("{node}/{path}").unwrap();
        for node in ["..", ".", "", "a/b"] {
            assert!(t.check_node(node).is_err(), "{node:?}");
        }
        assert!(t.render("..", Path::new("a.mp4")).is_err());
        assert!(t.check_node("rec-01").is_ok());
        // Dots inside a segment are fine, and so are file names made of three dots.
        assert_eq!(t.render("n", Path::new("...")).unwrap(), "n/...");
        let t = KeyTemplate::parse("{node}..{path}").unwrap();
        assert_eq!(t.render("n", Path::new("a")).unwrap(), "n..a");
    }

    #[test]
    fn rejects_overlong_keys() {
        let t = KeyTemplate::parse("{path}").unwrap();
        let long = "a".repeat(MAX_KEY_BYTES + 1);
        assert!(t.render("n", Path::new(&long)).is_err());
    }
}
