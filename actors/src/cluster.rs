//! What the actors need from a cluster, and nothing more: where a conversation's actor lives, how to reach it
//! there, and how to reach members connected to other nodes. `switchboard-cluster` implements [`Cluster`]
//! with ractor_cluster; on one node there is none and every conversation is local.
//!
//! The contract keeps the single-node guarantees across nodes:
//! - **Order.** [`Cluster::forward_send`] is called in the order a connection made its sends and must hand
//!   them to the owner in that order (one ordered link per node pair does it).
//! - **No loss.** A forwarded send whose owner went away unanswered comes back as [`Lost`], and
//!   [`crate::conversations::PendingReply`] resubmits it to whoever owns the conversation now (the store's
//!   dedupe makes that safe, its seq fence keeps seqs unique if two nodes briefly both write).
//! - **Fan-out.** The owner's write job calls [`Cluster::fan_out`] once per batch, after the local fan-out:
//!   one message per node that has online members, whatever the group's size, which also carries the
//!   answers to the batch's sends from that node. A send made on another node thus costs its forward, and
//!   nothing more than the fan-out: at most three inter-node messages on three nodes.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::conversation::SendResult;
use crate::protocol::{ProtocolError, ReceiptKind};
use crate::session::ConnId;
use crate::store::UserId;

/// A node's name in the cluster.
pub type NodeName = Arc<str>;

/// The connection a send came from: it gets the `ack` and not the `msg`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A connection on this node.
    Here(ConnId),
    /// A connection on another node (a send forwarded to this owner).
    Remote {
        /// The node the connection is on.
        node: NodeName,
        /// Its id there.
        conn: ConnId,
    },
}

impl Origin {
    /// The connection, if it is on this node.
    pub fn here(&self) -> Option<ConnId> {
        match self {
            Self::Here(conn) => Some(*conn),
            Self::Remote { .. } => None,
        }
    }

    /// The connection, if it is on `node`.
    pub fn on(&self, node: &str) -> Option<ConnId> {
        match self {
            Self::Remote { node: n, conn } if **n == *node => Some(*conn),
            _ => None,
        }
    }
}

/// A message frame on its way to members, and the connection that sent it (which gets an `ack` instead).
pub type Outgoing = (Bytes, Option<Origin>);

/// The owner went away (or could not be reached) before answering: resubmit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lost;

/// What the owner says of a forwarded send: its outcome, or [`Lost`] when its actor went away first.
pub type Outcome = Result<SendResult, Lost>;

/// The answer to a send forwarded to its owner.
pub type RemoteReply = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// Where the owner answers a send another node forwarded: the sender's node and its tag there. The answer
/// travels with the batch's fan-out to that node (one message carries both), or on its own for a refusal.
/// Dropped unanswered (its actor died), it answers [`Lost`], as a dropped reply port would.
pub struct RemoteAnswer {
    cluster: SharedCluster,
    node: NodeName,
    tag: u64,
    answered: bool,
}

impl RemoteAnswer {
    /// The answer to send `tag` from `node`.
    pub fn new(cluster: SharedCluster, node: NodeName, tag: u64) -> Self {
        Self {
            cluster,
            node,
            tag,
            answered: false,
        }
    }

    /// The sender's node and tag, to answer with a batch's fan-out.
    pub fn take(mut self) -> (NodeName, u64) {
        self.answered = true;
        (self.node.clone(), self.tag)
    }

    /// Answer now, on its own.
    pub fn send(self, outcome: SendResult) {
        let cluster = self.cluster.clone();
        let (node, tag) = self.take();
        cluster.answer(&node, vec![(tag, Ok(outcome))]);
    }
}

impl Drop for RemoteAnswer {
    fn drop(&mut self) {
        if !self.answered {
            self.cluster.answer(&self.node, vec![(self.tag, Err(Lost))]);
        }
    }
}

impl std::fmt::Debug for RemoteAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RemoteAnswer({}#{})", self.node, self.tag)
    }
}

/// Answers to forwarded sends, by the sender's node: `(node, tag, outcome)`.
pub type RemoteAnswers = Vec<(NodeName, u64, Outcome)>;

/// A best-effort signal for a conversation's members: neither stored nor answered.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SignalKind {
    /// The sender is typing.
    Typing,
    /// The sender's device received or showed the conversation up to `seq`.
    Receipt {
        /// Delivered or read.
        kind: ReceiptKind,
        /// Up to this seq.
        seq: u64,
    },
}

/// A signal on its way to its conversation's owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signal {
    /// Who sends it.
    pub from: UserId,
    /// What it says.
    pub kind: SignalKind,
    /// The connection it came from (which does not get it back).
    pub origin: Option<Origin>,
}

/// A membership change routed to the conversation's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberChange {
    /// Add the user.
    Add,
    /// Remove the user.
    Remove,
    /// Give the user (a member) this role.
    SetRole(Role),
}

/// A member's role in a group. DMs have none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Adds and removes members and changes roles. The creator is the first; a group keeps at least one.
    Owner,
    /// Sends, reads and leaves.
    Member,
}

/// Which members of a conversation are online on which other node, resolved by the cluster and kept by the
/// conversation until the cluster's view of who is online where, or the member list, changes.
#[derive(Debug, Default)]
pub struct RemoteRecipients {
    /// The cluster's interest generation and the member-list version this was resolved at.
    pub resolved_at: Option<(u64, u64)>,
    /// Per node, its online members.
    pub nodes: Vec<(NodeName, Vec<UserId>)>,
}

/// The cluster, as the actors see it.
#[async_trait]
pub trait Cluster: Send + Sync + 'static {
    /// The node whose actor serves `conv`, or `None` when it is this node.
    fn owner(&self, conv: &str) -> Option<NodeName>;

    /// Hand a send to `node`, which owns `conv`. Must keep the order of calls for each node; the returned
    /// future answers the send (the owner answers through a [`RemoteAnswer`]).
    fn forward_send(
        &self,
        node: &NodeName,
        conv: &str,
        from: &str,
        msg_id: &str,
        body: &str,
        origin: Option<ConnId>,
    ) -> Result<RemoteReply, Lost>;

    /// Change a member through the owner's single writer.
    async fn forward_member(
        &self,
        node: &NodeName,
        conv: &str,
        user: &str,
        change: MemberChange,
        by: Option<&str>,
    ) -> Result<Result<bool, ProtocolError>, Lost>;

    /// Resolves once `node` has seen every session change this node made before the call (they travel on
    /// the same ordered link): after it, a message that node commits reaches this node's new connections.
    async fn barrier(&self, node: &NodeName) -> Result<(), Lost>;

    /// Send a committed batch (seq order) to every other node where a member is online, together with the
    /// answers to the batch's sends that came from other nodes: one message per node, whatever the group's
    /// size.
    fn fan_out(
        &self,
        conv: &str,
        members: &HashSet<UserId>,
        members_version: u64,
        frames: &[Outgoing],
        answers: RemoteAnswers,
        cache: &mut RemoteRecipients,
    );

    /// Hand a signal to `node`, which owns `conv` (best effort: nothing answers).
    fn forward_signal(&self, node: &NodeName, conv: &str, signal: &Signal) -> Result<(), Lost>;

    /// Send a signal's frame to every other node where a member is online (one message per node); each
    /// drops it for connections whose queue is half full.
    fn fan_out_signal(
        &self,
        conv: &str,
        members: &HashSet<UserId>,
        members_version: u64,
        frame: &Bytes,
        origin: Option<&Origin>,
        cache: &mut RemoteRecipients,
    );

    /// Keep only the users of `users` with no connection on any other node.
    fn retain_offline(&self, users: &mut Vec<UserId>);

    /// Whether `user` has a connection on another node (as this node last heard).
    fn online_elsewhere(&self, user: &str) -> bool;

    /// Every user with a connection on another node (a presence actor rebuilding its state reads it).
    fn users_elsewhere(&self) -> Vec<UserId>;

    /// Answer sends that `node` forwarded, outside a fan-out (a refusal, a lost actor).
    fn answer(&self, node: &NodeName, answers: Vec<(u64, Outcome)>);

    /// A connection of `user` opened on this node (`first`: the user had none here). Called under the session
    /// directory's lock, so calls come in the order of the changes: must not block.
    fn connected(&self, user: &str, conn: ConnId, first: bool);

    /// A connection of `user` closed on this node (`last`: the user has none left here). Same rules.
    fn disconnected(&self, user: &str, conn: ConnId, last: bool);
}

/// A shared cluster handle.
pub type SharedCluster = Arc<dyn Cluster>;
