//! The same guarantees against a second, independent S3 implementation: moto's server (PyPI
//! `moto[server]`, see `common::moto` for how it is found or installed), spawned on 127.0.0.1
//! by each test. moto answers some calls differently from the in-process server (ListParts
//! with a `<ListPartsResponse>` root the SDK cannot read, its own ETags and listings), so
//! these tests show the daemon does not depend on one server's habits: the pipeline, resume
//! after SIGKILL with parts in flight, and the start-up abort of stray multipart uploads.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::harness::*;
use common::killloop::{MIB, kill_loop, wait_all_deleted};
use common::moto::MotoServer;
use record_offload::journal::State;

/// Each file is stored byte for byte under its key, deleted locally, `deleted` in the journal
/// with its MD5.
async fn check_stored(env: &Env, moto: &MotoServer, files: &[(&str, Vec<u8>)]) {
    for (rel, data) in files {
        let key = env.key(rel);
        let row = env.row(rel).unwrap();
        assert_eq!(row.state, State::Deleted, "{rel}: {row:?}");
        assert_eq!(row.key, key, "{rel}");
        assert_eq!(row.md5.as_deref(), Some(md5_hex(data).as_str()), "{rel}");
        assert_eq!(row.size, data.len() as u64, "{rel}");
        assert!(!env.root.join(rel).exists(), "{rel} still on disk");
        let Some(head) = moto.head(&key).await else {
            panic!("{key} not on moto; objects: {:?}", moto.keys().await);
        };
        assert_eq!(head.size, data.len() as u64, "{key}");
        let stored = moto.get(&key).await.unwrap();
        assert!(
            stored == *data,
            "{key}: stored {} bytes differ from the file's {}",
            stored.len(),
            data.len()
        );
    }
}

/// Small single-part and multipart files, one under a key with spaces, non-ASCII, `+` and
/// `%`, go up to moto byte for byte and are deleted locally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_against_moto() {
    let env = Env::new().await;
    let moto = MotoServer::start().await;
    let d = env
        .start(env.config_at(&moto.endpoint(), |c| {
            c.upload.part_size_mib = 5;
        }))
        .await;
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("small.mp4", bytes(1024, 1)),
        ("day/three.mp4", bytes(3 * MIB, 2)),
        ("day/twelve.mp4", bytes(12 * MIB, 3)),
        ("odd dir/录像 a+b 100%.mp4", bytes(6 * MIB + 7, 4)),
        ("odd dir/+plus %20 ü.ts", bytes(1500, 5)),
    ];
    for (rel, data) in &files {
        env.write(rel, data);
    }
    let rels: Vec<&str> = files.iter().map(|(r, _)| *r).collect();
    wait_all_deleted(&env, &rels, Duration::from_secs(40), None).await;
    check_stored(&env, &moto, &files).await;
    d.shutdown();
    d.wait().await;
    let mut want: Vec<String> = rels.iter().map(|r| env.key(r)).collect();
    want.sort();
    assert_eq!(moto.keys().await, want, "objects on moto");
    assert_eq!(moto.open_uploads().await, vec![], "open multipart uploads");
}

/// Multipart uploads under this node's prefix that the journal does not know are aborted at
/// start (even when the daemon is told to stop at once); another node's are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_uploads_are_aborted_at_start_on_moto() {
    let env = Env::new().await;
    let moto = MotoServer::start().await;
    let ours = moto.create_multipart(&env.key("stray.mp4")).await;
    let theirs = moto.create_multipart("other/x.mp4").await;
    assert_eq!(moto.open_uploads().await.len(), 2);
    let d = env.start(env.config_at(&moto.endpoint(), |_| {})).await;
    d.shutdown();
    d.wait().await;
    assert_eq!(
        moto.open_uploads().await,
        vec![("other/x.mp4".to_string(), theirs)],
        "ours ({ours}) must be aborted, the other node's kept"
    );
}

/// The real binary, throttled through the fault proxy so parts are on the wire, is killed
/// with SIGKILL three times just after the journal committed new parts (others in flight),
/// and restarted: every file ends stored byte for byte and deleted, none `failed`, no
/// multipart upload open on moto, and each kill cost at most the parts in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_sigkill_with_parts_in_flight_on_moto() {
    let env = Env::new().await;
    let moto = MotoServer::start().await;
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("cam1/a.mp4", bytes(24 * MIB, 11)),
        ("cam2/b.mp4", bytes(24 * MIB, 12)),
        ("cam3/c.mp4", bytes(24 * MIB + 12345, 13)),
    ];
    let report = kill_loop(&env, moto.addr(), "http", &files, |_| {}).await;
    check_stored(&env, &moto, &files).await;
    let open = moto.open_uploads().await;
    eprintln!("moto resume: {report}, {} open uploads", open.len());
    assert_eq!(open, vec![], "multipart uploads left open on moto");
    assert!(
        report.resent() <= report.bound(),
        "{report}: more than the parts in flight per kill were sent again: a resume started over"
    );
}
