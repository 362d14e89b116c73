//! Behaviours: your own logic inside the actors, without forking Switchboard (`docs/extending.md`).
//!
//! A [`Behaviour`] is a set of typed, async hooks, each with a no-op default. They run where the work they
//! watch runs, so a behaviour acts the same on one node and in a cluster:
//!
//! | Hook | Runs in | Can |
//! |---|---|---|
//! | [`on_connect`](Behaviour::on_connect) | the edge of the node the client connects to, before the `101` | accept, reject (an HTTP status), attach data |
//! | [`on_disconnect`](Behaviour::on_disconnect) | a task of its own when a connection ends, on that node | observe (sees the attached data) |
//! | [`on_join`](Behaviour::on_join) | the conversation's actor (on its owner), before the member is stored; for the members listed at creation, the creating node, before the conversation is stored | accept or reject |
//! | [`on_leave`](Behaviour::on_leave) | a task of its own after a member is removed, on the owner | observe |
//! | [`on_message`](Behaviour::on_message) | the conversation's actor (on its owner), before the store write | accept, reject with an error code, rewrite the body |
//! | [`on_stored`](Behaviour::on_stored) | one task per conversation, in seq order, after the batch is acked and fanned out | side effects ([`Api::send`] included) |
//! | [`on_deliver`](Behaviour::on_deliver) | the write job, per recipient, when some behaviour [filters](Behaviour::filters_delivery) | deliver, skip or redact |
//! | [`on_presence`](Behaviour::on_presence) | a task of its own on every node that tells the change | observe |
//!
//! Several behaviours compose in registration order ([`Behaviours`]): the first rejection wins, a rewrite is
//! what the next behaviour sees. Each call is guarded: a hook that panics or outlives its [`Budgets`]
//! entry is contained — the action it was deciding fails with `behaviour_failed`, the actor keeps running,
//! and the failure is counted in `switchboard_behaviour_failures_total{hook,kind}` and logged (by behaviour
//! name, never with a message body). A node with no behaviour holds no [`Behaviours`] at all: every hook
//! site is one `Option` check.

use std::any::{Any, TypeId};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::FutureExt;
use tracing::warn;

use crate::cluster::{MemberChange, Outgoing, SharedCluster};
use crate::conversation::{SendRequest, SendResult};
use crate::conversations::Conversations;
use crate::protocol::{self, ErrorCode, ProtocolError, ServerFrame};
use crate::session::{ConnId, SessionDirectory};
use crate::store::{ConvId, UserId};

/// A stored message, as `on_stored` and `on_deliver` see it.
pub use crate::store::Message;

pub(crate) mod screen;

/// The hooks, as metrics and logs name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    /// [`Behaviour::on_connect`].
    Connect,
    /// [`Behaviour::on_disconnect`].
    Disconnect,
    /// [`Behaviour::on_join`].
    Join,
    /// [`Behaviour::on_leave`].
    Leave,
    /// [`Behaviour::on_message`].
    Message,
    /// [`Behaviour::on_stored`].
    Stored,
    /// [`Behaviour::on_deliver`].
    Deliver,
    /// [`Behaviour::on_presence`].
    Presence,
}

impl Hook {
    /// The `hook` label of `switchboard_behaviour_failures_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "on_connect",
            Self::Disconnect => "on_disconnect",
            Self::Join => "on_join",
            Self::Leave => "on_leave",
            Self::Message => "on_message",
            Self::Stored => "on_stored",
            Self::Deliver => "on_deliver",
            Self::Presence => "on_presence",
        }
    }
}

/// Why a hook's call did not give an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The hook panicked.
    Panicked,
    /// The hook outlived its budget (its future was dropped).
    TimedOut,
}

impl Failure {
    /// The `kind` label of `switchboard_behaviour_failures_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Panicked => "panic",
            Self::TimedOut => "timeout",
        }
    }
}

/// Why a behaviour refused something; the client gets it as an `error` (or, for a connect, as the HTTP
/// answer to its upgrade: the code's status, `403` for [`ErrorCode::Rejected`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The code the client sees: [`ErrorCode::Rejected`] unless the behaviour picks another (say
    /// [`ErrorCode::RateLimited`] for a spam filter).
    pub code: ErrorCode,
    /// Shown to the client: say why, never echo the body.
    pub reason: String,
    /// For [`ErrorCode::RateLimited`]: when to retry.
    pub retry_after_ms: Option<u64>,
}

impl Rejection {
    /// A rejection with code `rejected`.
    pub fn new(reason: impl Into<String>) -> Self {
        Self::with_code(ErrorCode::Rejected, reason)
    }

    /// A rejection with another code.
    pub fn with_code(code: ErrorCode, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
            retry_after_ms: None,
        }
    }

    /// The client's error.
    pub fn into_error(self) -> ProtocolError {
        let mut e = ProtocolError::new(self.code, self.reason);
        e.retry_after_ms = self.retry_after_ms;
        e
    }
}

/// The answer of [`Behaviour::on_connect`] and [`Behaviour::on_join`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Go ahead.
    Accept,
    /// Refuse.
    Reject(Rejection),
}

/// The answer of [`Behaviour::on_message`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageVerdict {
    /// Store the message as it is.
    Accept,
    /// Store this body instead (the next behaviour sees it).
    Rewrite(String),
    /// Do not store it; the sender gets this error.
    Reject(Rejection),
}

/// The answer of [`Behaviour::on_deliver`] for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Deliver the message as stored.
    Deliver,
    /// Do not deliver it live to this recipient.
    Skip,
    /// Deliver it to this recipient with this body.
    Redact(String),
}

/// Data behaviours attach to a connection in [`Behaviour::on_connect`], one value per type.
#[derive(Default)]
pub struct Attachments(HashMap<TypeId, Box<dyn Any + Send + Sync>>);

impl Attachments {
    /// Attach `value`, replacing an earlier value of its type.
    pub fn insert<T: Any + Send + Sync>(&mut self, value: T) {
        self.0.insert(TypeId::of::<T>(), Box::new(value));
    }

    /// The attached value of type `T`.
    pub fn get<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.0.get(&TypeId::of::<T>())?.downcast_ref()
    }

    /// Whether nothing is attached.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Attachments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Attachments({} values)", self.0.len())
    }
}

/// A client asking to connect (token already verified).
#[derive(Debug)]
pub struct Connecting {
    /// The authenticated user.
    pub user: UserId,
    /// The client's address, when the edge knows it.
    pub peer: Option<SocketAddr>,
    /// What the connection will carry (see [`Behaviour::on_disconnect`]).
    pub attachments: Attachments,
}

/// A connection that ended.
#[derive(Debug)]
pub struct Disconnected {
    /// Its user.
    pub user: UserId,
    /// Its id on this node.
    pub conn: ConnId,
    /// The client's address, when the edge knew it.
    pub peer: Option<SocketAddr>,
    /// What [`Behaviour::on_connect`] attached.
    pub attachments: Attachments,
}

/// A message on its way to the store.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    /// The conversation.
    pub conv: &'a str,
    /// The sender (authenticated, a member).
    pub from: &'a str,
    /// The sender's id for the message.
    pub msg_id: &'a str,
    /// The body, as the previous behaviour left it.
    pub body: &'a str,
}

/// Runs the behaviours' `on_disconnect` for a connection when dropped (with the connection's link, however
/// the connection ends).
pub struct Farewell(Option<(Arc<Behaviours>, Disconnected)>);

impl Farewell {
    /// `conn`'s farewell.
    pub fn new(behaviours: Arc<Behaviours>, conn: Disconnected) -> Self {
        Self(Some((behaviours, conn)))
    }
}

impl Drop for Farewell {
    fn drop(&mut self) {
        if let Some((behaviours, conn)) = self.0.take() {
            behaviours.disconnected(conn);
        }
    }
}

/// A member added to or removed from a group.
#[derive(Debug, Clone)]
pub struct MemberEvent {
    /// The conversation.
    pub conv: ConvId,
    /// The member.
    pub user: UserId,
}

/// A presence change as this node tells it.
#[derive(Debug, Clone)]
pub struct PresenceChange {
    /// The user.
    pub user: UserId,
    /// Online (some device connected somewhere) or offline (none for the grace period).
    pub online: bool,
    /// For online, now; for offline, when the last device went (ms since the Unix epoch).
    pub last_seen: u64,
}

/// Your logic inside the actors. Every hook has a no-op default; implement the ones you need.
///
/// Hooks must not block their thread: await I/O, and move CPU-heavy work to
/// `tokio::task::spawn_blocking`. A budget bounds waiting, not a thread held by a blocking call.
///
/// ```
/// use switchboard_actors::behaviour::{Behaviour, Incoming, MessageVerdict, Rejection};
///
/// /// Refuses messages that shout.
/// struct NoShouting;
///
/// #[switchboard_actors::behaviour::async_trait]
/// impl Behaviour for NoShouting {
///     async fn on_message(&self, msg: &Incoming<'_>) -> MessageVerdict {
///         let letters = msg.body.chars().filter(|c| c.is_alphabetic());
///         if msg.body.len() > 8 && letters.clone().all(char::is_uppercase) {
///             MessageVerdict::Reject(Rejection::new("no shouting"))
///         } else {
///             MessageVerdict::Accept
///         }
///     }
/// }
/// ```
#[async_trait]
#[allow(unused_variables)]
pub trait Behaviour: Send + Sync + 'static {
    /// The name logs use.
    fn name(&self) -> &str {
        std::any::type_name::<Self>()
    }

    /// This behaviour's budget for `hook`, when it needs another than the node's [`Budgets`] (an HTTP call
    /// with its own timeout, say). `None`: the node's.
    fn budget(&self, hook: Hook) -> Option<Duration> {
        None
    }

    /// Called once when the node is up, with a handle for acting on its own (a bot sending messages).
    fn started(&self, api: &Api) {}

    /// A client with a valid token asks to connect. Reject it, or attach data to the connection.
    async fn on_connect(&self, conn: &mut Connecting) -> Verdict {
        Verdict::Accept
    }

    /// A connection ended (for whatever reason), with what was attached to it.
    async fn on_disconnect(&self, conn: &Disconnected) {}

    /// `event.user` is about to be added to a group: reject to refuse the change.
    async fn on_join(&self, event: &MemberEvent) -> Verdict {
        Verdict::Accept
    }

    /// `event.user` was removed from a group.
    async fn on_leave(&self, event: &MemberEvent) {}

    /// A member sends a message. Runs in the conversation's actor before the store write, so it holds for
    /// every send (WebSocket or REST, from any node); the message's seq is assigned after it.
    async fn on_message(&self, msg: &Incoming<'_>) -> MessageVerdict {
        MessageVerdict::Accept
    }

    /// A message was stored (new, not a resend): once per message, in seq order per conversation, after its
    /// sender was acked and the members got it.
    async fn on_stored(&self, msg: &Message) {}

    /// Whether [`on_deliver`](Behaviour::on_deliver) is to be called. Only when some behaviour says so does a
    /// message cost a decision (and possibly an encoding) per member; otherwise the members share one frame.
    fn filters_delivery(&self) -> bool {
        false
    }

    /// Deliver `msg` to member `to`, skip it, or redact it: live, in `sync` replays and in REST history
    /// alike, so what a filter hides cannot be read back from the store. Synchronous and on the hot path:
    /// decide from what is in memory. Does not apply to the sender's own connection (it gets the `ack`).
    fn on_deliver(&self, msg: &Message, to: &str) -> Delivery {
        Delivery::Deliver
    }

    /// A user came online or went offline, as this node tells its clients (every node tells it).
    async fn on_presence(&self, change: &PresenceChange) {}
}

/// Re-exported so that behaviours need no dependency of their own to implement [`Behaviour`].
pub use async_trait::async_trait;

/// Time budgets of the hooks (per behaviour and call), unless a behaviour sets its own.
#[derive(Debug, Clone, Copy)]
pub struct Budgets {
    /// [`Behaviour::on_message`]: a send waits for it. Default 50 ms.
    pub message: Duration,
    /// [`Behaviour::on_connect`] and [`Behaviour::on_join`]. Default 1 s.
    pub decision: Duration,
    /// The hooks off the hot path (stored, disconnect, leave, presence). Default 5 s.
    pub background: Duration,
}

impl Default for Budgets {
    fn default() -> Self {
        Self {
            message: Duration::from_millis(50),
            decision: Duration::from_secs(1),
            background: Duration::from_secs(5),
        }
    }
}

impl Budgets {
    fn of(&self, hook: Hook) -> Duration {
        match hook {
            Hook::Message | Hook::Deliver => self.message,
            Hook::Connect | Hook::Join => self.decision,
            Hook::Disconnect | Hook::Leave | Hook::Stored | Hook::Presence => self.background,
        }
    }
}

/// What a behaviour may do on its own (see [`Behaviour::started`]): cheap to clone.
#[derive(Clone)]
pub struct Api {
    conversations: Conversations,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Api")
    }
}

impl Api {
    /// A handle over the node's conversations.
    pub fn new(conversations: Conversations) -> Self {
        Self { conversations }
    }

    /// Send `body` to `conv` as member `from`, as a client would (through every behaviour's `on_message`;
    /// a resend with the same `msg_id` is deduplicated). Answers with the stored message.
    pub async fn send(&self, conv: &str, from: &str, msg_id: &str, body: &str) -> SendResult {
        let request = SendRequest {
            from: from.to_owned(),
            msg_id: msg_id.to_owned(),
            body: body.to_owned(),
            origin: None,
        };
        self.conversations.send(conv, request).await
    }

    /// Add `user` to the group `conv` (through every behaviour's `on_join`).
    pub async fn add_member(&self, conv: &str, user: &str) -> Result<bool, ProtocolError> {
        self.conversations
            .change_member(conv, user.to_owned(), MemberChange::Add, None)
            .await
    }
}

/// The node's behaviours, in registration order, with their budgets.
pub struct Behaviours {
    list: Vec<Arc<dyn Behaviour>>,
    budgets: Budgets,
    filters: bool,
    api: OnceLock<Api>,
}

impl std::fmt::Debug for Behaviours {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.list.iter().map(|b| b.name()).collect();
        f.debug_struct("Behaviours")
            .field("list", &names)
            .field("budgets", &self.budgets)
            .finish()
    }
}

/// An observing hook (one that decides nothing) of one behaviour, as a function of the event.
type Observer<E> =
    for<'a> fn(&'a dyn Behaviour, &'a E) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Run one hook call under its budget, catching a panic; count and log a failure.
async fn guarded<T>(
    behaviour: &dyn Behaviour,
    hook: Hook,
    budget: Duration,
    call: impl Future<Output = T>,
) -> Result<T, Failure> {
    let outcome = match tokio::time::timeout(budget, AssertUnwindSafe(call).catch_unwind()).await {
        Ok(Ok(value)) => return Ok(value),
        Ok(Err(_)) => Failure::Panicked,
        Err(_) => Failure::TimedOut,
    };
    failed(behaviour, hook, outcome);
    Err(outcome)
}

fn failed(behaviour: &dyn Behaviour, hook: Hook, kind: Failure) {
    metrics::counter!(
        "switchboard_behaviour_failures_total",
        "hook" => hook.as_str(),
        "kind" => kind.as_str()
    )
    .increment(1);
    warn!(
        behaviour = behaviour.name(),
        hook = hook.as_str(),
        kind = kind.as_str(),
        "behaviour failed"
    );
}

/// The client's error when a behaviour failed while deciding.
pub fn failed_error(hook: Hook) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::BehaviourFailed,
        format!(
            "a server extension failed in {}; retry later",
            hook.as_str()
        ),
    )
}

impl Behaviours {
    /// `list` in registration order; `None` when it is empty (a node with no behaviour pays nothing).
    pub fn new(list: Vec<Arc<dyn Behaviour>>, budgets: Budgets) -> Option<Arc<Self>> {
        if list.is_empty() {
            return None;
        }
        Some(Arc::new(Self {
            filters: list.iter().any(|b| b.filters_delivery()),
            list,
            budgets,
            api: OnceLock::new(),
        }))
    }

    /// The registered behaviours, in order.
    pub fn list(&self) -> &[Arc<dyn Behaviour>] {
        &self.list
    }

    fn budget(&self, behaviour: &dyn Behaviour, hook: Hook) -> Duration {
        behaviour
            .budget(hook)
            .unwrap_or_else(|| self.budgets.of(hook))
    }

    /// Give every behaviour the node's [`Api`] (once; later calls are ignored).
    pub fn start(&self, api: Api) {
        if self.api.set(api).is_ok() {
            let api = self.api.get().expect("just set");
            for b in &self.list {
                let b = b.clone();
                if std::panic::catch_unwind(AssertUnwindSafe(|| b.started(api))).is_err() {
                    failed(&*b, Hook::Connect, Failure::Panicked);
                }
            }
        }
    }

    /// Run every `on_connect` in order: the attachments, or the first refusal.
    pub async fn connect(
        &self,
        user: &str,
        peer: Option<SocketAddr>,
    ) -> Result<Attachments, ProtocolError> {
        let mut conn = Connecting {
            user: user.to_owned(),
            peer,
            attachments: Attachments::default(),
        };
        for b in &self.list {
            let budget = self.budget(&**b, Hook::Connect);
            match guarded(&**b, Hook::Connect, budget, b.on_connect(&mut conn)).await {
                Ok(Verdict::Accept) => {}
                Ok(Verdict::Reject(r)) => return Err(r.into_error()),
                Err(_) => return Err(failed_error(Hook::Connect)),
            }
        }
        Ok(conn.attachments)
    }

    /// Run every `on_join` in order: the first refusal, if any.
    pub(crate) async fn join(&self, event: &MemberEvent) -> Result<(), ProtocolError> {
        for b in &self.list {
            let budget = self.budget(&**b, Hook::Join);
            match guarded(&**b, Hook::Join, budget, b.on_join(event)).await {
                Ok(Verdict::Accept) => {}
                Ok(Verdict::Reject(r)) => return Err(r.into_error()),
                Err(_) => return Err(failed_error(Hook::Join)),
            }
        }
        Ok(())
    }

    /// A conversation is being created with `members` (the creator among them): run every `on_join` for
    /// each, in order, before anything is stored; the first refusal refuses the creation. Runs on the node
    /// that creates it (there is no actor yet).
    pub async fn creating(&self, conv: &str, members: &[UserId]) -> Result<(), ProtocolError> {
        for user in members {
            let event = MemberEvent {
                conv: conv.to_owned(),
                user: user.clone(),
            };
            self.join(&event).await?;
        }
        Ok(())
    }

    /// Run every `on_message` in order: `Ok(Some(body))` when some behaviour rewrote the body, or the
    /// error for the sender.
    pub(crate) async fn message(
        &self,
        msg: &Incoming<'_>,
    ) -> Result<Option<String>, ProtocolError> {
        let mut rewritten: Option<String> = None;
        for b in &self.list {
            let now = Incoming {
                body: rewritten.as_deref().unwrap_or(msg.body),
                ..*msg
            };
            let budget = self.budget(&**b, Hook::Message);
            match guarded(&**b, Hook::Message, budget, b.on_message(&now)).await {
                Ok(MessageVerdict::Accept) => {}
                Ok(MessageVerdict::Rewrite(body)) => rewritten = Some(body),
                Ok(MessageVerdict::Reject(r)) => {
                    return Err(r.into_error().for_msg(Some(msg.msg_id)))
                }
                Err(_) => return Err(failed_error(Hook::Message).for_msg(Some(msg.msg_id))),
            }
        }
        Ok(rewritten)
    }

    /// Run every `on_stored` for one message, in order; failures are counted and the next behaviour runs.
    pub(crate) async fn stored(&self, msg: &Message) {
        self.observe(Hook::Stored, msg, |b, m| b.on_stored(m)).await;
    }

    /// A connection ended: run every `on_disconnect` in a task of its own.
    pub fn disconnected(self: &Arc<Self>, conn: Disconnected) {
        self.in_background(Hook::Disconnect, conn, |b, c| b.on_disconnect(c));
    }

    /// A member left: run every `on_leave` in a task of its own.
    pub(crate) fn left(self: &Arc<Self>, event: MemberEvent) {
        self.in_background(Hook::Leave, event, |b, e| b.on_leave(e));
    }

    /// A presence change: run every `on_presence` in a task of its own.
    pub(crate) fn presence(self: &Arc<Self>, change: PresenceChange) {
        self.in_background(Hook::Presence, change, |b, c| b.on_presence(c));
    }

    /// Run an observing hook of every behaviour on `event`, in order, each guarded.
    async fn observe<E: Sync + ?Sized>(&self, hook: Hook, event: &E, call: Observer<E>) {
        for b in &self.list {
            let budget = self.budget(&**b, hook);
            let _ = guarded(&**b, hook, budget, call(&**b, event)).await;
        }
    }

    /// [`Behaviours::observe`] in a task of its own.
    fn in_background<E: Send + Sync + 'static>(
        self: &Arc<Self>,
        hook: Hook,
        event: E,
        call: Observer<E>,
    ) {
        let this = self.clone();
        background(async move { this.observe(hook, &event, call).await });
    }

    /// Whether some behaviour filters live delivery per recipient.
    pub fn filters_delivery(&self) -> bool {
        self.filters
    }

    /// `messages` (a `sync` replay or a history page) as `to` may see them: skipped ones left out, redacted
    /// ones with their new body; the order is kept.
    pub fn replay(&self, messages: Vec<Message>, to: &str) -> Vec<Message> {
        if !self.filters {
            return messages;
        }
        messages
            .into_iter()
            .filter_map(|m| match self.deliver(&m, to) {
                Delivery::Deliver => Some(m),
                Delivery::Skip => None,
                Delivery::Redact(body) => Some(Message { body, ..m }),
            })
            .collect()
    }

    /// What `to` gets of `msg`: the first `Skip` wins, redactions chain. A panicking filter skips the
    /// recipient (a failed redaction must not leak what it was hiding).
    fn deliver(&self, msg: &Message, to: &str) -> Delivery {
        let mut redacted: Option<Message> = None;
        for b in self.list.iter().filter(|b| b.filters_delivery()) {
            let seen = redacted.as_ref().unwrap_or(msg);
            match std::panic::catch_unwind(AssertUnwindSafe(|| b.on_deliver(seen, to))) {
                Ok(Delivery::Deliver) => {}
                Ok(Delivery::Skip) => return Delivery::Skip,
                Ok(Delivery::Redact(body)) => {
                    redacted = Some(Message {
                        body,
                        ..seen.clone()
                    })
                }
                Err(_) => {
                    failed(&**b, Hook::Deliver, Failure::Panicked);
                    return Delivery::Skip;
                }
            }
        }
        redacted.map_or(Delivery::Deliver, |m| Delivery::Redact(m.body))
    }
}

/// Hooks off the hot path run in tasks of their own on the actors' runtime.
fn background(task: impl Future<Output = ()> + Send + 'static) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(task);
    }
}

/// Live delivery of a stored batch when a behaviour filters per recipient: each member's decision for each
/// new message; the members who get every message as stored share the batch's frames (here and, through
/// the cluster, on other nodes), the others get frames of their own.
pub(crate) struct FilteredFanOut<'a> {
    pub(crate) behaviours: &'a Behaviours,
    pub(crate) conv: &'a str,
    pub(crate) members: &'a HashSet<UserId>,
    pub(crate) sessions: &'a SessionDirectory,
    pub(crate) cluster: Option<&'a SharedCluster>,
}

impl FilteredFanOut<'_> {
    /// Deliver `news` (each new message with its frame and origin); `answers` go with the shared fan-out.
    pub(crate) fn deliver(
        &self,
        news: &[(&Message, Outgoing)],
        answers: crate::cluster::RemoteAnswers,
    ) {
        let mut plain: HashSet<UserId> = HashSet::with_capacity(self.members.len());
        let mut own: Vec<(UserId, Vec<Outgoing>)> = Vec::new();
        for member in self.members {
            let mut frames: Option<Vec<Outgoing>> = None;
            for (i, (m, shared)) in news.iter().enumerate() {
                let decided = self.behaviours.deliver(m, member);
                if decided != Delivery::Deliver && frames.is_none() {
                    frames = Some(news[..i].iter().map(|(_, f)| f.clone()).collect());
                }
                match (decided, frames.as_mut()) {
                    (Delivery::Deliver, Some(f)) => f.push(shared.clone()),
                    (Delivery::Redact(body), Some(f)) => {
                        let m = Message {
                            body,
                            ..(*m).clone()
                        };
                        f.push((protocol::encode(&ServerFrame::Msg(&m)), shared.1.clone()));
                    }
                    _ => {}
                }
            }
            match frames {
                None => {
                    plain.insert(member.clone());
                }
                Some(f) => own.push((member.clone(), f)),
            }
        }
        let shared: Vec<Outgoing> = news.iter().map(|(_, f)| f.clone()).collect();
        let everyone: Vec<UserId> = plain.iter().cloned().collect();
        self.sessions.deliver_to(&everyone, &shared);
        for (user, frames) in &own {
            if !frames.is_empty() {
                self.sessions.deliver_to(std::slice::from_ref(user), frames);
            }
        }
        if let Some(cluster) = self.cluster {
            // Version 0 with an empty cache: the cluster resolves these sets afresh (they are not the
            // conversation's member list).
            cluster.fan_out(
                self.conv,
                &plain,
                0,
                &shared,
                answers,
                &mut Default::default(),
            );
            for (user, frames) in own.into_iter().filter(|(_, f)| !f.is_empty()) {
                let only = HashSet::from([user]);
                cluster.fan_out(
                    self.conv,
                    &only,
                    0,
                    &frames,
                    Vec::new(),
                    &mut Default::default(),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Upper;
    #[async_trait]
    impl Behaviour for Upper {
        async fn on_message(&self, msg: &Incoming<'_>) -> MessageVerdict {
            MessageVerdict::Rewrite(msg.body.to_uppercase())
        }
    }

    struct Exclaim;
    #[async_trait]
    impl Behaviour for Exclaim {
        async fn on_message(&self, msg: &Incoming<'_>) -> MessageVerdict {
            if msg.body.contains("NO") {
                return MessageVerdict::Reject(Rejection::new("no"));
            }
            MessageVerdict::Rewrite(format!("{}!", msg.body))
        }
    }

    struct Panics;
    #[async_trait]
    impl Behaviour for Panics {
        async fn on_message(&self, _msg: &Incoming<'_>) -> MessageVerdict {
            panic!("a bug in a behaviour")
        }
    }

    struct Slow;
    #[async_trait]
    impl Behaviour for Slow {
        async fn on_message(&self, _msg: &Incoming<'_>) -> MessageVerdict {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            MessageVerdict::Accept
        }
    }

    fn incoming(body: &str) -> Incoming<'_> {
        Incoming {
            conv: "c",
            from: "alice",
            msg_id: "m1",
            body,
        }
    }

    fn chain(list: Vec<Arc<dyn Behaviour>>) -> Arc<Behaviours> {
        Behaviours::new(list, Budgets::default()).expect("not empty")
    }

    #[test]
    fn no_behaviour_is_no_chain() {
        assert!(Behaviours::new(Vec::new(), Budgets::default()).is_none());
    }

    #[tokio::test]
    async fn behaviours_compose_in_registration_order() {
        let b = chain(vec![Arc::new(Upper), Arc::new(Exclaim)]);
        assert_eq!(b.message(&incoming("hi")).await, Ok(Some("HI!".into())));
        // Upper runs first, so Exclaim sees "NO" in "no way" and rejects, naming the send.
        let err = b.message(&incoming("no way")).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::Rejected);
        assert_eq!(err.msg_id.as_deref(), Some("m1"));
        // The other order: Exclaim sees lowercase "no" (no match), then Upper shouts the result.
        let b = chain(vec![Arc::new(Exclaim), Arc::new(Upper)]);
        assert_eq!(
            b.message(&incoming("no way")).await,
            Ok(Some("NO WAY!".into()))
        );
    }

    #[tokio::test]
    async fn a_panicking_hook_fails_the_message_not_the_caller() {
        let b = chain(vec![Arc::new(Panics)]);
        let err = b.message(&incoming("x")).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::BehaviourFailed);
    }

    #[tokio::test]
    async fn a_hook_over_its_budget_is_dropped() {
        let budgets = Budgets {
            message: Duration::from_millis(30),
            ..Budgets::default()
        };
        let b = Behaviours::new(vec![Arc::new(Slow)], budgets).expect("not empty");
        let started = std::time::Instant::now();
        let err = b.message(&incoming("x")).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::BehaviourFailed);
        let took = started.elapsed();
        assert!(
            took >= budgets.message && took < Duration::from_secs(2),
            "{took:?}"
        );
    }

    struct HideFromBob;
    impl HideFromBob {
        fn decide(to: &str) -> Delivery {
            match to {
                "bob" => Delivery::Skip,
                "carol" => Delivery::Redact("[hidden]".into()),
                _ => Delivery::Deliver,
            }
        }
    }
    #[async_trait]
    impl Behaviour for HideFromBob {
        fn filters_delivery(&self) -> bool {
            true
        }
        fn on_deliver(&self, _msg: &Message, to: &str) -> Delivery {
            Self::decide(to)
        }
    }

    #[test]
    fn delivery_filters_skip_and_redact_per_recipient() {
        let b = chain(vec![Arc::new(Upper), Arc::new(HideFromBob)]);
        assert!(b.filters_delivery());
        let m = Message {
            conv: "c".into(),
            seq: 1,
            id: "i".into(),
            msg_id: "m".into(),
            from: "alice".into(),
            body: "secret".into(),
            ts: 0,
        };
        assert_eq!(b.deliver(&m, "bob"), Delivery::Skip);
        assert_eq!(b.deliver(&m, "carol"), Delivery::Redact("[hidden]".into()));
        assert_eq!(b.deliver(&m, "dave"), Delivery::Deliver);
        assert!(!chain(vec![Arc::new(Upper)]).filters_delivery());
    }

    #[test]
    fn attachments_are_typed() {
        #[derive(Debug, PartialEq)]
        struct Role(&'static str);
        let mut a = Attachments::default();
        assert!(a.is_empty());
        a.insert(Role("admin"));
        a.insert(7u32);
        assert_eq!(a.get::<Role>(), Some(&Role("admin")));
        assert_eq!(a.get::<u32>(), Some(&7));
        assert_eq!(a.get::<String>(), None);
    }
}
