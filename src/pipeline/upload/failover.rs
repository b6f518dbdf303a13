//! Failover between the primary store and `[storage.standby]`.
//!
//! One tracker shared by every upload task. The first transient failure of a request to the
//! primary starts the clock, any success on the primary stops it; permanent refusals
//! (credentials, bucket, permissions) are not an outage and never touch it. A transient
//! failure once the clock has run `storage.failover_after_secs` fails over: every attempt that
//! starts from then on goes to the standby, and a task waiting to retry the primary gives up
//! its attempt to start over there. While failed over, [`Uploader::run_failover`] probes the
//! primary (HeadBucket) every `storage.probe_secs`; the first answer fails back. It also
//! aborts the multipart uploads abandoned on a store (recorded in the journal when a file
//! moved to the other store, or by a copy-back that did not finish, see `copyback`) once that
//! store answers, from this run or a previous one; copy-back's upload in progress is left
//! alone.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Uploader;
use crate::journal::{self, Durability, StoreId};
use crate::store::{ErrorKind, Store, StoreError};

/// The failover state shared by the upload tasks.
#[derive(Debug)]
pub struct Failover {
    /// `false` without a standby: nothing ever fails over.
    enabled: bool,
    after: Duration,
    /// When the primary's current run of failures began.
    failing_since: Mutex<Option<Instant>>,
    active: AtomicBool,
}

impl Failover {
    pub fn new(enabled: bool, after: Duration) -> Failover {
        Failover {
            enabled,
            after,
            failing_since: Mutex::new(None),
            active: AtomicBool::new(false),
        }
    }

    /// Where new attempts go.
    pub fn target(&self) -> StoreId {
        if self.active.load(Ordering::Relaxed) {
            StoreId::Standby
        } else {
            StoreId::Primary
        }
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// A request to `store` failed with `err`.
    pub fn failed(&self, store: StoreId, err: &StoreError) {
        if !self.enabled || store != StoreId::Primary || err.kind != ErrorKind::Transient {
            return;
        }
        let Ok(mut since) = self.failing_since.lock() else {
            return;
        };
        let start = *since.get_or_insert_with(Instant::now);
        if start.elapsed() >= self.after && !self.active.swap(true, Ordering::Relaxed) {
            crate::service::metrics::set_failed_over(true);
            warn!(
                failing_secs = start.elapsed().as_secs_f64(),
                error = %err,
                "the primary store has failed every request; uploads go to the standby store"
            );
        }
    }

    /// A request to `store` succeeded.
    pub fn succeeded(&self, store: StoreId) {
        if store != StoreId::Primary {
            return;
        }
        if let Ok(mut since) = self.failing_since.lock() {
            *since = None;
        }
        if self.active.swap(false, Ordering::Relaxed) {
            crate::service::metrics::set_failed_over(false);
            info!("the primary store answers again; new uploads go to it");
        }
    }
}

impl Uploader {
    /// The client of `store` (the primary when there is no standby).
    pub(super) fn store_of(&self, store: StoreId) -> &Store {
        match (store, &self.standby) {
            (StoreId::Standby, Some(s)) => s,
            _ => &self.store,
        }
    }

    /// Probes the primary while failed over, and aborts uploads abandoned on a store that
    /// answers; until `cancel`. Runs only with a standby.
    pub async fn run_failover(self: Arc<Self>, cancel: CancellationToken) {
        if self.standby.is_none() {
            return;
        }
        let every = Duration::from_secs_f64(self.settings.config.storage.probe_secs);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if self.failover.is_active() {
                match self.store.probe().await {
                    Ok(()) => {
                        self.failover.succeeded(StoreId::Primary);
                        self.wake.notify_one();
                    }
                    Err(e) => tracing::debug!(error = %e, "the primary store still fails"),
                }
            }
            self.abort_abandoned(StoreId::Standby).await;
            if !self.failover.is_active() {
                self.abort_abandoned(StoreId::Primary).await;
            }
        }
    }

    /// Aborts the multipart uploads abandoned on `store`; one that cannot be aborted now is
    /// tried again at the next round.
    async fn abort_abandoned(&self, store: StoreId) {
        let list = match self
            .journal
            .read(move |c| journal::abandoned_uploads(c, store))
            .await
        {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "cannot read the abandoned uploads");
                return;
            }
        };
        for (key, upload_id) in list {
            // Copy-back's upload in progress: recorded only in case the process dies.
            if self.copy_back.holds(&upload_id) {
                continue;
            }
            match self.store_of(store).abort_multipart(&key, &upload_id).await {
                Ok(()) => {
                    info!(store = %store, key = %key, upload_id = %upload_id, "aborted an abandoned multipart upload (left by a failover or an interrupted copy-back)");
                    let uid = upload_id.clone();
                    if let Err(e) = self
                        .journal
                        .write(Durability::Normal, move |c| {
                            journal::forget_abandoned(c, store, &uid)
                        })
                        .await
                    {
                        warn!(error = %e, "cannot record the abort");
                    }
                }
                // The store does not answer: the others wait for the next round too.
                Err(e) if e.kind == ErrorKind::Transient => {
                    tracing::debug!(store = %store, error = %e, "cannot abort an abandoned upload yet");
                    return;
                }
                Err(e) => {
                    warn!(store = %store, key = %key, upload_id = %upload_id, error = %e, "cannot abort an abandoned upload; trying again at the next round");
                }
            }
        }
    }
}
