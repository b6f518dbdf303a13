//! A stage's heartbeat: the last moment its loop came round, read by the liveness check
//! (`service/health.rs`).

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The zero of heartbeat times: monotonic, shared by the whole process.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Added to every reading so that a moment before the first reading (a stage that has not
/// beaten for a while, in tests) is still a positive number.
const OFFSET_MS: u64 = 1 << 40;

fn now_ms() -> u64 {
    EPOCH.elapsed().as_millis() as u64 + OFFSET_MS
}

/// The last moment a stage showed progress (monotonic milliseconds).
#[derive(Debug)]
pub struct Heartbeat {
    last_ms: AtomicU64,
}

impl Default for Heartbeat {
    /// A heartbeat that has just beaten: a stage is alive when it starts.
    fn default() -> Self {
        Heartbeat {
            last_ms: AtomicU64::new(now_ms()),
        }
    }
}

impl Heartbeat {
    /// Records progress now.
    pub fn beat(&self) {
        self.last_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Time since the last beat.
    pub fn age(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }

    /// A heartbeat that last beat `ago` before now (tests of stall detection).
    #[cfg(test)]
    pub fn beaten_ago(ago: Duration) -> Heartbeat {
        Heartbeat {
            last_ms: AtomicU64::new(now_ms().saturating_sub(ago.as_millis() as u64)),
        }
    }
}
