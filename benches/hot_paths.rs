#![allow(missing_docs)]
//! Micro-benchmarks of the hot paths we own: client frame decode, `msg` frame encode (once per message,
//! whatever the fan-out), and the embedded store's durable append alone and under group commit.
//!
//! Run: `cargo bench --bench hot_paths` (figures in docs/benchmarks.md).

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use switchboard::store::embedded::EmbeddedStore;
use switchboard_actors::protocol::{decode_client_frame, encode, ServerFrame};
use switchboard_actors::store::{
    ConversationInfo, ConversationKind, Message, MessageStore, NewMessage,
};

fn frames(c: &mut Criterion) {
    let send = r#"{"op":"send","msg_id":"0d6c5c1e-7f6a-4b1e-9a57-3d1f0d2b8a11","conv":"c_01a20cfef15170e09ad8630e26e47c0c","body":"Hey! Are we still on for lunch tomorrow at noon? I can book the usual place."}"#;
    c.bench_function("decode send frame", |b| {
        b.iter(|| decode_client_frame(std::hint::black_box(send), 4096).unwrap())
    });
    let m = Message {
        conv: "c_01a20cfef15170e09ad8630e26e47c0c".into(),
        seq: 123_456,
        id: "01a20cfef2177297b2f46ef14a3a82af".into(),
        msg_id: "0d6c5c1e-7f6a-4b1e-9a57-3d1f0d2b8a11".into(),
        from: "alice".into(),
        body: "Hey! Are we still on for lunch tomorrow at noon? I can book the usual place.".into(),
        ts: 1_795_514_364_439,
    };
    c.bench_function("encode msg frame", |b| {
        b.iter(|| encode(&ServerFrame::Msg(std::hint::black_box(&m))))
    });
}

fn store(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let convs = 64;
    rt.block_on(async {
        for i in 0..convs {
            let info = ConversationInfo {
                id: format!("b{i}"),
                kind: ConversationKind::Group,
                name: None,
                created_by: "alice".into(),
                created_at: 0,
            };
            store
                .create_conversation(info, vec!["alice".into()])
                .await
                .unwrap();
        }
    });
    let mut group = c.benchmark_group("embedded append (durable)");
    group.sample_size(20);
    for concurrent in [1usize, 16, 64] {
        group.throughput(Throughput::Elements(concurrent as u64));
        group.bench_with_input(
            BenchmarkId::new("conversations", concurrent),
            &concurrent,
            |b, &n| {
                b.to_async(&rt).iter(|| {
                    let store = store.clone();
                    async move {
                        let writes = (0..n).map(|i| {
                            let store = store.clone();
                            async move {
                                let conv = format!("b{i}");
                                let next = store.last_seq(&conv).await.unwrap() + 1;
                                let m = NewMessage {
                                    id: uuid::Uuid::now_v7().simple().to_string(),
                                    msg_id: uuid::Uuid::new_v4().to_string(),
                                    from: "alice".into(),
                                    body: "x".repeat(200),
                                    ts: 0,
                                };
                                store.append(&conv, next, vec![m]).await.unwrap();
                            }
                        });
                        futures_util::future::join_all(writes).await;
                    }
                })
            },
        );
    }
    group.finish();
    store.close();
}

criterion_group!(benches, frames, store);
criterion_main!(benches);
