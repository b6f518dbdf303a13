//! The look-up HTTP server on every `lookup.listen` address (the HTTP look-up of
//! `docs/contract.md`): limits, connections, shutdown. The routes are in `super::routes`, local
//! files in `super::files`, the sockets in `super::listen`.
//!
//! # Routes
//!
//! | route | handler |
//! | --- | --- |
//! | `GET /v1/resolve?path=P` | JSON answer (200 stored or pending, 307 another node's, 400/404 JSON) |
//! | `GET`/`HEAD {legacy_prefix}/REL` | 302 to the signed URL, the local file (Range, ETag), 307, 400/404/414 JSON |
//! | `GET /healthz` | the daemon's [`HealthCheck`] (its liveness) |
//! | `GET /metrics` | the process's metrics (Prometheus text) |
//! | `GET /ui`, `POST /ui/requeue` | the status page and its re-queue action (`super::ui`) |
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
//! checks, local files): most look-ups are a journal read and a signature, done inline. What
//! that saved is in the README's Benchmarks section.
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
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::answer::json_response;
pub use super::answer::{Body, Response};
pub use super::listen::{Bound, ServerError, bind};
use super::listen::{Conn, Listener, StdListener, accept, remove_own_socket};
use super::routes::{AppState, dispatch};
use super::ui::Via;
use crate::config::{ListenAddr, Settings};
use crate::journal::SNAPSHOT_SECS;
use crate::lookup::auth::{AllowList, Auth};
use crate::lookup::resolve::Resolver;
use crate::service::health::HealthCheck;
use crate::service::metrics;

/// The most request headers accepted.
pub const MAX_HEADERS: usize = 64;
/// How long connections may finish their request after shutdown began.
pub const DRAIN: Duration = Duration::from_secs(5);

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
        ui: super::ui::UiState::new(settings),
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
            rt.block_on(async move {
                ctx.tracker.spawn(async move {
                    let every = Duration::from_secs_f64(SNAPSHOT_SECS * 5.0);
                    loop {
                        tokio::select! {
                            _ = cancel.cancelled() => break,
                            _ = tokio::time::sleep(every) => snapshots.maintain(),
                        }
                    }
                });
                run_listeners(listeners, ctx).await;
            });
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

/// Accepts on every listener until cancelled, then waits for the connections (and every other
/// task of the server's runtime) to drain.
async fn run_listeners(listeners: Vec<StdListener>, ctx: AcceptCtx) {
    for l in listeners {
        let listener = match l {
            StdListener::Tcp(s) => TcpListener::from_std(s).map(Listener::Tcp),
            StdListener::Unix(s, p) => UnixListener::from_std(s).map(|u| Listener::Unix(u, p)),
        };
        match listener {
            Ok(l) => {
                ctx.tracker.spawn(accept_loop(l, ctx.clone()));
            }
            Err(e) => warn!(error = %e, "cannot register a look-up listener"),
        }
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
    let via = if peer.is_some() { Via::Tcp } else { Via::Unix };
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        let state = state.clone();
        req.extensions_mut().insert(via);
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
