//! Kill the real binary at random moments, restart it on the same journal, and check that
//! nothing is lost, nothing is deleted early, no multipart upload is left open, and each kill
//! costs at most the parts that were in flight.
//!
//! `CRASH_KILLS` (default 20) and `CRASH_BATCH` (files kept waiting on disk, default 3) make it
//! longer; `scripts/soak.sh` runs it with hundreds of kills on the release binary. It prints
//! lost / corrupted / deleted-unverified files, open multipart uploads, bytes re-sent per kill
//! and the daemon's resident memory, then asserts them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::harness::*;
use common::proxy::{Fault, FaultProxy};
use rand::{Rng, SeedableRng};

const KILLS: usize = 20;
const BATCH: usize = 3;
const PART_MIB: u64 = 5;
const CONCURRENCY: u64 = 3;

/// The daemon child; killed if the test ends early, so a failure leaves no process behind.
struct Daemon(Child);

impl std::ops::Deref for Daemon {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cfg: &std::path::Path, failpoints: &str, log: &std::path::Path) -> Daemon {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_record-offload"))
        .args(["run", "--config"])
        .arg(cfg)
        .env("RECORD_OFFLOAD_FAILPOINTS", failpoints)
        .env("RUST_LOG", "record_offload=info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map(Daemon)
        .unwrap()
}

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// The process's resident set (VmRSS) in KiB, if it is still there.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn median(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_random_moments_loses_nothing() {
    let kills_wanted = env_usize("CRASH_KILLS", KILLS);
    let batch = env_usize("CRASH_BATCH", BATCH).max(1);
    let env = Env::new().await;
    let proxy = FaultProxy::start(env.server.addr).await.unwrap();
    // Slow enough that kills land while parts are on the wire.
    proxy.set(Fault::Throttle {
        bytes_per_sec: 6 * 1024 * 1024,
    });
    let cfg = env.config_file_at(&format!("http://{}", proxy.addr()), |c| {
        c.watch.settle_secs = 0.1;
        c.upload.part_size_mib = PART_MIB;
        c.upload.concurrency = CONCURRENCY as usize;
        c.upload.request_timeout_secs = 60.0;
        c.upload.drain_secs = 1.0;
    });
    let log = env.dir.path().join("daemon.log");

    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("crash test seed {seed} (CRASH_SEED={seed} repeats it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    // Files of 2 to 3 parts, kept coming so every kill lands in the middle of work.
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut next = 0u64;
    let mut add_file = |files: &mut BTreeMap<String, Vec<u8>>, rng: &mut rand::rngs::StdRng| {
        let size = rng.random_range(6 * 1024 * 1024..15 * 1024 * 1024);
        let rel = format!("day/rec{next:03}.mp4");
        let data = bytes(size, next + 1000);
        let p = env.write(&rel, &data);
        age(&p, 60);
        files.insert(rel, data);
        next += 1;
    };
    for _ in 0..(batch + 1) {
        add_file(&mut files, &mut rng);
    }

    // Where the process dies besides the random kills: in the windows that matter.
    let failpoints = [
        "",
        "after-complete:0.7",
        "",
        "after-uploaded:0.7",
        "after-part:0.3",
        "",
        "after-unlink:0.7",
        "after-create:0.7",
    ];
    // Files found gone from disk without a complete object behind them.
    let mut deleted_unverified: BTreeMap<String, String> = BTreeMap::new();
    let mut checked_gone: std::collections::HashSet<String> = Default::default();
    let mut check_nothing_deleted_early = |files: &BTreeMap<String, Vec<u8>>| {
        for (rel, data) in files {
            if checked_gone.contains(rel) || env.root.join(rel).exists() {
                continue;
            }
            checked_gone.insert(rel.clone());
            match std::fs::read(env.server.object_path(BUCKET, &env.key(rel))) {
                Ok(stored) if stored == *data => {}
                Ok(_) => {
                    deleted_unverified.insert(rel.clone(), "object incomplete".into());
                }
                Err(_) => {
                    deleted_unverified.insert(rel.clone(), "not stored".into());
                }
            }
        }
    };

    let mut kills = 0;
    let mut self_killed = 0;
    let mut rss_at_kill: Vec<u64> = Vec::new();
    while kills < kills_wanted {
        let fp = failpoints[kills % failpoints.len()];
        let mut child = spawn(&cfg, fp, &log);
        let delay = Duration::from_millis(rng.random_range(300..1500));
        let start = Instant::now();
        while start.elapsed() < delay {
            if child.try_wait().unwrap().is_some() {
                self_killed += 1;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some(kib) = rss_kib(child.id()) {
            rss_at_kill.push(kib);
        }
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        // Killed by us or by a failpoint: anything else (an exit) is a failure.
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "not killed but exited: {status}; log: {}",
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .last()
                .unwrap_or("")
        );
        kills += 1;
        check_nothing_deleted_early(&files);
        // Keep work coming.
        let pending = files.keys().filter(|r| env.root.join(r).exists()).count();
        for _ in pending..batch {
            add_file(&mut files, &mut rng);
        }
    }

    // A last run, left to finish and stopped cleanly.
    proxy.set(Fault::None);
    let mut child = spawn(&cfg, "", &log);
    let mut rss_last_run: Vec<u64> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90 + 10 * batch as u64);
    while files.keys().any(|r| env.root.join(r).exists()) {
        check_nothing_deleted_early(&files);
        if let Some(kib) = rss_kib(child.id()) {
            rss_last_run.push(kib);
        }
        if Instant::now() > deadline {
            let left: Vec<_> = files.keys().filter(|r| env.root.join(r).exists()).collect();
            let rows: Vec<_> = left.iter().map(|r| env.row(r)).collect();
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            panic!(
                "not finished after the last restart: {left:?}\nrows: {rows:?}\nlog tail (newest first):\n{}",
                tail.join("\n")
            );
        }
        if let Some(st) = child.try_wait().unwrap() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: String = text
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            panic!("daemon died ({st}); log tail:\n{tail}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the last `deleted` commits land, then stop it with SIGTERM.
    tokio::time::sleep(Duration::from_millis(300)).await;
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child.0),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "clean stop: {status}");

    check_nothing_deleted_early(&files);

    let mut total = 0u64;
    let mut lost = Vec::new();
    let mut corrupted = Vec::new();
    let mut not_finished = Vec::new();
    for (rel, data) in &files {
        total += data.len() as u64;
        match std::fs::read(env.server.object_path(BUCKET, &env.key(rel))) {
            Err(_) if !env.root.join(rel).exists() => lost.push(rel.clone()),
            Err(_) => not_finished.push(rel.clone()),
            Ok(stored) if stored != *data => corrupted.push(rel.clone()),
            Ok(_) => {}
        }
        if env.root.join(rel).exists() {
            not_finished.push(rel.clone());
        }
        let row = env.row(rel).unwrap();
        if row.state != record_offload::journal::State::Deleted
            || row.md5.as_deref() != Some(md5_hex(data).as_str())
        {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| {
                    l.contains(rel.as_str()) || l.contains("failpoint") || l.contains("started")
                })
                .collect();
            panic!(
                "{rel} ended {:?}: {row:?}\nlog:\n{}",
                row.state,
                lines.join("\n")
            );
        }
    }
    let open_uploads = env.server.open_uploads();
    let sent = proxy.stats().request_body_bytes;
    let resent_per_kill = sent.saturating_sub(total) as f64 / kills as f64;
    let bound = (CONCURRENCY * PART_MIB * 1024 * 1024) as f64;
    let mib = |b: f64| b / 1048576.0;
    eprintln!(
        "crash test: {} files, {kills} kills ({self_killed} at failpoints), {:.1} MiB stored, {:.1} MiB sent, {:.2} MiB re-sent per kill (bound {:.0} MiB)",
        files.len(),
        mib(total as f64),
        mib(sent as f64),
        mib(resent_per_kill),
        mib(bound)
    );
    let third = rss_at_kill.len() / 3;
    eprintln!(
        "crash test: lost {}, corrupted {}, deleted unverified {}, open multipart uploads {}, not finished {}",
        lost.len(),
        corrupted.len(),
        deleted_unverified.len(),
        open_uploads.len(),
        not_finished.len()
    );
    eprintln!(
        "crash test: daemon RSS at kill: median of the first third {} KiB, of the last third {} KiB, max {} KiB; last run: {} samples, max {} KiB",
        median(&rss_at_kill[..third.max(1).min(rss_at_kill.len())]),
        median(&rss_at_kill[rss_at_kill.len() - third.max(1).min(rss_at_kill.len())..]),
        rss_at_kill.iter().max().copied().unwrap_or(0),
        rss_last_run.len(),
        rss_last_run.iter().max().copied().unwrap_or(0)
    );
    assert!(lost.is_empty(), "lost: {lost:?}");
    assert!(corrupted.is_empty(), "stored bytes differ: {corrupted:?}");
    assert!(
        deleted_unverified.is_empty(),
        "deleted before stored: {deleted_unverified:?}"
    );
    assert!(not_finished.is_empty(), "still on disk: {not_finished:?}");
    assert!(
        open_uploads.is_empty(),
        "multipart uploads left open: {open_uploads:?}"
    );
    assert!(
        resent_per_kill <= bound,
        "re-sent {resent_per_kill} bytes per kill, more than {CONCURRENCY} parts"
    );
}
