//! Abuse limits on real sockets: open connections per user and per address, handshakes per address per
//! second, sends per user per second, and the `Origin` allowlist — each refused with its documented status
//! and code, and each leaving other users and addresses alone.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use common::raw::upgrade_request;
use common::{Client, Recv, TestServer, WAIT};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The answer to an upgrade sent from `source` with `extra` header lines: (status, headers, JSON body).
/// An accepted upgrade's socket is kept open in `keep`, so that it counts as an open connection.
async fn upgrade_from(
    server: SocketAddr,
    source: &str,
    token: &str,
    extra: &str,
    keep: &mut Vec<TcpStream>,
) -> (u16, String, Value) {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source.parse::<IpAddr>().unwrap(), 0))
        .unwrap();
    let mut tcp = socket.connect(server).await.unwrap();
    let mut request = upgrade_request("/v1/ws", token);
    if !extra.is_empty() {
        request = request.replace("\r\n\r\n", &format!("\r\n{extra}\r\n\r\n"));
    }
    tcp.write_all(request.as_bytes()).await.unwrap();
    let (head, rest) = common::raw::read_head(&mut tcp).await;
    let status: u16 = head[9..12].parse().unwrap();
    if status == 101 {
        keep.push(tcp);
        return (status, head, Value::Null);
    }
    let mut body = rest;
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut body)).await;
    (
        status,
        head,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_user_are_limited_and_given_back_on_close() {
    let s = TestServer::start_with(|c| c.admission.per_user = NonZeroUsize::new(2)).await;
    let api = s.api();
    let (alice, bob) = (api.token("alice").await, api.token("bob").await);
    let first = Client::connect(s.addr, &alice).await;
    let _second = Client::connect(s.addr, &alice).await;
    let mut keep = Vec::new();
    let (status, head, body) = upgrade_from(s.addr, "127.0.0.1", &alice, "", &mut keep).await;
    assert_eq!(status, 429, "{head}");
    assert_eq!(body["error"]["code"], "too_many_connections", "{body}");
    assert!(body["error"].get("retry_after_ms").is_none(), "{body}");
    let _bob = Client::connect(s.addr, &bob).await;

    // A closed connection's place is free again once its socket is closed.
    first.close().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, ..) = upgrade_from(s.addr, "127.0.0.1", &alice, "", &mut keep).await;
        if status == 101 {
            break;
        }
        assert_eq!(status, 429);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the place was not given back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_address_are_limited() {
    let s = TestServer::start_with(|c| {
        c.admission.per_user = None;
        c.admission.per_ip = NonZeroUsize::new(3);
    })
    .await;
    let api = s.api();
    let mut keep = Vec::new();
    for user in ["a", "b", "c"] {
        let token = api.token(user).await;
        let (status, head, _) = upgrade_from(s.addr, "127.0.0.1", &token, "", &mut keep).await;
        assert_eq!(status, 101, "{head}");
    }
    let token = api.token("d").await;
    let (status, _, body) = upgrade_from(s.addr, "127.0.0.1", &token, "", &mut keep).await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["code"], "too_many_connections");
    let (status, head, _) = upgrade_from(s.addr, "127.0.0.2", &token, "", &mut keep).await;
    assert_eq!(status, 101, "another address has its own count: {head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_count() {
    let s = TestServer::start_with(|c| {
        c.admission.per_user = None;
        c.admission.per_ip = NonZeroUsize::new(1);
        c.admission.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
    })
    .await;
    let api = s.api();
    let mut keep = Vec::new();
    let via = |client: &str| format!("X-Forwarded-For: 1.1.1.1, {client}");
    // Two clients through the proxy (127.0.0.1): one place each.
    for (user, client) in [("a", "198.51.100.1"), ("b", "198.51.100.2")] {
        let token = api.token(user).await;
        let (status, head, _) =
            upgrade_from(s.addr, "127.0.0.1", &token, &via(client), &mut keep).await;
        assert_eq!(status, 101, "{head}");
    }
    let token = api.token("c").await;
    let (status, _, body) =
        upgrade_from(s.addr, "127.0.0.1", &token, &via("198.51.100.1"), &mut keep).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("too_many_connections"))
    );
    // A peer that is not a trusted proxy is its own address, whatever it forwards.
    let (status, head, _) =
        upgrade_from(s.addr, "127.0.0.2", &token, &via("198.51.100.9"), &mut keep).await;
    assert_eq!(status, 101, "{head}");
    let (status, _, _) = upgrade_from(
        s.addr,
        "127.0.0.2",
        &token,
        &via("198.51.100.10"),
        &mut keep,
    )
    .await;
    assert_eq!(status, 429, "127.0.0.2 already has its one place");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_past_the_rate_get_429_with_a_retry_hint() {
    let s = TestServer::start_with(|c| c.admission.handshakes_per_ip = NonZeroU32::new(4)).await;
    let token = s.api().token("alice").await;
    let mut keep = Vec::new();
    // Refused handshakes count too: the rate is checked before the token.
    let (status, ..) = upgrade_from(s.addr, "127.0.0.1", "garbage", "", &mut keep).await;
    assert_eq!(status, 401);
    for _ in 0..3 {
        let (status, head, _) = upgrade_from(s.addr, "127.0.0.1", &token, "", &mut keep).await;
        assert_eq!(status, 101, "{head}");
    }
    let (status, head, body) = upgrade_from(s.addr, "127.0.0.1", &token, "", &mut keep).await;
    assert_eq!(status, 429, "{head}");
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    let ms = body["error"]["retry_after_ms"].as_u64().unwrap();
    assert!((1..=250).contains(&ms), "one handshake per 250 ms: {ms}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1\r\n"),
        "{head}"
    );
    let (status, head, _) = upgrade_from(s.addr, "127.0.0.2", &token, "", &mut keep).await;
    assert_eq!(status, 101, "another address has its own bucket: {head}");
    tokio::time::sleep(Duration::from_millis(ms)).await;
    let (status, head, _) = upgrade_from(s.addr, "127.0.0.1", &token, "", &mut keep).await;
    assert_eq!(status, 101, "after the hint: {head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_past_the_user_rate_get_rate_limited_with_retry_after_ms() {
    let s = TestServer::start_with(|c| {
        c.messages_per_user = Some((NonZeroU32::new(5).unwrap(), NonZeroU32::new(5).unwrap()))
    })
    .await;
    let api = s.api();
    let (ta, tb) = (api.token("alice").await, api.token("bob").await);
    let conv = api.dm(&ta, "bob").await;
    // Two devices of one user share one bucket.
    let mut phone = Client::connect(s.addr, &ta).await;
    let mut laptop = Client::connect(s.addr, &ta).await;
    for i in 0..5 {
        phone.send_msg(&conv, &format!("p{i}"), "hi").await;
        laptop.send_msg(&conv, &format!("l{i}"), "hi").await;
    }
    // Each send is answered (ack or error); the other device's messages arrive as `msg` in between.
    let mut answers = Vec::new();
    for device in [&mut phone, &mut laptop] {
        let mut answered = 0;
        while answered < 5 {
            let f = device.frame().await;
            if f["op"] == "ack" || f["op"] == "error" {
                answers.push(f);
                answered += 1;
            }
        }
    }
    let acks = answers.iter().filter(|f| f["op"] == "ack").count();
    let limited: Vec<&Value> = answers.iter().filter(|f| f["op"] == "error").collect();
    assert!(
        (5..=6).contains(&acks),
        "a burst of 5 (and maybe one more token): {answers:?}"
    );
    assert_eq!(acks + limited.len(), 10, "{answers:?}");
    let mut wait = 0;
    for e in &limited {
        assert_eq!(e["code"], "rate_limited", "{e}");
        assert!(
            e["msg_id"].as_str().is_some(),
            "the error names its send: {e}"
        );
        wait = e["retry_after_ms"].as_u64().unwrap();
        assert!((1..=200).contains(&wait), "one send per 200 ms: {e}");
    }
    // Another user is not limited by alice's sends.
    let mut bob = Client::connect(s.addr, &tb).await;
    bob.send_msg(&conv, "b0", "hello").await;
    assert_eq!(bob.expect_op("ack").await["msg_id"], "b0");
    // After the hint, alice may send again (the same msg_id is fine: it was refused, not stored).
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let refused = limited[0]["msg_id"].as_str().unwrap().to_owned();
    phone.send_msg(&conv, &refused, "hi").await;
    let answer = loop {
        match phone.recv().await {
            Recv::Frame(f) if f["op"] == "ack" || f["op"] == "error" => break f,
            Recv::Frame(_) => continue,
            Recv::Closed(code) => panic!("closed: {code:?}"),
        }
    };
    assert_eq!(
        answer,
        json!({"op":"ack","msg_id":refused,"conv":conv,"seq":answer["seq"],"id":answer["id"],"ts":answer["ts"]})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_past_the_user_rate_are_dropped_and_syncs_get_rate_limited_naming_their_conversation(
) {
    let pair = |a, b| Some((NonZeroU32::new(a).unwrap(), NonZeroU32::new(b).unwrap()));
    let s = TestServer::start_with(|c| {
        c.signals_per_user = pair(2, 3);
        c.syncs_per_user = pair(1, 4);
    })
    .await;
    let api = s.api();
    let (ta, tb) = (api.token("alice").await, api.token("bob").await);
    let conv = api.dm(&ta, "bob").await;
    let mut alice = Client::connect(s.addr, &ta).await;
    let mut bob = Client::connect(s.addr, &tb).await;
    for i in 1..=6 {
        bob.send_msg(&conv, &format!("b{i}"), "hi").await;
        bob.expect_op("ack").await;
        alice.expect_op("msg").await;
    }
    // Six reads at once, each further than the last: a burst of 3 gets through, the rest are dropped.
    for seq in 1..=6 {
        alice
            .send(json!({"op":"read","conv": conv,"seq": seq}))
            .await;
    }
    let mut seen = Vec::new();
    while let Some(Recv::Frame(f)) = bob.recv_within(Duration::from_millis(400)).await {
        if f["op"] == "receipt" {
            seen.push(f["seq"].as_u64().unwrap());
        }
    }
    assert!(
        (3..=4).contains(&seen.len()) && seen.windows(2).all(|w| w[0] < w[1]),
        "a burst of 3 (and maybe one more token) in order: {seen:?}"
    );
    // Half a second later there is room again: the next read moves the position on.
    tokio::time::sleep(Duration::from_millis(600)).await;
    alice.send(json!({"op":"read","conv": conv,"seq": 6})).await;
    let r = bob.expect_op("receipt").await;
    assert_eq!(r["seq"], 6, "{r}");

    // Syncs: a burst of 4, then `rate_limited` naming the conversation, with a retry hint.
    for _ in 0..6 {
        alice
            .send(json!({"op":"sync","conv": conv,"after_seq": 5}))
            .await;
    }
    let (mut synced, mut limited) = (0, Vec::new());
    while synced + limited.len() < 6 {
        let f = alice.frame().await;
        match f["op"].as_str() {
            Some("synced") => synced += 1,
            Some("error") => limited.push(f),
            _ => {}
        }
    }
    assert!((4..=5).contains(&synced), "{synced} synced, {limited:?}");
    for e in &limited {
        assert_eq!(
            (e["code"].as_str(), e["conv"].as_str()),
            (Some("rate_limited"), Some(conv.as_str())),
            "{e}"
        );
        assert!(
            (1..=1000).contains(&e["retry_after_ms"].as_u64().unwrap()),
            "{e}"
        );
    }
    // Bob's bucket is his own.
    bob.send(json!({"op":"sync","conv": conv,"after_seq": 0}))
        .await;
    assert_eq!(bob.expect_op("synced").await["last_seq"], 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_nodes_handshake_rate_the_upgrade_closes_with_1013_and_a_retry_hint() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let s = TestServer::start_with(|c| c.admission.handshakes_per_node = NonZeroU32::new(2)).await;
    let api = s.api();
    let token = api.token("alice").await;
    let url = format!("ws://{}/v1/ws?token={token}", s.addr);
    // A bad token is refused (401) without using up the node's admissions.
    let bad = tokio_tungstenite::connect_async(format!("ws://{}/v1/ws?token=nope", s.addr)).await;
    assert!(bad.is_err());
    let mut admitted = vec![
        Client::connect(s.addr, &token).await,
        Client::connect(s.addr, &token).await,
    ];
    // The third within the second: upgraded, then closed at once with 1013 and when to come back.
    let (mut ws, response) = tokio_tungstenite::connect_async(&url).await.unwrap();
    assert_eq!(response.status(), 101);
    let close = match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
        Some(Ok(Message::Close(Some(close)))) => close,
        other => panic!("expected a close frame, got {other:?}"),
    };
    assert_eq!(u16::from(close.code), 1013);
    let hint: Value = serde_json::from_str(&close.reason).unwrap();
    let ms = hint["retry_after_ms"].as_u64().unwrap();
    assert!(
        (1..=1500).contains(&ms),
        "the bucket's wait plus up to 1 s of jitter: {hint}"
    );
    // The admitted connections are untouched, and after the hint there is room again.
    admitted[0].send(json!({"op":"ping"})).await;
    admitted[0].expect_op("pong").await;
    tokio::time::sleep(Duration::from_millis(ms)).await;
    admitted.push(Client::connect(s.addr, &token).await);
    admitted[2].send(json!({"op":"ping"})).await;
    admitted[2].expect_op("pong").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origin_must_be_on_the_allowlist_when_one_is_set() {
    let s = TestServer::start_with(|c| {
        c.admission.origins = Some(vec![
            "https://chat.example.com".into(),
            "http://localhost:3000".into(),
        ])
    })
    .await;
    let token = s.api().token("alice").await;
    let mut keep = Vec::new();
    for (origin, expected) in [
        ("Origin: https://chat.example.com", 101),
        ("Origin: http://localhost:3000", 101),
        ("", 101),
        ("Origin: https://evil.example.com", 403),
        ("Origin: https://chat.example.com.evil.example.com", 403),
        ("Origin: http://chat.example.com", 403),
        ("Origin: null", 403),
    ] {
        let (status, head, body) =
            upgrade_from(s.addr, "127.0.0.1", &token, origin, &mut keep).await;
        assert_eq!(status, expected, "{origin:?}: {head}");
        if expected == 403 {
            assert_eq!(body["error"]["code"], "forbidden_origin", "{origin:?}");
        }
    }
}
