//! Configuration: built-in defaults, then the TOML file, then `RECORD_OFFLOAD_*` environment
//! variables (`__` between levels), merged with figment and then validated.
//!
//! Loading never panics. Every problem is reported as one [`ConfigError`] that names the key
//! (`watch.include[1]`, `storage.bucket`, ...) and says what is wrong with it, so
//! `check-config` and `run` can print one clear line and exit non-zero.

use std::fmt;
use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};

/// Default location of the config file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/record-offload/config.toml";
/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "RECORD_OFFLOAD_";
/// Smallest and largest part sizes accepted: S3 refuses parts under 5 MiB (except the last)
/// and over 5 GiB; OSS accepts a wider range, so the S3 limits are the ones that hold everywhere.
pub const MIN_PART_MIB: u64 = 5;
pub const MAX_PART_MIB: u64 = 5 * 1024;
/// Presigned SigV4 URLs cannot live longer than 7 days.
pub const MAX_PRESIGN_SECS: u64 = 7 * 24 * 3600;

/// One configuration problem: the key it concerns and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "config: {}", self.message)
        } else {
            write!(f, "config: {}: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

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
    pub content_types: std::collections::BTreeMap<String, String>,
    /// `Content-Disposition` on every new object (e.g. "inline").
    pub content_disposition: Option<String>,
    /// `Cache-Control` on every new object.
    pub cache_control: Option<String>,
    /// User metadata (`x-amz-meta-NAME`) on every new object.
    pub metadata: std::collections::BTreeMap<String, String>,
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
    pub keys: std::collections::BTreeMap<String, String>,
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

/// A listen address of the look-up server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// The validated configuration plus what validation derived from it.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: Config,
    /// The secret, read from `access_key_secret`, `access_key_secret_file` or the systemd
    /// credential `access_key_secret`.
    pub secret: String,
    pub include: GlobSet,
    pub exclude: GlobSet,
    pub listen: Vec<ListenAddr>,
    /// Content types by extension: the built-in table with `storage.content_types` over it.
    pub media: crate::media::MediaTypes,
    /// `storage.ca_file`'s certificates (PEM), read and checked once.
    pub ca_pem: Option<Vec<u8>>,
}

impl Settings {
    /// Things that work but that an operator should hear about: printed by `check-config`
    /// and logged at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let st = &self.config.storage;
        let lk = &self.config.lookup;
        if lk.presign_style == PresignStyle::OssV1 {
            out.push(
                "lookup.presign_style = \"oss-v1\" is being withdrawn by Alibaba Cloud for new \
                 accounts and buckets; use \"oss-v4\""
                    .to_string(),
            );
        }
        let internal = url::Url::parse(&st.endpoint)
            .ok()
            .and_then(|u| u.host_str().map(|h| h.contains("-internal.")))
            .unwrap_or(false);
        if internal && lk.public_base_url.is_none() && lk.presign_style != PresignStyle::CdnA {
            out.push(format!(
                "storage.endpoint {} is an -internal endpoint and lookup.public_base_url is not \
                 set: presigned URLs point at the internal host, which players outside the \
                 region's network cannot reach",
                st.endpoint
            ));
        }
        out
    }

    pub fn settle(&self) -> Duration {
        Duration::from_secs_f64(self.config.watch.settle_secs)
    }
    pub fn rescan_interval(&self) -> Duration {
        Duration::from_secs_f64(self.config.watch.rescan_interval_secs)
    }
    pub fn prune_after(&self) -> Duration {
        Duration::from_secs_f64(self.config.watch.prune_after_secs)
    }
    pub fn stall_allowance(&self) -> Duration {
        Duration::from_secs_f64(self.config.health.stall_secs)
    }
    pub fn part_size(&self) -> u64 {
        self.config.upload.part_size_mib * 1024 * 1024
    }
}

/// Where configuration comes from.
#[derive(Debug, Clone, Default)]
pub struct Source {
    /// The TOML file; `None` means [`DEFAULT_CONFIG_PATH`] if it exists.
    pub file: Option<PathBuf>,
    /// Read `RECORD_OFFLOAD_*` variables (tests turn this off to stay independent of the
    /// environment they run in).
    pub no_env: bool,
}

/// Loads and validates the configuration.
pub fn load(source: &Source) -> Result<Settings, ConfigError> {
    let config = load_unvalidated(source)?;
    validate(config)
}

/// The region id an Alibaba Cloud OSS endpoint host names: `cn-hangzhou` for
/// `s3.oss-cn-hangzhou.aliyuncs.com`, `oss-cn-hangzhou-internal.aliyuncs.com` or
/// `bucket.oss-cn-hangzhou.aliyuncs.com`; `None` for other hosts and for the global
/// acceleration endpoints, which name no region.
pub fn oss_endpoint_region(host: &str) -> Option<&str> {
    let rest = host.strip_suffix(".aliyuncs.com")?;
    let label = rest.rsplit('.').next()?;
    let region = label.strip_prefix("oss-")?;
    let region = region.strip_suffix("-internal").unwrap_or(region);
    if region.is_empty() || region.starts_with("accelerate") {
        return None;
    }
    Some(region)
}

/// Loads and validates the configuration for a command that only uses the journal (`status`,
/// `ls`, `retry`, `import`): the storage secret is neither required nor read, so an operator
/// can run them where the daemon's secret is out of reach (a systemd credential, a file only
/// the service user reads). The returned settings carry no secret.
pub fn load_without_secret(source: &Source) -> Result<Settings, ConfigError> {
    let mut config = load_unvalidated(source)?;
    config.storage.access_key_secret = "unused".to_string();
    config.storage.access_key_secret_file = None;
    let mut settings = validate(config)?;
    settings.config.storage.access_key_secret.clear();
    settings.secret.clear();
    Ok(settings)
}

/// Merges defaults, file and environment, checking types and unknown keys only.
pub fn load_unvalidated(source: &Source) -> Result<Config, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    match &source.file {
        Some(path) => {
            if !path.is_file() {
                return Err(ConfigError::new(
                    "",
                    format!("cannot read config file {}: not a file", path.display()),
                ));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        None => {
            let path = Path::new(DEFAULT_CONFIG_PATH);
            if path.exists() {
                figment = figment.merge(Toml::file_exact(path));
            }
        }
    }
    if !source.no_env {
        figment = figment.merge(
            Env::prefixed(ENV_PREFIX)
                .split("__")
                // The config file's location and the crash tests' failpoints are passed this
                // way; they are not config keys.
                .ignore(&["config", "failpoints"]),
        );
    }
    figment.extract::<Config>().map_err(from_figment)
}

/// Builds a config from a TOML string, for tests and the demo (no file, no environment).
pub fn from_toml_str(toml: &str) -> Result<Settings, ConfigError> {
    let config = Figment::from(Serialized::defaults(Config::default()))
        .merge(Toml::string(toml))
        .extract::<Config>()
        .map_err(from_figment)?;
    validate(config)
}

fn from_figment(err: figment::Error) -> ConfigError {
    // figment may chain several errors; the first is the one to fix first.
    let err = err.into_iter().next();
    let Some(err) = err else {
        return ConfigError::new("", "invalid configuration");
    };
    let key = err
        .path
        .iter()
        .filter(|p| p.as_str() != "default")
        .cloned()
        .collect::<Vec<_>>()
        .join(".");
    let origin = err
        .metadata
        .as_ref()
        .map(|m| {
            let mut s = m.name.to_string();
            if let Some(src) = &m.source {
                s = format!("{s} {src}");
            }
            s
        })
        .unwrap_or_default();
    let mut message = match &err.kind {
        figment::error::Kind::UnknownField(field, expected) => {
            let key_full = if key.is_empty() {
                field.to_string()
            } else if key == *field || key.ends_with(&format!(".{field}")) {
                key.clone()
            } else {
                format!("{key}.{field}")
            };
            return ConfigError::new(
                key_full,
                format!(
                    "unknown key{}; expected one of: {}",
                    if origin.is_empty() {
                        String::new()
                    } else {
                        format!(" (in {origin})")
                    },
                    expected.join(", ")
                ),
            );
        }
        other => one_line(&other.to_string()),
    };
    if !origin.is_empty() {
        message = format!("{message} (in {origin})");
    }
    ConfigError::new(key, message)
}

/// A TOML parse error is several lines: the position, a snippet of the offending line, a caret,
/// and what is wrong. Errors are one line on stderr, and the snippet could show a secret (an
/// unterminated `access_key_secret = "…`), so only the position and the reason are kept.
fn one_line(message: &str) -> String {
    let is_snippet = |l: &str| {
        let t = l.trim_start();
        t.is_empty()
            || t.starts_with('|')
            || t.split_once('|').is_some_and(|(n, _)| {
                !n.trim().is_empty() && n.trim().bytes().all(|b| b.is_ascii_digit())
            })
            || t.bytes().all(|b| b == b'^' || b == b' ')
    };
    let mut lines = message.lines();
    let mut out = lines.next().unwrap_or_default().trim_end().to_string();
    for line in lines.filter(|l| !is_snippet(l)) {
        out.push_str(if out.ends_with(':') { " " } else { ": " });
        out.push_str(line.trim());
    }
    out.retain(|c| c != '\r');
    out
}

fn glob_set(key: &str, patterns: &[String]) -> Result<GlobSet, ConfigError> {
    let mut builder = GlobSetBuilder::new();
    for (i, pattern) in patterns.iter().enumerate() {
        let glob = compile_glob(pattern).map_err(|e| {
            ConfigError::new(format!("{key}[{i}]"), format!("bad glob {pattern:?}: {e}"))
        })?;
        builder.add(glob);
    }
    builder
        .build()
        .map_err(|e| ConfigError::new(key, format!("bad glob set: {e}")))
}

fn compile_glob(pattern: &str) -> Result<Glob, globset::Error> {
    GlobBuilder::new(pattern)
        // `*` stays inside one path component; `**` crosses them.
        .literal_separator(true)
        .backslash_escape(true)
        .build()
}

fn check_secs(key: &str, v: f64, min: f64, max: f64) -> Result<(), ConfigError> {
    if !v.is_finite() || v < min || v > max {
        return Err(ConfigError::new(
            key,
            format!("must be between {min} and {max} seconds, got {v}"),
        ));
    }
    Ok(())
}

const NODE_NAME_RULE: &str =
    "must be 1-128 characters of a-z, A-Z, 0-9, '-', '_', '.', and not '.' or '..'";

/// A node name is part of object keys (`{node}`): it must not be a path segment of its own.
fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

/// Parses a `lookup.listen` entry.
pub fn parse_listen(s: &str) -> Result<ListenAddr, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        if !path.starts_with('/') {
            return Err(format!("unix socket path must be absolute: {s:?}"));
        }
        return Ok(ListenAddr::Unix(PathBuf::from(path)));
    }
    s.parse::<SocketAddr>()
        .map(ListenAddr::Tcp)
        .map_err(|_| format!("expected HOST:PORT (e.g. 127.0.0.1:8090) or unix:/path, got {s:?}"))
}

/// Checks every value and derives [`Settings`].
pub fn validate(config: Config) -> Result<Settings, ConfigError> {
    // node
    let name = &config.node.name;
    if !valid_node_name(name) {
        return Err(ConfigError::new(
            "node.name",
            format!("{NODE_NAME_RULE}, got {name:?}"),
        ));
    }

    // watch
    let root = &config.watch.root;
    if !root.is_absolute() {
        return Err(ConfigError::new(
            "watch.root",
            format!("must be an absolute path, got {}", root.display()),
        ));
    }
    match std::fs::symlink_metadata(root) {
        Err(e) => {
            return Err(ConfigError::new(
                "watch.root",
                format!("cannot read {}: {e}", root.display()),
            ));
        }
        Ok(m) if !m.is_dir() => {
            return Err(ConfigError::new(
                "watch.root",
                format!("{} is not a directory", root.display()),
            ));
        }
        Ok(_) => {}
    }
    if let Err(e) = std::fs::read_dir(root) {
        return Err(ConfigError::new(
            "watch.root",
            format!("cannot list {}: {e}", root.display()),
        ));
    }
    if config.watch.include.is_empty() {
        return Err(ConfigError::new(
            "watch.include",
            "must list at least one glob",
        ));
    }
    let include = glob_set("watch.include", &config.watch.include)?;
    let exclude = glob_set("watch.exclude", &config.watch.exclude)?;
    check_secs("watch.settle_secs", config.watch.settle_secs, 0.0, 86400.0)?;
    check_secs(
        "watch.rescan_interval_secs",
        config.watch.rescan_interval_secs,
        0.1,
        86400.0,
    )?;
    check_secs(
        "watch.prune_after_secs",
        config.watch.prune_after_secs,
        0.0,
        365.0 * 86400.0,
    )?;

    // journal
    check_creatable("journal.path", &config.journal.path)?;

    // storage
    let st = &config.storage;
    let endpoint = url::Url::parse(&st.endpoint).map_err(|e| {
        ConfigError::new(
            "storage.endpoint",
            format!("not a URL ({e}): {:?}", st.endpoint),
        )
    })?;
    if endpoint.scheme() != "http" && endpoint.scheme() != "https" {
        return Err(ConfigError::new(
            "storage.endpoint",
            format!("must be http:// or https://, got {:?}", st.endpoint),
        ));
    }
    if endpoint.host_str().is_none() {
        return Err(ConfigError::new("storage.endpoint", "has no host"));
    }
    if st.region.trim().is_empty() {
        return Err(ConfigError::new(
            "storage.region",
            "is required (e.g. cn-hangzhou)",
        ));
    }
    if let Some(host) = endpoint.host_str()
        && let Some(r) = oss_endpoint_region(host)
        && r != st.region
    {
        // OSS checks the region in every signature: a mismatch fails every request.
        return Err(ConfigError::new(
            "storage.region",
            format!(
                "is {:?} but the endpoint {host} is in region {r:?}; set region = {r:?}",
                st.region
            ),
        ));
    }
    if st.bucket.is_empty() {
        return Err(ConfigError::new("storage.bucket", "is required"));
    }
    if st.bucket.len() < 3
        || st.bucket.len() > 63
        || !st
            .bucket
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    {
        return Err(ConfigError::new(
            "storage.bucket",
            format!(
                "must be 3-63 characters of a-z, 0-9, '-', '.', got {:?}",
                st.bucket
            ),
        ));
    }
    if st.access_key_id.is_empty() {
        return Err(ConfigError::new("storage.access_key_id", "is required"));
    }
    let secret = read_secret(st)?;
    let ca_pem = validate_object_options(st)?;
    crate::keys::KeyTemplate::parse(&st.key_template)
        .and_then(|t| t.check_node(name))
        .map_err(|e| ConfigError::new("storage.key_template", e))?;

    // upload
    let up = &config.upload;
    if up.part_size_mib < MIN_PART_MIB || up.part_size_mib > MAX_PART_MIB {
        return Err(ConfigError::new(
            "upload.part_size_mib",
            format!(
                "must be between {MIN_PART_MIB} and {MAX_PART_MIB} (5 MiB to 5 GiB), got {}",
                up.part_size_mib
            ),
        ));
    }
    if up.concurrency == 0 || up.concurrency > 64 {
        return Err(ConfigError::new(
            "upload.concurrency",
            format!("must be between 1 and 64, got {}", up.concurrency),
        ));
    }
    check_secs(
        "upload.retry_initial_secs",
        up.retry_initial_secs,
        0.01,
        3600.0,
    )?;
    check_secs("upload.retry_max_secs", up.retry_max_secs, 0.01, 86400.0)?;
    check_secs(
        "upload.failed_retry_secs",
        up.failed_retry_secs,
        1.0,
        30.0 * 86400.0,
    )?;
    check_secs(
        "upload.request_timeout_secs",
        up.request_timeout_secs,
        0.1,
        3600.0,
    )?;
    check_secs("upload.drain_secs", up.drain_secs, 0.0, 3600.0)?;
    if up.max_bytes_per_sec != 0 && up.max_bytes_per_sec < 1024 {
        return Err(ConfigError::new(
            "upload.max_bytes_per_sec",
            format!(
                "must be 0 (no limit) or at least 1024, got {}",
                up.max_bytes_per_sec
            ),
        ));
    }
    crate::throttle::Windows::parse(&up.windows)
        .map_err(|(i, e)| ConfigError::new(format!("upload.windows[{i}]"), e))?;

    // lookup
    let lk = &config.lookup;
    let mut listen = Vec::new();
    for (i, l) in lk.listen.iter().enumerate() {
        listen
            .push(parse_listen(l).map_err(|e| ConfigError::new(format!("lookup.listen[{i}]"), e))?);
    }
    if !lk.legacy_prefix.is_empty() && !lk.legacy_prefix.starts_with('/') {
        return Err(ConfigError::new(
            "lookup.legacy_prefix",
            format!("must start with '/', got {:?}", lk.legacy_prefix),
        ));
    }
    if lk.presign_expiry_secs == 0 || lk.presign_expiry_secs > MAX_PRESIGN_SECS {
        return Err(ConfigError::new(
            "lookup.presign_expiry_secs",
            format!(
                "must be between 1 and {MAX_PRESIGN_SECS} (7 days), got {}",
                lk.presign_expiry_secs
            ),
        ));
    }
    if let Some(u) = &lk.public_url {
        let parsed = url::Url::parse(u).map_err(|e| {
            ConfigError::new("lookup.public_url", format!("not a URL ({e}): {u:?}"))
        })?;
        if parsed.scheme() != "http" && parsed.scheme() != "https" {
            return Err(ConfigError::new(
                "lookup.public_url",
                format!("must be http:// or https://, got {u:?}"),
            ));
        }
    }

    // health
    // Idle stages beat about once a second: the allowance must leave room for that.
    check_secs("health.stall_secs", config.health.stall_secs, 2.0, 86400.0)?;
    validate_lookup_extras(&config)?;

    // log
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&config.log.level) {
        return Err(ConfigError::new(
            "log.level",
            format!("bad filter {:?}: {e}", config.log.level),
        ));
    }

    let media = crate::media::MediaTypes::new(&config.storage.content_types);
    Ok(Settings {
        config,
        secret,
        include,
        exclude,
        listen,
        media,
        ca_pem,
    })
}

fn check_http_url(key: &str, u: &str) -> Result<url::Url, ConfigError> {
    let parsed =
        url::Url::parse(u).map_err(|e| ConfigError::new(key, format!("not a URL ({e}): {u:?}")))?;
    if (parsed.scheme() != "http" && parsed.scheme() != "https") || parsed.host_str().is_none() {
        return Err(ConfigError::new(
            key,
            format!("must be http:// or https:// with a host, got {u:?}"),
        ));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() || !parsed.username().is_empty() {
        return Err(ConfigError::new(
            key,
            format!("must not carry user info, a query or a fragment, got {u:?}"),
        ));
    }
    Ok(parsed)
}

/// `storage.ca_file` and the options sent with every new object. Returns the CA's PEM.
fn validate_object_options(st: &StorageConfig) -> Result<Option<Vec<u8>>, ConfigError> {
    let header_value = |key: &str, v: &str| {
        if v.is_empty() || !v.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            Err(ConfigError::new(
                key,
                format!("must be non-empty printable ASCII (it is sent as a header), got {v:?}"),
            ))
        } else {
            Ok(())
        }
    };
    if let Some(c) = &st.storage_class
        && (c.is_empty() || !c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
    {
        return Err(ConfigError::new(
            "storage.storage_class",
            format!("must be a storage class name such as \"STANDARD\" or \"IA\", got {c:?}"),
        ));
    }
    match st.sse.as_deref() {
        None => {
            if st.sse_kms_key_id.is_some() {
                return Err(ConfigError::new(
                    "storage.sse_kms_key_id",
                    "needs storage.sse = \"KMS\"",
                ));
            }
        }
        Some("AES256") => {
            if st.sse_kms_key_id.is_some() {
                return Err(ConfigError::new(
                    "storage.sse_kms_key_id",
                    "needs storage.sse = \"KMS\", not \"AES256\"",
                ));
            }
        }
        Some("KMS") => {
            if let Some(k) = &st.sse_kms_key_id {
                header_value("storage.sse_kms_key_id", k)?;
            }
        }
        Some(other) => {
            return Err(ConfigError::new(
                "storage.sse",
                format!("must be \"AES256\" or \"KMS\", got {other:?}"),
            ));
        }
    }
    for (ext, t) in &st.content_types {
        let key = format!("storage.content_types.{ext:?}");
        let e = crate::media::normalise_ext(ext);
        if e.is_empty()
            || !e
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(ConfigError::new(
                key,
                "must be a file extension such as \".mp4\"",
            ));
        }
        if !crate::media::valid_media_type(t) {
            return Err(ConfigError::new(
                key,
                format!("must be a media type such as \"video/mp4\", got {t:?}"),
            ));
        }
    }
    if let Some(v) = &st.content_disposition {
        header_value("storage.content_disposition", v)?;
    }
    if let Some(v) = &st.cache_control {
        header_value("storage.cache_control", v)?;
    }
    let mut meta_bytes = 0;
    for (k, v) in &st.metadata {
        let key = format!("storage.metadata.{k}");
        let name_ok = !k.is_empty()
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !name_ok {
            return Err(ConfigError::new(
                key,
                "names may use a-z, 0-9, '-' and '_' only (they are sent as x-amz-meta-NAME)",
            ));
        }
        if k.eq_ignore_ascii_case("md5") || k.eq_ignore_ascii_case(crate::upload::SOURCE_META) {
            return Err(ConfigError::new(key, "is a name the daemon sets itself"));
        }
        header_value(&key, v)?;
        meta_bytes += k.len() + v.len();
    }
    if meta_bytes > 4096 {
        return Err(ConfigError::new(
            "storage.metadata",
            format!(
                "is {meta_bytes} bytes; OSS and S3 allow about 8 KiB of user metadata in all, keep it under 4096"
            ),
        ));
    }
    let Some(path) = &st.ca_file else {
        return Ok(None);
    };
    let pem = std::fs::read(path).map_err(|e| {
        ConfigError::new(
            "storage.ca_file",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let text = String::from_utf8_lossy(&pem);
    if !text.contains("-----BEGIN CERTIFICATE-----") {
        return Err(ConfigError::new(
            "storage.ca_file",
            format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                path.display()
            ),
        ));
    }
    crate::store::tls_context(Some(&pem))
        .map_err(|e| ConfigError::new("storage.ca_file", format!("{}: {e}", path.display())))?;
    Ok(Some(pem))
}

/// The look-up keys beyond the SPEC's five, and `[[nodes]]`.
fn validate_lookup_extras(config: &Config) -> Result<(), ConfigError> {
    let lk = &config.lookup;
    if let Some(u) = &lk.public_base_url {
        let parsed = check_http_url("lookup.public_base_url", u)?;
        // OSS's own signatures cover /bucket/key: on a URL with a path of its own they would
        // sign something other than what the URL holds, and every link would be refused.
        if matches!(lk.presign_style, PresignStyle::OssV4 | PresignStyle::OssV1)
            && !parsed.path().trim_matches('/').is_empty()
        {
            return Err(ConfigError::new(
                "lookup.public_base_url",
                format!(
                    "must be a bare domain (no path) with presign_style = \"{}\": the OSS signature covers the bucket and key only, got {u:?}",
                    lk.presign_style.as_str()
                ),
            ));
        }
    }
    if let Some(r) = lk.presign_round_secs
        && r > MAX_PRESIGN_SECS
    {
        return Err(ConfigError::new(
            "lookup.presign_round_secs",
            format!("must be at most {MAX_PRESIGN_SECS}, got {r}"),
        ));
    }
    if lk.presign_style == PresignStyle::CdnA {
        if lk.public_base_url.is_none() {
            return Err(ConfigError::new(
                "lookup.public_base_url",
                "is required with presign_style = \"cdn-a\" (the CDN domain, e.g. https://cdn.example.com)",
            ));
        }
        if lk.cdn_auth_key.is_empty() {
            return Err(ConfigError::new(
                "lookup.cdn_auth_key",
                "is required with presign_style = \"cdn-a\"",
            ));
        }
    }
    if lk.cdn_validity_secs == 0 || lk.cdn_validity_secs > 365 * 86400 {
        return Err(ConfigError::new(
            "lookup.cdn_validity_secs",
            format!(
                "must be between 1 and {} (a year), got {}",
                365 * 86400,
                lk.cdn_validity_secs
            ),
        ));
    }
    check_secs(
        "lookup.remote_check_cache_secs",
        lk.remote_check_cache_secs,
        0.0,
        3600.0,
    )?;
    check_secs(
        "lookup.request_timeout_secs",
        lk.request_timeout_secs,
        0.1,
        3600.0,
    )?;
    check_secs(
        "lookup.header_timeout_secs",
        lk.header_timeout_secs,
        0.1,
        3600.0,
    )?;
    if lk.max_header_bytes < 8192 || lk.max_header_bytes > 1024 * 1024 {
        return Err(ConfigError::new(
            "lookup.max_header_bytes",
            format!(
                "must be between 8192 and 1048576, got {}",
                lk.max_header_bytes
            ),
        ));
    }
    if lk.max_connections == 0 || lk.max_connections > 100_000 {
        return Err(ConfigError::new(
            "lookup.max_connections",
            format!("must be between 1 and 100000, got {}", lk.max_connections),
        ));
    }
    for (i, a) in lk.allow.iter().enumerate() {
        crate::lookup::auth::Cidr::parse(a)
            .map_err(|e| ConfigError::new(format!("lookup.allow[{i}]"), e))?;
    }
    for (app, secret) in &lk.auth.keys {
        let key = format!("lookup.auth.keys.{app}");
        if app.is_empty()
            || app.len() > 64
            || !app
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(ConfigError::new(
                key,
                "app keys must be 1-64 characters of a-z, A-Z, 0-9, '-', '_', '.'",
            ));
        }
        if secret.len() < 16 {
            return Err(ConfigError::new(
                key,
                "the secret must be at least 16 characters",
            ));
        }
    }
    if lk.auth.window_secs == 0 || lk.auth.window_secs > 3600 {
        return Err(ConfigError::new(
            "lookup.auth.window_secs",
            format!("must be between 1 and 3600, got {}", lk.auth.window_secs),
        ));
    }
    let mut seen_hosts = std::collections::HashMap::new();
    let mut seen_names = std::collections::HashSet::new();
    for (i, n) in config.nodes.iter().enumerate() {
        let key = format!("nodes[{i}]");
        if !valid_node_name(&n.name) {
            return Err(ConfigError::new(
                format!("{key}.name"),
                format!("{NODE_NAME_RULE}, got {:?}", n.name),
            ));
        }
        if !seen_names.insert(n.name.as_str()) {
            return Err(ConfigError::new(
                format!("{key}.name"),
                format!("node {:?} is listed twice", n.name),
            ));
        }
        check_http_url(&format!("{key}.lookup_url"), &n.lookup_url)?;
        for (j, h) in n.legacy_hosts.iter().enumerate() {
            let hkey = format!("{key}.legacy_hosts[{j}]");
            let norm = normalize_host(h).map_err(|e| ConfigError::new(hkey.clone(), e))?;
            if let Some(other) = seen_hosts.insert(norm, n.name.as_str()) {
                return Err(ConfigError::new(
                    hkey,
                    format!("{h:?} is also a legacy host of node {other:?}"),
                ));
            }
        }
    }
    Ok(())
}

/// A legacy host as look-up input carries it: lower-case, IPv6 addresses in brackets, no port.
pub fn normalize_host(h: &str) -> Result<String, String> {
    let t = h.trim();
    if let Ok(v6) = t
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::Ipv6Addr>()
    {
        return Ok(format!("[{v6}]"));
    }
    let lower = t.to_ascii_lowercase();
    if lower.is_empty()
        || !lower
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~'))
    {
        return Err(format!(
            "expected a host name or address without port, got {h:?}"
        ));
    }
    Ok(lower)
}

/// The journal's file must be creatable: its directory exists and is writable, or the nearest
/// existing ancestor is a writable directory (the daemon creates the rest).
fn check_creatable(key: &str, path: &Path) -> Result<(), ConfigError> {
    if path.as_os_str().is_empty() || path.file_name().is_none() {
        return Err(ConfigError::new(key, "must name a file"));
    }
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if m.is_dir() {
            return Err(ConfigError::new(
                key,
                format!("{} is a directory", path.display()),
            ));
        }
        return writable(path)
            .map_err(|e| ConfigError::new(key, format!("cannot write {}: {e}", path.display())));
    }
    let mut dir = path.parent();
    while let Some(d) = dir {
        let d = if d.as_os_str().is_empty() {
            Path::new(".")
        } else {
            d
        };
        match std::fs::metadata(d) {
            Ok(m) if m.is_dir() => {
                return writable(d).map_err(|e| {
                    ConfigError::new(
                        key,
                        format!(
                            "cannot create {}: directory {} is not writable ({e})",
                            path.display(),
                            d.display()
                        ),
                    )
                });
            }
            Ok(_) => {
                return Err(ConfigError::new(
                    key,
                    format!(
                        "cannot create {}: {} is not a directory",
                        path.display(),
                        d.display()
                    ),
                ));
            }
            Err(_) => dir = d.parent(),
        }
    }
    Err(ConfigError::new(
        key,
        format!("cannot create {}", path.display()),
    ))
}

fn writable(path: &Path) -> std::io::Result<()> {
    rustix::fs::access(path, rustix::fs::Access::WRITE_OK).map_err(std::io::Error::from)
}

/// The largest secret file read (a secret is a line; this is generous).
const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// Name of the systemd credential (`LoadCredential=access_key_secret:...`).
pub const CREDENTIAL_NAME: &str = "access_key_secret";

fn read_secret(st: &StorageConfig) -> Result<String, ConfigError> {
    if !st.access_key_secret.is_empty() {
        if st.access_key_secret_file.is_some() {
            return Err(ConfigError::new(
                "storage.access_key_secret_file",
                "set either access_key_secret or access_key_secret_file, not both",
            ));
        }
        return Ok(st.access_key_secret.clone());
    }
    let (key, path) = match &st.access_key_secret_file {
        Some(p) => ("storage.access_key_secret_file", p.clone()),
        None => match std::env::var_os("CREDENTIALS_DIRECTORY") {
            Some(dir) if Path::new(&dir).join(CREDENTIAL_NAME).is_file() => (
                "storage.access_key_secret",
                Path::new(&dir).join(CREDENTIAL_NAME),
            ),
            _ => {
                return Err(ConfigError::new(
                    "storage.access_key_secret",
                    "is required (or access_key_secret_file, or the systemd credential access_key_secret)",
                ));
            }
        },
    };
    let meta = std::fs::metadata(&path)
        .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", path.display())))?;
    // A device, a FIFO or /proc/kcore would block or exhaust memory; a secret is a small file.
    if !meta.is_file() {
        return Err(ConfigError::new(
            key,
            format!("{} is not a regular file", path.display()),
        ));
    }
    if meta.len() > MAX_SECRET_FILE_BYTES {
        return Err(ConfigError::new(
            key,
            format!(
                "{} is {} bytes; a secret file has at most {MAX_SECRET_FILE_BYTES}",
                path.display(),
                meta.len()
            ),
        ));
    }
    if meta.permissions().mode() & 0o007 != 0 {
        return Err(ConfigError::new(
            key,
            format!(
                "{} is accessible by other users (mode {:o}); chmod o-rwx it",
                path.display(),
                meta.permissions().mode() & 0o777
            ),
        ));
    }
    let _ = meta.uid();
    let mut text = String::new();
    std::fs::File::open(&path)
        .and_then(|f| f.take(MAX_SECRET_FILE_BYTES).read_to_string(&mut text))
        .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", path.display())))?;
    let secret = text.trim().to_string();
    if secret.is_empty() {
        return Err(ConfigError::new(
            key,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(secret)
}

/// The effective configuration as TOML, with the secret replaced.
pub fn redacted_toml(settings: &Settings) -> String {
    let mut c = settings.config.clone();
    if !c.storage.access_key_secret.is_empty() {
        c.storage.access_key_secret = "<redacted>".to_string();
    }
    if !c.lookup.cdn_auth_key.is_empty() {
        c.lookup.cdn_auth_key = "<redacted>".to_string();
    }
    for secret in c.lookup.auth.keys.values_mut() {
        *secret = "<redacted>".to_string();
    }
    toml::to_string_pretty(&c).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn base(root: &Path, journal: &Path) -> String {
        format!(
            "[watch]\nroot = {:?}\n[journal]\npath = {:?}\n[storage]\nbucket = \"rec\"\naccess_key_id = \"id\"\naccess_key_secret = \"s\"\n",
            root.display().to_string(),
            journal.display().to_string()
        )
    }

    fn err_of(toml: &str) -> ConfigError {
        from_toml_str(toml).expect_err("expected an error")
    }

    #[test]
    fn accepts_minimal_config() {
        let dir = tempfile::tempdir().unwrap();
        let s = from_toml_str(&base(dir.path(), &dir.path().join("j.db"))).unwrap();
        assert_eq!(s.config.upload.part_size_mib, 16);
        assert_eq!(s.secret, "s");
        assert!(!redacted_toml(&s).contains("= \"s\""));
        assert!(redacted_toml(&s).contains("<redacted>"));
    }

    /// A config with extra lines added to some tables.
    fn with(root: &Path, journal: &Path, watch: &str, storage: &str, tail: &str) -> String {
        format!(
            "[watch]\nroot = {:?}\n{watch}\n[journal]\npath = {:?}\n[storage]\n{storage}\n{tail}\n",
            root.display().to_string(),
            journal.display().to_string()
        )
    }

    #[test]
    fn rejects_each_bad_value_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let (r, j) = (dir.path(), dir.path().join("j.db"));
        let creds = "bucket = \"rec\"\naccess_key_id = \"id\"\naccess_key_secret = \"s\"";
        let ok = |tail: &str| with(r, &j, "", creds, tail);
        let cases: Vec<(String, &str)> = vec![
            (ok("[upload]\nbogus = 1"), "upload.bogus"),
            (ok("[upload]\npart_size_mib = 4"), "upload.part_size_mib"),
            (ok("[upload]\npart_size_mib = 5121"), "upload.part_size_mib"),
            (ok("[upload]\nconcurrency = 0"), "upload.concurrency"),
            (ok("[upload]\nconcurrency = \"many\""), "upload.concurrency"),
            (
                ok("[upload]\nwindows = [\"22:00-07:00\", \"9-5\"]"),
                "upload.windows[1]",
            ),
            (
                ok("[upload]\nmax_bytes_per_sec = 10"),
                "upload.max_bytes_per_sec",
            ),
            (ok("[lookup]\nlisten = [\"nope\"]"), "lookup.listen[0]"),
            (
                ok("[lookup]\npresign_style = \"v9\""),
                "lookup.presign_style",
            ),
            (ok("[bogus]\nx = 1"), "bogus"),
            (
                with(r, &j, "exclude = [\"a[\"]", creds, ""),
                "watch.exclude[0]",
            ),
            (
                with(r, &j, "include = [\"**/*\", \"{a\"]", creds, ""),
                "watch.include[1]",
            ),
            (
                with(r, &j, "settle_secs = -1", creds, ""),
                "watch.settle_secs",
            ),
            (
                with(
                    r,
                    &j,
                    "",
                    "access_key_id = \"id\"\naccess_key_secret = \"s\"",
                    "",
                ),
                "storage.bucket",
            ),
            (
                with(r, &j, "", "bucket = \"rec\"\naccess_key_secret = \"s\"", ""),
                "storage.access_key_id",
            ),
            (
                with(r, &j, "", "bucket = \"rec\"\naccess_key_id = \"id\"", ""),
                "storage.access_key_secret",
            ),
            (
                with(
                    r,
                    &j,
                    "",
                    &format!("{creds}\nkey_template = \"{{node}}\""),
                    "",
                ),
                "storage.key_template",
            ),
            (
                with(
                    r,
                    &j,
                    "",
                    &format!("{creds}\nkey_template = \"{{node}}/../{{path}}\""),
                    "",
                ),
                "storage.key_template",
            ),
            (ok("[node]\nname = \"..\""), "node.name"),
            (
                ok("[[nodes]]\nname = \".\"\nlookup_url = \"http://h\""),
                "nodes[0].name",
            ),
            (
                with(r, &j, "", &format!("{creds}\nendpoint = \"ftp://x\""), ""),
                "storage.endpoint",
            ),
        ];
        for (toml, key) in cases {
            let e = err_of(&toml);
            assert_eq!(e.key, key, "for {toml}: {e}");
        }
    }

    #[test]
    fn lookup_keys_are_validated_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let b = base(dir.path(), &dir.path().join("j.db"));
        let node = |extra: &str| {
            format!("{b}[[nodes]]\nname = \"n2\"\nlookup_url = \"http://10.0.0.2:8090\"\n{extra}\n")
        };
        let cases: Vec<(String, &str)> = vec![
            (
                format!("{b}[lookup]\npublic_base_url = \"ftp://x\""),
                "lookup.public_base_url",
            ),
            (
                format!("{b}[lookup]\npublic_base_url = \"https://x/?a=1\""),
                "lookup.public_base_url",
            ),
            (
                format!("{b}[lookup]\npresign_style = \"cdn-a\""),
                "lookup.public_base_url",
            ),
            (
                format!(
                    "{b}[lookup]\npresign_style = \"cdn-a\"\npublic_base_url = \"https://cdn.example.com\""
                ),
                "lookup.cdn_auth_key",
            ),
            (
                format!("{b}[lookup]\ncdn_validity_secs = 0"),
                "lookup.cdn_validity_secs",
            ),
            (
                format!("{b}[lookup]\npresign_round_secs = 9999999"),
                "lookup.presign_round_secs",
            ),
            (
                format!("{b}[lookup]\nmax_header_bytes = 100"),
                "lookup.max_header_bytes",
            ),
            (
                format!("{b}[lookup]\nmax_connections = 0"),
                "lookup.max_connections",
            ),
            (
                format!("{b}[lookup]\nrequest_timeout_secs = 0"),
                "lookup.request_timeout_secs",
            ),
            (
                format!("{b}[lookup]\nallow = [\"10.0.0.0/8\", \"nope\"]"),
                "lookup.allow[1]",
            ),
            (
                format!("{b}[lookup.auth.keys]\napp = \"short\""),
                "lookup.auth.keys.app",
            ),
            (
                format!("{b}[lookup.auth.keys]\n\"a b\" = \"0123456789abcdef\""),
                "lookup.auth.keys.a b",
            ),
            (
                format!("{b}[lookup.auth]\nwindow_secs = 0"),
                "lookup.auth.window_secs",
            ),
            (format!("{b}[lookup.auth]\nbogus = 1"), "lookup.auth.bogus"),
            (node("legacy_hosts = [\"a b\"]"), "nodes[0].legacy_hosts[0]"),
            (
                format!("{b}[[nodes]]\nname = \"n2\"\nlookup_url = \"x\""),
                "nodes[0].lookup_url",
            ),
            (
                format!("{b}[[nodes]]\nname = \"bad name\"\nlookup_url = \"http://h\""),
                "nodes[0].name",
            ),
            (
                format!(
                    "{}[[nodes]]\nname = \"n3\"\nlookup_url = \"http://h\"\nlegacy_hosts = [\"H1\"]\n",
                    node("legacy_hosts = [\"h1\"]")
                ),
                "nodes[1].legacy_hosts[0]",
            ),
        ];
        for (toml, key) in cases {
            let e = err_of(&toml);
            assert_eq!(e.key, key, "for {toml}: {e}");
        }
        let ok = from_toml_str(&format!(
            "{b}[lookup]\nallow = [\"::1\", \"10.0.0.0/8\"]\n[lookup.auth.keys]\napp = \"0123456789abcdef\"\n[[nodes]]\nname = \"n2\"\nlegacy_hosts = [\"10.0.0.2\", \"::2\"]\nlookup_url = \"http://10.0.0.2:8090\"\n"
        ))
        .unwrap();
        assert_eq!(ok.config.nodes.len(), 1);
        let shown = redacted_toml(&ok);
        assert!(!shown.contains("0123456789abcdef"), "{shown}");
        assert_eq!(normalize_host("[0::2]").unwrap(), "[::2]");
        assert_eq!(normalize_host("REC.example").unwrap(), "rec.example");
    }

    /// Every key of config.example.toml is a key this build knows.
    #[test]
    fn example_config_parses() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"))
                .unwrap();
        let config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(&text))
            .extract()
            .map_err(from_figment)
            .unwrap();
        assert_eq!(config.lookup.remote_check_cache_secs, 30.0);
        assert_eq!(config.lookup.auth.window_secs, 300);
    }

    #[test]
    fn rejects_missing_root_and_uncreatable_journal() {
        let dir = tempfile::tempdir().unwrap();
        let e = err_of(&base(&dir.path().join("missing"), &dir.path().join("j.db")));
        assert_eq!(e.key, "watch.root");
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let e = err_of(&base(dir.path(), &file.join("j.db")));
        assert_eq!(e.key, "journal.path");
    }

    #[test]
    fn oss_region_must_match_the_endpoint() {
        assert_eq!(
            oss_endpoint_region("s3.oss-cn-hangzhou.aliyuncs.com"),
            Some("cn-hangzhou")
        );
        assert_eq!(
            oss_endpoint_region("rec.s3.oss-cn-beijing-internal.aliyuncs.com"),
            Some("cn-beijing")
        );
        assert_eq!(
            oss_endpoint_region("oss-ap-southeast-1.aliyuncs.com"),
            Some("ap-southeast-1")
        );
        assert_eq!(oss_endpoint_region("oss-accelerate.aliyuncs.com"), None);
        assert_eq!(oss_endpoint_region("s3.amazonaws.com"), None);
        assert_eq!(oss_endpoint_region("127.0.0.1"), None);

        let dir = tempfile::tempdir().unwrap();
        let toml = |region: &str| {
            format!(
                "{}endpoint = \"https://s3.oss-cn-hangzhou.aliyuncs.com\"\nregion = \"{region}\"\n",
                base(dir.path(), &dir.path().join("j.db"))
            )
        };
        assert!(from_toml_str(&toml("cn-hangzhou")).is_ok());
        let e = err_of(&toml("oss-cn-hangzhou"));
        assert_eq!(e.key, "storage.region");
        assert!(e.message.contains("set region = \"cn-hangzhou\""), "{e}");
    }

    #[test]
    fn secret_file_must_not_be_world_readable() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "abc\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        let toml = base(dir.path(), &dir.path().join("j.db")).replace(
            "access_key_secret = \"s\"",
            &format!(
                "access_key_secret_file = {:?}",
                secret.display().to_string()
            ),
        );
        assert_eq!(err_of(&toml).key, "storage.access_key_secret_file");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(from_toml_str(&toml).unwrap().secret, "abc");
    }

    #[test]
    fn secret_file_must_be_a_small_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let toml = |p: &Path| {
            base(dir.path(), &dir.path().join("j.db")).replace(
                "access_key_secret = \"s\"",
                &format!("access_key_secret_file = {:?}", p.display().to_string()),
            )
        };
        // A directory, a FIFO (reading it would block), and an oversized file.
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o700)).unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'a'; 65 * 1024]).unwrap();
        std::fs::set_permissions(&big, std::fs::Permissions::from_mode(0o600)).unwrap();
        for p in [&fifo, &sub, &big] {
            let e = err_of(&toml(p));
            assert_eq!(
                e.key,
                "storage.access_key_secret_file",
                "{}: {e}",
                p.display()
            );
        }
    }

    #[test]
    fn toml_syntax_errors_are_one_line_without_the_offending_text() {
        let dir = tempfile::tempdir().unwrap();
        // An unterminated string: the parser's message quotes the line it stopped on.
        let toml = base(dir.path(), &dir.path().join("j.db")).replace(
            "access_key_secret = \"s\"",
            "access_key_secret = \"Sup3r-Secret-Value\n",
        );
        let e = err_of(&toml).to_string();
        assert!(!e.contains('\n'), "{e:?}");
        assert!(!e.contains("Sup3r"), "{e:?}");
        assert!(e.contains("line 8"), "{e:?}");
        assert_eq!(
            one_line(
                "TOML parse error at line 2, column 13\n  |\n2 | root = \"/tmp\n  |             ^\ninvalid basic string\n"
            ),
            "TOML parse error at line 2, column 13: invalid basic string"
        );
    }
}
