//! The status page (`GET /ui`): what it shows of a running daemon, the look-ups' access rules,
//! the re-queue action and its cross-site defence, and the page in a real browser (Debian's
//! `chromium`, headless): counts, chart, search, no console errors, a screenshot.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::harness::{Env, bytes};
use common::http::{Resp, http, tcp_addr};
use common::proxy::{Fault, FaultProxy};
use record_offload::daemon::Daemon;
use record_offload::journal::State;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(60);

/// Three stored files and one the store refused for good.
async fn daemon_with_files(env: &Env, proxy: &FaultProxy, listen: Vec<String>) -> Daemon {
    let d = env
        .start(env.config_at(&format!("http://{}", proxy.addr()), |c| {
            c.lookup.listen = listen;
        }))
        .await;
    env.write("cam1/a.mp4", &bytes(300_000, 1));
    env.write("cam1/b.mp4", &bytes(200_000, 2));
    env.write("cam2/<odd> & \"name\".mp4", &bytes(1_000, 3));
    for r in ["cam1/a.mp4", "cam1/b.mp4", "cam2/<odd> & \"name\".mp4"] {
        env.wait_state(r, State::Deleted, T).await;
    }
    proxy.set(Fault::Status {
        status: 403,
        code: "AccessDenied".into(),
        every: 1,
    });
    env.write("cam3/bad.mp4", b"refused by the store");
    env.wait_state("cam3/bad.mp4", State::Failed, T).await;
    proxy.set(Fault::None);
    d
}

fn text(r: &Resp) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

/// A request over the unix socket (`Connection: close`, read to the end).
async fn unix(sock: &Path, method: &str, target: &str, headers: &[(&str, &str)]) -> Resp {
    let mut s = tokio::net::UnixStream::connect(sock).await.unwrap();
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("Content-Length: 0\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    Resp {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

/// The re-queue form's id and token in a page.
fn requeue_form(page: &str) -> Option<(String, String)> {
    let at = page.find("action=\"/ui/requeue?id=")?;
    let rest = &page[at + "action=\"/ui/requeue?id=".len()..];
    let (id, rest) = rest.split_once("&amp;s=")?;
    let token = rest.split('"').next()?;
    Some((id.to_string(), token.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_the_journal_and_requeues_only_for_who_may() {
    let env = Env::new().await;
    let proxy = FaultProxy::start(env.server.addr).await.unwrap();
    let sock = env.dir.path().join("ui.sock");
    let d = daemon_with_files(
        &env,
        &proxy,
        vec!["127.0.0.1:0".into(), format!("unix:{}", sock.display())],
    )
    .await;
    let base = format!("http://{}", tcp_addr(&d));

    let r = http("GET", &format!("{base}/ui"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    assert!(
        r.header("content-security-policy")
            .unwrap()
            .contains("default-src 'none'")
    );
    let page = text(&r);
    assert!(
        page.contains("<tr data-state=deleted><td>deleted<td class=n>3<"),
        "{page}"
    );
    assert!(page.contains("<tr data-state=failed><td>failed<td class=n>1<"));
    assert!(page.contains("<svg id=chart") && page.contains("<rect class=bar"));
    assert!(
        page.contains("Stored in the last hour: 489.3 KiB in 3 files"),
        "{page}"
    );
    assert!(page.contains("name=viewport") && page.contains("http-equiv=refresh"));
    // Names are escaped; links go through the drop-in route.
    assert!(page.contains("cam2/&lt;odd&gt; &amp; &quot;name&quot;.mp4"));
    assert!(!page.contains("<odd>"));
    assert!(page.contains("href=\"/record/cam1/a.mp4\""));
    assert!(page.contains("cam3/bad.mp4") && page.contains("403"));
    // Plain TCP without auth: no action offered, none accepted.
    assert_eq!(requeue_form(&page), None);
    let r = http("POST", &format!("{base}/ui/requeue?id=4"), &[]).await;
    assert_eq!(r.status, 403);

    let r = http("GET", &format!("{base}/ui?q=b.mp4"), &[]).await;
    let page = text(&r);
    assert!(page.contains("<p id=search-count>1 found</p>"), "{page}");
    assert!(page.contains("value=\"b.mp4\""));
    let r = http("GET", &format!("{base}/ui?q=%2Frecord%2Fcam1%2F"), &[]).await;
    assert!(text(&r).contains("<p id=search-count>2 found</p>"));
    assert_eq!(http("DELETE", &format!("{base}/ui"), &[]).await.status, 405);

    // On the unix socket the page offers the re-queue; the POST needs its token and must not
    // come from another site.
    let r = unix(&sock, "GET", "/ui", &[]).await;
    assert_eq!(r.status, 200);
    let (id, token) = requeue_form(&text(&r)).expect("a re-queue form on the socket");
    let target = format!("/ui/requeue?id={id}&s={token}");
    for bad in [
        vec![("Sec-Fetch-Site", "cross-site")],
        vec![("Sec-Fetch-Site", "same-site")],
        vec![("Origin", "http://evil.example")],
        vec![("Origin", "null")],
    ] {
        let r = unix(&sock, "POST", &target, &bad).await;
        assert_eq!(r.status, 403, "{bad:?}");
    }
    // The token with its last character changed (to another one, whatever it was).
    let last = if token.ends_with('0') { '1' } else { '0' };
    let forged = format!("/ui/requeue?id={id}&s={}{last}", &token[..token.len() - 1]);
    assert_eq!(unix(&sock, "POST", &forged, &[]).await.status, 403);
    assert_eq!(unix(&sock, "GET", &target, &[]).await.status, 405);
    assert_eq!(env.state("cam3/bad.mp4"), Some(State::Failed));
    let r = unix(
        &sock,
        "POST",
        &target,
        &[
            ("Origin", "http://localhost"),
            ("Sec-Fetch-Site", "same-origin"),
        ],
    )
    .await;
    assert_eq!(r.status, 303, "{}", text(&r));
    assert!(r.header("location").unwrap().starts_with("/ui?s="));
    // The store takes it now.
    env.wait_state("cam3/bad.mp4", State::Deleted, T).await;
    d.shutdown();
    d.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_follows_allow_and_auth() {
    let env = Env::new().await;
    let d = env
        .start(env.config(|c| c.lookup.allow = vec!["10.0.0.0/8".into()]))
        .await;
    let r = http("GET", &format!("http://{}/ui", tcp_addr(&d)), &[]).await;
    assert_eq!(r.status, 403);
    d.shutdown();
    d.wait().await;

    let env = Env::new().await;
    let secret = "business-secret-0123456789";
    let d = env
        .start(env.config(|c| {
            c.lookup.auth.keys.insert("biz".into(), secret.into());
        }))
        .await;
    let base = format!("http://{}", tcp_addr(&d));
    assert_eq!(http("GET", &format!("{base}/ui"), &[]).await.status, 401);
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let q = signed(secret, "biz", "GET", "/ui", ts, "n-ui-1");
    let r = http("GET", &format!("{base}/ui?{q}"), &[]).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let page = text(&r);
    // The page carries a session for its search and refresh.
    let token = page
        .split("name=s value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("a session token in the search form")
        .to_string();
    let r = http("GET", &format!("{base}/ui?s={token}&q=x"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        http("GET", &format!("{base}/ui?s=1.bad"), &[]).await.status,
        401
    );
    d.shutdown();
    d.wait().await;
}

/// A signed look-up query as the README describes it (with a dummy `path`).
fn signed(secret: &str, app: &str, method: &str, path: &str, ts: u64, nonce: &str) -> String {
    use hmac::{Hmac, Mac};
    let ts = ts.to_string();
    let mut params = [
        ("app_key", app),
        ("nonce", nonce),
        ("path", "x"),
        ("ts", ts.as_str()),
    ];
    params.sort();
    let canonical = params.map(|(n, v)| format!("{n}={v}")).join("&");
    let to_sign = format!("{method}\n{path}\n{canonical}\n{ts}\n{nonce}");
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(to_sign.as_bytes());
    let sig = hex::encode(mac.finalize().into_bytes());
    format!("path=x&app_key={app}&ts={ts}&nonce={nonce}&sig={sig}")
}

/// Runs headless chromium on `url`: the DOM after load, and the console lines it logged.
fn chromium(bin: &Path, profile: &Path, args: &[&str], url: &str) -> (String, Vec<String>) {
    let out = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let console = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .map(str::to_string)
        .collect();
    (String::from_utf8_lossy(&out.stdout).into_owned(), console)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_in_a_real_browser() {
    let Some(bin) = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
    else {
        eprintln!("SKIPPED: chromium is not installed (apt-get install chromium; .ci/run does)");
        return;
    };
    let env = Env::new().await;
    let proxy = FaultProxy::start(env.server.addr).await.unwrap();
    let d = daemon_with_files(&env, &proxy, vec!["127.0.0.1:0".into()]).await;
    let base = format!("http://{}", tcp_addr(&d));
    let profile = env.dir.path().join("chromium");
    let bin = bin.to_path_buf();

    let (b2, p2, u2) = (bin.clone(), profile.clone(), format!("{base}/ui"));
    let (dom, console) =
        tokio::task::spawn_blocking(move || chromium(&b2, &p2, &["--dump-dom"], &u2))
            .await
            .unwrap();
    assert!(console.is_empty(), "console messages: {console:#?}");
    assert!(
        dom.contains("<tr data-state=\"deleted\"><td>deleted</td><td class=\"n\">3</td>"),
        "{dom}"
    );
    assert!(dom.contains("<tr data-state=\"failed\"><td>failed</td><td class=\"n\">1</td>"));
    assert!(dom.contains("<svg id=\"chart\"") && dom.contains("class=\"bar\""));
    assert!(dom.contains("id=\"health\">healthy<"));

    // The search form is a GET of /ui?q=...: what the browser loads when it is submitted.
    let (b2, p2, u2) = (bin.clone(), profile.clone(), format!("{base}/ui?q=cam1"));
    let (dom, console) =
        tokio::task::spawn_blocking(move || chromium(&b2, &p2, &["--dump-dom"], &u2))
            .await
            .unwrap();
    assert!(console.is_empty(), "console messages: {console:#?}");
    assert!(dom.contains("<p id=\"search-count\">2 found</p>"), "{dom}");
    assert!(dom.contains("value=\"cam1\""));

    // A screenshot (RECORD_OFFLOAD_UI_SCREENSHOT names where to keep it; docs/ui.png was made
    // so), and a phone-sized one that must render too.
    let shot = std::env::var_os("RECORD_OFFLOAD_UI_SCREENSHOT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env.dir.path().join("ui.png"));
    for (size, path) in [
        ("--window-size=1100,1500", shot.clone()),
        ("--window-size=390,1800", env.dir.path().join("phone.png")),
    ] {
        let (b2, p2, u2) = (bin.clone(), profile.clone(), format!("{base}/ui"));
        let arg = format!("--screenshot={}", path.display());
        let (_, console) = tokio::task::spawn_blocking(move || {
            chromium(&b2, &p2, &[size, "--hide-scrollbars", &arg], &u2)
        })
        .await
        .unwrap();
        assert!(console.is_empty(), "console messages: {console:#?}");
        let png = std::fs::read(&path).unwrap();
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "{}",
            png.len()
        );
    }
    d.shutdown();
    d.wait().await;
}
