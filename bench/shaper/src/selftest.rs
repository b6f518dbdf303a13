//! Does the link deliver what it is configured for? Latency, a shared rate, a window; and the
//! ceiling of the proxy itself. Used by `shaper --selftest` and by this crate's tests.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::{LinkConfig, start};

const MIB: u64 = 1024 * 1024;

/// A server behind the link: the first byte chooses the mode, `e` echoes everything, `s`
/// swallows everything and answers the count (8 bytes) when the client has finished sending.
async fn target() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut mode = [0u8; 1];
                if s.read_exact(&mut mode).await.is_err() {
                    return;
                }
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            total += n as u64;
                            if mode[0] == b'e' && s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                if mode[0] == b's' {
                    let _ = s.write_all(&total.to_le_bytes()).await;
                }
            });
        }
    });
    Ok(addr)
}

/// Sends `bytes` through `link` in sink mode; returns when the server has counted them all.
async fn push(link: SocketAddr, bytes: u64) -> std::io::Result<u64> {
    let mut s = TcpStream::connect(link).await?;
    s.set_nodelay(true)?;
    s.write_all(b"s").await?;
    let buf = vec![7u8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    s.shutdown().await?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count).await?;
    Ok(u64::from_le_bytes(count))
}

/// The rate `conns` connections together reach through `link`, each sending `each` bytes
/// (from the first byte sent to the last count received), in MiB/s.
async fn aggregate(link: SocketAddr, conns: usize, each: u64) -> std::io::Result<f64> {
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..conns {
        tasks.spawn(push(link, each));
    }
    while let Some(r) = tasks.join_next().await {
        let got = r.map_err(std::io::Error::other)??;
        if got != each {
            return Err(std::io::Error::other(format!(
                "the server counted {got} bytes of {each}"
            )));
        }
    }
    Ok((conns as u64 * each) as f64 / MIB as f64 / t0.elapsed().as_secs_f64())
}

/// What was measured, with what was configured.
#[derive(Debug)]
pub struct Report {
    pub rtt_ms: f64,
    /// Connect and the first echo (two round trips: the handshake, then the exchange).
    pub first_exchange_ms: f64,
    /// Median of echo round trips on an open connection.
    pub echo_ms: f64,
    pub rate_mib: f64,
    /// Three connections at once, in MiB/s (bytes over the time from connecting to the
    /// server's count received).
    pub shared_mib: f64,
    /// The same for a link that runs at its rate once connected: the data take bytes / rate,
    /// after a round trip to connect and before one for the last byte and the count.
    pub shared_expected_mib: f64,
    pub window_mib: f64,
    /// One connection with a window of `window_mib` MiB: at most window / RTT.
    pub windowed_mib: f64,
    /// The same, with the two round trips of set-up and count as above.
    pub windowed_expected_mib: f64,
    /// The proxy without latency or limit, two connections at once (MiB/s), if measured.
    pub ceiling_mib: Option<f64>,
}

impl Report {
    /// The lines `--selftest` prints.
    pub fn lines(&self) -> Vec<String> {
        let mut v = vec![
            format!(
                "latency: RTT {:.0} ms configured; echo round trip {:.1} ms (median of 9); connect + first echo {:.1} ms (2 RTT expected)",
                self.rtt_ms, self.echo_ms, self.first_exchange_ms
            ),
            format!(
                "rate: {:.0} MiB/s configured; 3 connections together {:.1} MiB/s, {:.1} expected with 2 RTT of set-up and count",
                self.rate_mib, self.shared_mib, self.shared_expected_mib
            ),
            format!(
                "window: {:.0} MiB per connection; one connection {:.1} MiB/s, {:.1} expected (window / RTT = {:.1}, with set-up and count)",
                self.window_mib,
                self.windowed_mib,
                self.windowed_expected_mib,
                self.window_mib / self.rtt_ms * 1e3
            ),
        ];
        if let Some(c) = self.ceiling_mib {
            v.push(format!(
                "ceiling: no latency, no limit, 2 connections: {c:.0} MiB/s through the proxy"
            ));
        }
        v
    }

    /// Every measured figure within its tolerance of the configured one.
    pub fn check(&self) -> Result<(), String> {
        let mut bad = Vec::new();
        // Timers fire up to a millisecond late, on each side of the exchange.
        if self.echo_ms < self.rtt_ms - 1.0 || self.echo_ms > self.rtt_ms + 3.0 {
            bad.push(format!(
                "echo round trip {:.1} ms, configured {:.0}",
                self.echo_ms, self.rtt_ms
            ));
        }
        if self.first_exchange_ms < 2.0 * self.rtt_ms - 1.0
            || self.first_exchange_ms > 2.0 * self.rtt_ms + 6.0
        {
            bad.push(format!(
                "connect + first echo {:.1} ms, expected {:.0}",
                self.first_exchange_ms,
                2.0 * self.rtt_ms
            ));
        }
        if self.shared_mib > 1.03 * self.shared_expected_mib
            || self.shared_mib < 0.92 * self.shared_expected_mib
        {
            bad.push(format!(
                "3 connections reached {:.1} MiB/s, expected {:.1}",
                self.shared_mib, self.shared_expected_mib
            ));
        }
        if self.windowed_mib > 1.05 * self.windowed_expected_mib
            || self.windowed_mib < 0.85 * self.windowed_expected_mib
        {
            bad.push(format!(
                "one connection with a {:.0} MiB window reached {:.1} MiB/s, expected {:.1}",
                self.window_mib, self.windowed_mib, self.windowed_expected_mib
            ));
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(bad.join("; "))
        }
    }
}

/// Runs the checks (about 2 s), and the ceiling when `ceiling_bytes` is given (bytes per
/// connection).
pub async fn run(ceiling_bytes: Option<u64>) -> std::io::Result<Report> {
    let rtt = Duration::from_millis(40);
    let rate = 40 * MIB;
    let target = target().await?;
    let any: SocketAddr = ([127, 0, 0, 1], 0).into();

    let shaped = LinkConfig {
        rtt,
        rate: Some(rate),
        window: 64 * MIB as usize,
    };
    let (_link, addr) = start(any, target, shaped).await?;

    // Latency: the first exchange pays for the handshake, then one round trip each.
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(b"e").await?;
    let mut byte = [0u8; 1];
    s.write_all(b"x").await?;
    s.read_exact(&mut byte).await?;
    let first_exchange_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut echoes = Vec::new();
    for _ in 0..9 {
        let t = Instant::now();
        s.write_all(b"x").await?;
        s.read_exact(&mut byte).await?;
        echoes.push(t.elapsed().as_secs_f64() * 1e3);
    }
    echoes.sort_by(f64::total_cmp);
    drop(s);

    // Rate: three connections share the link's capacity, they do not get it each.
    let shared_bytes = 3 * 16 * MIB;
    let shared_mib = aggregate(addr, 3, shared_bytes / 3).await?;
    let expected = |bytes: u64, rate: f64| {
        let secs = 2.0 * rtt.as_secs_f64() + bytes as f64 / rate;
        bytes as f64 / MIB as f64 / secs
    };

    // Window: one connection with less window than the link's bandwidth-delay product.
    let window = MIB as usize;
    let windowed = LinkConfig {
        rtt,
        rate: Some(rate),
        window,
    };
    let (_wlink, waddr) = start(any, target, windowed).await?;
    let windowed_bytes = 8 * MIB;
    let windowed_mib = aggregate(waddr, 1, windowed_bytes).await?;
    let window_rate = (window as f64 / rtt.as_secs_f64()).min(rate as f64);

    let ceiling_mib = match ceiling_bytes {
        Some(bytes) => {
            let (_plink, paddr) = start(any, target, LinkConfig::passthrough()).await?;
            Some(aggregate(paddr, 2, bytes).await?)
        }
        None => None,
    };

    Ok(Report {
        rtt_ms: rtt.as_secs_f64() * 1e3,
        first_exchange_ms,
        echo_ms: echoes[echoes.len() / 2],
        rate_mib: (rate / MIB) as f64,
        shared_mib,
        shared_expected_mib: expected(shared_bytes, rate as f64),
        window_mib: window as f64 / MIB as f64,
        windowed_mib,
        windowed_expected_mib: expected(windowed_bytes, window_rate),
        ceiling_mib,
    })
}

#[cfg(test)]
mod tests {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_link_delivers_its_latency_rate_and_window() -> Result<(), String> {
        let report = super::run(Some(64 * super::MIB))
            .await
            .map_err(|e| e.to_string())?;
        for l in report.lines() {
            println!("{l}");
        }
        report.check()
    }
}
