//! Three Cassandra nodes, replication factor 3, QUORUM: losing a node loses no acknowledged message and
//! writes go on. Its own test binary: it kills node 3 of the shared test cluster, then brings it back.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{cassandra, Client, Recv, TestServer};
use switchboard::config::StoreKind;
use switchboard::store::cassandra::CassandraConfig;

/// Send `ids` until each is acknowledged (a node that just died may fail a few requests until the others
/// notice); return msg_id → seq and the number of failed attempts.
async fn send_until_acked(
    c: &mut Client,
    conv: &str,
    ids: &[String],
) -> (HashMap<String, u64>, usize) {
    let mut acked = HashMap::new();
    let mut failures = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked.len() < ids.len() {
        assert!(
            Instant::now() < deadline,
            "writes did not resume with one node down"
        );
        let pending: Vec<&String> = ids.iter().filter(|id| !acked.contains_key(*id)).collect();
        for id in &pending {
            c.send_msg(conv, id, "replicated").await;
        }
        let mut answered = 0;
        while answered < pending.len() {
            match c
                .recv_within(Duration::from_secs(60))
                .await
                .expect("an answer for every send")
            {
                Recv::Frame(f) if f["op"] == "ack" => {
                    acked.insert(
                        f["msg_id"].as_str().unwrap().to_owned(),
                        f["seq"].as_u64().unwrap(),
                    );
                    answered += 1;
                }
                Recv::Frame(f) if f["op"] == "error" => {
                    assert_eq!(f["code"], "store_unavailable", "{f}");
                    failures += 1;
                    answered += 1;
                }
                Recv::Frame(_) => {}
                Recv::Closed(code) => panic!("connection closed ({code:?})"),
            }
        }
    }
    (acked, failures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rf3_quorum_survives_a_dead_node() {
    cassandra(&["start", "3"]);
    let url = format!("{}&rf=3&consistency=quorum", common::cassandra_url());
    let s = TestServer::start_with(|c| {
        c.store = StoreKind::Cassandra(CassandraConfig::parse(&url).unwrap())
    })
    .await;
    let api = s.api();
    let (ta, tb) = (api.token("alice").await, api.token("bob").await);
    let conv = api.group(&ta, &["bob".into()]).await;
    let mut alice = Client::connect(s.addr, &ta).await;

    let first: Vec<String> = (0..30).map(|i| format!("r{i}")).collect();
    let (mut acked, _) = send_until_acked(&mut alice, &conv, &first).await;
    cassandra(&["stop", "3"]);
    let second: Vec<String> = (30..60).map(|i| format!("r{i}")).collect();
    let (more, failures) = send_until_acked(&mut alice, &conv, &second).await;
    acked.extend(more);

    let history = api.all_messages(&tb, &conv).await;
    let seqs: Vec<u64> = history.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=60).collect::<Vec<_>>(),
        "every message once, no gap ({failures} transient failures)"
    );
    for m in &history {
        assert_eq!(
            acked.get(m["msg_id"].as_str().unwrap()),
            Some(&m["seq"].as_u64().unwrap())
        );
    }
    cassandra(&["start", "3"]);
}
