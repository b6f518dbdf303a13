//! The notification outbox. Rows are written by the triggers of schema 5 in the transaction
//! of the state change they report (so every writer — the daemon, `retry`, someone with
//! sqlite3 — produces them); this file holds the receivers' list the daemon keeps in step with
//! `[[notify]]`, what the delivery workers read and record, the bounds, and the figures
//! `status`, `/metrics` and the status page show.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::JournalError;
use super::rows::now_ms;

/// A receiver as the journal knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receiver {
    /// Stable for a URL across restarts.
    pub id: i64,
    pub url: String,
}

/// What [`sync_receivers`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceiverSync {
    /// The configured receivers, in config order.
    pub receivers: Vec<Receiver>,
    /// Receivers no longer configured, with the undelivered events dropped with them.
    pub removed: Vec<(String, u64)>,
}

/// Makes `notify_endpoints` list exactly `wanted` (URL, events), keeping the id (and so the
/// outbox) of a URL that stays. Receivers no longer configured go with their undelivered
/// events; the caller logs and counts those.
pub fn sync_receivers(
    conn: &Connection,
    wanted: &[(String, Vec<&str>)],
) -> Result<ReceiverSync, JournalError> {
    super::in_savepoint(conn, |c| {
        let mut out = ReceiverSync::default();
        let known: Vec<(i64, String)> = c
            .prepare_cached("SELECT id, url FROM notify_endpoints ORDER BY id")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        for (id, url) in known {
            if wanted.iter().any(|(u, _)| *u == url) {
                continue;
            }
            let n = c
                .prepare_cached("DELETE FROM outbox WHERE endpoint = ?1")?
                .execute([id])?;
            c.prepare_cached("DELETE FROM notify_endpoints WHERE id = ?1")?
                .execute([id])?;
            out.removed.push((url, n as u64));
        }
        for (url, events) in wanted {
            let csv = format!(",{},", events.join(","));
            c.prepare_cached(
                "INSERT INTO notify_endpoints (url, events) VALUES (?1, ?2)
                 ON CONFLICT(url) DO UPDATE SET events = ?2",
            )?
            .execute(params![url, csv])?;
            let id: i64 = c
                .prepare_cached("SELECT id FROM notify_endpoints WHERE url = ?1")?
                .query_row([url], |r| r.get(0))?;
            out.receivers.push(Receiver {
                id,
                url: url.clone(),
            });
        }
        Ok(out)
    })
}

/// The number event ids carry besides `seq`: random, made once per journal.
pub fn outbox_epoch(conn: &Connection) -> Result<i64, JournalError> {
    Ok(conn
        .prepare_cached("SELECT v FROM meta WHERE k = 'outbox_epoch'")?
        .query_row([], |r| r.get(0))
        .optional()?
        .unwrap_or(0))
}

/// An event waiting in the outbox for one receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub seq: i64,
    pub endpoint: i64,
    pub file_id: i64,
    /// `stored`, `deleted`, `failed` or `vanished`.
    pub event: String,
    pub path: PathBuf,
    pub key: String,
    pub size: u64,
    pub md5: Option<String>,
    pub crc64: Option<String>,
    /// The file's last error (`failed` events).
    pub error: Option<String>,
    pub at_ms: i64,
    pub attempts: i64,
    pub next_ms: i64,
    /// The document as first sent ([`outbox_set_body`]): every retry sends these bytes.
    pub body: Option<String>,
    /// The store that held the file when the change was committed (`None`: an event
    /// written before schema 6, when there was only the primary).
    pub store: Option<String>,
}

/// The oldest undelivered event of a receiver: the only one its worker may send (events go
/// out strictly in the order they were committed, so a file's events keep their order).
pub fn outbox_head(conn: &Connection, endpoint: i64) -> Result<Option<OutboxRow>, JournalError> {
    Ok(conn
        .prepare_cached(
            "SELECT seq, endpoint, file_id, event, path, key, size, md5, crc64, error, at_ms,
                    attempts, next_ms, body, store
             FROM outbox WHERE endpoint = ?1 ORDER BY seq LIMIT 1",
        )?
        .query_row([endpoint], |r| {
            let path: Vec<u8> = r.get(4)?;
            Ok(OutboxRow {
                seq: r.get(0)?,
                endpoint: r.get(1)?,
                file_id: r.get(2)?,
                event: r.get(3)?,
                path: PathBuf::from(OsStr::from_bytes(&path)),
                key: r.get(5)?,
                size: r.get::<_, i64>(6)?.max(0) as u64,
                md5: r.get(7)?,
                crc64: r.get(8)?,
                error: r.get(9)?,
                at_ms: r.get(10)?,
                attempts: r.get(11)?,
                next_ms: r.get(12)?,
                body: r.get(13)?,
                store: r.get(14)?,
            })
        })
        .optional()?)
}

/// Fixes the document of an event before its first attempt, so that retries (also after a
/// restart with another `lookup.public_url`) send the same bytes. Returns the body in force.
pub fn outbox_set_body(conn: &Connection, seq: i64, body: &str) -> Result<String, JournalError> {
    conn.prepare_cached("UPDATE outbox SET body = ?2 WHERE seq = ?1 AND body IS NULL")?
        .execute(params![seq, body])?;
    Ok(conn
        .prepare_cached("SELECT body FROM outbox WHERE seq = ?1")?
        .query_row([seq], |r| r.get::<_, Option<String>>(0))
        .optional()?
        .flatten()
        .unwrap_or_else(|| body.to_string()))
}

/// The receiver answered 2xx: the event is done.
pub fn outbox_delivered(conn: &Connection, seq: i64) -> Result<(), JournalError> {
    conn.prepare_cached("DELETE FROM outbox WHERE seq = ?1")?
        .execute([seq])?;
    Ok(())
}

/// A delivery failed: try again at `next_ms`.
pub fn outbox_failed(
    conn: &Connection,
    seq: i64,
    error: &str,
    next_ms: i64,
) -> Result<(), JournalError> {
    conn.prepare_cached(
        "UPDATE outbox SET attempts = attempts + 1, last_error = ?2, next_ms = ?3 WHERE seq = ?1",
    )?
    .execute(params![seq, error, next_ms])?;
    Ok(())
}

/// Events [`outbox_trim`] dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Trimmed {
    /// Older than `notify_outbox.max_age_secs`.
    pub expired: u64,
    /// Beyond `notify_outbox.max_events` (the oldest go first).
    pub full: u64,
}

/// Whether [`outbox_trim`] would drop anything (a read, so an idle worker does not write).
pub fn outbox_over_bounds(
    conn: &Connection,
    endpoint: i64,
    max_events: u64,
    older_than_ms: Option<i64>,
) -> Result<bool, JournalError> {
    let (n, oldest): (i64, Option<i64>) = conn
        .prepare_cached("SELECT COUNT(*), MIN(at_ms) FROM outbox WHERE endpoint = ?1")?
        .query_row([endpoint], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let expired = matches!((oldest, older_than_ms), (Some(o), Some(b)) if o < b);
    Ok(expired || n.max(0) as u64 > max_events)
}

/// Applies the outbox's bounds to one receiver's events.
pub fn outbox_trim(
    conn: &Connection,
    endpoint: i64,
    max_events: u64,
    older_than_ms: Option<i64>,
) -> Result<Trimmed, JournalError> {
    let mut t = Trimmed::default();
    if let Some(before) = older_than_ms {
        t.expired = conn
            .prepare_cached("DELETE FROM outbox WHERE endpoint = ?1 AND at_ms < ?2")?
            .execute(params![endpoint, before])? as u64;
    }
    let n: i64 = conn
        .prepare_cached("SELECT COUNT(*) FROM outbox WHERE endpoint = ?1")?
        .query_row([endpoint], |r| r.get(0))?;
    let over = n - max_events.min(i64::MAX as u64) as i64;
    if over > 0 {
        t.full = conn
            .prepare_cached(
                "DELETE FROM outbox WHERE seq IN
                     (SELECT seq FROM outbox WHERE endpoint = ?1 ORDER BY seq LIMIT ?2)",
            )?
            .execute(params![endpoint, over])? as u64;
    }
    Ok(t)
}

/// One receiver's backlog, for `status`, `/metrics` and the status page.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct OutboxFigures {
    pub url: String,
    /// Events not delivered yet.
    pub backlog: u64,
    /// Age of the oldest of them (0 when none waits).
    pub oldest_secs: u64,
    /// Failed attempts of the event at the head of the queue.
    pub head_attempts: u64,
    /// Why its last attempt failed.
    pub last_error: Option<String>,
}

/// Figures per configured receiver, in config order.
pub fn outbox_figures(conn: &Connection) -> Result<Vec<OutboxFigures>, JournalError> {
    let now = now_ms();
    let mut stmt = conn.prepare_cached(
        "SELECT e.url,
                (SELECT COUNT(*) FROM outbox o WHERE o.endpoint = e.id),
                (SELECT MIN(at_ms) FROM outbox o WHERE o.endpoint = e.id),
                (SELECT attempts FROM outbox o WHERE o.endpoint = e.id ORDER BY seq LIMIT 1),
                (SELECT last_error FROM outbox o WHERE o.endpoint = e.id ORDER BY seq LIMIT 1)
         FROM notify_endpoints e ORDER BY e.id",
    )?;
    let rows = stmt
        .query_map([], |r| {
            let oldest: Option<i64> = r.get(2)?;
            Ok(OutboxFigures {
                url: r.get(0)?,
                backlog: r.get::<_, i64>(1)?.max(0) as u64,
                oldest_secs: oldest.map_or(0, |o| ((now - o).max(0) / 1000) as u64),
                head_attempts: r.get::<_, Option<i64>>(3)?.unwrap_or(0).max(0) as u64,
                last_error: r.get(4)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::journal::{
        get_by_path, intake, open_rw, set_deleted, set_failed, set_uploaded, set_vanished,
    };
    use crate::util::fs::Identity;
    use std::path::Path;

    fn ident(size: u64) -> Identity {
        Identity {
            dev: 1,
            ino: 2,
            size,
            mtime_ns: 3,
        }
    }

    fn events(conn: &Connection, endpoint: i64) -> Vec<(String, String)> {
        let mut out = Vec::new();
        while let Some(r) = outbox_head(conn, endpoint).unwrap() {
            out.push((r.path.to_string_lossy().into_owned(), r.event.clone()));
            outbox_delivered(conn, r.seq).unwrap();
        }
        out
    }

    /// Every change to a reported state writes one row per receiver that wants the event, in
    /// the change's own transaction (a rolled-back change leaves none), whoever writes it.
    #[test]
    fn state_changes_write_outbox_rows_in_their_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_rw(&dir.path().join("j.db")).unwrap();
        let sync = sync_receivers(
            &conn,
            &[
                (
                    "http://a/".into(),
                    vec!["stored", "deleted", "failed", "vanished"],
                ),
                ("http://b/".into(), vec!["failed"]),
            ],
        )
        .unwrap();
        let (a, b) = (sync.receivers[0].id, sync.receivers[1].id);
        for (rel, size) in [("s.mp4", 10u64), ("f.mp4", 20), ("v.mp4", 30)] {
            intake(&conn, Path::new(rel), rel, &ident(size), true).unwrap();
        }
        let row = |rel: &str| get_by_path(&conn, Path::new(rel)).unwrap().unwrap();
        let s = row("s.mp4");
        set_uploaded(&conn, s.id, s.generation, &ident(10), "abc", Some(7)).unwrap();
        set_deleted(&conn, s.id, s.generation).unwrap();
        let f = row("f.mp4");
        set_failed(&conn, f.id, f.generation, "HTTP 403 AccessDenied", 0).unwrap();
        let v = row("v.mp4");
        set_vanished(&conn, v.id, v.generation).unwrap();
        // Rolled back: no event.
        conn.execute_batch("BEGIN").unwrap();
        conn.execute(
            "UPDATE files SET state = 'failed' WHERE path = CAST('v.mp4' AS BLOB)",
            [],
        )
        .unwrap();
        assert_eq!(outbox_figures(&conn).unwrap()[1].backlog, 2);
        conn.execute_batch("ROLLBACK").unwrap();

        let head = outbox_head(&conn, a).unwrap().unwrap();
        assert_eq!(
            (
                head.event.as_str(),
                head.key.as_str(),
                head.size,
                head.md5.as_deref(),
                head.crc64.as_deref()
            ),
            ("stored", "s.mp4", 10, Some("abc"), Some("7"))
        );
        let figures = outbox_figures(&conn).unwrap();
        assert_eq!((figures[0].backlog, figures[1].backlog), (4, 1));
        let f_head = outbox_head(&conn, b).unwrap().unwrap();
        assert_eq!(f_head.error.as_deref(), Some("HTTP 403 AccessDenied"));
        assert_eq!(
            events(&conn, a),
            [
                ("s.mp4", "stored"),
                ("s.mp4", "deleted"),
                ("f.mp4", "failed"),
                ("v.mp4", "vanished")
            ]
            .map(|(p, e)| (p.to_string(), e.to_string()))
        );
        assert_eq!(
            events(&conn, b),
            [("f.mp4".to_string(), "failed".to_string())]
        );
        assert!(outbox_epoch(&conn).unwrap() > 0);
    }

    /// The bounds drop the oldest events first; a receiver taken out of the config goes with
    /// its events; a receiver that stays keeps its id and its events.
    #[test]
    fn bounds_and_receiver_changes() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_rw(&dir.path().join("j.db")).unwrap();
        let both = [
            ("http://a/".to_string(), vec!["failed"]),
            ("http://b/".to_string(), vec!["failed"]),
        ];
        let ids: Vec<i64> = sync_receivers(&conn, &both)
            .unwrap()
            .receivers
            .iter()
            .map(|r| r.id)
            .collect();
        for i in 0..5 {
            let rel = format!("f{i}");
            intake(&conn, Path::new(&rel), &rel, &ident(1), true).unwrap();
            let r = get_by_path(&conn, Path::new(&rel)).unwrap().unwrap();
            set_failed(&conn, r.id, r.generation, "x", 0).unwrap();
        }
        let t = outbox_trim(&conn, ids[0], 3, None).unwrap();
        assert_eq!(
            t,
            Trimmed {
                expired: 0,
                full: 2
            }
        );
        assert_eq!(
            outbox_head(&conn, ids[0]).unwrap().unwrap().path,
            Path::new("f2")
        );
        conn.execute(
            "UPDATE outbox SET at_ms = 0 WHERE path = CAST('f2' AS BLOB)",
            [],
        )
        .unwrap();
        let t = outbox_trim(&conn, ids[0], 3, Some(1)).unwrap();
        assert_eq!(
            t,
            Trimmed {
                expired: 1,
                full: 0
            }
        );
        let sync = sync_receivers(&conn, &both[1..]).unwrap();
        assert_eq!(sync.removed, vec![("http://a/".to_string(), 2)]);
        assert_eq!(sync.receivers[0].id, ids[1]);
        assert_eq!(outbox_figures(&conn).unwrap()[0].backlog, 5);
    }
}
