//! Schema and migrations. `PRAGMA user_version` holds the schema version; each migration runs
//! in its own transaction, so an interrupted upgrade is retried whole at the next start.

use std::path::Path;

use rusqlite::Connection;

use super::JournalError;

/// The schema version this build writes.
pub const VERSION: i64 = 5;

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
    // 5: the store that holds a row's object, or the one its upload in progress goes to
    // ('primary' | 'standby'); multipart uploads left open on a store the uploads moved away
    // from, aborted once that store answers again; and the `unstored` trigger also fires when
    // a stored row changes store (so the look-up index re-reads it).
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
