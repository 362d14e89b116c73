//! A connection: one per WebSocket, listed under its user's session in the [`SessionDirectory`].
//!
//! A connection is a process in the Erlang sense — its own state, one task, driven by what arrives — but not
//! a ractor actor: it runs in the task that owns the socket, so a frame from the client is decoded and
//! handed to its conversation with no hop in between, and an idle connection costs its share of that task.
//! Everything the client receives goes through the connection's bounded [`Outbound`] queue, which the
//! transport drains into the socket (see [`crate::outbound`]).
//!
//! The loop decodes client frames, hands sends to conversations in arrival order (so one connection's sends
//! keep their order), and answers them with `ack`/`error` frames in that same order as their outcomes
//! come back. It ends when the client closes, the transport refuses a frame, the heartbeat lapses, someone
//! closes its queue (a slow consumer, the transport gone), or the node drains — then it answers every send it
//! accepted and closes with 1012. However it ends (a panic included), it is unlisted from its session, and a
//! connection that did not close on purpose is closed with 1011.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{Stream, StreamExt};
use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::num::NonZeroU32;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use crate::cluster::{Origin, Signal, SignalKind};
use crate::conversation::SendRequest;
use crate::conversations::{Conversations, PendingReply};
use crate::history;
use crate::outbound::{Outbound, PushError};
use crate::presence::Presence;
use crate::protocol::{self, ClientFrame, CloseCode, ErrorCode, ProtocolError, ServerFrame};
use crate::session::{ConnHandle, ConnId, SessionDirectory};
use crate::store::{Message, SharedStore, UserId};

/// Limits of every connection.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Largest message body, in UTF-8 bytes.
    pub max_body: usize,
    /// Frames that may wait for the socket; a connection whose queue is full is closed (slow consumer).
    pub outbound_queue: usize,
    /// Sends of one connection awaiting their ack; past that a send gets `rate_limited`.
    pub max_unacked: usize,
    /// A drain closes the node's connections spread over this window, so their clients do not all
    /// reconnect at the same instant.
    pub drain_window: Duration,
    /// Sends per user per second, all of the user's connections on this node together, and how many may
    /// come at once; past them a send gets `rate_limited`. `None`: no limit.
    pub messages_per_user: Option<(NonZeroU32, NonZeroU32)>,
    /// `typing`, `delivered` and `read` frames per user per second (all connections together) and their
    /// burst; past them a frame is dropped (signals are best effort). `None`: no limit.
    pub signals_per_user: Option<(NonZeroU32, NonZeroU32)>,
    /// `sync` frames per user per second (all connections together) and their burst; past them a sync gets
    /// `rate_limited` with `retry_after_ms` and its `conv`. `None`: no limit.
    pub syncs_per_user: Option<(NonZeroU32, NonZeroU32)>,
}

impl ConnectionLimits {
    /// When, within the drain window, connection `id` closes: ids are consecutive, and multiplying by the
    /// golden ratio's 64-bit fraction spreads consecutive ones evenly over the window.
    pub fn drain_turn(&self, id: ConnId) -> Duration {
        let fraction = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) as f64 / u64::MAX as f64;
        self.drain_window.mul_f64(fraction)
    }
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_body: 4 * 1024,
            outbound_queue: 1024,
            max_unacked: 1024,
            drain_window: Duration::ZERO,
            messages_per_user: None,
            signals_per_user: None,
            syncs_per_user: None,
        }
    }
}

/// A per-user rate (of sends, signals or syncs): one GCRA token bucket per user (governor's keyed limiter),
/// shared by the user's connections on this node. A check is a hash of the user id and one
/// compare-and-swap, so the frame's path stays cheap; users whose bucket is full again are forgotten every
/// minute, so its memory follows the users who were active recently, and an idle connection costs nothing.
#[derive(Clone)]
pub struct UserLimiter(Arc<DefaultKeyedRateLimiter<UserId>>);

impl UserLimiter {
    /// `per_second` frames per user per second, `burst` at once; `None` when `limit` is. Must be called on a
    /// Tokio runtime (the cleanup task runs there, and ends with the limiter).
    pub fn new(limit: Option<(NonZeroU32, NonZeroU32)>) -> Option<Self> {
        let (per_second, burst) = limit?;
        let limiter = Arc::new(RateLimiter::keyed(
            Quota::per_second(per_second).allow_burst(burst),
        ));
        forget_quiet_keys(&limiter);
        Some(Self(limiter))
    }

    /// Take one frame from `user`'s bucket, or say how long until one is there.
    pub fn check(&self, user: &UserId) -> Result<(), Duration> {
        self.0
            .check_key(user)
            .map_err(|not_until| not_until.wait_time_from(self.0.clock().now()))
    }
}

/// Every minute, until `limiter` is dropped, forget the keys whose bucket is full again (as if never seen):
/// a keyed limiter's memory then follows the keys seen recently. Must be called on a Tokio runtime.
pub fn forget_quiet_keys<K>(limiter: &Arc<DefaultKeyedRateLimiter<K>>)
where
    K: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
{
    let weak = Arc::downgrade(limiter);
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        every.tick().await;
        loop {
            every.tick().await;
            let Some(limiter) = weak.upgrade() else {
                return;
            };
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    });
}

/// `retry_after_ms` for a wait: whole milliseconds, rounded up, at least 1.
fn retry_after_ms(wait: Duration) -> u64 {
    u64::try_from(wait.as_micros().div_ceil(1000))
        .unwrap_or(u64::MAX)
        .max(1)
}

/// What every connection shares.
pub struct ConnectionContext {
    /// The conversation family.
    pub conversations: Conversations,
    /// The store (sync reads history directly).
    pub store: SharedStore,
    /// Limits.
    pub limits: ConnectionLimits,
    /// Sends per user per second (`limits.messages_per_user`), when limited.
    pub send_limiter: Option<UserLimiter>,
    /// Signals per user per second (`limits.signals_per_user`), when limited.
    pub signal_limiter: Option<UserLimiter>,
    /// Syncs per user per second (`limits.syncs_per_user`), when limited.
    pub sync_limiter: Option<UserLimiter>,
    /// Where syncs run: the actors' runtime, whatever runtime the transport runs the connection on (the edge
    /// runs it on this one too, decision 0011). A sync is a task of its own, so the loop keeps reading while a
    /// reconnect storm's history reads and replays run.
    pub runtime: tokio::runtime::Handle,
    /// Where connections are listed for delivery.
    pub directory: SessionDirectory,
    /// Told when a user's first connection opens or last one closes; serves `presence_subscribe`.
    pub presence: Presence,
    /// The node's behaviours, told when a connection ends (`on_disconnect`).
    pub behaviours: Option<Arc<crate::behaviour::Behaviours>>,
}

/// What the transport reads from the client, as the connection sees it.
#[derive(Debug)]
pub enum Inbound {
    /// A text frame.
    Text(String),
    /// A binary frame (not part of the protocol).
    Binary,
    /// A WebSocket ping, with its payload.
    Ping(Bytes),
    /// A WebSocket pong.
    Pong,
    /// The client closed, or the socket ended.
    Closed,
    /// The transport refused what the client sent: close with this code (1002, 1007, 1009).
    Refused(CloseCode),
}

type Answer = Pin<Box<dyn Future<Output = Result<Message, ProtocolError>> + Send>>;

/// Answers to a connection's sends, awaited one at a time in send order. A send whose conversation
/// restarted before answering is resubmitted only once every earlier send is answered, so it keeps its
/// place in the conversation too.
#[derive(Default)]
struct Answers {
    head: Option<Answer>,
    rest: VecDeque<PendingReply>,
}

impl Answers {
    fn push(&mut self, pending: PendingReply) {
        if self.head.is_none() {
            self.head = Some(Box::pin(pending.wait()));
        } else {
            self.rest.push_back(pending);
        }
    }

    fn len(&self) -> usize {
        usize::from(self.head.is_some()) + self.rest.len()
    }

    fn is_empty(&self) -> bool {
        self.head.is_none()
    }

    /// The next answer; cancel-safe (the head stays in place if this is dropped).
    async fn next(&mut self) -> Option<Result<Message, ProtocolError>> {
        let answer = self.head.as_mut()?.await;
        self.head = self.rest.pop_front().map(|p| Box::pin(p.wait()) as Answer);
        Some(answer)
    }
}

/// Queues answers for the client; a full queue makes the connection a slow consumer, whoever pushes.
#[derive(Clone)]
struct Replier {
    outbound: Outbound,
    id: ConnId,
}

impl Replier {
    fn send(&self, frame: &ServerFrame<'_>) {
        if self.outbound.push_frame(protocol::encode(frame)) == Err(PushError::Full) {
            slow_consumer(&self.outbound, self.id);
        }
    }
}

/// Close a connection whose queue is full at once, dropping what it queued (it resyncs on reconnect).
pub(crate) fn slow_consumer(outbound: &Outbound, id: ConnId) {
    if !outbound.is_closing() {
        info!(conn_id = id, "slow consumer: outbound queue full, closing");
        metrics::counter!("switchboard_slow_consumers_total").increment(1);
    }
    outbound.abort(CloseCode::SlowConsumer);
}

/// Unlists the connection from its session (and its presence watches) when it ends, however it ends;
/// closes with 1011 if it was not closed on purpose (a panic in the loop).
struct Link {
    ctx: Arc<ConnectionContext>,
    user: UserId,
    id: ConnId,
    outbound: Outbound,
    /// The users this connection watches (`presence_subscribe`).
    watching: Vec<UserId>,
    /// Runs the behaviours' `on_disconnect` when dropped with the link.
    _farewell: Option<crate::behaviour::Farewell>,
}

impl Drop for Link {
    fn drop(&mut self) {
        if !self.outbound.is_closing() {
            self.outbound.abort(CloseCode::Internal);
        }
        self.ctx.presence.unwatch(self.id, &self.watching);
        if self.ctx.directory.detach(&self.user, self.id) {
            self.ctx.presence.changed(&self.user);
        }
        metrics::gauge!("switchboard_connections").decrement(1.0);
    }
}

/// One connection, ready to run.
pub struct Connection {
    id: ConnId,
    ctx: Arc<ConnectionContext>,
    replier: Replier,
    /// Answers to the sends handed to conversations, in the order they were made.
    pending: Answers,
    /// Syncs in progress (a drain waits for them).
    syncs: TaskTracker,
    drain: CancellationToken,
    /// When its token expires: the connection is closed with 1008 then.
    expires: Option<Instant>,
    /// Its user, and its listing (unlisted on `Drop`).
    link: Link,
}

impl Connection {
    pub(crate) fn new(
        user: UserId,
        id: ConnId,
        ctx: Arc<ConnectionContext>,
        outbound: Outbound,
        drain: CancellationToken,
        farewell: Option<crate::behaviour::Farewell>,
    ) -> Self {
        metrics::gauge!("switchboard_connections").increment(1.0);
        debug!(conn_id = id, user_id = %user, "connection open");
        Self {
            id,
            ctx: ctx.clone(),
            replier: Replier {
                outbound: outbound.clone(),
                id,
            },
            pending: Answers::default(),
            syncs: TaskTracker::new(),
            drain,
            expires: None,
            link: Link {
                ctx,
                user,
                id,
                outbound,
                watching: Vec::new(),
                _farewell: farewell,
            },
        }
    }

    /// This connection's id.
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// Close the connection with 1008 at `at`, when the token it was opened with expires: a socket lives
    /// no longer than the credentials it was opened with.
    pub fn expire_at(&mut self, at: Instant) {
        self.expires = Some(at);
    }

    /// When the connection's one timer fires next: after `heartbeat` of silence, or when its token
    /// expires if that is sooner.
    fn next_deadline(&self, heartbeat: Duration) -> Instant {
        let silent = Instant::now() + heartbeat;
        self.expires.map_or(silent, |at| at.min(silent))
    }

    /// Run until the connection ends. `frames` is what the transport reads; a connection that sends
    /// nothing (not even a WebSocket ping) for `heartbeat` is closed with 4001, and one whose token
    /// expires (see [`Connection::expire_at`]) with 1008.
    pub async fn run<S>(mut self, mut frames: S, heartbeat: Duration)
    where
        S: Stream<Item = Inbound> + Unpin,
    {
        // One timer for both the heartbeat and the token's expiry: an idle connection's task carries one.
        let silent = tokio::time::sleep_until(self.next_deadline(heartbeat));
        tokio::pin!(silent);
        let outbound = self.replier.outbound.clone();
        let drain = self.drain.clone();
        // Once the node drains, the connection goes on serving until its turn in the drain window, which
        // `silent` then times: no second timer in every idle connection's task.
        let mut draining = false;
        loop {
            tokio::select! {
                biased;
                () = drain.cancelled(), if !draining => {
                    draining = true;
                    silent.as_mut().reset(Instant::now() + self.ctx.limits.drain_turn(self.id));
                }
                // Closed by someone else: a slow consumer, the transport gone.
                () = outbound.closing() => return,
                Some(answer) = self.pending.next(), if !self.pending.is_empty() => self.answer(answer),
                () = &mut silent => return if draining {
                    Box::pin(self.drain()).await
                } else if self.expires.is_some_and(|at| at <= Instant::now()) {
                    self.close(CloseCode::TokenExpired)
                } else {
                    self.close(CloseCode::IdleTimeout)
                },
                next = frames.next() => {
                    if !draining {
                        silent.as_mut().reset(self.next_deadline(heartbeat));
                    }
                    match next.unwrap_or(Inbound::Closed) {
                        // Boxed: an idle connection's task does not carry room for a send in flight.
                        Inbound::Text(text) => Box::pin(self.inbound(&text)).await,
                        Inbound::Binary => self.reply(&ServerFrame::error(&ProtocolError::new(
                            ErrorCode::InvalidJson,
                            "binary frames are not part of the protocol; send JSON text frames",
                        ))),
                        Inbound::Ping(payload) => {
                            if outbound.push_pong(payload) == Err(PushError::Full) {
                                slow_consumer(&outbound, self.id);
                            }
                        }
                        Inbound::Pong => {}
                        Inbound::Closed => return self.close(CloseCode::Normal),
                        Inbound::Refused(code) => return self.close(code),
                    }
                }
            }
        }
    }

    fn signal(&self, kind: SignalKind) -> Signal {
        Signal {
            from: self.link.user.clone(),
            kind,
            origin: Some(Origin::Here(self.id)),
        }
    }

    fn reply(&self, frame: &ServerFrame<'_>) {
        self.replier.send(frame);
    }

    fn answer(&self, answer: Result<Message, ProtocolError>) {
        match answer {
            Ok(m) => self.reply(&ServerFrame::ack(&m)),
            Err(e) => self.reply(&ServerFrame::error(&e)),
        }
    }

    /// Close after what is queued.
    fn close(&self, code: CloseCode) {
        debug!(conn_id = self.id, code = code.code(), "closing");
        self.replier.outbound.close(code);
    }

    /// The node is draining: read nothing more, answer every accepted send, finish syncs, close with 1012.
    async fn drain(mut self) {
        while let Some(answer) = self.pending.next().await {
            self.answer(answer);
        }
        self.syncs.close();
        self.syncs.wait().await;
        self.close(CloseCode::ServiceRestart);
    }

    /// Take one frame of this user's from `limiter` (none: no limit); past it, count the frame as limited
    /// and say how long until the next is allowed.
    fn limited(&self, limiter: &Option<UserLimiter>, frame: &'static str) -> Result<(), Duration> {
        let Some(limiter) = limiter else {
            return Ok(());
        };
        limiter.check(&self.link.user).inspect_err(|_| {
            metrics::counter!("switchboard_frames_limited_total", "frame" => frame).increment(1);
        })
    }

    async fn inbound(&mut self, text: &str) {
        let frame = match protocol::decode_client_frame(text, self.ctx.limits.max_body) {
            Ok(f) => f,
            Err(e) => return self.reply(&ServerFrame::error(&e)),
        };
        match frame {
            ClientFrame::Ping => self.reply(&ServerFrame::Pong),
            ClientFrame::Send { msg_id, conv, body } => {
                if let Some(Err(wait)) = self
                    .ctx
                    .send_limiter
                    .as_ref()
                    .map(|l| l.check(&self.link.user))
                {
                    let mut e = ProtocolError::new(
                        ErrorCode::RateLimited,
                        "too many messages from this user; retry after retry_after_ms",
                    );
                    e.retry_after_ms = Some(retry_after_ms(wait));
                    return self.reply(&ServerFrame::error(&e.for_msg(Some(&msg_id))));
                }
                if self.pending.len() >= self.ctx.limits.max_unacked {
                    let mut e = ProtocolError::new(
                        ErrorCode::RateLimited,
                        "too many sends awaiting their ack",
                    );
                    e.retry_after_ms = Some(100);
                    return self.reply(&ServerFrame::error(&e.for_msg(Some(&msg_id))));
                }
                let request = SendRequest {
                    from: self.link.user.clone(),
                    msg_id,
                    body,
                    origin: Some(Origin::Here(self.id)),
                };
                // Submitting here, before reading the next frame, keeps one connection's sends in order.
                match self.ctx.conversations.submit(&conv, request.clone()).await {
                    Err(e) => self.reply(&ServerFrame::error(&e.for_msg(Some(&request.msg_id)))),
                    Ok(pending) => self.pending.push(pending),
                }
            }
            ClientFrame::Typing { conv } => {
                if self.limited(&self.ctx.signal_limiter, "typing").is_ok() {
                    let signal = self.signal(SignalKind::Typing);
                    self.ctx.conversations.signal(&conv, signal).await;
                }
            }
            ClientFrame::Receipt { conv, kind, seq } => {
                if self.limited(&self.ctx.signal_limiter, "receipt").is_ok() {
                    let signal = self.signal(SignalKind::Receipt { kind, seq });
                    self.ctx.conversations.signal(&conv, signal).await;
                }
            }
            ClientFrame::PresenceSubscribe { users } => {
                let presence = &self.ctx.presence;
                presence.unwatch(self.id, &self.link.watching);
                let conn = ConnHandle {
                    id: self.id,
                    outbound: self.replier.outbound.clone(),
                };
                presence.watch(&conn, &users);
                self.link.watching = users;
            }
            ClientFrame::Sync { conv, after_seq } => {
                if let Err(wait) = self.limited(&self.ctx.sync_limiter, "sync") {
                    let mut e = ProtocolError::new(
                        ErrorCode::RateLimited,
                        "too many syncs from this user; retry after retry_after_ms",
                    );
                    e.retry_after_ms = Some(retry_after_ms(wait));
                    return self.reply(&ServerFrame::error(&e).about(&conv));
                }
                let (store, user, replier, conversations, behaviours) = (
                    self.ctx.store.clone(),
                    self.link.user.clone(),
                    self.replier.clone(),
                    self.ctx.conversations.clone(),
                    self.ctx.behaviours.clone(),
                );
                self.syncs.spawn_on(
                    async move {
                        // In a cluster, the owner must know this connection before history is read, or a
                        // message committed in between would be in neither the replay nor the live feed.
                        conversations.barrier(&conv).await;
                        match history::sync(&*store, &user, &conv, after_seq).await {
                            Ok(page) => {
                                // Taken before the behaviours filter: the client continues after what
                                // was read, shown or not.
                                let last_seq = page.messages.last().map_or(after_seq, |m| m.seq);
                                let shown = match &behaviours {
                                    Some(b) => b.replay(page.messages, &user),
                                    None => page.messages,
                                };
                                for m in &shown {
                                    replier.send(&ServerFrame::Msg(m));
                                }
                                replier.send(&ServerFrame::Synced {
                                    conv: &conv,
                                    last_seq,
                                    has_more: page.has_more,
                                });
                            }
                            Err(e) => replier.send(&ServerFrame::error(&e).about(&conv)),
                        }
                    },
                    &self.ctx.runtime,
                );
            }
        }
    }
}
