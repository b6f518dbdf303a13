//! The pipeline under store faults, injected by a proxy between the daemon and a real
//! S3-compatible server: outages, refused connections, 5xx answers, cut and damaged bodies,
//! slow answers, permanent refusals; and a file that changes while it is being uploaded.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

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
    assert_eq!(journal::requeue_failed(&conn, Some(row.id)).unwrap(), 1);
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
