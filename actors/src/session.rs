//! A user's session on this node: the user's entry in the [`SessionDirectory`], listing the user's
//! connections (one per device). It is a row in a table, not an actor (decision 0009):
//! [`crate::sessions::Sessions`] adds each new connection before handing it to the edge, and each connection
//! removes itself when it ends, however it ends; the entry goes with its last connection.
//!
//! Conversations deliver through the directory, pushing the shared bytes of a frame straight onto every
//! connection's bounded outbound queue — one push per device, never waiting: a full queue marks that
//! connection a slow consumer, which is closed (and resyncs on reconnect) without slowing the conversation
//! or the other devices.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use bytes::Bytes;

use crate::cluster::{Origin, Outgoing, RemoteRecipients, SharedCluster};
use crate::connection::slow_consumer;
use crate::outbound::{Outbound, PushError};
use crate::store::UserId;

/// A connection's id, unique within the node's lifetime.
pub type ConnId = u64;

/// What a session keeps of each of its connections.
#[derive(Clone)]
pub struct ConnHandle {
    /// The connection's id.
    pub id: ConnId,
    /// Its bounded outbound queue.
    pub outbound: Outbound,
}

/// The connections of a conversation's online members, resolved once and reused until a session or the
/// member list changes: fan-out then costs no lookup per member.
#[derive(Default)]
pub struct Recipients {
    /// Directory generation and member-list version this was resolved at; `None` until resolved.
    resolved_at: Option<(u64, u64)>,
    conns: Vec<ConnHandle>,
    /// The members online on other nodes (cluster only), resolved by the cluster.
    pub remote: RemoteRecipients,
}

impl Recipients {
    /// Push `frames` onto every recipient connection's queue — all of them in one push per connection,
    /// skipping each frame's own sender. A connection whose queue is full is told it overflowed.
    pub fn deliver(&self, frames: &[Outgoing]) {
        push_to(&self.conns, frames);
    }

    /// Push a best-effort signal to every recipient connection but `skip`, dropping it where the queue is
    /// half full (see [`Outbound::push_signal`]).
    pub fn deliver_signal(&self, frame: &Bytes, skip: Option<ConnId>) {
        signal_to(&self.conns, frame, skip);
    }

    /// Connections resolved.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether no member is online.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }
}

/// Push `frames` onto each of `conns`, all of them in one push per connection, skipping each frame's own
/// sender; a connection whose queue is full is told it overflowed.
fn push_to<'a>(conns: impl IntoIterator<Item = &'a ConnHandle>, frames: &[Outgoing]) {
    let mut delivered = 0u64;
    for conn in conns {
        let mine = frames
            .iter()
            .filter(|(_, origin)| !matches!(origin, Some(Origin::Here(c)) if *c == conn.id))
            .map(|(frame, _)| frame);
        match conn.outbound.push_frames(mine) {
            Ok(n) => delivered += n as u64,
            Err(PushError::Full) => slow_consumer(&conn.outbound, conn.id),
            Err(PushError::Closed) => {}
        }
    }
    metrics::counter!("switchboard_deliveries_total").increment(delivered);
}

fn signal_to<'a>(
    conns: impl IntoIterator<Item = &'a ConnHandle>,
    frame: &Bytes,
    skip: Option<ConnId>,
) {
    let mut dropped = 0u64;
    for conn in conns.into_iter().filter(|c| Some(c.id) != skip) {
        if !conn.outbound.push_signal(frame) {
            dropped += 1;
        }
    }
    if dropped > 0 {
        metrics::counter!("switchboard_signals_dropped_total").increment(dropped);
    }
}

/// Online users on this node and their connections' queues: read by conversations for fan-out. A
/// connection is listed when it opens — before it reads anything, so a `sync` never reads the store before
/// its connection is listed for what is committed after — and unlisted when it ends; a user with no
/// connection left has no entry. Every change bumps a generation, which tells conversations their
/// [`Recipients`] are stale.
///
/// In a cluster, the directory tells the [`crate::cluster::Cluster`] of every change while it holds its lock,
/// so the other nodes hear of them in the order they happened.
#[derive(Clone, Default)]
pub struct SessionDirectory {
    inner: Arc<RwLock<Entries>>,
    cluster: Option<SharedCluster>,
}

#[derive(Default)]
struct Entries {
    online: HashMap<UserId, Vec<ConnHandle>>,
    generation: u64,
}

impl SessionDirectory {
    /// Bring `recipients` up to date for `members` (at `members_version`): a no-op unless a session
    /// changed since, else one lookup per member (one pass over the smaller side).
    pub fn resolve(
        &self,
        members: &HashSet<UserId>,
        members_version: u64,
        recipients: &mut Recipients,
    ) {
        let dir = self.read();
        let now = (dir.generation, members_version);
        if recipients.resolved_at == Some(now) {
            return;
        }
        recipients.conns.clear();
        let online = &dir.online;
        if members.len() <= online.len() {
            for conns in members.iter().filter_map(|m| online.get(m)) {
                recipients.conns.extend(conns.iter().cloned());
            }
        } else {
            for (_, conns) in online.iter().filter(|(u, _)| members.contains(*u)) {
                recipients.conns.extend(conns.iter().cloned());
            }
        }
        recipients.resolved_at = Some(now);
    }

    /// A directory that tells `cluster` of every connection opened and closed.
    pub fn with_cluster(cluster: Option<SharedCluster>) -> Self {
        Self {
            inner: Arc::default(),
            cluster,
        }
    }

    /// Deliver frames committed on another node to the connections of `users` on this one.
    pub fn deliver_to(&self, users: &[UserId], frames: &[Outgoing]) {
        let dir = self.read();
        push_to(
            users.iter().filter_map(|u| dir.online.get(u)).flatten(),
            frames,
        );
    }

    /// Deliver a signal from another node to the connections of `users` on this one, but `skip`.
    pub fn deliver_signal_to(&self, users: &[UserId], frame: &Bytes, skip: Option<ConnId>) {
        let dir = self.read();
        signal_to(
            users.iter().filter_map(|u| dir.online.get(u)).flatten(),
            frame,
            skip,
        );
    }

    /// Call `f` with every online user, under the directory's read lock: no change lands while it runs, so
    /// what `f` sends is ordered with the changes' own notices.
    pub fn with_online_users<R>(
        &self,
        f: impl FnOnce(&mut dyn Iterator<Item = &UserId>) -> R,
    ) -> R {
        let dir = self.read();
        f(&mut dir.online.keys())
    }

    /// The members of `members` with no connection on this node (one read of the directory).
    pub fn offline_among(&self, members: &HashSet<UserId>) -> Vec<UserId> {
        let dir = self.read();
        members
            .iter()
            .filter(|m| !dir.online.contains_key(*m))
            .cloned()
            .collect()
    }

    /// Whether `user` has a connection on this node.
    pub fn is_online(&self, user: &str) -> bool {
        self.read().online.contains_key(user)
    }

    /// The connections on this node of each of `users`.
    pub fn connections_of<'a>(
        &self,
        users: impl IntoIterator<Item = &'a UserId>,
    ) -> Vec<ConnHandle> {
        let dir = self.read();
        users
            .into_iter()
            .filter_map(|u| dir.online.get(u))
            .flatten()
            .cloned()
            .collect()
    }

    /// Number of connections on this node.
    pub fn connection_count(&self) -> usize {
        self.read().online.values().map(Vec::len).sum()
    }

    /// Number of online users on this node.
    pub fn online_users(&self) -> usize {
        self.read().online.len()
    }

    /// Every connection on this node.
    pub fn connections(&self) -> Vec<ConnHandle> {
        self.read().online.values().flatten().cloned().collect()
    }

    /// List `conn` under `user`, opening the user's entry if it is the first; whether it was.
    pub(crate) fn attach(&self, user: &str, conn: ConnHandle) -> bool {
        let id = conn.id;
        let mut opened = false;
        self.change(|online| {
            let first = match online.get_mut(user) {
                Some(conns) => {
                    conns.push(conn);
                    false
                }
                None => {
                    online.insert(user.to_owned(), vec![conn]);
                    true
                }
            };
            opened = first;
            move |cluster: &SharedCluster| cluster.connected(user, id, first)
        });
        opened
    }

    /// Unlist connection `id` of `user`; the entry goes with its last connection; whether it went.
    pub(crate) fn detach(&self, user: &str, id: ConnId) -> bool {
        let mut closed = false;
        self.change(|online| {
            let mut last = false;
            if let Some(conns) = online.get_mut(user) {
                conns.retain(|c| c.id != id);
                if conns.is_empty() {
                    online.remove(user);
                    last = true;
                }
            }
            closed = last;
            move |cluster: &SharedCluster| cluster.disconnected(user, id, last)
        });
        closed
    }

    /// Apply a change and, still under the lock, tell the cluster what it was.
    fn change<N: FnOnce(&SharedCluster)>(
        &self,
        f: impl FnOnce(&mut HashMap<UserId, Vec<ConnHandle>>) -> N,
    ) {
        let mut dir = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let notice = f(&mut dir.online);
        if let Some(cluster) = &self.cluster {
            notice(cluster);
        }
        dir.generation += 1;
        metrics::gauge!("switchboard_online_users").set(dir.online.len() as f64);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Entries> {
        // Plain data: a panic elsewhere while holding the lock leaves it usable.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }
}
