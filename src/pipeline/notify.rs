//! Notifications: one delivery worker per `[[notify]]` receiver sends the events the journal's
//! outbox holds for it (the triggers of schema 5 wrote them in the transaction of the state
//! change they report).
//!
//! A worker sends its receiver's oldest event, and only that one, until the receiver answers
//! 2xx; then it deletes the event and goes on with the next. So events reach a receiver in
//! the order they were committed, and a file's later event always waits for its earlier one.
//! A failed attempt (no answer within `timeout_secs`, a refused connection, any status but
//! 2xx) is recorded on the event and retried after a delay that doubles per attempt, from
//! `notify_outbox.retry_initial_secs` up to `retry_max_secs`, with jitter. Delivery is at
//! least once: a kill between the receiver's answer and the delete sends the event again,
//! with the same `id` (receivers deduplicate by it).
//!
//! The outbox is bounded per receiver by `notify_outbox.max_events` (and, when set,
//! `max_age_secs`): beyond, the oldest events are dropped, each drop logged and counted in
//! `record_offload_notify_dropped_total`.
//!
//! # The request
//!
//! `POST` to the URL with a JSON body (see [`event_body`]) and
//! `X-Record-Offload-Signature: t=UNIX,v1=HEX` where HEX is
//! `hex(HMAC-SHA256(secret, "{t}.{body}"))`; also `X-Record-Offload-Event` (the event) and
//! `X-Record-Offload-Id` (the event id). The README has a receiver's verification.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use http::{Method, Request, header};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::Rng;
use sha2::Sha256;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::{NotifyEndpoint, NotifyOutboxConfig, receiver_label};
use crate::journal::{self, Durability, Journal, JournalError, OutboxRow, now_ms};
use crate::service::metrics;
use crate::util::failpoint;

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-record-offload-signature";
/// The event id header (also in the body).
pub const ID_HEADER: &str = "x-record-offload-id";
/// The event name header (also in the body).
pub const EVENT_HEADER: &str = "x-record-offload-event";

/// Builds a file's drop-in URL (this agent's legacy route) from its path under the root.
pub type LegacyUrl = Arc<dyn Fn(&Path) -> String + Send + Sync>;

/// What the workers need besides the journal.
#[derive(Clone)]
pub struct NotifyParams {
    pub node: String,
    pub receivers: Vec<NotifyEndpoint>,
    pub outbox: NotifyOutboxConfig,
    pub legacy_url: LegacyUrl,
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, String>;

/// Lists the configured receivers in the journal (dropping, with a log line and a count, the
/// events of receivers no longer configured). Runs before anything else can change a row, so
/// no state change of this run misses a receiver.
pub async fn register(params: &NotifyParams, journal: &Journal) -> Result<Vec<i64>, JournalError> {
    let wanted: Vec<(String, Vec<&'static str>)> = params
        .receivers
        .iter()
        .map(|r| (r.url.to_string(), r.events.clone()))
        .collect();
    let sync = journal
        .write(Durability::Normal, move |c| {
            journal::sync_receivers(c, &wanted)
        })
        .await?;
    for (url, n) in &sync.removed {
        let label = receiver_label(url);
        if *n > 0 {
            warn!(receiver = %label, dropped = n, "a receiver is no longer in [[notify]]: its undelivered events are dropped");
            metrics::notify_dropped(&label, "receiver_removed", *n);
        } else {
            info!(receiver = %label, "a receiver is no longer in [[notify]]");
        }
    }
    Ok(sync.receivers.iter().map(|r| r.id).collect())
}

/// Registers the receivers and starts one worker per receiver on `tracker`.
pub async fn start(
    params: NotifyParams,
    journal: &Journal,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> Result<(), JournalError> {
    let ids = register(&params, journal).await?;
    if params.receivers.is_empty() {
        return Ok(());
    }
    let Some(client) = client() else {
        return Ok(());
    };
    let epoch = journal.read(journal::outbox_epoch).await?;
    let params = Arc::new(params);
    for (i, id) in ids.into_iter().enumerate() {
        let worker = Worker {
            params: params.clone(),
            index: i,
            endpoint: id,
            label: params
                .receivers
                .get(i)
                .map(|r| receiver_label(r.url.as_str()))
                .unwrap_or_default(),
            epoch,
            client: client.clone(),
            journal: journal.clone(),
        };
        metrics::notify_receiver(&worker.label);
        tracker.spawn(worker.run(cancel.clone()));
    }
    Ok(())
}

/// An HTTP(S) client with the system's trusted roots (plain HTTP too); `None` when TLS cannot
/// be set up at all.
fn client() -> Option<HttpsClient> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = match hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(provider.clone())
    {
        Ok(b) => b,
        Err(e) => {
            warn!(error = %e, "no system TLS roots: https:// receivers will fail to connect");
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map(|b| {
                    b.with_root_certificates(rustls::RootCertStore::empty())
                        .with_no_client_auth()
                });
            match config {
                Ok(c) => hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(c),
                Err(e) => {
                    warn!(error = %e, "cannot set up TLS: notifications wait in the outbox");
                    return None;
                }
            }
        }
    };
    let connector = builder.https_or_http().enable_http1().build();
    Some(
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector),
    )
}

struct Worker {
    params: Arc<NotifyParams>,
    index: usize,
    endpoint: i64,
    label: String,
    epoch: i64,
    client: HttpsClient,
    journal: Journal,
}

/// Why a delivery failed: the metric's reason and a message for the outbox row and the log.
struct Failure {
    reason: String,
    message: String,
}

impl Worker {
    fn receiver(&self) -> Option<&NotifyEndpoint> {
        self.params.receivers.get(self.index)
    }

    async fn run(self, cancel: CancellationToken) {
        let poll = Duration::from_secs_f64(self.params.outbox.poll_secs);
        let mut last_trim: Option<tokio::time::Instant> = None;
        loop {
            if cancel.is_cancelled() {
                break;
            }
            if last_trim.is_none_or(|t| t.elapsed() >= poll) {
                self.trim().await;
                last_trim = Some(tokio::time::Instant::now());
            }
            let endpoint = self.endpoint;
            let head = self
                .journal
                .read(move |c| journal::outbox_head(c, endpoint))
                .await;
            let wait = match head {
                Err(e) => {
                    warn!(receiver = %self.label, error = %e, "cannot read the notification outbox");
                    poll
                }
                Ok(None) => poll,
                Ok(Some(row)) => {
                    let now = now_ms();
                    if row.next_ms > now {
                        Duration::from_millis((row.next_ms - now) as u64).min(poll)
                    } else {
                        tokio::select! {
                            _ = cancel.cancelled() => break,
                            () = self.deliver(row) => {}
                        }
                        continue;
                    }
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        debug!(receiver = %self.label, "notification worker stopped");
    }

    /// Applies the outbox's bounds, logging and counting what they drop.
    async fn trim(&self) {
        let ob = &self.params.outbox;
        let max = ob.max_events;
        let before = (ob.max_age_secs > 0.0).then(|| now_ms() - (ob.max_age_secs * 1000.0) as i64);
        let endpoint = self.endpoint;
        let over = self
            .journal
            .read(move |c| journal::outbox_over_bounds(c, endpoint, max, before))
            .await;
        if !matches!(over, Ok(true)) {
            return;
        }
        match self
            .journal
            .write(Durability::Normal, move |c| {
                journal::outbox_trim(c, endpoint, max, before)
            })
            .await
        {
            Ok(t) => {
                if t.full > 0 {
                    warn!(receiver = %self.label, dropped = t.full, max_events = max,
                        "notification outbox full: the oldest undelivered events are dropped");
                    metrics::notify_dropped(&self.label, "outbox_full", t.full);
                }
                if t.expired > 0 {
                    warn!(receiver = %self.label, dropped = t.expired, max_age_secs = ob.max_age_secs,
                        "undelivered events older than notify_outbox.max_age_secs are dropped");
                    metrics::notify_dropped(&self.label, "expired", t.expired);
                }
            }
            Err(e) => {
                warn!(receiver = %self.label, error = %e, "cannot trim the notification outbox")
            }
        }
    }

    async fn deliver(&self, row: OutboxRow) {
        let Some(receiver) = self.receiver() else {
            return;
        };
        let id = event_id(&self.params.node, self.epoch, row.seq);
        let seq = row.seq;
        let body = match &row.body {
            Some(b) => b.clone(),
            None => {
                let b = event_body(
                    &id,
                    &self.params.node,
                    &row,
                    &(self.params.legacy_url)(&row.path),
                );
                match self
                    .journal
                    .write(Durability::Normal, move |c| {
                        journal::outbox_set_body(c, seq, &b)
                    })
                    .await
                {
                    Ok(b) => b,
                    Err(e) => {
                        warn!(receiver = %self.label, error = %e, "cannot record an event's document");
                        return;
                    }
                }
            }
        };
        failpoint::hit("notify-before-send");
        let result = send(&self.client, receiver, &id, &row.event, body).await;
        match result {
            Ok(()) => {
                failpoint::hit("notify-after-send");
                metrics::notify_delivered(&self.label);
                debug!(receiver = %self.label, id = %id, "event delivered");
                if let Err(e) = self
                    .journal
                    .write(Durability::Normal, move |c| {
                        journal::outbox_delivered(c, seq)
                    })
                    .await
                {
                    // It is sent again later, with the same id.
                    warn!(receiver = %self.label, error = %e, "cannot record a delivered event");
                }
            }
            Err(f) => {
                metrics::notify_failure(&self.label, &f.reason);
                let ob = &self.params.outbox;
                let delay = backoff(ob.retry_initial_secs, ob.retry_max_secs, row.attempts);
                let next = now_ms() + delay.as_millis() as i64;
                if row.attempts == 0 {
                    warn!(receiver = %self.label, id = %id, error = %f.message,
                        retry_in_secs = delay.as_secs_f64(), "notification not delivered; retrying");
                } else {
                    debug!(receiver = %self.label, id = %id, error = %f.message,
                        attempts = row.attempts + 1, "notification not delivered; retrying");
                }
                let msg = f.message;
                if let Err(e) = self
                    .journal
                    .write(Durability::Normal, move |c| {
                        journal::outbox_failed(c, seq, &msg, next)
                    })
                    .await
                {
                    warn!(receiver = %self.label, error = %e, "cannot record a failed delivery");
                }
            }
        }
    }
}

/// The delay before attempt `attempts + 1`: doubling from `initial`, capped at `max`, with
/// up to 25 % jitter taken off so that receivers coming back are not hit all at once.
pub fn backoff(initial: f64, max: f64, attempts: i64) -> Duration {
    let exp = initial * 2f64.powi(attempts.clamp(0, 30) as i32);
    let capped = exp.min(max).max(0.0);
    let jitter = rand::rng().random_range(0.75..=1.0);
    Duration::from_secs_f64(capped * jitter)
}

/// `NODE-EPOCH-SEQ`: unique per event across restarts and journals; the same on every retry.
pub fn event_id(node: &str, epoch: i64, seq: i64) -> String {
    format!("{node}-{epoch:08x}-{seq}")
}

/// The event's JSON document, built from the outbox row at the first attempt and kept in it
/// (`body`), so every retry sends the same bytes.
pub fn event_body(id: &str, node: &str, row: &OutboxRow, legacy_url: &str) -> String {
    let state = match row.event.as_str() {
        "stored" => "uploaded",
        other => other,
    };
    let time = chrono::DateTime::from_timestamp_millis(row.at_ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default();
    let mut v = serde_json::json!({
        "id": id,
        "event": row.event,
        "node": node,
        "path": row.path.to_string_lossy(),
        "legacy_url": legacy_url,
        "key": row.key,
        "size": row.size,
        "md5": row.md5,
        "crc64": row.crc64,
        "store": row.store.as_deref().unwrap_or("primary"),
        "state": state,
        "time": time,
    });
    if let (Some(e), Some(obj)) = (&row.error, v.as_object_mut()) {
        obj.insert("error".to_string(), serde_json::Value::String(e.clone()));
    }
    v.to_string()
}

/// `t=UNIX,v1=hex(HMAC-SHA256(secret, "{t}.{body}"))`.
pub fn signature(secret: &str, unix: i64, body: &str) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        // HMAC takes keys of any length; this is unreachable.
        Err(_) => return format!("t={unix},v1="),
    };
    mac.update(unix.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!("t={unix},v1={}", hex::encode(mac.finalize().into_bytes()))
}

async fn send(
    client: &HttpsClient,
    receiver: &NotifyEndpoint,
    id: &str,
    event: &str,
    body: String,
) -> Result<(), Failure> {
    let unix = now_ms() / 1000;
    let sig = signature(&receiver.secret, unix, &body);
    let req = Request::builder()
        .method(Method::POST)
        .uri(receiver.url.as_str())
        .header(header::CONTENT_TYPE, "application/json")
        .header(
            header::USER_AGENT,
            concat!("record-offload/", env!("CARGO_PKG_VERSION")),
        )
        .header(SIGNATURE_HEADER, sig)
        .header(ID_HEADER, id)
        .header(EVENT_HEADER, event)
        .body(body)
        .map_err(|e| Failure {
            reason: "request".to_string(),
            message: format!("cannot build the request: {e}"),
        })?;
    let answer = tokio::time::timeout(receiver.timeout, async {
        let resp = client.request(req).await?;
        let status = resp.status();
        // Read (and discard) the answer, so the connection can be reused.
        let mut body = resp.into_body();
        while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
            if frame.is_err() {
                break;
            }
        }
        Ok::<_, hyper_util::client::legacy::Error>(status)
    })
    .await;
    match answer {
        Err(_) => Err(Failure {
            reason: "timeout".to_string(),
            message: format!("no answer within {:.1} s", receiver.timeout.as_secs_f64()),
        }),
        Ok(Err(e)) => Err(Failure {
            reason: if e.is_connect() { "connect" } else { "network" }.to_string(),
            message: format!(
                "{e}: {}",
                std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            ),
        }),
        Ok(Ok(status)) if status.is_success() => Ok(()),
        Ok(Ok(status)) => Err(Failure {
            reason: format!("http_{}", status.as_u16()),
            message: format!("the receiver answered {status}"),
        }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_a_known_value() {
        // python3: hmac.new(b'k', b'1700000000.{"a":1}', hashlib.sha256).hexdigest()
        let s = signature("k", 1_700_000_000, r#"{"a":1}"#);
        assert_eq!(
            s,
            "t=1700000000,v1=1b6ad1bc9bf48c52ce01939866d5877c6cc4e87ddad27e16673cb8c4964394a3"
        );
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        for attempts in 0..40 {
            let d = backoff(1.0, 300.0, attempts).as_secs_f64();
            let full = (2f64.powi(attempts.min(30) as i32)).min(300.0);
            assert!(d <= full && d >= full * 0.75, "{attempts}: {d}");
        }
    }
}
