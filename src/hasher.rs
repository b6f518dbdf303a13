//! The uploader's MD5s, run several at a time on one thread.
//!
//! An MD5 is one long dependency chain, so a core runs it at about 0.5 GB/s whatever else it
//! could do; [`compress_lanes`] runs up to eight independent chains in vector registers for
//! about the price of one (`cargo bench --bench md5pair`). Upload tasks send their whole
//! blocks here — a small file's bytes, or a 1 MiB chunk of a part with its part and whole-file
//! states — and whatever is waiting at the same moment is run side by side. Only a small
//! file's digest that arrives alone waits a moment ([`GATHER`]) for company; anything else is
//! run at once, alone if need be, as fast as on the caller's thread.
//!
//! Work in flight is bounded by the callers (each waits for its answer). If the thread could
//! not be started, or has stopped, the same work runs on the caller's blocking pool instead.

use std::sync::mpsc;

use tokio::sync::oneshot;

use crate::md5pair::{LANES, Md5Pair, Single, compress_lanes};

/// Blocks run for the waiting jobs before new arrivals are let in (256 KiB).
const STEP_BLOCKS: usize = 4096;

/// How long a small file's digest, arriving alone, waits for others to run beside. Small
/// files are read and hashed ahead of their request while earlier ones are sent, so the wait
/// costs no throughput; a multipart chunk (two lanes) never waits.
const GATHER: std::time::Duration = std::time::Duration::from_millis(3);

/// Why a digest could not be computed.
#[derive(Debug, thiserror::Error)]
#[error("hashing stopped: {0}")]
pub struct HashError(String);

struct Job {
    buf: Vec<u8>,
    /// Bytes of `buf` to run: whole blocks.
    len: usize,
    /// 1 or 2 states over the same bytes.
    states: [[u32; 4]; 2],
    lanes: usize,
    reply: oneshot::Sender<(Vec<u8>, [[u32; 4]; 2])>,
}

/// Handle to the hashing thread; cheap to share behind an `Arc`.
pub struct Hasher {
    tx: Option<mpsc::Sender<Job>>,
}

impl Hasher {
    /// Starts the thread (named `md5`); it ends when the handle is dropped.
    pub fn start() -> Hasher {
        let (tx, rx) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("md5".into())
            .spawn(move || serve(rx));
        match spawned {
            Ok(_) => Hasher { tx: Some(tx) },
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the hashing thread; hashing on the blocking pool");
                Hasher { tx: None }
            }
        }
    }

    /// A handle without a thread: every digest runs on the blocking pool (what happens when
    /// the thread cannot be started).
    #[cfg(test)]
    pub fn inline() -> Hasher {
        Hasher { tx: None }
    }

    /// Runs `states[..lanes]` over `buf[..len]` (whole blocks); hands `buf` back.
    async fn run(
        &self,
        buf: Vec<u8>,
        len: usize,
        states: [[u32; 4]; 2],
        lanes: usize,
    ) -> Result<(Vec<u8>, [[u32; 4]; 2]), HashError> {
        let len = len.min(buf.len()) / 64 * 64;
        let lanes = lanes.clamp(1, 2);
        let (reply, answer) = oneshot::channel();
        let job = Job {
            buf,
            len,
            states,
            lanes,
            reply,
        };
        let job = match &self.tx {
            Some(tx) => match tx.send(job) {
                Ok(()) => {
                    return answer
                        .await
                        .map_err(|_| HashError("the hashing thread ended".into()));
                }
                Err(mpsc::SendError(job)) => job,
            },
            None => job,
        };
        tokio::task::spawn_blocking(move || {
            let mut job = job;
            let blocks = job.len / 64;
            let data = [&job.buf[..job.len], &job.buf[..job.len]];
            compress_lanes(&mut job.states[..job.lanes], &data[..job.lanes], blocks);
            (job.buf, job.states)
        })
        .await
        .map_err(|e| HashError(e.to_string()))
    }

    /// The MD5 of all of `buf`; hands `buf` back.
    pub async fn md5(&self, buf: Vec<u8>) -> Result<([u8; 16], Vec<u8>), HashError> {
        let mut single = Single::new();
        let aligned = buf.len() / 64 * 64;
        let init = single.aligned_state().unwrap_or_default();
        let (buf, states) = self.run(buf, aligned, [init; 2], 1).await?;
        if !single.advance_aligned(states[0], aligned as u64) {
            return Err(HashError("hash state out of step".into()));
        }
        single.update(&buf[aligned..]);
        Ok((single.finish(), buf))
    }

    /// Feeds `buf[..len]` to `pair` (the current part and the whole file); hands both back.
    pub async fn update_pair(
        &self,
        mut pair: Md5Pair,
        buf: Vec<u8>,
        len: usize,
    ) -> Result<(Md5Pair, Vec<u8>), HashError> {
        let len = len.min(buf.len());
        let Some(states) = pair.aligned_states() else {
            // A part that ended inside a block (never with whole-MiB parts): on its own.
            return tokio::task::spawn_blocking(move || {
                pair.update(&buf[..len]);
                (pair, buf)
            })
            .await
            .map_err(|e| HashError(e.to_string()));
        };
        let aligned = len / 64 * 64;
        let (buf, states) = self.run(buf, aligned, states, 2).await?;
        if !pair.advance_aligned(states, aligned as u64) {
            return Err(HashError("hash state out of step".into()));
        }
        pair.update(&buf[aligned..len]);
        Ok((pair, buf))
    }
}

/// The thread: takes every job waiting, runs them side by side a step at a time, answers
/// each as it completes, and lets newcomers in between steps.
fn serve(rx: mpsc::Receiver<Job>) {
    // (job, bytes done)
    let mut active: Vec<(Job, usize)> = Vec::new();
    loop {
        if active.is_empty() {
            match rx.recv() {
                Ok(job) => {
                    let alone = job.lanes == 1;
                    active.push((job, 0));
                    if alone {
                        let until = std::time::Instant::now() + GATHER;
                        while active.len() < LANES {
                            let left = until.saturating_duration_since(std::time::Instant::now());
                            match rx.recv_timeout(left) {
                                Ok(job) => active.push((job, 0)),
                                Err(_) => break,
                            }
                        }
                    }
                }
                Err(_) => return,
            }
        }
        while let Ok(job) = rx.try_recv() {
            active.push((job, 0));
        }
        let step = active
            .iter()
            .map(|(j, done)| (j.len - done) / 64)
            .min()
            .unwrap_or(0)
            .min(STEP_BLOCKS);
        if step > 0 {
            let mut states = Vec::with_capacity(active.len() * 2);
            let mut data: Vec<&[u8]> = Vec::with_capacity(active.len() * 2);
            for (job, done) in &active {
                for lane in 0..job.lanes {
                    states.push(job.states[lane]);
                    data.push(&job.buf[*done..job.len]);
                }
            }
            compress_lanes(&mut states, &data, step);
            drop(data);
            let mut next = states.into_iter();
            for (job, done) in active.iter_mut() {
                for lane in 0..job.lanes {
                    if let Some(s) = next.next() {
                        job.states[lane] = s;
                    }
                }
                *done += step * 64;
            }
        }
        let mut i = 0;
        while i < active.len() {
            if active[i].0.len - active[i].1 < 64 {
                let (job, _) = active.swap_remove(i);
                // The caller may have given up (cancelled); nothing to do then.
                let _ = job.reply.send((job.buf, job.states));
            } else {
                i += 1;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::md5pair::tests::{data, reference};

    /// Many files and multipart chunks hashed at once, of every alignment, on the thread and
    /// inline: every digest is right.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_digests_are_right() {
        for hasher in [
            std::sync::Arc::new(Hasher::start()),
            std::sync::Arc::new(Hasher::inline()),
        ] {
            let mut tasks = tokio::task::JoinSet::new();
            for t in 0..24usize {
                let h = hasher.clone();
                tasks.spawn(async move {
                    let len = [0, 1, 63, 64, 65, 4096, 300_000, 1 << 20][t % 8] + t;
                    let d = data(len, t as u64 + 1);
                    let (sum, back) = h.md5(d.clone()).await.unwrap();
                    assert_eq!(sum, reference(&d), "file of {len}");
                    assert_eq!(back, d);
                    // Two parts of 128 KiB and a tail, in chunks of 40 KiB + 64 B.
                    let file = data(2 * 131_072 + 1000 + t, t as u64 + 99);
                    let mut pair = Md5Pair::new();
                    let mut parts = Vec::new();
                    for part in file.chunks(131_072) {
                        for chunk in part.chunks(41_024) {
                            let (p, _) = h
                                .update_pair(pair, chunk.to_vec(), chunk.len())
                                .await
                                .unwrap();
                            pair = p;
                        }
                        parts.push(pair.finish_part());
                    }
                    assert_eq!(pair.finish_whole(), reference(&file));
                    for (k, part) in file.chunks(131_072).enumerate() {
                        assert_eq!(parts[k], reference(part));
                    }
                });
            }
            while let Some(r) = tasks.join_next().await {
                r.unwrap();
            }
        }
    }

    /// A part that ended inside a block leaves the pair unaligned: still right.
    #[tokio::test]
    async fn unaligned_parts_are_right() {
        let h = Hasher::start();
        let file = data(1000, 5);
        let mut pair = Md5Pair::new();
        let (p, _) = h
            .update_pair(pair, file[..100].to_vec(), 100)
            .await
            .unwrap();
        pair = p;
        assert_eq!(pair.finish_part(), reference(&file[..100]));
        let (p, _) = h
            .update_pair(pair, file[100..].to_vec(), 900)
            .await
            .unwrap();
        pair = p;
        assert_eq!(pair.finish_part(), reference(&file[100..]));
        assert_eq!(pair.finish_whole(), reference(&file));
    }
}
