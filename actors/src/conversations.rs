//! `ConversationSupervisor` and [`Conversations`], the handle the edge uses to reach conversation actors.
//!
//! The supervisor starts a conversation's actor on demand (its `pre_start` loads members and the last seq
//! from the store). Starts run concurrently, each in a task of its own that reports back: a burst of cold
//! conversations (a restart, a reconnect storm) is not loaded one after another in this mailbox, and
//! every request for a conversation that is starting waits for that one start. It restarts one that fails
//! while its [`RestartBudget`] allows — alone: no other
//! conversation notices — and drains one that reports itself idle. It writes the directory; the edge reads
//! it without messaging the supervisor, so the supervisor is never on the hot path.
//!
//! A send whose actor dies or stops before answering is resubmitted by [`PendingReply::wait`]; the store's
//! dedupe index makes that safe.
//!
//! In a cluster, [`Conversations`] routes: a conversation placed on another node is reached through the
//! [`Cluster`](crate::cluster::Cluster) (its sends forwarded in order, its member changes asked of its owner), and the sends other
//! nodes forward here arrive through [`Conversations::forward_here`], queued by the supervisor in arrival
//! order behind a start. When placement changes, [`Conversations::release`] drains the actors this node no
//! longer owns, as if they were idle.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ractor::concurrency::oneshot;
use ractor::rpc::CallResult;
use ractor::{
    Actor, ActorId, ActorProcessingErr, ActorRef, ActorStatus, RpcReplyPort, SpawnErr,
    SupervisionEvent,
};
use tracing::{error, info, warn};

use crate::cluster::{Lost, MemberChange, Origin, RemoteReply, SharedCluster, Signal};
use crate::conversation::{
    Answer, ConversationActor, ConversationArgs, ConversationContext, ConversationMsg, SendRequest,
    SendResult, StartError,
};
use crate::protocol::{ErrorCode, ProtocolError};
use crate::store::{ConvId, Message, UserId};
use crate::supervisor::{Decision, Escalation, RestartBudget, RestartIntensity};

type Directory = Arc<RwLock<HashMap<ConvId, ActorRef<ConversationMsg>>>>;
type StartReply = RpcReplyPort<Result<ActorRef<ConversationMsg>, ProtocolError>>;

/// How many times a send is resubmitted after its conversation actor went away without answering.
const RESUBMITS: u32 = 3;

/// How long a send keeps trying to reach a conversation's owner that cannot be reached (a node that just
/// died stays in the placement until the cluster sees its link drop).
const ROUTE_PATIENCE: Duration = Duration::from_secs(5);

/// Messages of the conversation supervisor.
pub enum ConversationsMsg {
    /// Find or start the actor of `conv`.
    Start {
        /// Conversation id.
        conv: ConvId,
        /// The running actor, or why it cannot run.
        reply: StartReply,
    },
    /// A start has finished.
    Started {
        /// Conversation id.
        conv: ConvId,
        /// The new actor, or why it did not start.
        result: Result<ActorRef<ConversationMsg>, ProtocolError>,
    },
    /// A conversation actor has been idle for its idle time, or is no longer placed on this node: drain it.
    Idle {
        /// Conversation id.
        conv: ConvId,
        /// The reporting actor (it may have been replaced since).
        actor: ActorId,
    },
    /// A send another node forwarded to this one, the conversation's owner: queued in arrival order, behind
    /// the actor's start if it is not running.
    Forward {
        /// Conversation id.
        conv: ConvId,
        /// The send.
        request: SendRequest,
        /// Where the outcome goes.
        reply: Answer,
    },
}

impl ractor::Message for ConversationsMsg {}

/// Supervises every conversation actor of this node.
pub struct ConversationSupervisor;

/// Arguments of the conversation supervisor.
pub struct ConversationSupervisorArgs {
    /// Shared by every conversation.
    pub ctx: Arc<ConversationContext>,
    /// Restart intensity for the family.
    pub intensity: RestartIntensity,
    directory: Directory,
}

/// The supervisor's state.
pub struct ConversationSupervisorState {
    ctx: Arc<ConversationContext>,
    directory: Directory,
    children: HashMap<ActorId, ConvId>,
    /// Conversations being started, with who waits for each.
    starting: HashMap<ConvId, Vec<StartReply>>,
    /// Forwarded sends waiting for their conversation's start, in arrival order.
    forwards: HashMap<ConvId, Vec<(SendRequest, Answer)>>,
    budget: RestartBudget,
    intensity: RestartIntensity,
}

impl ConversationSupervisorState {
    fn live(&self, conv: &str) -> Option<ActorRef<ConversationMsg>> {
        let dir = self.directory.read().expect("directory lock");
        dir.get(conv).filter(|a| is_live(a.get_status())).cloned()
    }

    /// Start `conv`'s actor unless a start is under way; `waiter` (if any) gets the outcome.
    fn start(
        &mut self,
        myself: &ActorRef<ConversationsMsg>,
        conv: &str,
        waiter: Option<StartReply>,
    ) {
        if let Some(waiters) = self.starting.get_mut(conv) {
            waiters.extend(waiter);
            return;
        }
        self.starting
            .insert(conv.to_owned(), waiter.into_iter().collect());
        let args = ConversationArgs {
            id: conv.to_owned(),
            ctx: self.ctx.clone(),
        };
        let (myself, conv) = (myself.clone(), conv.to_owned());
        tokio::spawn(async move {
            let result = Actor::spawn_linked(None, ConversationActor, args, myself.get_cell())
                .await
                .map(|(actor, _)| actor)
                .map_err(start_error);
            let _ = myself.send_message(ConversationsMsg::Started { conv, result });
        });
    }

    /// Record the outcome of a start and answer everyone waiting for it.
    fn started(&mut self, conv: ConvId, result: Result<ActorRef<ConversationMsg>, ProtocolError>) {
        match &result {
            Ok(actor) if is_live(actor.get_status()) => {
                self.children.insert(actor.get_id(), conv.clone());
                self.directory
                    .write()
                    .expect("directory lock")
                    .insert(conv.clone(), actor.clone());
            }
            // Gone already (it failed at once): its waiters resubmit, which starts it afresh.
            Ok(_) => {}
            Err(_) => {
                self.directory
                    .write()
                    .expect("directory lock")
                    .remove(&conv);
            }
        }
        let forwards = self.forwards.remove(&conv).unwrap_or_default();
        for (request, reply) in forwards {
            match &result {
                // A failed send drops the reply: the sender's node resubmits.
                Ok(actor) => {
                    let _ = actor.send_message(ConversationMsg::Send { request, reply });
                }
                Err(e) => reply.send(Err(e.clone().for_msg(Some(&request.msg_id)))),
            }
        }
        let waiters = self.starting.remove(&conv).unwrap_or_default();
        if let (Err(e), true) = (&result, waiters.is_empty()) {
            warn!(conv_id = %conv, error = %e.message, "restart deferred until next use");
        }
        for waiter in waiters {
            let _ = waiter.send(result.clone());
        }
    }

    fn forget(&mut self, actor: ActorId) -> Option<ConvId> {
        let conv = self.children.remove(&actor)?;
        let mut dir = self.directory.write().expect("directory lock");
        if dir.get(&conv).is_some_and(|a| a.get_id() == actor) {
            dir.remove(&conv);
        }
        Some(conv)
    }
}

fn is_live(status: ActorStatus) -> bool {
    matches!(
        status,
        ActorStatus::Starting | ActorStatus::Running | ActorStatus::Upgrading
    )
}

fn start_error(e: SpawnErr) -> ProtocolError {
    if let SpawnErr::StartupFailed(inner) = &e {
        match inner.downcast_ref::<StartError>() {
            Some(StartError::NotFound) => {
                return ProtocolError::new(ErrorCode::UnknownConversation, "no such conversation")
            }
            Some(StartError::Store(s)) => return crate::conversation::store_error(s.clone()),
            None => {}
        }
    }
    error!(error = %e, "conversation actor failed to start");
    ProtocolError::new(ErrorCode::Internal, "conversation could not start")
}

impl Actor for ConversationSupervisor {
    type Msg = ConversationsMsg;
    type State = ConversationSupervisorState;
    type Arguments = ConversationSupervisorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(ConversationSupervisorState {
            ctx: args.ctx,
            directory: args.directory,
            children: HashMap::new(),
            starting: HashMap::new(),
            forwards: HashMap::new(),
            budget: RestartBudget::new(args.intensity),
            intensity: args.intensity,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ConversationsMsg::Start { conv, reply } => match state.live(&conv) {
                Some(actor) => {
                    let _ = reply.send(Ok(actor));
                }
                None => state.start(&myself, &conv, Some(reply)),
            },
            ConversationsMsg::Started { conv, result } => state.started(conv, result),
            ConversationsMsg::Forward {
                conv,
                request,
                reply,
            } => match state.live(&conv) {
                Some(actor) => {
                    let _ = actor.send_message(ConversationMsg::Send { request, reply });
                }
                None => {
                    state
                        .forwards
                        .entry(conv.clone())
                        .or_default()
                        .push((request, reply));
                    state.start(&myself, &conv, None);
                }
            },
            ConversationsMsg::Idle { conv, actor } => {
                let current = state
                    .directory
                    .read()
                    .expect("directory lock")
                    .get(&conv)
                    .cloned();
                if let Some(current) = current.filter(|a| a.get_id() == actor) {
                    state
                        .directory
                        .write()
                        .expect("directory lock")
                        .remove(&conv);
                    // Drain: the actor finishes what is already in its mailbox, then stops. A send that
                    // arrives after the marker is refused and resubmitted to a fresh actor.
                    let _ = current.drain();
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                state.forget(cell.get_id());
            }
            SupervisionEvent::ActorFailed(cell, err) => {
                let was_current = {
                    let dir = state.directory.read().expect("directory lock");
                    state
                        .children
                        .get(&cell.get_id())
                        .is_some_and(|c| dir.get(c).is_some_and(|a| a.get_id() == cell.get_id()))
                };
                let Some(conv) = state.forget(cell.get_id()) else {
                    return Ok(());
                };
                error!(conv_id = %conv, error = %err, "conversation actor failed");
                metrics::counter!("switchboard_actor_restarts_total", "family" => "conversation")
                    .increment(1);
                match state.budget.on_failure(Instant::now()) {
                    Decision::Escalate => {
                        return Err(Escalation::new("conversation", state.intensity).into())
                    }
                    Decision::Restart if was_current => {
                        info!(conv_id = %conv, "restarting conversation actor");
                        state.start(&myself, &conv, None);
                    }
                    Decision::Restart => {}
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// The edge's handle on the conversation family: cheap to clone.
#[derive(Clone)]
pub struct Conversations {
    directory: Directory,
    supervisor: ActorRef<ConversationsMsg>,
    reply_timeout: Duration,
    cluster: Option<SharedCluster>,
}

impl Conversations {
    /// Spawn the conversation supervisor linked to `parent` and return the handle.
    pub async fn start(
        ctx: Arc<ConversationContext>,
        intensity: RestartIntensity,
        reply_timeout: Duration,
        parent: ractor::ActorCell,
    ) -> Result<Self, SpawnErr> {
        let cluster = ctx.cluster.clone();
        let directory = Directory::default();
        let args = ConversationSupervisorArgs {
            ctx,
            intensity,
            directory: directory.clone(),
        };
        let (supervisor, _) =
            Actor::spawn_linked(None, ConversationSupervisor, args, parent).await?;
        Ok(Self {
            directory,
            supervisor,
            reply_timeout,
            cluster,
        })
    }

    /// The node that owns `conv`, when it is another one.
    fn remote_owner(&self, conv: &str) -> Option<(&SharedCluster, crate::cluster::NodeName)> {
        let cluster = self.cluster.as_ref()?;
        cluster.owner(conv).map(|node| (cluster, node))
    }

    /// The running actor of `conv`, started on demand.
    pub async fn actor(&self, conv: &str) -> Result<ActorRef<ConversationMsg>, ProtocolError> {
        let known = self
            .directory
            .read()
            .expect("directory lock")
            .get(conv)
            .cloned();
        if let Some(actor) = known.filter(|a| is_live(a.get_status())) {
            return Ok(actor);
        }
        let answer = self
            .supervisor
            .call(
                |reply| ConversationsMsg::Start {
                    conv: conv.to_owned(),
                    reply,
                },
                Some(self.reply_timeout),
            )
            .await;
        match answer {
            Ok(CallResult::Success(result)) => result,
            _ => Err(ProtocolError::new(
                ErrorCode::Internal,
                "conversation supervisor unavailable",
            )),
        }
    }

    /// Hand a send to its conversation. The send is queued in order when this returns; await the outcome
    /// with [`PendingReply::wait`].
    pub async fn submit(
        &self,
        conv: &str,
        request: SendRequest,
    ) -> Result<PendingReply, ProtocolError> {
        let rx = self.enqueue(conv, &request).await?;
        Ok(PendingReply {
            conversations: self.clone(),
            conv: conv.to_owned(),
            request,
            rx,
        })
    }

    async fn enqueue(&self, conv: &str, request: &SendRequest) -> Result<Reply, ProtocolError> {
        let unavailable = || {
            ProtocolError::new(ErrorCode::Internal, "conversation unavailable")
                .for_msg(Some(&request.msg_id))
        };
        let give_up = tokio::time::Instant::now() + ROUTE_PATIENCE;
        let mut local_tries = 0;
        loop {
            if let Some((cluster, node)) = self.remote_owner(conv) {
                let origin = request.origin.as_ref().and_then(Origin::here);
                let forwarded = cluster.forward_send(
                    &node,
                    conv,
                    &request.from,
                    &request.msg_id,
                    &request.body,
                    origin,
                );
                match forwarded {
                    Ok(reply) => return Ok(Reply::Remote(reply)),
                    // The owner's link is down: wait for the cluster to place the conversation elsewhere.
                    Err(Lost) if tokio::time::Instant::now() < give_up => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    Err(Lost) => return Err(unavailable()),
                }
            }
            let actor = self.actor(conv).await?;
            let (tx, rx) = oneshot();
            match actor.send_message(ConversationMsg::Send {
                request: request.clone(),
                reply: Answer::Port(tx.into()),
            }) {
                Ok(()) => return Ok(Reply::Local(rx)),
                // Stopped or draining between lookup and send: look again.
                Err(_) if local_tries + 1 < RESUBMITS => {
                    local_tries += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(_) => return Err(unavailable()),
            }
        }
    }

    /// Queue a send that another node forwarded to this one, the conversation's owner. Synchronous and in
    /// order: the supervisor queues it behind the conversation's start if the actor is not running.
    pub fn forward_here(&self, conv: ConvId, request: SendRequest, reply: Answer) {
        let _ = self.supervisor.send_message(ConversationsMsg::Forward {
            conv,
            request,
            reply,
        });
    }

    /// Resolves once this node's session changes so far have reached `conv`'s owner, so that what it commits
    /// from now on reaches this node's connections (a `sync` waits for it before reading history).
    pub async fn barrier(&self, conv: &str) {
        if let Some((cluster, node)) = self.remote_owner(conv) {
            // A lost owner re-homes the conversation; its new owner reloads and sees our sessions afresh.
            let _ = cluster.barrier(&node).await;
        }
    }

    /// Pass a best-effort signal (typing, a receipt) to `conv`'s actor, wherever it runs. Nothing answers;
    /// a signal for a conversation that cannot be reached is dropped.
    pub async fn signal(&self, conv: &str, signal: Signal) {
        match self.remote_owner(conv) {
            Some((cluster, node)) => {
                let _ = cluster.forward_signal(&node, conv, &signal);
            }
            None => self.signal_here(conv, signal).await,
        }
    }

    /// Pass a signal to this node's actor of `conv` (another node routed it here).
    pub async fn signal_here(&self, conv: &str, signal: Signal) {
        if let Ok(actor) = self.actor(conv).await {
            let _ = actor.send_message(ConversationMsg::Signal { signal });
        }
    }

    /// Drain every running conversation actor for which `keep` says no (placement moved it to another
    /// node); returns how many. Their queued sends are resubmitted by their senders to the new owner.
    pub fn release(&self, keep: impl Fn(&str) -> bool) -> usize {
        let moved: Vec<(ConvId, ActorId)> = self
            .directory
            .read()
            .expect("directory lock")
            .iter()
            .filter(|(conv, _)| !keep(conv))
            .map(|(conv, actor)| (conv.clone(), actor.get_id()))
            .collect();
        for (conv, actor) in &moved {
            let _ = self.supervisor.send_message(ConversationsMsg::Idle {
                conv: conv.clone(),
                actor: *actor,
            });
        }
        moved.len()
    }

    /// Send and wait for the outcome (REST and bots).
    pub async fn send(&self, conv: &str, request: SendRequest) -> SendResult {
        self.submit(conv, request).await?.wait().await
    }

    /// Add, remove or change the role of a member through the conversation's single writer, wherever it
    /// runs. `by` is the user asking, whose role the actor checks; `None` is the server itself (a
    /// behaviour's [`crate::behaviour::Api`]), which may make any change.
    pub async fn change_member(
        &self,
        conv: &str,
        user: UserId,
        change: MemberChange,
        by: Option<&str>,
    ) -> Result<bool, ProtocolError> {
        match self.remote_owner(conv) {
            Some((cluster, node)) => cluster
                .forward_member(&node, conv, &user, change, by)
                .await
                .unwrap_or_else(|Lost| Err(owner_unreachable())),
            None => {
                self.change_member_here(conv, user, change, by.map(str::to_owned))
                    .await
            }
        }
    }

    /// Change a member through this node's actor of `conv` (another node routed the change here).
    pub async fn change_member_here(
        &self,
        conv: &str,
        user: UserId,
        change: MemberChange,
        by: Option<UserId>,
    ) -> Result<bool, ProtocolError> {
        let actor = self.actor(conv).await?;
        self.ask(&actor, |reply| ConversationMsg::ChangeMember {
            user,
            change,
            by,
            reply,
        })
        .await?
    }

    /// Wait until every running conversation has made its accepted sends durable and acknowledged them.
    pub async fn flush_all(&self) {
        let actors: Vec<_> = self
            .directory
            .read()
            .expect("directory lock")
            .values()
            .cloned()
            .collect();
        let waits = actors
            .iter()
            .map(|a| self.ask(a, |reply| ConversationMsg::Flush { reply }));
        futures_util::future::join_all(waits).await;
    }

    /// Number of running conversation actors.
    pub fn running(&self) -> usize {
        self.directory.read().expect("directory lock").len()
    }

    /// The ids of the conversations whose actors run here (the operator's page lists them).
    pub fn hosted(&self) -> Vec<ConvId> {
        self.directory
            .read()
            .expect("directory lock")
            .keys()
            .cloned()
            .collect()
    }

    /// Fault injection: make the conversation's actor panic. `false` if it was not running.
    pub fn crash(&self, conv: &str) -> bool {
        let actor = self
            .directory
            .read()
            .expect("directory lock")
            .get(conv)
            .cloned();
        actor.is_some_and(|a| a.send_message(ConversationMsg::Crash).is_ok())
    }

    /// The id of the actor currently serving `conv`, if it runs (tests use it to observe restarts).
    pub fn actor_id(&self, conv: &str) -> Option<ActorId> {
        self.directory
            .read()
            .expect("directory lock")
            .get(conv)
            .map(|a| a.get_id())
    }

    async fn ask<T: Send + 'static>(
        &self,
        actor: &ActorRef<ConversationMsg>,
        msg: impl FnOnce(RpcReplyPort<T>) -> ConversationMsg,
    ) -> Result<T, ProtocolError> {
        match actor.call(msg, Some(self.reply_timeout)).await {
            Ok(CallResult::Success(v)) => Ok(v),
            Ok(CallResult::Timeout) => {
                Err(ProtocolError::new(ErrorCode::StoreUnavailable, "timed out"))
            }
            _ => Err(ProtocolError::new(
                ErrorCode::Internal,
                "conversation unavailable",
            )),
        }
    }
}

fn owner_unreachable() -> ProtocolError {
    ProtocolError::new(
        ErrorCode::Internal,
        "the conversation's node did not answer; retry",
    )
}

/// Where a queued send's answer comes from: this node's actor, or the owner on another node.
enum Reply {
    Local(ractor::concurrency::OneshotReceiver<SendResult>),
    Remote(RemoteReply),
}

impl Future for Reply {
    type Output = Result<SendResult, Lost>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Reply::Local(rx) => Pin::new(rx).poll(cx).map(|r| r.map_err(|_dropped| Lost)),
            Reply::Remote(reply) => reply.as_mut().poll(cx),
        }
    }
}

/// A send queued in its conversation, not yet answered.
pub struct PendingReply {
    conversations: Conversations,
    conv: ConvId,
    request: SendRequest,
    rx: Reply,
}

impl PendingReply {
    /// The outcome. If the actor went away without answering, the send is resubmitted (dedupe makes a
    /// send that did reach the store come back with its original seq).
    pub async fn wait(mut self) -> Result<Message, ProtocolError> {
        let timeout = self.conversations.reply_timeout;
        for attempt in 0..=RESUBMITS {
            match tokio::time::timeout(timeout, &mut self.rx).await {
                Ok(Ok(result)) => return result,
                Ok(Err(Lost)) if attempt < RESUBMITS => {
                    self.rx = self
                        .conversations
                        .enqueue(&self.conv, &self.request)
                        .await
                        .map_err(|e| e.for_msg(Some(&self.request.msg_id)))?;
                }
                Ok(Err(Lost)) => break,
                Err(_elapsed) => {
                    return Err(ProtocolError::new(
                        ErrorCode::StoreUnavailable,
                        "the write was not confirmed in time; retry with the same msg_id",
                    )
                    .for_msg(Some(&self.request.msg_id)))
                }
            }
        }
        Err(
            ProtocolError::new(ErrorCode::Internal, "conversation unavailable")
                .for_msg(Some(&self.request.msg_id)),
        )
    }
}
