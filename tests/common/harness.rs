//! Test environment: a real S3-compatible server (s3s-fs, checking signatures) on 127.0.0.1:0,
//! a real watch directory, a real journal file, and the daemon running in-process.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use record_offload::config::{self, Config, Settings};
use record_offload::daemon::Daemon;
use record_offload::devserver::{ACCESS_KEY, DevOptions, DevServer, SECRET_KEY};
use record_offload::journal::{self, FileRow, State};
use tempfile::TempDir;

pub const BUCKET: &str = "rec";
pub const NODE: &str = "node1";

pub struct Env {
    pub dir: TempDir,
    pub root: PathBuf,
    pub journal_path: PathBuf,
    pub server: DevServer,
}

impl Env {
    pub async fn new() -> Env {
        Env::new_with(DevOptions::default()).await
    }

    /// An environment whose test server runs in the modes of `opts` (OSS behaviour, TLS,
    /// a custom domain).
    pub async fn new_with(opts: DevOptions) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("record");
        std::fs::create_dir_all(&root).unwrap();
        let server = DevServer::start_with(
            &dir.path().join("store"),
            "127.0.0.1:0".parse().unwrap(),
            opts,
        )
        .await
        .unwrap();
        server.create_bucket(BUCKET).unwrap();
        let journal_path = dir.path().join("state/journal.db");
        Env {
            dir,
            root,
            journal_path,
            server,
        }
    }

    /// A config for this environment: fast settle, scans rare (so inotify is what is tested),
    /// quick retries. `edit` changes what a test needs.
    pub fn config(&self, edit: impl FnOnce(&mut Config)) -> Settings {
        self.config_at(&self.server.endpoint(), edit)
    }

    pub fn config_at(&self, endpoint: &str, edit: impl FnOnce(&mut Config)) -> Settings {
        let mut c = self.base_config(endpoint);
        edit(&mut c);
        config::validate(c).unwrap()
    }

    /// The same settings as [`Env::config_at`], edited and written as `config.toml` in the
    /// test's directory for the real binary (not validated: a test may leave the secret out
    /// and pass it in the environment).
    #[allow(dead_code)]
    pub fn config_file_at(&self, endpoint: &str, edit: impl FnOnce(&mut Config)) -> PathBuf {
        let mut c = self.base_config(endpoint);
        edit(&mut c);
        let path = self.dir.path().join("config.toml");
        std::fs::write(&path, toml::to_string(&c).unwrap()).unwrap();
        path
    }

    fn base_config(&self, endpoint: &str) -> Config {
        let mut c = Config::default();
        c.node.name = NODE.to_string();
        c.watch.root = self.root.clone();
        c.watch.settle_secs = 0.3;
        c.watch.rescan_interval_secs = 600.0;
        c.watch.prune_after_secs = 3600.0;
        // The test host's disk fills and empties with the other tests and builds: no disk
        // forecast warnings (degraded /healthz, STATUS= prefix) unless a test asks for them.
        c.watch.disk_warn_secs = 0.0;
        c.journal.path = self.journal_path.clone();
        c.storage.endpoint = endpoint.to_string();
        c.storage.region = "us-east-1".to_string();
        c.storage.bucket = BUCKET.to_string();
        c.storage.access_key_id = ACCESS_KEY.to_string();
        c.storage.access_key_secret = SECRET_KEY.to_string();
        c.storage.path_style = true;
        // A TLS test server's own CA is trusted, as an operator's private CA would be.
        if endpoint.starts_with("https://") {
            c.storage.ca_file = self.server.ca_path().map(Path::to_path_buf);
        }
        c.upload.retry_initial_secs = 0.05;
        c.upload.retry_max_secs = 0.5;
        c.upload.request_timeout_secs = 10.0;
        c.upload.drain_secs = 2.0;
        // Tests run in parallel: never a fixed port.
        c.lookup.listen = vec!["127.0.0.1:0".to_string()];
        c
    }

    pub async fn start(&self, settings: Settings) -> Daemon {
        Daemon::start(settings).await.unwrap()
    }

    /// Writes a file under the root (creating directories), closing it.
    pub fn write(&self, rel: impl AsRef<Path>, data: &[u8]) -> PathBuf {
        let p = self.root.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, data).unwrap();
        p
    }

    pub fn key(&self, rel: &str) -> String {
        format!("{NODE}/{rel}")
    }

    /// The object's bytes, fetched with a real GET through the S3 API.
    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        let store = record_offload::store::Store::new(&self.config(|_| {}));
        match store
            .client()
            .get_object()
            .bucket(BUCKET)
            .key(key)
            .send()
            .await
        {
            Ok(out) => Some(out.body.collect().await.unwrap().into_bytes().to_vec()),
            Err(_) => None,
        }
    }

    pub fn row(&self, rel: impl AsRef<Path>) -> Option<FileRow> {
        if !self.journal_path.exists() {
            return None;
        }
        let conn = journal::open_ro(&self.journal_path).ok()?;
        journal::get_by_path(&conn, rel.as_ref()).unwrap()
    }

    pub fn state(&self, rel: impl AsRef<Path>) -> Option<State> {
        self.row(rel).map(|r| r.state)
    }

    pub fn rows(&self) -> Vec<FileRow> {
        let conn = journal::open_ro(&self.journal_path).unwrap();
        journal::list(&conn, None, None).unwrap()
    }

    /// The rows, or `None` while the journal cannot be read yet (a daemon killed before its
    /// first start finished creating the schema leaves a file at schema 0).
    pub fn try_rows(&self) -> Option<Vec<FileRow>> {
        let conn = journal::open_ro(&self.journal_path).ok()?;
        journal::list(&conn, None, None).ok()
    }

    /// Waits until `rel` reaches `state`; panics with the row after `timeout`.
    pub async fn wait_state(
        &self,
        rel: impl AsRef<Path>,
        state: State,
        timeout: Duration,
    ) -> FileRow {
        let rel = rel.as_ref();
        let start = Instant::now();
        loop {
            if let Some(r) = self.row(rel)
                && r.state == state
            {
                return r;
            }
            if start.elapsed() > timeout {
                panic!(
                    "{} did not reach {state} within {timeout:?}; row: {:?}",
                    rel.display(),
                    self.row(rel)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Waits until `cond` holds; panics with `what` after `timeout`.
pub async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Deterministic pseudo-random bytes (xorshift), so failures are reproducible.
pub fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn md5_hex(data: &[u8]) -> String {
    use md5::{Digest, Md5};
    hex::encode(Md5::digest(data))
}

/// Sets a file's mtime into the past.
pub fn age(path: &Path, secs: u64) {
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(std::time::SystemTime::now() - Duration::from_secs(secs))
        .unwrap();
}
