//! `bench-s3`: the local S3-compatible server of `record-offload dev-s3` (s3s-fs, the same
//! code), with its HTTPS mode available from the command line:
//!
//!     bench-s3 --data /dev/shm/store --listen 127.0.0.1:9000 --bucket recordings --tls
//!
//! With `--tls` the server makes a CA at start, signs a certificate for `localhost` and
//! `127.0.0.1` with it, and writes the CA's PEM to `<data>.ca.pem` (printed), for the
//! clients to trust. Runs until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use record_offload::devserver::{ACCESS_KEY, DevOptions, DevServer, SECRET_KEY};
use record_offload_bench::stopped;

#[derive(Parser)]
#[command(about = "The local S3-compatible server, plain or HTTPS")]
struct Args {
    /// Folder that holds the buckets.
    #[arg(long)]
    data: PathBuf,
    /// Address to listen on (loopback).
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// Bucket to create.
    #[arg(long, default_value = "recordings")]
    bucket: String,
    /// Serve HTTPS with a CA made at start.
    #[arg(long)]
    tls: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // The same runtime as `record-offload dev-s3`.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench-s3: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let opts = DevOptions {
            tls: args.tls,
            ..Default::default()
        };
        let server = match DevServer::start_with(&args.data, args.listen, opts).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("bench-s3: cannot start the server: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Err(e) = server.create_bucket(&args.bucket) {
            eprintln!("bench-s3: cannot create the bucket: {e}");
            return ExitCode::FAILURE;
        }
        println!(
            "S3-compatible server on {} (bucket {}, access key {ACCESS_KEY}, secret {SECRET_KEY}){}",
            server.endpoint(),
            args.bucket,
            server
                .ca_path()
                .map(|p| format!(", CA {}", p.display()))
                .unwrap_or_default()
        );
        stopped().await;
        ExitCode::SUCCESS
    })
}
