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
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::interceptors::BeforeDeserializationInterceptorContextRef;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
    StalledStreamProtectionConfig,
};
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    CompletedMultipartUpload, CompletedPart, ServerSideEncryption, StorageClass,
};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use base64::Engine as _;
use bytes::Bytes;
use thiserror::Error;
use tokio::task::JoinHandle;

use crate::config::Settings;
use crate::util::error::chain;

/// How an error is to be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Network trouble, 5xx, throttling, timeouts, a damaged body: try again later.
    Transient,
    /// Credentials, bucket, permissions, bad request: retrying the same way will not help.
    Permanent,
    /// The multipart upload is gone (aborted, expired): start a new one.
    NoSuchUpload,
    /// The store refuses to complete the upload with these parts (`InvalidPart`,
    /// `InvalidPartOrder`): abort it and start a new one.
    RestartUpload,
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
///
/// Only the documented refusals of credentials, bucket and access are permanent: anything
/// else — an unknown code, an unexpected status, an answer that could not be read — is
/// retried with backoff, because a file must never be stuck on a store's quirk.
pub fn classify(status: Option<u16>, code: Option<&str>) -> ErrorKind {
    match code {
        Some("NoSuchUpload") => ErrorKind::NoSuchUpload,
        Some("InvalidPart" | "InvalidPartOrder") => ErrorKind::RestartUpload,
        Some(c) if PERMANENT_CODES.contains(&c) => ErrorKind::Permanent,
        Some(_) => ErrorKind::Transient,
        // HEAD answers carry no body, hence no code: a 401/403 is still a refusal of access.
        None => match status {
            Some(401 | 403) => ErrorKind::Permanent,
            _ => ErrorKind::Transient,
        },
    }
}

/// Error codes that mean the credentials, the bucket or the access rights are wrong: retrying
/// the same request will not help until an operator acts.
pub const PERMANENT_CODES: &[&str] = &[
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "NoSuchBucket",
    "InvalidBucketName",
    "AccountProblem",
    "AllAccessDisabled",
    "UserDisable",
    "InvalidSecurity",
    "ExpiredToken",
    "InvalidToken",
];

fn from_sdk<E, R>(op: &'static str, err: SdkError<E, R>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + HasStatus,
{
    match &err {
        SdkError::ConstructionFailure(_) => StoreError::new(
            op,
            ErrorKind::Permanent,
            format!("cannot build request: {}", chain(&err)),
        ),
        SdkError::TimeoutError(_) => StoreError::new(op, ErrorKind::Transient, "timed out"),
        SdkError::DispatchFailure(d) => {
            let kind = if d.is_user() {
                ErrorKind::Permanent
            } else {
                ErrorKind::Transient
            };
            let chain = chain(&err);
            // A TLS verdict is the one connection failure the operator has to act on: say
            // where the fix goes. It stays transient: the CA may be added while files wait.
            let hint = if chain.contains("certificate") {
                " (the store's TLS certificate is not trusted: add the CA that signed it to \
                 storage.ca_file as PEM, or check storage.endpoint's host name)"
            } else {
                ""
            };
            StoreError::new(op, kind, format!("connection failed: {chain}{hint}"))
        }
        SdkError::ResponseError(r) => {
            let status = r.raw().status_code();
            let mut e = StoreError::new(
                op,
                ErrorKind::Transient,
                format!("bad response (HTTP {status}): {}", chain(&err)),
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
        _ => StoreError::new(op, ErrorKind::Transient, chain(&err)),
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

/// The header in which OSS answers an object's CRC-64/XZ (decimal).
pub const CRC64_HEADER: &str = "x-oss-hash-crc64ecma";

/// Reads [`CRC64_HEADER`] off the raw answer of one request (the SDK's outputs do not keep
/// headers it does not model).
#[derive(Debug, Clone, Default)]
struct Crc64Slot(Arc<std::sync::Mutex<Option<u64>>>);

impl Crc64Slot {
    fn get(&self) -> Option<u64> {
        self.0.lock().map(|g| *g).unwrap_or(None)
    }
}

impl Intercept for Crc64Slot {
    fn name(&self) -> &'static str {
        "Crc64Slot"
    }

    fn read_before_deserialization(
        &self,
        context: &BeforeDeserializationInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let value = context
            .response()
            .headers()
            .get(CRC64_HEADER)
            .and_then(|v| v.trim().parse::<u64>().ok());
        if let Ok(mut slot) = self.0.lock() {
            *slot = value;
        }
        Ok(())
    }
}

/// `storage.bucket_endpoint`: the endpoint is the bucket's own host, so every request goes to
/// it as it is (the operation's path is the key alone), never with the bucket added.
#[derive(Debug)]
struct BucketEndpoint(String);

impl aws_sdk_s3::config::endpoint::ResolveEndpoint for BucketEndpoint {
    fn resolve_endpoint<'a>(
        &'a self,
        _params: &'a aws_sdk_s3::config::endpoint::Params,
    ) -> aws_sdk_s3::config::endpoint::EndpointFuture<'a> {
        aws_sdk_s3::config::endpoint::EndpointFuture::ready(Ok(
            aws_sdk_s3::config::endpoint::Endpoint::builder()
                .url(self.0.clone())
                .build(),
        ))
    }
}

/// What every new object is stored with, besides its bytes (`storage.*` options).
#[derive(Debug, Clone, Default)]
struct ObjectOptions {
    storage_class: Option<StorageClass>,
    sse: Option<ServerSideEncryption>,
    sse_kms_key_id: Option<String>,
    content_disposition: Option<String>,
    cache_control: Option<String>,
    metadata: Vec<(String, String)>,
    media: crate::util::media::MediaTypes,
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
    pub limit: Option<Arc<crate::util::throttle::Bandwidth>>,
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
        let mut conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(st.region.clone()));
        let endpoint = st.endpoint.trim_end_matches('/').to_string();
        conf = if st.bucket_endpoint {
            conf.endpoint_resolver(BucketEndpoint(endpoint))
        } else {
            conf.endpoint_url(endpoint)
        };
        if let Some(ctx) = &settings.tls {
            let http = aws_smithy_http_client::Builder::new()
                .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                    aws_smithy_http_client::tls::rustls_provider::CryptoMode::AwsLc,
                ))
                .tls_context(ctx.clone())
                .build_https();
            conf = conf.http_client(http);
        }
        let conf = conf
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
        let sse = match st.sse.as_deref() {
            Some("AES256") => Some(ServerSideEncryption::Aes256),
            Some("KMS") => Some(ServerSideEncryption::AwsKms),
            _ => None,
        };
        let options = ObjectOptions {
            storage_class: st.storage_class.as_deref().map(StorageClass::from),
            sse: sse.clone(),
            sse_kms_key_id: st.sse_kms_key_id.clone(),
            content_disposition: st.content_disposition.clone(),
            cache_control: st.cache_control.clone(),
            metadata: st
                .metadata
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect(),
            media: settings.media.clone(),
        };
        Store {
            client: Client::from_conf(conf),
            bucket: st.bucket.clone(),
            request_timeout,
            min_bytes_per_sec,
            options: Arc::new(options),
            etag_is_md5: sse != Some(ServerSideEncryption::AwsKms),
        }
    }

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
    /// store's ETags are not MD5s, see `etag_is_md5`), and its CRC-64 `crc64` when it sends one.
    pub async fn put_object(
        &self,
        key: &str,
        rel: &std::path::Path,
        body: Body,
        md5: &[u8; 16],
        crc64: u64,
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
            check_crc64("PutObject", stored.crc64, crc64)?;
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
    fn check_etag(
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
    limit: Option<Arc<crate::util::throttle::Bandwidth>>,
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
#[allow(clippy::unwrap_used)]
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
        assert_eq!(classify(None, None), ErrorKind::Transient);
        // What the store says and we cannot use is retried, never a verdict on the file.
        assert_eq!(classify(Some(400), None), ErrorKind::Transient);
        assert_eq!(classify(Some(200), None), ErrorKind::Transient);
        assert_eq!(
            classify(Some(400), Some("InvalidArgument")),
            ErrorKind::Transient
        );
        assert_eq!(
            classify(Some(501), Some("NotImplemented")),
            ErrorKind::Transient
        );
        assert_eq!(
            classify(Some(418), Some("SomethingNew")),
            ErrorKind::Transient
        );
        assert_eq!(classify(Some(403), None), ErrorKind::Permanent);
        assert_eq!(
            classify(Some(403), Some("InvalidAccessKeyId")),
            ErrorKind::Permanent
        );
        assert_eq!(
            classify(Some(403), Some("SignatureDoesNotMatch")),
            ErrorKind::Permanent
        );
        assert_eq!(
            classify(Some(403), Some("RequestTimeTooSkewed")),
            ErrorKind::Transient
        );
        assert_eq!(
            classify(Some(400), Some("InvalidPart")),
            ErrorKind::RestartUpload
        );
        assert_eq!(
            classify(Some(400), Some("InvalidPartOrder")),
            ErrorKind::RestartUpload
        );
    }

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
