//! Local files served as nginx's static module served them: `Accept-Ranges`, 206 answers to
//! `Range` (one range, or several as `multipart/byteranges`), 416, `ETag` and
//! `Last-Modified` with 304s, bodies read with positional reads on the blocking pool.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};

use super::answer::{Body, Response};
use crate::lookup::range::{ByteRange, MAX_RANGES, RangeAnswer, parse_range};
use crate::lookup::resolve::Pending;
use crate::util::media::MediaTypes;

/// Local files are sent in pieces of this size.
const CHUNK: usize = 256 * 1024;

/// `"<mtime hex>-<size hex>"`, the shape nginx uses.
fn etag(p: &Pending) -> String {
    let secs = p.identity.mtime_ns.div_euclid(1_000_000_000);
    format!("\"{secs:x}-{:x}\"", p.identity.size)
}

fn etag_matches(list: &str, etag: &str) -> bool {
    list.split(',')
        .map(str::trim)
        .any(|t| t == "*" || t == etag || t.strip_prefix("W/").is_some_and(|weak| weak == etag))
}

/// The local file, as nginx's static module answered it.
pub(super) async fn serve_file(
    p: Pending,
    req: &HeaderMap,
    head: bool,
    media: &MediaTypes,
) -> Response {
    let size = p.identity.size;
    let etag = etag(&p);
    let modified = p.identity.mtime();
    let last_modified = httpdate::fmt_http_date(modified);
    let ctype = media.of(&p.rel).to_string();

    let mut builder = http::Response::builder()
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, &etag)
        .header(header::LAST_MODIFIED, &last_modified)
        .header(header::CACHE_CONTROL, "no-cache");

    let header_str = |name| req.get(name).and_then(|v: &HeaderValue| v.to_str().ok());
    let not_modified = match header_str(header::IF_NONE_MATCH) {
        Some(list) => etag_matches(list, &etag),
        None => header_str(header::IF_MODIFIED_SINCE)
            .and_then(|d| httpdate::parse_http_date(d).ok())
            .is_some_and(|since| {
                // HTTP dates have whole seconds.
                httpdate::parse_http_date(&last_modified).is_ok_and(|m| m <= since)
            }),
    };
    if not_modified {
        return builder
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .unwrap_or_default();
    }

    let range_applies = match header_str(header::IF_RANGE) {
        None => true,
        Some(v) => v == etag || v == last_modified,
    };
    let answer = match req.get(header::RANGE) {
        Some(r) if range_applies => parse_range(r.as_bytes(), size),
        _ => RangeAnswer::Full,
    };

    let file = Arc::new(p.file);
    let (status, len, pieces) = match answer {
        RangeAnswer::Full => {
            builder = builder.header(header::CONTENT_TYPE, &ctype);
            (StatusCode::OK, size, vec![Piece::File(0, size)])
        }
        RangeAnswer::Unsatisfiable => {
            let body = serde_json::json!({
                "error": "range_not_satisfiable",
                "message": format!("no requested range lies within the file's {size} bytes (at most {} ranges)", MAX_RANGES),
            })
            .to_string();
            return builder
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{size}"))
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body))
                .unwrap_or_default();
        }
        RangeAnswer::Partial(ranges) if ranges.len() == 1 => {
            let r = ranges[0];
            builder = builder.header(header::CONTENT_TYPE, &ctype).header(
                header::CONTENT_RANGE,
                format!("bytes {}-{}/{size}", r.start, r.end),
            );
            (
                StatusCode::PARTIAL_CONTENT,
                r.len(),
                vec![Piece::File(r.start, r.len())],
            )
        }
        RangeAnswer::Partial(ranges) => {
            let boundary = format!("{:016x}{:08x}", p.identity.ino, size as u32 ^ 0x5eed);
            let (len, pieces) = multipart(&ranges, &boundary, &ctype, size);
            builder = builder.header(
                header::CONTENT_TYPE,
                format!("multipart/byteranges; boundary={boundary}"),
            );
            (StatusCode::PARTIAL_CONTENT, len, pieces)
        }
    };
    let body = if head {
        Body::empty()
    } else {
        Body::Stream(Box::pin(file_stream(file, pieces)))
    };
    builder
        .status(status)
        .header(header::CONTENT_LENGTH, len)
        .body(body)
        .unwrap_or_default()
}

/// A piece of a body: fixed bytes, or `len` bytes of the file from an offset.
enum Piece {
    Bytes(Bytes),
    File(u64, u64),
}

fn multipart(ranges: &[ByteRange], boundary: &str, ctype: &str, size: u64) -> (u64, Vec<Piece>) {
    let mut pieces = Vec::new();
    let mut len = 0u64;
    for r in ranges {
        let head = format!(
            "\r\n--{boundary}\r\nContent-Type: {ctype}\r\nContent-Range: bytes {}-{}/{size}\r\n\r\n",
            r.start, r.end
        );
        len += head.len() as u64 + r.len();
        pieces.push(Piece::Bytes(Bytes::from(head)));
        pieces.push(Piece::File(r.start, r.len()));
    }
    let tail = format!("\r\n--{boundary}--\r\n");
    len += tail.len() as u64;
    pieces.push(Piece::Bytes(Bytes::from(tail)));
    (len, pieces)
}

/// Streams the pieces, reading the file with positional reads on the blocking pool.
fn file_stream(
    file: Arc<std::fs::File>,
    pieces: Vec<Piece>,
) -> impl futures::Stream<Item = io::Result<Bytes>> + Send {
    let mut pieces: VecDeque<Piece> = pieces.into();
    futures::stream::unfold(
        (file, pieces.pop_front(), pieces),
        |(file, current, mut rest)| async move {
            let current = current?;
            match current {
                Piece::Bytes(b) => {
                    let next = rest.pop_front();
                    Some((Ok(b), (file, next, rest)))
                }
                Piece::File(_, 0) => {
                    let next = rest.pop_front();
                    Some((Ok(Bytes::new()), (file, next, rest)))
                }
                Piece::File(offset, len) => {
                    let n = len.min(CHUNK as u64) as usize;
                    let f = file.clone();
                    let read = tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; n];
                        let got = crate::util::fs::read_full_at(&f, &mut buf, offset)?;
                        if got < n {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the file became shorter while it was being sent",
                            ));
                        }
                        Ok(Bytes::from(buf))
                    })
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(e)));
                    match read {
                        Ok(bytes) => {
                            let left = len - n as u64;
                            let next = if left == 0 {
                                rest.pop_front()
                            } else {
                                Some(Piece::File(offset + n as u64, left))
                            };
                            Some((Ok(bytes), (file, next, rest)))
                        }
                        // End the stream after the error: the client sees a short body.
                        Err(e) => Some((Err(e), (file, None, rest))),
                    }
                }
            }
        },
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn etags_match_like_nginx() {
        assert!(etag_matches("\"a-1\"", "\"a-1\""));
        assert!(etag_matches("\"x\", \"a-1\"", "\"a-1\""));
        assert!(etag_matches("W/\"a-1\"", "\"a-1\""));
        assert!(etag_matches("*", "\"a-1\""));
        assert!(!etag_matches("\"a-2\"", "\"a-1\""));
    }

    #[test]
    fn multipart_length_is_exact() {
        let ranges = [
            ByteRange { start: 0, end: 9 },
            ByteRange { start: 20, end: 20 },
        ];
        let (len, pieces) = multipart(&ranges, "B", "video/mp4", 100);
        let total: u64 = pieces
            .iter()
            .map(|p| match p {
                Piece::Bytes(b) => b.len() as u64,
                Piece::File(_, n) => *n,
            })
            .sum();
        assert_eq!(len, total);
        assert_eq!(pieces.len(), 5);
    }
}
