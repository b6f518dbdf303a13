//! The monitor of a running daemon: watchdog pings while every stage makes progress, the
//! liveness metrics, the journal probe that keeps an idle writer's heartbeat honest, and, every
//! [`STATUS_EVERY`](super::systemd::STATUS_EVERY), the `STATUS=` line and the metrics that come
//! from the journal and the file system.

use std::path::PathBuf;

use super::disk::{DiskReport, Forecast, disk_space, is_warning, publish, set_latest};
use crate::util::human::human_age;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::health::Liveness;
use super::metrics;
use super::systemd::{InFlight, STATUS_EVERY, notify, status_line, watchdog};
use crate::journal::{self, Journal, Queue, State};

/// Files being uploaded right now and their total size, kept by the uploader's scheduler.
#[derive(Debug, Default)]
pub struct InFlightGauge {
    pub files: AtomicU64,
    pub bytes: AtomicU64,
}

impl InFlightGauge {
    pub fn read(&self) -> InFlight {
        InFlight {
            files: self.files.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }
}

/// What the monitor watches.
pub struct Monitor {
    pub liveness: Arc<Liveness>,
    pub journal: Journal,
    pub in_flight: Arc<InFlightGauge>,
    pub watch_root: PathBuf,
    /// `<journal>.disk` ([`super::disk::report_path`]): the forecast for `status`.
    pub disk_report: PathBuf,
    /// `watch.disk_warn_secs`: a forecast under it is logged, degrades `/healthz` and shows
    /// in `STATUS=`.
    pub disk_warn_secs: f64,
    /// `watch.disk_window_secs`: the net fill rate is measured over this window.
    pub disk_window: Duration,
}

impl Monitor {
    /// Runs until `stop`: the watchdog pings and the journal probe, plus (in a task of its
    /// own, so a slow journal read cannot delay a ping) the status and metrics refresh.
    pub async fn run(self, stop: CancellationToken) {
        let me = Arc::new(self);
        let tasks = TaskTracker::new();
        tasks.spawn(me.clone().refresh_loop(stop.clone()));
        me.watchdog_loop(stop, &tasks).await;
        tasks.close();
        tasks.wait().await;
    }

    async fn watchdog_loop(&self, stop: CancellationToken, tasks: &TaskTracker) {
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
            metrics::set_liveness(&self.liveness);
            if !stopping
                && self.liveness.journal_probe_due()
                && !probing.swap(true, Ordering::Relaxed)
            {
                let journal = self.journal.clone();
                let probing = probing.clone();
                tasks.spawn(async move {
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
        let mut forecast = Forecast::new(self.disk_window);
        let mut disk_warning: Option<String> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            disk_warning = self.disk_forecast(&mut forecast, disk_warning);
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
            metrics::set_queue(&q);
            match self.journal.read(journal::outbox_figures).await {
                Ok(figures) => {
                    for f in figures {
                        metrics::set_notify_backlog(
                            &crate::config::receiver_label(&f.url),
                            f.backlog,
                            f.oldest_secs,
                        );
                    }
                }
                Err(e) => warn!(error = %e, "cannot read the notification outbox"),
            }
            if self.liveness.is_stopping() {
                continue;
            }
            let mut line = status_line(&q, self.in_flight.read(), self.liveness.stalled().as_ref());
            if let Some(w) = &disk_warning {
                line = format!("{}; {line}", w.to_uppercase());
            }
            notify(&[NotifyState::Status(&line)]);
        }
    }
}

impl Monitor {
    /// Samples the watch root's free space and updates the forecast, the metrics, the report
    /// for `status`, the log and `/healthz`. Returns the warning (`disk full in ...`) while the
    /// forecast is under `watch.disk_warn_secs`.
    fn disk_forecast(&self, forecast: &mut Forecast, was: Option<String>) -> Option<String> {
        let (free, size) = match disk_space(&self.watch_root) {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "cannot sample the watch root's free space");
                return was;
            }
        };
        metrics::set_disk(free, size);
        forecast.push(Instant::now(), free);
        let secs = forecast.seconds_to_full();
        metrics::set_disk_full_in(secs);
        let warning = match secs {
            Some(s) if is_warning(secs, self.disk_warn_secs) => {
                Some(format!("disk full in {}", human_age(s as u64)))
            }
            _ => None,
        };
        let report = DiskReport {
            free_bytes: free,
            size_bytes: size,
            fill_rate_bytes_per_sec: forecast.fill_rate(),
            full_in_secs: secs,
            warn_secs: self.disk_warn_secs,
            warning: warning.is_some(),
            at_ms: crate::journal::now_ms(),
        };
        set_latest(&report);
        if let Err(e) = publish(&self.disk_report, &report) {
            debug!(error = %e, path = %self.disk_report.display(), "cannot write the disk report");
        }
        match (&was, &warning) {
            (None, Some(w)) => warn!(
                free_bytes = free,
                seconds = secs.unwrap_or_default() as u64,
                "{w} at the recent net fill rate (watch.disk_warn_secs = {}); nothing is deleted to make room",
                self.disk_warn_secs
            ),
            (Some(_), None) => info!(free_bytes = free, "the disk forecast is clear again"),
            _ => {}
        }
        self.liveness.set_degraded(warning.clone());
        warning
    }
}
