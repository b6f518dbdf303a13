//! `record-offload demo` (the daemon against a local S3-compatible server in a scratch
//! folder) and the hidden `dev-s3` (that server alone, for benchmarks and manual tests).
//! Built with the `dev-server` feature only.

use std::process::ExitCode;

use super::cli::{fail, init_logging, runtime, shutdown_signal};
use crate::config::{self, Source};

pub(super) fn dev_s3(
    data: &std::path::Path,
    listen: std::net::SocketAddr,
    bucket: &str,
) -> ExitCode {
    init_logging("warn");
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the runtime: {e}"), 1),
    };
    rt.block_on(async {
        let server = match crate::devserver::DevServer::start(data, listen).await {
            Ok(s) => s,
            Err(e) => return fail(&format!("cannot start the server: {e}"), 1),
        };
        if let Err(e) = server.create_bucket(bucket) {
            return fail(&format!("cannot create the bucket: {e}"), 1);
        }
        println!(
            "S3-compatible server on {} (bucket {bucket}, access key {}, secret {})",
            server.endpoint(),
            crate::devserver::ACCESS_KEY,
            crate::devserver::SECRET_KEY
        );
        shutdown_signal().await;
        ExitCode::SUCCESS
    })
}

pub(super) fn demo(dir: &std::path::Path, settle_secs: f64) -> ExitCode {
    use crate::devserver::{ACCESS_KEY, DevServer, SECRET_KEY};
    // The in-process server's own log lines would only confuse a first look.
    init_logging("info,s3s=off,s3s_fs=off");
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the runtime: {e}"), 1),
    };
    let dir = match std::path::absolute(dir) {
        Ok(d) => d,
        Err(e) => return fail(&format!("bad --dir: {e}"), 2),
    };
    let record = dir.join("record");
    let store_dir = dir.join("store");
    if let Err(e) = std::fs::create_dir_all(&record) {
        return fail(&format!("cannot create {}: {e}", record.display()), 1);
    }
    rt.block_on(async {
        let server =
            match DevServer::start(&store_dir, std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
                .await
            {
                Ok(s) => s,
                Err(e) => return fail(&format!("cannot start the local S3 server: {e}"), 1),
            };
        if let Err(e) = server.create_bucket("recordings") {
            return fail(&format!("cannot create the bucket: {e}"), 1);
        }
        let toml = format!(
            r#"
[node]
name = "demo"
[watch]
root = {root:?}
settle_secs = {settle_secs}
rescan_interval_secs = 30
prune_after_secs = 10
[journal]
path = {journal:?}
[storage]
endpoint = "{endpoint}"
region = "us-east-1"
bucket = "recordings"
access_key_id = "{ACCESS_KEY}"
access_key_secret = "{SECRET_KEY}"
path_style = true
[upload]
retry_max_secs = 10
"#,
            root = record.display().to_string(),
            journal = dir.join("journal.db").display().to_string(),
            endpoint = server.endpoint(),
        );
        let config_path = dir.join("config.toml");
        if let Err(e) = std::fs::write(&config_path, toml) {
            return fail(&format!("cannot write {}: {e}", config_path.display()), 1);
        }
        let settings = match config::load(&Source {
            file: Some(config_path.clone()),
            no_env: true,
        }) {
            Ok(s) => s,
            Err(e) => return fail(&e.to_string(), 1),
        };
        println!("record-offload demo");
        println!("  watching  {}", record.display());
        println!(
            "  bucket    {} (objects land in {}/recordings/demo/)",
            server.endpoint(),
            store_dir.display()
        );
        println!("  journal   {}", dir.join("journal.db").display());
        println!("  config    {}", config_path.display());
        println!();
        println!(
            "Copy a file in, e.g.  cp /etc/os-release {}/",
            record.display()
        );
        println!("After {settle_secs} s of quiet it is uploaded, checked and deleted; see it with");
        println!("  ls {}/recordings/demo/", store_dir.display());
        println!(
            "  record-offload --config {} status      (from another terminal)",
            config_path.display()
        );
        println!("Ctrl-C stops.");
        println!();
        match crate::daemon::run(settings, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e.to_string(), 1),
        }
    })
}
