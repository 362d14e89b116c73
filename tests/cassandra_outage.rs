//! Cassandra dies mid-traffic: no send is acknowledged unless stored, the server stays up, and it recovers
//! when Cassandra comes back. Its own test binary: it stops the shared test cluster (every node) and
//! starts it again, and cargo runs test binaries one at a time.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{cassandra, Client, Recv, TestServer};
use serde_json::{json, Value};
use switchboard::config::StoreKind;
use switchboard::store::cassandra::CassandraConfig;

/// Send each msg_id once and collect the answer to each (ack or error), ignoring other frames.
async fn answers(c: &mut Client, conv: &str, ids: &[String]) -> HashMap<String, Value> {
    for id in ids {
        c.send_msg(conv, id, "during the outage").await;
    }
    let mut out = HashMap::new();
    while out.len() < ids.len() {
        match c
            .recv_within(Duration::from_secs(60))
            .await
            .expect("an answer for every send")
        {
            Recv::Frame(f) if f["op"] == "ack" || f["op"] == "error" => {
                out.insert(
                    f["msg_id"]
                        .as_str()
                        .expect("answers carry msg_id")
                        .to_owned(),
                    f,
                );
            }
            Recv::Frame(_) => {}
            Recv::Closed(code) => {
                panic!("the connection must survive the outage (closed {code:?})")
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_cassandra_never_acks_and_the_server_recovers() {
    let url = common::cassandra_url().replace("timeout_ms=10000", "timeout_ms=2000");
    let s = TestServer::start_with(|c| {
        c.store = StoreKind::Cassandra(CassandraConfig::parse(&url).unwrap());
        // Alice's socket stays silent while three Cassandra nodes restart, which can take longer than the
        // default 90 s heartbeat timeout on this machine: that close is not what this test is about.
        c.heartbeat_timeout = Duration::from_secs(600);
    })
    .await;
    let api = s.api();
    let (ta, tb) = (api.token("alice").await, api.token("bob").await);
    let conv = api.dm(&ta, "bob").await;
    let mut alice = Client::connect(s.addr, &ta).await;
    let mut acked: HashMap<String, u64> = HashMap::new();

    let before: Vec<String> = (0..20).map(|i| format!("b{i}")).collect();
    for (id, f) in answers(&mut alice, &conv, &before).await {
        assert_eq!(f["op"], "ack", "{f}");
        acked.insert(id, f["seq"].as_u64().unwrap());
    }

    cassandra(&["stop"]);
    let during: Vec<String> = (0..10).map(|i| format!("d{i}")).collect();
    for (id, f) in answers(&mut alice, &conv, &during).await {
        assert_eq!(
            (f["op"].as_str(), f["code"].as_str()),
            (Some("error"), Some("store_unavailable")),
            "{id}: {f}"
        );
    }
    alice.send(json!({"op":"ping"})).await;
    assert_eq!(
        alice.expect_op("pong").await["op"],
        "pong",
        "the server keeps serving while the store is down"
    );
    let ready = reqwest::get(format!("http://{}/readyz", s.addr))
        .await
        .unwrap();
    assert_eq!(ready.status(), 503, "not ready while the store is down");
    let why: Value = ready.json().await.unwrap();
    assert!(
        why["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("store: ")),
        "{why}"
    );

    cassandra(&["start", "3"]);
    // Resend what failed, plus new messages, until every one is acknowledged.
    let mut pending: Vec<String> = during
        .iter()
        .cloned()
        .chain((0..10).map(|i| format!("a{i}")))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !pending.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the server did not recover: still failing {pending:?}"
        );
        let got = answers(&mut alice, &conv, &pending).await;
        for (id, f) in got {
            if f["op"] == "ack" {
                acked.insert(id.clone(), f["seq"].as_u64().unwrap());
                pending.retain(|p| *p != id);
            }
        }
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    let ready = reqwest::get(format!("http://{}/readyz", s.addr))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "ready again once the store answers");

    // Read at once: every node must already route each range to its owner (scripts/cassandra keeps the
    // saved ring and waits until every node sees every other up), so nothing acked may be missing.
    let (status, page) = api.history(&tb, &conv, "?after=0&limit=200").await;
    assert_eq!(status, 200, "{page}");
    let history = page["messages"].as_array().unwrap().clone();
    let seqs: Vec<u64> = history.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=40).collect::<Vec<_>>(),
        "each message stored once, no gap"
    );
    for m in &history {
        assert_eq!(
            acked.get(m["msg_id"].as_str().unwrap()),
            Some(&m["seq"].as_u64().unwrap()),
            "stored means acked with that seq: {m}"
        );
    }
}
