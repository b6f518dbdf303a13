//! The pipeline under store faults, injected by a proxy between the daemon and a real
//! S3-compatible server: outages, refused connections, 5xx answers, cut and damaged bodies,
//! slow answers, permanent refusals, random 5xx answers, a store throttled to 1 MiB/s; and a
//! file that changes while it is being uploaded.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::harness::*;
use common::proxy::{Fault, FaultProxy};
use record_offload::journal::{self, State};

const T: Duration = Duration::from_secs(60);

struct Batch {
    files: Vec<(String, Vec<u8>)>,
}

/// A mixed batch under `dir`: small files and multi-part ones (with 5 MiB parts).
fn batch(env: &Env, dir: &str, n_small: usize, n_big: usize) -> Batch {
    let mut files = Vec::new();
    for i in 0..n_small {
        files.push((format!("{dir}/s{i}.mp4"), bytes(10_000 + i * 997, i as u64)));
    }
    for i in 0..n_big {
        files.push((
            format!("{dir}/b{i}.mp4"),
            bytes(11 * 1024 * 1024 + i * 4099, 100 + i as u64),
        ));
    }
    for (rel, data) in &files {
        env.write(rel, data);
    }
    Batch { files }
}

impl Batch {
    async fn assert_all_stored(&self, env: &Env) {
        for (rel, data) in &self.files {
            let row = env.wait_state(rel, State::Deleted, T).await;
            assert_eq!(row.md5.as_deref(), Some(md5_hex(data).as_str()), "{rel}");
            let got = env.get(&env.key(rel)).await.unwrap();
            assert!(got == *data, "{rel}: stored bytes differ");
            assert!(!env.root.join(rel).exists());
        }
    }

    /// Like [`Batch::assert_all_stored`], and while waiting checks, every few milliseconds,
    /// that no local file is gone before its object is complete and byte-identical.
    async fn assert_all_stored_watching(&self, env: &Env) {
        let start = std::time::Instant::now();
        let mut gone: HashSet<&str> = HashSet::new();
        loop {
            for (rel, data) in &self.files {
                if gone.contains(rel.as_str()) || env.root.join(rel).exists() {
                    continue;
                }
                let stored = std::fs::read(env.server.object_path(BUCKET, &env.key(rel)))
                    .unwrap_or_else(|_| panic!("{rel} deleted but not stored"));
                assert!(stored == *data, "{rel} deleted but its object differs");
                gone.insert(rel);
            }
            if gone.len() == self.files.len() {
                break;
            }
            assert!(
                start.elapsed() < T,
                "not all stored in time: {:?}",
                self.files
                    .iter()
                    .filter(|(r, _)| !gone.contains(r.as_str()))
                    .map(|(r, _)| (r, env.row(r)))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.assert_all_stored(env).await;
    }

    fn assert_none_deleted(&self, env: &Env) {
        self.assert_none_deleted_over(env, 0);
    }

    /// Checks the files of at least `min_size` bytes.
    fn assert_none_deleted_over(&self, env: &Env, min_size: usize) {
        for (rel, data) in self.files.iter().filter(|(_, d)| d.len() >= min_size) {
            let on_disk = std::fs::read(env.root.join(rel)).unwrap();
            assert!(on_disk == *data, "{rel} changed or went away");
            let st = env.state(rel);
            assert!(
                !matches!(st, Some(State::Uploaded | State::Deleted)),
                "{rel} is {st:?} while the store is down"
            );
        }
    }
}

/// `record_offload_upload_retries_total` by reason, from the process-wide registry (shared by
/// the tests of this file running in parallel: compare before and after, by a reason no
/// other test produces where it matters).
fn retries_by_reason() -> BTreeMap<String, u64> {
    let text = record_offload::service::metrics::render();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("record_offload_upload_retries_total{reason=\"") else {
            continue;
        };
        let (reason, value) = rest.split_once("\"} ").unwrap();
        out.insert(
            reason.to_string(),
            value.trim().parse::<f64>().unwrap() as u64,
        );
    }
    out
}

fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, reason: &str) -> u64 {
    after.get(reason).copied().unwrap_or(0) - before.get(reason).copied().unwrap_or(0)
}

fn total_delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> u64 {
    after.values().sum::<u64>() - before.values().sum::<u64>()
}

fn config(env: &Env, proxy: &FaultProxy) -> record_offload::config::Settings {
    env.config_at(&format!("http://{}", proxy.addr()), |c| {
        c.upload.part_size_mib = 5;
        c.upload.concurrency = 3;
        c.upload.request_timeout_secs = 2.0;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_down_then_back_loses_nothing() {
    let env = Env::new().await;
    let proxy = FaultProxy::start(env.server.addr).await.unwrap();
    proxy.set(Fault::Down);
    let d = env.start(config(&env, &proxy)).await;
    let b = batch(&env, "a", 5, 2);
    // Let the daemon fail against the dead store for a while, then refuse connections too.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.set(Fault::Refuse);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    b.assert_none_deleted(&env);
    let rows = env.rows();
    assert!(!rows.is_empty());
    assert!(
        rows.iter().all(|r| r.last_error.is_some()),
        "failures are recorded: {rows:?}"
    );
    assert!(
        rows.iter().all(|r| r.state != State::Failed),
        "an outage is not permanent"
    );
    assert!(d.uploader.stats.retries.load(Ordering::Relaxed) > 0);

    proxy.set(Fault::None);
    b.assert_all_stored(&env).await;
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_second_request_answered_5xx() {
    let env = Env::new().await;
    let proxy = FaultProxy::start(env.server.addr).await.unwrap();
    proxy.set(Fault::Status {
        status: 503,
        code: "SlowDown".into(),
        every: 2,
    });
    let d = env.start(config(&env, &proxy)).await;
    let b = batch(&env, "a", 6, 2);
    b.assert_all_stored(&env).await;
    assert!(proxy.stats().injected > 0);
    assert!(d.uploader.stats.retries.load(Ordering::Relaxed) > 0);
    proxy.set(Fault::Status {
        status: 500,
        code: "InternalError".into(),
        every: 3,
    });
    let b = batch(&env, "b", 3, 1);
    b.assert_all_stored(&env).await;
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_mid_part() {
    let env = Env::new().await;
    let proxy = FaultProxy::start(env.server.addr).await.unwrap();
    proxy.set(Fault::CutRequestBody {
        after_bytes: 1024 * 1024,
    });
    let d = env.start(config(&env, &proxy)).await;
    let b = batch(&env, "a", 2, 2);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Small files pass under the cut; every part is cut.
    b.assert_none_deleted_over(&env, 1024 * 1024);
    assert!(proxy.stats().injected > 0, "no part was cut");
    proxy.set(Fault::None);
    b.assert_all_stored(&env).await;
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_bodies_are_detected_and_sent_again() {
    let env = Env::new().await;
    let proxy = FaultProxy::start(env.server.addr).await.unwrap();
    // The server does not check Content-MD5; the ETag comparison must catch it.
    proxy.set(Fault::CorruptRequestBody { every: 2 });
    let d = env.start(config(&env, &proxy)).await;
    let b = batch(&env, "a", 4, 2);
    b.assert_all_stored(&env).await;
    assert!(proxy.stats().forwarded > 0);
    assert!(d.uploader.stats.retries.load(Ordering::Relaxed) > 0);
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_slower_than_the_timeout() {
    let env = Env::new().await;
    let proxy = FaultProxy::start(env.server.addr).await.unwrap();
    proxy.set(Fault::DelayResponse(Duration::from_secs(4)));
    let d = env.start(config(&env, &proxy)).await;
    let b = batch(&env, "a", 2, 1);
    tokio::time::sleep(Duration::from_secs(3)).await;
    b.assert_none_deleted(&env);
    proxy.set(Fault::None);
    b.assert_all_stored(&env).await;
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_denied_is_permanent_until_retry() {
    let env = Env::new().await;
    let proxy = FaultProxy::start(env.server.addr).await.unwrap();
    proxy.set(Fault::Status {
        status: 403,
        code: "AccessDenied".into(),
        every: 1,
    });
    let d = env.start(config(&env, &proxy)).await;
    env.write("denied.mp4", b"denied for now");
    let row = env.wait_state("denied.mp4", State::Failed, T).await;
    assert!(row.last_error.unwrap().contains("AccessDenied"));
    let requests = proxy.stats().requests;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        proxy.stats().requests,
        requests,
        "a failed row is not retried by itself"
    );
    assert!(env.root.join("denied.mp4").exists());

    proxy.set(Fault::None);
    let conn = journal::open_rw(&env.journal_path).unwrap();
    let key_of = |rel: &std::path::Path| Ok(env.key(&rel.to_string_lossy()));
    assert_eq!(
        journal::requeue_failed(&conn, Some(row.id), &key_of)
            .unwrap()
            .queued,
        1
    );
    env.wait_state("denied.mp4", State::Deleted, T).await;
    assert_eq!(
        env.get(&env.key("denied.mp4")).await.unwrap(),
        b"denied for now"
    );
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_modified_during_upload_is_not_deleted_but_uploaded_again() {
    let env = Env::new().await;
    let proxy = FaultProxy::start(env.server.addr).await.unwrap();
    // About 3 s for the 12 MiB file: time to change it in the middle.
    proxy.set(Fault::Throttle {
        bytes_per_sec: 4 * 1024 * 1024,
    });
    let d = env.start(config(&env, &proxy)).await;
    let first = bytes(12 * 1024 * 1024, 7);
    let path = env.write("growing.mp4", &first);
    wait_until("upload under way", T, || {
        env.row("growing.mp4")
            .is_some_and(|r| r.state == State::Uploading && r.bytes_sent > 0)
    })
    .await;
    // The recorder appends more (a new close_write follows).
    let more = bytes(3 * 1024 * 1024, 8);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    f.write_all(&more).unwrap();
    drop(f);
    let mut whole = first.clone();
    whole.extend_from_slice(&more);

    // Until the second upload is complete the file stays on disk.
    let start = std::time::Instant::now();
    loop {
        let row = env.row("growing.mp4").unwrap();
        if row.state == State::Deleted {
            break;
        }
        if !path.exists() {
            // Gone between the two reads: then the row must already say the final file is
            // stored (the unlink follows the `uploaded` commit).
            let row = env.row("growing.mp4").unwrap();
            assert!(
                matches!(row.state, State::Uploaded | State::Deleted)
                    && row.size == whole.len() as u64,
                "deleted before the changed file was stored: {row:?}"
            );
        }
        assert!(start.elapsed() < T, "not stored in time: {row:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let row = env.row("growing.mp4").unwrap();
    assert!(row.generation >= 1, "the change was not noticed");
    assert_eq!(row.size, whole.len() as u64);
    assert_eq!(row.md5.as_deref(), Some(md5_hex(&whole).as_str()));
    let got = env.get(&env.key("growing.mp4")).await.unwrap();
    assert!(got == whole, "stored object is not the final file");
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifth_of_requests_answered_500_503_slowdown_at_random() {
    let env = Env::new().await;
    let proxy = FaultProxy::start(env.server.addr).await.unwrap();
    proxy.set(Fault::RandomStatus {
        percent: 20,
        answers: vec![
            (500, "InternalError".into()),
            (503, "ServiceUnavailable".into()),
            (503, "SlowDown".into()),
        ],
        seed: 0x5eed,
    });
    let before = retries_by_reason();
    let d = env.start(config(&env, &proxy)).await;
    let b = batch(&env, "a", 12, 3);
    b.assert_all_stored_watching(&env).await;
    let injected = proxy.stats().injected;
    assert!(injected > 0, "nothing was injected");
    let after = retries_by_reason();
    let own = d.uploader.stats.retries.load(Ordering::Relaxed);
    assert!(own > 0, "no retry");
    // Other tests of this file add to the same counters, never take away: every retry of
    // this daemon must be in there.
    assert!(
        total_delta(&before, &after) >= own,
        "{own} retries, not all in the metrics: {before:?} -> {after:?}"
    );
    let answered: u64 = [
        "ServiceUnavailable",
        "SlowDown",
        "InternalError",
        "http_503",
        "http_500",
    ]
    .iter()
    .map(|r| delta(&before, &after, r))
    .sum();
    assert!(answered > 0, "{before:?} -> {after:?}");
    assert!(env.server.open_uploads().is_empty());
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_throttled_to_1_mib_per_second() {
    let env = Env::new().await;
    let proxy = FaultProxy::start(env.server.addr).await.unwrap();
    // Per connection: with 3 requests carrying data, about 3 MiB/s in all.
    proxy.set(Fault::Throttle {
        bytes_per_sec: 1024 * 1024,
    });
    let d = env
        .start(env.config_at(&format!("http://{}", proxy.addr()), |c| {
            c.upload.part_size_mib = 5;
            c.upload.concurrency = 3;
            c.upload.request_timeout_secs = 10.0;
        }))
        .await;
    let b = batch(&env, "a", 8, 1);
    b.assert_all_stored_watching(&env).await;
    // 5 MiB parts take 5 s each at this rate: a slow store that answers is waited for,
    // never cut and sent again.
    assert_eq!(
        d.uploader.stats.retries.load(Ordering::Relaxed),
        0,
        "a slow upload was cut: {:?}",
        env.rows()
            .iter()
            .filter_map(|r| r.last_error.clone())
            .collect::<Vec<_>>()
    );
    let total: u64 = b.files.iter().map(|(_, d)| d.len() as u64).sum();
    assert!(proxy.stats().request_body_bytes >= total);
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_refused_while_a_batch_uploads() {
    let env = Env::new().await;
    let proxy = FaultProxy::start(env.server.addr).await.unwrap();
    // Slow enough that the batch is under way when the store starts refusing.
    proxy.set(Fault::Throttle {
        bytes_per_sec: 4 * 1024 * 1024,
    });
    let before = retries_by_reason();
    let d = env.start(config(&env, &proxy)).await;
    let b = batch(&env, "a", 6, 2);
    wait_until("an upload under way", T, || {
        env.rows().iter().any(|r| r.bytes_sent > 0)
    })
    .await;
    proxy.set(Fault::Refuse);
    // Requests in flight finish; every new connection is refused.
    let watch = b.assert_all_stored_watching(&env);
    tokio::pin!(watch);
    tokio::select! {
        () = &mut watch => panic!("everything stored while the store refused connections"),
        () = tokio::time::sleep(Duration::from_secs(3)) => {}
    }
    let refused = env
        .rows()
        .into_iter()
        .filter_map(|r| r.last_error)
        .any(|e| e.contains("onnection refused"));
    assert!(refused, "no refused connection recorded: {:?}", env.rows());
    assert!(env.rows().iter().all(|r| r.state != State::Failed));
    proxy.set(Fault::None);
    watch.await;
    let after = retries_by_reason();
    let own = d.uploader.stats.retries.load(Ordering::Relaxed);
    assert!(own > 0, "no retry");
    assert!(
        total_delta(&before, &after) >= own && delta(&before, &after, "network") > 0,
        "{own} retries, not all in the metrics: {before:?} -> {after:?}"
    );
    assert!(env.server.open_uploads().is_empty());
    d.shutdown();
    d.wait().await;
}

/// How concurrency is chosen: a part holds one of `upload.concurrency`, a small object its
/// share of a part, so many small files are in flight at once (on a link with a long round trip
/// each spends most of its request waiting for the answer) while parts stay within
/// `concurrency` and the bytes in flight within `concurrency × part size`. Slow answers keep
/// every request in flight long enough to be counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_files_go_many_at_once_parts_stay_within_concurrency() {
    let env = Env::new().await;
    let proxy = FaultProxy::start(env.server.addr).await.unwrap();
    proxy.set(Fault::DelayResponse(Duration::from_millis(300)));
    let d = env
        .start(env.config_at(&format!("http://{}", proxy.addr()), |c| {
            c.upload.part_size_mib = 5;
            c.upload.concurrency = 2;
            c.upload.request_timeout_secs = 10.0;
        }))
        .await;
    let b = batch(&env, "a", 40, 3);
    b.assert_all_stored(&env).await;
    let s = proxy.stats();
    // 40 small files (10 KB each: one unit of the 32 that concurrency 2 gives) against 2 at a
    // time before; whole parts of 5 MiB never more than 2 at once (the 1 MiB last parts take
    // their share, 4 units, beside them).
    assert!(s.peak_bodies >= 8, "small files went few at a time: {s:?}");
    assert!(
        s.peak_large_bodies <= 2,
        "more parts than concurrency: {s:?}"
    );
    // (Completions carry a short list of parts outside the bound: 64 KiB of slack.)
    assert!(
        s.peak_body_bytes <= 2 * 5 * 1024 * 1024 + 64 * 1024,
        "more bytes in flight than concurrency × part size: {s:?}"
    );
    assert_eq!(s.injected, 0);
    d.shutdown();
    d.wait().await;
}

/// Slots to send go to the oldest file first: in a batch of large files written at once the
/// first file's parts go out before the others', so it completes (and the store's work to
/// complete it overlaps later transfers) long before the batch ends, and files complete in
/// the order they were recorded. With slots handed out in the order parts asked for them the
/// files' parts interleave and every file completes at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_files_go_out_oldest_first_and_complete_one_after_another() {
    let env = Env::new().await;
    let proxy = FaultProxy::start(env.server.addr).await.unwrap();
    proxy.set(Fault::DelayResponse(Duration::from_millis(300)));
    // Written before the daemon starts: its start-up scan queues all four at once, so they
    // compete for slots from the first request.
    let files: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| (format!("big/f{i}.mp4"), bytes(50 * 1024 * 1024, 700 + i)))
        .collect();
    for (rel, data) in &files {
        env.write(rel, data);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let d = env
        .start(env.config_at(&format!("http://{}", proxy.addr()), |c| {
            c.upload.part_size_mib = 5;
            c.upload.concurrency = 2;
        }))
        .await;
    for (rel, data) in &files {
        let row = env.wait_state(rel, State::Deleted, T).await;
        assert_eq!(row.md5.as_deref(), Some(md5_hex(data).as_str()), "{rel}");
    }
    // Which key each upload id belongs to, and each key's journal id.
    let log = env.server.requests();
    let mut key_of = BTreeMap::new();
    let id_of: BTreeMap<String, i64> = files
        .iter()
        .map(|(rel, _)| (env.key(rel), env.row(rel).unwrap().id))
        .collect();
    let mut parts_before_first_completion = None;
    let mut parts = 0;
    let mut completed = Vec::new();
    for r in &log {
        let uid = url::form_urlencoded::parse(r.query.as_bytes())
            .find(|(k, _)| k == "uploadId")
            .map(|(_, v)| v.into_owned());
        let key = id_of.keys().find(|k| r.path.ends_with(k.as_str())).cloned();
        if let (Some(uid), Some(key)) = (uid, key) {
            key_of.insert(uid, key.clone());
            if r.method == "PUT" && r.has_param("partNumber") {
                parts += 1;
            } else if r.method == "POST" {
                parts_before_first_completion.get_or_insert(parts);
                completed.push(id_of[&key]);
            }
        }
    }
    assert_eq!(parts, 40, "4 files of 10 parts");
    assert_eq!(completed.len(), 4);
    let mut sorted = completed.clone();
    sorted.sort();
    assert_eq!(
        completed, sorted,
        "files completed out of the order recorded"
    );
    let first = parts_before_first_completion.unwrap();
    assert!(
        first <= 24,
        "the first file completed only after {first} of 40 parts: parts interleaved"
    );
    d.shutdown();
    d.wait().await;
}

/// At start, a backlog of small files does not wait for the look for stray multipart uploads
/// (a ListMultipartUploads that takes a round trip or more): their PutObjects go at once. No
/// multipart upload is created or resumed until that look is over, since one created
/// meanwhile could be listed before its id is recorded and aborted as a stray.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_files_go_while_strays_are_looked_for_multipart_waits() {
    let env = Env::new().await;
    let proxy = FaultProxy::start(env.server.addr).await.unwrap();
    // Every answer (the listing's first) reaches the daemon 5 s late.
    proxy.set(Fault::DelayResponse(Duration::from_secs(5)));
    let small = bytes(100_000, 31);
    let big = bytes(11 * 1024 * 1024, 32);
    for (rel, data) in [("s.mp4", &small), ("b.mp4", &big)] {
        age(&env.write(rel, data), 10);
    }
    let started = std::time::Instant::now();
    let d = env
        .start(env.config_at(&format!("http://{}", proxy.addr()), |c| {
            c.upload.part_size_mib = 5;
        }))
        .await;
    let small_key = env.key("s.mp4");
    let sent = |method: &str, path_end: &str, param: &str| {
        env.server
            .requests()
            .iter()
            .any(|r| r.method == method && r.path.ends_with(path_end) && r.has_param(param))
    };
    let small_put = |r: &record_offload::devserver::Recorded| {
        r.method == "PUT" && r.path.ends_with(&small_key) && !r.has_param("partNumber")
    };
    // The small file's PutObject reaches the store well before the listing's answer (5 s)
    // can have reached the daemon.
    wait_until("the small file's PutObject", Duration::from_secs(4), || {
        env.server.requests().iter().any(small_put)
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the check came too late to tell"
    );
    assert!(
        !sent("POST", &env.key("b.mp4"), "uploads"),
        "a multipart upload was created while strays were still being looked for"
    );
    proxy.set(Fault::None);
    for (rel, data) in [("s.mp4", &small), ("b.mp4", &big)] {
        let row = env.wait_state(rel, State::Deleted, T).await;
        assert_eq!(row.md5.as_deref(), Some(md5_hex(data).as_str()), "{rel}");
        assert_eq!(env.get(&env.key(rel)).await.as_deref(), Some(&data[..]));
    }
    // The listing went first; the multipart upload was created after its answer.
    let log = env.server.requests();
    let listing = log
        .iter()
        .position(|r| r.method == "GET" && r.has_param("uploads"))
        .expect("no ListMultipartUploads");
    let create = log
        .iter()
        .position(|r| r.method == "POST" && r.has_param("uploads"))
        .expect("no CreateMultipartUpload");
    assert!(listing < create);
    assert!(env.server.open_uploads().is_empty());
    d.shutdown();
    d.wait().await;
}
