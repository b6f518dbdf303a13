//! The object store: aws-sdk-s3 set up for Alibaba Cloud OSS's S3-compatible endpoint (and any
//! other S3-compatible server), plus the one function that decides which errors are retryable.
//!
//! Client settings, and why:
//! - virtual-hosted style unless `storage.path_style` (OSS refuses path style);
//! - request checksums and response validation only "when required": since aws-sdk-s3 1.69 the
//!   default adds CRC32 and `aws-chunked` bodies with trailers, which OSS rejects;
//! - `UNSIGNED-PAYLOAD` for bodies, with `Content-MD5` on every request that carries data: the
//!   store checks the MD5, so hashing the body a second time with SHA-256 buys nothing and
//!   costs CPU; the returned ETag of every part and small object is also compared with our MD5
//!   (a server that ignores Content-MD5 — s3s-fs does — is caught that way);
//! - the SDK's own retries are off: the upload stage (`pipeline/upload/`) retries with its own backoff, forever while
//!   the file exists, and needs to see each failure;
//! - stalled-stream protection is off for uploads (a body slowed on purpose by a bandwidth limit
//!   must not be cut); instead each request gets a deadline from its size and
//!   `upload.min_bytes_per_sec`.
//! - static credentials from the config; no environment or profile chain is consulted.
//!
//! - `client`: the SDK client built from `[storage]` and `[upload]`.
//! - `error`: [`StoreError`] and [`classify`].
//! - `body`: request bodies streamed from files.

mod body;
mod client;
mod error;

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use base64::Engine as _;

use body::file_body;
pub use body::{Body, FileRange};
pub use client::CRC64_HEADER;
use client::{Crc64Slot, ObjectOptions};
use error::from_sdk;
pub use error::{ErrorKind, HasStatus, PERMANENT_CODES, StoreError, classify};

/// What HEAD says about a stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    /// As the store sent it.
    pub etag: Option<String>,
    /// `x-oss-hash-crc64ecma`, where the store sends it.
    pub crc64: Option<u64>,
    pub metadata: std::collections::HashMap<String, String>,
}

/// What a PutObject or CompleteMultipartUpload answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// As the store sent it.
    pub etag: Option<String>,
    /// `x-oss-hash-crc64ecma`, where the store sends it.
    pub crc64: Option<u64>,
}

/// A part listed by ListParts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedPart {
    pub part_number: i32,
    pub size: u64,
    pub etag: Option<String>,
}

/// The store client.
#[derive(Clone, Debug)]
pub struct Store {
    client: Client,
    bucket: String,
    request_timeout: Duration,
    min_bytes_per_sec: u64,
    options: Arc<ObjectOptions>,
    /// Whether a part's or small object's ETag is the MD5 of its bytes: on S3 and OSS it is,
    /// except with KMS encryption.
    etag_is_md5: bool,
}

/// An ETag normalised for comparison with our MD5: quotes stripped, lower case. Only ever
/// used to compare: what goes back to the store is the ETag exactly as it gave it.
pub fn etag_hex(etag: &str) -> String {
    etag.trim().trim_matches('"').to_ascii_lowercase()
}

/// An ETag as CompleteMultipartUpload sends it: exactly as the store returned it; journals of
/// older versions kept it unquoted and lower-cased, and get their quotes back.
pub fn etag_for_completion(etag: &str) -> String {
    if etag.starts_with('"') {
        etag.to_string()
    } else {
        format!("\"{etag}\"")
    }
}

impl Store {
    /// The Content-Type an object of this file gets.
    pub fn content_type(&self, rel: &std::path::Path) -> &str {
        self.options.media.of(rel)
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Deadline for a request that carries `len` bytes.
    fn deadline(&self, len: u64) -> Duration {
        self.request_timeout + Duration::from_secs_f64(len as f64 / self.min_bytes_per_sec as f64)
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        len: u64,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.deadline(len), fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::new(
                op,
                ErrorKind::Transient,
                format!("no answer within {:?}", self.deadline(len)),
            )),
        }
    }

    /// Stores a whole object in one request. The answer's ETag must equal `md5` (unless the
    /// store's ETags are not MD5s, see `etag_is_md5`), and its CRC-64 `crc64` when it sends one
    /// and `crc64` is known.
    pub async fn put_object(
        &self,
        key: &str,
        rel: &std::path::Path,
        body: Body,
        md5: &[u8; 16],
        crc64: Option<u64>,
        metadata: &[(&str, String)],
    ) -> Result<Stored, StoreError> {
        let len = body.len();
        let o = &*self.options;
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_length(len as i64)
            .content_md5(b64(md5))
            .content_type(o.media.of(rel))
            .set_content_disposition(o.content_disposition.clone())
            .set_cache_control(o.cache_control.clone())
            .set_storage_class(o.storage_class.clone())
            .set_server_side_encryption(o.sse.clone())
            .set_ssekms_key_id(o.sse_kms_key_id.clone())
            .body(body.into_stream());
        for (k, v) in &o.metadata {
            req = req.metadata(k, v);
        }
        for (k, v) in metadata {
            req = req.metadata(*k, v);
        }
        let crc = Crc64Slot::default();
        self.timed("PutObject", len, async {
            let out = req
                .customize()
                .disable_payload_signing()
                .interceptor(crc.clone())
                .send()
                .await
                .map_err(|e| from_sdk("PutObject", e))?;
            let etag = self.check_etag("PutObject", out.e_tag(), md5)?;
            let stored = Stored {
                etag: Some(etag),
                crc64: crc.get(),
            };
            if let Some(want) = crc64 {
                check_crc64("PutObject", stored.crc64, want)?;
            }
            Ok(stored)
        })
        .await
    }

    pub async fn create_multipart(
        &self,
        key: &str,
        rel: &std::path::Path,
        metadata: &[(&str, String)],
    ) -> Result<String, StoreError> {
        let o = &*self.options;
        let mut req = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .content_type(o.media.of(rel))
            .set_content_disposition(o.content_disposition.clone())
            .set_cache_control(o.cache_control.clone())
            .set_storage_class(o.storage_class.clone())
            .set_server_side_encryption(o.sse.clone())
            .set_ssekms_key_id(o.sse_kms_key_id.clone());
        for (k, v) in &o.metadata {
            req = req.metadata(k, v);
        }
        for (k, v) in metadata {
            req = req.metadata(*k, v);
        }
        self.timed("CreateMultipartUpload", 0, async {
            let out = req
                .send()
                .await
                .map_err(|e| from_sdk("CreateMultipartUpload", e))?;
            out.upload_id().map(str::to_string).ok_or_else(|| {
                StoreError::new(
                    "CreateMultipartUpload",
                    ErrorKind::Transient,
                    "answer without an upload id",
                )
            })
        })
        .await
    }

    /// Sends one part. Returns its ETag, checked against `md5`.
    pub async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        body: FileRange,
        md5: &[u8; 16],
    ) -> Result<String, StoreError> {
        let len = body.len;
        let req = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(part_number)
            .content_length(len as i64)
            .content_md5(b64(md5))
            .body(file_body(body));
        self.timed("UploadPart", len, async {
            let out = req
                .customize()
                .disable_payload_signing()
                .send()
                .await
                .map_err(|e| from_sdk("UploadPart", e))?;
            self.check_etag("UploadPart", out.e_tag(), md5)
        })
        .await
    }

    /// Sends one part whose MD5 is not known before it is sent (a body streamed from
    /// elsewhere): no `Content-MD5`. Returns the ETag as the store gave it, for the caller to
    /// check with [`Store::check_etag`] once the body's MD5 is known.
    pub async fn upload_part_streamed(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        body: Body,
    ) -> Result<String, StoreError> {
        let len = body.len();
        let req = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(part_number)
            .content_length(len as i64)
            .body(body.into_stream());
        self.timed("UploadPart", len, async {
            let out = req
                .customize()
                .disable_payload_signing()
                .send()
                .await
                .map_err(|e| from_sdk("UploadPart", e))?;
            out.e_tag().map(str::to_string).ok_or_else(|| {
                StoreError::new("UploadPart", ErrorKind::Transient, "answer without an ETag")
            })
        })
        .await
    }

    /// GET of an object, or of `len` bytes of it from `offset`: the body, to be read as it
    /// arrives (never held whole), and the length the store announced. The deadline covers
    /// the answer's head; the body is read under the deadline of whatever consumes it, so
    /// stalled-stream protection is off for it (a consumer slowed by a bandwidth limit or a
    /// slow upload is not a stall).
    pub async fn get_stream(
        &self,
        key: &str,
        range: Option<(u64, u64)>,
    ) -> Result<(aws_smithy_types::body::SdkBody, u64), StoreError> {
        let req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .set_range(
                range
                    .filter(|(_, len)| *len > 0)
                    .map(|(off, len)| format!("bytes={off}-{}", off + len - 1)),
            );
        self.timed("GetObject", 0, async {
            let out = req
                .customize()
                .config_override(
                    aws_sdk_s3::config::Config::builder().stalled_stream_protection(
                        aws_sdk_s3::config::StalledStreamProtectionConfig::disabled(),
                    ),
                )
                .send()
                .await
                .map_err(|e| from_sdk("GetObject", e))?;
            let len = out.content_length().unwrap_or(0).max(0) as u64;
            Ok((out.body.into_inner(), len))
        })
        .await
    }

    /// Completes an upload from its parts' ETags, sent exactly as the store gave them.
    pub async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(i32, String)],
    ) -> Result<Stored, StoreError> {
        let completed = CompletedMultipartUpload::builder()
            .set_parts(Some(
                parts
                    .iter()
                    .map(|(n, etag)| {
                        CompletedPart::builder()
                            .part_number(*n)
                            .e_tag(etag_for_completion(etag))
                            .build()
                    })
                    .collect(),
            ))
            .build();
        let req = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(completed);
        let crc = Crc64Slot::default();
        // Completion may take a while on the store side (it assembles the object).
        self.timed("CompleteMultipartUpload", 0, async {
            let out = req
                .customize()
                .interceptor(crc.clone())
                .send()
                .await
                .map_err(|e| from_sdk("CompleteMultipartUpload", e))?;
            Ok(Stored {
                etag: out.e_tag().map(str::to_string),
                crc64: crc.get(),
            })
        })
        .await
    }

    pub async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), StoreError> {
        let req = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id);
        self.timed("AbortMultipartUpload", 0, async {
            match req.send().await {
                Ok(_) => Ok(()),
                Err(e) => {
                    let e = from_sdk("AbortMultipartUpload", e);
                    // Gone already is what we wanted.
                    if e.kind == ErrorKind::NoSuchUpload || e.status == Some(404) {
                        Ok(())
                    } else {
                        Err(e)
                    }
                }
            }
        })
        .await
    }

    /// All parts of an upload (every page), sorted by part number.
    pub async fn list_parts(
        &self,
        key: &str,
        upload_id: &str,
    ) -> Result<Vec<ListedPart>, StoreError> {
        let mut parts = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let req = self
                .client
                .list_parts()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .set_part_number_marker(marker.clone());
            let out = self
                .timed("ListParts", 0, async {
                    req.send().await.map_err(|e| from_sdk("ListParts", e))
                })
                .await?;
            for p in out.parts() {
                parts.push(ListedPart {
                    part_number: p.part_number().unwrap_or(0),
                    size: p.size().unwrap_or(0).max(0) as u64,
                    etag: p.e_tag().map(str::to_string),
                });
            }
            let next = out.next_part_number_marker().map(str::to_string);
            if out.is_truncated() == Some(true) && next.is_some() && next != marker {
                marker = next;
            } else {
                break;
            }
        }
        parts.sort_by_key(|p| p.part_number);
        parts.dedup_by_key(|p| p.part_number);
        Ok(parts)
    }

    /// HeadBucket: the cheap request that tells whether the store answers (probing a failed
    /// primary).
    pub async fn probe(&self) -> Result<(), StoreError> {
        let req = self.client.head_bucket().bucket(&self.bucket);
        self.timed("HeadBucket", 0, async {
            req.send()
                .await
                .map(|_| ())
                .map_err(|e| from_sdk("HeadBucket", e))
        })
        .await
    }

    /// HEAD of an object: `None` when it does not exist.
    pub async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StoreError> {
        let req = self.client.head_object().bucket(&self.bucket).key(key);
        let crc = Crc64Slot::default();
        self.timed("HeadObject", 0, async {
            match req.customize().interceptor(crc.clone()).send().await {
                Ok(out) => Ok(Some(ObjectInfo {
                    size: out.content_length().unwrap_or(0).max(0) as u64,
                    etag: out.e_tag().map(str::to_string),
                    crc64: crc.get(),
                    metadata: out.metadata().cloned().unwrap_or_default(),
                })),
                Err(e) => {
                    if let SdkError::ServiceError(s) = &e
                        && (s.err().is_not_found() || s.raw().status().as_u16() == 404)
                    {
                        return Ok(None);
                    }
                    Err(from_sdk("HeadObject", e))
                }
            }
        })
        .await
    }

    /// Multipart uploads under `prefix`, or `None` when the store does not support listing
    /// them (OSS's S3 API, s3s-fs).
    pub async fn list_multipart_uploads(
        &self,
        prefix: &str,
    ) -> Result<Option<Vec<(String, String)>>, StoreError> {
        let mut out_list = Vec::new();
        let mut key_marker: Option<String> = None;
        let mut id_marker: Option<String> = None;
        loop {
            let req = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_key_marker(key_marker.clone())
                .set_upload_id_marker(id_marker.clone());
            let res = self
                .timed("ListMultipartUploads", 0, async {
                    req.send()
                        .await
                        .map_err(|e| from_sdk("ListMultipartUploads", e))
                })
                .await;
            let out = match res {
                Ok(o) => o,
                // A store without the call (OSS's S3 API) refuses it one way or another; a
                // refusal of access (403) is not that.
                Err(e) if matches!(e.status, Some(400 | 404 | 405 | 501)) => {
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
            for u in out.uploads() {
                if let (Some(k), Some(id)) = (u.key(), u.upload_id()) {
                    out_list.push((k.to_string(), id.to_string()));
                }
            }
            if out.is_truncated() == Some(true) {
                let nk = out.next_key_marker().map(str::to_string);
                let ni = out.next_upload_id_marker().map(str::to_string);
                if nk.is_none() || (nk == key_marker && ni == id_marker) {
                    break;
                }
                key_marker = nk;
                id_marker = ni;
            } else {
                break;
            }
        }
        Ok(Some(out_list))
    }
}
fn b64(md5: &[u8; 16]) -> String {
    base64::engine::general_purpose::STANDARD.encode(md5)
}

impl Store {
    /// Checks an answer's ETag against the MD5 of what was sent; returns it as the store gave it.
    pub fn check_etag(
        &self,
        op: &'static str,
        etag: Option<&str>,
        md5: &[u8; 16],
    ) -> Result<String, StoreError> {
        let want = hex::encode(md5);
        match etag {
            Some(got) if !self.etag_is_md5 || etag_hex(got) == want => Ok(got.to_string()),
            Some(got) => Err(StoreError::new(
                op,
                ErrorKind::Corrupt,
                format!(
                    "stored bytes differ from the file: ETag {got}, MD5 of the data sent {want}"
                ),
            )),
            None => Err(StoreError::new(
                op,
                ErrorKind::Transient,
                "answer without an ETag",
            )),
        }
    }
}

/// A store's CRC-64 of an object, where it sent one, must be the file's.
pub fn check_crc64(op: &'static str, got: Option<u64>, want: u64) -> Result<(), StoreError> {
    match got {
        Some(got) if got != want => Err(StoreError::new(
            op,
            ErrorKind::Corrupt,
            format!("stored object's CRC-64 is {got}, the file's {want}: the upload is damaged"),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn etags_are_kept_as_given() {
        assert_eq!(etag_hex("\"5B3A\""), "5b3a");
        assert_eq!(etag_for_completion("\"5B3A\""), "\"5B3A\"");
        // Journals of older versions kept them bare.
        assert_eq!(etag_for_completion("5b3a"), "\"5b3a\"");
    }

    #[test]
    fn crc64_mismatch_is_damage() {
        assert!(check_crc64("PutObject", None, 7).is_ok());
        assert!(check_crc64("PutObject", Some(7), 7).is_ok());
        let e = check_crc64("PutObject", Some(8), 7).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Corrupt);
    }
}
