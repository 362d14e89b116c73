//! The WebSocket edge over a raw TCP socket: what a conforming client library never sends (unmasked frames,
//! a stray continuation, invalid UTF-8, frames in the same packet as the handshake) and the HTTP answers to
//! requests that are not a valid upgrade.

mod common;

use std::time::Duration;

use common::{TestServer, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TEXT: u8 = 0x1;
const CONTINUATION: u8 = 0x0;
const PING: u8 = 0x9;

/// A client frame: FIN set as asked, masked unless `mask` is `None`.
fn frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | opcode];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= u16::MAX as usize => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

fn masked(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame(fin, opcode, payload, Some([0x37, 0xfa, 0x21, 0x3d]))
}

fn upgrade_request(path: &str, token: &str) -> String {
    format!(
        "GET {path}?token={token} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
}

/// Read until the end of the HTTP response head; returns the head and whatever followed it.
async fn read_head(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return (String::from_utf8(buf).unwrap(), rest);
        }
        let n = tokio::time::timeout(WAIT, s.read(&mut chunk))
            .await
            .expect("an HTTP answer in time")
            .unwrap();
        assert!(n > 0, "closed before the response head");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// One server frame (unmasked), reading more as needed: (opcode, payload).
/// The first whole server frame in `buf`, if it is all there: (opcode, header length, payload length).
fn whole_frame(buf: &[u8]) -> Option<(u8, usize, usize)> {
    let (len, header) = match *buf.get(1)? & 0x7f {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    (buf.len() >= header + len).then_some((buf[0] & 0x0f, header, len))
}

async fn read_frame(s: &mut TcpStream, buf: &mut Vec<u8>) -> (u8, Vec<u8>) {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((opcode, header, len)) = whole_frame(buf) {
            let payload = buf[header..header + len].to_vec();
            buf.drain(..header + len);
            return (opcode, payload);
        }
        let n = tokio::time::timeout(WAIT, s.read(&mut chunk))
            .await
            .expect("a frame in time")
            .unwrap();
        assert!(n > 0, "closed without a close frame");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The close code of the next frame, which must be a close frame.
async fn close_code(s: &mut TcpStream, buf: &mut Vec<u8>) -> u16 {
    loop {
        let (opcode, payload) = read_frame(s, buf).await;
        if opcode == 0x8 {
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
    }
}

/// An upgraded raw connection and the bytes read past the handshake.
async fn upgraded(s: &TestServer, token: &str, first: &[u8]) -> (TcpStream, Vec<u8>) {
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    let mut request = upgrade_request("/v1/ws", token).into_bytes();
    request.extend_from_slice(first);
    tcp.write_all(&request).await.unwrap();
    let (head, rest) = read_head(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "RFC 6455's sample key gets its sample answer: {head}"
    );
    (tcp, rest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_sent_with_the_handshake_are_read() {
    let s = TestServer::start().await;
    let token = s.api().token("alice").await;
    let mut first = masked(true, PING, b"early");
    first.extend(masked(true, TEXT, br#"{"op":"ping"}"#));
    let (mut tcp, mut buf) = upgraded(&s, &token, &first).await;
    assert_eq!(
        read_frame(&mut tcp, &mut buf).await,
        (0xA, b"early".to_vec())
    );
    assert_eq!(
        read_frame(&mut tcp, &mut buf).await,
        (TEXT, br#"{"op":"pong"}"#.to_vec())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_close_with_their_codes() {
    let s = TestServer::start().await;
    let token = s.api().token("alice").await;
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "unmasked client frame",
            frame(true, TEXT, br#"{"op":"ping"}"#, None),
            1002,
        ),
        (
            "continuation with nothing to continue",
            masked(true, CONTINUATION, b"x"),
            1002,
        ),
        (
            "text while a fragmented message is open",
            [masked(false, TEXT, b"{"), masked(true, TEXT, b"{}")].concat(),
            1002,
        ),
        (
            "text that is not UTF-8",
            masked(true, TEXT, &[0xff, 0xfe]),
            1007,
        ),
        (
            "fragmented text that is not UTF-8",
            [
                masked(false, TEXT, &[0xe2, 0x82]),
                masked(true, CONTINUATION, &[0x28]),
            ]
            .concat(),
            1007,
        ),
        ("unknown opcode", masked(true, 0x3, b""), 1002),
        (
            "a header announcing 1 GiB, refused before the payload",
            [0x81, 0xff, 0, 0, 0, 0, 0x40, 0, 0, 0, 1, 2, 3, 4].to_vec(),
            1009,
        ),
        ("fragmented ping", masked(false, PING, b""), 1002),
    ];
    for (what, bytes, code) in cases {
        let (mut tcp, mut buf) = upgraded(&s, &token, &[]).await;
        tcp.write_all(&bytes).await.unwrap();
        assert_eq!(close_code(&mut tcp, &mut buf).await, code, "{what}");
        // The server closes the TCP connection after its close frame.
        let mut rest = [0u8; 64];
        let n = tokio::time::timeout(WAIT, tcp.read(&mut rest))
            .await
            .expect("the server closes the socket")
            .unwrap_or(0);
        assert_eq!(n, 0, "{what}: nothing after the close frame");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fragmented_message_with_a_ping_in_between_is_reassembled() {
    let s = TestServer::start().await;
    let token = s.api().token("alice").await;
    let (mut tcp, mut buf) = upgraded(&s, &token, &[]).await;
    let bytes = [
        masked(false, TEXT, br#"{"op":"#),
        masked(true, PING, b"mid"),
        masked(true, CONTINUATION, br#""ping"}"#),
    ]
    .concat();
    tcp.write_all(&bytes).await.unwrap();
    assert_eq!(read_frame(&mut tcp, &mut buf).await, (0xA, b"mid".to_vec()));
    assert_eq!(
        read_frame(&mut tcp, &mut buf).await,
        (TEXT, br#"{"op":"pong"}"#.to_vec())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_are_not_a_valid_upgrade_get_http_errors() {
    let s = TestServer::start().await;
    let token = s.api().token("alice").await;
    let answer = |request: String| async move {
        let mut tcp = TcpStream::connect(s.addr).await.unwrap();
        tcp.write_all(request.as_bytes()).await.unwrap();
        let (head, mut body) = read_head(&mut tcp).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut body)).await;
        (head, String::from_utf8_lossy(&body).into_owned())
    };
    let (head, _) = answer(upgrade_request("/v1/elsewhere", &token)).await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let (head, body) = answer(upgrade_request("/v1/ws", "garbage")).await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert!(body.contains("\"unauthorized\""), "{body}");
    let no_key = upgrade_request("/v1/ws", &token)
        .replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "");
    let (head, body) = answer(no_key).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(body.contains("\"invalid_field\""), "{body}");
    // A plain GET (no upgrade) reaches the REST app, which says what is missing.
    let (head, body) = answer(format!(
        "GET /v1/ws?token={token} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    ))
    .await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(body.contains("WebSocket upgrade"), "{body}");
}

/// `switchboard_write_stalls_total` as `/metrics` shows it (the recorder is shared by the servers in this
/// process; only this file's stall test makes a socket stall).
async fn write_stalls(s: &TestServer) -> f64 {
    let text = reqwest::get(format!("http://{}/metrics", s.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("switchboard_write_stalls_total "))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_reset_after_the_heartbeat_timeout() {
    let s = TestServer::start_with(|c| c.heartbeat_timeout = Duration::from_secs(1)).await;
    let api = s.api();
    let (ta, tm) = (api.token("alice").await, api.token("mute").await);
    let conv = api.group(&ta, &["mute".into()]).await;
    // `mute` upgrades on a socket with a small receive buffer, then never reads again.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut mute = socket.connect(s.addr).await.unwrap();
    mute.write_all(upgrade_request("/v1/ws", &tm).as_bytes())
        .await
        .unwrap();
    let (head, mut seen) = read_head(&mut mute).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let before = write_stalls(&s).await;

    let mut alice = common::Client::connect(s.addr, &ta).await;
    // 6 MB: more than the server's socket send buffer (up to 4 MiB here) and the client's receive buffer.
    let body = "q".repeat(4000);
    for chunk in 0..15 {
        for i in 0..100 {
            alice.send_msg(&conv, &format!("m{chunk}-{i}"), &body).await;
        }
        for _ in 0..100 {
            alice.expect_op("ack").await;
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while write_stalls(&s).await <= before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled socket was not dropped"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The server reset the socket: reading ends in an error or EOF without a close frame (had it still
    // been waiting, reading would let it write on, up to its close frame).
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(WAIT, mute.read(&mut chunk))
            .await
            .expect("the reset socket ends")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&chunk[..n]),
        }
    }
    let mut at = 0;
    while let Some((opcode, header, len)) = whole_frame(&seen[at..]) {
        assert_ne!(opcode, 0x8, "no close frame after a stall");
        at += header + len;
    }
}
