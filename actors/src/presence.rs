//! Presence: whether each user has a live connection on any node, and when they were last seen, owned by
//! [`SHARDS`] supervised presence actors per node in the way of Phoenix.Tracker (decision 0019).
//!
//! ```text
//! PresenceSupervisor ── PresenceShard × SHARDS (a user belongs to one shard, by a hash of its id)
//! ```
//!
//! A shard is told that a user *may* have changed ([`Presence::changed`]: this node's first or last
//! connection of the user, another node's notice, a node gone) and looks at the truth itself: the session
//! directory here, the cluster's view of the other nodes. So a lost notice costs nothing, and a shard
//! restarted after a crash rebuilds by looking again at every user it knows of. Each node runs its own
//! shards over the same replicated view and tells only its own connections: no presence traffic crosses
//! nodes beyond the online/offline notices the cluster already sends for routing.
//!
//! A user is online while any device is connected; offline once none has been for the grace period, so a
//! device that reconnects within it produces no offline/online pair. What the events said last, and each
//! user's last-seen time, are kept in a table per shard that outlives the shard's actor (an ETS table with
//! the supervisor as heir, in Erlang terms); the actor commits a change there in the same step as it
//! pushes the event, so a crash costs a client at most a re-sent event.
//!
//! An event goes to the user's *contacts* — the members of the DMs and groups of at most
//! [`CONTACTS_UP_TO`] members the user is in — that are online on this node, and to this node's
//! connections that watch the user (`presence_subscribe`).

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SpawnErr, SupervisionEvent};
use tracing::{error, info, warn};

use crate::cluster::SharedCluster;
use crate::connection::slow_consumer;
use crate::conversation::{now_ms, RECEIPTS_UP_TO};
use crate::outbound::PushError;
use crate::protocol::{self, PresenceState, ServerFrame};
use crate::session::{ConnHandle, ConnId, SessionDirectory};
use crate::store::{SharedStore, StoreError, UserId};
use crate::supervisor::{Decision, Escalation, RestartBudget, RestartIntensity};

/// Presence actors per node.
pub const SHARDS: usize = 16;

/// A conversation's members hear each other's presence up to this size (the receipts' rule).
pub const CONTACTS_UP_TO: usize = RECEIPTS_UP_TO;

/// How often a shard looks for users whose grace period ended.
const TICK: Duration = Duration::from_millis(200);

/// How long a conversation's member list is reused for finding contacts.
const MEMBERS_FRESH: Duration = Duration::from_secs(60);

/// Member lists kept at most (the cache is emptied of stale lists, then cleared, past it).
const MEMBERS_KEPT: usize = 4096;

/// How long an offline user's last-seen time is kept.
const LAST_SEEN_KEPT: Duration = Duration::from_secs(7 * 24 * 3600);

/// Presence settings.
#[derive(Debug, Clone, Copy)]
pub struct PresenceConfig {
    /// How long a user with no device left still shows online (a reconnect within it shows nothing).
    pub grace: Duration,
    /// Restart intensity of the presence supervisor.
    pub intensity: RestartIntensity,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(5),
            intensity: RestartIntensity::default(),
        }
    }
}

/// A user's presence, as `GET /v1/presence` and the `presence` frame give it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PresenceInfo {
    /// Whose.
    pub user: UserId,
    /// Online or offline.
    pub state: PresenceState,
    /// See [`ServerFrame::Presence`].
    pub last_seen: Option<u64>,
}

/// What the last event said of a user.
#[derive(Debug, Clone, Copy)]
struct Shown {
    online: bool,
    /// Ms since the epoch: when the user came online, or when the last device went.
    last_seen: u64,
}

/// A shard's table: outlives the shard's actor.
#[derive(Default)]
struct Table {
    shown: HashMap<UserId, Shown>,
    /// This node's connections watching each user.
    watchers: HashMap<UserId, Vec<ConnHandle>>,
}

impl Table {
    fn info(&self, user: &str, now: u64) -> PresenceInfo {
        let (state, last_seen) = match self.shown.get(user) {
            Some(s) if s.online => (PresenceState::Online, Some(now)),
            Some(s) => (PresenceState::Offline, Some(s.last_seen)),
            None => (PresenceState::Offline, None),
        };
        PresenceInfo {
            user: user.to_owned(),
            state,
            last_seen,
        }
    }
}

/// Per conversation: when its member list was read, and the list (`None`: too big to count).
type MemberLists = HashMap<String, (Instant, Option<Arc<[UserId]>>)>;

struct Shard {
    table: RwLock<Table>,
    actor: RwLock<Option<ActorRef<PresenceMsg>>>,
}

struct Inner {
    shards: Box<[Shard]>,
    directory: SessionDirectory,
    cluster: Option<SharedCluster>,
    store: SharedStore,
    grace: Duration,
    /// Small conversations' member lists (`None`: over [`CONTACTS_UP_TO`]), shared by the shards.
    members: Mutex<MemberLists>,
    /// Told of every change this node tells (`on_presence`).
    behaviours: Option<Arc<crate::behaviour::Behaviours>>,
}

impl Inner {
    fn shard_of(&self, user: &str) -> usize {
        let mut h = DefaultHasher::new();
        user.hash(&mut h);
        (h.finish() % self.shards.len() as u64) as usize
    }

    fn shard(&self, user: &str) -> &Shard {
        &self.shards[self.shard_of(user)]
    }

    fn table(&self, index: usize) -> std::sync::RwLockWriteGuard<'_, Table> {
        // Plain data: a panic elsewhere while holding the lock leaves it usable.
        self.shards[index]
            .table
            .write()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn read_table(&self, index: usize) -> std::sync::RwLockReadGuard<'_, Table> {
        self.shards[index]
            .table
            .read()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `user` has a connection on this node or, as far as this node knows, on another.
    fn is_online(&self, user: &str) -> bool {
        self.directory.is_online(user)
            || self
                .cluster
                .as_ref()
                .is_some_and(|c| c.online_elsewhere(user))
    }

    /// The members of `user`'s DMs and small groups, but `user`.
    async fn contacts(&self, user: &str) -> Result<HashSet<UserId>, StoreError> {
        let convs = self.store.user_conversations(user).await?;
        let lists = join_all(convs.iter().map(|c| self.members_of(c))).await;
        let mut out = HashSet::new();
        for list in lists {
            if let Some(members) = list? {
                out.extend(members.iter().filter(|m| *m != user).cloned());
            }
        }
        Ok(out)
    }

    /// A conversation's members if it has at most [`CONTACTS_UP_TO`], from the cache while fresh.
    async fn members_of(&self, conv: &str) -> Result<Option<Arc<[UserId]>>, StoreError> {
        let now = Instant::now();
        if let Some((at, list)) = self.members_lock().get(conv) {
            if now.duration_since(*at) < MEMBERS_FRESH {
                return Ok(list.clone());
            }
        }
        let members = self.store.members(conv).await?;
        let list: Option<Arc<[UserId]>> = (members.len() <= CONTACTS_UP_TO).then(|| members.into());
        let mut cache = self.members_lock();
        if cache.len() >= MEMBERS_KEPT {
            cache.retain(|_, (at, _)| now.duration_since(*at) < MEMBERS_FRESH);
            if cache.len() >= MEMBERS_KEPT {
                cache.clear();
            }
        }
        cache.insert(conv.to_owned(), (now, list.clone()));
        Ok(list)
    }

    fn members_lock(&self) -> std::sync::MutexGuard<'_, MemberLists> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The handle on presence: cheap to clone.
#[derive(Clone)]
pub struct Presence {
    inner: Arc<Inner>,
}

impl Presence {
    /// Start the presence supervisor and its shards under `parent`.
    pub async fn start(
        config: PresenceConfig,
        directory: SessionDirectory,
        cluster: Option<SharedCluster>,
        store: SharedStore,
        behaviours: Option<Arc<crate::behaviour::Behaviours>>,
        parent: ActorCell,
    ) -> Result<Self, SpawnErr> {
        let inner = Arc::new(Inner {
            shards: (0..SHARDS)
                .map(|_| Shard {
                    table: RwLock::default(),
                    actor: RwLock::default(),
                })
                .collect(),
            directory,
            cluster,
            store,
            grace: config.grace,
            members: Mutex::default(),
            behaviours,
        });
        Actor::spawn_linked(
            None,
            PresenceSupervisor,
            (inner.clone(), config.intensity),
            parent,
        )
        .await?;
        Ok(Self { inner })
    }

    /// `user`'s connections may have changed (first or last here, on another node, a node gone): its shard
    /// looks. Never blocks; a shard that is restarting looks at everyone when it is back.
    pub fn changed(&self, user: &str) {
        let shard = self.inner.shard(user);
        if let Some(actor) = shard
            .actor
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            let _ = actor.send_message(PresenceMsg::Changed(user.to_owned()));
        }
    }

    /// What the events say of each of `users` now.
    pub fn lookup(&self, users: &[UserId]) -> Vec<PresenceInfo> {
        let now = now_ms();
        users
            .iter()
            .map(|u| self.inner.read_table(self.inner.shard_of(u)).info(u, now))
            .collect()
    }

    /// Make `conn` watch `users` and push their presence to it now; later changes follow, in order (the
    /// snapshot and the watch are taken under the lock the shard commits changes under).
    pub fn watch(&self, conn: &ConnHandle, users: &[UserId]) {
        let now = now_ms();
        for user in users {
            let mut table = self.inner.table(self.inner.shard_of(user));
            table
                .watchers
                .entry(user.clone())
                .or_default()
                .push(conn.clone());
            let info = table.info(user, now);
            push(
                std::slice::from_ref(conn),
                &protocol::encode(&ServerFrame::Presence {
                    user,
                    state: info.state,
                    last_seen: info.last_seen,
                }),
            );
        }
    }

    /// Stop connection `conn` watching `users`.
    pub fn unwatch(&self, conn: ConnId, users: &[UserId]) {
        for user in users {
            let mut table = self.inner.table(self.inner.shard_of(user));
            if let Some(list) = table.watchers.get_mut(user) {
                list.retain(|c| c.id != conn);
                if list.is_empty() {
                    table.watchers.remove(user);
                }
            }
        }
    }

    /// Fault injection: make the shard that owns `user` panic. `false` if it was not running.
    pub fn crash(&self, user: &str) -> bool {
        self.shard_actor(user)
            .is_some_and(|a| a.send_message(PresenceMsg::Crash).is_ok())
    }

    /// The id of the actor serving `user`'s shard (tests observe restarts with it).
    pub fn shard_actor_id(&self, user: &str) -> Option<ActorId> {
        self.shard_actor(user).map(|a| a.get_id())
    }

    fn shard_actor(&self, user: &str) -> Option<ActorRef<PresenceMsg>> {
        self.inner
            .shard(user)
            .actor
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Push a presence frame onto each of `conns` (reliably: presence is state, not a hint).
fn push(conns: &[ConnHandle], frame: &bytes::Bytes) {
    for conn in conns {
        if conn.outbound.push_frame(frame.clone()) == Err(PushError::Full) {
            slow_consumer(&conn.outbound, conn.id);
        }
    }
}

/// A presence shard's messages.
#[derive(Debug)]
pub enum PresenceMsg {
    /// Look at this user again.
    Changed(UserId),
    /// Look for ended grace periods.
    Tick,
    /// Fault injection: panic in the handler, as a bug would.
    Crash,
}

// Local only (the `cluster` feature makes ractor ask every message type; presence never crosses nodes).
impl ractor::Message for PresenceMsg {}

/// Supervises the shards: restarts a failed one (which rebuilds), escalates past the restart intensity.
struct PresenceSupervisor;

struct SupervisorState {
    inner: Arc<Inner>,
    children: HashMap<ActorId, usize>,
    budget: RestartBudget,
    intensity: RestartIntensity,
}

impl SupervisorState {
    async fn spawn(&mut self, myself: &ActorRef<()>, index: usize) -> Result<(), SpawnErr> {
        let (shard, _) = Actor::spawn_linked(
            None,
            PresenceShard,
            (self.inner.clone(), index),
            myself.get_cell(),
        )
        .await?;
        self.children.insert(shard.get_id(), index);
        Ok(())
    }
}

impl Actor for PresenceSupervisor {
    type Msg = ();
    type State = SupervisorState;
    type Arguments = (Arc<Inner>, RestartIntensity);

    async fn pre_start(
        &self,
        myself: ActorRef<()>,
        (inner, intensity): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut state = SupervisorState {
            inner,
            children: HashMap::new(),
            budget: RestartBudget::new(intensity),
            intensity,
        };
        for index in 0..SHARDS {
            state.spawn(&myself, index).await?;
        }
        Ok(state)
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<()>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                state.children.remove(&cell.get_id());
            }
            SupervisionEvent::ActorFailed(cell, err) => {
                let Some(index) = state.children.remove(&cell.get_id()) else {
                    return Ok(());
                };
                error!(shard = index, error = %err, "presence actor failed");
                metrics::counter!("switchboard_actor_restarts_total", "family" => "presence")
                    .increment(1);
                match state.budget.on_failure(Instant::now()) {
                    Decision::Escalate => {
                        return Err(Escalation::new("presence", state.intensity).into())
                    }
                    Decision::Restart => {
                        info!(shard = index, "restarting presence actor");
                        state.spawn(&myself, index).await?;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// One shard: the single writer of its users' presence on this node.
struct PresenceShard;

struct ShardState {
    inner: Arc<Inner>,
    index: usize,
    /// Users shown online with no device left: when their grace ends, and when the last device went.
    pending: HashMap<UserId, (Instant, u64)>,
    /// The same, in deadline order (entries whose user came back are skipped).
    deadlines: VecDeque<(Instant, UserId)>,
    /// Ticks since the last sweep of old last-seen times.
    ticks: u32,
}

impl Actor for PresenceShard {
    type Msg = PresenceMsg;
    type State = ShardState;
    type Arguments = (Arc<Inner>, usize);

    async fn pre_start(
        &self,
        myself: ActorRef<PresenceMsg>,
        (inner, index): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        *inner.shards[index]
            .actor
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(myself.clone());
        // Ticks stop when the actor does: the next send fails.
        tokio::spawn(async move {
            let mut every = tokio::time::interval(TICK);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                if myself.send_message(PresenceMsg::Tick).is_err() {
                    break;
                }
            }
        });
        Ok(ShardState {
            inner,
            index,
            pending: HashMap::new(),
            deadlines: VecDeque::new(),
            ticks: 0,
        })
    }

    /// Rebuild: look at every user this shard knows of — online here or elsewhere, or shown online — so
    /// whatever changed while no actor ran is told now (a crash costs at most a re-sent event).
    async fn post_start(
        &self,
        _myself: ActorRef<PresenceMsg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let mine = |u: &UserId| state.inner.shard_of(u) == state.index;
        let mut users: HashSet<UserId> = state
            .inner
            .directory
            .with_online_users(|users| users.filter(|u| mine(u)).cloned().collect());
        if let Some(cluster) = &state.inner.cluster {
            users.extend(cluster.users_elsewhere().into_iter().filter(|u| mine(u)));
        }
        users.extend(
            state
                .inner
                .read_table(state.index)
                .shown
                .iter()
                .filter(|(_, s)| s.online)
                .map(|(u, _)| u.clone()),
        );
        for user in users {
            state.look(&user).await;
        }
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<PresenceMsg>,
        message: PresenceMsg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            PresenceMsg::Changed(user) => state.look(&user).await,
            PresenceMsg::Tick => state.tick().await,
            PresenceMsg::Crash => panic!(
                "fault injection: presence shard {} crashed on request",
                state.index
            ),
        }
        Ok(())
    }
}

impl ShardState {
    /// Compare `user`'s connections with what the events said, and act.
    async fn look(&mut self, user: &UserId) {
        let online = self.inner.is_online(user);
        let shown = self
            .inner
            .read_table(self.index)
            .shown
            .get(user)
            .is_some_and(|s| s.online);
        match (online, shown) {
            (true, true) => {
                self.pending.remove(user);
            }
            (true, false) => {
                self.pending.remove(user);
                self.tell(user, true, now_ms()).await;
            }
            (false, true) if !self.pending.contains_key(user) => {
                let left = now_ms();
                if self.inner.grace.is_zero() {
                    self.tell(user, false, left).await;
                } else {
                    let deadline = Instant::now() + self.inner.grace;
                    self.pending.insert(user.clone(), (deadline, left));
                    self.deadlines.push_back((deadline, user.clone()));
                }
            }
            _ => {}
        }
    }

    /// Tell the users whose grace ended (and who did not come back) offline.
    async fn tick(&mut self) {
        let now = Instant::now();
        while self.deadlines.front().is_some_and(|(d, _)| *d <= now) {
            let Some((deadline, user)) = self.deadlines.pop_front() else {
                break;
            };
            let Some(&(due, left)) = self.pending.get(&user) else {
                continue;
            };
            if due != deadline {
                continue;
            }
            self.pending.remove(&user);
            if !self.inner.is_online(&user) {
                self.tell(&user, false, left).await;
            }
        }
        self.ticks += 1;
        if self.ticks >= 300 {
            self.ticks = 0;
            let oldest = now_ms().saturating_sub(LAST_SEEN_KEPT.as_millis() as u64);
            self.inner
                .table(self.index)
                .shown
                .retain(|_, s| s.online || s.last_seen >= oldest);
        }
    }

    /// Push the change to `user`'s contacts online here and to its watchers, and commit it, in one step.
    async fn tell(&mut self, user: &UserId, online: bool, last_seen: u64) {
        let inner = &self.inner;
        // Contacts are looked for only when someone else is online here to hear of them.
        let someone_else =
            inner.directory.online_users() > usize::from(inner.directory.is_online(user));
        let contacts = if someone_else {
            inner.contacts(user).await.unwrap_or_else(|e| {
                warn!(user_id = %user, error = %e, "presence: contacts unavailable; telling watchers only");
                HashSet::new()
            })
        } else {
            HashSet::new()
        };
        let frame = protocol::encode(&ServerFrame::Presence {
            user,
            state: if online {
                PresenceState::Online
            } else {
                PresenceState::Offline
            },
            last_seen: Some(last_seen),
        });
        let mut conns = inner.directory.connections_of(&contacts);
        {
            let mut table = inner.table(self.index);
            table
                .shown
                .insert(user.clone(), Shown { online, last_seen });
            if let Some(watchers) = table.watchers.get(user) {
                let mut seen: HashSet<ConnId> = conns.iter().map(|c| c.id).collect();
                conns.extend(watchers.iter().filter(|w| seen.insert(w.id)).cloned());
            }
            push(&conns, &frame);
        }
        if let Some(behaviours) = &inner.behaviours {
            behaviours.presence(crate::behaviour::PresenceChange {
                user: user.clone(),
                online,
                last_seen,
            });
        }
        metrics::counter!(
            "switchboard_presence_events_total",
            "state" => if online { "online" } else { "offline" }
        )
        .increment(1);
    }
}
