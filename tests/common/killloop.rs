//! The real binary killed with SIGKILL while parts of multipart uploads are on the wire, and
//! restarted, until every file is stored: shared by the resume tests against each server.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use record_offload::config::Config;
use record_offload::journal::{self, FileRow, State};

use super::harness::{Env, age};
use super::proxy::{Fault, FaultProxy};

pub const MIB: usize = 1024 * 1024;
pub const PART_MIB: u64 = 5;
pub const CONCURRENCY: u64 = 3;
pub const KILLS: usize = 3;

/// Rows in `failed` are a test failure at once: nothing the store says in these tests is a
/// permanent refusal.
pub fn fail_fast(env: &Env, log: Option<&Path>) {
    // A journal that cannot be read yet (killed before its schema was created) has no rows.
    let Some(rows) = env.try_rows() else {
        return;
    };
    let failed: Vec<FileRow> = rows
        .into_iter()
        .filter(|r| r.state == State::Failed)
        .collect();
    if !failed.is_empty() {
        let errors: Vec<String> = failed
            .iter()
            .map(|r| format!("{}: {:?}", r.path.display(), r.last_error))
            .collect();
        panic!(
            "files in `failed`:\n{}\n{}",
            errors.join("\n"),
            log.map(log_excerpt).unwrap_or_default()
        );
    }
}

/// The daemon log's warnings and errors (and starts), last 40.
/// Stops `child` with SIGTERM and asserts it exited cleanly (its log's tail otherwise).
pub fn stop_cleanly(child: &mut Daemon, log: &Path) {
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child.0),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let status = child.0.wait().unwrap();
    assert!(
        status.success(),
        "clean stop: {status}\n{}",
        log_excerpt(log)
    );
}

pub fn log_excerpt(log: &Path) -> String {
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
pub async fn wait_all_deleted(env: &Env, rels: &[&str], timeout: Duration, log: Option<&Path>) {
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

/// The daemon child; killed if the test ends early, so a failure leaves no process behind.
pub struct Daemon(pub Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn spawn(cfg: &Path, log: &Path) -> Daemon {
    spawn_with_failpoints(cfg, log, "")
}

/// [`spawn`] with `RECORD_OFFLOAD_FAILPOINTS` set to `points` (empty: none).
pub fn spawn_with_failpoints(cfg: &Path, log: &Path, points: &str) -> Daemon {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_record-offload"))
        .args(["run", "--config"])
        .arg(cfg)
        .env("RUST_LOG", "record_offload=info")
        .env("RECORD_OFFLOAD_FAILPOINTS", points)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map(Daemon)
        .unwrap()
}

/// The parts the journal has committed, as (file id, upload id, part number).
pub fn committed_parts(env: &Env) -> BTreeSet<(i64, String, i64)> {
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

/// What a kill loop saw.
#[derive(Debug)]
pub struct KillReport {
    /// Parts the journal held at each kill.
    pub committed_at_kill: Vec<usize>,
    /// Bytes of the files.
    pub total: u64,
    /// Request body bytes that went through the proxy over all runs.
    pub sent: u64,
    pub elapsed: Duration,
}

impl KillReport {
    pub fn resent(&self) -> u64 {
        self.sent.saturating_sub(self.total)
    }

    /// At most the parts in flight at each kill were sent again.
    pub fn bound(&self) -> u64 {
        KILLS as u64 * CONCURRENCY * PART_MIB * MIB as u64
    }
}

impl std::fmt::Display for KillReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / MIB as f64;
        write!(
            f,
            "{KILLS} kills, parts committed at each kill {:?}, {:.1} MiB stored, {:.1} MiB sent, {:.1} MiB re-sent (bound {:.0} MiB), {:.1} s",
            self.committed_at_kill,
            mib(self.total),
            mib(self.sent),
            mib(self.resent()),
            mib(self.bound()),
            self.elapsed.as_secs_f64()
        )
    }
}

/// Writes `files`, then runs the real binary through a throttling fault proxy in front of
/// `upstream` (so parts are on the wire) and kills it with SIGKILL [`KILLS`] times, each a
/// different moment after the journal committed new parts; a last run, unthrottled, is left
/// to finish every file and stopped with SIGTERM (exit 0). `edit` adds what the server needs
/// (CA, path style) to the config.
pub async fn kill_loop(
    env: &Env,
    upstream: SocketAddr,
    scheme: &str,
    files: &[(&str, Vec<u8>)],
    edit: impl FnOnce(&mut Config),
) -> KillReport {
    let started = Instant::now();
    let proxy = FaultProxy::start(upstream).await.unwrap();
    // 5 MiB parts take ~1.25 s each on the wire: a kill finds parts half sent.
    proxy.set(Fault::Throttle {
        bytes_per_sec: 4 * MIB as u64,
    });
    let cfg = env.config_file_at(&format!("{scheme}://{}", proxy.addr()), |c| {
        c.watch.settle_secs = 0.1;
        c.upload.part_size_mib = PART_MIB;
        c.upload.concurrency = CONCURRENCY as usize;
        c.upload.request_timeout_secs = 60.0;
        c.upload.drain_secs = 1.0;
        edit(c);
    });
    let log = env.dir.path().join("daemon.log");
    for (rel, data) in files {
        let p = env.write(rel, data);
        age(&p, 60);
    }
    let total: u64 = files.iter().map(|(_, d)| d.len() as u64).sum();

    // How long after new parts were committed the kill comes.
    let after_commit = [
        Duration::from_millis(300),
        Duration::from_millis(800),
        Duration::from_millis(50),
    ];
    let mut committed_at_kill = Vec::new();
    for (kill, delay) in after_commit.iter().enumerate().take(KILLS) {
        let before = committed_parts(env);
        let mut child = spawn(&cfg, &log);
        let start = Instant::now();
        loop {
            fail_fast(env, Some(&log));
            if committed_parts(env).difference(&before).next().is_some() {
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
        committed_at_kill.push(committed_parts(env).len());
        assert!(
            files.iter().any(|(r, _)| env.root.join(r).exists()),
            "kill {kill}: everything was already uploaded, the kill found nothing in flight"
        );
    }

    proxy.set(Fault::None);
    let mut child = spawn(&cfg, &log);
    let rels: Vec<&str> = files.iter().map(|(r, _)| *r).collect();
    wait_all_deleted(env, &rels, Duration::from_secs(40), Some(&log)).await;
    // Let the last commits land, then SIGTERM.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_cleanly(&mut child, &log);
    KillReport {
        committed_at_kill,
        total,
        sent: proxy.stats().request_body_bytes,
        elapsed: started.elapsed(),
    }
}
