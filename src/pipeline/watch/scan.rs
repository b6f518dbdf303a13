//! A walk of the tree (or of one new subtree) under the root: the startup scan, the periodic
//! reconcile scan and the scan after an inotify overflow all use it. Symbolic links are never
//! followed; excluded directories are not entered.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use tracing::warn;
use walkdir::WalkDir;

use super::WatchParams;
use crate::journal::{self, State};
use crate::util::filter::Filter;
use crate::util::fs::Identity;

#[derive(Debug, Default)]
pub struct ScanResult {
    /// Regular files that match the filter, relative to the root.
    pub files: Vec<(PathBuf, Identity)>,
    /// Directories (not the root) with no entry at all.
    pub empty_dirs: Vec<PathBuf>,
    /// Directories seen, the root included.
    pub dirs: usize,
    /// Entries that could not be read.
    pub errors: Vec<String>,
}

/// Walks `root/sub` (`sub` empty: the whole tree).
pub fn scan(root: &Path, sub: &Path, filter: &Filter) -> ScanResult {
    let mut out = ScanResult::default();
    let start = root.join(sub);
    if !sub.as_os_str().is_empty() && filter.dir_excluded(sub) {
        return out;
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut parents: HashSet<PathBuf> = HashSet::new();
    let walker = WalkDir::new(&start)
        .follow_links(false)
        .into_iter()
        .filter_entry(|e| {
            if e.depth() == 0 || !e.file_type().is_dir() {
                return true;
            }
            match e.path().strip_prefix(root) {
                Ok(rel) => !filter.dir_excluded(rel),
                Err(_) => false,
            }
        });
    for entry in walker {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                out.errors.push(e.to_string());
                continue;
            }
        };
        let Ok(rel) = entry.path().strip_prefix(root) else {
            continue;
        };
        if let Some(parent) = rel.parent() {
            parents.insert(parent.to_path_buf());
        }
        let ft = entry.file_type();
        if ft.is_dir() {
            out.dirs += 1;
            if !rel.as_os_str().is_empty() {
                dirs.push(rel.to_path_buf());
            }
            continue;
        }
        if !ft.is_file() || !filter.file_matches_in_walk(rel) {
            continue;
        }
        match entry.metadata() {
            Ok(m) => out
                .files
                .push((rel.to_path_buf(), Identity::from_metadata(&m))),
            Err(e) => out.errors.push(e.to_string()),
        }
    }
    out.empty_dirs = dirs.into_iter().filter(|d| !parents.contains(d)).collect();
    out
}

/// What a scan found, for the settler.
pub(super) struct ScanOutcome {
    /// Files to consider, with the age of their mtime (None: in the future).
    pub(super) files: Vec<(PathBuf, Identity)>,
    pub(super) prunable: Vec<PathBuf>,
    pub(super) dirs: usize,
}

/// Walks `sub` and drops what the journal already knows in the same state.
pub(super) fn scan_and_filter(params: &WatchParams, sub: &Path) -> ScanOutcome {
    let res = scan(&params.root, sub, &params.filter);
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use globset::{Glob, GlobSetBuilder};

    #[test]
    fn walks_without_following_links_or_entering_excluded_dirs() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("o.mp4"), b"o").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::fs::create_dir_all(r.join("a/b")).unwrap();
        std::fs::create_dir_all(r.join("empty")).unwrap();
        std::fs::create_dir_all(r.join(".skip")).unwrap();
        std::fs::write(r.join("a/b/x.mp4"), b"x").unwrap();
        std::fs::write(r.join("a/y.tmp"), b"y").unwrap();
        std::fs::write(r.join(".skip/z.mp4"), b"z").unwrap();
        std::os::unix::fs::symlink(outside.path(), r.join("link")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("o.mp4"), r.join("l.mp4")).unwrap();
        let mut inc = GlobSetBuilder::new();
        inc.add(Glob::new("**/*").unwrap());
        let mut exc = GlobSetBuilder::new();
        exc.add(Glob::new("**/.*").unwrap());
        exc.add(Glob::new("**/*.tmp").unwrap());
        let f = Filter::new(inc.build().unwrap(), exc.build().unwrap());
        let res = scan(r, Path::new(""), &f);
        let files: Vec<_> = res.files.iter().map(|(p, _)| p.clone()).collect();
        assert_eq!(files, vec![PathBuf::from("a/b/x.mp4")]);
        assert_eq!(res.empty_dirs, vec![PathBuf::from("empty")]);
        let res = scan(r, Path::new("a"), &f);
        assert_eq!(res.files.len(), 1);
    }
}
