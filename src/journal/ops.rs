//! The journal's queries and transitions. Plain functions over a connection, so the daemon
//! (through the writer thread) and the CLI (directly) share them.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::Serialize;

use super::JournalError;
use crate::util::fs::Identity;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Known, changed on disk, waiting to settle again.
    Settling,
    /// Settled, waiting for an upload slot (or for its next attempt after an error).
    Queued,
    /// Upload started (for multipart: the upload id is recorded).
    Uploading,
    /// The object is stored and checked; the local file may still exist.
    Uploaded,
    /// Stored, and the local file was removed.
    Deleted,
    /// A permanent error; tried again after `upload.failed_retry_secs` or on `retry`.
    Failed,
    /// The local file disappeared before it was stored.
    Vanished,
}

impl State {
    pub const ALL: [State; 7] = [
        State::Settling,
        State::Queued,
        State::Uploading,
        State::Uploaded,
        State::Deleted,
        State::Failed,
        State::Vanished,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Settling => "settling",
            State::Queued => "queued",
            State::Uploading => "uploading",
            State::Uploaded => "uploaded",
            State::Deleted => "deleted",
            State::Failed => "failed",
            State::Vanished => "vanished",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Still has to reach the bucket.
    pub fn is_waiting(self) -> bool {
        matches!(
            self,
            State::Settling | State::Queued | State::Uploading | State::Failed
        )
    }

    /// The object is in the bucket.
    pub fn is_stored(self) -> bool {
        matches!(self, State::Uploaded | State::Deleted)
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of `files`.
#[derive(Debug, Clone, Serialize)]
pub struct FileRow {
    pub id: i64,
    #[serde(serialize_with = "ser_path")]
    pub path: PathBuf,
    pub key: String,
    pub state: State,
    pub generation: i64,
    pub identity: Option<Identity>,
    pub size: u64,
    pub md5: Option<String>,
    /// The whole file's CRC-64/XZ (OSS's `x-oss-hash-crc64ecma`), once stored.
    pub crc64: Option<u64>,
    pub upload_id: Option<String>,
    pub upload_generation: Option<i64>,
    pub part_size: Option<u64>,
    pub bytes_sent: u64,
    pub attempts: i64,
    pub next_attempt_ms: i64,
    pub last_error: Option<String>,
    pub last_error_ms: Option<i64>,
    pub discovered_ms: i64,
    pub queued_ms: Option<i64>,
    pub uploaded_ms: Option<i64>,
    pub deleted_ms: Option<i64>,
    pub updated_ms: i64,
}

fn ser_path<S: serde::Serializer>(p: &Path, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&p.to_string_lossy())
}

const COLUMNS: &str = "id, path, key, state, generation, dev, ino, size, mtime_ns, md5, upload_id, \
     upload_generation, part_size, bytes_sent, attempts, next_attempt_ms, last_error, last_error_ms, \
     discovered_ms, queued_ms, uploaded_ms, deleted_ms, updated_ms, crc64";

fn from_row(r: &Row<'_>) -> rusqlite::Result<FileRow> {
    let path: Vec<u8> = r.get(1)?;
    let state: String = r.get(3)?;
    let state = State::parse(&state).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            3,
            rusqlite::types::Type::Text,
            format!("unknown state {state:?}").into(),
        )
    })?;
    let dev: Option<i64> = r.get(5)?;
    let ino: Option<i64> = r.get(6)?;
    let size: i64 = r.get(7)?;
    let mtime_ns: Option<i64> = r.get(8)?;
    let identity = match (dev, ino, mtime_ns) {
        (Some(dev), Some(ino), Some(mtime_ns)) => Some(Identity {
            dev: dev as u64,
            ino: ino as u64,
            size: size as u64,
            mtime_ns,
        }),
        _ => None,
    };
    Ok(FileRow {
        id: r.get(0)?,
        path: PathBuf::from(OsStr::from_bytes(&path)),
        key: r.get(2)?,
        state,
        generation: r.get(4)?,
        identity,
        size: size as u64,
        md5: r.get(9)?,
        upload_id: r.get(10)?,
        upload_generation: r.get(11)?,
        part_size: r.get::<_, Option<i64>>(12)?.map(|v| v as u64),
        bytes_sent: r.get::<_, i64>(13)? as u64,
        attempts: r.get(14)?,
        next_attempt_ms: r.get(15)?,
        last_error: r.get(16)?,
        last_error_ms: r.get(17)?,
        discovered_ms: r.get(18)?,
        queued_ms: r.get(19)?,
        uploaded_ms: r.get(20)?,
        deleted_ms: r.get(21)?,
        updated_ms: r.get(22)?,
        crc64: r
            .get::<_, Option<String>>(23)?
            .and_then(|v| v.parse::<u64>().ok()),
    })
}

fn path_bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}

pub fn get_by_path(conn: &Connection, rel: &Path) -> Result<Option<FileRow>, JournalError> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {COLUMNS} FROM files WHERE path = ?1"))?;
    Ok(stmt.query_row([path_bytes(rel)], from_row).optional()?)
}

pub fn get(conn: &Connection, id: i64) -> Result<Option<FileRow>, JournalError> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {COLUMNS} FROM files WHERE id = ?1"))?;
    Ok(stmt.query_row([id], from_row).optional()?)
}

pub fn get_by_key(conn: &Connection, key: &str) -> Result<Option<FileRow>, JournalError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM files WHERE key = ?1 ORDER BY id LIMIT 1"
    ))?;
    Ok(stmt.query_row([key], from_row).optional()?)
}

/// What [`intake`] did with a settled file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intake {
    /// New row, or a known row re-queued because the file is new or changed.
    Queued { id: i64 },
    /// Nothing to do: the row already describes this file.
    Unchanged,
    /// Stored already, and the local copy still waits to be removed.
    DeletePending { id: i64, generation: i64 },
    /// Another path already uses this key (possible only with escaped non-UTF-8 names).
    KeyCollision { other: PathBuf },
}

/// What [`intake`] would do with a settled file, decided without writing.
enum IntakePlan {
    /// Nothing to write: the answer is final.
    Done(Intake),
    /// A path the journal does not know: a new `queued` row.
    Insert,
    /// A known row to re-queue (new generation).
    Requeue { id: i64 },
}

fn plan_intake(
    conn: &Connection,
    rel: &Path,
    key: &str,
    id: &Identity,
    delete_after_upload: bool,
) -> Result<IntakePlan, JournalError> {
    {
        let mut stmt =
            conn.prepare_cached("SELECT path FROM files WHERE key = ?1 AND path != ?2 LIMIT 1")?;
        let other: Option<Vec<u8>> = stmt
            .query_row(params![key, path_bytes(rel)], |r| r.get(0))
            .optional()?;
        if let Some(other) = other {
            return Ok(IntakePlan::Done(Intake::KeyCollision {
                other: PathBuf::from(OsStr::from_bytes(&other)),
            }));
        }
    }
    let Some(row) = get_by_path(conn, rel)? else {
        return Ok(IntakePlan::Insert);
    };
    let same = row.identity.as_ref() == Some(id);
    let requeue = match row.state {
        State::Queued | State::Uploading | State::Failed => !same,
        // A scan that listed the file just before the deleter removed it: the same file
        // (device, inode, size and mtime to the nanosecond) cannot be new.
        State::Deleted if same => false,
        State::Uploaded if same => {
            return Ok(IntakePlan::Done(if delete_after_upload {
                Intake::DeletePending {
                    id: row.id,
                    generation: row.generation,
                }
            } else {
                Intake::Unchanged
            }));
        }
        State::Uploaded | State::Deleted | State::Settling | State::Vanished => true,
    };
    Ok(if requeue {
        IntakePlan::Requeue { id: row.id }
    } else {
        IntakePlan::Done(Intake::Unchanged)
    })
}

/// What [`intake`] would do with this file, without writing anything (`import --dry-run`).
/// A file that would get a new row is reported as `Queued { id: 0 }`.
pub fn intake_preview(
    conn: &Connection,
    rel: &Path,
    key: &str,
    id: &Identity,
    delete_after_upload: bool,
) -> Result<Intake, JournalError> {
    Ok(
        match plan_intake(conn, rel, key, id, delete_after_upload)? {
            IntakePlan::Done(i) => i,
            IntakePlan::Insert => Intake::Queued { id: 0 },
            IntakePlan::Requeue { id } => Intake::Queued { id },
        },
    )
}

/// Records a settled file: inserts or re-queues its row as the state machine says.
pub fn intake(
    conn: &Connection,
    rel: &Path,
    key: &str,
    id: &Identity,
    delete_after_upload: bool,
) -> Result<Intake, JournalError> {
    let now = now_ms();
    let row_id = match plan_intake(conn, rel, key, id, delete_after_upload)? {
        IntakePlan::Done(i) => return Ok(i),
        IntakePlan::Requeue { id } => id,
        IntakePlan::Insert => {
            conn.prepare_cached(
                "INSERT INTO files (path, key, state, dev, ino, size, mtime_ns, discovered_ms, queued_ms, updated_ms)
                 VALUES (?1, ?2, 'queued', ?3, ?4, ?5, ?6, ?7, ?7, ?7)",
            )?
            .execute(params![
                path_bytes(rel),
                key,
                id.dev as i64,
                id.ino as i64,
                id.size as i64,
                id.mtime_ns,
                now
            ])?;
            return Ok(Intake::Queued {
                id: conn.last_insert_rowid(),
            });
        }
    };
    conn.prepare_cached(
        "UPDATE files SET state = 'queued', generation = generation + 1, key = ?2,
             dev = ?3, ino = ?4, size = ?5, mtime_ns = ?6, md5 = NULL, crc64 = NULL, bytes_sent = 0,
             attempts = 0, next_attempt_ms = 0, last_error = NULL, queued_ms = ?7,
             uploaded_ms = NULL, deleted_ms = NULL, updated_ms = ?7,
             discovered_ms = CASE WHEN state IN ('deleted', 'vanished', 'uploaded') THEN ?7 ELSE discovered_ms END
         WHERE id = ?1",
    )?
    .execute(params![
        row_id,
        key,
        id.dev as i64,
        id.ino as i64,
        id.size as i64,
        id.mtime_ns,
        now
    ])?;
    Ok(Intake::Queued { id: row_id })
}

/// Records the intake of a file whose key collides: a failed row with the reason.
pub fn intake_failed(
    conn: &Connection,
    rel: &Path,
    key: &str,
    id: &Identity,
    error: &str,
    retry_at_ms: i64,
) -> Result<(), JournalError> {
    let now = now_ms();
    conn.prepare_cached(
        "INSERT INTO files (path, key, state, dev, ino, size, mtime_ns, discovered_ms, updated_ms,
                            last_error, last_error_ms, next_attempt_ms)
         VALUES (?1, ?2, 'failed', ?3, ?4, ?5, ?6, ?7, ?7, ?8, ?7, ?9)
         ON CONFLICT(path) DO UPDATE SET state = 'failed', generation = generation + 1,
             dev = ?3, ino = ?4, size = ?5, mtime_ns = ?6, updated_ms = ?7, last_error = ?8,
             last_error_ms = ?7, next_attempt_ms = ?9",
    )?
    .execute(params![
        path_bytes(rel),
        key,
        id.dev as i64,
        id.ino as i64,
        id.size as i64,
        id.mtime_ns,
        now,
        error,
        retry_at_ms
    ])?;
    Ok(())
}

/// Rows whose next step is due: queued or uploading rows, and failed rows whose wait is over.
pub fn due(conn: &Connection, now: i64, limit: usize) -> Result<Vec<FileRow>, JournalError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM files
         WHERE state IN ('queued', 'uploading', 'failed') AND next_attempt_ms <= ?1
         ORDER BY next_attempt_ms, id LIMIT ?2"
    ))?;
    let rows = stmt
        .query_map(params![now, limit as i64], from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Rows in a state, oldest first.
pub fn in_state(conn: &Connection, state: State) -> Result<Vec<FileRow>, JournalError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM files WHERE state = ?1 ORDER BY id"
    ))?;
    let rows = stmt
        .query_map([state.as_str()], from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Rows for `ls`: all, or those in one state; newest last.
pub fn list(
    conn: &Connection,
    state: Option<State>,
    limit: Option<usize>,
) -> Result<Vec<FileRow>, JournalError> {
    let limit = limit.map(|l| l as i64).unwrap_or(-1);
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM files WHERE (?1 IS NULL OR state = ?1) ORDER BY id LIMIT ?2"
    ))?;
    let rows = stmt
        .query_map(params![state.map(|s| s.as_str()), limit], from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Fails when the row's generation moved on (the file was re-queued meanwhile).
fn expect_one(changed: usize, what: &str) -> Result<(), JournalError> {
    if changed == 1 {
        Ok(())
    } else {
        Err(JournalError::Invalid(format!("stale {what}")))
    }
}

/// A stale update (the row was re-queued since the worker read it).
pub fn is_stale(e: &JournalError) -> bool {
    matches!(e, JournalError::Invalid(m) if m.starts_with("stale "))
}

/// Starts an upload: records the multipart id (if any) before the first byte is sent.
pub fn start_upload(
    conn: &Connection,
    id: i64,
    generation: i64,
    upload_id: Option<&str>,
    part_size: u64,
) -> Result<(), JournalError> {
    let n = conn
        .prepare_cached(
            "UPDATE files SET state = 'uploading', upload_id = ?3, upload_generation = ?2,
                 part_size = ?4, bytes_sent = 0, updated_ms = ?5
             WHERE id = ?1 AND generation = ?2",
        )?
        .execute(params![
            id,
            generation,
            upload_id,
            part_size as i64,
            now_ms()
        ])?;
    if upload_id.is_some() {
        conn.prepare_cached("DELETE FROM parts WHERE file_id = ?1")?
            .execute([id])?;
    }
    expect_one(n, "start_upload")
}

/// A part the store acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartRow {
    pub part_number: i32,
    pub offset: u64,
    pub size: u64,
    pub md5: String,
    pub etag: String,
}

pub fn record_part(
    conn: &Connection,
    id: i64,
    generation: i64,
    upload_id: &str,
    part: &PartRow,
) -> Result<(), JournalError> {
    let n = conn
        .prepare_cached(
            "UPDATE files SET bytes_sent = bytes_sent + ?4, updated_ms = ?5
             WHERE id = ?1 AND generation = ?2 AND upload_id = ?3",
        )?
        .execute(params![
            id,
            generation,
            upload_id,
            part.size as i64,
            now_ms()
        ])?;
    expect_one(n, "record_part")?;
    conn.prepare_cached(
        "INSERT OR REPLACE INTO parts (file_id, upload_id, part_number, offset, size, md5, etag)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        id,
        upload_id,
        part.part_number,
        part.offset as i64,
        part.size as i64,
        part.md5,
        part.etag
    ])?;
    Ok(())
}

pub fn parts(conn: &Connection, id: i64, upload_id: &str) -> Result<Vec<PartRow>, JournalError> {
    let mut stmt = conn.prepare_cached(
        "SELECT part_number, offset, size, md5, etag FROM parts
         WHERE file_id = ?1 AND upload_id = ?2 ORDER BY part_number",
    )?;
    let rows = stmt
        .query_map(params![id, upload_id], |r| {
            Ok(PartRow {
                part_number: r.get(0)?,
                offset: r.get::<_, i64>(1)? as u64,
                size: r.get::<_, i64>(2)? as u64,
                md5: r.get(3)?,
                etag: r.get(4)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Forgets a multipart upload (completed or aborted).
pub fn clear_upload(conn: &Connection, id: i64) -> Result<(), JournalError> {
    conn.prepare_cached(
        "UPDATE files SET upload_id = NULL, upload_generation = NULL WHERE id = ?1",
    )?
    .execute([id])?;
    conn.prepare_cached("DELETE FROM parts WHERE file_id = ?1")?
        .execute([id])?;
    Ok(())
}

/// The object is stored and was checked against the file, which is unchanged.
pub fn set_uploaded(
    conn: &Connection,
    id: i64,
    generation: i64,
    identity: &Identity,
    md5: &str,
    crc64: Option<u64>,
) -> Result<(), JournalError> {
    let now = now_ms();
    let n = conn
        .prepare_cached(
            "UPDATE files SET state = 'uploaded', md5 = ?3, size = ?4, dev = ?5, ino = ?6,
                 mtime_ns = ?7, bytes_sent = ?4, uploaded_ms = ?8, updated_ms = ?8, crc64 = ?9,
                 upload_id = NULL, upload_generation = NULL, last_error = NULL, attempts = 0
             WHERE id = ?1 AND generation = ?2",
        )?
        .execute(params![
            id,
            generation,
            md5,
            identity.size as i64,
            identity.dev as i64,
            identity.ino as i64,
            identity.mtime_ns,
            now,
            crc64.map(|c| c.to_string())
        ])?;
    expect_one(n, "set_uploaded")?;
    conn.prepare_cached("DELETE FROM parts WHERE file_id = ?1")?
        .execute([id])?;
    Ok(())
}

pub fn set_deleted(conn: &Connection, id: i64, generation: i64) -> Result<(), JournalError> {
    let now = now_ms();
    let n = conn
        .prepare_cached(
            "UPDATE files SET state = 'deleted', deleted_ms = ?3, updated_ms = ?3
             WHERE id = ?1 AND generation = ?2 AND state = 'uploaded'",
        )?
        .execute(params![id, generation, now])?;
    expect_one(n, "set_deleted")
}

/// A transient error: try again at `next_ms`.
pub fn set_retry(
    conn: &Connection,
    id: i64,
    generation: i64,
    error: &str,
    next_ms: i64,
) -> Result<(), JournalError> {
    let now = now_ms();
    let n = conn
        .prepare_cached(
            "UPDATE files SET attempts = attempts + 1, last_error = ?3, last_error_ms = ?4,
                 next_attempt_ms = ?5, updated_ms = ?4
             WHERE id = ?1 AND generation = ?2",
        )?
        .execute(params![id, generation, error, now, next_ms])?;
    expect_one(n, "set_retry")
}

/// A permanent error: `failed` until `retry`, or until `next_ms`.
pub fn set_failed(
    conn: &Connection,
    id: i64,
    generation: i64,
    error: &str,
    next_ms: i64,
) -> Result<(), JournalError> {
    let now = now_ms();
    let n = conn
        .prepare_cached(
            "UPDATE files SET state = 'failed', attempts = attempts + 1, last_error = ?3,
                 last_error_ms = ?4, next_attempt_ms = ?5, updated_ms = ?4
             WHERE id = ?1 AND generation = ?2",
        )?
        .execute(params![id, generation, error, now, next_ms])?;
    expect_one(n, "set_failed")
}

/// The local file went away before it was stored.
pub fn set_vanished(conn: &Connection, id: i64, generation: i64) -> Result<(), JournalError> {
    let now = now_ms();
    let n = conn
        .prepare_cached(
            "UPDATE files SET state = 'vanished', updated_ms = ?3
             WHERE id = ?1 AND generation = ?2 AND state IN ('queued', 'uploading', 'failed', 'settling')",
        )?
        .execute(params![id, generation, now])?;
    expect_one(n, "set_vanished")
}

/// The file changed while it was being uploaded: it must settle again before the next upload.
pub fn set_settling(conn: &Connection, id: i64, generation: i64) -> Result<(), JournalError> {
    let now = now_ms();
    let n = conn
        .prepare_cached(
            "UPDATE files SET state = 'settling', generation = generation + 1, md5 = NULL, crc64 = NULL,
                 bytes_sent = 0, updated_ms = ?3
             WHERE id = ?1 AND generation = ?2",
        )?
        .execute(params![id, generation, now])?;
    expect_one(n, "set_settling")
}

/// Re-queues failed rows (`id` = one row, `None` = all failed rows). Returns how many.
pub fn requeue_failed(conn: &Connection, id: Option<i64>) -> Result<usize, JournalError> {
    let now = now_ms();
    let n = conn
        .prepare_cached(
            "UPDATE files SET state = 'queued', next_attempt_ms = 0, attempts = 0, updated_ms = ?2
             WHERE state = 'failed' AND (?1 IS NULL OR id = ?1)",
        )?
        .execute(params![id, now])?;
    Ok(n)
}

/// A write whose only purpose is its commit: committed with [`super::Durability::Sync`], it
/// carries every earlier commit to the disk.
pub fn barrier(conn: &Connection) -> Result<(), JournalError> {
    conn.prepare_cached("UPDATE meta SET v = v + 1 WHERE k = 'barrier'")?
        .execute([])?;
    Ok(())
}

/// Whether a file under directory `dir` was ever removed by the daemon (such a directory may
/// be pruned once empty).
pub fn had_deleted_under(conn: &Connection, dir: &Path) -> Result<bool, JournalError> {
    let mut lo = path_bytes(dir).to_vec();
    let mut hi = lo.clone();
    lo.push(b'/');
    hi.push(b'/' + 1);
    let mut stmt = conn.prepare_cached(
        "SELECT 1 FROM files WHERE path >= ?1 AND path < ?2 AND state = 'deleted' LIMIT 1",
    )?;
    Ok(stmt.exists(params![lo, hi])?)
}

/// Figures for `status`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Summary {
    pub counts: BTreeMap<String, u64>,
    pub bytes: BTreeMap<String, u64>,
    pub bytes_waiting: u64,
    pub oldest_waiting_secs: u64,
    pub bytes_uploading_sent: u64,
    pub last_errors: Vec<LastError>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LastError {
    pub id: i64,
    pub path: String,
    pub state: State,
    pub error: String,
    pub at_ms: i64,
}

pub fn summary(conn: &Connection) -> Result<Summary, JournalError> {
    let mut s = Summary::default();
    for st in State::ALL {
        s.counts.insert(st.as_str().to_string(), 0);
        s.bytes.insert(st.as_str().to_string(), 0);
    }
    let mut stmt = conn.prepare_cached(
        "SELECT state, COUNT(*), COALESCE(SUM(size), 0) FROM files GROUP BY state",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    for row in rows {
        let (state, n, bytes) = row?;
        if let Some(st) = State::parse(&state) {
            if st.is_waiting() {
                s.bytes_waiting += bytes as u64;
            }
            s.counts.insert(state.clone(), n as u64);
            s.bytes.insert(state, bytes as u64);
        }
    }
    let oldest: Option<i64> = conn.query_row(
        "SELECT MIN(discovered_ms) FROM files WHERE state IN ('settling', 'queued', 'uploading', 'failed')",
        [],
        |r| r.get(0),
    )?;
    if let Some(oldest) = oldest {
        s.oldest_waiting_secs = ((now_ms() - oldest).max(0) / 1000) as u64;
    }
    s.bytes_uploading_sent = conn.query_row(
        "SELECT COALESCE(SUM(bytes_sent), 0) FROM files WHERE state = 'uploading'",
        [],
        |r| r.get::<_, i64>(0),
    )? as u64;
    let mut stmt = conn.prepare_cached(
        "SELECT id, path, state, last_error, last_error_ms FROM files
         WHERE last_error IS NOT NULL ORDER BY last_error_ms DESC LIMIT 5",
    )?;
    let rows = stmt.query_map([], |r| {
        let path: Vec<u8> = r.get(1)?;
        let state: String = r.get(2)?;
        Ok(LastError {
            id: r.get(0)?,
            path: String::from_utf8_lossy(&path).into_owned(),
            state: State::parse(&state).unwrap_or(State::Failed),
            error: r.get(3)?,
            at_ms: r.get::<_, Option<i64>>(4)?.unwrap_or(0),
        })
    })?;
    for row in rows {
        s.last_errors.push(row?);
    }
    Ok(s)
}

/// The figures the daemon refreshes every few seconds (`STATUS=`, metrics). Cheaper than
/// [`summary`]: only rows still waiting are read, through the state index. Counting the
/// stored rows (which grow without bound) is asked for separately, with `stored`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Queue {
    /// Rows per waiting state, and per final state when they were counted.
    pub counts: BTreeMap<State, u64>,
    /// Bytes of the files not stored yet.
    pub waiting_bytes: u64,
    /// Bytes of the files being uploaded.
    pub uploading_bytes: u64,
    /// Age of the oldest file not stored yet (0 when none waits).
    pub oldest_waiting_secs: u64,
}

impl Queue {
    pub fn count(&self, st: State) -> u64 {
        self.counts.get(&st).copied().unwrap_or(0)
    }

    pub fn waiting(&self) -> u64 {
        State::ALL
            .into_iter()
            .filter(|s| s.is_waiting())
            .map(|s| self.count(s))
            .sum()
    }
}

/// Queue figures; with `stored`, the rows in final states (uploaded, deleted, vanished) are
/// counted too — a scan of the state index, so callers do that less often on big journals.
pub fn queue(conn: &Connection, stored: bool) -> Result<Queue, JournalError> {
    let mut q = Queue::default();
    for st in State::ALL.into_iter().filter(|s| stored || s.is_waiting()) {
        q.counts.insert(st, 0);
    }
    let mut stmt = conn.prepare_cached(
        "SELECT state, COUNT(*), COALESCE(SUM(size), 0), MIN(discovered_ms) FROM files
         WHERE state IN ('settling', 'queued', 'uploading', 'failed') GROUP BY state",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, Option<i64>>(3)?,
        ))
    })?;
    let mut oldest: Option<i64> = None;
    for row in rows {
        let (state, n, bytes, first) = row?;
        let Some(st) = State::parse(&state) else {
            continue;
        };
        q.counts.insert(st, n.max(0) as u64);
        q.waiting_bytes += bytes.max(0) as u64;
        if st == State::Uploading {
            q.uploading_bytes = bytes.max(0) as u64;
        }
        oldest = match (oldest, first) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    if let Some(oldest) = oldest {
        q.oldest_waiting_secs = ((now_ms() - oldest).max(0) / 1000) as u64;
    }
    if stored {
        let mut stmt = conn.prepare_cached(
            "SELECT state, COUNT(*) FROM files
             WHERE state IN ('uploaded', 'deleted', 'vanished') GROUP BY state",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        for row in rows {
            let (state, n) = row?;
            if let Some(st) = State::parse(&state) {
                q.counts.insert(st, n.max(0) as u64);
            }
        }
    }
    Ok(q)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::journal::open_rw;

    fn ident(size: u64, mtime_ns: i64) -> Identity {
        Identity {
            dev: 1,
            ino: 2,
            size,
            mtime_ns,
        }
    }

    #[test]
    fn state_machine_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_rw(&dir.path().join("j.db")).unwrap();
        let rel = Path::new("a/b.mp4");
        let id1 = ident(10, 1);
        let Intake::Queued { id } = intake(&conn, rel, "n/a/b.mp4", &id1, true).unwrap() else {
            panic!("expected queued")
        };
        assert_eq!(
            intake(&conn, rel, "n/a/b.mp4", &id1, true).unwrap(),
            Intake::Unchanged
        );
        let row = get(&conn, id).unwrap().unwrap();
        assert_eq!(row.state, State::Queued);
        start_upload(&conn, id, row.generation, Some("up1"), 5).unwrap();
        let part = PartRow {
            part_number: 1,
            offset: 0,
            size: 5,
            md5: "m".into(),
            etag: "e".into(),
        };
        record_part(&conn, id, row.generation, "up1", &part).unwrap();
        assert_eq!(parts(&conn, id, "up1").unwrap(), vec![part]);
        // The file changed: re-queued with a new generation; the old worker's writes are stale.
        let id2 = ident(20, 2);
        assert_eq!(
            intake(&conn, rel, "n/a/b.mp4", &id2, true).unwrap(),
            Intake::Queued { id }
        );
        let e = set_uploaded(&conn, id, row.generation, &id1, "x", None).unwrap_err();
        assert!(is_stale(&e));
        let row = get(&conn, id).unwrap().unwrap();
        assert_eq!(row.upload_id.as_deref(), Some("up1"));
        assert_ne!(row.upload_generation, Some(row.generation));
        set_uploaded(&conn, id, row.generation, &id2, "md5", Some(7)).unwrap();
        assert_eq!(
            intake(&conn, rel, "n/a/b.mp4", &id2, true).unwrap(),
            Intake::DeletePending {
                id,
                generation: row.generation
            }
        );
        set_deleted(&conn, id, row.generation).unwrap();
        // A scan that saw the file just before it was removed changes nothing.
        assert_eq!(
            intake(&conn, rel, "n/a/b.mp4", &id2, true).unwrap(),
            Intake::Unchanged
        );
        let row = get(&conn, id).unwrap().unwrap();
        assert_eq!(row.state, State::Deleted);
        assert_eq!(row.md5.as_deref(), Some("md5"));
        assert!(parts(&conn, id, "up1").unwrap().is_empty());
        let s = summary(&conn).unwrap();
        assert_eq!(s.counts["deleted"], 1);
        assert_eq!(s.bytes_waiting, 0);
    }

    #[test]
    fn failed_rows_are_requeued_and_keys_do_not_collide() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_rw(&dir.path().join("j.db")).unwrap();
        let Intake::Queued { id } = intake(&conn, Path::new("x"), "k", &ident(1, 1), true).unwrap()
        else {
            panic!("expected queued")
        };
        assert!(matches!(
            intake(&conn, Path::new("y"), "k", &ident(1, 1), true).unwrap(),
            Intake::KeyCollision { .. }
        ));
        set_failed(&conn, id, 0, "AccessDenied", i64::MAX).unwrap();
        assert!(due(&conn, now_ms(), 10).unwrap().is_empty());
        assert_eq!(requeue_failed(&conn, None).unwrap(), 1);
        let due = due(&conn, now_ms(), 10).unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].state, State::Queued);
        assert_eq!(due[0].last_error.as_deref(), Some("AccessDenied"));
    }
    #[test]
    fn preview_says_what_intake_does_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_rw(&dir.path().join("j.db")).unwrap();
        let rel = Path::new("a.mp4");
        let id1 = ident(10, 1);
        assert_eq!(
            intake_preview(&conn, rel, "n/a.mp4", &id1, true).unwrap(),
            Intake::Queued { id: 0 }
        );
        assert!(get_by_path(&conn, rel).unwrap().is_none());
        let Intake::Queued { id } = intake(&conn, rel, "n/a.mp4", &id1, true).unwrap() else {
            panic!("expected queued")
        };
        assert_eq!(
            intake_preview(&conn, rel, "n/a.mp4", &id1, true).unwrap(),
            Intake::Unchanged
        );
        assert_eq!(
            intake_preview(&conn, rel, "n/a.mp4", &ident(11, 2), true).unwrap(),
            Intake::Queued { id }
        );
        assert_eq!(get(&conn, id).unwrap().unwrap().size, 10);
        assert!(matches!(
            intake_preview(&conn, Path::new("b.mp4"), "n/a.mp4", &id1, true).unwrap(),
            Intake::KeyCollision { .. }
        ));
    }

    #[test]
    fn queue_figures() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_rw(&dir.path().join("j.db")).unwrap();
        let q = queue(&conn, true).unwrap();
        assert_eq!(q.waiting(), 0);
        assert_eq!(q.oldest_waiting_secs, 0);
        for (i, size) in [100u64, 200, 300].into_iter().enumerate() {
            let rel = format!("f{i}");
            intake(&conn, Path::new(&rel), &rel, &ident(size, i as i64), true).unwrap();
        }
        conn.execute("UPDATE files SET discovered_ms = discovered_ms - 90000 WHERE path = CAST('f0' AS BLOB)", [])
            .unwrap();
        let row = get_by_path(&conn, Path::new("f1")).unwrap().unwrap();
        start_upload(&conn, row.id, row.generation, None, 5).unwrap();
        let row = get_by_path(&conn, Path::new("f2")).unwrap().unwrap();
        set_uploaded(&conn, row.id, row.generation, &ident(300, 2), "m", None).unwrap();
        let q = queue(&conn, false).unwrap();
        assert_eq!(q.counts.get(&State::Uploaded), None, "not counted");
        let q = queue(&conn, true).unwrap();
        assert_eq!(q.count(State::Uploaded), 1);
        assert_eq!(q.count(State::Deleted), 0);
        assert_eq!(q.count(State::Queued), 1);
        assert_eq!(q.count(State::Uploading), 1);
        assert_eq!(q.waiting(), 2);
        assert_eq!(q.waiting_bytes, 300);
        assert_eq!(q.uploading_bytes, 200);
        assert!(
            (90..100).contains(&q.oldest_waiting_secs),
            "{}",
            q.oldest_waiting_secs
        );
    }
}
