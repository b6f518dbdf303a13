//! Playback look-ups: turning what the business database holds (a legacy nginx path or URL)
//! into something a player can fetch.
//!
//! - [`legacy`] reads look-up input into a path relative to `watch.root` and refuses anything
//!   that would leave it.
//! - [`sign`] builds presigned GET URLs for the stored object (OSS V1, OSS V4, CDN type A) and
//!   the expiry rounding that keeps those URLs stable long enough to be cached.
pub mod legacy;
pub mod sign;
