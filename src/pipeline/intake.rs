//! The intake: settled files into the journal. Each file gets its object key and goes through
//! the state machine's intake (a new row, a re-queued one, or nothing to do); a file whose key
//! cannot be rendered or is taken by another path is recorded as failed, without a key, until
//! `retry` (or the next automatic attempt) renders it again. Rows that became due wake the
//! uploader; a stored file still on disk goes to the deleter.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::upload::Uploader;
use super::watch::Settled;
use crate::journal::{self, Durability, Intake};
use crate::util::failpoint;
use crate::util::heartbeat::Heartbeat;

/// Takes settled files into the journal, many per transaction, until `cancel`.
pub async fn run(
    mut rx: mpsc::Receiver<Settled>,
    uploader: Arc<Uploader>,
    heartbeat: Arc<Heartbeat>,
    cancel: CancellationToken,
) {
    let journal = uploader.journal.clone();
    let settings = uploader.settings.clone();
    let (template, node) = (&settings.template, &settings.config.node.name);
    let delete_after_upload = settings.config.upload.delete_after_upload;
    let retry_wait = (settings.config.upload.failed_retry_secs * 1000.0) as i64;
    loop {
        heartbeat.beat();
        let first = tokio::select! {
            _ = cancel.cancelled() => break,
            f = rx.recv() => match f {
                Some(f) => f,
                None => break,
            },
            // Waiting for work is progress too (see `crate::service::health`).
            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
        };
        failpoint::stall("intake", &cancel).await;
        if cancel.is_cancelled() {
            break;
        }
        let mut batch = vec![first];
        while batch.len() < 512 {
            match rx.try_recv() {
                Ok(s) => batch.push(s),
                Err(_) => break,
            }
        }
        let items: Vec<(Settled, Result<String, String>)> = batch
            .into_iter()
            .map(|s| {
                let key = template.render(node, &s.rel);
                (s, key)
            })
            .collect();
        let res = journal
            .write(Durability::Normal, move |c| {
                let mut out = Vec::with_capacity(items.len());
                for (s, key) in items {
                    let r = match key {
                        Ok(key) => {
                            match journal::intake(
                                c,
                                &s.rel,
                                &key,
                                &s.identity,
                                delete_after_upload,
                            )? {
                                Intake::KeyCollision { other } => {
                                    let msg = format!(
                                        "object key {key:?} is already used by {}",
                                        other.display()
                                    );
                                    journal::intake_failed(
                                        c,
                                        &s.rel,
                                        "",
                                        &s.identity,
                                        &msg,
                                        journal::now_ms() + retry_wait,
                                    )?;
                                    Intake::Unchanged
                                }
                                other => other,
                            }
                        }
                        Err(msg) => {
                            journal::intake_failed(
                                c,
                                &s.rel,
                                "",
                                &s.identity,
                                &msg,
                                journal::now_ms() + retry_wait,
                            )?;
                            Intake::Unchanged
                        }
                    };
                    out.push((s, r));
                }
                Ok(out)
            })
            .await;
        match res {
            Ok(results) => {
                let mut woke = false;
                for (s, r) in results {
                    match r {
                        Intake::Queued { .. } => woke = true,
                        // Stored already: the deleter's queue takes it (waiting while it is full).
                        Intake::DeletePending { id, generation } => {
                            uploader
                                .delete_local(id, generation, &s.rel, &s.identity)
                                .await;
                        }
                        Intake::Unchanged | Intake::KeyCollision { .. } => {}
                    }
                }
                if woke {
                    uploader.wake.notify_one();
                }
            }
            // The files are still on disk: the next scan offers them again.
            Err(e) => warn!(error = %e, "cannot record settled files in the journal"),
        }
    }
}
