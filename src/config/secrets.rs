//! The storage secret — inline, in a file only the service may read, or the systemd
//! credential `access_key_secret` — and the redacted copy of the configuration that
//! `check-config` prints.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use super::ConfigError;
use super::model::StorageConfig;
use super::settings::Settings;

/// The largest secret file read (a secret is a line; this is generous).
const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// Name of the systemd credential (`LoadCredential=access_key_secret:...`).
pub const CREDENTIAL_NAME: &str = "access_key_secret";

pub(super) fn read_secret(st: &StorageConfig) -> Result<String, ConfigError> {
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
    read_secret_file(key, &path)
}

/// Reads a secret from a file: a regular file of at most 64 KiB that other users cannot
/// read, trimmed, not empty. `key` names the setting in errors.
pub(super) fn read_secret_file(key: &str, path: &Path) -> Result<String, ConfigError> {
    let meta = std::fs::metadata(path)
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
    std::fs::File::open(path)
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
    if let Some(sb) = &mut c.storage.standby {
        if !sb.access_key_secret.is_empty() {
            sb.access_key_secret = "<redacted>".to_string();
        }
        if sb.cdn_auth_key.as_ref().is_some_and(|k| !k.is_empty()) {
            sb.cdn_auth_key = Some("<redacted>".to_string());
        }
    }
    for secret in c.lookup.auth.keys.values_mut() {
        *secret = "<redacted>".to_string();
    }
    for n in &mut c.notify {
        if !n.secret.is_empty() {
            n.secret = "<redacted>".to_string();
        }
    }
    toml::to_string_pretty(&c).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
}
