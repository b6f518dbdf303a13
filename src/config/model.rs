//! The configuration as TOML spells it, with the defaults of every key. Validation
//! (`super::validate`) checks it; nothing else reads these strings.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeConfig,
    pub watch: WatchConfig,
    pub journal: JournalConfig,
    pub storage: StorageConfig,
    pub upload: UploadConfig,
    pub lookup: LookupConfig,
    pub log: LogConfig,
    pub health: HealthConfig,
    /// The other recording hosts (`[[nodes]]`), for look-ups that name them.
    pub nodes: Vec<NodeEntry>,
    /// Receivers of file events (`[[notify]]`); none by default.
    pub notify: Vec<NotifyConfig>,
    /// The notification outbox's bounds and delivery timing (`[notify_outbox]`).
    pub notify_outbox: NotifyOutboxConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Used in object keys (`{node}`); defaults to the host name.
    pub name: String,
}

impl Default for NodeConfig {
    fn default() -> Self {
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        // A host name is normally `a-z0-9-.`; keep only its first label.
        let name = host.split('.').next().unwrap_or_default().to_string();
        NodeConfig {
            name: if name.is_empty() {
                "node".to_string()
            } else {
                name
            },
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchConfig {
    pub root: PathBuf,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    /// Seconds a file must stay closed and unchanged before it is uploaded (fractions allowed).
    pub settle_secs: f64,
    pub rescan_interval_secs: f64,
    pub prune_after_secs: f64,
    /// Warn (log, `/healthz` degraded, `STATUS=`, `status`) when the root's file system is
    /// forecast full within this many seconds at the recent net fill rate (0: never).
    pub disk_warn_secs: f64,
    /// The window the disk forecast's net fill rate is measured over; no forecast until the
    /// daemon has watched a third of it.
    pub disk_window_secs: f64,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            root: PathBuf::from("/record"),
            include: vec!["**/*".to_string()],
            exclude: vec![
                "**/.*".to_string(),
                "**/*.tmp".to_string(),
                "**/*.part".to_string(),
            ],
            settle_secs: 10.0,
            rescan_interval_secs: 300.0,
            prune_after_secs: 3600.0,
            disk_warn_secs: 21600.0,
            disk_window_secs: 900.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalConfig {
    pub path: PathBuf,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            path: PathBuf::from("/var/lib/record-offload/journal.db"),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub access_key_id: String,
    pub access_key_secret: String,
    pub access_key_secret_file: Option<PathBuf>,
    pub path_style: bool,
    pub key_template: String,
    /// PEM file of extra trusted roots for an HTTPS endpoint (a private CA).
    pub ca_file: Option<PathBuf>,
    /// The endpoint is already the bucket's own host (a custom domain bound to the bucket):
    /// requests go to it as they are, without the bucket in the host or the path.
    pub bucket_endpoint: bool,
    /// `x-amz-storage-class` on every new object (e.g. "STANDARD", "IA").
    pub storage_class: Option<String>,
    /// Server-side encryption: "AES256" or "KMS" (with `sse_kms_key_id`, or the store's default key).
    pub sse: Option<String>,
    pub sse_kms_key_id: Option<String>,
    /// Content-Type by extension (".mp4" or "mp4"), over the built-in table.
    pub content_types: BTreeMap<String, String>,
    /// `Content-Disposition` on every new object (e.g. "inline").
    pub content_disposition: Option<String>,
    /// `Cache-Control` on every new object.
    pub cache_control: Option<String>,
    /// User metadata (`x-amz-meta-NAME`) on every new object.
    pub metadata: BTreeMap<String, String>,
    /// The primary failing every request this long (transient errors only) sends uploads to
    /// `[storage.standby]`.
    pub failover_after_secs: f64,
    /// While failed over, the primary is probed this often.
    pub probe_secs: f64,
    /// `[storage.standby]`: a second store for outages of the primary; absent = none.
    pub standby: Option<StandbyConfig>,
}

/// `[storage.standby]`: the keys of `[storage]` that describe a store (the key template and
/// content types are the primary's), plus what differs for look-ups.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StandbyConfig {
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub access_key_id: String,
    pub access_key_secret: String,
    pub access_key_secret_file: Option<PathBuf>,
    pub path_style: bool,
    pub ca_file: Option<PathBuf>,
    pub bucket_endpoint: bool,
    pub storage_class: Option<String>,
    pub sse: Option<String>,
    pub sse_kms_key_id: Option<String>,
    pub content_disposition: Option<String>,
    pub cache_control: Option<String>,
    pub metadata: BTreeMap<String, String>,
    /// Copy the objects stored on the standby to the primary once it is back.
    pub copy_back: bool,
    /// Look-up signing for objects on the standby, where it differs from `[lookup]`.
    pub presign_style: Option<PresignStyle>,
    pub public_base_url: Option<String>,
    pub cdn_auth_key: Option<String>,
}

impl Default for StandbyConfig {
    fn default() -> Self {
        let st = StorageConfig::default();
        StandbyConfig {
            endpoint: st.endpoint,
            region: st.region,
            bucket: String::new(),
            access_key_id: String::new(),
            access_key_secret: String::new(),
            access_key_secret_file: None,
            path_style: false,
            ca_file: None,
            bucket_endpoint: false,
            storage_class: None,
            sse: None,
            sse_kms_key_id: None,
            content_disposition: None,
            cache_control: None,
            metadata: Default::default(),
            copy_back: false,
            presign_style: None,
            public_base_url: None,
            cdn_auth_key: None,
        }
    }
}

impl StandbyConfig {
    /// The standby as a `[storage]` section: its own store keys, the primary's key template
    /// and content types.
    pub fn as_storage(&self, primary: &StorageConfig) -> StorageConfig {
        StorageConfig {
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            bucket: self.bucket.clone(),
            access_key_id: self.access_key_id.clone(),
            access_key_secret: self.access_key_secret.clone(),
            access_key_secret_file: self.access_key_secret_file.clone(),
            path_style: self.path_style,
            key_template: primary.key_template.clone(),
            ca_file: self.ca_file.clone(),
            bucket_endpoint: self.bucket_endpoint,
            storage_class: self.storage_class.clone(),
            sse: self.sse.clone(),
            sse_kms_key_id: self.sse_kms_key_id.clone(),
            content_types: primary.content_types.clone(),
            content_disposition: self.content_disposition.clone(),
            cache_control: self.cache_control.clone(),
            metadata: self.metadata.clone(),
            failover_after_secs: primary.failover_after_secs,
            probe_secs: primary.probe_secs,
            standby: None,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            endpoint: "https://s3.oss-cn-hangzhou.aliyuncs.com".to_string(),
            region: "cn-hangzhou".to_string(),
            bucket: String::new(),
            access_key_id: String::new(),
            access_key_secret: String::new(),
            access_key_secret_file: None,
            path_style: false,
            key_template: "{node}/{path}".to_string(),
            ca_file: None,
            bucket_endpoint: false,
            storage_class: None,
            sse: None,
            sse_kms_key_id: None,
            content_types: Default::default(),
            content_disposition: None,
            cache_control: None,
            metadata: Default::default(),
            failover_after_secs: 300.0,
            probe_secs: 30.0,
            standby: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UploadConfig {
    pub part_size_mib: u64,
    /// Requests that carry data (parts, small objects) in flight at once, across all files.
    pub concurrency: usize,
    pub delete_after_upload: bool,
    /// First retry delay after a transient error; doubles per attempt, with jitter.
    pub retry_initial_secs: f64,
    /// Cap of the retry delay.
    pub retry_max_secs: f64,
    /// Rows in `failed` (permanent errors) are tried again this long after they failed, so a
    /// fixed credential or a created bucket does not need an operator; `retry` does it at once.
    pub failed_retry_secs: f64,
    /// Timeout of requests without a body (HEAD, create, complete, list) and of the wait for an
    /// answer after a body was sent.
    pub request_timeout_secs: f64,
    /// A body upload is cut if it moves slower than this (bytes/s) for `request_timeout_secs`.
    pub min_bytes_per_sec: u64,
    /// How long a shutdown waits for requests in flight before abandoning them (they resume).
    pub drain_secs: f64,
    /// Limit of all uploads together, bytes per second; 0 = none.
    pub max_bytes_per_sec: u64,
    /// Local-time windows `HH:MM-HH:MM` in which uploads may start; empty = any time.
    pub windows: Vec<String>,
}

impl Default for UploadConfig {
    fn default() -> Self {
        UploadConfig {
            part_size_mib: 16,
            concurrency: 4,
            delete_after_upload: true,
            retry_initial_secs: 1.0,
            retry_max_secs: 300.0,
            failed_retry_secs: 3600.0,
            request_timeout_secs: 60.0,
            min_bytes_per_sec: 16 * 1024,
            drain_secs: 20.0,
            max_bytes_per_sec: 0,
            windows: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PresignStyle {
    S3v4,
    OssV4,
    OssV1,
    CdnA,
}

impl PresignStyle {
    /// The name used in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            PresignStyle::S3v4 => "s3v4",
            PresignStyle::OssV4 => "oss-v4",
            PresignStyle::OssV1 => "oss-v1",
            PresignStyle::CdnA => "cdn-a",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LookupConfig {
    pub listen: Vec<String>,
    pub legacy_prefix: String,
    pub presign_expiry_secs: u64,
    pub presign_style: PresignStyle,
    pub public_url: Option<String>,
    /// Where signed URLs point instead of the bucket's own endpoint: a custom domain bound to
    /// the bucket, or the CDN domain for `cdn-a` (required there).
    pub public_base_url: Option<String>,
    /// Step the signing time is rounded down to, so a file keeps its URL for a while (CDN
    /// caching). Default: half the validity, at most 3600.
    pub presign_round_secs: Option<u64>,
    /// `cdn-a`: the CDN domain's URL-auth key (primary key of type A authentication).
    pub cdn_auth_key: String,
    /// `cdn-a`: the validity configured on the CDN domain; `expires_at` is the signing time
    /// plus this.
    pub cdn_validity_secs: u64,
    /// Files the journal does not know: HEAD their templated key in the bucket.
    pub remote_check: bool,
    /// How long a remote check's answer is reused.
    pub remote_check_cache_secs: f64,
    /// A request (headers read to answer sent, file bodies excluded) must finish in this time.
    pub request_timeout_secs: f64,
    /// A client must send its request headers within this time.
    pub header_timeout_secs: f64,
    /// Upper bound of the request line plus headers, in bytes (at least 8192).
    pub max_header_bytes: usize,
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// Client networks allowed to use the look-up server (CIDR or address); empty: all.
    pub allow: Vec<String>,
    pub auth: LookupAuthConfig,
    /// Stored files kept in memory for look-ups (about 40 bytes each); 0: read the journal.
    pub index_max_rows: usize,
}

impl Default for LookupConfig {
    fn default() -> Self {
        LookupConfig {
            listen: vec!["127.0.0.1:8090".to_string()],
            legacy_prefix: "/record".to_string(),
            presign_expiry_secs: 3600,
            presign_style: PresignStyle::S3v4,
            public_url: None,
            public_base_url: None,
            presign_round_secs: None,
            cdn_auth_key: String::new(),
            cdn_validity_secs: 1800,
            remote_check: false,
            remote_check_cache_secs: 30.0,
            request_timeout_secs: 30.0,
            header_timeout_secs: 10.0,
            max_header_bytes: 16 * 1024,
            max_connections: 1024,
            allow: Vec::new(),
            auth: LookupAuthConfig::default(),
            index_max_rows: 2_000_000,
        }
    }
}

/// Signed look-up requests (off while `keys` is empty).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LookupAuthConfig {
    /// App key → secret.
    pub keys: BTreeMap<String, String>,
    /// Accepted distance between a request's `ts` and this host's clock; nonces are remembered
    /// this long.
    pub window_secs: u64,
    /// Also require signatures on the drop-in legacy route (players then need signed URLs).
    pub legacy_route: bool,
}

impl Default for LookupAuthConfig {
    fn default() -> Self {
        LookupAuthConfig {
            keys: Default::default(),
            window_secs: 300,
            legacy_route: false,
        }
    }
}

/// Another recording host (`[[nodes]]`). The same list may be shipped to every host: the entry
/// named like `node.name` describes this host itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    /// Its `node.name` (what `{node}` renders to in its keys).
    pub name: String,
    /// Host names and addresses its legacy URLs carry (`10.1.2.4`, `rec-02.example.com`).
    #[serde(default)]
    pub legacy_hosts: Vec<String>,
    /// Its look-up server, as this host can reach it (`http://10.1.2.4:8090`).
    pub lookup_url: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter (`info`, `record_offload=debug`); `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_string(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// A pipeline stage (watcher, intake, uploader, journal writer) that shows no progress for
    /// this long is stalled: the systemd watchdog pings stop and `/healthz` answers 503.
    pub stall_secs: f64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig { stall_secs: 120.0 }
    }
}

/// Event names a `[[notify]]` entry may ask for.
pub const NOTIFY_EVENTS: [&str; 4] = ["stored", "deleted", "failed", "vanished"];

/// One receiver of file events (`[[notify]]`).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyConfig {
    /// Where events are POSTed (http:// or https://).
    pub url: String,
    /// Events sent: any of `stored`, `deleted`, `failed`, `vanished` (default all four).
    pub events: Vec<String>,
    /// HMAC-SHA256 key of the signature header (or `secret_file`).
    pub secret: String,
    pub secret_file: Option<PathBuf>,
    /// A delivery (connect, send, answer) must finish within this time.
    pub timeout_secs: f64,
}

impl std::fmt::Debug for NotifyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotifyConfig")
            .field("url", &self.url)
            .field("events", &self.events)
            .field("secret", &"<redacted>")
            .field("secret_file", &self.secret_file)
            .field("timeout_secs", &self.timeout_secs)
            .finish()
    }
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            url: String::new(),
            events: NOTIFY_EVENTS.iter().map(|s| s.to_string()).collect(),
            secret: String::new(),
            secret_file: None,
            timeout_secs: 10.0,
        }
    }
}

/// Bounds of the notification outbox and its delivery timing (`[notify_outbox]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyOutboxConfig {
    /// Undelivered events kept per receiver; beyond, the oldest are dropped (logged, counted).
    pub max_events: u64,
    /// Undelivered events older than this are dropped (logged, counted); 0: kept until
    /// delivered or pushed out by `max_events`.
    pub max_age_secs: f64,
    /// First delay after a failed delivery; doubles per attempt up to `retry_max_secs`.
    pub retry_initial_secs: f64,
    pub retry_max_secs: f64,
    /// How often an idle delivery worker looks for new events in the outbox.
    pub poll_secs: f64,
}

impl Default for NotifyOutboxConfig {
    fn default() -> Self {
        NotifyOutboxConfig {
            max_events: 100_000,
            max_age_secs: 0.0,
            retry_initial_secs: 1.0,
            retry_max_secs: 300.0,
            poll_secs: 1.0,
        }
    }
}
