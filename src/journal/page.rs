//! The status page's queries (`GET /ui`): the last hour's uploads per minute, recent
//! uploads, failed files, the oldest waiting file, a search by path. Each is bounded by a
//! `LIMIT` or by the `files_uploaded_ms` index, so the page stays cheap on a big journal
//! (the search alone may scan: it is an operator's occasional request).

use rusqlite::{Connection, OptionalExtension, params};

use super::JournalError;
use super::rows::{COLUMNS, FileRow, from_row};

/// Bytes and files stored per bucket of `bucket_ms` since `since_ms`, oldest first; buckets
/// without an upload are left out.
pub fn throughput(
    conn: &Connection,
    since_ms: i64,
    bucket_ms: i64,
) -> Result<Vec<(i64, u64, u64)>, JournalError> {
    let bucket_ms = bucket_ms.max(1);
    let mut stmt = conn.prepare_cached(
        "SELECT uploaded_ms / ?2, COALESCE(SUM(size), 0), COUNT(*) FROM files
         WHERE uploaded_ms >= ?1 GROUP BY uploaded_ms / ?2 ORDER BY 1",
    )?;
    let rows = stmt
        .query_map(params![since_ms, bucket_ms], |r| {
            Ok((
                r.get::<_, i64>(0)? * bucket_ms,
                r.get::<_, i64>(1)?.max(0) as u64,
                r.get::<_, i64>(2)?.max(0) as u64,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// The files stored most recently (whether or not the local copy is gone), newest first.
pub fn recent_uploads(conn: &Connection, limit: usize) -> Result<Vec<FileRow>, JournalError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM files WHERE uploaded_ms IS NOT NULL
         ORDER BY uploaded_ms DESC LIMIT ?1"
    ))?;
    let rows = stmt
        .query_map([limit as i64], from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Failed files, the most recent failure first.
pub fn failed_files(conn: &Connection, limit: usize) -> Result<Vec<FileRow>, JournalError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM files WHERE state = 'failed'
         ORDER BY last_error_ms DESC, id DESC LIMIT ?1"
    ))?;
    let rows = stmt
        .query_map([limit as i64], from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// The file that has waited longest to be stored.
pub fn oldest_waiting(conn: &Connection) -> Result<Option<FileRow>, JournalError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM files
         WHERE state IN ('settling', 'queued', 'uploading', 'failed')
         ORDER BY discovered_ms, id LIMIT 1"
    ))?;
    Ok(stmt.query_row([], from_row).optional()?)
}

/// Files whose path (relative to the root) contains `needle`, newest rows first.
pub fn search_path(
    conn: &Connection,
    needle: &[u8],
    limit: usize,
) -> Result<Vec<FileRow>, JournalError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM files WHERE instr(path, ?1) > 0 ORDER BY id DESC LIMIT ?2"
    ))?;
    let rows = stmt
        .query_map(params![needle, limit as i64], from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}
