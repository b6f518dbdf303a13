//! Playback look-ups: turning what the business database holds (a legacy nginx path or URL)
//! into something a player can fetch.
//!
//! - [`legacy`] reads look-up input into a path relative to `watch.root` and refuses anything
//!   that would leave it.
//! - [`sign`] builds presigned GET URLs for the stored object (SigV4, OSS V1, OSS V4, CDN
//!   type A) and the expiry rounding that keeps those URLs stable long enough to be cached;
//!   [`signer`] holds the configured style and signs object keys with it.
//! - [`resolve`] decides the answer for one input (stored → signed URL, only local → this
//!   agent's URL, another node's → that node, else not found); the HTTP server and
//!   `record-offload resolve` share it.
//! - [`index`] keeps the stored files in memory, so that their look-ups need no journal read.
//! - [`auth`] checks who may ask: the `lookup.allow` networks and signed requests.
//! - [`range`] reads `Range` headers for local files.
//! - [`server`] is the HTTP server on every `lookup.listen` address: limits, connections,
//!   shutdown; `listen` binds its sockets, `routes` answers each route, `files` serves local
//!   files (ranges, conditional requests), `answer` builds JSON and redirect answers, `ui`
//!   and `ui_page` the status page (`GET /ui`).
mod answer;
pub mod auth;
mod files;
pub mod index;
pub mod legacy;
mod listen;
pub mod range;
pub mod resolve;
mod routes;
pub mod server;
pub mod sign;
pub mod signer;
mod ui;
mod ui_page;
