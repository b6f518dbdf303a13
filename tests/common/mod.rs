#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod proxy;
