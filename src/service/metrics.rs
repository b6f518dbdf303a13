//! Prometheus metrics, rendered by [`render`] for `GET /metrics`.
//!
//! One registry for the process. Counters and the histogram are fed by hooks where things
//! happen (an upload completes, a request is retried, a file fails, a look-up is answered);
//! figures that come from the journal (files per state, bytes waiting, oldest waiting file) and
//! the free space of the watch root are refreshed every few seconds by the daemon's monitor
//! (`super::monitor`), never per scrape, since counting a large journal is not free. The
//! stages' heartbeat ages and the health verdict come from the daemon's liveness
//! (`super::health`), which the monitor reads at every watchdog check (at least once a
//! second).
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `record_offload_files` | gauge | `state` |
//! | `record_offload_disk_full_in_seconds` | gauge | |
//! | `record_offload_waiting_bytes` | gauge | |
//! | `record_offload_oldest_waiting_seconds` | gauge | |
//! | `record_offload_uploaded_files_total` | counter | |
//! | `record_offload_uploaded_bytes_total` | counter | |
//! | `record_offload_upload_duration_seconds` | histogram | |
//! | `record_offload_upload_retries_total` | counter | `reason` |
//! | `record_offload_upload_failures_total` | counter | `reason` |
//! | `record_offload_lookups_total` | counter | `answer` |
//! | `record_offload_lookup_index_entries` | gauge | |
//! | `record_offload_watch_root_free_bytes`, `..._size_bytes` | gauge | |
//! | `record_offload_stage_heartbeat_age_seconds` | gauge | `stage` |
//! | `record_offload_healthy` | gauge | |
//! | `record_offload_failed_over` | gauge | |
//! | `record_offload_copy_back_pending` | gauge | |
//! | `record_offload_copy_back_copied_total`, `..._copy_back_bytes_total` | counter | |
//! | `record_offload_notify_backlog`, `..._notify_oldest_seconds` | gauge | `receiver` |
//! | `record_offload_notify_delivered_total` | counter | `receiver` |
//! | `record_offload_notify_failures_total` | counter | `receiver`, `reason` |
//! | `record_offload_notify_dropped_total` | counter | `receiver`, `reason` |
//!
//! `reason` is the store's error code (`AccessDenied`, `SlowDown`, …) when it sent one,
//! otherwise `http_<status>`, `network` (no answer: refused, cut, timed out), `corrupt` (the
//! stored bytes differ from ours), or a local cause (`local`, `verify`, `journal`, `io`).
//! For notifications, `receiver` is the `[[notify]]` URL without its query, `reason` of a
//! failed delivery is `http_<status>`, `timeout`, `connect` or `network`, and of a dropped
//! event `outbox_full`, `expired` or `receiver_removed`.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use super::health::Liveness;
use crate::journal::{Queue, State};
use crate::store::{ErrorKind, StoreError};

/// Answers of the look-up server, created at zero so every series exists from the start.
pub const LOOKUP_ANSWERS: [&str; 8] = [
    "uploaded",
    "pending",
    "elsewhere",
    "not_found",
    "bad_path",
    "unauthorized",
    "forbidden",
    "error",
];

struct Metrics {
    registry: Registry,
    files: IntGaugeVec,
    waiting_bytes: IntGauge,
    oldest_waiting: IntGauge,
    uploaded_files: IntCounter,
    uploaded_bytes: IntCounter,
    upload_duration: Histogram,
    retries: IntCounterVec,
    failures: IntCounterVec,
    lookups: IntCounterVec,
    /// `lookups` for each of [`LOOKUP_ANSWERS`], resolved once (look-ups are the hot path).
    lookup_known: Vec<prometheus::IntCounter>,
    lookup_index: IntGauge,
    disk_free: IntGauge,
    disk_size: IntGauge,
    disk_full_in: prometheus::Gauge,
    heartbeat_age: prometheus::GaugeVec,
    healthy: IntGauge,
    failed_over: IntGauge,
    copy_back_pending: IntGauge,
    copy_back_copied: IntCounter,
    copy_back_bytes: IntCounter,
    notify_backlog: IntGaugeVec,
    notify_oldest: IntGaugeVec,
    notify_delivered: IntCounterVec,
    notify_failures: IntCounterVec,
    notify_dropped: IntCounterVec,
}

impl Metrics {
    fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new_custom(Some("record_offload".to_string()), None)?;
        let files = IntGaugeVec::new(
            Opts::new("files", "Files in the journal, by state."),
            &["state"],
        )?;
        let waiting_bytes = IntGauge::new("waiting_bytes", "Bytes of files not stored yet.")?;
        let oldest_waiting = IntGauge::new(
            "oldest_waiting_seconds",
            "Age of the oldest file not stored yet (0 when none waits).",
        )?;
        let uploaded_files = IntCounter::new(
            "uploaded_files_total",
            "Files stored and checked since the daemon started.",
        )?;
        let uploaded_bytes = IntCounter::new(
            "uploaded_bytes_total",
            "Bytes of files stored and checked since the daemon started.",
        )?;
        let upload_duration = Histogram::with_opts(
            HistogramOpts::new(
                "upload_duration_seconds",
                "Time from opening a file to its object being checked, per file.",
            )
            .buckets(vec![
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
                3600.0,
            ]),
        )?;
        let retries = IntCounterVec::new(
            Opts::new(
                "upload_retries_total",
                "Requests or file attempts retried after a transient error, by reason.",
            ),
            &["reason"],
        )?;
        let failures = IntCounterVec::new(
            Opts::new(
                "upload_failures_total",
                "Files put in `failed` by a permanent error, by reason.",
            ),
            &["reason"],
        )?;
        let lookups = IntCounterVec::new(
            Opts::new("lookups_total", "Look-ups answered, by answer."),
            &["answer"],
        )?;
        let lookup_index = IntGauge::new(
            "lookup_index_entries",
            "Stored files the look-up server answers from memory (0 while the index is built or off).",
        )?;
        let disk_free = IntGauge::new(
            "watch_root_free_bytes",
            "Space available to unprivileged users on the watch root's file system.",
        )?;
        let disk_size = IntGauge::new(
            "watch_root_size_bytes",
            "Size of the watch root's file system.",
        )?;
        let disk_full_in = prometheus::Gauge::new(
            "disk_full_in_seconds",
            "Forecast seconds until the watch root's file system is full at the recent net fill rate (+Inf while it is not filling).",
        )?;
        let heartbeat_age = prometheus::GaugeVec::new(
            Opts::new(
                "stage_heartbeat_age_seconds",
                "Time since each pipeline stage last showed progress.",
            ),
            &["stage"],
        )?;
        let healthy = IntGauge::new(
            "healthy",
            "1 while every stage makes progress (what /healthz and the watchdog check).",
        )?;
        let failed_over = IntGauge::new(
            "failed_over",
            "1 while uploads go to the standby store because the primary fails.",
        )?;
        let copy_back_pending = IntGauge::new(
            "copy_back_pending",
            "Objects stored on the standby that copy-back has still to copy to the primary (0 without copy-back).",
        )?;
        let copy_back_copied = IntCounter::new(
            "copy_back_copied_total",
            "Objects copied back from the standby to the primary, checked, and their rows moved.",
        )?;
        let copy_back_bytes = IntCounter::new(
            "copy_back_bytes_total",
            "Bytes copy-back sent to the primary (parts and objects it acknowledged).",
        )?;
        let notify_backlog = IntGaugeVec::new(
            Opts::new(
                "notify_backlog",
                "Events in the outbox not delivered yet, by receiver.",
            ),
            &["receiver"],
        )?;
        let notify_oldest = IntGaugeVec::new(
            Opts::new(
                "notify_oldest_seconds",
                "Age of the oldest undelivered event, by receiver (0 when none waits).",
            ),
            &["receiver"],
        )?;
        let notify_delivered = IntCounterVec::new(
            Opts::new(
                "notify_delivered_total",
                "Events a receiver acknowledged with 2xx, by receiver.",
            ),
            &["receiver"],
        )?;
        let notify_failures = IntCounterVec::new(
            Opts::new(
                "notify_failures_total",
                "Failed delivery attempts (retried), by receiver and reason.",
            ),
            &["receiver", "reason"],
        )?;
        let notify_dropped = IntCounterVec::new(
            Opts::new(
                "notify_dropped_total",
                "Events dropped undelivered by the outbox's bounds, by receiver and reason.",
            ),
            &["receiver", "reason"],
        )?;
        for st in State::ALL {
            files.with_label_values(&[st.as_str()]).set(0);
        }
        let lookup_known = LOOKUP_ANSWERS
            .iter()
            .map(|a| lookups.with_label_values(&[a]))
            .collect();
        registry.register(Box::new(files.clone()))?;
        registry.register(Box::new(waiting_bytes.clone()))?;
        registry.register(Box::new(oldest_waiting.clone()))?;
        registry.register(Box::new(uploaded_files.clone()))?;
        registry.register(Box::new(uploaded_bytes.clone()))?;
        registry.register(Box::new(upload_duration.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(failures.clone()))?;
        registry.register(Box::new(lookups.clone()))?;
        registry.register(Box::new(lookup_index.clone()))?;
        registry.register(Box::new(disk_free.clone()))?;
        registry.register(Box::new(disk_size.clone()))?;
        registry.register(Box::new(disk_full_in.clone()))?;
        registry.register(Box::new(heartbeat_age.clone()))?;
        registry.register(Box::new(healthy.clone()))?;
        registry.register(Box::new(failed_over.clone()))?;
        registry.register(Box::new(copy_back_pending.clone()))?;
        registry.register(Box::new(copy_back_copied.clone()))?;
        registry.register(Box::new(copy_back_bytes.clone()))?;
        registry.register(Box::new(notify_backlog.clone()))?;
        registry.register(Box::new(notify_oldest.clone()))?;
        registry.register(Box::new(notify_delivered.clone()))?;
        registry.register(Box::new(notify_failures.clone()))?;
        registry.register(Box::new(notify_dropped.clone()))?;
        Ok(Metrics {
            registry,
            files,
            waiting_bytes,
            oldest_waiting,
            uploaded_files,
            uploaded_bytes,
            upload_duration,
            retries,
            failures,
            lookups,
            lookup_known,
            lookup_index,
            disk_free,
            disk_size,
            disk_full_in,
            heartbeat_age,
            healthy,
            failed_over,
            copy_back_pending,
            copy_back_copied,
            copy_back_bytes,
            notify_backlog,
            notify_oldest,
            notify_delivered,
            notify_failures,
            notify_dropped,
        })
    }
}

/// `None` only if the fixed metric definitions were invalid, which the tests rule out; the
/// daemon then runs without metrics rather than not at all.
static METRICS: LazyLock<Option<Metrics>> = LazyLock::new(|| match Metrics::new() {
    Ok(m) => Some(m),
    Err(e) => {
        tracing::error!(error = %e, "cannot set up metrics");
        None
    }
});

fn with(f: impl FnOnce(&Metrics)) {
    if let Some(m) = METRICS.as_ref() {
        f(m)
    }
}

/// Prometheus text format (version 0.0.4) of every metric.
pub fn render() -> String {
    let Some(m) = METRICS.as_ref() else {
        return "# metrics are unavailable\n".to_string();
    };
    TextEncoder::new()
        .encode_to_string(&m.registry.gather())
        .unwrap_or_else(|e| format!("# cannot encode metrics: {e}\n"))
}

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Counts one look-up answer: `uploaded`, `pending`, `not_found`, `bad_path` or `error`
/// (other values are accepted, after [`label`] cleans them).
pub fn lookup(answer: &str) {
    with(|m| {
        match LOOKUP_ANSWERS
            .iter()
            .position(|a| *a == answer)
            .and_then(|i| m.lookup_known.get(i))
        {
            Some(c) => c.inc(),
            None => m.lookups.with_label_values(&[&label(answer)]).inc(),
        }
    });
}

/// Entries of the look-up index in use (0: being built, or off).
pub fn lookup_index_entries(n: usize) {
    with(|m| m.lookup_index.set(i64::try_from(n).unwrap_or(i64::MAX)));
}

/// A file stored and checked: its size and how long it took.
pub fn upload_complete(bytes: u64, elapsed: Duration) {
    with(|m| {
        m.uploaded_files.inc();
        m.uploaded_bytes.inc_by(bytes);
        m.upload_duration.observe(elapsed.as_secs_f64());
    });
}

/// Whether uploads go to the standby store.
pub fn set_failed_over(on: bool) {
    with(|m| m.failed_over.set(i64::from(on)));
}

/// Objects stored on the standby, waiting for copy-back.
pub fn copy_back_pending(n: u64) {
    with(|m| {
        m.copy_back_pending
            .set(i64::try_from(n).unwrap_or(i64::MAX))
    });
}

/// An object copied back to the primary (its row moved).
pub fn copy_back_copied() {
    with(|m| m.copy_back_copied.inc());
}

/// Bytes copy-back sent to the primary and had acknowledged.
pub fn copy_back_bytes(bytes: u64) {
    with(|m| m.copy_back_bytes.inc_by(bytes));
}

/// A request or attempt that will be retried.
pub fn upload_retry(reason: &str) {
    with(|m| m.retries.with_label_values(&[&label(reason)]).inc());
}

/// A file that failed permanently.
pub fn upload_failure(reason: &str) {
    with(|m| m.failures.with_label_values(&[&label(reason)]).inc());
}

/// A receiver's series exist from the start (at zero), so a dashboard sees them before the
/// first event.
pub fn notify_receiver(receiver: &str) {
    with(|m| {
        m.notify_delivered.with_label_values(&[receiver]);
        m.notify_backlog.with_label_values(&[receiver]);
        m.notify_oldest.with_label_values(&[receiver]);
    });
}

/// An event a receiver acknowledged.
pub fn notify_delivered(receiver: &str) {
    with(|m| m.notify_delivered.with_label_values(&[receiver]).inc());
}

/// A delivery attempt that failed (it is retried).
pub fn notify_failure(receiver: &str, reason: &str) {
    with(|m| {
        m.notify_failures
            .with_label_values(&[receiver, &label(reason)])
            .inc()
    });
}

/// Events dropped undelivered.
pub fn notify_dropped(receiver: &str, reason: &str, n: u64) {
    with(|m| {
        m.notify_dropped
            .with_label_values(&[receiver, reason])
            .inc_by(n)
    });
}

/// A receiver's backlog and the age of its oldest event (from the journal).
pub fn set_notify_backlog(receiver: &str, backlog: u64, oldest_secs: u64) {
    with(|m| {
        m.notify_backlog
            .with_label_values(&[receiver])
            .set(i64::try_from(backlog).unwrap_or(i64::MAX));
        m.notify_oldest
            .with_label_values(&[receiver])
            .set(i64::try_from(oldest_secs).unwrap_or(i64::MAX));
    });
}

/// The `reason` label for a store error.
pub fn store_reason(e: &StoreError) -> String {
    if let Some(code) = &e.code {
        return label(code);
    }
    if let Some(status) = e.status {
        return format!("http_{status}");
    }
    match e.kind {
        ErrorKind::Transient => "network",
        ErrorKind::Permanent => "permanent",
        ErrorKind::NoSuchUpload => "NoSuchUpload",
        ErrorKind::RestartUpload => "restart_upload",
        ErrorKind::Corrupt => "corrupt",
    }
    .to_string()
}

/// Keeps label values short and tame: what a store or caller sends is not trusted to be.
fn label(s: &str) -> String {
    if !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
    {
        s.to_string()
    } else {
        "other".to_string()
    }
}

/// The stages' heartbeat ages and the health verdict, refreshed by the daemon's monitor.
pub(crate) fn set_liveness(l: &Liveness) {
    with(|m| {
        for (stage, age) in l.ages() {
            m.heartbeat_age
                .with_label_values(&[stage])
                .set(age.as_secs_f64());
        }
        m.healthy.set(i64::from(l.health().is_ok()));
    });
}

/// Journal figures, refreshed by the daemon's monitor.
pub(crate) fn set_queue(q: &Queue) {
    with(|m| {
        for st in State::ALL {
            m.files
                .with_label_values(&[st.as_str()])
                .set(q.count(st) as i64);
        }
        m.waiting_bytes.set(q.waiting_bytes as i64);
        m.oldest_waiting.set(q.oldest_waiting_secs as i64);
    });
}

/// The disk forecast (`None`: not filling).
pub(crate) fn set_disk_full_in(secs: Option<f64>) {
    with(|m| m.disk_full_in.set(secs.unwrap_or(f64::INFINITY)));
}

/// Refreshes the watch root's free space.
pub(crate) fn set_disk(free: u64, size: u64) {
    with(|m| {
        m.disk_free.set(free.min(i64::MAX as u64) as i64);
        m.disk_size.set(size.min(i64::MAX as u64) as i64);
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn definitions_are_valid_and_render() {
        assert!(METRICS.is_some());
        lookup("pending");
        upload_complete(1234, Duration::from_millis(300));
        upload_retry(&store_reason(&StoreError {
            op: "upload_part",
            kind: ErrorKind::Transient,
            message: "x".into(),
            code: Some("SlowDown".into()),
            status: Some(503),
        }));
        let text = render();
        assert!(text.contains("record_offload_lookups_total{answer=\"pending\"}"));
        assert!(text.contains("record_offload_lookups_total{answer=\"not_found\"} 0"));
        assert!(text.contains("record_offload_upload_retries_total{reason=\"SlowDown\"}"));
        assert!(text.contains("record_offload_files{state=\"queued\"}"));
        assert!(text.contains("# TYPE record_offload_upload_duration_seconds histogram"));
    }

    #[test]
    fn reasons_and_labels() {
        let mut e = StoreError::new("put_object", ErrorKind::Transient, "timed out");
        assert_eq!(store_reason(&e), "network");
        e.status = Some(502);
        assert_eq!(store_reason(&e), "http_502");
        e.code = Some("Bad code with spaces\n".into());
        assert_eq!(store_reason(&e), "other");
        e.code = Some("AccessDenied".into());
        assert_eq!(store_reason(&e), "AccessDenied");
        assert_eq!(label(&"x".repeat(65)), "other");
        assert_eq!(label(""), "other");
    }
}
