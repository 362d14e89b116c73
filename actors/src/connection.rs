//! `ConnectionActor`: one per WebSocket, a child of its user's `SessionActor`.
//!
//! The transport's read loop (in the `switchboard` crate) forwards each frame here; writes go through a
//! bounded [`Outbound`] queue drained by a writer task into a [`FrameSink`]. The actor decodes client frames,
//! hands sends to conversations in arrival order, and answers with `ack`/`error` frames from tasks it
//! tracks, so a drain can wait until every accepted send has been answered.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use crate::conversation::SendRequest;
use crate::conversations::{Conversations, PendingReply};
use crate::history;
use crate::protocol::{self, ClientFrame, CloseCode, ErrorCode, ProtocolError, ServerFrame};
use crate::session::ConnId;
use crate::store::{SharedStore, UserId};

/// The sink was closed by the peer or the transport.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("connection closed")]
pub struct SinkClosed;

/// Where a connection's frames are written: the transport's half of a WebSocket.
#[async_trait]
pub trait FrameSink: Send + 'static {
    /// Write text frames, in order, as one batch where the transport allows.
    async fn send(&mut self, frames: &[Bytes]) -> Result<(), SinkClosed>;
    /// Send a close frame with `code`; nothing is written after it.
    async fn close(&mut self, code: CloseCode) -> Result<(), SinkClosed>;
}

/// Limits of every connection.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Largest message body, in UTF-8 bytes.
    pub max_body: usize,
    /// Frames that may wait for the socket; a connection whose queue is full is closed (slow consumer).
    pub outbound_queue: usize,
    /// Sends of one connection awaiting their ack; past that a send gets `rate_limited`.
    pub max_unacked: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_body: 4 * 1024,
            outbound_queue: 1024,
            max_unacked: 1024,
        }
    }
}

/// Asks the writer to stop at once with a close code (a slow consumer's queue cannot carry the close).
#[derive(Clone, Default)]
struct Abort {
    token: CancellationToken,
    code: Arc<std::sync::OnceLock<CloseCode>>,
}

impl Abort {
    fn fire(&self, code: CloseCode) {
        let _ = self.code.set(code);
        self.token.cancel();
    }

    async fn fired(&self) -> CloseCode {
        self.token.cancelled().await;
        self.code.get().copied().unwrap_or(CloseCode::Internal)
    }
}

/// What every connection shares.
pub struct ConnectionContext {
    /// The conversation family.
    pub conversations: Conversations,
    /// The store (sync reads history directly).
    pub store: SharedStore,
    /// Limits.
    pub limits: ConnectionLimits,
}

enum OutFrame {
    Text(Bytes),
    Close(CloseCode),
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The queue is full: the client is not reading.
    Full,
    /// The connection is closing or closed.
    Closed,
}

/// The sending side of a connection's bounded outbound queue.
#[derive(Clone)]
pub struct Outbound {
    tx: mpsc::Sender<OutFrame>,
}

/// The receiving side, owned by the writer task.
pub struct OutboundQueue {
    rx: mpsc::Receiver<OutFrame>,
}

impl Outbound {
    /// A queue of `capacity` frames.
    pub fn channel(capacity: usize) -> (Outbound, OutboundQueue) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (Outbound { tx }, OutboundQueue { rx })
    }

    /// Queue a text frame without waiting.
    pub fn push_frame(&self, frame: Bytes) -> Result<(), PushError> {
        self.tx
            .try_send(OutFrame::Text(frame))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => PushError::Full,
                mpsc::error::TrySendError::Closed(_) => PushError::Closed,
            })
    }

    fn push_close(&self, code: CloseCode) -> Result<(), PushError> {
        self.tx
            .try_send(OutFrame::Close(code))
            .map_err(|_| PushError::Full)
    }
}

/// Frames a connection's read loop may have handed over and the actor not yet handled.
pub const INBOUND_WINDOW: usize = 256;

/// Bounds the frames in flight from a connection's read loop to its actor (the actor's mailbox itself is
/// unbounded). The read loop takes a permit before it reads a frame and the permit travels with the frame;
/// when the actor falls behind, the read loop stops reading and TCP pushes back on the client.
#[derive(Clone)]
pub struct InboundWindow(Arc<tokio::sync::Semaphore>);

/// A slot in the [`InboundWindow`], released when the frame carrying it has been handled.
pub struct InboundPermit {
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl InboundWindow {
    /// A window of [`INBOUND_WINDOW`] frames.
    pub fn new() -> Self {
        Self(Arc::new(tokio::sync::Semaphore::new(INBOUND_WINDOW)))
    }

    /// Wait for a free slot.
    pub async fn acquire(&self) -> InboundPermit {
        let slot = self
            .0
            .clone()
            .acquire_owned()
            .await
            .expect("the window is never closed");
        InboundPermit { _slot: slot }
    }
}

impl Default for InboundWindow {
    fn default() -> Self {
        Self::new()
    }
}

/// Messages of a [`ConnectionActor`].
pub enum ConnectionMsg {
    /// A text frame from the client.
    Inbound(String, InboundPermit),
    /// A binary frame from the client (not part of the protocol).
    Binary(InboundPermit),
    /// The outbound queue overflowed: close as a slow consumer.
    Overflow,
    /// Close with this code after the queued frames (heartbeat timeout, oversized frame, protocol error).
    Close(CloseCode),
    /// The client closed or the socket failed.
    PeerGone,
    /// Shutdown: stop reading, answer accepted sends, close with 1012; answered when closed.
    Drain(RpcReplyPort<()>),
}

/// The connection actor.
pub struct ConnectionActor;

/// Arguments of a connection actor.
pub struct ConnectionArgs {
    /// Authenticated user.
    pub user: UserId,
    /// Connection id.
    pub id: ConnId,
    /// The transport's writer.
    pub sink: Box<dyn FrameSink>,
    /// The queue the writer drains.
    pub queue: OutboundQueue,
    /// The queue's sending side.
    pub outbound: Outbound,
    /// Shared dependencies.
    pub ctx: Arc<ConnectionContext>,
    /// Cancelled when the actor stops, so the transport's read loop lets go of the socket.
    pub hangup: CancellationToken,
}

/// The state of one connection.
pub struct ConnectionState {
    user: UserId,
    id: ConnId,
    ctx: Arc<ConnectionContext>,
    outbound: Outbound,
    replier: Replier,
    /// Sends awaiting their answer, in arrival order; one task answers them in that order.
    unacked: Option<mpsc::Sender<PendingReply>>,
    tasks: TaskTracker,
    abort: Abort,
    writer: Option<JoinHandle<()>>,
    hangup: CancellationToken,
    closing: bool,
}

/// Queues answers for the client; a full queue makes the connection a slow consumer, whoever pushes.
#[derive(Clone)]
struct Replier {
    outbound: Outbound,
    connection: ActorRef<ConnectionMsg>,
}

impl Replier {
    fn send(&self, frame: &ServerFrame<'_>) {
        if self.outbound.push_frame(protocol::encode(frame)) == Err(PushError::Full) {
            let _ = self.connection.send_message(ConnectionMsg::Overflow);
        }
    }
}

impl ConnectionState {
    fn reply(&self, frame: &ServerFrame<'_>) {
        self.replier.send(frame);
    }

    async fn inbound(&mut self, text: &str) {
        let frame = match protocol::decode_client_frame(text, self.ctx.limits.max_body) {
            Ok(f) => f,
            Err(e) => return self.reply(&ServerFrame::error(&e)),
        };
        match frame {
            ClientFrame::Ping => self.reply(&ServerFrame::Pong),
            ClientFrame::Send { msg_id, conv, body } => {
                let request = SendRequest {
                    from: self.user.clone(),
                    msg_id,
                    body,
                    origin: Some(self.id),
                };
                let Some(unacked) = self
                    .unacked
                    .as_ref()
                    .and_then(|u| u.clone().try_reserve_owned().ok())
                else {
                    let mut e = ProtocolError::new(
                        ErrorCode::RateLimited,
                        "too many sends awaiting their ack",
                    );
                    e.retry_after_ms = Some(100);
                    return self.reply(&ServerFrame::error(&e.for_msg(Some(&request.msg_id))));
                };
                // Submitting here, in the handler, keeps one connection's sends in order.
                match self.ctx.conversations.submit(&conv, request.clone()).await {
                    Err(e) => self.reply(&ServerFrame::error(&e.for_msg(Some(&request.msg_id)))),
                    Ok(pending) => {
                        unacked.send(pending);
                    }
                }
            }
            ClientFrame::Sync { conv, after_seq } => {
                let (store, user, replier) = (
                    self.ctx.store.clone(),
                    self.user.clone(),
                    self.replier.clone(),
                );
                self.tasks.spawn(async move {
                    match history::sync(&*store, &user, &conv, after_seq).await {
                        Ok(page) => {
                            for m in &page.messages {
                                replier.send(&ServerFrame::Msg(m));
                            }
                            let last_seq = page.messages.last().map_or(after_seq, |m| m.seq);
                            replier.send(&ServerFrame::Synced {
                                conv: &conv,
                                last_seq,
                                has_more: page.has_more,
                            });
                        }
                        Err(e) => replier.send(&ServerFrame::error(&e)),
                    }
                });
            }
        }
    }

    /// Close after what is queued; if the queue is full, close at once.
    fn close(&mut self, code: CloseCode) {
        self.closing = true;
        if self.outbound.push_close(code).is_err() {
            self.abort(code);
        }
    }

    fn abort(&mut self, code: CloseCode) {
        self.closing = true;
        self.abort.fire(code);
    }
}

/// Answer a connection's sends in the order they were made.
async fn ack_loop(mut unacked: mpsc::Receiver<PendingReply>, replier: Replier) {
    while let Some(pending) = unacked.recv().await {
        match pending.wait().await {
            Ok(m) => replier.send(&ServerFrame::ack(&m)),
            Err(e) => replier.send(&ServerFrame::error(&e)),
        }
    }
}

/// How long the writer keeps trying to hand a close frame to a socket that does not drain (a slow consumer
/// that resumes reading within this time still learns why it was cut off).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);
/// Frames written to the transport in one batch.
const WRITE_BATCH: usize = 64;

async fn write_loop(mut sink: Box<dyn FrameSink>, mut queue: OutboundQueue, abort: Abort) {
    // Allocated on first use: an idle connection holds no write buffers.
    let mut batch: Vec<Bytes> = Vec::new();
    let mut items: Vec<OutFrame> = Vec::new();
    let code = 'run: loop {
        tokio::select! {
            biased;
            code = abort.fired() => break 'run code,
            n = queue.rx.recv_many(&mut items, WRITE_BATCH) => {
                if n == 0 {
                    break 'run CloseCode::Normal;
                }
                let mut close = None;
                for item in items.drain(..) {
                    match item {
                        OutFrame::Text(b) => batch.push(b),
                        OutFrame::Close(c) => { close = Some(c); break; }
                    }
                }
                if !batch.is_empty() {
                    tokio::select! {
                        biased;
                        code = abort.fired() => break 'run code,
                        sent = sink.send(&batch) => if sent.is_err() { return },
                    }
                    batch.clear();
                }
                if let Some(c) = close {
                    break 'run c;
                }
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, sink.close(code)).await;
}

impl Actor for ConnectionActor {
    type Msg = ConnectionMsg;
    type State = ConnectionState;
    type Arguments = ConnectionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ConnectionMsg>,
        args: ConnectionArgs,
    ) -> Result<ConnectionState, ActorProcessingErr> {
        let abort = Abort::default();
        let writer = tokio::spawn(write_loop(args.sink, args.queue, abort.clone()));
        let tasks = TaskTracker::new();
        let (unacked, unacked_rx) = mpsc::channel(args.ctx.limits.max_unacked.max(1));
        let replier = Replier {
            outbound: args.outbound.clone(),
            connection: myself,
        };
        tasks.spawn(ack_loop(unacked_rx, replier.clone()));
        debug!(conn_id = args.id, user_id = %args.user, "connection open");
        metrics::gauge!("switchboard_connections").increment(1.0);
        Ok(ConnectionState {
            user: args.user,
            id: args.id,
            ctx: args.ctx,
            outbound: args.outbound,
            replier,
            unacked: Some(unacked),
            tasks,
            abort,
            writer: Some(writer),
            hangup: args.hangup,
            closing: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<ConnectionMsg>,
        message: ConnectionMsg,
        state: &mut ConnectionState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ConnectionMsg::Inbound(text, _permit) if !state.closing => state.inbound(&text).await,
            ConnectionMsg::Binary(_permit) if !state.closing => {
                state.reply(&ServerFrame::error(&ProtocolError::new(
                    ErrorCode::InvalidJson,
                    "binary frames are not part of the protocol; send JSON text frames",
                )))
            }
            ConnectionMsg::Inbound(..) | ConnectionMsg::Binary(_) => {}
            ConnectionMsg::Overflow => {
                if !state.closing {
                    info!(conn_id = state.id, user_id = %state.user, "slow consumer: outbound queue full, closing");
                    metrics::counter!("switchboard_slow_consumers_total").increment(1);
                    state.abort(CloseCode::SlowConsumer);
                    myself.stop(Some("slow consumer".into()));
                }
            }
            ConnectionMsg::Close(code) => {
                debug!(conn_id = state.id, code = code.code(), "closing");
                state.close(code);
                myself.stop(None);
            }
            ConnectionMsg::PeerGone => {
                state.close(CloseCode::Normal);
                myself.stop(None);
            }
            ConnectionMsg::Drain(reply) => {
                state.closing = true;
                state.unacked = None;
                state.tasks.close();
                state.tasks.wait().await;
                state.close(CloseCode::ServiceRestart);
                if let Some(writer) = state.writer.take() {
                    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
                }
                let _ = reply.send(());
                myself.stop(Some("drained".into()));
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<ConnectionMsg>,
        state: &mut ConnectionState,
    ) -> Result<(), ActorProcessingErr> {
        if !state.closing {
            state.close(CloseCode::Normal);
        }
        Ok(())
    }
}

/// Runs however the actor ends: ractor skips `post_stop` when an actor fails, or is killed along with its
/// failed session.
impl Drop for ConnectionState {
    fn drop(&mut self) {
        if !self.closing {
            // Not closed on purpose: the actor failed. Say so (1011); the client reconnects and syncs.
            self.abort(CloseCode::Internal);
        }
        self.hangup.cancel();
        metrics::gauge!("switchboard_connections").decrement(1.0);
    }
}
