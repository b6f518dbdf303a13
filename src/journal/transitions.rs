//! The state machine's transitions: every write the pipeline and the commands make to a row.
//! Updates made by an upload task carry the row's `generation` and fail as stale
//! ([`is_stale`]) when the row moved on meanwhile.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::JournalError;
use super::rows::{State, get, get_by_path, now_ms, path_bytes};
use crate::util::fs::Identity;

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

/// States in which a row belongs to the upload task working on it: only these may record a
/// retry or a failure (a row stored, vanished or settling meanwhile is no longer that task's).
const WORKING: &str = "('queued', 'uploading', 'failed')";

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
        .prepare_cached(&format!(
            "UPDATE files SET attempts = attempts + 1, last_error = ?3, last_error_ms = ?4,
                 next_attempt_ms = ?5, updated_ms = ?4
             WHERE id = ?1 AND generation = ?2 AND state IN {WORKING}"
        ))?
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
        .prepare_cached(&format!(
            "UPDATE files SET state = 'failed', attempts = attempts + 1, last_error = ?3,
                 last_error_ms = ?4, next_attempt_ms = ?5, updated_ms = ?4
             WHERE id = ?1 AND generation = ?2 AND state IN {WORKING}"
        ))?
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

/// What [`set_key`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rekey {
    /// The row has the key now (it may have had it already).
    Done,
    /// Another path already uses this key: the row keeps its old one.
    InUse { other: PathBuf },
}

/// Gives a row (of generation `generation`) the key its path renders to now. A row recorded
/// without a key (its key collided, or the template could not render its path) or under a
/// template that changed since gets a key it can be uploaded to. A multipart upload recorded
/// for the old key is forgotten (the bucket's lifecycle rule ends it).
pub fn set_key(
    conn: &Connection,
    id: i64,
    generation: i64,
    key: &str,
) -> Result<Rekey, JournalError> {
    let mut stmt =
        conn.prepare_cached("SELECT path FROM files WHERE key = ?1 AND id != ?2 LIMIT 1")?;
    let other: Option<Vec<u8>> = stmt.query_row(params![key, id], |r| r.get(0)).optional()?;
    if let Some(other) = other {
        return Ok(Rekey::InUse {
            other: PathBuf::from(OsStr::from_bytes(&other)),
        });
    }
    let n = conn
        .prepare_cached(
            "UPDATE files SET key = ?3, upload_id = NULL, upload_generation = NULL, updated_ms = ?4
             WHERE id = ?1 AND generation = ?2 AND key != ?3",
        )?
        .execute(params![id, generation, key, now_ms()])?;
    if n > 0 {
        conn.prepare_cached("DELETE FROM parts WHERE file_id = ?1")?
            .execute([id])?;
    } else if get(conn, id)?.is_none_or(|r| r.generation != generation) {
        return Err(JournalError::Invalid("stale set_key".into()));
    }
    Ok(Rekey::Done)
}

/// What [`requeue_failed`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requeued {
    /// Rows queued again.
    pub queued: usize,
    /// Rows kept failed: their path, and why they still have no key.
    pub kept: Vec<(PathBuf, String)>,
}

/// Re-queues failed rows (`id`: one row, `None`: every failed row), each under the key
/// `key_of` renders for its path now (see [`set_key`]), in one savepoint. A row whose key
/// cannot be rendered or is used by another path stays failed, with that as its error.
pub fn requeue_failed(
    conn: &Connection,
    id: Option<i64>,
    key_of: &dyn Fn(&Path) -> Result<String, String>,
) -> Result<Requeued, JournalError> {
    super::in_savepoint(conn, |c| requeue_failed_in(c, id, key_of))
}

fn requeue_failed_in(
    conn: &Connection,
    id: Option<i64>,
    key_of: &dyn Fn(&Path) -> Result<String, String>,
) -> Result<Requeued, JournalError> {
    let rows: Vec<(i64, i64, PathBuf)> = conn
        .prepare_cached(
            "SELECT id, generation, path FROM files
             WHERE state = 'failed' AND (?1 IS NULL OR id = ?1) ORDER BY id",
        )?
        .query_map(params![id], |r| {
            let path: Vec<u8> = r.get(2)?;
            Ok((
                r.get(0)?,
                r.get(1)?,
                PathBuf::from(OsStr::from_bytes(&path)),
            ))
        })?
        .collect::<Result<_, _>>()?;
    let now = now_ms();
    let mut out = Requeued::default();
    for (id, generation, path) in rows {
        let refused = match key_of(&path) {
            Err(e) => Some(e),
            Ok(key) => match set_key(conn, id, generation, &key)? {
                Rekey::Done => None,
                Rekey::InUse { other } => Some(format!(
                    "object key {key:?} is already used by {}",
                    other.display()
                )),
            },
        };
        let (sql, error) = match &refused {
            None => (
                "UPDATE files SET state = 'queued', next_attempt_ms = 0, attempts = 0,
                     updated_ms = ?2
                 WHERE id = ?1",
                None,
            ),
            Some(e) => (
                "UPDATE files SET last_error = ?3, last_error_ms = ?2, updated_ms = ?2
                 WHERE id = ?1",
                Some(e.as_str()),
            ),
        };
        let mut stmt = conn.prepare_cached(sql)?;
        match error {
            None => stmt.execute(params![id, now])?,
            Some(e) => stmt.execute(params![id, now, e])?,
        };
        match refused {
            None => out.queued += 1,
            Some(e) => out.kept.push((path, e)),
        }
    }
    Ok(out)
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::journal::{due, open_rw, parts, summary};

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
        assert_eq!(
            requeue_failed(&conn, None, &|_| Ok("k".into()))
                .unwrap()
                .queued,
            1
        );
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

    /// A row that left the states an upload task holds is no longer that task's: a retry or a
    /// failure it records late is stale and changes nothing.
    #[test]
    fn retries_and_failures_only_touch_rows_a_task_holds() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_rw(&dir.path().join("j.db")).unwrap();
        let id1 = ident(10, 1);
        let Intake::Queued { id } = intake(&conn, Path::new("a"), "n/a", &id1, true).unwrap()
        else {
            panic!("expected queued")
        };
        let generation = get(&conn, id).unwrap().unwrap().generation;
        set_uploaded(&conn, id, generation, &id1, "md5", None).unwrap();
        for e in [
            set_retry(&conn, id, generation, "late", 0).unwrap_err(),
            set_failed(&conn, id, generation, "late", 0).unwrap_err(),
        ] {
            assert!(is_stale(&e), "{e}");
        }
        let row = get(&conn, id).unwrap().unwrap();
        assert_eq!(row.state, State::Uploaded);
        assert_eq!(row.last_error, None);
        assert_eq!(row.attempts, 0);

        let Intake::Queued { id } = intake(&conn, Path::new("b"), "n/b", &id1, true).unwrap()
        else {
            panic!("expected queued")
        };
        set_vanished(&conn, id, generation).unwrap();
        assert!(is_stale(
            &set_failed(&conn, id, generation, "late", 0).unwrap_err()
        ));
        assert_eq!(get(&conn, id).unwrap().unwrap().state, State::Vanished);
    }

    /// A failed row recorded without a key (its key collided, or could not be rendered), or
    /// under an older key template, is queued again under the key its path renders to now;
    /// one whose new key another path holds stays failed, saying so.
    #[test]
    fn retry_gives_failed_rows_the_key_they_render_to_now() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_rw(&dir.path().join("j.db")).unwrap();
        let id1 = ident(10, 1);
        intake_failed(&conn, Path::new("a"), "", &id1, "key too long", i64::MAX).unwrap();
        let Intake::Queued { id: b } = intake(&conn, Path::new("b"), "old/b", &id1, true).unwrap()
        else {
            panic!("expected queued")
        };
        set_failed(&conn, b, 0, "AccessDenied", i64::MAX).unwrap();
        intake(&conn, Path::new("c"), "new/c", &id1, true).unwrap();
        intake_failed(&conn, Path::new("x"), "", &id1, "collision", i64::MAX).unwrap();
        let key_of = |rel: &Path| -> Result<String, String> {
            match rel.to_str() {
                Some("x") => Ok("new/c".to_string()),
                Some(p) => Ok(format!("new/{p}")),
                None => Err("not UTF-8".to_string()),
            }
        };
        let r = requeue_failed(&conn, None, &key_of).unwrap();
        assert_eq!(r.queued, 2);
        assert_eq!(
            r.kept,
            vec![(
                PathBuf::from("x"),
                "object key \"new/c\" is already used by c".to_string()
            )]
        );
        for (path, key) in [("a", "new/a"), ("b", "new/b")] {
            let row = get_by_path(&conn, Path::new(path)).unwrap().unwrap();
            assert_eq!((row.state, row.key.as_str()), (State::Queued, key));
        }
        let x = get_by_path(&conn, Path::new("x")).unwrap().unwrap();
        assert_eq!((x.state, x.key.as_str()), (State::Failed, ""));
        assert!(x.last_error.unwrap().contains("already used by c"));
    }
}
