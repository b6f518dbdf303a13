//! The checks of every key, in the order an operator reads the file, and what they derive:
//! [`validate`] turns a [`Config`] into [`Settings`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aws_smithy_http_client::tls::{TlsContext, TrustStore};

use super::ConfigError;
use super::model::{Config, PresignStyle, StorageConfig};
use super::secrets::read_secret;
use super::settings::{ListenAddr, OtherNode, Settings};
use crate::util::filter::{Filter, glob_set as compile_globs};
use crate::util::keys::{KeyTemplate, SOURCE_META};
use crate::util::media::MediaTypes;
use crate::util::net::{Cidr, normalize_host};
use crate::util::throttle::Windows;

/// Smallest and largest part sizes accepted: S3 refuses parts under 5 MiB (except the last)
/// and over 5 GiB; OSS accepts a wider range, so the S3 limits are the ones that hold everywhere.
pub const MIN_PART_MIB: u64 = 5;
pub const MAX_PART_MIB: u64 = 5 * 1024;
/// Presigned SigV4 URLs cannot live longer than 7 days.
pub const MAX_PRESIGN_SECS: u64 = 7 * 24 * 3600;

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

fn glob_set(key: &str, patterns: &[String]) -> Result<globset::GlobSet, ConfigError> {
    compile_globs(patterns).map_err(|e| match e.index {
        Some(i) => ConfigError::new(format!("{key}[{i}]"), e.message),
        None => ConfigError::new(key, e.message),
    })
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
    let filter = Filter::new(include, exclude);
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
    check_secs(
        "watch.disk_warn_secs",
        config.watch.disk_warn_secs,
        0.0,
        365.0 * 86400.0,
    )?;
    check_secs(
        "watch.disk_window_secs",
        config.watch.disk_window_secs,
        1.0,
        7.0 * 86400.0,
    )?;

    // journal
    check_creatable("journal.path", &config.journal.path)?;

    // storage
    let st = &config.storage;
    let (secret, tls) = validate_store(st)?;
    let template = KeyTemplate::parse(&st.key_template)
        .and_then(|t| t.check_node(name).map(|()| t))
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
    let windows = Windows::parse(&up.windows)
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
    let (allow, other_nodes) = validate_lookup_extras(&config)?;

    // log
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&config.log.level) {
        return Err(ConfigError::new(
            "log.level",
            format!("bad filter {:?}: {e}", config.log.level),
        ));
    }

    let notify = super::notify::validate_notify(&config)?;

    let media = MediaTypes::new(&config.storage.content_types);
    let mut settings = Settings {
        config,
        secret,
        filter,
        listen,
        media,
        tls,
        template,
        windows,
        allow,
        other_nodes,
        notify,
        standby: None,
    };
    settings.standby = validate_standby(&settings)?;
    Ok(settings)
}

/// The keys of `[storage]` that describe a store: endpoint, region, bucket, credentials,
/// object options. Returns the secret and the TLS set-up.
fn validate_store(st: &StorageConfig) -> Result<(String, Option<TlsContext>), ConfigError> {
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
    let tls = validate_object_options(st)?;
    Ok((secret, tls))
}

/// `[storage.standby]` and the failover timers: the standby as settings of its own (see
/// [`Settings::standby`]), or `None` when there is none.
fn validate_standby(settings: &Settings) -> Result<Option<Arc<Settings>>, ConfigError> {
    let st = &settings.config.storage;
    check_secs(
        "storage.failover_after_secs",
        st.failover_after_secs,
        0.1,
        30.0 * 86400.0,
    )?;
    check_secs("storage.probe_secs", st.probe_secs, 0.1, 86400.0)?;
    let Some(sb) = &st.standby else {
        return Ok(None);
    };
    let rename = |e: ConfigError| ConfigError {
        key: e.key.replacen("storage.", "storage.standby.", 1),
        message: e.message,
    };
    if sb.access_key_secret.is_empty() && sb.access_key_secret_file.is_none() {
        // The systemd credential is the primary's.
        return Err(ConfigError::new(
            "storage.standby.access_key_secret",
            "is required (or access_key_secret_file)",
        ));
    }
    let storage = sb.as_storage(st);
    let (secret, tls) = validate_store(&storage).map_err(rename)?;
    let same_host = |a: &str, b: &str| {
        let norm = |u: &str| {
            url::Url::parse(u).ok().map(|u| {
                (
                    u.host_str().map(str::to_ascii_lowercase),
                    u.port_or_known_default(),
                )
            })
        };
        norm(a) == norm(b)
    };
    if same_host(&storage.endpoint, &st.endpoint) && storage.bucket == st.bucket {
        return Err(ConfigError::new(
            "storage.standby",
            format!(
                "is the primary store again (endpoint {} and bucket {:?}); a standby must be \
                 another bucket or another endpoint",
                storage.endpoint, storage.bucket
            ),
        ));
    }
    if let Some(u) = &sb.public_base_url {
        check_http_url("storage.standby.public_base_url", u)?;
    }
    let mut config = settings.config.clone();
    config.storage = storage;
    if let Some(style) = sb.presign_style {
        config.lookup.presign_style = style;
    }
    if sb.public_base_url.is_some() {
        config.lookup.public_base_url = sb.public_base_url.clone();
    }
    if let Some(k) = &sb.cdn_auth_key {
        config.lookup.cdn_auth_key = k.clone();
    }
    if config.lookup.presign_style == PresignStyle::CdnA
        && (config.lookup.public_base_url.is_none() || config.lookup.cdn_auth_key.is_empty())
    {
        return Err(ConfigError::new(
            "storage.standby.presign_style",
            "\"cdn-a\" needs public_base_url and cdn_auth_key (in [storage.standby] or [lookup])",
        ));
    }
    let media = MediaTypes::new(&config.storage.content_types);
    Ok(Some(Arc::new(Settings {
        config,
        secret,
        tls,
        media,
        standby: None,
        ..settings.clone()
    })))
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

/// `storage.ca_file` and the options sent with every new object. Returns the TLS set-up
/// with the CA's roots, when there is a CA file.
fn validate_object_options(st: &StorageConfig) -> Result<Option<TlsContext>, ConfigError> {
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
        let e = crate::util::media::normalise_ext(ext);
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
        if !crate::util::media::valid_media_type(t) {
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
        if k.eq_ignore_ascii_case("md5") || k.eq_ignore_ascii_case(SOURCE_META) {
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
    let tls = tls_context(&pem)
        .map_err(|e| ConfigError::new("storage.ca_file", format!("{}: {e}", path.display())))?;
    Ok(Some(tls))
}

/// The look-up keys beyond the five of the first release, and `[[nodes]]`. Returns the
/// client networks of `lookup.allow` and the other nodes.
fn validate_lookup_extras(config: &Config) -> Result<(Vec<Cidr>, Vec<OtherNode>), ConfigError> {
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
    let mut allow = Vec::with_capacity(lk.allow.len());
    for (i, a) in lk.allow.iter().enumerate() {
        allow.push(Cidr::parse(a).map_err(|e| ConfigError::new(format!("lookup.allow[{i}]"), e))?);
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
    let mut others = Vec::new();
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
        let mut hosts = Vec::with_capacity(n.legacy_hosts.len());
        for (j, h) in n.legacy_hosts.iter().enumerate() {
            let hkey = format!("{key}.legacy_hosts[{j}]");
            let norm = normalize_host(h).map_err(|e| ConfigError::new(hkey.clone(), e))?;
            if let Some(other) = seen_hosts.insert(norm.clone(), n.name.as_str()) {
                return Err(ConfigError::new(
                    hkey,
                    format!("{h:?} is also a legacy host of node {other:?}"),
                ));
            }
            hosts.push(norm);
        }
        // The same list may be shipped to every host: this host's own entry routes nowhere.
        if n.name != config.node.name {
            others.push(OtherNode {
                name: n.name.clone(),
                lookup_url: n.lookup_url.trim_end_matches('/').to_string(),
                legacy_hosts: hosts,
            });
        }
    }
    Ok((allow, others))
}

/// The store client's TLS set-up: the system's roots plus the certificates of `pem`.
fn tls_context(pem: &[u8]) -> Result<TlsContext, String> {
    let trust = TrustStore::empty()
        .with_native_roots(true)
        .with_pem_certificate(pem.to_vec());
    TlsContext::builder()
        .with_trust_store(trust)
        .build()
        .map_err(|e| crate::util::error::chain(&e))
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
