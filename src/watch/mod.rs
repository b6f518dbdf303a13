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
pub mod writers;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::journal::{self, State};
use crate::util::filter::Filter;
use crate::util::fs::Identity;

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

struct Pending {
    /// Last time something happened to the file (event, or mtime for scanned files).
    last_event: Instant,
    /// Closed after writing or renamed in (or found quiet by a scan): the settle timer runs.
    closed: bool,
    /// Already warned that a writer holds it open.
    warned_open: bool,
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
    let mut w = Settler {
        params: Arc::new(params),
        pending: HashMap::new(),
        stats,
        rescan_interval: Duration::ZERO,
        unreadable_warned: false,
        watcher: Arc::new(std::sync::Mutex::new(None)),
    };
    w.rescan_interval = w.params.rescan_interval;

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
                w.merge_scan(outcome);
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

struct ScanOutcome {
    /// Files to consider, with the age of their mtime (None: in the future).
    files: Vec<(PathBuf, Identity)>,
    prunable: Vec<PathBuf>,
    dirs: usize,
}

struct Settler {
    params: Arc<WatchParams>,
    pending: HashMap<PathBuf, Pending>,
    stats: Arc<WatchStats>,
    rescan_interval: Duration,
    unreadable_warned: bool,
    /// The inotify watcher (dropped with the settler). Shared with the scans of new
    /// directories, which make sure the directory is watched before they list it.
    watcher: Arc<std::sync::Mutex<Option<notify::RecommendedWatcher>>>,
}

impl Settler {
    fn rel<'a>(&self, path: &'a Path) -> Option<&'a Path> {
        let rel = path.strip_prefix(&self.params.root).ok()?;
        if rel.as_os_str().is_empty() {
            None
        } else {
            Some(rel)
        }
    }

    /// Handles one notify event; returns true when a full rescan is needed.
    fn on_event(
        &mut self,
        ev: notify::Result<notify::Event>,
        scan_tx: &mpsc::Sender<(bool, ScanOutcome)>,
    ) -> bool {
        self.stats.events.fetch_add(1, Ordering::Relaxed);
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) {
                    warn!(root = %self.params.root.display(),
                        "inotify watch limit reached (fs.inotify.max_user_watches): new directories are not watched; falling back to scans every 60 s");
                    self.rescan_interval = self.rescan_interval.min(Duration::from_secs(60));
                } else {
                    warn!(error = %e, "inotify error; scanning the whole tree");
                }
                return true;
            }
        };
        if ev.need_rescan() {
            self.stats.overflows.fetch_add(1, Ordering::Relaxed);
            warn!("inotify queue overflowed; scanning the whole tree");
            return true;
        }
        let now = Instant::now();
        match ev.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
                for p in &ev.paths {
                    self.touch(p, true, now);
                }
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
                for p in &ev.paths {
                    self.arrived(p, now, scan_tx);
                }
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::From)) => {
                for p in &ev.paths {
                    self.forget(p);
                }
            }
            // `Both` repeats what `From` and `To` already said.
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {}
            EventKind::Modify(_) => {
                for p in &ev.paths {
                    self.touch(p, false, now);
                }
            }
            EventKind::Create(CreateKind::Folder) => {
                for p in &ev.paths {
                    if let Some(rel) = self.rel(p) {
                        self.spawn_scan(rel.to_path_buf(), false, scan_tx.clone());
                    }
                }
            }
            EventKind::Create(_) => {
                for p in &ev.paths {
                    self.touch(p, false, now);
                }
            }
            EventKind::Remove(_) => {
                for p in &ev.paths {
                    self.forget(p);
                }
            }
            _ => {}
        }
        false
    }

    /// Something happened to a file: restart its timer; `closed` starts it.
    fn touch(&mut self, path: &Path, closed: bool, now: Instant) {
        let Some(rel) = self.rel(path) else { return };
        if let Some(e) = self.pending.get_mut(rel) {
            e.last_event = now;
            e.closed |= closed;
            return;
        }
        if !self.params.filter.file_matches(rel) {
            return;
        }
        self.pending.insert(
            rel.to_path_buf(),
            Pending {
                last_event: now,
                closed,
                warned_open: false,
            },
        );
    }

    /// Renamed into place: a file starts settling; a directory is scanned.
    fn arrived(&mut self, path: &Path, now: Instant, scan_tx: &mpsc::Sender<(bool, ScanOutcome)>) {
        let Some(rel) = self.rel(path) else { return };
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => self.spawn_scan(rel.to_path_buf(), false, scan_tx.clone()),
            Ok(m) if m.is_file() => self.touch(path, true, now),
            _ => {}
        }
    }

    fn forget(&mut self, path: &Path) {
        let Some(rel) = self.rel(path) else { return };
        if self.pending.remove(rel).is_none() {
            // Maybe a directory: drop everything under it.
            self.pending.retain(|p, _| !p.starts_with(rel));
        }
    }

    fn spawn_scan(&self, sub: PathBuf, full: bool, tx: mpsc::Sender<(bool, ScanOutcome)>) {
        let params = self.params.clone();
        let watcher = self.watcher.clone();
        tokio::task::spawn_blocking(move || {
            if !full {
                // notify adds the watch of a new directory after it has reported the
                // directory, so a file created in between would be seen by neither the
                // watch nor a scan made too early. Adding the watch here first (it is
                // idempotent) and then listing closes that gap.
                if let Ok(mut slot) = watcher.lock()
                    && let Some(w) = slot.as_mut()
                {
                    let _ = w.watch(&params.root.join(&sub), RecursiveMode::Recursive);
                }
            }
            let outcome = scan_and_filter(&params, &sub);
            let _ = tx.blocking_send((full, outcome));
        });
    }

    fn merge_scan(&mut self, outcome: ScanOutcome) {
        let now = Instant::now();
        let wall = SystemTime::now();
        for (rel, id) in outcome.files {
            // A file whose mtime is older than the settle time is already quiet.
            let age = wall.duration_since(id.mtime()).unwrap_or(Duration::ZERO);
            let quiet_since = now.checked_sub(age.min(self.params.settle)).unwrap_or(now);
            match self.pending.get_mut(&rel) {
                Some(e) => {
                    if !e.closed {
                        e.closed = true;
                        e.last_event = e.last_event.max(quiet_since);
                    }
                }
                None => {
                    self.pending.insert(
                        rel,
                        Pending {
                            last_event: quiet_since,
                            closed: true,
                            warned_open: false,
                        },
                    );
                }
            }
        }
    }

    /// Hands on every file whose settle time is over and that no process writes.
    async fn settle_due(&mut self, out: &mpsc::Sender<Settled>) -> Result<(), ()> {
        let now = Instant::now();
        let settle = self.params.settle;
        let due: Vec<PathBuf> = self
            .pending
            .iter()
            .filter(|(_, e)| e.closed && now.duration_since(e.last_event) >= settle)
            .map(|(p, _)| p.clone())
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        let wall = SystemTime::now();
        let mut candidates = Vec::new();
        for rel in due {
            let full = self.params.root.join(&rel);
            let meta = match std::fs::symlink_metadata(&full) {
                Ok(m) if m.is_file() => m,
                _ => {
                    self.pending.remove(&rel);
                    continue;
                }
            };
            let id = Identity::from_metadata(&meta);
            // Written without an event reaching us (or mtime set by the writer): wait for the
            // mtime to be old enough too; an mtime in the future is ignored.
            if let Ok(age) = wall.duration_since(id.mtime())
                && age < settle
            {
                if let Some(e) = self.pending.get_mut(&rel) {
                    e.last_event = now.checked_sub(age).unwrap_or(now);
                }
                continue;
            }
            candidates.push((rel, id));
        }
        if candidates.is_empty() {
            return Ok(());
        }
        let targets: HashSet<(u64, u64)> =
            candidates.iter().map(|(_, id)| (id.dev, id.ino)).collect();
        let scan = tokio::task::spawn_blocking(move || writers::open_for_write(&targets))
            .await
            .unwrap_or_default();
        if scan.unreadable > 0 && !self.unreadable_warned {
            self.unreadable_warned = true;
            warn!(
                processes = scan.unreadable,
                "cannot read the open files of some processes; a file they hold open for writing may be taken as finished (grant CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH, or run as the recorder's user)"
            );
        }
        for (rel, id) in candidates {
            if scan.open.contains(&(id.dev, id.ino)) {
                if let Some(e) = self.pending.get_mut(&rel) {
                    e.last_event = now;
                    if !e.warned_open {
                        e.warned_open = true;
                        info!(path = %rel.display(), "quiet but still open for writing; waiting");
                    }
                }
                continue;
            }
            self.pending.remove(&rel);
            self.stats.settled.fetch_add(1, Ordering::Relaxed);
            debug!(path = %rel.display(), size = id.size, "settled");
            out.send(Settled { rel, identity: id })
                .await
                .map_err(|_| ())?;
        }
        Ok(())
    }
}

/// Walks `sub` and drops what the journal already knows in the same state.
fn scan_and_filter(params: &WatchParams, sub: &Path) -> ScanOutcome {
    let res = scan::scan(&params.root, sub, &params.filter);
    for e in res.errors.iter().take(5) {
        warn!(error = %e, "scan: cannot read an entry");
    }
    let conn = journal::open_ro(&params.journal_path).ok();
    let mut files = Vec::with_capacity(res.files.len());
    for (rel, id) in res.files {
        let known = conn
            .as_ref()
            .and_then(|c| journal::get_by_path(c, &rel).ok().flatten());
        let skip = match known {
            Some(row) if row.identity == Some(id) => match row.state {
                State::Queued | State::Uploading | State::Failed => true,
                State::Uploaded => !params.delete_after_upload,
                State::Deleted | State::Settling | State::Vanished => false,
            },
            _ => false,
        };
        if !skip {
            files.push((rel, id));
        }
    }
    // Only directories that held a file this daemon removed are pruned: a directory a recorder
    // created for its next file is left alone.
    let prunable = match &conn {
        Some(c) => res
            .empty_dirs
            .into_iter()
            .filter(|d| journal::had_deleted_under(c, d).unwrap_or(false))
            .collect(),
        None => Vec::new(),
    };
    ScanOutcome {
        files,
        prunable,
        dirs: res.dirs,
    }
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
