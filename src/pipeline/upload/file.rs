//! One file's way from the disk to the bucket (the steps of the module documentation of
//! `super`), and what happens when the file changes or goes away meanwhile.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{Outcome, TaskError, Uploader, part_size_for};
use crate::journal::{self, Durability, FileRow, JournalError, Rekey, State, StoreId};
use crate::service::metrics;
use crate::util::fs::Identity;

impl Uploader {
    pub(super) async fn upload_file(
        self: &Arc<Self>,
        row: &mut FileRow,
        cancel: &CancellationToken,
    ) -> Result<Outcome, TaskError> {
        // Its former stored object may be being copied back: that copy stops first.
        self.stop_copy_back_of(row.id).await;
        if let Some(refused) = self.take_current_key(row).await? {
            return Ok(refused);
        }
        if row.key.is_empty() {
            // Recorded without a usable key (see the row's error): nothing to upload to.
            return Ok(Outcome::Failed(
                row.last_error
                    .clone()
                    .unwrap_or_else(|| "no object key for this file".to_string()),
            ));
        }
        self.take_target_store(row).await?;
        let row: &FileRow = row;
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
        let part_size = part_size_for(identity.size, self.settings.part_size());
        let single = identity.size <= part_size;
        // Nothing touches a multipart upload before the start's stray clean-up is over.
        if !single || row.upload_id.is_some() {
            self.after_stray_check(cancel).await?;
        }

        // An upload id from an older generation of the file is of no use.
        if row.upload_id.is_some() && row.upload_generation != Some(row.generation) {
            self.abort_recorded_upload(row).await;
            let id = row.id;
            self.journal
                .write(Durability::Normal, move |c| journal::clear_upload(c, id))
                .await?;
        }

        let started = Instant::now();
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
        if !single && let Some(retry) = self.verify_multipart(row, &identity, crc64, cancel).await?
        {
            return Ok(retry);
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
        if row.store == StoreId::Standby {
            self.copy_back.stored_on_standby();
        }
        self.stats.files_uploaded.fetch_add(1, Ordering::Relaxed);
        metrics::upload_complete(identity.size, started.elapsed());
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

    /// An attempt goes to the store uploads go to now ([`super::Failover`]). A row whose upload
    /// was on the other store starts over: its open multipart upload there is recorded as
    /// abandoned (aborted once that store answers) and forgotten, in one transaction.
    async fn take_target_store(&self, row: &mut FileRow) -> Result<(), TaskError> {
        let target = self.failover.target();
        if row.store == target {
            return Ok(());
        }
        let (id, generation) = (row.id, row.generation);
        let moved = self
            .journal
            .write(Durability::Normal, move |c| {
                journal::set_upload_store(c, id, generation, target)
            })
            .await?;
        if !moved {
            return Err(TaskError::Journal(JournalError::Invalid(
                "stale set_upload_store".into(),
            )));
        }
        info!(from = %row.store, to = %target, "the file's upload starts over on the other store");
        row.store = target;
        row.upload_id = None;
        row.upload_generation = None;
        row.bytes_sent = 0;
        Ok(())
    }

    /// A failed row being tried again takes the key its path renders to now: one recorded
    /// without a key (it collided, or the template could not render it) or under a template
    /// changed since is mended here, as `record-offload retry` mends it. `Some(outcome)` when
    /// the row still cannot have a key.
    async fn take_current_key(&self, row: &mut FileRow) -> Result<Option<Outcome>, TaskError> {
        if row.state != State::Failed {
            return Ok(None);
        }
        let key = match self
            .settings
            .template
            .render(&self.settings.config.node.name, &row.path)
        {
            Ok(k) => k,
            Err(e) => return Ok(Some(Outcome::Failed(e))),
        };
        if key == row.key {
            return Ok(None);
        }
        // An upload under the old key is of no use to the new one.
        self.abort_recorded_upload(&self.with_current_upload(row).await)
            .await;
        let (id, generation, k) = (row.id, row.generation, key.clone());
        let done = self
            .journal
            .write(Durability::Normal, move |c| {
                journal::set_key(c, id, generation, &k)
            })
            .await?;
        match done {
            Rekey::Done => {
                info!(key = %key, "the file's object key is now what the key template renders");
                row.key = key;
                row.upload_id = None;
                row.upload_generation = None;
                Ok(None)
            }
            Rekey::InUse { other } => Ok(Some(Outcome::Failed(format!(
                "object key {key:?} is already used by {}",
                other.display()
            )))),
        }
    }

    /// Checks a completed multipart object by HEAD: its size must be the file's, and its
    /// CRC-64 too where the store reports one (OSS does), which checks the whole object end to
    /// end, not only part by part. `Some(retry)` when it is not this file.
    async fn verify_multipart(
        &self,
        row: &FileRow,
        identity: &Identity,
        crc64: u64,
        cancel: &CancellationToken,
    ) -> Result<Option<Outcome>, TaskError> {
        let mut backoff = self.backoff();
        loop {
            match self.store_of(row.store).head(&row.key).await {
                Ok(Some(info))
                    if info.size == identity.size && info.crc64.is_some_and(|c| c != crc64) =>
                {
                    let id = row.id;
                    self.journal
                        .write(Durability::Normal, move |c| journal::clear_upload(c, id))
                        .await?;
                    return Ok(Some(Outcome::Retry(format!(
                        "stored object's CRC-64 is {}, the file's {crc64}: the upload is damaged; sending it again",
                        info.crc64.unwrap_or_default()
                    ))));
                }
                Ok(Some(info)) if info.size == identity.size => return Ok(None),
                Ok(Some(info)) => {
                    return Ok(Some(Outcome::Retry(format!(
                        "stored object has {} bytes, the file {}",
                        info.size, identity.size
                    ))));
                }
                Ok(None) => {
                    return Ok(Some(Outcome::Retry(
                        "stored object not found after upload".into(),
                    )));
                }
                Err(e) if e.is_retryable() => self.pause(row, &mut backoff, &e, cancel).await?,
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub(super) async fn mark_changed(&self, row: &FileRow) -> Result<(), JournalError> {
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

    pub(super) async fn mark_vanished(&self, row: &FileRow) -> Result<(), JournalError> {
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
}
