//! A local S3-compatible server (s3s-fs: objects are plain files under a directory) for the
//! `demo` command, the tests and the benchmarks. It checks request signatures, so a client
//! with wrong credentials is refused as a real store would refuse it. Loopback only.
//!
//! s3s-fs has no ListMultipartUploads; this server adds one, read from the same files s3s-fs
//! keeps for an open upload (`.bucket-B.object-K.upload-U.metadata.json` while
//! `.upload-U.json` exists), so the daemon's clean-up of stray uploads at start can be tested.
//! Everything else is s3s-fs as it is, quirks included (ListParts unsorted and without
//! ETags, ListParts of an aborted upload answering with no parts).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::dto::*;
use s3s::service::S3ServiceBuilder;
use s3s::{S3, S3Request, S3Response, S3Result};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Credentials of the local server.
pub const ACCESS_KEY: &str = "record-offload-dev";
pub const SECRET_KEY: &str = "record-offload-dev-secret";

/// A running server; stops when dropped.
pub struct DevServer {
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    stop: CancellationToken,
}

impl DevServer {
    /// Serves `data_dir` (each sub-directory is a bucket) on `bind` (use port 0 for any).
    pub async fn start(data_dir: &Path, bind: SocketAddr) -> std::io::Result<DevServer> {
        if !bind.ip().is_loopback() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the development server listens on loopback addresses only",
            ));
        }
        std::fs::create_dir_all(data_dir)?;
        let fs = s3s_fs::FileSystem::new(data_dir)
            .map_err(|e| std::io::Error::other(format!("s3s-fs: {e:?}")))?;
        let mut builder = S3ServiceBuilder::new(DevS3 {
            fs,
            data_dir: data_dir.to_path_buf(),
        });
        builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = builder.build();
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            let http = ConnBuilder::new(TokioExecutor::new());
            loop {
                let socket = tokio::select! {
                    _ = token.cancelled() => break,
                    r = listener.accept() => match r {
                        Ok((s, _)) => s,
                        Err(_) => continue,
                    },
                };
                let _ = socket.set_nodelay(true);
                let conn = http
                    .serve_connection(TokioIo::new(socket), service.clone())
                    .into_owned();
                let token = token.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = conn => {}
                        _ = token.cancelled() => {}
                    }
                });
            }
        });
        Ok(DevServer {
            addr,
            data_dir: data_dir.to_path_buf(),
            stop,
        })
    }

    /// Creates a bucket (a directory).
    pub fn create_bucket(&self, name: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(self.data_dir.join(name))
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Where the server keeps an object's bytes.
    pub fn object_path(&self, bucket: &str, key: &str) -> PathBuf {
        self.data_dir.join(bucket).join(key)
    }

    /// Multipart uploads still open (bucket, key, upload id).
    pub fn open_uploads(&self) -> Vec<(String, String, String)> {
        open_uploads(&self.data_dir)
    }
}

/// Reads the open multipart uploads from s3s-fs's files.
fn open_uploads(data_dir: &Path) -> Vec<(String, String, String)> {
    let decode = |s: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
    };
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name
            .strip_prefix(".bucket-")
            .and_then(|r| r.strip_suffix(".metadata.json"))
        else {
            continue;
        };
        let Some((bucket, rest)) = rest.split_once(".object-") else {
            continue;
        };
        let Some((key, upload)) = rest.split_once(".upload-") else {
            continue;
        };
        if !data_dir.join(format!(".upload-{upload}.json")).exists() {
            continue;
        }
        if let (Some(b), Some(k)) = (decode(bucket), decode(key)) {
            out.push((b, k, upload.to_string()));
        }
    }
    out.sort();
    out
}

/// s3s-fs plus ListMultipartUploads.
struct DevS3 {
    fs: s3s_fs::FileSystem,
    data_dir: PathBuf,
}

macro_rules! dev_s3 {
    ($($name:ident: $input:ident => $output:ident),* $(,)?) => {
        #[async_trait::async_trait]
        impl S3 for DevS3 {
            $(
                async fn $name(&self, req: S3Request<$input>) -> S3Result<S3Response<$output>> {
                    self.fs.$name(req).await
                }
            )*

            async fn list_multipart_uploads(
                &self,
                req: S3Request<ListMultipartUploadsInput>,
            ) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
                let input = req.input;
                let prefix = input.prefix.clone().unwrap_or_default();
                let uploads = open_uploads(&self.data_dir)
                    .into_iter()
                    .filter(|(b, k, _)| *b == input.bucket && k.starts_with(&prefix))
                    .map(|(_, key, upload_id)| MultipartUpload {
                        key: Some(key),
                        upload_id: Some(upload_id),
                        ..Default::default()
                    })
                    .collect();
                Ok(S3Response::new(ListMultipartUploadsOutput {
                    bucket: Some(input.bucket),
                    prefix: input.prefix,
                    uploads: Some(uploads),
                    is_truncated: Some(false),
                    ..Default::default()
                }))
            }
        }
    };
}

dev_s3! {
    create_bucket: CreateBucketInput => CreateBucketOutput,
    copy_object: CopyObjectInput => CopyObjectOutput,
    delete_bucket: DeleteBucketInput => DeleteBucketOutput,
    delete_object: DeleteObjectInput => DeleteObjectOutput,
    delete_objects: DeleteObjectsInput => DeleteObjectsOutput,
    get_bucket_location: GetBucketLocationInput => GetBucketLocationOutput,
    get_object: GetObjectInput => GetObjectOutput,
    head_bucket: HeadBucketInput => HeadBucketOutput,
    head_object: HeadObjectInput => HeadObjectOutput,
    list_buckets: ListBucketsInput => ListBucketsOutput,
    list_objects: ListObjectsInput => ListObjectsOutput,
    list_objects_v2: ListObjectsV2Input => ListObjectsV2Output,
    put_object: PutObjectInput => PutObjectOutput,
    create_multipart_upload: CreateMultipartUploadInput => CreateMultipartUploadOutput,
    upload_part: UploadPartInput => UploadPartOutput,
    upload_part_copy: UploadPartCopyInput => UploadPartCopyOutput,
    list_parts: ListPartsInput => ListPartsOutput,
    complete_multipart_upload: CompleteMultipartUploadInput => CompleteMultipartUploadOutput,
    abort_multipart_upload: AbortMultipartUploadInput => AbortMultipartUploadOutput,
}

impl Drop for DevServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
