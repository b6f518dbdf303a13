//! Kill the real binary at random moments, restart it on the same journal, and check that
//! nothing is lost, nothing is deleted early, no multipart upload is left open, and each kill
//! costs at most the parts that were in flight.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::harness::*;
use common::proxy::{Fault, FaultProxy};
use rand::{Rng, SeedableRng};

const KILLS: usize = 20;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_random_moments_loses_nothing() {
    let env = Env::new().await;
    let proxy = FaultProxy::start(env.server.addr).await.unwrap();
    // Slow enough that kills land while parts are on the wire.
    proxy.set(Fault::Throttle {
        bytes_per_sec: 6 * 1024 * 1024,
    });
    let cfg = env.dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[node]
name = "{NODE}"
[watch]
root = {root:?}
settle_secs = 0.1
rescan_interval_secs = 600
[journal]
path = {journal:?}
[storage]
endpoint = "http://{addr}"
region = "us-east-1"
bucket = "{BUCKET}"
access_key_id = "{ak}"
access_key_secret = "{sk}"
path_style = true
[lookup]
listen = ["127.0.0.1:0"]
[upload]
part_size_mib = {PART_MIB}
concurrency = {CONCURRENCY}
retry_initial_secs = 0.05
retry_max_secs = 0.5
drain_secs = 1
"#,
            root = env.root.display().to_string(),
            journal = env.journal_path.display().to_string(),
            addr = proxy.addr(),
            ak = record_offload::devserver::ACCESS_KEY,
            sk = record_offload::devserver::SECRET_KEY,
        ),
    )
    .unwrap();
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
    for _ in 0..4 {
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
    let check_nothing_deleted_early = |files: &BTreeMap<String, Vec<u8>>| {
        for (rel, data) in files {
            if !env.root.join(rel).exists() {
                let stored = std::fs::read(env.server.object_path(BUCKET, &env.key(rel)))
                    .unwrap_or_else(|_| panic!("{rel} deleted but not stored"));
                assert!(
                    stored == *data,
                    "{rel} deleted but its object is not complete"
                );
            }
        }
    };

    let mut kills = 0;
    let mut self_killed = 0;
    while kills < KILLS {
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
        for _ in pending..3 {
            add_file(&mut files, &mut rng);
        }
    }

    // A last run, left to finish and stopped cleanly.
    proxy.set(Fault::None);
    let mut child = spawn(&cfg, "", &log);
    let deadline = Instant::now() + Duration::from_secs(90);
    while files.keys().any(|r| env.root.join(r).exists()) {
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

    let mut total = 0u64;
    for (rel, data) in &files {
        let stored = std::fs::read(env.server.object_path(BUCKET, &env.key(rel))).unwrap();
        assert!(stored == *data, "{rel}: stored bytes differ");
        assert!(!env.root.join(rel).exists());
        let row = env.row(rel).unwrap();
        if row.state != record_offload::journal::State::Deleted {
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
        assert_eq!(row.md5.as_deref(), Some(md5_hex(data).as_str()));
        total += data.len() as u64;
    }
    assert!(
        env.server.open_uploads().is_empty(),
        "multipart uploads left open: {:?}",
        env.server.open_uploads()
    );
    let sent = proxy.stats().request_body_bytes;
    let resent_per_kill = sent.saturating_sub(total) as f64 / kills as f64;
    let bound = (CONCURRENCY * PART_MIB * 1024 * 1024) as f64;
    eprintln!(
        "crash test: {} files, {kills} kills ({self_killed} at failpoints), {:.1} MiB stored, {:.1} MiB sent, {:.2} MiB re-sent per kill (bound {:.0} MiB)",
        files.len(),
        total as f64 / 1048576.0,
        sent as f64 / 1048576.0,
        resent_per_kill / 1048576.0,
        bound / 1048576.0
    );
    assert!(
        resent_per_kill <= bound,
        "re-sent {resent_per_kill} bytes per kill, more than {CONCURRENCY} parts"
    );
}
