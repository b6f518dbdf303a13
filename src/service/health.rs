//! Liveness of the pipeline: is every long-running stage still making progress?
//!
//! A bare timer proves only that the runtime runs. Instead each stage records a [`Heartbeat`]
//! whenever its loop comes round — the watcher (at least once a second: its settle tick), the
//! intake (after each batch, and once a second while it waits for work), the uploader's
//! scheduler (every pass, at least four times a second) and the journal's writer thread (after
//! each commit; while it is idle the monitor sends it an empty transaction now and then, see
//! [`Liveness::journal_probe_due`]). A stage whose heartbeat is older than `health.stall_secs`
//! is stalled: the systemd watchdog pings stop (so systemd restarts the daemon), `/healthz`
//! answers 503 naming the stage, `STATUS=` says so and `record_offload_healthy` turns 0.
//!
//! One [`Liveness`] per daemon holds that verdict; everything that reports health asks it,
//! through the handle the daemon passes around (no process-wide state: several daemons may
//! run in one process, as they do in the tests).
//!
//! Waiting for input is progress: a loop that waits for work wakes up on a timer to beat. What
//! does not beat is a loop stuck in a call that never returns — a journal write that never
//! commits, a hung file-system call, a deadlock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use serde::Serialize;

use crate::util::heartbeat::Heartbeat;

/// What `/healthz` answers: 200 when `ok`, otherwise 503 with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Health {
    /// `ok`, `stalled`, `stopping` or `not_running`.
    pub status: &'static str,
    /// Why the pipeline is not healthy (absent when it is).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Health {
    pub fn ok() -> Health {
        Health {
            status: "ok",
            reason: None,
        }
    }

    pub fn is_ok(&self) -> bool {
        self.reason.is_none()
    }

    /// The HTTP status `/healthz` answers with.
    pub fn http_status(&self) -> u16 {
        if self.is_ok() { 200 } else { 503 }
    }

    /// The JSON body of `/healthz`: `{"status":"ok"}` or `{"status":"stalled","reason":"…"}`.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{\"status\":\"error\"}".to_string())
    }
}

/// A stage that made no progress for too long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stall {
    pub stage: &'static str,
    pub age: Duration,
}

impl std::fmt::Display for Stall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} made no progress for {}",
            self.stage,
            crate::util::human::human_age(self.age.as_secs())
        )
    }
}

/// The stages of one daemon and how long each may go without progress: the one place that
/// decides whether the daemon is alive. `/healthz` ([`HealthCheck`]), the watchdog pings and
/// `STATUS=` (`super::monitor`) and the liveness metrics all ask it.
#[derive(Debug)]
pub struct Liveness {
    stages: Vec<(&'static str, Arc<Heartbeat>)>,
    allowance: Duration,
    /// [`RUNNING`], [`STOPPING`] or [`STOPPED`].
    phase: AtomicU8,
    /// Why the daemon runs but needs attention (the disk forecast, `super::monitor`).
    degraded: std::sync::Mutex<Option<String>>,
}

const RUNNING: u8 = 0;
const STOPPING: u8 = 1;
const STOPPED: u8 = 2;

/// Stage names, as they appear in logs, `STATUS=`, `/healthz` and metrics.
pub const WATCHER: &str = "watcher";
pub const INTAKE: &str = "intake";
pub const UPLOADER: &str = "uploader";
pub const JOURNAL: &str = "journal-writer";

impl Liveness {
    pub fn new(stages: Vec<(&'static str, Arc<Heartbeat>)>, allowance: Duration) -> Liveness {
        Liveness {
            stages,
            allowance,
            phase: AtomicU8::new(RUNNING),
            degraded: std::sync::Mutex::new(None),
        }
    }

    /// Sets or clears the reason `/healthz` reports the daemon degraded (still 200).
    pub fn set_degraded(&self, reason: Option<String>) {
        *self.degraded.lock().unwrap_or_else(|p| p.into_inner()) = reason;
    }

    /// Why the daemon is degraded, if it is.
    pub fn degraded_reason(&self) -> Option<String> {
        self.degraded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn allowance(&self) -> Duration {
        self.allowance
    }

    /// Every stage with the age of its heartbeat.
    pub fn ages(&self) -> Vec<(&'static str, Duration)> {
        self.stages.iter().map(|(n, h)| (*n, h.age())).collect()
    }

    /// The stalled stage with the oldest heartbeat, if any.
    pub fn stalled(&self) -> Option<Stall> {
        self.stages
            .iter()
            .map(|(stage, h)| Stall {
                stage,
                age: h.age(),
            })
            .filter(|s| s.age > self.allowance)
            .max_by_key(|s| s.age)
    }

    /// Whether the journal writer has been quiet long enough to deserve an empty transaction
    /// (so an idle writer still proves it can commit).
    pub fn journal_probe_due(&self) -> bool {
        let quiet = (self.allowance / 4).max(Duration::from_millis(200));
        self.stages
            .iter()
            .any(|(n, h)| *n == JOURNAL && h.age() >= quiet)
    }

    /// From now on the daemon is draining: health says so, stalls no longer count.
    pub fn set_stopping(&self) {
        let _ =
            self.phase
                .compare_exchange(RUNNING, STOPPING, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Every stage has stopped.
    pub fn set_stopped(&self) {
        self.phase.store(STOPPED, Ordering::Relaxed);
    }

    /// Draining or stopped.
    pub fn is_stopping(&self) -> bool {
        self.phase.load(Ordering::Relaxed) != RUNNING
    }

    pub fn health(&self) -> Health {
        match self.phase.load(Ordering::Relaxed) {
            RUNNING => {}
            STOPPING => {
                return Health {
                    status: "stopping",
                    reason: Some("shutting down".to_string()),
                };
            }
            _ => {
                return Health {
                    status: "not_running",
                    reason: Some("the pipeline is not running".to_string()),
                };
            }
        }
        match self.stalled() {
            Some(s) => Health {
                status: "stalled",
                reason: Some(s.to_string()),
            },
            None => Health::ok(),
        }
    }
}

/// What `/healthz` asks: `Err(reason)` makes it answer 503 with that reason.
pub trait HealthCheck: Send + Sync {
    fn check(&self) -> Result<(), String>;

    /// When `check` passes: why the daemon still needs attention (answered with 200 and
    /// `"status":"degraded"`).
    fn degraded(&self) -> Option<String> {
        None
    }
}

impl HealthCheck for Liveness {
    fn check(&self) -> Result<(), String> {
        let h = self.health();
        match h.reason {
            None => Ok(()),
            Some(reason) => Err(format!("{}: {reason}", h.status)),
        }
    }

    fn degraded(&self) -> Option<String> {
        self.degraded_reason()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn aged(ms: u64) -> Arc<Heartbeat> {
        Arc::new(Heartbeat::beaten_ago(Duration::from_millis(ms)))
    }

    #[test]
    fn a_stage_past_its_allowance_is_stalled_and_named() {
        let fresh = Arc::new(Heartbeat::default());
        let old = aged(5_000);
        let l = Liveness::new(
            vec![(WATCHER, fresh.clone()), (INTAKE, old.clone())],
            Duration::from_secs(2),
        );
        let s = l.stalled().unwrap();
        assert_eq!(s.stage, INTAKE);
        let h = l.health();
        assert_eq!(h.http_status(), 503);
        assert_eq!(h.status, "stalled");
        assert!(
            h.reason
                .as_deref()
                .unwrap()
                .starts_with("intake made no progress for")
        );
        assert!(h.to_json().contains("\"status\":\"stalled\""));
        old.beat();
        assert_eq!(l.stalled(), None);
        assert_eq!(l.health(), Health::ok());
        assert_eq!(l.health().to_json(), "{\"status\":\"ok\"}");
        l.set_stopping();
        assert_eq!(l.health().http_status(), 503);
    }

    #[test]
    fn idle_journal_writer_is_probed() {
        let j = aged(1_000);
        let l = Liveness::new(vec![(JOURNAL, j.clone())], Duration::from_secs(2));
        assert!(l.journal_probe_due());
        j.beat();
        assert!(!l.journal_probe_due());
    }
}
