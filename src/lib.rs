//! The `switchboard` server: the actix-web edge, REST, configuration, authentication and storage back ends.
//!
//! # Layout
//! - [`config`]: one typed configuration from flags, `SWITCHBOARD_*` environment and a TOML file.
//! - [`auth`]: JWT verification and dev tokens.
//! - [`store`]: the back ends of the actors' `MessageStore`.
//! - [`push`]: offline notifications (log, or a webhook).
//! - [`http`]: the WebSocket edge and the REST API.
//! - [`server`]: [`server::Server`], started from a listener and stopped by a drain.
//!
//! Only `main.rs` reads flags and the environment.

pub mod auth;
pub mod config;
pub mod http;
pub mod push;
pub mod server;
pub mod store;
