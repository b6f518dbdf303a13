//! The disk forecast: free space of `watch.root`'s file system sampled at every status tick,
//! the net fill rate over a recent window (recording minus what uploads delete, plus anything
//! else writing there), and from it the seconds until the disk is full. `None` when the disk
//! is not filling (free space steady or growing) or when the window holds too little to tell.
//!
//! The running daemon publishes its latest [`DiskReport`] in memory (for the status page) and
//! in `<journal>.disk` (for `record-offload status`, which reads the journal and never talks to
//! the daemon). Nothing here ever deletes anything to make room.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Free and total bytes (as unprivileged writers see them) of the file system holding `root`.
pub fn disk_space(root: &Path) -> io::Result<(u64, u64)> {
    let st = rustix::fs::statvfs(root).map_err(io::Error::from)?;
    Ok((
        st.f_bavail.saturating_mul(st.f_frsize),
        st.f_blocks.saturating_mul(st.f_frsize),
    ))
}

/// What the daemon last forecast for the watch root's file system.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskReport {
    pub free_bytes: u64,
    pub size_bytes: u64,
    /// Net bytes per second the free space shrank by over the window (negative: it grew).
    pub fill_rate_bytes_per_sec: Option<f64>,
    /// Seconds until full at that rate; `None` while the disk is not filling.
    pub full_in_secs: Option<f64>,
    /// `watch.disk_warn_secs`.
    pub warn_secs: f64,
    /// Whether the forecast is under `warn_secs`.
    pub warning: bool,
    /// When the sample was taken (Unix milliseconds).
    pub at_ms: i64,
}

static LATEST: Mutex<Option<DiskReport>> = Mutex::new(None);

/// The running daemon's latest report (`None` before the first sample, or in a process that
/// runs no daemon).
pub fn latest() -> Option<DiskReport> {
    LATEST.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Makes `r` the report [`latest`] answers (the running daemon's monitor).
pub fn set_latest(r: &DiskReport) {
    *LATEST.lock().unwrap_or_else(|p| p.into_inner()) = Some(r.clone());
}

/// `<journal>.disk`: where the running daemon leaves its latest report for `status`.
pub fn report_path(journal: &Path) -> PathBuf {
    let mut p = journal.as_os_str().to_owned();
    p.push(".disk");
    PathBuf::from(p)
}

/// Writes `r` to `path` (whole to a temporary file, then renamed over the old report, so a
/// reader never sees half a report).
pub fn publish(path: &Path, r: &DiskReport) -> io::Result<()> {
    let text = serde_json::to_vec(r).map_err(io::Error::other)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// The report in `path`, if there is a readable one.
pub fn read_report(path: &Path) -> Option<DiskReport> {
    let text = std::fs::read(path).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Samples of free space over a sliding window.
#[derive(Debug)]
pub struct Forecast {
    window: Duration,
    samples: VecDeque<(Instant, u64)>,
}

impl Forecast {
    pub fn new(window: Duration) -> Self {
        Forecast {
            window,
            samples: VecDeque::new(),
        }
    }

    /// Records `free` bytes at `now`, dropping samples older than the window (keeping at least
    /// one older sample, so the window stays covered).
    pub fn push(&mut self, now: Instant, free: u64) {
        self.samples.push_back((now, free));
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|(t, _)| now.saturating_duration_since(*t) >= self.window)
        {
            self.samples.pop_front();
        }
    }

    /// Net fill rate in bytes per second (positive: the disk is filling); `None` until the
    /// samples span a third of the window, so one burst of writes just after the start (a
    /// recording landing before its upload deletes it) is not taken for a trend.
    pub fn fill_rate(&self) -> Option<f64> {
        let (t0, f0) = *self.samples.front()?;
        let (t1, f1) = *self.samples.back()?;
        let dt = t1.saturating_duration_since(t0);
        if dt.is_zero() || dt < self.window / 3 {
            return None;
        }
        Some((f0 as f64 - f1 as f64) / dt.as_secs_f64())
    }

    /// Seconds until the disk is full at the current net fill rate; `None` when it is not
    /// filling. Zero when it is full already.
    pub fn seconds_to_full(&self) -> Option<f64> {
        let (_, free) = *self.samples.back()?;
        if free == 0 {
            return Some(0.0);
        }
        match self.fill_rate() {
            Some(rate) if rate > 0.0 => Some(free as f64 / rate),
            _ => None,
        }
    }
}

/// Whether a forecast is under the warning threshold (`watch.disk_warn_secs`).
pub fn is_warning(seconds_to_full: Option<f64>, warn_secs: f64) -> bool {
    matches!(seconds_to_full, Some(s) if s < warn_secs)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_filling_disk_is_forecast_full() {
        let mut f = Forecast::new(Duration::from_secs(30));
        let t0 = Instant::now();
        assert_eq!(f.seconds_to_full(), None);
        f.push(t0, 10_000);
        assert_eq!(f.seconds_to_full(), None, "one sample tells no rate");
        f.push(t0 + Duration::from_secs(5), 9_500);
        assert_eq!(
            f.seconds_to_full(),
            None,
            "5 s of a 30 s window tell no trend"
        );
        f.push(t0 + Duration::from_secs(10), 9_000);
        assert_eq!(f.fill_rate(), Some(100.0));
        assert_eq!(f.seconds_to_full(), Some(90.0));
        assert!(is_warning(f.seconds_to_full(), 100.0));
        assert!(!is_warning(f.seconds_to_full(), 60.0));
    }

    #[test]
    fn a_steady_or_draining_disk_has_no_forecast() {
        let mut f = Forecast::new(Duration::from_secs(600));
        let t0 = Instant::now();
        f.push(t0, 10_000);
        f.push(t0 + Duration::from_secs(10), 10_000);
        assert_eq!(f.seconds_to_full(), None);
        f.push(t0 + Duration::from_secs(20), 12_000);
        assert_eq!(f.seconds_to_full(), None);
        assert!(!is_warning(None, 1e9));
    }

    #[test]
    fn old_samples_leave_the_window() {
        let mut f = Forecast::new(Duration::from_secs(60));
        let t0 = Instant::now();
        // Filling fast long ago, steady lately: the forecast follows the recent window.
        f.push(t0, 1_000_000);
        f.push(t0 + Duration::from_secs(10), 500_000);
        for i in 0..10 {
            f.push(t0 + Duration::from_secs(100 + i * 10), 500_000);
        }
        assert_eq!(f.seconds_to_full(), None);
    }

    #[test]
    fn disk_space_of_a_real_directory() {
        let d = tempfile::tempdir().unwrap();
        let (free, size) = disk_space(d.path()).unwrap();
        assert!(size > 0 && free <= size);
        assert!(disk_space(Path::new("/no/such/dir/at/all")).is_err());
    }

    #[test]
    fn a_report_round_trips_through_its_file() {
        let d = tempfile::tempdir().unwrap();
        let path = report_path(&d.path().join("journal.db"));
        assert_eq!(path, d.path().join("journal.db.disk"));
        assert_eq!(read_report(&path), None);
        let r = DiskReport {
            free_bytes: 10,
            size_bytes: 100,
            fill_rate_bytes_per_sec: Some(2.5),
            full_in_secs: Some(4.0),
            warn_secs: 60.0,
            warning: true,
            at_ms: 1,
        };
        publish(&path, &r).unwrap();
        assert_eq!(read_report(&path), Some(r));
        std::fs::write(&path, b"{half").unwrap();
        assert_eq!(read_report(&path), None, "a damaged report is no report");
    }
}
