//! `status` and `ls`: what the journal says, for people (tables) and scripts (`--json`).

use crate::config::Settings;
use crate::journal::{self, FileRow, State};
use crate::util::human::{human_age, human_bytes};

pub(super) fn status(
    _settings: &Settings,
    conn: &rusqlite::Connection,
    json: bool,
) -> Result<(), journal::JournalError> {
    let mut s = journal::summary(conn)?;
    // A receiver's query may carry a token: receivers are named without it.
    for f in &mut s.notify {
        f.url = crate::config::receiver_label(&f.url);
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&s)
                .map_err(|e| journal::JournalError::Invalid(e.to_string()))?
        );
        return Ok(());
    }
    println!("{:<10} {:>8} {:>12}", "STATE", "FILES", "BYTES");
    for st in State::ALL {
        let n = s.counts.get(st.as_str()).copied().unwrap_or(0);
        let b = s.bytes.get(st.as_str()).copied().unwrap_or(0);
        println!("{:<10} {:>8} {:>12}", st.as_str(), n, human_bytes(b));
    }
    println!();
    println!("waiting: {}", human_bytes(s.bytes_waiting));
    println!("oldest waiting: {}", human_age(s.oldest_waiting_secs));
    let (primary, standby) = journal::stored_per_store(conn)?;
    if standby > 0 || _settings.standby.is_some() {
        println!("stored on the primary: {primary}, on the standby: {standby}");
    }
    if !s.last_errors.is_empty() {
        println!("last errors:");
        for e in &s.last_errors {
            println!("  #{} {} ({}): {}", e.id, e.path, e.state, e.error);
        }
    }
    if !s.notify.is_empty() {
        println!("notifications:");
        for f in &s.notify {
            print!(
                "  {}: {} undelivered, oldest {}",
                f.url,
                f.backlog,
                human_age(f.oldest_secs)
            );
            match &f.last_error {
                Some(e) => println!(", {} failed attempts, last: {e}", f.head_attempts),
                None => println!(),
            }
        }
    }
    Ok(())
}

pub(super) fn ls(
    conn: &rusqlite::Connection,
    state: Option<State>,
    json: bool,
    limit: Option<usize>,
) -> Result<(), journal::JournalError> {
    let rows: Vec<FileRow> = journal::list(conn, state, limit)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows)
                .map_err(|e| journal::JournalError::Invalid(e.to_string()))?
        );
        return Ok(());
    }
    println!(
        "{:>6} {:<10} {:<8} {:>10}  PATH",
        "ID", "STATE", "STORE", "SIZE"
    );
    for r in rows {
        println!(
            "{:>6} {:<10} {:<8} {:>10}  {}{}",
            r.id,
            r.state.as_str(),
            r.store.as_str(),
            human_bytes(r.size),
            r.path.display(),
            r.last_error
                .as_deref()
                .filter(|_| r.state.is_waiting())
                .map(|e| format!("  [{e}]"))
                .unwrap_or_default()
        );
    }
    Ok(())
}
