//! Wiring of the pipeline for `record-offload run`:
//!
//! ```text
//! watcher ──Settled──> intake ──(journal rows)──> uploader ──> verify ──> delete ──> pruner
//!    ^                                               │
//!    └──────────── files that changed ───────────────┘
//! ```
//!
//! Start-up, in this order (see [`Daemon::start`]): open and recover the journal, start the
//! stages, bind the listeners, then tell systemd `READY=1` and start the monitor (status line,
//! metrics refresh, watchdog; see `crate::service::systemd` and `crate::service::health`).
//!
//! Recovery comes before anything new is taken: stored files whose local copy is still
//! there are deleted, rows that were waiting to settle go back to the watcher, and multipart
//! uploads this node left in the bucket without a journal row are aborted (where the store can
//! list them). Rows that were `uploading` simply become due and resume from their parts.
//!
//! Shutdown (the future passed to [`run`] completes): systemd hears `STOPPING=1`, the watcher
//! and the intake stop at once, the uploader finishes what is in flight for up to
//! `upload.drain_secs` and abandons the rest (resumed at the next start); every journal write
//! is a complete transaction, so the journal is consistent whenever the process stops.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{ListenAddr, Settings};
use crate::delete::DeleteJob;
use crate::journal::{self, Durability, Intake, Journal, JournalError, State};
use crate::lookup::resolve::{Resolver, ResolverError, default_public_url};
use crate::lookup::server::{self as lookup_server, ServerError};
use crate::service::health::{self, Liveness};
use crate::service::monitor::Monitor;
use crate::service::systemd;
use crate::store::Store;
use crate::upload::{UploadStats, Uploader};
use crate::util::fs::Root;
use crate::util::heartbeat::Heartbeat;
use crate::util::keys::KeyTemplate;
use crate::watch::{self, Settled, WatchParams, WatchStats};

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("watch.root {path}: {source}")]
    Root {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another record-offload is already running on the journal {journal} (it holds {lock}); \
         one daemon per journal"
    )]
    AlreadyRunning { journal: PathBuf, lock: PathBuf },
    #[error("cannot lock the journal through {lock}: {source}")]
    Lock {
        lock: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Lookup(#[from] ServerError),
    #[error("look-ups: {0}")]
    Resolver(#[from] ResolverError),
}

/// A running pipeline.
pub struct Daemon {
    pub journal: Journal,
    pub uploader: Arc<Uploader>,
    pub watch_stats: Arc<WatchStats>,
    /// Whether every stage makes progress (`/healthz`, the watchdog).
    pub liveness: Arc<Liveness>,
    /// The look-up server's addresses as bound (real ports for `:0`).
    pub lookup_addrs: Vec<ListenAddr>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    monitor: tokio::task::JoinHandle<()>,
    monitor_stop: CancellationToken,
    /// Held (an exclusive `flock`) for as long as the daemon lives; the kernel drops it when
    /// the process ends, however it ends.
    _lock: std::fs::File,
}

/// `<journal>.lock`: the file a running daemon holds locked. Commands such as `retry` and
/// `import` write to the journal beside a running daemon and do not take it.
pub fn lock_path(journal: &std::path::Path) -> PathBuf {
    let mut p = journal.as_os_str().to_os_string();
    p.push(".lock");
    PathBuf::from(p)
}

/// Takes the daemon's lock on `journal`, or says who holds it. Two daemons on one journal
/// would upload and delete the same files side by side.
fn lock_journal(journal: &std::path::Path) -> Result<std::fs::File, DaemonError> {
    use std::os::unix::fs::OpenOptionsExt;
    let lock = lock_path(journal);
    let open = |write: bool| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .create(write)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&lock)
    };
    // A lock file that cannot be written (a read-only file system) still takes a lock; the
    // journal then says what is wrong with it.
    let file = open(true)
        .or_else(|e| match e.raw_os_error() {
            Some(libc::EROFS | libc::EACCES) => open(false).map_err(|_| e),
            _ => Err(e),
        })
        .map_err(|source| DaemonError::Lock {
            lock: lock.clone(),
            source,
        })?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Err(DaemonError::AlreadyRunning {
            journal: journal.to_path_buf(),
            lock,
        }),
        Err(e) => Err(DaemonError::Lock {
            lock,
            source: e.into(),
        }),
    }
}

impl Daemon {
    /// Opens the journal, recovers, starts every stage, and tells systemd it is ready.
    pub async fn start(settings: Settings) -> Result<Daemon, DaemonError> {
        let settings = Arc::new(settings);
        let cfg = &settings.config;

        // 1. The journal, and recovery of what the last run left.
        systemd::notify(&[sd_notify::NotifyState::Status(
            "starting: recovering the journal",
        )]);
        // Opening checks and migrates the journal (what any command may do beside a running
        // daemon); the lock comes before recovery, the first thing only a daemon does.
        let journal = Journal::open(&cfg.journal.path)?;
        let lock = lock_journal(&cfg.journal.path)?;
        let root = Arc::new(
            Root::open(&cfg.watch.root).map_err(|source| DaemonError::Root {
                path: cfg.watch.root.clone(),
                source,
            })?,
        );
        let template = settings.template.clone();
        let store = Store::new(&settings);
        for w in settings.warnings() {
            tracing::warn!(warning = %w, "configuration");
        }

        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let (settled_tx, settled_rx) = mpsc::channel::<Settled>(1024);
        let (resettle_tx, resettle_rx) = mpsc::channel::<PathBuf>(1024);
        let (prune_tx, prune_rx) = mpsc::channel::<PathBuf>(4096);
        let (delete_tx, delete_rx) = mpsc::channel::<DeleteJob>(4096);
        let upload_stats = Arc::new(UploadStats::default());

        let uploader = Uploader::new(
            settings.clone(),
            store.clone(),
            journal.clone(),
            root.clone(),
            resettle_tx.clone(),
            delete_tx,
            upload_stats.clone(),
        );
        // The deleter runs from the start: recovery hands it stored files still on disk.
        tracker.spawn(crate::delete::run(
            delete_rx,
            journal.clone(),
            root.clone(),
            prune_tx.clone(),
            upload_stats,
            cancel.clone(),
        ));

        // Recovery.
        uploader.finish_pending_deletes().await?;
        let settling = journal
            .read(|c| journal::in_state(c, State::Settling))
            .await?;
        for row in settling {
            match root.stat(&row.path) {
                Ok(_) => {
                    let _ = resettle_tx.try_send(row.path.clone());
                }
                Err(_) => {
                    let (id, generation) = (row.id, row.generation);
                    journal
                        .write(Durability::Normal, move |c| {
                            journal::set_vanished(c, id, generation)
                        })
                        .await?;
                }
            }
        }
        {
            let store = store.clone();
            let journal = journal.clone();
            let prefix = template.prefix(&cfg.node.name);
            // The uploader starts only after this: an upload it creates must never be
            // mistaken for a stray one. A store that does not answer delays uploads by at
            // most one request timeout.
            let uploader = uploader.clone();
            let cancel = cancel.clone();
            let drain = std::time::Duration::from_secs_f64(cfg.upload.drain_secs);
            tracker.spawn(async move {
                let cleanup = abort_stray_uploads(store, journal, prefix);
                tokio::pin!(cleanup);
                let mut beat = tokio::time::interval(std::time::Duration::from_secs(1));
                loop {
                    // The uploader is alive while it waits for the clean-up.
                    uploader.stats.heartbeat.beat();
                    tokio::select! {
                        _ = cancel.cancelled() => {
                            // Stopped right after starting: the clean-up is a listing and a
                            // few aborts, work in progress like an upload's last part, so it
                            // may finish within the drain time (else the next start does it).
                            let _ = tokio::time::timeout(drain, &mut cleanup).await;
                            break;
                        }
                        _ = &mut cleanup => break,
                        _ = beat.tick() => {}
                    }
                }
                uploader.run(cancel).await;
            });
        }

        // Look-ups: every `lookup.listen` address is bound now, after recovery and before new
        // files are taken, so that a bad address fails the start before anything else runs.
        let bound = match lookup_server::bind(&settings.listen).await {
            Ok(b) => b,
            Err(e) => {
                cancel.cancel();
                tracker.close();
                tracker.wait().await;
                return Err(e.into());
            }
        };
        let lookup_addrs = bound.addrs().to_vec();

        // 2. The stages.
        let watch_stats = Arc::new(WatchStats::default());
        let params = WatchParams {
            root: cfg.watch.root.clone(),
            filter: settings.filter.clone(),
            settle: settings.settle(),
            rescan_interval: settings.rescan_interval(),
            journal_path: cfg.journal.path.clone(),
            delete_after_upload: cfg.upload.delete_after_upload,
        };
        tracker.spawn(watch::run(
            params,
            settled_tx,
            resettle_rx,
            prune_tx,
            watch_stats.clone(),
            cancel.clone(),
        ));
        let intake_beat = Arc::new(Heartbeat::default());
        tracker.spawn(intake(
            settled_rx,
            journal.clone(),
            template,
            cfg.node.name.clone(),
            uploader.clone(),
            intake_beat.clone(),
            cancel.clone(),
        ));
        tracker.spawn(crate::prune::run(
            root.clone(),
            settings.prune_after(),
            prune_rx,
            cancel.clone(),
        ));
        tracker.close();

        // 3. Liveness, and the look-up server on the sockets bound above: serving starts
        //    before READY=1, so systemd (and whatever is ordered after us) never sees a
        //    ready daemon that cannot answer.
        let liveness = Arc::new(Liveness::new(
            vec![
                (health::WATCHER, watch_stats.heartbeat.clone()),
                (health::INTAKE, intake_beat),
                (health::UPLOADER, uploader.stats.heartbeat.clone()),
                (health::JOURNAL, journal.heartbeat()),
            ],
            settings.stall_allowance(),
        ));
        let served = Resolver::new(
            &settings,
            default_public_url(&settings, &lookup_addrs),
            // A client of its own: the look-up thread's runtime drives its connections.
            Some(Store::new(&settings)),
        )
        .map_err(DaemonError::from)
        .and_then(|resolver| {
            let max_rows = settings.config.lookup.index_max_rows;
            if max_rows > 0 {
                resolver.enable_index(max_rows);
            }
            lookup_server::serve(
                bound,
                Arc::new(resolver),
                &settings,
                liveness.clone(),
                cancel.clone(),
                &tracker,
            )
            .map_err(DaemonError::from)
        });
        if let Err(e) = served {
            cancel.cancel();
            tracker.wait().await;
            return Err(e);
        }

        // 4. The monitor, and READY=1.
        info!(root = %cfg.watch.root.display(), bucket = %cfg.storage.bucket,
              endpoint = %cfg.storage.endpoint, node = %cfg.node.name, "record-offload started");
        systemd::notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status("started"),
        ]);
        let monitor_stop = CancellationToken::new();
        let monitor = tokio::spawn(
            Monitor {
                liveness: liveness.clone(),
                journal: journal.clone(),
                in_flight: uploader.stats.in_flight.clone(),
                watch_root: cfg.watch.root.clone(),
            }
            .run(monitor_stop.clone()),
        );
        Ok(Daemon {
            journal,
            uploader,
            watch_stats,
            liveness,
            lookup_addrs,
            cancel,
            tracker,
            monitor,
            monitor_stop,
            _lock: lock,
        })
    }

    /// Asks every stage to stop (see the module doc for what that means).
    pub fn shutdown(&self) {
        if !self.cancel.is_cancelled() {
            self.liveness.set_stopping();
            systemd::notify(&[
                sd_notify::NotifyState::Stopping,
                sd_notify::NotifyState::Status("stopping: finishing the uploads in flight"),
            ]);
        }
        self.cancel.cancel();
    }

    /// Waits until every stage has stopped.
    pub async fn wait(mut self) {
        self.tracker.wait().await;
        self.monitor_stop.cancel();
        let _ = (&mut self.monitor).await;
        self.liveness.set_stopped();
        info!("record-offload stopped");
    }
}

impl Drop for Daemon {
    /// A daemon dropped without [`Daemon::wait`] (a test, a failed start) leaves no monitor
    /// behind.
    fn drop(&mut self) {
        self.monitor_stop.cancel();
    }
}

/// Runs the daemon until `shutdown` completes, then drains and returns.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let daemon = Daemon::start(settings).await?;
    shutdown.await;
    info!("shutting down");
    daemon.shutdown();
    daemon.wait().await;
    Ok(())
}

/// Takes settled files into the journal, many per transaction.
async fn intake(
    mut rx: mpsc::Receiver<Settled>,
    journal: Journal,
    template: KeyTemplate,
    node: String,
    uploader: Arc<Uploader>,
    heartbeat: Arc<Heartbeat>,
    cancel: CancellationToken,
) {
    let delete_after_upload = uploader.settings.config.upload.delete_after_upload;
    let retry_wait = (uploader.settings.config.upload.failed_retry_secs * 1000.0) as i64;
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
        crate::util::failpoint::stall("intake", &cancel).await;
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
                let key = template.render(&node, &s.rel);
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
                        Intake::DeletePending { id, generation } => {
                            let up = uploader.clone();
                            tokio::spawn(async move {
                                up.delete_local(id, generation, &s.rel, &s.identity).await;
                            });
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

/// Aborts multipart uploads under this node's prefix that the journal does not know (left by
/// a crash between creating an upload and recording it). Stores without
/// ListMultipartUploads (OSS's S3 API) skip this; a bucket lifecycle rule covers them.
async fn abort_stray_uploads(store: Store, journal: Journal, prefix: String) {
    let listed = match store.list_multipart_uploads(&prefix).await {
        Ok(Some(l)) => l,
        Ok(None) => {
            info!(
                "the store cannot list multipart uploads; rely on a lifecycle rule for stray ones"
            );
            return;
        }
        Err(e) => {
            warn!(error = %e, "cannot list multipart uploads; stray ones are left to the lifecycle rule");
            return;
        }
    };
    if listed.is_empty() {
        return;
    }
    let known: HashSet<String> = match journal.read(journal::open_upload_ids).await {
        Ok(k) => k,
        Err(e) => {
            warn!(error = %e, "cannot read the journal to find stray uploads");
            return;
        }
    };
    for (key, upload_id) in listed {
        if known.contains(&upload_id) {
            continue;
        }
        match store.abort_multipart(&key, &upload_id).await {
            Ok(()) => {
                info!(key = %key, upload_id = %upload_id, "aborted a multipart upload the journal does not know")
            }
            Err(e) => warn!(key = %key, error = %e, "cannot abort a stray multipart upload"),
        }
    }
}
