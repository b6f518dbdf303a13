//! Bandwidth limit and upload windows (`upload.max_bytes_per_sec`, `upload.windows`).
//!
//! The limit is one token bucket (governor) shared by every request body: a body takes
//! tokens for each chunk before reading it, so all uploads together stay under the limit
//! whatever `upload.concurrency` is. Request deadlines are stretched to match (see
//! `store/client.rs`), and the SDK's stalled-stream protection is off for uploads, so a body
//! slowed on purpose is never cut.
//!
//! Windows are local-time ranges `HH:MM-HH:MM` (a range may wrap past midnight). Outside every
//! window no new request that carries data is started; requests in flight finish.

use std::num::NonZeroU32;
use std::time::Duration;

use chrono::Timelike;
use governor::{Quota, RateLimiter};
use tokio_util::sync::CancellationToken;

/// A shared byte-rate limit.
pub struct Bandwidth {
    limiter: governor::DefaultDirectRateLimiter,
    burst: u32,
}

impl std::fmt::Debug for Bandwidth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bandwidth")
            .field("burst", &self.burst)
            .finish()
    }
}

impl Bandwidth {
    /// `None` when unlimited (0, or more than 4 GiB/s, which the bucket cannot count).
    pub fn new(bytes_per_sec: u64) -> Option<Bandwidth> {
        let rate = u32::try_from(bytes_per_sec)
            .ok()
            .and_then(NonZeroU32::new)?;
        // Room for one body chunk, or a tenth of a second at the limit.
        let burst = (rate.get() / 10).max(512 * 1024);
        let burst_nz = NonZeroU32::new(burst)?;
        Some(Bandwidth {
            limiter: RateLimiter::direct(Quota::per_second(rate).allow_burst(burst_nz)),
            burst,
        })
    }

    /// Waits (blocking the calling thread: call it on the blocking pool) until `n` bytes may go.
    pub fn wait_blocking(&self, mut n: u64) {
        use governor::clock::Clock;
        let clock = governor::clock::DefaultClock::default();
        while n > 0 {
            let take = n.min(u64::from(self.burst)) as u32;
            let Some(cells) = NonZeroU32::new(take) else {
                return;
            };
            match self.limiter.check_n(cells) {
                Ok(Ok(())) => n -= u64::from(take),
                Ok(Err(not_until)) => std::thread::sleep(not_until.wait_time_from(clock.now())),
                // Cannot happen: `take` never exceeds the burst.
                Err(_) => return,
            }
        }
    }
}

/// Upload windows in local time.
#[derive(Debug, Clone, Default)]
pub struct Windows {
    /// (start, end) in minutes after midnight; end < start wraps past midnight.
    ranges: Vec<(u32, u32)>,
}

fn parse_hhmm(s: &str) -> Option<u32> {
    let (h, m) = s.trim().split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

impl Windows {
    /// Parses `["22:00-07:00", ...]`; the error says which entry is wrong and how.
    pub fn parse(list: &[String]) -> Result<Windows, (usize, String)> {
        let mut ranges = Vec::new();
        for (i, w) in list.iter().enumerate() {
            let bad = || (i, format!("expected HH:MM-HH:MM (local time), got {w:?}"));
            let (a, b) = w.split_once('-').ok_or_else(bad)?;
            let (a, b) = (
                parse_hhmm(a).ok_or_else(bad)?,
                parse_hhmm(b).ok_or_else(bad)?,
            );
            if a == b {
                return Err((
                    i,
                    format!("empty window {w:?}; leave upload.windows empty to upload at any time"),
                ));
            }
            ranges.push((a, b));
        }
        Ok(Windows { ranges })
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Whether uploads may start at `minute` (0..1440) of the day.
    pub fn is_open_at(&self, minute: u32) -> bool {
        self.ranges.is_empty()
            || self.ranges.iter().any(|&(a, b)| {
                if a < b {
                    (a..b).contains(&minute)
                } else {
                    minute >= a || minute < b
                }
            })
    }

    /// How long from `minute` (and `second` within it) until a window opens; zero when open.
    pub fn until_open(&self, minute: u32, second: u32) -> Duration {
        if self.is_open_at(minute) {
            return Duration::ZERO;
        }
        let wait_min = self
            .ranges
            .iter()
            .map(|&(a, _)| (a + 1440 - minute) % 1440)
            .min()
            .unwrap_or(0);
        Duration::from_secs(u64::from(wait_min) * 60)
            .saturating_sub(Duration::from_secs(u64::from(second)))
    }

    /// Whether a window is open now (local time).
    pub fn is_open_now(&self) -> bool {
        if self.ranges.is_empty() {
            return true;
        }
        let now = chrono::Local::now();
        self.is_open_at(now.hour() * 60 + now.minute())
    }

    /// Waits until a window is open (now, in local time). Re-checks at least every minute,
    /// so clock and time-zone changes are followed. Returns false if cancelled.
    pub async fn wait_open(&self, cancel: &CancellationToken) -> bool {
        if self.ranges.is_empty() {
            return true;
        }
        loop {
            let now = chrono::Local::now();
            let wait = self.until_open(now.hour() * 60 + now.minute(), now.second());
            if wait.is_zero() {
                return true;
            }
            let nap = wait.min(Duration::from_secs(60));
            tokio::select! {
                _ = cancel.cancelled() => return false,
                _ = tokio::time::sleep(nap) => {}
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_and_wrap() {
        let w = Windows::parse(&["22:00-07:00".into(), "12:30-13:00".into()]).unwrap();
        assert!(w.is_open_at(22 * 60));
        assert!(w.is_open_at(23 * 60 + 59));
        assert!(w.is_open_at(0));
        assert!(w.is_open_at(6 * 60 + 59));
        assert!(!w.is_open_at(7 * 60));
        assert!(!w.is_open_at(12 * 60 + 29));
        assert!(w.is_open_at(12 * 60 + 30));
        assert!(!w.is_open_at(13 * 60));
        assert_eq!(w.until_open(12 * 60, 0), Duration::from_secs(30 * 60));
        assert_eq!(
            w.until_open(13 * 60, 30),
            Duration::from_secs(9 * 3600 - 30)
        );
        assert_eq!(w.until_open(23 * 60, 0), Duration::ZERO);
        assert!(Windows::parse(&[]).unwrap().is_open_at(600));
        for bad in ["22-07", "25:00-01:00", "10:00-10:00", "10:00", "a:b-c:d"] {
            assert!(Windows::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn bandwidth_limits_the_rate() {
        let b = Bandwidth::new(4 * 1024 * 1024).unwrap();
        let start = std::time::Instant::now();
        // The burst goes at once, the rest at 4 MiB/s.
        b.wait_blocking(512 * 1024);
        b.wait_blocking(4 * 1024 * 1024);
        assert!(
            start.elapsed() >= Duration::from_millis(900),
            "{:?}",
            start.elapsed()
        );
        assert!(Bandwidth::new(0).is_none());
    }
}
