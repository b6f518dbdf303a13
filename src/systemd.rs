//! systemd integration (`Type=notify`, `WatchdogSec=`), and the monitor that keeps the status
//! line, the journal metrics and the watchdog up to date.
//!
//! Messages on `$NOTIFY_SOCKET` (nothing is sent when it is unset):
//!
//! - `STATUS=starting: …` while the journal is recovered;
//! - `READY=1` at the end of `Daemon::start`: the journal is recovered, every stage runs and
//!   every listener is bound;
//! - `STATUS=queued 12, uploading 2 (1.3 GiB), oldest 4m` every [`STATUS_EVERY`] (what
//!   `systemctl status` shows), prefixed with `STALLED: …` when a stage stopped;
//! - `WATCHDOG=1` every half `$WATCHDOG_USEC` — only when `$WATCHDOG_PID` is unset or this
//!   process, and only while every stage of the pipeline makes progress
//!   ([`crate::health::Liveness`]); a stalled stage stops the pings and systemd restarts us;
//! - `STOPPING=1` when a shutdown begins. While the drain runs the pings go on regardless of
//!   the stages, which are stopping on purpose.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::health::{Liveness, Stall};
use crate::journal::{self, Journal, Queue, State};
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

/// What the monitor watches.
pub(crate) struct Monitor {
    pub liveness: Arc<Liveness>,
    pub journal: Journal,
    pub uploads: Arc<crate::upload::UploadStats>,
    pub watch_root: std::path::PathBuf,
}

impl Monitor {
    /// Runs until `stop`: the watchdog pings and the journal probe, plus (in a task of its
    /// own, so a slow journal read cannot delay a ping) the status and metrics refresh.
    pub async fn run(self, stop: CancellationToken) {
        let me = Arc::new(self);
        let refresher = tokio::spawn(me.clone().refresh_loop(stop.clone()));
        me.watchdog_loop(stop).await;
        let _ = refresher.await;
    }

    async fn watchdog_loop(&self, stop: CancellationToken) {
        let wd = watchdog();
        let ping_every = wd.map(|d| d / 2);
        if let Some(d) = wd {
            info!(
                watchdog_secs = d.as_secs_f64(),
                stall_secs = self.liveness.allowance().as_secs_f64(),
                "systemd watchdog enabled"
            );
        }
        let check_every = ping_every
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1))
            .max(Duration::from_millis(20));
        let mut tick = tokio::time::interval(check_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_ping: Option<Instant> = None;
        let mut was_stalled = false;
        let probing = Arc::new(AtomicBool::new(false));
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let stopping = self.liveness.is_stopping();
            let stall = if stopping {
                None
            } else {
                self.liveness.stalled()
            };
            match (&stall, was_stalled) {
                (Some(s), false) => {
                    warn!(
                        stage = s.stage,
                        age_secs = s.age.as_secs(),
                        "a pipeline stage stopped making progress; watchdog pings stop"
                    );
                }
                (None, true) => info!("every pipeline stage makes progress again"),
                _ => {}
            }
            was_stalled = stall.is_some();
            if !stopping
                && self.liveness.journal_probe_due()
                && !probing.swap(true, Ordering::Relaxed)
            {
                let journal = self.journal.clone();
                let probing = probing.clone();
                tokio::spawn(async move {
                    if let Err(e) = journal.probe().await {
                        debug!(error = %e, "journal probe failed");
                    }
                    probing.store(false, Ordering::Relaxed);
                });
            }
            if let Some(every) = ping_every
                && stall.is_none()
                && last_ping.is_none_or(|t| t.elapsed() + check_every / 2 >= every)
            {
                notify(&[NotifyState::Watchdog]);
                last_ping = Some(Instant::now());
            }
        }
    }

    async fn refresh_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(STATUS_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Stored rows are kept for good, so counting them costs more as the journal grows:
        // they are recounted at most every 100 times what the last count took (at least
        // every tick on small journals), so the refresh stays under 1% of a core.
        let mut stored: Option<(Queue, Instant, Duration)> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            crate::metrics::set_disk(&self.watch_root);
            let count_stored = stored
                .as_ref()
                .is_none_or(|(_, at, took)| at.elapsed() >= (*took * 100).max(STATUS_EVERY));
            let started = Instant::now();
            let mut q = match self
                .journal
                .read(move |c| journal::queue(c, count_stored))
                .await
            {
                Ok(q) => q,
                Err(e) => {
                    warn!(error = %e, "cannot read the journal for the status line");
                    continue;
                }
            };
            if count_stored {
                stored = Some((q.clone(), started, started.elapsed()));
            } else if let Some((last, _, _)) = &stored {
                for st in State::ALL.into_iter().filter(|s| !s.is_waiting()) {
                    q.counts.insert(st, last.count(st));
                }
            }
            crate::metrics::set_queue(&q);
            if self.liveness.is_stopping() {
                continue;
            }
            let in_flight = InFlight {
                files: self.uploads.active_files.load(Ordering::Relaxed),
                bytes: self.uploads.active_bytes.load(Ordering::Relaxed),
            };
            let line = status_line(&q, in_flight, self.liveness.stalled().as_ref());
            notify(&[NotifyState::Status(&line)]);
        }
    }
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
