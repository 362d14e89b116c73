//! REST bodies (`src/http/rest.rs`): the bytes of a request body decoded as actix's `Json` extractor does
//! (`serde_json::from_slice`; `web::Query` uses `serde_urlencoded`), then checked by the same `check` the
//! handler calls. A refusal must render as a response.
//!
//! Input: one byte picks the body (and the caller), the rest is the body. Checked, besides "no panic": what
//! a check accepts is what the API documents (docs/protocol.md, REST section).
#![no_main]

use actix_web::ResponseError;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use switchboard::http::error::ApiError;
use switchboard::http::rest::{CreateBody, DevTokenBody, MemberBody, PresenceParams, SendBody};
use switchboard_actors::protocol::{MAX_ID_LEN, MAX_WATCHED};
use switchboard_actors::store::{ConversationKind, MAX_MEMBERS};

/// Callers (JWT subjects are valid user ids).
const ME: [&str; 3] = ["alice", "b", "carol.x@example-1"];

/// The default body limit.
const MAX_BODY: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let me = ME[usize::from(pick >> 4) % ME.len()];
    // serde_json does not check the UTF-8 of a string it skips (a field the body type does not have), so
    // a body the handler accepts may not be valid JSON text: the oracle reads it with such bytes replaced.
    let json: Option<Value> = serde_json::from_str(&String::from_utf8_lossy(body)).ok();
    // serde's derive also reads a struct from an array of its fields in order (`["bob"]` for
    // `{"user":"bob"}`), so a field is looked up both ways.
    let string = |name: &str, index: usize| {
        let v = json.as_ref()?;
        v.get(name).or_else(|| v.get(index))?.as_str()
    };
    match pick % 5 {
        0 => {
            let Ok(create) = serde_json::from_slice::<CreateBody>(body) else {
                return;
            };
            let Some(new) = accepted(create.check(me)) else {
                return;
            };
            assert!(new.members.iter().all(|m| user_id(m)));
            assert!(
                new.members.windows(2).all(|w| w[0] < w[1]),
                "members sorted, no repeats"
            );
            assert!(
                new.members.iter().any(|m| m == me),
                "the creator is a member"
            );
            assert!(new.members.len() <= MAX_MEMBERS);
            match new.kind {
                ConversationKind::Dm => {
                    assert_eq!(new.members.len(), 2);
                    assert!(new.name.is_none());
                }
                ConversationKind::Group => {
                    let name = new.name.expect("a group has a name");
                    assert!((1..=200).contains(&name.len()) && !name.trim().is_empty());
                }
            }
        }
        1 => {
            let Ok(send) = serde_json::from_slice::<SendBody>(body) else {
                return;
            };
            if accepted(send.check(MAX_BODY)).is_some() {
                let msg_id = string("msg_id", 0).expect("msg_id");
                assert!((1..=MAX_ID_LEN).contains(&msg_id.len()));
                assert!(string("body", 1).expect("body").len() <= MAX_BODY);
            }
        }
        2 => {
            let Ok(member) = serde_json::from_slice::<MemberBody>(body) else {
                return;
            };
            let ok = accepted(member.check()).is_some();
            assert_eq!(ok, user_id(string("user", 0).expect("user")));
        }
        3 => {
            let Ok(dev) = serde_json::from_slice::<DevTokenBody>(body) else {
                return;
            };
            let ok = accepted(dev.check()).is_some();
            assert_eq!(ok, user_id(string("user", 0).expect("user")));
        }
        _ => {
            let Ok(query) = std::str::from_utf8(body) else {
                return;
            };
            let Ok(params) = serde_urlencoded::from_str::<PresenceParams>(query) else {
                return;
            };
            let Some(users) = accepted(params.users()) else {
                return;
            };
            assert!(users.len() <= MAX_WATCHED);
            for u in &users {
                assert!((1..=MAX_ID_LEN).contains(&u.len()) && !u.contains(','));
            }
        }
    }
});

/// The accepted value, or `None` after rendering the refusal as the handler's response.
fn accepted<T>(checked: Result<T, ApiError>) -> Option<T> {
    match checked {
        Ok(v) => Some(v),
        Err(e) => {
            let response = e.error_response();
            assert!(response.status().is_client_error(), "{e}");
            None
        }
    }
}

/// A user id as docs/protocol.md defines it: 1 to 64 of `A-Z a-z 0-9 _ . @ -`.
fn user_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.@-".contains(&b))
}
