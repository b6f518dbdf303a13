//! Shared test support: the environment harness and the fault-injecting proxy.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod harness;
pub mod http;
pub mod killloop;
pub mod moto;
pub mod proxy;
pub mod receiver;
