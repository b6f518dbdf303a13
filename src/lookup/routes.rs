//! The routes: `/v1/resolve`, the drop-in for the old nginx URLs, `/healthz`, `/metrics`,
//! and the status page (`/ui`, `/ui/requeue`; see `super::ui`).
//! Routing is a `match` on the path (see the module documentation of `super::server`).

use std::path::Path;
use std::sync::Arc;

use http::{HeaderValue, Method, StatusCode, header};

use super::answer::{
    Body, Response, error_response, error_response_with, json_response, method_not_allowed,
    redirect,
};
use super::files::serve_file;
use crate::lookup::auth::{Auth, AuthError};
use crate::lookup::legacy::BadPath;
use crate::lookup::resolve::{Answer, LookupError, Resolver, Stored, now_unix};
use crate::service::health::HealthCheck;
use crate::service::metrics;
use crate::util::media::MediaTypes;

/// What every request is answered with.
pub(super) struct AppState {
    pub(super) resolver: Arc<Resolver>,
    /// Content types by extension (the uploader sends the same ones).
    pub(super) media: MediaTypes,
    pub(super) auth: Option<Auth>,
    pub(super) auth_legacy: bool,
    /// The daemon's liveness, for `/healthz`.
    pub(super) health: Arc<dyn HealthCheck>,
    /// The status page's own state.
    pub(super) ui: super::ui::UiState,
}

/// Routes a request (exposed for tests that drive it without sockets). Request bodies are
/// never read: every route is a `GET` or `HEAD`, but for `/ui/requeue`, whose input is in
/// its query.
pub(super) async fn dispatch<B>(state: Arc<AppState>, req: http::Request<B>) -> Response {
    let (parts, _body) = req.into_parts();
    let head = parts.method == Method::HEAD;
    let route: Option<fn(&AppState) -> Response> = match parts.uri.path() {
        "/ui/requeue" => return super::ui::requeue(state, &parts).await,
        "/ui" | "/ui/" => {
            if parts.method != Method::GET && !head {
                return method_not_allowed();
            }
            return super::ui::page(state, &parts).await;
        }
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

/// Checks `lookup.auth` for a request; `None` when it may go on.
pub(super) fn check_auth(state: &AppState, req: &http::request::Parts) -> Option<Response> {
    let auth = state.auth.as_ref()?;
    let uri = &req.uri;
    match auth.verify(req.method.as_str(), uri.path(), uri.query(), now_unix()) {
        Ok(()) => None,
        Err(e) => {
            metrics::lookup("unauthorized");
            let status = if e == AuthError::Full {
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
        Ok(()) => match state.health.degraded() {
            None => json_response(StatusCode::OK, br#"{"status":"ok"}"#.to_vec()),
            Some(reason) => {
                let body = serde_json::json!({"status": "degraded", "reason": reason});
                json_response(StatusCode::OK, body.to_string().into_bytes())
            }
        },
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
        Err(LookupError::BadPath(BadPath::OutsidePrefix { .. })) => {
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

/// HEAD of a stored file, from the journal: what a GET through the redirect would show.
fn head_stored(s: &Stored, ctype: &str) -> Response {
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
            ui: super::super::ui::UiState::new(&settings),
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
