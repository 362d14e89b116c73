//! The WebSocket reader after the upgrade (`switchboard::http::ws::FrameDecoder`: the header checks of
//! decision 0021, actix-http's frame parser, reassembly, UTF-8 and close-payload checks) on any byte
//! stream, arriving in any pieces.
//!
//! Input: two bytes of frame limit (u16 LE, at least 2, as the config allows), one byte seeding the sizes
//! of the pieces the stream arrives in, then the stream. Checked, besides "no panic":
//! - the same stream in one piece or in many gives the same items;
//! - between reads the decoder holds at most one frame header and `max_frame` payload bytes, and a
//!   fragmented message at most `max_frame` bytes (nothing over the limit is buffered);
//! - text is at most `max_frame` bytes, a ping's payload at most 125, and a refusal is 1002, 1007 or 1009;
//! - a `Closed` or a refusal is the last item (the reader stops there);
//! - the items are those of a plain model of RFC 6455's server side as decision 0021 states it (`model`
//!   below, written from the RFC, not from the reader): a differential check of the reader, actix's
//!   parser included.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use switchboard::http::ws::FrameDecoder;
use switchboard_actors::connection::Inbound;

/// The longest frame header: 2 bytes, 8 of extended length, 4 of mask.
const MAX_HEADER: usize = 14;

#[derive(Debug, PartialEq, Eq)]
enum Item {
    Text(String),
    Binary,
    Ping(Vec<u8>),
    Pong,
    Closed,
    Refused(u16),
}

fuzz_target!(|data: &[u8]| {
    let Some((&[lo, hi, seed], stream)) = data.split_first_chunk::<3>() else {
        return;
    };
    let max_frame = usize::from(u16::from_le_bytes([lo, hi])).max(2);
    let whole = read(stream, max_frame, |_| stream.len());
    let mut state = u32::from(seed) | 1;
    let pieces = read(stream, max_frame, |_| {
        // xorshift: pieces of 1 to 64 bytes, with the header and payload boundaries falling anywhere.
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        1 + (state % 64) as usize
    });
    assert_eq!(whole, pieces, "the pieces changed what was read");
    assert_eq!(
        whole,
        model(stream, max_frame),
        "the reader and the model disagree"
    );
    for (i, item) in whole.iter().enumerate() {
        match item {
            Item::Text(t) => assert!(t.len() <= max_frame),
            Item::Ping(p) => assert!(p.len() <= 125),
            Item::Refused(code) => assert!(matches!(code, 1002 | 1007 | 1009), "{code}"),
            Item::Binary | Item::Pong | Item::Closed => {}
        }
        if matches!(item, Item::Closed | Item::Refused(_)) {
            assert_eq!(i + 1, whole.len());
        }
    }
});

/// What the reader makes of `stream` when the socket hands it over in pieces of `piece(offset)` bytes, up to
/// the end of the connection.
fn read(stream: &[u8], max_frame: usize, mut piece: impl FnMut(usize) -> usize) -> Vec<Item> {
    let mut decoder = FrameDecoder::new(BytesMut::new(), max_frame);
    let mut items = Vec::new();
    let mut offset = 0;
    loop {
        while let Some(inbound) = decoder.decode() {
            let item = item(inbound);
            let last = matches!(item, Item::Closed | Item::Refused(_));
            items.push(item);
            if last {
                return items;
            }
        }
        assert!(
            decoder.buffer().len() < MAX_HEADER + max_frame,
            "buffered past the limit"
        );
        assert!(
            decoder.fragmented_bytes() <= max_frame,
            "reassembled past the limit"
        );
        if offset == stream.len() {
            return items;
        }
        let end = (offset + piece(offset)).min(stream.len());
        decoder.buffer().extend_from_slice(&stream[offset..end]);
        offset = end;
    }
}

fn item(inbound: Inbound) -> Item {
    match inbound {
        Inbound::Text(t) => Item::Text(t),
        Inbound::Binary => Item::Binary,
        Inbound::Ping(p) => Item::Ping(p.to_vec()),
        Inbound::Pong => Item::Pong,
        Inbound::Closed => Item::Closed,
        Inbound::Refused(code) => Item::Refused(code.code()),
    }
}

/// RFC 6455's server side, as decision 0021 states what the reader refuses, over the whole stream at once.
fn model(stream: &[u8], max_frame: usize) -> Vec<Item> {
    let mut items = Vec::new();
    // The fragmented message so far: whether it is text, and its bytes.
    let mut message: Option<(bool, Vec<u8>)> = None;
    let mut at = 0;
    loop {
        let rest = &stream[at..];
        let [b0, b1, ..] = *rest else {
            return items;
        };
        let (fin, rsv, opcode, masked) = (b0 & 0x80 != 0, b0 & 0x70, b0 & 0x0f, b1 & 0x80 != 0);
        // §5.1 masking, §5.2 reserved bits and opcodes: the first two bytes show these (actix's parser
        // refuses them there, before the extended length is in).
        if rsv != 0 || !masked || !matches!(opcode, 0 | 1 | 2 | 8 | 9 | 10) {
            items.push(Item::Refused(1002));
            return items;
        }
        let (len, head) = match b1 & 0x7f {
            126 => match rest.get(2..4) {
                Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
                None => return items,
            },
            127 => match rest.get(2..10) {
                Some(b) => (u64::from_be_bytes(b.try_into().unwrap()), 10),
                None => return items,
            },
            n => (u64::from(n), 2),
        };
        let control = opcode >= 8;
        // §5.4 fragmentation, §5.5 control frames: refused once the length is in.
        if (control && (!fin || len > 125))
            || (opcode == 0 && message.is_none())
            || (matches!(opcode, 1 | 2) && message.is_some())
        {
            items.push(Item::Refused(1002));
            return items;
        }
        let so_far = match (&message, opcode) {
            (Some((_, data)), 0) => data.len() as u64,
            _ => 0,
        };
        if so_far.saturating_add(len) > max_frame as u64 {
            items.push(Item::Refused(1009));
            return items;
        }
        let len = len as usize;
        let Some(frame) = rest.get(head..head + 4 + len) else {
            return items;
        };
        at += head + 4 + len;
        let (mask, masked_payload) = frame.split_at(4);
        let payload: Vec<u8> = masked_payload
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        match opcode {
            1 | 2 => message = Some((opcode == 1, payload)),
            0 => message.as_mut().unwrap().1.extend_from_slice(&payload),
            9 => {
                items.push(Item::Ping(payload));
                continue;
            }
            10 => {
                items.push(Item::Pong);
                continue;
            }
            _ => {
                // §5.5.1: empty, or a code and a UTF-8 reason; §7.4: codes an endpoint may send.
                let item = match payload.as_slice() {
                    [] => Item::Closed,
                    [_] => Item::Refused(1002),
                    [hi, lo, reason @ ..] => match u16::from_be_bytes([*hi, *lo]) {
                        1000..=1003 | 1007..=1014 | 3000..=4999 => {
                            if std::str::from_utf8(reason).is_ok() {
                                Item::Closed
                            } else {
                                Item::Refused(1007)
                            }
                        }
                        _ => Item::Refused(1002),
                    },
                };
                items.push(item);
                return items;
            }
        }
        let (text, data) = message.as_ref().unwrap();
        // §8.1: text is UTF-8; a fragment may end inside a character, but a byte sequence that can never be
        // UTF-8 fails the connection at once.
        if *text {
            if let Err(e) = std::str::from_utf8(data) {
                if fin || e.error_len().is_some() {
                    items.push(Item::Refused(1007));
                    return items;
                }
            }
        }
        if fin {
            let (text, data) = message.take().unwrap();
            items.push(if text {
                Item::Text(String::from_utf8(data).unwrap())
            } else {
                Item::Binary
            });
        }
    }
}
