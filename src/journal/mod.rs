//! The journal: a SQLite database (WAL) that is the single source of truth about every file.
//!
//! # Rows and states
//!
//! One row per path relative to the watch root (`files.path`, raw bytes). A row moves through
//!
//! ```text
//!             ┌──────────── changed on disk ────────────┐
//!             v                                         │
//! (settled) queued ──> uploading ──> uploaded ──> deleted
//!             │  ^          │            (kept when delete_after_upload = false)
//!             │  └─ retry ──┤
//!             v             v
//!           failed       vanished (the file went away before it was stored)
//! ```
//!
//! plus `settling`: a known file that changed and waits to settle again. Rows are never removed:
//! look-ups need the key, size and MD5 after the local copy is gone.
//!
//! Every transition is committed before the side effect that depends on it: the multipart
//! upload id before the first part is sent, each part after the store acknowledged it,
//! `uploaded` (after the object was checked) before the local file is unlinked. Updates made by
//! a worker carry the row's `generation`; a row that was re-queued meanwhile (the file changed)
//! has a new generation and the stale worker's updates match nothing.
//!
//! # Threads
//!
//! All writes go through one thread that owns the write connection and commits in groups:
//! whatever jobs are waiting are run in one transaction (each in its own savepoint, so one
//! failing job does not undo the others) and their callers are answered after the commit.
//! Commits are `synchronous = NORMAL` (safe against a killed process) unless a job in the
//! group asked for [`Durability::Sync`], which is used where an irreversible step follows
//! (unlinking the local file) so that a power cut cannot lose the `uploaded` row either; if
//! the writer cannot switch to `synchronous = FULL`, those jobs are refused, never committed
//! at NORMAL. Reads use a small pool of read-only connections on the blocking thread pool;
//! WAL lets them run while the writer commits, and lets the CLI read while the daemon runs.
//! Look-ups read on their own thread through [`LookupReader`].
//!
//! # Files
//!
//! Every SQL statement of the crate is in this module, behind a named function:
//!
//! - `schema`: tables, triggers and migrations (`PRAGMA user_version`).
//! - `writer`: [`Journal`], the writer thread and the daemon's read pool.
//! - `rows`: [`State`], [`FileRow`] and the queries that read rows.
//! - `transitions`: every write of the state machine.
//! - `stores`: which store holds a row's object (primary or standby), uploads abandoned on a
//!   store, and the moves of copy-back.
//! - `outbox`: the notification outbox (receivers, events waiting, delivery bookkeeping) and
//!   the status page's queries.
//! - `status`: figures for `status`, `STATUS=` and the metrics.
//! - `reader`: look-ups' shared read snapshots, the stored-row scan and the `unstored` log
//!   the look-up index follows.

mod outbox;
mod page;
mod reader;
mod rows;
mod schema;
mod status;
mod stores;
mod transitions;
mod writer;

pub use outbox::*;
pub use page::*;
pub use reader::*;
pub use rows::*;
pub use schema::UNSTORED_LOG_KEPT;
pub use status::*;
pub use stores::*;
pub use transitions::*;
pub use writer::Journal;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("journal {path}: cannot create directory: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "journal {path} was written by a newer record-offload (schema {found}, this build knows {known})"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("journal: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("journal: the writer thread has stopped")]
    Closed,
    #[error("journal: {0}")]
    Invalid(String),
}

/// Whether a commit must reach the disk before the caller goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Survives a killed process (the normal case).
    Normal,
    /// Survives a power cut: used before irreversible steps.
    Sync,
}

/// Opens (creating if needed) the journal with the pragmas every connection uses and brings the
/// schema up to date.
pub fn open_rw(path: &Path) -> Result<Connection, JournalError> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(|source| JournalError::CreateDir {
            path: path.to_path_buf(),
            source,
        })?;
    }
    let open = |p: &Path| -> rusqlite::Result<Connection> {
        let conn = Connection::open_with_flags(
            p,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Fail loudly instead of silently rebuilding: a damaged journal is an operator matter.
        let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if check != "ok" {
            // The check's report spans lines: errors are one line.
            let check = check.split_whitespace().collect::<Vec<_>>().join(" ");
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
                Some(format!("integrity check failed: {check}")),
            ));
        }
        Ok(conn)
    };
    let mut conn = open(path).map_err(|source| JournalError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    schema::migrate(&mut conn, path)?;
    Ok(conn)
}

/// Opens the journal for reading only (the CLI while the daemon runs, look-ups).
pub fn open_ro(path: &Path) -> Result<Connection, JournalError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| JournalError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    conn.busy_timeout(Duration::from_secs(10))?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > schema::VERSION {
        return Err(JournalError::TooNew {
            path: path.to_path_buf(),
            found: version,
            known: schema::VERSION,
        });
    }
    if version < schema::VERSION {
        return Err(JournalError::Invalid(format!(
            "{} has schema {version}; start the daemon once to upgrade it",
            path.display()
        )));
    }
    Ok(conn)
}

/// Runs `f` inside a savepoint: its changes are kept together or not at all, whether or not
/// a transaction is open around it.
fn in_savepoint<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, JournalError>,
) -> Result<T, JournalError> {
    conn.execute_batch("SAVEPOINT job")?;
    match f(conn) {
        Ok(v) => {
            conn.execute_batch("RELEASE job")?;
            Ok(v)
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK TO job; RELEASE job");
            Err(e)
        }
    }
}

/// Runs `f` in a write transaction of its own (`BEGIN IMMEDIATE`): a command writing beside
/// the running daemon (`import`) takes its turn with the daemon's writer for the whole batch.
pub fn write_batch<T>(
    conn: &mut Connection,
    f: impl FnOnce(&Connection) -> Result<T, JournalError>,
) -> Result<T, JournalError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let out = f(&tx)?;
    tx.commit()?;
    Ok(out)
}
