//! `ConversationActor`: the single writer of one conversation, a child of the `ConversationSupervisor`.
//!
//! It checks membership, queues sends, and keeps exactly one store write in flight: sends that arrive while
//! a batch is being written form the next batch (group commit within the conversation; the embedded store
//! also groups batches of different conversations into one fsync). The store assigns sequence numbers and
//! deduplicates inside the same atomic write, so a resend never takes a seq and seqs never have gaps.
//!
//! A batch is written, acknowledged and fanned out by a task the actor spawns; only then does the actor hear
//! `Committed` and start the next batch, so fan-out follows seq order. If the actor dies meanwhile the task
//! still acks and delivers what became durable, and the store's seq fence stops the restarted actor from
//! reusing a seq.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tracing::{debug, warn};

use crate::behaviour::{Behaviours, FilteredFanOut, MemberEvent};
use crate::cluster::{
    MemberChange, Origin, Outgoing, RemoteAnswer, RemoteAnswers, Role, SharedCluster, Signal,
    SignalKind,
};
use crate::conversations::ConversationsMsg;
use crate::notify::{Offline, SharedNotifier};
use crate::protocol::{self, ErrorCode, ProtocolError, ReceiptKind, ServerFrame};
use crate::session::{Recipients, SessionDirectory};
use crate::store::{
    Appended, ConvId, ConversationInfo, ConversationKind, Message, NewMessage, SharedStore,
    StoreError, UserId, MAX_MEMBERS,
};

/// Receipts go to the other members in DMs and groups of at most this many members; larger groups send none.
pub const RECEIPTS_UP_TO: usize = 100;

/// A member's typing events are passed on at most once per this interval per conversation.
pub const TYPING_EVERY: Duration = Duration::from_secs(1);

/// The answer to a send: the stored message (new or original) or an error for the client.
pub type SendResult = Result<Message, ProtocolError>;

/// Tunables of every conversation actor.
#[derive(Debug, Clone)]
pub struct ConversationConfig {
    /// Stop after this long without traffic; restarted on demand from the store.
    pub idle_after: Duration,
    /// Most messages written in one store call.
    pub max_batch: usize,
    /// Most sends waiting behind the write in flight; past that a send gets `rate_limited`.
    pub max_queue: usize,
}

impl Default for ConversationConfig {
    fn default() -> Self {
        Self {
            idle_after: Duration::from_secs(300),
            max_batch: 256,
            max_queue: 10_000,
        }
    }
}

/// What every conversation actor shares.
pub struct ConversationContext {
    /// The message store.
    pub store: SharedStore,
    /// Where online users' sessions are found for fan-out.
    pub sessions: SessionDirectory,
    /// Tunables.
    pub config: ConversationConfig,
    /// The cluster, if this node is in one: members online elsewhere get the batch through it.
    pub cluster: Option<SharedCluster>,
    /// Where offline members' notifications go, if anywhere.
    pub notifier: Option<SharedNotifier>,
    /// The node's behaviours, if it has any (`None`: no hook costs anything).
    pub behaviours: Option<Arc<Behaviours>>,
}

/// A send as the edge hands it over.
#[derive(Debug, Clone)]
pub struct SendRequest {
    /// Sender (authenticated user).
    pub from: UserId,
    /// The client's id for the message.
    pub msg_id: String,
    /// Text, already checked against the body limit.
    pub body: String,
    /// The connection it came from, which gets the `ack` instead of the `msg`.
    pub origin: Option<Origin>,
}

/// Who waits for a send's outcome.
#[derive(Debug)]
pub enum Answer {
    /// A caller on this node.
    Port(RpcReplyPort<SendResult>),
    /// A sender on another node: answered with the batch's fan-out to that node.
    Remote(RemoteAnswer),
}

impl Answer {
    /// Answer now.
    pub fn send(self, outcome: SendResult) {
        match self {
            Self::Port(port) => {
                let _ = port.send(outcome);
            }
            Self::Remote(remote) => remote.send(outcome),
        }
    }
}

impl From<RpcReplyPort<SendResult>> for Answer {
    fn from(port: RpcReplyPort<SendResult>) -> Self {
        Self::Port(port)
    }
}

/// Messages of a [`ConversationActor`].
pub enum ConversationMsg {
    /// Store, ack and fan out a message.
    Send {
        /// The send.
        request: SendRequest,
        /// Where the ack or error goes.
        reply: Answer,
    },
    /// The write task finished a batch (sent by the actor's own task).
    Committed {
        /// The next seq after the batch, or `None` when the write failed and the last seq must be reloaded.
        next_seq: Option<u64>,
    },
    /// Add or remove a member, or change a member's role (groups only).
    ChangeMember {
        /// The user changed.
        user: UserId,
        /// What changes.
        change: MemberChange,
        /// Who asks (their role is checked), or `None` for the server itself.
        by: Option<UserId>,
        /// `true` if something changed, `false` if it already was so.
        reply: RpcReplyPort<Result<bool, ProtocolError>>,
    },
    /// Answer once every accepted send is durable and acknowledged.
    Flush {
        /// Answered when the queue is empty and no write is in flight.
        reply: RpcReplyPort<()>,
    },
    /// A best-effort signal (typing, a receipt) for the other members.
    Signal {
        /// The signal.
        signal: Signal,
    },
    /// Periodic check for idleness.
    IdleCheck,
    /// Fault injection: panic in the handler, as a bug would.
    Crash,
    /// The behaviours' verdicts on sends whose `on_message` had to wait (sent by the actor's own task).
    Screened {
        /// The sends, in arrival order, with their verdicts.
        batch: ScreenedBatch,
    },
}

/// Sends whose `on_message` hooks ran in a task, in arrival order, each with its verdict.
pub struct ScreenedBatch(Vec<(PendingSend, Result<(), ProtocolError>)>);

impl ractor::Message for ConversationMsg {}

/// The conversation actor (stateless: everything lives in [`ConversationState`]).
pub struct ConversationActor;

/// Arguments to start a conversation actor.
pub struct ConversationArgs {
    /// Which conversation.
    pub id: ConvId,
    /// Shared dependencies.
    pub ctx: Arc<ConversationContext>,
}

/// Why a conversation actor could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No such conversation in the store.
    #[error("unknown conversation")]
    NotFound,
    /// The store failed while loading.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A send queued in its conversation.
pub struct PendingSend {
    pub(crate) message: NewMessage,
    origin: Option<Origin>,
    replies: Vec<Answer>,
}

/// The state of one conversation.
pub struct ConversationState {
    id: ConvId,
    ctx: Arc<ConversationContext>,
    kind: ConversationKind,
    members: Arc<HashSet<UserId>>,
    /// Bumped whenever `members` changes.
    members_version: u64,
    /// A group's owners (none for a DM, or for a group from before roles whose creator left).
    owners: HashSet<UserId>,
    /// Whether `owners` is what the store holds, or the creator by default (see [`owners_of`]).
    owners_stored: bool,
    /// The members' connections, resolved for fan-out; used by one write job at a time.
    recipients: Arc<std::sync::Mutex<Recipients>>,
    /// The seq the next new message takes; `None` after a failed write, until reloaded from the store.
    next_seq: Option<u64>,
    writing: bool,
    queued: Vec<PendingSend>,
    flush_waiters: Vec<RpcReplyPort<()>>,
    last_activity: Instant,
    idle_reported: bool,
    /// When each member's last typing event was passed on (the throttle).
    typing_at: std::collections::HashMap<UserId, Instant>,
    /// The highest read position each member sent while this actor ran.
    read_at: std::collections::HashMap<UserId, u64>,
    /// Sends waiting for their `on_message` verdicts, in arrival order, behind those in `screening`.
    screen: VecDeque<PendingSend>,
    /// How many sends a screening task holds (at most one task at a time, so verdicts keep arrival order).
    screening: usize,
    /// Stored batches on their way to the behaviours' `on_stored`, in seq order.
    stored: Option<crate::behaviour::screen::StoredFeed>,
}

impl ConversationState {
    /// Queue a send; `Err` answers it at once.
    fn accept(&mut self, request: SendRequest, reply: Answer) {
        let refuse = |reply: Answer, e: ProtocolError| reply.send(Err(e));
        if !self.members.contains(&request.from) {
            let e = ProtocolError::new(
                ErrorCode::NotMember,
                "you are not a member of this conversation",
            );
            return refuse(reply, e.for_msg(Some(&request.msg_id)));
        }
        self.touch();
        if let Some(p) = self
            .queued
            .iter_mut()
            .find(|p| p.message.from == request.from && p.message.msg_id == request.msg_id)
        {
            p.replies.push(reply);
            return;
        }
        if self.queued.len() + self.screen.len() + self.screening >= self.ctx.config.max_queue {
            let mut e =
                ProtocolError::new(ErrorCode::RateLimited, "conversation write queue is full");
            e.retry_after_ms = Some(100);
            return refuse(reply, e.for_msg(Some(&request.msg_id)));
        }
        let pending = PendingSend {
            message: NewMessage {
                id: uuid::Uuid::now_v7().simple().to_string(),
                msg_id: request.msg_id,
                from: request.from,
                body: request.body,
                ts: now_ms(),
            },
            origin: request.origin,
            replies: vec![reply],
        };
        match &self.ctx.behaviours {
            None => self.queued.push(pending),
            Some(_) => self.screen.push_back(pending),
        }
    }

    /// Run the `on_message` verdicts of the sends waiting for them, in arrival order: inline while each
    /// answers at once (a behaviour that does not wait costs no hop), in one task from the first that
    /// waits. Accepted sends join the write queue in arrival order; refused ones are answered.
    fn screen(&mut self, myself: &ActorRef<ConversationMsg>) {
        let Some(behaviours) = &self.ctx.behaviours else {
            return;
        };
        if self.screening > 0 {
            return;
        }
        if let Some(rest) = crate::behaviour::screen::inline(
            behaviours,
            &self.id,
            &mut self.screen,
            |p, verdict| screened(&mut self.queued, p, verdict),
        ) {
            self.screening = rest.len();
            let myself = myself.clone();
            tokio::spawn(async move {
                let batch = ScreenedBatch(futures_util::future::join_all(rest).await);
                let _ = myself.send_message(ConversationMsg::Screened { batch });
            });
        }
    }

    fn screened_batch(&mut self, batch: ScreenedBatch) {
        self.screening = 0;
        for (p, verdict) in batch.0 {
            screened(&mut self.queued, p, verdict);
        }
    }

    /// Start writing the next batch unless a write is in flight.
    fn start_write(&mut self, myself: &ActorRef<ConversationMsg>) {
        if self.writing || self.queued.is_empty() {
            return;
        }
        let n = self.queued.len().min(self.ctx.config.max_batch);
        let batch: Vec<PendingSend> = self.queued.drain(..n).collect();
        self.writing = true;
        let job = WriteJob {
            conv: self.id.clone(),
            ctx: self.ctx.clone(),
            members: self.members.clone(),
            members_version: self.members_version,
            recipients: self.recipients.clone(),
            next_seq: self.next_seq,
            batch,
            stored: self.stored.clone(),
        };
        let myself = myself.clone();
        tokio::spawn(async move {
            let next_seq = job.run().await;
            // The actor may be gone (crashed or stopped); what was durable has been acked and delivered.
            let _ = myself.send_message(ConversationMsg::Committed { next_seq });
        });
    }

    fn committed(&mut self, next_seq: Option<u64>) {
        self.writing = false;
        self.next_seq = next_seq;
        self.touch();
    }

    fn answer_flushes(&mut self) {
        if !self.writing && self.queued.is_empty() && self.screen.is_empty() && self.screening == 0
        {
            for w in self.flush_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    fn touch(&mut self) {
        self.last_activity = Instant::now();
        self.idle_reported = false;
    }

    fn is_idle(&self, now: Instant) -> bool {
        !self.writing
            && self.queued.is_empty()
            && self.screen.is_empty()
            && self.screening == 0
            && now.duration_since(self.last_activity) >= self.ctx.config.idle_after
    }

    /// Pass a signal on to the other members' online devices, unless the sender is not a member, it is a
    /// typing event within [`TYPING_EVERY`] of the sender's last, or it is a receipt in a group of more than
    /// [`RECEIPTS_UP_TO`]. Connections whose queue is half full drop it.
    fn signal(&mut self, signal: Signal) {
        if !self.members.contains(&signal.from) {
            return;
        }
        let frame = match &signal.kind {
            SignalKind::Typing => {
                let now = Instant::now();
                if self
                    .typing_at
                    .get(&signal.from)
                    .is_some_and(|at| now.duration_since(*at) < TYPING_EVERY)
                {
                    return;
                }
                self.typing_at
                    .retain(|_, at| now.duration_since(*at) < TYPING_EVERY);
                self.typing_at.insert(signal.from.clone(), now);
                protocol::encode(&ServerFrame::Typing {
                    conv: &self.id,
                    user: &signal.from,
                })
            }
            SignalKind::Receipt { kind, seq } => {
                // Nobody has read past the last message.
                let seq = &self.next_seq.map_or(*seq, |next| (*seq).min(next - 1));
                if *kind == ReceiptKind::Read {
                    // A read position only moves forward: an older one is neither stored nor passed on.
                    if self.read_at.get(&signal.from).is_some_and(|at| at >= seq) {
                        return;
                    }
                    self.read_at.insert(signal.from.clone(), *seq);
                    self.keep_read_position(&signal.from, *seq);
                }
                protocol::encode(&ServerFrame::Receipt {
                    conv: &self.id,
                    user: &signal.from,
                    kind: *kind,
                    seq: *seq,
                })
            }
        };
        if matches!(signal.kind, SignalKind::Receipt { .. }) && self.members.len() > RECEIPTS_UP_TO
        {
            // No per-user receipt events in big groups; the reader's own other devices still learn its new
            // read position (a read on the phone clears the badge on the web).
            if matches!(
                signal.kind,
                SignalKind::Receipt {
                    kind: ReceiptKind::Read,
                    ..
                }
            ) {
                self.signal_own_devices(&signal, &frame);
            }
            return;
        }
        // A write job fanning out a big batch holds the recipients for a while: a signal is dropped rather
        // than make this handler wait.
        let mut recipients = match self.recipients.try_lock() {
            Ok(r) => r,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                metrics::counter!("switchboard_signals_dropped_total").increment(1);
                return;
            }
        };
        self.ctx
            .sessions
            .resolve(&self.members, self.members_version, &mut recipients);
        let skip = signal.origin.as_ref().and_then(Origin::here);
        recipients.deliver_signal(&frame, skip);
        if let Some(cluster) = &self.ctx.cluster {
            cluster.fan_out_signal(
                &self.id,
                &self.members,
                self.members_version,
                &frame,
                signal.origin.as_ref(),
                &mut recipients.remote,
            );
        }
    }

    /// Store `user`'s read position (forward only) in a task of its own: the handler does not wait on the
    /// store, and the store keeps the highest position whatever order the writes land in.
    fn keep_read_position(&self, user: &str, seq: u64) {
        let (store, conv, user) = (self.ctx.store.clone(), self.id.clone(), user.to_owned());
        tokio::spawn(async move {
            if let Err(e) = store.set_read(&conv, &user, seq).await {
                warn!(conv_id = %conv, error = %e, "read position not stored");
            }
        });
    }

    /// Pass a signal to the sender's own devices only (but the one that sent it), here and on other nodes.
    fn signal_own_devices(&self, signal: &Signal, frame: &bytes::Bytes) {
        self.signal_users(
            std::slice::from_ref(&signal.from),
            frame,
            signal.origin.as_ref(),
        );
    }

    /// Pass a signal to these users' devices (but `origin`), here and on other nodes, member or not.
    fn signal_users(&self, users: &[UserId], frame: &bytes::Bytes, origin: Option<&Origin>) {
        let skip = origin.and_then(Origin::here);
        self.ctx.sessions.deliver_signal_to(users, frame, skip);
        if let Some(cluster) = &self.ctx.cluster {
            let only: HashSet<UserId> = users.iter().cloned().collect();
            cluster.fan_out_signal(&self.id, &only, 0, frame, origin, &mut Default::default());
        }
    }

    /// Apply a membership or role change asked by `by` (`None`: the server itself), checking the roles:
    /// a group's owners add members, remove others and change roles; anyone may leave, but the last owner
    /// only when nobody else remains. A DM's members never change.
    async fn change_member(
        &mut self,
        user: UserId,
        change: MemberChange,
        by: Option<UserId>,
    ) -> Result<bool, ProtocolError> {
        if self.kind == ConversationKind::Dm {
            return Err(ProtocolError::new(
                ErrorCode::InvalidField,
                "a DM's members cannot change",
            ));
        }
        if let Some(by) = &by {
            if !self.members.contains(by) {
                return Err(ProtocolError::new(
                    ErrorCode::NotMember,
                    "you are not a member of this conversation",
                ));
            }
            let leaving = change == MemberChange::Remove && *by == user;
            if !leaving && !self.owners.is_empty() && !self.owners.contains(by) {
                return Err(ProtocolError::new(
                    ErrorCode::Forbidden,
                    "only the group's owners add members, remove others and change roles",
                ));
            }
        }
        match change {
            MemberChange::Add => self.add_member(user).await,
            MemberChange::Remove => self.remove_member(user, by).await,
            MemberChange::SetRole(role) => self.set_role(user, role).await,
        }
    }

    async fn add_member(&mut self, user: UserId) -> Result<bool, ProtocolError> {
        if self.members.contains(&user) {
            return Ok(false);
        }
        if self.members.len() >= MAX_MEMBERS {
            return Err(ProtocolError::new(
                ErrorCode::InvalidField,
                format!("a conversation has at most {MAX_MEMBERS} members"),
            ));
        }
        if let Some(behaviours) = &self.ctx.behaviours {
            let event = MemberEvent {
                conv: self.id.clone(),
                user: user.clone(),
            };
            behaviours.join(&event).await?;
        }
        let added = self
            .ctx
            .store
            .add_member(&self.id, &user)
            .await
            .map_err(store_error)?;
        Arc::make_mut(&mut self.members).insert(user);
        self.members_version += 1;
        Ok(added)
    }

    async fn remove_member(
        &mut self,
        user: UserId,
        by: Option<UserId>,
    ) -> Result<bool, ProtocolError> {
        if self.owners.len() == 1 && self.owners.contains(&user) && self.members.len() > 1 {
            return Err(ProtocolError::new(
                ErrorCode::InvalidField,
                "the last owner cannot leave while others remain: make another member owner first",
            ));
        }
        let removed = self
            .ctx
            .store
            .remove_member(&self.id, &user)
            .await
            .map_err(store_error)?;
        // From here on nothing reaches the user: the next fan-out resolves the new member list, and
        // their sends, signals and syncs are refused.
        Arc::make_mut(&mut self.members).remove(&user);
        self.members_version += 1;
        self.owners.remove(&user);
        self.typing_at.remove(&user);
        self.read_at.remove(&user);
        if removed {
            // Their open sockets learn of it at once (best effort, like a signal: the refusals above are
            // what holds).
            let frame = protocol::encode(&ServerFrame::Removed {
                conv: &self.id,
                by: by.as_deref(),
            });
            self.signal_users(std::slice::from_ref(&user), &frame, None);
            if let Some(behaviours) = &self.ctx.behaviours {
                behaviours.left(MemberEvent {
                    conv: self.id.clone(),
                    user,
                });
            }
        }
        Ok(removed)
    }

    async fn set_role(&mut self, user: UserId, role: Role) -> Result<bool, ProtocolError> {
        if !self.members.contains(&user) {
            return Err(ProtocolError::new(
                ErrorCode::InvalidField,
                "only a member can have a role",
            ));
        }
        let owner = role == Role::Owner;
        if owner == self.owners.contains(&user) {
            return Ok(false);
        }
        if !owner && self.owners.len() == 1 {
            return Err(ProtocolError::new(
                ErrorCode::InvalidField,
                "a group keeps at least one owner: make another member owner first",
            ));
        }
        // A group whose creator is its owner only by default (no owner stored yet) records that first, so
        // the new role adds to it rather than replacing it.
        if !self.owners_stored {
            for o in &self.owners {
                self.ctx
                    .store
                    .set_owner(&self.id, o, true)
                    .await
                    .map_err(store_error)?;
            }
            self.owners_stored = true;
        }
        self.ctx
            .store
            .set_owner(&self.id, &user, owner)
            .await
            .map_err(store_error)?;
        if owner {
            self.owners.insert(user);
        } else {
            self.owners.remove(&user);
        }
        Ok(true)
    }
}

/// One batch on its way to the store, then to its senders and the members' connections.
struct WriteJob {
    conv: ConvId,
    ctx: Arc<ConversationContext>,
    members: Arc<HashSet<UserId>>,
    members_version: u64,
    recipients: Arc<std::sync::Mutex<Recipients>>,
    next_seq: Option<u64>,
    batch: Vec<PendingSend>,
    stored: Option<crate::behaviour::screen::StoredFeed>,
}

/// Queue an accepted send for the store, or answer a refused one.
fn screened(queued: &mut Vec<PendingSend>, p: PendingSend, verdict: Result<(), ProtocolError>) {
    match verdict {
        Ok(()) => queued.push(p),
        Err(e) => {
            for reply in p.replies {
                reply.send(Err(e.clone()));
            }
        }
    }
}

impl WriteJob {
    /// Write, ack, fan out; return the next seq (`None` when the write failed).
    ///
    /// Each new message is serialised once; the whole batch then goes to each recipient connection in one
    /// push (one lock, one wake-up), in seq order. The next batch starts only after this fan-out, so every
    /// connection sees the conversation in order.
    async fn run(mut self) -> Option<u64> {
        let messages: Vec<NewMessage> = self.batch.iter().map(|p| p.message.clone()).collect();
        let batch = std::mem::take(&mut self.batch);
        match self.append(messages).await {
            Ok((results, next)) => {
                let mut frames = Vec::with_capacity(results.len());
                let mut remote = RemoteAnswers::new();
                for (pending, outcome) in batch.into_iter().zip(&results) {
                    if let Appended::New(m) = &outcome {
                        frames.push((protocol::encode(&ServerFrame::Msg(m)), pending.origin));
                    }
                    answer(pending.replies, Ok(outcome.message()), &mut remote);
                }
                if !frames.is_empty() {
                    metrics::counter!("switchboard_messages_stored_total")
                        .increment(frames.len() as u64);
                }
                let filtered = self
                    .ctx
                    .behaviours
                    .as_deref()
                    .filter(|b| b.filters_delivery());
                if let (Some(behaviours), false) = (filtered, frames.is_empty()) {
                    self.deliver_filtered(behaviours, &results, &frames, remote);
                } else {
                    let mut recipients = self.recipients.lock().unwrap_or_else(|e| e.into_inner());
                    if !frames.is_empty() {
                        self.ctx.sessions.resolve(
                            &self.members,
                            self.members_version,
                            &mut recipients,
                        );
                        recipients.deliver(&frames);
                    }
                    self.fan_out(&frames, remote, &mut recipients);
                }
                if let Some(feed) = &self.stored {
                    feed.push(&results);
                }
                // After the acks and the fan-out: looking for offline members is not the senders' wait.
                if let (Some(note), Some(notifier)) =
                    (self.offline_notice(&results), &self.ctx.notifier)
                {
                    notifier.offline(note);
                }
                Some(next)
            }
            Err(e) => {
                warn!(conv_id = %self.conv, error = %e, "batch not stored");
                let err = store_error(e);
                let mut remote = RemoteAnswers::new();
                for pending in batch {
                    let e = err.clone().for_msg(Some(&pending.message.msg_id));
                    answer(pending.replies, Err(&e), &mut remote);
                }
                let mut recipients = self.recipients.lock().unwrap_or_else(|e| e.into_inner());
                self.fan_out(&[], remote, &mut recipients);
                None
            }
        }
    }

    /// The batch's news for the members with no live connection anywhere (its senders aside), if the node
    /// has a notifier and any member is offline: one [`Offline`] for the batch, whatever its size. Nothing
    /// is copied while everyone is online.
    fn offline_notice(&self, results: &[Appended]) -> Option<Offline> {
        self.ctx.notifier.as_ref()?;
        let new = || {
            results.iter().filter_map(|r| match r {
                Appended::New(m) => Some(m),
                Appended::Duplicate(_) => None,
            })
        };
        let latest = new().next_back()?;
        let mut users = self.ctx.sessions.offline_among(&self.members);
        users.retain(|u| !new().any(|m| &m.from == u));
        if let Some(cluster) = &self.ctx.cluster {
            cluster.retain_offline(&mut users);
        }
        (!users.is_empty()).then(|| Offline {
            conv: self.conv.clone(),
            latest: latest.clone(),
            count: new().count(),
            users,
        })
    }

    /// Live delivery when a behaviour decides per recipient (see [`FilteredFanOut`]).
    fn deliver_filtered(
        &self,
        behaviours: &Behaviours,
        results: &[Appended],
        frames: &[Outgoing],
        remote: RemoteAnswers,
    ) {
        let news: Vec<(&Message, Outgoing)> = results
            .iter()
            .filter_map(|r| match r {
                Appended::New(m) => Some(m),
                Appended::Duplicate(_) => None,
            })
            .zip(frames.iter().cloned())
            .collect();
        FilteredFanOut {
            behaviours,
            conv: &self.conv,
            members: &self.members,
            sessions: &self.ctx.sessions,
            cluster: self.ctx.cluster.as_ref(),
        }
        .deliver(&news, remote);
    }

    /// Hand the batch, and the answers to sends from other nodes, to the cluster (if any).
    fn fan_out(&self, frames: &[Outgoing], remote: RemoteAnswers, recipients: &mut Recipients) {
        if frames.is_empty() && remote.is_empty() {
            return;
        }
        if let Some(cluster) = &self.ctx.cluster {
            cluster.fan_out(
                &self.conv,
                &self.members,
                self.members_version,
                frames,
                remote,
                &mut recipients.remote,
            );
        }
    }

    /// Append at the known next seq; on a fence conflict (another incarnation wrote meanwhile) reload once.
    async fn append(&self, messages: Vec<NewMessage>) -> Result<(Vec<Appended>, u64), StoreError> {
        let store = &self.ctx.store;
        let mut first = match self.next_seq {
            Some(s) => s,
            None => store.last_seq(&self.conv).await? + 1,
        };
        let mut tries = 0;
        loop {
            match store.append(&self.conv, first, messages.clone()).await {
                Ok(results) => {
                    let new = results
                        .iter()
                        .filter(|r| matches!(r, Appended::New(_)))
                        .count() as u64;
                    return Ok((results, first + new));
                }
                Err(StoreError::SeqConflict { found, .. }) if tries < 3 => {
                    debug!(conv_id = %self.conv, found, "seq fence moved; reloading");
                    first = found + 1;
                    tries += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Answer the local waiters of one send at once; collect the remote ones for the fan-out.
fn answer(
    replies: Vec<Answer>,
    outcome: Result<&Message, &ProtocolError>,
    remote: &mut RemoteAnswers,
) {
    for reply in replies {
        let owned = outcome.cloned().map_err(ProtocolError::clone);
        match reply {
            Answer::Port(port) => {
                let _ = port.send(owned);
            }
            Answer::Remote(r) => {
                let (node, tag) = r.take();
                remote.push((node, tag, Ok(owned)));
            }
        }
    }
}

/// How a store failure reaches a client.
pub fn store_error(e: StoreError) -> ProtocolError {
    match e {
        StoreError::Corrupt(_) => {
            ProtocolError::new(ErrorCode::Internal, "stored data could not be read")
        }
        StoreError::Unavailable(_) | StoreError::SeqConflict { .. } => ProtocolError::new(
            ErrorCode::StoreUnavailable,
            "the message store did not confirm the write; retry with the same msg_id",
        ),
    }
}

/// A group's owners: those the store records or, when it records none (a new group, or one from before
/// roles), its creator while a member. A DM has none.
pub fn owners_of(info: &ConversationInfo, members: &[UserId], stored: Vec<UserId>) -> Vec<UserId> {
    if info.kind == ConversationKind::Dm {
        Vec::new()
    } else if stored.is_empty() && members.contains(&info.created_by) {
        vec![info.created_by.clone()]
    } else {
        stored
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Actor for ConversationActor {
    type Msg = ConversationMsg;
    type State = ConversationState;
    type Arguments = ConversationArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: ConversationArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let store = &args.ctx.store;
        let info = store
            .conversation(&args.id)
            .await
            .map_err(StartError::from)?
            .ok_or(StartError::NotFound)?;
        let members = store.members(&args.id).await.map_err(StartError::from)?;
        let stored_owners = store.owners(&args.id).await.map_err(StartError::from)?;
        let owners_stored = !stored_owners.is_empty();
        let owners = owners_of(&info, &members, stored_owners);
        let last_seq = store.last_seq(&args.id).await.map_err(StartError::from)?;
        let tick = (args.ctx.config.idle_after / 2).max(Duration::from_millis(50));
        myself.send_interval(tick, || ConversationMsg::IdleCheck);
        debug!(conv_id = %args.id, last_seq, "conversation started");
        Ok(ConversationState {
            id: args.id,
            kind: info.kind,
            members: Arc::new(members.into_iter().collect()),
            members_version: 0,
            owners: owners.into_iter().collect(),
            owners_stored,
            recipients: Arc::default(),
            next_seq: Some(last_seq + 1),
            writing: false,
            queued: Vec::new(),
            flush_waiters: Vec::new(),
            last_activity: Instant::now(),
            idle_reported: false,
            typing_at: Default::default(),
            read_at: Default::default(),
            screen: VecDeque::new(),
            screening: 0,
            stored: args
                .ctx
                .behaviours
                .clone()
                .map(crate::behaviour::screen::StoredFeed::start),
            ctx: args.ctx,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ConversationMsg::Send { request, reply } => {
                state.accept(request, reply);
                state.screen(&myself);
                state.start_write(&myself);
            }
            ConversationMsg::Screened { batch } => {
                state.screened_batch(batch);
                state.screen(&myself);
                state.start_write(&myself);
                state.answer_flushes();
            }
            ConversationMsg::Committed { next_seq } => {
                state.committed(next_seq);
                state.start_write(&myself);
                state.answer_flushes();
            }
            ConversationMsg::ChangeMember {
                user,
                change,
                by,
                reply,
            } => {
                let _ = reply.send(state.change_member(user, change, by).await);
            }
            ConversationMsg::Flush { reply } => {
                state.flush_waiters.push(reply);
                state.answer_flushes();
            }
            ConversationMsg::Signal { signal } => state.signal(signal),
            ConversationMsg::IdleCheck => {
                if !state.idle_reported && state.is_idle(Instant::now()) {
                    state.idle_reported = true;
                    if let Some(sup) = myself.try_get_supervisor() {
                        let _ = sup.send_message(ConversationsMsg::Idle {
                            conv: state.id.clone(),
                            actor: myself.get_id(),
                        });
                    }
                }
            }
            ConversationMsg::Crash => panic!(
                "fault injection: conversation {} crashed on request",
                state.id
            ),
        }
        Ok(())
    }
}
