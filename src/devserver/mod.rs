//! A local S3-compatible server (s3s-fs: objects are plain files under a directory) for the
//! `demo` command, the tests and the benchmarks. It checks request signatures, so a client
//! with wrong credentials is refused as a real store would refuse it. Loopback only.
//!
//! s3s-fs has no ListMultipartUploads; this server adds one, read from the same files s3s-fs
//! keeps for an open upload (`.bucket-B.object-K.upload-U.metadata.json` while
//! `.upload-U.json` exists), so the daemon's clean-up of stray uploads at start can be tested.
//! Everything else is s3s-fs as it is, quirks included (ListParts unsorted and without
//! ETags, ListParts of an aborted upload answering with no parts), except that any storage
//! class is accepted (s3s-fs knows only `STANDARD` and `REDUCED_REDUNDANCY`; OSS has `IA`,
//! `Archive` …) and, like server-side encryption headers, recorded and not acted on.
//!
//! [`DevServer::start_with`] adds, in a thin layer around s3s ([`DevOptions`]):
//! - **OSS mode** (`oss`), where OSS differs from S3: ETags answered in upper-case hex in
//!   quotes (PutObject, UploadPart, CompleteMultipartUpload, HEAD/GET, ListParts, listings);
//!   CompleteMultipartUpload refuses with 400 `InvalidPart` any part ETag that is not
//!   byte-equal to the one answered for that part (quotes included); ListMultipartUploads
//!   answers 501 `NotImplemented`, as a store without that call does; PutObject,
//!   CompleteMultipartUpload and HEAD answers carry `x-oss-hash-crc64ecma` (CRC-64/XZ of the
//!   stored bytes, decimal); ListParts is sorted and carries the answered ETags.
//! - **A guard against SDK drift**, in every mode: requests carrying `x-amz-checksum-*`,
//!   `x-amz-sdk-checksum-algorithm`, `x-amz-trailer`, `Content-Encoding: aws-chunked` or
//!   `x-amz-content-sha256: STREAMING-…` are counted ([`DevServer::drift_requests`]); in OSS
//!   mode they are refused with 400 `InvalidArgument`, as OSS refuses them.
//! - **A request log** ([`DevServer::requests`]): method, path, query, headers and status of
//!   the last [`REQUEST_LOG_LEN`] requests.
//! - **A custom domain** (`bucket_host`): requests whose `Host` is that host address the bucket
//!   with the key as the whole path (a CNAME bound to the bucket), signatures checked over the
//!   path as sent (s3s's virtual-host support).
//! - **HTTPS** (`tls`) with a server certificate signed by a CA made at start.

mod oss;
mod tls;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use futures::future::BoxFuture;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::dto::*;
use s3s::host::{S3Host, VirtualHost};
use s3s::service::{S3Service, S3ServiceBuilder};
use s3s::{HttpError, HttpResponse, S3, S3Request, S3Response, S3Result, s3_error};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use oss::CRC64_HEADER;
pub use tls::other_ca_pem;

/// Credentials of the local server.
pub const ACCESS_KEY: &str = "record-offload-dev";
pub const SECRET_KEY: &str = "record-offload-dev-secret";

/// How many requests [`DevServer::requests`] keeps (the oldest are dropped first).
pub const REQUEST_LOG_LEN: usize = 10_000;

/// What the server does beyond plain s3s-fs; `Default` is what [`DevServer::start`] serves.
#[derive(Clone, Debug, Default)]
pub struct DevOptions {
    /// Behave as Alibaba Cloud OSS does where it differs from S3 (see the module docs).
    pub oss: bool,
    /// Serve HTTPS with a certificate for `localhost`, `127.0.0.1` (and the `bucket_host`
    /// name) signed by a CA made at start: [`DevServer::ca_pem`], [`DevServer::ca_path`].
    pub tls: bool,
    /// (host, bucket): requests whose `Host` header is `host` address `bucket`, the key being
    /// the whole path. `host` must be a name, not an IP address (`localhost` resolves
    /// everywhere); without a `:port` it matches that name on any port.
    pub bucket_host: Option<(String, String)>,
}

/// One request as the server received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// The path as sent (percent-encoded as the client wrote it).
    pub path: String,
    /// The raw query string, empty when there is none.
    pub query: String,
    /// Header names in lower case, in the order received; values lossily decoded.
    pub headers: Vec<(String, String)>,
    /// The status answered.
    pub status: u16,
}

impl Recorded {
    /// The first value of a header (`name` in lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the query has this parameter (`uploads`, `uploadId`, `partNumber` …).
    pub fn has_param(&self, name: &str) -> bool {
        url::form_urlencoded::parse(self.query.as_bytes()).any(|(k, _)| k == name)
    }
}

/// State shared by the layer, the S3 implementation and [`DevServer`].
#[derive(Default)]
struct Shared {
    opts: DevOptions,
    log: Mutex<VecDeque<Recorded>>,
    drift: AtomicU64,
    /// How many of the next CRC-64 headers are answered wrong (see `damage_crc64`).
    crc_damage: AtomicU64,
    part_etags: oss::PartEtags,
    crcs: oss::CrcCache,
}

/// A running server; stops when dropped.
pub struct DevServer {
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    stop: CancellationToken,
    shared: Arc<Shared>,
    ca: Option<(String, PathBuf)>,
}

impl DevServer {
    /// Serves `data_dir` (each sub-directory is a bucket) on `bind` (use port 0 for any).
    pub async fn start(data_dir: &Path, bind: SocketAddr) -> std::io::Result<DevServer> {
        DevServer::start_with(data_dir, bind, DevOptions::default()).await
    }

    /// [`DevServer::start`] with the modes of `opts`.
    pub async fn start_with(
        data_dir: &Path,
        bind: SocketAddr,
        opts: DevOptions,
    ) -> std::io::Result<DevServer> {
        let invalid =
            |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, m.to_string());
        if !bind.ip().is_loopback() {
            return Err(invalid(
                "the development server listens on loopback addresses only",
            ));
        }
        if let Some((host, _)) = &opts.bucket_host
            && (host.parse::<SocketAddr>().is_ok() || host.parse::<std::net::IpAddr>().is_ok())
        {
            return Err(invalid(
                "bucket_host must be a name (s3s reads an IP address host as path style)",
            ));
        }
        std::fs::create_dir_all(data_dir)?;
        let root = data_dir.canonicalize()?;
        let fs = s3s_fs::FileSystem::new(data_dir)
            .map_err(|e| std::io::Error::other(format!("s3s-fs: {e:?}")))?;
        let shared = Arc::new(Shared {
            opts: opts.clone(),
            ..Default::default()
        });
        let mut builder = S3ServiceBuilder::new(DevS3 {
            fs,
            root,
            shared: shared.clone(),
        });
        builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        if let Some((host, bucket)) = &opts.bucket_host {
            builder.set_host(BucketHost {
                host: host.to_ascii_lowercase(),
                bucket: bucket.clone(),
            });
        }
        let layer = Layer {
            s3: builder.build(),
            shared: shared.clone(),
        };

        let (acceptor, ca) = if opts.tls {
            let names: Vec<String> = opts
                .bucket_host
                .iter()
                .map(|(h, _)| host_name(h).to_string())
                .collect();
            let (acceptor, pem) = tls::acceptor(&names)?;
            let path = ca_file_for(data_dir);
            std::fs::write(&path, &pem)?;
            (Some(acceptor), Some((pem, path)))
        } else {
            (None, None)
        };

        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(listener, layer, acceptor, stop.clone()));
        Ok(DevServer {
            addr,
            data_dir: data_dir.to_path_buf(),
            stop,
            shared,
            ca,
        })
    }

    /// Creates a bucket (a directory).
    pub fn create_bucket(&self, name: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(self.data_dir.join(name))
    }

    /// `http://127.0.0.1:PORT`, or `https://…` in TLS mode.
    pub fn endpoint(&self) -> String {
        format!("{}://{}", self.scheme(), self.addr)
    }

    /// The custom domain's endpoint (`scheme://host:PORT`, the port added when `bucket_host`
    /// has none), if one is set.
    pub fn bucket_endpoint(&self) -> Option<String> {
        let (host, _) = self.shared.opts.bucket_host.as_ref()?;
        let with_port = if host_has_port(host) {
            host.clone()
        } else {
            format!("{host}:{}", self.addr.port())
        };
        Some(format!("{}://{with_port}", self.scheme()))
    }

    fn scheme(&self) -> &'static str {
        if self.ca.is_some() { "https" } else { "http" }
    }

    /// The PEM of the CA that signed the server's certificate (TLS mode only).
    pub fn ca_pem(&self) -> Option<String> {
        self.ca.as_ref().map(|(pem, _)| pem.clone())
    }

    /// Where that PEM was written: `<data_dir>.ca.pem`, beside the data directory.
    pub fn ca_path(&self) -> Option<&Path> {
        self.ca.as_ref().map(|(_, p)| p.as_path())
    }

    /// Where the server keeps an object's bytes.
    pub fn object_path(&self, bucket: &str, key: &str) -> PathBuf {
        self.data_dir.join(bucket).join(key)
    }

    /// Multipart uploads still open (bucket, key, upload id).
    pub fn open_uploads(&self) -> Vec<(String, String, String)> {
        open_uploads(&self.data_dir)
    }

    /// The last [`REQUEST_LOG_LEN`] requests, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared
            .log
            .lock()
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Empties the request log.
    pub fn clear_requests(&self) {
        if let Ok(mut l) = self.shared.log.lock() {
            l.clear();
        }
    }

    /// OSS mode: the next `n` answers that carry `x-oss-hash-crc64ecma` carry a wrong value,
    /// as if the stored object were not the bytes sent (0 ends it).
    pub fn damage_crc64(&self, n: u64) {
        self.shared.crc_damage.store(n, Ordering::Relaxed);
    }

    /// How many requests carried a checksum, trailer or aws-chunked header (see the module
    /// docs); refused in OSS mode, counted in every mode.
    pub fn drift_requests(&self) -> u64 {
        self.shared.drift.load(Ordering::Relaxed)
    }
}

impl Drop for DevServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// `tmp/store` -> `tmp/store.ca.pem`.
fn ca_file_for(data_dir: &Path) -> PathBuf {
    let mut name = data_dir
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "devserver".into());
    name.push(".ca.pem");
    data_dir.with_file_name(name)
}

fn host_has_port(host: &str) -> bool {
    host.rsplit_once(':')
        .is_some_and(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

fn host_name(host: &str) -> &str {
    if host_has_port(host) {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    } else {
        host
    }
}

async fn accept_loop(
    listener: TcpListener,
    layer: Layer,
    tls: Option<tokio_rustls::TlsAcceptor>,
    token: CancellationToken,
) {
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
        let (http, layer, tls, token) = (http.clone(), layer.clone(), tls.clone(), token.clone());
        tokio::spawn(async move {
            match tls {
                None => serve(http, TokioIo::new(socket), layer, token).await,
                Some(tls) => {
                    let handshake =
                        tokio::time::timeout(Duration::from_secs(10), tls.accept(socket));
                    if let Ok(Ok(stream)) = handshake.await {
                        serve(http, TokioIo::new(stream), layer, token).await;
                    }
                }
            }
        });
    }
}

async fn serve<I>(http: ConnBuilder<TokioExecutor>, io: I, layer: Layer, token: CancellationToken)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let conn = http.serve_connection(io, layer);
    tokio::select! {
        _ = conn => {}
        _ = token.cancelled() => {}
    }
}

/// The custom domain: its `Host` addresses the bucket; any other name is path style.
struct BucketHost {
    host: String,
    bucket: String,
}

impl S3Host for BucketHost {
    fn parse_host_header<'a>(&'a self, host: &'a str) -> S3Result<VirtualHost<'a>> {
        let given = host.to_ascii_lowercase();
        let matches = if host_has_port(&self.host) {
            given == self.host
        } else {
            host_name(&given) == self.host
        };
        Ok(if matches {
            VirtualHost::new(host).with_bucket(self.bucket.as_str())
        } else {
            VirtualHost::new(host)
        })
    }
}

/// The hyper service in front of s3s: request log, drift guard, the raw part ETags of a
/// completion in OSS mode.
#[derive(Clone)]
struct Layer {
    s3: S3Service,
    shared: Arc<Shared>,
}

impl hyper::service::Service<Request<Incoming>> for Layer {
    type Response = HttpResponse;
    type Error = HttpError;
    type Future = BoxFuture<'static, Result<HttpResponse, HttpError>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.handle(req).await })
    }
}

impl Layer {
    async fn handle(self, req: Request<Incoming>) -> Result<HttpResponse, HttpError> {
        let mut rec = Recorded {
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
            query: req.uri().query().unwrap_or_default().to_string(),
            headers: req
                .headers()
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            status: 0,
        };
        let oss = self.shared.opts.oss;
        let drift = is_drift(req.headers());
        if drift {
            self.shared.drift.fetch_add(1, Ordering::Relaxed);
        }
        let resp = if drift && oss {
            error_response(
                StatusCode::BAD_REQUEST,
                "InvalidArgument",
                "checksum headers, trailers and aws-chunked bodies are not supported",
            )
        } else if oss && rec.method == "POST" && rec.has_param("uploadId") {
            // CompleteMultipartUpload: keep the part ETags as written for the S3 impl.
            let (mut parts, body) = req.into_parts();
            match body.collect().await {
                Ok(body) => {
                    let body = body.to_bytes();
                    let raw = oss::parse_complete_body(&String::from_utf8_lossy(&body));
                    parts.extensions.insert(raw);
                    self.s3
                        .call(Request::from_parts(parts, s3s::Body::from(body)))
                        .await?
                }
                Err(_) => error_response(
                    StatusCode::BAD_REQUEST,
                    "IncompleteBody",
                    "the request body ended early",
                ),
            }
        } else {
            self.s3.call(req.map(s3s::Body::from)).await?
        };
        rec.status = resp.status().as_u16();
        if let Ok(mut log) = self.shared.log.lock() {
            if log.len() >= REQUEST_LOG_LEN {
                log.pop_front();
            }
            log.push_back(rec);
        }
        Ok(resp)
    }
}

/// Headers of the SDK's flexible checksums and streaming signatures, which OSS refuses.
fn is_drift(headers: &HeaderMap) -> bool {
    headers.iter().any(|(name, value)| {
        let name = name.as_str();
        let value = String::from_utf8_lossy(value.as_bytes());
        name.starts_with("x-amz-checksum-")
            || name == "x-amz-sdk-checksum-algorithm"
            || name == "x-amz-trailer"
            || (name == "content-encoding"
                && value
                    .split(',')
                    .any(|v| v.trim().eq_ignore_ascii_case("aws-chunked")))
            || (name == "x-amz-content-sha256" && value.starts_with("STREAMING-"))
    })
}

fn error_response(status: StatusCode, code: &str, message: &str) -> HttpResponse {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    );
    let mut resp = Response::new(s3s::Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/xml"),
    );
    resp
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

/// s3s-fs plus ListMultipartUploads, and the OSS mode's answers.
struct DevS3 {
    fs: s3s_fs::FileSystem,
    /// The data directory, canonical (as s3s-fs resolves it).
    root: PathBuf,
    shared: Arc<Shared>,
}

impl DevS3 {
    fn oss(&self) -> bool {
        self.shared.opts.oss
    }

    /// Adds `x-oss-hash-crc64ecma` of the stored object to an answer.
    async fn add_crc<T>(&self, resp: &mut S3Response<T>, bucket: &str, key: &str) -> S3Result<()> {
        let crc = self
            .shared
            .crcs
            .object_crc(&self.root, bucket, key)
            .await
            .map_err(|e| s3_error!(e, InternalError, "reading the object for its CRC-64"))?;
        if let Some(crc) = crc {
            // A test may ask for wrong CRCs: the answer of a store whose object is damaged.
            let damaged = self
                .shared
                .crc_damage
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok();
            let crc = if damaged { crc ^ 1 } else { crc };
            resp.headers.insert(CRC64_HEADER, HeaderValue::from(crc));
        }
        Ok(())
    }

    /// What this server answered for a part, or what it would have (the part's MD5).
    async fn answered_etag(&self, upload_id: &str, part: i32) -> Option<String> {
        match self.shared.part_etags.get(upload_id, part) {
            Some(e) => Some(e),
            None => oss::part_file_etag(&self.root, upload_id, part).await,
        }
    }
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
                if self.oss() {
                    return Err(s3_error!(
                        NotImplemented,
                        "ListMultipartUploads is not supported by this store"
                    ));
                }
                let input = req.input;
                let prefix = input.prefix.clone().unwrap_or_default();
                let uploads = open_uploads(&self.root)
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

            async fn put_object(
                &self,
                mut req: S3Request<PutObjectInput>,
            ) -> S3Result<S3Response<PutObjectOutput>> {
                req.input.storage_class = None;
                let (bucket, key) = (req.input.bucket.clone(), req.input.key.clone());
                let mut resp = self.fs.put_object(req).await?;
                if self.oss() {
                    oss::upper(&mut resp.output.e_tag);
                    self.add_crc(&mut resp, &bucket, &key).await?;
                }
                Ok(resp)
            }

            async fn create_multipart_upload(
                &self,
                mut req: S3Request<CreateMultipartUploadInput>,
            ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
                req.input.storage_class = None;
                self.fs.create_multipart_upload(req).await
            }

            async fn upload_part(
                &self,
                req: S3Request<UploadPartInput>,
            ) -> S3Result<S3Response<UploadPartOutput>> {
                let (upload_id, part) = (req.input.upload_id.clone(), req.input.part_number);
                let mut resp = self.fs.upload_part(req).await?;
                if self.oss() {
                    oss::upper(&mut resp.output.e_tag);
                    if let Some(etag) = &resp.output.e_tag {
                        self.shared
                            .part_etags
                            .insert(&upload_id, part, oss::as_sent(etag));
                    }
                }
                Ok(resp)
            }

            async fn list_parts(
                &self,
                req: S3Request<ListPartsInput>,
            ) -> S3Result<S3Response<ListPartsOutput>> {
                let upload_id = req.input.upload_id.clone();
                let mut resp = self.fs.list_parts(req).await?;
                if self.oss()
                    && let Some(parts) = &mut resp.output.parts
                {
                    parts.sort_by_key(|p| p.part_number);
                    for p in parts.iter_mut() {
                        if p.e_tag.is_none()
                            && let Some(n) = p.part_number
                            && let Some(sent) = self.answered_etag(&upload_id, n).await
                        {
                            p.e_tag = Some(ETag::Strong(sent.trim_matches('"').to_string()));
                        }
                        oss::upper(&mut p.e_tag);
                    }
                }
                Ok(resp)
            }

            async fn complete_multipart_upload(
                &self,
                req: S3Request<CompleteMultipartUploadInput>,
            ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
                if !self.oss() {
                    return self.fs.complete_multipart_upload(req).await;
                }
                let upload_id = req.input.upload_id.clone();
                let (bucket, key) = (req.input.bucket.clone(), req.input.key.clone());
                let raw = req
                    .extensions
                    .get::<oss::RawParts>()
                    .cloned()
                    .unwrap_or_default();
                for (part, etag) in &raw.0 {
                    let answered = self.answered_etag(&upload_id, *part).await;
                    if answered.as_deref() != Some(etag.as_str()) {
                        return Err(s3_error!(
                            InvalidPart,
                            "part {part}: ETag {etag} is not the one answered ({})",
                            answered.as_deref().unwrap_or("none")
                        ));
                    }
                }
                let mut resp = self.fs.complete_multipart_upload(req).await?;
                self.shared.part_etags.forget(&upload_id);
                oss::upper(&mut resp.output.e_tag);
                // s3s-fs answers through a keep-alive future: upper-case what it resolves to.
                if let Some(fut) = resp.output.future.take() {
                    resp.output.future = Some(Box::pin(async move {
                        let mut out = fut.await?;
                        oss::upper(&mut out.e_tag);
                        Ok(out)
                    }));
                }
                self.add_crc(&mut resp, &bucket, &key).await?;
                Ok(resp)
            }

            async fn abort_multipart_upload(
                &self,
                req: S3Request<AbortMultipartUploadInput>,
            ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
                let upload_id = req.input.upload_id.clone();
                let resp = self.fs.abort_multipart_upload(req).await?;
                self.shared.part_etags.forget(&upload_id);
                Ok(resp)
            }

            async fn head_object(
                &self,
                req: S3Request<HeadObjectInput>,
            ) -> S3Result<S3Response<HeadObjectOutput>> {
                let (bucket, key) = (req.input.bucket.clone(), req.input.key.clone());
                let mut resp = self.fs.head_object(req).await?;
                if self.oss() {
                    oss::upper(&mut resp.output.e_tag);
                    self.add_crc(&mut resp, &bucket, &key).await?;
                }
                Ok(resp)
            }

            async fn get_object(
                &self,
                req: S3Request<GetObjectInput>,
            ) -> S3Result<S3Response<GetObjectOutput>> {
                let mut resp = self.fs.get_object(req).await?;
                if self.oss() {
                    oss::upper(&mut resp.output.e_tag);
                }
                Ok(resp)
            }

            async fn list_objects(
                &self,
                req: S3Request<ListObjectsInput>,
            ) -> S3Result<S3Response<ListObjectsOutput>> {
                let mut resp = self.fs.list_objects(req).await?;
                if self.oss() {
                    for o in resp.output.contents.iter_mut().flatten() {
                        oss::upper(&mut o.e_tag);
                    }
                }
                Ok(resp)
            }

            async fn list_objects_v2(
                &self,
                req: S3Request<ListObjectsV2Input>,
            ) -> S3Result<S3Response<ListObjectsV2Output>> {
                let mut resp = self.fs.list_objects_v2(req).await?;
                if self.oss() {
                    for o in resp.output.contents.iter_mut().flatten() {
                        oss::upper(&mut o.e_tag);
                    }
                }
                Ok(resp)
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
    head_bucket: HeadBucketInput => HeadBucketOutput,
    list_buckets: ListBucketsInput => ListBucketsOutput,
    upload_part_copy: UploadPartCopyInput => UploadPartCopyOutput,
}
