//! An HTTP receiver on 127.0.0.1 for webhook and hook tests: records every request's JSON body and answers
//! what the test's function says, after the delay it says (raw HTTP/1.1 over TCP, keep-alive).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// One answer: status line text, JSON body (empty for none), and how long to wait before answering.
pub struct Reply {
    pub status: &'static str,
    pub body: String,
    pub delay: Duration,
}

impl Reply {
    pub fn status(status: &'static str) -> Self {
        Self {
            status,
            body: String::new(),
            delay: Duration::ZERO,
        }
    }

    pub fn json(v: Value) -> Self {
        Self {
            status: "200 OK",
            body: v.to_string(),
            delay: Duration::ZERO,
        }
    }

    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

type Answer = dyn Fn(usize, &Value) -> Reply + Send + Sync;

pub struct Receiver {
    pub addr: SocketAddr,
    bodies: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    /// `answer(n, body)` answers the `n`th request (from 1).
    pub async fn start(answer: impl Fn(usize, &Value) -> Reply + Send + Sync + 'static) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let bodies: Arc<Mutex<Vec<Value>>> = Arc::default();
        let seen = bodies.clone();
        let answer: Arc<Answer> = Arc::new(answer);
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let (seen, answer) = (seen.clone(), answer.clone());
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
                        let body: Value = serde_json::from_slice(&body).unwrap();
                        let n = {
                            let mut seen = seen.lock().unwrap();
                            seen.push(body.clone());
                            seen.len()
                        };
                        let reply = answer(n, &body);
                        tokio::time::sleep(reply.delay).await;
                        let kind = if reply.body.is_empty() {
                            ""
                        } else {
                            "content-type: application/json\r\n"
                        };
                        let text = format!(
                            "HTTP/1.1 {}\r\n{kind}content-length: {}\r\n\r\n{}",
                            reply.status,
                            reply.body.len(),
                            reply.body
                        );
                        if write.write_all(text.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self { addr, bodies }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn bodies(&self) -> Vec<Value> {
        self.bodies.lock().unwrap().clone()
    }

    /// Wait until `n` requests arrived, then a little longer to see that no more come.
    pub async fn until(&self, n: usize) -> Vec<Value> {
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
