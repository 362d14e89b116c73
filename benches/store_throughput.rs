//! Store benchmark: accepted messages per second and ack latency (p50/p99) with 1, 100 and 10,000
//! conversations writing at once, each as its conversation actor does — one append in flight, the next
//! one after the ack — against the embedded store or Cassandra.
//!
//! ```sh
//! cargo bench --bench store_throughput                                   # embedded store, temp dir
//! cargo bench --bench store_throughput -- cassandra://127.0.0.1:9042/bench   # a running Cassandra
//! cargo bench --bench store_throughput -- embedded 1,100 5               # conversations, seconds
//! ```
//! Without `--bench` (as `cargo test --benches` runs it) it does a one-second smoke run.
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchboard::store::cassandra::{CassandraConfig, CassandraStore};
use switchboard::store::embedded::EmbeddedStore;
use switchboard_actors::store::{ConversationInfo, ConversationKind, MessageStore, NewMessage};

struct Run {
    conversations: usize,
    accepted: usize,
    elapsed: Duration,
    p50_us: u64,
    p99_us: u64,
}

async fn run(
    store: Arc<dyn MessageStore>,
    prefix: &str,
    conversations: usize,
    seconds: u64,
) -> Run {
    // Create the conversations (not timed), a few hundred at a time.
    let ids: Vec<String> = (0..conversations)
        .map(|i| format!("{prefix}-{conversations}-{i}"))
        .collect();
    for chunk in ids.chunks(256) {
        let creates = chunk.iter().map(|id| {
            let info = ConversationInfo {
                id: id.clone(),
                kind: ConversationKind::Group,
                name: None,
                created_by: "bench".into(),
                created_at: 0,
            };
            store.create_conversation(info, vec!["bench".into()])
        });
        futures_util::future::try_join_all(creates)
            .await
            .expect("create conversations");
    }
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let writers = ids.into_iter().map(|conv| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut next = 1;
            let body = "x".repeat(200);
            while Instant::now() < deadline {
                let m = NewMessage {
                    id: uuid::Uuid::now_v7().simple().to_string(),
                    msg_id: uuid::Uuid::new_v4().simple().to_string(),
                    from: "bench".into(),
                    body: body.clone(),
                    ts: 0,
                };
                let t = Instant::now();
                if store.append(&conv, next, vec![m]).await.is_ok() {
                    latencies.push(t.elapsed().as_micros() as u64);
                    next += 1;
                }
            }
            latencies
        })
    });
    let mut all: Vec<u64> = Vec::new();
    for w in futures_util::future::join_all(writers).await {
        all.extend(w.expect("writer"));
    }
    let elapsed = started.elapsed();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    Run {
        conversations,
        accepted: all.len(),
        elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let benching = std::env::args().any(|a| a == "--bench");
    let target = args.first().cloned().unwrap_or_else(|| "embedded".into());
    let counts: Vec<usize> = match args.get(1) {
        Some(list) => list
            .split(',')
            .map(|n| n.parse().expect("conversation counts"))
            .collect(),
        None if benching => vec![1, 100, 10_000],
        None => vec![1, 100],
    };
    let seconds: u64 = args.get(2).map_or(if benching { 10 } else { 1 }, |s| {
        s.parse().expect("seconds")
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (store, name): (Arc<dyn MessageStore>, String) = if target == "embedded" {
            (Arc::new(EmbeddedStore::open(dir.path()).unwrap()), "embedded (log + fjall, group commit)".into())
        } else {
            let config = CassandraConfig::parse(&target).expect("a cassandra:// URL");
            (Arc::new(CassandraStore::open(config).await.expect("cassandra")), format!("cassandra ({target})"))
        };
        let prefix = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        println!("store: {name}; {seconds} s per run; one append in flight per conversation, 200-byte bodies");
        println!("| conversations | accepted msg/s | ack p50 | ack p99 |");
        println!("|---:|---:|---:|---:|");
        for n in counts {
            let r = run(store.clone(), &prefix, n, seconds).await;
            println!(
                "| {} | {:.0} | {:.2} ms | {:.2} ms |",
                r.conversations,
                r.accepted as f64 / r.elapsed.as_secs_f64(),
                r.p50_us as f64 / 1000.0,
                r.p99_us as f64 / 1000.0
            );
            assert!(r.accepted > 0, "no append succeeded");
        }
        store.close();
    });
}
