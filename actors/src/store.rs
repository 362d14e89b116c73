//! The storage contract: conversations, members, messages by (conversation, seq), the dedupe index and the
//! per-user inbox.
//!
//! The actors only see [`MessageStore`]; the embedded and distributed back ends live in the `switchboard`
//! crate. Every back end passes the same conformance suite (`tests/store_conformance.rs`).

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// A user id (a JWT `sub`).
pub type UserId = String;
/// A conversation id.
pub type ConvId = String;

/// Most members a conversation may have, the creator included.
pub const MAX_MEMBERS: usize = 5_000;
/// Largest history page.
pub const MAX_PAGE: usize = 200;

/// A stored message; the same object is a `msg` frame's fields and a REST history item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Conversation.
    pub conv: ConvId,
    /// Sequence number: starts at 1, rises by exactly 1.
    pub seq: u64,
    /// Server-assigned id.
    pub id: String,
    /// The sender's id for the message (dedupe key with `conv` and `from`).
    pub msg_id: String,
    /// Sender.
    pub from: UserId,
    /// Text.
    pub body: String,
    /// Server timestamp, ms since the Unix epoch.
    pub ts: u64,
}

/// A message the conversation actor wants stored; the store assigns its `seq` if it is new.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    /// Server-assigned id (kept only if the message is new).
    pub id: String,
    /// The sender's id for the message.
    pub msg_id: String,
    /// Sender.
    pub from: UserId,
    /// Text.
    pub body: String,
    /// Server timestamp, ms.
    pub ts: u64,
}

/// What [`MessageStore::append`] did with one message of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// Stored now, with the next sequence number.
    New(Message),
    /// Stored before (same conversation, sender and `msg_id`): the original.
    Duplicate(Message),
}

impl Appended {
    /// The stored message, new or original.
    pub fn message(&self) -> &Message {
        match self {
            Self::New(m) | Self::Duplicate(m) => m,
        }
    }
}

/// Direct message or group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConversationKind {
    /// Two members, unique per pair.
    Dm,
    /// Up to [`MAX_MEMBERS`] members.
    Group,
}

/// A conversation's own fields (members are kept apart: a group may have thousands).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationInfo {
    /// Id.
    pub id: ConvId,
    /// DM or group.
    pub kind: ConversationKind,
    /// Group name (none for DMs).
    pub name: Option<String>,
    /// Creator.
    pub created_by: UserId,
    /// Creation time, ms.
    pub created_at: u64,
}

/// Whether a user may read and write a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// The user is a member.
    Member,
    /// The conversation exists; the user is not in it.
    NotMember,
    /// No such conversation.
    Unknown,
}

/// A history request; cursors are exclusive seqs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HistoryQuery {
    /// Only messages with `seq < before`.
    pub before: Option<u64>,
    /// Only messages with `seq > after`.
    pub after: Option<u64>,
    /// Page size, 1 to [`MAX_PAGE`].
    pub limit: usize,
}

/// One page of history, ascending by seq.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    /// The messages, ascending.
    pub messages: Vec<Message>,
    /// Whether more exist in the direction of travel (newer with only `after`, older otherwise).
    pub has_more: bool,
}

/// A storage failure. Nothing is acknowledged on any of them.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or did not confirm in time; retrying is safe.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Another writer appended to the conversation: the caller's idea of the last seq is stale.
    #[error("sequence conflict: expected next seq {expected}, store is at {found}")]
    SeqConflict {
        /// The first seq the caller tried to write.
        expected: u64,
        /// The store's last seq.
        found: u64,
    },
    /// Stored data could not be decoded.
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

/// The storage contract. Implementations must make `append` durable before returning `Ok`.
#[async_trait]
pub trait MessageStore: Send + Sync + 'static {
    /// Create a conversation with its members. For a DM, return the existing one if the pair already has
    /// one; the flag says whether it was created now.
    async fn create_conversation(
        &self,
        info: ConversationInfo,
        members: Vec<UserId>,
    ) -> Result<(ConversationInfo, bool), StoreError>;

    /// A conversation's fields.
    async fn conversation(&self, conv: &str) -> Result<Option<ConversationInfo>, StoreError>;

    /// A conversation's members, sorted.
    async fn members(&self, conv: &str) -> Result<Vec<UserId>, StoreError>;

    /// Whether `user` is in `conv`.
    async fn membership(&self, conv: &str, user: &str) -> Result<Membership, StoreError>;

    /// Add a member; `false` if already a member.
    async fn add_member(&self, conv: &str, user: &str) -> Result<bool, StoreError>;

    /// Remove a member (and their owner role, if any); `false` if not a member.
    async fn remove_member(&self, conv: &str, user: &str) -> Result<bool, StoreError>;

    /// The users recorded as owners of a group, sorted (empty for a DM, and for a group created before
    /// roles existed: its creator is then its owner, see [`crate::conversation`]).
    async fn owners(&self, conv: &str) -> Result<Vec<UserId>, StoreError>;

    /// Record (`owner = true`) or drop a user's owner role in `conv`; `false` if nothing changed. The
    /// caller (the conversation's single writer) checks that the user is a member.
    async fn set_owner(&self, conv: &str, user: &str, owner: bool) -> Result<bool, StoreError>;

    /// The conversations `user` belongs to (any order).
    async fn user_conversations(&self, user: &str) -> Result<Vec<ConvId>, StoreError>;

    /// The newest message of a conversation.
    async fn last_message(&self, conv: &str) -> Result<Option<Message>, StoreError>;

    /// The conversation's last seq (0 when empty).
    async fn last_seq(&self, conv: &str) -> Result<u64, StoreError> {
        Ok(self.last_message(conv).await?.map_or(0, |m| m.seq))
    }

    /// Durably append a batch, atomically. Messages whose `(conv, from, msg_id)` is already stored (or
    /// earlier in the same batch) come back as [`Appended::Duplicate`] and take no seq; the new ones take
    /// `first_seq, first_seq + 1, …` in batch order. Fails with [`StoreError::SeqConflict`] unless
    /// `first_seq` is the stored last seq + 1 — the fence that keeps seqs unique and gap-free even when a
    /// restarted conversation actor and its previous incarnation's last write overlap.
    async fn append(
        &self,
        conv: &str,
        first_seq: u64,
        batch: Vec<NewMessage>,
    ) -> Result<Vec<Appended>, StoreError>;

    /// Move `user`'s read position in `conv` forward to `seq`; a lower `seq` leaves it where it is. Durable
    /// when it returns.
    async fn set_read(&self, conv: &str, user: &str, seq: u64) -> Result<(), StoreError>;

    /// `user`'s read positions, by conversation, in one read (conversations never read are absent).
    async fn read_positions(
        &self,
        user: &str,
    ) -> Result<std::collections::HashMap<ConvId, u64>, StoreError>;

    /// A page of history (see [`HistoryQuery`]).
    async fn messages(&self, conv: &str, query: HistoryQuery) -> Result<Page, StoreError>;

    /// Finish queued writes and release resources; called once, at shutdown, after the actors stopped.
    fn close(&self) {}

    /// Why the store takes no writes until the node restarts (a full disk, a corrupted file), if it is in
    /// that state; `/readyz` reports it. A store that fails one request at a time (Cassandra) says `None`.
    fn failure(&self) -> Option<String> {
        None
    }
}

/// A shared store handle.
pub type SharedStore = Arc<dyn MessageStore>;

/// The sort key of an inbox entry: its newest activity (last message, else creation), newest first.
pub fn inbox_order(
    a: (&ConversationInfo, Option<&Message>),
    b: (&ConversationInfo, Option<&Message>),
) -> std::cmp::Ordering {
    let activity = |(info, last): (&ConversationInfo, Option<&Message>)| {
        last.map_or(info.created_at, |m| m.ts)
    };
    activity(b)
        .cmp(&activity(a))
        .then_with(|| a.0.id.cmp(&b.0.id))
}

/// The key of a DM in a back end's pair index: its two members, ordered.
pub fn dm_pair(members: &[UserId]) -> (&str, &str) {
    let a = members.first().map_or("", String::as_str);
    let b = members.get(1).map_or(a, String::as_str);
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

/// Decide what an append does, the same way in every back end: `originals[i]` is what the back end's
/// dedupe index holds for `batch[i]` (already stored), and a repeat inside the batch is a duplicate of its
/// first copy. New messages take `first_seq, first_seq + 1, …` in batch order. The back end then writes the
/// [`Appended::New`] ones.
pub fn plan_append(
    conv: &str,
    first_seq: u64,
    batch: Vec<NewMessage>,
    originals: Vec<Option<Message>>,
) -> Vec<Appended> {
    let mut seq = first_seq;
    let mut first_copy: std::collections::HashMap<(String, String), usize> =
        std::collections::HashMap::new();
    let mut results: Vec<Appended> = Vec::with_capacity(batch.len());
    for (m, original) in batch.into_iter().zip(originals) {
        let key = (m.from.clone(), m.msg_id.clone());
        if let Some(&i) = first_copy.get(&key) {
            let earlier = results[i].message().clone();
            results.push(Appended::Duplicate(earlier));
        } else if let Some(o) = original {
            results.push(Appended::Duplicate(o));
        } else {
            first_copy.insert(key, results.len());
            results.push(Appended::New(Message {
                conv: conv.to_owned(),
                seq,
                id: m.id,
                msg_id: m.msg_id,
                from: m.from,
                body: m.body,
                ts: m.ts,
            }));
            seq += 1;
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(from: &str, msg_id: &str) -> NewMessage {
        NewMessage {
            id: format!("i-{msg_id}"),
            msg_id: msg_id.into(),
            from: from.into(),
            body: "b".into(),
            ts: 1,
        }
    }

    #[test]
    fn plan_assigns_consecutive_seqs_and_spots_resends() {
        let stored = Message {
            conv: "c".into(),
            seq: 3,
            id: "old".into(),
            msg_id: "a".into(),
            from: "u".into(),
            body: "x".into(),
            ts: 0,
        };
        let batch = vec![
            new("u", "a"),
            new("u", "b"),
            new("v", "b"),
            new("u", "b"),
            new("u", "c"),
        ];
        let originals = vec![Some(stored.clone()), None, None, None, None];
        let plan = plan_append("c", 10, batch, originals);
        assert_eq!(plan[0], Appended::Duplicate(stored));
        let seqs: Vec<(bool, u64)> = plan
            .iter()
            .map(|a| (matches!(a, Appended::New(_)), a.message().seq))
            .collect();
        // "b" from u and from v are different messages; the second "b" from u repeats the first.
        assert_eq!(
            seqs,
            vec![(false, 3), (true, 10), (true, 11), (false, 10), (true, 12)]
        );
    }

    #[test]
    fn dm_pairs_are_ordered() {
        assert_eq!(dm_pair(&["bob".into(), "alice".into()]), ("alice", "bob"));
        assert_eq!(dm_pair(&["alice".into(), "bob".into()]), ("alice", "bob"));
    }
}
