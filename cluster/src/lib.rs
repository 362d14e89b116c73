//! Switchboard's cluster layer: node identity, conversation placement and the connection registry.
//!
//! # Layout
//! - [`node`]: [`node::ClusterNode`], this node's links, gateway and membership; the actors' `Cluster`.
//! - [`placement`]: rendezvous hashing of conversations over the live nodes.
//! - [`tls`]: optional mutual TLS between nodes.
//! - [`wire`]: the typed messages between nodes (postcard).
//! - [`registry`]: who is connected where, in Redis (user → set of (node, connection), with a TTL).

pub mod node;
pub mod placement;
pub mod registry;
pub mod tls;
pub mod wire;

use serde::{Deserialize, Serialize};

/// A node's identity: stable for the life of the process, unique in the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub String);

impl NodeId {
    /// A fresh random id (`n_` + 12 hex digits).
    pub fn random() -> Self {
        Self(format!(
            "n_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ))
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
