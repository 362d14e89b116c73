//! The WebSocket wire protocol: client frames decoded into enums at the edge, server frames encoded once.
//!
//! Nothing deeper than this module looks at JSON text from a client. A `msg` frame is serialised once per
//! message and the same bytes are handed to every recipient connection.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::store::Message;

/// Longest accepted `msg_id` or conversation id, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// A frame a client may send, decoded and validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    /// Send a message to a conversation.
    Send {
        /// The client's id for this message; a resend with the same id is deduplicated.
        msg_id: String,
        /// Target conversation.
        conv: String,
        /// Message text (at most the configured body limit, in UTF-8 bytes).
        body: String,
    },
    /// Replay messages with `seq > after_seq`.
    Sync {
        /// Conversation to replay.
        conv: String,
        /// Exclusive lower bound.
        after_seq: u64,
    },
    /// Application-level keepalive; answered with `pong`.
    Ping,
    /// The user is typing in a conversation (best effort; not answered).
    Typing {
        /// Conversation.
        conv: String,
    },
    /// The user's device received (`delivered`) or showed (`read`) a conversation up to `seq` (best effort;
    /// not answered).
    Receipt {
        /// Conversation.
        conv: String,
        /// Delivered or read.
        kind: ReceiptKind,
        /// Up to this seq.
        seq: u64,
    },
    /// Watch these users' presence: replaces the connection's list (an empty list stops watching). Answered
    /// at once with a `presence` frame for each, then one per change.
    PresenceSubscribe {
        /// The users to watch, without repeats (at most [`MAX_WATCHED`]).
        users: Vec<String>,
    },
}

/// Most users one connection may watch with `presence_subscribe` (and ask about in one `GET /v1/presence`).
pub const MAX_WATCHED: usize = 1000;

/// Whether a user has a live connection (as presence events say it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceState {
    /// At least one device is connected, on some node.
    Online,
    /// No device, for longer than the presence grace period.
    Offline,
}

/// What a receipt says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptKind {
    /// The device has the messages.
    Delivered,
    /// The user has seen them.
    Read,
}

/// Stable, documented error codes (see `docs/protocol.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not valid JSON (or not a JSON object).
    InvalidJson,
    /// The `op` is not one the server knows.
    UnknownOp,
    /// A required field is absent.
    MissingField,
    /// A field has the wrong type or an invalid value.
    InvalidField,
    /// The body is over the configured limit.
    BodyTooLarge,
    /// The conversation does not exist.
    UnknownConversation,
    /// The caller is not a member of the conversation.
    NotMember,
    /// Too many requests, or a full queue; retry after `retry_after_ms`.
    RateLimited,
    /// The message store did not confirm the write; retrying with the same `msg_id` is safe.
    StoreUnavailable,
    /// Authentication failed.
    Unauthorized,
    /// The user, or the client's address, already has as many WebSockets open as the node allows.
    TooManyConnections,
    /// The browser page's origin is not allowed to open a WebSocket.
    ForbiddenOrigin,
    /// The node is draining (or starting): connect to another node or retry later.
    Unavailable,
    /// A bug or an unexpected failure on the server.
    Internal,
    /// A behaviour (a server extension) refused the connection, the message or the member change.
    Rejected,
    /// A behaviour failed (panicked or ran over its time budget) while deciding; retry later.
    BehaviourFailed,
    /// The caller's role does not allow the change: only a group's owners add members, remove others and
    /// change roles.
    Forbidden,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::UnknownOp => "unknown_op",
            Self::MissingField => "missing_field",
            Self::InvalidField => "invalid_field",
            Self::BodyTooLarge => "body_too_large",
            Self::UnknownConversation => "unknown_conversation",
            Self::NotMember => "not_member",
            Self::RateLimited => "rate_limited",
            Self::StoreUnavailable => "store_unavailable",
            Self::Unauthorized => "unauthorized",
            Self::TooManyConnections => "too_many_connections",
            Self::ForbiddenOrigin => "forbidden_origin",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
            Self::Rejected => "rejected",
            Self::BehaviourFailed => "behaviour_failed",
            Self::Forbidden => "forbidden",
        }
    }
}

/// An error to report to a client: a code, a human-readable message and, for a `send`, its `msg_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtocolError {
    /// The stable code.
    pub code: ErrorCode,
    /// Human-readable detail (never contains message bodies).
    pub message: String,
    /// The `msg_id` of the send this answers, when known.
    pub msg_id: Option<String>,
    /// For `rate_limited`: when to retry.
    pub retry_after_ms: Option<u64>,
}

impl ProtocolError {
    /// An error with no `msg_id`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            msg_id: None,
            retry_after_ms: None,
        }
    }

    /// Attach the `msg_id` of the send this error answers.
    pub fn for_msg(mut self, msg_id: Option<&str>) -> Self {
        self.msg_id = msg_id.map(str::to_owned);
        self
    }
}

/// WebSocket close codes the server uses (see `docs/protocol.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// 1000: normal closure.
    Normal,
    /// 1002: the client broke the WebSocket protocol.
    ProtocolError,
    /// 1007: a text message that is not UTF-8.
    InvalidPayload,
    /// 1008: the connection's token expired.
    TokenExpired,
    /// 1009: a frame over the frame limit.
    TooBig,
    /// 1011: an internal error (the connection's loop ended without closing).
    Internal,
    /// 1012: the server is restarting or draining; reconnect elsewhere or later.
    ServiceRestart,
    /// 1013: the node admits no more handshakes this instant; the reason says when to retry.
    TryAgainLater,
    /// 4001: no frame from the client for the heartbeat timeout.
    IdleTimeout,
    /// 4002: the client did not read fast enough and its outbound queue filled up.
    SlowConsumer,
}

impl CloseCode {
    /// The numeric close code.
    pub fn code(self) -> u16 {
        match self {
            Self::Normal => 1000,
            Self::ProtocolError => 1002,
            Self::InvalidPayload => 1007,
            Self::TokenExpired => 1008,
            Self::TooBig => 1009,
            Self::Internal => 1011,
            Self::ServiceRestart => 1012,
            Self::TryAgainLater => 1013,
            Self::IdleTimeout => 4001,
            Self::SlowConsumer => 4002,
        }
    }

    /// The close reason text sent with the code.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Normal => "bye",
            Self::ProtocolError => "protocol_error",
            Self::InvalidPayload => "invalid_utf8",
            Self::TokenExpired => "token_expired",
            Self::TooBig => "frame_too_large",
            Self::Internal => "internal",
            Self::ServiceRestart => "service_restart",
            Self::TryAgainLater => "try_again_later",
            Self::IdleTimeout => "idle_timeout",
            Self::SlowConsumer => "slow_consumer",
        }
    }
}

/// Decode one text frame. `max_body` is the body limit in UTF-8 bytes.
pub fn decode_client_frame(text: &str, max_body: usize) -> Result<ClientFrame, ProtocolError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ProtocolError::new(ErrorCode::InvalidJson, format!("invalid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(ProtocolError::new(
            ErrorCode::InvalidJson,
            "a frame must be a JSON object",
        ));
    };
    // Any error but a sync's carries the frame's string `msg_id`, whatever the op (docs/protocol.md).
    let msg_id = obj.get("msg_id").and_then(Value::as_str);
    let fail = |e: ProtocolError| e.for_msg(msg_id);
    let op = required_str(&obj, "op").map_err(fail)?;
    match op {
        "send" => {
            let msg_id = required_str(&obj, "msg_id").map_err(fail)?.to_owned();
            let conv = id_field(&obj, "conv").map_err(fail)?;
            let body = required_str(&obj, "body").map_err(fail)?;
            check_send(&msg_id, body, max_body)?;
            Ok(ClientFrame::Send {
                msg_id,
                conv,
                body: body.to_owned(),
            })
        }
        "sync" => {
            let conv = id_field(&obj, "conv")?;
            let after_seq = seq_field(&obj, "after_seq")?;
            Ok(ClientFrame::Sync { conv, after_seq })
        }
        "ping" => Ok(ClientFrame::Ping),
        "typing" => Ok(ClientFrame::Typing {
            conv: id_field(&obj, "conv").map_err(fail)?,
        }),
        "delivered" | "read" => Ok(ClientFrame::Receipt {
            conv: id_field(&obj, "conv").map_err(fail)?,
            kind: if op == "read" {
                ReceiptKind::Read
            } else {
                ReceiptKind::Delivered
            },
            seq: seq_field(&obj, "seq").map_err(fail)?,
        }),
        "presence_subscribe" => Ok(ClientFrame::PresenceSubscribe {
            users: user_list(obj.get("users"), "users").map_err(fail)?,
        }),
        other => Err(fail(ProtocolError::new(
            ErrorCode::UnknownOp,
            format!("unknown op {:?}", truncate(other, 32)),
        ))),
    }
}

/// A list of user ids (a JSON array of strings): each 1 to [`MAX_ID_LEN`] bytes, at most [`MAX_WATCHED`] of
/// them; repeats are dropped, first seen first.
pub fn user_list(value: Option<&Value>, field: &str) -> Result<Vec<String>, ProtocolError> {
    let invalid =
        |why: &str| ProtocolError::new(ErrorCode::InvalidField, format!("`{field}` {why}"));
    let items: Vec<&str> = match value {
        None | Some(Value::Null) => return Err(missing(field)),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().ok_or_else(|| invalid("must hold strings")))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(invalid("must be an array of user ids")),
    };
    if items.len() > MAX_WATCHED {
        return Err(invalid(&format!("holds more than {MAX_WATCHED} users")));
    }
    let mut seen = std::collections::HashSet::with_capacity(items.len());
    let mut users = Vec::with_capacity(items.len());
    for u in items {
        check_id(field, u)?;
        if seen.insert(u) {
            users.push(u.to_owned());
        }
    }
    Ok(users)
}

/// A required non-negative integer field.
fn seq_field(obj: &Map<String, Value>, field: &str) -> Result<u64, ProtocolError> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(missing(field)),
        Some(v) => v.as_u64().ok_or_else(|| {
            ProtocolError::new(
                ErrorCode::InvalidField,
                format!("{field} must be a non-negative integer"),
            )
        }),
    }
}

fn missing(field: &str) -> ProtocolError {
    ProtocolError::new(ErrorCode::MissingField, format!("missing field `{field}`"))
}

fn required_str<'a>(obj: &'a Map<String, Value>, field: &str) -> Result<&'a str, ProtocolError> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(missing(field)),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(ProtocolError::new(
            ErrorCode::InvalidField,
            format!("`{field}` must be a string"),
        )),
    }
}

/// An identifier field: a non-empty string of at most [`MAX_ID_LEN`] bytes.
fn id_field(obj: &Map<String, Value>, field: &str) -> Result<String, ProtocolError> {
    let s = required_str(obj, field)?;
    check_id(field, s)?;
    Ok(s.to_owned())
}

/// An identifier is 1 to [`MAX_ID_LEN`] bytes.
fn check_id(field: &str, s: &str) -> Result<(), ProtocolError> {
    if s.is_empty() || s.len() > MAX_ID_LEN {
        return Err(ProtocolError::new(
            ErrorCode::InvalidField,
            format!("`{field}` must be 1 to {MAX_ID_LEN} bytes"),
        ));
    }
    Ok(())
}

/// The checks every send passes, over the socket or REST: a valid `msg_id` and a body of at most
/// `max_body` UTF-8 bytes. Errors carry the `msg_id`.
pub fn check_send(msg_id: &str, body: &str, max_body: usize) -> Result<(), ProtocolError> {
    check_id("msg_id", msg_id).map_err(|e| e.for_msg(Some(msg_id)))?;
    if body.len() > max_body {
        return Err(ProtocolError::new(
            ErrorCode::BodyTooLarge,
            format!("body is {} bytes; the limit is {max_body}", body.len()),
        )
        .for_msg(Some(msg_id)));
    }
    Ok(())
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Frames the server sends. Encode with [`encode`].
#[derive(Debug, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    /// The message is durable: its sequence number and server id.
    Ack {
        /// The client's id for the message.
        msg_id: &'a str,
        /// Conversation.
        conv: &'a str,
        /// Sequence number in the conversation.
        seq: u64,
        /// Server-assigned id.
        id: &'a str,
        /// Server timestamp, ms since the Unix epoch.
        ts: u64,
    },
    /// A message (live delivery or replay).
    Msg(&'a Message),
    /// End of a sync replay.
    Synced {
        /// Conversation.
        conv: &'a str,
        /// Seq of the last message replayed, or `after_seq` when none.
        last_seq: u64,
        /// Whether more messages follow `last_seq`.
        has_more: bool,
    },
    /// Answer to `ping`.
    Pong,
    /// A member is typing (throttled to one per member and conversation per second).
    Typing {
        /// Conversation.
        conv: &'a str,
        /// Who is typing.
        user: &'a str,
    },
    /// A member's device received or showed the conversation up to `seq` (DMs and groups of at most
    /// [`crate::conversation::RECEIPTS_UP_TO`] members).
    Receipt {
        /// Conversation.
        conv: &'a str,
        /// Whose receipt.
        user: &'a str,
        /// Delivered or read.
        kind: ReceiptKind,
        /// Up to this seq.
        seq: u64,
    },
    /// The user was removed from a group, by an owner or by leaving (from another device): the server has
    /// stopped delivering the conversation to them and refuses their sends, syncs and history.
    Removed {
        /// Conversation.
        conv: &'a str,
        /// Who removed them (themselves when they left); `null` when the server did.
        by: Option<&'a str>,
    },
    /// A watched user or a contact came online or went offline (also the answer to `presence_subscribe`).
    Presence {
        /// Whose presence.
        user: &'a str,
        /// Online or offline.
        state: PresenceState,
        /// Online: now; offline: when the last device went away (ms since the Unix epoch); `null` when this
        /// node has not seen the user online since it started.
        last_seen: Option<u64>,
    },
    /// Something went wrong with a request.
    Error {
        /// Stable error code.
        code: ErrorCode,
        /// Human-readable detail.
        message: &'a str,
        /// The `msg_id` of the send this answers.
        #[serde(skip_serializing_if = "Option::is_none")]
        msg_id: Option<&'a str>,
        /// For `rate_limited`: when to retry.
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
        /// The conversation of the `sync` this answers.
        #[serde(skip_serializing_if = "Option::is_none")]
        conv: Option<&'a str>,
    },
}

impl<'a> ServerFrame<'a> {
    /// The `ack` for a stored message.
    pub fn ack(m: &'a Message) -> Self {
        Self::Ack {
            msg_id: &m.msg_id,
            conv: &m.conv,
            seq: m.seq,
            id: &m.id,
            ts: m.ts,
        }
    }

    /// The `error` frame for a protocol error.
    pub fn error(e: &'a ProtocolError) -> Self {
        Self::Error {
            code: e.code,
            message: &e.message,
            msg_id: e.msg_id.as_deref(),
            retry_after_ms: e.retry_after_ms,
            conv: None,
        }
    }

    /// This `error` answers a request about `conv` (a `sync`): say so.
    pub fn about(self, conv: &'a str) -> Self {
        match self {
            Self::Error {
                code,
                message,
                msg_id,
                retry_after_ms,
                ..
            } => Self::Error {
                code,
                message,
                msg_id,
                retry_after_ms,
                conv: Some(conv),
            },
            other => other,
        }
    }
}

/// Serialise a server frame into the bytes of one WebSocket text frame.
pub fn encode(frame: &ServerFrame<'_>) -> Bytes {
    // Serialising these plain structs cannot fail: every key is a string and no map has non-string keys.
    Bytes::from(serde_json::to_vec(frame).expect("server frames always serialise"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> ErrorCode {
        decode_client_frame(text, 16).unwrap_err().code
    }

    #[test]
    fn decodes_each_op() {
        assert_eq!(
            decode_client_frame(r#"{"op":"send","msg_id":"m1","conv":"c","body":"hi"}"#, 16)
                .unwrap(),
            ClientFrame::Send {
                msg_id: "m1".into(),
                conv: "c".into(),
                body: "hi".into()
            }
        );
        assert_eq!(
            decode_client_frame(r#"{"op":"sync","conv":"c","after_seq":7}"#, 16).unwrap(),
            ClientFrame::Sync {
                conv: "c".into(),
                after_seq: 7
            }
        );
        assert_eq!(
            decode_client_frame(r#"{"op":"ping"}"#, 16).unwrap(),
            ClientFrame::Ping
        );
    }

    #[test]
    fn classifies_bad_input() {
        assert_eq!(code("not json"), ErrorCode::InvalidJson);
        assert_eq!(code("[1,2]"), ErrorCode::InvalidJson);
        assert_eq!(code(r#"{"msg_id":"x"}"#), ErrorCode::MissingField);
        assert_eq!(code(r#"{"op":"dance"}"#), ErrorCode::UnknownOp);
        assert_eq!(
            code(r#"{"op":"send","conv":"c","body":"x"}"#),
            ErrorCode::MissingField
        );
        assert_eq!(
            code(r#"{"op":"send","msg_id":5,"conv":"c","body":"x"}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(r#"{"op":"send","msg_id":"","conv":"c","body":"x"}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(r#"{"op":"sync","conv":"c","after_seq":-1}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(code(r#"{"op":"sync","conv":"c"}"#), ErrorCode::MissingField);
    }

    #[test]
    fn body_limit_counts_utf8_bytes_and_keeps_msg_id() {
        // Six characters, eighteen bytes: over a 16-byte limit.
        let err = decode_client_frame(
            r#"{"op":"send","msg_id":"m9","conv":"c","body":"日本語日本語"}"#,
            16,
        )
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::BodyTooLarge);
        assert_eq!(err.msg_id.as_deref(), Some("m9"));
        assert!(decode_client_frame(
            r#"{"op":"send","msg_id":"m","conv":"c","body":"日本語日本"}"#,
            16
        )
        .is_ok());
    }

    #[test]
    fn errors_answering_a_send_carry_its_msg_id() {
        let err =
            decode_client_frame(r#"{"op":"send","msg_id":"abc","body":"x"}"#, 16).unwrap_err();
        assert_eq!(err.msg_id.as_deref(), Some("abc"));
    }

    /// Found by the `client_frame` fuzz target: typing, receipt and presence errors lost the `msg_id`
    /// that docs/protocol.md says every error but a sync's carries.
    #[test]
    fn errors_of_every_op_but_sync_carry_the_frames_msg_id() {
        for frame in [
            r#"{"op":"read","msg_id":"m\u00e9","conv":"c","body":""}"#,
            r#"{"op":"delivered","msg_id":"mé","conv":""}"#,
            r#"{"op":"typing","msg_id":"mé"}"#,
            r#"{"op":"presence_subscribe","msg_id":"mé","users":[1]}"#,
            r#"{"op":"dance","msg_id":"mé"}"#,
            r#"{"op":5,"msg_id":"mé"}"#,
        ] {
            let err = decode_client_frame(frame, 16).unwrap_err();
            assert_eq!(err.msg_id.as_deref(), Some("mé"), "{frame}");
        }
        let err = decode_client_frame(r#"{"op":"sync","msg_id":"mé","conv":"c"}"#, 16).unwrap_err();
        assert_eq!(err.msg_id, None);
    }

    #[test]
    fn presence_subscribe_takes_a_list_of_user_ids() {
        assert_eq!(
            decode_client_frame(
                r#"{"op":"presence_subscribe","users":["bob","amy","bob"]}"#,
                16
            )
            .unwrap(),
            ClientFrame::PresenceSubscribe {
                users: vec!["bob".into(), "amy".into()]
            }
        );
        assert_eq!(
            decode_client_frame(r#"{"op":"presence_subscribe","users":[]}"#, 16).unwrap(),
            ClientFrame::PresenceSubscribe { users: vec![] }
        );
        assert_eq!(
            code(r#"{"op":"presence_subscribe"}"#),
            ErrorCode::MissingField
        );
        for bad in [
            r#"{"op":"presence_subscribe","users":[1]}"#,
            r#"{"op":"presence_subscribe","users":{"a":1}}"#,
            r#"{"op":"presence_subscribe","users":[""]}"#,
        ] {
            assert_eq!(code(bad), ErrorCode::InvalidField, "{bad}");
        }
        let many: Vec<String> = (0..=MAX_WATCHED).map(|i| format!("u{i}")).collect();
        let frame = serde_json::json!({"op":"presence_subscribe","users":many}).to_string();
        assert_eq!(code(&frame), ErrorCode::InvalidField);
        assert_eq!(
            code(r#"{"op":"presence_subscribe","users":"alice"}"#),
            ErrorCode::InvalidField
        );
    }

    #[test]
    fn encodes_presence() {
        let f = ServerFrame::Presence {
            user: "bob",
            state: PresenceState::Offline,
            last_seen: Some(7),
        };
        let v: Value = serde_json::from_slice(&encode(&f)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"op":"presence","user":"bob","state":"offline","last_seen":7})
        );
        let f = ServerFrame::Presence {
            user: "bob",
            state: PresenceState::Online,
            last_seen: None,
        };
        let v: Value = serde_json::from_slice(&encode(&f)).unwrap();
        assert_eq!(v["state"], "online");
        assert_eq!(v["last_seen"], Value::Null);
    }

    #[test]
    fn encodes_frames_with_op_tag() {
        let m = Message {
            conv: "c".into(),
            seq: 3,
            id: "i".into(),
            msg_id: "m".into(),
            from: "alice".into(),
            body: "hi".into(),
            ts: 9,
        };
        let v: Value = serde_json::from_slice(&encode(&ServerFrame::Msg(&m))).unwrap();
        assert_eq!(v["op"], "msg");
        assert_eq!(v["seq"], 3);
        assert_eq!(v["from"], "alice");
        let v: Value = serde_json::from_slice(&encode(&ServerFrame::ack(&m))).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"op":"ack","msg_id":"m","conv":"c","seq":3,"id":"i","ts":9})
        );
        let e = ProtocolError::new(ErrorCode::NotMember, "no");
        let v: Value = serde_json::from_slice(&encode(&ServerFrame::error(&e))).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"op":"error","code":"not_member","message":"no"})
        );
    }
}
