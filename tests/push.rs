//! Offline push against a real HTTP receiver the test runs: members with no live connection are notified
//! through the webhook (retried on a 5xx, at most N per user per minute), online members and the sender
//! are not.

mod common;

use common::receiver::{Receiver, Reply};
use common::{Client, TestServer};

/// A webhook receiver that answers 500 to the first `fail` requests, then 204.
async fn receiver(fail: usize) -> Receiver {
    Receiver::start(move |n, _| {
        Reply::status(if n <= fail {
            "500 Internal Server Error"
        } else {
            "204 No Content"
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_members_are_notified_once_within_their_rate() {
    let receiver = receiver(0).await;
    let url = format!("http://{}/push", receiver.addr);
    let s = TestServer::start_with(|c| {
        c.push.webhook = Some(url);
        c.push.per_user_per_minute = 2.try_into().unwrap();
    })
    .await;
    let api = s.api();
    let (ta, tc) = (api.token("alice").await, api.token("carol").await);
    let group = api.group(&ta, &["bob".into(), "carol".into()]).await;
    let mut alice = Client::connect(s.addr, &ta).await;
    let _carol = Client::connect(s.addr, &tc).await;

    alice.send_msg(&group, "p1", "secret body").await;
    let seq = alice.expect_op("ack").await["seq"].as_u64().unwrap();
    let bodies = receiver.until(1).await;
    assert_eq!(bodies.len(), 1, "only offline bob: {bodies:?}");
    let b = &bodies[0];
    assert_eq!(
        (
            b["user"].as_str(),
            b["conversation"].as_str(),
            b["sender"].as_str(),
            b["seq"].as_u64(),
            b["count"].as_u64()
        ),
        (
            Some("bob"),
            Some(group.as_str()),
            Some("alice"),
            Some(seq),
            Some(1)
        )
    );
    assert!(b.get("preview").is_none(), "no body without --push-preview");

    // At most two a minute for bob.
    for id in ["p2", "p3"] {
        alice.send_msg(&group, id, "more").await;
        alice.expect_op("ack").await;
    }
    let bodies = receiver.until(2).await;
    assert_eq!(
        bodies.len(),
        2,
        "bob's third notification within the minute: {bodies:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_webhook_is_retried_and_previews_are_opt_in() {
    let receiver = receiver(2).await;
    let url = format!("http://{}/push", receiver.addr);
    let s = TestServer::start_with(|c| {
        c.push.webhook = Some(url);
        c.push.preview = true;
    })
    .await;
    let api = s.api();
    let ta = api.token("alice").await;
    let dm = api.dm(&ta, "bob").await;
    let mut alice = Client::connect(s.addr, &ta).await;
    alice.send_msg(&dm, "r1", "see you at 8").await;
    alice.expect_op("ack").await;
    let bodies = receiver.until(3).await;
    assert_eq!(bodies.len(), 3, "two 500s, then delivered: {bodies:?}");
    assert!(
        bodies.iter().all(|b| b == &bodies[0]),
        "the same notification"
    );
    assert_eq!(bodies[0]["user"], "bob");
    assert_eq!(bodies[0]["preview"], "see you at 8");
}
