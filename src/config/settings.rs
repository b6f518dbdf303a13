//! [`Settings`]: the validated configuration and what validation parsed from it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use aws_smithy_http_client::tls::TlsContext;

use super::model::{Config, PresignStyle};
use crate::util::filter::Filter;
use crate::util::keys::KeyTemplate;
use crate::util::media::MediaTypes;
use crate::util::net::Cidr;
use crate::util::throttle::Windows;

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
    /// `watch.include` and `watch.exclude`, compiled.
    pub filter: Filter,
    pub listen: Vec<ListenAddr>,
    /// Content types by extension: the built-in table with `storage.content_types` over it.
    pub media: MediaTypes,
    /// The store client's TLS roots with `storage.ca_file`'s added (`None`: no CA file).
    pub tls: Option<TlsContext>,
    /// `storage.key_template`, checked against `node.name`.
    pub template: KeyTemplate,
    /// `upload.windows`.
    pub windows: Windows,
    /// `lookup.allow`: client networks (empty: every client).
    pub allow: Vec<Cidr>,
    /// `[[nodes]]` other than this one, with their legacy hosts normalised.
    pub other_nodes: Vec<OtherNode>,
    /// `[storage.standby]`, as settings of their own: `config.storage` is the standby's (with
    /// the primary's key template), `secret` and `tls` are its own, and `config.lookup` carries
    /// its signing settings where they differ. `None`: no standby.
    pub standby: Option<Arc<Settings>>,
    /// `[[notify]]`, checked, with their secrets read.
    pub notify: Vec<super::notify::NotifyEndpoint>,
}

/// Another recording host, as look-ups route to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherNode {
    pub name: String,
    /// Its look-up server, without a trailing `/`.
    pub lookup_url: String,
    /// Its legacy hosts as [`crate::util::net::normalize_host`] spells them.
    pub legacy_hosts: Vec<String>,
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
