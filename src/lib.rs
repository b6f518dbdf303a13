//! record-offload: moves finished recordings from a recording host to S3-compatible object
//! storage (Alibaba Cloud OSS) and keeps the old playback URLs working.
//!
//! # Layout
//!
//! Layers, lowest first. A module names only modules of the layers below it
//! (`scripts/check_layers.py`, run by CI, fails on anything else). A newcomer reads
//! `docs/contract.md` (what must hold), then [`daemon`] (how the stages are wired), then one
//! file's way through [`pipeline`]: `watch` → `intake` → `upload` → `delete` → `prune`.
//!
//! 1. [`util`]: leaf helpers with no knowledge of the daemon — file access confined to the
//!    root (`fs`), include/exclude globs, object keys from the template, media types, the MD5
//!    pair and the hashing thread, the bandwidth limit and upload windows, heartbeats, human
//!    sizes, failpoints for the crash tests.
//! 2. [`config`]: defaults → TOML → `RECORD_OFFLOAD_*`, validated once into
//!    [`config::Settings`], which carries every setting already parsed (templates, windows,
//!    networks, hosts, TLS roots); secrets and their redaction. Beside it, `devserver`
//!    (feature `dev-server`): the local S3-compatible server of the demo, tests and benchmarks.
//! 3. [`journal`]: the SQLite journal, single source of truth, and every SQL statement of the
//!    crate: schema and migrations, the writer thread, state transitions, status figures, and
//!    the readers look-ups and scans use. [`store`]: the aws-sdk-s3 client set up for OSS and
//!    the one decision of what is retryable.
//! 4. [`service`]: what the host sees of the daemon — liveness (`health`), Prometheus
//!    `metrics`, systemd notifications and the watchdog (`systemd`, `monitor`), `logging`.
//! 5. [`pipeline`]: the stages — `watch` (inotify, scans, settling), `intake` (settled files
//!    into the journal), `upload` (scheduler, per-file steps, PutObject, resumable multipart,
//!    verification), `delete` (local copies of stored files), `prune` (emptied directories),
//!    `recovery` (what a restart re-enters). [`lookup`]: playback look-ups — input parsing,
//!    URL signing, the resolver, the index of stored files, the HTTP server.
//! 6. [`daemon`]: wiring only — the journal lock, start order, graceful shutdown.
//! 7. [`ops`]: the command line and the commands besides `run` (`status`, `ls`, `resolve`,
//!    `retry`, `import`, `demo`).

pub mod config;
pub mod daemon;
#[cfg(feature = "dev-server")]
pub mod devserver;
pub mod journal;
pub mod lookup;
pub mod ops;
pub mod pipeline;
pub mod service;
pub mod store;
pub mod util;
