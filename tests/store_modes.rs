//! The daemon against the test server as the real stores behave: OSS's ways (upper-case
//! ETags it wants back byte for byte, `x-oss-hash-crc64ecma`, no ListMultipartUploads), a
//! custom domain bound to the bucket, HTTPS with a private CA; the object options operators
//! set; answers no known store gives, which must never leave a file stuck. Every test also
//! checks that no request carried the checksum headers or `aws-chunked` bodies OSS refuses.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::harness::*;
use common::http::{http, tcp_addr};
use common::killloop::{self, MIB, kill_loop, wait_all_deleted};
use common::proxy::{Fault, FaultProxy};
use record_offload::devserver::{DevOptions, DevServer, Recorded};
use record_offload::journal::State;

const T: Duration = Duration::from_secs(40);

fn oss() -> DevOptions {
    DevOptions {
        oss: true,
        ..Default::default()
    }
}

/// CRC-64/XZ (ECMA-182, reflected, inverted), as OSS computes it, in one pass over the
/// whole file (the daemon folds it in with its part hashing); `devserver_modes` checks this
/// reference against the catalogue's check value.
fn crc64(data: &[u8]) -> u64 {
    let mut d = crc64fast::Digest::new();
    d.write(data);
    d.sum64()
}

/// The requests of one kind, by the S3 operation they are.
fn op(r: &Recorded) -> &'static str {
    match r.method.as_str() {
        "PUT" if r.has_param("partNumber") => "UploadPart",
        "PUT" => "PutObject",
        "POST" if r.has_param("uploads") => "CreateMultipartUpload",
        "POST" if r.has_param("uploadId") => "CompleteMultipartUpload",
        "DELETE" if r.has_param("uploadId") => "AbortMultipartUpload",
        "HEAD" => "HeadObject",
        "GET" if r.has_param("uploadId") => "ListParts",
        "GET" if r.has_param("uploads") => "ListMultipartUploads",
        "GET" => "GetObject",
        _ => "other",
    }
}

fn no_drift(server: &DevServer) {
    assert_eq!(
        server.drift_requests(),
        0,
        "requests carried x-amz-checksum-*, x-amz-sdk-checksum-algorithm or aws-chunked: {:?}",
        server
            .requests()
            .iter()
            .filter(|r| r
                .headers
                .iter()
                .any(|(n, v)| n.starts_with("x-amz-checksum")
                    || n == "x-amz-sdk-checksum-algorithm"
                    || v.contains("aws-chunked")))
            .collect::<Vec<_>>()
    );
}

/// The object's answer to HEAD through the S3 API: (size, content type, ETag as sent).
async fn head(env: &Env, key: &str) -> (u64, Option<String>, Option<String>) {
    let store = record_offload::store::Store::new(&env.config(|_| {}));
    let out = store
        .client()
        .head_object()
        .bucket(BUCKET)
        .key(key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("HEAD {key}: {e:?}"));
    (
        out.content_length().unwrap_or(-1) as u64,
        out.content_type().map(str::to_string),
        out.e_tag().map(str::to_string),
    )
}

/// Single-part and multipart recordings in OSS mode, with every object option set: each
/// is stored byte for byte, its CRC-64 journaled equal to the file's, its Content-Type from
/// the extension table (or the config's override), and every PutObject and
/// CreateMultipartUpload carried the storage class, encryption, metadata, disposition and
/// cache control; the completion's ETags were the upper-case ones answered (the OSS mode
/// refuses anything else); no upload is left open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oss_mode_pipeline_with_object_options() {
    let env = Env::new_with(oss()).await;
    let d = env
        .start(env.config(|c| {
            c.upload.part_size_mib = 5;
            c.storage.storage_class = Some("IA".into());
            c.storage.sse = Some("AES256".into());
            c.storage
                .metadata
                .insert("origin".into(), "rec-test".into());
            c.storage.content_disposition = Some("inline".into());
            c.storage.cache_control = Some("max-age=60".into());
            c.storage
                .content_types
                .insert(".rec".into(), "video/x-recording".into());
        }))
        .await;
    let files: Vec<(&str, Vec<u8>, &str)> = vec![
        ("a/small.mp4", bytes(3000, 1), "video/mp4"),
        ("a/big.mp4", bytes(12 * MIB + 5, 2), "video/mp4"),
        ("b/talk.m4a", bytes(5000, 3), "audio/mp4"),
        (
            "b/stream.m3u8",
            bytes(200, 4),
            "application/vnd.apple.mpegurl",
        ),
        ("b/big.flv", bytes(6 * MIB, 5), "video/x-flv"),
        ("c/raw.rec", bytes(700, 6), "video/x-recording"),
        ("c/notes.bin", bytes(100, 7), "application/octet-stream"),
    ];
    for (rel, data, _) in &files {
        env.write(rel, data);
    }
    let rels: Vec<&str> = files.iter().map(|(r, _, _)| *r).collect();
    wait_all_deleted(&env, &rels, T, None).await;
    for (rel, data, ctype) in &files {
        let key = env.key(rel);
        let row = env.row(rel).unwrap();
        assert_eq!(row.crc64, Some(crc64(data)), "{rel}: journaled CRC-64");
        assert_eq!(
            env.get(&key).await.as_deref(),
            Some(data.as_slice()),
            "{rel}"
        );
        let (size, got_type, etag) = head(&env, &key).await;
        assert_eq!(size, data.len() as u64);
        assert_eq!(
            got_type.as_deref(),
            Some(*ctype),
            "{rel}: stored Content-Type"
        );
        let etag = etag.unwrap();
        assert_eq!(
            etag,
            etag.to_ascii_uppercase(),
            "OSS mode answers upper case"
        );
    }
    let reqs = env.server.requests();
    let creating: Vec<&Recorded> = reqs
        .iter()
        .filter(|r| matches!(op(r), "PutObject" | "CreateMultipartUpload"))
        .collect();
    assert_eq!(
        creating.len(),
        files.len(),
        "one PutObject or CreateMultipartUpload per file"
    );
    for r in &creating {
        let want = [
            ("x-amz-storage-class", "IA"),
            ("x-amz-server-side-encryption", "AES256"),
            ("x-amz-meta-origin", "rec-test"),
            ("content-disposition", "inline"),
            ("cache-control", "max-age=60"),
        ];
        for (h, v) in want {
            assert_eq!(r.header(h), Some(v), "{} {}: {h}", op(r), r.path);
        }
        assert!(r.header("content-type").is_some(), "{r:?}");
    }
    assert_eq!(
        reqs.iter()
            .filter(|r| op(r) == "CompleteMultipartUpload" && r.status == 200)
            .count(),
        2,
        "two multipart files completed at the first try"
    );
    assert_eq!(env.server.open_uploads(), vec![]);
    no_drift(&env.server);
    d.shutdown();
    d.wait().await;
}

/// SSE with KMS and a key id reaches the server on both kinds of upload; with KMS the ETag
/// is not the MD5, so the daemon does not compare it with its own and the file still goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_kms_with_a_key_id() {
    let env = Env::new_with(oss()).await;
    let d = env
        .start(env.config(|c| {
            c.upload.part_size_mib = 5;
            c.storage.sse = Some("KMS".into());
            c.storage.sse_kms_key_id = Some("key-1234".into());
        }))
        .await;
    env.write("k/one.mp4", &bytes(2000, 1));
    env.write("k/two.mp4", &bytes(11 * MIB, 2));
    wait_all_deleted(&env, &["k/one.mp4", "k/two.mp4"], T, None).await;
    let reqs = env.server.requests();
    let creating: Vec<&Recorded> = reqs
        .iter()
        .filter(|r| matches!(op(r), "PutObject" | "CreateMultipartUpload"))
        .collect();
    assert_eq!(creating.len(), 2);
    for r in creating {
        assert_eq!(
            r.header("x-amz-server-side-encryption"),
            Some("aws:kms"),
            "{r:?}"
        );
        assert_eq!(
            r.header("x-amz-server-side-encryption-aws-kms-key-id"),
            Some("key-1234"),
            "{r:?}"
        );
    }
    no_drift(&env.server);
    d.shutdown();
    d.wait().await;
}

/// The real binary killed with SIGKILL while parts are on the wire, in OSS mode: the journal
/// keeps the upper-case ETags as answered, the resumed uploads complete (the server refuses
/// ETags not byte-equal to its own), nothing is left open, nothing sent twice beyond the
/// parts in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oss_mode_resume_after_sigkill() {
    let env = Env::new_with(oss()).await;
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("cam1/a.mp4", bytes(24 * MIB, 21)),
        ("cam2/b.mp4", bytes(24 * MIB + 999, 22)),
    ];
    let report = kill_loop(&env, env.server.addr, "http", &files, |_| {}).await;
    eprintln!("OSS mode resume: {report}");
    for (rel, data) in &files {
        assert_eq!(
            env.get(&env.key(rel)).await.as_deref(),
            Some(data.as_slice())
        );
        assert_eq!(env.row(rel).unwrap().crc64, Some(crc64(data)));
    }
    let refused: Vec<Recorded> = env
        .server
        .requests()
        .into_iter()
        .filter(|r| op(r) == "CompleteMultipartUpload" && r.status != 200)
        .collect();
    assert_eq!(refused.len(), 0, "refused completions: {refused:?}");
    assert_eq!(env.server.open_uploads(), vec![]);
    assert!(report.resent() <= report.bound(), "{report}");
    no_drift(&env.server);
}

/// A completion the store refuses (`InvalidPart`: here the journal's copy of a part's ETag
/// no longer matches the server's byte for byte) aborts that upload and starts a new one:
/// the file is stored, and the first upload is not left open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_completion_aborts_and_starts_over() {
    let env = Env::new_with(oss()).await;
    let data = bytes(16 * MIB, 31);
    let p = env.write("r/long.mp4", &data);
    age(&p, 60);
    let cfg = env.config_file_at(&env.server.endpoint(), |c| {
        c.upload.part_size_mib = 5;
        c.upload.concurrency = 1;
    });
    let log = env.dir.path().join("daemon.log");
    // The first run dies right after its first part is committed.
    let mut child = Command::new(env!("CARGO_BIN_EXE_record-offload"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RECORD_OFFLOAD_FAILPOINTS", "after-part-committed:1")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    let row = env.row("r/long.mp4").unwrap();
    let first_upload = row.upload_id.clone().unwrap();
    // The journal's ETag as a store that compares case-insensitively would accept.
    let conn = rusqlite::Connection::open(&env.journal_path).unwrap();
    let changed = conn
        .execute(
            "UPDATE parts SET etag = lower(etag) WHERE etag <> lower(etag)",
            [],
        )
        .unwrap();
    assert_eq!(
        changed, 1,
        "the first part's ETag was journaled in upper case"
    );
    drop(conn);

    env.server.clear_requests();
    let mut child = killloop::spawn(&cfg, &log);
    env.wait_state("r/long.mp4", State::Deleted, T).await;
    killloop::stop_cleanly(&mut child, &log);

    assert_eq!(
        env.get(&env.key("r/long.mp4")).await.as_deref(),
        Some(data.as_slice())
    );
    let reqs = env.server.requests();
    let completions: Vec<(&str, u16)> = reqs
        .iter()
        .filter(|r| op(r) == "CompleteMultipartUpload")
        .map(|r| (r.query.as_str(), r.status))
        .collect();
    assert_eq!(completions.len(), 2, "{completions:?}");
    assert!(
        completions[0].0.contains(&first_upload) && completions[0].1 == 400,
        "{completions:?}"
    );
    assert_eq!(completions[1].1, 200, "{completions:?}");
    assert!(
        reqs.iter()
            .any(|r| op(r) == "AbortMultipartUpload" && r.query.contains(&first_upload)),
        "the refused upload was aborted"
    );
    assert_eq!(env.server.open_uploads(), vec![]);
    no_drift(&env.server);
}

/// A whole-object CRC-64 that differs from the file's is a damaged upload: the file is never
/// recorded as stored nor deleted, it is sent again, and once the store answers the right
/// CRC it is stored and deleted, single-part and multipart alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crc64_mismatch_is_damage_never_deleted() {
    let env = Env::new_with(oss()).await;
    env.server.damage_crc64(u64::MAX);
    let d = env
        .start(env.config(|c| {
            c.upload.part_size_mib = 5;
        }))
        .await;
    let files = [
        ("d/one.mp4", bytes(4000, 1)),
        ("d/two.mp4", bytes(7 * MIB, 2)),
    ];
    for (rel, data) in &files {
        env.write(rel, data);
    }
    wait_until("both files failed a CRC check twice", T, || {
        files.iter().all(|(rel, _)| {
            env.row(rel).is_some_and(|r| {
                r.attempts >= 2
                    && r.last_error
                        .as_deref()
                        .is_some_and(|e| e.contains("CRC-64"))
            })
        })
    })
    .await;
    for (rel, _) in &files {
        let row = env.row(rel).unwrap();
        assert!(
            matches!(row.state, State::Queued | State::Uploading),
            "{row:?}"
        );
        assert!(env.root.join(rel).exists(), "{rel} deleted");
    }
    env.server.damage_crc64(0);
    let rels: Vec<&str> = files.iter().map(|(r, _)| *r).collect();
    wait_all_deleted(&env, &rels, T, None).await;
    for (rel, data) in &files {
        assert_eq!(env.row(rel).unwrap().crc64, Some(crc64(data)));
        assert_eq!(
            env.get(&env.key(rel)).await.as_deref(),
            Some(data.as_slice())
        );
    }
    assert_eq!(env.server.open_uploads(), vec![]);
    d.shutdown();
    d.wait().await;
}

/// Error codes no store documents, odd statuses and XML the SDK cannot read are retried,
/// never a reason to put a file in `failed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_answers_are_retried_never_failed() {
    let env = Env::new().await;
    let proxy = FaultProxy::start(env.server.addr).await.unwrap();
    proxy.set(Fault::RandomStatus {
        percent: 40,
        answers: vec![
            (400, "ABrandNewRefusal".into()),
            (409, "OperationAborted".into()),
            (418, String::new()),
            (404, "NoSuchKey".into()),
        ],
        seed: 7,
    });
    let d = env
        .start(env.config_at(&format!("http://{}", proxy.addr()), |c| {
            c.upload.part_size_mib = 5;
            c.upload.failed_retry_secs = 3600.0;
        }))
        .await;
    let files = [
        ("u/one.mp4", bytes(1000, 1)),
        ("u/two.mp4", bytes(2000, 2)),
        ("u/three.mp4", bytes(11 * MIB, 3)),
    ];
    for (rel, data) in &files {
        env.write(rel, data);
    }
    let rels: Vec<&str> = files.iter().map(|(r, _)| *r).collect();
    wait_all_deleted(&env, &rels, T, None).await;
    assert!(proxy.stats().injected > 0);
    for (rel, data) in &files {
        assert_eq!(
            env.get(&env.key(rel)).await.as_deref(),
            Some(data.as_slice())
        );
    }
    assert_eq!(env.server.open_uploads(), vec![]);
    no_drift(&env.server);
    d.shutdown();
    d.wait().await;
}

/// A custom domain bound to the bucket (`storage.bucket_endpoint`): every request goes to
/// that host with the key alone as its path, and look-ups sign URLs on the same host that
/// the server accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_domain_bound_to_the_bucket() {
    let env = Env::new_with(DevOptions {
        oss: true,
        bucket_host: Some(("localhost".into(), BUCKET.into())),
        ..Default::default()
    })
    .await;
    let endpoint = env.server.bucket_endpoint().unwrap();
    let d = env
        .start(env.config_at(&endpoint, |c| {
            c.storage.bucket_endpoint = true;
            c.storage.path_style = false;
            c.upload.part_size_mib = 5;
        }))
        .await;
    let small = bytes(3000, 1);
    let big = bytes(9 * MIB, 2);
    env.write("cd/small.mp4", &small);
    env.write("cd/big.mp4", &big);
    wait_all_deleted(&env, &["cd/small.mp4", "cd/big.mp4"], T, None).await;
    let reqs = env.server.requests();
    assert!(!reqs.is_empty());
    let port = env.server.addr.port();
    for r in &reqs {
        assert_eq!(
            r.header("host"),
            Some(format!("localhost:{port}").as_str()),
            "{r:?}"
        );
        // Objects by key alone; the bucket itself (the start-up listing) is `/`.
        assert!(
            r.path.starts_with("/node1/cd/") || r.path == "/",
            "{} {}",
            r.method,
            r.path
        );
    }
    // The look-up's URL is on the custom domain and fetches the bytes.
    let addr = tcp_addr(&d);
    let r = http(
        "GET",
        &format!("http://{addr}/v1/resolve?path=%2Frecord%2Fcd%2Fbig.mp4"),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let url = r.json()["url"].as_str().unwrap().to_string();
    assert!(
        url.starts_with(&format!("{endpoint}/node1/cd/big.mp4?")),
        "{url}"
    );
    let fetched = http("GET", &url, &[]).await;
    assert_eq!(fetched.status, 200, "{url}");
    assert!(fetched.body == big);
    no_drift(&env.server);
    d.shutdown();
    d.wait().await;
}

/// HTTPS with a private CA given in `storage.ca_file`: single-part and multipart uploads go
/// up over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_private_ca() {
    let env = Env::new_with(DevOptions {
        oss: true,
        tls: true,
        ..Default::default()
    })
    .await;
    assert!(env.server.endpoint().starts_with("https://"));
    let d = env
        .start(env.config(|c| {
            c.upload.part_size_mib = 5;
        }))
        .await;
    let files = [
        ("t/one.mp4", bytes(5000, 1)),
        ("t/two.mp4", bytes(8 * MIB, 2)),
    ];
    for (rel, data) in &files {
        env.write(rel, data);
    }
    wait_all_deleted(&env, &["t/one.mp4", "t/two.mp4"], T, None).await;
    for (rel, data) in &files {
        assert_eq!(
            env.get(&env.key(rel)).await.as_deref(),
            Some(data.as_slice())
        );
    }
    no_drift(&env.server);
    d.shutdown();
    d.wait().await;
}

/// A server whose certificate the configured CA did not sign: the file waits (never failed,
/// never deleted) and `status` says why in words an operator can act on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_ca_is_a_clear_error_in_status() {
    let env = Env::new_with(DevOptions {
        tls: true,
        ..Default::default()
    })
    .await;
    let other = env.dir.path().join("other-ca.pem");
    std::fs::write(&other, record_offload::devserver::other_ca_pem().unwrap()).unwrap();
    let settings = env.config(|c| c.storage.ca_file = Some(other.clone()));
    let cfg = env.config_file_at(&env.server.endpoint(), |c| {
        c.storage.ca_file = Some(other.clone())
    });
    let d = env.start(settings).await;
    env.write("w/one.mp4", &bytes(1000, 1));
    wait_until("an attempt failed", T, || {
        env.row("w/one.mp4")
            .is_some_and(|r| r.attempts >= 1 && r.last_error.is_some())
    })
    .await;
    let row = env.row("w/one.mp4").unwrap();
    assert_ne!(row.state, State::Failed, "{row:?}");
    assert!(env.root.join("w/one.mp4").exists());
    let out = common::cli(&cfg).arg("status").output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("certificate") && text.contains("storage.ca_file"),
        "status does not say the certificate is not trusted: {text}"
    );
    d.shutdown();
    d.wait().await;
}

/// `check-config` shows the object options, warns about `oss-v1` and an `-internal`
/// endpoint without a public URL, and refuses a `public_base_url` with a path for the oss-*
/// styles and a KMS key id without KMS, each in one line naming the key.
#[test]
fn check_config_shows_options_and_warns() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("record");
    std::fs::create_dir_all(&root).unwrap();
    let base = format!(
        "[watch]\nroot = {root:?}\n[journal]\npath = {:?}\n",
        dir.path().join("j.db")
    );
    let run = |extra: &str| -> (i32, String) {
        let p = dir.path().join("c.toml");
        std::fs::write(&p, format!("{base}{extra}")).unwrap();
        let out = common::cli(&p)
            .arg("check-config")
            .env_remove("RECORD_OFFLOAD_STORAGE__ACCESS_KEY_SECRET")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let storage = "[storage]\nendpoint = \"https://s3.oss-cn-hangzhou.aliyuncs.com\"\nregion = \"cn-hangzhou\"\nbucket = \"rec\"\naccess_key_id = \"id\"\naccess_key_secret = \"s\"\n";
    let (code, out) = run(&format!(
        "{storage}storage_class = \"IA\"\nsse = \"KMS\"\nsse_kms_key_id = \"kid-9\"\nmetadata = {{ origin = \"rec-01\" }}\n[lookup]\npresign_style = \"oss-v1\"\n"
    ));
    assert_eq!(code, 0, "{out}");
    for want in [
        "storage_class = \"IA\"",
        "sse = \"KMS\"",
        "kid-9",
        "origin",
        "oss-v1",
    ] {
        assert!(out.contains(want), "{want} missing: {out}");
    }
    assert!(out.contains("withdrawn"), "no oss-v1 warning: {out}");

    let internal = storage.replace("s3.oss-cn-hangzhou", "s3.oss-cn-hangzhou-internal");
    let (code, out) = run(&internal);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("-internal") && out.contains("lookup.public_base_url"),
        "{out}"
    );

    let (code, out) = run(&format!(
        "{storage}[lookup]\npresign_style = \"oss-v4\"\npublic_base_url = \"https://cdn.example.com/media\"\n"
    ));
    assert_ne!(code, 0, "{out}");
    assert_eq!(out.trim().lines().count(), 1, "{out}");
    assert!(out.contains("lookup.public_base_url"), "{out}");

    let (code, out) = run(&format!("{storage}sse_kms_key_id = \"k\"\n"));
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("storage.sse_kms_key_id"), "{out}");
}
