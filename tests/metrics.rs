//! `/metrics` content from a real daemon that uploaded, retried and failed files against a real
//! S3-compatible server behind a fault-injecting proxy; the text is checked with promtool.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::harness::*;
use common::proxy::{Fault, FaultProxy};
use record_offload::journal::State;
use record_offload::service::metrics;

const T: Duration = Duration::from_secs(60);

/// The value of the sample `series` (name with its labels, exactly as rendered).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn promtool() -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join("promtool"))
        .find(|p| p.is_file())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_describe_the_pipeline_and_pass_promtool() {
    let env = Env::new().await;
    let proxy = FaultProxy::start(env.server.addr).await.unwrap();
    let d = env
        .start(env.config_at(&format!("http://{}", proxy.addr()), |_| {}))
        .await;
    assert!(d.liveness.health().is_ok());

    // Throttled until a retry has been counted, then let through: stored after retries. (A
    // file this small is one PutObject, so "every other request" could let it through at once.)
    proxy.set(Fault::Status {
        status: 503,
        code: "SlowDown".into(),
        every: 1,
    });
    env.write("a.mp4", &bytes(20_000, 1));
    let start = Instant::now();
    while !metrics::render().contains("record_offload_upload_retries_total{") {
        assert!(
            start.elapsed() < T,
            "no retry counted:\n{}",
            metrics::render()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.set(Fault::None);
    env.wait_state("a.mp4", State::Deleted, T).await;
    // Refused for good: failed.
    proxy.set(Fault::Status {
        status: 403,
        code: "AccessDenied".into(),
        every: 1,
    });
    env.write("b.mp4", &bytes(3_000, 2));
    env.wait_state("b.mp4", State::Failed, T).await;
    proxy.set(Fault::None);
    metrics::lookup("uploaded");
    metrics::lookup("uploaded");
    metrics::lookup("not_found");
    metrics::lookup("no such answer!");

    // The journal figures arrive with the next refresh.
    let start = Instant::now();
    let text = loop {
        let text = metrics::render();
        if value(&text, "record_offload_files{state=\"failed\"}") == Some(1.0)
            && value(&text, "record_offload_files{state=\"deleted\"}") == Some(1.0)
        {
            break text;
        }
        assert!(
            start.elapsed() < T,
            "journal figures never refreshed:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let v = |s: &str| value(&text, s).unwrap_or_else(|| panic!("no sample {s}:\n{text}"));
    assert_eq!(v("record_offload_files{state=\"queued\"}"), 0.0);
    assert_eq!(v("record_offload_waiting_bytes"), 3000.0);
    assert!(v("record_offload_oldest_waiting_seconds") >= 0.0);
    assert_eq!(v("record_offload_uploaded_files_total"), 1.0);
    assert_eq!(v("record_offload_uploaded_bytes_total"), 20_000.0);
    assert_eq!(v("record_offload_upload_duration_seconds_count"), 1.0);
    // The store's code, or only its status where the answer has no body (HEAD).
    let retries: Vec<(&str, f64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("record_offload_upload_retries_total{reason=\""))
        .filter_map(|l| {
            let (reason, n) = l.split_once("\"} ")?;
            Some((reason, n.parse().ok()?))
        })
        .collect();
    assert!(!retries.is_empty(), "{text}");
    for (reason, _) in &retries {
        assert!(["SlowDown", "http_503"].contains(reason), "{retries:?}");
    }
    assert_eq!(
        v("record_offload_upload_failures_total{reason=\"AccessDenied\"}"),
        1.0
    );
    assert_eq!(v("record_offload_lookups_total{answer=\"uploaded\"}"), 2.0);
    assert_eq!(v("record_offload_lookups_total{answer=\"not_found\"}"), 1.0);
    assert_eq!(v("record_offload_lookups_total{answer=\"other\"}"), 1.0);
    assert_eq!(v("record_offload_lookups_total{answer=\"pending\"}"), 0.0);
    assert!(v("record_offload_watch_root_free_bytes") > 0.0);
    assert!(v("record_offload_watch_root_size_bytes") >= v("record_offload_watch_root_free_bytes"));
    for stage in ["watcher", "intake", "uploader", "journal-writer"] {
        assert!(
            v(&format!(
                "record_offload_stage_heartbeat_age_seconds{{stage=\"{stage}\"}}"
            )) < 120.0
        );
    }
    assert_eq!(v("record_offload_healthy"), 1.0);

    match promtool() {
        None => eprintln!(
            "SKIPPED the promtool check: promtool is not installed (apt-get install prometheus)"
        ),
        Some(tool) => {
            let mut child = Command::new(tool)
                .args(["check", "metrics"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
                "promtool check metrics: {}{}\n{text}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    let liveness = d.liveness.clone();
    d.shutdown();
    assert_eq!(liveness.health().http_status(), 503);
    d.wait().await;
    assert_eq!(liveness.health().status, "not_running");
}
