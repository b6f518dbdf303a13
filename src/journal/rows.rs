//! Rows and their states, and the queries that read whole rows. Plain functions over a
//! connection, so the daemon (through the writer thread or its readers) and the commands
//! (directly) share them.

use std::collections::HashSet;
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

/// Which store holds an object (`files.store`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreId {
    #[default]
    Primary,
    Standby,
}

impl StoreId {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreId::Primary => "primary",
            StoreId::Standby => "standby",
        }
    }

    /// Anything but "standby" is the primary (the column's default).
    pub fn parse(s: &str) -> StoreId {
        if s == "standby" {
            StoreId::Standby
        } else {
            StoreId::Primary
        }
    }
}

impl std::fmt::Display for StoreId {
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
    /// The store that holds the object, or that the upload in progress goes to.
    pub store: StoreId,
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

pub(super) const COLUMNS: &str = "id, path, key, state, generation, dev, ino, size, mtime_ns, md5, upload_id, \
     upload_generation, part_size, bytes_sent, attempts, next_attempt_ms, last_error, last_error_ms, \
     discovered_ms, queued_ms, uploaded_ms, deleted_ms, updated_ms, crc64, store";

pub(super) fn from_row(r: &Row<'_>) -> rusqlite::Result<FileRow> {
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
        store: StoreId::parse(&r.get::<_, String>(24)?),
    })
}

pub(super) fn path_bytes(p: &Path) -> &[u8] {
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

/// The multipart upload ids of the rows still on their way to the bucket: uploads this node
/// may resume. Any other upload under its prefix is a stray.
pub fn open_upload_ids(conn: &Connection) -> Result<HashSet<String>, JournalError> {
    let mut stmt = conn.prepare_cached(
        "SELECT upload_id FROM files
         WHERE state IN ('queued', 'uploading', 'failed', 'settling') AND upload_id IS NOT NULL",
    )?;
    let ids = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<_, _>>()?;
    Ok(ids)
}
