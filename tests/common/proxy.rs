//! A fault-injecting HTTP/1.1 proxy for the integration tests.
//!
//! The proxy sits between an S3 client and an S3 server, both speaking HTTP/1.1 over
//! plain TCP on loopback. It understands just enough HTTP to inject faults per request:
//! every client connection carries exactly one request. The request head is rewritten to
//! carry `Connection: close` before it goes upstream, and the response head relayed back
//! is rewritten the same way, so the client opens a fresh connection for its next
//! request.
//!
//! Nothing in the connection tasks panics: any I/O or protocol error just closes the
//! connection, which is what a client would see from a misbehaving network anyway.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};

/// Largest request or response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Relay buffer size.
const BUF_SIZE: usize = 64 * 1024;
/// How long to wait for a client to go away after an injected answer.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the accept loop retries re-binding the port when that failed.
const REBIND_RETRY: Duration = Duration::from_millis(50);

/// The fault applied to requests that start while it is set.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Pass everything through unchanged.
    None,
    /// Store down: accepted connections are closed at once (with a reset) without a byte.
    Down,
    /// The listening socket is closed, so connects get ECONNREFUSED. Setting any other
    /// fault re-binds the same port.
    Refuse,
    /// Answer (without forwarding) with this HTTP status and an S3 XML error body
    /// `<Error><Code>{code}</Code><Message>injected</Message></Error>` for every
    /// `every`-th request counted since this fault was set (1 = all, 0 is taken as 1);
    /// the other requests are forwarded.
    Status {
        status: u16,
        code: String,
        every: u32,
    },
    /// Answer (without forwarding) about `percent` % of the requests, picked at random, each
    /// with one of `answers` (status, S3 error code), also picked at random; forward the
    /// rest. `seed` makes the sequence repeatable.
    RandomStatus {
        percent: u32,
        answers: Vec<(u16, String)>,
        seed: u64,
    },
    /// Forward the request head and only the first `after_bytes` bytes of the request
    /// body upstream, then cut both connections: the client's with a reset, the
    /// upstream's with a FIN after exactly `after_bytes` body bytes. Applies to requests
    /// with a `Content-Length` of at least `after_bytes`; smaller ones (and chunked ones)
    /// pass.
    CutRequestBody { after_bytes: u64 },
    /// Forward normally, but wait this long before relaying the final response head back.
    DelayResponse(Duration),
    /// Forward, limiting the request body rate upstream to this many bytes per second
    /// (per connection).
    Throttle { bytes_per_sec: u64 },
    /// Forward, but flip the bits of the first body byte of every `every`-th request that
    /// has a body (counted since this fault was set): the server stores damaged bytes, as
    /// a faulty network path or disk would make it.
    CorruptRequestBody { every: u32 },
}

/// Counters since the proxy started.
#[derive(Clone, Debug, Default)]
pub struct ProxyStats {
    /// Accepted client connections.
    pub connections: u64,
    /// Request heads read in full.
    pub requests: u64,
    /// Requests that got a fault instead of a clean round trip: injected status answers,
    /// cut request bodies, and requests dropped because the proxy was `Down`/`Refuse`.
    pub injected: u64,
    /// Requests relayed upstream without an injected fault (`DelayResponse` and
    /// `Throttle` requests count here).
    pub forwarded: u64,
    /// Request body bytes written upstream.
    pub request_body_bytes: u64,
    /// Connections closed at accept time because the proxy was `Down` (or `Refuse`),
    /// before any request was read.
    pub dropped_connections: u64,
    /// The most forwarded requests with a body in flight at once (from their head to the end
    /// of their answer), and of those with a body of at least [`LARGE_BODY`] bytes.
    pub peak_bodies: u64,
    pub peak_large_bodies: u64,
    /// The most body bytes (by `Content-Length`) of forwarded requests in flight at once.
    pub peak_body_bytes: u64,
}

/// Bodies of at least this size count as large in [`ProxyStats::peak_large_bodies`] (whole
/// parts of 5 MiB, not the short last part of a file).
pub const LARGE_BODY: u64 = 4 * 1024 * 1024;

/// A fault-injecting proxy listening on 127.0.0.1. Stops when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1:0 and forwards to `upstream`. Runs on the current tokio
    /// runtime; stops when dropped.
    pub async fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            addr,
            runtime: tokio::runtime::Handle::current(),
            state: Mutex::new(State {
                fault: Fault::None,
                status_seen: 0,
                rng: 1,
            }),
            listener: Mutex::new(Some(listener)),
            listener_changed: Notify::new(),
            stopped: AtomicBool::new(false),
            stats: Counters::default(),
        });
        let accept_task = tokio::spawn(accept_loop(Arc::clone(&shared)));
        Ok(FaultProxy {
            addr,
            shared,
            accept_task,
        })
    }

    /// The address clients connect to. Stays the same across `Refuse`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The upstream address requests are forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// Sets the fault. Takes effect for requests that start after the call; `Refuse`
    /// closes the listening socket before this returns, and leaving `Refuse` re-binds
    /// the port before this returns (or, if that fails, retries in the background).
    pub fn set(&self, fault: Fault) {
        let mut state = lock(&self.shared.state);
        if let Fault::RandomStatus { seed, .. } = &fault {
            state.rng = seed | 1;
        }
        state.fault = fault;
        state.status_seen = 0;
        let refuse = matches!(state.fault, Fault::Refuse);
        let mut listener = lock(&self.shared.listener);
        if refuse {
            // Dropping the listener closes the socket: connects are refused from now on.
            *listener = None;
        } else if listener.is_none() {
            let _runtime = self.shared.runtime.enter();
            // On failure the accept loop keeps retrying.
            *listener = bind(self.addr).ok();
        }
        drop(listener);
        drop(state);
        self.shared.listener_changed.notify_one();
    }

    /// The fault currently set.
    pub fn fault(&self) -> Fault {
        lock(&self.shared.state).fault.clone()
    }

    /// Counters since start.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.shared.stats;
        ProxyStats {
            connections: c.connections.load(Ordering::SeqCst),
            requests: c.requests.load(Ordering::SeqCst),
            injected: c.injected.load(Ordering::SeqCst),
            forwarded: c.forwarded.load(Ordering::SeqCst),
            request_body_bytes: c.request_body_bytes.load(Ordering::SeqCst),
            dropped_connections: c.dropped_connections.load(Ordering::SeqCst),
            peak_bodies: c.peak_bodies.load(Ordering::SeqCst),
            peak_large_bodies: c.peak_large_bodies.load(Ordering::SeqCst),
            peak_body_bytes: c.peak_body_bytes.load(Ordering::SeqCst),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection task.
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.accept_task.abort();
        lock(&self.shared.listener).take();
    }
}

struct Shared {
    upstream: SocketAddr,
    addr: SocketAddr,
    runtime: tokio::runtime::Handle,
    /// Lock order: `state` before `listener`.
    state: Mutex<State>,
    listener: Mutex<Option<TcpListener>>,
    listener_changed: Notify,
    /// Set when the proxy is dropped: never re-bind after that.
    stopped: AtomicBool,
    stats: Counters,
}

struct State {
    fault: Fault,
    /// Requests seen since the current `Status` fault was set.
    status_seen: u64,
    /// xorshift state for `RandomStatus`.
    rng: u64,
}

impl State {
    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    requests: AtomicU64,
    injected: AtomicU64,
    forwarded: AtomicU64,
    request_body_bytes: AtomicU64,
    dropped_connections: AtomicU64,
    bodies: AtomicU64,
    large_bodies: AtomicU64,
    body_bytes: AtomicU64,
    peak_bodies: AtomicU64,
    peak_large_bodies: AtomicU64,
    peak_body_bytes: AtomicU64,
}

/// A forwarded request with a body, counted in flight until dropped.
struct InFlight<'a> {
    stats: &'a Counters,
    len: u64,
}

impl<'a> InFlight<'a> {
    fn new(stats: &'a Counters, body: Body) -> Option<InFlight<'a>> {
        let Body::Length(len) = body else {
            return None;
        };
        if len == 0 {
            return None;
        }
        let n = stats.bodies.fetch_add(1, Ordering::SeqCst) + 1;
        stats.peak_bodies.fetch_max(n, Ordering::SeqCst);
        let b = stats.body_bytes.fetch_add(len, Ordering::SeqCst) + len;
        stats.peak_body_bytes.fetch_max(b, Ordering::SeqCst);
        if len >= LARGE_BODY {
            let l = stats.large_bodies.fetch_add(1, Ordering::SeqCst) + 1;
            stats.peak_large_bodies.fetch_max(l, Ordering::SeqCst);
        }
        Some(InFlight { stats, len })
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.stats.bodies.fetch_sub(1, Ordering::SeqCst);
        self.stats.body_bytes.fetch_sub(self.len, Ordering::SeqCst);
        if self.len >= LARGE_BODY {
            self.stats.large_bodies.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::SeqCst);
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    // Lets `Refuse` → `None` re-bind the port while old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// What to do with one request, decided from the fault when its head has been read.
enum Plan {
    Drop,
    Inject { status: u16, code: String },
    Forward(ForwardPlan),
}

#[derive(Default)]
struct ForwardPlan {
    cut_after: Option<u64>,
    delay: Option<Duration>,
    throttle: Option<u64>,
    corrupt: bool,
}

impl Shared {
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(TcpStream, SocketAddr)>> {
        match lock(&self.listener).as_ref() {
            Some(listener) => listener.poll_accept(cx),
            // Woken through `listener_changed` when a listener is bound again.
            None => Poll::Pending,
        }
    }

    fn needs_rebind(&self) -> bool {
        let state = lock(&self.state);
        !matches!(state.fault, Fault::Refuse) && lock(&self.listener).is_none()
    }

    fn try_rebind(&self) {
        let state = lock(&self.state);
        if matches!(state.fault, Fault::Refuse) || self.stopped.load(Ordering::SeqCst) {
            return;
        }
        let mut listener = lock(&self.listener);
        if listener.is_none() {
            *listener = bind(self.addr).ok();
        }
    }

    fn refusing_connections(&self) -> bool {
        matches!(lock(&self.state).fault, Fault::Down | Fault::Refuse)
    }

    fn plan(&self, body: Body) -> Plan {
        let mut state = lock(&self.state);
        let fault = state.fault.clone();
        match fault {
            Fault::None => Plan::Forward(ForwardPlan::default()),
            Fault::Down | Fault::Refuse => Plan::Drop,
            Fault::Status {
                status,
                code,
                every,
            } => {
                state.status_seen += 1;
                if state.status_seen.is_multiple_of(u64::from(every.max(1))) {
                    Plan::Inject { status, code }
                } else {
                    Plan::Forward(ForwardPlan::default())
                }
            }
            Fault::RandomStatus {
                percent, answers, ..
            } => {
                let roll = state.next_random() % 100;
                if roll < u64::from(percent) && !answers.is_empty() {
                    let pick = state.next_random() as usize % answers.len();
                    let (status, code) = answers[pick].clone();
                    Plan::Inject { status, code }
                } else {
                    Plan::Forward(ForwardPlan::default())
                }
            }
            Fault::CutRequestBody { after_bytes } => match body {
                Body::Length(len) if len >= after_bytes => Plan::Forward(ForwardPlan {
                    cut_after: Some(after_bytes),
                    ..ForwardPlan::default()
                }),
                _ => Plan::Forward(ForwardPlan::default()),
            },
            Fault::DelayResponse(delay) => Plan::Forward(ForwardPlan {
                delay: Some(delay),
                ..ForwardPlan::default()
            }),
            Fault::Throttle { bytes_per_sec } => Plan::Forward(ForwardPlan {
                throttle: Some(bytes_per_sec.max(1)),
                ..ForwardPlan::default()
            }),
            Fault::CorruptRequestBody { every } => {
                let has_body = matches!(body, Body::Length(n) if n > 0);
                if has_body {
                    state.status_seen += 1;
                }
                Plan::Forward(ForwardPlan {
                    corrupt: has_body && state.status_seen.is_multiple_of(u64::from(every.max(1))),
                    ..ForwardPlan::default()
                })
            }
        }
    }
}

async fn accept_loop(shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        let rebind_pending = shared.needs_rebind();
        tokio::select! {
            accepted = poll_fn(|cx| shared.poll_accept(cx)) => match accepted {
                Ok((stream, _peer)) => {
                    bump(&shared.stats.connections, 1);
                    connections.spawn(handle_connection(Arc::clone(&shared), stream));
                }
                // E.g. out of file descriptors: back off a little instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            () = shared.listener_changed.notified() => {}
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = tokio::time::sleep(REBIND_RETRY), if rebind_pending => shared.try_rebind(),
        }
    }
}

/// How a connection ends.
enum End {
    /// Shut down our sending side after everything was written, then close.
    Close,
    /// Close with a reset (SO_LINGER 0): the peer sees ECONNRESET.
    Reset,
}

async fn handle_connection(shared: Arc<Shared>, mut client: TcpStream) {
    let _ = client.set_nodelay(true);
    if shared.refusing_connections() {
        bump(&shared.stats.dropped_connections, 1);
        reset(client);
        return;
    }
    match serve(&shared, &mut client).await {
        End::Close => {
            let _ = client.shutdown().await;
        }
        End::Reset => reset(client),
    }
}

fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn serve(shared: &Shared, client: &mut TcpStream) -> End {
    let mut buf = Vec::with_capacity(BUF_SIZE);
    let head_len = match read_head(client, &mut buf).await {
        Ok(Some(len)) => len,
        // The client went away without sending anything.
        Ok(None) => return End::Close,
        Err(_) => return End::Reset,
    };
    let head = Head::new(&buf[..head_len]);
    let leftover = buf[head_len..].to_vec();
    bump(&shared.stats.requests, 1);

    let Some(body) = head.request_body() else {
        // Unparseable Content-Length: nothing sensible to forward.
        return End::Reset;
    };
    let expect_continue = head.has_token(b"expect", "100-continue");
    match shared.plan(body) {
        Plan::Drop => {
            bump(&shared.stats.injected, 1);
            End::Reset
        }
        Plan::Inject { status, code } => {
            bump(&shared.stats.injected, 1);
            inject_status(client, leftover, body, expect_continue, status, &code).await
        }
        Plan::Forward(plan) => forward(shared, client, &head, leftover, body, plan).await,
    }
}

/// Answers with an S3 XML error instead of forwarding.
async fn inject_status(
    client: &mut TcpStream,
    leftover: Vec<u8>,
    body: Body,
    expect_continue: bool,
    status: u16,
    code: &str,
) -> End {
    let response = error_response(status, code);
    match body {
        // The client waits for our answer before sending the body: answer at once, as
        // a server rejecting the request would, then drain whatever it sends anyway.
        _ if expect_continue => {}
        Body::Chunked => {}
        Body::Length(len) => {
            let already = leftover.len() as u64;
            if already < len {
                let mut rest = (&mut *client).take(len - already);
                match tokio::io::copy(&mut rest, &mut tokio::io::sink()).await {
                    Ok(n) if n == len - already => {}
                    _ => return End::Reset,
                }
            }
        }
    }
    if client.write_all(&response).await.is_err() || client.shutdown().await.is_err() {
        return End::Reset;
    }
    // Read until the client closes, so that unread bytes do not turn our close into a
    // reset that could destroy the answer before the client has read it.
    let _ = tokio::time::timeout(
        DRAIN_TIMEOUT,
        tokio::io::copy(client, &mut tokio::io::sink()),
    )
    .await;
    End::Close
}

fn error_response(status: u16, code: &str) -> Vec<u8> {
    let body = format!(
        "<Error><Code>{}</Code><Message>injected</Message></Error>",
        xml_escape(code)
    );
    format!(
        "HTTP/1.1 {status} {}\r\n\
         Content-Type: application/xml\r\n\
         Content-Length: {}\r\n\
         x-amz-request-id: injected\r\n\
         Connection: close\r\n\
         \r\n\
         {body}",
        reason_phrase(status),
        body.len(),
    )
    .into_bytes()
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        412 => "Precondition Failed",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Injected",
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// How a relayed request body ended.
enum BodyEnd {
    Done,
    Cut,
}

async fn forward(
    shared: &Shared,
    client: &mut TcpStream,
    head: &Head<'_>,
    leftover: Vec<u8>,
    body: Body,
    plan: ForwardPlan,
) -> End {
    let Ok(mut upstream) = TcpStream::connect(shared.upstream).await else {
        return End::Reset;
    };
    let _ = upstream.set_nodelay(true);
    if upstream
        .write_all(&head.with_connection_close())
        .await
        .is_err()
    {
        return End::Reset;
    }
    if plan.cut_after.is_some() {
        bump(&shared.stats.injected, 1);
    } else {
        bump(&shared.stats.forwarded, 1);
    }
    let head_request = head.method().eq_ignore_ascii_case(b"HEAD");
    // Counted until the answer's head goes back to the client (who may then start another).
    let in_flight = InFlight::new(&shared.stats, body);

    let outcome = {
        let (mut client_read, mut client_write) = client.split();
        let (mut upstream_read, mut upstream_write) = upstream.split();
        let request = relay_body(
            &shared.stats.request_body_bytes,
            &mut client_read,
            &mut upstream_write,
            leftover,
            body,
            &plan,
        );
        let response = relay_response(
            &mut upstream_read,
            &mut client_write,
            head_request,
            plan.delay,
            in_flight,
        );
        tokio::pin!(request, response);
        let mut request_done = false;
        loop {
            tokio::select! {
                result = &mut request, if !request_done => match result {
                    Ok(BodyEnd::Done) => request_done = true,
                    Ok(BodyEnd::Cut) => break Ok(BodyEnd::Cut),
                    Err(e) => break Err(e),
                },
                // The response decides when the exchange is over, even if the upstream
                // answered before reading the whole body.
                result = &mut response => break result.map(|()| BodyEnd::Done),
            }
        }
    };
    match outcome {
        Ok(BodyEnd::Done) => End::Close,
        Ok(BodyEnd::Cut) => {
            // The upstream gets exactly the bytes relayed so far, then EOF; the client
            // gets a reset.
            let _ = upstream.shutdown().await;
            End::Reset
        }
        Err(_) => {
            reset(upstream);
            End::Reset
        }
    }
}

/// Relays the request body upstream: exactly `Content-Length` bytes, or for a chunked
/// body everything until the client's EOF. Throttles and cuts as planned.
async fn relay_body<R, W>(
    counter: &AtomicU64,
    from: &mut R,
    to: &mut W,
    mut leftover: Vec<u8>,
    body: Body,
    plan: &ForwardPlan,
) -> io::Result<BodyEnd>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut pump = Pump {
        to,
        counter,
        sent: 0,
        cut_after: plan.cut_after,
        throttle: plan.throttle,
        started: Instant::now(),
        corrupt: plan.corrupt,
    };
    if pump.cut_reached() {
        pump.to.flush().await?;
        return Ok(BodyEnd::Cut);
    }
    let mut remaining = match body {
        Body::Length(len) => Some(len),
        Body::Chunked => None,
    };
    if let Some(len) = remaining {
        leftover.truncate(usize::try_from(len).unwrap_or(usize::MAX));
    }
    if !leftover.is_empty() {
        if let Some(r) = remaining.as_mut() {
            *r -= leftover.len() as u64;
        }
        if !pump.push(&leftover).await? {
            return Ok(BodyEnd::Cut);
        }
    }
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let want = match remaining {
            Some(0) => break,
            Some(r) => buf.len().min(usize::try_from(r).unwrap_or(usize::MAX)),
            None => buf.len(),
        };
        let n = from.read(&mut buf[..want]).await?;
        if n == 0 {
            if remaining.is_none() {
                break;
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if let Some(r) = remaining.as_mut() {
            *r -= n as u64;
        }
        if !pump.push(&buf[..n]).await? {
            return Ok(BodyEnd::Cut);
        }
    }
    pump.to.flush().await?;
    Ok(BodyEnd::Done)
}

/// Writes request body bytes upstream, counting, throttling and cutting them.
struct Pump<'a, W> {
    to: &'a mut W,
    counter: &'a AtomicU64,
    sent: u64,
    cut_after: Option<u64>,
    throttle: Option<u64>,
    started: Instant,
    /// Flip the next body byte written.
    corrupt: bool,
}

impl<W: AsyncWrite + Unpin> Pump<'_, W> {
    fn cut_reached(&self) -> bool {
        self.cut_after == Some(self.sent)
    }

    /// Writes `data` (up to the cut point). Returns false once the cut point is reached.
    async fn push(&mut self, mut data: &[u8]) -> io::Result<bool> {
        if let Some(cut) = self.cut_after {
            let room = usize::try_from(cut.saturating_sub(self.sent)).unwrap_or(usize::MAX);
            data = &data[..data.len().min(room)];
        }
        if self.corrupt && !data.is_empty() {
            self.corrupt = false;
            self.to.write_all(&[!data[0]]).await?;
            self.sent += 1;
            bump(self.counter, 1);
            data = &data[1..];
        }
        while !data.is_empty() {
            let piece = match self.throttle {
                // Small pieces so the rate is smooth, not one burst per buffer.
                Some(rate) => data.len().min(
                    usize::try_from(rate / 20)
                        .unwrap_or(BUF_SIZE)
                        .clamp(1, BUF_SIZE),
                ),
                None => data.len(),
            };
            self.to.write_all(&data[..piece]).await?;
            self.sent += piece as u64;
            bump(self.counter, piece as u64);
            data = &data[piece..];
            if let Some(rate) = self.throttle {
                let due = self.started + Duration::from_secs_f64(self.sent as f64 / rate as f64);
                tokio::time::sleep_until(due.into()).await;
            }
        }
        if self.cut_reached() {
            self.to.flush().await?;
            return Ok(false);
        }
        Ok(true)
    }
}

/// Relays the upstream's response: interim 1xx heads as they are, then the final head
/// (after the planned delay) rewritten to `Connection: close`, then its body.
async fn relay_response<R, W>(
    from: &mut R,
    to: &mut W,
    head_request: bool,
    delay: Option<Duration>,
    in_flight: Option<InFlight<'_>>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = Vec::with_capacity(BUF_SIZE);
    loop {
        let Some(head_len) = read_head(from, &mut buf).await? else {
            return Err(io::ErrorKind::UnexpectedEof.into());
        };
        let head = Head::new(&buf[..head_len]);
        let Some(status) = head.status() else {
            return Err(io::ErrorKind::InvalidData.into());
        };
        if (100..200).contains(&status) && status != 101 {
            to.write_all(&buf[..head_len]).await?;
            to.flush().await?;
            buf.drain(..head_len);
            continue;
        }
        let body_len =
            if head_request || (100..200).contains(&status) || status == 204 || status == 304 {
                Some(0)
            } else if head.header(b"transfer-encoding").is_some() {
                None
            } else {
                match head.header(b"content-length") {
                    Some(value) => Some(parse_u64(value).ok_or(io::ErrorKind::InvalidData)?),
                    None => None,
                }
            };
        let rewritten = head.with_connection_close();
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        drop(in_flight);
        to.write_all(&rewritten).await?;
        let mut rest = buf.split_off(head_len);
        match body_len {
            Some(len) => {
                rest.truncate(usize::try_from(len).unwrap_or(usize::MAX));
                to.write_all(&rest).await?;
                let missing = len - rest.len() as u64;
                if missing > 0 {
                    let copied = tokio::io::copy(&mut (&mut *from).take(missing), to).await?;
                    if copied != missing {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                }
            }
            None => {
                to.write_all(&rest).await?;
                tokio::io::copy(from, to).await?;
            }
        }
        to.flush().await?;
        return Ok(());
    }
}

/// Reads until `buf` holds a complete head (ending in CRLFCRLF), keeping any bytes read
/// past it. Returns the head's length, or `None` on EOF before any byte.
async fn read_head<R: AsyncRead + Unpin>(
    from: &mut R,
    buf: &mut Vec<u8>,
) -> io::Result<Option<usize>> {
    let mut searched = 0;
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(pos) = find(&buf[searched..], b"\r\n\r\n") {
            return Ok(Some(searched + pos + 4));
        }
        searched = buf.len().saturating_sub(3);
        if buf.len() >= MAX_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too large"));
        }
        let n = from.read(&mut chunk).await?;
        if n == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn parse_u64(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

/// How the request body is delimited.
#[derive(Clone, Copy, Debug)]
enum Body {
    Length(u64),
    /// Passed through raw until the client's EOF.
    Chunked,
}

/// A request or response head: the start line and header lines, without the final
/// empty line.
struct Head<'a> {
    start_line: &'a [u8],
    headers: Vec<&'a [u8]>,
}

impl<'a> Head<'a> {
    /// `raw` ends with CRLFCRLF.
    fn new(raw: &'a [u8]) -> Head<'a> {
        let raw = raw.strip_suffix(b"\r\n\r\n").unwrap_or(raw);
        let mut lines = raw
            .split(|&b| b == b'\n')
            .map(|line| line.strip_suffix(b"\r").unwrap_or(line));
        let start_line = lines.next().unwrap_or_default();
        Head {
            start_line,
            headers: lines.filter(|line| !line.is_empty()).collect(),
        }
    }

    fn method(&self) -> &'a [u8] {
        self.start_line
            .split(|&b| b == b' ')
            .next()
            .unwrap_or_default()
    }

    fn status(&self) -> Option<u16> {
        let code = self.start_line.split(|&b| b == b' ').nth(1)?;
        std::str::from_utf8(code).ok()?.parse().ok()
    }

    fn split_header(line: &[u8]) -> Option<(&[u8], &[u8])> {
        let colon = line.iter().position(|&b| b == b':')?;
        Some((line[..colon].trim_ascii(), line[colon + 1..].trim_ascii()))
    }

    fn header(&self, name: &[u8]) -> Option<&'a [u8]> {
        self.headers.iter().find_map(|line| {
            let (n, v) = Self::split_header(line)?;
            n.eq_ignore_ascii_case(name).then_some(v)
        })
    }

    /// Whether any `name` header holds `token` in its comma-separated list.
    fn has_token(&self, name: &[u8], token: &str) -> bool {
        self.headers.iter().any(|line| {
            Self::split_header(line).is_some_and(|(n, v)| {
                n.eq_ignore_ascii_case(name)
                    && v.split(|&b| b == b',')
                        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
            })
        })
    }

    /// The request body's framing, or `None` for an unparseable `Content-Length`.
    fn request_body(&self) -> Option<Body> {
        if self.has_token(b"transfer-encoding", "chunked") {
            return Some(Body::Chunked);
        }
        match self.header(b"content-length") {
            Some(value) => parse_u64(value).map(Body::Length),
            None => Some(Body::Length(0)),
        }
    }

    /// The head re-serialised with any connection-scoped headers replaced by
    /// `Connection: close`.
    fn with_connection_close(&self) -> Vec<u8> {
        const HOP_BY_HOP: [&[u8]; 3] = [b"connection", b"keep-alive", b"proxy-connection"];
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(self.start_line);
        out.extend_from_slice(b"\r\n");
        for line in &self.headers {
            let hop = Self::split_header(line)
                .is_some_and(|(n, _)| HOP_BY_HOP.iter().any(|h| n.eq_ignore_ascii_case(h)));
            if !hop {
                out.extend_from_slice(line);
                out.extend_from_slice(b"\r\n");
            }
        }
        out.extend_from_slice(b"Connection: close\r\n\r\n");
        out
    }
}
