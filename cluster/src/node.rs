//! [`ClusterNode`]: this node's place in the cluster, and the actors' [`Cluster`].
//!
//! ```text
//! NodeServer (ractor_cluster)      cookie-authenticated links to the other nodes, one TCP session each
//! Gateway                          this node's remote-facing actor: every message another node sends here
//! Membership                       reconnects to seeds and peers, reads the live view from `pg` (on every
//!                                  `pg` change and every tick), re-homes
//! ```
//!
//! **Finding nodes.** Remote actors are not in ractor's name registry, so each node's gateway joins the
//! process groups `switchboard.node.<name>` (reachable) and, unless it drains, `switchboard.place.<name>`
//! (takes conversations). ractor_cluster synchronises `pg` when a link comes up and removes a node's actors
//! when its link drops, so `pg` is the live membership: `Membership` reads it every tick into a `View`.
//!
//! **Placement.** A conversation's owner is the rendezvous winner over the placement members
//! ([`crate::placement`]). Two nodes may briefly disagree while a view changes; both may then write the same
//! conversation, and the store's seq fence (Cassandra's conditional batch) keeps seqs unique and gap-free.
//!
//! **Interest.** Each node tells every other which users came online or went offline on it (in the order
//! of its session directory's changes, on the same ordered link as everything else), and sends a snapshot
//! to a node that appears. The owner of a conversation uses that to send one [`Cast::Deliver`] per node that
//! has online members. Redis (the registry) records the same connections for operators and for rebuilding;
//! it is never on a message's path.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use ractor::concurrency::{oneshot, OneshotSender};
use ractor::rpc::CallResult;
use ractor::{pg, Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use ractor_cluster::node::NodeConnectionMode;
use ractor_cluster::{
    IncomingEncryptionMode, NodeServer, NodeServerMessage, RactorClusterMessage, RactorMessage,
};
use serde::Serialize;
use switchboard_actors::cluster::{
    Cluster, Lost, MemberChange, NodeName, Origin, Outcome, Outgoing, RemoteAnswer, RemoteAnswers,
    RemoteRecipients, RemoteReply, SharedCluster, Signal,
};
use switchboard_actors::conversation::Answer;
use switchboard_actors::conversations::Conversations;
use switchboard_actors::presence::Presence;
use switchboard_actors::protocol::{ErrorCode, ProtocolError};
use switchboard_actors::session::{ConnId, SessionDirectory};
use switchboard_actors::store::UserId;
use tracing::{debug, info, warn};

use crate::registry::{RedisRegistry, RegistryConfig};
use crate::tls::ClusterTls;
use crate::wire::{self, Call, Cast, Envelope, NodeStatus, WireAnswer, WireFrame, WireOutcome};
use crate::{placement, NodeId};

const NODE_GROUP: &str = "switchboard.node.";
const PLACE_GROUP: &str = "switchboard.place.";
/// How often [`Membership`] reads the view and reconnects.
const TICK: Duration = Duration::from_millis(200);
/// Longest wait between two attempts to reach a seed or a peer.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long `GET /v1/cluster` waits for each node.
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);

/// How a node joins the cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This node's name, unique in the cluster.
    pub node: NodeId,
    /// Where the node listens for other nodes (its IP is also the host it advertises).
    pub listen: SocketAddr,
    /// Nodes to join (`host:port` of their cluster listeners).
    pub seeds: Vec<String>,
    /// The shared secret nodes authenticate each other with.
    pub cookie: String,
    /// This node's HTTP/WebSocket address, reported to operators and clients.
    pub http: SocketAddr,
    /// The Redis connection registry.
    pub registry: RegistryConfig,
    /// Longest wait for another node's answer to a request (member changes, barriers).
    pub call_timeout: Duration,
    /// Mutual TLS between nodes, if configured.
    pub tls: Option<ClusterTls>,
}

/// The live membership, as this node last read it.
#[derive(Debug, Default, Clone)]
struct View {
    /// Nodes that take conversations, sorted.
    placement: Vec<NodeName>,
    /// Every reachable node's gateway (this one's included).
    gateways: BTreeMap<NodeName, ActorRef<GatewayMsg>>,
}

impl PartialEq for View {
    /// Same placement and the same gateway actors (ractor's `ActorRef` has no `PartialEq`).
    fn eq(&self, other: &Self) -> bool {
        self.placement == other.placement
            && self.gateways.len() == other.gateways.len()
            && self
                .gateways
                .iter()
                .zip(&other.gateways)
                .all(|((a, x), (b, y))| a == b && x.get_id() == y.get_id())
    }
}

/// Which other nodes each user is online on.
#[derive(Default)]
struct Interest {
    users: HashMap<UserId, Vec<NodeName>>,
    /// Bumped on every change: conversations re-resolve their [`RemoteRecipients`] then.
    generation: u64,
}

impl Interest {
    /// Whether the user was online on no other node before.
    fn add(&mut self, user: &str, node: &NodeName) -> bool {
        let nodes = self.users.entry(user.to_owned()).or_default();
        let first = nodes.is_empty();
        if !nodes.contains(node) {
            nodes.push(node.clone());
        }
        self.generation += 1;
        first
    }

    /// Whether the user is now online on no other node.
    fn remove(&mut self, user: &str, node: &NodeName) -> bool {
        let mut gone = false;
        if let Some(nodes) = self.users.get_mut(user) {
            nodes.retain(|n| n != node);
            if nodes.is_empty() {
                self.users.remove(user);
                gone = true;
            }
        }
        self.generation += 1;
        gone
    }

    /// Forget `node`; the users that were online on it.
    fn forget(&mut self, node: &NodeName) -> Vec<UserId> {
        let mut had = Vec::new();
        self.users.retain(|user, nodes| {
            if nodes.contains(node) {
                had.push(user.clone());
                nodes.retain(|n| n != node);
            }
            !nodes.is_empty()
        });
        self.generation += 1;
        had
    }

    /// Replace what `node` said; the users whose entry for it came or went.
    fn replace(&mut self, node: &NodeName, users: Vec<String>) -> Vec<UserId> {
        let before: HashSet<UserId> = self.forget(node).into_iter().collect();
        let mut touched: Vec<UserId> = users
            .iter()
            .filter(|u| !before.contains(*u))
            .cloned()
            .collect();
        let after: HashSet<&String> = users.iter().collect();
        touched.extend(before.iter().filter(|u| !after.contains(u)).cloned());
        for u in &users {
            self.add(u, node);
        }
        touched
    }

    /// Per node, the members of `members` online there.
    fn resolve(&self, members: &HashSet<UserId>) -> Vec<(NodeName, Vec<UserId>)> {
        let mut by_node: BTreeMap<NodeName, Vec<UserId>> = BTreeMap::new();
        let mut add = |user: &UserId, nodes: &Vec<NodeName>| {
            for n in nodes {
                by_node.entry(n.clone()).or_default().push(user.clone());
            }
        };
        if members.len() <= self.users.len() {
            for m in members {
                if let Some(nodes) = self.users.get(m) {
                    add(m, nodes);
                }
            }
        } else {
            for (u, nodes) in self.users.iter().filter(|(u, _)| members.contains(*u)) {
                add(u, nodes);
            }
        }
        by_node.into_iter().collect()
    }
}

/// Sends forwarded to their owners and not answered yet: tag → (owner, waiter).
type Forwarded = Arc<Mutex<HashMap<u64, (NodeName, OneshotSender<Outcome>)>>>;

/// Removes a forwarded send's tag when its wait ends.
struct ForwardedTag {
    tag: u64,
    forwarded: Forwarded,
}

impl Drop for ForwardedTag {
    fn drop(&mut self) {
        self.forwarded
            .lock()
            .expect("forwarded lock")
            .remove(&self.tag);
    }
}

/// The actor tree's handles the cluster serves (set before any cluster actor starts).
struct Attached {
    conversations: Conversations,
    directory: SessionDirectory,
    presence: Presence,
}

/// The cluster's own actors.
struct Actors {
    gateway: ActorRef<GatewayMsg>,
    membership: ActorRef<MembershipMsg>,
    supervisor: ActorRef<()>,
}

/// This node's place in the cluster: the [`Cluster`] the actors route through.
pub struct ClusterNode {
    me: NodeName,
    config: ClusterConfig,
    view: RwLock<Arc<View>>,
    interest: RwLock<Interest>,
    draining: AtomicBool,
    registry: RedisRegistry,
    attached: OnceLock<Attached>,
    actors: OnceLock<Actors>,
    /// Set with the reason when a cluster actor failed: the node must stop (see [`ClusterNode::failed`]).
    failure: tokio::sync::watch::Sender<Option<String>>,
    /// Set while the node leaves on purpose: its actors stopping then is no failure.
    leaving: AtomicBool,
    /// Nodes seen since the start, with their last status: the ones gone are reported `down`.
    seen: RwLock<BTreeMap<String, NodeStatus>>,
    /// Sends forwarded to their owners and not answered yet, by tag.
    forwarded: Forwarded,
    /// Nodes whose link dropped and has not come back: out of the view even while `pg` still lists them.
    unlinked: RwLock<HashSet<NodeName>>,
    next_tag: AtomicU64,
}

/// An outcome as it travels.
trait IntoWire {
    fn into_wire(self) -> WireOutcome;
}

impl IntoWire for Outcome {
    fn into_wire(self) -> WireOutcome {
        match self {
            Ok(Ok(m)) => WireOutcome::Stored(m),
            Ok(Err(e)) => WireOutcome::Refused(e),
            Err(Lost) => WireOutcome::Retry,
        }
    }
}

fn from_wire(outcome: WireOutcome) -> Outcome {
    match outcome {
        WireOutcome::Stored(m) => Ok(Ok(m)),
        WireOutcome::Refused(e) => Ok(Err(e)),
        WireOutcome::Retry => Err(Lost),
    }
}

/// Counts an inter-node message this node sends.
fn sent(kind: &'static str) {
    metrics::counter!("switchboard_cluster_messages_sent_total", "kind" => kind).increment(1);
}

impl ClusterNode {
    /// Create the node's cluster state and start its Redis registry. Nothing listens until [`Self::attach`].
    pub fn new(config: ClusterConfig) -> Result<Arc<Self>, crate::registry::RegistryError> {
        let registry = RedisRegistry::start(config.registry.clone())?;
        Ok(Arc::new(Self {
            me: Arc::from(config.node.0.as_str()),
            view: RwLock::default(),
            interest: RwLock::default(),
            draining: AtomicBool::new(false),
            registry,
            attached: OnceLock::new(),
            actors: OnceLock::new(),
            failure: tokio::sync::watch::channel(None).0,
            leaving: AtomicBool::new(false),
            seen: RwLock::default(),
            forwarded: Forwarded::default(),
            unlinked: RwLock::default(),
            next_tag: AtomicU64::new(1),
            config,
        }))
    }

    /// Start the node server, the gateway and the membership actor, serving `conversations` and
    /// `directory`; the node then joins its seeds.
    pub async fn attach(
        self: &Arc<Self>,
        conversations: Conversations,
        directory: SessionDirectory,
        presence: Presence,
    ) -> anyhow::Result<()> {
        let listen = self.config.listen;
        // ractor_cluster's transitive links dial without TLS; with TLS, `Membership` dials every peer it
        // learns of itself (seeds, and the nodes that connect to this one).
        let (encryption, mode) = match &self.config.tls {
            Some(tls) => (
                IncomingEncryptionMode::Tls(tls.acceptor.clone()),
                NodeConnectionMode::Isolated,
            ),
            None => (IncomingEncryptionMode::Raw, NodeConnectionMode::Transitive),
        };
        let server = NodeServer::new(
            listen.port(),
            self.config.cookie.clone(),
            self.config.node.0.clone(),
            listen.ip().to_string(),
            Some(encryption),
            Some(mode),
        )
        .with_listen_addr(listen.ip());
        if self
            .attached
            .set(Attached {
                conversations,
                directory,
                presence,
            })
            .is_err()
        {
            anyhow::bail!("cluster node attached twice");
        }
        // The node server, gateway and membership are permanent: if one of them fails, the node cannot be
        // part of the cluster any more, and stops (as an Erlang application whose top supervisor exits) so
        // that its operating system's supervisor restarts it.
        let (supervisor, _) = Actor::spawn(None, ClusterSupervisor, self.clone()).await?;
        let parent = supervisor.get_cell();
        let (server, _) = Actor::spawn_linked(None, server, (), parent.clone()).await?;
        let (gateway, _) = Actor::spawn_linked(None, Gateway, self.clone(), parent.clone()).await?;
        let groups = [
            format!("{NODE_GROUP}{}", self.me),
            format!("{PLACE_GROUP}{}", self.me),
        ];
        for g in groups {
            pg::join(g, vec![gateway.get_cell()]);
        }
        let args = MembershipArgs {
            node: self.clone(),
            server,
        };
        let (membership, _) = Actor::spawn_linked(None, Membership, args, parent).await?;
        let _ = self.actors.set(Actors {
            gateway,
            membership,
            supervisor,
        });
        info!(node = %self.me, listen = %listen, seeds = ?self.config.seeds, "cluster node started");
        Ok(())
    }

    /// Change the interest map; `change` returns the users whose presence may have moved with it, and their
    /// presence shards are told (after the lock is released).
    fn change_interest(&self, change: impl FnOnce(&mut Interest) -> Vec<UserId>) {
        let touched = change(&mut self.interest.write().expect("interest lock"));
        let presence = &self.attached().presence;
        for user in &touched {
            presence.changed(user);
        }
    }

    /// The actor tree's handles; set before any cluster actor starts, so every actor may rely on them.
    fn attached(&self) -> &Attached {
        self.attached.get().expect("cluster node attached")
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.me
    }

    fn view(&self) -> Arc<View> {
        self.view.read().expect("view lock").clone()
    }

    fn gateway(&self, node: &str) -> Option<ActorRef<GatewayMsg>> {
        self.view().gateways.get(node).cloned()
    }

    /// Why the node cannot take traffic, if it cannot (for `/readyz`).
    pub fn unready(&self) -> Option<String> {
        self.registry
            .health()
            .err()
            .map(|e| format!("registry: {e}"))
    }

    /// Stop taking conversations: leave the placement, so that the other nodes place this node's
    /// conversations elsewhere, and release the ones running here.
    pub fn drain(&self) {
        if self.draining.swap(true, Ordering::AcqRel) {
            return;
        }
        info!(node = %self.me, "draining: leaving the placement");
        if let Some(a) = self.actors.get() {
            pg::leave(
                format!("{PLACE_GROUP}{}", self.me),
                vec![a.gateway.get_cell()],
            );
            let _ = a.membership.send_message(MembershipMsg::Tick);
        }
    }

    /// Leave the cluster at a graceful stop: forget this node's connections in Redis and stop the actors.
    pub async fn leave(&self) {
        self.leaving.store(true, Ordering::Release);
        self.registry.close().await;
        if let Some(a) = self.actors.get() {
            let _ = a
                .supervisor
                .stop_children_and_wait(None, Some(Duration::from_secs(5)))
                .await;
            a.supervisor.stop(None);
        }
    }

    /// Resolves with the reason when one of the cluster's actors failed; the server then stops the node.
    pub async fn failed(&self) -> String {
        let mut rx = self.failure.subscribe();
        loop {
            if let Some(reason) = rx.borrow_and_update().clone() {
                return reason;
            }
            if rx.changed().await.is_err() {
                return "cluster node gone".into();
            }
        }
    }

    fn status(&self) -> NodeStatus {
        let a = self.attached();
        NodeStatus {
            name: self.me.to_string(),
            state: if self.draining.load(Ordering::Acquire) {
                "draining".into()
            } else {
                "up".into()
            },
            http: self.config.http.to_string(),
            cluster: self.config.listen.to_string(),
            connections: a.directory.connection_count() as u64,
            online_users: a.directory.online_users() as u64,
            conversations: a.conversations.running() as u64,
        }
    }

    /// Every node this one knows: the reachable ones as they report themselves, the ones seen earlier and
    /// gone as `down`, and this one as `joining` until it reaches a peer it was told to join.
    pub async fn cluster_status(&self) -> Vec<NodeStatus> {
        let view = self.view();
        let asks = view.gateways.iter().map(|(name, gw)| async move {
            if **name == *self.me {
                return Some(self.status());
            }
            let reply = gw
                .call(
                    |r| GatewayMsg::Call(wire::encode(&Call::Status), r),
                    Some(STATUS_TIMEOUT),
                )
                .await;
            match reply {
                Ok(CallResult::Success(bytes)) => wire::decode::<NodeStatus>(&bytes).ok(),
                _ => None,
            }
        });
        let answers = futures_util::future::join_all(asks).await;
        let mut seen = self.seen.write().expect("seen lock");
        let mut reachable = HashSet::new();
        for s in answers.into_iter().flatten() {
            reachable.insert(s.name.clone());
            seen.insert(s.name.clone(), s);
        }
        let alone = view.gateways.len() <= 1 && !self.config.seeds.is_empty();
        seen.values()
            .map(|s| {
                let mut s = s.clone();
                if !reachable.contains(&s.name) {
                    // Gone: after a drain it left on purpose; otherwise it died or is cut off.
                    s.state = if s.state == "draining" {
                        "left"
                    } else {
                        "down"
                    }
                    .into();
                    (s.connections, s.online_users, s.conversations) = (0, 0, 0);
                } else if alone && s.name == *self.me && s.state == "up" {
                    s.state = "joining".into();
                }
                s
            })
            .collect()
    }

    /// ractor_cluster reported a link to `node` up (ready) or down. A node whose link dropped leaves the view
    /// at once, whatever `pg` still says, until a new link to it is ready.
    fn link(&self, node: &str, up: bool) {
        let mut unlinked = self.unlinked.write().expect("unlinked lock");
        if up {
            unlinked.remove(node);
        } else if node != &*self.me {
            unlinked.insert(Arc::from(node));
        }
    }

    /// Read the live view from `pg`; on a change, re-home what moved and tell new nodes who is online here.
    fn refresh(&self) {
        let mut gateways = BTreeMap::new();
        let mut placement = Vec::new();
        let unlinked = self.unlinked.read().expect("unlinked lock").clone();
        for group in pg::which_groups() {
            let member = pg::get_members(&group).into_iter().next();
            let Some(cell) = member else { continue };
            if let Some(name) = group.strip_prefix(NODE_GROUP) {
                if !unlinked.contains(name) {
                    gateways.insert(Arc::<str>::from(name), ActorRef::<GatewayMsg>::from(cell));
                }
            } else if let Some(name) = group.strip_prefix(PLACE_GROUP) {
                if !unlinked.contains(name) {
                    placement.push(Arc::<str>::from(name));
                }
            }
        }
        placement.sort();
        let fresh = View {
            placement,
            gateways,
        };
        let old = self.view();
        if *old == fresh {
            if self.draining.load(Ordering::Acquire) {
                // Nodes that have not seen the drain yet may still forward sends here, which start
                // actors again: hand those over too.
                self.attached()
                    .conversations
                    .release(|conv| self.owner(conv).is_none());
            }
            return;
        }
        let gone: Vec<NodeName> = old
            .gateways
            .keys()
            .filter(|n| !fresh.gateways.contains_key(*n))
            .cloned()
            .collect();
        let new: Vec<(NodeName, ActorRef<GatewayMsg>)> = fresh
            .gateways
            .iter()
            .filter(|(n, _)| !old.gateways.contains_key(*n) && ***n != *self.me)
            .map(|(n, g)| (n.clone(), g.clone()))
            .collect();
        info!(
            node = %self.me,
            placement = ?fresh.placement,
            reachable = fresh.gateways.len(),
            "cluster view changed"
        );
        metrics::gauge!("switchboard_cluster_nodes").set(fresh.gateways.len() as f64);
        *self.view.write().expect("view lock") = Arc::new(fresh);
        for node in &gone {
            warn!(node = %self.me, peer = %node, "node left the cluster");
            // Its answers will not come: the senders resubmit to the conversations' new owners.
            self.forwarded
                .lock()
                .expect("forwarded lock")
                .retain(|_, (n, _)| n != node);
            self.change_interest(|i| i.forget(node));
            self.registry.forget_node(&NodeId(node.to_string()));
        }
        let a = self.attached();
        // Snapshots go after the view is stored: a session change made from now on goes to the new nodes
        // too, and one made before is in the snapshot (taken under the directory's lock, after it).
        for (node, gw) in &new {
            a.directory.with_online_users(|users| {
                let users = users.cloned().collect();
                self.cast(gw, Cast::Snapshot { users }, "snapshot");
            });
            debug!(peer = %node, "sent snapshot");
        }
        let released = a.conversations.release(|conv| self.owner(conv).is_none());
        if released > 0 {
            info!(node = %self.me, released, "conversations re-homed to other nodes");
            metrics::counter!("switchboard_cluster_rehomed_total").increment(released as u64);
        }
    }

    /// Bring a conversation's per-node online members up to date (a no-op unless the interest or the member
    /// list changed since).
    fn resolve(
        &self,
        members: &HashSet<UserId>,
        members_version: u64,
        cache: &mut RemoteRecipients,
    ) {
        let interest = self.interest.read().expect("interest lock");
        let now = (interest.generation, members_version);
        if cache.resolved_at != Some(now) {
            cache.nodes = interest.resolve(members);
            cache.resolved_at = Some(now);
        }
    }

    /// Hand the answers the owners sent back to the sends waiting for them.
    fn answered(&self, answers: Vec<WireAnswer>) {
        if answers.is_empty() {
            return;
        }
        let mut forwarded = self.forwarded.lock().expect("forwarded lock");
        for a in answers {
            if let Some((_, waiter)) = forwarded.remove(&a.tag) {
                let _ = waiter.send(from_wire(a.outcome));
            }
        }
    }

    fn cast(&self, gw: &ActorRef<GatewayMsg>, cast: Cast, kind: &'static str) {
        let envelope = Envelope {
            from: self.me.to_string(),
            cast,
        };
        if gw
            .send_message(GatewayMsg::Cast(wire::encode(&envelope)))
            .is_ok()
        {
            sent(kind);
        }
    }

    fn cast_others(&self, cast: impl Fn() -> Cast, kind: &'static str) {
        for (name, gw) in &self.view().gateways {
            if **name != *self.me {
                self.cast(gw, cast(), kind);
            }
        }
    }

    async fn call(&self, node: &str, call: &Call) -> Result<Vec<u8>, Lost> {
        let gw = self.gateway(node).ok_or(Lost)?;
        sent("call");
        match gw
            .call(
                |r| GatewayMsg::Call(wire::encode(call), r),
                Some(self.config.call_timeout),
            )
            .await
        {
            Ok(CallResult::Success(bytes)) => Ok(bytes),
            _ => Err(Lost),
        }
    }
}

#[async_trait]
impl Cluster for ClusterNode {
    fn owner(&self, conv: &str) -> Option<NodeName> {
        let view = self.view();
        match placement::owner(conv, &view.placement) {
            Some(n) if **n != *self.me => Some(n.clone()),
            _ => None,
        }
    }

    fn forward_send(
        &self,
        node: &NodeName,
        conv: &str,
        from: &str,
        msg_id: &str,
        body: &str,
        origin: Option<ConnId>,
    ) -> Result<RemoteReply, Lost> {
        let gw = self.gateway(node).ok_or(Lost)?;
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot();
        self.forwarded
            .lock()
            .expect("forwarded lock")
            .insert(tag, (node.clone(), tx));
        // Forgets the tag however the wait ends (answered, timed out, abandoned).
        let guard = ForwardedTag {
            tag,
            forwarded: self.forwarded.clone(),
        };
        let envelope = Envelope {
            from: self.me.to_string(),
            cast: Cast::Send {
                tag,
                conv: conv.to_owned(),
                from: from.to_owned(),
                msg_id: msg_id.to_owned(),
                body: body.to_owned(),
                origin,
            },
        };
        gw.send_message(GatewayMsg::Cast(wire::encode(&envelope)))
            .map_err(|_| Lost)?;
        sent("send");
        Ok(Box::pin(async move {
            let _guard = guard;
            rx.await.unwrap_or(Err(Lost))
        }))
    }

    async fn forward_member(
        &self,
        node: &NodeName,
        conv: &str,
        user: &str,
        change: MemberChange,
        by: Option<&str>,
    ) -> Result<Result<bool, ProtocolError>, Lost> {
        let call = Call::Member {
            conv: conv.to_owned(),
            user: user.to_owned(),
            change,
            by: by.map(str::to_owned),
        };
        let bytes = self.call(node, &call).await?;
        wire::decode(&bytes).map_err(|_| Lost)
    }

    async fn barrier(&self, node: &NodeName) -> Result<(), Lost> {
        self.call(node, &Call::Barrier).await.map(|_| ())
    }

    fn fan_out(
        &self,
        conv: &str,
        members: &HashSet<UserId>,
        members_version: u64,
        frames: &[Outgoing],
        answers: RemoteAnswers,
        cache: &mut RemoteRecipients,
    ) {
        if !frames.is_empty() {
            self.resolve(members, members_version, cache);
        }
        // One message per node: its online members' frames and its senders' answers together.
        let mut by_node: BTreeMap<NodeName, (&[UserId], Vec<WireAnswer>)> = BTreeMap::new();
        if !frames.is_empty() {
            for (node, users) in &cache.nodes {
                by_node.insert(node.clone(), (users.as_slice(), Vec::new()));
            }
        }
        for (node, tag, outcome) in answers {
            let answer = WireAnswer {
                tag,
                outcome: outcome.into_wire(),
            };
            by_node
                .entry(node)
                .or_insert((&[], Vec::new()))
                .1
                .push(answer);
        }
        if by_node.is_empty() {
            return;
        }
        let view = self.view();
        for (node, (users, answers)) in by_node {
            let Some(gw) = view.gateways.get(&node) else {
                continue;
            };
            let frames = if users.is_empty() {
                Vec::new()
            } else {
                frames
                    .iter()
                    .map(|(json, origin)| WireFrame {
                        json: json.to_vec(),
                        skip: origin.as_ref().and_then(|o| o.on(&node)),
                    })
                    .collect()
            };
            let deliver = Cast::Deliver {
                conv: conv.to_owned(),
                users: users.to_vec(),
                frames,
                answers,
            };
            self.cast(gw, deliver, "deliver");
        }
    }

    fn forward_signal(&self, node: &NodeName, conv: &str, signal: &Signal) -> Result<(), Lost> {
        let gw = self.gateway(node).ok_or(Lost)?;
        let cast = Cast::Signal {
            conv: conv.to_owned(),
            from: signal.from.clone(),
            kind: signal.kind.clone(),
            origin: signal.origin.as_ref().and_then(Origin::here),
        };
        self.cast(&gw, cast, "signal");
        Ok(())
    }

    fn fan_out_signal(
        &self,
        _conv: &str,
        members: &HashSet<UserId>,
        members_version: u64,
        frame: &Bytes,
        origin: Option<&Origin>,
        cache: &mut RemoteRecipients,
    ) {
        self.resolve(members, members_version, cache);
        let view = self.view();
        for (node, users) in &cache.nodes {
            let Some(gw) = view.gateways.get(node) else {
                continue;
            };
            let skip = origin.and_then(|o| o.on(node));
            let cast = Cast::SignalOut {
                users: users.clone(),
                json: frame.to_vec(),
                skip,
            };
            self.cast(gw, cast, "signal_out");
        }
    }

    fn retain_offline(&self, users: &mut Vec<UserId>) {
        let interest = self.interest.read().expect("interest lock");
        users.retain(|u| !interest.users.contains_key(u));
    }

    fn online_elsewhere(&self, user: &str) -> bool {
        self.interest
            .read()
            .expect("interest lock")
            .users
            .contains_key(user)
    }

    fn users_elsewhere(&self) -> Vec<UserId> {
        self.interest
            .read()
            .expect("interest lock")
            .users
            .keys()
            .cloned()
            .collect()
    }

    fn answer(&self, node: &NodeName, answers: Vec<(u64, Outcome)>) {
        let Some(gw) = self.gateway(node) else {
            return;
        };
        let answers = answers
            .into_iter()
            .map(|(tag, outcome)| WireAnswer {
                tag,
                outcome: outcome.into_wire(),
            })
            .collect();
        self.cast(&gw, Cast::Answers { answers }, "answers");
    }

    fn connected(&self, user: &str, conn: ConnId, first: bool) {
        self.registry.register(user, conn);
        if first {
            self.cast_others(
                || Cast::Online {
                    user: user.to_owned(),
                },
                "online",
            );
        }
    }

    fn disconnected(&self, user: &str, conn: ConnId, last: bool) {
        self.registry.unregister(user, conn);
        if last {
            self.cast_others(
                || Cast::Offline {
                    user: user.to_owned(),
                },
                "offline",
            );
        }
    }
}

/// The gateway's ractor message: bytes that [`crate::wire`] decodes (never a panic on bad input).
#[derive(RactorClusterMessage)]
pub enum GatewayMsg {
    /// A postcard [`Envelope`].
    Cast(Vec<u8>),
    /// A postcard [`Call`]; the answer is postcard too.
    #[rpc]
    Call(Vec<u8>, RpcReplyPort<Vec<u8>>),
}

impl std::fmt::Debug for GatewayMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cast(b) => write!(f, "Cast({} bytes)", b.len()),
            Self::Call(b, _) => write!(f, "Call({} bytes)", b.len()),
        }
    }
}

/// The node's remote-facing actor: handles what other nodes send, never waits in its handler.
struct Gateway;

impl Gateway {
    fn cast(node: &Arc<ClusterNode>, envelope: Envelope) {
        let from: NodeName = Arc::from(envelope.from.as_str());
        match envelope.cast {
            Cast::Deliver {
                conv: _,
                users,
                frames,
                answers,
            } => {
                if !frames.is_empty() {
                    let frames: Vec<Outgoing> = frames
                        .into_iter()
                        .map(|f| (Bytes::from(f.json), f.skip.map(Origin::Here)))
                        .collect();
                    node.attached().directory.deliver_to(&users, &frames);
                }
                node.answered(answers);
            }
            Cast::Answers { answers } => node.answered(answers),
            Cast::Signal {
                conv,
                from: sender,
                kind,
                origin,
            } => {
                let signal = Signal {
                    from: sender,
                    kind,
                    origin: origin.map(|conn| Origin::Remote {
                        node: from.clone(),
                        conn,
                    }),
                };
                let conversations = node.attached().conversations.clone();
                // Finding the actor may mean starting it: not in the gateway's handler.
                tokio::spawn(async move { conversations.signal_here(&conv, signal).await });
            }
            Cast::SignalOut { users, json, skip } => {
                node.attached()
                    .directory
                    .deliver_signal_to(&users, &Bytes::from(json), skip);
            }
            Cast::Send {
                tag,
                conv,
                from: sender,
                msg_id,
                body,
                origin,
            } => {
                let request = switchboard_actors::conversation::SendRequest {
                    from: sender,
                    msg_id,
                    body,
                    origin: origin.map(|conn| Origin::Remote {
                        node: from.clone(),
                        conn,
                    }),
                };
                let cluster: SharedCluster = node.clone();
                let answer = Answer::Remote(RemoteAnswer::new(cluster, from, tag));
                node.attached()
                    .conversations
                    .forward_here(conv, request, answer);
            }
            Cast::Online { user } => node.change_interest(|i| {
                if i.add(&user, &from) {
                    vec![user]
                } else {
                    vec![]
                }
            }),
            Cast::Offline { user } => node.change_interest(|i| {
                if i.remove(&user, &from) {
                    vec![user]
                } else {
                    vec![]
                }
            }),
            Cast::Snapshot { users } => node.change_interest(|i| i.replace(&from, users)),
        }
    }

    fn call(node: &Arc<ClusterNode>, call: Call, reply: RpcReplyPort<Vec<u8>>) {
        let conversations = node.attached().conversations.clone();
        match call {
            Call::Member {
                conv,
                user,
                change,
                by,
            } => {
                tokio::spawn(async move {
                    let result = conversations
                        .change_member_here(&conv, user, change, by)
                        .await;
                    reply_with(reply, &result, "member_reply");
                });
            }
            Call::Barrier => reply_with(reply, &(), "barrier_reply"),
            Call::Status => reply_with(reply, &node.status(), "status_reply"),
        }
    }
}

fn reply_with<T: Serialize>(reply: RpcReplyPort<Vec<u8>>, value: &T, kind: &'static str) {
    if reply.send(wire::encode(value)).is_ok() {
        sent(kind);
    }
}

impl Actor for Gateway {
    type Msg = GatewayMsg;
    type State = Arc<ClusterNode>;
    type Arguments = Arc<ClusterNode>;

    async fn pre_start(
        &self,
        _myself: ActorRef<GatewayMsg>,
        node: Arc<ClusterNode>,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(node)
    }

    async fn handle(
        &self,
        _myself: ActorRef<GatewayMsg>,
        message: GatewayMsg,
        node: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            GatewayMsg::Cast(bytes) => match wire::decode::<Envelope>(&bytes) {
                Ok(envelope) => Self::cast(node, envelope),
                Err(e) => warn!(error = %e, "undecodable cluster message dropped"),
            },
            GatewayMsg::Call(bytes, reply) => match wire::decode::<Call>(&bytes) {
                Ok(call) => Self::call(node, call, reply),
                Err(e) => {
                    warn!(error = %e, "undecodable cluster request refused");
                    let refused: Result<bool, ProtocolError> = Err(ProtocolError::new(
                        ErrorCode::Internal,
                        "undecodable cluster request",
                    ));
                    reply_with(reply, &refused, "error_reply");
                }
            },
        }
        Ok(())
    }
}

/// Supervises the node server, the gateway and membership; any of them failing or stopping (but on
/// [`ClusterNode::leave`]) stops the node.
struct ClusterSupervisor;

impl Actor for ClusterSupervisor {
    type Msg = ();
    type State = Arc<ClusterNode>;
    type Arguments = Arc<ClusterNode>;

    async fn pre_start(
        &self,
        _myself: ActorRef<()>,
        node: Arc<ClusterNode>,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(node)
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<()>,
        event: SupervisionEvent,
        node: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let reason = match event {
            SupervisionEvent::ActorFailed(cell, err) => {
                format!("cluster actor {:?} failed: {err}", cell.get_name())
            }
            SupervisionEvent::ActorTerminated(cell, _, why) => {
                format!("cluster actor {:?} stopped: {why:?}", cell.get_name())
            }
            _ => return Ok(()),
        };
        if !node.leaving.load(Ordering::Acquire) {
            tracing::error!(reason, "the cluster layer failed; stopping the node");
            node.failure.send_replace(Some(reason));
        }
        Ok(())
    }
}

/// Messages of [`Membership`].
#[derive(RactorMessage)]
enum MembershipMsg {
    /// Read the view, reconnect what is missing.
    Tick,
    /// ractor_cluster says a link to a node came up (ready) or went down.
    Link {
        /// The node's name.
        node: String,
        /// Up (ready) or down.
        up: bool,
    },
}

/// A node's name in ours: ractor_cluster names a node `name@host`.
fn node_name(full: &str) -> &str {
    full.split('@').next().unwrap_or_default()
}

/// Forwards ractor_cluster's link events to [`Membership`], so that a lost link is acted on at once.
struct LinkEvents(ActorRef<MembershipMsg>);

impl LinkEvents {
    fn tell(&self, ses: &ractor_cluster::node::NodeServerSessionInformation, up: bool) {
        if let Some(peer) = &ses.peer_name {
            let node = node_name(&peer.name).to_owned();
            let _ = self.0.send_message(MembershipMsg::Link { node, up });
        }
    }
}

impl ractor_cluster::NodeEventSubscription for LinkEvents {
    fn node_session_opened(&self, _ses: ractor_cluster::node::NodeServerSessionInformation) {}

    fn node_session_disconnected(&self, ses: ractor_cluster::node::NodeServerSessionInformation) {
        self.tell(&ses, false);
    }

    fn node_session_authenticated(&self, _ses: ractor_cluster::node::NodeServerSessionInformation) {
    }

    fn node_session_ready(&self, ses: ractor_cluster::node::NodeServerSessionInformation) {
        self.tell(&ses, true);
    }
}

struct MembershipArgs {
    node: Arc<ClusterNode>,
    server: ActorRef<NodeServerMessage>,
}

/// Keeps this node joined: dials seeds and known peers with backoff (ractor_cluster does not reconnect),
/// and refreshes the view every tick.
struct Membership;

struct MembershipState {
    node: Arc<ClusterNode>,
    server: ActorRef<NodeServerMessage>,
    /// Addresses to keep a link to, with the next attempt's time and backoff.
    dial: HashMap<String, (Instant, Duration)>,
}

impl MembershipState {
    /// Dial every known address that has no link and whose backoff has passed.
    async fn reconnect(&mut self) {
        let sessions = match ractor::call_t!(self.server, NodeServerMessage::GetSessions, 500) {
            Ok(s) => s,
            Err(_) => return,
        };
        let mut linked = HashSet::new();
        for s in sessions.values() {
            if let Some(peer) = &s.peer_name {
                linked.insert(peer.connection_string.clone());
                self.dial
                    .entry(peer.connection_string.clone())
                    .or_insert((Instant::now(), TICK));
            }
        }
        // A late "down" for an old link must not hide a node that has a live link again.
        let names: HashSet<&str> = sessions
            .values()
            .filter_map(|s| s.peer_name.as_ref())
            .map(|p| node_name(&p.name))
            .collect();
        self.node
            .unlinked
            .write()
            .expect("unlinked lock")
            .retain(|n| !names.contains(&**n));
        let me = self.node.config.listen.to_string();
        let now = Instant::now();
        for (addr, (next, backoff)) in self.dial.iter_mut() {
            if *addr == me {
                continue;
            }
            if linked.contains(addr) {
                *backoff = TICK;
                continue;
            }
            if now < *next {
                continue;
            }
            *next = now + *backoff;
            *backoff = (*backoff * 2).min(MAX_BACKOFF);
            let (server, addr) = (self.server.clone(), addr.clone());
            let tls = self.node.config.tls.clone();
            tokio::spawn(async move {
                let dialled = match tls {
                    None => ractor_cluster::client_connect(&server, addr.as_str())
                        .await
                        .map_err(|e| e.to_string()),
                    Some(tls) => match ClusterTls::server_name(&addr) {
                        Ok(name) => ractor_cluster::client_connect_enc(
                            &server,
                            addr.as_str(),
                            tls.connector,
                            name,
                        )
                        .await
                        .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    },
                };
                if let Err(e) = dialled {
                    debug!(peer = %addr, error = %e, "cannot reach node; will retry");
                }
            });
        }
    }
}

impl Actor for Membership {
    type Msg = MembershipMsg;
    type State = MembershipState;
    type Arguments = MembershipArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<MembershipMsg>,
        args: MembershipArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.send_interval(TICK, || MembershipMsg::Tick);
        let _ = args
            .server
            .send_message(NodeServerMessage::SubscribeToEvents {
                id: "switchboard-membership".into(),
                subscription: Box::new(LinkEvents(myself.clone())),
            });
        // React to a node's gateway joining or leaving at once, not at the next tick: a lost node's
        // forwarded sends are failed (and resubmitted) as soon as its link drops.
        pg::monitor(pg::ALL_GROUPS_NOTIFICATION.to_owned(), myself.get_cell());
        let dial = args
            .node
            .config
            .seeds
            .iter()
            .map(|s| (s.clone(), (Instant::now(), TICK)))
            .collect();
        Ok(MembershipState {
            node: args.node,
            server: args.server,
            dial,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<MembershipMsg>,
        message: MembershipMsg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            MembershipMsg::Tick => {
                state.node.refresh();
                state.reconnect().await;
            }
            MembershipMsg::Link { node, up } => {
                state.node.link(&node, up);
                state.node.refresh();
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<MembershipMsg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ProcessGroupChanged(change) = event {
            let group = change.get_group();
            if group.starts_with(NODE_GROUP) || group.starts_with(PLACE_GROUP) {
                state.node.refresh();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: &str) -> NodeName {
        Arc::from(n)
    }

    #[test]
    fn interest_says_when_a_user_comes_online_or_goes_offline_on_every_other_node() {
        let (a, b) = (node("a"), node("b"));
        let mut i = Interest::default();
        assert!(i.add("u", &a), "first node");
        assert!(!i.add("u", &b), "already online elsewhere");
        assert!(!i.remove("u", &a), "still on b");
        assert!(i.remove("u", &b), "gone everywhere");
        assert!(!i.remove("u", &b), "nothing left to remove");

        i.add("u", &a);
        i.add("v", &a);
        i.add("v", &b);
        let mut had = i.forget(&a);
        had.sort();
        assert_eq!(had, ["u", "v"]);
        assert!(!i.users.contains_key("u"));
        assert_eq!(i.users["v"], [b]);

        i.add("w", &a);
        let mut touched = i.replace(&a, vec!["x".into(), "w".into()]);
        touched.sort();
        assert_eq!(touched, ["x"], "w was there before and after");
        let mut touched = i.replace(&a, vec![]);
        touched.sort();
        assert_eq!(touched, ["w", "x"]);
    }
}
