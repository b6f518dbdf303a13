//! `record-offload import`: the real binary on a real tree and journal; a dry run changes
//! nothing, a real run queues what is finished and skips what is not, and the daemon (started
//! afterwards, or already running) uploads what was queued.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::harness::*;
use record_offload::config::{self, Source};
use record_offload::daemon::Daemon;
use record_offload::journal::State;

const T: Duration = Duration::from_secs(60);

fn write_config(env: &Env, settle_secs: f64) -> PathBuf {
    env.config_file_at(&env.server.endpoint(), |c| {
        c.watch.exclude = vec!["**/*.tmp".to_string()];
        c.watch.settle_secs = settle_secs;
        c.upload.drain_secs = 1.0;
    })
}

/// Runs `import ARGS --json`; returns the exit code and the report.
fn import(cfg: &Path, args: &[&str]) -> (i32, serde_json::Value) {
    let out = common::cli(cfg)
        .arg("import")
        .args(args)
        .arg("--json")
        .env_remove("RECORD_OFFLOAD_FAILPOINTS")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "not a JSON report ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap(), report)
}

/// An existing tree: `n` finished recordings (mtime an hour ago) in dated folders, plus an
/// excluded temporary file.
fn old_tree(env: &Env, n: usize) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for i in 0..n {
        let rel = format!("2026/0{}/room{i}/rec {i}.mp4", 1 + i % 3);
        let data = bytes(1000 + i * 37, i as u64);
        let p = env.write(&rel, &data);
        age(&p, 3600);
        files.push((rel, data));
    }
    let p = env.write("2026/01/partial.mp4.tmp", b"not yet");
    age(&p, 3600);
    files
}

fn settings(cfg: &Path) -> config::Settings {
    config::load(&Source {
        file: Some(cfg.to_path_buf()),
        no_env: true,
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_changes_nothing_real_run_queues_daemon_uploads() {
    let env = Env::new().await;
    let files = old_tree(&env, 12);
    // Not finished: one written just now, one an hour old but still open for writing.
    env.write("live/now.mp4", b"recording");
    let open_path = env.write("live/paused.mp4", b"paused recorder");
    age(&open_path, 3600);
    let writer = std::fs::OpenOptions::new()
        .append(true)
        .open(&open_path)
        .unwrap();
    let cfg = write_config(&env, 30.0);

    // Dry run before the journal exists: reports, creates nothing.
    let (code, r) = import(&cfg, &["--dry-run"]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["dry_run"], true);
    assert_eq!(r["found"], 14);
    assert_eq!(r["queued"], 12);
    assert_eq!(r["skipped_recent"], 1);
    assert_eq!(r["skipped_open"], 1);
    assert!(!env.journal_path.exists(), "a dry run created the journal");

    // The real run.
    let (code, r) = import(&cfg, &[]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["dry_run"], false);
    assert_eq!(r["queued"], 12);
    let expected_bytes: usize = files.iter().map(|(_, d)| d.len()).sum();
    assert_eq!(r["queued_bytes"], expected_bytes as u64);
    assert_eq!(r["skipped_recent"], 1);
    assert_eq!(r["skipped_open"], 1);
    let rows = env.rows();
    assert_eq!(rows.len(), 12);
    for (rel, data) in &files {
        let row = env.row(rel).unwrap();
        assert_eq!(row.state, State::Queued, "{rel}");
        assert_eq!(row.size, data.len() as u64);
        assert_eq!(row.key, env.key(rel));
    }
    assert!(env.row("live/now.mp4").is_none());
    assert!(env.row("live/paused.mp4").is_none());
    assert!(env.row("2026/01/partial.mp4.tmp").is_none());

    // A dry run on the existing journal: everything is known, nothing changes.
    let before = format!("{:?}", env.rows());
    let (code, r) = import(&cfg, &["--dry-run"]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["queued"], 0);
    assert_eq!(r["already_known"], 12);
    assert_eq!(format!("{:?}", env.rows()), before);
    // A second real run is a no-op too.
    let (_, r) = import(&cfg, &[]);
    assert_eq!(r["queued"], 0);
    assert_eq!(r["already_known"], 12);
    assert_eq!(format!("{:?}", env.rows()), before);

    // The daemon uploads what was queued.
    drop(writer);
    let d = Daemon::start(settings(&cfg)).await.unwrap();
    for (rel, data) in &files {
        let row = env.wait_state(rel, State::Deleted, T).await;
        assert_eq!(row.md5.as_deref(), Some(md5_hex(data).as_str()), "{rel}");
        assert_eq!(env.get(&env.key(rel)).await.unwrap(), *data, "{rel}");
    }
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_while_the_daemon_runs() {
    let env = Env::new().await;
    let cfg = write_config(&env, 0.3);
    let d = Daemon::start(settings(&cfg)).await.unwrap();
    env.write("first.mp4", b"first");
    env.wait_state("first.mp4", State::Deleted, T).await;

    // A tree appears in one go (as a restored backup would); import it while the daemon
    // works on it too. Both write the journal; neither fails.
    let staging = env.dir.path().join("staging");
    for i in 0..40 {
        let p = staging.join(format!("old/{i}.mp4"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, bytes(2000 + i, i as u64)).unwrap();
        age(&p, 3600);
    }
    std::fs::rename(staging.join("old"), env.root.join("old")).unwrap();
    let (code, r) = import(&cfg, &[]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["failed"], 0);
    // The daemon may have stored (and removed) some files before the walk reached them.
    let n = |k: &str| r[k].as_u64().unwrap();
    assert!(n("found") <= 40, "{r}");
    assert_eq!(
        n("queued")
            + n("already_known")
            + n("already_stored")
            + n("skipped_recent")
            + n("skipped_open"),
        n("found"),
        "{r}"
    );
    for i in 0..40 {
        let rel = format!("old/{i}.mp4");
        env.wait_state(&rel, State::Deleted, T).await;
        assert_eq!(
            env.get(&env.key(&rel)).await.unwrap(),
            bytes(2000 + i, i as u64)
        );
    }
    d.shutdown();
    d.wait().await;
}

#[test]
fn bad_config_is_one_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[watch]\nroot = \"relative\"\n").unwrap();
    let out = common::cli(&cfg)
        .args(["import", "--dry-run"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("watch.root"), "{err}");
}
