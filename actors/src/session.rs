//! `SessionActor`: one per online user on this node, a child of the `SessionSupervisor` and the parent of
//! that user's connection actors (one per device).
//!
//! It delivers each message frame to every connection of the user by pushing the shared bytes onto each
//! connection's bounded outbound queue — never waiting: a full queue marks that connection a slow consumer,
//! which is closed (and resyncs on reconnect) without slowing the conversation or the other devices.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, ActorStatus, RpcReplyPort, SupervisionEvent};
use tracing::debug;

use crate::connection::{ConnectionMsg, Outbound, PushError};
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
    /// Its actor.
    pub actor: ActorRef<ConnectionMsg>,
}

/// Messages of a [`SessionActor`].
pub enum SessionMsg {
    /// A new connection of this user (already linked to this session).
    Attach(ConnHandle),
    /// Deliver a frame to every connection but `except`.
    Deliver {
        /// The encoded frame, shared by every recipient.
        frame: Bytes,
        /// The connection that sent the message (it gets an `ack` instead).
        except: Option<ConnId>,
    },
    /// Stop if no connection is left; answers whether it stops.
    StopIfEmpty(RpcReplyPort<bool>),
    /// Drain every connection (server shutdown); answered when all are closed.
    Drain(RpcReplyPort<()>),
}

/// The session actor.
pub struct SessionActor;

/// The state of one user's session.
pub struct SessionState {
    user: UserId,
    conns: Vec<ConnHandle>,
}

impl SessionState {
    fn deliver(&self, frame: &Bytes, except: Option<ConnId>) {
        for conn in self.conns.iter().filter(|c| Some(c.id) != except) {
            match conn.outbound.push_frame(frame.clone()) {
                Ok(()) => metrics::counter!("switchboard_deliveries_total").increment(1),
                Err(PushError::Full) => {
                    let _ = conn.actor.send_message(ConnectionMsg::Overflow);
                }
                Err(PushError::Closed) => {}
            }
        }
    }

    fn detach(&mut self, actor: ractor::ActorId) {
        self.conns.retain(|c| c.actor.get_id() != actor);
    }
}

/// How long a session waits for one connection to drain at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

impl Actor for SessionActor {
    type Msg = SessionMsg;
    type State = SessionState;
    type Arguments = UserId;

    async fn pre_start(
        &self,
        _myself: ActorRef<SessionMsg>,
        user: UserId,
    ) -> Result<SessionState, ActorProcessingErr> {
        Ok(SessionState {
            user,
            conns: Vec::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SessionMsg>,
        message: SessionMsg,
        state: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SessionMsg::Attach(handle) => {
                if matches!(
                    handle.actor.get_status(),
                    ActorStatus::Running | ActorStatus::Starting
                ) {
                    state.conns.push(handle);
                } else if state.conns.is_empty() {
                    report_empty(&myself, &state.user);
                }
            }
            SessionMsg::Deliver { frame, except } => state.deliver(&frame, except),
            SessionMsg::StopIfEmpty(reply) => {
                let empty = state.conns.is_empty();
                let _ = reply.send(empty);
                if empty {
                    myself.stop(None);
                }
            }
            SessionMsg::Drain(reply) => {
                let drains = state
                    .conns
                    .iter()
                    .map(|c| c.actor.call(ConnectionMsg::Drain, Some(DRAIN_TIMEOUT)));
                let results = futures_util::future::join_all(drains).await;
                let stuck = results
                    .iter()
                    .filter(|r| !matches!(r, Ok(CallResult::Success(()))))
                    .count();
                if stuck > 0 {
                    debug!(user_id = %state.user, stuck, "connections did not drain in time");
                }
                let _ = reply.send(());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SessionMsg>,
        event: SupervisionEvent,
        state: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        // Connections are temporary children: one that ends or fails is forgotten, never restarted (its
        // client reconnects and syncs).
        if let SupervisionEvent::ActorTerminated(cell, ..)
        | SupervisionEvent::ActorFailed(cell, _) = event
        {
            state.detach(cell.get_id());
            if state.conns.is_empty() {
                report_empty(&myself, &state.user);
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

/// Online users' sessions on this node, read by conversations for fan-out; written by the supervisor.
#[derive(Clone, Default)]
pub struct SessionDirectory {
    inner: Arc<RwLock<HashMap<UserId, ActorRef<SessionMsg>>>>,
}

impl SessionDirectory {
    /// Send `frame` to the session of every online member (one lock, one pass over the smaller side).
    pub fn deliver(&self, members: &HashSet<UserId>, frame: Bytes, except: Option<ConnId>) {
        let online = self.inner.read().expect("session directory lock");
        let mut send = |session: &ActorRef<SessionMsg>| {
            let _ = session.send_message(SessionMsg::Deliver {
                frame: frame.clone(),
                except,
            });
        };
        if members.len() <= online.len() {
            members
                .iter()
                .filter_map(|m| online.get(m))
                .for_each(&mut send);
        } else {
            online
                .iter()
                .filter(|(u, _)| members.contains(*u))
                .for_each(|(_, s)| send(s));
        }
    }

    /// The session of `user`, if online here.
    pub fn get(&self, user: &str) -> Option<ActorRef<SessionMsg>> {
        self.inner
            .read()
            .expect("session directory lock")
            .get(user)
            .cloned()
    }

    /// Every session.
    pub fn all(&self) -> Vec<ActorRef<SessionMsg>> {
        self.inner
            .read()
            .expect("session directory lock")
            .values()
            .cloned()
            .collect()
    }

    pub(crate) fn insert(&self, user: UserId, session: ActorRef<SessionMsg>) {
        let mut dir = self.inner.write().expect("session directory lock");
        dir.insert(user, session);
        metrics::gauge!("switchboard_online_users").set(dir.len() as f64);
    }

    pub(crate) fn remove_if(&self, user: &str, session: ractor::ActorId) {
        let mut dir = self.inner.write().expect("session directory lock");
        if dir.get(user).is_some_and(|s| s.get_id() == session) {
            dir.remove(user);
        }
        metrics::gauge!("switchboard_online_users").set(dir.len() as f64);
    }
}
