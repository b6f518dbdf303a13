//! What the OSS mode changes: ETags in upper case, the part ETags of a completion compared
//! byte for byte with those answered, `x-oss-hash-crc64ecma` on the answers that carry it.

use std::collections::HashMap;
use std::io::{self, Read as _};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use md5::{Digest as _, Md5};
use s3s::dto::ETag;

/// The header OSS answers with the object's CRC-64/XZ (ECMA-182 polynomial, reflected,
/// pre- and post-inverted: Go's `crc64.ECMA` as OSS's SDKs compute it), in decimal.
pub const CRC64_HEADER: &str = "x-oss-hash-crc64ecma";

/// The part ETags of a CompleteMultipartUpload body as the client wrote them (XML entities
/// decoded, nothing else changed), by part number; set by the layer, read by the S3 impl.
#[derive(Clone, Debug, Default)]
pub(super) struct RawParts(pub Vec<(i32, String)>);

/// Upper-cases a strong ETag in place, as OSS answers them.
pub(super) fn upper(etag: &mut Option<ETag>) {
    if let Some(ETag::Strong(v)) = etag {
        v.make_ascii_uppercase();
    }
}

/// An ETag as it goes out in a header or an XML element.
pub(super) fn as_sent(etag: &ETag) -> String {
    match etag {
        ETag::Strong(v) => format!("\"{v}\""),
        ETag::Weak(v) => format!("W/\"{v}\""),
    }
}

/// The `<Part>` entries of a CompleteMultipartUpload body: (part number, raw ETag text).
/// A part without a readable number is left out (s3s then refuses the body as malformed).
pub(super) fn parse_complete_body(xml: &str) -> RawParts {
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find("<Part>") {
        rest = &rest[start + "<Part>".len()..];
        let end = rest.find("</Part>").unwrap_or(rest.len());
        let part = &rest[..end];
        rest = &rest[end..];
        let number = element(part, "PartNumber").and_then(|n| n.trim().parse::<i32>().ok());
        let etag = element(part, "ETag").map(unescape).unwrap_or_default();
        if let Some(n) = number {
            out.push((n, etag));
        }
    }
    RawParts(out)
}

fn element<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = xml.find(&open)? + open.len();
    let len = xml[start..].find(&close)?;
    Some(&xml[start..start + len])
}

/// Decodes the XML predefined entities and character references.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let Some(semi) = rest.find(';') else { break };
        let entity = &rest[1..semi];
        let decoded = match entity {
            "quot" => Some('"'),
            "amp" => Some('&'),
            "apos" => Some('\''),
            "lt" => Some('<'),
            "gt" => Some('>'),
            _ => entity
                .strip_prefix("#x")
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| entity.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The ETags answered for parts, (upload id, part number) -> the string as sent.
#[derive(Default)]
pub(super) struct PartEtags(Mutex<HashMap<(String, i32), String>>);

impl PartEtags {
    pub fn insert(&self, upload_id: &str, part: i32, etag: String) {
        if let Ok(mut m) = self.0.lock() {
            m.insert((upload_id.to_string(), part), etag);
        }
    }

    pub fn get(&self, upload_id: &str, part: i32) -> Option<String> {
        self.0
            .lock()
            .ok()
            .and_then(|m| m.get(&(upload_id.to_string(), part)).cloned())
    }

    pub fn forget(&self, upload_id: &str) {
        if let Ok(mut m) = self.0.lock() {
            m.retain(|(u, _), _| u != upload_id);
        }
    }
}

/// The ETag OSS would have answered for a part s3s-fs keeps (`root/.upload_id-U.part-N`):
/// used when the answer is not in [`PartEtags`] (a part sent to an earlier server on the
/// same directory).
pub(super) async fn part_file_etag(root: &Path, upload_id: &str, part: i32) -> Option<String> {
    if upload_id.contains(['/', '\\']) || upload_id.contains("..") {
        return None;
    }
    let path = root.join(format!(".upload_id-{upload_id}.part-{part}"));
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(path).ok()?;
        let mut md5 = Md5::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).ok()?;
            if n == 0 {
                break;
            }
            md5.update(&buf[..n]);
        }
        Some(format!("\"{}\"", hex::encode_upper(md5.finalize())))
    })
    .await
    .ok()
    .flatten()
}

/// CRC-64/XZ of files, cached by (length, modification time).
#[derive(Default)]
pub(super) struct CrcCache(Mutex<HashMap<PathBuf, (u64, SystemTime, u64)>>);

impl CrcCache {
    /// The CRC of `root/bucket/key`, or None when the key does not name a file under root.
    pub async fn object_crc(
        &self,
        root: &Path,
        bucket: &str,
        key: &str,
    ) -> io::Result<Option<u64>> {
        let rel = Path::new(bucket).join(key);
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Ok(None);
        }
        let path = root.join(rel);
        let meta = match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_file() => m,
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let stamp = (meta.len(), meta.modified()?);
        if let Ok(m) = self.0.lock()
            && let Some(&(len, mtime, crc)) = m.get(&path)
            && (len, mtime) == stamp
        {
            return Ok(Some(crc));
        }
        let p = path.clone();
        let crc = tokio::task::spawn_blocking(move || crc64_file(&p))
            .await
            .map_err(io::Error::other)??;
        if let Ok(mut m) = self.0.lock() {
            m.insert(path, (stamp.0, stamp.1, crc));
        }
        Ok(Some(crc))
    }
}

fn crc64_file(path: &Path) -> io::Result<u64> {
    let mut file = std::fs::File::open(path)?;
    let mut digest = crc64fast::Digest::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(digest.sum64());
        }
        digest.write(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_body_parts_keep_their_etag_text() {
        let xml = r#"<?xml version="1.0"?><CompleteMultipartUpload xmlns="x"><Part><ETag>&quot;AB&quot;</ETag><PartNumber>1</PartNumber></Part><Part><PartNumber>2</PartNumber><ETag>cd</ETag></Part></CompleteMultipartUpload>"#;
        let parts = parse_complete_body(xml).0;
        assert_eq!(
            parts,
            vec![(1, "\"AB\"".to_string()), (2, "cd".to_string())]
        );
        assert_eq!(unescape("a&#34;b&#x22;c&bogus"), "a\"b\"c&bogus");
    }

    #[test]
    fn crc64_is_crc64_xz() {
        let mut d = crc64fast::Digest::new();
        d.write(b"123456789");
        assert_eq!(d.sum64(), 0x995d_c9bb_df19_39fa);
    }
}
