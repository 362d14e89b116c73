//! The JSON op decoder (`switchboard_actors::protocol::decode_client_frame`) on any text frame.
//!
//! Input: two bytes of body limit (u16 LE), then the frame's text (inputs that are not UTF-8 are skipped:
//! the WebSocket reader refuses those with 1007 before decoding). Checked, besides "no panic":
//! - a frame accepted holds only valid ids, a body within the limit (so a body over it is never accepted)
//!   and at most `MAX_WATCHED` distinct users;
//! - an accepted frame written back as canonical JSON decodes to the same frame;
//! - a `send` whose body is over the limit, with valid ids, is refused with `body_too_large`;
//! - an error's `error` frame is valid JSON naming its code, and carries the frame's string `msg_id` unless
//!   the op is `sync` (docs/protocol.md, "The `msg_id` of the error").
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use switchboard_actors::protocol::{
    decode_client_frame, encode, ClientFrame, ErrorCode, ReceiptKind, ServerFrame, MAX_ID_LEN,
    MAX_WATCHED,
};

fuzz_target!(|data: &[u8]| {
    let Some((limit, text)) = data.split_first_chunk::<2>() else {
        return;
    };
    let max_body = usize::from(u16::from_le_bytes(*limit));
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let decoded = decode_client_frame(text, max_body);
    let value: Option<Value> = serde_json::from_str(text).ok();
    let field = |name: &str| value.as_ref().and_then(|v| v.get(name));
    let op = field("op").and_then(Value::as_str);
    match decoded {
        Ok(frame) => {
            valid(&frame, max_body);
            let again = decode_client_frame(&canonical(&frame).to_string(), max_body)
                .expect("a frame written back decodes");
            assert_eq!(again, frame, "re-encoded frame decodes differently");
        }
        Err(e) => {
            let sent: Value = serde_json::from_slice(&encode(&ServerFrame::error(&e))).unwrap();
            assert_eq!(sent["op"], "error");
            assert_eq!(sent["code"], e.code.as_str());
            if let Some(msg_id) = field("msg_id").and_then(Value::as_str) {
                if op != Some("sync") {
                    assert_eq!(
                        e.msg_id.as_deref(),
                        Some(msg_id),
                        "error without the msg_id: {e:?}"
                    );
                }
            }
            let over = field("body")
                .and_then(Value::as_str)
                .is_some_and(|b| b.len() > max_body);
            let ids_ok = ["msg_id", "conv"].iter().all(|f| {
                field(f)
                    .and_then(Value::as_str)
                    .is_some_and(|s| (1..=MAX_ID_LEN).contains(&s.len()))
            });
            if op == Some("send") && over && ids_ok {
                assert_eq!(e.code, ErrorCode::BodyTooLarge);
            }
        }
    }
});

fn valid(frame: &ClientFrame, max_body: usize) {
    let id = |s: &str| assert!((1..=MAX_ID_LEN).contains(&s.len()), "bad id {s:?}");
    match frame {
        ClientFrame::Send { msg_id, conv, body } => {
            id(msg_id);
            id(conv);
            assert!(body.len() <= max_body, "body over the limit accepted");
        }
        ClientFrame::Sync { conv, .. }
        | ClientFrame::Typing { conv }
        | ClientFrame::Receipt { conv, .. } => id(conv),
        ClientFrame::Ping => {}
        ClientFrame::PresenceSubscribe { users } => {
            assert!(users.len() <= MAX_WATCHED);
            users.iter().for_each(|u| id(u));
            let distinct: std::collections::HashSet<_> = users.iter().collect();
            assert_eq!(distinct.len(), users.len(), "repeated user");
        }
    }
}

/// The frame as docs/protocol.md writes it.
fn canonical(frame: &ClientFrame) -> Value {
    match frame {
        ClientFrame::Send { msg_id, conv, body } => {
            json!({"op": "send", "msg_id": msg_id, "conv": conv, "body": body})
        }
        ClientFrame::Sync { conv, after_seq } => {
            json!({"op": "sync", "conv": conv, "after_seq": after_seq})
        }
        ClientFrame::Ping => json!({"op": "ping"}),
        ClientFrame::Typing { conv } => json!({"op": "typing", "conv": conv}),
        ClientFrame::Receipt { conv, kind, seq } => {
            let op = match kind {
                ReceiptKind::Delivered => "delivered",
                ReceiptKind::Read => "read",
            };
            json!({"op": op, "conv": conv, "seq": seq})
        }
        ClientFrame::PresenceSubscribe { users } => {
            json!({"op": "presence_subscribe", "users": users})
        }
    }
}
