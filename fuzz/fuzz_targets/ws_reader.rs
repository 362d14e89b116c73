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
//! - a `Closed` or a refusal is the last item (the reader stops there).
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
