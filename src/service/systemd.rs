//! systemd integration (`Type=notify`, `WatchdogSec=`): the messages, and the status line the
//! monitor (`super::monitor`) keeps up to date.
//!
//! Messages on `$NOTIFY_SOCKET` (nothing is sent when it is unset):
//!
//! - `STATUS=starting: …` while the journal is recovered;
//! - `READY=1` at the end of `Daemon::start` (`daemon.rs`): the journal is recovered, every
//!   stage runs and every listener is bound;
//! - `STATUS=queued 12, uploading 2 (1.3 GiB), oldest 4m` every [`STATUS_EVERY`] (what
//!   `systemctl status` shows), prefixed with `STALLED: …` when a stage stopped;
//! - `WATCHDOG=1` every half `$WATCHDOG_USEC` — only when `$WATCHDOG_PID` is unset or this
//!   process, and only while every stage of the pipeline makes progress
//!   ([`super::health::Liveness`]); a stalled stage stops the pings and systemd restarts us;
//! - `STOPPING=1` when a shutdown begins. While the drain runs the pings go on regardless of
//!   the stages, which are stopping on purpose.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::debug;

use super::health::Stall;
use crate::journal::{Queue, State};
use crate::util::human::{human_age, human_bytes};

/// How often `STATUS=` and the journal metrics are refreshed.
pub const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Sends `states` to the service manager; a failure is logged, never fatal.
pub fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        debug!(error = %e, "cannot notify the service manager");
    }
}

/// The watchdog interval systemd asked for, when it concerns this process.
pub fn watchdog() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// Files being uploaded right now, and their total size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InFlight {
    pub files: u64,
    pub bytes: u64,
}

/// The one-line queue summary of `STATUS=`: files waiting for their turn, files in flight
/// (with their size), failed files, files waiting to settle again, and the oldest file's age.
pub fn status_line(q: &Queue, in_flight: InFlight, stall: Option<&Stall>) -> String {
    let mut s = String::new();
    if let Some(st) = stall {
        s.push_str(&format!("STALLED: {st}; "));
    }
    if q.waiting() == 0 && in_flight.files == 0 {
        let stored = q.count(State::Uploaded) + q.count(State::Deleted);
        let files = if stored == 1 { "file" } else { "files" };
        s.push_str(&format!("idle, {stored} {files} stored"));
        return s;
    }
    // Files in flight are `queued` (small ones), `uploading` (multipart) or `failed` (a
    // retry) in the journal: what remains of the first two is waiting for a slot.
    let queued =
        (q.count(State::Queued) + q.count(State::Uploading)).saturating_sub(in_flight.files);
    s.push_str(&format!(
        "queued {queued}, uploading {} ({})",
        in_flight.files,
        human_bytes(in_flight.bytes)
    ));
    if q.count(State::Failed) > 0 {
        s.push_str(&format!(", failed {}", q.count(State::Failed)));
    }
    if q.count(State::Settling) > 0 {
        s.push_str(&format!(", settling {}", q.count(State::Settling)));
    }
    s.push_str(&format!(", oldest {}", human_age(q.oldest_waiting_secs)));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(counts: &[(State, u64)], uploading_bytes: u64, oldest: u64) -> Queue {
        let mut q = Queue {
            uploading_bytes,
            oldest_waiting_secs: oldest,
            ..Queue::default()
        };
        for (s, n) in counts {
            q.counts.insert(*s, *n);
        }
        q
    }

    #[test]
    fn status_lines() {
        let q = queue(&[(State::Queued, 13), (State::Uploading, 1)], 0, 240);
        let two = InFlight {
            files: 2,
            bytes: 1_395_864_371,
        };
        assert_eq!(
            status_line(&q, two, None),
            "queued 12, uploading 2 (1.3 GiB), oldest 4m"
        );
        let q = queue(
            &[(State::Queued, 1), (State::Failed, 3), (State::Settling, 1)],
            0,
            3 * 3600,
        );
        assert_eq!(
            status_line(&q, InFlight::default(), None),
            "queued 1, uploading 0 (0 B), failed 3, settling 1, oldest 3h00m"
        );
        let q = queue(&[(State::Deleted, 1)], 0, 0);
        assert_eq!(
            status_line(&q, InFlight::default(), None),
            "idle, 1 file stored"
        );
        let q = queue(&[(State::Deleted, 7), (State::Uploaded, 1)], 0, 0);
        assert_eq!(
            status_line(&q, InFlight::default(), None),
            "idle, 8 files stored"
        );
        let stall = Stall {
            stage: "intake",
            age: Duration::from_secs(130),
        };
        assert_eq!(
            status_line(&q, InFlight::default(), Some(&stall)),
            "STALLED: intake made no progress for 2m; idle, 8 files stored"
        );
    }
}
