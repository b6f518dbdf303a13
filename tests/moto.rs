//! The same guarantees against a second, independent S3 implementation: moto's server (PyPI
//! `moto[server]`, see `common::moto` for how it is found or installed), spawned on 127.0.0.1
//! by each test. moto answers some calls differently from the in-process server (ListParts
//! with a `<ListPartsResponse>` root the SDK cannot read, its own ETags and listings), so
//! these tests show the daemon does not depend on one server's habits: the pipeline, resume
//! after SIGKILL with parts in flight, and the start-up abort of stray multipart uploads.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::harness::*;
use common::moto::MotoServer;
use common::proxy::{Fault, FaultProxy};
use record_offload::journal::{self, FileRow, State};

const MIB: usize = 1024 * 1024;

/// Rows in `failed` are a test failure at once: with the daemon's quick retries nothing the
/// store says in these tests is a permanent refusal.
fn fail_fast(env: &Env, log: Option<&Path>) {
    if !env.journal_path.exists() {
        return;
    }
    let failed: Vec<FileRow> = env
        .rows()
        .into_iter()
        .filter(|r| r.state == State::Failed)
        .collect();
    if !failed.is_empty() {
        let errors: Vec<String> = failed
            .iter()
            .map(|r| format!("{}: {:?}", r.path.display(), r.last_error))
            .collect();
        panic!(
            "files in `failed` against moto:\n{}\n{}",
            errors.join("\n"),
            log.map(log_excerpt).unwrap_or_default()
        );
    }
}

/// The daemon log's warnings and errors (and starts), last 40.
fn log_excerpt(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.contains("WARN") || l.contains("ERROR") || l.contains("started") || l.contains("fail")
        })
        .collect();
    format!(
        "daemon log (warnings, errors, starts):\n{}",
        lines[lines.len().saturating_sub(40)..].join("\n")
    )
}

/// Waits until every file is `deleted` and gone from disk; fails fast on `failed`.
async fn wait_all_deleted(env: &Env, rels: &[&str], timeout: Duration, log: Option<&Path>) {
    let start = Instant::now();
    loop {
        fail_fast(env, log);
        let done = rels
            .iter()
            .all(|r| !env.root.join(r).exists() && env.state(r) == Some(State::Deleted));
        if done {
            return;
        }
        if start.elapsed() > timeout {
            let rows: Vec<_> = rels.iter().map(|r| env.row(r)).collect();
            panic!(
                "not all deleted within {timeout:?}; rows: {rows:#?}\n{}",
                log.map(log_excerpt).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Each file is stored byte for byte under its key, deleted locally, `deleted` in the journal
/// with its MD5.
async fn check_stored(env: &Env, moto: &MotoServer, files: &[(&str, Vec<u8>)]) {
    for (rel, data) in files {
        let key = env.key(rel);
        let row = env.row(rel).unwrap();
        assert_eq!(row.state, State::Deleted, "{rel}: {row:?}");
        assert_eq!(row.key, key, "{rel}");
        assert_eq!(row.md5.as_deref(), Some(md5_hex(data).as_str()), "{rel}");
        assert_eq!(row.size, data.len() as u64, "{rel}");
        assert!(!env.root.join(rel).exists(), "{rel} still on disk");
        let Some(head) = moto.head(&key).await else {
            panic!("{key} not on moto; objects: {:?}", moto.keys().await);
        };
        assert_eq!(head.size, data.len() as u64, "{key}");
        let stored = moto.get(&key).await.unwrap();
        assert!(
            stored == *data,
            "{key}: stored {} bytes differ from the file's {}",
            stored.len(),
            data.len()
        );
    }
}

/// Small single-part and multipart files, one under a key with spaces, non-ASCII, `+` and
/// `%`, go up to moto byte for byte and are deleted locally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_against_moto() {
    let env = Env::new().await;
    let moto = MotoServer::start().await;
    let d = env
        .start(env.config_at(&moto.endpoint(), |c| {
            c.upload.part_size_mib = 5;
        }))
        .await;
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("small.mp4", bytes(1024, 1)),
        ("day/three.mp4", bytes(3 * MIB, 2)),
        ("day/twelve.mp4", bytes(12 * MIB, 3)),
        ("odd dir/录像 a+b 100%.mp4", bytes(6 * MIB + 7, 4)),
        ("odd dir/+plus %20 ü.ts", bytes(1500, 5)),
    ];
    for (rel, data) in &files {
        env.write(rel, data);
    }
    let rels: Vec<&str> = files.iter().map(|(r, _)| *r).collect();
    wait_all_deleted(&env, &rels, Duration::from_secs(40), None).await;
    check_stored(&env, &moto, &files).await;
    d.shutdown();
    d.wait().await;
    let mut want: Vec<String> = rels.iter().map(|r| env.key(r)).collect();
    want.sort();
    assert_eq!(moto.keys().await, want, "objects on moto");
    assert_eq!(moto.open_uploads().await, vec![], "open multipart uploads");
}

/// Multipart uploads under this node's prefix that the journal does not know are aborted at
/// start (even when the daemon is told to stop at once); another node's are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_uploads_are_aborted_at_start_on_moto() {
    let env = Env::new().await;
    let moto = MotoServer::start().await;
    let ours = moto.create_multipart(&env.key("stray.mp4")).await;
    let theirs = moto.create_multipart("other/x.mp4").await;
    assert_eq!(moto.open_uploads().await.len(), 2);
    let d = env.start(env.config_at(&moto.endpoint(), |_| {})).await;
    d.shutdown();
    d.wait().await;
    assert_eq!(
        moto.open_uploads().await,
        vec![("other/x.mp4".to_string(), theirs)],
        "ours ({ours}) must be aborted, the other node's kept"
    );
}

const PART_MIB: u64 = 5;
const CONCURRENCY: u64 = 3;
const KILLS: usize = 3;

/// The daemon child; killed if the test ends early, so a failure leaves no process behind.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cfg: &Path, log: &Path) -> Daemon {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_record-offload"))
        .args(["run", "--config"])
        .arg(cfg)
        .env("RUST_LOG", "record_offload=info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map(Daemon)
        .unwrap()
}

/// The parts the journal has committed, as (file id, upload id, part number).
fn committed_parts(env: &Env) -> BTreeSet<(i64, String, i64)> {
    if !env.journal_path.exists() {
        return BTreeSet::new();
    }
    let Ok(conn) = journal::open_ro(&env.journal_path) else {
        return BTreeSet::new();
    };
    let Ok(mut stmt) = conn.prepare("SELECT file_id, upload_id, part_number FROM parts") else {
        return BTreeSet::new();
    };
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
}

/// The real binary, throttled through the fault proxy so parts are on the wire, is killed
/// with SIGKILL three times just after the journal committed new parts (others in flight),
/// and restarted: every file ends stored byte for byte and deleted, none `failed`, no
/// multipart upload open on moto, and each kill cost at most the parts in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_sigkill_with_parts_in_flight_on_moto() {
    let started = Instant::now();
    let env = Env::new().await;
    let moto = MotoServer::start().await;
    let proxy = FaultProxy::start(moto.addr()).await.unwrap();
    // 5 MiB parts take ~1.25 s each on the wire: a kill finds parts half sent.
    proxy.set(Fault::Throttle {
        bytes_per_sec: 4 * MIB as u64,
    });
    let cfg = env.config_file_at(&format!("http://{}", proxy.addr()), |c| {
        c.watch.settle_secs = 0.1;
        c.upload.part_size_mib = PART_MIB;
        c.upload.concurrency = CONCURRENCY as usize;
        c.upload.request_timeout_secs = 60.0;
        c.upload.drain_secs = 1.0;
    });
    let log = env.dir.path().join("daemon.log");
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("cam1/a.mp4", bytes(24 * MIB, 11)),
        ("cam2/b.mp4", bytes(24 * MIB, 12)),
        ("cam3/c.mp4", bytes(24 * MIB + 12345, 13)),
    ];
    for (rel, data) in &files {
        let p = env.write(rel, data);
        age(&p, 60);
    }
    let total: u64 = files.iter().map(|(_, d)| d.len() as u64).sum();

    // How long after new parts were committed the kill comes: different moments of the
    // parts still on the wire.
    let after_commit = [
        Duration::from_millis(300),
        Duration::from_millis(800),
        Duration::from_millis(50),
    ];
    let mut committed_at_kill = Vec::new();
    for (kill, delay) in after_commit.iter().enumerate().take(KILLS) {
        let before = committed_parts(&env);
        let mut child = spawn(&cfg, &log);
        let start = Instant::now();
        // New parts committed by this run.
        loop {
            fail_fast(&env, Some(&log));
            if committed_parts(&env).difference(&before).next().is_some() {
                break;
            }
            if let Some(st) = child.0.try_wait().unwrap() {
                panic!("kill {kill}: daemon exited ({st})\n{}", log_excerpt(&log));
            }
            if start.elapsed() > Duration::from_secs(30) {
                panic!(
                    "kill {kill}: no new part committed within 30 s; rows: {:#?}\n{}",
                    env.rows(),
                    log_excerpt(&log)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(*delay).await;
        let _ = child.0.kill(); // SIGKILL
        let status = child.0.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "kill {kill}: not killed but exited: {status}\n{}",
            log_excerpt(&log)
        );
        let parts = committed_parts(&env).len();
        committed_at_kill.push(parts);
        assert!(
            files.iter().any(|(r, _)| env.root.join(r).exists()),
            "kill {kill}: everything was already uploaded, the kill found nothing in flight"
        );
    }

    // The last run, unthrottled, left to finish and stopped cleanly.
    proxy.set(Fault::None);
    let mut child = spawn(&cfg, &log);
    let rels: Vec<&str> = files.iter().map(|(r, _)| *r).collect();
    wait_all_deleted(&env, &rels, Duration::from_secs(40), Some(&log)).await;
    // Let the last commits land, then SIGTERM.
    tokio::time::sleep(Duration::from_millis(300)).await;
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child.0),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let status = child.0.wait().unwrap();
    assert!(
        status.success(),
        "clean stop: {status}\n{}",
        log_excerpt(&log)
    );

    check_stored(&env, &moto, &files).await;
    let open = moto.open_uploads().await;
    let sent = proxy.stats().request_body_bytes;
    let resent = sent.saturating_sub(total);
    let bound = KILLS as u64 * CONCURRENCY * PART_MIB * MIB as u64;
    let mib = |b: u64| b as f64 / MIB as f64;
    eprintln!(
        "moto resume: {KILLS} kills, parts committed at each kill {committed_at_kill:?}, {:.1} MiB stored, {:.1} MiB sent, {:.1} MiB re-sent (bound {:.0} MiB), {} open uploads, {:.1} s",
        mib(total),
        mib(sent),
        mib(resent),
        mib(bound),
        open.len(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(open, vec![], "multipart uploads left open on moto");
    assert!(
        resent <= bound,
        "re-sent {resent} bytes over {KILLS} kills, more than the {CONCURRENCY} parts in flight per kill: a resume started over"
    );
}
