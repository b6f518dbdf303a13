//! The daemon as a service: liveness of its stages (`health`), Prometheus metrics
//! (`metrics`), systemd's notify protocol (`systemd`), the monitor that feeds the watchdog,
//! `STATUS=` and the journal metrics (`monitor`), and where log lines go (`logging`).
//!
//! The stages report here (heartbeats, counters); nothing here drives them.

pub mod disk;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod monitor;
pub mod systemd;
