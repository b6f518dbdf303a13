//! `record-offload import`: queues the files of an existing tree in the journal — for hosts
//! that had recordings before the package was installed, or to see (`--dry-run`) what the
//! daemon is going to take.
//!
//! The walk is the daemon's own scan (same include/exclude rules, no symbolic links, excluded
//! directories not entered) and each file goes through the same journal transition as a
//! settled file ([`journal::intake`]), so importing a file the journal already knows changes
//! nothing. Files modified within `watch.settle_secs` or held open for writing by some process
//! are skipped and counted: the daemon takes them once they settle.
//!
//! It writes through its own connection in short transactions, so it runs while the daemon
//! runs (WAL): the daemon's scheduler sees the new `queued` rows at its next pass. A dry run
//! opens the journal read-only (or not at all, if there is none yet) and writes nothing.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use rusqlite::Connection;
use serde::Serialize;
use thiserror::Error;

use super::human_bytes;
use crate::config::{self, Settings, Source};
use crate::journal::{self, Intake, JournalError};
use crate::pipeline::watch::{scan, writers};
use crate::util::fs::Identity;
use crate::util::keys::KeyTemplate;

/// Files per journal transaction: short enough not to hold up the daemon's writer.
const BATCH: usize = 256;
/// Problems listed in the report (the count covers all).
const MAX_LISTED: usize = 20;

#[derive(Debug, Error)]
pub enum ImportError {
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// Progress of an import, for a progress bar.
pub trait Progress {
    /// The walk of the tree begins.
    fn scanning(&self, _root: &Path) {}
    /// The walk is over; `total` files are to be recorded.
    fn recording(&self, _total: u64) {}
    /// `n` more files were recorded.
    fn advance(&self, _n: u64) {}
    /// All done.
    fn finish(&self) {}
}

/// No progress display.
pub struct Quiet;
impl Progress for Quiet {}

/// What an import found and did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Report {
    pub dry_run: bool,
    /// Files under the root that match the include/exclude rules.
    pub found: u64,
    pub found_bytes: u64,
    /// Queued for upload (or, in a dry run, would be).
    pub queued: u64,
    pub queued_bytes: u64,
    /// The journal already has these files as they are (queued, uploading or failed).
    pub already_known: u64,
    /// Already stored; the daemon removes their local copies at its next scan.
    pub already_stored: u64,
    /// Modified within `watch.settle_secs`.
    pub skipped_recent: u64,
    /// Held open for writing by some process.
    pub skipped_open: u64,
    /// Processes whose open files could not be read (run as root to see them all).
    pub processes_unreadable: u64,
    /// Entries the walk could not read.
    pub unreadable: u64,
    /// Files that could not be queued (bad key, key used by another path).
    pub failed: u64,
    /// The first few problems, one line each.
    pub problems: Vec<String>,
}

impl Report {
    fn problem(&mut self, msg: String) {
        if self.problems.len() < MAX_LISTED {
            self.problems.push(msg);
        }
    }
}

/// Walks `watch.root` and queues what is finished. See the module doc.
pub fn import(
    settings: &Settings,
    dry_run: bool,
    progress: &dyn Progress,
) -> Result<Report, ImportError> {
    let cfg = &settings.config;
    let template = &settings.template;
    let filter = &settings.filter;
    let mut report = Report {
        dry_run,
        ..Report::default()
    };

    progress.scanning(&cfg.watch.root);
    let walked = scan::scan(&cfg.watch.root, Path::new(""), filter);
    report.unreadable = walked.errors.len() as u64;
    for e in walked.errors.iter().take(5) {
        report.problem(format!("cannot read: {e}"));
    }
    let candidates = settled(settings, walked.files, &mut report);

    let mut conn = open_journal(&cfg.journal.path, dry_run)?;
    progress.recording(candidates.len() as u64);
    for chunk in candidates.chunks(BATCH) {
        let outcomes = match conn.as_mut() {
            None => chunk
                .iter()
                .map(|(rel, _)| {
                    template
                        .render(&cfg.node.name, rel)
                        .map(|_| Intake::Queued { id: 0 })
                })
                .collect(),
            Some(c) if dry_run => record(c, chunk, template, settings, true)?,
            Some(c) => journal::write_batch(c, |tx| record(tx, chunk, template, settings, false))?,
        };
        for ((rel, id), outcome) in chunk.iter().zip(outcomes) {
            match outcome {
                Ok(Intake::Queued { .. }) => {
                    report.queued += 1;
                    report.queued_bytes += id.size;
                }
                Ok(Intake::Unchanged) => report.already_known += 1,
                Ok(Intake::DeletePending { .. }) => report.already_stored += 1,
                Ok(Intake::KeyCollision { other }) => {
                    report.failed += 1;
                    report.problem(format!(
                        "{}: its object key is already used by {}",
                        rel.display(),
                        other.display()
                    ));
                }
                Err(msg) => {
                    report.failed += 1;
                    report.problem(format!("{}: {msg}", rel.display()));
                }
            }
        }
        progress.advance(chunk.len() as u64);
    }
    progress.finish();
    Ok(report)
}

/// A progress bar on stderr (drawn only when stderr is a terminal).
struct Bar(indicatif::ProgressBar);

impl Progress for Bar {
    fn scanning(&self, root: &std::path::Path) {
        self.0.set_message(format!("scanning {}", root.display()));
        self.0
            .enable_steady_tick(std::time::Duration::from_millis(120));
    }
    fn recording(&self, total: u64) {
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {human_pos}/{human_len} files ({eta} left)",
        ) {
            self.0.set_style(style.progress_chars("=> "));
        }
        self.0.set_message("queueing");
        self.0.set_length(total);
        self.0.set_position(0);
    }
    fn advance(&self, n: u64) {
        self.0.inc(n);
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

/// `record-offload import`: runs [`import`] with a progress bar and prints its report.
pub(super) fn command(source: &Source, dry_run: bool, json: bool) -> ExitCode {
    let settings = match config::load_without_secret(source) {
        Ok(s) => s,
        Err(e) => return super::cli::fail(&e.to_string(), 2),
    };
    let bar = Bar(indicatif::ProgressBar::new_spinner());
    let report = match import(&settings, dry_run, &bar) {
        Ok(r) => r,
        Err(e) => {
            bar.0.finish_and_clear();
            return super::cli::fail(&e.to_string(), 2);
        }
    };
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(j) => println!("{j}"),
            Err(e) => return super::cli::fail(&e.to_string(), 2),
        }
    } else {
        print_import(&settings, &report);
    }
    if report.failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn print_import(settings: &Settings, r: &Report) {
    let root = settings.config.watch.root.display();
    println!(
        "found {} files ({}) under {root}",
        r.found,
        human_bytes(r.found_bytes)
    );
    let verb = if r.dry_run { "would queue" } else { "queued" };
    println!("{verb} {} ({})", r.queued, human_bytes(r.queued_bytes));
    if r.already_known > 0 {
        println!("already in the journal: {}", r.already_known);
    }
    if r.already_stored > 0 {
        println!(
            "already stored: {} (the daemon removes their local copies at its next scan)",
            r.already_stored
        );
    }
    if r.skipped_recent + r.skipped_open > 0 {
        println!(
            "skipped, not finished yet: {} modified within watch.settle_secs ({} s), {} open for writing (the daemon takes them once they settle)",
            r.skipped_recent, settings.config.watch.settle_secs, r.skipped_open
        );
    }
    if r.processes_unreadable > 0 {
        println!(
            "note: the open files of {} processes could not be read; run as root to check them all",
            r.processes_unreadable
        );
    }
    if r.unreadable > 0 {
        println!("could not read {} entries", r.unreadable);
    }
    if r.failed > 0 {
        println!("could not queue {}:", r.failed);
    }
    for p in &r.problems {
        println!("  {p}");
    }
    if r.dry_run {
        println!("dry run: nothing was written");
    }
}

/// Drops (and counts) the files that are not finished: modified within the settle time, or
/// open for writing.
fn settled(
    settings: &Settings,
    files: Vec<(PathBuf, Identity)>,
    report: &mut Report,
) -> Vec<(PathBuf, Identity)> {
    let settle = settings.settle();
    let now = SystemTime::now();
    let mut quiet = Vec::with_capacity(files.len());
    for (rel, id) in files {
        report.found += 1;
        report.found_bytes += id.size;
        // An mtime in the future says nothing about activity; the daemon ignores it too.
        let age = now.duration_since(id.mtime()).unwrap_or(Duration::MAX);
        if age < settle {
            report.skipped_recent += 1;
        } else {
            quiet.push((rel, id));
        }
    }
    let targets: HashSet<(u64, u64)> = quiet.iter().map(|(_, id)| (id.dev, id.ino)).collect();
    let open = writers::open_for_write(&targets);
    report.processes_unreadable = open.unreadable as u64;
    quiet.retain(|(_, id)| {
        let busy = open.open.contains(&(id.dev, id.ino));
        if busy {
            report.skipped_open += 1;
        }
        !busy
    });
    quiet
}

/// Runs the intake (or its preview) for each file; a file's own problem is its `Err`.
fn record(
    conn: &Connection,
    chunk: &[(PathBuf, Identity)],
    template: &KeyTemplate,
    settings: &Settings,
    dry_run: bool,
) -> Result<Vec<Result<Intake, String>>, JournalError> {
    let cfg = &settings.config;
    let mut out = Vec::with_capacity(chunk.len());
    for (rel, id) in chunk {
        let key = match template.render(&cfg.node.name, rel) {
            Ok(k) => k,
            Err(e) => {
                out.push(Err(e));
                continue;
            }
        };
        let dau = cfg.upload.delete_after_upload;
        let r = if dry_run {
            journal::intake_preview(conn, rel, &key, id, dau)?
        } else {
            journal::intake(conn, rel, &key, id, dau)?
        };
        out.push(Ok(r));
    }
    Ok(out)
}

/// The journal for an import: read-only for a dry run (none if it does not exist yet),
/// otherwise opened (created) for writing with the ownership the daemon needs.
fn open_journal(path: &Path, dry_run: bool) -> Result<Option<Connection>, JournalError> {
    if dry_run {
        return if path.exists() {
            journal::open_ro(path).map(Some)
        } else {
            Ok(None)
        };
    }
    let conn = journal::open_rw(path)?;
    give_to_directory_owner(path);
    Ok(Some(conn))
}

/// An operator runs `import` as root, the daemon runs as its own user: a journal file root
/// creates here must belong to the owner of the journal's directory (the daemon's state
/// directory), or the daemon could not write it. Best effort; only root can do it anyway.
fn give_to_directory_owner(path: &Path) {
    use std::os::unix::fs::MetadataExt;
    if !rustix::process::geteuid().is_root() {
        return;
    }
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return;
    };
    let Ok(dm) = std::fs::metadata(dir) else {
        return;
    };
    let mut names = vec![path.as_os_str().to_owned()];
    for suffix in ["-wal", "-shm"] {
        let mut n = path.as_os_str().to_owned();
        n.push(suffix);
        names.push(n);
    }
    for n in names {
        let p = Path::new(&n);
        if let Ok(m) = std::fs::symlink_metadata(p)
            && m.is_file()
            && (m.uid() != dm.uid() || m.gid() != dm.gid())
        {
            let _ = std::os::unix::fs::chown(p, Some(dm.uid()), Some(dm.gid()));
        }
    }
}
