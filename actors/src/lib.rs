//! Switchboard's actors, their messages and supervisors, and the storage contract.
//!
//! # Layout
//! - [`behaviour`]: the extension API — typed, async hooks run inside the actors, guarded.
//! - [`cluster`]: what the actors need from a cluster (placement, forwarding, remote fan-out).
//! - [`system`]: the root of the supervision tree and the handle the edge holds.
//! - [`conversations`] / [`conversation`]: one single-writer actor per active conversation.
//! - [`sessions`] / [`session`]: the session directory, one entry per online user listing its connections
//!   (a row, not an actor: decision 0009).
//! - [`connection`]: one loop per WebSocket, in the task that owns its socket (decision 0007).
//! - [`presence`]: sharded, supervised presence actors: online/offline across nodes, debounced, last seen.
//! - [`outbound`]: a connection's bounded outbound queue, pushed by actors and pulled by the transport.
//! - [`supervisor`]: Erlang restart intensity, used by every supervisor.
//! - [`notify`]: offline notifications, handed to the node's notifier after each stored batch.
//! - [`protocol`]: the JSON wire protocol, decoded into enums here and nowhere deeper.
//! - [`store`] / [`history`]: the `MessageStore` trait and the reads shared by socket and REST.
//!
//! This crate knows no transport and no database driver: the edge drains [`outbound::OutboundQueue`]
//! into its sockets, the back ends implement [`store::MessageStore`].

pub mod behaviour;
pub mod cluster;
pub mod connection;
pub mod conversation;
pub mod conversations;
pub mod history;
pub mod notify;
pub mod outbound;
pub mod presence;
pub mod protocol;
pub mod session;
pub mod sessions;
pub mod store;
pub mod supervisor;
pub mod system;

pub use ractor;
