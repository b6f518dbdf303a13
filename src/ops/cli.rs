//! The command line (see `record-offload --help`). Every command prints one clear line on
//! stderr when it fails, never a panic or a backtrace.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[cfg(feature = "dev-server")]
use super::demo;
use super::{import, status};
use crate::config::{self, Settings, Source};
use crate::journal::{self, State};

#[derive(Debug, Parser)]
#[command(
    name = "record-offload",
    version,
    about = "Moves finished recordings from a recording host to S3-compatible object storage (Alibaba Cloud OSS) and keeps legacy playback URLs working.",
    after_help = "The config is /etc/record-offload/config.toml unless --config says otherwise. status, ls, retry and import read the journal directly and work while the daemon runs; they do not need the storage secret. `record-offload COMMAND --help` explains each command.",
    propagate_version = true
)]
pub struct Cli {
    /// Config file (TOML). Environment variables RECORD_OFFLOAD_SECTION__KEY override it.
    #[arg(
        long,
        global = true,
        env = "RECORD_OFFLOAD_CONFIG",
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground until SIGTERM or SIGINT, then drain and exit 0.
    ///
    /// This is what systemd runs (Type=notify): READY=1 once the journal is recovered and the
    /// look-up listeners are bound, a queue summary in STATUS= (see `systemctl status`),
    /// watchdog pings while every stage of the pipeline makes progress, STOPPING=1 on shutdown.
    /// Logs go to journald when stderr is the journal, to stderr otherwise; the level is
    /// `log.level`, or RUST_LOG when set.
    Run,
    /// Validate the config and print the effective settings (secrets redacted).
    ///
    /// Exits non-zero with one line naming the key and what is wrong with it. The unit runs it
    /// as ExecStartPre=, so a bad config never starts the daemon.
    CheckConfig,
    /// Files and bytes per state, bytes waiting, age of the oldest waiting file, last errors.
    ///
    /// Reads the journal, so it works while the daemon runs. States: settling (changed, waits
    /// to settle again), queued, uploading, uploaded (stored, local copy still there), deleted
    /// (stored, local copy removed), failed (permanent error; see `retry`), vanished (removed
    /// before it was stored). With --json: {"counts": {STATE: N}, "bytes": {STATE: N},
    /// "bytes_waiting": N, "oldest_waiting_secs": N, "bytes_uploading_sent": N,
    /// "last_errors": [{"id", "path", "state", "error", "at_ms"}]}.
    Status {
        /// Machine-readable output (one JSON object).
        #[arg(long)]
        json: bool,
    },
    /// List journal rows (id, state, size, path; the last error of files still waiting).
    Ls {
        /// Only rows in this state (settling, queued, uploading, uploaded, deleted, failed, vanished).
        #[arg(long)]
        state: Option<String>,
        /// Machine-readable output (one JSON array).
        #[arg(long)]
        json: bool,
        /// At most this many rows.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// The look-up answer for a legacy path or URL, as `GET /v1/resolve` gives it (exit 0: an
    /// answer; 1: not found or bad input; 2: config or journal unreadable).
    Resolve {
        /// A legacy path (/record/a/b.mp4), a path relative to the root, or a whole legacy URL,
        /// percent-encoded as the old URLs were.
        path_or_url: std::ffi::OsString,
        /// Print the JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Re-queue failed files: one by its id, or all with --failed.
    ///
    /// Failed files are also retried by themselves after upload.failed_retry_secs; this does
    /// it at once, e.g. after fixing credentials or creating the bucket. Works while the daemon
    /// runs: it picks the rows up within a second.
    Retry {
        /// The row id (see `ls`).
        id: Option<i64>,
        /// Every failed row.
        #[arg(long, conflicts_with = "id")]
        failed: bool,
    },
    /// Queue the files already under watch.root (recordings from before the install).
    ///
    /// For a host that had recordings before record-offload was installed, or to see with
    /// --dry-run what the daemon is going to take. Shows a progress bar on a terminal. Uses the daemon's include/exclude rules. Files modified within watch.settle_secs or held
    /// open for writing are skipped and counted (the daemon takes them once they settle);
    /// files the journal already knows are left as they are. Works while the daemon runs (it
    /// starts uploading the new rows within a second) or before its first start. --dry-run
    /// only reports what would be queued and writes nothing. Exits 1 if some files could not
    /// be queued (listed), 2 if the config or journal cannot be used.
    Import {
        /// Report what would be queued; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Machine-readable report (one JSON object).
        #[arg(long)]
        json: bool,
    },
    /// Try the daemon on this machine: a local S3-compatible server, a watch directory and a
    /// journal in a scratch folder.
    #[cfg(feature = "dev-server")]
    Demo {
        /// Scratch folder (created).
        #[arg(long, default_value = "demo")]
        dir: PathBuf,
        /// Settle time in seconds.
        #[arg(long, default_value_t = 2.0)]
        settle_secs: f64,
    },
    /// Run only the local S3-compatible server (for benchmarks and manual tests).
    #[cfg(feature = "dev-server")]
    #[command(hide = true)]
    DevS3 {
        /// Folder that holds the buckets.
        #[arg(long)]
        data: PathBuf,
        /// Address to listen on (loopback).
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: std::net::SocketAddr,
        /// Bucket to create.
        #[arg(long, default_value = "recordings")]
        bucket: String,
    },
}

/// Runs the command line; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let source = Source {
        file: cli.config.clone(),
        no_env: false,
    };
    match cli.command {
        Command::Run => run(&source),
        Command::CheckConfig => match config::load(&source) {
            Ok(s) => {
                print!("{}", config::redacted_toml(&s));
                for w in s.warnings() {
                    eprintln!("warning: {w}");
                }
                eprintln!("config ok");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e.to_string(), 1),
        },
        Command::Status { json } => with_journal(&source, |s, conn| status::status(s, conn, json)),
        Command::Ls { state, json, limit } => {
            let state = match state.as_deref().map(|s| (s, State::parse(s))) {
                None => None,
                Some((_, Some(st))) => Some(st),
                Some((s, None)) => {
                    return fail(
                        &format!(
                            "unknown state {s:?}; one of: {}",
                            State::ALL.map(|s| s.as_str()).join(", ")
                        ),
                        2,
                    );
                }
            };
            with_journal(&source, |_, conn| status::ls(conn, state, json, limit))
        }
        Command::Resolve { path_or_url, json } => resolve(&source, &path_or_url, json),
        Command::Retry { id, failed } => {
            if id.is_none() && !failed {
                return fail("retry needs a row id or --failed", 2);
            }
            match config::load_without_secret(&source) {
                Err(e) => fail(&e.to_string(), 2),
                Ok(s) => retry(&s, id),
            }
        }
        Command::Import { dry_run, json } => import::command(&source, dry_run, json),
        #[cfg(feature = "dev-server")]
        Command::Demo { dir, settle_secs } => demo::demo(&dir, settle_secs),
        #[cfg(feature = "dev-server")]
        Command::DevS3 {
            data,
            listen,
            bucket,
        } => demo::dev_s3(&data, listen, &bucket),
    }
}

/// `retry`: failed rows go back to the queue under the key the template renders now (a row
/// recorded without one, or under an older template, is mended).
fn retry(settings: &Settings, id: Option<i64>) -> ExitCode {
    let node = &settings.config.node.name;
    let key_of = |rel: &std::path::Path| settings.template.render(node, rel);
    let done = journal::open_rw(&settings.config.journal.path)
        .and_then(|c| journal::requeue_failed(&c, id, &key_of));
    match done {
        Err(e) => fail(&e.to_string(), 2),
        Ok(r) => {
            for (path, why) in &r.kept {
                eprintln!("record-offload: kept failed: {}: {why}", path.display());
            }
            if r.queued == 0 && id.is_some() {
                return match r.kept.first() {
                    Some((_, why)) => fail(&format!("cannot re-queue: {why}"), 1),
                    None => fail("no failed row with that id", 1),
                };
            }
            println!("re-queued {} file(s)", r.queued);
            ExitCode::SUCCESS
        }
    }
}

pub(super) fn fail(msg: &str, code: u8) -> ExitCode {
    eprintln!("record-offload: {msg}");
    ExitCode::from(code)
}

fn with_journal(
    source: &Source,
    f: impl FnOnce(&Settings, &rusqlite::Connection) -> Result<(), journal::JournalError>,
) -> ExitCode {
    let settings = match config::load_without_secret(source) {
        Ok(s) => s,
        Err(e) => return fail(&e.to_string(), 2),
    };
    let conn = match journal::open_ro(&settings.config.journal.path) {
        Ok(c) => c,
        Err(e) => return fail(&e.to_string(), 2),
    };
    match f(&settings, &conn) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e.to_string(), 2),
    }
}

/// Sets up logging: journald when stderr is the journal, plain stderr otherwise (see
/// [`crate::service::logging`]).
pub fn init_logging(level: &str) {
    crate::service::logging::init(level)
}

pub(super) fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    one_malloc_arena();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("record-offload")
        .build()
}

/// Makes every thread allocate from glibc's one main arena (`M_ARENA_MAX = 1`), before the
/// runtime starts its threads. By default each thread that allocates while another holds the
/// arena gets an arena of its own (up to 8 per core), and each keeps the chunk buffers freed
/// into it: on 8 × 256 MiB that was 15 arenas holding 20 MiB, against 12 MiB of live heap
/// (heaptrack). One arena reuses the same few MiB; the daemon allocates about 10,000 times a
/// second, too few for the arena's lock to be contended (README, "Memory.").
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a parameter of glibc's allocator; it is called before the
    // runtime's threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Completes on SIGTERM or SIGINT.
pub(super) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn run(source: &Source) -> ExitCode {
    let settings = match config::load(source) {
        Ok(s) => s,
        Err(e) => return fail(&e.to_string(), 1),
    };
    init_logging(&settings.config.log.level);
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the runtime: {e}"), 1),
    };
    match rt.block_on(crate::daemon::run(settings, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e.to_string(), 1),
    }
}

fn resolve(source: &Source, input: &std::ffi::OsStr, json: bool) -> ExitCode {
    use crate::lookup::resolve::{Answer, LookupError, Resolver, default_public_url};
    use std::os::unix::ffi::OsStrExt;
    let settings = match config::load(source) {
        Ok(s) => s,
        Err(e) => return fail(&e.to_string(), 2),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the runtime: {e}"), 2),
    };
    rt.block_on(async {
        let public_url = default_public_url(&settings, &settings.listen);
        let store = crate::store::Store::new(&settings);
        let resolver = match Resolver::new(&settings, public_url, Some(store)) {
            Ok(r) => r,
            Err(e) => return fail(&e.to_string(), 2),
        };
        match resolver.resolve(input.as_bytes(), None).await {
            Ok(answer) => {
                let url = match &answer {
                    Answer::Stored(s) => s.signed.url.clone(),
                    Answer::Pending(p) => p.url.clone(),
                    Answer::Elsewhere(e) => format!(
                        "{}/v1/resolve?path={}",
                        e.lookup_url,
                        percent_encoding::percent_encode(
                            input.as_bytes(),
                            percent_encoding::NON_ALPHANUMERIC
                        )
                    ),
                };
                if json {
                    println!("{}", String::from_utf8_lossy(&answer.to_json(Some(&url))));
                } else {
                    println!("{url}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                if json {
                    println!("{}", String::from_utf8_lossy(&e.to_json()));
                }
                let code = match e {
                    LookupError::BadPath(_) | LookupError::NotFound => 1,
                    _ => 2,
                };
                fail(&e.to_string(), code)
            }
        }
    })
}
