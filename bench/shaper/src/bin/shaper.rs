//! `shaper`: a TCP proxy that behaves like a network link (see the library's docs).
//!
//!     shaper --listen 127.0.0.1:9100 --upstream 127.0.0.1:9000 --rtt-ms 30 --rate-mib 100
//!     shaper --selftest
//!
//! On SIGTERM or SIGINT it prints the bytes it delivered each way and the connections it
//! accepted, as one line of JSON, and exits.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use record_offload_bench::{LinkConfig, selftest, start, stopped};

#[derive(Parser)]
#[command(about = "A TCP proxy with the latency and bandwidth of a network link")]
struct Args {
    /// Address to accept on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Where to forward connections to.
    #[arg(long, required_unless_present = "selftest")]
    upstream: Option<SocketAddr>,
    /// Round-trip time added (half each way), milliseconds.
    #[arg(long, default_value_t = 0.0)]
    rtt_ms: f64,
    /// Capacity of each direction, shared by all connections, MiB/s (0: unlimited).
    #[arg(long, default_value_t = 0.0)]
    rate_mib: f64,
    /// Unacknowledged bytes per connection and direction, MiB (a TCP window).
    #[arg(long, default_value_t = 4.0)]
    window_mib: f64,
    /// Every 100 ms, append `unix_ms,up_bytes,down_bytes` (totals so far) to this file.
    #[arg(long)]
    timeline: Option<std::path::PathBuf>,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Check latency, shared rate and window against an in-process server, print the
    /// proxy's own ceiling, and exit (non-zero when a figure is off).
    #[arg(long)]
    selftest: bool,
    /// With --selftest: MiB per connection for the ceiling (0: skip it).
    #[arg(long, default_value_t = 1024)]
    ceiling_mib: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("shaper: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    if args.selftest {
        let ceiling = (args.ceiling_mib > 0).then_some(args.ceiling_mib * 1024 * 1024);
        return match selftest::run(ceiling).await {
            Ok(report) => {
                for l in report.lines() {
                    println!("{l}");
                }
                match report.check() {
                    Ok(()) => {
                        println!("selftest ok");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("shaper: selftest failed: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Err(e) => {
                eprintln!("shaper: selftest: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let Some(upstream) = args.upstream else {
        eprintln!("shaper: --upstream is required");
        return ExitCode::FAILURE;
    };
    if !(args.rtt_ms >= 0.0 && args.rate_mib >= 0.0 && args.window_mib > 0.0) {
        eprintln!("shaper: --rtt-ms and --rate-mib must be >= 0, --window-mib > 0");
        return ExitCode::FAILURE;
    }
    let cfg = LinkConfig {
        rtt: Duration::from_secs_f64(args.rtt_ms / 1e3),
        rate: (args.rate_mib > 0.0).then_some((args.rate_mib * 1024.0 * 1024.0) as u64),
        window: (args.window_mib * 1024.0 * 1024.0) as usize,
    };
    let (link, addr) = match start(args.listen, upstream, cfg).await {
        Ok(x) => x,
        Err(e) => {
            eprintln!("shaper: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    println!(
        "shaper on {addr} -> {upstream}: RTT {} ms, {} each way, window {} MiB",
        args.rtt_ms,
        if args.rate_mib > 0.0 {
            format!("{} MiB/s", args.rate_mib)
        } else {
            "unlimited".to_string()
        },
        args.window_mib
    );
    if let Some(path) = &args.timeline {
        match std::fs::File::create(path) {
            Ok(file) => {
                tokio::spawn(timeline(file, link.clone()));
            }
            Err(e) => {
                eprintln!("shaper: cannot create {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
    }
    stopped().await;
    println!("{}", link.stats.json());
    ExitCode::SUCCESS
}

/// Writes the byte counters every 100 ms, as long as the file takes them.
async fn timeline(mut file: std::fs::File, link: std::sync::Arc<record_offload_bench::Link>) {
    use std::io::Write;
    use std::sync::atomic::Ordering;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let line = format!(
            "{ms},{},{}\n",
            link.stats.up_bytes.load(Ordering::Relaxed),
            link.stats.down_bytes.load(Ordering::Relaxed)
        );
        if file.write_all(line.as_bytes()).is_err() {
            return;
        }
    }
}
