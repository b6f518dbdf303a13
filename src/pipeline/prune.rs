//! Removing directories that deletions left empty.
//!
//! A directory is removed only when it is empty and its mtime is older than
//! `watch.prune_after_secs` (a recorder may still be about to write its next file there), and
//! only directories that held a file this daemon uploaded and removed are considered, so a
//! directory a recorder prepared in advance is left alone. `rmdir` refuses non-empty
//! directories atomically, so a file created at the last moment is never lost. The root is
//! never removed. When removing a directory empties its parent, the parent goes too if it had
//! been untouched for the prune time before that removal.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::util::fs::{Kind, RmdirOutcome, Root};

pub async fn run(
    root: Arc<Root>,
    prune_after: Duration,
    mut rx: mpsc::Receiver<PathBuf>,
    cancel: CancellationToken,
) {
    // Directory → when to look at it next.
    let mut due: HashMap<PathBuf, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(
        Duration::from_secs(1).min(prune_after.max(Duration::from_millis(100))),
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            Some(dir) = rx.recv() => {
                if !dir.as_os_str().is_empty() {
                    due.entry(dir).or_insert_with(Instant::now);
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let ready: Vec<PathBuf> = due.iter().filter(|(_, t)| **t <= now).map(|(d, _)| d.clone()).collect();
                if ready.is_empty() {
                    continue;
                }
                for d in &ready {
                    due.remove(d);
                }
                let root = root.clone();
                let later = tokio::task::spawn_blocking(move || {
                    ready.into_iter().filter_map(|d| prune_chain(&root, &d, prune_after).map(|w| (d, w))).collect::<Vec<_>>()
                }).await.unwrap_or_default();
                for (d, wait) in later {
                    due.insert(d, Instant::now() + wait);
                }
            }
        }
    }
}

/// Tries to remove `dir` and then its emptied parents. Returns how long to wait before trying
/// `dir` again, if it is still too recent.
fn prune_chain(root: &Root, dir: &Path, prune_after: Duration) -> Option<Duration> {
    let mut current = dir.to_path_buf();
    let mut idle = prune_after;
    loop {
        if current.as_os_str().is_empty() {
            return None;
        }
        let parent = current.parent().map(Path::to_path_buf).unwrap_or_default();
        // The parent's age before this removal touches it.
        let parent_age = if parent.as_os_str().is_empty() {
            None
        } else {
            match root.stat(&parent) {
                Ok((Kind::Dir, id)) => SystemTime::now().duration_since(id.mtime()).ok(),
                _ => None,
            }
        };
        match root.rmdir_if_idle(&current, idle) {
            Ok(RmdirOutcome::Removed) => {
                debug!(dir = %current.display(), "removed empty directory");
            }
            Ok(RmdirOutcome::TooRecent(wait)) => {
                return (current == dir).then_some(wait + Duration::from_millis(50));
            }
            Ok(RmdirOutcome::NotEmpty | RmdirOutcome::Gone) => return None,
            Err(e) => {
                warn!(dir = %current.display(), error = %e, "cannot remove empty directory");
                return None;
            }
        }
        match parent_age {
            Some(age) if age >= prune_after => {
                current = parent;
                // It was idle before we touched it.
                idle = Duration::ZERO;
            }
            _ => return None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn prunes_chain_but_not_root_or_busy_dirs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b/c")).unwrap();
        std::fs::create_dir_all(dir.path().join("x/y")).unwrap();
        std::fs::write(dir.path().join("x/keep"), b"k").unwrap();
        let root = Root::open(dir.path()).unwrap();
        // Too recent.
        assert!(prune_chain(&root, Path::new("a/b/c"), Duration::from_secs(3600)).is_some());
        assert!(dir.path().join("a/b/c").exists());
        // Idle: the whole chain goes, the root stays.
        assert!(prune_chain(&root, Path::new("a/b/c"), Duration::ZERO).is_none());
        assert!(!dir.path().join("a").exists());
        assert!(dir.path().exists());
        // y goes, x holds a file and stays.
        assert!(prune_chain(&root, Path::new("x/y"), Duration::ZERO).is_none());
        assert!(!dir.path().join("x/y").exists());
        assert!(dir.path().join("x/keep").exists());
    }
}
