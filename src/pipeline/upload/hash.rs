//! Reading and hashing what is sent: MD5s of parts and of the whole file on the hashing
//! thread (`crate::util::hasher`), the whole file's CRC-64 on the reading thread while the
//! bytes are in cache.

use std::fs::File;
use std::sync::Arc;

use super::{TaskError, Uploader};
use crate::util::md5pair::Md5Pair;

/// Read size while hashing. Up to `2 × upload.concurrency` parts are hashed at once, each
/// holding one such buffer: 512 KiB keeps that at 4 MiB with the defaults (1 MiB cost 3 MiB
/// more peak RSS on 8 × 256 MiB and no measurable CPU; README, "Memory.").
const HASH_CHUNK: u64 = 512 * 1024;

/// The whole file's CRC-64/XZ, fed in file order alongside the MD5s.
pub(super) struct Crc64(pub(super) crc64fast::Digest);

impl Crc64 {
    pub(super) fn new() -> Crc64 {
        Crc64(crc64fast::Digest::new())
    }

    pub(super) fn sum(&self) -> u64 {
        self.0.sum64()
    }
}

impl Uploader {
    /// Hashes `len` bytes at `offset` as one part of `pair` (which also keeps the whole
    /// file's MD5) and into `crc` (the whole file's CRC-64, computed on the reading thread while
    /// the bytes are in cache); checks the bytes are all there. Returns the part's MD5.
    pub(super) async fn hash_range(
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
}
