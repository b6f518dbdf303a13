//! Self-test of the fault-injecting proxy in `common/proxy.rs`, against a small raw
//! HTTP/1.1 upstream started on 127.0.0.1:0.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::proxy::{Fault, FaultProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The Content-Length the upstream announces for HEAD requests.
const HEAD_LENGTH: usize = 1234;

/// Guard against hangs only; no test relies on it for its verdict about timing.
const HANG_GUARD: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Upstream: a tiny HTTP/1.1 server that echoes request bodies.
// ---------------------------------------------------------------------------------------

/// One request as the upstream saw it.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    /// Value of the request's `Connection` header.
    connection: Option<String>,
    content_length: u64,
    /// Body bytes actually received.
    received: u64,
}

#[derive(Clone, Default)]
struct Upstream {
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<Mutex<u64>>,
}

impl Upstream {
    async fn start() -> (SocketAddr, Upstream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = Upstream::default();
        let state = upstream.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                *state.connections.lock().unwrap() += 1;
                tokio::spawn(state.clone().serve(stream));
            }
        });
        (addr, upstream)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn connections(&self) -> u64 {
        *self.connections.lock().unwrap()
    }

    /// Waits until the upstream has recorded `n` requests.
    async fn wait_for(&self, n: usize) -> Vec<Seen> {
        let start = Instant::now();
        loop {
            let seen = self.seen();
            if seen.len() >= n || start.elapsed() > HANG_GUARD {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Serves requests on one connection. Keeps the connection alive unless the request
    /// says `Connection: close`; on `/stubborn` it ignores that and keeps the connection
    /// open, so the proxy must stop at the response's Content-Length.
    async fn serve(self, mut stream: TcpStream) {
        let mut buf = Vec::new();
        loop {
            let Some(head_len) = read_head(&mut stream, &mut buf).await else {
                return;
            };
            let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
            buf.drain(..head_len);
            let mut parts = head.split(' ');
            let method = parts.next().unwrap_or_default().to_string();
            let path = parts.next().unwrap_or_default().to_string();
            let content_length = header(&head, "content-length")
                .map(|v| v.parse::<u64>().unwrap())
                .unwrap_or(0);
            let connection = header(&head, "connection").map(str::to_string);
            if header(&head, "expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
                && stream
                    .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                    .await
                    .is_err()
            {
                return;
            }

            let mut body = std::mem::take(&mut buf);
            let mut complete = true;
            while (body.len() as u64) < content_length {
                let mut chunk = vec![0u8; 64 * 1024];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => {
                        complete = false;
                        break;
                    }
                    Ok(n) => body.extend_from_slice(&chunk[..n]),
                }
            }
            if body.len() as u64 > content_length {
                buf = body.split_off(content_length as usize);
            }
            self.seen.lock().unwrap().push(Seen {
                method: method.clone(),
                path: path.clone(),
                connection: connection.clone(),
                content_length,
                received: body.len() as u64,
            });
            if !complete {
                return;
            }

            // Like S3's HeadObject, a HEAD answer announces a length but has no body.
            let (announced, reply_body) = if method == "HEAD" {
                (HEAD_LENGTH, Vec::new())
            } else {
                (body.len(), body)
            };
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {announced}\r\nx-echo-path: {path}\r\nConnection: keep-alive\r\n\r\n"
            );
            if stream.write_all(response.as_bytes()).await.is_err()
                || stream.write_all(&reply_body).await.is_err()
            {
                return;
            }
            let close = connection.is_some_and(|c| c.eq_ignore_ascii_case("close"));
            if path == "/stubborn" {
                tokio::time::sleep(Duration::from_secs(30)).await;
                return;
            }
            if close {
                let _ = stream.shutdown().await;
                return;
            }
        }
    }
}

async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(pos + 4);
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// First value of header `name` in `head`.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

// ---------------------------------------------------------------------------------------
// Client: one request per connection, response read until the proxy closes.
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
struct Response {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        header(&self.head, name)
    }
}

async fn request(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> io::Result<Response> {
    let mut stream = TcpStream::connect(addr).await?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\nConnection: keep-alive\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    read_response(&mut stream).await
}

/// Reads a whole response up to EOF and checks it is complete.
async fn read_response(stream: &mut TcpStream) -> io::Result<Response> {
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> io::Result<Response> {
    let incomplete = |what: &str| io::Error::new(io::ErrorKind::UnexpectedEof, what.to_string());
    let head_len = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| incomplete("no response head"))?
        + 4;
    let head = String::from_utf8_lossy(&raw[..head_len]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| incomplete("bad status line"))?;
    let body = raw[head_len..].to_vec();
    let response = Response { status, head, body };
    let length: usize = response
        .header("content-length")
        .ok_or_else(|| incomplete("no content-length"))?
        .parse()
        .map_err(|_| incomplete("bad content-length"))?;
    if response.body.len() != length {
        return Err(incomplete("truncated body"));
    }
    Ok(response)
}

/// Deterministic pseudo-random bytes.
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

async fn setup() -> (FaultProxy, Upstream) {
    let (upstream_addr, upstream) = Upstream::start().await;
    let proxy = FaultProxy::start(upstream_addr).await.unwrap();
    assert_eq!(proxy.addr().ip().to_string(), "127.0.0.1");
    assert_ne!(proxy.addr(), upstream_addr);
    (proxy, upstream)
}

async fn guarded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(HANG_GUARD, f)
        .await
        .expect("request hung")
}

fn assert_connection_error(result: io::Result<Response>) {
    if let Ok(response) = result {
        panic!(
            "expected a connection error, got a response: {}",
            response.head
        );
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn pass_through_round_trips_a_large_body_exactly() {
    let (proxy, upstream) = setup().await;
    let body = payload(3 * 1024 * 1024 + 17, 1);

    let response = guarded(request(proxy.addr(), "PUT", "/bucket/key", &body))
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.body.len(), body.len());
    assert!(response.body == body, "echoed body differs");
    assert_eq!(response.header("x-echo-path"), Some("/bucket/key"));
    // The client is told not to reuse the connection, whatever the upstream said.
    assert_eq!(response.header("connection"), Some("close"));
    assert_eq!(response.head.matches("onnection:").count(), 1);

    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "PUT");
    assert_eq!(seen[0].path, "/bucket/key");
    assert_eq!(seen[0].content_length, body.len() as u64);
    assert_eq!(seen[0].received, body.len() as u64);
    // The request head was rewritten from keep-alive to close.
    assert_eq!(seen[0].connection.as_deref(), Some("close"));

    let stats = proxy.stats();
    assert_eq!(stats.connections, 1);
    assert_eq!(stats.requests, 1);
    assert_eq!(stats.forwarded, 1);
    assert_eq!(stats.injected, 0);
    assert_eq!(stats.request_body_bytes, body.len() as u64);
}

#[tokio::test]
async fn pass_through_stops_at_content_length_and_handles_head_and_continue() {
    let (proxy, upstream) = setup().await;

    // The upstream keeps this connection open after answering: the client must still get
    // the whole response and EOF, so the proxy relays by Content-Length.
    let response = guarded(request(proxy.addr(), "PUT", "/stubborn", b"hello"))
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"hello");

    // A HEAD answer has no body although it announces a length; the upstream keeps the
    // connection open, so the proxy must know not to wait for a body.
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    stream
        .write_all(b"HEAD /stubborn HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    guarded(stream.read_to_end(&mut raw)).await.unwrap();
    let head = String::from_utf8(raw).unwrap();
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(head.ends_with("\r\n\r\n"), "{head}");
    assert_eq!(header(&head, "content-length"), Some("1234"));
    assert_eq!(header(&head, "connection"), Some("close"));

    // Expect: 100-continue is passed upstream, and its 100 comes back before the body is
    // sent.
    let body = payload(200_000, 2);
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    let head = format!(
        "PUT /continue HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut interim = Vec::new();
    guarded(async {
        while !interim.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "EOF before 100");
            interim.push(byte[0]);
        }
    })
    .await;
    assert!(
        interim.starts_with(b"HTTP/1.1 100"),
        "{}",
        String::from_utf8_lossy(&interim)
    );
    stream.write_all(&body).await.unwrap();
    let response = guarded(read_response(&mut stream)).await.unwrap();
    assert_eq!(response.status, 200);
    assert!(response.body == body);

    assert_eq!(upstream.seen().len(), 3);
    let stats = proxy.stats();
    assert_eq!(stats.requests, 3);
    assert_eq!(stats.forwarded, 3);
    assert_eq!(stats.request_body_bytes, 5 + body.len() as u64);
}

#[tokio::test]
async fn down_closes_connections_without_a_byte() {
    let (proxy, upstream) = setup().await;
    proxy.set(Fault::Down);

    for _ in 0..3 {
        let result = guarded(request(proxy.addr(), "PUT", "/bucket/key", b"data")).await;
        assert_connection_error(result);
    }
    // Raw check: not a single byte comes back.
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut raw = Vec::new();
    let read = guarded(stream.read_to_end(&mut raw)).await;
    assert!(read.is_err() || raw.is_empty(), "got {raw:?}");

    assert_eq!(upstream.connections(), 0);
    let stats = proxy.stats();
    assert_eq!(stats.connections, 4);
    assert_eq!(stats.forwarded, 0);
    assert_eq!(
        stats.dropped_connections + stats.injected,
        4,
        "every connection dropped: {stats:?}"
    );

    proxy.set(Fault::None);
    let response = guarded(request(proxy.addr(), "PUT", "/bucket/key", b"data"))
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(upstream.seen().len(), 1);
}

#[tokio::test]
async fn refuse_gives_econnrefused_then_none_rebinds_the_same_port() {
    let (proxy, upstream) = setup().await;
    let addr = proxy.addr();
    assert_eq!(
        guarded(request(addr, "PUT", "/a", b"1"))
            .await
            .unwrap()
            .status,
        200
    );

    proxy.set(Fault::Refuse);
    for _ in 0..3 {
        let err = TcpStream::connect(addr).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    }

    proxy.set(Fault::None);
    assert_eq!(proxy.addr(), addr);
    let response = guarded(request(addr, "PUT", "/b", b"22")).await.unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"22");

    // And once more, to show the re-bound socket can be closed and re-bound again.
    proxy.set(Fault::Refuse);
    let err = TcpStream::connect(addr).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    proxy.set(Fault::DelayResponse(Duration::ZERO));
    assert_eq!(
        guarded(request(addr, "PUT", "/c", b"333"))
            .await
            .unwrap()
            .status,
        200
    );

    let paths: Vec<_> = upstream.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, ["/a", "/b", "/c"]);
}

#[tokio::test]
async fn status_every_second_request_is_injected() {
    let (proxy, upstream) = setup().await;
    proxy.set(Fault::Status {
        status: 503,
        code: "SlowDown".to_string(),
        every: 2,
    });

    let mut statuses = Vec::new();
    for i in 0..6 {
        let body = payload(10_000 + i, i as u64);
        let response = guarded(request(proxy.addr(), "PUT", &format!("/k{i}"), &body))
            .await
            .unwrap();
        assert_eq!(response.header("connection"), Some("close"));
        if response.status == 503 {
            assert_eq!(response.header("content-type"), Some("application/xml"));
            assert_eq!(
                response.body,
                b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
            );
        } else {
            assert!(response.body == body);
        }
        statuses.push(response.status);
    }
    assert_eq!(statuses, [200, 503, 200, 503, 200, 503]);

    // Injected requests never reach the upstream.
    let paths: Vec<_> = upstream.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, ["/k0", "/k2", "/k4"]);
    let stats = proxy.stats();
    assert_eq!(stats.requests, 6);
    assert_eq!(stats.injected, 3);
    assert_eq!(stats.forwarded, 3);

    // every = 1 injects all, including a request that waits for 100-continue: it gets
    // the final answer without sending its body.
    proxy.set(Fault::Status {
        status: 500,
        code: "InternalError".to_string(),
        every: 1,
    });
    for _ in 0..2 {
        let response = guarded(request(proxy.addr(), "PUT", "/all", b"x"))
            .await
            .unwrap();
        assert_eq!(response.status, 500);
        assert!(String::from_utf8_lossy(&response.body).contains("<Code>InternalError</Code>"));
    }
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    stream
        .write_all(
            b"PUT /expect HTTP/1.1\r\nHost: test\r\nContent-Length: 1000000\r\nExpect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
    let response = guarded(read_response(&mut stream)).await.unwrap();
    assert_eq!(response.status, 500);

    assert_eq!(upstream.seen().len(), 3);
    let stats = proxy.stats();
    assert_eq!(stats.requests, 9);
    assert_eq!(stats.injected, 6);
    assert_eq!(stats.forwarded, 3);
}

#[tokio::test]
async fn cut_request_body_breaks_both_sides_mid_upload() {
    let (proxy, upstream) = setup().await;
    let after = 64 * 1024;
    proxy.set(Fault::CutRequestBody { after_bytes: after });

    let body = payload(1024 * 1024, 3);
    let result = guarded(request(proxy.addr(), "PUT", "/big", &body)).await;
    assert_connection_error(result);

    let seen = upstream.wait_for(1).await;
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/big");
    assert_eq!(seen[0].content_length, body.len() as u64);
    assert_eq!(
        seen[0].received, after,
        "upstream got exactly the bytes before the cut"
    );

    // A body below the threshold passes.
    let small = payload(1000, 4);
    let response = guarded(request(proxy.addr(), "PUT", "/small", &small))
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert!(response.body == small);

    let stats = proxy.stats();
    assert_eq!(stats.requests, 2);
    assert_eq!(stats.injected, 1);
    assert_eq!(stats.forwarded, 1);
    assert_eq!(stats.request_body_bytes, after + small.len() as u64);
}

#[tokio::test]
async fn delay_response_holds_back_the_answer() {
    let (proxy, upstream) = setup().await;
    let delay = Duration::from_millis(1200);
    proxy.set(Fault::DelayResponse(delay));

    let started = Instant::now();
    let response = guarded(request(proxy.addr(), "PUT", "/slow", b"abc"))
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"abc");
    assert!(elapsed >= delay, "answered after {elapsed:?}");

    // A client with a shorter timeout gives up, although the upstream did answer.
    let timed_out = tokio::time::timeout(
        Duration::from_millis(300),
        request(proxy.addr(), "PUT", "/timeout", b"abc"),
    )
    .await;
    assert!(timed_out.is_err(), "client timeout did not fire");
    let seen = upstream.wait_for(2).await;
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].path, "/timeout");
    assert_eq!(seen[1].received, 3);
}

#[tokio::test]
async fn throttle_limits_request_body_rate() {
    let (proxy, upstream) = setup().await;
    proxy.set(Fault::Throttle {
        bytes_per_sec: 256 * 1024,
    });

    let body = payload(512 * 1024, 5);
    let started = Instant::now();
    let response = guarded(request(proxy.addr(), "PUT", "/throttled", &body))
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(response.status, 200);
    assert!(response.body == body);
    assert!(
        elapsed >= Duration::from_millis(1500),
        "512 KiB at 256 KiB/s took only {elapsed:?}"
    );
    assert_eq!(upstream.seen()[0].received, body.len() as u64);
    assert_eq!(proxy.stats().request_body_bytes, body.len() as u64);
}

#[tokio::test]
async fn stopping_the_proxy_closes_its_port() {
    let (upstream_addr, _upstream) = Upstream::start().await;
    let proxy = FaultProxy::start(upstream_addr).await.unwrap();
    let addr = proxy.addr();
    assert_eq!(
        guarded(request(addr, "PUT", "/x", b"1"))
            .await
            .unwrap()
            .status,
        200
    );
    drop(proxy);
    let err = TcpStream::connect(addr).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
}
