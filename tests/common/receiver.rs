//! A real HTTP receiver of notifications (hyper on 127.0.0.1) that can be down, answer 500,
//! or answer too late; it checks every request's signature with the scheme the README
//! documents and records what it got.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The secret the tests configure.
pub const SECRET: &str = "receiver-secret-0123456789";

/// How the receiver answers the next requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Ok,
    /// 500 Internal Server Error.
    Error,
    /// 200, but only after this long (longer than the sender's timeout).
    Slow(Duration),
}

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Got {
    pub id: String,
    pub body: Value,
    pub raw: String,
    /// The signature header verified (HMAC-SHA256 over "t.body", t within 5 minutes).
    pub signed: bool,
    /// The header id equals the body's.
    pub ids_agree: bool,
    /// What the receiver answered.
    pub answered: u16,
}

#[derive(Default)]
struct Inner {
    got: Vec<Got>,
    /// Answers for the next requests, in order; then `Ok`.
    script: Vec<Answer>,
}

#[derive(Clone, Default)]
pub struct Receiver {
    inner: Arc<Mutex<Inner>>,
}

/// Checks `t=UNIX,v1=HEX` as a receiver would (the README's example, in Rust).
pub fn verify(secret: &str, header: &str, body: &[u8]) -> bool {
    use hmac::{Hmac, Mac};
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1 = hex::decode(v).ok(),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    if (now - t).abs() > 300 {
        return false;
    }
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    mac.verify_slice(&v1).is_ok()
}

impl Receiver {
    /// Sets the answers of the next requests.
    pub fn script(&self, answers: &[Answer]) {
        self.inner.lock().unwrap().script = answers.to_vec();
    }

    pub fn got(&self) -> Vec<Got> {
        self.inner.lock().unwrap().got.clone()
    }

    /// Requests answered 2xx.
    pub fn accepted(&self) -> Vec<Got> {
        self.got()
            .into_iter()
            .filter(|g| g.answered == 200)
            .collect()
    }

    /// Serves on `addr` until the returned task is aborted.
    pub async fn serve(&self, addr: SocketAddr) -> JoinHandle<()> {
        let listener = TcpListener::bind(addr).await.unwrap();
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let me = me.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                        let me = me.clone();
                        async move { Ok::<_, Infallible>(me.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        })
    }

    async fn handle(&self, req: hyper::Request<Incoming>) -> hyper::Response<Full<Bytes>> {
        let header = |n: &str| {
            req.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        let sig = header("x-record-offload-signature");
        let hid = header("x-record-offload-id");
        let ctype = header("content-type");
        let raw = req.into_body().collect().await.unwrap().to_bytes();
        let answer = {
            let mut inner = self.inner.lock().unwrap();
            if inner.script.is_empty() {
                Answer::Ok
            } else {
                inner.script.remove(0)
            }
        };
        let body: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
        let id = body["id"].as_str().unwrap_or("").to_string();
        let status = match answer {
            Answer::Ok => 200,
            Answer::Error => 500,
            // Too late: the sender gives up first and counts it as not delivered.
            Answer::Slow(_) => 599,
        };
        self.inner.lock().unwrap().got.push(Got {
            ids_agree: hid == id && ctype == "application/json",
            id,
            body,
            raw: String::from_utf8_lossy(&raw).into_owned(),
            signed: verify(SECRET, &sig, &raw),
            answered: status,
        });
        if let Answer::Slow(d) = answer {
            tokio::time::sleep(d).await;
        }
        let code = if status == 599 { 200 } else { status };
        hyper::Response::builder()
            .status(code)
            .body(Full::new(Bytes::from_static(b"ok")))
            .unwrap()
    }
}

/// A free port on 127.0.0.1 (bound and released: nothing listens there until a test serves).
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Checks what a receiver accepted: every event of `expect` (path → events in order) arrived,
/// signed, in order per file; repeats only with the same id and the same body.
pub fn check_deliveries(got: &[Got], expect: &[(&str, &[&str])]) {
    use std::collections::BTreeMap;
    for g in got {
        assert!(g.signed, "bad signature: {}", g.raw);
        assert!(g.ids_agree, "headers disagree with the body: {}", g.raw);
    }
    let mut by_id: BTreeMap<&str, &str> = BTreeMap::new();
    for g in got {
        if let Some(first) = by_id.insert(&g.id, &g.raw) {
            assert_eq!(
                first, g.raw,
                "a repeat with the same id must be the same event"
            );
        }
    }
    // Per file, the first arrival of each id, in arrival order.
    let mut per_file: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for g in got {
        let path = g.body["path"].as_str().unwrap_or("").to_string();
        let list = per_file.entry(path).or_default();
        if !list.iter().any(|(id, _)| *id == g.id) {
            list.push((
                g.id.clone(),
                g.body["event"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    for (path, events) in expect {
        let seen: Vec<&str> = per_file
            .get(*path)
            .map(|l| l.iter().map(|(_, e)| e.as_str()).collect())
            .unwrap_or_default();
        assert_eq!(&seen, events, "events of {path} (in arrival order)");
    }
    assert_eq!(
        per_file.len(),
        expect.len(),
        "events for unexpected files: {:?}",
        per_file.keys().collect::<Vec<_>>()
    );
}
