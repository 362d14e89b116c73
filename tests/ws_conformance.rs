//! RFC 6455 conformance of the server side, over raw TCP, with the Autobahn TestSuite's sections as the guide
//! (it cannot run here): 1 framing, 2 pings and pongs, 3 reserved bits, 4 opcodes, 5 fragmentation, 6 UTF-8,
//! 7 closing, 9 limits. Each case asserts what the RFC asks: the answer, or the close code the connection
//! fails with (1002 protocol error, 1007 invalid data, 1009 too big) followed by the end of the TCP
//! connection.
//!
//! Where the RFC leaves a choice, the server's is asserted and documented (`docs/protocol.md` §8): it answers
//! a valid close with 1000, it refuses on the header what the header alone makes wrong (before the payload is
//! in), and it checks fragmented text as the fragments arrive (Autobahn 6.4's "fail fast").
//!
//! Binary messages are not part of Switchboard's protocol (they get an `error` frame), so Autobahn's echo
//! cases are played with `{"op":"ping"}` text messages padded to the length under test, answered `pong`.

mod common;

use std::time::Duration;

use common::raw::{
    frame, header_only, masked, RawClient, BINARY, CLOSE, CONTINUATION, PING, PONG, TEXT,
};
use common::TestServer;
use serde_json::json;

/// The server's default message limit (`max_frame_bytes`).
const LIMIT: usize = 64 * 1024;

/// A `{"op":"ping"}` text message padded with an ignored field to exactly `len` bytes (at least 22).
fn ping_of_len(len: usize) -> Vec<u8> {
    let mut text = br#"{"op":"ping","pad":""#.to_vec();
    let pad = len.checked_sub(text.len() + 2).expect("at least 22 bytes");
    text.extend(std::iter::repeat_n(b'x', pad));
    text.extend_from_slice(br#""}"#);
    assert_eq!(text.len(), len);
    text
}

/// `message` split into fragments of `size` bytes: a text frame, then continuations, the last with FIN.
fn fragmented(message: &[u8], size: usize) -> Vec<u8> {
    let chunks: Vec<&[u8]> = message.chunks(size).collect();
    let last = chunks.len() - 1;
    chunks
        .iter()
        .enumerate()
        .flat_map(|(i, chunk)| masked(i == last, if i == 0 { TEXT } else { CONTINUATION }, chunk))
        .collect()
}

struct Suite {
    server: TestServer,
    token: String,
}

impl Suite {
    async fn start() -> Self {
        let server = TestServer::start().await;
        let token = server.api().token("autobahn").await;
        Self { server, token }
    }

    async fn connect(&self) -> RawClient {
        RawClient::upgrade(self.server.addr, &self.token, &[]).await
    }

    /// On a fresh connection, send `bytes`: the server must close with `code` and end the TCP connection,
    /// after the answers to what came before the offending frame (`pongs` of them, for `{"op":"ping"}`s).
    async fn fails(&self, what: &str, bytes: &[u8], pongs: usize, code: u16) {
        let mut c = self.connect().await;
        c.write(bytes).await;
        for _ in 0..pongs {
            assert_eq!(c.read_json().await, json!({"op":"pong"}), "{what}");
        }
        assert_eq!(c.closed_with().await, code, "{what}");
    }

    /// On a fresh connection, send `bytes` and expect one `pong` text frame for them, and the connection to
    /// stay usable.
    async fn pongs(&self, what: &str, bytes: &[u8]) {
        let mut c = self.connect().await;
        c.write(bytes).await;
        assert_eq!(c.read_json().await, json!({"op":"pong"}), "{what}");
        c.write(&masked(true, PING, what.as_bytes())).await;
        assert_eq!(
            c.read_frame().await,
            (PONG, what.as_bytes().to_vec()),
            "{what}: still open"
        );
    }
}

/// Autobahn 1.1, 1.2: messages of every length class (7-bit, 16-bit and 64-bit length headers) up to the
/// limit are read whole; an empty text and a binary message get an `error` frame, not a close; an unmasked
/// client frame fails with 1002 (RFC 6455 §5.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn section_1_framing_of_every_length() {
    let t = Suite::start().await;
    for len in [22, 125, 126, 127, 128, 65_535, LIMIT] {
        t.pongs(
            &format!("text of {len} bytes"),
            &masked(true, TEXT, &ping_of_len(len)),
        )
        .await;
    }
    t.fails(
        "an unmasked client frame",
        &frame(true, TEXT, br#"{"op":"ping"}"#, None),
        0,
        1002,
    )
    .await;
    let mut c = t.connect().await;
    for (what, bytes) in [
        ("empty text", masked(true, TEXT, b"")),
        ("binary", masked(true, BINARY, &[0, 1, 2, 0xff])),
        ("empty binary", masked(true, BINARY, b"")),
    ] {
        c.write(&bytes).await;
        let reply = c.read_json().await;
        assert_eq!(reply["op"], "error", "{what}: {reply}");
        assert_eq!(reply["code"], "invalid_json", "{what}: {reply}");
    }
    // A frame delivered one byte per write (Autobahn 1.1.8's "chopped"): the reader waits for the rest.
    c.tcp.set_nodelay(true).unwrap();
    for b in masked(true, TEXT, &ping_of_len(300)) {
        c.write(&[b]).await;
    }
    assert_eq!(c.read_json().await, json!({"op":"pong"}));
}

/// Autobahn 2: pings are answered with a pong carrying the same payload (empty, text, binary, 125 bytes,
/// chopped, ten in a row); a control frame over 125 bytes fails with 1002 as soon as its header says so;
/// unsolicited pongs are ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn section_2_pings_and_pongs() {
    let t = Suite::start().await;
    let mut c = t.connect().await;
    let binary: Vec<u8> = (0..=255u8).cycle().skip(3).take(125).collect();
    for payload in [
        &b""[..],
        b"Hello, world!",
        &[0x00, 0xff, 0xfe, 0xfd, 0xfc],
        &binary,
    ] {
        c.write(&masked(true, PING, payload)).await;
        assert_eq!(c.read_frame().await, (PONG, payload.to_vec()));
    }
    // Ten pings in one write, answered in order.
    let pings: Vec<u8> = (0..10u8)
        .flat_map(|i| masked(true, PING, &[i; 5]))
        .collect();
    c.write(&pings).await;
    for i in 0..10u8 {
        assert_eq!(c.read_frame().await, (PONG, vec![i; 5]));
    }
    // A ping chopped into single bytes.
    c.tcp.set_nodelay(true).unwrap();
    for b in masked(true, PING, b"chopped") {
        c.write(&[b]).await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(c.read_frame().await, (PONG, b"chopped".to_vec()));
    // Unsolicited pongs, with and without payload, get nothing; the next ping is answered as usual.
    c.write(&[masked(true, PONG, b""), masked(true, PONG, b"unsolicited")].concat())
        .await;
    c.write(&masked(true, PING, b"after")).await;
    assert_eq!(c.read_frame().await, (PONG, b"after".to_vec()));

    t.fails(
        "ping with 126 bytes",
        &masked(true, PING, &[b'p'; 126]),
        0,
        1002,
    )
    .await;
    // The header alone (16-bit length 126, no payload sent) is enough to refuse.
    t.fails(
        "ping header announcing 126 bytes",
        &[0x89, 0xfe, 0, 126, 1, 2, 3, 4],
        0,
        1002,
    )
    .await;
}

/// Autobahn 3: a frame with any reserved bit set fails with 1002, whatever its opcode; what came before it
/// is answered, what comes after it is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn section_3_reserved_bits() {
    let t = Suite::start().await;
    for (rsv, opcode, payload) in [
        (0x40, TEXT, &br#"{"op":"ping"}"#[..]),
        (0x20, TEXT, br#"{"op":"ping"}"#),
        (0x10, TEXT, br#"{"op":"ping"}"#),
        (0x70, TEXT, br#"{"op":"ping"}"#),
        (0x40, BINARY, b"\x00\xff"),
        (0x20, PING, b"ping"),
        (0x10, CLOSE, &[0x03, 0xe8]),
        (0x40, CONTINUATION, b""),
    ] {
        let mut bad = masked(true, opcode, payload);
        bad[0] |= rsv;
        let bytes = [
            masked(true, TEXT, br#"{"op":"ping"}"#),
            bad,
            masked(true, TEXT, br#"{"op":"ping"}"#),
        ]
        .concat();
        t.fails(&format!("rsv {rsv:#x} on opcode {opcode}"), &bytes, 1, 1002)
            .await;
    }
}

/// Autobahn 4: reserved opcodes — non-control 3 to 7, control 0xB to 0xF — fail with 1002, with or without a
/// payload; what came before is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn section_4_reserved_opcodes() {
    let t = Suite::start().await;
    for opcode in (0x3..=0x7).chain(0xB..=0xF) {
        for payload in [&b""[..], b"reserved"] {
            let bytes = [
                masked(true, TEXT, br#"{"op":"ping"}"#),
                masked(true, opcode, payload),
                masked(true, PING, b"never answered"),
            ]
            .concat();
            t.fails(&format!("opcode {opcode:#x}"), &bytes, 1, 1002)
                .await;
        }
    }
}

/// Autobahn 5: fragmented messages are reassembled, with control frames allowed in between and empty
/// fragments allowed; fragmented control frames, continuations with nothing to continue and a new message
/// inside a fragmented one fail with 1002.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn section_5_fragmentation() {
    let t = Suite::start().await;
    t.pongs("two fragments", &fragmented(br#"{"op":"ping"}"#, 7))
        .await;
    // Control frames may come between fragments (RFC 6455 §5.4): the ping is answered at once.
    let mut c = t.connect().await;
    c.write(
        &[
            masked(false, TEXT, br#"{"op":"#),
            masked(true, PING, b"mid"),
            masked(false, CONTINUATION, br#""pi"#),
            masked(true, PONG, b"unsolicited"),
            masked(true, CONTINUATION, br#"ng"}"#),
        ]
        .concat(),
    )
    .await;
    assert_eq!(c.read_frame().await, (PONG, b"mid".to_vec()));
    assert_eq!(c.read_json().await, json!({"op":"pong"}));
    t.pongs(
        "empty fragments",
        &[
            masked(false, TEXT, b""),
            masked(false, CONTINUATION, br#"{"op":"ping"}"#),
            masked(false, CONTINUATION, b""),
            masked(true, CONTINUATION, b""),
        ]
        .concat(),
    )
    .await;

    for (what, bytes) in [
        ("fragmented ping", masked(false, PING, b"frag")),
        ("fragmented pong", masked(false, PONG, b"frag")),
        ("fragmented close", masked(false, CLOSE, &[0x03, 0xe8])),
        (
            "continuation, FIN, with nothing to continue",
            masked(true, CONTINUATION, b"x"),
        ),
        (
            "continuation, no FIN, with nothing to continue",
            masked(false, CONTINUATION, b"x"),
        ),
        (
            "text inside a fragmented text",
            [masked(false, TEXT, b"{"), masked(true, TEXT, b"{}")].concat(),
        ),
        (
            "binary inside a fragmented text",
            [masked(false, TEXT, b"{"), masked(true, BINARY, b"\x00")].concat(),
        ),
        (
            "a continuation after the message ended",
            [
                masked(false, TEXT, br#"{"op":"#),
                masked(true, CONTINUATION, br#""ping"}"#),
                masked(true, CONTINUATION, b"x"),
            ]
            .concat(),
        ),
    ] {
        let pongs = usize::from(what.starts_with("a continuation after"));
        t.fails(what, &bytes, pongs, 1002).await;
    }
}

/// Autobahn 6: valid UTF-8 is accepted however it is fragmented (a character may be split between
/// fragments); invalid UTF-8 fails with 1007 — in one frame, split across fragments, or in the first
/// fragment of a message whose end never comes (checked as fragments arrive).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn section_6_utf8() {
    let t = Suite::start().await;
    let kosme = r#"{"op":"ping","pad":"κόσμε 𝄞 €"}"#.as_bytes();
    t.pongs("valid UTF-8 in one frame", &masked(true, TEXT, kosme))
        .await;
    t.pongs("valid UTF-8 one byte per fragment", &fragmented(kosme, 1))
        .await;
    t.pongs(
        "valid UTF-8 three bytes per fragment",
        &fragmented(kosme, 3),
    )
    .await;

    let wrap = |bad: &[u8]| [br#"{"op":"ping","pad":""#, bad, br#""}"#].concat();
    for (what, bad) in [
        ("a lone continuation byte", &[0x80][..]),
        ("an overlong '/'", &[0xc0, 0xaf]),
        ("an overlong NUL in 3 bytes", &[0xe0, 0x80, 0x80]),
        ("a UTF-16 surrogate", &[0xed, 0xa0, 0x80]),
        ("above U+10FFFF", &[0xf4, 0x90, 0x80, 0x80]),
        ("0xFE", &[0xfe]),
        ("0xFF", &[0xff]),
        ("a truncated 3-byte sequence", &[0xe2, 0x82]),
    ] {
        t.fails(what, &masked(true, TEXT, &wrap(bad)), 0, 1007)
            .await;
        t.fails(
            &format!("{what}, fragmented"),
            &fragmented(&wrap(bad), 2),
            0,
            1007,
        )
        .await;
    }
    t.fails(
        "the message ends inside a character",
        &[
            masked(false, TEXT, b"\"ok"),
            masked(true, CONTINUATION, &[0xe2, 0x82]),
        ]
        .concat(),
        0,
        1007,
    )
    .await;
    // Fail fast: only the first fragment is sent, and it can never become valid UTF-8.
    t.fails(
        "invalid UTF-8 in an unfinished message",
        &masked(false, TEXT, &[b'{', 0xff, b'}']),
        0,
        1007,
    )
    .await;
    // A fragment that ends inside a character is not refused: the next one completes it.
    t.pongs(
        "a character split between fragments",
        &[
            masked(false, TEXT, &wrap(&[0xe2, 0x82])[..21]),
            masked(true, CONTINUATION, &wrap(&[0xe2, 0x82, 0xac])[21..]),
        ]
        .concat(),
    )
    .await;
}

/// Autobahn 7: a close is answered with a close (1000) and the end of the TCP connection; nothing after the
/// client's close is processed; close payloads RFC 6455 forbids — one byte, over 125 bytes, a code no
/// endpoint may send, a reason that is not UTF-8 — fail with 1002 (1007 for the reason).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn section_7_closing() {
    let t = Suite::start().await;
    let close =
        |code: u16, reason: &[u8]| masked(true, CLOSE, &[&code.to_be_bytes()[..], reason].concat());

    t.fails("close without payload", &masked(true, CLOSE, b""), 0, 1000)
        .await;
    t.fails(
        "close with a reason",
        &close(1000, "goodbye ☺".as_bytes()),
        0,
        1000,
    )
    .await;
    t.fails(
        "close with a 123-byte reason (125 bytes in all)",
        &close(1000, &[b'r'; 123]),
        0,
        1000,
    )
    .await;
    t.fails(
        "a message, then close: the message is answered first",
        &[masked(true, TEXT, br#"{"op":"ping"}"#), close(1000, b"")].concat(),
        1,
        1000,
    )
    .await;
    t.fails(
        "an unfinished message, then close",
        &[masked(false, TEXT, br#"{"op":"#), close(1000, b"")].concat(),
        0,
        1000,
    )
    .await;
    // Nothing after the client's close is read: no pong, no error (`closed_with` checks nothing follows).
    t.fails(
        "close, then a ping and a text",
        &[
            close(1000, b""),
            masked(true, PING, b"too late"),
            masked(true, TEXT, br#"{"op":"ping"}"#),
            close(1000, b""),
        ]
        .concat(),
        0,
        1000,
    )
    .await;

    for code in [
        1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000,
        4999,
    ] {
        t.fails(
            &format!("valid close code {code}"),
            &close(code, b""),
            0,
            1000,
        )
        .await;
    }
    for code in [
        0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
    ] {
        t.fails(
            &format!("invalid close code {code}"),
            &close(code, b""),
            0,
            1002,
        )
        .await;
    }
    t.fails(
        "close payload of 1 byte",
        &masked(true, CLOSE, &[0x03]),
        0,
        1002,
    )
    .await;
    t.fails(
        "close payload of 126 bytes",
        &close(1000, &[b'r'; 124]),
        0,
        1002,
    )
    .await;
    t.fails(
        "close reason that is not UTF-8",
        &close(
            1000,
            &[b'o', b'k', 0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xed, 0xa0, 0x80],
        ),
        0,
        1007,
    )
    .await;
}

/// Autobahn 9 (limits and volume) with the server's 64 KiB message limit: a message of exactly the limit is
/// read whole in any fragmentation; one byte more fails with 1009 — refused on the header of the frame that
/// passes the limit, before its payload is sent (so it is never buffered), up to a length of 2^63 and a
/// header with the top bit set; a thousand pipelined messages are answered in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn section_9_limits_and_volume() {
    let t = Suite::start().await;
    let at_limit = ping_of_len(LIMIT);
    for size in [1, 64, 4096, LIMIT] {
        t.pongs(
            &format!("{LIMIT} bytes in fragments of {size}"),
            &fragmented(&at_limit, size),
        )
        .await;
    }

    // Headers alone: the server cannot be waiting for the payload, which never comes.
    for len in [LIMIT as u64 + 1, 1 << 30, (1 << 63) - 1, 1 << 63, u64::MAX] {
        t.fails(
            &format!("a text header announcing {len} bytes"),
            &header_only(true, TEXT, len),
            0,
            1009,
        )
        .await;
    }
    // A fragmented message that passes the limit is refused on the header of the fragment that passes it.
    let mut bytes = masked(false, TEXT, &at_limit[..LIMIT / 2]);
    bytes.extend(masked(false, CONTINUATION, &at_limit[LIMIT / 2..]));
    bytes.extend(header_only(true, CONTINUATION, 1));
    t.fails(
        "a fragmented message one byte over the limit",
        &bytes,
        0,
        1009,
    )
    .await;
    t.fails(
        "a fragmented message over the limit, in small fragments",
        &fragmented(&ping_of_len(LIMIT + 1), 1000),
        0,
        1009,
    )
    .await;
    // A header that is wrong in more ways than its length is a protocol error first.
    t.fails(
        "an unmasked text header announcing 2^62 bytes",
        &[0x81, 127, 0x40, 0, 0, 0, 0, 0, 0, 0],
        0,
        1002,
    )
    .await;

    let mut c = t.connect().await;
    let many: Vec<u8> = (0..1000)
        .flat_map(|i| masked(true, TEXT, &ping_of_len(22 + i % 100)))
        .collect();
    c.write(&many).await;
    for _ in 0..1000 {
        assert_eq!(c.read_json().await, json!({"op":"pong"}));
    }
}
