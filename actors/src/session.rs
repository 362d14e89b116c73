//! `SessionActor`: one per online user on this node, a child of the `SessionSupervisor` and the owner of
//! that user's connections (one per device): each tells it when it ends, and a session that fails closes
//! them.
//!
//! The user's entry in the [`SessionDirectory`] lists the session's connections: the supervisor adds each
//! new one before handing it to the edge, the session removes each that ends. Conversations deliver through
//! that entry, pushing the shared bytes of a frame
//! straight onto every connection's bounded outbound queue — one push per device, no hop through this
//! actor's mailbox, never waiting: a full queue marks that connection a slow consumer, which is closed (and
//! resyncs on reconnect) without slowing the conversation or the other devices.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::connection::slow_consumer;
use crate::outbound::{Outbound, PushError};
use crate::protocol::CloseCode;
use crate::sessions::SessionsMsg;
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

/// Messages of a [`SessionActor`].
pub enum SessionMsg {
    /// A new connection of this user.
    Attach(ConnHandle),
    /// A connection ended (sent by the connection itself, however it ended).
    Detach(ConnId),
    /// Stop if no connection is left; answers whether it stops.
    StopIfEmpty(RpcReplyPort<bool>),
}

/// The session actor.
pub struct SessionActor;

/// Arguments of a session actor.
pub struct SessionArgs {
    /// Its user.
    pub user: UserId,
    /// Where its connections are listed for delivery.
    pub directory: SessionDirectory,
}

/// The state of one user's session.
pub struct SessionState {
    user: UserId,
    conns: Vec<ConnHandle>,
    directory: SessionDirectory,
}

/// However the session ends — a failure included — its connections are closed: with 1011 unless they were
/// closing already. Their clients reconnect into a fresh session and resync.
impl Drop for SessionState {
    fn drop(&mut self) {
        for conn in &self.conns {
            conn.outbound.abort(CloseCode::Internal);
        }
    }
}

impl Actor for SessionActor {
    type Msg = SessionMsg;
    type State = SessionState;
    type Arguments = SessionArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<SessionMsg>,
        args: SessionArgs,
    ) -> Result<SessionState, ActorProcessingErr> {
        Ok(SessionState {
            user: args.user,
            conns: Vec::new(),
            directory: args.directory,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SessionMsg>,
        message: SessionMsg,
        state: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            // Already listed in the directory by the supervisor.
            SessionMsg::Attach(handle) => state.conns.push(handle),
            // Connections are temporary: one that ends is forgotten, never restarted (its client
            // reconnects and syncs).
            SessionMsg::Detach(id) => {
                state.conns.retain(|c| c.id != id);
                state.directory.detach(&state.user, myself.get_id(), id);
                if state.conns.is_empty() {
                    report_empty(&myself, &state.user);
                }
            }
            SessionMsg::StopIfEmpty(reply) => {
                let empty = state.conns.is_empty();
                let _ = reply.send(empty);
                if empty {
                    myself.stop(None);
                }
            }
        }
        Ok(())
    }
}

fn report_empty(myself: &ActorRef<SessionMsg>, user: &str) {
    if let Some(sup) = myself.try_get_supervisor() {
        let _ = sup.send_message(SessionsMsg::Empty {
            user: user.to_owned(),
            session: myself.get_id(),
        });
    }
}

/// An online user on this node: its session and its connections.
struct Online {
    session: ActorRef<SessionMsg>,
    conns: Vec<ConnHandle>,
}

/// A message frame on its way to members, and the connection that sent it (which gets an `ack` instead).
pub type Outgoing = (Bytes, Option<ConnId>);

/// The connections of a conversation's online members, resolved once and reused until a session or the
/// member list changes: fan-out then costs no lookup per member.
#[derive(Default)]
pub struct Recipients {
    /// Directory generation and member-list version this was resolved at; `None` until resolved.
    resolved_at: Option<(u64, u64)>,
    conns: Vec<ConnHandle>,
}

impl Recipients {
    /// Push `frames` onto every recipient connection's queue — all of them in one push per connection,
    /// skipping each frame's own sender. A connection whose queue is full is told it overflowed.
    pub fn deliver(&self, frames: &[Outgoing]) {
        let mut delivered = 0u64;
        for conn in &self.conns {
            let mine = frames
                .iter()
                .filter(|(_, origin)| *origin != Some(conn.id))
                .map(|(frame, _)| frame);
            match conn.outbound.push_frames(mine) {
                Ok(n) => delivered += n as u64,
                Err(PushError::Full) => slow_consumer(&conn.outbound, conn.id),
                Err(PushError::Closed) => {}
            }
        }
        metrics::counter!("switchboard_deliveries_total").increment(delivered);
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

/// Online users' sessions on this node and their connections' queues: read by conversations for fan-out;
/// an entry and each new connection are added by the supervisor — before the connection reads anything, so
/// a `sync` never reads the store before its connection is listed for what is committed after — and a
/// connection is removed by its session when it ends.
/// Every change bumps a generation, which tells conversations their [`Recipients`] are stale.
#[derive(Clone, Default)]
pub struct SessionDirectory {
    inner: Arc<RwLock<Entries>>,
}

#[derive(Default)]
struct Entries {
    online: HashMap<UserId, Online>,
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
        let dir = self.inner.read().expect("session directory lock");
        let now = (dir.generation, members_version);
        if recipients.resolved_at == Some(now) {
            return;
        }
        recipients.conns.clear();
        let online = &dir.online;
        if members.len() <= online.len() {
            for o in members.iter().filter_map(|m| online.get(m)) {
                recipients.conns.extend(o.conns.iter().cloned());
            }
        } else {
            for (_, o) in online.iter().filter(|(u, _)| members.contains(*u)) {
                recipients.conns.extend(o.conns.iter().cloned());
            }
        }
        recipients.resolved_at = Some(now);
    }

    /// The session of `user`, if online here.
    pub fn get(&self, user: &str) -> Option<ActorRef<SessionMsg>> {
        self.inner
            .read()
            .expect("session directory lock")
            .online
            .get(user)
            .map(|o| o.session.clone())
    }

    /// Every connection on this node.
    pub fn connections(&self) -> Vec<ConnHandle> {
        self.inner
            .read()
            .expect("session directory lock")
            .online
            .values()
            .flat_map(|o| o.conns.iter().cloned())
            .collect()
    }

    pub(crate) fn insert(&self, user: UserId, session: ActorRef<SessionMsg>) {
        let mut dir = self.inner.write().expect("session directory lock");
        dir.online.insert(
            user,
            Online {
                session,
                conns: Vec::new(),
            },
        );
        dir.generation += 1;
        metrics::gauge!("switchboard_online_users").set(dir.online.len() as f64);
    }

    /// List `conn` under `user`'s entry, if `session` still owns it.
    pub(crate) fn attach(&self, user: &str, session: ractor::ActorId, conn: ConnHandle) {
        self.change(user, session, |conns| conns.push(conn));
    }

    /// Remove connection `id` from `user`'s entry, if `session` still owns it.
    fn detach(&self, user: &str, session: ractor::ActorId, id: ConnId) {
        self.change(user, session, |conns| conns.retain(|c| c.id != id));
    }

    fn change(&self, user: &str, session: ractor::ActorId, f: impl FnOnce(&mut Vec<ConnHandle>)) {
        let mut guard = self.inner.write().expect("session directory lock");
        let dir = &mut *guard;
        if let Some(o) = dir
            .online
            .get_mut(user)
            .filter(|o| o.session.get_id() == session)
        {
            f(&mut o.conns);
            dir.generation += 1;
        }
    }

    pub(crate) fn remove_if(&self, user: &str, session: ractor::ActorId) {
        let mut dir = self.inner.write().expect("session directory lock");
        if dir
            .online
            .get(user)
            .is_some_and(|o| o.session.get_id() == session)
        {
            dir.online.remove(user);
            dir.generation += 1;
        }
        metrics::gauge!("switchboard_online_users").set(dir.online.len() as f64);
    }
}
