//! Roles in a group (owner, member) and what a removal does to the removed user's open sockets.

mod common;

use std::time::Duration;

use common::{Api, Client, TestServer};
use reqwest::Method;
use serde_json::{json, Value};

async fn set_role(api: &Api, token: &str, conv: &str, user: &str, role: &str) -> (u16, Value) {
    api.call(
        Method::PUT,
        &format!("/v1/conversations/{conv}/members/{user}"),
        token,
        Some(json!({ "role": role })),
    )
    .await
}

async fn add(api: &Api, token: &str, conv: &str, user: &str) -> (u16, Value) {
    api.call(
        Method::POST,
        &format!("/v1/conversations/{conv}/members"),
        token,
        Some(json!({ "user": user })),
    )
    .await
}

async fn remove(api: &Api, token: &str, conv: &str, user: &str) -> (u16, Value) {
    api.call(
        Method::DELETE,
        &format!("/v1/conversations/{conv}/members/{user}"),
        token,
        None,
    )
    .await
}

async fn owners(api: &Api, token: &str, conv: &str) -> Value {
    let (status, v) = api
        .call(
            Method::GET,
            &format!("/v1/conversations/{conv}"),
            token,
            None,
        )
        .await;
    assert_eq!(status, 200, "{v}");
    v["owners"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owners_manage_members_members_only_leave_and_roles_survive_a_restart() {
    let s = TestServer::start().await;
    let api = s.api();
    let [alice, bob, carol] = [
        api.token("alice").await,
        api.token("bob").await,
        api.token("carol").await,
    ];
    let g = api.group(&alice, &["bob".into(), "carol".into()]).await;
    assert_eq!(
        owners(&api, &bob, &g).await,
        json!(["alice"]),
        "the creator"
    );

    // A member changes nobody but themselves.
    for (status, v) in [
        add(&api, &bob, &g, "dave").await,
        remove(&api, &bob, &g, "carol").await,
        set_role(&api, &bob, &g, "bob", "owner").await,
    ] {
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (403, Some("forbidden")),
            "{v}"
        );
    }
    let dm = api.dm(&alice, "bob").await;
    assert_eq!(set_role(&api, &alice, &dm, "bob", "owner").await.0, 400);
    let (status, v) = set_role(&api, &alice, &g, "bob", "admin").await;
    assert_eq!(status, 400, "an unknown role: {v}");
    let (status, v) = set_role(&api, &alice, &g, "dave", "owner").await;
    assert_eq!(status, 400, "only members have roles: {v}");

    // An owner makes another; the new owner manages members.
    assert_eq!(
        set_role(&api, &alice, &g, "bob", "owner").await,
        (200, json!({"changed": true}))
    );
    assert_eq!(
        set_role(&api, &alice, &g, "bob", "owner").await,
        (200, json!({"changed": false}))
    );
    assert_eq!(owners(&api, &carol, &g).await, json!(["alice", "bob"]));
    assert_eq!(
        add(&api, &bob, &g, "dave").await,
        (200, json!({"added": true}))
    );

    // The last owner keeps the group: no stepping down, no leaving while others remain.
    assert_eq!(set_role(&api, &alice, &g, "alice", "member").await.0, 200);
    let (status, v) = add(&api, &alice, &g, "erin").await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
    for (status, v) in [
        set_role(&api, &bob, &g, "bob", "member").await,
        remove(&api, &bob, &g, "bob").await,
    ] {
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (400, Some("invalid_field")),
            "{v}"
        );
    }
    // Anyone may leave.
    assert_eq!(
        remove(&api, &carol, &g, "carol").await,
        (200, json!({"removed": true}))
    );

    // Roles are stored: a restart keeps them.
    let dir = s.stop().await;
    let s = TestServer::start_in(dir, |_| {}).await;
    let api = s.api();
    let bob = api.token("bob").await;
    assert_eq!(owners(&api, &bob, &g).await, json!(["bob"]));
    let (status, v) = api
        .call(Method::GET, &format!("/v1/conversations/{g}"), &bob, None)
        .await;
    assert_eq!(
        (status, v["members"].clone()),
        (200, json!(["alice", "bob", "dave"]))
    );
    let alice = api.token("alice").await;
    assert_eq!(add(&api, &alice, &g, "erin").await.0, 403);
    assert_eq!(
        remove(&api, &bob, &g, "alice").await,
        (200, json!({"removed": true}))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_takes_effect_at_once_on_the_removed_users_open_sockets() {
    let s = TestServer::start().await;
    let api = s.api();
    let [alice, bob, carol] = [
        api.token("alice").await,
        api.token("bob").await,
        api.token("carol").await,
    ];
    let g = api.group(&alice, &["bob".into(), "carol".into()]).await;
    let mut a = Client::connect(s.addr, &alice).await;
    let mut b = Client::connect(s.addr, &bob).await;
    let mut c1 = Client::connect(s.addr, &carol).await;
    let mut c2 = Client::connect(s.addr, &carol).await;
    a.send_msg(&g, "a1", "before").await;
    a.expect_op("ack").await;
    for c in [&mut b, &mut c1, &mut c2] {
        assert_eq!(c.expect_op("msg").await["body"], "before");
    }

    assert_eq!(
        remove(&api, &alice, &g, "carol").await,
        (200, json!({"removed": true}))
    );
    // Both of carol's devices are told, at once.
    for c in [&mut c1, &mut c2] {
        let v = c.expect_op("removed").await;
        assert_eq!(
            (v["conv"].as_str(), v["by"].as_str()),
            (Some(g.as_str()), Some("alice"))
        );
    }
    // Nothing more reaches them; everything they try is refused; the others carry on.
    a.send_msg(&g, "a2", "after").await;
    a.expect_op("ack").await;
    assert_eq!(b.expect_op("msg").await["body"], "after");
    b.send(json!({"op":"typing","conv": g})).await;
    assert!(a.expect_op("typing").await["user"] == "bob");
    c1.send_msg(&g, "c1", "still here?").await;
    assert_eq!(c1.expect_op("error").await["code"], "not_member");
    c1.send(json!({"op":"sync","conv": g,"after_seq": 0})).await;
    assert_eq!(c1.expect_op("error").await["code"], "not_member");
    c1.send(json!({"op":"typing","conv": g})).await;
    c1.send(json!({"op":"read","conv": g,"seq": 2})).await;
    let (status, _) = api.history(&carol, &g, "?after=0").await;
    assert_eq!(status, 403);
    assert!(
        c2.silent_for(Duration::from_millis(500)).await,
        "carol's other device heard the group after the removal"
    );
    assert!(
        a.silent_for(Duration::from_millis(300)).await,
        "a removed member's typing or read reached the group"
    );
    // Her sockets stay open for her other conversations.
    c1.send(json!({"op":"ping"})).await;
    c1.expect_op("pong").await;
    // What was stored after the removal never reaches her, and she is gone from the members.
    let (_, v) = api
        .call(Method::GET, &format!("/v1/conversations/{g}"), &alice, None)
        .await;
    assert_eq!(v["members"], json!(["alice", "bob"]));
}
