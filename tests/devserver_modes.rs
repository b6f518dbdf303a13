//! The test server's own modes (src/devserver): OSS behaviour, the SDK drift guard, the
//! request log, a custom domain bound to a bucket, HTTPS with the server's CA.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_credential_types::Credentials;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    BehaviorVersion, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, ServerSideEncryption, StorageClass,
};
use aws_smithy_http_client::tls::{self, TlsContext, TrustStore, rustls_provider::CryptoMode};
use http_body_util::{BodyExt as _, Full};
use md5::{Digest as _, Md5};
use record_offload::devserver::{
    ACCESS_KEY, CRC64_HEADER, DevOptions, DevServer, SECRET_KEY, other_ca_pem,
};

const BUCKET: &str = "media";

struct Server {
    _dir: tempfile::TempDir,
    server: DevServer,
}

async fn server(opts: DevOptions) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let server = DevServer::start_with(
        &dir.path().join("store"),
        "127.0.0.1:0".parse().unwrap(),
        opts,
    )
    .await
    .unwrap();
    server.create_bucket(BUCKET).unwrap();
    Server { _dir: dir, server }
}

fn oss() -> DevOptions {
    DevOptions {
        oss: true,
        ..Default::default()
    }
}

fn config(endpoint: &str) -> aws_sdk_s3::config::Builder {
    aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("cn-hangzhou"))
        .credentials_provider(Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "test"))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
}

fn client(endpoint: &str) -> Client {
    Client::from_conf(config(endpoint).build())
}

/// A client trusting only `ca_pem`.
fn tls_client(endpoint: &str, ca_pem: &str) -> Client {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::AwsLc))
        .tls_context(
            TlsContext::builder()
                .with_trust_store(TrustStore::empty().with_pem_certificate(ca_pem.as_bytes()))
                .build()
                .unwrap(),
        )
        .build_https();
    Client::from_conf(config(endpoint).http_client(http).build())
}

fn md5_upper(data: &[u8]) -> String {
    hex::encode_upper(Md5::digest(data))
}

fn crc64(data: &[u8]) -> u64 {
    let mut d = crc64fast::Digest::new();
    d.write(data);
    d.sum64()
}

fn presign() -> PresigningConfig {
    PresigningConfig::expires_in(Duration::from_secs(300)).unwrap()
}

/// Sends a request with plain hyper; answers (status, headers, body).
async fn raw(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, http::HeaderMap, Vec<u8>) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<bytes::Bytes>>();
    let mut req = http::Request::builder().method(method).uri(url);
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let resp = client
        .request(req.body(Full::new(bytes::Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    (status, headers, body)
}

fn crc_header(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(CRC64_HEADER)
        .map(|v| v.to_str().unwrap().parse().unwrap())
}

fn code(err: impl ProvideErrorMetadata + std::fmt::Debug) -> String {
    err.code()
        .map(str::to_string)
        .unwrap_or_else(|| format!("{err:?}"))
}

/// Keeps the `x-oss-hash-crc64ecma` of the answer an SDK call gets.
#[derive(Debug, Clone, Default)]
struct CaptureCrc(Arc<Mutex<Option<u64>>>);

impl aws_sdk_s3::config::Intercept for CaptureCrc {
    fn name(&self) -> &'static str {
        "CaptureCrc"
    }

    fn read_before_deserialization(
        &self,
        context: &aws_sdk_s3::config::interceptors::BeforeDeserializationInterceptorContextRef<'_>,
        _rc: &aws_sdk_s3::config::RuntimeComponents,
        _cfg: &mut aws_sdk_s3::config::ConfigBag,
    ) -> Result<(), aws_sdk_s3::error::BoxError> {
        let crc = context
            .response()
            .headers()
            .get(CRC64_HEADER)
            .and_then(|v| v.parse().ok());
        *self.0.lock().unwrap() = crc;
        Ok(())
    }
}

#[test]
fn reference_crc64_is_crc64_xz() {
    assert_eq!(crc64(b"123456789"), 0x995d_c9bb_df19_39fa);
}

#[tokio::test]
async fn oss_mode_answers_upper_case_etags_and_crc64() {
    let s = server(oss()).await;
    let c = client(&s.server.endpoint());
    let data = b"123456789".to_vec();

    let put = c
        .put_object()
        .bucket(BUCKET)
        .key("a/check.bin")
        .body(ByteStream::from(data.clone()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        put.e_tag(),
        Some(format!("\"{}\"", md5_upper(&data)).as_str())
    );

    let head = c
        .head_object()
        .bucket(BUCKET)
        .key("a/check.bin")
        .send()
        .await
        .unwrap();
    assert_eq!(head.e_tag(), put.e_tag());
    let get = c
        .get_object()
        .bucket(BUCKET)
        .key("a/check.bin")
        .send()
        .await
        .unwrap();
    assert_eq!(get.e_tag(), put.e_tag());

    // The CRC header, read from the raw answers of presigned requests.
    let url = c
        .head_object()
        .bucket(BUCKET)
        .key("a/check.bin")
        .presigned(presign())
        .await
        .unwrap();
    let (status, headers, _) = raw("HEAD", url.uri(), &[], Vec::new()).await;
    assert_eq!(status, 200);
    assert_eq!(crc_header(&headers), Some(0x995d_c9bb_df19_39fa));
    assert_eq!(
        headers.get("etag").unwrap().to_str().unwrap(),
        put.e_tag().unwrap()
    );

    let other = b"another object".to_vec();
    let url = c
        .put_object()
        .bucket(BUCKET)
        .key("b.bin")
        .presigned(presign())
        .await
        .unwrap();
    let (status, headers, _) = raw("PUT", url.uri(), &[], other.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(crc_header(&headers), Some(crc64(&other)));

    // Not in the default mode.
    let plain = server(DevOptions::default()).await;
    let pc = client(&plain.server.endpoint());
    let put = pc
        .put_object()
        .bucket(BUCKET)
        .key("k")
        .body(ByteStream::from(data.clone()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        put.e_tag(),
        Some(format!("\"{}\"", hex::encode(Md5::digest(&data))).as_str())
    );
    let url = pc
        .head_object()
        .bucket(BUCKET)
        .key("k")
        .presigned(presign())
        .await
        .unwrap();
    let (_, headers, _) = raw("HEAD", url.uri(), &[], Vec::new()).await;
    assert_eq!(crc_header(&headers), None);
}

#[tokio::test]
async fn oss_mode_completion_wants_the_etags_byte_for_byte() {
    let s = server(oss()).await;
    let c = client(&s.server.endpoint());
    let key = "rec/big.mp4";
    let part1: Vec<u8> = (0..5 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let part2 = b"the short last part".to_vec();

    let up = c
        .create_multipart_upload()
        .bucket(BUCKET)
        .key(key)
        .send()
        .await
        .unwrap();
    let id = up.upload_id().unwrap().to_string();
    let mut etags = Vec::new();
    for (n, body) in [(1, &part1), (2, &part2)] {
        let r = c
            .upload_part()
            .bucket(BUCKET)
            .key(key)
            .upload_id(&id)
            .part_number(n)
            .body(ByteStream::from(body.clone()))
            .send()
            .await
            .unwrap();
        let etag = r.e_tag().unwrap().to_string();
        assert_eq!(etag, format!("\"{}\"", md5_upper(body)));
        etags.push(etag);
    }

    // ListParts (s3s-fs has no ETags there) answers them as OSS does, sorted.
    let parts = c
        .list_parts()
        .bucket(BUCKET)
        .key(key)
        .upload_id(&id)
        .send()
        .await
        .unwrap();
    let listed: Vec<(i32, String)> = parts
        .parts()
        .iter()
        .map(|p| (p.part_number().unwrap(), p.e_tag().unwrap().to_string()))
        .collect();
    assert_eq!(listed, vec![(1, etags[0].clone()), (2, etags[1].clone())]);

    let completed = |etags: &[String]| {
        CompletedMultipartUpload::builder()
            .set_parts(Some(
                etags
                    .iter()
                    .enumerate()
                    .map(|(i, e)| {
                        CompletedPart::builder()
                            .part_number(i as i32 + 1)
                            .e_tag(e)
                            .build()
                    })
                    .collect(),
            ))
            .build()
    };

    // Lower-cased, or without the quotes: refused.
    for changed in [
        etags
            .iter()
            .map(|e| e.to_ascii_lowercase())
            .collect::<Vec<_>>(),
        etags
            .iter()
            .map(|e| e.trim_matches('"').to_string())
            .collect(),
    ] {
        let err = c
            .complete_multipart_upload()
            .bucket(BUCKET)
            .key(key)
            .upload_id(&id)
            .multipart_upload(completed(&changed))
            .send()
            .await
            .unwrap_err();
        assert_eq!(code(err), "InvalidPart");
    }

    // As answered: accepted.
    let done = c
        .complete_multipart_upload()
        .bucket(BUCKET)
        .key(key)
        .upload_id(&id)
        .multipart_upload(completed(&etags))
        .send()
        .await
        .unwrap();
    let etag = done.e_tag().unwrap();
    assert!(etag.ends_with("-2\""), "{etag}");
    assert_eq!(etag, etag.to_ascii_uppercase());

    let mut whole = part1.clone();
    whole.extend_from_slice(&part2);
    assert_eq!(
        std::fs::read(s.server.object_path(BUCKET, key)).unwrap(),
        whole
    );
    let url = c
        .head_object()
        .bucket(BUCKET)
        .key(key)
        .presigned(presign())
        .await
        .unwrap();
    let (status, headers, _) = raw("HEAD", url.uri(), &[], Vec::new()).await;
    assert_eq!(status, 200);
    assert_eq!(crc_header(&headers), Some(crc64(&whole)));
    assert!(s.server.open_uploads().is_empty());

    // The completion's own answer carries the CRC too.
    let up = c
        .create_multipart_upload()
        .bucket(BUCKET)
        .key("second")
        .send()
        .await
        .unwrap();
    let id = up.upload_id().unwrap();
    let r = c
        .upload_part()
        .bucket(BUCKET)
        .key("second")
        .upload_id(id)
        .part_number(1)
        .body(ByteStream::from(part2.clone()))
        .send()
        .await
        .unwrap();
    let capture = CaptureCrc::default();
    c.complete_multipart_upload()
        .bucket(BUCKET)
        .key("second")
        .upload_id(id)
        .multipart_upload(completed(&[r.e_tag().unwrap().to_string()]))
        .customize()
        .interceptor(capture.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(*capture.0.lock().unwrap(), Some(crc64(&part2)));
}

#[tokio::test]
async fn oss_mode_has_no_list_multipart_uploads() {
    let s = server(oss()).await;
    let c = client(&s.server.endpoint());
    c.create_multipart_upload()
        .bucket(BUCKET)
        .key("open")
        .send()
        .await
        .unwrap();
    let err = c
        .list_multipart_uploads()
        .bucket(BUCKET)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(err), "NotImplemented");
    let listed = s.server.requests();
    let last = listed.last().unwrap();
    assert!(last.has_param("uploads"));
    assert_eq!(last.status, 501);

    // The default mode lists it.
    let plain = server(DevOptions::default()).await;
    let pc = client(&plain.server.endpoint());
    pc.create_multipart_upload()
        .bucket(BUCKET)
        .key("open")
        .send()
        .await
        .unwrap();
    let l = pc
        .list_multipart_uploads()
        .bucket(BUCKET)
        .send()
        .await
        .unwrap();
    assert_eq!(l.uploads().len(), 1);
}

#[tokio::test]
async fn drift_guard_counts_checksum_requests_and_oss_refuses_them() {
    for mode in [DevOptions::default(), oss()] {
        let s = server(mode.clone()).await;
        let c = client(&s.server.endpoint());
        c.put_object()
            .bucket(BUCKET)
            .key("plain")
            .body(ByteStream::from_static(b"x"))
            .send()
            .await
            .unwrap();
        assert_eq!(s.server.drift_requests(), 0);

        let r = c
            .put_object()
            .bucket(BUCKET)
            .key("with-crc32")
            .checksum_algorithm(ChecksumAlgorithm::Crc32)
            .body(ByteStream::from_static(b"y"))
            .send()
            .await;
        assert_eq!(s.server.drift_requests(), 1);
        let sent = s.server.requests();
        let last = sent.last().unwrap();
        assert!(
            last.headers
                .iter()
                .any(|(n, _)| n.starts_with("x-amz-checksum-")
                    || n == "x-amz-sdk-checksum-algorithm"),
            "{:?}",
            last.headers
        );
        if mode.oss {
            assert_eq!(code(r.unwrap_err()), "InvalidArgument");
            assert_eq!(last.status, 400);
        } else {
            r.unwrap();
        }

        // A hand-made header on a presigned PUT is counted too.
        let url = c
            .put_object()
            .bucket(BUCKET)
            .key("raw")
            .presigned(presign())
            .await
            .unwrap();
        let (status, _, _) = raw(
            "PUT",
            url.uri(),
            &[("x-amz-checksum-crc32", "YtJ3rw==")], // CRC-32 of "z",
            b"z".to_vec(),
        )
        .await;
        assert_eq!(s.server.drift_requests(), 2);
        assert_eq!(status, if mode.oss { 400 } else { 200 });
    }
}

#[tokio::test]
async fn request_log_keeps_what_the_store_received() {
    let s = server(oss()).await;
    let c = client(&s.server.endpoint());
    c.put_object()
        .bucket(BUCKET)
        .key("rec/a.mp4")
        .content_type("video/mp4")
        .storage_class(StorageClass::from("IA"))
        .server_side_encryption(ServerSideEncryption::AwsKms)
        .ssekms_key_id("key-1234")
        .metadata("recorder", "host-7")
        .body(ByteStream::from_static(b"mp4"))
        .send()
        .await
        .unwrap();
    c.create_multipart_upload()
        .bucket(BUCKET)
        .key("rec/b.mp4")
        .content_type("video/mp4")
        .storage_class(StorageClass::StandardIa)
        .server_side_encryption(ServerSideEncryption::Aes256)
        .metadata("recorder", "host-7")
        .send()
        .await
        .unwrap();

    let log = s.server.requests();
    let put = log
        .iter()
        .find(|r| r.method == "PUT" && r.path == "/media/rec/a.mp4")
        .unwrap();
    assert_eq!(put.status, 200);
    assert_eq!(put.header("content-type"), Some("video/mp4"));
    assert_eq!(put.header("x-amz-storage-class"), Some("IA"));
    assert_eq!(put.header("x-amz-server-side-encryption"), Some("aws:kms"));
    assert_eq!(
        put.header("x-amz-server-side-encryption-aws-kms-key-id"),
        Some("key-1234")
    );
    assert_eq!(put.header("x-amz-meta-recorder"), Some("host-7"));

    let create = log
        .iter()
        .find(|r| r.method == "POST" && r.has_param("uploads"))
        .unwrap();
    assert_eq!(create.path, "/media/rec/b.mp4");
    assert_eq!(create.status, 200);
    assert_eq!(create.header("x-amz-storage-class"), Some("STANDARD_IA"));
    assert_eq!(
        create.header("x-amz-server-side-encryption"),
        Some("AES256")
    );
    assert_eq!(create.header("content-type"), Some("video/mp4"));
    assert_eq!(create.header("x-amz-meta-recorder"), Some("host-7"));

    s.server.clear_requests();
    assert!(s.server.requests().is_empty());
}

#[tokio::test]
async fn tls_mode_is_trusted_with_its_ca_only() {
    let s = server(DevOptions {
        tls: true,
        ..Default::default()
    })
    .await;
    let endpoint = s.server.endpoint();
    assert!(endpoint.starts_with("https://127.0.0.1:"), "{endpoint}");
    let pem = s.server.ca_pem().unwrap();
    assert_eq!(
        std::fs::read_to_string(s.server.ca_path().unwrap()).unwrap(),
        pem
    );

    let c = tls_client(&endpoint, &pem);
    c.put_object()
        .bucket(BUCKET)
        .key("over-tls")
        .body(ByteStream::from_static(b"secret"))
        .send()
        .await
        .unwrap();
    let got = c
        .get_object()
        .bucket(BUCKET)
        .key("over-tls")
        .send()
        .await
        .unwrap();
    assert_eq!(
        got.body.collect().await.unwrap().into_bytes().as_ref(),
        b"secret"
    );

    // localhost is in the certificate too.
    let local = endpoint.replace("127.0.0.1", "localhost");
    tls_client(&local, &pem)
        .head_object()
        .bucket(BUCKET)
        .key("over-tls")
        .send()
        .await
        .unwrap();

    // An unrelated CA: refused before any request reaches the server.
    let before = s.server.requests().len();
    let wrong = tls_client(&endpoint, &other_ca_pem().unwrap());
    let err = wrong
        .head_object()
        .bucket(BUCKET)
        .key("over-tls")
        .send()
        .await
        .unwrap_err();
    assert!(
        matches!(err, aws_sdk_s3::error::SdkError::DispatchFailure(_)),
        "{err:?}"
    );
    assert_eq!(s.server.requests().len(), before);

    // Plain HTTP to the TLS port gets no answer.
    let plain = client(&endpoint.replace("https://", "http://"));
    assert!(
        plain
            .head_object()
            .bucket(BUCKET)
            .key("over-tls")
            .send()
            .await
            .is_err()
    );
}

/// A client for the custom domain: the SDK addresses `/bucket/key` in path style; the
/// bucket is taken off the path before signing, so the signature covers the path as sent.
fn domain_client(endpoint: &str) -> Client {
    let conf = config(endpoint)
        .interceptor(StripBucket(format!("/{BUCKET}")))
        .build();
    Client::from_conf(conf)
}

#[derive(Debug)]
struct StripBucket(String);

impl aws_sdk_s3::config::Intercept for StripBucket {
    fn name(&self) -> &'static str {
        "StripBucket"
    }

    fn modify_before_signing(
        &self,
        context: &mut aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextMut<'_>,
        _rc: &aws_sdk_s3::config::RuntimeComponents,
        _cfg: &mut aws_sdk_s3::config::ConfigBag,
    ) -> Result<(), aws_sdk_s3::error::BoxError> {
        let req = context.request_mut();
        let uri: http::Uri = req.uri().parse()?;
        let path_and_query = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let rest = path_and_query
            .strip_prefix(self.0.as_str())
            .unwrap_or(path_and_query);
        let rest = if rest.starts_with('/') {
            rest.to_string()
        } else {
            format!("/{rest}")
        };
        let new = format!(
            "{}://{}{}",
            uri.scheme_str().unwrap_or("http"),
            uri.authority().map(|a| a.as_str()).unwrap_or_default(),
            rest
        );
        req.set_uri(new)?;
        Ok(())
    }
}

#[tokio::test]
async fn bucket_host_addresses_the_bucket_with_the_key_as_path() {
    let s = server(DevOptions {
        bucket_host: Some(("localhost".into(), BUCKET.into())),
        ..Default::default()
    })
    .await;
    let domain = s.server.bucket_endpoint().unwrap();
    assert_eq!(domain, format!("http://localhost:{}", s.server.addr.port()));

    let c = domain_client(&domain);
    c.put_object()
        .bucket(BUCKET)
        .key("rec/cname.mp4")
        .body(ByteStream::from_static(b"via the custom domain"))
        .send()
        .await
        .unwrap();
    let sent = s.server.requests();
    let put = sent.last().unwrap();
    assert_eq!(put.path, "/rec/cname.mp4");
    assert!(put.header("host").unwrap().starts_with("localhost:"));
    assert_eq!(
        std::fs::read(s.server.object_path(BUCKET, "rec/cname.mp4")).unwrap(),
        b"via the custom domain"
    );

    let got = c
        .get_object()
        .bucket(BUCKET)
        .key("rec/cname.mp4")
        .send()
        .await
        .unwrap();
    assert_eq!(
        got.body.collect().await.unwrap().into_bytes().as_ref(),
        b"via the custom domain"
    );
    let url = c
        .get_object()
        .bucket(BUCKET)
        .key("rec/cname.mp4")
        .presigned(presign())
        .await
        .unwrap();
    assert!(
        url.uri().starts_with(&format!("{domain}/rec/cname.mp4?")),
        "{}",
        url.uri()
    );
    let (status, _, body) = raw("GET", url.uri(), &[], Vec::new()).await;
    assert_eq!(status, 200);
    assert_eq!(body, b"via the custom domain");

    // A signature made for another path is refused there.
    let (status, _, _) = raw(
        "GET",
        &url.uri().replace("/rec/cname.mp4", "/rec/other.mp4"),
        &[],
        Vec::new(),
    )
    .await;
    assert_eq!(status, 403);

    // Path style on the IP address still works, same object.
    let pc = client(&s.server.endpoint());
    let head = pc
        .head_object()
        .bucket(BUCKET)
        .key("rec/cname.mp4")
        .send()
        .await
        .unwrap();
    assert_eq!(head.content_length(), Some(21));

    // An IP address cannot be a bucket host.
    let dir = tempfile::tempdir().unwrap();
    assert!(
        DevServer::start_with(
            dir.path(),
            "127.0.0.1:0".parse().unwrap(),
            DevOptions {
                bucket_host: Some(("127.0.0.1:9000".into(), BUCKET.into())),
                ..Default::default()
            },
        )
        .await
        .is_err()
    );
}
