//! Shared test support: the environment harness and the fault-injecting proxy.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod harness;
pub mod http;
pub mod killloop;
pub mod moto;
pub mod proxy;
pub mod receiver;

/// `record-offload --config CFG`, the built binary, for a subcommand and its arguments to follow.
pub fn cli(cfg: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_record-offload"));
    cmd.arg("--config").arg(cfg);
    cmd
}
