//! Settling: the files under watch and when each is finished (see the module documentation of
//! `super` for the rule). The run loop (`super::run`) feeds the [`Settler`] events, scan results
//! and files to watch again, and calls [`Settler::settle_due`] on every tick.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::scan::{self, ScanOutcome};
use super::{Settled, WatchParams, WatchStats, writers};
use crate::util::fs::Identity;

pub(super) struct Pending {
    /// Last time something happened to the file (event, or mtime for scanned files).
    pub(super) last_event: Instant,
    /// Closed after writing or renamed in (or found quiet by a scan): the settle timer runs.
    pub(super) closed: bool,
    /// Already warned that a writer holds it open.
    pub(super) warned_open: bool,
}

/// The pending files, and what settles them.
pub(super) struct Settler {
    pub(super) params: Arc<WatchParams>,
    pub(super) pending: HashMap<PathBuf, Pending>,
    pub(super) stats: Arc<WatchStats>,
    pub(super) rescan_interval: Duration,
    unreadable_warned: bool,
    /// The inotify watcher (dropped with the settler). Shared with the scans of new
    /// directories, which make sure the directory is watched before they list it.
    pub(super) watcher: Arc<std::sync::Mutex<Option<notify::RecommendedWatcher>>>,
    /// Which files some process holds open for writing ([`writers::open_for_write`]; tests
    /// put another look-up here).
    open_for_write: fn(&HashSet<(u64, u64)>) -> writers::Scan,
}

impl Settler {
    pub(super) fn new(params: WatchParams, stats: Arc<WatchStats>) -> Settler {
        let rescan_interval = params.rescan_interval;
        Settler {
            params: Arc::new(params),
            pending: HashMap::new(),
            stats,
            rescan_interval,
            unreadable_warned: false,
            watcher: Arc::new(std::sync::Mutex::new(None)),
            open_for_write: writers::open_for_write,
        }
    }

    fn rel<'a>(&self, path: &'a Path) -> Option<&'a Path> {
        let rel = path.strip_prefix(&self.params.root).ok()?;
        if rel.as_os_str().is_empty() {
            None
        } else {
            Some(rel)
        }
    }

    /// Handles one notify event; returns true when a full rescan is needed.
    pub(super) fn on_event(
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

    pub(super) fn spawn_scan(
        &self,
        sub: PathBuf,
        full: bool,
        tx: mpsc::Sender<(bool, ScanOutcome)>,
    ) {
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
            let outcome = scan::scan_and_filter(&params, &sub);
            let _ = tx.blocking_send((full, outcome));
        });
    }

    /// Adds what a scan found to the pending files; true when one of them is already due.
    pub(super) fn merge_scan(&mut self, outcome: ScanOutcome) -> bool {
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut any_due = false;
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
                    any_due |= age >= self.params.settle;
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
        any_due
    }

    /// Hands on every file whose settle time is over and that no process writes.
    pub(super) async fn settle_due(&mut self, out: &mpsc::Sender<Settled>) -> Result<(), ()> {
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
        let open_for_write = self.open_for_write;
        let all = targets.clone();
        let scan = match tokio::task::spawn_blocking(move || open_for_write(&targets)).await {
            Ok(scan) => scan,
            // The look-up failed (a panic reading /proc): it cannot say that nobody writes, so
            // every candidate is taken as open for writing and waits for the next tick.
            Err(e) => {
                warn!(error = %e, "cannot check which files are open for writing; waiting");
                writers::Scan {
                    open: all,
                    unreadable: 0,
                }
            }
        };
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::util::filter::{Filter, glob_set};

    fn panics(_: &HashSet<(u64, u64)>) -> writers::Scan {
        panic!("reading /proc failed")
    }

    /// When the look-up of open files fails (here it panics), a quiet file is not handed on
    /// as if nobody wrote it: it waits, still pending.
    #[tokio::test]
    async fn a_failed_writer_check_keeps_files_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.mp4");
        std::fs::write(&file, b"recording").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(60))
            .unwrap();
        let all = vec!["**/*".to_string()];
        let params = WatchParams {
            root: dir.path().to_path_buf(),
            filter: Filter::new(glob_set(&all).unwrap(), glob_set(&[]).unwrap()),
            settle: Duration::ZERO,
            rescan_interval: Duration::from_secs(600),
            journal_path: dir.path().join("j.db"),
            delete_after_upload: true,
        };
        let mut settler = Settler::new(params, Arc::new(WatchStats::default()));
        settler.open_for_write = panics;
        settler.pending.insert(
            PathBuf::from("a.mp4"),
            Pending {
                last_event: Instant::now() - Duration::from_secs(1),
                closed: true,
                warned_open: false,
            },
        );
        let (tx, mut rx) = mpsc::channel(4);
        settler.settle_due(&tx).await.unwrap();
        assert!(rx.try_recv().is_err(), "a file was settled unchecked");
        assert!(settler.pending.contains_key(Path::new("a.mp4")));
    }

    /// A scan that finds files already quiet says so, so that they are handed on at once
    /// rather than at the next tick (a backlog at start); a file written just now is not due.
    #[test]
    fn a_scan_reports_files_already_quiet() {
        let dir = tempfile::tempdir().unwrap();
        let all = vec!["**/*".to_string()];
        let params = WatchParams {
            root: dir.path().to_path_buf(),
            filter: Filter::new(glob_set(&all).unwrap(), glob_set(&[]).unwrap()),
            settle: Duration::from_secs(5),
            rescan_interval: Duration::from_secs(600),
            journal_path: dir.path().join("j.db"),
            delete_after_upload: true,
        };
        let found = |name: &str, age: u64| {
            let path = dir.path().join(name);
            std::fs::write(&path, b"recording").unwrap();
            let f = std::fs::File::options().write(true).open(&path).unwrap();
            f.set_modified(SystemTime::now() - Duration::from_secs(age))
                .unwrap();
            let meta = std::fs::metadata(&path).unwrap();
            (PathBuf::from(name), Identity::from_metadata(&meta))
        };
        let mut settler = Settler::new(params, Arc::new(WatchStats::default()));
        let outcome = |files| ScanOutcome {
            files,
            prunable: Vec::new(),
            dirs: 1,
        };
        assert!(!settler.merge_scan(outcome(vec![found("new.mp4", 0)])));
        assert!(settler.merge_scan(outcome(vec![found("old.mp4", 60), found("new2.mp4", 0)])));
        assert_eq!(settler.pending.len(), 3);
    }
}
