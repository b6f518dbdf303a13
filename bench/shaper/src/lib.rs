//! A network link for the offload benchmark (`bench/offload.py`): a TCP proxy on loopback that
//! gives every connection through it the latency and the bandwidth of a real path to the
//! store, the same for every tool measured through it.
//!
//! # The link it models
//!
//! Full duplex; each direction on its own, shared by every connection:
//!
//! - **Bandwidth.** One virtual clock per direction ("the link is free again at T"). A chunk
//!   of `n` bytes read from a sender occupies the link from `max(now, T)` for `n / rate`; the
//!   chunks of all connections take turns on it in the order they were read. A sender is held
//!   back while the link's queue is longer than [`QUEUE`], so what waits beyond that waits in
//!   the sender's own socket buffer, as it would behind a router's short queue.
//! - **Latency.** A chunk is delivered `rtt / 2` after its last byte left the link, in order
//!   (a delay line, not a sleep per request): a request and its answer cost one round trip
//!   plus their time on the link.
//! - **Connection set-up.** The kernel completes the loopback TCP handshake at once, so a new
//!   connection's first bytes towards the server enter the link no earlier than one round trip
//!   after it was accepted, as if they had waited for SYN and SYN-ACK to cross it. (A TLS
//!   handshake's round trips are real bytes and cross the link like any others.)
//! - **Window.** At most `window` bytes per connection and direction are unacknowledged: a
//!   chunk's bytes count from when it is read until one round trip later (delivery plus the
//!   acknowledgement's way back), so one connection carries at most `window / rtt`, as a TCP
//!   connection with that window would.
//!
//! Not modelled: loss, TCP slow start (a new or idle connection is at full window at once), and
//! congestion control. Every tool gets the same optimistic link.
//!
//! With `rtt = 0` and no rate the proxy only copies, which measures its own ceiling
//! (`shaper --selftest` prints it).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::sleep_until;

/// How far the link's schedule may run ahead of the present before a sender is held back.
/// Larger than the timer's 1 ms resolution, so a lone sender can keep the link busy.
pub const QUEUE: Duration = Duration::from_millis(5);

/// tokio's timers fire on a millisecond tick at or after their deadline, and the thread takes
/// its time to wake: deliveries aim this much early at most, learned from how late they were.
const MAX_EARLY: Duration = Duration::from_millis(2);

/// Bytes read from a socket at a time (one chunk on the link).
const CHUNK: usize = 64 * 1024;

/// What the link is like.
#[derive(Clone, Copy, Debug)]
pub struct LinkConfig {
    /// Round-trip time added to every exchange.
    pub rtt: Duration,
    /// Capacity of each direction in bytes per second, shared by all connections; `None`:
    /// unlimited.
    pub rate: Option<u64>,
    /// Unacknowledged bytes per connection and direction (a TCP window).
    pub window: usize,
}

impl LinkConfig {
    /// No latency, no limit: a plain copying proxy.
    pub fn passthrough() -> LinkConfig {
        LinkConfig {
            rtt: Duration::ZERO,
            rate: None,
            window: 64 * 1024 * 1024,
        }
    }
}

/// Bytes delivered and connections accepted so far.
#[derive(Debug, Default)]
pub struct Stats {
    /// Towards the server (requests, uploads).
    pub up_bytes: AtomicU64,
    /// Towards the client (answers).
    pub down_bytes: AtomicU64,
    pub connections: AtomicU64,
}

impl Stats {
    /// One line of JSON.
    pub fn json(&self) -> String {
        format!(
            "{{\"up_bytes\":{},\"down_bytes\":{},\"connections\":{}}}",
            self.up_bytes.load(Ordering::Relaxed),
            self.down_bytes.load(Ordering::Relaxed),
            self.connections.load(Ordering::Relaxed)
        )
    }
}

/// One direction of the link: its schedule, shared by every connection.
struct Direction {
    /// Nanoseconds per byte; 0 without a limit.
    ns_per_byte: f64,
    /// When the link is free again.
    free_at: Mutex<Instant>,
}

impl Direction {
    fn new(rate: Option<u64>) -> Direction {
        Direction {
            ns_per_byte: rate.map_or(0.0, |r| 1e9 / r.max(1) as f64),
            free_at: Mutex::new(Instant::now()),
        }
    }

    /// Books the link for `n` bytes sent no earlier than `earliest`; returns when their last
    /// byte has left it.
    fn reserve(&self, n: usize, earliest: Instant) -> Instant {
        let start = Instant::now().max(earliest);
        if self.ns_per_byte == 0.0 {
            return start;
        }
        let busy = Duration::from_nanos((n as f64 * self.ns_per_byte) as u64);
        let mut free_at = match self.free_at.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let end = (*free_at).max(start) + busy;
        *free_at = end;
        end
    }
}

/// A running link: accepts on a listener and forwards to `upstream`.
pub struct Link {
    cfg: LinkConfig,
    upstream: SocketAddr,
    up: Direction,
    down: Direction,
    /// How early to set delivery timers (see [`MAX_EARLY`]), in nanoseconds.
    early_ns: AtomicU64,
    pub stats: Stats,
}

impl Link {
    pub fn new(cfg: LinkConfig, upstream: SocketAddr) -> Arc<Link> {
        Arc::new(Link {
            cfg,
            upstream,
            up: Direction::new(cfg.rate),
            down: Direction::new(cfg.rate),
            early_ns: AtomicU64::new(0),
            stats: Stats::default(),
        })
    }

    /// After a timed delivery meant for `target`: moves the timers' advance a tenth of the
    /// way towards making this one exact, so that deliveries are on time on average.
    fn learn(&self, target: Instant) {
        let now = Instant::now();
        let late = now.saturating_duration_since(target).as_nanos() as i64
            - target.saturating_duration_since(now).as_nanos() as i64;
        let early = self.early_ns.load(Ordering::Relaxed) as i64;
        let next = (early + late / 10).clamp(0, MAX_EARLY.as_nanos() as i64);
        self.early_ns.store(next as u64, Ordering::Relaxed);
    }

    /// Accepts connections until the task is dropped.
    pub async fn serve(self: Arc<Link>, listener: TcpListener) {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            let accepted = Instant::now();
            self.stats.connections.fetch_add(1, Ordering::Relaxed);
            let link = self.clone();
            tokio::spawn(async move {
                if let Ok(server) = TcpStream::connect(link.upstream).await {
                    let _ = link.relay(client, server, accepted).await;
                }
            });
        }
    }

    async fn relay(
        &self,
        client: TcpStream,
        server: TcpStream,
        accepted: Instant,
    ) -> std::io::Result<()> {
        client.set_nodelay(true)?;
        server.set_nodelay(true)?;
        let (cr, cw) = client.into_split();
        let (sr, sw) = server.into_split();
        let handshake = accepted + self.cfg.rtt;
        // An error either way (a reset, a write to a closed socket) ends both: dropping the
        // halves closes the sockets, and the other side sees it.
        tokio::try_join!(
            self.direction(cr, sw, &self.up, handshake, &self.stats.up_bytes),
            self.direction(sr, cw, &self.down, accepted, &self.stats.down_bytes),
        )?;
        Ok(())
    }

    /// Copies `src` to `dst` through `dir`, sending nothing onto the link before `not_before`.
    async fn direction(
        &self,
        mut src: OwnedReadHalf,
        mut dst: OwnedWriteHalf,
        dir: &Direction,
        not_before: Instant,
        delivered: &AtomicU64,
    ) -> std::io::Result<()> {
        let one_way = self.cfg.rtt / 2;
        let rtt = self.cfg.rtt;
        let window = Arc::new(Semaphore::new(self.cfg.window.max(1)));
        let (tx, mut rx) = mpsc::unbounded_channel::<Chunk>();

        let reader = async move {
            let mut last = Instant::now();
            let chunk = CHUNK.min(self.cfg.window.max(1));
            loop {
                let mut buf = vec![0u8; chunk];
                let n = src.read(&mut buf).await?;
                if n == 0 {
                    // The FIN follows the data, one way later.
                    let at = last.max(Instant::now().max(not_before) + one_way);
                    let _ = tx.send(Chunk {
                        data: Vec::new(),
                        at,
                        permit: None,
                    });
                    return Ok::<(), std::io::Error>(());
                }
                buf.truncate(n);
                let permit = window
                    .clone()
                    .acquire_many_owned(n as u32)
                    .await
                    .map_err(std::io::Error::other)?;
                let left = dir.reserve(n, not_before);
                if left > Instant::now() + QUEUE {
                    sleep_until((left - QUEUE).into()).await;
                }
                let at = left + one_way;
                last = at;
                if tx
                    .send(Chunk {
                        data: buf,
                        at,
                        permit: Some(permit),
                    })
                    .is_err()
                {
                    return Ok(());
                }
            }
        };

        let writer = async move {
            while let Some(chunk) = rx.recv().await {
                let early = Duration::from_nanos(self.early_ns.load(Ordering::Relaxed));
                if chunk.at > Instant::now() + early {
                    sleep_until((chunk.at - early).into()).await;
                    self.learn(chunk.at);
                }
                if chunk.data.is_empty() {
                    let _ = dst.shutdown().await;
                    break;
                }
                dst.write_all(&chunk.data).await?;
                delivered.fetch_add(chunk.data.len() as u64, Ordering::Relaxed);
                // The window opens again when the acknowledgement would be back.
                if let Some(permit) = chunk.permit
                    && !rtt.is_zero()
                {
                    let back = chunk.at + one_way;
                    tokio::spawn(async move {
                        sleep_until(back.into()).await;
                        drop(permit);
                    });
                }
            }
            Ok::<(), std::io::Error>(())
        };
        tokio::try_join!(reader, writer)?;
        Ok(())
    }
}

struct Chunk {
    /// Empty: end of stream.
    data: Vec<u8>,
    /// When it reaches the other end.
    at: Instant,
    permit: Option<OwnedSemaphorePermit>,
}

/// Starts a link on `listen` in front of `upstream`; returns it and its address.
pub async fn start(
    listen: SocketAddr,
    upstream: SocketAddr,
    cfg: LinkConfig,
) -> std::io::Result<(Arc<Link>, SocketAddr)> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let link = Link::new(cfg, upstream);
    tokio::spawn(link.clone().serve(listener));
    Ok((link, addr))
}

pub mod selftest;

/// Completes on SIGTERM or SIGINT.
pub async fn stopped() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
