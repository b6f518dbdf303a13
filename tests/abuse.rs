//! The look-up server under hostile clients. The real binary runs as a child process (so its
//! memory can be read from /proc) against the local S3 server, with small limits
//! (`max_connections = 16`, `header_timeout_secs = 1`); the clients are raw sockets on
//! 127.0.0.1 sending what no well-behaved client would: oversized heads, a dribbled head,
//! floods of connections, malformed requests and binary garbage. Each gets a clear 4xx or is
//! closed; the daemon keeps answering, its memory stays bounded, and it stops cleanly.
//! (What `tests/lookup.rs` already covers — 431 for one large header, 400/404/414 for bad
//! paths — is not repeated here.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::harness::*;
use record_offload::devserver::SECRET_KEY;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(30);
const MAX_CONNECTIONS: usize = 16;
const HEADER_TIMEOUT: Duration = Duration::from_secs(1);

fn write_config(env: &Env) -> PathBuf {
    env.config_file_at(&env.server.endpoint(), |c| {
        c.watch.settle_secs = 3600.0;
        c.storage.access_key_secret = String::new();
        c.upload.drain_secs = 1.0;
        c.lookup.max_connections = MAX_CONNECTIONS;
        c.lookup.header_timeout_secs = HEADER_TIMEOUT.as_secs_f64();
        c.lookup.request_timeout_secs = 5.0;
    })
}

/// The daemon process; killed if the test fails before it stopped it.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn spawn(cfg: &Path, log: &Path) -> Running {
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_record-offload"))
        .args(["run", "--config"])
        .arg(cfg)
        .env("RECORD_OFFLOAD_STORAGE__ACCESS_KEY_SECRET", SECRET_KEY)
        .env("RUST_LOG", "record_offload=info")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_PID")
        .env_remove("WATCHDOG_USEC")
        .env_remove("JOURNAL_STREAM")
        .env_remove("RECORD_OFFLOAD_FAILPOINTS")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Running(child)
}

/// The look-up address, from the daemon's "look-up server listening addr=…" log line.
async fn lookup_addr(log: &Path) -> SocketAddr {
    let mut found = None;
    wait_until("the look-up server's address in the log", T, || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        found = text
            .lines()
            .filter(|l| l.contains("look-up server listening"))
            .find_map(|l| l.split("addr=").nth(1))
            .and_then(|a| a.split_whitespace().next())
            .and_then(|a| a.parse().ok());
        found.is_some()
    })
    .await;
    found.unwrap()
}

/// A field of /proc/PID/status in KiB (`VmRSS`, `VmHWM`).
fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// What came back for raw bytes: the status of the first answer, if one came, and whether
/// the server closed the connection (EOF or reset) within the wait.
#[derive(Debug)]
struct Outcome {
    status: Option<u16>,
    closed: bool,
    /// The answer's head, for messages.
    head: String,
}

/// Sends `bytes` (write errors are ignored: a server may close early) and reads until the
/// server closes or `wait` passes.
async fn exchange(addr: SocketAddr, bytes: &[u8], wait: Duration) -> Outcome {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    read_outcome(&mut s, wait).await
}

async fn read_outcome(s: &mut TcpStream, wait: Duration) -> Outcome {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + wait;
    let closed = loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    };
    let head_end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(out.len());
    let head = String::from_utf8_lossy(&out[..head_end]).into_owned();
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok());
    Outcome {
        status,
        closed,
        head,
    }
}

/// A plain GET answered with `want` (a fresh connection, `Connection: close`).
async fn get_status(addr: SocketAddr, target: &str) -> Option<u16> {
    let req = format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    exchange(addr, req.as_bytes(), T).await.status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_get_4xx_and_the_daemon_stays_up_and_small() {
    let env = Env::new().await;
    env.write("a/local.mp4", b"served while local");
    let cfg = write_config(&env);
    let log = env.dir.path().join("daemon.log");
    let mut daemon = spawn(&cfg, &log);
    let pid = daemon.0.id();
    let addr = lookup_addr(&log).await;
    let mut healthy = false;
    for _ in 0..200 {
        if get_status(addr, "/healthz").await == Some(200) {
            healthy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(healthy, "the daemon never became healthy");
    // Warm up (first answers allocate caches and pools), then take the baseline.
    for _ in 0..50 {
        assert_eq!(get_status(addr, "/record/a/local.mp4").await, Some(200));
    }
    let rss_before = proc_kib(pid, "VmRSS");
    let t0 = Instant::now();
    // Reset the peak (VmHWM) so that it shows the peak under the abuse, not at start-up.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();

    // 1. Oversized heads, many at once: 32 clients each send 2 MiB of header lines. If any of
    //    it were kept, that is 64 MiB; each must be refused with 431 (or cut off once the
    //    server has answered and closed while the client was still sending).
    let mut tasks = Vec::new();
    for i in 0..32 {
        tasks.push(tokio::spawn(async move {
            let mut req = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad-{i}: ").into_bytes();
            req.extend(std::iter::repeat_n(b'p', 2 << 20));
            req.extend_from_slice(b"\r\n\r\n");
            exchange(addr, &req, T).await
        }));
    }
    let mut refused_431 = 0;
    for t in tasks {
        let o = t.await.unwrap();
        assert!(o.closed, "{o:?}");
        assert!(o.status.is_none() || o.status == Some(431), "{o:?}");
        refused_431 += usize::from(o.status == Some(431));
    }
    assert!(refused_431 > 0, "no client saw the 431");
    // A request line longer than the head limit, and one longer than the look-up input limit
    // but within the head limit: neither is served, both are told why.
    let huge_uri = format!("/record/{}", "u".repeat(64 * 1024));
    let o = exchange(
        addr,
        format!("GET {huge_uri} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        T,
    )
    .await;
    assert!(
        matches!(o.status, Some(400 | 414 | 431)),
        "64 KiB request line: {o:?}"
    );
    let long_uri = format!("/record/{}", "a/".repeat(4000));
    assert_eq!(get_status(addr, &long_uri).await, Some(414));

    // 2. Malformed requests: each gets a 4xx (hyper's 400 for what it cannot parse), never a
    //    5xx, and the daemon answers the next request.
    let garbage: Vec<u8> = bytes(4096, 7);
    let malformed: Vec<(&str, Vec<u8>, &[u16])> = vec![
        ("method with a space", b"G ET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), &[400]),
        ("method with a NUL", b"G\x00T /healthz HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), &[400]),
        ("unknown method", b"BREW /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), &[404, 405]),
        ("POST to a look-up", b"POST /v1/resolve?path=a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc".to_vec(), &[404, 405]),
        ("HTTP/2.0 on an HTTP/1 socket", b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n".to_vec(), &[400, 505]),
        ("HTTP/9.9", b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n".to_vec(), &[400, 505]),
        ("no version", b"GET /healthz\r\nHost: x\r\n\r\n".to_vec(), &[400]),
        ("not HTTP at all", b"HELLO\r\n\r\n".to_vec(), &[400]),
        ("bare LF and CR", b"GET /healthz HTTP/1.1\rHost: x\r\r\r".to_vec(), &[400]),
        ("header without colon", b"GET /healthz HTTP/1.1\r\nHost x\r\n\r\n".to_vec(), &[400]),
        ("header name with space", b"GET /healthz HTTP/1.1\r\nHo st: x\r\n\r\n".to_vec(), &[400]),
        ("obsolete line folding", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: b\r\n c\r\n\r\n".to_vec(), &[400]),
        ("two Content-Lengths", b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab".to_vec(), &[400]),
        // RFC 9112 lets a server either refuse this or let the chunked coding win.
        ("Content-Length and chunked", b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), &[200, 400]),
        ("Content-Length not a number", b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n".to_vec(), &[400]),
        ("unknown transfer coding", b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec(), &[400, 501]),
        ("bad percent-encoding, drop-in", b"GET /record/a%G1.mp4 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), &[400]),
        ("bad percent-encoding, resolve", b"GET /v1/resolve?path=%2Frecord%2Fa%25G1.mp4 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), &[400]),
        ("truncated percent-encoding", b"GET /record/a% HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), &[400]),
        ("request target with a space", b"GET /record/a b.mp4 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), &[400]),
        ("control byte in target", b"GET /record/a\x01b HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), &[400]),
        ("binary garbage", garbage.clone(), &[400]),
        ("garbage after a valid line", [b"GET /healthz HTTP/1.1\r\n".as_slice(), &garbage].concat(), &[400]),
        ("TLS hello on plain HTTP", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".iter().copied().chain(std::iter::repeat_n(0u8, 64)).collect(), &[400]),
    ];
    for (what, req, want) in &malformed {
        let o = exchange(addr, req, T).await;
        assert!(
            o.status.is_some_and(|s| want.contains(&s)),
            "{what}: expected one of {want:?}, got {o:?}"
        );
        assert!(o.closed, "{what}: connection left open: {}", o.head);
    }
    assert_eq!(get_status(addr, "/healthz").await, Some(200));

    // 3. Slowloris: clients that dribble a head, one byte every 100 ms, are closed once
    //    header_timeout_secs has passed, and meanwhile others are answered. With as many
    //    dribblers as max_connections, the next client is answered once they were cut off.
    let mut dribblers = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        dribblers.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ";
            s.write_all(head).await.unwrap();
            let start = Instant::now();
            // Keep dribbling for at most 20 s; the server must close before that.
            while start.elapsed() < Duration::from_secs(20) {
                if s.write_all(b"z").await.is_err() {
                    return start.elapsed();
                }
                let mut b = [0u8; 512];
                match tokio::time::timeout(Duration::from_millis(100), s.read(&mut b)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
                    // An answer (408 or similar) is fine too; then the server closes.
                    Ok(Ok(_)) | Err(_) => {}
                }
            }
            start.elapsed()
        }));
    }
    // While they hold every slot, a well-behaved client waits in the backlog and is answered
    // once the dribblers are cut off.
    let answered = tokio::time::timeout(T, get_status(addr, "/record/a/local.mp4"))
        .await
        .expect("a client behind the slowloris connections was never answered");
    assert_eq!(answered, Some(200));
    for d in dribblers {
        let held = d.await.unwrap();
        assert!(
            held < Duration::from_secs(20),
            "a dribbling client was never cut off"
        );
    }
    // A single dribbler does not hold up anyone: others are answered while it dribbles.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    for _ in 0..5 {
        assert_eq!(get_status(addr, "/healthz").await, Some(200));
    }
    let o = read_outcome(&mut slow, T).await;
    assert!(o.closed, "the idle half-sent head was never closed: {o:?}");

    // 4. A flood of connections, far over max_connections: 2000 clients connect and sit idle.
    //    The daemon keeps running; once they go, the next request is answered.
    let connects: Vec<_> = (0..2000)
        .map(|_| {
            tokio::spawn(tokio::time::timeout(
                Duration::from_secs(3),
                TcpStream::connect(addr),
            ))
        })
        .collect();
    let mut flood = Vec::new();
    for c in connects {
        // Past the kernel's accept backlog connects stall: that is the point of the exercise.
        if let Ok(Ok(s)) = c.await.unwrap() {
            flood.push(s);
        }
    }
    eprintln!(
        "flood: {} connections open after {:?}",
        flood.len(),
        t0.elapsed()
    );
    assert!(
        flood.len() > MAX_CONNECTIONS * 4,
        "only {} connections could be opened",
        flood.len()
    );
    assert!(daemon.0.try_wait().unwrap().is_none(), "the daemon died");
    drop(flood);
    eprintln!("flood dropped after {:?}", t0.elapsed());
    let answered = tokio::time::timeout(T, get_status(addr, "/healthz"))
        .await
        .expect("no answer after the flood");
    assert_eq!(answered, Some(200));
    eprintln!("answered after the flood at {:?}", t0.elapsed());
    // Idle keep-alive connections do not hold slots for ever either.
    let mut idle = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    let answered = tokio::time::timeout(T, get_status(addr, "/healthz"))
        .await
        .expect("idle connections that hold every slot starve the server");
    assert_eq!(answered, Some(200));
    drop(idle);

    // 5. Memory: after all that, the resident set has not grown by the data thrown at it.
    let rss_after = proc_kib(pid, "VmRSS");
    let peak = proc_kib(pid, "VmHWM");
    eprintln!("daemon VmRSS: {rss_before} KiB before, {rss_after} KiB after, peak {peak} KiB");
    assert!(
        rss_after < rss_before + 32 * 1024,
        "VmRSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    assert!(
        peak < rss_before + 48 * 1024,
        "VmHWM {peak} KiB against {rss_before} KiB before"
    );

    // Still answering, then a clean stop.
    assert_eq!(get_status(addr, "/record/a/local.mp4").await, Some(200));
    let child_pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
    rustix::process::kill_process(child_pid, rustix::process::Signal::TERM).unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(st) = daemon.0.try_wait().unwrap() {
            break st;
        }
        assert!(start.elapsed() < T, "the daemon did not stop after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("panicked"), "{text}");
}
