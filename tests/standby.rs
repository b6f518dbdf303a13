//! A standby store: the primary (a test server behind the fault proxy) goes down, uploads
//! move to the standby (a second test server behind its own proxy) after
//! `storage.failover_after_secs`, and come back once the primary answers the probe again;
//! permanent refusals never fail over. Short timers, real servers, real journal.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::harness::*;
use common::http::{http, tcp_addr};
use common::proxy::{Fault, FaultProxy};
use record_offload::config::{Settings, StandbyConfig};
use record_offload::devserver::{ACCESS_KEY, DevOptions, DevServer, SECRET_KEY};
use record_offload::journal::{State, StoreId};
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
    env.config_at(&format!("http://{}", primary.addr()), |c| {
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
    })
}

/// Plays `rel` as a player would: its legacy URL on the look-up server, then the presigned
/// URL it redirects to. Returns the store `resolve` names and the bytes played.
async fn play(d: &record_offload::daemon::Daemon, rel: &str) -> (String, Vec<u8>) {
    let addr = tcp_addr(d);
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
    assert_eq!(j["state"], "uploaded", "{rel}: {j}");
    let legacy = http("GET", &format!("http://{addr}/record/{rel}"), &[]).await;
    assert_eq!(legacy.status, 302, "{rel}");
    let location = legacy.header("location").unwrap().to_string();
    let got = http("GET", &location, &[]).await;
    assert_eq!(got.status, 200, "{rel}: {location}");
    (j["store"].as_str().unwrap().to_string(), got.body)
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
    assert_eq!(sb.proxy.stats().requests, 0, "nothing went to the standby");
    assert_eq!(size_on(&standby_settings, &env.key("a.mp4")).await, None);
    d.shutdown();
    d.wait().await;
}
