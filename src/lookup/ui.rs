//! The status page: `GET /ui` (HTML, rendered by `super::ui_page`) and its one action,
//! `POST /ui/requeue?id=N&s=TOKEN` (a failed file back in the queue).
//!
//! # Who may see and act
//!
//! The page is under the look-ups' rules: `lookup.allow` (checked per connection by the
//! server) and, when `lookup.auth.keys` is set, a signed request (as `/v1/resolve`). A page
//! served to a client that may act — one on the unix socket, or one whose request was
//! signed — carries a session token (`s=`, valid for [`SESSION_SECS`], an HMAC under a key
//! made at start): its links, its search form and its refresh keep it, so the signed
//! request is needed only once, and only a page with a token offers the re-queue button.
//!
//! The re-queue is a POST, and it is refused unless (1) it carries a valid token, which only
//! such a page holds, and (2) the browser says it comes from this page: `Sec-Fetch-Site`, when
//! sent, is `same-origin` (or `none`), and `Origin`, when sent, names the `Host` asked. A
//! cross-site form or script can read neither the token nor forge those headers.

use std::path::PathBuf;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use http::{HeaderValue, Method, StatusCode, header};
use sha2::Sha256;

use super::answer::{Body, Response, json_response, redirect};
use super::routes::AppState;
use super::ui_page::{PageData, render};
use crate::config::{NotifyEndpoint, receiver_label};
use crate::journal::{self, JournalError, State};
use crate::lookup::auth::form_decode;
use crate::lookup::resolve::now_unix;
use crate::util::keys::KeyTemplate;

/// How long a session token is valid.
pub const SESSION_SECS: u64 = 8 * 3600;
/// Rows shown in each list of the page.
const LIST_ROWS: usize = 20;

/// How a request reached the server (a request extension the server sets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Tcp,
    Unix,
}

/// What the status page needs besides the resolver.
pub struct UiState {
    pub node: String,
    pub journal: PathBuf,
    pub root: PathBuf,
    pub template: KeyTemplate,
    /// Receivers as configured (for their labels and events).
    pub receivers: Vec<NotifyEndpoint>,
    /// Key of the session tokens, random per process.
    key: [u8; 32],
}

impl UiState {
    pub fn new(settings: &crate::config::Settings) -> UiState {
        let cfg = &settings.config;
        UiState {
            node: cfg.node.name.clone(),
            journal: cfg.journal.path.clone(),
            root: cfg.watch.root.clone(),
            template: settings.template.clone(),
            receivers: settings.notify.clone(),
            key: rand::random(),
        }
    }

    fn mac(&self, expires: u64) -> String {
        match Hmac::<Sha256>::new_from_slice(&self.key) {
            Ok(mut m) => {
                m.update(format!("ui-session:{expires}").as_bytes());
                hex::encode(m.finalize().into_bytes())
            }
            Err(_) => String::new(),
        }
    }

    /// A new session token.
    pub fn session(&self, now: u64) -> String {
        let expires = now + SESSION_SECS;
        format!("{expires}.{}", self.mac(expires))
    }

    /// Whether `token` is one of ours and not expired.
    pub fn session_valid(&self, token: &str, now: u64) -> bool {
        let Some((exp, mac)) = token.split_once('.') else {
            return false;
        };
        let Ok(expires) = exp.parse::<u64>() else {
            return false;
        };
        if expires < now || expires > now + SESSION_SECS {
            return false;
        }
        let want = self.mac(expires);
        // Constant time: compare every byte.
        want.len() == mac.len()
            && want
                .bytes()
                .zip(mac.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

/// A query parameter, form-decoded (the first one of that name).
fn param(query: Option<&str>, name: &str) -> Option<Vec<u8>> {
    query
        .unwrap_or("")
        .split('&')
        .filter_map(|p| p.split_once('=').or(Some((p, ""))))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| form_decode(v))
}

/// Who the request is: `Err` is the refusal to send.
fn access(state: &AppState, req: &http::request::Parts) -> Result<Option<String>, Box<Response>> {
    let now = now_unix();
    let via = req.extensions.get::<Via>().copied().unwrap_or(Via::Tcp);
    let token = param(req.uri.query(), "s").and_then(|t| String::from_utf8(t).ok());
    if let Some(t) = &token
        && state.ui.session_valid(t, now)
    {
        return Ok(Some(t.clone()));
    }
    if state.auth.is_some() {
        // A signed request (as for /v1/resolve), or nothing.
        if let Some(refused) = super::routes::check_auth(state, req) {
            return Err(Box::new(refused));
        }
        return Ok(Some(state.ui.session(now)));
    }
    Ok((via == Via::Unix).then(|| state.ui.session(now)))
}

/// `GET /ui`.
pub(super) async fn page(state: Arc<AppState>, req: &http::request::Parts) -> Response {
    let session = match access(&state, req) {
        Ok(s) => s,
        Err(refused) => return *refused,
    };
    let query = param(req.uri.query(), "q").filter(|q| !q.is_empty());
    let done = param(req.uri.query(), "done").and_then(|d| String::from_utf8(d).ok());
    let st = state.clone();
    let q2 = query.clone();
    let data = tokio::task::spawn_blocking(move || gather(&st, q2.as_deref())).await;
    let mut data = match data {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => return ui_error(&format!("cannot read the journal: {e}")),
        Err(e) => return ui_error(&format!("the page's read failed: {e}")),
    };
    data.health = state.health.check().err();
    data.session = session;
    data.notice = done;
    let html = render(&data, &|rel| state.resolver.local_path(rel));
    html_response(StatusCode::OK, html)
}

/// `POST /ui/requeue?id=N&s=TOKEN`.
pub(super) async fn requeue(state: Arc<AppState>, req: &http::request::Parts) -> Response {
    if req.method != Method::POST {
        let mut resp = json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            br#"{"error":"method_not_allowed","message":"only POST"}"#.to_vec(),
        );
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return resp;
    }
    if let Err(why) = same_origin(req) {
        return forbidden(why);
    }
    let now = now_unix();
    let token = param(req.uri.query(), "s").and_then(|t| String::from_utf8(t).ok());
    let Some(token) = token.filter(|t| state.ui.session_valid(t, now)) else {
        return forbidden("a valid session token (s=) from the status page is required");
    };
    let id = param(req.uri.query(), "id")
        .and_then(|v| String::from_utf8(v).ok())
        .and_then(|v| v.parse::<i64>().ok());
    let Some(id) = id else {
        return json_response(
            StatusCode::BAD_REQUEST,
            br#"{"error":"bad_request","message":"id=N (a row id) is required"}"#.to_vec(),
        );
    };
    let st = state.clone();
    let done = tokio::task::spawn_blocking(move || {
        let node = st.ui.node.clone();
        let template = st.ui.template.clone();
        let key_of = move |rel: &std::path::Path| template.render(&node, rel);
        journal::open_rw(&st.ui.journal)
            .and_then(|c| journal::requeue_failed(&c, Some(id), &key_of))
    })
    .await;
    let notice = match done {
        Ok(Ok(r)) if r.queued > 0 => format!("file #{id} is queued again"),
        Ok(Ok(r)) => match r.kept.first() {
            Some((_, why)) => format!("file #{id} stays failed: {why}"),
            None => format!("file #{id} is not failed (nothing to do)"),
        },
        Ok(Err(e)) => format!("cannot re-queue file #{id}: {e}"),
        Err(e) => format!("cannot re-queue file #{id}: {e}"),
    };
    tracing::info!(id, result = %notice, "re-queue from the status page");
    let location = format!(
        "/ui?s={}&done={}",
        token,
        percent_encoding::utf8_percent_encode(&notice, percent_encoding::NON_ALPHANUMERIC)
    );
    redirect(StatusCode::SEE_OTHER, &location, Vec::new())
}

/// The cross-site defence of the POST (see the module documentation).
fn same_origin(req: &http::request::Parts) -> Result<(), &'static str> {
    let h = |name: &str| {
        req.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_ascii_lowercase)
    };
    if let Some(site) = h("sec-fetch-site")
        && site != "same-origin"
        && site != "none"
    {
        return Err("cross-site request refused (Sec-Fetch-Site)");
    }
    if let Some(origin) = h("origin") {
        let host = h("host").unwrap_or_default();
        let origin_host = origin
            .split_once("://")
            .map(|(_, rest)| rest.trim_end_matches('/'))
            .unwrap_or("");
        if origin == "null" || origin_host.is_empty() || origin_host != host {
            return Err("cross-origin request refused (Origin does not match Host)");
        }
    }
    Ok(())
}

fn forbidden(why: &str) -> Response {
    let body = serde_json::json!({"error": "forbidden", "message": why});
    json_response(StatusCode::FORBIDDEN, body.to_string().into_bytes())
}

fn ui_error(msg: &str) -> Response {
    tracing::warn!(error = msg, "status page failed");
    let html = format!(
        "<!doctype html><meta charset=utf-8><title>record-offload</title><p>{}</p>",
        super::ui_page::esc(msg)
    );
    html_response(StatusCode::INTERNAL_SERVER_ERROR, html)
}

fn html_response(status: StatusCode, html: String) -> Response {
    let mut resp = http::Response::new(Body::from(html));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// Everything the page shows from the journal and the host.
fn gather(state: &AppState, query: Option<&[u8]>) -> Result<PageData, JournalError> {
    let conn = journal::open_ro(&state.ui.journal)?;
    let now_ms = journal::now_ms();
    let summary = journal::summary(&conn)?;
    let hour_ago = now_ms - 3_600_000;
    let throughput = journal::throughput(&conn, hour_ago, 60_000)?;
    let recent = journal::recent_uploads(&conn, LIST_ROWS)?;
    let failed = journal::failed_files(&conn, LIST_ROWS * 2)?;
    let oldest = journal::oldest_waiting(&conn)?;
    let search = match query {
        Some(q) => {
            // A legacy path or URL works as well as a path under the root.
            let needle = strip_prefix(q, state.resolver.prefix_path().as_bytes());
            Some(journal::search_path(&conn, needle, LIST_ROWS * 2)?)
        }
        None => None,
    };
    let notify = summary
        .notify
        .iter()
        .map(|f| {
            let mut f = f.clone();
            f.url = receiver_label(&f.url);
            f
        })
        .collect();
    let last_stored_ms = recent.first().and_then(|r| r.uploaded_ms);
    let store_error = summary
        .last_errors
        .iter()
        .find(|e| {
            e.state == State::Failed || e.state == State::Queued || e.state == State::Uploading
        })
        .map(|e| (e.error.clone(), e.at_ms));
    Ok(PageData {
        node: state.ui.node.clone(),
        now_ms,
        summary,
        throughput,
        recent,
        failed,
        oldest,
        query: query.map(|q| String::from_utf8_lossy(q).into_owned()),
        search,
        notify,
        receivers: state
            .ui
            .receivers
            .iter()
            .map(|r| (receiver_label(r.url.as_str()), r.events.join(", ")))
            .collect(),
        last_stored_ms,
        store_error,
        disk: crate::service::disk::disk_space(&state.ui.root).ok(),
        disk_forecast: crate::service::disk::latest(),
        health: None,
        session: None,
        notice: None,
    })
}

/// `q` without a leading legacy prefix (`/record/a` → `a`) or `/`.
fn strip_prefix<'a>(q: &'a [u8], prefix: &[u8]) -> &'a [u8] {
    let q = if !prefix.is_empty() && q.starts_with(prefix) {
        &q[prefix.len()..]
    } else {
        q
    };
    let q = q.strip_prefix(b"/").unwrap_or(q);
    if q.is_empty() { b"/" } else { q }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn session_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = crate::config::Config::default();
        c.watch.root = dir.path().to_path_buf();
        c.journal.path = dir.path().join("j.db");
        c.storage.bucket = "rec".into();
        c.storage.access_key_id = "ak".into();
        c.storage.access_key_secret = "sk".into();
        let settings = crate::config::validate(c).unwrap();
        let ui = UiState::new(&settings);
        let t = ui.session(1000);
        assert!(ui.session_valid(&t, 1000));
        assert!(ui.session_valid(&t, 1000 + SESSION_SECS));
        assert!(!ui.session_valid(&t, 1001 + SESSION_SECS), "expired");
        let (exp, mac) = t.split_once('.').unwrap();
        let later = format!("{}.{mac}", exp.parse::<u64>().unwrap() + 1);
        assert!(!ui.session_valid(&later, 1000), "expiry is signed");
        assert!(!ui.session_valid("garbage", 1000));
        let other = UiState::new(&settings);
        assert!(!other.session_valid(&t, 1000), "another process's key");
    }

    #[test]
    fn post_origin_checks() {
        let parts = |headers: &[(&str, &str)]| {
            let mut b = http::Request::builder().method("POST").uri("/ui/requeue");
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            b.body(()).unwrap().into_parts().0
        };
        assert!(same_origin(&parts(&[])).is_ok(), "curl on the socket");
        assert!(
            same_origin(&parts(&[
                ("host", "h:1"),
                ("origin", "http://h:1"),
                ("sec-fetch-site", "same-origin")
            ]))
            .is_ok()
        );
        assert!(same_origin(&parts(&[("host", "h:1"), ("sec-fetch-site", "cross-site")])).is_err());
        assert!(same_origin(&parts(&[("host", "h:1"), ("sec-fetch-site", "same-site")])).is_err());
        assert!(same_origin(&parts(&[("host", "h:1"), ("origin", "http://evil:1")])).is_err());
        assert!(same_origin(&parts(&[("host", "h:1"), ("origin", "null")])).is_err());
    }

    #[test]
    fn search_input() {
        assert_eq!(strip_prefix(b"/record/a/b.mp4", b"/record"), b"a/b.mp4");
        assert_eq!(strip_prefix(b"a/b", b"/record"), b"a/b");
        assert_eq!(strip_prefix(b"/x", b""), b"x");
    }
}
