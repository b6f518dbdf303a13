//! Recovery: what a start does with what the last run left, before anything new is taken.
//!
//! - Stored files whose local copy is still there (a crash between the `uploaded` commit and
//!   the unlink) go to the deleter ([`finish_pending_deletes`]).
//! - Rows that were waiting to settle again go back to the watcher if their file is still
//!   there, or become `vanished` ([`settling_still_on_disk`], [`resettle`]).
//! - Multipart uploads this node left in the bucket without a journal row are aborted, where
//!   the store can list them (the primary, and the standby when there is one); only then do
//!   the uploader and copy-back start, so an upload they create is never taken for a stray
//!   one ([`abort_strays_then_upload`]). Uploads the journal lists in `abandoned_uploads` (a
//!   failover, an interrupted copy-back) are aborted by the failover loop once their store
//!   answers.
//!
//! Rows that were `uploading` need nothing: they are due, and resume from their parts.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::upload::Uploader;
use crate::journal::{self, Durability, Journal, JournalError, State, StoreId};
use crate::store::Store;
use crate::util::fs::Root;

/// Hands the deleter every stored file whose local copy may still be on disk.
pub async fn finish_pending_deletes(uploader: &Uploader) -> Result<(), JournalError> {
    if !uploader.settings.config.upload.delete_after_upload {
        return Ok(());
    }
    let rows = uploader
        .journal
        .read(|c| journal::in_state(c, State::Uploaded))
        .await?;
    for row in rows {
        if let Some(identity) = row.identity {
            uploader
                .delete_local(row.id, row.generation, &row.path, &identity)
                .await;
        }
    }
    Ok(())
}

/// The paths of `settling` rows whose file is still there; the others are recorded as
/// vanished.
pub async fn settling_still_on_disk(
    journal: &Journal,
    root: &Root,
) -> Result<Vec<PathBuf>, JournalError> {
    let settling = journal
        .read(|c| journal::in_state(c, State::Settling))
        .await?;
    let mut on_disk = Vec::new();
    for row in settling {
        if root.stat(&row.path).is_ok() {
            on_disk.push(row.path);
            continue;
        }
        let (id, generation) = (row.id, row.generation);
        journal
            .write(Durability::Normal, move |c| {
                journal::set_vanished(c, id, generation)
            })
            .await?;
    }
    Ok(on_disk)
}

/// Gives the watcher `paths` to settle again, each as the watcher makes room for it (it starts
/// after recovery, and its queue is bounded), until `cancel`.
pub async fn resettle(paths: Vec<PathBuf>, tx: mpsc::Sender<PathBuf>, cancel: CancellationToken) {
    for path in paths {
        tokio::select! {
            _ = cancel.cancelled() => return,
            sent = tx.send(path) => if sent.is_err() {
                return;
            },
        }
    }
}

/// Runs the uploader until `cancel`, and meanwhile aborts the multipart uploads under `prefix`
/// the journal does not know (on the primary, and on the standby when there is one); only then
/// may the uploader create or resume multipart uploads (a new one could be listed before its
/// id is recorded and taken for a stray) and copy-back start. Files sent as one PutObject go
/// at once: a backlog of small files does not wait for the listing's round trips. A store that
/// does not answer delays multipart uploads by at most one request timeout; a stop that comes
/// during the clean-up lets it finish within `upload.drain_secs` (it is a listing and a few
/// aborts, work in progress like an upload's last part), else the next start does it.
pub async fn abort_strays_then_upload(
    uploader: Arc<Uploader>,
    prefix: String,
    cancel: CancellationToken,
) {
    let drain = Duration::from_secs_f64(uploader.settings.config.upload.drain_secs);
    let cleanup_then_copy_back = async {
        let standby = async {
            if let Some(sb) = &uploader.standby {
                abort_stray_uploads(sb, StoreId::Standby, &uploader.journal, &prefix).await;
            }
        };
        let cleanup = async {
            tokio::join!(
                abort_stray_uploads(
                    &uploader.store,
                    StoreId::Primary,
                    &uploader.journal,
                    &prefix
                ),
                standby
            )
        };
        tokio::pin!(cleanup);
        tokio::select! {
            _ = cancel.cancelled() => {
                let _ = tokio::time::timeout(drain, &mut cleanup).await;
                return;
            }
            _ = &mut cleanup => {}
        }
        uploader.strays_checked();
        // Copy-back's uploads are never strays: it starts only now.
        uploader.clone().run_copy_back(cancel.clone()).await;
    };
    tokio::join!(uploader.clone().run(cancel.clone()), cleanup_then_copy_back);
}

/// Aborts multipart uploads under this node's prefix on `store` that the journal does not
/// know as uploads in progress (left by a crash between creating an upload and recording it,
/// or recorded in `abandoned_uploads` by a failover or an interrupted copy-back), and forgets
/// the `abandoned_uploads` records of that store whose upload is no longer there. Stores
/// without ListMultipartUploads (OSS's S3 API) skip this; a bucket lifecycle rule covers
/// strays there, and the failover loop aborts what `abandoned_uploads` lists.
async fn abort_stray_uploads(store: &Store, id: StoreId, journal: &Journal, prefix: &str) {
    let listed = match store.list_multipart_uploads(prefix).await {
        Ok(Some(l)) => l,
        Ok(None) => {
            info!(
                store = %id,
                "the store cannot list multipart uploads; rely on a lifecycle rule for stray ones"
            );
            return;
        }
        Err(e) => {
            warn!(store = %id, error = %e, "cannot list multipart uploads; stray ones are left to the lifecycle rule");
            return;
        }
    };
    let read = journal
        .read(move |c| {
            Ok((
                journal::open_upload_ids(c)?,
                journal::abandoned_uploads(c, id)?,
            ))
        })
        .await;
    let (known, abandoned): (HashSet<String>, Vec<(String, String)>) = match read {
        Ok(k) => k,
        Err(e) => {
            warn!(error = %e, "cannot read the journal to find stray uploads");
            return;
        }
    };
    let open: HashSet<&str> = listed.iter().map(|(_, u)| u.as_str()).collect();
    // Recorded as abandoned, but gone already (some servers answer the abort of a gone
    // upload with a refusal rather than NoSuchUpload: it would never be forgotten).
    let mut forget: Vec<String> = abandoned
        .iter()
        .filter(|(_, u)| !open.contains(u.as_str()))
        .map(|(_, u)| u.clone())
        .collect();
    for (key, upload_id) in &listed {
        if known.contains(upload_id) {
            continue;
        }
        match store.abort_multipart(key, upload_id).await {
            Ok(()) => {
                info!(store = %id, key = %key, upload_id = %upload_id, "aborted a multipart upload the journal does not know as in progress");
                forget.push(upload_id.clone());
            }
            Err(e) => {
                warn!(store = %id, key = %key, error = %e, "cannot abort a stray multipart upload")
            }
        }
    }
    if forget.is_empty() {
        return;
    }
    let res = journal
        .write(Durability::Normal, move |c| {
            for u in &forget {
                journal::forget_abandoned(c, id, u)?;
            }
            Ok(())
        })
        .await;
    if let Err(e) = res {
        warn!(error = %e, "cannot record the aborted uploads");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// More rows wait to settle again than the watcher's queue holds while it is not running
    /// yet: each is handed over as room appears, none is dropped.
    #[tokio::test]
    async fn every_settling_row_reaches_the_watcher() {
        let (tx, mut rx) = mpsc::channel(1024);
        let paths: Vec<PathBuf> = (0..1100).map(|i| PathBuf::from(format!("f{i}"))).collect();
        let feeding = tokio::spawn(resettle(paths.clone(), tx, CancellationToken::new()));
        // The watcher starts later.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut got = Vec::new();
        while let Some(p) = rx.recv().await {
            got.push(p);
        }
        feeding.await.unwrap();
        assert_eq!(got, paths);
    }
}
