//! `cargo +nightly fuzz run auth_verify`: request-signature checking (`lookup.auth`).
//!
//! Each input builds a request signed the way the README tells clients to, then changes it as
//! the input says (bytes of the query replaced, inserted or removed, the method or path
//! changed, the clock moved). Properties: verification never panics; the unchanged request is
//! accepted once and then refused as a replay; a changed request is accepted only when an
//! independent reading of it (below, not the daemon's code) gives the same method, path,
//! parameters and signature bytes — so no tampering that changes what was signed gets through.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use record_offload::lookup::auth::{Auth, AuthError};

const APP: &str = "app1";
const SECRET: &str = "0123456789abcdef-fuzz";
const NOW: u64 = 1_700_000_000;

#[derive(Debug, Arbitrary)]
enum Edit {
    Replace { at: u16, with: char },
    Insert { at: u16, text: String },
    Remove { at: u16, len: u8 },
    Method(String),
    Path(String),
    Clock(i16),
}

#[derive(Debug, Arbitrary)]
struct Input {
    path_param: String,
    extra: Vec<(String, String)>,
    nonce: u32,
    skew: i16,
    upper_hex: bool,
    edits: Vec<Edit>,
}

/// Query-string decoding written out separately from the daemon's: `+` is a space, `%XX` a
/// byte, anything else (a malformed escape too) stays as it is.
fn decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    out
}

/// What a request means: (method, path, sorted parameters without `sig`, signature bytes).
type Meaning = (String, String, Vec<(Vec<u8>, Vec<u8>)>, Option<Vec<u8>>);

fn meaning(method: &str, path: &str, query: &str) -> Meaning {
    let mut params = Vec::new();
    let mut sigs = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (n, v) = (decode(n), decode(v));
        if n == b"sig" {
            sigs.push(v);
        } else {
            params.push((n, v));
        }
    }
    params.sort();
    let sig = match sigs.as_slice() {
        [one] => std::str::from_utf8(one)
            .ok()
            .and_then(|s| hex::decode(s).ok()),
        _ => None,
    };
    (method.to_string(), path.to_string(), params, sig)
}

fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn char_boundary(s: &str, at: u16) -> usize {
    let mut i = usize::from(at).min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fuzz_target!(|input: Input| {
    let mut keys = BTreeMap::new();
    keys.insert(APP.to_string(), SECRET.to_string());
    let Some(auth) = Auth::new(&keys, 300) else {
        panic!("auth with one key is on");
    };

    let ts = (NOW as i64 + i64::from(input.skew)).to_string();
    let nonce = format!("n{}", input.nonce);
    let mut params: Vec<(&str, &str)> = vec![("path", input.path_param.as_str())];
    for (n, v) in input.extra.iter().take(8) {
        // Parameters the client adds; the reserved names keep their single value.
        if !["app_key", "ts", "nonce", "sig"].contains(&n.as_str()) {
            params.push((n, v));
        }
    }
    params.extend([
        ("app_key", APP),
        ("ts", ts.as_str()),
        ("nonce", nonce.as_str()),
    ]);
    let sts = Auth::string_to_sign("GET", "/v1/resolve", &params, &ts, &nonce);
    let mut sig = Auth::sign(SECRET, &sts);
    if input.upper_hex {
        sig = sig.to_uppercase();
    }
    let mut query: Vec<String> = params
        .iter()
        .map(|(n, v)| format!("{}={}", encode(n), encode(v)))
        .collect();
    query.push(format!("sig={sig}"));
    let query = query.join("&");

    let (mut method, mut path, mut q, mut now) = (
        "GET".to_string(),
        "/v1/resolve".to_string(),
        query.clone(),
        NOW,
    );
    for edit in input.edits.iter().take(4) {
        match edit {
            Edit::Replace { at, with } => {
                let i = char_boundary(&q, *at);
                if let Some(c) = q[i..].chars().next() {
                    q.replace_range(i..i + c.len_utf8(), &with.to_string());
                }
            }
            Edit::Insert { at, text } => {
                let i = char_boundary(&q, *at);
                q.insert_str(i, text);
            }
            Edit::Remove { at, len } => {
                let i = char_boundary(&q, *at);
                let j = char_boundary(&q, at.saturating_add(u16::from(*len)));
                q.replace_range(i..j.max(i), "");
            }
            Edit::Method(m) => method = m.clone(),
            Edit::Path(p) => path = p.clone(),
            Edit::Clock(d) => now = (now as i64 + i64::from(*d) * 10) as u64,
        }
    }

    let original = meaning("GET", "/v1/resolve", &query);
    let changed = meaning(&method, &path, &q);
    let result = auth.verify(&method, &path, Some(&q), now);
    if result.is_ok() {
        assert_eq!(
            original, changed,
            "a changed request was accepted:\n{query}\n{method} {path}?{q}"
        );
        // And never twice.
        assert_eq!(
            auth.verify(&method, &path, Some(&q), now),
            Err(AuthError::Replay)
        );
    } else if q == query
        && method == "GET"
        && path == "/v1/resolve"
        && now == NOW
        && input.skew.unsigned_abs() <= 300
    {
        // Unchanged and fresh: a genuine request must pass (the nonce is well formed, the skew
        // within the window).
        panic!("genuine request refused: {result:?}\n{query}");
    }
});
