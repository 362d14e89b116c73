//! The WebSocket edge over a raw TCP socket: frames in the same packet as the handshake, the HTTP answers to
//! requests that are not a valid upgrade, and a client that stops reading. RFC 6455 conformance (what a
//! client library never sends) is `tests/ws_conformance.rs`.

mod common;

use std::time::Duration;

use common::raw::{masked, read_head, upgrade_request, whole_frame, RawClient, PING, PONG, TEXT};
use common::{TestServer, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_sent_with_the_handshake_are_read() {
    let s = TestServer::start().await;
    let token = s.api().token("alice").await;
    let mut first = masked(true, PING, b"early");
    first.extend(masked(true, TEXT, br#"{"op":"ping"}"#));
    let mut c = RawClient::upgrade(s.addr, &token, &first).await;
    assert_eq!(c.read_frame().await, (PONG, b"early".to_vec()));
    assert_eq!(c.read_frame().await, (TEXT, br#"{"op":"pong"}"#.to_vec()));
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
    // `mute` keeps writing (an empty masked ping every 200 ms) so that the server's silence timeout, the
    // same 1 s, never closes it first (on a slow machine the sends below can start after that): only its
    // reading stops.
    let (mut mute, mut mute_writes) = mute.into_split();
    let pings = tokio::spawn(async move {
        while mute_writes
            .write_all(&[0x89, 0x80, 0, 0, 0, 0])
            .await
            .is_ok()
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });

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
    pings.abort();
    let mut at = 0;
    while let Some((opcode, header, len)) = whole_frame(&seen[at..]) {
        assert_ne!(opcode, 0x8, "no close frame after a stall");
        at += header + len;
    }
}
