//! A file of at most one part: one PutObject, its ETag (and CRC-64, where the store sends one)
//! checked against the file as the answer arrives.

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio_util::sync::CancellationToken;

use super::hash::Crc64;
use super::{TaskError, Uploader};
use crate::journal::FileRow;
use crate::store::{Body, FileRange};
use crate::util::fs::Identity;
use crate::util::keys::{SOURCE_META, source_tag};
use crate::util::md5pair::Md5Pair;

/// Objects up to this size are read into memory once, hashed and sent from there (their
/// bytes bounded by the units they hold, see [`super::send_units`]); larger ones are read
/// twice, never held.
const IN_MEMORY_MAX: u64 = 1024 * 1024;

impl Uploader {
    /// A file of at most one part: one PutObject. Returns the MD5 (hex). Files up to
    /// [`IN_MEMORY_MAX`] are read once and sent from memory; larger ones are hashed, then
    /// streamed from the file.
    pub(super) async fn put_small(
        &self,
        row: &FileRow,
        file: &Arc<File>,
        identity: &Identity,
        cancel: &CancellationToken,
    ) -> Result<(String, u64), TaskError> {
        let mut backoff = self.backoff();
        let prepared = self.prepare(row.id, cancel).await?;
        let size = identity.size;
        let mut crc = Crc64::new();
        // Under a bandwidth limit every body is streamed, so it can be paced.
        let (md5, data) = if size <= IN_MEMORY_MAX && self.limit.is_none() {
            let f = file.clone();
            let announced = self.hasher.announce();
            let (buf, digest) = tokio::task::spawn_blocking(move || -> Result<_, TaskError> {
                let buf = crate::util::fs::read_vec_at(&f, size as usize, 0)
                    .map_err(|e| TaskError::Io(format!("read: {e}")))?;
                if buf.len() < size as usize {
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
        let permit = self.acquire(row.id, size, cancel).await?;
        drop(prepared);
        let mut permit = Some(permit);
        let metadata = [
            ("md5", hex::encode(md5)),
            (SOURCE_META, source_tag(row.generation, identity)),
        ];
        loop {
            let held = match permit.take() {
                Some(p) => p,
                None => self.acquire(row.id, size, cancel).await?,
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
                r = self.store_of(row.store).put_object(&row.key, &row.path, body, &md5, Some(crc64), &metadata) => r,
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
}
