//! `[[notify]]` (receivers of file events) and `[notify_outbox]` (the outbox's bounds), checked
//! into [`NotifyEndpoint`]s with their secrets read.

use std::time::Duration;

use super::ConfigError;
use super::model::{Config, NOTIFY_EVENTS};
use super::secrets::read_secret_file;

/// A checked `[[notify]]` entry.
#[derive(Clone, PartialEq, Eq)]
pub struct NotifyEndpoint {
    pub url: url::Url,
    /// Subset of [`NOTIFY_EVENTS`], in that order, without repeats.
    pub events: Vec<&'static str>,
    /// The HMAC key, from `secret` or `secret_file` (empty only for commands that do not
    /// deliver: `status`, `ls`, ...).
    pub secret: String,
    pub timeout: Duration,
}

impl std::fmt::Debug for NotifyEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotifyEndpoint")
            .field("url", &self.url.as_str())
            .field("events", &self.events)
            .field("secret", &"<redacted>")
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// How a receiver is named in metrics, `status` and the status page: its URL without the
/// query or fragment (which may carry a token).
pub fn receiver_label(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            u.set_query(None);
            u.set_fragment(None);
            u.to_string()
        }
        Err(_) => url.split(['?', '#']).next().unwrap_or_default().to_string(),
    }
}

/// The shortest secret accepted: an HMAC key a receiver can rely on.
pub const MIN_SECRET_LEN: usize = 16;

pub(super) fn validate_notify(config: &Config) -> Result<Vec<NotifyEndpoint>, ConfigError> {
    let ob = &config.notify_outbox;
    if ob.max_events == 0 {
        return Err(ConfigError::new(
            "notify_outbox.max_events",
            "must be at least 1",
        ));
    }
    check_secs(
        "notify_outbox.max_age_secs",
        ob.max_age_secs,
        0.0,
        365.0 * 86400.0,
    )?;
    check_secs(
        "notify_outbox.retry_initial_secs",
        ob.retry_initial_secs,
        0.01,
        3600.0,
    )?;
    check_secs(
        "notify_outbox.retry_max_secs",
        ob.retry_max_secs,
        0.01,
        86400.0,
    )?;
    if ob.retry_max_secs < ob.retry_initial_secs {
        return Err(ConfigError::new(
            "notify_outbox.retry_max_secs",
            "must not be smaller than retry_initial_secs",
        ));
    }
    check_secs("notify_outbox.poll_secs", ob.poll_secs, 0.01, 60.0)?;
    let mut out: Vec<NotifyEndpoint> = Vec::new();
    for (i, n) in config.notify.iter().enumerate() {
        let key = |k: &str| format!("notify[{i}].{k}");
        let url = url::Url::parse(&n.url)
            .map_err(|e| ConfigError::new(key("url"), format!("not a URL ({e}): {:?}", n.url)))?;
        if (url.scheme() != "http" && url.scheme() != "https") || url.host_str().is_none() {
            return Err(ConfigError::new(
                key("url"),
                format!(
                    "must be an http:// or https:// URL with a host, got {:?}",
                    n.url
                ),
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(ConfigError::new(
                key("url"),
                "must not carry credentials (the requests are signed with the secret)",
            ));
        }
        if out.iter().any(|o| o.url == url) {
            return Err(ConfigError::new(
                key("url"),
                format!("{} is listed twice", n.url),
            ));
        }
        if n.events.is_empty() {
            return Err(ConfigError::new(
                key("events"),
                format!("must list at least one of {NOTIFY_EVENTS:?}"),
            ));
        }
        for (j, e) in n.events.iter().enumerate() {
            if !NOTIFY_EVENTS.contains(&e.as_str()) {
                return Err(ConfigError::new(
                    format!("notify[{i}].events[{j}]"),
                    format!("unknown event {e:?}; expected one of {NOTIFY_EVENTS:?}"),
                ));
            }
        }
        let events = NOTIFY_EVENTS
            .into_iter()
            .filter(|e| n.events.iter().any(|x| x == e))
            .collect();
        let secret = match (&n.secret, &n.secret_file) {
            (s, Some(_)) if !s.is_empty() => {
                return Err(ConfigError::new(
                    key("secret_file"),
                    "set either secret or secret_file, not both",
                ));
            }
            (_, Some(path)) => read_secret_file(&key("secret_file"), path)?,
            (s, None) if s.is_empty() => {
                return Err(ConfigError::new(
                    key("secret"),
                    "is required (or secret_file): every request is signed with it",
                ));
            }
            (s, None) => s.clone(),
        };
        if secret.len() < MIN_SECRET_LEN {
            return Err(ConfigError::new(
                key("secret"),
                format!("must be at least {MIN_SECRET_LEN} characters"),
            ));
        }
        check_secs(&key("timeout_secs"), n.timeout_secs, 0.1, 600.0)?;
        out.push(NotifyEndpoint {
            url,
            events,
            secret,
            timeout: Duration::from_secs_f64(n.timeout_secs),
        });
    }
    Ok(out)
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
