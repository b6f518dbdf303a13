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
//! (unlinking the local file) so that a power cut cannot lose the `uploaded` row either.
//! Reads use a small pool of read-only connections on the blocking thread pool; WAL lets them
//! run while the writer commits, and lets the CLI read while the daemon runs.

mod ops;
mod schema;

pub use ops::*;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use crate::util::heartbeat::Heartbeat;

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

type Done = Box<dyn FnOnce(Result<(), String>) + Send>;

/// A queued write: run it inside the group's transaction, or refuse it if there is none.
trait WriteJob: Send {
    fn durability(&self) -> Durability;
    fn run(self: Box<Self>, conn: &Connection) -> Done;
    fn refuse(self: Box<Self>, error: String);
}

struct JobImpl<T, F> {
    durability: Durability,
    f: F,
    reply: oneshot::Sender<Result<T, JournalError>>,
}

impl<T, F> WriteJob for JobImpl<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T, JournalError> + Send + 'static,
{
    fn durability(&self) -> Durability {
        self.durability
    }

    fn run(self: Box<Self>, conn: &Connection) -> Done {
        let JobImpl { f, reply, .. } = *self;
        let result = in_savepoint(conn, f);
        Box::new(move |commit: Result<(), String>| {
            let out = match (result, commit) {
                (Err(e), _) => Err(e),
                (Ok(_), Err(e)) => Err(JournalError::Invalid(format!("commit failed: {e}"))),
                (Ok(v), Ok(())) => Ok(v),
            };
            let _ = reply.send(out);
        })
    }

    fn refuse(self: Box<Self>, error: String) {
        let _ = self.reply.send(Err(JournalError::Invalid(error)));
    }
}

type Job = Box<dyn WriteJob>;

/// Handle to the journal for the daemon (cheap to clone).
#[derive(Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    tx: mpsc::Sender<Job>,
    readers: Mutex<Vec<Connection>>,
    /// Beats after every commit of the writer thread (liveness; see `crate::health`).
    heartbeat: Arc<Heartbeat>,
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

impl Journal {
    /// Opens the journal and starts its writer thread.
    pub fn open(path: &Path) -> Result<Journal, JournalError> {
        let conn = open_rw(path)?;
        let (tx, rx) = mpsc::channel::<Job>(4096);
        let heartbeat = Arc::new(Heartbeat::default());
        let beat = heartbeat.clone();
        std::thread::Builder::new()
            .name("journal-writer".to_string())
            .spawn(move || writer_loop(conn, rx, &beat))
            .map_err(|e| JournalError::Invalid(format!("cannot start writer thread: {e}")))?;
        Ok(Journal {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                tx,
                readers: Mutex::new(Vec::new()),
                heartbeat,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The writer thread's heartbeat: the last time it finished a transaction.
    pub fn heartbeat(&self) -> Arc<Heartbeat> {
        self.inner.heartbeat.clone()
    }

    /// An empty transaction: proves the writer thread still commits (liveness probe).
    pub async fn probe(&self) -> Result<(), JournalError> {
        self.write(Durability::Normal, |_| Ok(())).await
    }

    /// False once the writer thread has stopped (nothing can be committed any more).
    pub fn is_running(&self) -> bool {
        !self.inner.tx.is_closed()
    }

    /// Runs `f` in the writer thread inside a transaction and returns its result once the
    /// transaction is committed. An error from `f` rolls back only `f`'s changes.
    pub async fn write<T, F>(&self, durability: Durability, f: F) -> Result<T, JournalError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, JournalError> + Send + 'static,
    {
        let (reply, orx) = oneshot::channel::<Result<T, JournalError>>();
        let job: Job = Box::new(JobImpl {
            durability,
            f,
            reply,
        });
        self.inner
            .tx
            .send(job)
            .await
            .map_err(|_| JournalError::Closed)?;
        orx.await.map_err(|_| JournalError::Closed)?
    }

    /// Runs `f` on a read-only connection on the blocking pool.
    pub async fn read<T, F>(&self, f: F) -> Result<T, JournalError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, JournalError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let conn = match inner.readers.lock() {
                Ok(mut pool) => pool.pop(),
                Err(_) => None,
            };
            let conn = match conn {
                Some(c) => c,
                None => open_ro(&inner.path)?,
            };
            let out = f(&conn);
            if let Ok(mut pool) = inner.readers.lock()
                && pool.len() < 8
            {
                pool.push(conn);
            }
            out
        })
        .await
        .map_err(|e| JournalError::Invalid(format!("read task failed: {e}")))?
    }
}

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

/// Most jobs committed in one transaction.
const MAX_GROUP: usize = 512;

fn writer_loop(conn: Connection, mut rx: mpsc::Receiver<Job>, heartbeat: &Heartbeat) {
    let mut sync_mode = false;
    while let Some(first) = rx.blocking_recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        let want_sync = group.iter().any(|j| j.durability() == Durability::Sync);
        if want_sync != sync_mode {
            let mode = if want_sync { "FULL" } else { "NORMAL" };
            if conn.pragma_update(None, "synchronous", mode).is_ok() {
                sync_mode = want_sync;
            }
        }
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            let msg = format!("cannot begin a transaction: {e}");
            for job in group {
                job.refuse(msg.clone());
            }
            continue;
        }
        let done: Vec<Done> = group.into_iter().map(|job| job.run(&conn)).collect();
        let commit = conn.execute_batch("COMMIT").map_err(|e| e.to_string());
        if commit.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        for d in done {
            d(commit.clone());
        }
        heartbeat.beat();
    }
}
