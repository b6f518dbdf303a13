//! Uploading, checking and deleting one file at a time, for many files at once.
//!
//! # Scheduling
//!
//! The scheduler takes due rows from the journal (`queued`, `uploading`, and `failed` rows
//! whose wait is over) and runs one task per file, up to a few more files than
//! `upload.concurrency`. What is bounded by `upload.concurrency` is the number of requests that
//! carry data (small objects and parts), across all files: a semaphore permit is held while a
//! part is sent. Before that, a file or part is read and hashed under a second permit (twice
//! `upload.concurrency` of them), so hashing overlaps sending and the digests of several files
//! meet on the hashing thread ([`crate::util::hasher`]). Memory is therefore a few chunk buffers per
//! permit, whatever the part and file sizes: parts are never held in memory, they are read
//! twice from the file (once to hash, once to send), which costs page-cache reads but keeps the
//! daemon small.
//!
//! # One file
//!
//! 1. Open the file without following links; its identity `(dev, inode, size, mtime)` must be
//!    the one recorded when it settled, otherwise it changed: back to settling.
//! 2. Files of at most one part: PutObject. Larger: CreateMultipartUpload (the id is committed
//!    before the first part), then parts in order of reading, each hashed, sent with
//!    `Content-MD5` and committed when the store acknowledges it with a matching ETag. A row
//!    that already has an upload id (after a restart) asks ListParts and sends only what is
//!    missing.
//! 3. Check the object: a PutObject's answer carries the ETag the store computed over what it
//!    stored, which must be the file's MD5 (checked as it arrives); a multipart object's ETag is
//!    not an MD5, so it is HEADed and its size must match.
//! 4. Re-check the file: unchanged since it was read, or it is uploaded again after it settles.
//! 5. Commit `uploaded`, then hand the file to the deleter ([`crate::delete`]), which makes
//!    the commit durable, unlinks the file only if it is still the same file, and commits
//!    `deleted`. Directories emptied that way go to the pruner.
//!
//! Transient errors (network, 5xx, throttling, timeouts, a corrupt part) are retried in place
//! with capped exponential backoff and jitter, forever while the file is on disk; each failure
//! is written to the row (`attempts`, `last_error`) so `status` shows it. Permanent errors
//! (credentials, bucket, permissions) put the row in `failed`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::Settings;
use crate::delete::DeleteJob;
use crate::journal::{self, Durability, FileRow, Journal, JournalError, PartRow, State};
use crate::service::monitor::InFlightGauge;
use crate::store::{self, Body, ErrorKind, FileRange, Store, StoreError};
use crate::util::fs::{Identity, Root};
use crate::util::hasher::Hasher;
use crate::util::keys::{SOURCE_META, source_tag};
use crate::util::md5pair::Md5Pair;
use crate::util::throttle::{Bandwidth, Windows};

/// S3 and OSS allow at most this many parts.
pub const MAX_PARTS: u64 = 10_000;
const MIB: u64 = 1024 * 1024;
/// Read size while hashing.
const HASH_CHUNK: u64 = 1024 * 1024;
/// Objects up to this size are read into memory once, hashed and sent from there (at most
/// `upload.concurrency` of them at a time); larger ones are read twice, never held.
const IN_MEMORY_MAX: u64 = 1024 * 1024;

/// The part size for a file: the configured size, grown (in whole MiB) so that the file fits
/// in [`MAX_PARTS`] parts.
pub fn part_size_for(size: u64, configured: u64) -> u64 {
    let needed = size.div_ceil(MAX_PARTS);
    let needed = needed.div_ceil(MIB) * MIB;
    configured.max(needed)
}

/// The whole file's CRC-64/XZ, fed in file order alongside the MD5s.
struct Crc64(crc64fast::Digest);

impl Crc64 {
    fn new() -> Crc64 {
        Crc64(crc64fast::Digest::new())
    }

    fn sum(&self) -> u64 {
        self.0.sum64()
    }
}

/// What ListParts said about an upload being resumed.
enum Listing {
    Parts(Vec<store::ListedPart>),
    /// Gone (aborted, expired, or completed elsewhere).
    Gone,
    /// The answer could not be used: resume from the journal's parts.
    Unknown,
}

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
    pub heartbeat: Arc<crate::util::heartbeat::Heartbeat>,
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

/// The `reason` label (see `crate::service::metrics`) of an attempt that failed or will be retried.
fn metrics_reason(r: &Result<Outcome, TaskError>) -> String {
    match r {
        Ok(Outcome::Failed(_)) => "local".into(),
        Ok(Outcome::Retry(_)) => "verify".into(),
        Ok(_) => String::new(),
        Err(TaskError::Store(e)) => crate::service::metrics::store_reason(e),
        Err(TaskError::Journal(_)) => "journal".into(),
        Err(TaskError::Io(_)) => "io".into(),
        Err(TaskError::Changed) => "changed".into(),
        Err(TaskError::Gone) => "gone".into(),
        Err(TaskError::Interrupted) => String::new(),
    }
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
    pub store: Store,
    pub journal: Journal,
    pub root: Arc<Root>,
    /// Requests that carry data in flight.
    permits: Arc<Semaphore>,
    /// Files and parts being read and hashed ahead of their request (twice as many as
    /// `permits`), so hashing overlaps sending and several digests run side by side.
    prepared: Arc<Semaphore>,
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
        let permits = Arc::new(Semaphore::new(settings.config.upload.concurrency));
        let prepared = Arc::new(Semaphore::new(2 * settings.config.upload.concurrency));
        let limit = Bandwidth::new(settings.config.upload.max_bytes_per_sec).map(Arc::new);
        let windows = settings.windows.clone();
        Arc::new(Uploader {
            settings,
            store,
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
        })
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

    /// Runs the scheduler until `cancel`; then lets files in flight finish for
    /// `upload.drain_secs` and abandons the rest (they resume at the next start).
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let max_files = self.settings.config.upload.concurrency * 4;
        let mut active: HashSet<i64> = HashSet::new();
        let mut task_rows: HashMap<tokio::task::Id, (i64, u64)> = HashMap::new();
        let mut tasks: JoinSet<()> = JoinSet::new();
        // Due rows read ahead, so finishing a file does not cost a journal query.
        let mut backlog: VecDeque<FileRow> = VecDeque::new();
        // The journal may hold more due rows than were read.
        let mut more_due = true;
        // File tasks see this token; it fires only when the drain time is over.
        let work_cancel = CancellationToken::new();
        let poll = Duration::from_millis(250);
        loop {
            self.stats.heartbeat.beat();
            if !cancel.is_cancelled() && backlog.is_empty() && more_due {
                let want = max_files * 4 + active.len();
                match self
                    .journal
                    .read(move |c| journal::due(c, journal::now_ms(), want))
                    .await
                {
                    Ok(rows) => {
                        more_due = rows.len() >= want;
                        backlog.extend(rows.into_iter().filter(|r| !active.contains(&r.id)));
                    }
                    Err(e) => warn!(error = %e, "cannot read due files from the journal"),
                }
            }
            // Outside the upload windows no new file starts (not even a multipart upload); the
            // loop keeps turning (and its heartbeat beating) while it waits.
            let window_open = self.windows.is_open_now();
            while window_open && !cancel.is_cancelled() && active.len() < max_files {
                let Some(row) = backlog.pop_front() else {
                    break;
                };
                if active.insert(row.id) {
                    let me = self.clone();
                    let token = work_cancel.clone();
                    let (id, size) = (row.id, row.size);
                    self.stats
                        .in_flight
                        .bytes
                        .fetch_add(size, Ordering::Relaxed);
                    let handle = tasks.spawn(async move { me.process(row, token).await });
                    task_rows.insert(handle.id(), (id, size));
                }
            }
            self.stats
                .in_flight
                .files
                .store(active.len() as u64, Ordering::Relaxed);
            tokio::select! {
                _ = cancel.cancelled() => break,
                Some(done) = tasks.join_next_with_id() => {
                    let task = match done {
                        Ok((task, ())) => task,
                        Err(e) => {
                            warn!(error = %e, "upload task ended abnormally");
                            e.id()
                        }
                    };
                    if let Some((id, size)) = task_rows.remove(&task) {
                        active.remove(&id);
                        self.stats.in_flight.bytes.fetch_sub(size, Ordering::Relaxed);
                    }
                }
                _ = self.wake.notified() => more_due = true,
                _ = tokio::time::sleep(poll) => more_due = true,
            }
        }
        // Drain.
        let drain = Duration::from_secs_f64(self.settings.config.upload.drain_secs);
        if !tasks.is_empty() {
            info!(
                files = tasks.len(),
                drain_secs = drain.as_secs_f64(),
                "waiting for uploads in flight"
            );
        }
        let deadline = tokio::time::Instant::now() + drain;
        while !tasks.is_empty() {
            tokio::select! {
                _ = tasks.join_next() => {}
                _ = tokio::time::sleep_until(deadline) => {
                    work_cancel.cancel();
                    // Give tasks a moment to stop at a safe point, then drop them.
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        while tasks.join_next().await.is_some() {}
                    }).await;
                    tasks.abort_all();
                    while tasks.join_next().await.is_some() {}
                }
            }
        }
        debug!("uploader stopped");
    }

    /// One attempt at one file, with its outcome written to the journal.
    async fn process(self: Arc<Self>, row: FileRow, cancel: CancellationToken) {
        let span = info_span!("file", path = %row.path.display(), key = %row.key, size = row.size);
        async {
            let result = self.upload_file(&row, &cancel).await;
            let reason = metrics_reason(&result);
            let outcome = match result {
                Ok(o) => o,
                Err(TaskError::Interrupted) => Outcome::Interrupted,
                Err(TaskError::Changed) => match self.mark_changed(&row).await {
                    Ok(()) => Outcome::Handled,
                    Err(e) => Outcome::Retry(e.to_string()),
                },
                Err(TaskError::Gone) => match self.mark_vanished(&row).await {
                    Ok(()) => Outcome::Handled,
                    Err(e) => Outcome::Retry(e.to_string()),
                },
                Err(TaskError::Store(e)) if e.kind == ErrorKind::Permanent => {
                    Outcome::Failed(e.to_string())
                }
                Err(TaskError::Store(e)) => Outcome::Retry(e.to_string()),
                Err(TaskError::Journal(e)) if journal::is_stale(&e) => Outcome::Handled,
                Err(TaskError::Journal(e)) => Outcome::Retry(e.to_string()),
                Err(TaskError::Io(e)) => Outcome::Retry(e),
            };
            let now = journal::now_ms();
            let (id, generation) = (row.id, row.generation);
            match outcome {
                Outcome::Done | Outcome::Handled | Outcome::Interrupted => {}
                Outcome::Failed(err) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    crate::service::metrics::upload_failure(&reason);
                    warn!(error = %err, "upload failed permanently; the file stays until `retry` or the next automatic attempt");
                    let wait = (self.settings.config.upload.failed_retry_secs * 1000.0) as i64;
                    let res = self
                        .journal
                        .write(Durability::Normal, move |c| {
                            journal::set_failed(c, id, generation, &err, now + wait)
                        })
                        .await;
                    if let Err(e) = res
                        && !journal::is_stale(&e)
                    {
                        warn!(error = %e, "cannot record the failure");
                    }
                }
                Outcome::Retry(err) => {
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    crate::service::metrics::upload_retry(&reason);
                    let mut b = self.backoff();
                    b.attempt = row.attempts.clamp(0, 30) as u32;
                    let delay = b.next_delay();
                    warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "upload attempt failed; will retry");
                    let next = now + delay.as_millis() as i64;
                    let res = self
                        .journal
                        .write(Durability::Normal, move |c| {
                            journal::set_retry(c, id, generation, &err, next)
                        })
                        .await;
                    if let Err(e) = res
                        && !journal::is_stale(&e)
                    {
                        warn!(error = %e, "cannot record the retry");
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn mark_changed(&self, row: &FileRow) -> Result<(), JournalError> {
        info!(
            "file changed while it was being uploaded; it will be uploaded again once it settles"
        );
        self.abort_recorded_upload(&self.with_current_upload(row).await)
            .await;
        let (id, generation) = (row.id, row.generation);
        self.journal
            .write(Durability::Normal, move |c| {
                journal::set_settling(c, id, generation)?;
                journal::clear_upload(c, id)
            })
            .await?;
        let _ = self.resettle.send(row.path.clone()).await;
        Ok(())
    }

    async fn mark_vanished(&self, row: &FileRow) -> Result<(), JournalError> {
        info!("file disappeared before it was stored");
        self.abort_recorded_upload(&self.with_current_upload(row).await)
            .await;
        let (id, generation) = (row.id, row.generation);
        self.journal
            .write(Durability::Normal, move |c| {
                journal::set_vanished(c, id, generation)?;
                journal::clear_upload(c, id)
            })
            .await
    }

    /// Aborts the multipart upload the row records, if any (best effort: a leftover is cleaned
    /// by the bucket's lifecycle rule).
    async fn abort_recorded_upload(&self, row: &FileRow) {
        if let Some(upload_id) = &row.upload_id
            && let Err(e) = self.store.abort_multipart(&row.key, upload_id).await
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
            _ = cancel.cancelled() => Err(TaskError::Interrupted),
            _ = tokio::time::sleep(delay) => Ok(()),
        }
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

    /// A slot for a request that carries data: inside an upload window, and one of
    /// `upload.concurrency`.
    async fn acquire(&self, cancel: &CancellationToken) -> Result<OwnedSemaphorePermit, TaskError> {
        if !self.windows.wait_open(cancel).await {
            return Err(TaskError::Interrupted);
        }
        tokio::select! {
            _ = cancel.cancelled() => Err(TaskError::Interrupted),
            p = self.permits.clone().acquire_owned() => p.map_err(|_| TaskError::Interrupted),
        }
    }

    /// A turn to read and hash ahead of sending (see `prepared`).
    async fn prepare(&self, cancel: &CancellationToken) -> Result<OwnedSemaphorePermit, TaskError> {
        tokio::select! {
            _ = cancel.cancelled() => Err(TaskError::Interrupted),
            p = self.prepared.clone().acquire_owned() => p.map_err(|_| TaskError::Interrupted),
        }
    }

    async fn upload_file(
        self: &Arc<Self>,
        row: &FileRow,
        cancel: &CancellationToken,
    ) -> Result<Outcome, TaskError> {
        if row.key.is_empty() {
            // Recorded without a usable key (see the row's error): nothing to upload to.
            return Ok(Outcome::Failed(
                row.last_error
                    .clone()
                    .unwrap_or_else(|| "no object key for this file".to_string()),
            ));
        }
        let rel = row.path.clone();
        let opened = {
            let root = self.root.clone();
            let rel = rel.clone();
            tokio::task::spawn_blocking(move || root.open_file(&rel))
                .await
                .map_err(|e| TaskError::Io(e.to_string()))?
        };
        let (file, identity) = match opened {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(TaskError::Gone),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Ok(Outcome::Failed(format!("cannot open the file: {e}")));
            }
            // A symbolic link (ELOOP), a directory, a device: not a recording any more.
            Err(e)
                if e.raw_os_error() == Some(libc::ELOOP)
                    || e.kind() == std::io::ErrorKind::InvalidInput
                    || e.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                return Err(TaskError::Gone);
            }
            Err(e) => return Err(TaskError::Io(format!("cannot open the file: {e}"))),
        };
        if row.identity != Some(identity) {
            return Err(TaskError::Changed);
        }
        let file = Arc::new(file);

        // An upload id from an older generation of the file is of no use.
        if row.upload_id.is_some() && row.upload_generation != Some(row.generation) {
            self.abort_recorded_upload(row).await;
            let id = row.id;
            self.journal
                .write(Durability::Normal, move |c| journal::clear_upload(c, id))
                .await?;
        }

        let part_size = part_size_for(identity.size, self.settings.part_size());
        let started = Instant::now();
        let single = identity.size <= part_size;
        let (md5_hex, crc64) = if single {
            self.put_small(row, &file, &identity, cancel).await?
        } else {
            self.put_multipart(row, &file, &identity, part_size, cancel)
                .await?
        };

        // Check what the store holds. A single PutObject's answer already proved it: the store
        // returned the ETag of what it stored, and `put_object` accepted it only equal to the
        // MD5 of the file's bytes (and the body's length is the file's size), and its CRC-64
        // equal to the file's where it sent one. A multipart object's ETag is not its MD5, so
        // its size is checked here, and its CRC-64 where the store reports one (OSS does):
        // that checks the whole object end to end, not only part by part.
        if !single {
            let mut backoff = self.backoff();
            loop {
                match self.store.head(&row.key).await {
                    Ok(Some(info))
                        if info.size == identity.size && info.crc64.is_some_and(|c| c != crc64) =>
                    {
                        let id = row.id;
                        self.journal
                            .write(Durability::Normal, move |c| journal::clear_upload(c, id))
                            .await?;
                        return Ok(Outcome::Retry(format!(
                            "stored object's CRC-64 is {}, the file's {crc64}: the upload is damaged; sending it again",
                            info.crc64.unwrap_or_default()
                        )));
                    }
                    Ok(Some(info)) if info.size == identity.size => break,
                    Ok(Some(info)) => {
                        return Ok(Outcome::Retry(format!(
                            "stored object has {} bytes, the file {}",
                            info.size, identity.size
                        )));
                    }
                    Ok(None) => {
                        return Ok(Outcome::Retry(
                            "stored object not found after upload".into(),
                        ));
                    }
                    Err(e) if e.is_retryable() => self.pause(row, &mut backoff, &e, cancel).await?,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        self.check_unchanged(&rel, &file, &identity)?;

        let (id, generation) = (row.id, row.generation);
        {
            // Not flushed here: the deleter flushes once for a whole batch before it unlinks.
            let md5_hex = md5_hex.clone();
            self.journal
                .write(Durability::Normal, move |c| {
                    journal::set_uploaded(c, id, generation, &identity, &md5_hex, Some(crc64))
                })
                .await?;
        }
        crate::util::failpoint::hit("after-uploaded");
        self.stats.files_uploaded.fetch_add(1, Ordering::Relaxed);
        crate::service::metrics::upload_complete(identity.size, started.elapsed());
        info!(
            bytes = identity.size,
            md5 = %md5_hex,
            crc64,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "upload complete"
        );
        drop(file);
        if self.delete_after_upload() {
            self.delete_local(id, generation, &rel, &identity).await;
        }
        Ok(Outcome::Done)
    }

    /// Queues the removal of a stored file's local copy (see [`crate::delete`]).
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

    /// Hashes `len` bytes at `offset` as one part of `pair` (which also keeps the whole
    /// file's MD5) and into `crc` (the whole file's CRC-64, computed on the reading thread while
    /// the bytes are in cache); checks the bytes are all there. Returns the part's MD5.
    async fn hash_range(
        &self,
        file: &Arc<File>,
        offset: u64,
        len: u64,
        mut pair: Md5Pair,
        crc: &mut Crc64,
    ) -> Result<([u8; 16], Md5Pair), TaskError> {
        let mut buf = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(HASH_CHUNK) as usize;
            let f = file.clone();
            let announced = self.hasher.announce();
            let mut digest = std::mem::replace(&mut crc.0, crc64fast::Digest::new());
            let (b, got, digest) = tokio::task::spawn_blocking(move || {
                buf.resize(n, 0);
                let got = crate::util::fs::read_full_at(&f, &mut buf[..n], pos);
                if let Ok(got) = got {
                    digest.write(&buf[..got]);
                }
                (buf, got, digest)
            })
            .await
            .map_err(|e| TaskError::Io(e.to_string()))?;
            let got = got.map_err(|e| TaskError::Io(format!("read: {e}")))?;
            if got < n {
                return Err(TaskError::Changed);
            }
            crc.0 = digest;
            let (p, b) = self
                .hasher
                .update_pair(pair, b, n, announced)
                .await
                .map_err(|e| TaskError::Io(e.to_string()))?;
            pair = p;
            buf = b;
            pos += n as u64;
        }
        Ok((pair.finish_part(), pair))
    }

    /// A file of at most one part: one PutObject. Returns the MD5 (hex). Files up to
    /// [`IN_MEMORY_MAX`] are read once and sent from memory; larger ones are hashed, then
    /// streamed from the file.
    async fn put_small(
        &self,
        row: &FileRow,
        file: &Arc<File>,
        identity: &Identity,
        cancel: &CancellationToken,
    ) -> Result<(String, u64), TaskError> {
        let mut backoff = self.backoff();
        let prepared = self.prepare(cancel).await?;
        let size = identity.size;
        let mut crc = Crc64::new();
        // Under a bandwidth limit every body is streamed, so it can be paced.
        let (md5, data) = if size <= IN_MEMORY_MAX && self.limit.is_none() {
            let f = file.clone();
            let announced = self.hasher.announce();
            let (buf, digest) = tokio::task::spawn_blocking(move || -> Result<_, TaskError> {
                let mut buf = vec![0u8; size as usize];
                let got = crate::util::fs::read_full_at(&f, &mut buf, 0)
                    .map_err(|e| TaskError::Io(format!("read: {e}")))?;
                if got < buf.len() {
                    return Err(TaskError::Changed);
                }
                let mut digest = crc64fast::Digest::new();
                digest.write(&buf);
                Ok((buf, digest))
            })
            .await
            .map_err(|e| TaskError::Io(e.to_string()))??;
            crc.0 = digest;
            let (md5, buf) = self
                .hasher
                .md5(buf, announced)
                .await
                .map_err(|e| TaskError::Io(e.to_string()))?;
            (md5, Some(bytes::Bytes::from(buf)))
        } else {
            // One part: its MD5 is the file's.
            let (md5, _) = self
                .hash_range(file, 0, size, Md5Pair::new(), &mut crc)
                .await?;
            (md5, None)
        };
        let crc64 = crc.sum();
        let permit = self.acquire(cancel).await?;
        drop(prepared);
        let mut permit = Some(permit);
        let metadata = [
            ("md5", hex::encode(md5)),
            (SOURCE_META, source_tag(row.generation, identity)),
        ];
        loop {
            let held = match permit.take() {
                Some(p) => p,
                None => self.acquire(cancel).await?,
            };
            let body = match &data {
                Some(b) => Body::Bytes(b.clone()),
                None => Body::File(FileRange {
                    file: file.clone(),
                    offset: 0,
                    len: size,
                    limit: self.limit.clone(),
                }),
            };
            let res = tokio::select! {
                _ = cancel.cancelled() => return Err(TaskError::Interrupted),
                r = self.store.put_object(&row.key, &row.path, body, &md5, crc64, &metadata) => r,
            };
            drop(held);
            match res {
                Ok(_) => {
                    self.stats.bytes_sent.fetch_add(size, Ordering::Relaxed);
                    return Ok((hex::encode(md5), crc64));
                }
                Err(e) if e.is_retryable() => {
                    self.check_unchanged(&row.path, file, identity)?;
                    self.pause(row, &mut backoff, &e, cancel).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A multipart upload, resumed from the journal when it has one. Returns the MD5 (hex).
    ///
    /// Some servers answer requests for an upload they no longer have with `AccessDenied`
    /// instead of `NoSuchUpload` (s3s-fs does, e.g. after a completion cut short by a crash).
    /// When that happens on an upload resumed from the journal, the upload is dropped and the
    /// file starts over at its next attempt; a real permission problem then shows at once on
    /// the new upload's first request and fails the file as it should.
    async fn put_multipart(
        self: &Arc<Self>,
        row: &FileRow,
        file: &Arc<File>,
        identity: &Identity,
        part_size: u64,
        cancel: &CancellationToken,
    ) -> Result<(String, u64), TaskError> {
        let resumed = match (&row.upload_id, row.upload_generation, row.part_size) {
            (Some(uid), Some(g), Some(ps)) if g == row.generation && ps == part_size => {
                Some(uid.clone())
            }
            _ => None,
        };
        let res = self
            .put_multipart_inner(row, file, identity, part_size, cancel)
            .await;
        let Some(resumed) = resumed else {
            return res;
        };
        match res {
            Err(TaskError::Store(e)) if e.code.as_deref() == Some("AccessDenied") => {
                let id = row.id;
                let current = self
                    .journal
                    .read(move |c| journal::get(c, id))
                    .await?
                    .and_then(|r| r.upload_id);
                if current.as_deref() != Some(resumed.as_str()) {
                    return Err(TaskError::Store(e));
                }
                warn!(upload_id = %resumed, error = %e, "the store refuses the resumed upload; starting a new one");
                if let Err(e) = self.store.abort_multipart(&row.key, &resumed).await {
                    debug!(error = %e, "abort of the refused upload failed");
                }
                self.journal
                    .write(Durability::Normal, move |c| journal::clear_upload(c, id))
                    .await?;
                Err(TaskError::Store(StoreError::new(
                    e.op,
                    ErrorKind::Transient,
                    format!("resumed upload refused ({}); starting over", e.message),
                )))
            }
            other => other,
        }
    }

    async fn put_multipart_inner(
        self: &Arc<Self>,
        row: &FileRow,
        file: &Arc<File>,
        identity: &Identity,
        part_size: u64,
        cancel: &CancellationToken,
    ) -> Result<(String, u64), TaskError> {
        let (id, generation) = (row.id, row.generation);
        let size = identity.size;
        let n_parts = size.div_ceil(part_size);
        let mut backoff = self.backoff();

        // Resume, when the journal has an upload of this generation with this part size.
        let mut done: HashMap<i32, PartRow> = HashMap::new();
        let mut upload_id = match (&row.upload_id, row.upload_generation, row.part_size) {
            (Some(uid), Some(g), Some(ps)) if g == generation && ps == part_size => {
                Some(uid.clone())
            }
            _ => None,
        };
        if upload_id.is_some()
            && self
                .already_stored(row, identity, &mut backoff, cancel)
                .await?
        {
            // Completed before a crash, not recorded: only the MD5 is missing.
            info!("multipart upload was completed before a restart; not sending it again");
            let mut crc = Crc64::new();
            let (_, pair) = self
                .hash_range(file, 0, size, Md5Pair::new(), &mut crc)
                .await?;
            return Ok((hex::encode(pair.finish_whole()), crc.sum()));
        }
        if let Some(uid) = upload_id.clone() {
            let recorded = {
                let uid = uid.clone();
                self.journal
                    .read(move |c| journal::parts(c, id, &uid))
                    .await?
            };
            let listed = loop {
                match self.store.list_parts(&row.key, &uid).await {
                    Ok(l) => break Listing::Parts(l),
                    Err(e) if e.kind == ErrorKind::NoSuchUpload || e.status == Some(404) => {
                        break Listing::Gone;
                    }
                    Err(e) if e.kind == ErrorKind::Permanent => return Err(e.into()),
                    // The store answered, but with nothing we can use (moto's ListParts is not
                    // what the SDK reads, some stores lack the call): the parts the journal
                    // committed were each acknowledged by the store, so carry on from them. If
                    // the upload is gone after all, its next part or its completion says so.
                    Err(e) if e.status.is_some_and(|s| s < 500 && s != 408 && s != 429) => {
                        warn!(upload_id = %uid, error = %e, "cannot list the upload's parts; resuming from the parts the journal recorded");
                        break Listing::Unknown;
                    }
                    Err(e) => self.pause(row, &mut backoff, &e, cancel).await?,
                }
            };
            // s3s-fs answers an aborted upload with an empty list: with parts recorded, an
            // empty list means the upload is gone.
            let listed = match listed {
                Listing::Parts(l) if l.is_empty() && !recorded.is_empty() => Listing::Gone,
                other => other,
            };
            match listed {
                Listing::Unknown => {
                    for p in recorded {
                        done.insert(p.part_number, p);
                    }
                    info!(upload_id = %uid, parts_done = done.len(), parts = n_parts, "resuming multipart upload");
                }
                Listing::Parts(listed) => {
                    let listed: HashMap<i32, _> =
                        listed.into_iter().map(|p| (p.part_number, p)).collect();
                    for p in recorded {
                        let ok = listed.get(&p.part_number).is_some_and(|l| {
                            l.size == p.size
                                && l.etag
                                    .as_ref()
                                    .is_none_or(|e| store::etag_hex(e) == store::etag_hex(&p.etag))
                        });
                        if ok {
                            done.insert(p.part_number, p);
                        }
                    }
                    info!(upload_id = %uid, parts_done = done.len(), parts = n_parts, "resuming multipart upload");
                }
                Listing::Gone => {
                    info!(upload_id = %uid, "multipart upload is gone; starting again");
                    if let Err(e) = self.store.abort_multipart(&row.key, &uid).await {
                        debug!(error = %e, "abort of a vanished upload failed");
                    }
                    self.journal
                        .write(Durability::Normal, move |c| journal::clear_upload(c, id))
                        .await?;
                    upload_id = None;
                }
            }
        } else if let Some(uid) = &row.upload_id {
            // Part size changed (configuration): that upload cannot go on.
            if let Err(e) = self.store.abort_multipart(&row.key, uid).await {
                warn!(error = %e, "cannot abort the old multipart upload");
            }
        }
        let upload_id = match upload_id {
            Some(u) => u,
            None => {
                let uid = loop {
                    let meta = [(SOURCE_META, source_tag(generation, identity))];
                    match self
                        .store
                        .create_multipart(&row.key, &row.path, &meta)
                        .await
                    {
                        Ok(u) => break u,
                        Err(e) if e.is_retryable() => {
                            self.pause(row, &mut backoff, &e, cancel).await?
                        }
                        Err(e) => return Err(e.into()),
                    }
                };
                crate::util::failpoint::hit("after-create");
                // Committed before the first part is sent, so the upload is never unknown.
                let u = uid.clone();
                let res = self
                    .journal
                    .write(Durability::Normal, move |c| {
                        journal::start_upload(c, id, generation, Some(&u), part_size)
                    })
                    .await;
                if let Err(e) = res {
                    let _ = self.store.abort_multipart(&row.key, &uid).await;
                    return Err(e.into());
                }
                uid
            }
        };

        // Read parts in order (hashing them and the whole file), send them concurrently.
        let mut pair = Some(Md5Pair::new());
        let mut crc = Crc64::new();
        let mut senders: JoinSet<Result<PartRow, TaskError>> = JoinSet::new();
        let mut failure: Option<TaskError> = None;
        for n in 1..=n_parts {
            // Stop early when a part failed for good.
            while let Some(res) = senders.try_join_next() {
                match res {
                    Ok(Ok(p)) => {
                        done.insert(p.part_number, p);
                    }
                    Ok(Err(e)) => failure = Some(e),
                    Err(e) => failure = Some(TaskError::Io(e.to_string())),
                }
            }
            if failure.is_some() {
                break;
            }
            let offset = (n - 1) * part_size;
            let len = part_size.min(size - offset);
            let part_number = n as i32;
            // Hashed while earlier parts are still being sent; then a turn to send.
            let prepared = self.prepare(cancel).await?;
            let Some(p) = pair.take() else {
                return Err(TaskError::Io("hash state lost".into()));
            };
            let (md5, p) = self.hash_range(file, offset, len, p, &mut crc).await?;
            pair = Some(p);
            if let Some(p) = done.get(&part_number) {
                if p.md5 == hex::encode(md5) && p.size == len {
                    continue;
                }
                // The file no longer matches what was sent.
                return Err(TaskError::Changed);
            }
            let permit = self.acquire(cancel).await?;
            drop(prepared);
            let me = self.clone();
            let row = row.clone();
            let file = file.clone();
            let uid = upload_id.clone();
            let identity = *identity;
            let cancel = cancel.clone();
            senders.spawn(async move {
                me.send_part(
                    &row,
                    &file,
                    &identity,
                    &uid,
                    part_number,
                    offset,
                    len,
                    md5,
                    permit,
                    &cancel,
                )
                .await
            });
        }
        while let Some(res) = senders.join_next().await {
            match res {
                Ok(Ok(p)) => {
                    done.insert(p.part_number, p);
                }
                Ok(Err(e)) => {
                    if failure.is_none() || matches!(e, TaskError::Changed | TaskError::Gone) {
                        failure = Some(e)
                    }
                }
                Err(e) => failure = Some(TaskError::Io(e.to_string())),
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        let md5_hex = pair
            .map(|p| hex::encode(p.finish_whole()))
            .unwrap_or_default();

        let mut parts: Vec<(i32, String)> = done
            .values()
            .map(|p| (p.part_number, p.etag.clone()))
            .collect();
        parts.sort_by_key(|p| p.0);
        if parts.len() as u64 != n_parts {
            return Err(TaskError::Io(format!(
                "{} of {n_parts} parts recorded",
                parts.len()
            )));
        }
        let crc64 = crc.sum();
        loop {
            match self
                .store
                .complete_multipart(&row.key, &upload_id, &parts)
                .await
            {
                Ok(stored) => {
                    if let Err(e) =
                        store::check_crc64("CompleteMultipartUpload", stored.crc64, crc64)
                    {
                        // The object is there, but not this file's bytes: send it again (a new
                        // upload overwrites it); it is never recorded as stored.
                        self.journal
                            .write(Durability::Normal, move |c| journal::clear_upload(c, id))
                            .await?;
                        return Err(e.into());
                    }
                    break;
                }
                Err(e) if e.kind == ErrorKind::NoSuchUpload => {
                    // Completed by an attempt whose answer was lost, or gone: if the object is
                    // not this file, start over.
                    if let Some(obj) = self
                        .stored_object(row, identity, &mut backoff, cancel)
                        .await?
                    {
                        self.accept_completed(row, &upload_id, obj, crc64).await?;
                        break;
                    }
                    self.journal
                        .write(Durability::Normal, move |c| journal::clear_upload(c, id))
                        .await?;
                    return Err(TaskError::Store(e));
                }
                Err(e) if e.kind == ErrorKind::RestartUpload => {
                    // The store will not join these parts: that upload is of no more use.
                    warn!(upload_id = %upload_id, error = %e, "the store refuses to complete the upload; starting a new one");
                    if let Err(e) = self.store.abort_multipart(&row.key, &upload_id).await {
                        warn!(error = %e, "cannot abort the refused upload");
                    }
                    self.journal
                        .write(Durability::Normal, move |c| journal::clear_upload(c, id))
                        .await?;
                    return Err(TaskError::Store(e));
                }
                Err(e) if e.is_retryable() => {
                    // The store may have joined the parts although its answer was lost (no
                    // answer at all) or could not be read (a 200 the SDK refuses, such as moto's
                    // `<CompleteMultipartUploadResponse>`): a HEAD tells, before the completion
                    // is tried again. A refusal with a status of its own (5xx, SlowDown) means
                    // the store did not complete it.
                    let unknown = matches!(e.status, None | Some(200));
                    if unknown
                        && let Some(obj) = self
                            .stored_object(row, identity, &mut backoff, cancel)
                            .await?
                    {
                        warn!(upload_id = %upload_id, error = %e, "completion answer unusable, but the object is this file; accepting it");
                        self.accept_completed(row, &upload_id, obj, crc64).await?;
                        break;
                    }
                    self.pause(row, &mut backoff, &e, cancel).await?
                }
                Err(e) => return Err(e.into()),
            }
        }
        crate::util::failpoint::hit("after-complete");
        Ok((md5_hex, crc64))
    }

    /// Whether the object at the row's key is already this exact file (size and source
    /// metadata), e.g. completed just before a crash.
    async fn already_stored(
        &self,
        row: &FileRow,
        identity: &Identity,
        backoff: &mut Backoff,
        cancel: &CancellationToken,
    ) -> Result<bool, TaskError> {
        Ok(self
            .stored_object(row, identity, backoff, cancel)
            .await?
            .is_some())
    }

    /// What HEAD says of the object at the row's key when it is this exact file (size and
    /// source metadata); `None` when there is no object or another one.
    async fn stored_object(
        &self,
        row: &FileRow,
        identity: &Identity,
        backoff: &mut Backoff,
        cancel: &CancellationToken,
    ) -> Result<Option<store::ObjectInfo>, TaskError> {
        let tag = source_tag(row.generation, identity);
        loop {
            match self.store.head(&row.key).await {
                Ok(Some(info)) => {
                    let ours =
                        info.size == identity.size && info.metadata.get(SOURCE_META) == Some(&tag);
                    return Ok(ours.then_some(info));
                }
                Ok(None) => return Ok(None),
                Err(e) if e.is_retryable() => self.pause(row, backoff, &e, cancel).await?,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Takes a multipart object found by HEAD after its completion answer was lost as this
    /// upload's result: its CRC-64, where the store sends one, must be the file's, and the
    /// upload is aborted in case the store still keeps it open (gone already is fine).
    async fn accept_completed(
        &self,
        row: &FileRow,
        upload_id: &str,
        obj: store::ObjectInfo,
        crc64: u64,
    ) -> Result<(), TaskError> {
        let id = row.id;
        if let Err(e) = store::check_crc64("HeadObject", obj.crc64, crc64) {
            self.journal
                .write(Durability::Normal, move |c| journal::clear_upload(c, id))
                .await?;
            return Err(e.into());
        }
        if let Err(e) = self.store.abort_multipart(&row.key, upload_id).await {
            debug!(error = %e, "abort after an accepted completion failed");
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn send_part(
        &self,
        row: &FileRow,
        file: &Arc<File>,
        identity: &Identity,
        upload_id: &str,
        part_number: i32,
        offset: u64,
        len: u64,
        md5: [u8; 16],
        permit: OwnedSemaphorePermit,
        cancel: &CancellationToken,
    ) -> Result<PartRow, TaskError> {
        let mut backoff = self.backoff();
        let mut permit = Some(permit);
        loop {
            let held = match permit.take() {
                Some(p) => p,
                None => self.acquire(cancel).await?,
            };
            let body = FileRange {
                file: file.clone(),
                offset,
                len,
                limit: self.limit.clone(),
            };
            let res = tokio::select! {
                _ = cancel.cancelled() => return Err(TaskError::Interrupted),
                r = self.store.upload_part(&row.key, upload_id, part_number, body, &md5) => r,
            };
            drop(held);
            match res {
                Ok(etag) => {
                    crate::util::failpoint::hit("after-part");
                    self.stats.bytes_sent.fetch_add(len, Ordering::Relaxed);
                    let part = PartRow {
                        part_number,
                        offset,
                        size: len,
                        md5: hex::encode(md5),
                        etag,
                    };
                    let (id, generation) = (row.id, row.generation);
                    let (p, uid) = (part.clone(), upload_id.to_string());
                    self.journal
                        .write(Durability::Normal, move |c| {
                            journal::record_part(c, id, generation, &uid, &p)
                        })
                        .await?;
                    crate::util::failpoint::hit("after-part-committed");
                    return Ok(part);
                }
                Err(e) if e.kind == ErrorKind::NoSuchUpload => return Err(e.into()),
                Err(e) if e.is_retryable() => {
                    self.check_unchanged(&row.path, file, identity)?;
                    if e.kind == ErrorKind::Corrupt {
                        warn!(part_number, error = %e, "part arrived damaged; sending it again");
                    }
                    self.pause(row, &mut backoff, &e, cancel).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Deletes local copies of rows that are stored but still on disk (after a crash between
    /// the `uploaded` commit and the unlink, or a delete that failed).
    pub async fn finish_pending_deletes(&self) -> Result<(), JournalError> {
        if !self.delete_after_upload() {
            return Ok(());
        }
        let rows = self
            .journal
            .read(|c| journal::in_state(c, State::Uploaded))
            .await?;
        for row in rows {
            if let Some(identity) = row.identity {
                self.delete_local(row.id, row.generation, &row.path, &identity)
                    .await;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// OSS's `x-oss-hash-crc64ecma` is CRC-64/XZ: its check value, and fed in pieces.
    #[test]
    fn crc64_is_oss_crc64ecma() {
        let mut c = Crc64::new();
        c.0.write(b"1234");
        c.0.write(b"56789");
        assert_eq!(c.sum(), 0x995d_c9bb_df19_39fa);
        assert_eq!(Crc64::new().sum(), 0);
    }

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
