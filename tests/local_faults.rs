//! Local faults: the journal on a full file system, a read-only journal, a corrupt journal,
//! the watch root removed and created again, a file deleted or truncated by someone else
//! while it is uploaded, a file the daemon may not read. Each gives a clear error, the daemon
//! keeps doing what it can, nothing is deleted on doubt, and a damaged journal is never
//! replaced.
//!
//! The tests that mount a small tmpfs need root (CI runs as root); run as another user they
//! fail with a message that says so, never pass silently.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::harness::*;
use common::proxy::{Fault, FaultProxy};
use record_offload::journal::{self, State};

const T: Duration = Duration::from_secs(60);

fn require_root(test: &str) {
    if !rustix::process::geteuid().is_root() {
        panic!("{test} mounts a tmpfs and needs root: run the tests as root (CI does)");
    }
}

/// A small tmpfs, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }

    /// Remounts with `opts`, waiting (up to 10 s) for files still open for writing to close:
    /// a stopped daemon's last journal connections close a moment after it returns.
    fn remount(&self, opts: &str) {
        let start = Instant::now();
        loop {
            let out = Command::new("mount")
                .args(["-o", &format!("remount,{opts}")])
                .arg(&self.0)
                .output()
                .unwrap();
            if out.status.success() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "remount {opts}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A config file for the real binary.
fn write_config(env: &Env, endpoint: &str) -> PathBuf {
    env.config_file_at(endpoint, |c| {
        c.watch.settle_secs = 0.1;
        c.upload.drain_secs = 1.0;
    })
}

fn cli(cfg: &Path, args: &[&str]) -> std::process::Output {
    common::cli(cfg)
        .args(args)
        .env("RUST_LOG", "record_offload=info")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The HTTP look-up answer for `rel` from a running daemon.
async fn resolve(d: &record_offload::daemon::Daemon, rel: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = match &d.lookup_addrs[0] {
        record_offload::config::ListenAddr::Tcp(a) => *a,
        other => panic!("not tcp: {other:?}"),
    };
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET /v1/resolve?path={rel} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap();
    (status, out)
}

/// Every file in `files` is either still on disk unchanged, or stored byte-identical.
fn assert_nothing_deleted_unstored(env: &Env, files: &[(String, Vec<u8>)]) {
    for (rel, data) in files {
        match std::fs::read(env.root.join(rel)) {
            Ok(on_disk) => assert!(on_disk == *data, "{rel} changed"),
            Err(_) => {
                let stored = std::fs::read(env.server.object_path(BUCKET, &env.key(rel)))
                    .unwrap_or_else(|_| panic!("{rel} deleted but not stored"));
                assert!(stored == *data, "{rel} deleted but its object differs");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_root_removed_and_created_again() {
    let env = Env::new().await;
    let d = env.start(env.config(|_| {})).await;
    env.write("before.mp4", b"before");
    env.wait_state("before.mp4", State::Deleted, T).await;

    // An operator (or a recorder's clean-up) removes the whole root and makes it again.
    std::fs::remove_dir_all(&env.root).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    std::fs::create_dir(&env.root).unwrap();
    env.write("after.mp4", b"after, in the root");
    env.write("day/after.mp4", b"after, in a new directory");
    // The periodic rescan is 10 minutes away: the new root must be watched again.
    let row = env.wait_state("after.mp4", State::Deleted, T).await;
    assert_eq!(row.size, 18);
    env.wait_state("day/after.mp4", State::Deleted, T).await;
    assert_eq!(
        env.get(&env.key("day/after.mp4")).await.unwrap(),
        b"after, in a new directory"
    );
    // Files written later are seen by inotify as before.
    env.write("day/later.mp4", b"later");
    env.wait_state("day/later.mp4", State::Deleted, T).await;
    assert!(env.root.exists(), "the root itself is never removed");
    // The look-up of the first file still answers from the journal.
    let (status, body) = resolve(&d, "before.mp4").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"uploaded\""), "{body}");
    d.shutdown();
    d.wait().await;
}

/// A big file under a throttled store, with its upload under way.
async fn upload_under_way(
    env: &Env,
    proxy: &FaultProxy,
) -> (record_offload::daemon::Daemon, PathBuf) {
    proxy.set(Fault::Throttle {
        bytes_per_sec: 3 * 1024 * 1024,
    });
    let d = env
        .start(env.config_at(&format!("http://{}", proxy.addr()), |c| {
            c.upload.part_size_mib = 5;
            c.upload.concurrency = 2;
        }))
        .await;
    let path = env.write("big.mp4", &bytes(16 * 1024 * 1024, 1));
    wait_until("upload under way", T, || {
        env.row("big.mp4")
            .is_some_and(|r| r.state == State::Uploading && r.bytes_sent > 0)
    })
    .await;
    (d, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_deleted_by_someone_else_mid_upload() {
    let env = Env::new().await;
    let proxy = FaultProxy::start(env.server.addr).await.unwrap();
    let (d, path) = upload_under_way(&env, &proxy).await;
    std::fs::remove_file(&path).unwrap();
    let row = env.wait_state("big.mp4", State::Vanished, T).await;
    assert!(row.upload_id.is_none(), "{row:?}");
    // No half object, no multipart upload left open.
    wait_until("the multipart upload is aborted", T, || {
        env.server.open_uploads().is_empty()
    })
    .await;
    // The upload reads through the descriptor it holds, so it may have finished with the
    // file's whole content; a partial object never appears.
    if let Some(got) = env.get(&env.key("big.mp4")).await {
        assert!(
            got == bytes(16 * 1024 * 1024, 1),
            "a partial object was stored"
        );
    }
    // The daemon carries on with other files.
    proxy.set(Fault::None);
    env.write("next.mp4", b"next");
    env.wait_state("next.mp4", State::Deleted, T).await;
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_truncated_by_someone_else_mid_upload() {
    let env = Env::new().await;
    let proxy = FaultProxy::start(env.server.addr).await.unwrap();
    let (d, path) = upload_under_way(&env, &proxy).await;
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(1024 * 1024).unwrap();
    drop(f);
    let want = bytes(16 * 1024 * 1024, 1)[..1024 * 1024].to_vec();
    // Until the truncated file is stored, it stays on disk.
    let start = Instant::now();
    loop {
        let row = env.row("big.mp4").unwrap();
        if row.state == State::Deleted {
            break;
        }
        if !path.exists() {
            let row = env.row("big.mp4").unwrap();
            assert!(
                matches!(row.state, State::Uploaded | State::Deleted) && row.size == 1024 * 1024,
                "deleted before the truncated file was stored: {row:?}"
            );
        }
        assert!(start.elapsed() < T, "not stored in time: {row:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let row = env.row("big.mp4").unwrap();
    assert!(row.generation >= 1, "the truncation was not noticed");
    assert_eq!(row.md5.as_deref(), Some(md5_hex(&want).as_str()));
    assert!(env.get(&env.key("big.mp4")).await.unwrap() == want);
    assert!(env.server.open_uploads().is_empty());
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_journal_is_refused_and_never_replaced() {
    let env = Env::new().await;
    // A real journal with a stored file in it.
    let d = env.start(env.config(|_| {})).await;
    for i in 0..50 {
        env.write(format!("d/f{i}.mp4"), format!("file {i}").as_bytes());
    }
    env.wait_state("d/f49.mp4", State::Deleted, T).await;
    d.shutdown();
    d.wait().await;
    let cfg = write_config(&env, &env.server.endpoint());
    env.write("waiting.mp4", b"must stay");
    // Everything into the main file, no WAL left beside it.
    let conn = journal::open_rw(&env.journal_path).unwrap();
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .unwrap();
    drop(conn);

    let mut journal = std::fs::read(&env.journal_path).unwrap();
    assert!(
        journal.len() >= 3 * 4096,
        "journal of {} bytes",
        journal.len()
    );
    // A damaged page (a bad disk block), then a file that is not a database at all.
    for (i, b) in journal[4096..8192].iter_mut().enumerate() {
        *b = (i * 7) as u8;
    }
    let damaged = journal.clone();
    let garbage = bytes(journal.len(), 9);
    for (what, content) in [("a damaged page", damaged), ("garbage", garbage)] {
        std::fs::write(&env.journal_path, &content).unwrap();
        let out = cli(&cfg, &["run"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{what}: the daemon started: {stderr}"
        );
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "{what}: not one line: {stderr}"
        );
        let last = stderr.lines().last().unwrap_or("");
        assert!(
            last.contains(&env.journal_path.display().to_string())
                && (last.contains("malformed")
                    || last.contains("integrity")
                    || last.contains("not a database")),
            "{what}: unclear error: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            std::fs::read(&env.journal_path).unwrap() == content,
            "{what}: the journal was modified"
        );
        let status = cli(&cfg, &["status"]);
        assert!(
            !status.status.success(),
            "{what}: status read a damaged journal"
        );
        assert!(
            std::fs::read(&env.journal_path).unwrap() == content,
            "{what}: status modified the journal"
        );
        assert_eq!(
            std::fs::read(env.root.join("waiting.mp4")).unwrap(),
            b"must stay"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_journal() {
    require_root("read_only_journal");
    let env = Env::new().await;
    let fs = Tmpfs::mount(env.journal_path.parent().unwrap(), "16m");
    let d = env.start(env.config(|_| {})).await;
    env.write("stored.mp4", b"stored");
    env.wait_state("stored.mp4", State::Deleted, T).await;
    d.shutdown();
    d.wait().await;
    fs.remount("ro");
    let before = std::fs::read(&env.journal_path).unwrap();
    env.write("waiting.mp4", b"must stay");

    // The daemon refuses to start, saying why.
    let cfg = write_config(&env, &env.server.endpoint());
    let out = cli(&cfg, &["run"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started on a read-only journal: {stderr}"
    );
    let last = stderr.lines().last().unwrap_or("");
    assert!(
        last.contains(&env.journal_path.display().to_string())
            && (last.to_lowercase().contains("read-only")
                || last.to_lowercase().contains("readonly")),
        "unclear error: {stderr}"
    );
    // Commands that only read answer, or refuse with one clear line; none writes.
    for args in [
        &["resolve", "/record/stored.mp4", "--json"][..],
        &["status", "--json"][..],
    ] {
        let out = cli(&cfg, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            assert!(String::from_utf8_lossy(&out.stdout).contains('{'));
        } else {
            assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
            assert!(
                stderr.contains("Read-only file system"),
                "{args:?}: {stderr}"
            );
        }
    }
    assert_eq!(
        std::fs::read(env.root.join("waiting.mp4")).unwrap(),
        b"must stay"
    );
    fs.remount("rw");
    assert!(std::fs::read(&env.journal_path).unwrap() == before);
    drop(fs);
}

// The journal's disk fills up while files arrive: nothing is deleted on doubt (the files stay
// on disk), look-ups keep answering, and once space comes back everything is stored. The
// file system is 8 MiB: SQLite checkpoints its WAL into the database only when the WAL
// reaches 1000 pages (4 MiB), so on a smaller one (1 MiB was tried) the WAL alone refills
// the disk after space comes back and the journal can never commit again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_on_a_full_file_system() {
    require_root("journal_on_a_full_file_system");
    let env = Env::new().await;
    let state = env.journal_path.parent().unwrap().to_path_buf();
    let _fs = Tmpfs::mount(&state, "8m");
    // Rescans bring back what could not be recorded while the disk was full.
    let d = env
        .start(env.config(|c| c.watch.rescan_interval_secs = 2.0))
        .await;
    env.write("stored.mp4", b"stored before");
    env.wait_state("stored.mp4", State::Deleted, T).await;

    // Fill the file system.
    let filler = state.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    let mut files = Vec::new();
    for i in 0..300 {
        let rel = format!("full/f{i:03}.mp4");
        let data = format!("recorded while the journal's disk is full, {i}").into_bytes();
        env.write(&rel, &data);
        files.push((rel, data));
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        assert_nothing_deleted_unstored(&env, &files);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stuck = files
        .iter()
        .filter(|(rel, _)| env.root.join(rel).exists())
        .count();
    assert!(stuck > 0, "the journal never ran out of space");
    // Look-ups keep answering from the journal.
    let (status, body) = resolve(&d, "stored.mp4").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"uploaded\""), "{body}");

    // Space comes back: everything is stored, nothing twice.
    std::fs::remove_file(&filler).unwrap();
    let start = Instant::now();
    while files.iter().any(|(rel, _)| env.root.join(rel).exists()) {
        assert_nothing_deleted_unstored(&env, &files);
        assert!(
            start.elapsed() < T,
            "not stored after space came back: {:?}",
            files
                .iter()
                .filter(|(rel, _)| env.root.join(rel).exists())
                .map(|(rel, _)| (rel, env.row(rel)))
                .take(3)
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_nothing_deleted_unstored(&env, &files);
    for (rel, data) in &files {
        let row = env.wait_state(rel, State::Deleted, T).await;
        assert_eq!(row.md5.as_deref(), Some(md5_hex(data).as_str()));
    }
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_denied_on_a_file() {
    require_root("permission_denied_on_a_file");
    use std::os::unix::fs::{PermissionsExt, chown};
    let env = Env::new().await;
    // The daemon runs as nobody; root would ignore the file's mode.
    const NOBODY: u32 = 65534;
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    chown(&env.root, Some(NOBODY), Some(NOBODY)).unwrap();
    let state = env.journal_path.parent().unwrap();
    std::fs::create_dir_all(state).unwrap();
    chown(state, Some(NOBODY), Some(NOBODY)).unwrap();
    let cfg = write_config(&env, &env.server.endpoint());
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();

    let secret = env.write("secret.mp4", b"not for the daemon");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    env.write("open.mp4", b"readable");
    let log = env.dir.path().join("daemon.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_record-offload"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "record_offload=info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .uid(NOBODY)
        .gid(NOBODY)
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = Kill(&mut child);

    env.wait_state("open.mp4", State::Deleted, T).await;
    let row = env.wait_state("secret.mp4", State::Failed, T).await;
    let err = row.last_error.unwrap();
    assert!(err.contains("ermission denied"), "unclear error: {err}");
    assert_eq!(std::fs::read(&secret).unwrap(), b"not for the daemon");
    // `status` shows it.
    let out = cli(&cfg, &["status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("ermission denied"));

    // Fixed by the operator, retried: stored.
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let conn = journal::open_rw(&env.journal_path).unwrap();
    let key_of = |rel: &std::path::Path| Ok(env.key(&rel.to_string_lossy()));
    assert_eq!(
        journal::requeue_failed(&conn, Some(row.id), &key_of)
            .unwrap()
            .queued,
        1
    );
    drop(conn);
    env.wait_state("secret.mp4", State::Deleted, T).await;
    assert_eq!(
        env.get(&env.key("secret.mp4")).await.unwrap(),
        b"not for the daemon"
    );
    drop(child);
}
