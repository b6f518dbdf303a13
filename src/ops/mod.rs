//! The edges people use: the command line and what its commands do besides running the
//! daemon.
//!
//! - `cli`: the `record-offload` command line (clap), `run`, `check-config`, `resolve`,
//!   `retry`; one clear line on stderr for every failure.
//! - `status`: `status` and `ls`.
//! - `import`: queueing the files of an existing tree.
//! - `demo` (feature `dev-server`): `demo` and `dev-s3`.

pub mod cli;
#[cfg(feature = "dev-server")]
mod demo;
pub mod import;
mod status;

use crate::util::human::human_bytes;
