//! Playback look-ups over real HTTP: the daemon runs in-process against the local S3 server
//! (which checks signatures, presigned URLs included); requests go through a real HTTP client
//! (hyper-util) or, for input no well-behaved client would send, raw bytes on a socket.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::harness::*;
use common::http::{Resp, T, http, tcp_addr};
use common::proxy::{Fault, FaultProxy};
use record_offload::config::NodeEntry;
use record_offload::daemon::Daemon;
use record_offload::journal::State;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

async fn get(url: &str) -> Resp {
    http("GET", url, &[]).await
}

/// Raw HTTP/1.1 on any stream: `target` is sent exactly as given.
async fn raw_on<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    method: &str,
    target: &[u8],
    extra: &str,
) -> Resp {
    let mut req = Vec::new();
    req.extend_from_slice(method.as_bytes());
    req.push(b' ');
    req.extend_from_slice(target);
    req.extend_from_slice(b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    req.extend_from_slice(extra.as_bytes());
    req.extend_from_slice(b"\r\n");
    s.write_all(&req).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut out))
        .await
        .expect("raw request timed out")
        .unwrap();
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {:?}", String::from_utf8_lossy(&out)));
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Resp {
        status,
        headers,
        body: out[split + 4..].to_vec(),
    }
}

async fn raw(addr: SocketAddr, method: &str, target: &[u8], extra: &str) -> Resp {
    raw_on(
        tokio::net::TcpStream::connect(addr).await.unwrap(),
        method,
        target,
        extra,
    )
    .await
}

/// A file name as a legacy URL path carries it.
fn path_enc(name: &str) -> String {
    const PATH: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~')
        .remove(b'/');
    percent_encoding::utf8_percent_encode(name, PATH).to_string()
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

async fn resolve(addr: SocketAddr, p: &str) -> Resp {
    get(&format!("http://{addr}/v1/resolve?path={}", enc(p))).await
}

/// Flips one hex digit of the signature in a presigned URL.
fn tamper_signature(url: &str) -> String {
    let at = url.find("X-Amz-Signature=").unwrap() + "X-Amz-Signature=".len();
    let mut bytes = url.as_bytes().to_vec();
    bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
    String::from_utf8(bytes).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_answers_as_the_spec_says() {
    let env = Env::new().await;
    // Files stay local until the test lets them settle.
    let d = env
        .start(env.config(|c| {
            c.watch.settle_secs = 3600.0;
            c.lookup.public_url = Some("http://10.1.2.3:8090/".into());
        }))
        .await;
    let addr = tcp_addr(&d);
    let data = bytes(3000, 7);
    env.write("a+b %.mp4", &data);

    // Pending: this agent's drop-in URL, on lookup.public_url, encoded as a legacy URL.
    let r = get(&format!(
        "http://{addr}/v1/resolve?path=%2Frecord%2Fa%2Bb%2520%2525.mp4"
    ))
    .await;
    assert_eq!(r.status, 200, "{:?}", r);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let j = r.json();
    assert_eq!(j["state"], "pending");
    assert_eq!(j["url"], "http://10.1.2.3:8090/record/a%2Bb%20%25.mp4");
    assert_eq!(j["size"], 3000);
    assert_eq!(j["stage"], "local");

    // The three input forms name the same file.
    for p in [
        "a+b%20%25.mp4",
        "http://10.1.2.3/record/a+b%20%25.mp4?t=1#x",
        "/record//./a+b%20%25.mp4",
    ] {
        let j = resolve(addr, p).await.json();
        assert_eq!(j["state"], "pending", "{p}");
    }

    // Not found, bad path.
    let r = resolve(addr, "/record/nothing.mp4").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"], "not_found");
    let r = resolve(addr, "/record/../etc/passwd").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "bad_path");
    let r = get(&format!("http://{addr}/v1/resolve")).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "bad_path");
    let r = get(&format!("http://{addr}/v1/resolve?path=%zz")).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "bad_path");
    d.shutdown();
    d.wait().await;

    // Uploaded and deleted: a signed URL, with key, size, MD5 and an RFC 3339 expiry.
    let d = env.start(env.config(|c| c.watch.settle_secs = 0.2)).await;
    let addr = tcp_addr(&d);
    env.wait_state("a+b %.mp4", State::Deleted, T).await;
    let r = get(&format!(
        "http://{addr}/v1/resolve?path=%2Frecord%2Fa%2Bb%2520%2525.mp4"
    ))
    .await;
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["state"], "uploaded");
    assert_eq!(j["key"], env.key("a+b %.mp4"));
    assert_eq!(j["size"], 3000);
    assert_eq!(j["md5"], md5_hex(&data));
    let expires = j["expires_at"].as_str().unwrap();
    let expires = humantime::parse_rfc3339(expires).unwrap();
    let left = expires
        .duration_since(std::time::SystemTime::now())
        .unwrap()
        .as_secs();
    // 3600 s requested, rounded to a 1800 s window: between half and all of it is left.
    assert!((1790..=3600).contains(&left), "{left}");
    let url = j["url"].as_str().unwrap();
    assert_eq!(get(url).await.body, data);
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_urls_fetch_the_exact_bytes_and_tampering_is_refused() {
    let env = Env::new().await;
    let d = env.start(env.config(|_| {})).await;
    let addr = tcp_addr(&d);
    let names = [
        "plain.mp4",
        "中文/录像 2026.mp4",
        "hash#tag?.mp4",
        "pct%20+plus.mp4",
    ];
    let mut datas = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let data = bytes(10_000 + i * 777, i as u64 + 100);
        env.write(n, &data);
        datas.push(data);
    }
    for (n, data) in names.iter().zip(&datas) {
        env.wait_state(n, State::Deleted, T).await;
        let j = resolve(addr, &path_enc(n)).await.json();
        assert_eq!(j["state"], "uploaded", "{n}");
        let url = j["url"].as_str().unwrap();
        let r = get(url).await;
        assert_eq!(r.status, 200, "{n}: {url}");
        assert!(r.body == *data, "{n}: bytes differ");
        assert_eq!(get(&tamper_signature(url)).await.status, 403, "{n}");
        // The same signature for another key, or with a longer validity, is refused too.
        let other = url.replacen("/plain.mp4?", "/other.mp4?", 1);
        if other != url {
            assert_eq!(get(&other).await.status, 403);
        }
        let longer = url.replacen("X-Amz-Expires=3600", "X-Amz-Expires=7200", 1);
        assert_eq!(get(&longer).await.status, 403, "{n}");
    }
    // The same file keeps the same URL within the rounding window.
    let a = resolve(addr, names[0]).await.json();
    let b = resolve(addr, names[0]).await.json();
    assert_eq!(a["url"], b["url"]);
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_in_route_redirects_stored_files_and_the_redirect_honours_range() {
    let env = Env::new().await;
    let d = env.start(env.config(|_| {})).await;
    let addr = tcp_addr(&d);
    let data = bytes(200_000, 3);
    env.write("dir/clip 1.mp4", &data);
    env.wait_state("dir/clip 1.mp4", State::Deleted, T).await;

    let r = get(&format!("http://{addr}/record/dir/clip%201.mp4")).await;
    assert_eq!(r.status, 302);
    let location = r.header("location").unwrap().to_string();
    assert!(location.contains("X-Amz-Signature="), "{location}");
    let followed = get(&location).await;
    assert_eq!(followed.status, 200);
    assert!(followed.body == data);
    let ranged = http("GET", &location, &[("range", "bytes=1000-1999")]).await;
    assert_eq!(ranged.status, 206);
    assert_eq!(ranged.body, &data[1000..2000]);

    // The object keeps the recording's media type: the same as the local file was served with.
    assert_eq!(followed.header("content-type"), Some("video/mp4"));

    // HEAD is answered from the journal (a URL presigned for GET refuses HEAD): what a GET
    // through the redirect shows. Other methods are refused; paths elsewhere are 404.
    let r = http(
        "HEAD",
        &format!("http://{addr}/record/dir/clip%201.mp4"),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("location"), None);
    assert_eq!(r.header("content-length"), Some("200000"));
    assert_eq!(r.header("content-type"), Some("video/mp4"));
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    let etag = format!("\"{}\"", md5_hex(&data));
    assert_eq!(r.header("etag"), Some(etag.as_str()));
    assert!(r.header("last-modified").is_some(), "{r:?}");
    assert!(r.body.is_empty());
    // The redirect's URL itself refuses HEAD (signed for GET): why HEAD is not redirected.
    assert_eq!(http("HEAD", &location, &[]).await.status, 403);
    let r = raw(
        addr,
        "POST",
        b"/record/dir/clip%201.mp4",
        "Content-Length: 0\r\n",
    )
    .await;
    assert_eq!(r.status, 405);
    let r = get(&format!("http://{addr}/record/dir/missing.mp4")).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"], "not_found");
    let r = get(&format!("http://{addr}/favicon.ico")).await;
    assert_eq!(r.status, 404);
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_files_are_served_like_nginx_did() {
    let env = Env::new().await;
    let d = env
        .start(env.config(|c| c.watch.settle_secs = 3600.0))
        .await;
    let addr = tcp_addr(&d);
    let data = bytes(100_000, 9);
    env.write("live/rec.mp4", &data);
    let url = format!("http://{addr}/record/live/rec.mp4");

    let r = get(&url).await;
    assert_eq!(r.status, 200);
    assert!(r.body == data);
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    assert_eq!(r.header("content-type"), Some("video/mp4"));
    assert_eq!(r.header("content-length"), Some("100000"));
    let etag = r.header("etag").unwrap().to_string();
    let last_modified = r.header("last-modified").unwrap().to_string();
    assert!(httpdate::parse_http_date(&last_modified).is_ok());

    let r = http("GET", &url, &[("range", "bytes=10-19")]).await;
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &data[10..20]);
    assert_eq!(r.header("content-range"), Some("bytes 10-19/100000"));
    let r = http("GET", &url, &[("range", "bytes=-100")]).await;
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &data[99_900..]);
    let r = http("GET", &url, &[("range", "bytes=99990-")]).await;
    assert_eq!(r.body, &data[99_990..]);

    // Several ranges: multipart/byteranges with each part's bytes.
    let r = http("GET", &url, &[("range", "bytes=0-4,50000-50009")]).await;
    assert_eq!(r.status, 206);
    let ctype = r.header("content-type").unwrap();
    let boundary = ctype
        .strip_prefix("multipart/byteranges; boundary=")
        .unwrap();
    let body = r.body.clone();
    assert_eq!(r.header("content-length").unwrap(), body.len().to_string());
    let text = String::from_utf8_lossy(&body);
    assert_eq!(text.matches(&format!("--{boundary}")).count(), 3);
    assert!(text.contains("Content-Range: bytes 0-4/100000"));
    assert!(text.contains("Content-Range: bytes 50000-50009/100000"));
    let part = |start: usize, len: usize| body.windows(len).any(|w| w == &data[start..start + len]);
    assert!(part(0, 5) && part(50_000, 10));

    // Unsatisfiable: a clear 416.
    let r = http("GET", &url, &[("range", "bytes=100000-")]).await;
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some("bytes */100000"));
    assert_eq!(r.json()["error"], "range_not_satisfiable");
    // A malformed Range is ignored.
    let r = http("GET", &url, &[("range", "pages=1-2")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 100_000);

    // Conditional requests.
    let r = http("GET", &url, &[("if-none-match", &etag)]).await;
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    let r = http("GET", &url, &[("if-modified-since", &last_modified)]).await;
    assert_eq!(r.status, 304);
    let r = http(
        "GET",
        &url,
        &[("range", "bytes=0-0"), ("if-range", "\"stale\"")],
    )
    .await;
    assert_eq!(r.status, 200, "a stale If-Range gets the whole file");
    let r = http("GET", &url, &[("range", "bytes=0-0"), ("if-range", &etag)]).await;
    assert_eq!(r.status, 206);

    // HEAD: the headers, no body.
    let r = http("HEAD", &url, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("100000"));
    assert!(r.body.is_empty());
    d.shutdown();
    d.wait().await;
}

/// Look-ups of one file, through both routes, all the time it goes from local to uploading
/// to stored to deleted: every answer must be usable and give the file's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_never_fail_across_a_files_life() {
    let env = Env::new().await;
    let proxy = FaultProxy::start(env.server.addr).await.unwrap();
    // Slow uploads so that `uploading` lasts long enough to be seen.
    proxy.set(Fault::Throttle {
        bytes_per_sec: 8 * 1024 * 1024,
    });
    let d = env
        .start(env.config_at(&format!("http://{}", proxy.addr()), |c| {
            c.upload.part_size_mib = 5;
            c.upload.concurrency = 1;
            c.watch.settle_secs = 0.5;
        }))
        .await;
    let addr = tcp_addr(&d);
    let data = bytes(12 * 1024 * 1024, 11);
    env.write("life.mp4", &data);

    let mut seen = BTreeMap::<String, usize>::new();
    let mut checks = 0;
    let mut deleted_checks = 0;
    while deleted_checks < 5 {
        if env.state("life.mp4") == Some(State::Deleted) {
            deleted_checks += 1;
        }
        // JSON.
        let r = resolve(addr, "/record/life.mp4").await;
        assert_eq!(
            r.status,
            200,
            "check {checks}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        let j = r.json();
        let label = match j["state"].as_str().unwrap() {
            "pending" => format!("pending/{}", j["stage"].as_str().unwrap()),
            other => other.to_string(),
        };
        if label == "pending/uploading" {
            assert!(j["bytes_sent"].as_u64().unwrap() <= data.len() as u64);
        }
        *seen.entry(label).or_default() += 1;
        // Drop-in route, a range near the end.
        let url = format!("http://{addr}/record/life.mp4");
        let r = http("GET", &url, &[("range", "bytes=-64")]).await;
        let r = match r.status {
            206 => r,
            302 => {
                http(
                    "GET",
                    r.header("location").unwrap(),
                    &[("range", "bytes=-64")],
                )
                .await
            }
            other => panic!(
                "check {checks}: status {other}: {:?}",
                String::from_utf8_lossy(&r.body)
            ),
        };
        assert_eq!(r.status, 206, "check {checks}");
        assert_eq!(r.body, &data[data.len() - 64..], "check {checks}");
        checks += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        seen.contains_key("pending/local") || seen.contains_key("pending/queued"),
        "{seen:?}"
    );
    assert!(seen.contains_key("pending/uploading"), "{seen:?}");
    assert!(seen.contains_key("uploaded"), "{seen:?}");
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_never_reads_outside_the_root() {
    let env = Env::new().await;
    let secret = b"TOP-SECRET-OUTSIDE-THE-ROOT";
    std::fs::write(env.dir.path().join("secret.txt"), secret).unwrap();
    std::fs::write(env.dir.path().join("secret.mp4"), secret).unwrap();
    std::os::unix::fs::symlink(env.dir.path().join("secret.mp4"), env.root.join("link.mp4"))
        .unwrap();
    std::os::unix::fs::symlink(env.dir.path(), env.root.join("dirlink")).unwrap();
    env.write("ok.mp4", b"fine");
    // A FIFO named like a recording: opening it for reading would block the server.
    rustix::fs::mknodat(
        rustix::fs::CWD,
        env.root.join("pipe.mp4"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    let d = env
        .start(env.config(|c| c.watch.settle_secs = 3600.0))
        .await;
    let addr = tcp_addr(&d);

    let long = format!("/record/{}", "a/".repeat(2600));
    let cases: Vec<(Vec<u8>, &[u16])> = vec![
        (b"/record/../secret.txt".to_vec(), &[400]),
        (b"/record/%2e%2e/secret.txt".to_vec(), &[400]),
        (b"/record/%2E%2E%2Fsecret.txt".to_vec(), &[400]),
        (b"/record/..%2fsecret.txt".to_vec(), &[400]),
        (b"/record/.%2E/.%2e/secret.txt".to_vec(), &[400]),
        (b"/record/a/../../secret.txt".to_vec(), &[400]),
        (b"/%2e%2e/secret.txt".to_vec(), &[400]),
        (b"//record/../secret.txt".to_vec(), &[400]),
        (b"/record/%252e%252e/secret.txt".to_vec(), &[404]),
        (b"/record/%c0%ae%c0%ae/secret.txt".to_vec(), &[404]),
        (b"/record/..%5csecret.txt".to_vec(), &[404]),
        (b"/record/a%00b.mp4".to_vec(), &[400]),
        (b"/record/%zz.mp4".to_vec(), &[400]),
        (b"/record/%".to_vec(), &[400]),
        (b"/record/%e".to_vec(), &[400]),
        (b"/record/link.mp4".to_vec(), &[404]),
        (b"/record/dirlink/secret.mp4".to_vec(), &[404]),
        (b"/record/dirlink/secret.txt".to_vec(), &[404]),
        (b"/etc/passwd".to_vec(), &[404]),
        (b"/record/pipe.mp4".to_vec(), &[404]),
        (b"/record".to_vec(), &[400]),
        (b"/record/".to_vec(), &[400]),
        (long.clone().into_bytes(), &[414]),
        (format!("/record/{}", "n".repeat(300)).into_bytes(), &[400]),
        // Bytes hyper itself refuses in a request line.
        (b"/record/a\x00b".to_vec(), &[400]),
        (b"/record/\xff.mp4".to_vec(), &[400, 404]),
        // Every other spelling of a way out: encoded separators around `..`, backslashes
        // (plain, encoded, doubly encoded), overlong and look-alike encodings of `.` and `/`,
        // absolute paths inside the prefix, and absolute-form request targets.
        (b"/record/%2F..%2Fsecret.txt".to_vec(), &[400]),
        (b"/record/%2e%2e%2fsecret.txt".to_vec(), &[400]),
        (b"/record/%2e./secret.txt".to_vec(), &[400]),
        (b"/record/a/%2E%2E/%2E%2E/secret.txt".to_vec(), &[400]),
        (b"/record/%252e%252e%252fsecret.txt".to_vec(), &[404]),
        (b"/record/..\\secret.txt".to_vec(), &[400, 404]),
        (b"/record/..\\..\\secret.txt".to_vec(), &[400, 404]),
        (b"/record/%5c..%5csecret.txt".to_vec(), &[404]),
        (b"/record/%255c..%255csecret.txt".to_vec(), &[404]),
        (b"/record/%c0%ae%c0%ae%c0%afsecret.txt".to_vec(), &[404]),
        (b"/record/%e0%80%ae%e0%80%ae/secret.txt".to_vec(), &[404]),
        (b"/record/%ef%bc%8e%ef%bc%8e/secret.txt".to_vec(), &[404]),
        (b"/record/....//secret.txt".to_vec(), &[404]),
        (b"/record/secret.txt%00.mp4".to_vec(), &[400]),
        (b"/record//etc/passwd".to_vec(), &[404]),
        (b"/record/%2Fetc%2Fpasswd".to_vec(), &[404]),
        (b"/record/%2F%2Fetc/passwd".to_vec(), &[404]),
        (b"/..%2Fetc/passwd".to_vec(), &[400]),
        (b"http://127.0.0.1/record/../secret.txt".to_vec(), &[400]),
        (
            b"http://127.0.0.1/record/%2e%2e/secret.txt".to_vec(),
            &[400],
        ),
        (b"http://127.0.0.1/etc/passwd".to_vec(), &[404]),
    ];
    let passwd = std::fs::read("/etc/passwd").unwrap_or_default();
    let passwd_line = passwd
        .split(|&b| b == b'\n')
        .next()
        .unwrap_or_default()
        .to_vec();
    for (target, want) in &cases {
        for method in ["GET", "HEAD"] {
            let r = raw(addr, method, target, "").await;
            assert!(
                want.contains(&r.status),
                "{method} {:?}: {} {:?}",
                String::from_utf8_lossy(target),
                r.status,
                String::from_utf8_lossy(&r.body)
            );
            assert!(!r.body.windows(secret.len()).any(|w| w == secret));
            assert!(
                passwd_line.is_empty()
                    || !r.body.windows(passwd_line.len()).any(|w| w == passwd_line)
            );
            if method == "GET" && r.header("content-type") == Some("application/json") {
                let e = r.json()["error"].as_str().unwrap().to_string();
                assert!(["bad_path", "not_found"].contains(&e.as_str()), "{e}");
            }
        }
        // The same through /v1/resolve (P is the target, encoded once more).
        let q = percent_encoding::percent_encode(target, percent_encoding::NON_ALPHANUMERIC);
        let r = raw(addr, "GET", format!("/v1/resolve?path={q}").as_bytes(), "").await;
        // Overlong input is a plain bad_path here; paths outside the prefix too.
        let want_json: &[u16] = if want == &[400] || want.contains(&414) {
            &[400]
        } else {
            &[400, 404]
        };
        assert!(
            want_json.contains(&r.status),
            "resolve {:?}: {} {:?}",
            String::from_utf8_lossy(target),
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        assert!(!r.body.windows(secret.len()).any(|w| w == secret));
    }
    // A directory the daemon has served from, swapped for a symlink to the outside: the
    // same URL now finds nothing, through either route.
    let outside = env.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("x.mp4"), secret).unwrap();
    env.write("sw/x.mp4", b"inside");
    let r = raw(addr, "GET", b"/record/sw/x.mp4", "").await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"inside"[..]));
    std::fs::rename(env.root.join("sw"), env.root.join("sw.moved")).unwrap();
    std::os::unix::fs::symlink(&outside, env.root.join("sw")).unwrap();
    for method in ["GET", "HEAD"] {
        let r = raw(addr, method, b"/record/sw/x.mp4", "").await;
        assert_eq!(r.status, 404, "{method} through a swapped-in symlink");
        assert!(!r.body.windows(secret.len()).any(|w| w == secret));
    }
    let r = resolve(addr, "/record/sw/x.mp4").await;
    assert_eq!(r.status, 404);
    assert!(!r.body.windows(secret.len()).any(|w| w == secret));
    // The daemon is still well after all that, and serves what it should.
    let r = raw(addr, "GET", b"/record/ok.mp4", "").await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"fine"[..]));
    assert_eq!(get(&format!("http://{addr}/healthz")).await.status, 200);
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_refused() {
    let env = Env::new().await;
    let d = env.start(env.config(|_| {})).await;
    let addr = tcp_addr(&d);
    let big = format!("X-Big: {}\r\n", "b".repeat(40_000));
    let r = raw(addr, "GET", b"/healthz", &big).await;
    assert_eq!(r.status, 431);
    let many: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
    let r = raw(addr, "GET", b"/healthz", &many).await;
    assert_eq!(r.status, 431);
    d.shutdown();
    d.wait().await;
}

/// A signed request as a client would build it from the README's description.
fn signed_query(
    secret: &str,
    app: &str,
    method: &str,
    path: &str,
    p: &str,
    ts: u64,
    nonce: &str,
) -> String {
    use hmac::{Hmac, Mac};
    // Canonical query: names and values re-encoded (unreserved kept), sorted, sig excluded.
    let e = |s: &str| {
        const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
            .remove(b'-')
            .remove(b'.')
            .remove(b'_')
            .remove(b'~');
        percent_encoding::utf8_percent_encode(s, UNRESERVED).to_string()
    };
    let ts = ts.to_string();
    let mut params = [
        ("app_key", app),
        ("nonce", nonce),
        ("path", p),
        ("ts", ts.as_str()),
    ]
    .map(|(n, v)| (e(n), e(v)));
    // Sorted by name, then value.
    params.sort();
    let canonical = params.map(|(n, v)| format!("{n}={v}")).join("&");
    let to_sign = format!("{method}\n{path}\n{canonical}\n{ts}\n{nonce}");
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(to_sign.as_bytes());
    let sig = hex::encode(mac.finalize().into_bytes());
    format!(
        "path={}&app_key={app}&ts={ts}&nonce={nonce}&sig={sig}",
        enc(p)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_look_ups_accept_refuse_and_stop_replays() {
    let env = Env::new().await;
    const SECRET: &str = "a-long-enough-secret-1234";
    let d = env
        .start(env.config(|c| {
            c.watch.settle_secs = 3600.0;
            c.lookup.auth.keys.insert("biz".into(), SECRET.into());
        }))
        .await;
    let addr = tcp_addr(&d);
    env.write("a.mp4", b"abc");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();

    let r = resolve(addr, "/record/a.mp4").await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"], "unauthorized");

    let q = signed_query(
        SECRET,
        "biz",
        "GET",
        "/v1/resolve",
        "/record/a.mp4",
        now,
        "n-1",
    );
    let r = get(&format!("http://{addr}/v1/resolve?{q}")).await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(r.json()["state"], "pending");
    // The same request again is a replay.
    let r = get(&format!("http://{addr}/v1/resolve?{q}")).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["reason"], "replay");
    // Wrong secret, stale time, another path under the same signature.
    let q = signed_query(
        "another-secret-entirely",
        "biz",
        "GET",
        "/v1/resolve",
        "/record/a.mp4",
        now,
        "n-2",
    );
    assert_eq!(
        get(&format!("http://{addr}/v1/resolve?{q}")).await.json()["reason"],
        "bad_signature"
    );
    let q = signed_query(
        SECRET,
        "biz",
        "GET",
        "/v1/resolve",
        "/record/a.mp4",
        now - 301,
        "n-3",
    );
    assert_eq!(
        get(&format!("http://{addr}/v1/resolve?{q}")).await.json()["reason"],
        "stale"
    );
    let q = signed_query(
        SECRET,
        "biz",
        "GET",
        "/v1/resolve",
        "/record/a.mp4",
        now,
        "n-4",
    );
    let other = q.replace("a%2Emp4", "b%2Emp4");
    assert_ne!(other, q);
    let r = get(&format!("http://{addr}/v1/resolve?{other}")).await;
    assert_eq!(r.json()["reason"], "bad_signature");
    let q = signed_query(
        SECRET,
        "nobody",
        "GET",
        "/v1/resolve",
        "/record/a.mp4",
        now,
        "n-5",
    );
    assert_eq!(
        get(&format!("http://{addr}/v1/resolve?{q}")).await.json()["reason"],
        "unknown_key"
    );
    // The drop-in route stays open unless lookup.auth.legacy_route; health is never signed.
    assert_eq!(
        get(&format!("http://{addr}/record/a.mp4")).await.status,
        200
    );
    assert_eq!(get(&format!("http://{addr}/healthz")).await.status, 200);
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_outside_the_allow_list_get_403() {
    let env = Env::new().await;
    let d = env
        .start(env.config(|c| c.lookup.allow = vec!["10.0.0.0/8".into()]))
        .await;
    let addr = tcp_addr(&d);
    let r = resolve(addr, "a.mp4").await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"], "forbidden");
    d.shutdown();
    d.wait().await;
    let d = env
        .start(env.config(|c| c.lookup.allow = vec!["127.0.0.0/8".into()]))
        .await;
    assert_eq!(resolve(tcp_addr(&d), "a.mp4").await.status, 404);
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_serves_and_is_cleaned_up() {
    let env = Env::new().await;
    let sock = env.dir.path().join("lookup.sock");
    // A stale socket left by a dead process is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let d = env
        .start(env.config(|c| {
            c.lookup.listen = vec!["127.0.0.1:0".into(), format!("unix:{}", sock.display())];
            c.watch.settle_secs = 3600.0;
        }))
        .await;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    env.write("u.mp4", b"via unix");
    let s = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let r = raw_on(s, "GET", b"/v1/resolve?path=u.mp4", "").await;
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["state"], "pending");
    // public_url defaults to http:// + the first TCP address.
    assert_eq!(j["url"], format!("http://{}/record/u.mp4", tcp_addr(&d)));
    let s = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let r = raw_on(s, "GET", b"/record/u.mp4", "").await;
    assert_eq!(r.body, b"via unix");

    // A second daemon cannot take a socket that is in use.
    let other = Env::new().await;
    let busy = Daemon::start(other.config(|c| {
        c.lookup.listen = vec![format!("unix:{}", sock.display())];
    }))
    .await;
    assert!(busy.is_err());

    d.shutdown();
    d.wait().await;
    assert!(!sock.exists(), "the socket file is removed on exit");
}

/// Look-ups share a journal snapshot while busy; once they stop, the server's timer ends it,
/// so the WAL can be checkpointed and reset again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_lookup_server_does_not_hold_the_journal_back() {
    let env = Env::new().await;
    let d = env.start(env.config(|_| {})).await;
    let addr = tcp_addr(&d);
    env.write("a.mp4", b"stored");
    env.wait_state("a.mp4", State::Deleted, T).await;
    for _ in 0..20 {
        assert_eq!(resolve(addr, "/record/a.mp4").await.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let conn = rusqlite::Connection::open(&env.journal_path).unwrap();
    conn.busy_timeout(Duration::from_secs(2)).unwrap();
    let busy: i64 = conn
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        busy, 0,
        "a reader still holds the WAL after look-ups stopped"
    );
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics() {
    let env = Env::new().await;
    let d = env.start(env.config(|_| {})).await;
    let addr = tcp_addr(&d);
    let r = get(&format!("http://{addr}/healthz")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ok");
    let r = get(&format!("http://{addr}/metrics")).await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let text = String::from_utf8_lossy(&r.body).to_string();
    assert!(text.contains("record_offload_healthy 1"), "{text}");
    // HEAD: the GET answer's status and length, no body.
    let r = http("HEAD", &format!("http://{addr}/healthz"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-length"),
        Some(r#"{"status":"ok"}"#.len().to_string()).as_deref()
    );
    assert!(r.body.is_empty());
    // Look-ups are counted by answer (the registry is shared by the tests in this process).
    let count = |text: &str, answer: &str| -> f64 {
        let name = format!("record_offload_lookups_total{{answer=\"{answer}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(name.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    let (nf, bad) = (count(&text, "not_found"), count(&text, "bad_path"));
    let r = get(&format!("http://{addr}/v1/resolve?path=no/such.mp4")).await;
    assert_eq!(r.status, 404);
    let r = get(&format!("http://{addr}/v1/resolve?path=../etc/passwd")).await;
    assert_eq!(r.status, 400);
    let text =
        String::from_utf8_lossy(&get(&format!("http://{addr}/metrics")).await.body).to_string();
    assert!(count(&text, "not_found") > nf);
    assert!(count(&text, "bad_path") > bad);
    d.shutdown();
    d.wait().await;
    // Stopped: nothing listens any more.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_nodes_files_redirect_to_their_agent_until_stored() {
    let env = Env::new().await;
    let d = env
        .start(env.config(|c| {
            c.nodes = vec![NodeEntry {
                name: "node2".into(),
                legacy_hosts: vec!["10.9.9.9".into()],
                lookup_url: "http://127.0.0.1:1/".into(),
            }];
        }))
        .await;
    let addr = tcp_addr(&d);
    let input = "http://10.9.9.9/record/x/y.mp4";
    let r = resolve(addr, input).await;
    assert_eq!(r.status, 307);
    let location = r.header("location").unwrap();
    assert_eq!(
        location,
        format!("http://127.0.0.1:1/v1/resolve?path={}", enc(input))
    );
    assert_eq!(r.json()["node"], "node2");
    // The drop-in route with the other node's Host header.
    let r = raw(addr, "GET", b"/record/x/y.mp4", "").await;
    assert_eq!(r.status, 404, "this node's own file would be 404");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /record/x/y.mp4 HTTP/1.1\r\nHost: 10.9.9.9\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 307"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("location: http://127.0.0.1:1/record/x/y.mp4"),
        "{text}"
    );

    // Once that node's object is in the bucket, the answer is a signed URL (after the cache).
    d.shutdown();
    d.wait().await;
    let data = bytes(5000, 21);
    put_object(&env, "node2/x/y.mp4", &data).await;
    let d = env
        .start(env.config(|c| {
            c.nodes = vec![NodeEntry {
                name: "node2".into(),
                legacy_hosts: vec!["10.9.9.9".into()],
                lookup_url: "http://127.0.0.1:1/".into(),
            }];
        }))
        .await;
    let r = resolve(tcp_addr(&d), input).await;
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["key"], "node2/x/y.mp4");
    assert_eq!(j["size"], 5000);
    assert_eq!(get(j["url"].as_str().unwrap()).await.body, data);
    d.shutdown();
    d.wait().await;
}

async fn put_object(env: &Env, key: &str, data: &[u8]) {
    let store = record_offload::store::Store::new(&env.config(|_| {}));
    store
        .client()
        .put_object()
        .bucket(BUCKET)
        .key(key)
        .body(data.to_vec().into())
        .send()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_check_finds_objects_the_journal_does_not_know() {
    let env = Env::new().await;
    let data = bytes(4321, 5);
    put_object(&env, &env.key("old/before.mp4"), &data).await;
    let d = env.start(env.config(|_| {})).await;
    assert_eq!(
        resolve(tcp_addr(&d), "/record/old/before.mp4").await.status,
        404
    );
    d.shutdown();
    d.wait().await;
    let d = env
        .start(env.config(|c| c.lookup.remote_check = true))
        .await;
    let addr = tcp_addr(&d);
    let r = resolve(addr, "/record/old/before.mp4").await;
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["size"], 4321);
    assert_eq!(get(j["url"].as_str().unwrap()).await.body, data);
    let r = get(&format!("http://{addr}/record/old/before.mp4")).await;
    assert_eq!(r.status, 302);
    assert_eq!(resolve(addr, "/record/old/never.mp4").await.status, 404);
    d.shutdown();
    d.wait().await;
}

/// An answer that has to wait (here a remote check against a store that answers too late) is
/// cut at `lookup.request_timeout_secs` with a 503, while answers from the journal come at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_answers_time_out_and_others_are_not_held_up() {
    let env = Env::new().await;
    let proxy = FaultProxy::start(env.server.addr).await.unwrap();
    let d = env
        .start(env.config_at(&format!("http://{}", proxy.addr()), |c| {
            c.lookup.remote_check = true;
            c.lookup.request_timeout_secs = 0.5;
        }))
        .await;
    let addr = tcp_addr(&d);
    let data = bytes(3000, 9);
    env.write("now/stored.mp4", &data);
    env.wait_state("now/stored.mp4", State::Deleted, Duration::from_secs(30))
        .await;
    proxy.set(Fault::DelayResponse(Duration::from_secs(3)));
    let start = std::time::Instant::now();
    let slow = tokio::spawn(async move { resolve(addr, "/record/old/unknown.mp4").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // While the remote check waits, a stored file is answered.
    let r = resolve(addr, "/record/now/stored.mp4").await;
    assert_eq!(r.status, 200);
    assert!(
        !slow.is_finished(),
        "the stored file's answer waited for the slow one"
    );
    let r = slow.await.unwrap();
    let took = start.elapsed();
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"], "timeout");
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    proxy.set(Fault::None);
    d.shutdown();
    d.wait().await;
}

/// `record-offload resolve`: the same answers without the daemon, and its exit codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_command_answers_without_the_daemon() {
    let env = Env::new().await;
    let d = env.start(env.config(|_| {})).await;
    let data = bytes(999, 4);
    env.write("cli/a b.mp4", &data);
    env.wait_state("cli/a b.mp4", State::Deleted, T).await;
    d.shutdown();
    d.wait().await;
    env.write("cli/local.mp4", b"x");

    let cfg = env.dir.path().join("config.toml");
    write_config(&env, &cfg);
    let run = |args: &[&str]| {
        let out = common::cli(&cfg)
            .args(args)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, _) = run(&["resolve", "--json", "/record/cli/a%20b.mp4"]);
    assert_eq!(code, 0);
    let j: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["state"], "uploaded");
    assert_eq!(j["md5"], md5_hex(&data));
    assert_eq!(get(j["url"].as_str().unwrap()).await.body, data);
    let (code, out, _) = run(&["resolve", "cli/local.mp4"]);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), "http://127.0.0.1:8090/record/cli/local.mp4");
    let (code, out, err) = run(&["resolve", "/record/cli/none.mp4"]);
    assert_eq!((code, out.as_str()), (1, ""));
    assert_eq!(err.lines().count(), 1, "{err}");
    let (code, _, err) = run(&["resolve", "/record/../x"]);
    assert_eq!(code, 1);
    assert!(err.contains("bad path"), "{err}");
    // An unreadable journal is exit 2.
    std::fs::rename(&env.journal_path, env.dir.path().join("moved.db")).unwrap();
    let (code, _, err) = run(&["resolve", "/record/cli/a%20b.mp4"]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

fn write_config(env: &Env, path: &Path) {
    std::fs::write(
        path,
        format!(
            r#"[node]
name = "{NODE}"
[watch]
root = {root:?}
[journal]
path = {journal:?}
[storage]
endpoint = "{endpoint}"
region = "us-east-1"
bucket = "{BUCKET}"
access_key_id = "{ak}"
access_key_secret = "{sk}"
path_style = true
"#,
            root = env.root.display().to_string(),
            journal = env.journal_path.display().to_string(),
            endpoint = env.server.endpoint(),
            ak = record_offload::devserver::ACCESS_KEY,
            sk = record_offload::devserver::SECRET_KEY,
        ),
    )
    .unwrap();
}
