//! The core pipeline end to end: real inotify on a temp directory, a real journal file, a real
//! S3-compatible server on 127.0.0.1 checking signatures.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::harness::*;
use common::proxy::{Fault, FaultProxy};
use record_offload::journal::State;

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_file_is_uploaded_checked_and_deleted() {
    let env = Env::new().await;
    let d = env.start(env.config(|_| {})).await;
    let data = bytes(1000, 1);
    let path = env.write("a.mp4", &data);
    let row = env.wait_state("a.mp4", State::Deleted, T).await;
    assert!(!path.exists());
    assert_eq!(env.get(&env.key("a.mp4")).await.unwrap(), data);
    assert_eq!(row.md5.as_deref(), Some(md5_hex(&data).as_str()));
    assert_eq!(row.size, 1000);
    assert_eq!(row.key, "node1/a.mp4");
    assert!(env.root.exists(), "the root is never removed");
    d.shutdown();
    d.wait().await;
}

/// A second daemon on the same journal is refused, saying which; once the first has stopped,
/// another may start and carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_daemon_per_journal() {
    let env = Env::new().await;
    let d = env.start(env.config(|_| {})).await;
    let err = match record_offload::daemon::Daemon::start(env.config(|_| {})).await {
        Ok(_) => panic!("a second daemon started on the same journal"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("already running") && err.contains(&env.journal_path.display().to_string()),
        "unclear error: {err}"
    );
    env.write("a.mp4", b"first");
    env.wait_state("a.mp4", State::Deleted, T).await;
    d.shutdown();
    d.wait().await;
    let d = env.start(env.config(|_| {})).await;
    env.write("b.mp4", b"second");
    env.wait_state("b.mp4", State::Deleted, T).await;
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_file_round_trips_exactly() {
    let env = Env::new().await;
    let d = env
        .start(env.config(|c| {
            c.upload.part_size_mib = 5;
            c.upload.concurrency = 3;
        }))
        .await;
    // 3 parts: 5 MiB, 5 MiB, 2.5 MiB.
    let data = bytes(25 * 1024 * 1024 / 2, 2);
    env.write("big/rec.mp4", &data);
    let row = env.wait_state("big/rec.mp4", State::Deleted, T).await;
    let got = env.get(&env.key("big/rec.mp4")).await.unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "stored bytes differ");
    assert_eq!(row.md5.as_deref(), Some(md5_hex(&data).as_str()));
    assert!(row.upload_id.is_none());
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_byte_file() {
    let env = Env::new().await;
    let d = env.start(env.config(|_| {})).await;
    env.write("empty.mp4", b"");
    let row = env.wait_state("empty.mp4", State::Deleted, T).await;
    assert_eq!(row.size, 0);
    assert_eq!(env.get(&env.key("empty.mp4")).await.unwrap(), b"");
    assert_eq!(row.md5.as_deref(), Some("d41d8cd98f00b204e9800998ecf8427e"));
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_names_keep_their_keys() {
    let env = Env::new().await;
    let d = env.start(env.config(|_| {})).await;
    let names = [
        "with space.mp4",
        "中文/录像 2026.mp4",
        "hash#tag.mp4",
        "what?.mp4",
        "100%.mp4",
        "a+b %.mp4",
        "quote'\"&=;.mp4",
    ];
    for (i, n) in names.iter().enumerate() {
        env.write(n, &bytes(100 + i, i as u64));
    }
    for (i, n) in names.iter().enumerate() {
        env.wait_state(n, State::Deleted, T).await;
        assert_eq!(
            env.get(&env.key(n)).await.unwrap(),
            bytes(100 + i, i as u64),
            "{n}"
        );
    }
    // A name that is not UTF-8: uploaded under an escaped key, found through the journal.
    let raw = OsStr::from_bytes(b"raw\xff\xfe.mp4");
    std::fs::write(env.root.join(raw), b"raw bytes").unwrap();
    let row = env.wait_state(Path::new(raw), State::Deleted, T).await;
    assert_eq!(row.key, "node1/raw%FF%FE.mp4");
    assert_eq!(env.get(&row.key).await.unwrap(), b"raw bytes");
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directories_created_after_start_are_watched() {
    let env = Env::new().await;
    let d = env.start(env.config(|_| {})).await;
    // Created and filled at once: files may exist before the watch on their directory does.
    // (A file created between notify reporting a directory and watching it is the case.)
    for i in 0..40 {
        for j in 0..3 {
            env.write(
                format!("2026/11/22/room{i}/rec{j}.mp4"),
                &bytes(500, i * 10 + j),
            );
        }
    }
    // A whole tree renamed in from outside the root.
    let outside = env.dir.path().join("staging/day");
    std::fs::create_dir_all(outside.join("x")).unwrap();
    std::fs::write(outside.join("x/moved.mp4"), b"moved in").unwrap();
    std::fs::rename(&outside, env.root.join("day")).unwrap();
    for i in 0..40 {
        for j in 0..3 {
            env.wait_state(format!("2026/11/22/room{i}/rec{j}.mp4"), State::Deleted, T)
                .await;
        }
    }
    env.wait_state("day/x/moved.mp4", State::Deleted, T).await;
    assert_eq!(
        env.get(&env.key("day/x/moved.mp4")).await.unwrap(),
        b"moved in"
    );
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excluded_and_symlinked_files_are_never_uploaded() {
    let env = Env::new().await;
    let d = env.start(env.config(|_| {})).await;
    let outside = env.dir.path().join("secret.txt");
    std::fs::write(&outside, b"not yours").unwrap();
    let skipped = [
        "rec.mp4.tmp",
        "d/rec.part",
        ".hidden.mp4",
        ".cache/inside.mp4",
        "d/.tmpdir/x.mp4",
    ];
    for s in skipped {
        env.write(s, b"skip me");
    }
    std::os::unix::fs::symlink(&outside, env.root.join("link.mp4")).unwrap();
    std::os::unix::fs::symlink(env.dir.path(), env.root.join("linkdir")).unwrap();
    env.write("d/real.mp4", b"real");
    env.wait_state("d/real.mp4", State::Deleted, T).await;
    // A rename of a temp file into its final name is what recorders do: that one is taken.
    env.write("final.mp4.tmp", b"finished");
    std::fs::rename(env.root.join("final.mp4.tmp"), env.root.join("final.mp4")).unwrap();
    env.wait_state("final.mp4", State::Deleted, T).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    for s in skipped {
        assert!(env.root.join(s).exists(), "{s} must stay");
        assert!(env.row(s).is_none(), "{s} must not be journaled");
    }
    assert!(env.row("link.mp4").is_none());
    assert!(env.root.join("link.mp4").exists());
    assert!(outside.exists());
    let keys: Vec<String> = env.rows().into_iter().map(|r| r.key).collect();
    assert_eq!(keys, vec!["node1/d/real.mp4", "node1/final.mp4"]);
    d.shutdown();
    d.wait().await;
}

/// A directory holding a settled file is swapped for a symlink to the outside while the file
/// waits for the store, and the outside has a file of the same name. Nothing outside the root is uploaded, journaled or deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_swapped_for_a_symlink_is_never_followed() {
    let env = Env::new().await;
    let proxy = FaultProxy::start(env.server.addr).await.unwrap();
    let d = env
        .start(env.config_at(&format!("http://{}", proxy.addr()), |c| {
            c.upload.request_timeout_secs = 10.0;
        }))
        .await;
    proxy.set(Fault::Down);
    let outside = env.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let secret = b"OUTSIDE-THE-ROOT: never upload or delete".to_vec();
    for name in ["x.mp4", "y.mp4"] {
        std::fs::write(outside.join(name), &secret).unwrap();
    }

    // A FIFO with a recording's name: never opened for reading (that would block), never taken.
    mkfifo(&env.root.join("pipe.mp4"));

    // 1. Settled and queued while the store is down; then the swap; then the store returns.
    env.write("q/x.mp4", b"inside q");
    wait_until("q/x.mp4 journaled", T, || {
        env.row("q/x.mp4")
            .is_some_and(|r| matches!(r.state, State::Queued | State::Uploading))
    })
    .await;
    std::fs::rename(env.root.join("q"), env.root.join("q.moved")).unwrap();
    std::os::unix::fs::symlink(&outside, env.root.join("q")).unwrap();

    proxy.set(Fault::None);

    // Both rows settle somewhere final; the renamed directories are new files of their own.
    wait_until("q/x.mp4 finished", T, || {
        env.row("q/x.mp4")
            .is_some_and(|r| !matches!(r.state, State::Queued | State::Uploading))
    })
    .await;
    env.wait_state("q.moved/x.mp4", State::Deleted, T).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Outside: untouched.
    for name in ["x.mp4", "y.mp4"] {
        assert_eq!(std::fs::read(outside.join(name)).unwrap(), secret, "{name}");
    }
    // In the bucket: only what was inside the root, never the outside bytes.
    if let Some(got) = env.get(&env.key("q/x.mp4")).await {
        assert_eq!(got, b"inside q");
    }
    assert_eq!(
        env.get(&env.key("q.moved/x.mp4")).await.as_deref(),
        Some(&b"inside q"[..])
    );
    // In the journal: nothing recorded the outside file's size or hash.
    for row in env.rows() {
        assert!(
            row.md5.as_deref() != Some(md5_hex(&secret).as_str()),
            "{row:?}"
        );
    }
    assert!(
        env.row("pipe.mp4")
            .is_none_or(|r| !matches!(r.state, State::Uploaded | State::Deleted)),
        "{:?}",
        env.row("pipe.mp4")
    );
    assert!(env.get(&env.key("pipe.mp4")).await.is_none());
    assert!(env.root.join("pipe.mp4").exists());
    // The symlinks are left as they are.
    assert!(
        std::fs::symlink_metadata(env.root.join("q"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    d.shutdown();
    d.wait().await;
}

fn mkfifo(path: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_written_in_rounds_is_uploaded_once_complete() {
    let env = Env::new().await;
    // Pauses far shorter than the settle time, so a slow test machine cannot make the file
    // look finished between rounds.
    let d = env.start(env.config(|c| c.watch.settle_secs = 2.0)).await;
    let path = env.root.join("rounds.mp4");
    let mut expect = Vec::new();
    for round in 0..5 {
        let chunk = bytes(64 * 1024, round);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(&chunk).unwrap();
        drop(f); // close_write
        expect.extend_from_slice(&chunk);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(env.row("rounds.mp4").is_none(), "taken before it settled");
    }
    let row = env.wait_state("rounds.mp4", State::Deleted, T).await;
    assert_eq!(env.get(&env.key("rounds.mp4")).await.unwrap(), expect);
    assert_eq!(row.generation, 0, "uploaded more than once");
    assert_eq!(d.uploader.stats.files_uploaded.load(Ordering::Relaxed), 1);
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_present_before_start_are_uploaded() {
    let env = Env::new().await;
    let old = env.write("old/a.mp4", b"recorded yesterday");
    age(&old, 86400);
    env.write("fresh.mp4", b"just closed");
    // A long settle time: the old file goes at once (its mtime is quiet already), the fresh
    // one only after settling.
    let d = env.start(env.config(|c| c.watch.settle_secs = 3.0)).await;
    env.wait_state("old/a.mp4", State::Deleted, Duration::from_secs(2))
        .await;
    assert!(env.row("fresh.mp4").is_none());
    env.wait_state("fresh.mp4", State::Deleted, T).await;
    assert_eq!(
        env.get(&env.key("old/a.mp4")).await.unwrap(),
        b"recorded yesterday"
    );
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_held_open_for_writing_waits_until_closed() {
    let env = Env::new().await;
    let d = env.start(env.config(|_| {})).await;
    let path = env.root.join("paused.mp4");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(b"first half ").unwrap();
    f.flush().unwrap();
    // A reader closing the file produces events too; the writer still holds it.
    drop(std::fs::File::open(&path).unwrap());
    // Quiet for much longer than settle_secs, but still open for writing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        env.row("paused.mp4").is_none(),
        "a file open for writing was taken"
    );
    f.write_all(b"second half").unwrap();
    drop(f);
    env.wait_state("paused.mp4", State::Deleted, T).await;
    assert_eq!(
        env.get(&env.key("paused.mp4")).await.unwrap(),
        b"first half second half"
    );
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_error_fails_and_retry_requeues() {
    let env = Env::new().await;
    // The server checks signatures: a wrong secret is refused, and that is not retryable.
    let d = env
        .start(env.config(|c| c.storage.access_key_secret = "wrong-secret".to_string()))
        .await;
    env.write("r.mp4", b"wait for the right key");
    let row = env.wait_state("r.mp4", State::Failed, T).await;
    let err = row.last_error.clone().unwrap_or_default();
    assert!(err.contains("HTTP 403"), "{err}");
    assert!(
        env.root.join("r.mp4").exists(),
        "nothing is deleted on failure"
    );
    // Stays failed: no automatic retry before upload.failed_retry_secs.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(env.state("r.mp4"), Some(State::Failed));
    d.shutdown();
    d.wait().await;

    // The operator fixes the secret and restarts: the row stays failed until `retry`.
    let d = env.start(env.config(|_| {})).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(env.state("r.mp4"), Some(State::Failed));
    let cfg_file = env.dir.path().join("config.toml");
    std::fs::write(
        &cfg_file,
        format!(
            // The daemon's node name: `retry` renders keys the way the daemon does.
            "[node]\nname = {NODE:?}\n[watch]\nroot = {:?}\n[journal]\npath = {:?}\n[storage]\nbucket = \"rec\"\naccess_key_id = \"x\"\naccess_key_secret = \"y\"\n",
            env.root.display().to_string(),
            env.journal_path.display().to_string()
        ),
    )
    .unwrap();
    // `record-offload retry --failed` while the daemon runs.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_record-offload"))
        .args(["retry", "--failed", "--config"])
        .arg(&cfg_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("re-queued 1"));
    env.wait_state("r.mp4", State::Deleted, T).await;
    assert_eq!(
        env.get(&env.key("r.mp4")).await.unwrap(),
        b"wait for the right key"
    );
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_local_copy_when_configured() {
    let env = Env::new().await;
    let d = env
        .start(env.config(|c| {
            c.upload.delete_after_upload = false;
            c.watch.rescan_interval_secs = 0.3;
        }))
        .await;
    env.write("keep.mp4", b"keep me");
    env.wait_state("keep.mp4", State::Uploaded, T).await;
    // Several rescans later: still there, still uploaded once.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(env.root.join("keep.mp4").exists());
    assert_eq!(env.state("keep.mp4"), Some(State::Uploaded));
    assert_eq!(d.uploader.stats.files_uploaded.load(Ordering::Relaxed), 1);
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emptied_directories_are_pruned_after_idle_time_but_others_stay() {
    let env = Env::new().await;
    std::fs::create_dir_all(env.root.join("prepared/for/tomorrow")).unwrap();
    let d = env
        .start(env.config(|c| {
            c.watch.prune_after_secs = 1.0;
            c.watch.rescan_interval_secs = 0.5;
        }))
        .await;
    env.write("2026/11/22/a.mp4", b"a");
    env.wait_state("2026/11/22/a.mp4", State::Deleted, T).await;
    // Not before prune_after_secs.
    assert!(env.root.join("2026/11/22").exists());
    wait_until("dated directories pruned", T, || {
        !env.root.join("2026").exists()
    })
    .await;
    assert!(env.root.exists());
    // Never held a file we deleted: left alone.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(env.root.join("prepared/for/tomorrow").exists());
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_file_at_a_stored_path_is_uploaded_again() {
    let env = Env::new().await;
    let d = env.start(env.config(|_| {})).await;
    env.write("same.mp4", b"version one");
    let first = env.wait_state("same.mp4", State::Deleted, T).await;
    env.write("same.mp4", b"version two, longer");
    wait_until("second upload", T, || {
        env.row("same.mp4")
            .is_some_and(|r| r.state == State::Deleted && r.generation > first.generation)
    })
    .await;
    assert_eq!(
        env.get(&env.key("same.mp4")).await.unwrap(),
        b"version two, longer"
    );
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_returns_promptly_and_restart_carries_on() {
    let env = Env::new().await;
    let settings = env.config(|c| c.watch.settle_secs = 0.2);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(record_offload::daemon::run(settings, async {
        let _ = rx.await;
    }));
    env.write("one.mp4", b"1");
    env.wait_state("one.mp4", State::Deleted, T).await;
    let _ = tx.send(());
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("shutdown took too long")
        .unwrap()
        .unwrap();
    // Written while the daemon was down.
    env.write("two.mp4", b"2");
    let d = env.start(env.config(|c| c.watch.settle_secs = 0.2)).await;
    env.wait_state("two.mp4", State::Deleted, T).await;
    assert_eq!(env.state("one.mp4"), Some(State::Deleted));
    d.shutdown();
    d.wait().await;
}

/// Multipart uploads under this node's prefix that the journal does not know (a crash between
/// creating one and recording it) are aborted at start, even when the daemon is told to stop
/// at once; another node's are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_uploads_are_aborted_even_when_stopped_at_once() {
    let env = Env::new().await;
    let store = record_offload::store::Store::new(&env.config(|_| {}));
    let ours = store
        .create_multipart(
            &env.key("lost/stray.mp4"),
            std::path::Path::new("lost/stray.mp4"),
            &[],
        )
        .await
        .unwrap();
    let theirs = store
        .create_multipart(
            "other-node/stray.mp4",
            std::path::Path::new("stray.mp4"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(env.server.open_uploads().len(), 2);
    let d = env.start(env.config(|_| {})).await;
    d.shutdown();
    d.wait().await;
    let open: Vec<String> = env
        .server
        .open_uploads()
        .into_iter()
        .map(|(_, _, id)| id)
        .collect();
    assert_eq!(open, vec![theirs], "ours was {ours}");
}

/// A start that fails after the deleter began (here: recovery cannot read a damaged row)
/// stops and awaits every stage before it returns: nothing it started goes on afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_leaves_nothing_running() {
    use record_offload::journal;
    use record_offload::util::fs::Identity;
    let env = Env::new().await;
    // A stored file whose local copy is still there: recovery hands it to the deleter.
    let path = env.write("stored.mp4", b"already in the bucket");
    let identity = Identity::from_metadata(&std::fs::metadata(&path).unwrap());
    let conn = journal::open_rw(&env.journal_path).unwrap();
    journal::intake(
        &conn,
        Path::new("stored.mp4"),
        &env.key("stored.mp4"),
        &identity,
        true,
    )
    .unwrap();
    let row = journal::get_by_path(&conn, Path::new("stored.mp4"))
        .unwrap()
        .unwrap();
    journal::set_uploaded(&conn, row.id, row.generation, &identity, "md5", None).unwrap();
    // A settling row whose path is text, not bytes: recovery's read of settling rows fails.
    conn.execute(
        "INSERT INTO files (path, key, state, discovered_ms, updated_ms)
         VALUES ('damaged', 'k', 'settling', 0, 0)",
        [],
    )
    .unwrap();
    drop(conn);

    let started = record_offload::daemon::Daemon::start(env.config(|_| {})).await;
    assert!(started.is_err(), "the start did not fail");
    let seen = (path.exists(), env.state("stored.mp4"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        (path.exists(), env.state("stored.mp4")),
        seen,
        "a stage went on after the failed start"
    );
}

/// A file whose key the template cannot render (too long) is recorded failed, without a key;
/// under a template that renders it, its next attempt gives it the new key and stores it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_without_a_key_is_stored_once_the_template_renders_it() {
    let env = Env::new().await;
    let long_prefix = "x".repeat(1000);
    let d = env
        .start(env.config(|c| {
            c.storage.key_template = format!("{{node}}/{long_prefix}/{{path}}");
            c.upload.failed_retry_secs = 1.0;
        }))
        .await;
    let name = "a-name-too-long-for-that-template.mp4";
    env.write(name, b"keep me until I have a key");
    let row = env.wait_state(name, State::Failed, T).await;
    assert_eq!(row.key, "");
    d.shutdown();
    d.wait().await;

    let d = env
        .start(env.config(|c| c.upload.failed_retry_secs = 1.0))
        .await;
    let row = env.wait_state(name, State::Deleted, T).await;
    assert_eq!(row.key, env.key(name));
    assert_eq!(
        env.get(&env.key(name)).await.unwrap(),
        b"keep me until I have a key"
    );
    d.shutdown();
    d.wait().await;
}
