//! `ConnectionActor`: one per WebSocket, a child of its user's `SessionActor`.
//!
//! The transport's read loop (in the `switchboard` crate) forwards each frame here; everything the client
//! receives goes through the connection's bounded [`Outbound`] queue, which the transport drains into the
//! socket (see [`crate::outbound`]). The actor decodes client frames,
//! hands sends to conversations in arrival order, and answers with `ack`/`error` frames from tasks it
//! tracks, so a drain can wait until every accepted send has been answered.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use crate::conversation::SendRequest;
use crate::conversations::{Conversations, PendingReply};
use crate::history;
use crate::outbound::{Outbound, PushError};
use crate::protocol::{self, ClientFrame, CloseCode, ErrorCode, ProtocolError, ServerFrame};
use crate::session::ConnId;
use crate::store::{SharedStore, UserId};

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

/// What every connection shares.
pub struct ConnectionContext {
    /// The conversation family.
    pub conversations: Conversations,
    /// The store (sync reads history directly).
    pub store: SharedStore,
    /// Limits.
    pub limits: ConnectionLimits,
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
    /// The pushing side of the queue the transport drains.
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

    /// Close after what is queued.
    fn close(&mut self, code: CloseCode) {
        self.closing = true;
        self.outbound.close(code);
    }

    /// Close now, dropping what is queued.
    fn abort(&mut self, code: CloseCode) {
        self.closing = true;
        self.outbound.abort(code);
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

/// How long a drain waits for the transport to take a connection's last frames.
const DRAIN_FLUSH: Duration = Duration::from_secs(5);

impl Actor for ConnectionActor {
    type Msg = ConnectionMsg;
    type State = ConnectionState;
    type Arguments = ConnectionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ConnectionMsg>,
        args: ConnectionArgs,
    ) -> Result<ConnectionState, ActorProcessingErr> {
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
                // Until the transport has taken everything up to the close frame.
                let _ = tokio::time::timeout(DRAIN_FLUSH, state.outbound.finished()).await;
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
