//! record-offload: moves finished recordings from a recording host to S3-compatible object
//! storage (Alibaba Cloud OSS) and keeps the old playback URLs working.
//!
//! # Layout
//!
//! - [`config`]: defaults → TOML → `RECORD_OFFLOAD_*` environment, validated into [`config::Settings`].
//! - [`watch`]: inotify and scans; decides when a file is finished (settled).
//! - [`journal`]: the SQLite journal, single source of truth; the state machine of every file.
//! - [`upload`]: scheduling, PutObject / multipart upload with resume, verify, delete.
//! - [`store`]: the aws-sdk-s3 client set up for OSS, and the retryable/permanent decision.
//! - [`delete`]: removes local copies of stored files, in batches behind one durable commit.
//! - [`prune`]: removes directories that deletions emptied, once they stayed idle.
//! - [`throttle`]: bandwidth limit and upload windows.
//! - [`fsutil`]: file-system access confined to the watch root (no symlinks, no `..`).
//! - [`keys`]: object keys from `storage.key_template`.
//! - [`lookup`]: playback look-ups: input parsing, URL signing, the resolver and its HTTP server.
//! - [`md5pair`]: the MD5 of a part and of the whole file in one pass.
//! - [`media`]: content types by extension, the same for stored objects and local files.
//! - [`daemon`]: wires the stages together, recovery at start, graceful shutdown.
//! - [`health`]: liveness of the stages (heartbeats), behind `/healthz` and the watchdog.
//! - [`metrics`]: Prometheus metrics for `/metrics`.
//! - [`systemd`]: `sd_notify` (READY, STATUS, WATCHDOG, STOPPING) and the monitor task.
//! - [`logging`]: journald when stderr is the journal, plain text otherwise.
//! - [`import`]: queues the files of an existing tree (`record-offload import`).
//! - [`cli`]: the `record-offload` command line.
//! - `devserver` (feature `dev-server`): a local S3-compatible server for the demo, tests and
//!   benchmarks.

pub mod cli;
pub mod config;
pub mod daemon;
#[cfg(feature = "dev-server")]
pub mod devserver;
pub mod import;
pub mod journal;
pub mod lookup;
pub mod pipeline;
pub mod service;
pub mod store;
pub mod util;
