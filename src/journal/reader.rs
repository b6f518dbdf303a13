//! Reads for look-ups, on the look-up server's own thread (and `record-offload resolve`).
//!
//! Starting a read transaction costs SQLite two `fcntl` locks and an `fstat` — about as much
//! as the indexed read itself on a large journal. So look-ups share one open read transaction
//! (a snapshot) for up to [`SNAPSHOT_SECS`]: an answer may be that much older than the last
//! commit, which the resolver allows for (a look-up that finds neither a stored row nor the
//! file reads again outside the snapshot, [`LookupReader::row_fresh`]). The look-up server ends
//! an unused snapshot on a timer ([`LookupReader::maintain`], every 50 ms), so an idle server
//! does not hold the WAL back from its checkpoints.
//!
//! A [`SnapshotCache`] (the look-up index, `lookup/index.rs`) may be kept in step with the
//! snapshot: when a snapshot begins it catches up with the journal through the `unstored` log
//! ([`Snapshot::unstored_after`]), and it learns the stored rows look-ups read in that same
//! snapshot, so cache and journal agree as of the snapshot in use. It is built from
//! [`scan_stored`], one snapshot of its own.
//!
//! The reads run inline on the calling thread: in WAL mode readers never wait for the writer,
//! and the point query takes microseconds, far less than a hop to the blocking pool would.

use std::ops::ControlFlow;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension};

use super::{JournalError, State, StoreId, open_ro};

/// Read connections kept for reuse.
const MAX_POOLED: usize = 16;
/// How long look-ups share one read transaction.
pub const SNAPSHOT_SECS: f64 = 0.01;

/// What the journal says about a path (only the columns a look-up needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub state: State,
    pub key: String,
    pub size: u64,
    pub md5: Option<String>,
    pub bytes_sent: u64,
    pub mtime_ns: Option<i64>,
    /// The store that holds the object (or that its upload goes to).
    pub store: StoreId,
}

/// What a look-up found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found<H> {
    /// The [`SnapshotCache`]'s answer.
    Cached(H),
    Row(Row),
}

/// A stored row as the journal has it: what a cache of stored files may hold.
#[derive(Debug, Clone, Copy)]
pub struct StoredRow<'a> {
    pub path: &'a [u8],
    pub key: &'a str,
    pub size: u64,
    pub md5: Option<&'a str>,
}

/// A cache of the journal kept current with the snapshot look-ups share. Its calls are made
/// under the reader's snapshot lock, with that snapshot.
pub trait SnapshotCache: Send {
    /// What the cache answers for a path.
    type Hit;
    /// A snapshot began: catch up with the journal as of it.
    fn refresh(&mut self, snapshot: &Snapshot<'_>);
    /// Whether the cache waits for a refresh to become usable (a finished build to adopt): the
    /// reader's timer then opens a short snapshot for it, so an idle server needs no look-up.
    fn wants_refresh(&self) -> bool;
    fn get(&self, rel: &Path) -> Option<Self::Hit>;
    /// A look-up read this stored row in the current snapshot.
    fn learn(&mut self, row: StoredRow<'_>);
}

/// The snapshot in use, for a cache's catch-up reads.
pub struct Snapshot<'a>(&'a Connection);

impl Snapshot<'_> {
    /// The `unstored` log's entries after `seq`, in order: `f(seq, path)` for each until it
    /// returns `false`.
    pub fn unstored_after(
        &self,
        seq: i64,
        mut f: impl FnMut(i64, &[u8]) -> bool,
    ) -> Result<(), JournalError> {
        let mut stmt = self
            .0
            .prepare_cached("SELECT seq, path FROM unstored WHERE seq > ?1 ORDER BY seq")?;
        let mut rows = stmt.query([seq])?;
        while let Some(r) = rows.next()? {
            let seq: i64 = r.get(0)?;
            let path = r
                .get_ref(1)?
                .as_blob_or_null()
                .map_err(column)?
                .unwrap_or_default();
            if !f(seq, path) {
                break;
            }
        }
        Ok(())
    }
}

/// Pooled read-only connections and the snapshot look-ups share, with an optional cache kept
/// in step with it.
pub struct LookupReader<C> {
    path: PathBuf,
    pool: Mutex<Vec<Connection>>,
    shared: Mutex<Shared<C>>,
}

/// What look-ups share, under one lock: the snapshot and the cache kept current with it.
struct Shared<C> {
    /// A connection inside a read transaction, and when that began.
    snapshot: Option<(Connection, Instant)>,
    cache: Option<C>,
}

impl<C: SnapshotCache> LookupReader<C> {
    /// Opens one connection at once, so a missing or unreadable journal is reported now.
    pub fn new(path: &Path) -> Result<LookupReader<C>, JournalError> {
        let reader = LookupReader {
            path: path.to_path_buf(),
            pool: Mutex::new(Vec::new()),
            shared: Mutex::new(Shared {
                snapshot: None,
                cache: None,
            }),
        };
        let conn = reader.open()?;
        reader.put(conn);
        Ok(reader)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open(&self) -> Result<Connection, JournalError> {
        let conn = open_ro(&self.path)?;
        // Writers never block WAL readers; a short timeout bounds the rare waits (WAL recovery).
        conn.busy_timeout(Duration::from_millis(500))?;
        map_pages(&conn);
        Ok(conn)
    }

    fn put(&self, conn: Connection) {
        if let Ok(mut pool) = self.pool.lock()
            && pool.len() < MAX_POOLED
        {
            pool.push(conn);
        }
    }

    fn take(&self) -> Result<Connection, JournalError> {
        match self.pool.lock().ok().and_then(|mut p| p.pop()) {
            Some(c) => Ok(c),
            None => self.open(),
        }
    }

    /// Keeps `cache` current with the snapshots from now on.
    pub fn set_cache(&self, cache: C) {
        if let Ok(mut shared) = self.shared.lock() {
            shared.cache = Some(cache);
        }
    }

    /// `f` of the cache, `None` when there is none.
    pub fn with_cache<R>(&self, f: impl FnOnce(&C) -> R) -> Option<R> {
        let shared = self.shared.lock().ok()?;
        shared.cache.as_ref().map(f)
    }

    /// What the journal holds for `rel`, as of the shared snapshot (at most [`SNAPSHOT_SECS`]
    /// old).
    pub fn find(&self, rel: &Path) -> Result<Option<Found<C::Hit>>, JournalError> {
        // Another thread using the snapshot right now: read on a connection of its own.
        let Ok(mut shared) = self.shared.try_lock() else {
            return Ok(self.row_fresh(rel)?.map(Found::Row));
        };
        let shared = &mut *shared;
        let max_age = Duration::from_secs_f64(SNAPSHOT_SECS);
        if shared
            .snapshot
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() >= max_age)
            && let Some((conn, _)) = shared.snapshot.take()
        {
            self.end(conn);
        }
        if shared.snapshot.is_none() {
            let conn = self.take()?;
            conn.execute_batch("BEGIN")?;
            // The snapshot begins with the cache's catch-up read, so the cache agrees with it.
            if let Some(cache) = &mut shared.cache {
                cache.refresh(&Snapshot(&conn));
            }
            shared.snapshot = Some((conn, Instant::now()));
        }
        if let Some(hit) = shared.cache.as_ref().and_then(|c| c.get(rel)) {
            return Ok(Some(Found::Cached(hit)));
        }
        let Some((conn, _)) = shared.snapshot.as_ref() else {
            return Ok(self.row_fresh(rel)?.map(Found::Row));
        };
        let out = query_row(conn, rel);
        match &out {
            // The cache holds objects on the primary only: a row on the standby is read from
            // the journal each time (few rows, and only while failed over or copying back).
            Ok(Some(row)) if row.state.is_stored() && row.store == StoreId::Primary => {
                if let Some(cache) = &mut shared.cache {
                    cache.learn(StoredRow {
                        path: rel.as_os_str().as_bytes(),
                        key: &row.key,
                        size: row.size,
                        md5: row.md5.as_deref(),
                    });
                }
            }
            Ok(_) => {}
            // Dropped (its transaction with it) rather than reused.
            Err(_) => shared.snapshot = None,
        }
        Ok(out?.map(Found::Row))
    }

    /// Ends the shared snapshot if it is older than [`SNAPSHOT_SECS`].
    pub fn end_stale_snapshot(&self) {
        let max_age = Duration::from_secs_f64(SNAPSHOT_SECS);
        if let Ok(mut shared) = self.shared.lock()
            && shared
                .snapshot
                .as_ref()
                .is_some_and(|(_, at)| at.elapsed() >= max_age)
            && let Some((conn, _)) = shared.snapshot.take()
        {
            self.end(conn);
        }
    }

    /// Called on a timer: ends a stale snapshot, and while the cache waits for a refresh
    /// ([`SnapshotCache::wants_refresh`]) gives it one in a short snapshot of its own.
    pub fn maintain(&self) {
        self.end_stale_snapshot();
        let Ok(mut shared) = self.shared.lock() else {
            return;
        };
        let shared = &mut *shared;
        if shared.snapshot.is_some() {
            return;
        }
        let Some(cache) = shared.cache.as_mut().filter(|c| c.wants_refresh()) else {
            return;
        };
        if let Ok(conn) = self.take()
            && conn.execute_batch("BEGIN").is_ok()
        {
            cache.refresh(&Snapshot(&conn));
            self.end(conn);
        }
    }

    fn end(&self, conn: Connection) {
        if conn.execute_batch("COMMIT").is_ok() {
            self.put(conn);
        }
    }

    /// The row of `rel`, if any, as of now (a read transaction of its own).
    pub fn row_fresh(&self, rel: &Path) -> Result<Option<Row>, JournalError> {
        let conn = self.take()?;
        let out = query_row(&conn, rel);
        // A connection that failed is dropped rather than pooled.
        if out.is_ok() {
            self.put(conn);
        }
        out
    }
}

/// Serve pages from the page cache without a read() per page.
fn map_pages(conn: &Connection) {
    let _ = conn.pragma_update(None, "mmap_size", 1i64 << 30);
}

fn query_row(conn: &Connection, rel: &Path) -> Result<Option<Row>, JournalError> {
    let mut stmt = conn.prepare_cached(
        "SELECT state, key, size, md5, bytes_sent, mtime_ns, store FROM files WHERE path = ?1",
    )?;
    let row = stmt
        .query_row([rel.as_os_str().as_bytes()], |r| {
            let state: String = r.get(0)?;
            Ok((
                state,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, Option<i64>>(5)?,
                r.get::<_, String>(6)?,
            ))
        })
        .optional()?;
    let Some((state, key, size, md5, bytes_sent, mtime_ns, store)) = row else {
        return Ok(None);
    };
    let state = State::parse(&state)
        .ok_or_else(|| JournalError::Invalid(format!("unknown state {state:?}")))?;
    Ok(Some(Row {
        state,
        key,
        size: size.max(0) as u64,
        md5,
        bytes_sent: bytes_sent.max(0) as u64,
        mtime_ns,
        store: StoreId::parse(&store),
    }))
}

fn column(e: rusqlite::types::FromSqlError) -> JournalError {
    JournalError::Invalid(format!("unexpected column type: {e}"))
}

/// Where a scan of the stored rows begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredScan {
    /// The last entry of the `unstored` log as of the scan's snapshot: a cache built from the
    /// scan follows the log from there.
    pub log_seq: i64,
    /// Rows in a stored state.
    pub rows: u64,
}

/// Scans the rows in a stored state (`uploaded`, `deleted`) on the primary store in one snapshot of its own:
/// `start` sees where the scan begins and makes the accumulator, `row` takes each stored row
/// until it breaks. A row with a damaged size (negative) is skipped.
pub fn scan_stored<T>(
    journal: &Path,
    start: impl FnOnce(StoredScan) -> T,
    mut row: impl FnMut(&mut T, StoredRow<'_>) -> ControlFlow<()>,
) -> Result<T, JournalError> {
    let conn = open_ro(journal)?;
    map_pages(&conn);
    conn.execute_batch("BEGIN")?;
    let log_seq: i64 = conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM unstored", [], |r| {
        r.get(0)
    })?;
    let stored: i64 = conn.query_row(
        "SELECT COUNT(*) FROM files WHERE state IN ('uploaded', 'deleted') AND store != 'standby'",
        [],
        |r| r.get(0),
    )?;
    let mut acc = start(StoredScan {
        log_seq,
        rows: u64::try_from(stored).unwrap_or(0),
    });
    {
        // A whole-table scan reads the table in order; through the state index it would visit
        // the table at random.
        let mut stmt = conn.prepare(
            "SELECT path, key, size, md5 FROM files NOT INDEXED
             WHERE state IN ('uploaded', 'deleted') AND store != 'standby'",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let Ok(size) = u64::try_from(r.get::<_, i64>(2)?) else {
                continue;
            };
            let stored = StoredRow {
                path: r
                    .get_ref(0)?
                    .as_blob_or_null()
                    .map_err(column)?
                    .unwrap_or_default(),
                key: r.get_ref(1)?.as_str().map_err(column)?,
                size,
                md5: r.get_ref(3)?.as_str_or_null().map_err(column)?,
            };
            if row(&mut acc, stored).is_break() {
                break;
            }
        }
    }
    conn.execute_batch("COMMIT")?;
    Ok(acc)
}
