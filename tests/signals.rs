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
