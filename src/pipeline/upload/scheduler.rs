//! The scheduler: due rows from the journal, one task per file, each attempt's outcome written
//! back; and the drain at shutdown. Files in flight: as many as can be sent at once plus those
//! read ahead ([`files_in_flight`]), of which at most four times `upload.concurrency` are
//! larger than one part.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{Outcome, TaskError, UNITS_PER_PART, Uploader};
use crate::journal::{self, Durability, FileRow};
use crate::service::metrics;
use crate::store::ErrorKind;

/// The `reason` label (see `crate::service::metrics`) of an attempt that failed or will be retried.
fn metrics_reason(r: &Result<Outcome, TaskError>) -> String {
    match r {
        Ok(Outcome::Failed(_)) => "local".into(),
        Ok(Outcome::Retry(_)) => "verify".into(),
        Ok(_) => String::new(),
        Err(TaskError::Store(e)) => metrics::store_reason(e),
        Err(TaskError::Journal(_)) => "journal".into(),
        Err(TaskError::Io(_)) => "io".into(),
        Err(TaskError::Changed) => "changed".into(),
        Err(TaskError::Gone) => "gone".into(),
        Err(TaskError::Interrupted | TaskError::Moved) => String::new(),
    }
}

/// The most files in flight, and the most of them larger than one part, for
/// `upload.concurrency`: every small file that can be sent at once (one unit each, see
/// [`super::send_units`]) plus those read ahead (twice `concurrency`); large files as before,
/// four times `concurrency`, enough to keep `concurrency` parts going while files start and
/// finish, and few enough that a batch of large files finishes one file after another rather
/// than all at the end.
pub(super) fn files_in_flight(concurrency: usize) -> (usize, usize) {
    let files = concurrency * (UNITS_PER_PART as usize + 2);
    (files, concurrency * 4)
}

impl Uploader {
    /// Runs the scheduler until `cancel`; then lets files in flight finish for
    /// `upload.drain_secs` and abandons the rest (they resume at the next start).
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let (max_files, max_large) = files_in_flight(self.settings.config.upload.concurrency);
        let part_size = self.settings.part_size();
        let mut active: HashSet<i64> = HashSet::new();
        // Files in flight larger than one part.
        let mut large = 0usize;
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
                // In order: a large file waits for a large file's turn, and those after it too.
                if backlog
                    .front()
                    .is_some_and(|r| r.size > part_size && large >= max_large)
                {
                    break;
                }
                let Some(row) = backlog.pop_front() else {
                    break;
                };
                if active.insert(row.id) {
                    if row.size > part_size {
                        large += 1;
                    }
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
            // Copy-back waits while anything is due or in flight (see `copyback`).
            self.busy
                .store(!active.is_empty() || !backlog.is_empty(), Ordering::Relaxed);
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
                        if size > part_size {
                            large = large.saturating_sub(1);
                        }
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
            let mut row = row;
            let result = self.upload_file(&mut row, &cancel).await;
            match &result {
                Ok(Outcome::Done) => self.failover.succeeded(row.store),
                Err(TaskError::Store(e)) => self.failover.failed(row.store, e),
                _ => {}
            }
            let reason = metrics_reason(&result);
            let outcome = match result {
                Ok(o) => o,
                Err(TaskError::Interrupted) => Outcome::Interrupted,
                Err(TaskError::Moved) => Outcome::Retry(String::new()),
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
                    metrics::upload_failure(&reason);
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
                Outcome::Retry(err) if err.is_empty() => {
                    // Failed over or back: start over on the other store at once.
                    let res = self
                        .journal
                        .write(Durability::Normal, move |c| {
                            journal::set_retry(c, id, generation, "moved to the other store", now)
                        })
                        .await;
                    if let Err(e) = res
                        && !journal::is_stale(&e)
                    {
                        warn!(error = %e, "cannot record the move");
                    }
                    self.wake.notify_one();
                }
                Outcome::Retry(err) => {
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    metrics::upload_retry(&reason);
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
}
