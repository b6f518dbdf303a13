//! Copy-back (`storage.standby.copy_back = true`): once the primary answers again, the objects
//! stored on the standby while it failed are copied to it, oldest first, and their rows then
//! point at the primary.
//!
//! # One object
//!
//! 1. Claim the row (an upload task that takes the same row — its file changed and is queued
//!    again — stops the copy first, so an old copy never lands over a new upload), and read it
//!    again: still stored, on the standby, same generation.
//! 2. HEAD the standby: the object must be there with the journal's size (and CRC-64, where
//!    the standby reports one and the journal has it).
//! 3. Stream it: GET from the standby, relayed chunk by chunk into a PUT (an object of at most
//!    one part) or into the parts of a multipart upload on the primary (one ranged GET per
//!    part), never held in memory; the part size is the one uploads use
//!    (`upload.part_size_mib`, grown for huge objects). The bytes are hashed (MD5 per part and
//!    whole, CRC-64) as they pass.
//! 4. Check: a PUT carries the journal's MD5 as `Content-MD5` and its ETag must equal it; each
//!    part's ETag must equal the MD5 of the bytes relayed; before a multipart upload is
//!    completed the whole relay's MD5 (and CRC-64, where the journal has it) must be the
//!    journal's; the primary's CRC-64 (`x-oss-hash-crc64ecma`, where it sends one) must be the
//!    object's; a HEAD of the primary must show the journal's size.
//! 5. One transaction: the row points at the primary ([`journal::move_stored`], only if it is
//!    still the row that was copied), and the copy's multipart upload, completed, is forgotten.
//!
//! The standby's object stays: the daemon never deletes objects (a lifecycle rule on the
//! standby bucket removes them later, README "A standby store").
//!
//! # Its share of the link
//!
//! Copy-back moves one object at a time, one part at a time, and only while the upload queue
//! is empty (no due row, no file in flight): before each object and each part it waits for
//! that; a part already on the wire finishes. Its requests take the send permits of
//! `upload.concurrency` like any part, wait for `upload.windows`, and its bytes go through
//! the `upload.max_bytes_per_sec` limit shared with uploads. New recordings therefore never
//! wait for more than one part of copy-back.
//!
//! # Failover and crashes
//!
//! Copy-back runs only while uploads go to the primary; when failover becomes active it stops
//! at once (the request in flight is dropped). A multipart upload it opens on the primary is
//! recorded in `abandoned_uploads` before its first part is sent and forgotten when the row
//! moves; a copy that stops aborts it. After a SIGKILL the record remains, and the failover
//! loop aborts the upload once the primary answers ([`super::Uploader::run_failover`]); in
//! the running process the failover loop leaves the uploads copy-back holds alone
//! ([`CopyBack::holds`]).

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use aws_smithy_types::body::SdkBody;
use bytes::Bytes;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{Uploader, part_size_for};
use crate::journal::{self, Durability, FileRow, JournalError, StoreId};
use crate::service::metrics;
use crate::store::{self, Body, ErrorKind, StoreError};
use crate::util::keys::SOURCE_META;
use crate::util::md5pair::Md5Pair;
use crate::util::throttle::Bandwidth;

/// Copy-back's key for the send slots: after every file's (see `crate::util::turns`), so a
/// recording that arrives while a copy waits for a slot goes first.
const COPY_PRIORITY: i64 = i64::MAX;

/// Rows read from the journal at a time.
const BATCH: usize = 64;
/// How often a waiting copy-back looks again at the queue and the failover state.
const TURN_POLL: Duration = Duration::from_millis(100);
/// Attempts at one part before the copy of the object is given up (and tried again later).
const PART_TRIES: u32 = 5;
/// How long a stopped copy waits for the abort of its multipart upload (else the failover
/// loop aborts it later, from the journal).
const ABORT_WAIT: Duration = Duration::from_secs(5);

/// What copy-back shares with the upload tasks and the failover loop.
#[derive(Debug, Default)]
pub struct CopyBack {
    /// The row being copied, with the token that stops its copy.
    current: Mutex<Option<(i64, CancellationToken)>>,
    /// The multipart uploads copy-back has open on the primary in this process.
    uploads: Mutex<HashSet<String>>,
    /// Files this process stored on the standby: copy-back reads the journal again only when
    /// this changed since a read found nothing to copy (the query scans the stored rows).
    stored_on_standby: AtomicU64,
}

impl CopyBack {
    /// Whether `upload_id` is a multipart upload copy-back has open now (listed in
    /// `abandoned_uploads` only in case the process dies).
    pub fn holds(&self, upload_id: &str) -> bool {
        self.uploads
            .lock()
            .map(|u| u.contains(upload_id))
            .unwrap_or(false)
    }

    fn hold(&self, upload_id: &str) {
        if let Ok(mut u) = self.uploads.lock() {
            u.insert(upload_id.to_string());
        }
    }

    fn release(&self, upload_id: &str) {
        if let Ok(mut u) = self.uploads.lock() {
            u.remove(upload_id);
        }
    }

    /// A file was stored on the standby.
    pub fn stored_on_standby(&self) {
        self.stored_on_standby.fetch_add(1, Ordering::Relaxed);
    }

    fn copying(&self) -> Option<(i64, CancellationToken)> {
        self.current.lock().ok().and_then(|c| c.clone())
    }
}

/// The claim on the row being copied; cleared when dropped.
struct Claim<'a>(&'a CopyBack);

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if let Ok(mut c) = self.0.current.lock() {
            *c = None;
        }
    }
}

/// Why a copy did not happen.
#[derive(Debug)]
enum CopyError {
    /// Failed over, shutting down, or the row was taken by an upload: not an error.
    Stopped,
    /// A request to that store failed.
    Store(StoreId, StoreError),
    /// This object cannot be copied as it is (missing on the standby, other bytes than the
    /// journal's, no MD5 recorded): tried again after `upload.failed_retry_secs`.
    Object(String),
    Journal(JournalError),
}

impl From<JournalError> for CopyError {
    fn from(e: JournalError) -> Self {
        CopyError::Journal(e)
    }
}

/// What a relayed body saw.
#[derive(Clone)]
struct Seen {
    bytes: u64,
    /// MD5 of the current part and of everything relayed since the first part.
    md5: Md5Pair,
    crc: crc64fast::Digest,
    /// The source failed (or ended early, or sent too much): the request failed because of
    /// the standby, not the primary.
    source_error: Option<String>,
}

/// A request body relayed from another store's GET: hashed and paced (the bandwidth limit)
/// as it passes, one chunk at a time, and exactly `expect` bytes or an error.
struct Relay {
    inner: Pin<Box<SdkBody>>,
    expect: u64,
    /// Bytes handed to the request so far.
    sent: u64,
    seen: Arc<Mutex<Seen>>,
    limit: Option<Arc<Bandwidth>>,
    /// A chunk waiting for its tokens of the bandwidth limit.
    pacing: Option<(JoinHandle<()>, Bytes)>,
}

impl Relay {
    /// The request body relaying `inner`, and what it saw (read once the request is over).
    fn body(
        inner: SdkBody,
        expect: u64,
        md5: Md5Pair,
        crc: crc64fast::Digest,
        limit: Option<Arc<Bandwidth>>,
    ) -> (Body, Arc<Mutex<Seen>>) {
        let seen = Arc::new(Mutex::new(Seen {
            bytes: 0,
            md5,
            crc,
            source_error: None,
        }));
        let relay = Relay {
            inner: Box::pin(inner),
            expect,
            sent: 0,
            seen: seen.clone(),
            limit,
            pacing: None,
        };
        let body = Body::Stream {
            body: SdkBody::from_body_1_x(relay),
            len: expect,
        };
        (body, seen)
    }

    fn source_failed(&self, msg: String) -> std::io::Error {
        if let Ok(mut s) = self.seen.lock() {
            s.source_error.get_or_insert(msg.clone());
        }
        std::io::Error::other(msg)
    }
}

impl http_body::Body for Relay {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        loop {
            if let Some((handle, _)) = this.pacing.as_mut() {
                if Pin::new(handle).poll(cx).is_pending() {
                    return Poll::Pending;
                }
                if let Some((_, data)) = this.pacing.take() {
                    this.sent += data.len() as u64;
                    return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
                }
            }
            let frame = match this.inner.as_mut().poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    let got = this.seen.lock().map(|s| s.bytes).unwrap_or(0);
                    if got < this.expect {
                        let e = this.source_failed(format!(
                            "the standby's body ended after {got} of {} bytes",
                            this.expect
                        ));
                        return Poll::Ready(Some(Err(e)));
                    }
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(e))) => {
                    let e = this.source_failed(format!("reading from the standby: {e}"));
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            // Trailers of the GET are not part of the object.
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if data.is_empty() {
                continue;
            }
            let n = data.len() as u64;
            let over = match this.seen.lock() {
                Ok(mut s) if s.bytes + n <= this.expect => {
                    s.bytes += n;
                    s.md5.update(&data);
                    s.crc.write(&data);
                    false
                }
                _ => true,
            };
            if over {
                let e = this.source_failed(format!(
                    "the standby sent more than the {} bytes announced",
                    this.expect
                ));
                return Poll::Ready(Some(Err(e)));
            }
            match &this.limit {
                Some(limit) => {
                    let limit = limit.clone();
                    let handle = tokio::task::spawn_blocking(move || limit.wait_blocking(n));
                    this.pacing = Some((handle, data));
                }
                None => {
                    this.sent += n;
                    return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
                }
            }
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.expect.saturating_sub(self.sent))
    }
}

impl Uploader {
    /// Whether copy-back is configured (a standby with `copy_back = true`).
    fn copy_back_enabled(&self) -> bool {
        self.standby.is_some()
            && self
                .settings
                .config
                .storage
                .standby
                .as_ref()
                .is_some_and(|s| s.copy_back)
    }

    /// An upload task is about to take row `id`: a copy-back of that row stops first (its
    /// file changed and is uploaded again; the old copy must not land over the new object).
    pub(super) async fn stop_copy_back_of(&self, id: i64) {
        let Some((copying, token)) = self.copy_back.copying() else {
            return;
        };
        if copying != id {
            return;
        }
        info!("the file's stored object was being copied back; stopping that copy");
        token.cancel();
        while self
            .copy_back
            .copying()
            .is_some_and(|(copying, _)| copying == id)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Copies the standby's objects to the primary until `cancel` (see the module
    /// documentation). Runs only with `storage.standby.copy_back = true`.
    pub async fn run_copy_back(self: Arc<Self>, cancel: CancellationToken) {
        if !self.copy_back_enabled() {
            return;
        }
        let idle = Duration::from_secs_f64(self.settings.config.storage.probe_secs);
        let rest = Duration::from_secs_f64(self.settings.config.upload.failed_retry_secs);
        let mut backoff = self.backoff();
        // Rows that cannot be copied as they are, and when to try them again.
        let mut resting: HashMap<i64, Instant> = HashMap::new();
        let mut announced = false;
        // `stored_on_standby` when the journal last had nothing to copy (`None`: read it).
        let mut nothing_since: Option<u64> = None;
        loop {
            if cancel.is_cancelled() {
                return;
            }
            // Failed over: nothing to do until the primary answers again.
            if self.failover.is_active() {
                if sleep_or_cancel(idle.min(Duration::from_secs(1)), &cancel).await {
                    return;
                }
                continue;
            }
            let stored = self.copy_back.stored_on_standby.load(Ordering::Relaxed);
            if nothing_since == Some(stored) {
                if sleep_or_cancel(idle, &cancel).await {
                    return;
                }
                continue;
            }
            let batch = match self.copy_back_batch(resting.len()).await {
                Ok(b) => b,
                Err(e) => {
                    warn!(error = %e, "copy-back cannot read the journal");
                    if sleep_or_cancel(backoff.next_delay(), &cancel).await {
                        return;
                    }
                    continue;
                }
            };
            let (mut pending, rows) = batch;
            metrics::copy_back_pending(pending);
            nothing_since = pending.eq(&0).then_some(stored);
            let now = Instant::now();
            resting.retain(|_, until| *until > now);
            let rows: Vec<FileRow> = rows
                .into_iter()
                .filter(|r| !resting.contains_key(&r.id))
                .collect();
            if rows.is_empty() {
                if announced && pending == 0 {
                    info!("copy-back: every object stored on the standby is on the primary now");
                    announced = false;
                }
                if sleep_or_cancel(idle, &cancel).await {
                    return;
                }
                continue;
            }
            for row in rows {
                if !self.copy_back_turn(&cancel).await {
                    break;
                }
                if !announced {
                    info!(
                        objects = pending,
                        "copy-back: copying the objects stored on the standby to the primary"
                    );
                    announced = true;
                }
                let span = info_span!("copy_back", path = %row.path.display(), key = %row.key, size = row.size);
                let res = self.copy_one(&row, &cancel).instrument(span.clone()).await;
                let wait = span.in_scope(|| match res {
                    Ok(moved) => {
                        backoff = self.backoff();
                        if moved {
                            pending = pending.saturating_sub(1);
                            metrics::copy_back_pending(pending);
                        }
                        None
                    }
                    Err(CopyError::Stopped) => None,
                    Err(CopyError::Object(msg)) => {
                        warn!(error = %msg, retry_in_secs = rest.as_secs_f64(), "copy-back cannot copy this object; it stays on the standby and keeps playing from there");
                        resting.insert(row.id, Instant::now() + rest);
                        None
                    }
                    Err(CopyError::Store(store, e)) => {
                        self.failover.failed(store, &e);
                        let delay = backoff.next_delay();
                        warn!(error = %e, store = %store, retry_in_ms = delay.as_millis() as u64, "copy-back failed; will retry");
                        Some(delay)
                    }
                    Err(CopyError::Journal(e)) => {
                        let delay = backoff.next_delay();
                        warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "copy-back cannot write the journal; will retry");
                        Some(delay)
                    }
                });
                if let Some(delay) = wait {
                    if sleep_or_cancel(delay, &cancel).await {
                        return;
                    }
                    break;
                }
            }
        }
    }

    /// The number of objects on the standby, and the oldest of them (more than [`BATCH`]
    /// when `skip` of them are resting).
    async fn copy_back_batch(&self, skip: usize) -> Result<(u64, Vec<FileRow>), JournalError> {
        self.journal
            .read(move |c| {
                let rows = journal::stored_on(c, StoreId::Standby, BATCH + skip)?;
                if rows.is_empty() {
                    return Ok((0, rows));
                }
                let (_, on_standby) = journal::stored_per_store(c)?;
                Ok((on_standby, rows))
            })
            .await
    }

    /// Waits for copy-back's turn: uploads to the primary (not failed over) and nothing in
    /// the upload queue. `false` when cancelled or failed over.
    async fn copy_back_turn(&self, stop: &CancellationToken) -> bool {
        loop {
            if stop.is_cancelled() || self.failover.is_active() {
                return false;
            }
            if !self.busy.load(Ordering::Relaxed) {
                return true;
            }
            if sleep_or_cancel(TURN_POLL, stop).await {
                return false;
            }
        }
    }

    /// Resolves when a copy must stop: `stop` fired or failover became active.
    async fn copy_stopping(&self, stop: &CancellationToken) {
        while !self.failover.is_active() {
            if sleep_or_cancel(TURN_POLL, stop).await {
                return;
            }
        }
    }

    /// Copies one object; `Ok(true)` when its row now points at the primary, `Ok(false)` when
    /// the row changed meanwhile (nothing recorded).
    async fn copy_one(&self, row: &FileRow, cancel: &CancellationToken) -> Result<bool, CopyError> {
        let stop = cancel.child_token();
        if let Ok(mut c) = self.copy_back.current.lock() {
            *c = Some((row.id, stop.clone()));
        }
        let _claim = Claim(&self.copy_back);
        // Read again once claimed: an upload task that took the row before the claim has
        // moved it out of the stored states.
        let id = row.id;
        let row = match self.journal.read(move |c| journal::get(c, id)).await? {
            Some(now)
                if now.state.is_stored()
                    && now.store == StoreId::Standby
                    && now.generation == row.generation =>
            {
                now
            }
            _ => return Err(CopyError::Stopped),
        };
        let md5 = row
            .md5
            .as_deref()
            .and_then(|h| hex::decode(h).ok())
            .and_then(|v| <[u8; 16]>::try_from(v).ok())
            .ok_or_else(|| CopyError::Object("the journal has no MD5 for it".into()))?;
        let standby = self.store_of(StoreId::Standby);
        let info = match standby.head(&row.key).await {
            Ok(Some(i)) => i,
            Ok(None) => return Err(CopyError::Object("the standby does not hold it".into())),
            Err(e) => return Err(CopyError::Store(StoreId::Standby, e)),
        };
        if info.size != row.size {
            return Err(CopyError::Object(format!(
                "the standby holds {} bytes under its key, the journal {}",
                info.size, row.size
            )));
        }
        if let (Some(got), Some(want)) = (info.crc64, row.crc64)
            && got != want
        {
            return Err(CopyError::Object(format!(
                "the standby's CRC-64 is {got}, the journal's {want}"
            )));
        }
        let mut meta = vec![("md5", hex::encode(md5))];
        if let Some(tag) = info.metadata.get(SOURCE_META) {
            meta.push((SOURCE_META, tag.clone()));
        }
        let started = Instant::now();
        let part_size = part_size_for(row.size, self.settings.part_size());
        let upload_id = if row.size <= part_size {
            self.copy_single(&row, &md5, &meta, &stop).await?;
            None
        } else {
            Some(
                self.copy_multipart(&row, &md5, &meta, part_size, &stop)
                    .await?,
            )
        };
        crate::util::failpoint::hit("copy-back-before-move");
        let (r, uid) = (row.clone(), upload_id.clone());
        let res = self
            .journal
            .write(Durability::Normal, move |c| {
                if let Some(u) = &uid {
                    journal::forget_abandoned(c, StoreId::Primary, u)?;
                }
                journal::move_stored(c, &r, StoreId::Standby, StoreId::Primary)
            })
            .await;
        if let Some(u) = &upload_id {
            self.copy_back.release(u);
        }
        let moved = res?;
        if moved {
            metrics::copy_back_copied();
            info!(
                bytes = row.size,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "copied back to the primary; the row points at it (the standby keeps its copy)"
            );
        } else {
            info!("the row changed while its object was copied back; left as it is");
        }
        Ok(moved)
    }

    /// An object of at most one part: GET from the standby relayed into one PUT.
    async fn copy_single(
        &self,
        row: &FileRow,
        md5: &[u8; 16],
        meta: &[(&str, String)],
        stop: &CancellationToken,
    ) -> Result<(), CopyError> {
        let permit = self
            .acquire(COPY_PRIORITY, row.size, stop)
            .await
            .map_err(|_| CopyError::Stopped)?;
        let (body, len) = self
            .store_of(StoreId::Standby)
            .get_stream(&row.key, None)
            .await
            .map_err(|e| CopyError::Store(StoreId::Standby, e))?;
        if len != row.size {
            return Err(CopyError::Object(format!(
                "the standby answers {len} bytes, the journal has {}",
                row.size
            )));
        }
        let (body, seen) = Relay::body(
            body,
            row.size,
            Md5Pair::new(),
            crc64fast::Digest::new(),
            self.limit.clone(),
        );
        let res = tokio::select! {
            _ = self.copy_stopping(stop) => return Err(CopyError::Stopped),
            r = self.store.put_object(&row.key, &row.path, body, md5, row.crc64, meta) => r,
        };
        drop(permit);
        let seen = seen
            .lock()
            .map(|s| s.clone())
            .map_err(|_| CopyError::Object("relay state lost".into()))?;
        if seen.bytes == row.size && seen.md5.finish_whole() != *md5 {
            return Err(CopyError::Object(format!(
                "the standby's bytes are not the journal's (MD5 {}, the journal's {})",
                hex::encode(seen.md5.finish_whole()),
                hex::encode(md5)
            )));
        }
        match res {
            Ok(_) => {}
            Err(e) if seen.source_error.is_some() => {
                return Err(CopyError::Store(StoreId::Standby, e));
            }
            Err(e) => return Err(CopyError::Store(StoreId::Primary, e)),
        }
        self.failover.succeeded(StoreId::Primary);
        metrics::copy_back_bytes(row.size);
        self.verify_copy(row, seen.crc.sum64()).await
    }

    /// A larger object: a multipart upload on the primary, recorded before its first part,
    /// each part relayed from a ranged GET of the standby. Returns the completed upload's id
    /// (still recorded: the caller forgets it with the row's move). A copy that fails or
    /// stops aborts its upload.
    async fn copy_multipart(
        &self,
        row: &FileRow,
        md5: &[u8; 16],
        meta: &[(&str, String)],
        part_size: u64,
        stop: &CancellationToken,
    ) -> Result<String, CopyError> {
        let uid = tokio::select! {
            _ = self.copy_stopping(stop) => return Err(CopyError::Stopped),
            r = self.store.create_multipart(&row.key, &row.path, meta) => {
                r.map_err(|e| CopyError::Store(StoreId::Primary, e))?
            }
        };
        self.copy_back.hold(&uid);
        let (k, u) = (row.key.clone(), uid.clone());
        let recorded = self
            .journal
            .write(Durability::Normal, move |c| {
                journal::record_abandoned(c, StoreId::Primary, &k, &u)
            })
            .await;
        if let Err(e) = recorded {
            if let Err(e) = self.store.abort_multipart(&row.key, &uid).await {
                warn!(upload_id = %uid, error = %e, "cannot abort copy-back's unrecorded multipart upload");
            }
            self.copy_back.release(&uid);
            return Err(e.into());
        }
        crate::util::failpoint::hit("copy-back-after-create");
        match self.copy_parts(row, md5, &uid, part_size, stop).await {
            Ok(()) => Ok(uid),
            Err(e) => {
                self.abort_copy_upload(&row.key, &uid).await;
                Err(e)
            }
        }
    }

    /// Aborts copy-back's upload `uid` (briefly: a failing primary leaves it to the failover
    /// loop, which aborts what `abandoned_uploads` lists) and forgets it.
    async fn abort_copy_upload(&self, key: &str, uid: &str) {
        match tokio::time::timeout(ABORT_WAIT, self.store.abort_multipart(key, uid)).await {
            Ok(Ok(())) => {
                let u = uid.to_string();
                if let Err(e) = self
                    .journal
                    .write(Durability::Normal, move |c| {
                        journal::forget_abandoned(c, StoreId::Primary, &u)
                    })
                    .await
                {
                    warn!(error = %e, "cannot record the abort of copy-back's upload");
                }
                debug!(upload_id = %uid, "aborted copy-back's multipart upload");
            }
            Ok(Err(e)) => {
                debug!(upload_id = %uid, error = %e, "cannot abort copy-back's upload now; it stays recorded")
            }
            Err(_) => {
                debug!(upload_id = %uid, "no answer to the abort of copy-back's upload; it stays recorded")
            }
        }
        self.copy_back.release(uid);
    }

    /// Relays the parts in order, each after copy-back's turn came (nothing waiting in the
    /// upload queue), then checks the whole and completes the upload.
    async fn copy_parts(
        &self,
        row: &FileRow,
        md5: &[u8; 16],
        uid: &str,
        part_size: u64,
        stop: &CancellationToken,
    ) -> Result<(), CopyError> {
        let n_parts = row.size.div_ceil(part_size);
        let mut pair = Md5Pair::new();
        let mut crc = crc64fast::Digest::new();
        let mut parts: Vec<(i32, String)> = Vec::new();
        for n in 1..=n_parts {
            if !self.copy_back_turn(stop).await {
                return Err(CopyError::Stopped);
            }
            let offset = (n - 1) * part_size;
            let len = part_size.min(row.size - offset);
            let mut backoff = self.backoff();
            let mut tries = 0;
            let (etag, seen) = loop {
                let permit = self
                    .acquire(COPY_PRIORITY, len, stop)
                    .await
                    .map_err(|_| CopyError::Stopped)?;
                let got = self
                    .relay_part(row, uid, n as i32, offset, len, &pair, &crc, stop)
                    .await;
                drop(permit);
                match got {
                    Ok(x) => break x,
                    Err(CopyError::Store(store, e))
                        if e.is_retryable() && tries + 1 < PART_TRIES =>
                    {
                        tries += 1;
                        self.failover.failed(store, &e);
                        let delay = backoff.next_delay();
                        debug!(part_number = n, error = %e, retry_in_ms = delay.as_millis() as u64, "copy-back part failed; retrying");
                        if self.failover.is_active() || sleep_or_cancel(delay, stop).await {
                            return Err(CopyError::Stopped);
                        }
                    }
                    Err(e) => return Err(e),
                }
            };
            pair = seen.md5;
            crc = seen.crc;
            parts.push((n as i32, etag));
            self.failover.succeeded(StoreId::Primary);
            metrics::copy_back_bytes(len);
            crate::util::failpoint::hit("copy-back-after-part");
        }
        let whole = pair.finish_whole();
        if whole != *md5 {
            return Err(CopyError::Object(format!(
                "the standby's bytes are not the journal's (MD5 {}, the journal's {})",
                hex::encode(whole),
                hex::encode(md5)
            )));
        }
        let crc = crc.sum64();
        if let Some(want) = row.crc64
            && crc != want
        {
            return Err(CopyError::Object(format!(
                "the standby's bytes are not the journal's (CRC-64 {crc}, the journal's {want})"
            )));
        }
        let stored = tokio::select! {
            _ = self.copy_stopping(stop) => return Err(CopyError::Stopped),
            r = self.store.complete_multipart(&row.key, uid, &parts) => {
                r.map_err(|e| CopyError::Store(StoreId::Primary, e))?
            }
        };
        store::check_crc64("CompleteMultipartUpload", stored.crc64, crc)
            .map_err(|e| CopyError::Store(StoreId::Primary, e))?;
        crate::util::failpoint::hit("copy-back-after-complete");
        self.verify_copy(row, crc).await
    }

    /// One part: a ranged GET of the standby relayed into UploadPart; the part's ETag must be
    /// the MD5 of the bytes relayed. Returns the ETag and what the relay saw (the hashes
    /// carried on from `pair` and `crc`).
    #[allow(clippy::too_many_arguments)]
    async fn relay_part(
        &self,
        row: &FileRow,
        uid: &str,
        number: i32,
        offset: u64,
        len: u64,
        pair: &Md5Pair,
        crc: &crc64fast::Digest,
        stop: &CancellationToken,
    ) -> Result<(String, Seen), CopyError> {
        let (body, got) = self
            .store_of(StoreId::Standby)
            .get_stream(&row.key, Some((offset, len)))
            .await
            .map_err(|e| CopyError::Store(StoreId::Standby, e))?;
        if got != len {
            return Err(CopyError::Object(format!(
                "the standby answers {got} bytes for a part of {len}"
            )));
        }
        let (body, seen) = Relay::body(body, len, pair.clone(), crc.clone(), self.limit.clone());
        let res = tokio::select! {
            _ = self.copy_stopping(stop) => return Err(CopyError::Stopped),
            r = self.store.upload_part_streamed(&row.key, uid, number, body) => r,
        };
        let mut seen = seen
            .lock()
            .map(|s| s.clone())
            .map_err(|_| CopyError::Object("relay state lost".into()))?;
        let etag = match res {
            Ok(etag) => etag,
            Err(e) if seen.source_error.is_some() => {
                return Err(CopyError::Store(StoreId::Standby, e));
            }
            Err(e) => return Err(CopyError::Store(StoreId::Primary, e)),
        };
        if seen.bytes != len {
            return Err(CopyError::Store(
                StoreId::Standby,
                StoreError::new(
                    "GetObject",
                    ErrorKind::Transient,
                    format!("relayed {} of {len} bytes", seen.bytes),
                ),
            ));
        }
        let part_md5 = seen.md5.finish_part();
        let etag = self
            .store
            .check_etag("UploadPart", Some(&etag), &part_md5)
            .map_err(|e| CopyError::Store(StoreId::Primary, e))?;
        Ok((etag, seen))
    }

    /// HEAD of the copy on the primary: the journal's size, and the CRC-64 of the bytes
    /// relayed where the primary reports one.
    async fn verify_copy(&self, row: &FileRow, crc: u64) -> Result<(), CopyError> {
        match self.store.head(&row.key).await {
            Ok(Some(info)) if info.size != row.size => Err(CopyError::Store(
                StoreId::Primary,
                StoreError::new(
                    "HeadObject",
                    ErrorKind::Corrupt,
                    format!(
                        "the copy on the primary has {} bytes, the journal {}",
                        info.size, row.size
                    ),
                ),
            )),
            Ok(Some(info)) => store::check_crc64("HeadObject", info.crc64, crc)
                .map_err(|e| CopyError::Store(StoreId::Primary, e)),
            Ok(None) => Err(CopyError::Store(
                StoreId::Primary,
                StoreError::new(
                    "HeadObject",
                    ErrorKind::Transient,
                    "the copy is not on the primary after it was stored",
                ),
            )),
            Err(e) => Err(CopyError::Store(StoreId::Primary, e)),
        }
    }
}

/// Sleeps `d`; `true` when `cancel` fired first.
async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    async fn relay(data: &'static [u8], expect: u64) -> (Result<Vec<u8>, String>, Seen) {
        let limit = Bandwidth::new(64 * 1024 * 1024).map(Arc::new);
        let (body, seen) = Relay::body(
            SdkBody::from(Bytes::from_static(data)),
            expect,
            Md5Pair::new(),
            crc64fast::Digest::new(),
            limit,
        );
        let Body::Stream { body, len } = body else {
            panic!("not a stream");
        };
        assert_eq!(len, expect);
        let got = aws_sdk_s3::primitives::ByteStream::new(body)
            .collect()
            .await
            .map(|b| b.into_bytes().to_vec())
            .map_err(|e| e.to_string());
        let seen = seen.lock().unwrap().clone();
        (got, seen)
    }

    /// The bytes pass unchanged, hashed (MD5, CRC-64) on the way; a source shorter or longer
    /// than announced fails the body and is blamed on the source.
    #[tokio::test]
    async fn a_relay_hashes_what_passes_and_refuses_the_wrong_length() {
        let data: &'static [u8] = b"123456789";
        let (got, seen) = relay(data, 9).await;
        assert_eq!(got.unwrap(), data);
        assert_eq!(seen.bytes, 9);
        assert_eq!(seen.md5.finish_whole(), crate::util::md5pair::md5(data));
        assert_eq!(seen.crc.sum64(), 0x995d_c9bb_df19_39fa);
        assert!(seen.source_error.is_none());

        let (got, seen) = relay(data, 10).await;
        assert!(got.is_err());
        assert!(seen.source_error.unwrap().contains("ended after 9 of 10"));

        let (got, seen) = relay(data, 8).await;
        assert!(got.is_err());
        assert!(seen.source_error.unwrap().contains("more than"));
    }
}
