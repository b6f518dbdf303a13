//! The look-up server's answers: the body type, and JSON, error and redirect answers.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use http::{HeaderValue, StatusCode, header};
use http_body::{Frame, SizeHint};
use tracing::warn;

use crate::lookup::resolve::LookupError;

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

pub(super) fn method_not_allowed() -> Response {
    let mut resp = json_response(
        StatusCode::METHOD_NOT_ALLOWED,
        br#"{"error":"method_not_allowed","message":"only GET and HEAD"}"#.to_vec(),
    );
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    resp
}

pub(super) fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
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

pub(super) fn error_response(e: &LookupError) -> Response {
    error_response_with(e, e.status())
}

pub(super) fn error_response_with(e: &LookupError, status: u16) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status.is_server_error() {
        warn!(error = %e, "look-up failed");
    }
    json_response(status, e.to_json())
}

pub(super) fn redirect(status: StatusCode, location: &str, body: Vec<u8>) -> Response {
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
