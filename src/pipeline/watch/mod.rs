//! Watching the root and deciding when a file is finished ("settled").
//!
//! Sources of candidates:
//! - inotify through `notify` (recursive; new directories are watched as they appear, and
//!   scanned at once, because files may have been created in them before their watch existed);
//! - the startup scan and the periodic reconcile scan (`watch.rescan_interval_secs`);
//! - a full scan whenever notify reports a queue overflow (its rescan flag);
//! - the uploader, for a file that changed while it was being uploaded.
//!
//! A file settles when it was closed after writing (`close_write`) or renamed into place
//! (`moved_to`) — or, for files found by a scan, when its mtime is older than `settle_secs` —
//! and then nothing happened to it for `settle_secs`: any later write restarts the timer. Just
//! before it is handed on, `/proc/*/fd` is checked: a file that some process still holds open
//! for writing (a paused recorder) waits, however quiet it is.
//!
//! Settled files go to the intake (a bounded channel: a slow journal slows the watcher, whose
//! kernel queue may then overflow, which only causes a rescan). Nothing here writes the journal;
//! scans read it to skip files it already knows.

pub mod scan;
mod settle;
pub mod writers;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::util::filter::Filter;
use crate::util::fs::Identity;
use scan::ScanOutcome;
use settle::{Pending, Settler};

/// A file that is finished and ready for the journal.
#[derive(Debug, Clone)]
pub struct Settled {
    pub rel: PathBuf,
    pub identity: Identity,
}

/// What the watcher needs to know.
#[derive(Debug, Clone)]
pub struct WatchParams {
    pub root: PathBuf,
    pub filter: Filter,
    pub settle: Duration,
    pub rescan_interval: Duration,
    pub journal_path: PathBuf,
    pub delete_after_upload: bool,
}

/// Counters other parts read (status line, liveness, tests).
#[derive(Debug, Default)]
pub struct WatchStats {
    pub events: AtomicU64,
    pub scans: AtomicU64,
    pub overflows: AtomicU64,
    pub settled: AtomicU64,
    pub pending: AtomicU64,
    /// Unix seconds of the last completed scan.
    pub last_scan_unix: AtomicU64,
    /// Beats every pass of the settle loop (liveness; see `crate::service::health`).
    pub heartbeat: Arc<crate::util::heartbeat::Heartbeat>,
}

enum Msg {
    Event(notify::Result<notify::Event>),
}

/// Runs until `cancel` fires. Hands settled files to `out`; takes files to watch again from
/// `resettle`; sends directories emptied long ago by deletions to `prune`.
pub async fn run(
    params: WatchParams,
    out: mpsc::Sender<Settled>,
    mut resettle: mpsc::Receiver<PathBuf>,
    prune: mpsc::Sender<PathBuf>,
    stats: Arc<WatchStats>,
    cancel: CancellationToken,
) {
    let mut w = Settler::new(params, stats);

    // Watch first, then scan: nothing can fall between the two.
    let (ev_tx, mut ev_rx) = mpsc::channel::<Msg>(65536);
    let mut watched_root = dir_id(&w.params.root);
    let mut root_gone_warned = false;
    let mut next_root_check = Instant::now() + ROOT_CHECK;
    match start_watcher(&w.params.root, ev_tx.clone()).await {
        Ok(wt) => {
            if let Ok(mut slot) = w.watcher.lock() {
                *slot = Some(wt);
            }
        }
        Err(e) => {
            warn!(error = %e, root = %w.params.root.display(),
                  "cannot watch the root with inotify; relying on periodic scans");
            w.rescan_interval = w.rescan_interval.min(Duration::from_secs(60));
        }
    }

    let tick_every = (w.params.settle / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut tick = tokio::time::interval(tick_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    // Scans run on the blocking pool; their results come back here.
    let (scan_tx, mut scan_rx) = mpsc::channel::<(bool, ScanOutcome)>(16);
    w.spawn_scan(PathBuf::new(), true, scan_tx.clone());
    let mut full_scan_running = true;
    let mut full_scan_again = false;
    let mut next_rescan = Instant::now() + w.rescan_interval;
    let mut first_scan = true;

    loop {
        w.stats.heartbeat.beat();
        let sleep_rescan = tokio::time::sleep_until(next_rescan.into());
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            Some(msg) = ev_rx.recv() => {
                let Msg::Event(ev) = msg;
                if w.on_event(ev, &scan_tx) {
                    if full_scan_running {
                        full_scan_again = true;
                    } else {
                        full_scan_running = true;
                        w.spawn_scan(PathBuf::new(), true, scan_tx.clone());
                    }
                }
            }
            Some((full, outcome)) = scan_rx.recv() => {
                if full {
                    if first_scan {
                        first_scan = false;
                        check_watch_limit(outcome.dirs, &w.params.root);
                    }
                    w.stats.scans.fetch_add(1, Ordering::Relaxed);
                    w.stats.last_scan_unix.store(unix_now(), Ordering::Relaxed);
                    for d in &outcome.prunable {
                        let _ = prune.try_send(d.clone());
                    }
                }
                // Files the scan found already quiet (a backlog at start, files missed by
                // inotify) go on now, not at the next tick.
                if w.merge_scan(outcome) && w.settle_due(&out).await.is_err() {
                    break; // the intake is gone: shutting down
                }
                if full {
                    full_scan_running = false;
                    if full_scan_again {
                        full_scan_again = false;
                        full_scan_running = true;
                        w.spawn_scan(PathBuf::new(), true, scan_tx.clone());
                    }
                }
            }
            Some(rel) = resettle.recv() => {
                let now = Instant::now();
                let e = w.pending.entry(rel).or_insert(Pending { last_event: now, closed: true, warned_open: false });
                e.last_event = now;
                e.closed = true;
            }
            _ = sleep_rescan => {
                next_rescan = Instant::now() + w.rescan_interval;
                if full_scan_running {
                    full_scan_again = true;
                } else {
                    full_scan_running = true;
                    w.spawn_scan(PathBuf::new(), true, scan_tx.clone());
                }
            }
            _ = tick.tick() => {
                if w.settle_due(&out).await.is_err() {
                    break; // the intake is gone: shutting down
                }
                // A root removed and created again has lost its inotify watch: watch the new
                // directory and scan it.
                if Instant::now() >= next_root_check {
                    next_root_check = Instant::now() + ROOT_CHECK;
                    match dir_id(&w.params.root) {
                        None => {
                            if !root_gone_warned {
                                root_gone_warned = true;
                                warn!(root = %w.params.root.display(),
                                    "the watch root is gone; waiting for it to come back");
                            }
                        }
                        Some(id) if Some(id) != watched_root => {
                            root_gone_warned = false;
                            watched_root = Some(id);
                            warn!(root = %w.params.root.display(),
                                "the watch root was replaced by another directory; watching and scanning the new one");
                            let new = start_watcher(&w.params.root, ev_tx.clone()).await;
                            if let Ok(mut slot) = w.watcher.lock() {
                                match new {
                                    Ok(wt) => *slot = Some(wt),
                                    Err(e) => {
                                        *slot = None;
                                        warn!(error = %e, "cannot watch the new root with inotify; relying on periodic scans");
                                        w.rescan_interval = w.rescan_interval.min(Duration::from_secs(60));
                                    }
                                }
                            }
                            if full_scan_running {
                                full_scan_again = true;
                            } else {
                                full_scan_running = true;
                                w.spawn_scan(PathBuf::new(), true, scan_tx.clone());
                            }
                        }
                        Some(_) => root_gone_warned = false,
                    }
                }
            }
        }
        w.stats
            .pending
            .store(w.pending.len() as u64, Ordering::Relaxed);
    }
    debug!("watcher stopped");
}

/// How often the watcher checks that the root is still the directory it watches.
const ROOT_CHECK: Duration = Duration::from_secs(1);

/// `(dev, inode)` of the directory at `path` (following a link at the root itself).
fn dir_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .ok()
        .filter(|m| m.is_dir())
        .map(|m| (m.dev(), m.ino()))
}

async fn start_watcher(
    root: &Path,
    tx: mpsc::Sender<Msg>,
) -> Result<notify::RecommendedWatcher, notify::Error> {
    let root = root.to_path_buf();
    let handler = move |ev: notify::Result<notify::Event>| {
        // Called on notify's thread: blocking here slows it down; if the kernel queue then
        // overflows, notify reports it and a full scan follows.
        let _ = tx.blocking_send(Msg::Event(ev));
    };
    tokio::task::spawn_blocking(move || {
        let config = notify::Config::default().with_follow_symlinks(false);
        let mut watcher = notify::RecommendedWatcher::new(handler, config)?;
        watcher.watch(&root, RecursiveMode::Recursive)?;
        Ok(watcher)
    })
    .await
    .map_err(|e| notify::Error::generic(&format!("watch task failed: {e}")))?
}

/// Warns when the tree has (nearly) more directories than inotify may watch.
fn check_watch_limit(dirs: usize, root: &Path) {
    let limit = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_watches")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok());
    if let Some(limit) = limit {
        if dirs * 10 >= limit * 9 {
            warn!(dirs, limit, root = %root.display(),
                "the tree has nearly as many directories as fs.inotify.max_user_watches allows; raise it (sysctl -w fs.inotify.max_user_watches=N); until then new files may be seen only by the periodic scan");
        } else {
            debug!(dirs, limit, "inotify watches");
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
