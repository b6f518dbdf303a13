//! Schema and migrations. `PRAGMA user_version` holds the schema version; each migration runs
//! in its own transaction, so an interrupted upgrade is retried whole at the next start.

use std::path::Path;

use rusqlite::Connection;

use super::JournalError;

/// The schema version this build writes.
pub const VERSION: i64 = 6;

/// Entries the `unstored` log keeps (the triggers of schema 3 trim it to this many).
pub const UNSTORED_LOG_KEPT: i64 = 10_000;

const MIGRATIONS: &[&str] = &[
    // 1: files and their multipart parts.
    r#"
    CREATE TABLE files (
        id               INTEGER PRIMARY KEY,
        path             BLOB NOT NULL UNIQUE,   -- relative to watch.root, raw bytes
        key              TEXT NOT NULL,          -- object key
        state            TEXT NOT NULL,
        generation       INTEGER NOT NULL DEFAULT 0, -- bumped when the file is re-queued
        dev              INTEGER,
        ino              INTEGER,
        size             INTEGER NOT NULL DEFAULT 0,
        mtime_ns         INTEGER,
        md5              TEXT,                   -- whole file, hex; set once read completely
        upload_id        TEXT,                   -- multipart upload in progress
        upload_generation INTEGER,               -- the generation upload_id belongs to
        part_size        INTEGER,
        bytes_sent       INTEGER NOT NULL DEFAULT 0,
        attempts         INTEGER NOT NULL DEFAULT 0,
        next_attempt_ms  INTEGER NOT NULL DEFAULT 0,
        last_error       TEXT,
        last_error_ms    INTEGER,
        discovered_ms    INTEGER NOT NULL,
        queued_ms        INTEGER,
        uploaded_ms      INTEGER,
        deleted_ms       INTEGER,
        updated_ms       INTEGER NOT NULL
    );
    CREATE INDEX files_state_due ON files(state, next_attempt_ms);
    CREATE INDEX files_key ON files(key);
    CREATE TABLE parts (
        file_id      INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
        upload_id    TEXT NOT NULL,
        part_number  INTEGER NOT NULL,
        offset       INTEGER NOT NULL,
        size         INTEGER NOT NULL,
        md5          TEXT NOT NULL,              -- hex of the part's bytes
        etag         TEXT NOT NULL,              -- as the store returned it
        PRIMARY KEY (file_id, part_number)
    ) WITHOUT ROWID;
    "#,
    // 2: a row the deleter updates with a durable commit before it unlinks files.
    r#"
    CREATE TABLE meta (
        k TEXT PRIMARY KEY,
        v INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO meta (k, v) VALUES ('barrier', 0);
    "#,
    // 3: the log of paths whose stored row went away or changed, which the look-up index
    // (`lookup/index.rs`) follows; kept to its last 10,000 entries. Triggers, so that every
    // writer appends to it: the daemon, `import`, or someone with sqlite3.
    r#"
    CREATE TABLE unstored (
        seq  INTEGER PRIMARY KEY AUTOINCREMENT,
        path BLOB NOT NULL
    );
    CREATE TRIGGER files_unstored_update AFTER UPDATE OF state, path, key, size, md5 ON files
    WHEN old.state IN ('uploaded', 'deleted')
     AND (new.state NOT IN ('uploaded', 'deleted') OR new.path IS NOT old.path
          OR new.key IS NOT old.key OR new.size IS NOT old.size OR new.md5 IS NOT old.md5)
    BEGIN
        INSERT INTO unstored (path) VALUES (old.path);
        DELETE FROM unstored WHERE seq <= (SELECT MAX(seq) FROM unstored) - 10000;
    END;
    CREATE TRIGGER files_unstored_delete AFTER DELETE ON files
    WHEN old.state IN ('uploaded', 'deleted')
    BEGIN
        INSERT INTO unstored (path) VALUES (old.path);
        DELETE FROM unstored WHERE seq <= (SELECT MAX(seq) FROM unstored) - 10000;
    END;
    "#,
    // 4: the whole file's CRC-64/XZ (decimal, as OSS's `x-oss-hash-crc64ecma`), computed in
    // the same pass as the MD5s and compared with the store's where it sends one.
    r#"
    ALTER TABLE files ADD COLUMN crc64 TEXT;
    "#,
    // 5: the notification outbox (`outbox.rs`). The daemon lists the configured receivers in
    // `notify_endpoints` at start; triggers write one outbox row per (event, receiver) in the
    // transaction of the state change they report, whoever makes it. `outbox_epoch` makes
    // event ids unique across journals (a recreated journal restarts `seq`). The index on
    // `uploaded_ms` serves the status page's recent uploads and throughput chart.
    r#"
    CREATE TABLE notify_endpoints (
        id     INTEGER PRIMARY KEY,
        url    TEXT NOT NULL UNIQUE,
        events TEXT NOT NULL                  -- ',stored,failed,': the events it wants
    );
    CREATE TABLE outbox (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        endpoint   INTEGER NOT NULL REFERENCES notify_endpoints(id) ON DELETE CASCADE,
        file_id    INTEGER NOT NULL,
        event      TEXT NOT NULL,             -- stored | deleted | failed | vanished
        path       BLOB NOT NULL,
        key        TEXT NOT NULL,
        size       INTEGER NOT NULL,
        md5        TEXT,
        crc64      TEXT,
        error      TEXT,
        at_ms      INTEGER NOT NULL,
        attempts   INTEGER NOT NULL DEFAULT 0,
        next_ms    INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        body       TEXT                       -- the JSON sent, fixed at the first attempt
    );
    CREATE INDEX outbox_endpoint ON outbox(endpoint, seq);
    INSERT OR IGNORE INTO meta (k, v) VALUES ('outbox_epoch', abs(random() % 4294967296));
    CREATE INDEX files_uploaded_ms ON files(uploaded_ms) WHERE uploaded_ms IS NOT NULL;
    CREATE TRIGGER files_notify_update AFTER UPDATE OF state ON files
    WHEN new.state IS NOT old.state AND new.state IN ('uploaded', 'deleted', 'failed', 'vanished')
    BEGIN
        INSERT INTO outbox (endpoint, file_id, event, path, key, size, md5, crc64, error, at_ms)
        SELECT e.id, new.id, ev.name, new.path, new.key, new.size, new.md5, new.crc64,
               CASE WHEN new.state = 'failed' THEN new.last_error END, new.updated_ms
        FROM notify_endpoints e,
             (SELECT CASE new.state WHEN 'uploaded' THEN 'stored' ELSE new.state END AS name) ev
        WHERE instr(e.events, ',' || ev.name || ',') > 0
        ORDER BY e.id;
    END;
    CREATE TRIGGER files_notify_insert AFTER INSERT ON files
    WHEN new.state = 'failed'
    BEGIN
        INSERT INTO outbox (endpoint, file_id, event, path, key, size, md5, crc64, error, at_ms)
        SELECT e.id, new.id, 'failed', new.path, new.key, new.size, new.md5, new.crc64,
               new.last_error, new.updated_ms
        FROM notify_endpoints e
        WHERE instr(e.events, ',failed,') > 0
        ORDER BY e.id;
    END;
    "#,
    // 6: the store that holds a row's object, or the one its upload in progress goes to
    // ('primary' | 'standby'); multipart uploads left open on a store the uploads moved away
    // from, aborted once that store answers again; and the `unstored` trigger also fires when
    // a stored row changes store (so the look-up index re-reads it); the outbox's events
    // carry the store.
    r#"
    ALTER TABLE files ADD COLUMN store TEXT NOT NULL DEFAULT 'primary';
    CREATE TABLE abandoned_uploads (
        store     TEXT NOT NULL,
        key       TEXT NOT NULL,
        upload_id TEXT NOT NULL,
        since_ms  INTEGER NOT NULL,
        PRIMARY KEY (store, upload_id)
    ) WITHOUT ROWID;
    DROP TRIGGER files_unstored_update;
    CREATE TRIGGER files_unstored_update AFTER UPDATE OF state, path, key, size, md5, store ON files
    WHEN old.state IN ('uploaded', 'deleted')
     AND (new.state NOT IN ('uploaded', 'deleted') OR new.path IS NOT old.path
          OR new.key IS NOT old.key OR new.size IS NOT old.size OR new.md5 IS NOT old.md5
          OR new.store IS NOT old.store)
    BEGIN
        INSERT INTO unstored (path) VALUES (old.path);
        DELETE FROM unstored WHERE seq <= (SELECT MAX(seq) FROM unstored) - 10000;
    END;
    -- Notification events name the store that held the file when the change was committed.
    ALTER TABLE outbox ADD COLUMN store TEXT;
    DROP TRIGGER files_notify_update;
    CREATE TRIGGER files_notify_update AFTER UPDATE OF state ON files
    WHEN new.state IS NOT old.state AND new.state IN ('uploaded', 'deleted', 'failed', 'vanished')
    BEGIN
        INSERT INTO outbox (endpoint, file_id, event, path, key, size, md5, crc64, error, at_ms,
                            store)
        SELECT e.id, new.id, ev.name, new.path, new.key, new.size, new.md5, new.crc64,
               CASE WHEN new.state = 'failed' THEN new.last_error END, new.updated_ms, new.store
        FROM notify_endpoints e,
             (SELECT CASE new.state WHEN 'uploaded' THEN 'stored' ELSE new.state END AS name) ev
        WHERE instr(e.events, ',' || ev.name || ',') > 0
        ORDER BY e.id;
    END;
    DROP TRIGGER files_notify_insert;
    CREATE TRIGGER files_notify_insert AFTER INSERT ON files
    WHEN new.state = 'failed'
    BEGIN
        INSERT INTO outbox (endpoint, file_id, event, path, key, size, md5, crc64, error, at_ms,
                            store)
        SELECT e.id, new.id, 'failed', new.path, new.key, new.size, new.md5, new.crc64,
               new.last_error, new.updated_ms, new.store
        FROM notify_endpoints e
        WHERE instr(e.events, ',failed,') > 0
        ORDER BY e.id;
    END;
    "#,
];

pub fn migrate(conn: &mut Connection, path: &Path) -> Result<(), JournalError> {
    debug_assert_eq!(MIGRATIONS.len() as i64, VERSION);
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current > VERSION {
        return Err(JournalError::TooNew {
            path: path.to_path_buf(),
            found: current,
            known: VERSION,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current.max(0) as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}
