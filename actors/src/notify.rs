//! Offline notifications: after a conversation's write job has stored and fanned out a batch, the members
//! with no live connection anywhere in the cluster are handed to the node's [`Notifier`] in one [`Offline`]
//! per batch. The notifier queues it and returns at once: a push never slows delivery.

use std::sync::Arc;

use crate::store::{ConvId, Message, UserId};

/// One stored batch's news for the members who are offline.
#[derive(Debug, Clone)]
pub struct Offline {
    /// Conversation.
    pub conv: ConvId,
    /// The newest message of the batch (sender, seq, body).
    pub latest: Message,
    /// How many new messages the batch stored.
    pub count: usize,
    /// The members with no live connection (the senders excluded).
    pub users: Vec<UserId>,
}

/// Where offline notifications go. Called from write jobs: must not block or wait.
pub trait Notifier: Send + Sync + std::fmt::Debug + 'static {
    /// Queue (or drop, if full) the notifications of one batch.
    fn offline(&self, note: Offline);
}

/// A shared notifier handle.
pub type SharedNotifier = Arc<dyn Notifier>;
