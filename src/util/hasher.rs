//! The uploader's MD5s, run several at a time on one thread.
//!
//! An MD5 is one long dependency chain, so a core runs it far below what its execution units
//! could do; [`compress_lanes`] runs up to eight independent chains in vector registers for
//! about the price of one (`cargo bench --bench md5pair`; figures in the README's
//! Benchmarks). Upload tasks send their whole
//! blocks here — a small file's bytes, or a 512 KiB chunk of a part with its part and whole-file
//! states — and whatever is waiting at the same moment is run side by side.
//!
//! Holding fewer jobs than it has lanes, the thread waits a moment ([`GATHER`] at most) for
//! more when more are likely: a caller announces its digest ([`Hasher::announce`]) before it
//! reads the bytes; the last batch had company (several files are being hashed); or the job
//! is a small file's, short enough that the wait costs little. Otherwise it runs at once: a
//! lone large file is hashed as fast as on the caller's thread. Without the wait, parts of
//! several files ran in two lanes much of the time (what it saved: README, Benchmarks).
//!
//! Work in flight is bounded by the callers (each waits for its answer). If the thread could
//! not be started, or has stopped, the same work runs on the caller's blocking pool instead.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

use tokio::sync::oneshot;

use crate::util::md5pair::{LANES, Md5Pair, Single, compress_lanes};

/// Blocks run for the waiting jobs before new arrivals are let in (256 KiB).
const STEP_BLOCKS: usize = 4096;

/// The longest the thread waits for announced digests before it runs what it has. Files and
/// parts are read and hashed ahead of their request while earlier ones are sent, so the wait
/// costs no throughput.
const GATHER: std::time::Duration = std::time::Duration::from_millis(3);
/// Slices of that wait, between looks at whether anyone is still on the way.
const GATHER_SLICE: std::time::Duration = std::time::Duration::from_micros(200);

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
    /// Digests announced and not submitted yet.
    coming: Arc<AtomicUsize>,
}

/// A digest on its way: counted while its caller reads the bytes, until it is submitted (or
/// the caller gives up).
pub struct Announced(Option<Arc<AtomicUsize>>);

impl Announced {
    /// No announcement (the thread will not wait for this caller).
    #[cfg(test)]
    pub fn none() -> Announced {
        Announced(None)
    }
}

impl Drop for Announced {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Hasher {
    /// Starts the thread (named `md5`); it ends when the handle is dropped.
    pub fn start() -> Hasher {
        let (tx, rx) = mpsc::channel();
        let coming = Arc::new(AtomicUsize::new(0));
        let seen = coming.clone();
        let spawned = std::thread::Builder::new()
            .name("md5".into())
            .spawn(move || serve(rx, &seen));
        match spawned {
            Ok(_) => Hasher {
                tx: Some(tx),
                coming,
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the hashing thread; hashing on the blocking pool");
                Hasher { tx: None, coming }
            }
        }
    }

    /// A handle without a thread: every digest runs on the blocking pool (what happens when
    /// the thread cannot be started).
    #[cfg(test)]
    pub fn inline() -> Hasher {
        Hasher {
            tx: None,
            coming: Arc::default(),
        }
    }

    /// Announces a digest the caller is about to submit (call it before reading the bytes).
    pub fn announce(&self) -> Announced {
        self.coming.fetch_add(1, Ordering::Relaxed);
        Announced(Some(self.coming.clone()))
    }

    /// Runs `states[..lanes]` over `buf[..len]` (whole blocks); hands `buf` back.
    async fn run(
        &self,
        buf: Vec<u8>,
        len: usize,
        states: [[u32; 4]; 2],
        lanes: usize,
        announced: Announced,
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
                    // Submitted: no longer on its way.
                    drop(announced);
                    return answer
                        .await
                        .map_err(|_| HashError("the hashing thread ended".into()));
                }
                Err(mpsc::SendError(job)) => job,
            },
            None => job,
        };
        drop(announced);
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

    /// The MD5 of all of `buf`; hands `buf` back. `announced`: see [`Hasher::announce`].
    pub async fn md5(
        &self,
        buf: Vec<u8>,
        announced: Announced,
    ) -> Result<([u8; 16], Vec<u8>), HashError> {
        let mut single = Single::new();
        let aligned = buf.len() / 64 * 64;
        let init = single.aligned_state().unwrap_or_default();
        let (buf, states) = self.run(buf, aligned, [init; 2], 1, announced).await?;
        if !single.advance_aligned(states[0], aligned as u64) {
            return Err(HashError("hash state out of step".into()));
        }
        single.update(&buf[aligned..]);
        Ok((single.finish(), buf))
    }

    /// Feeds `buf[..len]` to `pair` (the current part and the whole file); hands both back.
    /// `announced`: see [`Hasher::announce`].
    pub async fn update_pair(
        &self,
        mut pair: Md5Pair,
        buf: Vec<u8>,
        len: usize,
        announced: Announced,
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
        let (buf, states) = self.run(buf, aligned, states, 2, announced).await?;
        if !pair.advance_aligned(states, aligned as u64) {
            return Err(HashError("hash state out of step".into()));
        }
        pair.update(&buf[aligned..len]);
        Ok((pair, buf))
    }
}

/// The thread: takes every job waiting, runs them side by side a step at a time, answers
/// each as it completes, and lets newcomers in between steps. `coming` counts announced
/// digests not submitted yet.
fn serve(rx: mpsc::Receiver<Job>, coming: &AtomicUsize) {
    // (job, bytes done)
    let mut active: Vec<(Job, usize)> = Vec::new();
    // Whether the last batch found company: digests then come from several callers at once.
    let mut crowd = false;
    loop {
        if active.is_empty() {
            match rx.recv() {
                Ok(job) => {
                    // A small file's digest is short: worth a moment's wait whatever comes.
                    let small = job.lanes == 1;
                    active.push((job, 0));
                    // Lanes to spare and digests on their way (announced, or likely, since
                    // the last batch had company): wait a little for them.
                    let until = std::time::Instant::now() + GATHER;
                    while active.iter().map(|(j, _)| j.lanes).sum::<usize>() < LANES
                        && (small || crowd || coming.load(Ordering::Relaxed) > 0)
                    {
                        let left = until.saturating_duration_since(std::time::Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        match rx.recv_timeout(left.min(GATHER_SLICE)) {
                            Ok(job) => active.push((job, 0)),
                            Err(mpsc::RecvTimeoutError::Timeout) => {}
                            Err(mpsc::RecvTimeoutError::Disconnected) => break,
                        }
                    }
                    while let Ok(job) = rx.try_recv() {
                        active.push((job, 0));
                    }
                    crowd = active.len() > 1;
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
    use crate::util::md5pair::tests::{data, reference};

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
                    let (sum, back) = h.md5(d.clone(), h.announce()).await.unwrap();
                    assert_eq!(sum, reference(&d), "file of {len}");
                    assert_eq!(back, d);
                    // Two parts of 128 KiB and a tail, in chunks of 40 KiB + 64 B.
                    let file = data(2 * 131_072 + 1000 + t, t as u64 + 99);
                    let mut pair = Md5Pair::new();
                    let mut parts = Vec::new();
                    for part in file.chunks(131_072) {
                        for chunk in part.chunks(41_024) {
                            let (p, _) = h
                                .update_pair(pair, chunk.to_vec(), chunk.len(), h.announce())
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
            .update_pair(pair, file[..100].to_vec(), 100, Announced::none())
            .await
            .unwrap();
        pair = p;
        assert_eq!(pair.finish_part(), reference(&file[..100]));
        let (p, _) = h
            .update_pair(pair, file[100..].to_vec(), 900, Announced::none())
            .await
            .unwrap();
        pair = p;
        assert_eq!(pair.finish_part(), reference(&file[100..]));
        assert_eq!(pair.finish_whole(), reference(&file));
    }
}
