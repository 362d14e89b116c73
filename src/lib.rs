//! The `switchboard` server: the actix-web edge, REST, configuration, authentication and storage back ends —
//! usable as a library: [`Server::builder`] takes a [`Config`] and your [`Behaviour`](behaviour::Behaviour)s
//! (`docs/extending.md`), then runs on your listener until your shutdown future resolves.
//!
//! # Layout
//! - [`builder`]: [`ServerBuilder`], Switchboard as a library.
//! - [`behaviour`]: the extension API (re-exported from the actors crate, where the hooks run).
//! - [`config`]: one typed configuration from flags, `SWITCHBOARD_*` environment and a TOML file.
//! - [`auth`]: JWT verification and dev tokens.
//! - [`store`]: the back ends of the actors' `MessageStore`.
//! - [`push`]: offline notifications (log, or a webhook).
//! - [`hook`]: the HTTP hook, connect and message decisions made by a service over HTTP.
//! - [`http`]: the WebSocket edge and the REST API.
//! - [`server`]: [`Server`], started from a listener and stopped by a drain.
//! - [`testing`]: an in-process node for testing behaviours.
//! - `fuzzing` (hidden): entry points for the `cargo fuzz` targets in `fuzz/`.
//!
//! Only `main.rs` reads flags and the environment.

pub mod auth;
pub mod builder;
pub mod config;
#[doc(hidden)]
pub mod fuzzing;
pub mod hook;
pub mod http;
pub mod push;
pub mod server;
pub mod store;
pub mod testing;

pub use builder::ServerBuilder;
pub use config::Config;
pub use server::Server;
pub use switchboard_actors::behaviour;
