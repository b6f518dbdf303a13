//! The configured signing style, ready to sign: [`Signer::sign`] turns an object key and the
//! current time into a presigned URL and its expiry, with no I/O.
//!
//! Where URLs point (`base`):
//!
//! | style | `lookup.public_base_url` unset | set |
//! | --- | --- | --- |
//! | `s3v4` | `storage.endpoint` with the bucket as host label, or as first path segment when `storage.path_style`, or as it is when `storage.bucket_endpoint` | that URL (a domain bound to the bucket) |
//! | `oss-v4`, `oss-v1` | the same, on the OSS-native host (`s3.oss-…` becomes `oss-…`) | that URL |
//! | `cdn-a` | required | the CDN domain |
//!
//! Expiry: `lookup.presign_expiry_secs` rounded as [`sign::Expiry`] describes (step
//! `lookup.presign_round_secs`). For `cdn-a` the CDN decides validity from the URL's
//! timestamp: the timestamp is the rounded signing time, and `expires_at` is that plus
//! `lookup.cdn_validity_secs` (what the CDN domain is configured with).

use crate::config::{PresignStyle, Settings};
use std::sync::{Arc, Mutex};

use crate::lookup::sign::{self, Expiry, SignError, SignInput, V4Window};

/// A presigned URL and when it stops working.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    pub url: String,
    /// Unix seconds.
    pub expires_unix: u64,
}

impl Signed {
    /// `expires_at` of the JSON answer (RFC 3339, UTC).
    pub fn expires_at(&self) -> String {
        Expiry {
            sign_unix: 0,
            expires_unix: self.expires_unix,
        }
        .expires_at_rfc3339()
    }
}

/// Signs GET URLs for stored objects.
#[derive(Debug, Clone)]
pub struct Signer {
    style: PresignStyle,
    access_key_id: String,
    secret: String,
    region: String,
    bucket: String,
    base: String,
    expiry_secs: u64,
    round_secs: Option<u64>,
    cdn_key: String,
    cdn_validity_secs: u64,
    /// The current window's shared part of V4 signatures (`s3v4`, `oss-v4`).
    window: Arc<Mutex<Option<Arc<V4Window>>>>,
}

impl Signer {
    pub fn new(settings: &Settings) -> Result<Signer, SignError> {
        let st = &settings.config.storage;
        let lk = &settings.config.lookup;
        let endpoint = st.endpoint.trim_end_matches('/');
        let base = match (&lk.public_base_url, lk.presign_style) {
            (Some(u), _) => u.trim_end_matches('/').to_string(),
            (None, PresignStyle::CdnA) => {
                return Err(SignError::Missing("lookup.public_base_url"));
            }
            // A custom domain bound to the bucket serves the bucket at its root.
            (None, _) if st.bucket_endpoint => endpoint.to_string(),
            (None, style) => {
                let endpoint = if style == PresignStyle::S3v4 {
                    endpoint.to_string()
                } else {
                    oss_native_endpoint(endpoint)
                };
                if st.path_style {
                    format!("{endpoint}/{}", st.bucket)
                } else {
                    sign::virtual_hosted_base(&endpoint, &st.bucket)?
                }
            }
        };
        Ok(Signer {
            style: lk.presign_style,
            access_key_id: st.access_key_id.clone(),
            secret: settings.secret.clone(),
            region: st.region.clone(),
            bucket: st.bucket.clone(),
            base,
            expiry_secs: lk.presign_expiry_secs,
            round_secs: lk.presign_round_secs,
            cdn_key: lk.cdn_auth_key.clone(),
            cdn_validity_secs: lk.cdn_validity_secs,
            window: Arc::new(Mutex::new(None)),
        })
    }

    /// Where the URLs point (without the key).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// A presigned GET URL for `key`, at Unix time `now`.
    pub fn sign(&self, key: &str, now: u64) -> Result<Signed, SignError> {
        if self.style == PresignStyle::CdnA {
            let validity = self.cdn_validity_secs.max(1);
            let window = Expiry::new(now, validity.min(sign::MAX_EXPIRY_SECS), self.round_secs);
            let url = sign::sign_cdn_a(
                &self.base,
                key,
                &self.cdn_key,
                window.sign_unix,
                sign::CDN_A_RAND,
                sign::CDN_A_UID,
            )?;
            return Ok(Signed {
                url,
                expires_unix: window.sign_unix.saturating_add(validity),
            });
        }
        let expiry = Expiry::new(now, self.expiry_secs, self.round_secs);
        let input = SignInput {
            access_key_id: &self.access_key_id,
            secret: &self.secret,
            security_token: None,
            region: &self.region,
            bucket: &self.bucket,
            key,
            base_url: &self.base,
            expiry,
        };
        let url = match self.style {
            PresignStyle::S3v4 | PresignStyle::OssV4 => {
                let cached = self
                    .window
                    .lock()
                    .ok()
                    .and_then(|w| w.as_ref().filter(|w| w.expiry == expiry).cloned());
                let window = match cached {
                    Some(w) => w,
                    None => {
                        let w = Arc::new(V4Window::new(&input, self.style == PresignStyle::OssV4)?);
                        if let Ok(mut slot) = self.window.lock() {
                            *slot = Some(w.clone());
                        }
                        w
                    }
                };
                window.sign(key)?
            }
            PresignStyle::OssV1 => sign::presign_oss_v1(&input)?,
            PresignStyle::CdnA => return Err(SignError::Missing("cdn-a handled above")),
        };
        Ok(Signed {
            url,
            expires_unix: expiry.expires_unix,
        })
    }
}

/// OSS's S3-compatible endpoint (`https://s3.oss-cn-hangzhou.aliyuncs.com`) → its native one
/// (`https://oss-cn-hangzhou.aliyuncs.com`), which OSS-signed URLs are meant for. Other
/// endpoints are kept.
fn oss_native_endpoint(endpoint: &str) -> String {
    if let Some((scheme, rest)) = endpoint.split_once("://")
        && let Some(native) = rest.strip_prefix("s3.oss-")
    {
        return format!("{scheme}://oss-{native}");
    }
    endpoint.to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::{self, Config};

    fn settings(edit: impl FnOnce(&mut Config)) -> (tempfile::TempDir, Settings) {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config::default();
        c.watch.root = dir.path().to_path_buf();
        c.journal.path = dir.path().join("j.db");
        c.storage.bucket = "rec".into();
        c.storage.access_key_id = "ak".into();
        c.storage.access_key_secret = "sk".into();
        edit(&mut c);
        let s = config::validate(c).unwrap();
        (dir, s)
    }

    #[test]
    fn bases() {
        let (_d, s) = settings(|_| {});
        assert_eq!(
            Signer::new(&s).unwrap().base(),
            "https://rec.s3.oss-cn-hangzhou.aliyuncs.com"
        );
        let (_d, s) = settings(|c| c.lookup.presign_style = PresignStyle::OssV4);
        assert_eq!(
            Signer::new(&s).unwrap().base(),
            "https://rec.oss-cn-hangzhou.aliyuncs.com"
        );
        let (_d, s) = settings(|c| {
            c.storage.endpoint = "http://127.0.0.1:9000/".into();
            c.storage.path_style = true;
        });
        assert_eq!(Signer::new(&s).unwrap().base(), "http://127.0.0.1:9000/rec");
        for style in [PresignStyle::S3v4, PresignStyle::OssV4] {
            let (_d, s) = settings(|c| {
                c.storage.endpoint = "https://media.example.com/".into();
                c.storage.bucket_endpoint = true;
                c.lookup.presign_style = style;
            });
            assert_eq!(Signer::new(&s).unwrap().base(), "https://media.example.com");
        }
        let (_d, s) =
            settings(|c| c.lookup.public_base_url = Some("https://media.example.com/".into()));
        assert_eq!(Signer::new(&s).unwrap().base(), "https://media.example.com");
    }

    #[test]
    fn every_style_signs_and_repeats_within_a_window() {
        for style in [
            PresignStyle::S3v4,
            PresignStyle::OssV4,
            PresignStyle::OssV1,
            PresignStyle::CdnA,
        ] {
            let (_d, s) = settings(|c| {
                c.lookup.presign_style = style;
                c.lookup.public_base_url = Some("https://cdn.example.com".into());
                c.lookup.cdn_auth_key = "cdnkey".into();
            });
            let signer = Signer::new(&s).unwrap();
            let a = signer.sign("node/a b.mp4", 1_700_000_000).unwrap();
            let b = signer.sign("node/a b.mp4", 1_700_000_090).unwrap();
            assert_eq!(a, b, "{style:?}");
            assert!(
                a.url.starts_with("https://cdn.example.com/node/a%20b.mp4?"),
                "{}",
                a.url
            );
            // Valid for at least the requested time minus the rounding step, never more.
            let validity = if style == PresignStyle::CdnA {
                1800
            } else {
                3600
            };
            let step = validity / 2;
            assert!(a.expires_unix > 1_700_000_090 + validity - step - 1);
            assert!(a.expires_unix <= 1_700_000_000 + validity);
            assert_ne!(
                signer.sign("node/a b.mp4", 1_700_000_000 + step).unwrap(),
                a
            );
        }
    }

    #[test]
    fn cdn_a_expiry_follows_the_cdn_validity() {
        let (_d, s) = settings(|c| {
            c.lookup.presign_style = PresignStyle::CdnA;
            c.lookup.public_base_url = Some("https://cdn.example.com".into());
            c.lookup.cdn_auth_key = "k".into();
            c.lookup.cdn_validity_secs = 86_400;
            c.lookup.presign_round_secs = Some(600);
        });
        let signed = Signer::new(&s)
            .unwrap()
            .sign("k.mp4", 1_700_000_123)
            .unwrap();
        // Rounded down to 600 s: 1_699_999_800.
        assert!(
            signed.url.contains("auth_key=1699999800-0-0-"),
            "{}",
            signed.url
        );
        assert_eq!(signed.expires_unix, 1_699_999_800 + 86_400);
        assert_eq!(signed.expires_at(), "2023-11-15T22:10:00Z");
    }

    #[test]
    fn native_endpoint() {
        assert_eq!(
            oss_native_endpoint("https://s3.oss-cn-hangzhou.aliyuncs.com"),
            "https://oss-cn-hangzhou.aliyuncs.com"
        );
        assert_eq!(
            oss_native_endpoint("http://127.0.0.1:9"),
            "http://127.0.0.1:9"
        );
    }
}
