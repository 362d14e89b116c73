//! Switchboard's cluster layer: node identity, conversation placement and the connection registry.
//!
//! On one node everything is local: [`SingleNode`] places every conversation here and [`LocalRegistry`]
//! knows the connections of this process. The cluster work replaces them with ractor_cluster placement
//! and a Redis registry behind the same traits, so the edge does not change.

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;

use serde::{Deserialize, Serialize};
use switchboard_actors::session::ConnId;

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

/// Decides which node runs a conversation's actor.
pub trait Placement: Send + Sync {
    /// The node that owns `conv`.
    fn owner(&self, conv: &str) -> NodeId;
}

/// Every conversation lives on this one node.
pub struct SingleNode(pub NodeId);

impl Placement for SingleNode {
    fn owner(&self, _conv: &str) -> NodeId {
        self.0.clone()
    }
}

/// Who is connected where: a set per user (several devices, possibly on several nodes).
pub trait ConnectionRegistry: Send + Sync {
    /// Record a connection of `user` on `node`.
    fn register(&self, user: &str, node: &NodeId, conn: ConnId);
    /// Forget it.
    fn unregister(&self, user: &str, node: &NodeId, conn: ConnId);
    /// The nodes where `user` has at least one connection.
    fn nodes_of(&self, user: &str) -> Vec<NodeId>;
}

/// The registry of a single node, in memory.
#[derive(Default)]
pub struct LocalRegistry {
    conns: RwLock<HashMap<String, HashSet<(NodeId, ConnId)>>>,
}

impl ConnectionRegistry for LocalRegistry {
    fn register(&self, user: &str, node: &NodeId, conn: ConnId) {
        self.conns
            .write()
            .expect("registry lock")
            .entry(user.to_owned())
            .or_default()
            .insert((node.clone(), conn));
    }

    fn unregister(&self, user: &str, node: &NodeId, conn: ConnId) {
        let mut conns = self.conns.write().expect("registry lock");
        if let Some(set) = conns.get_mut(user) {
            set.remove(&(node.clone(), conn));
            if set.is_empty() {
                conns.remove(user);
            }
        }
    }

    fn nodes_of(&self, user: &str) -> Vec<NodeId> {
        let conns = self.conns.read().expect("registry lock");
        let mut nodes: Vec<NodeId> = conns
            .get(user)
            .map(|s| s.iter().map(|(n, _)| n.clone()).collect())
            .unwrap_or_default();
        nodes.sort();
        nodes.dedup();
        nodes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_node_owns_everything() {
        let me = NodeId::random();
        assert_eq!(SingleNode(me.clone()).owner("c_1"), me);
    }

    #[test]
    fn registry_tracks_devices_across_nodes() {
        let r = LocalRegistry::default();
        let (a, b) = (NodeId("a".into()), NodeId("b".into()));
        r.register("alice", &a, 1);
        r.register("alice", &a, 2);
        r.register("alice", &b, 3);
        assert_eq!(r.nodes_of("alice"), vec![a.clone(), b.clone()]);
        r.unregister("alice", &b, 3);
        assert_eq!(r.nodes_of("alice"), vec![a.clone()]);
        r.unregister("alice", &a, 1);
        r.unregister("alice", &a, 2);
        assert!(r.nodes_of("alice").is_empty());
    }
}
