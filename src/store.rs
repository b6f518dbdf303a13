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
//! - the SDK's own retries are off: [`crate::upload`] retries with its own backoff, forever while
//!   the file exists, and needs to see each failure;
//! - stalled-stream protection is off for uploads (a body slowed on purpose by a bandwidth limit
//!   must not be cut); instead each request gets a deadline from its size and
//!   `upload.min_bytes_per_sec`.
//! - static credentials from the config; no environment or profile chain is consulted.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
    StalledStreamProtectionConfig,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use base64::Engine as _;
use bytes::Bytes;
use thiserror::Error;
use tokio::task::JoinHandle;

use crate::config::Settings;

/// How an error is to be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Network trouble, 5xx, throttling, timeouts, a damaged body: try again later.
    Transient,
    /// Credentials, bucket, permissions, bad request: retrying the same way will not help.
    Permanent,
    /// The multipart upload is gone (aborted, expired): start a new one.
    NoSuchUpload,
    /// The store answered, but with bytes other than ours (ETag differs from our MD5).
    Corrupt,
}

#[derive(Debug, Error, Clone)]
#[error("{op}: {message}")]
pub struct StoreError {
    pub op: &'static str,
    pub kind: ErrorKind,
    pub message: String,
    /// The S3 error code, when the store sent one.
    pub code: Option<String>,
    pub status: Option<u16>,
}

impl StoreError {
    pub fn new(op: &'static str, kind: ErrorKind, message: impl Into<String>) -> StoreError {
        StoreError {
            op,
            kind,
            message: message.into(),
            code: None,
            status: None,
        }
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self.kind, ErrorKind::Transient | ErrorKind::Corrupt)
    }
}

/// The one place that decides what is retryable, from an HTTP status and an S3 error code.
pub fn classify(status: Option<u16>, code: Option<&str>) -> ErrorKind {
    match code {
        Some("NoSuchUpload") => return ErrorKind::NoSuchUpload,
        Some(
            "SlowDown"
            | "Throttling"
            | "ThrottlingException"
            | "RequestTimeout"
            | "RequestTimeTooSkewed"
            | "InternalError"
            | "ServiceUnavailable"
            | "BadDigest"
            | "InvalidDigest"
            | "IncompleteBody"
            | "OperationAborted"
            | "RequestTimeoutException",
        ) => return ErrorKind::Transient,
        Some(
            "AccessDenied"
            | "InvalidAccessKeyId"
            | "SignatureDoesNotMatch"
            | "NoSuchBucket"
            | "InvalidBucketName"
            | "AccountProblem"
            | "AllAccessDisabled"
            | "InvalidObjectState"
            | "KeyTooLongError"
            | "EntityTooLarge"
            | "InvalidArgument"
            | "MethodNotAllowed"
            | "NotImplemented"
            | "InvalidRequest"
            | "UserDisable",
        ) => return ErrorKind::Permanent,
        _ => {}
    }
    match status {
        Some(s) if s >= 500 || s == 408 || s == 429 => ErrorKind::Transient,
        Some(_) => ErrorKind::Permanent,
        None => ErrorKind::Transient,
    }
}

fn from_sdk<E, R>(op: &'static str, err: SdkError<E, R>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + HasStatus,
{
    match &err {
        SdkError::ConstructionFailure(_) => StoreError::new(
            op,
            ErrorKind::Permanent,
            format!("cannot build request: {}", err_chain(&err)),
        ),
        SdkError::TimeoutError(_) => StoreError::new(op, ErrorKind::Transient, "timed out"),
        SdkError::DispatchFailure(d) => {
            let kind = if d.is_user() {
                ErrorKind::Permanent
            } else {
                ErrorKind::Transient
            };
            StoreError::new(op, kind, format!("connection failed: {}", err_chain(&err)))
        }
        SdkError::ResponseError(r) => {
            let status = r.raw().status_code();
            let mut e = StoreError::new(
                op,
                ErrorKind::Transient,
                format!("bad response (HTTP {status}): {}", err_chain(&err)),
            );
            e.status = Some(status);
            e
        }
        SdkError::ServiceError(s) => {
            let status = s.raw().status_code();
            let code = s.err().code().map(str::to_string);
            let msg = s.err().message().unwrap_or("").to_string();
            let kind = classify(Some(status), code.as_deref());
            StoreError {
                op,
                kind,
                message: format!(
                    "HTTP {status} {}{}",
                    code.as_deref().unwrap_or("(no code)"),
                    if msg.is_empty() {
                        String::new()
                    } else {
                        format!(": {msg}")
                    }
                ),
                code,
                status: Some(status),
            }
        }
        _ => StoreError::new(op, ErrorKind::Transient, err_chain(&err)),
    }
}

/// Status code of a raw response, whatever its concrete type.
pub trait HasStatus {
    fn status_code(&self) -> u16;
}

impl HasStatus for aws_smithy_runtime_api::http::Response {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

fn err_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let m = inner.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = inner.source();
    }
    s
}

/// What HEAD says about a stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    pub etag: Option<String>,
    pub metadata: std::collections::HashMap<String, String>,
}

/// A part listed by ListParts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedPart {
    pub part_number: i32,
    pub size: u64,
    pub etag: Option<String>,
}

/// What a request that carries data sends.
#[derive(Debug, Clone)]
pub enum Body {
    /// A range of an open file, read while it is sent.
    File(FileRange),
    /// Bytes already in memory (small objects, read once for hashing and sending).
    Bytes(Bytes),
}

impl Body {
    pub fn len(&self) -> u64 {
        match self {
            Body::File(r) => r.len,
            Body::Bytes(b) => b.len() as u64,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn into_stream(self) -> ByteStream {
        match self {
            Body::File(r) => file_body(r),
            Body::Bytes(b) => ByteStream::from(b),
        }
    }
}

/// A byte range of an open file, sent as a request body.
#[derive(Debug, Clone)]
pub struct FileRange {
    pub file: Arc<File>,
    pub offset: u64,
    pub len: u64,
    /// The shared bandwidth limit, if any: each chunk waits for its tokens.
    pub limit: Option<Arc<crate::throttle::Bandwidth>>,
}

/// The store client.
#[derive(Clone, Debug)]
pub struct Store {
    client: Client,
    bucket: String,
    request_timeout: Duration,
    min_bytes_per_sec: u64,
}

/// Strips the quotes around an ETag.
pub fn clean_etag(etag: &str) -> String {
    etag.trim().trim_matches('"').to_ascii_lowercase()
}

impl Store {
    pub fn new(settings: &Settings) -> Store {
        let st = &settings.config.storage;
        let up = &settings.config.upload;
        let request_timeout = Duration::from_secs_f64(up.request_timeout_secs);
        // Under a bandwidth limit a body may legitimately move at the limit shared by every
        // request in flight: the deadlines allow for that.
        let mut min_bytes_per_sec = up.min_bytes_per_sec.max(1);
        if up.max_bytes_per_sec > 0 {
            min_bytes_per_sec =
                min_bytes_per_sec.min((up.max_bytes_per_sec / up.concurrency.max(1) as u64).max(1));
        }
        let creds = Credentials::new(
            st.access_key_id.clone(),
            settings.secret.clone(),
            None,
            None,
            "record-offload-config",
        );
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(st.region.clone()))
            .endpoint_url(st.endpoint.trim_end_matches('/'))
            .credentials_provider(creds)
            .force_path_style(st.path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(request_timeout.min(Duration::from_secs(10)))
                    .build(),
            )
            .stalled_stream_protection(
                StalledStreamProtectionConfig::enabled()
                    .upload_enabled(false)
                    .download_enabled(true)
                    .grace_period(request_timeout)
                    .build(),
            )
            .build();
        Store {
            client: Client::from_conf(conf),
            bucket: st.bucket.clone(),
            request_timeout,
            min_bytes_per_sec,
        }
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

    /// Stores a whole object in one request. Returns the ETag, which must equal `md5`.
    pub async fn put_object(
        &self,
        key: &str,
        body: Body,
        md5: &[u8; 16],
        metadata: &[(&str, String)],
    ) -> Result<String, StoreError> {
        let len = body.len();
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_length(len as i64)
            .content_md5(b64(md5))
            .body(body.into_stream());
        for (k, v) in metadata {
            req = req.metadata(*k, v);
        }
        self.timed("PutObject", len, async {
            let out = req
                .customize()
                .disable_payload_signing()
                .send()
                .await
                .map_err(|e| from_sdk("PutObject", e))?;
            check_etag("PutObject", out.e_tag(), md5)
        })
        .await
    }

    pub async fn create_multipart(
        &self,
        key: &str,
        metadata: &[(&str, String)],
    ) -> Result<String, StoreError> {
        let mut req = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key);
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
            check_etag("UploadPart", out.e_tag(), md5)
        })
        .await
    }

    pub async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(i32, String)],
    ) -> Result<Option<String>, StoreError> {
        let completed = CompletedMultipartUpload::builder()
            .set_parts(Some(
                parts
                    .iter()
                    .map(|(n, etag)| {
                        CompletedPart::builder()
                            .part_number(*n)
                            .e_tag(format!("\"{etag}\""))
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
        // Completion may take a while on the store side (it assembles the object).
        self.timed("CompleteMultipartUpload", 0, async {
            let out = req
                .send()
                .await
                .map_err(|e| from_sdk("CompleteMultipartUpload", e))?;
            Ok(out.e_tag().map(clean_etag))
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
                    etag: p.e_tag().map(clean_etag),
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

    /// HEAD of an object: `None` when it does not exist.
    pub async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StoreError> {
        let req = self.client.head_object().bucket(&self.bucket).key(key);
        self.timed("HeadObject", 0, async {
            match req.send().await {
                Ok(out) => Ok(Some(ObjectInfo {
                    size: out.content_length().unwrap_or(0).max(0) as u64,
                    etag: out.e_tag().map(clean_etag),
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
                Err(e)
                    if e.kind == ErrorKind::Permanent
                        && matches!(e.status, Some(400 | 404 | 405 | 501)) =>
                {
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

fn check_etag(op: &'static str, etag: Option<&str>, md5: &[u8; 16]) -> Result<String, StoreError> {
    let want = hex::encode(md5);
    match etag.map(clean_etag) {
        Some(got) if got == want => Ok(got),
        Some(got) => Err(StoreError::new(
            op,
            ErrorKind::Corrupt,
            format!("stored bytes differ from the file: ETag {got}, MD5 of the data sent {want}"),
        )),
        None => Err(StoreError::new(
            op,
            ErrorKind::Transient,
            "answer without an ETag",
        )),
    }
}

fn file_body(range: FileRange) -> ByteStream {
    ByteStream::new(SdkBody::from_body_1_x(FileRangeBody::new(range)))
}

/// Chunk size of bodies read from files.
const CHUNK: usize = 512 * 1024;

/// An HTTP body that reads a file range with positional reads on the blocking pool, one chunk
/// at a time: memory per request is one chunk, whatever the part size. A file that became
/// shorter than the range ends the body with an error (the file changed).
struct FileRangeBody {
    file: Arc<File>,
    pos: u64,
    end: u64,
    limit: Option<Arc<crate::throttle::Bandwidth>>,
    reading: Option<JoinHandle<std::io::Result<Vec<u8>>>>,
}

impl FileRangeBody {
    fn new(r: FileRange) -> Self {
        FileRangeBody {
            file: r.file,
            pos: r.offset,
            end: r.offset + r.len,
            limit: r.limit,
            reading: None,
        }
    }
}

/// Reads exactly `len` bytes at `offset` (fewer only at end of file).
pub fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl http_body::Body for FileRangeBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        if this.pos >= this.end {
            return Poll::Ready(None);
        }
        if this.reading.is_none() {
            let file = this.file.clone();
            let limit = this.limit.clone();
            let pos = this.pos;
            let n = (this.end - this.pos).min(CHUNK as u64) as usize;
            this.reading = Some(tokio::task::spawn_blocking(move || {
                if let Some(limit) = limit {
                    limit.wait_blocking(n as u64);
                }
                // Read into fresh, uninitialised capacity: no memset for bytes about to be
                // overwritten.
                let mut buf: Vec<u8> = Vec::with_capacity(n);
                while buf.len() < n {
                    let at = pos + buf.len() as u64;
                    let got =
                        rustix::io::pread(&*file, rustix::buffer::spare_capacity(&mut buf), at)
                            .map_err(std::io::Error::from)?;
                    if got == 0 {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "file became shorter while it was being sent",
                        ));
                    }
                }
                buf.truncate(n);
                Ok(buf)
            }));
        }
        let Some(handle) = this.reading.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(handle).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(res) => {
                this.reading = None;
                match res {
                    Ok(Ok(buf)) => {
                        this.pos += buf.len() as u64;
                        Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(buf)))))
                    }
                    Ok(Err(e)) => {
                        this.pos = this.end;
                        Poll::Ready(Some(Err(e)))
                    }
                    Err(e) => {
                        this.pos = this.end;
                        Poll::Ready(Some(Err(std::io::Error::other(e.to_string()))))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pos >= self.end
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.end.saturating_sub(self.pos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert_eq!(classify(Some(503), Some("SlowDown")), ErrorKind::Transient);
        assert_eq!(classify(Some(500), None), ErrorKind::Transient);
        assert_eq!(classify(Some(429), None), ErrorKind::Transient);
        assert_eq!(
            classify(Some(403), Some("AccessDenied")),
            ErrorKind::Permanent
        );
        assert_eq!(
            classify(Some(404), Some("NoSuchBucket")),
            ErrorKind::Permanent
        );
        assert_eq!(
            classify(Some(404), Some("NoSuchUpload")),
            ErrorKind::NoSuchUpload
        );
        assert_eq!(classify(Some(400), Some("BadDigest")), ErrorKind::Transient);
        assert_eq!(
            classify(Some(400), Some("RequestTimeout")),
            ErrorKind::Transient
        );
        assert_eq!(classify(Some(400), None), ErrorKind::Permanent);
        assert_eq!(classify(None, None), ErrorKind::Transient);
    }
}
