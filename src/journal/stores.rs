//! Which store holds each object (`files.store`, schema 6): the primary, or the standby the
//! uploads moved to while the primary was failing; multipart uploads abandoned on a store the
//! uploads moved away from; and copy-back's moves from the standby to the primary.

use rusqlite::{Connection, params};

use super::JournalError;
use super::rows::{COLUMNS, FileRow, StoreId, from_row, now_ms};

/// Points an unstored row's upload at `store`. A multipart upload it had open on its former
/// store is recorded in `abandoned_uploads` (aborted once that store answers again, see
/// [`abandoned_uploads`]) and forgotten by the row, in the same transaction: never left open
/// unrecorded. Stale (`Ok(false)`) when the row moved on.
pub fn set_upload_store(
    conn: &Connection,
    id: i64,
    generation: i64,
    store: StoreId,
) -> Result<bool, JournalError> {
    let row: Option<(String, String, Option<String>)> = conn
        .prepare_cached(
            "SELECT store, key, upload_id FROM files
             WHERE id = ?1 AND generation = ?2 AND state NOT IN ('uploaded', 'deleted')",
        )?
        .query_row(params![id, generation], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })?;
    let Some((old, key, upload_id)) = row else {
        return Ok(false);
    };
    if let Some(uid) = upload_id {
        conn.prepare_cached(
            "INSERT OR IGNORE INTO abandoned_uploads (store, key, upload_id, since_ms)
             VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![old, key, uid, now_ms()])?;
    }
    conn.prepare_cached(
        "UPDATE files SET store = ?2, upload_id = NULL, upload_generation = NULL,
             bytes_sent = 0
         WHERE id = ?1",
    )?
    .execute(params![id, store.as_str()])?;
    conn.prepare_cached("DELETE FROM parts WHERE file_id = ?1")?
        .execute([id])?;
    Ok(true)
}

/// Multipart uploads abandoned on `store`: `(key, upload_id)`.
pub fn abandoned_uploads(
    conn: &Connection,
    store: StoreId,
) -> Result<Vec<(String, String)>, JournalError> {
    let mut stmt = conn.prepare_cached(
        "SELECT key, upload_id FROM abandoned_uploads WHERE store = ?1 ORDER BY since_ms",
    )?;
    let rows = stmt
        .query_map([store.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Records a multipart upload that is to be aborted unless its owner completes it: copy-back
/// records the upload it opens on the primary before it sends the first part, so a crash
/// leaves it recorded (aborted at the next start, once the store answers), never unknown.
/// Copy-back forgets it ([`forget_abandoned`]) in the transaction that moves the row.
pub fn record_abandoned(
    conn: &Connection,
    store: StoreId,
    key: &str,
    upload_id: &str,
) -> Result<(), JournalError> {
    conn.prepare_cached(
        "INSERT OR IGNORE INTO abandoned_uploads (store, key, upload_id, since_ms)
         VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![store.as_str(), key, upload_id, now_ms()])?;
    Ok(())
}

/// An abandoned upload was aborted (or the store no longer knows it).
pub fn forget_abandoned(
    conn: &Connection,
    store: StoreId,
    upload_id: &str,
) -> Result<(), JournalError> {
    conn.prepare_cached("DELETE FROM abandoned_uploads WHERE store = ?1 AND upload_id = ?2")?
        .execute(params![store.as_str(), upload_id])?;
    Ok(())
}

/// Stored rows whose object is on `store`, oldest first, at most `limit`.
pub fn stored_on(
    conn: &Connection,
    store: StoreId,
    limit: usize,
) -> Result<Vec<FileRow>, JournalError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM files
         WHERE state IN ('uploaded', 'deleted') AND store = ?1 ORDER BY id LIMIT ?2"
    ))?;
    let rows = stmt
        .query_map(params![store.as_str(), limit as i64], from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Counts of stored rows per store: `(primary, standby)`.
pub fn stored_per_store(conn: &Connection) -> Result<(u64, u64), JournalError> {
    let (p, s): (i64, i64) = conn.query_row(
        "SELECT COALESCE(SUM(store != 'standby'), 0), COALESCE(SUM(store = 'standby'), 0)
         FROM files WHERE state IN ('uploaded', 'deleted')",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok((p.max(0) as u64, s.max(0) as u64))
}

/// Copy-back moved a stored object: the row points at `to` now, if it is still the stored
/// row copy-back read (same generation, same key and MD5, still on `from`). `Ok(false)`: it
/// changed meanwhile, nothing was written.
pub fn move_stored(
    conn: &Connection,
    row: &FileRow,
    from: StoreId,
    to: StoreId,
) -> Result<bool, JournalError> {
    let n = conn
        .prepare_cached(
            "UPDATE files SET store = ?5, updated_ms = ?6
             WHERE id = ?1 AND generation = ?2 AND key = ?3 AND md5 IS ?4 AND store = ?7
               AND state IN ('uploaded', 'deleted')",
        )?
        .execute(params![
            row.id,
            row.generation,
            row.key,
            row.md5,
            to.as_str(),
            now_ms(),
            from.as_str()
        ])?;
    Ok(n == 1)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::journal::{get_by_path, intake, open_rw, set_settling, set_uploaded};
    use crate::util::fs::Identity;

    fn ident(size: u64) -> Identity {
        Identity {
            dev: 1,
            ino: 2,
            size,
            mtime_ns: 3,
        }
    }

    /// A row stored on `store`.
    fn stored(conn: &Connection, rel: &str, store: StoreId) -> FileRow {
        intake(conn, Path::new(rel), rel, &ident(10), true).unwrap();
        let row = get_by_path(conn, Path::new(rel)).unwrap().unwrap();
        assert!(set_upload_store(conn, row.id, row.generation, store).unwrap());
        set_uploaded(conn, row.id, row.generation, &ident(10), "00ff", Some(7)).unwrap();
        get_by_path(conn, Path::new(rel)).unwrap().unwrap()
    }

    /// Copy-back's move: only the stored row it read, still on the standby; oldest first.
    #[test]
    fn move_stored_moves_only_the_row_it_read() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_rw(&dir.path().join("j.db")).unwrap();
        let a = stored(&conn, "a", StoreId::Standby);
        let b = stored(&conn, "b", StoreId::Standby);
        let p = stored(&conn, "p", StoreId::Primary);
        let on = |c: &Connection| -> Vec<String> {
            stored_on(c, StoreId::Standby, 10)
                .unwrap()
                .into_iter()
                .map(|r| r.key)
                .collect()
        };
        assert_eq!(on(&conn), vec!["a", "b"]);
        assert_eq!(stored_per_store(&conn).unwrap(), (1, 2));
        assert_eq!(stored_on(&conn, StoreId::Standby, 1).unwrap().len(), 1);

        // Moved once; the same move again finds nothing to do.
        assert!(move_stored(&conn, &a, StoreId::Standby, StoreId::Primary).unwrap());
        assert!(!move_stored(&conn, &a, StoreId::Standby, StoreId::Primary).unwrap());
        assert_eq!(
            get_by_path(&conn, Path::new("a")).unwrap().unwrap().store,
            StoreId::Primary
        );
        // A row on the primary is not moved from the standby.
        assert!(!move_stored(&conn, &p, StoreId::Standby, StoreId::Primary).unwrap());
        // The file changed meanwhile (a new generation, waiting to settle): left as it is.
        set_settling(&conn, b.id, b.generation).unwrap();
        assert!(!move_stored(&conn, &b, StoreId::Standby, StoreId::Primary).unwrap());
        let now = get_by_path(&conn, Path::new("b")).unwrap().unwrap();
        assert_eq!(now.store, StoreId::Standby);
        assert!(on(&conn).is_empty());
        assert_eq!(stored_per_store(&conn).unwrap(), (2, 0));
    }

    /// Copy-back's record of its open upload, and forgetting it.
    #[test]
    fn abandoned_uploads_are_recorded_per_store_until_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_rw(&dir.path().join("j.db")).unwrap();
        record_abandoned(&conn, StoreId::Primary, "k1", "u1").unwrap();
        record_abandoned(&conn, StoreId::Primary, "k1", "u1").unwrap();
        record_abandoned(&conn, StoreId::Standby, "k2", "u2").unwrap();
        assert_eq!(
            abandoned_uploads(&conn, StoreId::Primary).unwrap(),
            vec![("k1".to_string(), "u1".to_string())]
        );
        forget_abandoned(&conn, StoreId::Standby, "u1").unwrap();
        assert_eq!(abandoned_uploads(&conn, StoreId::Primary).unwrap().len(), 1);
        forget_abandoned(&conn, StoreId::Primary, "u1").unwrap();
        assert!(
            abandoned_uploads(&conn, StoreId::Primary)
                .unwrap()
                .is_empty()
        );
        assert_eq!(abandoned_uploads(&conn, StoreId::Standby).unwrap().len(), 1);
    }
}
