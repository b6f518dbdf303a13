//! The daemon as systemd sees it: the real binary with a real unix datagram socket as
//! `NOTIFY_SOCKET` (READY, STATUS, WATCHDOG, STOPPING and their order; watchdog pings that
//! stop when a stage stalls), no secret in anything it prints, and `status --json`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::harness::*;
use record_offload::config::Config;
use record_offload::devserver::SECRET_KEY;
use record_offload::journal::State;

const T: Duration = Duration::from_secs(60);

fn write_config(env: &Env, edit: impl FnOnce(&mut Config)) -> PathBuf {
    write_config_at(env, &env.server.endpoint(), edit)
}

/// [`write_config`] with the store at `endpoint` (a fault proxy).
fn write_config_at(env: &Env, endpoint: &str, edit: impl FnOnce(&mut Config)) -> PathBuf {
    env.config_file_at(endpoint, |c| {
        c.watch.settle_secs = 0.1;
        // The secret comes in the environment (see `spawn`).
        c.storage.access_key_secret = String::new();
        c.upload.drain_secs = 1.0;
        // The test host's disk fills and empties with other builds: no forecast warnings
        // in STATUS= unless a test asks for them.
        c.watch.disk_warn_secs = 0.0;
        edit(c);
    })
}

/// Messages received on the notify socket, each with the time it arrived.
#[derive(Clone, Default)]
struct Notes(Arc<Mutex<Vec<(Instant, String)>>>);

impl Notes {
    /// Binds `path` and collects every datagram (one entry per line) until the socket is
    /// removed with the test's temporary directory.
    fn listen(path: &Path) -> Notes {
        let sock = UnixDatagram::bind(path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let notes = Notes::default();
        let n = notes.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            let deadline = Instant::now() + Duration::from_secs(300);
            while Instant::now() < deadline {
                match sock.recv(&mut buf) {
                    Ok(len) => {
                        let text = String::from_utf8_lossy(&buf[..len]).into_owned();
                        let now = Instant::now();
                        let mut v = n.0.lock().unwrap();
                        for line in text.lines().filter(|l| !l.is_empty()) {
                            v.push((now, line.to_string()));
                        }
                    }
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => break,
                }
            }
        });
        notes
    }

    fn lines(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, l)| l.clone())
            .collect()
    }

    fn position(&self, pred: impl Fn(&str) -> bool) -> Option<usize> {
        self.lines().iter().position(|l| pred(l))
    }

    fn count_since(&self, since: Instant, line: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, l)| *t >= since && l == line)
            .count()
    }

    async fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> usize {
        let start = Instant::now();
        loop {
            if let Some(i) = self.position(&pred) {
                return i;
            }
            if start.elapsed() > T {
                panic!(
                    "no notify message {what} within {T:?}; got {:#?}",
                    self.lines()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The daemon process; killed if a test fails before it stopped it.
struct Running(Child);

impl std::ops::Deref for Running {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn spawn(cfg: &Path, notify: &Path, envs: &[(&str, &str)], log: &Path) -> Running {
    let log = std::fs::File::create(log).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_record-offload"));
    cmd.args(["run", "--config"])
        .arg(cfg)
        .env("NOTIFY_SOCKET", notify)
        .env("RECORD_OFFLOAD_STORAGE__ACCESS_KEY_SECRET", SECRET_KEY)
        .env("RUST_LOG", "record_offload=debug")
        .env_remove("WATCHDOG_PID")
        .env_remove("WATCHDOG_USEC")
        .env_remove("JOURNAL_STREAM")
        .env_remove("RECORD_OFFLOAD_FAILPOINTS")
        .stdout(Stdio::null())
        .stderr(log);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    Running(cmd.spawn().unwrap())
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if start.elapsed() > T {
            let _ = child.kill();
            panic!("the daemon did not stop after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `STATUS=` as `systemctl status` shows it: the queue in one line.
fn is_queue_status(line: &str) -> bool {
    let Some(s) = line.strip_prefix("STATUS=") else {
        return false;
    };
    let s = s.split_once("; ").map(|(_, r)| r).unwrap_or(s);
    if let Some(rest) = s.strip_prefix("idle, ") {
        return rest.ends_with(" stored") && rest.split(' ').next().unwrap().parse::<u64>().is_ok();
    }
    s.starts_with("queued ") && s.contains(", uploading ") && s.contains(", oldest ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_ready_status_watchdog_stopping_in_order() {
    let env = Env::new().await;
    let cfg = write_config(&env, |_| {});
    let sock = env.dir.path().join("notify.sock");
    let notes = Notes::listen(&sock);
    let log = env.dir.path().join("daemon.log");
    let lookup = env.dir.path().join("lookup.sock");
    let listen = format!("[\"unix:{}\"]", lookup.display());
    // Pings every 100 ms.
    let mut child = spawn(
        &cfg,
        &sock,
        &[
            ("WATCHDOG_USEC", "200000"),
            ("RECORD_OFFLOAD_LOOKUP__LISTEN", listen.as_str()),
        ],
        &log,
    );

    let ready = notes.wait_for("READY=1", |l| l == "READY=1").await;
    // Every listener answers by the time READY=1 is sent.
    let mut s = std::os::unix::net::UnixStream::connect(&lookup).expect("look-up socket bound");
    std::io::Write::write_all(
        &mut s,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut s, &mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let lines = notes.lines();
    assert_eq!(
        lines
            .iter()
            .position(|l| l == "STATUS=starting: recovering the journal"),
        Some(0),
        "{lines:#?}"
    );
    let first_ping = notes.wait_for("WATCHDOG=1", |l| l == "WATCHDOG=1").await;
    assert!(
        ready < first_ping,
        "READY=1 must come before any WATCHDOG=1"
    );

    // A file goes through; the status line says so.
    env.write("a.mp4", &bytes(5000, 1));
    env.wait_state("a.mp4", record_offload::journal::State::Deleted, T)
        .await;
    notes
        .wait_for("STATUS=idle, 1 file stored", |l| {
            l == "STATUS=idle, 1 file stored"
        })
        .await;
    for l in notes.lines().iter().filter(|l| l.starts_with("STATUS=")) {
        assert!(
            is_queue_status(l)
                || l == "STATUS=starting: recovering the journal"
                || l == "STATUS=started",
            "unexpected status line {l:?}"
        );
    }
    // Still pinging while idle for longer than the pings' interval: waiting is not a stall.
    let since = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(notes.count_since(since, "WATCHDOG=1") >= 3);

    let status = terminate(&mut child);
    assert!(status.success(), "exit status {status:?}");
    let stopping = notes.wait_for("STOPPING=1", |l| l == "STOPPING=1").await;
    assert!(ready < stopping);
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("systemd watchdog enabled"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_watchdog_pings_when_watchdog_pid_is_another_process() {
    let env = Env::new().await;
    let cfg = write_config(&env, |_| {});
    let sock = env.dir.path().join("notify.sock");
    let notes = Notes::listen(&sock);
    let log = env.dir.path().join("daemon.log");
    let mut child = spawn(
        &cfg,
        &sock,
        &[("WATCHDOG_USEC", "200000"), ("WATCHDOG_PID", "1")],
        &log,
    );
    notes.wait_for("READY=1", |l| l == "READY=1").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(terminate(&mut child).success());
    notes.wait_for("STOPPING=1", |l| l == "STOPPING=1").await;
    assert!(
        !notes.lines().iter().any(|l| l == "WATCHDOG=1"),
        "{:#?}",
        notes.lines()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stage_stops_the_watchdog_pings() {
    let env = Env::new().await;
    let cfg = write_config(&env, |c| c.health.stall_secs = 3.0);
    let sock = env.dir.path().join("notify.sock");
    let notes = Notes::listen(&sock);
    let log = env.dir.path().join("daemon.log");
    // The intake freezes when it gets its first file, as if a call had hung.
    let mut child = spawn(
        &cfg,
        &sock,
        &[
            ("WATCHDOG_USEC", "200000"),
            ("RECORD_OFFLOAD_FAILPOINTS", "intake:stall"),
        ],
        &log,
    );
    notes.wait_for("READY=1", |l| l == "READY=1").await;
    // Idle for longer than the allowance: every stage still beats, the pings go on.
    let since = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        notes.count_since(since + Duration::from_secs(3), "WATCHDOG=1") >= 3,
        "pings stopped while idle: {:#?}",
        notes.lines()
    );

    env.write("a.mp4", &bytes(100, 1));
    notes
        .wait_for("a STALLED status", |l| {
            l.starts_with("STATUS=STALLED: intake made no progress for")
        })
        .await;
    // From now on no ping may arrive (one may still have been in flight when the stall began).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let quiet_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        notes.count_since(quiet_from, "WATCHDOG=1"),
        0,
        "pings went on while the intake was stalled"
    );
    assert!(is_queue_status(
        &notes.lines()[notes.position(|l| l.starts_with("STATUS=STALLED")).unwrap()]
    ));

    assert!(terminate(&mut child).success());
    notes.wait_for("STOPPING=1", |l| l == "STOPPING=1").await;
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("a pipeline stage stopped making progress"),
        "{log}"
    );
    assert!(
        log.contains("stage=\"intake\"") || log.contains("stage=intake"),
        "{log}"
    );
}

/// Runs `args` with the config and environment given; returns stdout + stderr.
fn run_cli(cfg: &Path, args: &[&str], envs: &[(&str, &str)]) -> (bool, String) {
    let mut cmd = common::cli(cfg);
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_anything_printed() {
    let env = Env::new().await;
    let cfg = write_config(&env, |_| {});
    let sock = env.dir.path().join("notify.sock");
    let _notes = Notes::listen(&sock);

    // The right secret, everything logged at trace level, a file uploaded.
    let log = env.dir.path().join("daemon.log");
    let mut child = spawn(&cfg, &sock, &[("RUST_LOG", "trace")], &log);
    env.write("a.mp4", &bytes(7000, 3));
    env.wait_state("a.mp4", record_offload::journal::State::Deleted, T)
        .await;
    assert!(terminate(&mut child).success());
    let out = std::fs::read_to_string(&log).unwrap();
    assert!(out.contains("upload complete"), "{out}");
    assert!(
        !out.contains(SECRET_KEY),
        "the secret appears in the daemon's log"
    );

    // A wrong secret (the store refuses every request), given in the environment.
    let wrong = "Wr0ng-S3cret-7f3a9c";
    let log2 = env.dir.path().join("daemon2.log");
    let mut child = spawn(
        &cfg,
        &sock,
        &[
            ("RUST_LOG", "trace"),
            ("RECORD_OFFLOAD_STORAGE__ACCESS_KEY_SECRET", wrong),
        ],
        &log2,
    );
    env.write("b.mp4", &bytes(7000, 4));
    env.wait_state("b.mp4", record_offload::journal::State::Failed, T)
        .await;
    assert!(terminate(&mut child).success());
    let out = std::fs::read_to_string(&log2).unwrap();
    assert!(out.contains("SignatureDoesNotMatch"), "{out}");
    assert!(
        !out.contains(wrong),
        "the secret appears in the daemon's log"
    );

    // The commands an operator runs.
    let envs = [("RECORD_OFFLOAD_STORAGE__ACCESS_KEY_SECRET", wrong)];
    for args in [
        &["check-config"][..],
        &["status"],
        &["status", "--json"],
        &["ls", "--json"],
        &["import", "--dry-run"],
    ] {
        let (_, out) = run_cli(&cfg, args, &envs);
        assert!(!out.contains(wrong), "{args:?} printed the secret: {out}");
    }
    let (ok, out) = run_cli(&cfg, &["check-config"], &envs);
    assert!(ok && out.contains("<redacted>"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_while_the_daemon_runs() {
    let env = Env::new().await;
    let cfg = write_config(&env, |_| {});
    let sock = env.dir.path().join("notify.sock");
    let notes = Notes::listen(&sock);
    let log = env.dir.path().join("daemon.log");
    let mut child = spawn(&cfg, &sock, &[], &log);
    notes.wait_for("READY=1", |l| l == "READY=1").await;
    env.write("a.mp4", &bytes(3000, 1));
    env.wait_state("a.mp4", record_offload::journal::State::Deleted, T)
        .await;

    let (ok, out) = run_cli(&cfg, &["status", "--json"], &[]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["counts"]["deleted"], 1);
    assert_eq!(v["counts"]["queued"], 0);
    assert_eq!(v["bytes_waiting"], 0);
    assert_eq!(v["oldest_waiting_secs"], 0);
    assert!(v["last_errors"].is_array());

    let (ok, out) = run_cli(&cfg, &["status"], &[]);
    assert!(ok, "{out}");
    assert!(out.contains("deleted"), "{out}");
    assert!(out.contains("2.9 KiB"), "human sizes: {out}");
    assert!(out.contains("oldest waiting: 0s"), "{out}");
    assert!(terminate(&mut child).success());
}

#[test]
fn help_explains_every_command() {
    let out = Command::new(env!("CARGO_BIN_EXE_record-offload"))
        .arg("--help")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["run", "check-config", "status", "ls", "retry", "import"] {
        assert!(
            text.lines().any(|l| l.trim_start().starts_with(cmd)),
            "{cmd} missing from --help: {text}"
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_record-offload"))
        .args(["import", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("--dry-run") && text.contains("settle_secs"),
        "{text}"
    );
}

/// `GET PATH` over the Unix look-up socket: (status, body).
fn unix_get(sock: &Path, path: &str) -> (u16, String) {
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("look-up socket");
    std::io::Write::write_all(
        &mut s,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut s, &mut answer).unwrap();
    let status = answer
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{answer}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The real daemon answers stored files from its look-up index (its metric counts them), and a
/// new recording at a stored path is answered as pending once the journal re-queued it, never
/// with the stored object's old URL and MD5; once stored again, with the new MD5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lookup_index_follows_a_path_recorded_again() {
    let env = Env::new().await;
    let proxy = common::proxy::FaultProxy::start(env.server.addr)
        .await
        .unwrap();
    let lookup = env.dir.path().join("lookup.sock");
    let cfg = write_config_at(&env, &format!("http://{}", proxy.addr()), |c| {
        c.upload.retry_initial_secs = 0.05;
        c.upload.retry_max_secs = 0.2;
        c.lookup.listen = vec![format!("unix:{}", lookup.display())];
    });
    let sock = env.dir.path().join("notify.sock");
    let notes = Notes::listen(&sock);
    let mut child = spawn(&cfg, &sock, &[], &env.dir.path().join("daemon.log"));
    notes.wait_for("READY=1", |l| l == "READY=1").await;
    let resolve = || {
        let (status, body) = unix_get(&lookup, "/v1/resolve?path=a.mp4");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        (status, json)
    };
    let index_entries = || {
        let (_, text) = unix_get(&lookup, "/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix("record_offload_lookup_index_entries "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no index gauge in\n{text}"))
    };

    let first = bytes(4000, 1);
    env.write("a.mp4", &first);
    env.wait_state("a.mp4", State::Deleted, T).await;
    // Learnt by the first look-up; the gauge is brought up to date when the next look-up's
    // snapshot begins.
    wait_until("the index holds the stored file", T, || {
        let (status, json) = resolve();
        assert_eq!(
            (status, json["md5"].as_str()),
            (200, Some(md5_hex(&first).as_str()))
        );
        std::thread::sleep(Duration::from_millis(30));
        index_entries() == 1
    })
    .await;

    // Recorded again while the store is down: the row stays out of the stored state.
    proxy.set(common::proxy::Fault::Down);
    let second = bytes(5000, 2);
    env.write("a.mp4", &second);
    wait_until("the journal re-queued a.mp4", T, || {
        env.state("a.mp4").is_some_and(|s| !s.is_stored())
    })
    .await;
    // Look-ups share a snapshot for at most 10 ms.
    tokio::time::sleep(Duration::from_millis(30)).await;
    let (status, json) = resolve();
    assert_eq!(
        (status, json["state"].as_str()),
        (200, Some("pending")),
        "{json}"
    );
    assert_eq!(json["size"], 5000);
    assert_eq!(index_entries(), 0);

    proxy.set(common::proxy::Fault::None);
    env.wait_state("a.mp4", State::Deleted, T).await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    let (status, json) = resolve();
    assert_eq!(
        (status, json["md5"].as_str()),
        (200, Some(md5_hex(&second).as_str()))
    );
    assert!(terminate(&mut child).success());
}

/// Unmounts a tmpfs mounted by a test, also when the test fails.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The disk forecast on a real, small file system (a tmpfs as the watch root): while files
/// fill it the daemon forecasts it full within `watch.disk_warn_secs` — the metric is finite,
/// `/healthz` answers 200 "degraded" with the reason, `STATUS=` leads with the warning — and
/// once the space is freed again the warning clears. Skipped (with the reason printed) where
/// mounting is not permitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filling_disk_is_forecast_and_reported() {
    let env = Env::new().await;
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
        .arg(&env.root)
        .stderr(Stdio::piped())
        .output();
    match mounted {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            eprintln!(
                "SKIPPED: cannot mount a tmpfs: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return;
        }
        Err(e) => {
            eprintln!("SKIPPED: cannot run mount: {e}");
            return;
        }
    }
    let _tmpfs = Tmpfs(env.root.clone());
    let lookup = env.dir.path().join("lookup.sock");
    let cfg = write_config(&env, |c| {
        // Nothing here is a recording: the files only take space.
        c.watch.include = vec!["**/*.mp4".to_string()];
        c.watch.disk_warn_secs = 3600.0;
        // A forecast once 2 s of samples exist (a third of the window), not 5 min.
        c.watch.disk_window_secs = 6.0;
        c.lookup.listen = vec![format!("unix:{}", lookup.display())];
    });
    let sock = env.dir.path().join("notify.sock");
    let notes = Notes::listen(&sock);
    let mut child = spawn(&cfg, &sock, &[], &env.dir.path().join("daemon.log"));
    notes.wait_for("READY=1", |l| l == "READY=1").await;
    let full_in = || {
        let (_, text) = unix_get(&lookup, "/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix("record_offload_disk_full_in_seconds "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no disk forecast gauge in\n{text}"))
    };
    let (status, body) = unix_get(&lookup, "/healthz");
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));

    // Fill the disk at about 5 MB/s until the daemon warns.
    let chunk = vec![7u8; 256 * 1024];
    let start = Instant::now();
    let mut i = 0;
    let degraded = loop {
        let _ = std::fs::write(env.root.join(format!("fill-{i}.dat")), &chunk);
        i += 1;
        let (status, body) = unix_get(&lookup, "/healthz");
        if body.contains("degraded") {
            break (status, body);
        }
        assert!(
            start.elapsed() < T,
            "no disk warning; last /healthz: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(degraded.0, 200, "{}", degraded.1);
    assert!(degraded.1.contains("disk full in"), "{}", degraded.1);
    let secs = full_in();
    assert!(secs.is_finite() && secs < 3600.0, "forecast {secs}");
    notes
        .wait_for("STATUS= with the disk warning", |l| {
            l.starts_with("STATUS=DISK FULL IN ")
        })
        .await;
    // `status` shows the running daemon's forecast beside the free space, in text and JSON.
    let out = common::cli(&cfg).arg("status").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("disk: "))
        .unwrap_or_else(|| panic!("no disk line in\n{text}"));
    assert!(
        line.contains(" free of 64") && line.contains("; full in ") && line.contains("WARNING"),
        "{line}"
    );
    let out = common::cli(&cfg)
        .args(["status", "--json"])
        .output()
        .unwrap();
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let f = &j["disk"]["forecast"];
    assert_eq!(f["warning"], true, "{j}");
    assert!(f["full_in_secs"].as_f64().unwrap() < 3600.0, "{j}");
    assert!(f["fill_rate_bytes_per_sec"].as_f64().unwrap() > 0.0, "{j}");
    assert!(j["disk"]["size_bytes"].as_u64().unwrap() <= 64 << 20, "{j}");

    // Freed again: the fill rate over the window is no longer positive.
    for j in 0..i {
        let _ = std::fs::remove_file(env.root.join(format!("fill-{j}.dat")));
    }
    wait_until("the disk warning clears", T, || {
        let (status, body) = unix_get(&lookup, "/healthz");
        status == 200 && body == r#"{"status":"ok"}"#
    })
    .await;
    assert!(full_in().is_infinite());
    assert!(terminate(&mut child).success());
    // The daemon's last report stays beside the journal (`status` ignores it once stale).
    let report = env.journal_path.with_file_name(format!(
        "{}.disk",
        env.journal_path.file_name().unwrap().to_string_lossy()
    ));
    assert!(report.exists(), "{}", report.display());
}
