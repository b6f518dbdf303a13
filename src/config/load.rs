//! Where configuration comes from: built-in defaults, the TOML file, the environment.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};

use super::ConfigError;
use super::model::Config;
use super::settings::Settings;
use super::validate::validate;

/// Default location of the config file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/record-offload/config.toml";
/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "RECORD_OFFLOAD_";

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

/// Loads and validates the configuration for a command that only uses the journal (`status`,
/// `ls`, `retry`, `import`): the storage secret is neither required nor read, so an operator
/// can run them where the daemon's secret is out of reach (a systemd credential, a file only
/// the service user reads). The returned settings carry no secret.
pub fn load_without_secret(source: &Source) -> Result<Settings, ConfigError> {
    let mut config = load_unvalidated(source)?;
    config.storage.access_key_secret = "unused".to_string();
    config.storage.access_key_secret_file = None;
    for n in &mut config.notify {
        n.secret = "unused-by-this-command".to_string();
        n.secret_file = None;
    }
    let mut settings = validate(config)?;
    for n in &mut settings.notify {
        n.secret.clear();
    }
    for n in &mut settings.config.notify {
        n.secret.clear();
    }
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

pub(super) fn from_figment(err: figment::Error) -> ConfigError {
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
pub(super) fn one_line(message: &str) -> String {
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
