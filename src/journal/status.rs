//! Figures over the whole journal: `status` ([`summary`]) and the daemon's status line and
//! metrics ([`queue`]).

use std::collections::BTreeMap;

use rusqlite::Connection;
use serde::Serialize;

use super::JournalError;
use super::rows::{State, now_ms};

/// Figures for `status`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Summary {
    pub counts: BTreeMap<String, u64>,
    pub bytes: BTreeMap<String, u64>,
    pub bytes_waiting: u64,
    pub oldest_waiting_secs: u64,
    pub bytes_uploading_sent: u64,
    pub last_errors: Vec<LastError>,
    /// The notification outbox, per configured receiver.
    pub notify: Vec<super::outbox::OutboxFigures>,
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
    s.notify = super::outbox::outbox_figures(conn)?;
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
    use crate::journal::{get_by_path, intake, open_rw, set_uploaded, start_upload};
    use crate::util::fs::Identity;
    use std::path::Path;

    fn ident(size: u64, mtime_ns: i64) -> Identity {
        Identity {
            dev: 1,
            ino: 2,
            size,
            mtime_ns,
        }
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
