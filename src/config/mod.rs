//! Configuration: built-in defaults, then the TOML file, then `RECORD_OFFLOAD_*` environment
//! variables (`__` between levels), merged with figment ([`load`]) and then validated
//! ([`validate`]) into [`Settings`]: the serde model plus every value the stages need already
//! parsed (globs, key template, upload windows, client networks, other nodes' hosts, the CA).
//!
//! Loading never panics. Every problem is reported as one [`ConfigError`] that names the key
//! (`watch.include[1]`, `storage.bucket`, ...) and says what is wrong with it, so
//! `check-config` and `run` can print one clear line and exit non-zero.
//!
//! - `model`: the TOML model and its defaults (every key of `config.example.toml`).
//! - `load`: where configuration comes from, figment's errors as one line.
//! - `validate`: the checks, and what they derive.
//! - `settings`: [`Settings`], what the stages receive.
//! - `notify`: `[[notify]]` and `[notify_outbox]`, checked into [`NotifyEndpoint`]s.
//! - `secrets`: the storage secret (inline, file, systemd credential) and redaction.

mod load;
mod model;
mod notify;
mod secrets;
mod settings;
mod validate;

#[cfg(test)]
mod tests;

use std::fmt;

pub use load::{
    DEFAULT_CONFIG_PATH, ENV_PREFIX, Source, from_toml_str, load, load_unvalidated,
    load_without_secret,
};
pub use model::*;
pub use notify::{NotifyEndpoint, receiver_label};
pub use secrets::{CREDENTIAL_NAME, redacted_toml};
pub use settings::{ListenAddr, OtherNode, Settings};
pub use validate::{
    MAX_PART_MIB, MAX_PRESIGN_SECS, MIN_PART_MIB, oss_endpoint_region, parse_listen, validate,
};

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
