//! Leaf modules: pure functions and small types every layer may use. Nothing here imports
//! another module of this crate outside `util`.

pub mod error;
pub mod failpoint;
pub mod filter;
pub mod fs;
pub mod hasher;
pub mod heartbeat;
pub mod human;
pub mod keys;
pub mod md5pair;
pub mod media;
pub mod net;
pub mod throttle;
pub mod turns;
