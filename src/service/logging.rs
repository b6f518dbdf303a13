//! Where log lines go.
//!
//! Under systemd, stderr is connected to the journal and `$JOURNAL_STREAM` says which stream
//! (`DEVICE:INODE`). When that matches what fd 2 really is, events go to journald natively
//! (`tracing-journald`): priorities, and every field as a journal field — `F_PATH`, `F_KEY`,
//! `F_SIZE` from the per-file span included, so `journalctl -u record-offload F_KEY=…` finds
//! one file's story. Otherwise (a terminal, a pipe, a test, or stderr redirected by a child of
//! the service) plain text goes to stderr. The filter is `RUST_LOG` when set, else `log.level`.
//!
//! Secrets never reach a log line: the configuration is never logged (only chosen fields such
//! as the bucket and endpoint), the SDK's credentials redact themselves in `Debug`, and
//! `check-config` prints a redacted copy. `tests/service.rs` (`no_secret_in_anything_printed`)
//! runs the binary with a known secret, at trace level, and searches everything it printed.

use std::io::IsTerminal;
use std::os::fd::AsFd;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Whether `$JOURNAL_STREAM` (`DEVICE:INODE`, decimal) names the file `dev`/`ino`.
pub fn journal_stream_matches(var: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = var.trim().split_once(':') else {
        return false;
    };
    matches!((d.parse::<u64>(), i.parse::<u64>()), (Ok(d), Ok(i)) if d == dev && i == ino)
}

/// Whether stderr is the journal stream systemd connected us to.
pub fn stderr_is_journal() -> bool {
    let Some(var) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(st) = rustix::fs::fstat(std::io::stderr().as_fd()) else {
        return false;
    };
    journal_stream_matches(&var.to_string_lossy(), st.st_dev, st.st_ino)
}

fn filter(level: &str) -> EnvFilter {
    EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the global subscriber (once; later calls do nothing).
pub fn init(level: &str) {
    if stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer.with_syslog_identifier("record-offload".to_string());
                let _ = tracing_subscriber::registry()
                    .with(filter(level))
                    .with(layer)
                    .try_init();
                return;
            }
            Err(e) => {
                eprintln!("record-offload: cannot reach journald ({e}); logging to stderr instead")
            }
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter(level))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn journal_stream_is_matched_by_device_and_inode() {
        let f = tempfile::tempfile().unwrap();
        let m = f.metadata().unwrap();
        let var = format!("{}:{}", m.dev(), m.ino());
        assert!(journal_stream_matches(&var, m.dev(), m.ino()));
        assert!(!journal_stream_matches(&var, m.dev(), m.ino() + 1));
        assert!(!journal_stream_matches(&var, m.dev() + 1, m.ino()));
        assert!(!journal_stream_matches("", m.dev(), m.ino()));
        assert!(!journal_stream_matches("12", 12, 0));
        assert!(!journal_stream_matches("a:b", 0, 0));
    }
}
