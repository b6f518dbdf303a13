//! Who may ask: the `lookup.allow` network list and signed requests (`lookup.auth`).
//!
//! Both are off by default (the server listens on loopback). Unix-socket clients are governed
//! by the socket's file mode and are never refused by `allow`.
//!
//! # Signed requests
//!
//! With `lookup.auth.keys` set, a look-up carries four more query parameters: `app_key`, `ts`
//! (Unix seconds), `nonce` (1–64 characters of `A-Z a-z 0-9 - _ .`) and `sig`, the lower- or
//! upper-case hex HMAC-SHA256, keyed by the app key's secret, of
//!
//! ```text
//! METHOD "\n" PATH "\n" CANONICAL_QUERY "\n" ts "\n" nonce
//! ```
//!
//! - `METHOD`: `GET` or `HEAD`, as sent.
//! - `PATH`: the request path exactly as sent on the wire (still percent-encoded).
//! - `CANONICAL_QUERY`: every query parameter except `sig` (so `app_key`, `ts` and `nonce`
//!   too), each name and value decoded (`%XX`, and `+` as a space) and re-encoded with every
//!   byte but `A-Z a-z 0-9 - . _ ~` as upper-case `%XX`, sorted by name and then value, joined
//!   as `name=value` with `&`. Clients may therefore encode their query however they like.
//!
//! A request is refused (401) when a parameter is missing or malformed, the app key is
//! unknown, `ts` is further than `lookup.auth.window_secs` from this host's clock, the
//! signature does not match (compared in constant time), or the nonce was already used by that
//! app key within the window (a replay). Nonces are remembered only after the signature
//! matched, so unsigned traffic cannot fill the memory; the memory is bounded
//! ([`MAX_NONCES`]) and a full one refuses new requests (503) rather than forgetting early.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Mutex;

use hmac::{Hmac, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode};
use sha2::Sha256;

use crate::util::net::Cidr;

/// The most nonces remembered at once.
pub const MAX_NONCES: usize = 1_000_000;
const MAX_NONCE_LEN: usize = 64;

const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The `lookup.allow` list: empty allows everyone.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    nets: Vec<Cidr>,
}

impl AllowList {
    /// From `lookup.allow`, parsed by the config's validation.
    pub fn new(nets: Vec<Cidr>) -> AllowList {
        AllowList { nets }
    }

    /// `None` is a Unix-socket peer, always allowed.
    pub fn allows(&self, peer: Option<IpAddr>) -> bool {
        match peer {
            None => true,
            Some(ip) => self.nets.is_empty() || self.nets.iter().any(|n| n.contains(ip)),
        }
    }
}

/// Why a signed request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing query parameter {0}")]
    Missing(&'static str),
    #[error("query parameter {0} is given more than once")]
    Repeated(&'static str),
    #[error("malformed query parameter {0}")]
    Malformed(&'static str),
    #[error("unknown app_key")]
    UnknownKey,
    #[error("ts is outside the accepted window of {window} s around this host's clock")]
    Stale { window: u64 },
    #[error("signature does not match")]
    BadSignature,
    #[error("nonce already used")]
    Replay,
    #[error("too many nonces in the window; try again later")]
    Full,
}

impl AuthError {
    /// A short, stable name for JSON answers.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing(_) => "missing",
            AuthError::Repeated(_) => "repeated",
            AuthError::Malformed(_) => "malformed",
            AuthError::UnknownKey => "unknown_key",
            AuthError::Stale { .. } => "stale",
            AuthError::BadSignature => "bad_signature",
            AuthError::Replay => "replay",
            AuthError::Full => "busy",
        }
    }
}

/// Verifies signed requests and remembers their nonces.
pub struct Auth {
    keys: BTreeMap<String, Hmac<Sha256>>,
    window: u64,
    nonces: Mutex<Nonces>,
}

#[derive(Default)]
struct Nonces {
    /// (app key, nonce) → Unix second after which it may be forgotten.
    seen: HashMap<(String, String), u64>,
    /// Inserts since the last sweep of expired entries.
    since_sweep: usize,
}

impl Auth {
    /// `None` when no keys are configured (auth off).
    pub fn new(keys: &BTreeMap<String, String>, window_secs: u64) -> Option<Auth> {
        if keys.is_empty() {
            return None;
        }
        let keys = keys
            .iter()
            .filter_map(|(app, secret)| {
                <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
                    .ok()
                    .map(|m| (app.clone(), m))
            })
            .collect();
        Some(Auth {
            keys,
            window: window_secs,
            nonces: Mutex::new(Nonces::default()),
        })
    }

    /// Checks a request (see the module documentation) at Unix time `now`.
    pub fn verify(
        &self,
        method: &str,
        raw_path: &str,
        raw_query: Option<&str>,
        now: u64,
    ) -> Result<(), AuthError> {
        let mut params: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        for pair in raw_query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            params.push((form_decode(name), form_decode(value)));
        }
        let one = |name: &'static str| -> Result<&[u8], AuthError> {
            let mut found = params.iter().filter(|(n, _)| n == name.as_bytes());
            let first = found.next().ok_or(AuthError::Missing(name))?;
            if found.next().is_some() {
                return Err(AuthError::Repeated(name));
            }
            Ok(&first.1)
        };
        let app = std::str::from_utf8(one("app_key")?).map_err(|_| AuthError::UnknownKey)?;
        let ts_raw = one("ts")?;
        let nonce = one("nonce")?;
        let sig = one("sig")?;
        let ts: u64 = std::str::from_utf8(ts_raw)
            .ok()
            .filter(|t| !t.is_empty() && t.len() <= 12 && t.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|t| t.parse().ok())
            .ok_or(AuthError::Malformed("ts"))?;
        if nonce.is_empty()
            || nonce.len() > MAX_NONCE_LEN
            || !nonce
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(AuthError::Malformed("nonce"));
        }
        let sig = std::str::from_utf8(sig)
            .ok()
            .and_then(|s| hex::decode(s).ok())
            .filter(|s| s.len() == 32)
            .ok_or(AuthError::Malformed("sig"))?;
        let mac = self.keys.get(app).ok_or(AuthError::UnknownKey)?;
        if ts.abs_diff(now) > self.window {
            return Err(AuthError::Stale {
                window: self.window,
            });
        }

        let mut canonical: Vec<(String, String)> = params
            .iter()
            .filter(|(n, _)| n != b"sig")
            .map(|(n, v)| (encode(n), encode(v)))
            .collect();
        canonical.sort();
        let mut mac = mac.clone();
        mac.update(method.as_bytes());
        mac.update(b"\n");
        mac.update(raw_path.as_bytes());
        mac.update(b"\n");
        for (i, (n, v)) in canonical.iter().enumerate() {
            if i > 0 {
                mac.update(b"&");
            }
            mac.update(n.as_bytes());
            mac.update(b"=");
            mac.update(v.as_bytes());
        }
        mac.update(b"\n");
        mac.update(ts_raw);
        mac.update(b"\n");
        mac.update(nonce);
        mac.verify_slice(&sig)
            .map_err(|_| AuthError::BadSignature)?;

        // The nonce is taken only now that the request is known to be genuine.
        let nonce = String::from_utf8_lossy(nonce).into_owned();
        let mut nonces = match self.nonces.lock() {
            Ok(n) => n,
            Err(poisoned) => poisoned.into_inner(),
        };
        nonces.remember(app, nonce, now, now + 2 * self.window)
    }

    /// The string-to-sign of a request, for clients and tests (see the module documentation).
    pub fn string_to_sign(
        method: &str,
        raw_path: &str,
        params: &[(&str, &str)],
        ts: &str,
        nonce: &str,
    ) -> String {
        let mut canonical: Vec<(String, String)> = params
            .iter()
            .filter(|(n, _)| *n != "sig")
            .map(|(n, v)| (encode(n.as_bytes()), encode(v.as_bytes())))
            .collect();
        canonical.sort();
        let query: Vec<String> = canonical
            .into_iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        format!("{method}\n{raw_path}\n{}\n{ts}\n{nonce}", query.join("&"))
    }

    /// Hex HMAC-SHA256 of `string_to_sign` with `secret`.
    pub fn sign(secret: &str, string_to_sign: &str) -> String {
        match <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()) {
            Ok(mut mac) => {
                mac.update(string_to_sign.as_bytes());
                hex::encode(mac.finalize().into_bytes())
            }
            Err(_) => String::new(),
        }
    }
}

impl Nonces {
    fn remember(
        &mut self,
        app: &str,
        nonce: String,
        now: u64,
        forget_at: u64,
    ) -> Result<(), AuthError> {
        self.since_sweep += 1;
        if self.since_sweep >= 4096 || self.seen.len() >= MAX_NONCES {
            self.seen.retain(|_, until| *until > now);
            self.since_sweep = 0;
        }
        let key = (app.to_owned(), nonce);
        if let Some(until) = self.seen.get(&key)
            && *until > now
        {
            return Err(AuthError::Replay);
        }
        if self.seen.len() >= MAX_NONCES {
            return Err(AuthError::Full);
        }
        self.seen.insert(key, forget_at);
        Ok(())
    }
}

/// Query-string decoding: `+` is a space, `%XX` a byte; a malformed escape stays as it is.
pub fn form_decode(s: &str) -> Vec<u8> {
    let plus: Vec<u8> = s
        .bytes()
        .map(|b| if b == b'+' { b' ' } else { b })
        .collect();
    percent_decode(&plus).collect()
}

fn encode(bytes: &[u8]) -> String {
    percent_encoding::percent_encode(bytes, UNRESERVED).to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef-secret";

    fn auth() -> Auth {
        let mut keys = BTreeMap::new();
        keys.insert("app1".to_string(), SECRET.to_string());
        Auth::new(&keys, 300).unwrap()
    }

    fn signed(path: &str, extra: &[(&str, &str)], ts: u64, nonce: &str) -> String {
        let ts = ts.to_string();
        let mut params: Vec<(&str, &str)> = extra.to_vec();
        params.extend([("app_key", "app1"), ("ts", ts.as_str()), ("nonce", nonce)]);
        let sig = Auth::sign(
            SECRET,
            &Auth::string_to_sign("GET", path, &params, &ts, nonce),
        );
        let mut q: Vec<String> = params
            .iter()
            .map(|(n, v)| format!("{}={}", encode(n.as_bytes()), encode(v.as_bytes())))
            .collect();
        q.push(format!("sig={sig}"));
        q.join("&")
    }

    #[test]
    fn accepts_a_signed_request_once() {
        let a = auth();
        let q = signed("/v1/resolve", &[("path", "/record/a b.mp4")], 1000, "n1");
        assert_eq!(a.verify("GET", "/v1/resolve", Some(&q), 1100), Ok(()));
        assert_eq!(
            a.verify("GET", "/v1/resolve", Some(&q), 1101),
            Err(AuthError::Replay)
        );
        // Another nonce is fine.
        let q2 = signed("/v1/resolve", &[("path", "/record/a b.mp4")], 1000, "n2");
        assert_eq!(a.verify("GET", "/v1/resolve", Some(&q2), 1100), Ok(()));
    }

    #[test]
    fn query_encoding_does_not_matter_but_content_does() {
        let a = auth();
        let q = signed("/v1/resolve", &[("path", "/record/a b.mp4")], 1000, "n1");
        // The same parameters, spelled with `+` for the space and in another order.
        let reordered: Vec<&str> = q.split('&').rev().collect();
        let reordered = reordered.join("&").replace("%20", "+");
        assert_eq!(
            a.verify("GET", "/v1/resolve", Some(&reordered), 1000),
            Ok(())
        );
        // A different path parameter does not verify.
        let tampered = q.replace("a%20b", "a%20c");
        assert_eq!(
            a.verify("GET", "/v1/resolve", Some(&tampered), 1000),
            Err(AuthError::BadSignature)
        );
        // Nor a different method or request path.
        let q = signed("/v1/resolve", &[("path", "x")], 1000, "n3");
        assert_eq!(
            a.verify("HEAD", "/v1/resolve", Some(&q), 1000),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            a.verify("GET", "/v1/resolvE", Some(&q), 1000),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn refusals() {
        let a = auth();
        let q = signed("/p", &[], 1000, "n1");
        assert_eq!(
            a.verify("GET", "/p", Some(&q), 1301),
            Err(AuthError::Stale { window: 300 })
        );
        assert_eq!(
            a.verify("GET", "/p", Some(&q), 699),
            Err(AuthError::Stale { window: 300 })
        );
        assert_eq!(
            a.verify("GET", "/p", None, 1000),
            Err(AuthError::Missing("app_key"))
        );
        let unknown = q.replace("app_key=app1", "app_key=app2");
        assert_eq!(
            a.verify("GET", "/p", Some(&unknown), 1000),
            Err(AuthError::UnknownKey)
        );
        let twice = format!("{q}&nonce=x");
        assert_eq!(
            a.verify("GET", "/p", Some(&twice), 1000),
            Err(AuthError::Repeated("nonce"))
        );
        let bad_sig = q.split("&sig=").next().unwrap().to_string() + "&sig=zz";
        assert_eq!(
            a.verify("GET", "/p", Some(&bad_sig), 1000),
            Err(AuthError::Malformed("sig"))
        );
        let bad_nonce = signed("/p", &[], 1000, "a/b");
        assert_eq!(
            a.verify("GET", "/p", Some(&bad_nonce), 1000),
            Err(AuthError::Malformed("nonce"))
        );
        // A wrong signature of the right length.
        let sig = q.split("&sig=").nth(1).unwrap();
        let mut flipped = sig.as_bytes().to_vec();
        flipped[0] = if flipped[0] == b'0' { b'1' } else { b'0' };
        let wrong = q.replace(sig, std::str::from_utf8(&flipped).unwrap());
        assert_eq!(
            a.verify("GET", "/p", Some(&wrong), 1000),
            Err(AuthError::BadSignature)
        );
        // Refused requests do not use up the nonce.
        assert_eq!(a.verify("GET", "/p", Some(&q), 1000), Ok(()));
    }

    #[test]
    fn nonces_are_forgotten_after_the_window() {
        let a = auth();
        let q = signed("/p", &[], 1000, "n");
        assert_eq!(a.verify("GET", "/p", Some(&q), 1000), Ok(()));
        // Past the window the old request is stale anyway; a new one may reuse the nonce.
        let q = signed("/p", &[], 1700, "n");
        assert_eq!(a.verify("GET", "/p", Some(&q), 1700), Ok(()));
    }

    #[test]
    fn no_keys_means_no_auth() {
        assert!(Auth::new(&BTreeMap::new(), 300).is_none());
    }

    #[test]
    fn cidrs() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.9.9".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let one = Cidr::parse("127.0.0.1").unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let all = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let v6 = Cidr::parse("fd00::/8").unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        assert!(
            Cidr::parse("::1/128")
                .unwrap()
                .contains("::1".parse().unwrap())
        );
        for bad in ["", "10.0.0.0/33", "::/129", "x", "10.0.0/8", "10.0.0.0/-1"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
        let list = AllowList::new(vec![Cidr::parse("192.168.0.0/16").unwrap()]);
        assert!(list.allows(None));
        assert!(list.allows(Some("192.168.1.1".parse().unwrap())));
        assert!(!list.allows(Some("127.0.0.1".parse().unwrap())));
        assert!(AllowList::default().allows(Some("1.2.3.4".parse().unwrap())));
    }
}
