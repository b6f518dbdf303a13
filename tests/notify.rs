//! Notifications against a real HTTP receiver: down, then answering 500, then too slow, then
//! well; a file that fails; the real binary killed with SIGKILL between the commit of a state
//! change and its delivery, and between the delivery and its bookkeeping. Every event arrives,
//! signed as the README documents, in order per file; a repeat carries the same id and body.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::harness::{Env, bytes, md5_hex, wait_until};
use common::killloop::{self, log_excerpt};
use common::proxy::{Fault, FaultProxy};
use common::receiver::{Answer, Receiver, SECRET, check_deliveries, free_addr};
use record_offload::config::{Config, NotifyConfig};
use record_offload::journal::{self, State};
use record_offload::service::metrics;

const T: Duration = Duration::from_secs(60);

fn notify_to(c: &mut Config, url: &str) {
    c.notify = vec![NotifyConfig {
        url: url.to_string(),
        secret: SECRET.to_string(),
        timeout_secs: 0.5,
        ..Default::default()
    }];
    c.notify_outbox.retry_initial_secs = 0.05;
    c.notify_outbox.retry_max_secs = 0.3;
    c.notify_outbox.poll_secs = 0.05;
}

fn backlog(env: &Env) -> u64 {
    let conn = journal::open_ro(&env.journal_path).unwrap();
    journal::outbox_figures(&conn).unwrap()[0].backlog
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_survive_a_receiver_that_is_down_failing_and_slow() {
    let env = Env::new().await;
    let proxy = FaultProxy::start(env.server.addr).await.unwrap();
    let addr = free_addr();
    let url = format!("http://{addr}/hooks/rec?token=t");
    let d = env
        .start(env.config_at(&format!("http://{}", proxy.addr()), |c| notify_to(c, &url)))
        .await;
    let a = bytes(30_000, 1);
    env.write("a.mp4", &a);
    env.write("dir/b c.mp4", b"second file");
    env.wait_state("a.mp4", State::Deleted, T).await;
    env.wait_state("dir/b c.mp4", State::Deleted, T).await;
    // Refused for good by the store: failed.
    proxy.set(Fault::Status {
        status: 403,
        code: "AccessDenied".into(),
        every: 1,
    });
    env.write("denied.mp4", b"refused");
    env.wait_state("denied.mp4", State::Failed, T).await;
    proxy.set(Fault::None);

    // Nobody listens: the events wait in the outbox, and the failures are counted.
    wait_until("connect failures counted", T, || {
        metrics::render().contains("reason=\"connect\"")
    })
    .await;
    assert_eq!(backlog(&env), 5, "stored+deleted twice, failed once");
    let conn = journal::open_ro(&env.journal_path).unwrap();
    let s = journal::summary(&conn).unwrap();
    assert!(s.notify[0].last_error.is_some() && s.notify[0].head_attempts > 0);
    drop(conn);

    // Up, but answering 500 twice, then too late once, then well.
    let receiver = Receiver::default();
    receiver.script(&[
        Answer::Error,
        Answer::Error,
        Answer::Slow(Duration::from_millis(1500)),
    ]);
    let server = receiver.serve(addr).await;
    wait_until("every event accepted", T, || backlog(&env) == 0).await;
    let got = receiver.got();
    check_deliveries(
        &got,
        &[
            ("a.mp4", &["stored", "deleted"]),
            ("dir/b c.mp4", &["stored", "deleted"]),
            ("denied.mp4", &["failed"]),
        ],
    );
    let ids: BTreeSet<String> = got.iter().map(|g| g.id.clone()).collect();
    let accepted: BTreeSet<String> = receiver.accepted().iter().map(|g| g.id.clone()).collect();
    assert_eq!(ids, accepted, "every event was at last answered 2xx");
    assert_eq!(ids.len(), 5);
    assert!(
        got.len() >= 8,
        "500, 500 and the slow answer were retried: {}",
        got.len()
    );
    let repeated = got.len() - ids.len();
    assert!(repeated >= 3, "{repeated}");

    // The document.
    let stored = got
        .iter()
        .find(|g| g.body["path"] == "a.mp4" && g.body["event"] == "stored")
        .unwrap();
    let b = &stored.body;
    assert_eq!(b["node"], "node1");
    assert_eq!(b["key"], "node1/a.mp4");
    assert_eq!(b["size"], 30_000);
    assert_eq!(b["md5"], md5_hex(&a));
    assert!(
        b["crc64"]
            .as_str()
            .is_some_and(|c| c.parse::<u64>().is_ok())
    );
    assert_eq!(b["store"], "primary");
    assert_eq!(b["state"], "uploaded");
    assert!(b["legacy_url"].as_str().unwrap().ends_with("/record/a.mp4"));
    assert!(chrono_like(b["time"].as_str().unwrap()), "{}", b["time"]);
    let spaced = got
        .iter()
        .find(|g| g.body["path"] == "dir/b c.mp4")
        .unwrap();
    assert!(
        spaced.body["legacy_url"]
            .as_str()
            .unwrap()
            .ends_with("/record/dir/b%20c.mp4")
    );
    let failed = got.iter().find(|g| g.body["event"] == "failed").unwrap();
    assert!(
        failed.body["error"].as_str().unwrap().contains("403"),
        "{}",
        failed.raw
    );

    let text = metrics::render();
    for needle in [
        "record_offload_notify_delivered_total{receiver=\"http://",
        "reason=\"http_500\"",
        "reason=\"timeout\"",
    ] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }
    assert!(
        !text.contains("token=t"),
        "the receiver's query is not a label"
    );
    d.shutdown();
    d.wait().await;
    server.abort();
}

fn chrono_like(t: &str) -> bool {
    // 2026-01-02T03:04:05.678Z
    t.len() == 24 && t.ends_with('Z') && t.as_bytes()[10] == b'T'
}

/// The real binary, killed by its failpoints right after committing `uploaded` (before any
/// delivery), right before sending, and right after the receiver's 2xx (before the outbox row
/// is deleted), and restarted until everything is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_commit_and_delivery_loses_no_event() {
    let env = Env::new().await;
    let addr = free_addr();
    let receiver = Receiver::default();
    let server = receiver.serve(addr).await;
    let cfg = env.config_file_at(&env.server.endpoint(), |c| {
        notify_to(c, &format!("http://{addr}/hook"));
        c.notify[0].timeout_secs = 5.0;
    });
    let log = env.dir.path().join("daemon.log");
    let rels: Vec<String> = (0..6).map(|i| format!("k/{i}.mp4")).collect();
    for (i, r) in rels.iter().enumerate() {
        env.write(r, &bytes(2_000 + i, i as u64));
    }
    let mut kills = 0;
    let start = Instant::now();
    let mut child: Option<killloop::Daemon> = None;
    loop {
        let done = rels.iter().all(|r| env.state(r) == Some(State::Deleted))
            && env.journal_path.exists()
            && backlog(&env) == 0;
        if done {
            break;
        }
        assert!(
            start.elapsed() < T * 2,
            "not all delivered after {kills} kills\n{}",
            log_excerpt(&log)
        );
        let exited = match child.as_mut() {
            None => true,
            Some(c) => c.0.try_wait().unwrap().is_some(),
        };
        if exited {
            if child.is_some() {
                kills += 1;
            }
            // Kill points until enough kills happened; then a clean run finishes the work.
            let points = if kills < 6 {
                "after-uploaded:0.3,notify-before-send:0.3,notify-after-send:0.4"
            } else {
                ""
            };
            child = Some(killloop::spawn_with_failpoints(&cfg, &log, points));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(kills >= 1, "no kill happened\n{}", log_excerpt(&log));
    let expect: Vec<(&str, &[&str])> = rels
        .iter()
        .map(|r| (r.as_str(), &["stored", "deleted"][..]))
        .collect();
    let got = receiver.got();
    check_deliveries(&got, &expect);
    eprintln!(
        "kills: {kills}, requests: {}, events: {}",
        got.len(),
        got.iter().map(|g| &g.id).collect::<BTreeSet<_>>().len()
    );
    drop(child);
    server.abort();
}
