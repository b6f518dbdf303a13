//! The look-up HTTP server (SPEC.md "HTTP look-up") on every `lookup.listen` address.
//!
//! # Routes
//!
//! | route | handler |
//! | --- | --- |
//! | `GET /v1/resolve?path=P` | [`resolve`]: JSON answer (200 stored or pending, 307 another node's, 400/404 JSON) |
//! | `GET`/`HEAD {legacy_prefix}/REL` | [`legacy`]: 302 to the signed URL, the local file (Range, ETag), 307, 400/404/414 JSON |
//! | `GET /healthz` | [`healthz`]: the daemon's [`HealthCheck`] (its liveness) |
//! | `GET /metrics` | [`metrics`]: the process's metrics (Prometheus text) |
//!
//! # Limits
//!
//! - At most `lookup.max_connections` connections are served at once: the accept loop takes a
//!   permit before it accepts, so further clients wait in the kernel's backlog.
//! - Request line and headers: at most `lookup.max_header_bytes` (hyper answers 431 beyond),
//!   at most [`MAX_HEADERS`] headers, read within `lookup.header_timeout_secs`.
//! - A request's answer (up to its headers) must be ready within `lookup.request_timeout_secs`
//!   (else 503 JSON); the body of a local file then streams at the client's pace.
//! - HTTP/1.1 only (keep-alive): the clients are business servers and players on a LAN.
//!
//! # Cost
//!
//! Routing is a `match` on the path over hyper's connection, without a router framework, and
//! the request timer is armed only for answers that are not ready at the first poll (remote
//! checks, local files): most look-ups are a journal read and a signature, done inline. Both
//! measured under `bench/lookup.py`: axum's router and a timer per request cost about 1 µs of
//! a look-up's 15 (`/healthz` 141k → 166k req/s, the 302 route 69k → 79k).
//!
//! # Listeners
//!
//! TCP addresses are bound as given. `unix:PATH` sockets get mode 0660; a socket file left by
//! a dead process is replaced, one that still answers is refused (another instance runs); the
//! socket file is removed when the server stops. Unix-socket clients bypass `lookup.allow`.
//!
//! # Shutdown
//!
//! When the cancellation token fires, the listeners close at once, connections finish the
//! request in flight (keep-alive is ended) for up to [`DRAIN`], then are dropped.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::{ListenAddr, Settings};
use crate::lookup::auth::{AllowList, Auth};
use crate::lookup::range::{ByteRange, RangeAnswer, parse_range};
use crate::lookup::resolve::{Answer, LookupError, Pending, Resolver, now_unix};
use crate::service::health::HealthCheck;
use crate::service::metrics;

/// The most request headers accepted.
pub const MAX_HEADERS: usize = 64;
/// How long connections may finish their request after shutdown began.
pub const DRAIN: Duration = Duration::from_secs(5);
/// Local files are sent in pieces of this size.
const CHUNK: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("lookup.listen {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("lookup.listen unix:{0}: another process is serving this socket")]
    InUse(PathBuf),
    #[error("cannot start the look-up server: {0}")]
    Thread(#[source] io::Error),
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// Listeners bound and not yet serving (binding first lets the daemon learn the real ports,
/// e.g. of `127.0.0.1:0`, before it builds the resolver).
pub struct Bound {
    listeners: Vec<Listener>,
    addrs: Vec<ListenAddr>,
}

impl Bound {
    /// The addresses actually bound, in `lookup.listen` order.
    pub fn addrs(&self) -> &[ListenAddr] {
        &self.addrs
    }
}

/// Binds every address.
pub async fn bind(listen: &[ListenAddr]) -> Result<Bound, ServerError> {
    let mut listeners = Vec::new();
    let mut addrs = Vec::new();
    for l in listen {
        match l {
            ListenAddr::Tcp(a) => {
                let listener = TcpListener::bind(a)
                    .await
                    .map_err(|source| ServerError::Bind {
                        addr: a.to_string(),
                        source,
                    })?;
                let local = listener.local_addr().map_err(|source| ServerError::Bind {
                    addr: a.to_string(),
                    source,
                })?;
                addrs.push(ListenAddr::Tcp(local));
                listeners.push(Listener::Tcp(listener));
            }
            ListenAddr::Unix(path) => {
                let listener = bind_unix(path).await?;
                addrs.push(ListenAddr::Unix(path.clone()));
                listeners.push(Listener::Unix(listener, path.clone()));
            }
        }
    }
    Ok(Bound { listeners, addrs })
}

async fn bind_unix(path: &PathBuf) -> Result<UnixListener, ServerError> {
    let err = |source| ServerError::Bind {
        addr: format!("unix:{}", path.display()),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            )));
        }
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(ServerError::InUse(path.clone()));
        }
        // Stale: left by a process that is gone.
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    Ok(listener)
}

/// Limits of [`serve`], from `[lookup]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub request_timeout: Duration,
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
}

impl Limits {
    pub fn from_settings(settings: &Settings) -> Limits {
        let lk = &settings.config.lookup;
        Limits {
            request_timeout: Duration::from_secs_f64(lk.request_timeout_secs),
            header_timeout: Duration::from_secs_f64(lk.header_timeout_secs),
            max_header_bytes: lk.max_header_bytes,
            max_connections: lk.max_connections,
        }
    }
}

struct AppState {
    resolver: Arc<Resolver>,
    /// Content types by extension (the uploader sends the same ones).
    media: crate::util::media::MediaTypes,
    auth: Option<Auth>,
    auth_legacy: bool,
    /// The daemon's liveness, for `/healthz`.
    health: Arc<dyn HealthCheck>,
}

/// A response of the look-up server.
pub type Response = http::Response<Body>;

/// Response bodies: bytes in memory (JSON, redirects), or a local file streamed in pieces.
pub enum Body {
    Full(Option<Bytes>),
    Stream(Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>),
}

impl Body {
    pub fn empty() -> Body {
        Body::Full(None)
    }
}

impl From<Vec<u8>> for Body {
    fn from(v: Vec<u8>) -> Body {
        Body::Full(Some(Bytes::from(v)))
    }
}

impl From<String> for Body {
    fn from(s: String) -> Body {
        Body::Full(Some(Bytes::from(s)))
    }
}

impl Default for Body {
    fn default() -> Body {
        Body::empty()
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(s) => s
                .as_mut()
                .poll_next(cx)
                .map(|item| item.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Stream(_) => SizeHint::default(),
        }
    }
}

/// Routes a request (exposed for tests that drive it without sockets). Request bodies are
/// never read: every route is a `GET` or `HEAD`.
async fn dispatch<B>(state: Arc<AppState>, req: http::Request<B>) -> Response {
    let (parts, _body) = req.into_parts();
    let head = parts.method == Method::HEAD;
    let route: Option<fn(&AppState) -> Response> = match parts.uri.path() {
        "/v1/resolve" => None,
        "/healthz" => Some(healthz),
        "/metrics" => Some(metrics),
        _ => return legacy(&state, &parts, head).await,
    };
    if parts.method != Method::GET && !head {
        return method_not_allowed();
    }
    // A HEAD gets the GET answer: hyper sends its headers and length, not its body.
    match route {
        Some(handler) => handler(&state),
        None => resolve(&state, &parts).await,
    }
}

fn method_not_allowed() -> Response {
    let mut resp = json_response(
        StatusCode::METHOD_NOT_ALLOWED,
        br#"{"error":"method_not_allowed","message":"only GET and HEAD"}"#.to_vec(),
    );
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    resp
}

/// Serves on every bound listener until `cancel` fires.
///
/// The server runs on a thread of its own ("lookup") with a single-threaded runtime, like one
/// nginx worker: look-ups are short and CPU-bound (an indexed read, a signature), so one event
/// loop without cross-thread hand-offs serves them fastest, and the upload pipeline's
/// runtime is never busy with them. The thread ends after the connections drained; a task in
/// `tracker` waits for it.
pub fn serve(
    bound: Bound,
    resolver: Arc<Resolver>,
    settings: &Settings,
    health: Arc<dyn HealthCheck>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> Result<(), ServerError> {
    let lk = &settings.config.lookup;
    let allow = Arc::new(AllowList::new(settings.allow.clone()));
    let state_resolver = resolver.clone();
    let state = Arc::new(AppState {
        resolver,
        media: settings.media.clone(),
        auth: Auth::new(&lk.auth.keys, lk.auth.window_secs),
        auth_legacy: lk.auth.legacy_route,
        health,
    });
    let limits = Limits::from_settings(settings);
    // Listeners move to the server's runtime as plain sockets and are registered there.
    let mut listeners = Vec::new();
    for l in bound.listeners {
        let moved = match l {
            Listener::Tcp(t) => t.into_std().map(StdListener::Tcp),
            Listener::Unix(u, p) => u.into_std().map(|u| StdListener::Unix(u, p)),
        };
        listeners.push(moved.map_err(ServerError::Thread)?);
    }
    let ctx = AcceptCtx {
        state,
        allow,
        limits,
        permits: Arc::new(Semaphore::new(limits.max_connections)),
        cancel,
        tracker: TaskTracker::new(),
    };
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let snapshots = state_resolver;
    std::thread::Builder::new()
        .name("lookup".to_string())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    warn!(error = %e, "cannot start the look-up server's runtime");
                    return;
                }
            };
            // Ends the journal snapshot look-ups share once it is stale, so an idle server
            // keeps none open for long (busy, each look-up refreshes it when it is too old),
            // and puts the look-up index to use once it is built.
            let cancel = ctx.cancel.clone();
            rt.spawn(async move {
                let every = Duration::from_secs_f64(crate::journal::SNAPSHOT_SECS * 5.0);
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(every) => snapshots.maintain(),
                    }
                }
            });
            rt.block_on(run_listeners(listeners, ctx));
            drop(done_tx);
        })
        .map_err(ServerError::Thread)?;
    tracker.spawn(async move {
        let _ = done_rx.await;
    });
    for a in &bound.addrs {
        match a {
            ListenAddr::Tcp(a) => info!(addr = %a, "look-up server listening"),
            ListenAddr::Unix(p) => info!(path = %p.display(), "look-up server listening"),
        }
    }
    Ok(())
}

enum StdListener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener, PathBuf),
}

/// Accepts on every listener until cancelled, then waits for the connections to drain.
async fn run_listeners(listeners: Vec<StdListener>, ctx: AcceptCtx) {
    let mut loops = Vec::new();
    for l in listeners {
        let listener = match l {
            StdListener::Tcp(s) => TcpListener::from_std(s).map(Listener::Tcp),
            StdListener::Unix(s, p) => UnixListener::from_std(s).map(|u| Listener::Unix(u, p)),
        };
        match listener {
            Ok(l) => loops.push(tokio::spawn(accept_loop(l, ctx.clone()))),
            Err(e) => warn!(error = %e, "cannot register a look-up listener"),
        }
    }
    for l in loops {
        let _ = l.await;
    }
    ctx.tracker.close();
    ctx.tracker.wait().await;
}

#[derive(Clone)]
struct AcceptCtx {
    state: Arc<AppState>,
    allow: Arc<AllowList>,
    limits: Limits,
    permits: Arc<Semaphore>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

async fn accept_loop(listener: Listener, ctx: AcceptCtx) {
    loop {
        let permit = tokio::select! {
            _ = ctx.cancel.cancelled() => break,
            p = ctx.permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = ctx.cancel.cancelled() => break,
            a = accept(&listener) => a,
        };
        match accepted {
            Ok(Conn::Tcp(stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let ctx2 = ctx.clone();
                ctx.tracker.spawn(async move {
                    serve_conn(stream, Some(peer), ctx2).await;
                    drop(permit);
                });
            }
            Ok(Conn::Unix(stream)) => {
                let ctx2 = ctx.clone();
                ctx.tracker.spawn(async move {
                    serve_conn(stream, None, ctx2).await;
                    drop(permit);
                });
            }
            Err(e) => {
                // EMFILE and friends: back off a little instead of spinning.
                debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    if let Listener::Unix(l, path) = &listener {
        remove_own_socket(l, path);
    }
}

/// Removes the socket file if it is still the one this listener created.
fn remove_own_socket(listener: &UnixListener, path: &PathBuf) {
    let ours = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(|p| p.to_path_buf()))
        .is_some_and(|p| p == *path);
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.file_type().is_socket()
        && ours
        && meta.nlink() >= 1
    {
        let _ = std::fs::remove_file(path);
    }
}

enum Conn {
    Tcp(tokio::net::TcpStream, SocketAddr),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &Listener) -> io::Result<Conn> {
    match listener {
        Listener::Tcp(l) => l.accept().await.map(|(s, a)| Conn::Tcp(s, a)),
        Listener::Unix(l, _) => l.accept().await.map(|(s, _)| Conn::Unix(s)),
    }
}

async fn serve_conn<S>(stream: S, peer: Option<SocketAddr>, ctx: AcceptCtx)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ip = peer.map(|p| p.ip());
    if !ctx.allow.allows(ip) {
        // Answer the first request with 403 and close.
        let svc = hyper::service::service_fn(|_req: hyper::Request<Incoming>| async {
            metrics::lookup("forbidden");
            Ok::<_, Infallible>(json_response(
                StatusCode::FORBIDDEN,
                br#"{"error":"forbidden","message":"this address is not in lookup.allow"}"#
                    .to_vec(),
            ))
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .keep_alive(false)
            .timer(TokioTimer::new())
            .header_read_timeout(ctx.limits.header_timeout)
            .serve_connection(TokioIo::new(stream), svc);
        let _ = tokio::time::timeout(ctx.limits.header_timeout * 2, conn).await;
        return;
    }
    let state = ctx.state.clone();
    let timeout = ctx.limits.request_timeout;
    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let state = state.clone();
        async move {
            let answer = dispatch(state, req);
            let mut answer = std::pin::pin!(answer);
            // Most answers are ready at once (a journal read and a signature): only those that
            // wait (a remote check, a file read) arm the request timer.
            if let Some(resp) = futures::future::poll_immediate(answer.as_mut()).await {
                return Ok::<_, Infallible>(resp);
            }
            match tokio::time::timeout(timeout, answer).await {
                Ok(resp) => Ok(resp),
                Err(_) => Ok(json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    br#"{"error":"timeout","message":"the look-up did not finish in time"}"#
                        .to_vec(),
                )),
            }
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(ctx.limits.header_timeout)
        .max_buf_size(ctx.limits.max_header_bytes.max(8192))
        .max_headers(MAX_HEADERS)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!(error = %e, "look-up connection ended with an error");
            }
        }
        _ = ctx.cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(DRAIN, conn).await;
        }
    }
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut resp = http::Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn error_response(e: &LookupError) -> Response {
    error_response_with(e, e.status())
}

fn error_response_with(e: &LookupError, status: u16) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status.is_server_error() {
        warn!(error = %e, "look-up failed");
    }
    json_response(status, e.to_json())
}

fn redirect(status: StatusCode, location: &str, body: Vec<u8>) -> Response {
    let mut resp = if body.is_empty() {
        http::Response::new(Body::empty())
    } else {
        json_response(status, body)
    };
    *resp.status_mut() = status;
    match HeaderValue::from_str(location) {
        Ok(v) => {
            resp.headers_mut().insert(header::LOCATION, v);
            resp
        }
        Err(_) => json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            br#"{"error":"bad_location","message":"the redirect target is not a valid header"}"#
                .to_vec(),
        ),
    }
}

/// Checks `lookup.auth` for a request; `None` when it may go on.
fn check_auth(state: &AppState, req: &http::request::Parts) -> Option<Response> {
    let auth = state.auth.as_ref()?;
    let uri = &req.uri;
    match auth.verify(req.method.as_str(), uri.path(), uri.query(), now_unix()) {
        Ok(()) => None,
        Err(e) => {
            metrics::lookup("unauthorized");
            let status = if e == crate::lookup::auth::AuthError::Full {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::UNAUTHORIZED
            };
            let body = serde_json::json!({
                "error": "unauthorized",
                "reason": e.reason(),
                "message": e.to_string(),
            });
            Some(json_response(status, body.to_string().into_bytes()))
        }
    }
}

/// The `path` parameter of the query, decoded once (`+` is a space).
fn path_param(query: Option<&str>) -> Result<Vec<u8>, &'static str> {
    let mut found = None;
    for pair in query.unwrap_or("").split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if name == "path" {
            if found.is_some() {
                return Err("the path parameter is given more than once");
            }
            found = Some(query_decode(value)?);
        }
    }
    found.ok_or("missing the path parameter (/v1/resolve?path=...)")
}

/// Decodes a query value: `+` is a space, `%XX` a byte; a malformed escape is refused.
fn query_decode(value: &str) -> Result<Vec<u8>, &'static str> {
    let b = value.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        match c {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) if hex.is_some_and(|h| h.bytes().all(|x| x.is_ascii_hexdigit())) => {
                        out.push(v);
                        i += 3;
                    }
                    _ => return Err("malformed percent escape in the query string"),
                }
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    Ok(out)
}

/// `GET /v1/resolve?path=P`.
async fn resolve(state: &AppState, req: &http::request::Parts) -> Response {
    if let Some(refused) = check_auth(state, req) {
        return refused;
    }
    let input = match path_param(req.uri.query()) {
        Ok(p) => p,
        Err(msg) => {
            let body = serde_json::json!({
                "error": "bad_path",
                "reason": "bad_query",
                "message": msg,
            });
            return json_response(StatusCode::BAD_REQUEST, body.to_string().into_bytes());
        }
    };
    let result = state.resolver.resolve(&input, None).await;
    count(&result);
    match result {
        Ok(Answer::Elsewhere(e)) => {
            let location = format!(
                "{}/v1/resolve?{}",
                e.lookup_url,
                req.uri.query().unwrap_or("")
            );
            let body = Answer::Elsewhere(e).to_json(Some(&location));
            redirect(StatusCode::TEMPORARY_REDIRECT, &location, body)
        }
        Ok(answer) => json_response(StatusCode::OK, answer.to_json(None)),
        Err(e) => error_response(&e),
    }
}

fn healthz(state: &AppState) -> Response {
    match state.health.check() {
        Ok(()) => json_response(StatusCode::OK, br#"{"status":"ok"}"#.to_vec()),
        Err(reason) => {
            let body = serde_json::json!({"status": "unavailable", "reason": reason});
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                body.to_string().into_bytes(),
            )
        }
    }
}

fn metrics(_state: &AppState) -> Response {
    let mut resp = http::Response::new(Body::from(metrics::render()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(metrics::CONTENT_TYPE),
    );
    resp
}

/// Everything else: the drop-in for the old nginx (`{legacy_prefix}/REL`), or 404.
async fn legacy(state: &AppState, req: &http::request::Parts, head: bool) -> Response {
    if req.method != Method::GET && !head {
        return method_not_allowed();
    }
    if state.auth_legacy
        && let Some(refused) = check_auth(state, req)
    {
        return refused;
    }
    let path = req.uri.path();
    let host = req
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri.host());
    // HEAD of a stored file is answered here: a URL presigned for GET refuses HEAD.
    let result = state
        .resolver
        .resolve_with(path.as_bytes(), host, head)
        .await;
    count(&result);
    match result {
        Ok(Answer::Stored(s)) if head => head_stored(&s, state.media.of(Path::new(path))),
        Ok(Answer::Stored(s)) => redirect(StatusCode::FOUND, &s.signed.url, Vec::new()),
        Ok(Answer::Pending(p)) => serve_file(p, &req.headers, head, &state.media).await,
        Ok(Answer::Elsewhere(e)) => {
            let pq = req
                .uri
                .path_and_query()
                .map(|pq| pq.as_str())
                .unwrap_or(path);
            redirect(
                StatusCode::TEMPORARY_REDIRECT,
                &format!("{}{pq}", e.lookup_url),
                Vec::new(),
            )
        }
        // A path that is not under the prefix is simply not one of ours.
        Err(LookupError::BadPath(crate::lookup::legacy::BadPath::OutsidePrefix { .. })) => {
            error_response(&LookupError::NotFound)
        }
        Err(LookupError::BadPath(b)) if b.is_too_long() => {
            error_response_with(&LookupError::BadPath(b), 414)
        }
        Err(e) => error_response(&e),
    }
}

/// Counts a look-up's answer in the metrics.
fn count(result: &Result<Answer, LookupError>) {
    metrics::lookup(match result {
        Ok(a) => a.metric_label(),
        Err(e) => e.metric_label(),
    });
}

/// `"<mtime hex>-<size hex>"`, the shape nginx uses.
fn etag(p: &Pending) -> String {
    let secs = p.identity.mtime_ns.div_euclid(1_000_000_000);
    format!("\"{secs:x}-{:x}\"", p.identity.size)
}

fn etag_matches(list: &str, etag: &str) -> bool {
    list.split(',')
        .map(str::trim)
        .any(|t| t == "*" || t == etag || t.strip_prefix("W/").is_some_and(|weak| weak == etag))
}

/// HEAD of a stored file, from the journal: what a GET through the redirect would show.
fn head_stored(s: &crate::lookup::resolve::Stored, ctype: &str) -> Response {
    let mut builder = http::Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_LENGTH, s.size)
        .header(header::CONTENT_TYPE, ctype)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CACHE_CONTROL, "no-cache");
    if let Some(md5) = &s.md5 {
        builder = builder.header(header::ETAG, format!("\"{md5}\""));
    }
    if let Some(secs) = s.modified_unix {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64);
        builder = builder.header(header::LAST_MODIFIED, httpdate::fmt_http_date(at));
    }
    builder.body(Body::empty()).unwrap_or_default()
}

/// The local file, as nginx's static module answered it.
async fn serve_file(
    p: Pending,
    req: &HeaderMap,
    head: bool,
    media: &crate::util::media::MediaTypes,
) -> Response {
    let size = p.identity.size;
    let etag = etag(&p);
    let modified = p.identity.mtime();
    let last_modified = httpdate::fmt_http_date(modified);
    let ctype = media.of(&p.rel).to_string();

    let mut builder = http::Response::builder()
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, &etag)
        .header(header::LAST_MODIFIED, &last_modified)
        .header(header::CACHE_CONTROL, "no-cache");

    let header_str = |name| req.get(name).and_then(|v: &HeaderValue| v.to_str().ok());
    let not_modified = match header_str(header::IF_NONE_MATCH) {
        Some(list) => etag_matches(list, &etag),
        None => header_str(header::IF_MODIFIED_SINCE)
            .and_then(|d| httpdate::parse_http_date(d).ok())
            .is_some_and(|since| {
                // HTTP dates have whole seconds.
                httpdate::parse_http_date(&last_modified).is_ok_and(|m| m <= since)
            }),
    };
    if not_modified {
        return builder
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .unwrap_or_default();
    }

    let range_applies = match header_str(header::IF_RANGE) {
        None => true,
        Some(v) => v == etag || v == last_modified,
    };
    let answer = match req.get(header::RANGE) {
        Some(r) if range_applies => parse_range(r.as_bytes(), size),
        _ => RangeAnswer::Full,
    };

    let file = Arc::new(p.file);
    let (status, len, pieces) = match answer {
        RangeAnswer::Full => {
            builder = builder.header(header::CONTENT_TYPE, &ctype);
            (StatusCode::OK, size, vec![Piece::File(0, size)])
        }
        RangeAnswer::Unsatisfiable => {
            let body = serde_json::json!({
                "error": "range_not_satisfiable",
                "message": format!("no requested range lies within the file's {size} bytes (at most {} ranges)", crate::lookup::range::MAX_RANGES),
            })
            .to_string();
            return builder
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{size}"))
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body))
                .unwrap_or_default();
        }
        RangeAnswer::Partial(ranges) if ranges.len() == 1 => {
            let r = ranges[0];
            builder = builder.header(header::CONTENT_TYPE, &ctype).header(
                header::CONTENT_RANGE,
                format!("bytes {}-{}/{size}", r.start, r.end),
            );
            (
                StatusCode::PARTIAL_CONTENT,
                r.len(),
                vec![Piece::File(r.start, r.len())],
            )
        }
        RangeAnswer::Partial(ranges) => {
            let boundary = format!("{:016x}{:08x}", p.identity.ino, size as u32 ^ 0x5eed);
            let (len, pieces) = multipart(&ranges, &boundary, &ctype, size);
            builder = builder.header(
                header::CONTENT_TYPE,
                format!("multipart/byteranges; boundary={boundary}"),
            );
            (StatusCode::PARTIAL_CONTENT, len, pieces)
        }
    };
    let body = if head {
        Body::empty()
    } else {
        Body::Stream(Box::pin(file_stream(file, pieces)))
    };
    builder
        .status(status)
        .header(header::CONTENT_LENGTH, len)
        .body(body)
        .unwrap_or_default()
}

/// A piece of a body: fixed bytes, or `len` bytes of the file from an offset.
enum Piece {
    Bytes(Bytes),
    File(u64, u64),
}

fn multipart(ranges: &[ByteRange], boundary: &str, ctype: &str, size: u64) -> (u64, Vec<Piece>) {
    let mut pieces = Vec::new();
    let mut len = 0u64;
    for r in ranges {
        let head = format!(
            "\r\n--{boundary}\r\nContent-Type: {ctype}\r\nContent-Range: bytes {}-{}/{size}\r\n\r\n",
            r.start, r.end
        );
        len += head.len() as u64 + r.len();
        pieces.push(Piece::Bytes(Bytes::from(head)));
        pieces.push(Piece::File(r.start, r.len()));
    }
    let tail = format!("\r\n--{boundary}--\r\n");
    len += tail.len() as u64;
    pieces.push(Piece::Bytes(Bytes::from(tail)));
    (len, pieces)
}

/// Streams the pieces, reading the file with positional reads on the blocking pool.
fn file_stream(
    file: Arc<std::fs::File>,
    pieces: Vec<Piece>,
) -> impl futures::Stream<Item = io::Result<Bytes>> + Send {
    let mut pieces: std::collections::VecDeque<Piece> = pieces.into();
    futures::stream::unfold(
        (file, pieces.pop_front(), pieces),
        |(file, current, mut rest)| async move {
            let current = current?;
            match current {
                Piece::Bytes(b) => {
                    let next = rest.pop_front();
                    Some((Ok(b), (file, next, rest)))
                }
                Piece::File(_, 0) => {
                    let next = rest.pop_front();
                    Some((Ok(Bytes::new()), (file, next, rest)))
                }
                Piece::File(offset, len) => {
                    let n = len.min(CHUNK as u64) as usize;
                    let f = file.clone();
                    let read = tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; n];
                        let got = crate::util::fs::read_full_at(&f, &mut buf, offset)?;
                        if got < n {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the file became shorter while it was being sent",
                            ));
                        }
                        Ok(Bytes::from(buf))
                    })
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(e)));
                    match read {
                        Ok(bytes) => {
                            let left = len - n as u64;
                            let next = if left == 0 {
                                rest.pop_front()
                            } else {
                                Some(Piece::File(offset + n as u64, left))
                            };
                            Some((Ok(bytes), (file, next, rest)))
                        }
                        // End the stream after the error: the client sees a short body.
                        Err(e) => Some((Err(e), (file, None, rest))),
                    }
                }
            }
        },
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn query_paths() {
        assert_eq!(
            path_param(Some("path=%2Frecord%2Fa%2Bb%2520%2525.mp4")).unwrap(),
            b"/record/a+b%20%25.mp4"
        );
        assert_eq!(path_param(Some("x=1&path=a+b&y")).unwrap(), b"a b");
        assert_eq!(path_param(Some("path=%FF")).unwrap(), b"\xff");
        assert!(path_param(Some("path=%zz")).is_err());
        assert!(path_param(Some("path=%2")).is_err());
        assert!(path_param(Some("path=%+1")).is_err());
        assert!(path_param(Some("path=a&path=b")).is_err());
        assert!(path_param(None).is_err());
        assert!(path_param(Some("paths=a")).is_err());
    }

    #[test]
    fn etags_match_like_nginx() {
        assert!(etag_matches("\"a-1\"", "\"a-1\""));
        assert!(etag_matches("\"x\", \"a-1\"", "\"a-1\""));
        assert!(etag_matches("W/\"a-1\"", "\"a-1\""));
        assert!(etag_matches("*", "\"a-1\""));
        assert!(!etag_matches("\"a-2\"", "\"a-1\""));
    }

    #[test]
    fn multipart_length_is_exact() {
        let ranges = [
            ByteRange { start: 0, end: 9 },
            ByteRange { start: 20, end: 20 },
        ];
        let (len, pieces) = multipart(&ranges, "B", "video/mp4", 100);
        let total: u64 = pieces
            .iter()
            .map(|p| match p {
                Piece::Bytes(b) => b.len() as u64,
                Piece::File(_, n) => *n,
            })
            .sum();
        assert_eq!(len, total);
        assert_eq!(pieces.len(), 5);
    }

    /// `/healthz` answers with the daemon's verdict, and its reason when unhealthy.
    #[test]
    fn healthz_follows_the_health_check() {
        use crate::config::{self, Config};
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config::default();
        c.watch.root = dir.path().to_path_buf();
        c.journal.path = dir.path().join("j.db");
        c.storage.bucket = "rec".into();
        c.storage.access_key_id = "ak".into();
        c.storage.access_key_secret = "sk".into();
        let settings = config::validate(c).unwrap();
        crate::journal::open_rw(&settings.config.journal.path).unwrap();
        let resolver = Resolver::new(&settings, "http://127.0.0.1:8090".into(), None).unwrap();
        struct Flag(std::sync::atomic::AtomicBool);
        impl HealthCheck for Flag {
            fn check(&self) -> Result<(), String> {
                if self.0.load(std::sync::atomic::Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err("the uploader has stopped".to_string())
                }
            }
        }
        let healthy = Arc::new(Flag(std::sync::atomic::AtomicBool::new(true)));
        let state = Arc::new(AppState {
            resolver: Arc::new(resolver),
            media: Default::default(),
            auth: None,
            auth_legacy: false,
            health: healthy.clone(),
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let call = |state: Arc<AppState>| {
            rt.block_on(async move {
                let req = http::Request::builder().uri("/healthz").body(()).unwrap();
                let resp = dispatch(state, req).await;
                let status = resp.status().as_u16();
                let body = http_body_util::BodyExt::collect(resp.into_body())
                    .await
                    .unwrap()
                    .to_bytes();
                (
                    status,
                    serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
                )
            })
        };
        let (status, body) = call(state.clone());
        assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
        healthy.0.store(false, std::sync::atomic::Ordering::SeqCst);
        let (status, body) = call(state);
        assert_eq!(status, 503);
        assert_eq!(body["reason"], "the uploader has stopped");
    }
}
