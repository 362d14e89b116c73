//! `switchboard-load baseline`: the floor Switchboard is compared with. A minimal broadcast server on
//! tokio-tungstenite with no auth, no storage and no actors that speaks just enough of the protocol for the
//! scenarios:
//!
//! - any path and any `?token=` are accepted;
//! - `sync` subscribes the connection to the conversation (every connection may join any conversation) and
//!   is answered with `synced` (nothing is stored, so nothing is replayed);
//! - `send` gets the next seq of the conversation, is answered with `ack`, and one `msg` frame, serialised
//!   once, is queued to every other subscribed connection;
//! - `ping` gets `pong`.
//!
//! Each connection has a bounded outbound queue (1,024 frames, as in Switchboard) drained by a writer task
//! that batches what is queued into one flush; a full queue closes the connection with 4002.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;

use crate::net::parse_loopback_listen;
use crate::Error;

/// Outbound queue per connection, as in Switchboard.
const OUTBOUND_QUEUE: usize = 1024;
/// Accept queue length asked of the kernel.
const LISTEN_BACKLOG: u32 = 4096;
/// Frames written per flush at most.
const BATCH: usize = 64;

struct Sub {
    conn: u64,
    tx: mpsc::Sender<Message>,
    kill: Arc<Notify>,
}

#[derive(Default)]
struct Conv {
    seq: u64,
    subs: Vec<Sub>,
}

#[derive(Default)]
struct Hub {
    convs: Mutex<HashMap<String, Arc<Mutex<Conv>>>>,
    next_conn: AtomicU64,
    next_id: AtomicU64,
}

impl Hub {
    fn conv(&self, id: &str) -> Arc<Mutex<Conv>> {
        let mut convs = self.convs.lock().unwrap();
        if let Some(c) = convs.get(id) {
            return c.clone();
        }
        let c = Arc::new(Mutex::new(Conv::default()));
        convs.insert(id.to_owned(), c.clone());
        c
    }
}

#[derive(Deserialize)]
struct In<'a> {
    op: Cow<'a, str>,
    #[serde(borrow)]
    conv: Option<Cow<'a, str>>,
    #[serde(borrow)]
    msg_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    body: Option<Cow<'a, str>>,
    after_seq: Option<u64>,
}

#[derive(Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Out<'a> {
    Ack {
        msg_id: &'a str,
        conv: &'a str,
        seq: u64,
        id: &'a str,
        ts: u64,
    },
    Msg {
        conv: &'a str,
        seq: u64,
        id: &'a str,
        msg_id: &'a str,
        from: &'a str,
        body: &'a str,
        ts: u64,
    },
    Synced {
        conv: &'a str,
        last_seq: u64,
        has_more: bool,
    },
    Pong,
    Error {
        code: &'a str,
        message: &'a str,
    },
}

fn text(out: &Out<'_>) -> Message {
    Message::Text(serde_json::to_string(out).expect("frames serialise").into())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Entry point of `switchboard-load baseline --listen ADDR`: prints `listening ADDR` once bound.
pub(crate) fn main(listen: &str) -> Result<(), Error> {
    let addr = parse_loopback_listen(listen)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            // A deep accept queue (the kernel caps it at net.core.somaxconn) so that a connect storm is
            // not turned into SYN drops and 1 s retransmits by the floor itself.
            let socket = TcpSocket::new_v4()?;
            socket.set_reuseaddr(true)?;
            socket.bind(addr.into())?;
            let listener = socket.listen(LISTEN_BACKLOG)?;
            println!("listening {}", listener.local_addr()?);
            let hub = Arc::new(Hub::default());
            loop {
                let (stream, _) = match listener.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        // EMFILE and friends: wait a little rather than spin.
                        eprintln!("baseline: accept: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                };
                tokio::spawn(connection(hub.clone(), stream));
            }
        })
}

async fn connection(hub: Arc<Hub>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        // Frames fed to the sink collect up to this before a write; the flush after each batch writes the
        // rest, so one batch is one write.
        .write_buffer_size(16 * 1024)
        .max_message_size(Some(65_536));
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    let me = hub.next_conn.fetch_add(1, Relaxed);
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Message>(OUTBOUND_QUEUE);
    let kill = Arc::new(Notify::new());
    let writer = {
        let kill = kill.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = kill.notified() => {
                        let close = CloseFrame { code: CloseCode::from(4002), reason: "slow_consumer".into() };
                        let _ = sink.send(Message::Close(Some(close))).await;
                        return;
                    }
                    m = rx.recv() => {
                        let Some(m) = m else { return };
                        if sink.feed(m).await.is_err() {
                            return;
                        }
                        let mut n = 1;
                        while n < BATCH {
                            let Ok(m) = rx.try_recv() else { break };
                            if sink.feed(m).await.is_err() {
                                return;
                            }
                            n += 1;
                        }
                        if sink.flush().await.is_err() {
                            return;
                        }
                    }
                }
            }
        })
    };
    let mut joined: HashMap<String, Arc<Mutex<Conv>>> = HashMap::new();
    while let Some(Ok(msg)) = stream.next().await {
        let reply = match msg {
            Message::Text(t) => handle(&hub, me, &t, &tx, &kill, &mut joined),
            Message::Binary(_) => Some(text(&Out::Error {
                code: "invalid_json",
                message: "binary frames are not part of the protocol",
            })),
            Message::Close(_) => break,
            _ => None,
        };
        if let Some(reply) = reply {
            if tx.try_send(reply).is_err() {
                kill.notify_one();
                break;
            }
        }
    }
    for conv in joined.values() {
        conv.lock().unwrap().subs.retain(|s| s.conn != me);
    }
    drop(tx);
    let _ = writer.await;
}

/// Handle one text frame; returns the answer for this connection, if any.
fn handle(
    hub: &Hub,
    me: u64,
    raw: &str,
    tx: &mpsc::Sender<Message>,
    kill: &Arc<Notify>,
    joined: &mut HashMap<String, Arc<Mutex<Conv>>>,
) -> Option<Message> {
    let Ok(frame) = serde_json::from_str::<In<'_>>(raw) else {
        return Some(text(&Out::Error {
            code: "invalid_json",
            message: "not a frame",
        }));
    };
    match (&*frame.op, frame.conv.as_deref()) {
        ("ping", _) => Some(text(&Out::Pong)),
        ("sync", Some(conv)) => {
            if !joined.contains_key(conv) {
                let c = hub.conv(conv);
                c.lock().unwrap().subs.push(Sub {
                    conn: me,
                    tx: tx.clone(),
                    kill: kill.clone(),
                });
                joined.insert(conv.to_owned(), c);
            }
            Some(text(&Out::Synced {
                conv,
                last_seq: frame.after_seq.unwrap_or(0),
                has_more: false,
            }))
        }
        ("send", Some(conv)) => {
            let (Some(msg_id), Some(body)) = (frame.msg_id.as_deref(), frame.body.as_deref())
            else {
                return Some(text(&Out::Error {
                    code: "missing_field",
                    message: "send needs msg_id and body",
                }));
            };
            let c = match joined.get(conv) {
                Some(c) => c.clone(),
                None => hub.conv(conv),
            };
            let id = format!("{:032x}", hub.next_id.fetch_add(1, Relaxed) + 1);
            let ts = now_ms();
            let mut c = c.lock().unwrap();
            c.seq += 1;
            let seq = c.seq;
            let msg = text(&Out::Msg {
                conv,
                seq,
                id: &id,
                msg_id,
                from: "anon",
                body,
                ts,
            });
            c.subs.retain(|s| {
                if s.conn == me {
                    return true;
                }
                match s.tx.try_send(msg.clone()) {
                    Ok(()) => true,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        s.kill.notify_one();
                        false
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                }
            });
            Some(text(&Out::Ack {
                msg_id,
                conv,
                seq,
                id: &id,
                ts,
            }))
        }
        ("send" | "sync", None) => Some(text(&Out::Error {
            code: "missing_field",
            message: "conv is required",
        })),
        _ => Some(text(&Out::Error {
            code: "unknown_op",
            message: "unknown op",
        })),
    }
}
