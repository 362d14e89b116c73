//! Building client frames and reading server frames without a full JSON parse.
//!
//! Both servers write compact JSON (`serde_json`, no spaces) with `op` first, and every string this tool
//! puts in a frame (user ids, conversation ids, msg ids, bodies) is plain ASCII without quotes or
//! backslashes, so finding `"key":` is exact. This keeps the client cheap enough that a group scenario's
//! receivers are not the bottleneck.

use std::time::{SystemTime, UNIX_EPOCH};

/// Digits of the send timestamp at the start of every body.
pub(crate) const STAMP_DIGITS: usize = 16;

/// The kind of a server frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Msg,
    Ack,
    Synced,
    Pong,
    Error,
    /// `typing`, `receipt`, `presence`.
    Signal,
    Other,
}

/// The `op` of a server frame.
pub(crate) fn op(frame: &str) -> Op {
    match str_field(frame, "op") {
        Some("msg") => Op::Msg,
        Some("ack") => Op::Ack,
        Some("synced") => Op::Synced,
        Some("pong") => Op::Pong,
        Some("error") => Op::Error,
        Some("typing" | "receipt" | "presence") => Op::Signal,
        _ => Op::Other,
    }
}

fn value_start<'a>(frame: &'a str, key: &str) -> Option<&'a str> {
    // Look for `"key":` at a key position (after `{` or `,`).
    let bytes = frame.as_bytes();
    let mut from = 0;
    while let Some(pos) = frame[from..].find(key) {
        let at = from + pos;
        let end = at + key.len();
        if at >= 2
            && bytes[at - 1] == b'"'
            && matches!(bytes[at - 2], b'{' | b',')
            && bytes.get(end) == Some(&b'"')
            && bytes.get(end + 1) == Some(&b':')
        {
            return Some(&frame[end + 2..]);
        }
        from = end;
    }
    None
}

/// A string field's value (no escape handling: our values never contain quotes or backslashes).
pub(crate) fn str_field<'a>(frame: &'a str, key: &str) -> Option<&'a str> {
    let rest = value_start(frame, key)?.strip_prefix('"')?;
    let end = rest.find('"')?;
    Some(&rest[..end])
}

/// An unsigned integer field's value.
pub(crate) fn u64_field(frame: &str, key: &str) -> Option<u64> {
    let rest = value_start(frame, key)?;
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// A boolean field's value.
pub(crate) fn bool_field(frame: &str, key: &str) -> Option<bool> {
    let rest = value_start(frame, key)?;
    if rest.starts_with("true") {
        Some(true)
    } else if rest.starts_with("false") {
        Some(false)
    } else {
        None
    }
}

/// Microseconds since the Unix epoch (the same clock in every process of this machine).
pub(crate) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A body of `len` bytes (at least the stamp) that starts with the send time in microseconds.
pub(crate) fn body(sent_us: u64, len: usize) -> String {
    let mut s = format!("{sent_us:0width$}", width = STAMP_DIGITS);
    while s.len() < len {
        s.push('x');
    }
    s
}

/// The send time carried by a `msg` frame's body.
pub(crate) fn body_stamp(frame: &str) -> Option<u64> {
    let body = str_field(frame, "body")?;
    body.get(..STAMP_DIGITS)?.parse().ok()
}

/// A `send` frame.
pub(crate) fn send_frame(conv: &str, msg_id: u64, body: &str) -> String {
    format!(r#"{{"op":"send","msg_id":"{msg_id}","conv":"{conv}","body":"{body}"}}"#)
}

/// A `sync` frame.
pub(crate) fn sync_frame(conv: &str, after_seq: u64) -> String {
    format!(r#"{{"op":"sync","conv":"{conv}","after_seq":{after_seq}}}"#)
}

/// The `ping` frame.
pub(crate) const PING: &str = r#"{"op":"ping"}"#;

/// A `typing` frame.
pub(crate) fn typing_frame(conv: &str) -> String {
    format!(r#"{{"op":"typing","conv":"{conv}"}}"#)
}

/// A `read` frame.
pub(crate) fn read_frame(conv: &str, seq: u64) -> String {
    format!(r#"{{"op":"read","conv":"{conv}","seq":{seq}}}"#)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_server_frames() {
        let msg = r#"{"op":"msg","conv":"c_1","seq":42,"id":"ab","msg_id":"17","from":"u-1","body":"0001764000000123xxxx","ts":1764000000}"#;
        assert_eq!(op(msg), Op::Msg);
        assert_eq!(u64_field(msg, "seq"), Some(42));
        assert_eq!(str_field(msg, "msg_id"), Some("17"));
        assert_eq!(body_stamp(msg), Some(1_764_000_000_123));
        let ack = r#"{"op":"ack","msg_id":"9","conv":"c","seq":3,"id":"i","ts":9}"#;
        assert_eq!(op(ack), Op::Ack);
        assert_eq!(u64_field(ack, "ts"), Some(9));
        let synced = r#"{"op":"synced","conv":"c","last_seq":241,"has_more":true}"#;
        assert_eq!(op(synced), Op::Synced);
        assert_eq!(u64_field(synced, "last_seq"), Some(241));
        assert_eq!(bool_field(synced, "has_more"), Some(true));
        assert_eq!(op(r#"{"op":"pong"}"#), Op::Pong);
        assert_eq!(op(r#"{"op":"typing","conv":"c","user":"u"}"#), Op::Signal);
        assert_eq!(
            op(r#"{"op":"presence","user":"u","state":"online","last_seen":1}"#),
            Op::Signal
        );
        let err = r#"{"op":"error","code":"rate_limited","message":"full","msg_id":"5","retry_after_ms":100}"#;
        assert_eq!(op(err), Op::Error);
        assert_eq!(str_field(err, "code"), Some("rate_limited"));
        assert_eq!(op("not json"), Op::Other);
        // `seq` must not match inside `last_seq`.
        assert_eq!(u64_field(synced, "seq"), None);
        assert_eq!(str_field(ack, "missing"), None);
    }

    #[test]
    fn builds_client_frames() {
        let b = body(1_764_000_000_123_456, 32);
        assert_eq!(b.len(), 32);
        assert!(b.starts_with("1764000000123456x"));
        assert_eq!(body(5, 0).len(), STAMP_DIGITS);
        let f = send_frame("c_9", 7, &b);
        let v: serde_json::Value = serde_json::from_str(&f).unwrap();
        assert_eq!(v["op"], "send");
        assert_eq!(v["msg_id"], "7");
        assert_eq!(v["conv"], "c_9");
        let s: serde_json::Value = serde_json::from_str(&sync_frame("c_9", 0)).unwrap();
        assert_eq!(s["after_seq"], 0);
        assert!(serde_json::from_str::<serde_json::Value>(PING).is_ok());
    }
}
