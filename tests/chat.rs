//! End-to-end chat behaviour over real sockets against an in-process server.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use common::{Api, Client, Recv, TestServer};
use futures_util::future::join_all;
use futures_util::SinkExt;
use serde_json::{json, Value};

async fn users(api: &Api, names: &[&str]) -> Vec<String> {
    join_all(names.iter().map(|n| api.token(n))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dm_send_ack_receive() {
    let s = TestServer::start().await;
    let api = s.api();
    let t = users(&api, &["alice", "bob"]).await;
    let conv = api.dm(&t[0], "bob").await;
    let mut alice = Client::connect(s.addr, &t[0]).await;
    let mut bob = Client::connect(s.addr, &t[1]).await;

    for (i, body) in ["hello bob", "how are you?"].iter().enumerate() {
        let msg_id = format!("m{i}");
        alice.send_msg(&conv, &msg_id, body).await;
        let ack = alice.frame().await;
        assert_eq!(ack["op"], "ack", "{ack}");
        assert_eq!(ack["msg_id"], msg_id.as_str());
        assert_eq!(ack["conv"], conv.as_str());
        assert_eq!(ack["seq"], i as u64 + 1);
        let msg = bob.frame().await;
        assert_eq!(msg["op"], "msg");
        assert_eq!(msg["seq"], ack["seq"]);
        assert_eq!(msg["id"], ack["id"]);
        assert_eq!(msg["ts"], ack["ts"]);
        assert_eq!(msg["msg_id"], msg_id.as_str());
        assert_eq!(msg["from"], "alice");
        assert_eq!(msg["body"], *body);
    }
    // The sending connection gets acks, never its own message back.
    assert!(alice.silent_for(Duration::from_millis(200)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_of_sixty_all_members_receive() {
    let s = TestServer::start().await;
    let api = s.api();
    let names: Vec<String> = (0..60).map(|i| format!("u{i}")).collect();
    let tokens = join_all(names.iter().map(|n| api.token(n))).await;
    let conv = api.group(&tokens[0], &names[1..]).await;
    let mut clients = join_all(tokens.iter().map(|t| Client::connect(s.addr, t))).await;

    for i in 0..3 {
        clients[0]
            .send_msg(&conv, &format!("g{i}"), &format!("hello {i}"))
            .await;
        assert_eq!(clients[0].frame().await["seq"], i + 1);
    }
    for c in clients.iter_mut().skip(1) {
        for i in 0..3u64 {
            let m = c.frame().await;
            assert_eq!(
                (m["op"].as_str(), m["seq"].as_u64(), m["from"].as_str()),
                (Some("msg"), Some(i + 1), Some("u0"))
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_conversations_start_side_by_side_each_once() {
    let s = TestServer::start().await;
    let api = s.api();
    const CONVS: usize = 30;
    let hub = api.token("hub").await;
    let names: Vec<String> = (0..CONVS).map(|i| format!("cold{i}")).collect();
    let tokens = join_all(names.iter().map(|n| api.token(n))).await;
    let convs = join_all(tokens.iter().map(|t| api.dm(t, "hub"))).await;
    let mut hub_client = Client::connect(s.addr, &hub).await;
    assert_eq!(s.server().conversations().running(), 0);

    // Every conversation gets its first two sends at once, from its own client: 30 starts side by side,
    // and a second send that arrives while its conversation is still starting.
    let senders = (0..CONVS).map(|i| {
        let (addr, token, conv) = (s.addr, tokens[i].clone(), convs[i].clone());
        tokio::spawn(async move {
            let mut c = Client::connect(addr, &token).await;
            c.send_msg(&conv, "first", "1").await;
            c.send_msg(&conv, "second", "2").await;
            let (a, b) = (c.expect_op("ack").await, c.expect_op("ack").await);
            (a["seq"].as_u64().unwrap(), b["seq"].as_u64().unwrap())
        })
    });
    for acked in join_all(senders).await {
        assert_eq!(
            acked.unwrap(),
            (1, 2),
            "one actor per conversation, in order"
        );
    }
    let mut got = HashMap::<String, Vec<u64>>::new();
    for _ in 0..2 * CONVS {
        let m = hub_client.expect_op("msg").await;
        got.entry(m["conv"].as_str().unwrap().to_owned())
            .or_default()
            .push(m["seq"].as_u64().unwrap());
    }
    assert_eq!(got.len(), CONVS);
    assert!(got.values().all(|seqs| seqs == &[1, 2]), "{got:?}");
    assert_eq!(s.server().conversations().running(), CONVS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_conversation_order_under_concurrent_senders() {
    let s = TestServer::start().await;
    let api = s.api();
    let names: Vec<String> = (0..6).map(|i| format!("s{i}")).collect();
    let tokens = join_all(names.iter().map(|n| api.token(n))).await;
    let conv = api.group(&tokens[0], &names[1..]).await;
    let mut observer = Client::connect(s.addr, &tokens[5]).await;
    const PER_SENDER: usize = 100;

    let senders = (0..5).map(|i| {
        let (addr, token, conv) = (s.addr, tokens[i].clone(), conv.clone());
        tokio::spawn(async move {
            let mut c = Client::connect(addr, &token).await;
            for n in 0..PER_SENDER {
                c.send_msg(&conv, &format!("{i}-{n}"), "x").await;
            }
            let mut acks = Vec::new();
            while acks.len() < PER_SENDER {
                let f = c.frame().await;
                if f["op"] == "ack" {
                    acks.push((
                        f["msg_id"].as_str().unwrap().to_owned(),
                        f["seq"].as_u64().unwrap(),
                    ));
                }
            }
            acks
        })
    });
    let acks: Vec<Vec<(String, u64)>> = join_all(senders)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();

    let total = 5 * PER_SENDER;
    let mut seen = Vec::new();
    while seen.len() < total {
        let m = observer.expect_op("msg").await;
        seen.push((
            m["seq"].as_u64().unwrap(),
            m["msg_id"].as_str().unwrap().to_owned(),
        ));
    }
    // The observer sees seq 1, 2, 3, … with no gap, no repeat, in order.
    assert_eq!(
        seen.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (1..=total as u64).collect::<Vec<_>>()
    );
    // Each sender's messages keep the order it sent them in.
    for sender_acks in &acks {
        let seqs: Vec<u64> = sender_acks.iter().map(|(_, s)| *s).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "a sender's messages were reordered: {seqs:?}"
        );
    }
    let by_msg: HashMap<&str, u64> = seen.iter().map(|(s, m)| (m.as_str(), *s)).collect();
    for (msg_id, seq) in acks.iter().flatten() {
        assert_eq!(
            by_msg[msg_id.as_str()],
            *seq,
            "ack and delivery disagree for {msg_id}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resend_is_acked_with_same_seq_stored_once_delivered_once_also_after_restart() {
    let s = TestServer::start().await;
    let api = s.api();
    let t = users(&api, &["alice", "bob"]).await;
    let conv = api.dm(&t[0], "bob").await;
    let mut alice = Client::connect(s.addr, &t[0]).await;
    let mut bob = Client::connect(s.addr, &t[1]).await;

    alice.send_msg(&conv, "dup-1", "first").await;
    let first = alice.frame().await;
    alice.send_msg(&conv, "dup-1", "a different body").await;
    let again = alice.frame().await;
    assert_eq!(
        (first["seq"].clone(), first["id"].clone()),
        (again["seq"].clone(), again["id"].clone())
    );
    assert_eq!(bob.frame().await["body"], "first");
    assert!(
        bob.silent_for(Duration::from_millis(300)).await,
        "a resend was delivered twice"
    );

    // Across a restart the store's dedupe index still knows the msg_id.
    drop((alice, bob));
    let dir = s.stop().await;
    let s = TestServer::start_in(dir, |_| {}).await;
    let api = s.api();
    let t0 = api.token("alice").await;
    let mut alice = Client::connect(s.addr, &t0).await;
    alice.send_msg(&conv, "dup-1", "third try").await;
    let after = alice.frame().await;
    assert_eq!(
        (after["seq"].clone(), after["id"].clone()),
        (first["seq"].clone(), first["id"].clone())
    );
    alice.send_msg(&conv, "new-1", "next").await;
    assert_eq!(alice.frame().await["seq"], 2);
    let all = api.all_messages(&t0, &conv).await;
    assert_eq!(
        all.iter()
            .map(|m| m["msg_id"].as_str().unwrap())
            .collect::<Vec<_>>(),
        vec!["dup-1", "new-1"]
    );
    assert_eq!(all[0]["body"], "first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_client_syncs_what_it_missed() {
    let s = TestServer::start().await;
    let api = s.api();
    let t = users(&api, &["alice", "bob"]).await;
    let conv = api.dm(&t[0], "bob").await;
    let mut alice = Client::connect(s.addr, &t[0]).await;
    let mut bob = Client::connect(s.addr, &t[1]).await;
    alice.send_msg(&conv, "a0", "before").await;
    alice.expect_op("ack").await;
    assert_eq!(bob.frame().await["seq"], 1);
    bob.close().await;

    // Bob is away for 250 messages: more than one sync can replay.
    for i in 1..=250 {
        alice
            .send_msg(&conv, &format!("a{i}"), &format!("missed {i}"))
            .await;
    }
    for _ in 1..=250 {
        alice.expect_op("ack").await;
    }

    let mut bob = Client::connect(s.addr, &t[1]).await;
    let mut after = 1;
    let mut got = Vec::new();
    loop {
        bob.send(json!({"op":"sync","conv":conv,"after_seq":after}))
            .await;
        loop {
            let f = bob.frame().await;
            match f["op"].as_str().unwrap() {
                "msg" => got.push(f["seq"].as_u64().unwrap()),
                "synced" => {
                    after = f["last_seq"].as_u64().unwrap();
                    if !f["has_more"].as_bool().unwrap() {
                        assert_eq!(got, (2..=251).collect::<Vec<u64>>());
                        // Nothing missed: an empty sync answers with the same last_seq.
                        bob.send(json!({"op":"sync","conv":conv,"after_seq":251}))
                            .await;
                        let f = bob.frame().await;
                        assert_eq!(
                            f,
                            json!({"op":"synced","conv":conv,"last_seq":251,"has_more":false})
                        );
                        return;
                    }
                    assert_eq!(got.len(), 200, "the first sync replays at most 200");
                    break;
                }
                other => panic!("unexpected {other}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_by_seq_cursor() {
    let s = TestServer::start().await;
    let api = s.api();
    let t = users(&api, &["alice", "bob", "eve"]).await;
    let conv = api.dm(&t[0], "bob").await;
    let mut alice = Client::connect(s.addr, &t[0]).await;
    for i in 1..=120 {
        alice
            .send_msg(&conv, &format!("h{i}"), &format!("{i}"))
            .await;
    }
    for _ in 0..120 {
        alice.expect_op("ack").await;
    }
    let seqs = |v: &Value| {
        v["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    let page = |q: &'static str| {
        let (api, t, conv) = (api.clone(), t[1].clone(), conv.clone());
        async move {
            let (status, v) = api.history(&t, &conv, q).await;
            assert_eq!(status, 200, "{v}");
            v
        }
    };
    let newest = page("").await;
    assert_eq!(
        seqs(&newest),
        (71..=120).collect::<Vec<_>>(),
        "no cursor: the newest page, ascending"
    );
    assert_eq!(newest["has_more"], true);
    let m = &newest["messages"][0];
    for field in ["conv", "seq", "id", "msg_id", "from", "body", "ts"] {
        assert!(!m[field].is_null(), "history items carry {field}");
    }
    let older = page("?before=71&limit=50").await;
    assert_eq!(seqs(&older), (21..=70).collect::<Vec<_>>());
    let oldest = page("?before=21&limit=50").await;
    assert_eq!(
        (seqs(&oldest), oldest["has_more"].clone()),
        ((1..=20).collect::<Vec<_>>(), json!(false))
    );
    let forward = page("?after=0&limit=50").await;
    assert_eq!(
        (seqs(&forward), forward["has_more"].clone()),
        ((1..=50).collect::<Vec<_>>(), json!(true))
    );
    let tail = page("?after=100&limit=50").await;
    assert_eq!(
        (seqs(&tail), tail["has_more"].clone()),
        ((101..=120).collect::<Vec<_>>(), json!(false))
    );
    let exact = page("?after=110&limit=10").await;
    assert_eq!(
        (seqs(&exact), exact["has_more"].clone()),
        ((111..=120).collect::<Vec<_>>(), json!(false))
    );
    let window = page("?after=10&before=15").await;
    assert_eq!(seqs(&window), vec![11, 12, 13, 14]);
    let empty = page("?after=120").await;
    assert_eq!(
        (seqs(&empty), empty["has_more"].clone()),
        (vec![], json!(false))
    );

    for bad in ["?limit=0", "?limit=201", "?after=-1", "?limit=x"] {
        let (status, v) = api.history(&t[1], &conv, bad).await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (400, Some("invalid_field")),
            "{bad}: {v}"
        );
    }
    let (status, v) = api.history(&t[2], &conv, "").await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (403, Some("not_member"))
    );
    let (status, v) = api.history(&t[2], "c_nope", "").await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("unknown_conversation"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_device_of_every_member_gets_the_message() {
    let s = TestServer::start().await;
    let api = s.api();
    let t = users(&api, &["alice", "bob"]).await;
    let conv = api.dm(&t[0], "bob").await;
    let mut alice_phone = Client::connect(s.addr, &t[0]).await;
    let mut alice_laptop = Client::connect(s.addr, &t[0]).await;
    let mut bob_phone = Client::connect(s.addr, &t[1]).await;
    let mut bob_laptop = Client::connect(s.addr, &t[1]).await;

    alice_phone.send_msg(&conv, "md1", "to all devices").await;
    assert_eq!(alice_phone.frame().await["op"], "ack");
    for c in [&mut alice_laptop, &mut bob_phone, &mut bob_laptop] {
        let m = c.frame().await;
        assert_eq!(
            (m["op"].as_str(), m["msg_id"].as_str()),
            (Some("msg"), Some("md1"))
        );
    }
    assert!(alice_phone.silent_for(Duration::from_millis(200)).await);

    // One device leaving does not disturb the others.
    bob_phone.close().await;
    alice_laptop.send_msg(&conv, "md2", "again").await;
    assert_eq!(alice_laptop.frame().await["op"], "ack");
    assert_eq!(bob_laptop.frame().await["msg_id"], "md2");
    assert_eq!(alice_phone.frame().await["msg_id"], "md2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_members_and_unknown_conversations_are_refused() {
    let s = TestServer::start().await;
    let api = s.api();
    let t = users(&api, &["alice", "bob", "carol"]).await;
    let conv = api.dm(&t[0], "bob").await;
    let mut carol = Client::connect(s.addr, &t[2]).await;
    let mut bob = Client::connect(s.addr, &t[1]).await;

    carol.send_msg(&conv, "sneaky", "hi").await;
    let e = carol.frame().await;
    assert_eq!(
        (e["op"].as_str(), e["code"].as_str(), e["msg_id"].as_str()),
        (Some("error"), Some("not_member"), Some("sneaky"))
    );
    carol
        .send(json!({"op":"sync","conv":conv,"after_seq":0}))
        .await;
    assert_eq!(carol.frame().await["code"], "not_member");
    carol.send_msg("c_does_not_exist", "x", "hi").await;
    let e = carol.frame().await;
    assert_eq!(
        (e["code"].as_str(), e["msg_id"].as_str()),
        (Some("unknown_conversation"), Some("x"))
    );
    assert!(
        bob.silent_for(Duration::from_millis(200)).await,
        "a refused send must not be delivered"
    );

    let (status, v) = api
        .call(
            reqwest::Method::POST,
            &format!("/v1/conversations/{conv}/messages"),
            &t[2],
            Some(json!({"msg_id":"r","body":"x"})),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (403, Some("not_member"))
    );
    let (status, _) = api
        .call(
            reqwest::Method::GET,
            &format!("/v1/conversations/{conv}"),
            &t[2],
            None,
        )
        .await;
    assert_eq!(status, 403);
    assert!(api.all_messages(&t[0], &conv).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_documented_errors_and_the_socket_stays_usable() {
    let s = TestServer::start().await;
    let api = s.api();
    let t = users(&api, &["alice", "bob"]).await;
    let conv = api.dm(&t[0], "bob").await;
    let mut c = Client::connect(s.addr, &t[0]).await;
    let big = "x".repeat(4097);
    let cases: Vec<(String, &str, Option<&str>)> = vec![
        ("{not json".into(), "invalid_json", None),
        ("[1,2,3]".into(), "invalid_json", None),
        (r#"{"op":"fly"}"#.into(), "unknown_op", None),
        (r#"{"conv":"c"}"#.into(), "missing_field", None),
        (
            json!({"op":"send","msg_id":"m1","conv":conv}).to_string(),
            "missing_field",
            Some("m1"),
        ),
        (
            json!({"op":"send","msg_id":"m2","conv":conv,"body":42}).to_string(),
            "invalid_field",
            Some("m2"),
        ),
        (
            json!({"op":"send","msg_id":"","conv":conv,"body":"x"}).to_string(),
            "invalid_field",
            Some(""),
        ),
        (
            json!({"op":"sync","conv":conv,"after_seq":"seven"}).to_string(),
            "invalid_field",
            None,
        ),
        (
            json!({"op":"send","msg_id":"m3","conv":conv,"body":big}).to_string(),
            "body_too_large",
            Some("m3"),
        ),
    ];
    for (text, code, msg_id) in cases {
        c.send_raw(&text).await;
        let e = c.frame().await;
        assert_eq!(e["op"], "error");
        assert_eq!(e["code"], code, "for {}", &text[..text.len().min(60)]);
        assert_eq!(e["msg_id"].as_str(), msg_id);
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    c.ws.send(tokio_tungstenite::tungstenite::Message::Binary(
        vec![1, 2, 3].into(),
    ))
    .await
    .unwrap();
    assert_eq!(c.frame().await["code"], "invalid_json");
    // A body of exactly the limit is fine, counted in UTF-8 bytes.
    c.send_msg(&conv, "ok", &"é".repeat(2048)).await;
    assert_eq!(c.frame().await["op"], "ack");
    c.send(json!({"op":"ping"})).await;
    assert_eq!(c.frame().await, json!({"op":"pong"}));

    // A fragmented message is reassembled…
    use tokio_tungstenite::tungstenite::protocol::frame::{
        coding::{Data, OpCode},
        Frame,
    };
    let text = json!({"op":"send","msg_id":"frag","conv":conv,"body":"in pieces"}).to_string();
    let (a, b) = text.split_at(10);
    c.ws.send(tokio_tungstenite::tungstenite::Message::Frame(
        Frame::message(a.as_bytes().to_vec(), OpCode::Data(Data::Text), false),
    ))
    .await
    .unwrap();
    c.ws.send(tokio_tungstenite::tungstenite::Message::Frame(
        Frame::message(b.as_bytes().to_vec(), OpCode::Data(Data::Continue), true),
    ))
    .await
    .unwrap();
    assert_eq!(c.expect_op("ack").await["msg_id"], "frag");
    // …and one over 64 KiB in total closes the socket with 1009, like a single big frame.
    let piece = vec![b'y'; 40 * 1024];
    c.ws.send(tokio_tungstenite::tungstenite::Message::Frame(
        Frame::message(piece.clone(), OpCode::Data(Data::Text), false),
    ))
    .await
    .unwrap();
    c.ws.send(tokio_tungstenite::tungstenite::Message::Frame(
        Frame::message(piece, OpCode::Data(Data::Continue), true),
    ))
    .await
    .unwrap();
    assert_eq!(c.closed().await, Some(1009));
    let mut c = Client::connect(s.addr, &t[0]).await;
    c.send_raw(&"y".repeat(65 * 1024)).await;
    assert_eq!(c.closed().await, Some(1009));

    // Authentication happens before the upgrade.
    for token in ["", "garbage", &format!("{}x", t[0])] {
        let err = Client::try_connect(s.addr, token)
            .await
            .err()
            .expect("upgrade must fail");
        match err {
            tokio_tungstenite::tungstenite::Error::Http(r) => assert_eq!(r.status(), 401),
            other => panic!("expected HTTP 401, got {other}"),
        }
    }
    let (status, v) = api
        .call(reqwest::Method::GET, "/v1/conversations", "nope", None)
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let (status, v) = api
        .call(
            reqwest::Method::POST,
            "/v1/conversations",
            &t[0],
            Some(json!({"kind":"dm"})),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("missing_field")),
        "{v}"
    );
    let (status, v) = api
        .call(
            reqwest::Method::POST,
            "/v1/conversations",
            &t[0],
            Some(json!({"kind":"dm","members":["alice"]})),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("invalid_field")),
        "a DM with oneself: {v}"
    );
    let (status, v) = api
        .call(
            reqwest::Method::POST,
            &format!("/v1/conversations/{conv}/messages"),
            &t[0],
            Some(json!({"msg_id":"big","body":big})),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (413, Some("body_too_large"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_disconnected_while_others_keep_receiving() {
    let s = TestServer::start().await;
    let api = s.api();
    let t = users(&api, &["alice", "bob", "slow"]).await;
    let conv = api.group(&t[0], &["bob".into(), "slow".into()]).await;
    let mut slow = Client::connect_small_buffer(s.addr, &t[2]).await;
    let mut bob = Client::connect(s.addr, &t[1]).await;
    let mut alice = Client::connect(s.addr, &t[0]).await;

    // `slow` never reads while ~20 MB are sent: its socket buffers fill, then its 1,024-frame queue, and it
    // is cut off. Alice and Bob read as they go and must not notice.
    const N: u64 = 5000;
    let body = "z".repeat(4000);
    let conv2 = conv.clone();
    let sender = tokio::spawn(async move {
        for chunk in 0..N / 100 {
            for i in 0..100 {
                alice
                    .send_msg(&conv2, &format!("s{}", chunk * 100 + i), &body)
                    .await;
            }
            for _ in 0..100 {
                alice.expect_op("ack").await;
            }
        }
    });
    for i in 1..=N {
        assert_eq!(
            bob.expect_op("msg").await["seq"],
            i,
            "bob must get every message in order"
        );
    }
    sender.await.unwrap();

    let mut received = 0;
    let code = loop {
        match slow.recv().await {
            Recv::Frame(_) => received += 1,
            Recv::Closed(code) => break code,
        }
    };
    assert_eq!(code, Some(4002), "slow consumer close code");
    assert!(
        received < N,
        "the slow client should have been cut off, got all {received}"
    );
    // Reconnecting and syncing gets it everything.
    let mut again = Client::connect(s.addr, &t[2]).await;
    again
        .send(json!({"op":"sync","conv":conv,"after_seq":received}))
        .await;
    assert_eq!(again.expect_op("msg").await["seq"], received + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_conversation_restarts_alone() {
    let s = TestServer::start().await;
    let api = s.api();
    let t = users(&api, &["alice", "bob"]).await;
    let conv_a = api.group(&t[0], &["bob".into()]).await;
    let conv_b = api.group(&t[0], &["bob".into()]).await;
    let mut observer = Client::connect(s.addr, &t[1]).await;
    const N: u64 = 200;

    let senders = [conv_a.clone(), conv_b.clone()].map(|conv| {
        let (addr, token) = (s.addr, t[0].clone());
        tokio::spawn(async move {
            let mut c = Client::connect(addr, &token).await;
            let mut acks = Vec::new();
            for i in 0..N {
                c.send_msg(&conv, &format!("{conv}-{i}"), "x").await;
                if i % 10 == 9 {
                    // Keep messages flowing over a few hundred milliseconds.
                    while acks.len() < (i + 1) as usize {
                        let f = c.frame().await;
                        if f["op"] == "msg" {
                            continue; // alice's other connection's messages
                        }
                        assert_eq!(f["op"], "ack", "every send is acknowledged: {f}");
                        acks.push(f["seq"].as_u64().unwrap());
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            c.send(json!({"op":"ping"})).await;
            assert_eq!(
                c.expect_op("pong").await["op"],
                "pong",
                "the connection survived"
            );
            acks
        })
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = s
        .server()
        .conversations()
        .actor_id(&conv_a)
        .expect("conversation running");
    let b_before = s
        .server()
        .conversations()
        .actor_id(&conv_b)
        .expect("conversation running");
    assert!(s.server().conversations().crash(&conv_a));

    let acks: Vec<Vec<u64>> = join_all(senders)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    for seqs in &acks {
        assert_eq!(
            seqs,
            &(1..=N).collect::<Vec<_>>(),
            "seqs continue after the restart with no gap or reuse"
        );
    }
    let after = s
        .server()
        .conversations()
        .actor_id(&conv_a)
        .expect("restarted");
    assert_ne!(before, after, "the crashed conversation has a new actor");
    assert_eq!(
        s.server().conversations().actor_id(&conv_b),
        Some(b_before),
        "the other conversation did not notice"
    );

    let mut delivered: HashMap<String, BTreeSet<u64>> = HashMap::new();
    while delivered.values().map(BTreeSet::len).sum::<usize>() < 2 * N as usize {
        let m = observer.expect_op("msg").await;
        delivered
            .entry(m["conv"].as_str().unwrap().to_owned())
            .or_default()
            .insert(m["seq"].as_u64().unwrap());
    }
    for conv in [&conv_a, &conv_b] {
        assert_eq!(
            delivered[conv.as_str()],
            (1..=N).collect(),
            "every message delivered once"
        );
        let history: Vec<u64> = api
            .all_messages(&t[0], conv)
            .await
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(history, (1..=N).collect::<Vec<_>>());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_over_rest() {
    let s = TestServer::start().await;
    let api = s.api();
    let t = users(&api, &["alice", "bob", "carol", "dave"]).await;

    let (status, dm) = api
        .create(&t[0], json!({"kind":"dm","members":["bob"]}))
        .await;
    assert_eq!(status, 201);
    assert_eq!(dm["members"], json!(["alice", "bob"]));
    assert_eq!(
        (dm["kind"].as_str(), dm["last_seq"].as_u64()),
        (Some("dm"), Some(0))
    );
    let (status, again) = api
        .create(&t[0], json!({"kind":"dm","members":["bob"]}))
        .await;
    assert_eq!(
        (status, &again["id"]),
        (200, &dm["id"]),
        "a DM is unique per pair"
    );
    let (status, theirs) = api
        .create(&t[1], json!({"kind":"dm","members":["alice"]}))
        .await;
    assert_eq!(
        (status, &theirs["id"]),
        (200, &dm["id"]),
        "from either side"
    );

    let group = api.group(&t[0], &["bob".into(), "carol".into()]).await;
    let dm_id = dm["id"].as_str().unwrap();
    let (status, sent) = api
        .call(
            reqwest::Method::POST,
            &format!("/v1/conversations/{dm_id}/messages"),
            &t[1],
            Some(json!({"msg_id":"bot-1","body":"from a bot"})),
        )
        .await;
    assert_eq!(status, 201, "{sent}");
    assert_eq!(
        (sent["seq"].as_u64(), sent["from"].as_str()),
        (Some(1), Some("bob"))
    );

    // Most recent activity first: the DM has a message, the group only its creation.
    let (_, list) = api
        .call(reqwest::Method::GET, "/v1/conversations", &t[0], None)
        .await;
    let ids: Vec<&str> = list["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![dm_id, group.as_str()]);
    assert_eq!(list["conversations"][0]["last_seq"], 1);
    assert_eq!(
        list["conversations"][0]["last_message"]["body"],
        "from a bot"
    );
    let mut g = Client::connect(s.addr, &t[2]).await;
    g.send_msg(&group, "g1", "now the group is newest").await;
    g.expect_op("ack").await;
    let (_, list) = api
        .call(reqwest::Method::GET, "/v1/conversations", &t[0], None)
        .await;
    assert_eq!(list["conversations"][0]["id"], group.as_str());

    // Members: dave joins and can send; carol leaves and cannot.
    let (status, v) = api
        .call(
            reqwest::Method::POST,
            &format!("/v1/conversations/{group}/members"),
            &t[0],
            Some(json!({"user":"dave"})),
        )
        .await;
    assert_eq!((status, v["added"].as_bool()), (200, Some(true)));
    let mut dave = Client::connect(s.addr, &t[3]).await;
    dave.send_msg(&group, "d1", "hi all").await;
    assert_eq!(dave.frame().await["op"], "ack");
    let (status, v) = api
        .call(
            reqwest::Method::DELETE,
            &format!("/v1/conversations/{group}/members/carol"),
            &t[0],
            None,
        )
        .await;
    assert_eq!((status, v["removed"].as_bool()), (200, Some(true)));
    g.send_msg(&group, "g2", "still here?").await;
    assert_eq!(g.expect_op("error").await["code"], "not_member");
    let (status, v) = api
        .call(
            reqwest::Method::GET,
            &format!("/v1/conversations/{group}"),
            &t[0],
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(v["members"], json!(["alice", "bob", "dave"]));
    let (status, _) = api
        .call(
            reqwest::Method::POST,
            &format!("/v1/conversations/{dm_id}/members"),
            &t[0],
            Some(json!({"user":"carol"})),
        )
        .await;
    assert_eq!(status, 400, "a DM's members do not change");

    // Groups hold up to 5,000 members, the creator included.
    let many: Vec<String> = (0..4999).map(|i| format!("m{i}")).collect();
    let (status, v) = api
        .create(&t[0], json!({"kind":"group","name":"big","members":many}))
        .await;
    assert_eq!(status, 201);
    assert_eq!(v["members"].as_array().unwrap().len(), 5000);
    let big = v["id"].as_str().unwrap().to_owned();
    let (status, _) = api
        .call(
            reqwest::Method::POST,
            &format!("/v1/conversations/{big}/members"),
            &t[0],
            Some(json!({"user":"one-too-many"})),
        )
        .await;
    assert_eq!(status, 400);
    let mut alice = Client::connect(s.addr, &t[0]).await;
    let mut member = Client::connect(s.addr, &api.token("m4998").await).await;
    alice.send_msg(&big, "b1", "hello 4,999 people").await;
    assert_eq!(alice.frame().await["seq"], 1);
    assert_eq!(member.frame().await["msg_id"], "b1");
    let too_many: Vec<String> = (0..5000).map(|i| format!("m{i}")).collect();
    let (status, _) = api
        .create(
            &t[0],
            json!({"kind":"group","name":"too big","members":too_many}),
        )
        .await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_login_can_be_turned_off() {
    let s = TestServer::start_with(|c| c.dev_login = false).await;
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/dev/token", s.addr))
        .json(&json!({"user":"a"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = reqwest::get(format!("http://{}/healthz", s.addr))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = reqwest::get(format!("http://{}/readyz", s.addr))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_and_pinging_ones_kept() {
    let s = TestServer::start_with(|c| c.heartbeat_timeout = Duration::from_millis(800)).await;
    let token = s.api().token("alice").await;
    let mut silent = Client::connect(s.addr, &token).await;
    let mut chatty = Client::connect(s.addr, &token).await;
    let started = std::time::Instant::now();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        chatty
            .ws
            .send(tokio_tungstenite::tungstenite::Message::Ping(
                b"hb".to_vec().into(),
            ))
            .await
            .unwrap();
    }
    assert_eq!(silent.closed().await, Some(4001));
    assert!(started.elapsed() >= Duration::from_millis(800));
    chatty.send(json!({"op":"ping"})).await;
    assert_eq!(
        chatty.expect_op("pong").await["op"],
        "pong",
        "a client that pings stays connected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_conversations_stop_and_resume_from_the_store() {
    let s = TestServer::start_with(|c| c.conversation_idle = Duration::from_millis(200)).await;
    let api = s.api();
    let t = users(&api, &["alice", "bob"]).await;
    let conv = api.dm(&t[0], "bob").await;
    let mut alice = Client::connect(s.addr, &t[0]).await;
    alice.send_msg(&conv, "i1", "one").await;
    assert_eq!(alice.frame().await["seq"], 1);
    assert_eq!(s.server().conversations().running(), 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while s.server().conversations().running() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "idle conversation did not stop"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    alice.send_msg(&conv, "i2", "two").await;
    assert_eq!(
        alice.frame().await["seq"],
        2,
        "a restarted conversation continues its sequence"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_answers_accepted_sends_then_closes_with_1012() {
    let s = TestServer::start().await;
    let api = s.api();
    let t = users(&api, &["alice", "bob"]).await;
    let conv = api.dm(&t[0], "bob").await;
    let mut alice = Client::connect(s.addr, &t[0]).await;
    for i in 0..50 {
        alice.send_msg(&conv, &format!("d{i}"), "x").await;
    }
    // Wait until the server has read them all (the last one's ack), then drain.
    let mut acked = 0;
    while acked < 50 {
        if alice.frame().await["op"] == "ack" {
            acked += 1;
        }
    }
    let addr = s.addr;
    let dir = s.stop().await;
    assert_eq!(alice.closed().await, Some(1012));
    assert!(
        Client::try_connect(addr, &t[0]).await.is_err(),
        "a drained server accepts no connection"
    );
    let s = TestServer::start_in(dir, |_| {}).await;
    assert_eq!(s.api().all_messages(&t[0], &conv).await.len(), 50);
}
