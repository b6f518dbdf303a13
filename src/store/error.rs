//! Store errors and the one function that decides what is retryable ([`classify`]).

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use thiserror::Error;

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

pub(super) fn from_sdk<E, R>(op: &'static str, err: SdkError<E, R>) -> StoreError
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
}
