//! Uploading, checking and deleting one file at a time, for many files at once.
//!
//! # Scheduling
//!
//! The scheduler takes due rows from the journal (`queued`, `uploading`, and `failed` rows
//! whose wait is over) and runs one task per file, up to a few more files than
//! `upload.concurrency`. What is bounded by `upload.concurrency` is the data in flight, counted
//! in parts, across all files: a request that carries a part (or an object of a part's size)
//! holds [`UNITS_PER_PART`] units of a semaphore of `upload.concurrency × UNITS_PER_PART`
//! while it is sent, so at most `upload.concurrency` parts are in flight, as before; a smaller
//! object holds its share of a part, rounded up to a whole unit (at least one). Small files
//! therefore go up to [`UNITS_PER_PART`] times as many at once (64 with the defaults): on a
//! link with tens of milliseconds of round trip a 256 KiB object spends most of its request
//! waiting for the answer, and four of them at a time left the link three quarters idle
//! (README, Benchmarks). The bytes of bodies in flight stay within `concurrency × part size`
//! whatever the mix. Large files (more than one part) in flight are limited to four times
//! `upload.concurrency` by the scheduler, so their parts are not spread over more files.
//!
//! Before its request, a file or part is read and hashed under a second permit (twice
//! `upload.concurrency` of them), so hashing overlaps sending and the digests of several files
//! meet on the hashing thread ([`crate::util::hasher`]). Memory is therefore a few chunk buffers
//! per permit, whatever the part and file sizes: parts are never held in memory, they are read
//! twice from the file (once to hash, once to send), which costs page-cache reads but keeps the
//! daemon small. Objects up to 1 MiB are held while they are sent; their units bound them.
//!
//! # One file
//!
//! 1. A failed row being tried again first takes the key the template renders now (a row
//!    recorded without one, or under an older template, is mended). Open the file without
//!    following links; its identity `(dev, inode, size, mtime)` must be the one recorded when
//!    it settled, otherwise it changed: back to settling.
//! 2. Files of at most one part: PutObject. Larger: CreateMultipartUpload (the id is committed
//!    before the first part), then parts in order of reading, each hashed, sent with
//!    `Content-MD5` and committed when the store acknowledges it with a matching ETag. A row
//!    that already has an upload id (after a restart) asks ListParts and sends only what is
//!    missing.
//! 3. Check the object: a PutObject's answer carries the ETag the store computed over what it
//!    stored, which must be the file's MD5 (checked as it arrives); a multipart object's ETag is
//!    not an MD5, so it is HEADed and its size must match.
//! 4. Re-check the file: unchanged since it was read, or it is uploaded again after it settles.
//! 5. Commit `uploaded`, then hand the file to the deleter ([`super::delete`]), which makes
//!    the commit durable, unlinks the file only if it is still the same file, and commits
//!    `deleted`. Directories emptied that way go to the pruner.
//!
//! Transient errors (network, 5xx, throttling, timeouts, a corrupt part) are retried in place
//! with capped exponential backoff and jitter, forever while the file is on disk; each failure
//! is written to the row (`attempts`, `last_error`) so `status` shows it. Permanent errors
//! (credentials, bucket, permissions) put the row in `failed`.
//!
//! # Files
//!
//! - `scheduler`: picks due rows, runs a task per file, records each attempt's outcome.
//! - `file`: one file's steps, from opening it to handing it to the deleter.
//! - `small`: files of one part, a single PutObject.
//! - `multipart`: larger files: resume, parts, completion.
//! - `failover`: the primary/standby tracker, the probe, abandoned uploads.
//! - `copyback`: copying the standby's objects to the primary once it is back
//!   (`storage.standby.copy_back`), at a share of the link that never delays uploads.
//! - `hash`: reading and hashing (MD5s on the hashing thread, CRC-64 alongside).

mod copyback;
mod failover;
mod file;
mod hash;
mod multipart;
mod scheduler;
mod small;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::Rng;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

pub use copyback::CopyBack;
pub use failover::Failover;

use super::UploadStats;
use super::delete::DeleteJob;
use crate::config::Settings;
use crate::journal::{self, Durability, FileRow, Journal, JournalError};
use crate::store::{Store, StoreError};
use crate::util::fs::{Identity, Root};
use crate::util::hasher::Hasher;
use crate::util::throttle::{Bandwidth, Windows};
use crate::util::turns::{Turn, Turns};

/// S3 and OSS allow at most this many parts.
pub const MAX_PARTS: u64 = 10_000;
const MIB: u64 = 1024 * 1024;

/// A part in flight holds this many units of the send semaphore; a smaller body holds its
/// share, rounded up, at least one (see the module's documentation).
pub const UNITS_PER_PART: u32 = 16;

/// The units of the send semaphore a body of `len` bytes holds, with parts of `part_size`
/// bytes configured: `len / part_size` of [`UNITS_PER_PART`], rounded up, between 1 and
/// [`UNITS_PER_PART`] (parts grown for huge files count as one part).
pub fn send_units(len: u64, part_size: u64) -> u32 {
    let units = u64::from(UNITS_PER_PART);
    let unit = part_size.div_ceil(units).max(1);
    len.div_ceil(unit).clamp(1, units) as u32
}

/// The part size for a file: the configured size, grown (in whole MiB) so that the file fits
/// in [`MAX_PARTS`] parts.
pub fn part_size_for(size: u64, configured: u64) -> u64 {
    let needed = size.div_ceil(MAX_PARTS);
    let needed = needed.div_ceil(MIB) * MIB;
    configured.max(needed)
}

/// Capped exponential backoff with jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            attempt: 0,
        }
    }

    /// The next delay: `initial × 2^attempt`, capped at `max`, then scaled by a random factor
    /// in [0.5, 1) so that many files do not retry in lockstep.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.initial.as_secs_f64() * 2f64.powi(self.attempt.min(30) as i32);
        self.attempt = self.attempt.saturating_add(1);
        let capped = exp.min(self.max.as_secs_f64());
        let jitter = rand::rng().random_range(0.5..1.0);
        Duration::from_secs_f64(capped * jitter)
    }
}

/// How one attempt at a file ended.
#[derive(Debug)]
enum Outcome {
    /// Stored (and deleted when configured); the journal says so.
    Done,
    /// The file changed or went away; the journal says so.
    Handled,
    /// A permanent error.
    Failed(String),
    /// Give up this attempt and retry the whole file later (transient error outside a part).
    Retry(String),
    /// Shutdown.
    Interrupted,
}

/// Errors inside a file task.
#[derive(Debug)]
enum TaskError {
    Store(StoreError),
    Journal(JournalError),
    /// The file is not what was recorded any more.
    Changed,
    /// The file is gone.
    Gone,
    Io(String),
    Interrupted,
    /// Failed over (or back) while this attempt waited to retry its store: start over on the
    /// other one at once.
    Moved,
}

impl From<JournalError> for TaskError {
    fn from(e: JournalError) -> Self {
        TaskError::Journal(e)
    }
}

impl From<StoreError> for TaskError {
    fn from(e: StoreError) -> Self {
        TaskError::Store(e)
    }
}

/// Everything the upload side shares.
pub struct Uploader {
    pub settings: Arc<Settings>,
    /// The primary store.
    pub store: Store,
    /// `[storage.standby]`, if configured.
    pub standby: Option<Store>,
    pub failover: Arc<Failover>,
    pub journal: Journal,
    pub root: Arc<Root>,
    /// Data in flight: `upload.concurrency × UNITS_PER_PART` units, see [`send_units`];
    /// served oldest file first (by journal id, see [`Turns`]).
    permits: Arc<Turns>,
    /// Files and parts being read and hashed ahead of their request (twice as many as
    /// `permits`), so hashing overlaps sending and several digests run side by side; also
    /// oldest file first.
    prepared: Arc<Turns>,
    hasher: Arc<Hasher>,
    /// Woken when rows become due (intake, retries).
    pub wake: Arc<Notify>,
    resettle: mpsc::Sender<PathBuf>,
    deleter: mpsc::Sender<DeleteJob>,
    pub stats: Arc<UploadStats>,
    /// `upload.max_bytes_per_sec`, shared by every body.
    limit: Option<Arc<Bandwidth>>,
    /// `upload.windows`.
    windows: Windows,
    /// Set by the scheduler while a due row waits or a file is in flight: copy-back waits.
    busy: AtomicBool,
    /// Copy-back's row and open uploads, shared with the upload tasks and the failover loop.
    pub copy_back: CopyBack,
    /// True once the stray multipart uploads of the start have been dealt with: until then no
    /// multipart upload is created or resumed (the clean-up could take a new one for a stray),
    /// while single PutObjects already go.
    strays_checked: watch::Sender<bool>,
}

impl Uploader {
    pub fn new(
        settings: Arc<Settings>,
        store: Store,
        journal: Journal,
        root: Arc<Root>,
        resettle: mpsc::Sender<PathBuf>,
        deleter: mpsc::Sender<DeleteJob>,
        stats: Arc<UploadStats>,
    ) -> Arc<Uploader> {
        let units = settings.config.upload.concurrency * UNITS_PER_PART as usize;
        let permits = Turns::new(units);
        let prepared = Turns::new(2 * settings.config.upload.concurrency);
        let limit = Bandwidth::new(settings.config.upload.max_bytes_per_sec).map(Arc::new);
        let windows = settings.windows.clone();
        let standby = settings.standby.as_deref().map(Store::new);
        let failover = Arc::new(Failover::new(
            standby.is_some(),
            Duration::from_secs_f64(settings.config.storage.failover_after_secs),
        ));
        Arc::new(Uploader {
            settings,
            store,
            standby,
            failover,
            journal,
            root,
            permits,
            prepared,
            hasher: Arc::new(Hasher::start()),
            wake: Arc::new(Notify::new()),
            resettle,
            deleter,
            stats,
            limit,
            windows,
            busy: AtomicBool::new(false),
            copy_back: CopyBack::default(),
            strays_checked: watch::Sender::new(false),
        })
    }

    /// Lets multipart uploads start: the start's stray clean-up is over (or was given up).
    pub fn strays_checked(&self) {
        self.strays_checked.send_replace(true);
    }

    /// Waits until [`Self::strays_checked`] (or `cancel`).
    async fn after_stray_check(&self, cancel: &CancellationToken) -> Result<(), TaskError> {
        let mut rx = self.strays_checked.subscribe();
        tokio::select! {
            r = rx.wait_for(|done| *done) => r.map(|_| ()).map_err(|_| TaskError::Interrupted),
            _ = cancel.cancelled() => Err(TaskError::Interrupted),
        }
    }

    fn backoff(&self) -> Backoff {
        let up = &self.settings.config.upload;
        Backoff::new(
            Duration::from_secs_f64(up.retry_initial_secs),
            Duration::from_secs_f64(up.retry_max_secs),
        )
    }

    fn delete_after_upload(&self) -> bool {
        self.settings.config.upload.delete_after_upload
    }

    /// Aborts the multipart upload the row records, if any (best effort: a leftover is cleaned
    /// by the bucket's lifecycle rule).
    async fn abort_recorded_upload(&self, row: &FileRow) {
        if let Some(upload_id) = &row.upload_id
            && let Err(e) = self
                .store_of(row.store)
                .abort_multipart(&row.key, upload_id)
                .await
        {
            warn!(error = %e, "cannot abort the multipart upload");
        }
    }

    /// `row` with the upload id the journal holds now for this generation: `row` is what the
    /// attempt started with, and an upload the attempt created is recorded only in the
    /// journal. Without this, a file that changed or vanished during its first attempt left
    /// its multipart upload open in the bucket.
    async fn with_current_upload(&self, row: &FileRow) -> FileRow {
        let id = row.id;
        let mut out = row.clone();
        match self.journal.read(move |c| journal::get(c, id)).await {
            Ok(Some(now))
                if now.generation == row.generation
                    && now.upload_generation == Some(row.generation) =>
            {
                out.upload_id = now.upload_id;
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot read the row's upload id"),
        }
        out
    }

    /// Sleeps for the next backoff delay unless cancelled; records the error on the row.
    async fn pause(
        &self,
        row: &FileRow,
        backoff: &mut Backoff,
        err: &StoreError,
        cancel: &CancellationToken,
    ) -> Result<(), TaskError> {
        self.stats.retries.fetch_add(1, Ordering::Relaxed);
        crate::service::metrics::upload_retry(&crate::service::metrics::store_reason(err));
        self.failover.failed(row.store, err);
        if self.failover.target() != row.store {
            return Err(TaskError::Moved);
        }
        let delay = backoff.next_delay();
        debug!(error = %err, retry_in_ms = delay.as_millis() as u64, "request failed; retrying");
        let (id, generation) = (row.id, row.generation);
        let msg = err.to_string();
        let next = journal::now_ms() + delay.as_millis() as i64;
        // Visible in `status` while we wait; the row stays with this task.
        self.journal
            .write(Durability::Normal, move |c| {
                journal::set_retry(c, id, generation, &msg, next)
            })
            .await?;
        tokio::select! {
            _ = cancel.cancelled() => return Err(TaskError::Interrupted),
            _ = tokio::time::sleep(delay) => {}
        }
        if self.failover.target() != row.store {
            return Err(TaskError::Moved);
        }
        Ok(())
    }

    /// Fails with `Changed` or `Gone` when the file at the path is no longer `expect`.
    fn check_unchanged(&self, rel: &Path, file: &File, expect: &Identity) -> Result<(), TaskError> {
        let now = rustix::fs::fstat(file).map_err(|e| TaskError::Io(e.to_string()))?;
        if Identity::from_stat(&now) != *expect {
            return Err(TaskError::Changed);
        }
        match self.root.stat(rel) {
            Ok((_, id)) if id == *expect => Ok(()),
            Ok(_) => Err(TaskError::Changed),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(TaskError::Gone),
            Err(e) => Err(TaskError::Io(format!("stat: {e}"))),
        }
    }

    /// A slot for a request of file `id` that carries `len` bytes: inside an upload window,
    /// and its units of the data in flight ([`send_units`]; a part takes one of
    /// `upload.concurrency`), the oldest file's requests first.
    async fn acquire(
        &self,
        id: i64,
        len: u64,
        cancel: &CancellationToken,
    ) -> Result<Turn, TaskError> {
        if !self.windows.wait_open(cancel).await {
            return Err(TaskError::Interrupted);
        }
        let units = send_units(len, self.settings.part_size()) as usize;
        tokio::select! {
            _ = cancel.cancelled() => Err(TaskError::Interrupted),
            t = self.permits.acquire(id.max(0) as u64, units) => Ok(t),
        }
    }

    /// A turn for file `id` to read and hash ahead of sending (see `prepared`).
    async fn prepare(&self, id: i64, cancel: &CancellationToken) -> Result<Turn, TaskError> {
        tokio::select! {
            _ = cancel.cancelled() => Err(TaskError::Interrupted),
            t = self.prepared.acquire(id.max(0) as u64, 1) => Ok(t),
        }
    }

    /// Queues the removal of a stored file's local copy (see [`crate::pipeline::delete`]).
    pub async fn delete_local(&self, id: i64, generation: i64, rel: &Path, identity: &Identity) {
        let job = DeleteJob {
            id,
            generation,
            rel: rel.to_path_buf(),
            identity: *identity,
        };
        // Closed only at shutdown: the file is then removed at the next start.
        let _ = self.deleter.send(job).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_size_grows_for_huge_files() {
        let p = 16 * MIB;
        assert_eq!(part_size_for(0, p), p);
        assert_eq!(part_size_for(100 * 1024 * MIB, p), p);
        let huge = 1024 * 1024 * MIB; // 1 TiB
        let ps = part_size_for(huge, p);
        assert!(huge.div_ceil(ps) <= MAX_PARTS);
        assert_eq!(ps % MIB, 0);
        assert!(ps < p * 8);
    }

    #[test]
    fn a_part_takes_one_of_concurrency_and_small_bodies_their_share() {
        let p = 16 * MIB;
        // A part, an object of a part's size and a part grown for a huge file: one part each.
        assert_eq!(send_units(p, p), UNITS_PER_PART);
        assert_eq!(send_units(p - 1, p), UNITS_PER_PART);
        assert_eq!(send_units(8 * p, p), UNITS_PER_PART);
        // Smaller bodies: their share, rounded up, never nothing.
        assert_eq!(send_units(p / 2, p), UNITS_PER_PART / 2);
        assert_eq!(send_units(MIB, p), 1);
        assert_eq!(send_units(MIB + 1, p), 2);
        assert_eq!(send_units(256 * 1024, p), 1);
        assert_eq!(send_units(0, p), 1);
        // Odd part sizes: the bytes the units allow always cover a body of up to a part.
        for part in [5 * MIB, 5 * MIB + 3, 64 * MIB, 17] {
            for len in [0, 1, 16, MIB, part / 3, part - 1, part]
                .into_iter()
                .filter(|l| *l <= part)
            {
                let units = u64::from(send_units(len, part));
                assert!((1..=u64::from(UNITS_PER_PART)).contains(&units));
                assert!(
                    units * part.div_ceil(u64::from(UNITS_PER_PART)) >= len,
                    "{len} of {part}"
                );
            }
        }
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let d: Vec<_> = (0..10).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] < Duration::from_millis(100));
        assert!(d[3] >= Duration::from_millis(400) && d[3] < Duration::from_millis(800));
        for x in &d[6..] {
            assert!(*x >= Duration::from_secs(1) && *x < Duration::from_secs(2));
        }
    }
}
