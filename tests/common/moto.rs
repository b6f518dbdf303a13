//! A second, independent S3 implementation for the integration tests: moto's server (PyPI
//! `moto[server]`), spawned on 127.0.0.1 on a free port, with the bucket created, killed
//! when dropped.
//!
//! Where `moto_server` comes from, first that works:
//! 1. `MOTO_SERVER` (a path to the program), if set;
//! 2. `moto_server` on `PATH` (`.ci/run` installs it there);
//! 3. a virtual environment the harness makes itself under `target/test-venv/moto` with
//!    `python3 -m venv` and `pip install "moto[server]"`, once per machine (a lock file keeps
//!    parallel test processes from installing it twice).
//!
//! No moto is a test failure, never a skip: the panic says how to install it.

use std::io::{Read, Seek};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use aws_credential_types::Credentials;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    BehaviorVersion, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};

use super::harness::BUCKET;

const INSTALL_HINT: &str = "moto's server is needed for these tests: install it with \
     `pip install \"moto[server]\"` so that `moto_server` is on PATH (as .ci/run does), or set \
     MOTO_SERVER=/path/to/moto_server, or make sure `python3 -m venv` and pip work so the \
     tests can install it under target/test-venv/moto";

/// How long moto may take to listen after it was spawned (Python imports on a busy machine).
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub struct MotoServer {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: Option<tempfile::TempDir>,
    client: Client,
}

/// What HEAD says about an object.
#[derive(Clone, Debug)]
pub struct Head {
    pub size: u64,
    pub etag: String,
    pub content_type: Option<String>,
}

impl MotoServer {
    /// Starts moto on 127.0.0.1 on a free port and creates [`BUCKET`]. Panics (with how to
    /// install moto) if it cannot.
    pub async fn start() -> MotoServer {
        let program = tokio::task::spawn_blocking(moto_program).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("moto.log");
        // Another process may take the free port between our probe and moto's bind: retry.
        let mut last_failure = String::new();
        for _ in 0..3 {
            let port = free_port();
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let server = MotoServer {
                child: spawn(&program, port, &log),
                addr,
                log: log.clone(),
                _dir: None,
                client: client_for(&format!("http://{addr}")),
            };
            match server.wait_listening().await {
                Ok(mut server) => {
                    server._dir = Some(dir);
                    server.create_bucket().await;
                    return server;
                }
                // Dropping the server ended the process.
                Err(why) => last_failure = why,
            }
        }
        panic!(
            "moto_server ({}) did not start: {last_failure}\n{INSTALL_HINT}",
            program.display()
        );
    }

    /// `http://127.0.0.1:PORT`, for `storage.endpoint` (with `path_style = true`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// An S3 client for this server (path style, any credentials).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The server's log (one line per request), for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_listening(mut self) -> Result<MotoServer, String> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(format!("it exited ({status}); its output:\n{}", self.log()));
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(self);
            }
            if start.elapsed() > START_TIMEOUT {
                return Err(format!(
                    "not listening on {} after {START_TIMEOUT:?}; its output:\n{}",
                    self.addr,
                    self.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn create_bucket(&self) {
        let mut last = String::new();
        for _ in 0..50 {
            match self.client.create_bucket().bucket(BUCKET).send().await {
                Ok(_) => return,
                Err(e) => last = format!("{:?}", aws_sdk_s3::error::DisplayErrorContext(&e)),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "moto did not create bucket {BUCKET}: {last}\n{}",
            self.log()
        );
    }

    /// Open multipart uploads in the bucket (ListMultipartUploads), as (key, upload id),
    /// sorted.
    pub async fn open_uploads(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut key_marker: Option<String> = None;
        let mut id_marker: Option<String> = None;
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(BUCKET)
                .set_key_marker(key_marker.clone())
                .set_upload_id_marker(id_marker.clone())
                .send()
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "ListMultipartUploads on moto: {:?}",
                        aws_sdk_s3::error::DisplayErrorContext(&e)
                    )
                });
            for u in page.uploads() {
                out.push((
                    u.key().unwrap_or_default().to_string(),
                    u.upload_id().unwrap_or_default().to_string(),
                ));
            }
            if page.is_truncated() != Some(true) {
                break;
            }
            key_marker = page.next_key_marker().map(str::to_string);
            id_marker = page.next_upload_id_marker().map(str::to_string);
        }
        out.sort();
        out
    }

    /// Starts a multipart upload (CreateMultipartUpload) and returns its id.
    pub async fn create_multipart(&self, key: &str) -> String {
        self.client
            .create_multipart_upload()
            .bucket(BUCKET)
            .key(key)
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "CreateMultipartUpload {key} on moto: {:?}",
                    aws_sdk_s3::error::DisplayErrorContext(&e)
                )
            })
            .upload_id()
            .unwrap()
            .to_string()
    }

    /// The object's bytes (GET), or None if there is none.
    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        match self
            .client
            .get_object()
            .bucket(BUCKET)
            .key(key)
            .send()
            .await
        {
            Ok(out) => Some(out.body.collect().await.unwrap().into_bytes().to_vec()),
            Err(e) if e.as_service_error().is_some_and(|e| e.is_no_such_key()) => None,
            Err(e) => panic!(
                "GET {key} on moto: {:?}",
                aws_sdk_s3::error::DisplayErrorContext(&e)
            ),
        }
    }

    /// HEAD of the object, or None if there is none.
    pub async fn head(&self, key: &str) -> Option<Head> {
        match self
            .client
            .head_object()
            .bucket(BUCKET)
            .key(key)
            .send()
            .await
        {
            Ok(out) => Some(Head {
                size: out.content_length().unwrap_or(-1) as u64,
                etag: out.e_tag().unwrap_or_default().to_string(),
                content_type: out.content_type().map(str::to_string),
            }),
            Err(e) if e.as_service_error().is_some_and(|e| e.is_not_found()) => None,
            Err(e) => panic!(
                "HEAD {key} on moto: {:?}",
                aws_sdk_s3::error::DisplayErrorContext(&e)
            ),
        }
    }

    /// Keys of every object in the bucket, sorted.
    pub async fn keys(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(BUCKET)
                .set_continuation_token(token.clone())
                .send()
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "ListObjectsV2 on moto: {:?}",
                        aws_sdk_s3::error::DisplayErrorContext(&e)
                    )
                });
            out.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_string)),
            );
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => break,
            }
        }
        out.sort();
        out
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        // moto runs in a process group of its own (a launcher such as a pyenv shim may sit
        // between us and Python): end the group, then reap our child.
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client_for(endpoint: &str) -> Client {
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new("moto", "moto", None, None, "moto-test"))
        .force_path_style(true)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .build();
    Client::from_conf(conf)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(program: &Path, port: u16, log: &Path) -> Child {
    use std::os::unix::process::CommandExt;
    let out = std::fs::File::create(log).unwrap();
    let err = out.try_clone().unwrap();
    Command::new(program)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        // The tests talk to it only through its S3 API; no AWS settings of the caller leak in.
        .env_remove("AWS_PROFILE")
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}\n{INSTALL_HINT}", program.display()))
}

/// The `moto_server` program, found or installed once per test process.
fn moto_program() -> PathBuf {
    static PROGRAM: OnceLock<PathBuf> = OnceLock::new();
    PROGRAM.get_or_init(find_or_install).clone()
}

/// True if `program -h` runs and exits 0 (a pyenv shim without moto behind it exits 127).
fn runs(program: &Path) -> bool {
    Command::new(program)
        .arg("-h")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn find_or_install() -> PathBuf {
    if let Some(p) = std::env::var_os("MOTO_SERVER") {
        let p = PathBuf::from(p);
        assert!(
            runs(&p),
            "MOTO_SERVER={} does not run (`{} -h` failed)\n{INSTALL_HINT}",
            p.display(),
            p.display()
        );
        return p;
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("moto_server");
            if p.is_file() && runs(&p) {
                return p;
            }
        }
    }
    install_venv()
}

/// `target/test-venv/moto`, made with `python3 -m venv` and `pip install "moto[server]"`.
fn install_venv() -> PathBuf {
    // CARGO_TARGET_TMPDIR is `<target dir>/tmp`.
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let venv = target.join("test-venv/moto");
    let program = venv.join("bin/moto_server");
    let done = venv.join(".installed");
    std::fs::create_dir_all(venv.parent().unwrap()).unwrap();
    // One installer at a time across the test processes cargo runs in parallel.
    let lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(target.join("test-venv/moto.lock"))
        .unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
    if done.exists() && runs(&program) {
        return program;
    }
    let log_path = target.join("test-venv/moto-install.log");
    let mut log = std::fs::File::create(&log_path).unwrap();
    let tail = |log: &mut std::fs::File| {
        let mut s = String::new();
        let _ = log.rewind();
        let _ = log.read_to_string(&mut s);
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    };
    eprintln!(
        "moto_server not found: installing moto[server] into {} (log: {})",
        venv.display(),
        log_path.display()
    );
    let _ = std::fs::remove_dir_all(&venv);
    let python = std::env::var_os("PYTHON").unwrap_or_else(|| "python3".into());
    let steps: [(PathBuf, Vec<&str>); 2] = [
        (PathBuf::from(&python), vec!["-m", "venv"]),
        (
            venv.join("bin/python"),
            vec!["-m", "pip", "install", "-q", "moto[server]"],
        ),
    ];
    for (i, (prog, args)) in steps.iter().enumerate() {
        let mut cmd = Command::new(prog);
        cmd.args(args);
        if i == 0 {
            cmd.arg(&venv);
        }
        let status = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log.try_clone().unwrap())
            .status();
        match status {
            Ok(s) if s.success() => {}
            other => panic!(
                "installing moto failed at `{} {}`: {other:?}\n{}\n{INSTALL_HINT}",
                prog.display(),
                args.join(" "),
                tail(&mut log)
            ),
        }
    }
    assert!(
        runs(&program),
        "{} was installed but does not run\n{}\n{INSTALL_HINT}",
        program.display(),
        tail(&mut log)
    );
    std::fs::write(&done, b"").unwrap();
    program
}
