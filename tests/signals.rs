//! Typing and receipts over real sockets against an in-process server: best effort, never stored, passed on
//! by the conversation's actor to the other members' online devices.

mod common;

use std::time::Duration;

use common::{Api, Client, TestServer};
use futures_util::future::join_all;
use serde_json::json;

/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(300);

async fn tokens(api: &Api, names: &[String]) -> Vec<String> {
    join_all(names.iter().map(|n| api.token(n))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_reaches_the_other_members_at_most_once_a_second() {
    let s = TestServer::start().await;
    let api = s.api();
    let names: Vec<String> = ["alice", "bob", "carol", "dave"].map(String::from).into();
    let t = tokens(&api, &names).await;
    let group = api.group(&t[0], &["bob".into(), "carol".into()]).await;
    let mut alice = Client::connect(s.addr, &t[0]).await;
    let mut alice_phone = Client::connect(s.addr, &t[0]).await;
    let mut bob = Client::connect(s.addr, &t[1]).await;
    let mut carol = Client::connect(s.addr, &t[2]).await;
    let mut dave = Client::connect(s.addr, &t[3]).await;

    alice.send(json!({"op":"typing","conv":group})).await;
    for c in [&mut bob, &mut carol, &mut alice_phone] {
        assert_eq!(
            c.frame().await,
            json!({"op":"typing","conv":group,"user":"alice"})
        );
    }
    assert!(
        alice.silent_for(QUIET).await,
        "the typing device gets nothing back"
    );

    // Within a second of the last one passed on: dropped.
    alice.send(json!({"op":"typing","conv":group})).await;
    assert!(
        bob.silent_for(QUIET).await,
        "a second typing event within 1 s"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    alice.send(json!({"op":"typing","conv":group})).await;
    assert_eq!(bob.expect_op("typing").await["user"], "alice");
    // Each member has a throttle of its own.
    bob.send(json!({"op":"typing","conv":group})).await;
    assert_eq!(carol.expect_op("typing").await["user"], "alice");
    assert_eq!(carol.expect_op("typing").await["user"], "bob");

    // Not a member: nothing is passed on.
    dave.send(json!({"op":"typing","conv":group})).await;
    assert!(
        bob.silent_for(QUIET).await,
        "a non-member's typing was passed on"
    );
    // Typing is never stored.
    assert!(api.all_messages(&t[0], &group).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_go_to_dms_and_groups_of_up_to_100_members() {
    let s = TestServer::start().await;
    let api = s.api();
    let names: Vec<String> = (0..101).map(|i| format!("u{i:03}")).collect();
    let t = tokens(&api, &names).await;
    let dm = api.dm(&t[0], "u001").await;
    let hundred = api.group(&t[0], &names[1..100]).await;
    let hundred_and_one = api.group(&t[0], &names[1..101]).await;
    let mut owner = Client::connect(s.addr, &t[0]).await;
    let mut reader = Client::connect(s.addr, &t[1]).await;
    owner.send_msg(&dm, "d1", "hi").await;
    owner.expect_op("ack").await;
    reader.expect_op("msg").await;

    reader
        .send(json!({"op":"delivered","conv":dm,"seq":1}))
        .await;
    reader.send(json!({"op":"read","conv":dm,"seq":1})).await;
    assert_eq!(
        owner.frame().await,
        json!({"op":"receipt","conv":dm,"user":"u001","kind":"delivered","seq":1})
    );
    assert_eq!(
        owner.frame().await,
        json!({"op":"receipt","conv":dm,"user":"u001","kind":"read","seq":1})
    );

    reader
        .send(json!({"op":"read","conv":hundred,"seq":0}))
        .await;
    assert_eq!(
        owner.expect_op("receipt").await,
        json!({"op":"receipt","conv":hundred,"user":"u001","kind":"read","seq":0})
    );
    reader
        .send(json!({"op":"read","conv":hundred_and_one,"seq":0}))
        .await;
    assert!(
        owner.silent_for(QUIET).await,
        "no receipt events in a group of 101"
    );

    // Malformed receipts are refused like any frame.
    reader.send(json!({"op":"read","conv":dm})).await;
    let e = reader.expect_op("error").await;
    assert_eq!(e["code"], "missing_field", "{e}");
    reader
        .send(json!({"op":"delivered","conv":dm,"seq":-1}))
        .await;
    assert_eq!(reader.expect_op("error").await["code"], "invalid_field");
}

/// Sum of `unread` and the `read_seq` of `conv` in `GET /v1/conversations`.
async fn inbox_entry(api: &Api, token: &str, conv: &str) -> (u64, u64) {
    let (status, v) = api
        .call(reqwest::Method::GET, "/v1/conversations", token, None)
        .await;
    assert_eq!(status, 200, "{v}");
    let entry = v["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == conv)
        .unwrap_or_else(|| panic!("{conv} in {v}"))
        .clone();
    (
        entry["unread"].as_u64().unwrap(),
        entry["read_seq"].as_u64().unwrap(),
    )
}

/// Poll the inbox until `conv` shows `want` (the position is stored after the receipt is passed on).
async fn until_inbox(api: &Api, token: &str, conv: &str, want: (u64, u64)) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let got = inbox_entry(api, token, conv).await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{conv}: (unread, read_seq) is {got:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_positions_are_durable_move_forward_and_reach_the_readers_devices() {
    let s = TestServer::start().await;
    let api = s.api();
    let names: Vec<String> = (0..101).map(|i| format!("r{i:03}")).collect();
    let t = tokens(&api, &names).await;
    let dm = api.dm(&t[0], "r001").await;
    let big = api.group(&t[0], &names[1..]).await;
    let mut sender = Client::connect(s.addr, &t[0]).await;
    for (conv, n) in [(&dm, 3), (&big, 2)] {
        for i in 0..n {
            sender.send_msg(conv, &format!("{conv}-{i}"), "x").await;
            sender.expect_op("ack").await;
        }
    }
    until_inbox(&api, &t[1], &dm, (3, 0)).await;

    let mut phone = Client::connect(s.addr, &t[1]).await;
    let mut web = Client::connect(s.addr, &t[1]).await;
    phone.send(json!({"op":"read","conv":dm,"seq":2})).await;
    assert_eq!(
        web.expect_op("receipt").await,
        json!({"op":"receipt","conv":dm,"user":"r001","kind":"read","seq":2})
    );
    until_inbox(&api, &t[1], &dm, (1, 2)).await;
    // Never back; never past the last message.
    phone.send(json!({"op":"read","conv":dm,"seq":1})).await;
    phone.send(json!({"op":"read","conv":dm,"seq":99})).await;
    until_inbox(&api, &t[1], &dm, (0, 3)).await;
    assert_eq!(
        web.expect_op("receipt").await["seq"],
        3,
        "an older read is not passed on; one past the end is the last seq"
    );

    for seq in [2, 3] {
        assert_eq!(
            sender.expect_op("receipt").await["seq"],
            seq,
            "the DM's receipts"
        );
    }

    // In a group of 101 only the reader's own devices hear of it.
    phone.send(json!({"op":"read","conv":big,"seq":1})).await;
    assert_eq!(
        web.expect_op("receipt").await,
        json!({"op":"receipt","conv":big,"user":"r001","kind":"read","seq":1})
    );
    assert!(
        sender.silent_for(QUIET).await,
        "no receipt events in a big group"
    );
    until_inbox(&api, &t[1], &big, (1, 1)).await;

    // Durable: a restarted server still knows.
    drop((sender, phone, web));
    let dir = s.stop().await;
    let s = TestServer::start_in(dir, |_| {}).await;
    let api = s.api();
    assert_eq!(inbox_entry(&api, &t[1], &dm).await, (0, 3));
    assert_eq!(inbox_entry(&api, &t[1], &big).await, (1, 1));
    assert_eq!(inbox_entry(&api, &t[0], &dm).await, (3, 0), "per user");
}
