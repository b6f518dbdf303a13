//! A file of more than one part: a multipart upload, resumed from the journal when it has one.
//!
//! The upload id is committed before the first part is sent, and each part once the store
//! acknowledged it with the ETag of its bytes, so a restart carries on from the parts the
//! store holds. Parts are read (and hashed, with the whole file) in order, and sent
//! concurrently, each under a permit of `upload.concurrency`.

use std::collections::HashMap;
use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::hash::Crc64;
use super::{Backoff, TaskError, Uploader};
use crate::journal::{self, Durability, FileRow, PartRow};
use crate::store::{self, ErrorKind, FileRange, StoreError};
use crate::util::fs::Identity;
use crate::util::keys::{SOURCE_META, source_tag};
use crate::util::md5pair::Md5Pair;
use crate::util::turns::Turn;

/// What ListParts said about an upload being resumed.
enum Listing {
    Parts(Vec<store::ListedPart>),
    /// Gone (aborted, expired, or completed elsewhere).
    Gone,
    /// The answer could not be used: resume from the journal's parts.
    Unknown,
}

/// The multipart upload the journal records for `row`, when it can be resumed: it belongs to
/// the row's generation (this version of the file) and was cut into parts of `part_size`.
fn resumable(row: &FileRow, part_size: u64) -> Option<&str> {
    match (&row.upload_id, row.upload_generation, row.part_size) {
        (Some(uid), Some(g), Some(ps)) if g == row.generation && ps == part_size => Some(uid),
        _ => None,
    }
}

/// One file's multipart upload, shared by the tasks that send its parts.
struct Upload {
    row: FileRow,
    file: Arc<File>,
    identity: Identity,
    upload_id: String,
}

/// Parts a file has read and hashed ahead of the one being sent (one waiting for a slot, one
/// more queued behind it).
const HASH_AHEAD: usize = 2;

/// A part read and hashed, ready to be sent.
#[derive(Debug, Clone, Copy)]
struct Part {
    number: i32,
    offset: u64,
    len: u64,
    md5: [u8; 16],
}

impl Uploader {
    /// A multipart upload, resumed from the journal when it has one. Returns the MD5 (hex) and
    /// the CRC-64 of the whole file.
    ///
    /// Some servers answer requests for an upload they no longer have with `AccessDenied`
    /// instead of `NoSuchUpload` (s3s-fs does, e.g. after a completion cut short by a crash).
    /// When that happens on an upload resumed from the journal, the upload is dropped and the
    /// file starts over at its next attempt; a real permission problem then shows at once on
    /// the new upload's first request and fails the file as it should.
    pub(super) async fn put_multipart(
        self: &Arc<Self>,
        row: &FileRow,
        file: &Arc<File>,
        identity: &Identity,
        part_size: u64,
        cancel: &CancellationToken,
    ) -> Result<(String, u64), TaskError> {
        let resumed = resumable(row, part_size).map(str::to_string);
        let res = self
            .send_multipart(row, file, identity, part_size, cancel)
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
                if let Err(e) = self
                    .store_of(row.store)
                    .abort_multipart(&row.key, &resumed)
                    .await
                {
                    debug!(error = %e, "abort of the refused upload failed");
                }
                self.forget_upload(row).await?;
                Err(TaskError::Store(StoreError::new(
                    e.op,
                    ErrorKind::Transient,
                    format!("resumed upload refused ({}); starting over", e.message),
                )))
            }
            other => other,
        }
    }

    async fn send_multipart(
        self: &Arc<Self>,
        row: &FileRow,
        file: &Arc<File>,
        identity: &Identity,
        part_size: u64,
        cancel: &CancellationToken,
    ) -> Result<(String, u64), TaskError> {
        let size = identity.size;
        let n_parts = size.div_ceil(part_size);
        let mut backoff = self.backoff();

        let mut done: HashMap<i32, PartRow> = HashMap::new();
        let resumed = match resumable(row, part_size) {
            Some(uid) => {
                if self
                    .stored_object(row, identity, &mut backoff, cancel)
                    .await?
                    .is_some()
                {
                    // Completed before a crash, not recorded: only the MD5 is missing.
                    info!("multipart upload was completed before a restart; not sending it again");
                    let mut crc = Crc64::new();
                    let (_, pair) = self
                        .hash_range(file, 0, size, Md5Pair::new(), &mut crc)
                        .await?;
                    return Ok((hex::encode(pair.finish_whole()), crc.sum()));
                }
                self.resume(row, uid, n_parts, &mut done, &mut backoff, cancel)
                    .await?
            }
            None => {
                if let Some(uid) = &row.upload_id {
                    // Part size changed (configuration): that upload cannot go on.
                    if let Err(e) = self
                        .store_of(row.store)
                        .abort_multipart(&row.key, uid)
                        .await
                    {
                        warn!(error = %e, "cannot abort the old multipart upload");
                    }
                }
                None
            }
        };
        let upload_id = match resumed {
            Some(u) => u,
            None => {
                self.create(row, identity, part_size, &mut backoff, cancel)
                    .await?
            }
        };
        let upload = Arc::new(Upload {
            row: row.clone(),
            file: file.clone(),
            identity: *identity,
            upload_id,
        });
        let (md5_hex, crc64) = self
            .send_parts(&upload, part_size, &mut done, cancel)
            .await?;
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
        self.complete(&upload, &parts, crc64, &mut backoff, cancel)
            .await?;
        crate::util::failpoint::hit("after-complete");
        Ok((md5_hex, crc64))
    }

    /// Carries on with the upload `uid` the journal records: the parts both the journal and
    /// the store hold go into `done`. `None` when the upload is gone and a new one is needed.
    async fn resume(
        &self,
        row: &FileRow,
        uid: &str,
        n_parts: u64,
        done: &mut HashMap<i32, PartRow>,
        backoff: &mut Backoff,
        cancel: &CancellationToken,
    ) -> Result<Option<String>, TaskError> {
        let id = row.id;
        let recorded = {
            let uid = uid.to_string();
            self.journal
                .read(move |c| journal::parts(c, id, &uid))
                .await?
        };
        let listed = loop {
            match self.store_of(row.store).list_parts(&row.key, uid).await {
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
                Err(e) => self.pause(row, backoff, &e, cancel).await?,
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
            }
            Listing::Gone => {
                info!(upload_id = %uid, "multipart upload is gone; starting again");
                if let Err(e) = self
                    .store_of(row.store)
                    .abort_multipart(&row.key, uid)
                    .await
                {
                    debug!(error = %e, "abort of a vanished upload failed");
                }
                self.forget_upload(row).await?;
                return Ok(None);
            }
        }
        info!(upload_id = %uid, parts_done = done.len(), parts = n_parts, "resuming multipart upload");
        Ok(Some(uid.to_string()))
    }

    /// Creates a new upload and commits its id before the first part is sent, so the upload
    /// is never unknown.
    async fn create(
        &self,
        row: &FileRow,
        identity: &Identity,
        part_size: u64,
        backoff: &mut Backoff,
        cancel: &CancellationToken,
    ) -> Result<String, TaskError> {
        let (id, generation) = (row.id, row.generation);
        let uid = loop {
            let meta = [(SOURCE_META, source_tag(generation, identity))];
            match self
                .store_of(row.store)
                .create_multipart(&row.key, &row.path, &meta)
                .await
            {
                Ok(u) => break u,
                Err(e) if e.is_retryable() => self.pause(row, backoff, &e, cancel).await?,
                Err(e) => return Err(e.into()),
            }
        };
        crate::util::failpoint::hit("after-create");
        let u = uid.clone();
        let res = self
            .journal
            .write(Durability::Normal, move |c| {
                journal::start_upload(c, id, generation, Some(&u), part_size)
            })
            .await;
        if let Err(e) = res {
            let _ = self
                .store_of(row.store)
                .abort_multipart(&row.key, &uid)
                .await;
            return Err(e.into());
        }
        Ok(uid)
    }

    /// Reads the parts in order (hashing them and the whole file) and sends those not in
    /// `done` concurrently; every part sent goes into `done`. Returns the whole file's MD5
    /// (hex) and CRC-64.
    ///
    /// Hashing runs in a task of its own up to [`HASH_AHEAD`] parts ahead of the part waiting
    /// for its turn to be sent, so when a slot frees up the oldest file in flight (which the
    /// slots go to first) has a part ready for it instead of letting a younger file's part in
    /// while it hashes.
    async fn send_parts(
        self: &Arc<Self>,
        upload: &Arc<Upload>,
        part_size: u64,
        done: &mut HashMap<i32, PartRow>,
        cancel: &CancellationToken,
    ) -> Result<(String, u64), TaskError> {
        let (tx, mut ready) = mpsc::channel::<Part>(HASH_AHEAD - 1);
        // A JoinSet, so the hashing stops if this attempt is dropped.
        let mut hashing: JoinSet<Result<(String, u64), TaskError>> = JoinSet::new();
        {
            let (me, upload, cancel) = (self.clone(), upload.clone(), cancel.clone());
            hashing.spawn(async move { me.hash_parts(&upload, part_size, tx, &cancel).await });
        }
        let mut senders: JoinSet<Result<PartRow, TaskError>> = JoinSet::new();
        let mut failure: Option<TaskError> = None;
        while let Some(part) = ready.recv().await {
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
            if let Some(p) = done.get(&part.number) {
                if p.md5 == hex::encode(part.md5) && p.size == part.len {
                    continue;
                }
                // The file no longer matches what was sent.
                return Err(TaskError::Changed);
            }
            let permit = self.acquire(upload.row.id, part.len, cancel).await?;
            let (me, upload, cancel) = (self.clone(), upload.clone(), cancel.clone());
            senders.spawn(async move { me.send_part(&upload, part, permit, &cancel).await });
        }
        // After a failure the hashing has nobody to hand parts to: it stops.
        drop(ready);
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
        let hashed = match hashing.join_next().await {
            Some(Ok(r)) => r,
            Some(Err(e)) => Err(TaskError::Io(e.to_string())),
            None => Err(TaskError::Io("hash state lost".into())),
        };
        if let Some(e) = failure {
            return Err(e);
        }
        hashed
    }

    /// Reads and hashes the parts in order, handing each to `ready` (at most [`HASH_AHEAD`]
    /// parts ahead of the sender); a turn of `prepared` for each. Returns the whole file's
    /// MD5 (hex) and CRC-64 once every part is hashed.
    async fn hash_parts(
        &self,
        upload: &Upload,
        part_size: u64,
        ready: mpsc::Sender<Part>,
        cancel: &CancellationToken,
    ) -> Result<(String, u64), TaskError> {
        let size = upload.identity.size;
        let mut pair = Md5Pair::new();
        let mut crc = Crc64::new();
        for n in 1..=size.div_ceil(part_size) {
            let offset = (n - 1) * part_size;
            let len = part_size.min(size - offset);
            // Room to hand the part on first, then a turn to read and hash it.
            let room = ready.reserve().await.map_err(|_| TaskError::Interrupted)?;
            let prepared = self.prepare(upload.row.id, cancel).await?;
            let (md5, p) = self
                .hash_range(&upload.file, offset, len, pair, &mut crc)
                .await?;
            pair = p;
            drop(prepared);
            room.send(Part {
                number: n as i32,
                offset,
                len,
                md5,
            });
        }
        Ok((hex::encode(pair.finish_whole()), crc.sum()))
    }

    /// Sends one part (again, after transient errors) and commits it once the store
    /// acknowledged it with the ETag of its bytes.
    async fn send_part(
        &self,
        upload: &Upload,
        part: Part,
        permit: Turn,
        cancel: &CancellationToken,
    ) -> Result<PartRow, TaskError> {
        let row = &upload.row;
        let mut backoff = self.backoff();
        let mut permit = Some(permit);
        loop {
            let held = match permit.take() {
                Some(p) => p,
                None => self.acquire(row.id, part.len, cancel).await?,
            };
            let body = FileRange {
                file: upload.file.clone(),
                offset: part.offset,
                len: part.len,
                limit: self.limit.clone(),
            };
            let res = tokio::select! {
                _ = cancel.cancelled() => return Err(TaskError::Interrupted),
                r = self.store_of(row.store).upload_part(&row.key, &upload.upload_id, part.number, body, &part.md5) => r,
            };
            drop(held);
            match res {
                Ok(etag) => {
                    crate::util::failpoint::hit("after-part");
                    self.stats.bytes_sent.fetch_add(part.len, Ordering::Relaxed);
                    let recorded = PartRow {
                        part_number: part.number,
                        offset: part.offset,
                        size: part.len,
                        md5: hex::encode(part.md5),
                        etag,
                    };
                    let (id, generation) = (row.id, row.generation);
                    let (p, uid) = (recorded.clone(), upload.upload_id.clone());
                    self.journal
                        .write(Durability::Normal, move |c| {
                            journal::record_part(c, id, generation, &uid, &p)
                        })
                        .await?;
                    crate::util::failpoint::hit("after-part-committed");
                    return Ok(recorded);
                }
                Err(e) if e.kind == ErrorKind::NoSuchUpload => return Err(e.into()),
                Err(e) if e.is_retryable() => {
                    self.check_unchanged(&row.path, &upload.file, &upload.identity)?;
                    if e.kind == ErrorKind::Corrupt {
                        warn!(part_number = part.number, error = %e, "part arrived damaged; sending it again");
                    }
                    self.pause(row, &mut backoff, &e, cancel).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Joins the parts. A completion whose answer was lost or unreadable is checked by HEAD
    /// before it is tried again; one the store refuses ends this upload (a new one follows).
    async fn complete(
        &self,
        upload: &Upload,
        parts: &[(i32, String)],
        crc64: u64,
        backoff: &mut Backoff,
        cancel: &CancellationToken,
    ) -> Result<(), TaskError> {
        let (row, identity, upload_id) = (&upload.row, &upload.identity, &upload.upload_id);
        loop {
            match self
                .store_of(row.store)
                .complete_multipart(&row.key, upload_id, parts)
                .await
            {
                Ok(stored) => {
                    if let Err(e) =
                        store::check_crc64("CompleteMultipartUpload", stored.crc64, crc64)
                    {
                        // The object is there, but not this file's bytes: send it again (a new
                        // upload overwrites it); it is never recorded as stored.
                        self.forget_upload(row).await?;
                        return Err(e.into());
                    }
                    return Ok(());
                }
                Err(e) if e.kind == ErrorKind::NoSuchUpload => {
                    // Completed by an attempt whose answer was lost, or gone: if the object is
                    // not this file, start over.
                    if let Some(obj) = self.stored_object(row, identity, backoff, cancel).await? {
                        return self.accept_completed(row, upload_id, obj, crc64).await;
                    }
                    self.forget_upload(row).await?;
                    return Err(TaskError::Store(e));
                }
                Err(e) if e.kind == ErrorKind::RestartUpload => {
                    // The store will not join these parts: that upload is of no more use.
                    warn!(upload_id = %upload_id, error = %e, "the store refuses to complete the upload; starting a new one");
                    if let Err(e) = self
                        .store_of(row.store)
                        .abort_multipart(&row.key, upload_id)
                        .await
                    {
                        warn!(error = %e, "cannot abort the refused upload");
                    }
                    self.forget_upload(row).await?;
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
                        && let Some(obj) =
                            self.stored_object(row, identity, backoff, cancel).await?
                    {
                        warn!(upload_id = %upload_id, error = %e, "completion answer unusable, but the object is this file; accepting it");
                        return self.accept_completed(row, upload_id, obj, crc64).await;
                    }
                    self.pause(row, backoff, &e, cancel).await?
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Forgets the row's multipart upload in the journal (its parts with it).
    async fn forget_upload(&self, row: &FileRow) -> Result<(), TaskError> {
        let id = row.id;
        self.journal
            .write(Durability::Normal, move |c| journal::clear_upload(c, id))
            .await?;
        Ok(())
    }

    /// What HEAD says of the object at the row's key when it is this exact file (size and
    /// source metadata, e.g. completed just before a crash); `None` when there is no object or
    /// another one.
    async fn stored_object(
        &self,
        row: &FileRow,
        identity: &Identity,
        backoff: &mut Backoff,
        cancel: &CancellationToken,
    ) -> Result<Option<store::ObjectInfo>, TaskError> {
        let tag = source_tag(row.generation, identity);
        loop {
            match self.store_of(row.store).head(&row.key).await {
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
        if let Err(e) = store::check_crc64("HeadObject", obj.crc64, crc64) {
            self.forget_upload(row).await?;
            return Err(e.into());
        }
        if let Err(e) = self
            .store_of(row.store)
            .abort_multipart(&row.key, upload_id)
            .await
        {
            debug!(error = %e, "abort after an accepted completion failed");
        }
        Ok(())
    }
}
