//! The typed messages nodes exchange, encoded with postcard (decision 0002) inside ractor_cluster's frames.
//!
//! ractor_cluster carries a message to a remote actor as bytes its `BytesConvertable` produced, and panics
//! the receiving actor if they do not decode. So the gateway's ractor message (`GatewayMsg`)
//! carries plain bytes, and this module decodes them into the enums below with a `Result`: a peer of another
//! version, or a corrupt frame, costs an error in the log, never the gateway.

use serde::{Deserialize, Serialize};
use switchboard_actors::cluster::{MemberChange, SignalKind};
use switchboard_actors::protocol::ProtocolError;
use switchboard_actors::store::Message;

/// A one-way message, with the node that sent it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The sending node's name.
    pub from: String,
    /// What it says.
    pub cast: Cast,
}

/// One-way messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cast {
    /// Messages the owner of `conv` committed, in seq order, for `users` (the members online on the receiver).
    Deliver {
        /// Conversation.
        conv: String,
        /// The receiver's online members of the conversation, as the owner knows them.
        users: Vec<String>,
        /// The `msg` frames, JSON as clients get it.
        frames: Vec<WireFrame>,
        /// Answers to the batch's sends that came from the receiver.
        answers: Vec<WireAnswer>,
    },
    /// A send for a conversation the receiver owns; answered by a [`WireAnswer`] with the batch's fan-out
    /// (or in [`Cast::Answers`]).
    Send {
        /// The sender's tag for it.
        tag: u64,
        /// Conversation.
        conv: String,
        /// Sender.
        from: String,
        /// The client's id for the message.
        msg_id: String,
        /// Text (already checked against the body limit).
        body: String,
        /// The sending connection on the sending node.
        origin: Option<u64>,
    },
    /// A signal (typing, a receipt) for a conversation the receiver owns.
    Signal {
        /// Conversation.
        conv: String,
        /// Sender.
        from: String,
        /// What it says.
        kind: SignalKind,
        /// The sending connection on the sending node.
        origin: Option<u64>,
    },
    /// A signal's frame for `users` (the receiver's online members), dropped where a queue is half full.
    SignalOut {
        /// The receiver's online members of the conversation.
        users: Vec<String>,
        /// The frame's JSON.
        json: Vec<u8>,
        /// The receiver's connection that sent it, to skip.
        skip: Option<u64>,
    },
    /// Answers to sends from the receiver that no fan-out carried (refusals, a lost actor).
    Answers {
        /// The answers.
        answers: Vec<WireAnswer>,
    },
    /// `user` opened their first connection on the sender.
    Online {
        /// User.
        user: String,
    },
    /// `user` closed their last connection on the sender.
    Offline {
        /// User.
        user: String,
    },
    /// Every user online on the sender: replaces what the receiver knew of it.
    Snapshot {
        /// Users.
        users: Vec<String>,
    },
}

/// One `msg` frame of a [`Cast::Deliver`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireFrame {
    /// The frame's JSON.
    pub json: Vec<u8>,
    /// The receiver's connection that sent it (it got the `ack`), to skip.
    pub skip: Option<u64>,
}

/// The answer to a [`Cast::Send`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireAnswer {
    /// The send's tag.
    pub tag: u64,
    /// Its outcome.
    pub outcome: WireOutcome,
}

/// What became of a forwarded send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireOutcome {
    /// Stored (new or original).
    Stored(Message),
    /// Refused.
    Refused(ProtocolError),
    /// The conversation's actor went away before answering: resubmit to whoever owns it now.
    Retry,
}

/// Requests that expect an answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Call {
    /// A member change for a conversation the receiver owns.
    Member {
        /// Conversation.
        conv: String,
        /// User.
        user: String,
        /// Add, remove or set a role.
        change: MemberChange,
        /// Who asks (the owner checks their role), or `None` for the server itself.
        by: Option<String>,
    },
    /// Answered once every earlier message from the caller is handled.
    Barrier,
    /// The receiver's state, for `GET /v1/cluster`.
    Status,
}

/// What a node says of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Name.
    pub name: String,
    /// `up` or `draining`.
    pub state: String,
    /// Its HTTP/WebSocket address.
    pub http: String,
    /// Its cluster address.
    pub cluster: String,
    /// Open WebSocket connections.
    pub connections: u64,
    /// Users with at least one connection there.
    pub online_users: u64,
    /// Conversation actors running there.
    pub conversations: u64,
}

/// Encode for the wire.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("wire types always encode")
}

/// Decode from the wire.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_garbage() {
        let call = Call::Member {
            conv: "c".into(),
            user: "alice".into(),
            change: MemberChange::SetRole(switchboard_actors::cluster::Role::Owner),
            by: Some("bob".into()),
        };
        assert_eq!(decode::<Call>(&encode(&call)).unwrap(), call);
        let cast = Envelope {
            from: "n2".into(),
            cast: Cast::Deliver {
                conv: "c".into(),
                users: vec!["bob".into()],
                frames: vec![WireFrame {
                    json: b"{}".to_vec(),
                    skip: None,
                }],
                answers: vec![WireAnswer {
                    tag: 3,
                    outcome: WireOutcome::Retry,
                }],
            },
        };
        assert_eq!(decode::<Envelope>(&encode(&cast)).unwrap(), cast);
        assert!(decode::<Call>(&[0xff, 0xff, 0xff]).is_err());
        assert!(decode::<Envelope>(&encode(&call)[..3]).is_err());
    }
}
