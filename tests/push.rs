//! Offline push against a real HTTP receiver the test runs: members with no live connection are notified
//! through the webhook (retried on a 5xx, at most N per user per minute), online members and the sender
//! are not.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Client, TestServer};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// A webhook receiver on 127.0.0.1: records every request's JSON body; answers 500 to the first `fail`
/// requests, then 204.
struct Receiver {
    addr: SocketAddr,
    bodies: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    async fn start(fail: usize) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let bodies: Arc<Mutex<Vec<Value>>> = Arc::default();
        let seen = bodies.clone();
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let (read, mut write) = socket.into_split();
                    let mut read = BufReader::new(read);
                    loop {
                        // One request: the head, then Content-Length bytes of body.
                        let mut length = 0usize;
                        loop {
                            let mut line = String::new();
                            if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            let line = line.trim_end();
                            if line.is_empty() {
                                break;
                            }
                            if let Some((k, v)) = line.split_once(':') {
                                if k.eq_ignore_ascii_case("content-length") {
                                    length = v.trim().parse().unwrap();
                                }
                            }
                        }
                        let mut body = vec![0; length];
                        read.read_exact(&mut body).await.unwrap();
                        let n = {
                            let mut seen = seen.lock().unwrap();
                            seen.push(serde_json::from_slice(&body).unwrap());
                            seen.len()
                        };
                        let status = if n <= fail {
                            "500 Internal Server Error"
                        } else {
                            "204 No Content"
                        };
                        let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                        if write.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self { addr, bodies }
    }

    fn bodies(&self) -> Vec<Value> {
        self.bodies.lock().unwrap().clone()
    }

    /// Wait until `n` requests arrived, then a little longer to see that no more come.
    async fn until(&self, n: usize) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.bodies().len() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} of {n} requests: {:?}",
                self.bodies().len(),
                self.bodies()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.bodies()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_members_are_notified_once_within_their_rate() {
    let receiver = Receiver::start(0).await;
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
    let receiver = Receiver::start(2).await;
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
