//! Media types by file extension: one table for the objects the uploader stores and the local
//! files the drop-in route serves, so a recording has the same `Content-Type` before and after
//! it is offloaded (browsers play `video/mp4` in a tab and download `octet-stream`; strict
//! players refuse the wrong type; CDNs cache what the origin said).

use std::collections::HashMap;
use std::path::Path;

/// What an extension not in the table (or a file without one) is sent as.
pub const DEFAULT_TYPE: &str = "application/octet-stream";

/// The built-in table; `storage.content_types` overrides or extends it.
fn builtin(ext: &str) -> Option<&'static str> {
    Some(match ext {
        "mp4" | "m4v" => "video/mp4",
        "m4a" => "audio/mp4",
        "mp3" => "audio/mpeg",
        "aac" => "audio/aac",
        "wav" => "audio/wav",
        "ogg" | "oga" => "audio/ogg",
        "opus" => "audio/opus",
        "webm" => "video/webm",
        "mkv" => "video/x-matroska",
        "flv" => "video/x-flv",
        "ts" => "video/mp2t",
        "m3u8" => "application/vnd.apple.mpegurl",
        "avi" => "video/x-msvideo",
        "mov" => "video/quicktime",
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "json" => "application/json",
        "txt" | "log" => "text/plain; charset=utf-8",
        _ => return None,
    })
}

/// The table in force: built-in entries plus the configured overrides (extensions lower-case,
/// without the dot).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MediaTypes {
    overrides: HashMap<String, String>,
}

impl MediaTypes {
    /// From `storage.content_types` (keys `".mp4"` or `"mp4"`, any case). Values are checked
    /// by the config's validation.
    pub fn new<'a>(overrides: impl IntoIterator<Item = (&'a String, &'a String)>) -> MediaTypes {
        MediaTypes {
            overrides: overrides
                .into_iter()
                .map(|(k, v)| (normalise_ext(k), v.clone()))
                .collect(),
        }
    }

    /// The media type of a file, by its extension.
    pub fn of(&self, path: &Path) -> &str {
        let Some(ext) = path.extension().and_then(|e| e.to_str()) else {
            return DEFAULT_TYPE;
        };
        let ext = ext.to_ascii_lowercase();
        if let Some(t) = self.overrides.get(&ext) {
            return t;
        }
        builtin(&ext).unwrap_or(DEFAULT_TYPE)
    }
}

/// `".MP4"` → `"mp4"`.
pub fn normalise_ext(ext: &str) -> String {
    ext.trim().trim_start_matches('.').to_ascii_lowercase()
}

/// Whether `value` can be sent as a `Content-Type` (a `type/subtype` with optional
/// parameters, visible ASCII only).
pub fn valid_media_type(value: &str) -> bool {
    let Some((kind, rest)) = value.split_once('/') else {
        return false;
    };
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    let subtype = rest.split(';').next().unwrap_or("").trim();
    token(kind) && token(subtype) && value.bytes().all(|b| (0x20..0x7f).contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_and_overrides() {
        let none = MediaTypes::default();
        assert_eq!(none.of(Path::new("a/b.MP4")), "video/mp4");
        assert_eq!(none.of(Path::new("a/b.ts")), "video/mp2t");
        assert_eq!(none.of(Path::new("a/b")), DEFAULT_TYPE);
        assert_eq!(none.of(Path::new("a/b.xyz")), DEFAULT_TYPE);
        let k1 = ".MP4".to_string();
        let v1 = "video/x-custom".to_string();
        let k2 = "rec".to_string();
        let v2 = "video/mp4".to_string();
        let t = MediaTypes::new([(&k1, &v1), (&k2, &v2)]);
        assert_eq!(t.of(Path::new("x.mp4")), "video/x-custom");
        assert_eq!(t.of(Path::new("x.REC")), "video/mp4");
        assert_eq!(t.of(Path::new("x.flv")), "video/x-flv");
    }

    #[test]
    fn media_type_syntax() {
        assert!(valid_media_type("video/mp4"));
        assert!(valid_media_type("text/plain; charset=utf-8"));
        assert!(!valid_media_type("video"));
        assert!(!valid_media_type("video/"));
        assert!(!valid_media_type("vi deo/mp4"));
        assert!(!valid_media_type("video/mp4\r\nX: y"));
    }
}
