//! A standby store: the primary (a test server behind the fault proxy) goes down, uploads
//! move to the standby (a second test server behind its own proxy) after
//! `storage.failover_after_secs`, and come back once the primary answers the probe again;
//! permanent refusals never fail over; copy-back moves the standby's objects to the primary
//! while every legacy URL plays; uploads abandoned on the primary are aborted once it answers,
//! also after a restart; SIGKILLs during failover and copy-back lose nothing and leave no
//! upload open. Short timers, real servers, real journal.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use common::harness::*;
use common::http::{http, tcp_addr};
use common::killloop::{self, MIB};
use common::proxy::{Fault, FaultProxy};
use record_offload::config::{Config, Settings, StandbyConfig};
use record_offload::devserver::{ACCESS_KEY, DevOptions, DevServer, SECRET_KEY};
use record_offload::journal::{self, State, StoreId};
use record_offload::store::Store;

const T: Duration = Duration::from_secs(40);
const STANDBY_BUCKET: &str = "rec-standby";

struct Standby {
    server: DevServer,
    proxy: FaultProxy,
}

async fn standby(env: &Env) -> Standby {
    let server = DevServer::start_with(
        &env.dir.path().join("standby-store"),
        "127.0.0.1:0".parse().unwrap(),
        DevOptions::default(),
    )
    .await
    .unwrap();
    server.create_bucket(STANDBY_BUCKET).unwrap();
    let proxy = FaultProxy::start(server.addr).await.unwrap();
    Standby { server, proxy }
}

fn config(env: &Env, primary: &FaultProxy, sb: &Standby) -> Settings {
    env.config_at(&format!("http://{}", primary.addr()), |c| set_up(c, sb))
}

/// Short timers, 5 MiB parts, and the standby behind its proxy.
fn set_up(c: &mut Config, sb: &Standby) {
    c.upload.part_size_mib = 5;
    c.upload.request_timeout_secs = 2.0;
    c.storage.failover_after_secs = 1.0;
    c.storage.probe_secs = 0.5;
    c.storage.standby = Some(StandbyConfig {
        endpoint: format!("http://{}", sb.proxy.addr()),
        region: "us-east-1".into(),
        bucket: STANDBY_BUCKET.into(),
        access_key_id: ACCESS_KEY.into(),
        access_key_secret: SECRET_KEY.into(),
        path_style: true,
        ..Default::default()
    });
}

/// The multipart uploads the journal lists as abandoned on `store`.
fn abandoned(env: &Env, store: StoreId) -> Vec<(String, String)> {
    let conn = journal::open_ro(&env.journal_path).unwrap();
    journal::abandoned_uploads(&conn, store).unwrap()
}

/// Plays `rel` as a player would: its legacy URL on the look-up server, then the presigned
/// URL it redirects to. Returns the store `resolve` names and the bytes played.
async fn play(d: &record_offload::daemon::Daemon, rel: &str) -> (String, Vec<u8>) {
    try_play(tcp_addr(d), rel).await.unwrap()
}

/// [`play`] on the look-up server at `addr`, with what went wrong as the error.
async fn try_play(addr: std::net::SocketAddr, rel: &str) -> Result<(String, Vec<u8>), String> {
    let j = http(
        "GET",
        &format!(
            "http://{addr}/v1/resolve?path=%2Frecord%2F{}",
            rel.replace('/', "%2F")
        ),
        &[],
    )
    .await
    .json();
    if j["state"] != "uploaded" {
        return Err(format!("{rel}: resolve answered {j}"));
    }
    let legacy = http("GET", &format!("http://{addr}/record/{rel}"), &[]).await;
    if legacy.status != 302 {
        return Err(format!("{rel}: legacy URL answered {}", legacy.status));
    }
    let location = legacy.header("location").unwrap_or_default().to_string();
    let got = http("GET", &location, &[]).await;
    if got.status != 200 {
        return Err(format!("{rel}: {location} answered {}", got.status));
    }
    let store = j["store"].as_str().unwrap_or_default().to_string();
    Ok((store, got.body))
}

/// What the store behind `settings` (primary or standby) holds under `key`: its size.
async fn size_on(settings: &Settings, key: &str) -> Option<u64> {
    Store::new(settings)
        .head(key)
        .await
        .unwrap()
        .map(|i| i.size)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_the_standby_and_back() {
    let env = Env::new().await;
    let primary = FaultProxy::start(env.server.addr).await.unwrap();
    let sb = standby(&env).await;
    let settings = config(&env, &primary, &sb);
    let standby_settings = settings.standby.clone().unwrap();
    let direct = env.config(|_| {});
    let d = env.start(settings).await;

    // The primary is down: after the failover time the files land on the standby.
    primary.set(Fault::Down);
    let small = bytes(200_000, 1);
    let large = bytes(12 * 1024 * 1024, 2);
    env.write("down/a.mp4", &small);
    env.write("down/b.mp4", &large);
    for (rel, data) in [("down/a.mp4", &small), ("down/b.mp4", &large)] {
        let row = env.wait_state(rel, State::Deleted, T).await;
        assert_eq!(row.store, StoreId::Standby, "{rel}: {row:?}");
        assert_eq!(row.md5.as_deref(), Some(md5_hex(data).as_str()));
        assert_eq!(
            size_on(&standby_settings, &env.key(rel)).await,
            Some(data.len() as u64)
        );
        assert_eq!(
            size_on(&direct, &env.key(rel)).await,
            None,
            "{rel} on the primary"
        );
        // Its legacy URL plays from the standby.
        let (store, played) = play(&d, rel).await;
        assert_eq!(store, "standby");
        assert!(played == *data, "{rel} plays its bytes");
    }
    assert!(d.uploader.failover.is_active());

    // The primary is back: the probe fails back, new files go to it.
    primary.set(Fault::None);
    wait_until("failback", T, || !d.uploader.failover.is_active()).await;
    let after = bytes(300_000, 3);
    env.write("up/c.mp4", &after);
    let row = env.wait_state("up/c.mp4", State::Deleted, T).await;
    assert_eq!(row.store, StoreId::Primary);
    assert_eq!(
        size_on(&direct, &env.key("up/c.mp4")).await,
        Some(after.len() as u64)
    );
    // The standby's objects stay where they are (copy-back is off).
    assert_eq!(env.row("down/a.mp4").unwrap().store, StoreId::Standby);
    // Every legacy URL plays, each from the store that holds it.
    assert_eq!(play(&d, "down/a.mp4").await, ("standby".to_string(), small));
    assert_eq!(play(&d, "up/c.mp4").await, ("primary".to_string(), after));
    assert!(
        sb.server
            .requests()
            .iter()
            .all(|r| r.method != "DELETE" || r.has_param("uploadId"))
    );
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_refusals_never_fail_over() {
    let env = Env::new().await;
    let primary = FaultProxy::start(env.server.addr).await.unwrap();
    let sb = standby(&env).await;
    let mut settings = config(&env, &primary, &sb);
    settings.config.storage.failover_after_secs = 0.2;
    settings.config.upload.failed_retry_secs = 1.0;
    let standby_settings = settings.standby.clone().unwrap();
    primary.set(Fault::Status {
        status: 403,
        code: "InvalidAccessKeyId".into(),
        every: 1,
    });
    let d = env.start(settings).await;
    env.write("a.mp4", &bytes(100_000, 4));
    let row = env.wait_state("a.mp4", State::Failed, T).await;
    assert_eq!(row.store, StoreId::Primary);
    // Several more refusals, well past the failover time.
    let seen = primary.stats().injected;
    wait_until("more refusals", T, || primary.stats().injected > seen + 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!d.uploader.failover.is_active());
    assert_eq!(env.row("a.mp4").unwrap().store, StoreId::Primary);
    // The start's look for stray uploads (ListMultipartUploads) is all the standby saw.
    let to_standby = sb.server.requests();
    assert!(
        to_standby
            .iter()
            .all(|r| r.method == "GET" && r.has_param("uploads")),
        "nothing but the stray check went to the standby: {to_standby:?}"
    );
    assert_eq!(size_on(&standby_settings, &env.key("a.mp4")).await, None);
    d.shutdown();
    d.wait().await;
}

/// The objects stored on the standby while the primary was down are copied back once it
/// answers (slowly: its proxy throttles what is sent to it): each row then points at the
/// primary, which holds the bytes (MD5 and CRC-64 checked: the primary is in OSS mode), the
/// standby keeps its copy, and a player polling every legacy URL all along gets the file's
/// bytes at every moment, first from the standby, then from the primary. A file written while
/// copy-back is in the middle of an object is stored before that object's copy ends: copy-back
/// pauses between parts while uploads wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copy_back_moves_the_standby_objects_while_every_url_plays() {
    let env = Env::new_with(DevOptions {
        oss: true,
        ..Default::default()
    })
    .await;
    let primary = FaultProxy::start(env.server.addr).await.unwrap();
    let sb = standby(&env).await;
    let settings = env.config_at(&format!("http://{}", primary.addr()), |c| {
        set_up(c, &sb);
        c.storage.standby.as_mut().unwrap().copy_back = true;
    });
    assert!(
        settings.warnings().iter().all(|w| !w.contains("copy_back")),
        "{:?}",
        settings.warnings()
    );
    let d = env.start(settings).await;
    let addr = tcp_addr(&d);

    primary.set(Fault::Down);
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("down/a.mp4", bytes(200_000, 11)),
        ("down/b.mp4", bytes(12 * MIB + 123, 12)),
        ("down/c.mp4", bytes(700_000, 13)),
    ];
    for (rel, data) in &files {
        env.write(rel, data);
    }
    for (rel, _) in &files {
        let row = env.wait_state(rel, State::Deleted, T).await;
        assert_eq!(row.store, StoreId::Standby, "{rel}: {row:?}");
    }
    assert!(d.uploader.failover.is_active());
    assert!(
        env.server.requests().iter().all(|r| r.method != "PUT"),
        "nothing reached the primary while it was down"
    );

    // A player polls every legacy URL from now on.
    let stop = Arc::new(AtomicBool::new(false));
    let player = {
        let stop = stop.clone();
        let files = files.clone();
        tokio::spawn(async move {
            let mut seen: Vec<(String, String)> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                for (rel, data) in &files {
                    let (store, played) = try_play(addr, rel).await?;
                    if played != *data {
                        return Err(format!("{rel} played other bytes from the {store}"));
                    }
                    seen.push((rel.to_string(), store));
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            Ok::<_, String>(seen)
        })
    };

    // The primary answers again, at 2 MiB/s: each 5 MiB part of the large object takes 2.5 s.
    primary.set(Fault::Throttle {
        bytes_per_sec: 2 * MIB as u64,
    });
    wait_until("failback", T, || !d.uploader.failover.is_active()).await;
    // Once the first part of the large object is on the primary, a new recording arrives.
    let part_of_b = |r: &record_offload::devserver::Recorded| {
        r.method == "PUT" && r.has_param("partNumber") && r.path.ends_with("down/b.mp4")
    };
    wait_until("copy-back's first part of b", T, || {
        env.server
            .requests()
            .iter()
            .any(|r| part_of_b(r) && r.status == 200)
    })
    .await;
    let new = bytes(300_000, 14);
    env.write("up/new.mp4", &new);
    let row = env.wait_state("up/new.mp4", State::Deleted, T).await;
    assert_eq!(row.store, StoreId::Primary);
    assert_eq!(
        env.row("down/b.mp4").unwrap().store,
        StoreId::Standby,
        "the new file waited for copy-back's object"
    );
    let parts_of_b = env
        .server
        .requests()
        .iter()
        .filter(|r| part_of_b(r))
        .count();
    assert!(
        parts_of_b < 3,
        "copy-back sent {parts_of_b} parts of b before the new file"
    );

    wait_until("every row on the primary", T, || {
        files
            .iter()
            .all(|(rel, _)| env.row(rel).is_some_and(|r| r.store == StoreId::Primary))
    })
    .await;
    // A few more plays from the primary.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = player
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("a legacy URL did not play: {e}"));
    for (rel, data) in &files {
        let stores: Vec<&str> = seen
            .iter()
            .filter(|(r, _)| r == rel)
            .map(|(_, s)| s.as_str())
            .collect();
        assert!(
            stores.first() == Some(&"standby") && stores.last() == Some(&"primary"),
            "{rel} played from {stores:?}"
        );
        let row = env.row(rel).unwrap();
        assert_eq!(row.state, State::Deleted);
        assert_eq!(row.md5.as_deref(), Some(md5_hex(data).as_str()), "{rel}");
        let key = env.key(rel);
        assert!(
            env.get(&key).await.as_deref() == Some(data.as_slice()),
            "{rel}: the primary holds its bytes"
        );
        assert!(
            std::fs::read(sb.server.object_path(STANDBY_BUCKET, &key)).unwrap() == *data,
            "{rel}: the standby keeps its copy"
        );
        assert_eq!(play(&d, rel).await, ("primary".to_string(), data.clone()));
    }
    assert!(
        env.server.open_uploads().is_empty(),
        "{:?}",
        env.server.open_uploads()
    );
    assert!(sb.server.open_uploads().is_empty());
    assert!(abandoned(&env, StoreId::Primary).is_empty());
    // Objects are never deleted, on either store.
    for r in env
        .server
        .requests()
        .iter()
        .chain(sb.server.requests().iter())
    {
        assert!(r.method != "DELETE" || r.has_param("uploadId"), "{r:?}");
    }
    let metrics = record_offload::service::metrics::render();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} not in /metrics"))
    };
    assert!(value("record_offload_copy_back_copied_total ") >= 3.0);
    wait_until("copy_back_pending 0", T, || {
        record_offload::service::metrics::render()
            .lines()
            .any(|l| l == "record_offload_copy_back_pending 0")
    })
    .await;
    d.shutdown();
    d.wait().await;
}

/// A multipart upload open on the primary when it went down is recorded as abandoned when the
/// file moves to the standby; it stays open while the primary does not answer, also across a
/// restart (the failover state is not kept, the record is), and is aborted once it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_abandoned_on_the_primary_is_aborted_once_it_answers_after_a_restart() {
    let env = Env::new().await;
    let primary = FaultProxy::start(env.server.addr).await.unwrap();
    let sb = standby(&env).await;
    let settings = config(&env, &primary, &sb);
    // Slow enough that the first part is still on its way when the primary goes down.
    primary.set(Fault::Throttle {
        bytes_per_sec: MIB as u64,
    });
    let d = env.start(settings.clone()).await;
    let data = bytes(12 * MIB, 21);
    env.write("big.mp4", &data);
    let key = env.key("big.mp4");
    wait_until("a multipart upload open on the primary", T, || {
        env.row("big.mp4")
            .is_some_and(|r| r.upload_id.is_some() && r.store == StoreId::Primary)
    })
    .await;
    let uid = env.row("big.mp4").unwrap().upload_id.unwrap();
    assert_eq!(env.server.open_uploads().len(), 1);

    primary.set(Fault::Down);
    let row = env.wait_state("big.mp4", State::Deleted, T).await;
    assert_eq!(row.store, StoreId::Standby);
    assert_eq!(
        abandoned(&env, StoreId::Primary),
        vec![(key.clone(), uid.clone())]
    );
    d.shutdown();
    d.wait().await;
    let open_ids = |env: &Env| -> Vec<String> {
        env.server
            .open_uploads()
            .into_iter()
            .map(|(_, _, id)| id)
            .collect()
    };
    assert_eq!(
        open_ids(&env),
        vec![uid.clone()],
        "still open: the primary never answered"
    );

    // Started again while the primary is still down: the record stays, the upload too.
    let d = env.start(settings).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(open_ids(&env), vec![uid.clone()]);
    assert_eq!(abandoned(&env, StoreId::Primary).len(), 1);

    primary.set(Fault::None);
    wait_until("the abandoned upload aborted", T, || {
        env.server.open_uploads().is_empty()
    })
    .await;
    wait_until("the record forgotten", T, || {
        abandoned(&env, StoreId::Primary).is_empty()
    })
    .await;
    let aborted = env.server.requests().into_iter().any(|r| {
        r.method == "DELETE"
            && url::form_urlencoded::parse(r.query.as_bytes())
                .any(|(k, v)| k == "uploadId" && v == uid.as_str())
    });
    assert!(aborted, "DELETE ?uploadId={uid} reached the primary");
    // The file stays where it is stored and plays from there.
    assert_eq!(env.row("big.mp4").unwrap().store, StoreId::Standby);
    assert_eq!(play(&d, "big.mp4").await, ("standby".to_string(), data));
    d.shutdown();
    d.wait().await;
}

/// The real binary, SIGKILLed while the primary fails and uploads move to the standby (with
/// multipart uploads open on both), then while copy-back copies the standby's objects back
/// (at its failpoints: after creating its upload, after a part, after completing, before the
/// row moves), then left to finish: every file ends deleted, its row on the primary with the
/// file's MD5, its bytes on the primary (and still on the standby), nothing listed as
/// abandoned, and no multipart upload open on either server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_failover_and_copy_back_loses_nothing() {
    let env = Env::new().await;
    let primary = FaultProxy::start(env.server.addr).await.unwrap();
    let sb = standby(&env).await;
    let cfg = env.config_file_at(&format!("http://{}", primary.addr()), |c| {
        set_up(c, &sb);
        c.watch.settle_secs = 0.1;
        c.upload.concurrency = 2;
        c.upload.request_timeout_secs = 3.0;
        c.upload.drain_secs = 1.0;
        c.storage.failover_after_secs = 0.5;
        c.storage.probe_secs = 0.3;
        c.storage.standby.as_mut().unwrap().copy_back = true;
    });
    let log = env.dir.path().join("daemon.log");
    let files: Vec<(String, Vec<u8>)> = (0..4u64)
        .map(|i| {
            let size = if i % 2 == 0 { 11 * MIB } else { 300_000 } + i as usize;
            (format!("day/r{i}.mp4"), bytes(size, 40 + i))
        })
        .collect();
    for (rel, data) in &files {
        let p = env.write(rel, data);
        age(&p, 60);
    }
    let rels: Vec<&str> = files.iter().map(|(r, _)| r.as_str()).collect();
    let kill = |child: &mut killloop::Daemon, what: &str| {
        let _ = child.0.kill(); // SIGKILL (or already dead at a failpoint)
        let status = child.0.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "{what}: not killed but exited: {status}\n{}",
            killloop::log_excerpt(&log)
        );
    };
    let on = |store: StoreId| {
        rels.iter()
            .filter(|r| {
                env.row(r)
                    .is_some_and(|row| row.store == store && row.state.is_stored())
            })
            .count()
    };

    // 1. Failover. Both stores slow, so parts are on the wire when the kills come.
    primary.set(Fault::Throttle {
        bytes_per_sec: 3 * MIB as u64,
    });
    sb.proxy.set(Fault::Throttle {
        bytes_per_sec: 6 * MIB as u64,
    });
    let mut child = killloop::spawn(&cfg, &log);
    wait_until("a part committed on the primary", T, || {
        !killloop::committed_parts(&env).is_empty()
    })
    .await;
    primary.set(Fault::Down);
    wait_until("an upload moved to the standby", T, || {
        env.try_rows()
            .is_some_and(|rows| rows.iter().any(|r| r.store == StoreId::Standby))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    kill(&mut child, "failover");
    assert!(
        !abandoned(&env, StoreId::Primary).is_empty(),
        "the primary's open upload is recorded as abandoned"
    );
    for points in ["after-part:0.5", "after-create:0.7", ""] {
        let mut child = killloop::spawn_with_failpoints(&cfg, &log, points);
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(2500) && child.0.try_wait().unwrap().is_none()
        {
            killloop::fail_fast(&env, Some(&log));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        kill(&mut child, points);
    }
    // On the standby, all of them.
    sb.proxy.set(Fault::None);
    let mut child = killloop::spawn(&cfg, &log);
    killloop::wait_all_deleted(&env, &rels, Duration::from_secs(60), Some(&log)).await;
    kill(&mut child, "failed over, all stored");
    // The small files may have reached the primary before it went down; the large ones not.
    assert!(on(StoreId::Standby) >= 2, "{:#?}", env.rows());
    let were_on_standby: Vec<&str> = rels
        .iter()
        .copied()
        .filter(|r| env.row(r).is_some_and(|row| row.store == StoreId::Standby))
        .collect();

    // 2. Copy-back, the primary back but slow; killed at each of its failpoints.
    primary.set(Fault::Throttle {
        bytes_per_sec: 3 * MIB as u64,
    });
    let mut copy_back_uploads_recorded = 0;
    for points in [
        "copy-back-after-create:1",
        "copy-back-after-part:1",
        "copy-back-before-move:1",
        "",
        "copy-back-after-complete:1",
        "copy-back-after-part:0.5",
    ] {
        let moved = on(StoreId::Primary);
        let mut child = killloop::spawn_with_failpoints(&cfg, &log, points);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(8)
            && child.0.try_wait().unwrap().is_none()
            && on(StoreId::Primary) == moved
        {
            killloop::fail_fast(&env, Some(&log));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        kill(&mut child, points);
        if !abandoned(&env, StoreId::Primary).is_empty() {
            copy_back_uploads_recorded += 1;
        }
        if on(StoreId::Primary) == files.len() {
            break;
        }
    }
    let log_text = std::fs::read_to_string(&log).unwrap();
    let copy_back_kills = log_text
        .lines()
        .filter(|l| l.contains("failpoint: killing") && l.contains("copy-back-"))
        .count();
    assert!(
        copy_back_kills >= 2,
        "copy-back's failpoints killed it {copy_back_kills} times\n{}",
        killloop::log_excerpt(&log)
    );
    assert!(
        copy_back_uploads_recorded >= 1,
        "a killed copy-back left its multipart upload recorded"
    );

    // 3. Left to finish, then stopped cleanly.
    primary.set(Fault::None);
    let mut child = killloop::spawn(&cfg, &log);
    let done = || {
        on(StoreId::Primary) == files.len()
            && abandoned(&env, StoreId::Primary).is_empty()
            && abandoned(&env, StoreId::Standby).is_empty()
            && env.server.open_uploads().is_empty()
            && sb.server.open_uploads().is_empty()
    };
    let start = Instant::now();
    while !done() {
        killloop::fail_fast(&env, Some(&log));
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "the daemon died\n{}",
            killloop::log_excerpt(&log)
        );
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "not finished: rows {:#?}\nabandoned {:?} {:?}\nopen {:?} {:?}\n{}",
            env.rows(),
            abandoned(&env, StoreId::Primary),
            abandoned(&env, StoreId::Standby),
            env.server.open_uploads(),
            sb.server.open_uploads(),
            killloop::log_excerpt(&log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    killloop::stop_cleanly(&mut child, &log);

    for (rel, data) in &files {
        let row = env.row(rel).unwrap();
        assert_eq!(row.state, State::Deleted, "{rel}");
        assert_eq!(row.store, StoreId::Primary, "{rel}");
        assert_eq!(row.md5.as_deref(), Some(md5_hex(data).as_str()), "{rel}");
        assert!(!env.root.join(rel).exists());
        let key = env.key(rel);
        assert!(
            std::fs::read(env.server.object_path(BUCKET, &key)).unwrap() == *data,
            "{rel}: the primary holds its bytes"
        );
        if were_on_standby.contains(&rel.as_str()) {
            assert!(
                std::fs::read(sb.server.object_path(STANDBY_BUCKET, &key)).unwrap() == *data,
                "{rel}: the standby keeps its copy"
            );
        }
    }
    assert!(env.server.open_uploads().is_empty());
    assert!(sb.server.open_uploads().is_empty());
}
