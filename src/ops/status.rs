//! `status` and `ls`: what the journal says, for people (tables) and scripts (`--json`).

use crate::config::Settings;
use crate::journal::{self, FileRow, State};
use crate::service::disk::{DiskReport, disk_space, read_report, report_path};
use crate::util::human::{human_age, human_bytes};

/// A forecast older than this was left by a daemon that no longer runs (it rewrites it every
/// status tick).
const FORECAST_FRESH_MS: i64 = 60_000;

/// The watch root's disk as `status` shows it: free space now, and the running daemon's
/// forecast when it is fresh.
#[derive(Debug, serde::Serialize)]
struct DiskStatus {
    free_bytes: Option<u64>,
    size_bytes: Option<u64>,
    /// `None`: no daemon has sampled the disk in the last minute.
    forecast: Option<DiskReport>,
}

fn disk_status(settings: &Settings) -> DiskStatus {
    let space = disk_space(&settings.config.watch.root).ok();
    let forecast = read_report(&report_path(&settings.config.journal.path))
        .filter(|r| journal::now_ms().saturating_sub(r.at_ms) < FORECAST_FRESH_MS);
    DiskStatus {
        free_bytes: space.map(|s| s.0),
        size_bytes: space.map(|s| s.1),
        forecast,
    }
}

/// The `disk:` line of `status`.
fn disk_line(d: &DiskStatus) -> String {
    let mut line = match (d.free_bytes, d.size_bytes) {
        (Some(free), Some(size)) => {
            format!("disk: {} free of {}", human_bytes(free), human_bytes(size))
        }
        _ => "disk: free space unknown (the watch root cannot be read)".to_string(),
    };
    match &d.forecast {
        None => {
            line.push_str("; no forecast (no running daemon has sampled it in the last minute)")
        }
        Some(r) => match (r.full_in_secs, r.fill_rate_bytes_per_sec) {
            (Some(s), Some(rate)) => {
                line.push_str(&format!(
                    "; full in {} at {}/s net",
                    human_age(s as u64),
                    human_bytes(rate.max(0.0) as u64)
                ));
                if r.warning {
                    line.push_str(&format!(
                        " (WARNING: under watch.disk_warn_secs = {})",
                        human_age(r.warn_secs as u64)
                    ));
                }
            }
            _ => line.push_str("; not filling"),
        },
    }
    line
}

pub(super) fn status(
    settings: &Settings,
    conn: &rusqlite::Connection,
    json: bool,
) -> Result<(), journal::JournalError> {
    let mut s = journal::summary(conn)?;
    // A receiver's query may carry a token: receivers are named without it.
    for f in &mut s.notify {
        f.url = crate::config::receiver_label(&f.url);
    }
    let disk = disk_status(settings);
    if json {
        let invalid = |e: serde_json::Error| journal::JournalError::Invalid(e.to_string());
        let mut v = serde_json::to_value(&s).map_err(invalid)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("disk".into(), serde_json::to_value(&disk).map_err(invalid)?);
        }
        println!("{}", serde_json::to_string_pretty(&v).map_err(invalid)?);
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
    println!("{}", disk_line(&disk));
    let (primary, standby) = journal::stored_per_store(conn)?;
    if standby > 0 || settings.standby.is_some() {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn report(full_in: Option<f64>, warning: bool) -> DiskReport {
        DiskReport {
            free_bytes: 1 << 30,
            size_bytes: 4 << 30,
            fill_rate_bytes_per_sec: full_in.map(|s| (1u64 << 30) as f64 / s),
            full_in_secs: full_in,
            warn_secs: 21600.0,
            warning,
            at_ms: journal::now_ms(),
        }
    }

    #[test]
    fn the_disk_line_says_what_the_forecast_says() {
        let d = |forecast| DiskStatus {
            free_bytes: Some(1 << 30),
            size_bytes: Some(4 << 30),
            forecast,
        };
        let l = disk_line(&d(None));
        assert!(
            l.starts_with("disk: 1.0 GiB free of 4.0 GiB; no forecast"),
            "{l}"
        );
        let l = disk_line(&d(Some(report(None, false))));
        assert!(l.ends_with("; not filling"), "{l}");
        let l = disk_line(&d(Some(report(Some(7200.0), true))));
        assert!(l.contains("; full in 2h") && l.contains("WARNING"), "{l}");
        let l = disk_line(&d(Some(report(Some(86400.0), false))));
        assert!(l.contains("; full in ") && !l.contains("WARNING"), "{l}");
    }

    #[test]
    fn a_stale_report_is_no_forecast() {
        let dir = tempfile::tempdir().unwrap();
        let settings = crate::config::from_toml_str(&format!(
            "[watch]\nroot = {:?}\n[journal]\npath = {:?}\n[storage]\nbucket = \"rec\"\n\
             access_key_id = \"id\"\naccess_key_secret = \"s\"\n",
            dir.path().display().to_string(),
            dir.path().join("journal.db").display().to_string()
        ))
        .unwrap();
        let path = report_path(&settings.config.journal.path);
        crate::service::disk::publish(&path, &report(Some(60.0), true)).unwrap();
        assert!(disk_status(&settings).forecast.is_some());
        let mut old = report(Some(60.0), true);
        old.at_ms -= FORECAST_FRESH_MS + 1;
        crate::service::disk::publish(&path, &old).unwrap();
        let d = disk_status(&settings);
        assert!(d.forecast.is_none());
        assert!(d.size_bytes.is_some());
    }
}
