//! The whole server on Cassandra: chat, dedupe across restarts and history, on a real node.

mod common;

use common::{Client, TestServer};
use serde_json::json;
use switchboard::config::StoreKind;
use switchboard::store::cassandra::CassandraConfig;

fn on_cassandra(url: &str) -> impl FnOnce(&mut switchboard::config::Config) + '_ {
    move |c| c.store = StoreKind::Cassandra(CassandraConfig::parse(url).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_on_cassandra_survives_a_restart() {
    let url = common::cassandra_url();
    let s = TestServer::start_with(on_cassandra(&url)).await;
    let api = s.api();
    let (ta, tb) = (api.token("alice").await, api.token("bob").await);
    let conv = api.dm(&ta, "bob").await;
    let group = api.group(&ta, &["bob".into(), "carol".into()]).await;
    let mut alice = Client::connect(s.addr, &ta).await;
    let mut bob = Client::connect(s.addr, &tb).await;
    for i in 1..=30u64 {
        alice
            .send_msg(&conv, &format!("c{i}"), &format!("héllo {i} 🎉"))
            .await;
    }
    for i in 1..=30u64 {
        let ack = alice.expect_op("ack").await;
        assert_eq!(
            (ack["msg_id"].as_str(), ack["seq"].as_u64()),
            (Some(format!("c{i}").as_str()), Some(i))
        );
        let m = bob.expect_op("msg").await;
        assert_eq!(m["seq"], i);
        assert_eq!(m["body"], format!("héllo {i} 🎉"));
    }
    alice.send_msg(&group, "g1", "group hello").await;
    assert_eq!(alice.expect_op("ack").await["seq"], 1);
    alice.send_msg(&conv, "c5", "resent").await;
    assert_eq!(
        alice.expect_op("ack").await["seq"],
        5,
        "a resend is acked with its original seq"
    );

    // Restart on the same keyspace: last seq and the dedupe index are read back from Cassandra.
    drop((alice, bob));
    let dir = s.stop().await;
    let s = TestServer::start_in(dir, on_cassandra(&url)).await;
    let api = s.api();
    let mut alice = Client::connect(s.addr, &ta).await;
    alice.send_msg(&conv, "c7", "again").await;
    assert_eq!(alice.expect_op("ack").await["seq"], 7);
    alice.send_msg(&conv, "c31", "new").await;
    assert_eq!(alice.expect_op("ack").await["seq"], 31);
    let all = api.all_messages(&tb, &conv).await;
    assert_eq!(
        all.iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        (1..=31).collect::<Vec<_>>()
    );
    let (status, page) = api.history(&tb, &conv, "?before=31&limit=10").await;
    assert_eq!(status, 200);
    assert_eq!(page["messages"][0]["seq"], 21);
    assert_eq!(page["has_more"], true);
    let mut bob = Client::connect(s.addr, &tb).await;
    bob.send(json!({"op":"sync","conv":conv,"after_seq":29}))
        .await;
    assert_eq!(bob.expect_op("msg").await["seq"], 30);
    assert_eq!(bob.expect_op("synced").await["last_seq"], 31);
}
