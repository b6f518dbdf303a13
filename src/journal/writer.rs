//! The journal's writer: one thread owns the write connection and commits in groups (see the
//! module documentation of `crate::journal`), and a small pool of read-only connections serves
//! the daemon's reads on the blocking pool.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::{Durability, JournalError, in_savepoint, open_ro, open_rw};
use crate::util::heartbeat::Heartbeat;

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
    /// Beats after every commit of the writer thread (liveness; see `service/health.rs`).
    heartbeat: Arc<Heartbeat>,
}

impl Journal {
    /// Opens the journal and starts its writer thread.
    pub fn open(path: &Path) -> Result<Journal, JournalError> {
        Journal::start(open_rw(path)?, path)
    }

    /// Starts the writer thread on `conn`, a connection [`open_rw`] opened on `path`.
    fn start(conn: Connection, path: &Path) -> Result<Journal, JournalError> {
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
            match conn.pragma_update(None, "synchronous", mode) {
                Ok(()) => sync_mode = want_sync,
                // A commit that must survive a power cut precedes an irreversible step (the
                // deleter's unlink): committed at NORMAL it would be answered as durable when
                // it is not. Those jobs are refused; the others go on at NORMAL.
                Err(e) if want_sync => {
                    let (durable, rest): (Vec<Job>, Vec<Job>) = group
                        .into_iter()
                        .partition(|j| j.durability() == Durability::Sync);
                    for job in durable {
                        job.refuse(format!("cannot make the commit durable: {e}"));
                    }
                    group = rest;
                }
                // Staying at FULL is only slower.
                Err(_) => {}
            }
        }
        if group.is_empty() {
            heartbeat.beat();
            continue;
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rusqlite::hooks::{AuthAction, AuthContext, Authorization};

    /// SQLite refuses to switch the writer to `synchronous = FULL` (here: an authorizer; in
    /// life, any error of that statement). A durable commit must then fail — the deleter
    /// unlinks only after one succeeded — while ordinary commits go on.
    #[tokio::test]
    async fn a_durable_commit_fails_when_full_sync_cannot_be_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        let conn = open_rw(&path).unwrap();
        conn.authorizer(Some(|ctx: AuthContext<'_>| match ctx.action {
            AuthAction::Pragma {
                pragma_name,
                pragma_value: Some(v),
            } if pragma_name.eq_ignore_ascii_case("synchronous")
                && v.to_ascii_uppercase().contains("FULL") =>
            {
                Authorization::Deny
            }
            _ => Authorization::Allow,
        }));
        let journal = Journal::start(conn, &path).unwrap();
        let durable = journal.write(Durability::Sync, super::super::barrier).await;
        assert!(durable.is_err(), "a durable commit succeeded at NORMAL");
        journal
            .write(Durability::Normal, super::super::barrier)
            .await
            .unwrap();
    }
}
