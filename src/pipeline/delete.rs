//! The deleter: removes the local copies of stored files.
//!
//! A local file may be unlinked only once its `uploaded` row is on disk for good, or a power
//! cut right after the unlink could leave a journal that forgot the file was stored. The
//! uploader commits `uploaded` without waiting for the disk; the deleter takes the files to
//! remove in batches and, before unlinking any of them, makes one durable commit that carries
//! every earlier commit to the disk with it. One flush per batch instead of one per file keeps
//! small files fast.
//!
//! Each file is unlinked only if the path is still the very file that was uploaded (same
//! device, inode, size and mtime); otherwise it is kept and, having changed, is uploaded again
//! once it settles. Parents of removed files go to the pruner.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::UploadStats;
use crate::journal::{self, Durability, Journal};
use crate::util::fs::{Identity, Root, UnlinkOutcome};

/// A stored file whose local copy is to be removed.
#[derive(Debug, Clone)]
pub struct DeleteJob {
    pub id: i64,
    pub generation: i64,
    pub rel: PathBuf,
    pub identity: Identity,
}

/// Most files removed behind one durable commit.
const BATCH: usize = 256;

/// How long the first file of a batch waits for others before the durable commit, while
/// other files are being uploaded: when many small files are stored one after another, one
/// flush then covers many of them instead of one or two (the flush of a journal on a virtual
/// disk costs more CPU than the rest of a 256 KiB file's journal work). Well inside the
/// latency the pipeline promises. A file stored while no other is in flight (a recording
/// host's usual case, and the last file of a batch) does not wait: nothing would join it.
const GATHER: std::time::Duration = std::time::Duration::from_millis(20);

pub async fn run(
    mut rx: mpsc::Receiver<DeleteJob>,
    journal: Journal,
    root: Arc<Root>,
    prune: mpsc::Sender<PathBuf>,
    stats: Arc<UploadStats>,
    cancel: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            _ = cancel.cancelled() => break,
            j = rx.recv() => match j {
                Some(j) => j,
                None => break,
            },
        };
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        // The gauge still counts the upload that sent the last job (it is updated when the
        // scheduler sees the task end), so "one" can mean none besides it; a stale higher
        // count only means waiting as before.
        let others_in_flight = stats.in_flight.files.load(Ordering::Relaxed) > 1;
        let until = tokio::time::Instant::now() + GATHER;
        while others_in_flight && batch.len() < BATCH {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep_until(until) => break,
                j = rx.recv() => match j {
                    Some(j) => batch.push(j),
                    None => break,
                },
            }
        }
        // Everything committed so far reaches the disk with this commit.
        if let Err(e) = journal.write(Durability::Sync, journal::barrier).await {
            warn!(error = %e, files = batch.len(), "cannot make the journal durable; local files are kept for now");
            continue;
        }
        let removed = {
            let root = root.clone();
            let batch = batch.clone();
            tokio::task::spawn_blocking(move || {
                batch
                    .into_iter()
                    .filter_map(|job| match root.unlink_if_same(&job.rel, &job.identity) {
                        Ok(UnlinkOutcome::Removed | UnlinkOutcome::Gone) => {
                            crate::util::failpoint::hit("after-unlink");
                            Some(job)
                        }
                        Ok(UnlinkOutcome::Changed(_)) => {
                            info!(path = %job.rel.display(), "file changed after it was stored; kept, and it will be uploaded again");
                            None
                        }
                        Err(e) => {
                            warn!(path = %job.rel.display(), error = %e, "cannot delete the uploaded file; will try again at the next scan");
                            None
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default()
        };
        if removed.is_empty() {
            continue;
        }
        let rows: Vec<(i64, i64)> = removed.iter().map(|j| (j.id, j.generation)).collect();
        let res = journal
            .write(Durability::Normal, move |c| {
                let mut n = 0u64;
                for (id, generation) in rows {
                    match journal::set_deleted(c, id, generation) {
                        Ok(()) => n += 1,
                        // Re-queued meanwhile (a new file at the same path): nothing to record.
                        Err(e) if journal::is_stale(&e) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(n)
            })
            .await;
        match res {
            Ok(n) => {
                stats.files_deleted.fetch_add(n, Ordering::Relaxed);
            }
            // The rows stay `uploaded`; the files are gone, which the next start records.
            Err(e) => warn!(error = %e, "cannot record deletions"),
        }
        for job in removed {
            debug!(path = %job.rel.display(), "local copy deleted");
            if let Some(parent) = job.rel.parent()
                && !parent.as_os_str().is_empty()
            {
                let _ = prune.try_send(parent.to_path_buf());
            }
        }
    }
    debug!("deleter stopped");
}
