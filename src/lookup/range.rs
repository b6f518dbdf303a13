//! `Range: bytes=…` for local files (RFC 9110 §14): what the old nginx answered with 206.
//!
//! - A header that is not a well-formed `bytes=` range set is ignored (the whole file, 200),
//!   as the RFC allows and nginx does.
//! - Satisfiable ranges are kept in the order asked, clamped to the file; unsatisfiable ones
//!   are dropped. None left → 416 with `Content-Range: bytes */SIZE`.
//! - More than [`MAX_RANGES`] ranges → 416 as well: a request for thousands of tiny or
//!   overlapping ranges is a denial-of-service pattern, not a player.

/// The most ranges served in one multipart answer.
pub const MAX_RANGES: usize = 16;

/// A satisfiable byte range: `start..=end`, both inside the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

impl ByteRange {
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

/// What to answer for a Range header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeAnswer {
    /// No usable Range header: the whole file.
    Full,
    /// 206 with these ranges (one: a plain body; several: `multipart/byteranges`).
    Partial(Vec<ByteRange>),
    /// 416.
    Unsatisfiable,
}

/// Reads a Range header's value against a file of `size` bytes.
pub fn parse_range(header: &[u8], size: u64) -> RangeAnswer {
    let Ok(header) = std::str::from_utf8(header) else {
        return RangeAnswer::Full;
    };
    let header = header.trim();
    let Some(set) = header
        .get(..6)
        .filter(|p| p.eq_ignore_ascii_case("bytes="))
        .and_then(|_| header.get(6..))
    else {
        return RangeAnswer::Full;
    };
    let mut specs = Vec::new();
    for spec in set.split(',') {
        let spec = spec.trim();
        if spec.is_empty() {
            // `bytes=0-1,,2-3` has an empty element; RFC 9110 tolerates those.
            continue;
        }
        let Some((first, last)) = spec.split_once('-') else {
            return RangeAnswer::Full;
        };
        let (first, last) = (first.trim(), last.trim());
        let number = |s: &str| -> Option<u64> {
            if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
                None
            } else {
                s.parse().ok()
            }
        };
        let spec = match (first.is_empty(), last.is_empty()) {
            (true, true) => return RangeAnswer::Full,
            (true, false) => match number(last) {
                Some(n) => Spec::Suffix(n),
                None => return RangeAnswer::Full,
            },
            (false, true) => match number(first) {
                Some(a) => Spec::From(a),
                None => return RangeAnswer::Full,
            },
            (false, false) => match (number(first), number(last)) {
                (Some(a), Some(b)) if a <= b => Spec::Between(a, b),
                _ => return RangeAnswer::Full,
            },
        };
        specs.push(spec);
    }
    if specs.is_empty() {
        return RangeAnswer::Full;
    }
    if specs.len() > MAX_RANGES {
        return RangeAnswer::Unsatisfiable;
    }
    let ranges: Vec<ByteRange> = specs.into_iter().filter_map(|s| s.resolve(size)).collect();
    if ranges.is_empty() {
        RangeAnswer::Unsatisfiable
    } else {
        RangeAnswer::Partial(ranges)
    }
}

enum Spec {
    Between(u64, u64),
    From(u64),
    Suffix(u64),
}

impl Spec {
    fn resolve(self, size: u64) -> Option<ByteRange> {
        if size == 0 {
            return None;
        }
        let last = size - 1;
        match self {
            Spec::Between(a, b) if a < size => Some(ByteRange {
                start: a,
                end: b.min(last),
            }),
            Spec::From(a) if a < size => Some(ByteRange {
                start: a,
                end: last,
            }),
            Spec::Suffix(n) if n > 0 => Some(ByteRange {
                start: size.saturating_sub(n),
                end: last,
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn r(start: u64, end: u64) -> ByteRange {
        ByteRange { start, end }
    }

    #[test]
    fn single_ranges() {
        assert_eq!(
            parse_range(b"bytes=0-99", 1000),
            RangeAnswer::Partial(vec![r(0, 99)])
        );
        assert_eq!(
            parse_range(b"bytes=900-", 1000),
            RangeAnswer::Partial(vec![r(900, 999)])
        );
        assert_eq!(
            parse_range(b"bytes=-100", 1000),
            RangeAnswer::Partial(vec![r(900, 999)])
        );
        assert_eq!(
            parse_range(b"bytes=-5000", 1000),
            RangeAnswer::Partial(vec![r(0, 999)])
        );
        assert_eq!(
            parse_range(b"bytes=990-5000", 1000),
            RangeAnswer::Partial(vec![r(990, 999)])
        );
        assert_eq!(
            parse_range(b"BYTES= 5-5 ", 1000),
            RangeAnswer::Partial(vec![r(5, 5)])
        );
    }

    #[test]
    fn several_ranges_keep_their_order_and_drop_unsatisfiable_ones() {
        assert_eq!(
            parse_range(b"bytes=10-19, 0-4,5000-6000, -1", 100),
            RangeAnswer::Partial(vec![r(10, 19), r(0, 4), r(99, 99)])
        );
    }

    #[test]
    fn unsatisfiable() {
        assert_eq!(
            parse_range(b"bytes=1000-", 1000),
            RangeAnswer::Unsatisfiable
        );
        assert_eq!(
            parse_range(b"bytes=1000-2000", 1000),
            RangeAnswer::Unsatisfiable
        );
        assert_eq!(parse_range(b"bytes=-0", 1000), RangeAnswer::Unsatisfiable);
        assert_eq!(parse_range(b"bytes=0-0", 0), RangeAnswer::Unsatisfiable);
        assert_eq!(parse_range(b"bytes=-5", 0), RangeAnswer::Unsatisfiable);
        let many = format!("bytes={}", vec!["0-0"; MAX_RANGES + 1].join(","));
        assert_eq!(parse_range(many.as_bytes(), 10), RangeAnswer::Unsatisfiable);
        let enough = format!("bytes={}", vec!["0-0"; MAX_RANGES].join(","));
        assert!(matches!(
            parse_range(enough.as_bytes(), 10),
            RangeAnswer::Partial(v) if v.len() == MAX_RANGES
        ));
    }

    #[test]
    fn malformed_headers_are_ignored() {
        for h in [
            &b"items=0-1"[..],
            b"bytes=",
            b"bytes=5-1",
            b"bytes=a-b",
            b"bytes=-",
            b"bytes=1",
            b"bytes=0-1;x",
            b"bytes=+1-2",
            b"bytes=99999999999999999999-",
            b"\xff",
            b"",
        ] {
            assert_eq!(parse_range(h, 100), RangeAnswer::Full, "{h:?}");
        }
    }
}
