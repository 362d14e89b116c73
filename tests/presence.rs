//! Presence over real sockets against an in-process server: online while any device is connected, offline
//! once none has been for the grace period, to contacts (DMs and groups of at most 100) and watchers; a
//! crashed presence actor is restarted and rebuilds.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Api, Client, TestServer};
use futures_util::future::join_all;
use reqwest::Method;
use serde_json::{json, Value};

/// Grace period the tests run with.
const GRACE: Duration = Duration::from_millis(600);

async fn server() -> TestServer {
    TestServer::start_with(|c| c.presence_grace = GRACE).await
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn tokens(api: &Api, names: &[&str]) -> Vec<String> {
    join_all(names.iter().map(|n| api.token(n))).await
}

/// The next `presence` frame about `user`; asserts its state and returns its `last_seen`.
async fn expect_presence(c: &mut Client, user: &str, state: &str) -> Option<u64> {
    let f = c.expect_op("presence").await;
    assert_eq!(f["user"], user, "{f}");
    assert_eq!(f["state"], state, "{f}");
    f["last_seen"].as_u64()
}

/// Alice and Bob share a DM; Bob (hearing presence) is told Alice came online. Returns their tokens, Bob
/// and Alice.
async fn alice_and_bob(s: &TestServer) -> (Vec<String>, Client, Client) {
    let api = s.api();
    let t = tokens(&api, &["alice", "bob"]).await;
    api.dm(&t[0], "bob").await;
    let mut bob = Client::connect(s.addr, &t[1]).await.hear_presence();
    let alice = Client::connect(s.addr, &t[0]).await;
    expect_presence(&mut bob, "alice", "online").await;
    (t, bob, alice)
}

async fn lookup(api: &Api, token: &str, users: &str) -> (u16, Value) {
    api.call(
        Method::GET,
        &format!("/v1/presence?users={users}"),
        token,
        None,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contacts_and_watchers_see_a_user_come_online_and_go_offline() {
    let s = server().await;
    let api = s.api();
    let t = tokens(&api, &["alice", "bob", "carol", "dave"]).await;
    api.dm(&t[0], "bob").await;
    let mut bob = Client::connect(s.addr, &t[1]).await.hear_presence();
    let mut carol = Client::connect(s.addr, &t[2]).await.hear_presence();
    let mut dave = Client::connect(s.addr, &t[3]).await.hear_presence();
    // Carol shares nothing with Alice and asks; Dave neither shares nor asks.
    carol
        .send(json!({"op":"presence_subscribe","users":["alice","nobody"]}))
        .await;
    assert_eq!(expect_presence(&mut carol, "alice", "offline").await, None);
    assert_eq!(expect_presence(&mut carol, "nobody", "offline").await, None);

    let before = now_ms();
    let phone = Client::connect(s.addr, &t[0]).await;
    for c in [&mut bob, &mut carol] {
        let seen = expect_presence(c, "alice", "online").await.unwrap();
        assert!(seen >= before && seen <= now_ms(), "last_seen {seen}");
    }
    // A second device, and one of two going, change nothing.
    let web = Client::connect(s.addr, &t[0]).await;
    phone.close().await;
    assert!(bob.silent_for(GRACE * 2).await, "one device of two went");
    let (status, v) = lookup(&api, &t[1], "alice").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["users"][0]["state"], "online");

    let left = now_ms();
    web.close().await;
    for c in [&mut bob, &mut carol] {
        let seen = expect_presence(c, "alice", "offline").await.unwrap();
        assert!(
            seen >= left && seen <= left + 500,
            "last_seen {seen} is when the last device went ({left})"
        );
    }
    assert!(dave.silent_for(Duration::from_millis(300)).await);

    let (status, v) = lookup(&api, &t[3], "alice,zed,alice").await;
    assert_eq!(status, 200, "{v}");
    let users = v["users"].as_array().unwrap();
    assert_eq!(users.len(), 2, "repeats answered once: {v}");
    assert_eq!(users[0]["user"], "alice");
    assert_eq!(users[0]["state"], "offline");
    assert!(users[0]["last_seen"].as_u64().unwrap() >= left);
    assert_eq!(
        users[1],
        json!({"user":"zed","state":"offline","last_seen":null})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_reconnects_within_the_grace_period_shows_no_offline_online_pair() {
    let s = TestServer::start_with(|c| c.presence_grace = Duration::from_secs(2)).await;
    let (t, mut bob, mut alice) = alice_and_bob(&s).await;
    // Alice's only device drops and comes back 300 ms later, three times.
    for _ in 0..3 {
        alice.close().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        alice = Client::connect(s.addr, &t[0]).await;
    }
    assert!(
        bob.silent_for(Duration::from_millis(2500)).await,
        "a reconnect within the grace period showed"
    );
    alice.close().await;
    expect_presence(&mut bob, "alice", "offline").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_whose_heartbeats_stop_goes_offline() {
    let s = TestServer::start_with(|c| {
        c.presence_grace = GRACE;
        c.heartbeat_timeout = Duration::from_secs(1);
    })
    .await;
    // Alice's socket stays open but says nothing: no frame, no ping.
    let (_, mut bob, mut alice) = alice_and_bob(&s).await;
    // Bob keeps his own connection alive while he waits.
    let waited = tokio::time::Instant::now();
    let offline = loop {
        bob.send(json!({"op":"ping"})).await;
        match bob.recv_within(Duration::from_millis(400)).await {
            Some(common::Recv::Frame(f)) if f["op"] == "presence" => break f,
            Some(common::Recv::Frame(_)) | None => {}
            Some(common::Recv::Closed(code)) => panic!("bob closed: {code:?}"),
        }
        assert!(waited.elapsed() < Duration::from_secs(10), "no offline");
    };
    assert_eq!(offline["user"], "alice");
    assert_eq!(offline["state"], "offline");
    assert!(waited.elapsed() >= Duration::from_secs(1) + GRACE);
    assert_eq!(alice.closed().await, Some(4001));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contacts_are_members_of_dms_and_groups_of_at_most_100() {
    let s = server().await;
    let api = s.api();
    let names: Vec<String> = (0..101).map(|i| format!("u{i:03}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let t = tokens(&api, &refs).await;
    // u000 and u001 share a 101-member group; u000 and u002 a 100-member one.
    api.group(&t[0], &names[1..101]).await;
    let mut small = names[2..100].to_vec();
    small.push("zoe".into());
    api.group(&t[0], &small).await;
    let mut big_only = Client::connect(s.addr, &t[1]).await.hear_presence();
    let mut small_too = Client::connect(s.addr, &t[2]).await.hear_presence();
    let u000 = Client::connect(s.addr, &t[0]).await;
    expect_presence(&mut small_too, "u000", "online").await;
    assert!(
        big_only.silent_for(Duration::from_millis(500)).await,
        "a 101-member group's member heard of u000"
    );
    // …but may still ask.
    big_only
        .send(json!({"op":"presence_subscribe","users":["u000"]}))
        .await;
    expect_presence(&mut big_only, "u000", "online").await;
    u000.close().await;
    expect_presence(&mut big_only, "u000", "offline").await;
    expect_presence(&mut small_too, "u000", "offline").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_replace_each_other_and_bad_ones_are_refused() {
    let s = server().await;
    let api = s.api();
    let t = tokens(&api, &["alice", "bob", "carol"]).await;
    let mut bob = Client::connect(s.addr, &t[1]).await.hear_presence();
    bob.send(json!({"op":"presence_subscribe","users":["alice"]}))
        .await;
    expect_presence(&mut bob, "alice", "offline").await;
    bob.send(json!({"op":"presence_subscribe","users":["carol"]}))
        .await;
    expect_presence(&mut bob, "carol", "offline").await;
    let alice = Client::connect(s.addr, &t[0]).await;
    assert!(
        bob.silent_for(Duration::from_millis(400)).await,
        "alice is no longer watched"
    );
    let carol = Client::connect(s.addr, &t[2]).await;
    expect_presence(&mut bob, "carol", "online").await;
    bob.send(json!({"op":"presence_subscribe","users":[]}))
        .await;
    carol.close().await;
    alice.close().await;
    assert!(
        bob.silent_for(GRACE * 2).await,
        "an empty list watches none"
    );

    for bad in [
        json!({"op":"presence_subscribe"}),
        json!({"op":"presence_subscribe","users":"alice"}),
        json!({"op":"presence_subscribe","users":[""]}),
    ] {
        bob.send(bad.clone()).await;
        let e = bob.expect_op("error").await;
        assert!(
            e["code"] == "missing_field" || e["code"] == "invalid_field",
            "{bad} → {e}"
        );
    }
    let (status, v) = lookup(&api, &t[1], "").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["users"], json!([]));
    let (status, v) = api.call(Method::GET, "/v1/presence", &t[1], None).await;
    assert_eq!(
        (status, v["error"]["code"].clone()),
        (400, json!("missing_field"))
    );
    let (status, _) = lookup(&api, "not-a-token", "alice").await;
    assert_eq!(status, 401);
    let many: Vec<String> = (0..1001).map(|i| format!("u{i}")).collect();
    let (status, v) = lookup(&api, &t[1], &many.join(",")).await;
    assert_eq!(
        (status, v["error"]["code"].clone()),
        (400, json!("invalid_field"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_presence_actor_is_restarted_and_rebuilds_what_it_missed() {
    let s = server().await;
    let api = s.api();
    let (t, mut bob, alice) = alice_and_bob(&s).await;
    let carol_token = api.token("carol").await;
    let presence = s.server().presence().clone();

    // The shard crashes with Alice's disconnect queued behind the crash: that notice is lost with it.
    let first = presence.shard_actor_id("alice").unwrap();
    assert!(presence.crash("alice"));
    alice.close().await;
    // The restarted shard finds Alice shown online with no device, and tells Bob after the grace period —
    // the only event he gets.
    let f = bob.expect_op("presence").await;
    assert_eq!(
        (f["user"].as_str(), f["state"].as_str()),
        (Some("alice"), Some("offline")),
        "{f}"
    );
    assert!(bob.silent_for(GRACE * 2).await, "more than one event");
    let second = presence.shard_actor_id("alice").unwrap();
    assert_ne!(first, second, "the shard has a new actor");

    // The new actor serves as the old one did.
    let mut carol = Client::connect(s.addr, &carol_token).await.hear_presence();
    carol
        .send(json!({"op":"presence_subscribe","users":["alice"]}))
        .await;
    expect_presence(&mut carol, "alice", "offline").await;
    let alice = Client::connect(s.addr, &t[0]).await;
    expect_presence(&mut bob, "alice", "online").await;
    expect_presence(&mut carol, "alice", "online").await;
    alice.close().await;
    expect_presence(&mut bob, "alice", "offline").await;

    let metrics = api
        .http
        .get(format!("{}/metrics", api.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("switchboard_actor_restarts_total{family=\"presence\"}")),
        "the restart is counted"
    );
}
