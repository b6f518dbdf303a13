//! `record-offload run`: the stages of [`crate::pipeline`], the look-up server and the
//! monitor, wired together, started in order and stopped in order. Nothing here does the work.
//!
//! Start-up ([`Daemon::start`]):
//!
//! 1. Open (and migrate) the journal, then take the daemon's lock on it ([`lock_path`]): one
//!    daemon per journal.
//! 2. Recovery ([`crate::pipeline::recovery`]), with the deleter already running: stored files
//!    still on disk are deleted, rows waiting to settle go back to the watcher, stray multipart
//!    uploads are aborted before the uploader creates or resumes any (single PutObjects go at
//!    once).
//! 3. Bind every `lookup.listen` address (a bad one fails the start before new files are
//!    taken), start the watcher, the intake and the pruner, then serve look-ups.
//! 4. Tell systemd `READY=1` and start the monitor (status line, metrics, watchdog).
//!
//! A start that fails after the first stage was spawned cancels every stage and waits for
//! them before it returns the error: nothing keeps running behind a failed start.
//!
//! Shutdown (the future passed to [`run`] completes): systemd hears `STOPPING=1`, the watcher
//! and the intake stop at once, the uploader finishes what is in flight for up to
//! `upload.drain_secs` and abandons the rest (resumed at the next start); every journal write
//! is a complete transaction, so the journal is consistent whenever the process stops.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::config::{ListenAddr, Settings};
use crate::journal::{Journal, JournalError};
use crate::lookup::resolve::{Resolver, ResolverError, default_public_url};
use crate::lookup::server::{self as lookup_server, ServerError};
use crate::pipeline::delete::{self, DeleteJob};
use crate::pipeline::notify::{self, NotifyParams};
use crate::pipeline::upload::Uploader;
use crate::pipeline::watch::{self, Settled, WatchParams, WatchStats};
use crate::pipeline::{UploadStats, intake, prune, recovery};
use crate::service::health::{self, Liveness};
use crate::service::monitor::Monitor;
use crate::service::systemd;
use crate::store::Store;
use crate::util::fs::Root;
use crate::util::heartbeat::Heartbeat;

/// Capacity of the channels between stages: a full one makes its sender wait.
const SETTLED_QUEUE: usize = 1024;
const RESETTLE_QUEUE: usize = 1024;
const PRUNE_QUEUE: usize = 4096;
const DELETE_QUEUE: usize = 4096;

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
    /// Whether every stage makes progress (`/healthz`, the watchdog, the metrics).
    pub liveness: Arc<Liveness>,
    /// The look-up server's addresses as bound (real ports for `:0`).
    pub lookup_addrs: Vec<ListenAddr>,
    cancel: CancellationToken,
    /// The stages and the look-up server.
    stages: TaskTracker,
    /// The monitor, which outlives the stages' drain (watchdog pings go on meanwhile).
    monitor: TaskTracker,
    monitor_stop: CancellationToken,
    /// Held (an exclusive `flock`) for as long as the daemon lives; the kernel drops it when
    /// the process ends, however it ends.
    _lock: std::fs::File,
}

/// What [`start_stages`] started.
struct Started {
    uploader: Arc<Uploader>,
    watch_stats: Arc<WatchStats>,
    liveness: Arc<Liveness>,
    lookup_addrs: Vec<ListenAddr>,
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
        for w in settings.warnings() {
            tracing::warn!(warning = %w, "configuration");
        }

        let cancel = CancellationToken::new();
        let stages = TaskTracker::new();
        let started = start_stages(&settings, &journal, root, &stages, &cancel).await;
        stages.close();
        let started = match started {
            Ok(s) => s,
            Err(e) => {
                cancel.cancel();
                stages.wait().await;
                return Err(e);
            }
        };

        info!(root = %cfg.watch.root.display(), bucket = %cfg.storage.bucket,
              endpoint = %cfg.storage.endpoint, node = %cfg.node.name, "record-offload started");
        systemd::notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status("started"),
        ]);
        let monitor_stop = CancellationToken::new();
        let monitor = TaskTracker::new();
        monitor.spawn(
            Monitor {
                liveness: started.liveness.clone(),
                journal: journal.clone(),
                in_flight: started.uploader.stats.in_flight.clone(),
                watch_root: cfg.watch.root.clone(),
                disk_report: crate::service::disk::report_path(&cfg.journal.path),
                disk_warn_secs: cfg.watch.disk_warn_secs,
                disk_window: std::time::Duration::from_secs_f64(cfg.watch.disk_window_secs),
            }
            .run(monitor_stop.clone()),
        );
        monitor.close();
        Ok(Daemon {
            journal,
            uploader: started.uploader,
            watch_stats: started.watch_stats,
            liveness: started.liveness,
            lookup_addrs: started.lookup_addrs,
            cancel,
            stages,
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
    pub async fn wait(self) {
        self.stages.wait().await;
        self.monitor_stop.cancel();
        self.monitor.wait().await;
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

/// Recovery and every stage, spawned on `stages`; the caller cancels and awaits them all when
/// this fails.
async fn start_stages(
    settings: &Arc<Settings>,
    journal: &Journal,
    root: Arc<Root>,
    stages: &TaskTracker,
    cancel: &CancellationToken,
) -> Result<Started, DaemonError> {
    let cfg = &settings.config;
    let store = Store::new(settings);
    let (settled_tx, settled_rx) = mpsc::channel::<Settled>(SETTLED_QUEUE);
    let (resettle_tx, resettle_rx) = mpsc::channel::<PathBuf>(RESETTLE_QUEUE);
    let (prune_tx, prune_rx) = mpsc::channel::<PathBuf>(PRUNE_QUEUE);
    let (delete_tx, delete_rx) = mpsc::channel::<DeleteJob>(DELETE_QUEUE);
    let upload_stats = Arc::new(UploadStats::default());
    let uploader = Uploader::new(
        settings.clone(),
        store,
        journal.clone(),
        root.clone(),
        resettle_tx.clone(),
        delete_tx,
        upload_stats.clone(),
    );

    // The `[[notify]]` receivers are listed in the journal before any row can change, so no
    // state change of this run misses one (the outbox triggers read that list).
    let notify_params = NotifyParams {
        node: cfg.node.name.clone(),
        receivers: settings.notify.clone(),
        outbox: cfg.notify_outbox.clone(),
        legacy_url: Arc::new(|p: &Path| p.to_string_lossy().into_owned()),
    };
    notify::register(&notify_params, journal).await?;

    // Recovery. The deleter runs from the start: recovery hands it stored files still on disk.
    stages.spawn(delete::run(
        delete_rx,
        journal.clone(),
        root.clone(),
        prune_tx.clone(),
        upload_stats,
        cancel.clone(),
    ));
    recovery::finish_pending_deletes(&uploader).await?;
    let settling = recovery::settling_still_on_disk(journal, &root).await?;
    // The watcher takes them once it runs; its queue is bounded, so they wait for room.
    stages.spawn(recovery::resettle(settling, resettle_tx, cancel.clone()));
    stages.spawn(uploader.clone().run_failover(cancel.clone()));
    stages.spawn(recovery::abort_strays_then_upload(
        uploader.clone(),
        settings.template.prefix(&cfg.node.name),
        cancel.clone(),
    ));

    // Every `lookup.listen` address is bound now, after recovery and before new files are
    // taken, so that a bad address fails the start before anything else runs.
    let bound = lookup_server::bind(&settings.listen).await?;
    let lookup_addrs = bound.addrs().to_vec();

    let watch_stats = Arc::new(WatchStats::default());
    let params = WatchParams {
        root: cfg.watch.root.clone(),
        filter: settings.filter.clone(),
        settle: settings.settle(),
        rescan_interval: settings.rescan_interval(),
        journal_path: cfg.journal.path.clone(),
        delete_after_upload: cfg.upload.delete_after_upload,
    };
    stages.spawn(watch::run(
        params,
        settled_tx,
        resettle_rx,
        prune_tx,
        watch_stats.clone(),
        cancel.clone(),
    ));
    let intake_beat = Arc::new(Heartbeat::default());
    stages.spawn(intake::run(
        settled_rx,
        uploader.clone(),
        intake_beat.clone(),
        cancel.clone(),
    ));
    stages.spawn(prune::run(
        root,
        settings.prune_after(),
        prune_rx,
        cancel.clone(),
    ));

    // Liveness, and the look-up server on the sockets bound above: serving starts before
    // READY=1, so systemd (and whatever is ordered after us) never sees a ready daemon that
    // cannot answer.
    let liveness = Arc::new(Liveness::new(
        vec![
            (health::WATCHER, watch_stats.heartbeat.clone()),
            (health::INTAKE, intake_beat),
            (health::UPLOADER, uploader.stats.heartbeat.clone()),
            (health::JOURNAL, journal.heartbeat()),
        ],
        settings.stall_allowance(),
    ));
    let resolver = Resolver::new(
        settings,
        default_public_url(settings, &lookup_addrs),
        // A client of its own: the look-up thread's runtime drives its connections.
        Some(Store::new(settings)),
    )?;
    let max_rows = cfg.lookup.index_max_rows;
    if max_rows > 0 {
        resolver.enable_index(max_rows);
    }
    let resolver = Arc::new(resolver);
    let urls = resolver.clone();
    notify::start(
        NotifyParams {
            legacy_url: Arc::new(move |p: &Path| urls.local_url(p)),
            ..notify_params
        },
        journal,
        stages,
        cancel,
    )
    .await?;
    lookup_server::serve(
        bound,
        resolver,
        settings,
        liveness.clone(),
        cancel.clone(),
        stages,
    )?;
    Ok(Started {
        uploader,
        watch_stats,
        liveness,
        lookup_addrs,
    })
}
