//! Turns: a counting semaphore that serves its waiters by priority, the lowest key first (in
//! the order they asked within one key), instead of in the order they asked.
//!
//! The uploader keys every request by its file's journal id, so the oldest file in flight
//! gets the next free slot: the parts of a batch go out file by file, files complete one after
//! another while later ones are sent (the store's work to complete an upload overlaps the
//! transfer instead of piling up at the end of the batch), and a file is never overtaken by
//! files recorded after it. A waiter is served only when every waiter before it has been
//! (no barging), so a part that needs many units is not starved by small requests behind it.
//! Cancel-safe: a waiter dropped before its turn leaves the queue, one dropped after being
//! granted gives its units back.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// The semaphore. Share it in an `Arc`.
#[derive(Debug)]
pub struct Turns {
    total: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    available: usize,
    /// By (key, arrival).
    waiters: BTreeMap<(u64, u64), Waiter>,
    arrivals: u64,
}

#[derive(Debug)]
struct Waiter {
    units: usize,
    tx: oneshot::Sender<()>,
}

/// Units held; given back when dropped.
#[derive(Debug)]
pub struct Turn {
    turns: Arc<Turns>,
    units: usize,
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.turns.release(self.units);
    }
}

/// A waiter's place in the queue while its acquire future lives.
struct Waiting<'a> {
    turns: &'a Arc<Turns>,
    id: (u64, u64),
    units: usize,
    rx: Option<oneshot::Receiver<()>>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        let mut g = self.turns.lock();
        if g.waiters.remove(&self.id).is_some() {
            // Left the queue before its turn: those behind it may go now.
            Turns::grant(&mut g);
        } else if rx.try_recv().is_ok() {
            // Granted, but nobody took the units: give them back.
            g.available += self.units;
            Turns::grant(&mut g);
        }
    }
}

impl Turns {
    pub fn new(units: usize) -> Arc<Turns> {
        Arc::new(Turns {
            total: units,
            inner: Mutex::new(Inner {
                available: units,
                waiters: BTreeMap::new(),
                arrivals: 0,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves `Inner` consistent, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for `units` (at most the total) with priority `key`: lower keys first.
    pub async fn acquire(self: &Arc<Self>, key: u64, units: usize) -> Turn {
        let units = units.clamp(1, self.total.max(1));
        let (id, rx) = {
            let mut g = self.lock();
            let first = g.waiters.keys().next().is_none_or(|k| k.0 > key);
            if first && g.available >= units {
                g.available -= units;
                return Turn {
                    turns: self.clone(),
                    units,
                };
            }
            g.arrivals += 1;
            let id = (key, g.arrivals);
            let (tx, rx) = oneshot::channel();
            g.waiters.insert(id, Waiter { units, tx });
            (id, rx)
        };
        let mut waiting = Waiting {
            turns: self,
            id,
            units,
            rx: Some(rx),
        };
        if let Some(rx) = waiting.rx.as_mut() {
            // The sender lives in the queue until it is used, so this only ends in a grant.
            let _ = rx.await;
        }
        waiting.rx = None;
        Turn {
            turns: self.clone(),
            units,
        }
    }

    /// Units free now.
    pub fn available(&self) -> usize {
        self.lock().available
    }

    fn release(&self, units: usize) {
        let mut g = self.lock();
        g.available += units;
        Turns::grant(&mut g);
    }

    /// Serves the queue from its head while the head's units are free.
    fn grant(g: &mut Inner) {
        while let Some(entry) = g.waiters.first_entry() {
            if entry.get().units > g.available {
                break;
            }
            let w = entry.remove();
            g.available -= w.units;
            if w.tx.send(()).is_err() {
                g.available += w.units;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn lower_keys_go_first_whatever_the_order_they_asked_in() {
        let t = Turns::new(1);
        let held = t.acquire(0, 1).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for key in [5u64, 3, 9, 3, 1] {
            let (t, order) = (t.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let turn = t.acquire(key, 1).await;
                order.lock().unwrap().push(key);
                drop(turn);
            }));
            settle().await;
        }
        drop(held);
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![1, 3, 3, 5, 9]);
        assert_eq!(t.available(), 1);
    }

    #[tokio::test]
    async fn no_barging_past_a_waiter_that_needs_more() {
        let t = Turns::new(4);
        let a = t.acquire(1, 3).await;
        // Key 2 needs 4: it waits; key 3 needs 1, which is free, but 2 is ahead of it.
        let t2 = t.clone();
        let big = tokio::spawn(async move { t2.acquire(2, 4).await });
        settle().await;
        let t3 = t.clone();
        let small = tokio::spawn(async move { t3.acquire(3, 1).await });
        settle().await;
        assert!(!big.is_finished() && !small.is_finished());
        // A lower key than every waiter goes at once when its units are free.
        let first = t.acquire(0, 1).await;
        drop(first);
        drop(a);
        let big = big.await.unwrap();
        settle().await;
        assert!(!small.is_finished());
        drop(big);
        drop(small.await.unwrap());
        assert_eq!(t.available(), 4);
    }

    #[tokio::test]
    async fn cancelled_waiters_leave_no_hole_and_keep_no_units() {
        let t = Turns::new(2);
        let held = t.acquire(0, 2).await;
        // A waiter that gives up before its turn.
        let gone = tokio::time::timeout(Duration::from_millis(20), t.acquire(1, 2)).await;
        assert!(gone.is_err());
        // One behind a waiter that is then cancelled is served when units free up.
        let t2 = t.clone();
        let head = tokio::spawn(async move { t2.acquire(1, 2).await });
        settle().await;
        let t3 = t.clone();
        let next = tokio::spawn(async move { t3.acquire(2, 1).await });
        settle().await;
        head.abort();
        let _ = head.await;
        drop(held);
        let next = next.await.unwrap();
        assert_eq!(t.available(), 1);
        drop(next);
        assert_eq!(t.available(), 2);
        // Granted while its future is being dropped: the units come back.
        let held = t.acquire(0, 2).await;
        let t4 = t.clone();
        let mut fut = Box::pin(async move { t4.acquire(1, 2).await });
        assert!(futures_poll_once(&mut fut).await.is_none());
        drop(held);
        drop(fut);
        assert_eq!(t.available(), 2);
    }

    #[tokio::test]
    async fn a_request_larger_than_the_total_is_clamped() {
        let t = Turns::new(2);
        let turn = t.acquire(0, 10).await;
        assert_eq!(t.available(), 0);
        drop(turn);
        assert_eq!(t.available(), 2);
    }

    /// Polls `fut` once.
    async fn futures_poll_once<F: std::future::Future + Unpin>(fut: &mut F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut *fut).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
