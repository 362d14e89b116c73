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

/// Two owners at once (what a split-brain in the cluster would cause): two nodes on one keyspace, each
/// running its own actor for the same conversation, sending concurrently. The store's fence (a conditional
/// batch per append) must keep every seq unique and gap-free, and every acked message stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_owners_never_share_or_skip_a_seq() {
    let url = common::cassandra_url();
    let both = |c: &mut switchboard::config::Config| {
        on_cassandra(&url)(c);
        c.jwt_secret = Some("shared-secret".into());
    };
    let a = TestServer::start_with(both).await;
    let b = TestServer::start_with(both).await;
    let (ta, tb) = (a.api().token("alice").await, a.api().token("bob").await);
    let group = a.api().group(&ta, &["bob".into()]).await;
    const EACH: usize = 60;

    /// Send EACH messages pipelined; resend (same msg_id) whatever was refused; return msg_id → acked seq.
    async fn pump(
        addr: std::net::SocketAddr,
        token: &str,
        conv: &str,
        who: &str,
    ) -> std::collections::HashMap<String, u64> {
        let mut client = Client::connect(addr, token).await;
        let mut acked = std::collections::HashMap::new();
        let mut todo: Vec<String> = (0..EACH).map(|i| format!("{who}-{i}")).collect();
        for _round in 0..20 {
            for id in &todo {
                client.send_msg(conv, id, "racing").await;
            }
            let mut refused = Vec::new();
            let mut answered = 0;
            while answered < todo.len() {
                let f = client.frame().await;
                let id = f["msg_id"].as_str().unwrap_or_default().to_owned();
                match f["op"].as_str() {
                    Some("ack") => {
                        acked.insert(id, f["seq"].as_u64().unwrap());
                    }
                    Some("error") => refused.push(id),
                    // The other sender's messages, delivered here: not answers.
                    _ => continue,
                }
                answered += 1;
            }
            if refused.is_empty() {
                break;
            }
            todo = refused;
        }
        acked
    }
    let (from_a, from_b) = tokio::join!(
        pump(a.addr, &ta, &group, "a"),
        pump(b.addr, &tb, &group, "b")
    );
    assert_eq!(
        (from_a.len(), from_b.len()),
        (EACH, EACH),
        "every send acked"
    );
    assert!(
        a.server().conversations().actor_id(&group).is_some()
            && b.server().conversations().actor_id(&group).is_some(),
        "both nodes ran an actor for the conversation at once"
    );
    let history = a.api().all_messages(&ta, &group).await;
    let seqs: Vec<u64> = history.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=2 * EACH as u64).collect::<Vec<_>>(),
        "no gap, no repeat"
    );
    for m in &history {
        let id = m["msg_id"].as_str().unwrap();
        let acked = from_a.get(id).or_else(|| from_b.get(id));
        assert_eq!(
            acked,
            m["seq"].as_u64().as_ref(),
            "{id} stored once, at its acked seq"
        );
    }
}
