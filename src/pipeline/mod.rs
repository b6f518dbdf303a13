//! The pipeline's stages, from a file settling under the root to its local copy removed:
//!
//! ```text
//! watch ──Settled──> intake ──(journal rows)──> upload ──> verify ──> delete ──> prune
//!   ^                                              │
//!   └──────────── files that changed ──────────────┘
//! ```
//!
//! - [`watch`]: inotify and scans; decides when a file is finished (settled).
//! - [`intake`]: records settled files in the journal, many per transaction.
//! - [`upload`]: the scheduler and each file's upload (PutObject or multipart), checked
//!   against the file.
//! - [`delete`]: removes local copies of stored files, in batches behind one durable commit.
//! - [`prune`]: removes directories that deletions emptied, once they stayed idle.
//! - [`recovery`]: what a start does with what the last run left.
//! - [`notify`]: delivers the outbox's events to the `[[notify]]` receivers.
//!
//! Stages talk through bounded channels (backpressure, not unbounded queues) and the journal;
//! each stops when its cancellation token fires (waiting for work may be cancelled, work in
//! progress is not).

pub mod delete;
pub mod intake;
pub mod notify;
pub mod prune;
pub mod recovery;
pub mod upload;
pub mod watch;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use crate::service::monitor::InFlightGauge;
use crate::util::heartbeat::Heartbeat;

/// Counters for status, metrics and liveness.
#[derive(Debug, Default)]
pub struct UploadStats {
    pub bytes_sent: AtomicU64,
    pub files_uploaded: AtomicU64,
    pub files_deleted: AtomicU64,
    pub retries: AtomicU64,
    pub failures: AtomicU64,
    /// Files being uploaded and their total size (the `STATUS=` line).
    pub in_flight: Arc<InFlightGauge>,
    /// Beats every pass of the scheduler (liveness; see `crate::service::health`).
    pub heartbeat: Arc<Heartbeat>,
}
