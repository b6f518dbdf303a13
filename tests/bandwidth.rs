//! `upload.max_bytes_per_sec` and `upload.windows` against the real server.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use chrono::Timelike;
use common::harness::*;
use common::proxy::FaultProxy;
use record_offload::journal::State;

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_limit_paces_uploads_without_cutting_them() {
    let env = Env::new().await;
    let d = env
        .start(env.config(|c| {
            c.upload.part_size_mib = 5;
            c.upload.max_bytes_per_sec = 4 * 1024 * 1024;
            // Shorter than a part takes at this rate: the deadline must allow for the limit,
            // and no stalled-stream check may cut the slowed body.
            c.upload.request_timeout_secs = 0.5;
        }))
        .await;
    let big = bytes(7 * 1024 * 1024, 1); // two parts
    let small = bytes(700 * 1024, 2); // one PutObject
    let start = Instant::now();
    env.write("a/big.mp4", &big);
    env.write("a/small.mp4", &small);
    env.wait_state("a/big.mp4", State::Deleted, T).await;
    env.wait_state("a/small.mp4", State::Deleted, T).await;
    let elapsed = start.elapsed();
    // 7.7 MiB at 4 MiB/s, less the initial burst, after 0.3 s of settling.
    assert!(
        elapsed >= Duration::from_millis(1600),
        "not paced: {elapsed:?}"
    );
    assert!(env.get(&env.key("a/big.mp4")).await.unwrap() == big);
    assert!(env.get(&env.key("a/small.mp4")).await.unwrap() == small);
    let rows = env.rows();
    assert!(
        rows.iter().all(|r| r.attempts == 0),
        "a paced body was cut: {rows:?}"
    );
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_sent_outside_the_upload_windows() {
    let env = Env::new().await;
    let proxy = FaultProxy::start(env.server.addr).await.unwrap();
    // A window that opens in two hours, and one that closed a minute ago.
    let now = chrono::Local::now();
    let at = |mins: i64| {
        let t = now + chrono::Duration::minutes(mins);
        format!("{:02}:{:02}", t.hour(), t.minute())
    };
    let windows = vec![
        format!("{}-{}", at(120), at(180)),
        format!("{}-{}", at(-60), at(-1)),
    ];
    let d = env
        .start(env.config_at(&format!("http://{}", proxy.addr()), |c| {
            c.upload.windows = windows.clone();
        }))
        .await;
    env.write("w.mp4", b"wait for the night");
    env.wait_state("w.mp4", State::Queued, T).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(env.state("w.mp4"), Some(State::Queued));
    // Only the start-up listing of stray multipart uploads (no body) may have gone out.
    let stats = proxy.stats();
    assert_eq!(
        stats.request_body_bytes, 0,
        "data was sent outside the windows"
    );
    assert!(
        stats.requests <= 1,
        "requests outside the windows: {stats:?}"
    );
    assert!(env.root.join("w.mp4").exists());
    // Shutdown does not wait for the window.
    let stop = Instant::now();
    d.shutdown();
    d.wait().await;
    assert!(stop.elapsed() < Duration::from_secs(5));

    // An open window: it goes.
    let d = env
        .start(env.config_at(&format!("http://{}", proxy.addr()), |c| {
            c.upload.windows = vec![format!("{}-{}", at(-5), at(60))];
        }))
        .await;
    env.wait_state("w.mp4", State::Deleted, T).await;
    d.shutdown();
    d.wait().await;
}
