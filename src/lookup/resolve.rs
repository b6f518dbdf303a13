//! The resolver: look-up input → what a player should fetch. Shared by the HTTP server and
//! `record-offload resolve`.
//!
//! # Decision
//!
//! ```text
//! input ──parse_legacy──> (host, rel) ──host names another [[nodes]] entry──> cross-node
//!                              │
//!                              v
//!        journal row stored (uploaded/deleted) ─────────────> Stored: signed URL
//!        otherwise, local file open (regular, no symlink,
//!          matches include/exclude) ─────────────────────────> Pending: this agent's URL
//!        otherwise read the row again (twice): the file may
//!          have been stored and unlinked in between
//!        otherwise lookup.remote_check: HEAD the templated key ─> Stored, or NotFound
//! ```
//!
//! Why the file's answers never fail across its life: the uploader commits `uploaded` before
//! it unlinks the file, so a look-up that saw a not-yet-stored row and then found no file sees
//! `uploaded` when it reads the row again. A file opened while it is pending stays readable
//! through the open descriptor even if it is unlinked while it is being served.
//!
//! Cross-node: a whole-URL input (or, on the drop-in route, the `Host` header) naming a legacy
//! host of another `[[nodes]]` entry is that node's file: its key is the template rendered with
//! that node's name. If the bucket has it (HEAD, cached like the remote check), the answer is
//! a signed URL; otherwise — not uploaded yet, or the store cannot be asked — the answer sends
//! the client to that node's agent (307), which knows its own pending files.
//!
//! # Cost
//!
//! The hot path (a stored file) is: parse, one indexed `SELECT` with a cached prepared
//! statement inside a read transaction that look-ups share for up to 10 ms ([`LookupReader`]),
//! one signature. It runs inline on the calling thread: in WAL mode readers never wait for the
//! writer, and the point query takes microseconds, far less than a hop to the blocking pool
//! would. The local-file checks are a few `openat`/`fstat` calls confined to the root. Only
//! remote checks do network I/O.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};
use serde::Serialize;

use crate::config::{ListenAddr, Settings};
use crate::journal::{Found, JournalError, LookupReader, State, StoreId};
use crate::lookup::index::{KeyRule, LookupIndex};
use crate::lookup::legacy::{BadPath, parse_legacy};
use crate::lookup::sign::SignError;
use crate::lookup::signer::{Signed, Signer};
use crate::store::{Store, StoreError};
use crate::util::filter::Filter;
use crate::util::fs::{Identity, Root};
use crate::util::keys::KeyTemplate;
use crate::util::net::{normalize_host, strip_port};

/// Bytes kept as they are in the URL paths this agent hands out.
const PATH_SAFE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// Remote-check answers remembered at most (cleared when full).
const MAX_CACHED: usize = 100_000;

/// Why a look-up has no answer.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("bad path: {0}")]
    BadPath(#[from] BadPath),
    #[error("no such recording")]
    NotFound,
    #[error("journal: {0}")]
    Journal(#[from] JournalError),
    #[error("object store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot sign: {0}")]
    Sign(#[from] SignError),
}

impl LookupError {
    /// The `answer` label of `record_offload_lookups_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            LookupError::BadPath(_) => "bad_path",
            LookupError::NotFound => "not_found",
            _ => "error",
        }
    }

    /// The HTTP status of this error on `/v1/resolve` (the drop-in route answers an overlong
    /// path with 414 instead).
    pub fn status(&self) -> u16 {
        match self {
            LookupError::BadPath(_) => 400,
            LookupError::NotFound => 404,
            LookupError::Journal(_) | LookupError::Store(_) => 503,
            LookupError::Sign(_) => 500,
        }
    }

    /// The JSON body: `{"error": code, "message": text, ...}`.
    pub fn to_json(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Body<'a> {
            error: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            reason: Option<&'a str>,
            message: String,
        }
        let (error, reason) = match self {
            LookupError::BadPath(b) => ("bad_path", Some(b.reason())),
            LookupError::NotFound => ("not_found", None),
            LookupError::Journal(_) => ("journal_unavailable", None),
            LookupError::Store(_) => ("store_unavailable", None),
            LookupError::Sign(_) => ("sign_failed", None),
        };
        let body = Body {
            error,
            reason,
            message: self.to_string(),
        };
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

/// The object is in the bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub signed: Signed,
    pub key: String,
    pub size: u64,
    /// Hex MD5 of the whole object (from the journal; from a plain ETag for remote checks).
    pub md5: Option<String>,
    /// The file's mtime (Unix seconds) when the answer came from a journal row (HEAD answers
    /// read the row for it); `None` from the index or a remote check.
    pub modified_unix: Option<i64>,
    /// The store that holds it (the URL is signed for it).
    pub store: StoreId,
}

/// The file is only on this host's disk, opened and ready to be served.
#[derive(Debug)]
pub struct Pending {
    /// This agent's drop-in URL for it.
    pub url: String,
    pub rel: PathBuf,
    /// The journal's row state, `None` when the journal does not know the file yet.
    pub stage: Option<State>,
    /// The key it will have (when the journal knows it).
    pub key: Option<String>,
    /// Bytes already sent while uploading.
    pub bytes_sent: Option<u64>,
    pub file: File,
    pub identity: Identity,
}

/// Another node's file that is not in the bucket (yet): ask that node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Elsewhere {
    pub node: String,
    /// That node's look-up server, without a trailing `/`.
    pub lookup_url: String,
}

#[derive(Debug)]
pub enum Answer {
    Stored(Stored),
    Pending(Pending),
    Elsewhere(Elsewhere),
}

impl Answer {
    /// The `answer` label of `record_offload_lookups_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Answer::Stored(_) => "uploaded",
            Answer::Pending(_) => "pending",
            Answer::Elsewhere(_) => "elsewhere",
        }
    }

    /// The JSON body of the answer. `elsewhere_url` is the URL a 307 sends the client to.
    pub fn to_json(&self, elsewhere_url: Option<&str>) -> Vec<u8> {
        let out = match self {
            // The hot path, written directly (the same text serde_json gives for StoredJson).
            Answer::Stored(s) => return stored_json(s),
            Answer::Pending(p) => serde_json::to_vec(&PendingJson {
                state: "pending",
                url: &p.url,
                stage: p.stage.map(State::as_str).unwrap_or("local"),
                key: p.key.as_deref(),
                size: p.identity.size,
                bytes_sent: p.bytes_sent,
            }),
            Answer::Elsewhere(e) => serde_json::to_vec(&ElsewhereJson {
                state: "elsewhere",
                node: &e.node,
                url: elsewhere_url.unwrap_or(&e.lookup_url),
            }),
        };
        out.unwrap_or_default()
    }
}

/// `{"state":"uploaded","url":…,"expires_at":…,"key":…,"size":N,"md5":…}`.
fn stored_json(s: &Stored) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.signed.url.len() + s.key.len() + 160);
    out.extend_from_slice(br#"{"state":"uploaded","url":"#);
    json_str(&mut out, &s.signed.url);
    out.extend_from_slice(br#","expires_at":""#);
    out.extend_from_slice(&crate::lookup::sign::rfc3339(s.signed.expires_unix));
    out.extend_from_slice(br#"","key":"#);
    json_str(&mut out, &s.key);
    out.extend_from_slice(br#","size":"#);
    out.extend_from_slice(itoa::Buffer::new().format(s.size).as_bytes());
    out.extend_from_slice(br#","md5":"#);
    match &s.md5 {
        Some(m) => json_str(&mut out, m),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(br#","store":""#);
    out.extend_from_slice(s.store.as_str().as_bytes());
    out.extend_from_slice(b"\"}");
    out
}

/// Appends `s` as a JSON string. URLs and most keys need no escape and are copied whole; the
/// others go through serde_json.
fn json_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        // Writing into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    } else {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

/// The Stored answer as serde_json would write it (the reference for [`stored_json`]).
#[cfg(test)]
#[derive(Serialize)]
struct StoredJson<'a> {
    state: &'static str,
    url: &'a str,
    expires_at: String,
    key: &'a str,
    size: u64,
    md5: Option<&'a str>,
    store: &'static str,
}

#[derive(Serialize)]
struct PendingJson<'a> {
    state: &'static str,
    url: &'a str,
    stage: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_sent: Option<u64>,
}

#[derive(Serialize)]
struct ElsewhereJson<'a> {
    state: &'static str,
    node: &'a str,
    url: &'a str,
}

/// A remote check's result: the object's size and plain MD5, or absent.
type Remote = Option<(u64, Option<String>)>;

struct RemoteCache {
    ttl: Duration,
    entries: Mutex<HashMap<String, (Instant, Remote)>>,
}

impl RemoteCache {
    fn get(&self, key: &str) -> Option<Remote> {
        let entries = self.entries.lock().ok()?;
        let (at, remote) = entries.get(key)?;
        (at.elapsed() < self.ttl).then(|| remote.clone())
    }

    fn put(&self, key: String, remote: Remote) {
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= MAX_CACHED {
                let ttl = self.ttl;
                entries.retain(|_, (at, _)| at.elapsed() < ttl);
                if entries.len() >= MAX_CACHED {
                    entries.clear();
                }
            }
            entries.insert(key, (Instant::now(), remote));
        }
    }
}

/// Another recording host.
#[derive(Debug, Clone)]
struct Node {
    name: String,
    lookup_url: String,
}

/// Answers look-ups; cheap to share (`Arc`).
pub struct Resolver {
    legacy_prefix: String,
    /// `legacy_prefix` without a trailing `/`, `""` for the root.
    prefix_path: String,
    node: String,
    template: KeyTemplate,
    filter: Filter,
    root: Root,
    journal: LookupReader<LookupIndex>,
    signer: Signer,
    /// Signs for objects on `[storage.standby]`, with its own signing settings.
    standby_signer: Option<Signer>,
    /// Base of this agent's URLs (`http://10.1.2.3:8090`), no trailing `/`.
    public_url: String,
    nodes: Vec<Node>,
    /// Normalised legacy host → index into `nodes` (other nodes only).
    hosts: HashMap<String, usize>,
    remote_check: bool,
    store: Option<Store>,
    cache: RemoteCache,
}

/// Why a resolver could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    #[error("{0}")]
    Journal(#[from] JournalError),
    #[error("watch.root {path}: {source}")]
    Root {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("lookup signing: {0}")]
    Sign(#[from] SignError),
}

/// `lookup.public_url`, or `http://` + the first TCP listen address.
pub fn default_public_url(settings: &Settings, bound: &[ListenAddr]) -> String {
    if let Some(u) = &settings.config.lookup.public_url {
        return u.trim_end_matches('/').to_string();
    }
    let first_tcp = bound.iter().find_map(|l| match l {
        ListenAddr::Tcp(a) => Some(*a),
        ListenAddr::Unix(_) => None,
    });
    match first_tcp {
        Some(a) => format!("http://{a}"),
        None => "http://localhost".to_string(),
    }
}

impl Resolver {
    /// Builds a resolver. `public_url` is the base of pending answers' URLs (see
    /// [`default_public_url`]); `store` is needed for remote and cross-node checks.
    pub fn new(
        settings: &Settings,
        public_url: String,
        store: Option<Store>,
    ) -> Result<Resolver, ResolverError> {
        let cfg = &settings.config;
        let root = Root::open(&cfg.watch.root).map_err(|source| ResolverError::Root {
            path: cfg.watch.root.clone(),
            source,
        })?;
        let journal = LookupReader::new(&cfg.journal.path)?;
        let signer = Signer::new(settings)?;
        let standby_signer = match settings.standby.as_deref() {
            Some(sb) => Some(Signer::new(sb)?),
            None => None,
        };
        let mut nodes = Vec::new();
        let mut hosts = HashMap::new();
        for n in &settings.other_nodes {
            for h in &n.legacy_hosts {
                hosts.insert(h.clone(), nodes.len());
            }
            nodes.push(Node {
                name: n.name.clone(),
                lookup_url: n.lookup_url.clone(),
            });
        }
        let prefix_path = cfg
            .lookup
            .legacy_prefix
            .split('/')
            .filter(|s| !s.is_empty() && *s != ".")
            .fold(String::new(), |acc, s| acc + "/" + s);
        Ok(Resolver {
            legacy_prefix: cfg.lookup.legacy_prefix.clone(),
            prefix_path,
            node: cfg.node.name.clone(),
            template: settings.template.clone(),
            filter: settings.filter.clone(),
            root,
            journal,
            signer,
            standby_signer,
            public_url,
            nodes,
            hosts,
            remote_check: cfg.lookup.remote_check,
            store,
            cache: RemoteCache {
                ttl: Duration::from_secs_f64(cfg.lookup.remote_check_cache_secs),
                entries: Mutex::new(HashMap::new()),
            },
        })
    }

    /// The signer for objects on `store`.
    fn signer_of(&self, store: StoreId) -> &Signer {
        match (store, &self.standby_signer) {
            (StoreId::Standby, Some(s)) => s,
            _ => &self.signer,
        }
    }

    /// `legacy_prefix` as a URL path without a trailing `/` (`""` when it is the root).
    pub fn prefix_path(&self) -> &str {
        &self.prefix_path
    }

    pub fn legacy_prefix(&self) -> &str {
        &self.legacy_prefix
    }

    /// This agent's drop-in URL for `rel`.
    pub fn local_url(&self, rel: &Path) -> String {
        format!("{}{}", self.public_url, self.local_path(rel))
    }

    /// The URL path of this agent's drop-in route for `rel` (`/record/a/b.mp4`).
    pub fn local_path(&self, rel: &Path) -> String {
        let encoded = percent_encoding::percent_encode(rel.as_os_str().as_bytes(), PATH_SAFE);
        format!("{}/{encoded}", self.prefix_path)
    }

    /// Resolves `input` (docs/contract.md, "How look-up input is read"). `host_hint` is the host the
    /// request was addressed to, used when the input itself carries none (the drop-in route).
    pub async fn resolve(
        &self,
        input: &[u8],
        host_hint: Option<&str>,
    ) -> Result<Answer, LookupError> {
        self.resolve_with(input, host_hint, false).await
    }

    /// [`Resolver::resolve`], reading the journal row itself rather than the index or the
    /// shared snapshot when `fresh` (HEAD answers need the row's mtime).
    pub async fn resolve_with(
        &self,
        input: &[u8],
        host_hint: Option<&str>,
        fresh: bool,
    ) -> Result<Answer, LookupError> {
        let legacy = parse_legacy(input, &self.legacy_prefix)?;
        let host = legacy.host.as_deref().or(host_hint);
        if let Some(node) = host.and_then(|h| self.node_for_host(h)) {
            return self.resolve_elsewhere(node, &legacy.rel).await;
        }
        let rel = legacy.rel;
        for attempt in 0..3 {
            // The first read may come from the shared snapshot; the others are fresh.
            if let Some(answer) = self.resolve_local(&rel, fresh || attempt > 0)? {
                return Ok(answer);
            }
        }
        if self.remote_check {
            let key = self
                .template
                .render(&self.node, &rel)
                .map_err(|_| LookupError::NotFound)?;
            if let Some((size, md5)) = self.remote(&key).await? {
                let signed = self.signer.sign(&key, now_unix())?;
                return Ok(Answer::Stored(Stored {
                    signed,
                    key,
                    size,
                    md5,
                    modified_unix: None,
                    store: StoreId::Primary,
                }));
            }
        }
        Err(LookupError::NotFound)
    }

    /// Answers stored files from memory (see [`crate::lookup::index`]), at most `max_rows`
    /// of them.
    pub fn enable_index(&self, max_rows: usize) {
        let rule = KeyRule {
            template: self.template.clone(),
            node: self.node.clone(),
        };
        let mut index = LookupIndex::new(self.journal.path(), rule, max_rows);
        index.start();
        self.journal.set_cache(index);
    }

    /// Entries in the look-up index, `None` while it is off or being built.
    pub fn index_len(&self) -> Option<usize> {
        self.journal
            .with_cache(|i| i.is_live().then(|| i.len()))
            .flatten()
    }

    /// The look-up server's timer: ends the journal snapshot look-ups share once it is too
    /// old to use, and puts a freshly built index to use (see [`LookupReader::maintain`]).
    pub fn maintain(&self) {
        self.journal.maintain();
    }

    /// Resolves from the journal and the local disk only. `None`: nothing found this time.
    fn resolve_local(&self, rel: &Path, fresh: bool) -> Result<Option<Answer>, LookupError> {
        let found = if fresh {
            self.journal.row_fresh(rel)?.map(Found::Row)
        } else {
            self.journal.find(rel)?
        };
        let row = match found {
            Some(Found::Cached(entry)) => {
                // Indexed only when the row's key is exactly this rendering.
                let key = self
                    .template
                    .render(&self.node, rel)
                    .map_err(|_| LookupError::NotFound)?;
                let signed = self.signer.sign(&key, now_unix())?;
                return Ok(Some(Answer::Stored(Stored {
                    signed,
                    key,
                    size: entry.size,
                    md5: Some(hex_md5(&entry.md5)),
                    modified_unix: None,
                    store: StoreId::Primary,
                })));
            }
            Some(Found::Row(row)) if row.state.is_stored() => {
                let signed = self.signer_of(row.store).sign(&row.key, now_unix())?;
                return Ok(Some(Answer::Stored(Stored {
                    signed,
                    key: row.key,
                    size: row.size,
                    md5: row.md5,
                    modified_unix: row.mtime_ns.map(|ns| ns.div_euclid(1_000_000_000)),
                    store: row.store,
                })));
            }
            Some(Found::Row(row)) => Some(row),
            None => None,
        };
        if !self.filter.file_matches(rel) {
            return Ok(None);
        }
        let Ok((file, identity)) = self.root.open_file(rel) else {
            return Ok(None);
        };
        let (stage, key, bytes_sent) = match row {
            Some(r) => {
                let sent = (r.state == State::Uploading).then_some(r.bytes_sent);
                (Some(r.state), Some(r.key), sent)
            }
            None => (None, None, None),
        };
        Ok(Some(Answer::Pending(Pending {
            url: self.local_url(rel),
            rel: rel.to_path_buf(),
            stage,
            key,
            bytes_sent,
            file,
            identity,
        })))
    }

    fn node_for_host(&self, host: &str) -> Option<&Node> {
        if self.hosts.is_empty() {
            return None;
        }
        let host = strip_port(host);
        let norm = normalize_host(host).ok()?;
        self.hosts.get(&norm).and_then(|&i| self.nodes.get(i))
    }

    async fn resolve_elsewhere(&self, node: &Node, rel: &Path) -> Result<Answer, LookupError> {
        let elsewhere = || {
            Answer::Elsewhere(Elsewhere {
                node: node.name.clone(),
                lookup_url: node.lookup_url.clone(),
            })
        };
        let Ok(key) = self.template.render(&node.name, rel) else {
            return Ok(elsewhere());
        };
        match self.remote(&key).await {
            Ok(Some((size, md5))) => {
                let signed = self.signer.sign(&key, now_unix())?;
                Ok(Answer::Stored(Stored {
                    signed,
                    key,
                    size,
                    md5,
                    modified_unix: None,
                    store: StoreId::Primary,
                }))
            }
            // Not stored yet, or the store cannot say: that node knows.
            Ok(None) | Err(_) => Ok(elsewhere()),
        }
    }

    /// HEAD of `key`, through the cache. Errors are not cached.
    async fn remote(&self, key: &str) -> Result<Remote, LookupError> {
        if let Some(hit) = self.cache.get(key) {
            return Ok(hit);
        }
        let Some(store) = &self.store else {
            return Ok(None);
        };
        let remote = store.head(key).await?.map(|info| {
            let md5 = info
                .etag
                .map(|e| crate::store::etag_hex(&e))
                .filter(|e| e.len() == 32 && e.bytes().all(|b| b.is_ascii_hexdigit()));
            (info.size, md5)
        });
        self.cache.put(key.to_string(), remote.clone());
        Ok(remote)
    }
}

/// Lower-case hex of an MD5 (without `hex::encode`'s per-character iterator).
fn hex_md5(md5: &[u8; 16]) -> String {
    let mut out = [0u8; 32];
    // The output is exactly twice the input: this cannot fail.
    let _ = hex::encode_to_slice(md5, &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Shared handle.
pub type SharedResolver = Arc<Resolver>;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::config::{self, Config, NodeEntry};
    use crate::journal::{self, SNAPSHOT_SECS};
    use crate::util::fs::Identity;
    use rusqlite::Connection;
    use std::ffi::OsStr;

    struct T {
        _dir: tempfile::TempDir,
        root: PathBuf,
        conn: Connection,
        resolver: Resolver,
    }

    fn setup(edit: impl FnOnce(&mut Config)) -> T {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("record");
        std::fs::create_dir_all(&root).unwrap();
        let mut c = Config::default();
        c.node.name = "n1".into();
        c.watch.root = root.clone();
        c.journal.path = dir.path().join("j.db");
        c.storage.endpoint = "http://127.0.0.1:9".into();
        c.storage.path_style = true;
        c.storage.bucket = "rec".into();
        c.storage.access_key_id = "ak".into();
        c.storage.access_key_secret = "sk".into();
        edit(&mut c);
        let s = config::validate(c).unwrap();
        let conn = journal::open_rw(&s.config.journal.path).unwrap();
        let resolver = Resolver::new(&s, "http://10.0.0.1:8090".into(), None).unwrap();
        T {
            _dir: dir,
            root,
            conn,
            resolver,
        }
    }

    fn add(t: &T, rel: &[u8], state: &str, size: i64, md5: Option<&str>) {
        let rel = Path::new(OsStr::from_bytes(rel));
        let key = format!("n1/{}", rel.display());
        let id = Identity {
            dev: 1,
            ino: 1,
            size: size as u64,
            mtime_ns: 1,
        };
        journal::intake(&t.conn, rel, &key, &id, true).unwrap();
        t.conn
            .execute(
                "UPDATE files SET state = ?1, md5 = ?2, bytes_sent = 7 WHERE path = ?3",
                rusqlite::params![state, md5, rel.as_os_str().as_bytes()],
            )
            .unwrap();
    }

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// The shared snapshot: reads within it may lag a commit by at most `SNAPSHOT_SECS`, fresh
    /// reads never do, and once it is ended the writer can checkpoint the whole WAL.
    #[test]
    fn the_shared_snapshot_is_short_lived_and_released() {
        let t = setup(|_| {});
        add(&t, b"a.mp4", "queued", 10, None);
        let rel = Path::new("a.mp4");
        let j = &t.resolver.journal;
        let state = || match j.find(rel).unwrap() {
            Some(Found::Row(row)) => row.state,
            other => panic!("{other:?}"),
        };
        assert_eq!(state(), State::Queued);
        t.conn
            .execute(
                "UPDATE files SET state = 'uploaded' WHERE path = ?1",
                [b"a.mp4"],
            )
            .unwrap();
        assert_eq!(j.row_fresh(rel).unwrap().unwrap().state, State::Uploaded);
        // While the snapshot is open the writer cannot checkpoint past it.
        let (log, done): (i64, i64) = t
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert!(
            done < log,
            "a checkpoint went past an open snapshot ({done} of {log})"
        );
        std::thread::sleep(Duration::from_secs_f64(SNAPSHOT_SECS * 2.0));
        // An old snapshot is not used: the next read sees the commit.
        assert_eq!(state(), State::Uploaded);
        std::thread::sleep(Duration::from_secs_f64(SNAPSHOT_SECS * 2.0));
        // An idle one is ended by the timer's call; then the WAL can be checkpointed and reset.
        j.end_stale_snapshot();
        let (busy, log, done): (i64, i64, i64) = t
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!((busy, log, done), (0, 0, 0));
    }

    #[test]
    fn stored_rows_are_signed_whatever_the_disk_says() {
        let t = setup(|_| {});
        add(
            &t,
            b"a/b c.mp4",
            "deleted",
            10,
            Some("00112233445566778899aabbccddeeff"),
        );
        for input in [
            &b"/record/a/b%20c.mp4"[..],
            b"a/b c.mp4",
            b"http://10.0.0.1/record/a/b%20c.mp4?x",
        ] {
            let Answer::Stored(s) = block_on(t.resolver.resolve(input, None)).unwrap() else {
                panic!("not stored");
            };
            assert_eq!(s.key, "n1/a/b c.mp4");
            assert_eq!(s.size, 10);
            assert!(
                s.signed
                    .url
                    .starts_with("http://127.0.0.1:9/rec/n1/a/b%20c.mp4?X-Amz-")
            );
            let json: serde_json::Value =
                serde_json::from_slice(&Answer::Stored(s).to_json(None)).unwrap();
            assert_eq!(json["state"], "uploaded");
            assert_eq!(json["md5"], "00112233445566778899aabbccddeeff");
            assert!(json["expires_at"].as_str().unwrap().ends_with('Z'));
        }
    }

    #[test]
    fn local_files_are_pending_with_this_agents_url() {
        let t = setup(|_| {});
        std::fs::create_dir_all(t.root.join("d")).unwrap();
        std::fs::write(t.root.join("d/x+y %.mp4"), b"abc").unwrap();
        let Answer::Pending(p) =
            block_on(t.resolver.resolve(b"/record/d/x+y%20%25.mp4", None)).unwrap()
        else {
            panic!("not pending");
        };
        assert_eq!(p.url, "http://10.0.0.1:8090/record/d/x%2By%20%25.mp4");
        assert_eq!(p.stage, None);
        assert_eq!(p.identity.size, 3);
        // Known to the journal and uploading: the answer says how far it got (once the
        // look-ups' shared snapshot is newer than the commit: within SNAPSHOT_SECS).
        add(&t, b"d/x+y %.mp4", "uploading", 3, None);
        std::thread::sleep(Duration::from_secs_f64(SNAPSHOT_SECS * 2.0));
        let Answer::Pending(p) = block_on(t.resolver.resolve(b"d/x+y%20%25.mp4", None)).unwrap()
        else {
            panic!("not pending");
        };
        let json: serde_json::Value =
            serde_json::from_slice(&Answer::Pending(p).to_json(None)).unwrap();
        assert_eq!(json["state"], "pending");
        assert_eq!(json["stage"], "uploading");
        assert_eq!(json["bytes_sent"], 7);
        assert_eq!(json["key"], "n1/d/x+y %.mp4");
    }

    #[test]
    fn missing_excluded_and_symlinked_files_are_not_found() {
        let t = setup(|_| {});
        let outside = t._dir.path().join("secret.mp4");
        std::fs::write(&outside, b"secret").unwrap();
        std::os::unix::fs::symlink(&outside, t.root.join("link.mp4")).unwrap();
        std::fs::write(t.root.join("partial.tmp"), b"x").unwrap();
        std::fs::write(t.root.join(".hidden.mp4"), b"x").unwrap();
        add(&t, b"gone.mp4", "vanished", 1, None);
        for input in [
            "link.mp4",
            "partial.tmp",
            ".hidden.mp4",
            "nothing.mp4",
            "gone.mp4",
        ] {
            assert!(
                matches!(
                    block_on(t.resolver.resolve(input.as_bytes(), None)),
                    Err(LookupError::NotFound)
                ),
                "{input}"
            );
        }
        let e = block_on(t.resolver.resolve(b"/record/../secret.mp4", None)).unwrap_err();
        assert_eq!(e.status(), 400);
        let json: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(json["error"], "bad_path");
        assert_eq!(json["reason"], "dot_dot");
        let long = format!("/record/{}", "a/".repeat(3000));
        let e = block_on(t.resolver.resolve(long.as_bytes(), None)).unwrap_err();
        assert!(matches!(e, LookupError::BadPath(ref b) if b.is_too_long()));
    }

    #[test]
    fn other_nodes_hosts_go_elsewhere() {
        let t = setup(|c| {
            c.nodes = vec![
                NodeEntry {
                    name: "n1".into(),
                    legacy_hosts: vec!["10.0.0.1".into()],
                    lookup_url: "http://10.0.0.1:8090".into(),
                },
                NodeEntry {
                    name: "n2".into(),
                    legacy_hosts: vec![
                        "10.0.0.2".into(),
                        "REC-02.example.com".into(),
                        "::2".into(),
                    ],
                    lookup_url: "http://10.0.0.2:8090/".into(),
                },
            ];
        });
        for input in [
            "http://10.0.0.2/record/a.mp4",
            "http://rec-02.EXAMPLE.com:8080/record/a.mp4",
            "http://[0::2]/record/a.mp4",
        ] {
            let a = block_on(t.resolver.resolve(input.as_bytes(), None)).unwrap();
            let Answer::Elsewhere(e) = a else {
                panic!("{input}: {a:?}");
            };
            assert_eq!(e.node, "n2");
            assert_eq!(e.lookup_url, "http://10.0.0.2:8090");
        }
        // The Host header counts for bare paths; this node's own hosts stay local.
        assert!(matches!(
            block_on(t.resolver.resolve(b"/record/a.mp4", Some("10.0.0.2:80"))),
            Ok(Answer::Elsewhere(_))
        ));
        assert!(matches!(
            block_on(t.resolver.resolve(b"http://10.0.0.1/record/a.mp4", None)),
            Err(LookupError::NotFound)
        ));
    }

    /// Waits until the look-up index is in use with `n` entries (look-ups adopt a finished
    /// build when their snapshot begins).
    fn wait_index(t: &T, n: usize) {
        let start = Instant::now();
        while t.resolver.index_len() != Some(n) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "index: {:?}, expected {n}",
                t.resolver.index_len()
            );
            t.resolver.journal.find(Path::new("-")).unwrap();
            std::thread::sleep(Duration::from_secs_f64(SNAPSHOT_SECS * 2.0));
        }
    }

    /// The stored answer for `rel`: (key, md5).
    fn stored(t: &T, rel: &str) -> Option<(String, Option<String>)> {
        match block_on(t.resolver.resolve(rel.as_bytes(), None)) {
            Ok(Answer::Stored(s)) => Some((s.key, s.md5)),
            _ => None,
        }
    }

    /// Each commit is seen by the next snapshot (at most `SNAPSHOT_SECS` later).
    fn next_snapshot() {
        std::thread::sleep(Duration::from_secs_f64(SNAPSHOT_SECS * 2.0));
    }

    const MD5_A: &str = "00112233445566778899aabbccddeeff";
    const MD5_B: &str = "ffeeddccbbaa99887766554433221100";

    /// The index answers stored files with the journal's key, size and MD5, learns files
    /// stored later, and never answers for a file whose row left the stored state (a new
    /// recording at the same path), whoever changed the row.
    #[test]
    fn indexed_answers_follow_the_journal() {
        let t = setup(|_| {});
        add(&t, b"a.mp4", "deleted", 10, Some(MD5_A));
        // Stored under another key (an older template): answered from the journal.
        add(&t, b"old.mp4", "deleted", 10, Some(MD5_A));
        t.conn
            .execute(
                "UPDATE files SET key = 'elsewhere/old.mp4' WHERE path = X'6F6C642E6D7034'",
                [],
            )
            .unwrap();
        add(&t, b"c.mp4", "queued", 3, None);
        std::fs::write(t.root.join("c.mp4"), b"abc").unwrap();
        t.resolver.enable_index(100);
        wait_index(&t, 1);
        assert_eq!(
            stored(&t, "a.mp4"),
            Some(("n1/a.mp4".into(), Some(MD5_A.into())))
        );
        assert_eq!(
            stored(&t, "old.mp4"),
            Some(("elsewhere/old.mp4".into(), Some(MD5_A.into())))
        );
        assert_eq!(t.resolver.index_len(), Some(1));
        assert!(matches!(
            block_on(t.resolver.resolve(b"c.mp4", None)),
            Ok(Answer::Pending(_))
        ));

        // A new recording at a stored path: the row is queued again, the file is local.
        std::fs::write(t.root.join("a.mp4"), b"new").unwrap();
        let id = Identity {
            dev: 1,
            ino: 2,
            size: 3,
            mtime_ns: 2,
        };
        journal::intake(&t.conn, Path::new("a.mp4"), "n1/a.mp4", &id, true).unwrap();
        next_snapshot();
        assert!(matches!(
            block_on(t.resolver.resolve(b"a.mp4", None)),
            Ok(Answer::Pending(_))
        ));
        assert_eq!(t.resolver.index_len(), Some(0));
        // Stored again with other bytes: learnt from the journal, then answered from memory.
        t.conn
            .execute(
                "UPDATE files SET state = 'uploaded', md5 = ?1, size = 3 WHERE path = X'612E6D7034'",
                [MD5_B],
            )
            .unwrap();
        next_snapshot();
        for _ in 0..2 {
            assert_eq!(
                stored(&t, "a.mp4"),
                Some(("n1/a.mp4".into(), Some(MD5_B.into())))
            );
        }
        t.conn
            .execute(
                "UPDATE files SET state = 'deleted' WHERE path = X'632E6D7034'",
                [],
            )
            .unwrap();
        t.conn
            .execute(
                "UPDATE files SET md5 = ?1 WHERE path = X'632E6D7034'",
                [MD5_A],
            )
            .unwrap();
        next_snapshot();
        assert_eq!(
            stored(&t, "c.mp4"),
            Some(("n1/c.mp4".into(), Some(MD5_A.into())))
        );
        assert_eq!(t.resolver.index_len(), Some(2));
        // A row removed by hand is forgotten too.
        t.conn
            .execute("DELETE FROM files WHERE path = X'632E6D7034'", [])
            .unwrap();
        next_snapshot();
        assert_eq!(stored(&t, "c.mp4"), None);
        assert_eq!(t.resolver.index_len(), Some(1));
    }

    /// When more rows left the stored state than the journal's log keeps, the index cannot
    /// know which: it is dropped (look-ups read the journal) and built again.
    #[test]
    fn an_index_that_fell_behind_is_built_again() {
        let t = setup(|_| {});
        add(&t, b"a.mp4", "deleted", 10, Some(MD5_A));
        add(&t, b"z.mp4", "deleted", 10, Some(MD5_A));
        t.resolver.enable_index(100);
        wait_index(&t, 2);
        // a.mp4 leaves the stored state first, then z.mp4 flips often enough to push that
        // entry out of the log.
        t.conn
            .execute(
                "UPDATE files SET state = 'queued' WHERE path = X'612E6D7034'",
                [],
            )
            .unwrap();
        t.conn
            .execute_batch(&format!(
                "BEGIN; {} COMMIT;",
                "UPDATE files SET state = 'queued' WHERE path = X'7A2E6D7034';
                 UPDATE files SET state = 'deleted' WHERE path = X'7A2E6D7034';"
                    .repeat(crate::journal::UNSTORED_LOG_KEPT as usize)
            ))
            .unwrap();
        let kept: i64 = t
            .conn
            .query_row("SELECT COUNT(*) FROM unstored", [], |r| r.get(0))
            .unwrap();
        assert_eq!(kept, crate::journal::UNSTORED_LOG_KEPT);
        next_snapshot();
        assert_eq!(stored(&t, "a.mp4"), None);
        assert_eq!(
            stored(&t, "z.mp4"),
            Some(("n1/z.mp4".into(), Some(MD5_A.into())))
        );
        wait_index(&t, 1);
        assert_eq!(stored(&t, "a.mp4"), None);
    }

    /// At its cap the index holds no more; the rest is answered from the journal.
    #[test]
    fn the_index_keeps_to_its_cap() {
        let t = setup(|_| {});
        for name in ["a.mp4", "b.mp4", "c.mp4"] {
            add(&t, name.as_bytes(), "deleted", 10, Some(MD5_A));
        }
        t.resolver.enable_index(2);
        wait_index(&t, 2);
        for name in ["a.mp4", "b.mp4", "c.mp4"] {
            assert_eq!(
                stored(&t, name),
                Some((format!("n1/{name}"), Some(MD5_A.into())))
            );
        }
        assert_eq!(t.resolver.index_len(), Some(2));
    }

    /// The stored answer's JSON is exactly what serde_json writes, whatever the key holds.
    #[test]
    fn stored_json_matches_serde() {
        for key in [
            "n1/a.mp4",
            "n1/\"quoted\" \\ back",
            "n1/ctl\u{1}\u{1f}\n\t",
            "n1/中文 #+%.mp4",
            "",
        ] {
            for md5 in [None, Some(MD5_A.to_string())] {
                let s = Stored {
                    signed: Signed {
                        url: format!("https://b.example.com/{key}?X=1&Y=\"2\""),
                        expires_unix: 1_700_003_600,
                    },
                    key: key.to_string(),
                    size: 1 << 40,
                    md5,
                    modified_unix: None,
                    store: StoreId::Primary,
                };
                let reference = serde_json::to_vec(&StoredJson {
                    state: "uploaded",
                    url: &s.signed.url,
                    expires_at: s.signed.expires_at(),
                    key: &s.key,
                    size: s.size,
                    md5: s.md5.as_deref(),
                    store: s.store.as_str(),
                })
                .unwrap();
                assert_eq!(
                    String::from_utf8(stored_json(&s)).unwrap(),
                    String::from_utf8(reference).unwrap()
                );
            }
        }
        assert_eq!(hex_md5(&[0xab; 16]), "ab".repeat(16));
    }
}
