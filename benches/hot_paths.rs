#![allow(missing_docs)]
//! Micro-benchmarks of the hot paths we own: client frame decode, `msg` frame encode (once per message,
//! whatever the fan-out), fan-out of one message to K connections (queue pushes plus the transport framing
//! each connection's batch), and the embedded store's durable append alone and under group commit.
//!
//! Run: `cargo bench --bench hot_paths` (figures in docs/benchmarks.md).

use std::collections::HashSet;
use std::sync::Arc;
use std::task::Context;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use switchboard::http::ws::frame_batch;
use switchboard::store::embedded::EmbeddedStore;
use switchboard_actors::connection::Connection;
use switchboard_actors::outbound::OutboundQueue;
use switchboard_actors::protocol::{decode_client_frame, encode, ServerFrame};
use switchboard_actors::session::Recipients;
use switchboard_actors::store::{
    ConversationInfo, ConversationKind, Message, MessageStore, NewMessage, UserId,
};
use switchboard_actors::system::{ActorSystem, SystemConfig};

fn sample_message() -> Message {
    Message {
        conv: "c_01a20cfef15170e09ad8630e26e47c0c".into(),
        seq: 123_456,
        id: "01a20cfef2177297b2f46ef14a3a82af".into(),
        msg_id: "0d6c5c1e-7f6a-4b1e-9a57-3d1f0d2b8a11".into(),
        from: "alice".into(),
        body: "Hey! Are we still on for lunch tomorrow at noon? I can book the usual place.".into(),
        ts: 1_795_514_364_439,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn frames(c: &mut Criterion) {
    let send = r#"{"op":"send","msg_id":"0d6c5c1e-7f6a-4b1e-9a57-3d1f0d2b8a11","conv":"c_01a20cfef15170e09ad8630e26e47c0c","body":"Hey! Are we still on for lunch tomorrow at noon? I can book the usual place."}"#;
    c.bench_function("decode send frame", |b| {
        b.iter(|| decode_client_frame(std::hint::black_box(send), 4096).unwrap())
    });
    let m = sample_message();
    c.bench_function("encode msg frame", |b| {
        b.iter(|| encode(&ServerFrame::Msg(std::hint::black_box(&m))))
    });
}

/// One message to K online members, each with one connection: the conversation's push onto every
/// connection's queue (with recipients already resolved, as in steady state, and resolved afresh, as after
/// a session change), then each connection's transport framing its batch — everything but the syscalls.
fn fanout(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let system = rt
        .block_on(ActorSystem::start(
            SystemConfig::default(),
            store.clone(),
            None,
        ))
        .unwrap();
    let frame = encode(&ServerFrame::Msg(&sample_message()));
    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
    let mut group = c.benchmark_group("fan-out one message");
    for k in [1usize, 100, 5000] {
        let members: HashSet<UserId> = (0..k).map(|i| format!("k{k}u{i}")).collect();
        // The connections are kept (not run: nothing reads from them), their queues drained here.
        let (_connections, mut queues): (Vec<Connection>, Vec<OutboundQueue>) = members
            .iter()
            .map(|user| {
                let o = system.sessions.connect(user.clone());
                (o.connection, o.queue)
            })
            .unzip();
        let directory = system.sessions.directory().clone();
        let mut resolved = Recipients::default();
        directory.resolve(&members, 0, &mut resolved);
        assert_eq!(
            resolved.len(),
            k,
            "every connection is listed when it opens"
        );
        let mut buf = BytesMut::new();
        let mut drain = |queues: &mut Vec<OutboundQueue>| {
            for q in queues.iter_mut() {
                frame_batch(q, &mut cx, &mut buf);
                buf.clear();
            }
        };
        group.throughput(Throughput::Elements(k as u64));
        group.bench_function(BenchmarkId::new("recipients resolved", k), |b| {
            b.iter(|| {
                resolved.deliver(&[(frame.clone(), None)]);
                drain(&mut queues);
            })
        });
        group.bench_function(BenchmarkId::new("recipients resolved afresh", k), |b| {
            b.iter(|| {
                let mut fresh = Recipients::default();
                directory.resolve(&members, 0, &mut fresh);
                fresh.deliver(&[(frame.clone(), None)]);
                drain(&mut queues);
            })
        });
    }
    group.finish();
    rt.block_on(system.stop());
    store.close();
}

fn store(c: &mut Criterion) {
    let rt = runtime();
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

criterion_group!(benches, frames, fanout, store);
criterion_main!(benches);
